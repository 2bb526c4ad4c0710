"""The Ray backend on a two-node Ray cluster on this machine (``ray start --head`` on 127.0.0.1 and a
second ``ray start --address``, two CPUs each), reached with ``unison.Ray(address=...)``: a search's
actors run on both nodes, a search of 2-rank trials gets one placement group per trial slot, an
ablation gives the inline table, and a DDP run spreads its ranks over the nodes (gloo between them)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import unison

ray = pytest.importorskip("ray")
state = pytest.importorskip("ray.util.state")

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.5x+ turns on token authentication, and a driver here fails with InvalidAuthToken against a
# cluster started by `ray start` (both sides on this machine): the test cluster goes without
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}
CPUS_PER_NODE = 2
GCS: list[str] = []  # the test cluster's address, for the state API


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(*args: str, log: Path) -> subprocess.Popen[bytes]:
    # --block: the node's processes live while this one does; a session of its own, so that ending its
    # group ends exactly this node's processes
    with open(log, "ab") as out:
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus",
                                 str(CPUS_PER_NODE), "--disable-usage-stats", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, **NO_TOKEN))


def wait_started(log: Path) -> None:
    """Until the node says it runs (the driver reads the cluster's auth token once, when it connects:
    connecting before the head wrote it fails with InvalidAuthToken)."""
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    """End the node: every process of its session (``ray start`` shuts down gracefully on SIGTERM,
    but takes ~15 s; a test cluster needs no grace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if ray.is_initialized():
        ray.shutdown()
    saved = {key: os.environ.get(key) for key in NO_TOKEN}
    os.environ.update(NO_TOKEN)
    logs = tmp_path_factory.mktemp("ray-nodes")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node("--head", "--port", str(port), "--dashboard-port", str(free_port()),
                      "--include-dashboard", "true", log=logs / "head.log")
    nodes = [head]
    try:
        wait_started(logs / "head.log")
        ray.init(address=address, log_to_driver=False)
        nodes.append(start_node("--address", address, log=logs / "worker.log"))
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        ray.shutdown()  # the tests connect through unison.Ray(address=...)
        GCS[:] = [address]
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            stop_node(proc)
        # `ray start` wrote where its cluster is (ray.init() without an address joins it); it is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def node_ids(log: str) -> set[str]:
    return set(re.findall(r"'node': '([0-9a-f]+)'", log))


def nothing_of_ours_runs() -> None:
    # The state API is given the cluster's address: else it guesses, and may ask another Ray on this machine
    actors = state.list_actors(address=GCS[0], filters=[("class_name", "=", "UnisonRayWorker")], limit=1000)
    assert not [a for a in actors if a.state != "DEAD"]
    assert {g.state for g in state.list_placement_groups(address=GCS[0], limit=1000)} <= {"REMOVED"}


def test_a_search_runs_on_both_nodes(cluster: str, tmp_path: Path) -> None:
    running, slots = tmp_path / "running", 2 * CPUS_PER_NODE
    running.mkdir()

    def train(x: float, ctx: Any) -> float:
        (ctx.trial_dir / "out.txt").write_text(str(x))
        (running / str(ctx.trial_id)).touch()
        deadline = time.monotonic() + 60
        while len(list(running.iterdir())) < slots and time.monotonic() < deadline:
            time.sleep(0.05)  # until every slot runs a trial: the actors of both nodes took one
        return x

    search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="x", mode="max", trials=slots, seed=0)
    r = unison.run(train, search, backend=unison.Ray(address=cluster), storage=tmp_path / "exp",
                   progress=False)
    assert list(r.trials["status"]) == ["completed"] * slots
    assert set(r.trials["worker"]) <= {f"ray-{slot}" for slot in range(2 * CPUS_PER_NODE)}
    assert r.trials["node"].nunique() == 2  # the slots' actors ran on both nodes
    for row in r.rows:
        folder = r.path / "trials" / f"{row['trial_id']:04d}"
        assert (folder / "out.txt").read_text() == str(row["hparams"]["x"])
    log = (r.path / "workers" / "ray.log").read_text()
    assert "connect to 127.0.0.1:" in log and len(node_ids(log)) == 2, log
    nothing_of_ours_runs()


def rank_node(x: float, ctx: Any) -> float:
    import ray as ray_in_actor

    (ctx.trial_dir / f"node-{ctx.rank}.txt").write_text(ray_in_actor.get_runtime_context().get_node_id())
    time.sleep(0.2)
    return x


@pytest.mark.parametrize("strategy", ["STRICT_SPREAD", "STRICT_PACK"])
def test_a_search_of_two_rank_trials_places_each_trials_ranks_together(strategy: str, cluster: str,
                                                                        tmp_path: Path) -> None:
    search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="x", trials=4, seed=1, workers_per_trial=2)
    backend = unison.Ray(address=cluster, placement_strategy=strategy)
    r = unison.run(rank_node, search, backend=backend, storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 4
    ranks = [[(r.path / "trials" / f"{t:04d}" / f"node-{rank}.txt").read_text() for rank in (0, 1)]
             for t in r.trials["trial_id"]]
    # 2 trials at a time, each on the 2 actors of one placement group of 2 bundles
    log = (r.path / "workers" / "ray.log").read_text()
    assert log.count(f"bundles, {strategy}") == 2, log
    if strategy == "STRICT_SPREAD":
        assert all(a != b for a, b in ranks), ranks  # a trial's ranks on two nodes
    else:
        assert all(a == b for a, b in ranks), ranks  # on one node
        assert len(node_ids(log)) == 2, log  # the two groups' actors: one node each (2 CPUs a node)
    nothing_of_ours_runs()


def test_an_ablation_on_the_cluster_gives_the_inline_table(cluster: str, tmp_path: Path) -> None:
    from test_ablation import assert_same_table, feature_study, fit_r2, run_inline, tabular

    study = feature_study(repeats=2)
    inline = run_inline(fit_r2, study, tmp_path, data=tabular())
    on_ray = unison.run(fit_r2, study, data=tabular(), backend=unison.Ray(address=cluster),
                        storage=tmp_path / "ray", progress=False)
    assert_same_table(on_ray.ablation, inline.ablation)
    # (which nodes run the trials depends on which actors start first: the second node's take longer)
    assert set(on_ray.trials["node"]) <= {node.node_id for node in state.list_nodes(address=GCS[0])}
    nothing_of_ours_runs()


def test_a_ddp_run_spreads_its_two_ranks_over_the_nodes(cluster: str, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from helpers_ddp import ROWS, data_fn, model_fn, train

    backend = unison.Ray(address=cluster, placement_strategy="STRICT_SPREAD")
    run = unison.run(train, unison.Distributed(workers=2, hparams={"lr": 0.05, "epochs": 2}), model=model_fn,
                     data=data_fn, backend=backend, storage=tmp_path, progress=False)
    assert run.metrics["loss"] < run.metrics["first_loss"]
    trial = run.path / "trials" / "0000"
    r0, r1 = (json.loads((trial / f"rank-{rank}.json").read_text()) for rank in (0, 1))
    assert [r0["rank"], r1["rank"], r0["world_size"]] == [0, 1, 2]
    assert r0["model"] == "DistributedDataParallel" and r0["digest"] == r1["digest"]
    assert sorted(r0["shard"] + r1["shard"]) == list(range(ROWS))
    log = (run.path / "workers" / "ray.log").read_text()
    assert "STRICT_SPREAD" in log and len(node_ids(log)) == 2, log
    nothing_of_ours_runs()
