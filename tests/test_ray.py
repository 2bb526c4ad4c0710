"""The Ray backend on a local Ray of 2 CPUs: one actor per slot running the worker loop, trial files
shipped back, a killed actor's trial retried, and no actor of ours left alive once a run returns."""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from processes import journal

import unison

ray = pytest.importorskip("ray")
state = pytest.importorskip("ray.util.state")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Any:
    # Without token authentication, as tests/test_ray_cluster.py's cluster: a process that once used
    # Ray with a token cannot use a cluster without one (its actors are cancelled before they start)
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # address="local": a Ray of its own, even where `ray start` left /tmp/ray/ray_current_cluster
    # behind (ray.init() would try to join that cluster). The state API (ray.util.state) asks the
    # dashboard's server: it must run.
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def here() -> str:
    """This Ray's address, for the state API (which otherwise guesses, and may ask another Ray)."""
    return str(ray.get_runtime_context().gcs_address)


def our_actors(*states: str) -> list[Any]:
    actors = state.list_actors(address=here(), filters=[("class_name", "=", "UnisonRayWorker")], limit=1000)
    return [a for a in actors if not states or a.state in states]


def search(trials: int, seed: int = 0) -> unison.Search:
    return unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                         seed=seed)


def test_import_unison_does_not_import_ray() -> None:
    code = "import sys, unison; unison.Ray; from unison.backends import backend_names; backend_names(); " \
           "assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_search_runs_on_two_actors_and_their_files_come_back(tmp_path: Path) -> None:
    running = tmp_path / "running"
    running.mkdir()

    def train(x: float, reporter: Any, ctx: Any) -> dict[str, float]:
        print(f"stdout of trial {ctx.trial_id}")
        (ctx.trial_dir / "model.txt").write_text(f"{ctx.trial_id} {x} {ctx.trial_dir}")
        reporter.report(step=0, value=x)
        (running / str(ctx.trial_id)).touch()
        deadline = time.monotonic() + 60
        while len(list(running.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until both slots took a trial (an actor may start seconds after the other)
        return {"value": 2 * x}

    class Nodes(unison.Callback):
        seen: list[str | None] = []

        def on_trial_start(self, trial: Any) -> None:
            self.seen.append(trial.node)

    started = time.monotonic()
    r = unison.run(train, search(4), backend="ray", storage=tmp_path / "exp", progress=False,
                   callbacks=[Nodes()])
    took = time.monotonic() - started
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 4
    assert set(r.trials["worker"]) == {"ray-0", "ray-1"}
    assert os.getpid() not in set(r.trials["pid"])
    # The node each actor ran on: this process's node, the only one of this Ray
    node = ray.get_runtime_context().get_node_id()
    assert list(r.trials["node"]) == [node] * 4 and Nodes.seen == [node] * 4
    assert list(unison.SearchResult.load(r.path).trials["node"]) == [node] * 4  # read from the journal
    for row in r.rows:
        folder = r.path / "trials" / f"{row['trial_id']:04d}"
        assert (folder / "stdout.log").read_text() == f"stdout of trial {row['trial_id']}\n"
        model = (folder / "model.txt").read_text().split()
        assert model[:2] == [str(row["trial_id"]), str(row["hparams"]["x"])]
        assert not model[2].startswith(str(r.path))  # the actor wrote into a folder of its own
    assert "actors unison-" in (r.path / "workers" / "ray.log").read_text()
    assert our_actors("ALIVE", "PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY") == []
    print(f"4 trials on Ray: {took:.2f} s")


def test_an_actor_killed_mid_trial_is_retried_and_the_search_completes(tmp_path: Path) -> None:
    marker = tmp_path / "running"

    def train(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1 and ctx.attempt == 0:
            marker.write_text(str(os.getpid()))
            time.sleep(30)  # until its actor is killed
        time.sleep(0.2)
        return x

    def kill_when_running() -> None:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(marker.read_text())
        [actor] = [a for a in our_actors("ALIVE") if a.pid == pid]
        ray.kill(ray.get_actor(actor.name))
        killed.append(actor.name)

    killed: list[str] = []
    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    r = unison.run(train, search(5, seed=1), backend=unison.Ray(), storage=tmp_path / "exp", progress=False)
    killer.join(5)
    assert killed
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 5
    assert r.trials.set_index("trial_id").loc[1, "attempts"] == 2, r.trials
    retried = r.trials.set_index("trial_id").loc[1]
    assert int(marker.read_text()) != retried["pid"]  # the retry ran in another actor
    assert retried["worker"] != killed[0].split("-", 2)[2]  # actors are unison-<token>-<worker>
    log = (r.path / "workers" / "ray.log").read_text()
    assert "failed: ActorDiedError" in log, log
    [lost] = [ev for ev in journal(r.path) if ev["e"] == "lost"]
    assert lost["id"] == 1 and "its process was killed (Ray actor died: it was killed by" in lost["reason"]
    assert our_actors("ALIVE", "PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY") == []


def test_a_two_rank_ddp_run_starts_its_ranks_in_one_placement_group(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from helpers_ddp import ROWS, data_fn, model_fn, train

    hparams = {"lr": 0.05, "epochs": 2}
    started = time.monotonic()
    run = unison.run(train, unison.Distributed(workers=2, hparams=hparams), model=model_fn, data=data_fn,
                     backend="ray", storage=tmp_path, progress=False)
    took = time.monotonic() - started
    assert run.metrics["loss"] < run.metrics["first_loss"]
    trial = run.path / "trials" / "0000"
    r0, r1 = (json.loads((trial / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert [r0["rank"], r1["rank"], r0["world_size"]] == [0, 1, 2]
    assert r0["model"] == "DistributedDataParallel" and r0["digest"] == r1["digest"]
    assert sorted(r0["shard"] + r1["shard"]) == list(range(ROWS))
    assert os.getpid() not in (r0["pid"], r1["pid"]) and r0["pid"] != r1["pid"]
    assert (trial / "rank-1" / "metrics.jsonl").is_file()  # shipped back from rank 1's actor
    assert "in one placement group" in (run.path / "workers" / "ray.log").read_text()
    assert our_actors("ALIVE", "PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY") == []
    assert {g.state for g in state.list_placement_groups(address=here(), limit=1000)} <= {"REMOVED"}
    print(f"2-rank DDP run on Ray: {took:.2f} s")


def test_an_ablation_on_ray_gives_the_inline_table(tmp_path: Path) -> None:
    from test_ablation import assert_same_table, feature_study, fit_r2, run_inline, tabular

    study = feature_study(repeats=2)
    inline = run_inline(fit_r2, study, tmp_path, data=tabular())
    on_ray = unison.run(fit_r2, study, data=tabular(), backend="ray", storage=tmp_path / "ray",
                        progress=False)
    assert all(str(w).startswith("ray-") for w in on_ray.trials["worker"])
    assert_same_table(on_ray.ablation, inline.ablation)
    nothing_of_ours_runs()


def test_a_run_of_more_ranks_than_the_cluster_holds_fails_saying_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(unison.WorkerError, match=r"needs 3 Ray slots .* the cluster has 2 CPUs and 0 GPUs"):
        unison.run(lambda: 0.0, unison.Distributed(workers=3), backend=unison.Ray(executor_wait_s=0.5),
                   storage=tmp_path, progress=False)


def test_slots_the_cluster_cannot_hold_fail_instead_of_waiting_for_good(tmp_path: Path) -> None:
    backend = unison.Ray(slots=1, num_gpus_per_slot=1, executor_wait_s=0.5)  # this Ray has no GPU
    with pytest.raises(unison.WorkerError, match=r"a Ray slot needs 1 CPU \+ 1 GPU each .* 0 GPUs"):
        unison.run(lambda x: x, search(2), backend=backend, storage=tmp_path / "a", progress=False)
    gpu_search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="x", trials=2, gpus_per_trial=1)
    needs = r"gpus_per_trial=1\) needs 1 Ray slot\(s\) of 1 CPU \+ 1 GPU"
    with pytest.raises(unison.WorkerError, match=needs):
        unison.run(lambda x: x, gpu_search, backend=unison.Ray(slots=1, executor_wait_s=0.5),
                   storage=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()  # a GPU request fails before anything is written
    nothing_of_ours_runs()


def test_actors_that_cannot_import_unison_fail_the_run_saying_why(tmp_path: Path) -> None:
    # A node whose unison cannot be imported: a package of that name, first on the actors' path, fails
    (tmp_path / "unison").mkdir()
    (tmp_path / "unison" / "__init__.py").write_text("raise ImportError('this unison is broken')\n")
    backend = unison.Ray(runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path)}})
    started = time.monotonic()
    with pytest.raises(unison.WorkerError, match=r"keep failing before they connect(?s:.*)failed to import"):
        unison.run(lambda x: x, search(2), backend=backend, storage=tmp_path, progress=False)
    assert time.monotonic() - started < 30
    nothing_of_ours_runs()


def test_the_runtime_env_reaches_the_training_function(tmp_path: Path) -> None:
    def train(x: float, ctx: Any) -> float:
        (ctx.trial_dir / "env.txt").write_text(os.environ.get("UNISON_RAY_TEST", "unset"))
        return x

    backend = unison.Ray(slots=1, runtime_env={"env_vars": {"UNISON_RAY_TEST": "from runtime_env"}})
    r = unison.run(train, search(2), backend=backend, storage=tmp_path, progress=False)
    assert [(r.path / "trials" / f"{t:04d}" / "env.txt").read_text() for t in r.trials["trial_id"]] == \
        ["from runtime_env"] * 2
    assert "UNISON_RAY_TEST" not in os.environ


def test_kept_actors_serve_the_next_experiment_until_closed(tmp_path: Path) -> None:
    def train(x: float) -> float:
        time.sleep(0.2)
        return x

    with unison.Ray(slots=2, keep_actors=True) as backend:
        unison.run(train, search(4), backend=backend, storage=tmp_path / "a", progress=False)
        kept = {actor.pid for actor in our_actors("ALIVE")}
        assert len(kept) == 2  # kept, idle
        started = time.monotonic()
        second = unison.run(train, search(4, seed=1), backend=backend, storage=tmp_path / "b", progress=False)
        took = time.monotonic() - started
        assert set(second.trials["pid"]) <= kept  # the kept actors' processes ran the trials
        assert "2 kept actor(s) serve this experiment" in (second.path / "workers" / "ray.log").read_text()
        # a distributed run places its ranks anew: the kept actors make way
        run = unison.run(lambda ctx: float(ctx.rank), unison.Distributed(workers=2), backend=backend,
                         storage=tmp_path / "c", progress=False)
        assert run.value == 0.0
    nothing_of_ours_runs()
    print(f"4 trials of 0.2 s on 2 kept actors: {took:.2f} s")


def interrupt_when_started(storage: Path, starts: int) -> None:
    """Ctrl-C the main thread once ``starts`` trials (or ranks' trial) started under ``storage``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        paths = list(storage.glob("*/journal.jsonl"))
        if paths and sum(ev["e"] == "start" for ev in journal(paths[0].parent)) >= starts:
            break
        time.sleep(0.05)
    _thread.interrupt_main()


def nothing_of_ours_runs() -> None:
    assert our_actors("ALIVE", "PENDING_CREATION", "RESTARTING", "DEPENDENCIES_UNREADY") == []
    assert {g.state for g in state.list_placement_groups(address=here(), limit=1000)} <= {"REMOVED"}


@pytest.mark.parametrize("kind", ["search", "distributed"])
def test_ctrl_c_leaves_no_actor_and_no_placement_group(kind: str, tmp_path: Path) -> None:
    def train(x: float = 0.0) -> float:
        time.sleep(60)
        return x

    context = search(4, seed=3) if kind == "search" else unison.Distributed(workers=2)
    threading.Thread(target=interrupt_when_started, args=(tmp_path, 2 if kind == "search" else 1),
                     daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, context, backend="ray", storage=tmp_path, progress=False)
    assert time.monotonic() - started < 30  # not after the 60 s trials
    nothing_of_ours_runs()
    path = next(tmp_path.iterdir())
    assert json.loads((path / "experiment.json").read_text())["status"] == "interrupted"
    assert "stopped (forced)" in (path / "workers" / "ray.log").read_text()
