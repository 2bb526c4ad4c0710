"""Distributed data-parallel training with the same function: real gloo process groups on CPU, real worker
processes, a real Spark ``local-cluster``; and the pieces (sharding, the DataLoader wrapper, the
validation) on their own.

The integration tests run :func:`helpers_ddp.train` unchanged as a single run, a search, a search of
2-rank trials with early stopping and a 2-rank run (locally and on Spark), and read back what every
rank recorded in its trial folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import unison  # noqa: E402
from unison.worker.rank import shard, shard_bounds  # noqa: E402

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers_ddp must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from helpers_ddp import ROWS, data_fn, model_fn, train, train_failing_on_rank_1  # noqa: E402
from processes import alive, journal  # noqa: E402

HPARAMS = {"lr": 0.05, "epochs": 3}


def ranks(trial_dir: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads((trial_dir / f"rank-{r}.json").read_text()) for r in range(n)]


def check_two_rank_run(trial_dir: Path, epochs: int = HPARAMS["epochs"]) -> list[dict[str, Any]]:
    """What every 2-rank data-parallel run of ``train`` must show."""
    r0, r1 = ranks(trial_dir, 2)
    assert [r0["rank"], r1["rank"]] == [0, 1] and r0["world_size"] == r1["world_size"] == 2
    assert r0["is_chief"] and not r1["is_chief"] and r0["pid"] != r1["pid"]
    assert r0["env"]["RANK"] == "0" and r1["env"]["WORLD_SIZE"] == "2"
    assert r0["env"]["MASTER_PORT"] == r1["env"]["MASTER_PORT"] and r0["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert r0["model"] == r1["model"] == "DistributedDataParallel" and r0["device"] == "cpu"
    # the same parameters on every rank after training, and a model that learned
    assert r0["digest"] == r1["digest"]
    assert r0["full_after"] == r1["full_after"] < 0.5 * r0["full_before"]
    assert r0["losses"][-1] < r0["losses"][0]
    # ctx.shard: disjoint halves whose union is the dataset
    assert len(r0["shard"]) == len(r1["shard"]) == ROWS // 2
    assert sorted(r0["shard"] + r1["shard"]) == list(range(ROWS))
    # ctx.prepare(DataLoader): per epoch, disjoint halves whose union is the dataset, shuffled anew
    for epoch in range(epochs):
        assert len(r0["seen"][epoch]) == len(r1["seen"][epoch]) == ROWS // 2
        assert sorted(r0["seen"][epoch] + r1["seen"][epoch]) == list(range(ROWS))
    assert r0["seen"][0] != r0["seen"][1]
    # the sampler's epoch advanced with every pass over the loader, without set_epoch in train
    assert r0["epochs"] == r1["epochs"] == list(range(epochs))
    assert r0["loader_passes"] == r1["loader_passes"] == epochs
    return [r0, r1]


# ------------------------------------------------------------------------------------ unit tests
@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (2, 4), (64, 2)])
def test_shard_bounds_are_disjoint_cover_everything_and_differ_by_at_most_one(n: int, world: int) -> None:
    parts = [shard_bounds(n, r, world) for r in range(world)]
    rows = [i for start, stop in parts for i in range(start, stop)]
    assert rows == list(range(n))
    sizes = [stop - start for start, stop in parts]
    assert max(sizes) - min(sizes) <= 1
    even = [shard_bounds(n, r, world, even=True) for r in range(world)]
    assert {stop - start for start, stop in even} == {n // world}


def test_shard_splits_every_supported_type() -> None:
    import pandas as pd

    x = np.arange(20).reshape(10, 2)
    frame = pd.DataFrame({"a": range(10), "b": range(10, 20)})
    assert shard(x, 1, 3).tolist() == x[4:7].tolist()
    assert list(shard(frame, 2, 3)["a"]) == [7, 8, 9]
    parts = shard({"x": x, "y": np.arange(10)}, 0, 2)
    assert parts["x"].tolist() == x[:5].tolist() and parts["y"].tolist() == [0, 1, 2, 3, 4]
    xs, ys = shard((torch.arange(10), np.arange(10)), 1, 2)
    assert xs.tolist() == [5, 6, 7, 8, 9] and ys.tolist() == [5, 6, 7, 8, 9]
    assert shard(list("abcde"), 1, 2) == ["d", "e"]
    subset = shard(torch.utils.data.TensorDataset(torch.arange(9)), 2, 3)
    assert isinstance(subset, torch.utils.data.Subset) and [int(subset[i][0]) for i in range(3)] == [6, 7, 8]
    assert shard(x, 0, 1) is x  # one process: the whole
    with pytest.raises(ValueError, match="one length"):
        shard({"x": np.arange(3), "y": np.arange(4)}, 0, 2)
    with pytest.raises(TypeError, match="cannot split a set"):
        shard({1, 2}, 0, 2)


def test_context_is_the_identity_outside_distributed_training(tmp_path: Path) -> None:
    ctx = unison.Context(trial_id=0, trial_dir=tmp_path)
    model, data = torch.nn.Linear(2, 1), np.arange(4)
    loader = torch.utils.data.DataLoader(torch.arange(4))
    assert ctx.prepare(model) is model and ctx.prepare(loader) is loader and ctx.shard(data) is data


def test_a_prepared_loader_shards_and_advances_its_sampler_epoch_per_pass() -> None:
    from unison.frameworks.torch import DistributedLoader, distributed_loader

    dataset = torch.utils.data.TensorDataset(torch.arange(12))
    original = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, drop_last=True)
    loaders = [distributed_loader(original, rank, 2, seed=3) for rank in range(2)]
    assert all(isinstance(loader, DistributedLoader) for loader in loaders)
    assert loaders[0].batch_size == 2 and loaders[0].drop_last and loaders[0].sampler.shuffle
    passes = [[[int(v) for (batch,) in loader for v in batch] for _ in range(3)] for loader in loaders]
    for epoch in range(3):
        assert sorted(passes[0][epoch] + passes[1][epoch]) == list(range(12))
    assert passes[0][0] != passes[0][1]  # a new shuffle each pass
    assert loaders[0].sampler.epoch == 2 and loaders[0].epochs == 3
    assert distributed_loader(loaders[0], 0, 2, seed=3) is loaders[0]
    with pytest.raises(TypeError, match="WeightedRandomSampler"):
        sampler = torch.utils.data.WeightedRandomSampler([1.0] * 12, 12)
        distributed_loader(torch.utils.data.DataLoader(dataset, sampler=sampler), 0, 2, seed=0)


def test_a_prepared_loader_pins_memory_on_a_cuda_device_only() -> None:
    from unison.frameworks.torch import distributed_loader

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=2)
    assert distributed_loader(loader, 0, 2, seed=0, device="cuda:0").pin_memory
    assert not distributed_loader(loader, 0, 2, seed=0, device="cpu").pin_memory


def test_distributed_and_workers_per_trial_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        unison.Distributed(workers=0)
    with pytest.raises(TypeError, match="fixed values"):
        unison.Distributed(workers=2, hparams={"lr": unison.uniform(0, 1)})
    with pytest.raises(ValueError, match="process_group"):
        unison.Distributed(workers=2, process_group="mpi")
    with pytest.raises(ValueError, match="strategy"):
        unison.Distributed(workers=2, strategy="zero3")
    with pytest.raises(ValueError, match="workers_per_trial"):
        unison.Search({"x": 1}, workers_per_trial=0)
    search = unison.Search({"x": unison.uniform(0, 1)}, trials=2, workers_per_trial=2)
    assert unison.Search.from_dict(search.to_dict()).workers_per_trial == 2
    assert "workers_per_trial" not in unison.Search({"x": 1}).to_dict()  # old experiments resume unchanged
    with pytest.raises(ValueError, match="backend='local' or 'spark'"):
        unison.run(train, unison.Distributed(workers=2, hparams=HPARAMS), model=model_fn, data=data_fn,
                   backend="inline", storage=tmp_path)
    with pytest.raises(ValueError, match="needs 2 worker slots"):
        unison.run(train, search, model=model_fn, data=data_fn, backend=unison.Local(workers=1),
                   storage=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was started or written


# ----------------------------------------------------------------------------- local integration
@pytest.mark.slow
def test_the_same_function_as_single_run_search_and_two_process_ddp(tmp_path: Path) -> None:
    single = unison.run(train, hparams=HPARAMS, model=model_fn, data=data_fn, storage=tmp_path / "single")
    (alone,) = ranks(single.path / "trials" / "0000", 1)
    assert alone["world_size"] == 1 and alone["model"] == "Sequential"
    assert alone["shard"] == list(range(ROWS)) and sorted(alone["seen"][0]) == list(range(ROWS))
    assert single.metrics["loss"] < single.metrics["first_loss"]

    search = unison.Search({"lr": unison.loguniform(0.01, 0.1), "epochs": 3}, metric="loss", mode="min",
                           trials=4, optimizer="random", seed=0)
    found = unison.run(train, search, model=model_fn, data=data_fn, backend=unison.Local(workers=2),
                       storage=tmp_path / "search", progress=False)
    assert list(found.trials["status"]) == ["completed"] * 4
    for row in found.rows:
        assert ranks(found.path / "trials" / f"{row['trial_id']:04d}", 1)[0]["world_size"] == 1

    start = time.monotonic()
    run = unison.run(train, unison.Distributed(workers=2, hparams=HPARAMS, metric="loss"), model=model_fn,
                     data=data_fn, storage=tmp_path / "ddp", progress=False)
    elapsed = time.monotonic() - start
    assert isinstance(run, unison.RunResult) and run.value == run.metrics["loss"] < run.metrics["first_loss"]
    r0, r1 = check_two_rank_run(run.path / "trials" / "0000")
    assert {r0["local_rank"], r1["local_rank"]} == {0, 1}  # one host
    assert run.metrics["loss"] == r0["losses"][-1]  # the chief's result
    (start_event,) = [ev for ev in journal(run.path) if ev["e"] == "start"]
    assert [rank["pid"] for rank in start_event["ranks"]] == [r0["pid"], r1["pid"]]
    # rank 0 writes the trial's logs, rank 1 its own
    assert (run.path / "trials" / "0000" / "metrics.jsonl").read_text().count("\n") == HPARAMS["epochs"]
    assert (run.path / "trials" / "0000" / "rank-1" / "metrics.jsonl").is_file()
    meta = json.loads((run.path / "experiment.json").read_text())
    assert meta["kind"] == "distributed" and meta["workers"] == 2 and meta["distributed"]["workers"] == 2
    assert elapsed < 60


@pytest.mark.slow
def test_an_exception_on_rank_1_fails_the_run_at_once_with_its_traceback(tmp_path: Path) -> None:
    with pytest.raises(unison.RunFailed) as failure:
        unison.run(train_failing_on_rank_1, unison.Distributed(workers=2),
                   model=lambda: torch.nn.Linear(4, 1), storage=tmp_path, progress=False)
    caught = time.time()
    message = str(failure.value)
    assert "rank 1 of 2" in message and "ValueError: rank 1 cannot go on at step 3" in message
    assert "train_failing_on_rank_1" in message  # the traceback, not just the last line
    trial_dir = next(tmp_path.iterdir()) / "trials" / "0000"
    raised = float((trial_dir / "raised-at").read_text())
    assert caught - raised < 5.0, "rank 0 waited in its all-reduce instead of being aborted"
    # rank 0 was aborted (it was waiting for rank 1 in an all-reduce) and said so in its log
    assert "aborted by the driver" in (trial_dir / "stderr.log").read_text()
    assert "ValueError" in (trial_dir / "rank-1" / "stderr.log").read_text()
    pids = [int((trial_dir / f"pid-{r}").read_text()) for r in (0, 1)]
    assert not [pid for pid in pids if alive(pid)], "a rank's process was left behind"
    assert failure.value.path == trial_dir.parent.parent


@pytest.mark.slow
def test_a_search_of_two_rank_trials_stops_both_ranks_at_the_same_step(tmp_path: Path) -> None:
    # one 2-rank trial at a time on 2 workers, in grid order: two good learning rates, then two that
    # barely learn and are stopped by the median rule at step 1
    search = unison.Search({"lr": unison.choice([0.05, 0.04, 0.0001, 0.00005]), "epochs": 4}, metric="loss",
                           mode="min", optimizer="grid", workers_per_trial=2,
                           scheduler=unison.MedianStopping(grace_period=1, min_trials=2))
    result = unison.run(train, search, model=model_fn, data=data_fn, backend=unison.Local(workers=2),
                        storage=tmp_path, progress=False)
    frame = result.trials.set_index("trial_id")
    assert list(frame["status"]) == ["completed", "completed", "stopped", "stopped"]
    assert list(frame["last_step"]) == [3, 3, 1, 1]
    for row in result.rows:
        trial_dir = result.path / "trials" / f"{row['trial_id']:04d}"
        r0, r1 = ranks(trial_dir, 2)
        assert len(r0["losses"]) == len(r1["losses"]) == row["last_step"] + 1  # both ranks stopped there
        assert r0["digest"] == r1["digest"] and r0["world_size"] == 2
    check_two_rank_run(result.path / "trials" / "0000", epochs=4)
    assert {frozenset(w.split(",")) for w in frame["worker"]} == {frozenset({"worker-0", "worker-1"})}
    meta = json.loads((result.path / "experiment.json").read_text())
    assert meta["workers"] == 2 and meta["search"]["workers_per_trial"] == 2


# ----------------------------------------------------------------------------------------- Spark
@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("pyspark")
    from spark_support import cluster_session

    return cluster_session(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_a_two_rank_run_on_a_spark_local_cluster(spark: Any, tmp_path: Path) -> None:
    from spark_support import active_jobs

    backend = unison.Spark(spark)
    run = unison.run(train, unison.Distributed(workers=2, hparams=HPARAMS), model=model_fn, data=data_fn,
                     backend=backend, storage=tmp_path, progress=False)
    assert run.value is None and run.metrics["loss"] < run.metrics["first_loss"]
    r0, r1 = check_two_rank_run(run.path / "trials" / "0000")  # shipped back from the executors
    assert os.getpid() not in (r0["pid"], r1["pid"])
    assert (run.path / "trials" / "0000" / "rank-1" / "metrics.jsonl").is_file()
    assert "in one barrier stage" in (run.path / "workers" / "spark.log").read_text()
    assert active_jobs(spark) == []
    with pytest.raises(unison.WorkerError, match="needs 3 Spark task slots at once, but .* offers 2"):
        unison.run(train, unison.Distributed(workers=3, hparams=HPARAMS), model=model_fn, data=data_fn,
                   backend=unison.Spark(spark, executor_wait_s=0.5), storage=tmp_path / "too-many",
                   progress=False)


STEPS, KILL_AT = 6, 3  # the Spark checkpoint test: rank 1 of attempt 0 dies before computing step KILL_AT


def _full_batch() -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _sgd(model: Any) -> Any:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def checkpointing_train(work: str, model: Any, reporter: Any, ctx: Any) -> dict[str, float]:
    """Full-batch SGD on this rank's half, checkpointing every step; rank 1 of attempt 0 kills its
    process at step KILL_AT. ``work`` (a folder both executors see, as the test does) gets each rank's
    ``resumed-<rank>.txt`` (attempt, first step, the checkpoint it loaded, that checkpoint's rank) and
    ``computed-<rank>.txt`` (attempt and step of every step computed)."""
    optimizer = _sgd(model)
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
    if ctx.checkpoint is not None:
        model.module.load_state_dict(ctx.checkpoint["model"])
        optimizer.load_state_dict(ctx.checkpoint["optim"])
    saved_by = ctx.checkpoint["rank"] if ctx.checkpoint is not None else None
    with open(Path(work) / f"resumed-{ctx.rank}.txt", "a", encoding="utf-8") as log:
        log.write(f"{ctx.attempt} {start} {ctx.checkpoint_path} {saved_by}\n")
    x, y = ctx.shard(_full_batch())
    for step in range(start, STEPS):
        if step == KILL_AT and ctx.attempt == 0 and ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the executor's Python worker dies mid-run
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checkpoint = {"model": model.module.state_dict(), "optim": optimizer.state_dict(), "rank": ctx.rank}
        reporter.report(step=step, checkpoint=checkpoint, loss=loss.item())
        with open(Path(work) / f"computed-{ctx.rank}.txt", "a", encoding="utf-8") as log:
            log.write(f"{ctx.attempt} {step}\n")
    if ctx.is_chief:
        torch.save(model.module.state_dict(), ctx.trial_dir / "final.pt")
    return {"loss": loss.item()}


def _checkpoint_model(hparams: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _uninterrupted_weights() -> dict[str, Any]:
    """Full-batch SGD in this process: what DDP's average of the two equal halves' gradients gives."""
    model = _checkpoint_model({})
    optimizer = _sgd(model)
    x, y = _full_batch()
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.slow
def test_a_spark_run_whose_rank_dies_resumes_every_rank_from_rank_0s_shipped_checkpoint(
        spark: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    run = unison.Distributed(workers=2, hparams={"work": str(work)}, metric="loss", mode="min", max_retries=1,
                             keep_checkpoints=1)
    r = unison.run(checkpointing_train, run, model=_checkpoint_model, backend=unison.Spark(spark),
                   storage=tmp_path / "runs", progress=False)
    trial = r.path / "trials" / "0000"
    assert r.checkpoint == trial / "checkpoints" / f"step-{STEPS - 1:06d}"
    events = journal(r.path)
    assert [ev["attempt"] for ev in events if ev["e"] == "start"] == [0, 1]
    assert [ev["e"] for ev in events].count("lost") == 1
    assert [ev["step"] for ev in events if ev["e"] == "report"] == list(range(STEPS))  # none computed twice
    for rank in (0, 1):
        computed = [tuple(map(int, line.split())) for line in (work / f"computed-{rank}.txt").read_text()
                    .splitlines()]
        assert computed == [(0, s) for s in range(KILL_AT)] + [(1, s) for s in range(KILL_AT, STEPS)]
        first, retry = [line.split() for line in (work / f"resumed-{rank}.txt").read_text().splitlines()]
        assert first == ["0", "0", "None", "None"]
        assert retry[:2] == ["1", str(KILL_AT)] and retry[3] == "0"  # rank 0's checkpoint, on every rank
        staged = Path(retry[2])  # a copy streamed to the rank's executor, deleted when the trial ended
        assert not staged.is_relative_to(r.path) and not staged.exists()
    assert not (trial / "rank-1" / "checkpoints").exists()
    losses = {ev["step"]: ev["metrics"]["loss"] for ev in events if ev["e"] == "report"}
    kept = sorted(int(p.name.split("-")[1]) for p in (trial / "checkpoints").iterdir())
    assert kept == sorted({STEPS - 1, min(losses, key=losses.__getitem__)})  # the last one, and the best

    saved = unison.load_checkpoint(r.checkpoint)
    assert saved["rank"] == 0 and set(saved) == {"model", "optim", "rank"}
    fresh = _checkpoint_model({})
    fresh.load_state_dict(saved["model"])
    final, reference = torch.load(trial / "final.pt"), _uninterrupted_weights()  # final.pt: shipped back
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, final[name]), name  # the checkpoint holds rank 0's last weights
        assert torch.allclose(tensor, reference[name], atol=1e-5), name  # as if never interrupted


def _reports_its_rank_as_step(reporter: Any, ctx: Any, model: Any) -> float:
    reporter.report(step=10 + ctx.rank, loss=1.0)
    return 1.0


@pytest.mark.slow
def test_ranks_that_report_different_steps_fail_saying_so(tmp_path: Path) -> None:
    with pytest.raises(unison.RunFailed, match="every rank must call reporter.report at the same points"):
        unison.run(_reports_its_rank_as_step, unison.Distributed(workers=2),
                   model=lambda: torch.nn.Linear(2, 1), storage=tmp_path, progress=False)
