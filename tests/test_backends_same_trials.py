"""One training function on the inline, local and Spark (local[2]) backends: the same trials.

The same Search with the same seed gives the same trial set (ids, hyperparameters, statuses and
values) wherever it runs; only where each trial ran differs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from spark_support import active_jobs, start_session  # also skips this module without pyspark

import unison

pytestmark = pytest.mark.slow

SPACE = {"lr": unison.choice([0.001, 0.01, 0.1]), "units": unison.integer(8, 9),
         "act": unison.choice(["relu", "tanh"])}


def train(lr: float, units: int, act: str, reporter: Any, ctx: Any) -> dict[str, float]:
    if act == "tanh" and units == 9 and lr == 0.1:
        raise ValueError("this combination diverges")
    score = 0.0
    for step in range(3):
        score = units * lr * (step + 1) + (0.5 if act == "relu" else 0.25)
        reporter.report(step=step, score=score)
    print(f"trial {ctx.trial_id}: lr={lr} units={units} act={act}")
    return {"score": score, "loss": 1.0 / (1.0 + score)}


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Any:
    session = start_session("local[2]", tmp_path_factory.getbasetemp())
    yield session
    session.stop()


def trial_set(result: unison.SearchResult) -> dict[int, tuple[Any, ...]]:
    return {row["trial_id"]: (row["hparams"], row["status"], row["value"], row["metrics"].get("loss"))
            for row in result.rows}


@pytest.mark.parametrize("optimizer,trials", [("grid", None), ("random", 8)])
def test_inline_local_and_spark_run_the_same_trials(spark: Any, tmp_path: Path, optimizer: str,
                                                     trials: int | None) -> None:
    search = unison.Search(SPACE, metric="score", mode="max", optimizer=optimizer, trials=trials, seed=11)
    results = {
        name: unison.run(train, search, backend=backend, storage=tmp_path / name, progress=False)
        for name, backend in [("inline", "inline"), ("local", unison.Local(workers=2)),
                              ("spark", unison.Spark(spark))]
    }
    expected = trial_set(results["inline"])
    assert len(expected) == (12 if optimizer == "grid" else 8)
    for hparams, status, value, _ in expected.values():
        diverges = (hparams["act"], hparams["units"], hparams["lr"]) == ("tanh", 9, 0.1)
        assert status == ("failed" if diverges else "completed") and (value is None) == diverges
    assert trial_set(results["local"]) == expected
    assert trial_set(results["spark"]) == expected

    on_spark = results["spark"].trials
    assert set(on_spark["worker"]) <= {"spark-0", "spark-1"}
    assert set(on_spark["host"]) == {socket.gethostname()}
    assert os.getpid() not in set(on_spark["pid"])  # trials ran in Spark's Python workers
    assert set(results["inline"].trials["pid"]) == {os.getpid()}
    local_pids = results["local"].trials["pid"]
    assert local_pids.notna().all() and os.getpid() not in set(local_pids)
    for tid, (hparams, status, _, _) in expected.items():
        if status == "completed":  # the trial's output reached the driver's experiment directory
            log = results["spark"].path / "trials" / f"{tid:04d}" / "stdout.log"
            assert log.read_text() == f"trial {tid}: lr={hparams['lr']} units={hparams['units']} " \
                                      f"act={hparams['act']}\n"
    assert active_jobs(spark) == []


def test_spark_slots_default_to_the_local_master_threads(spark: Any) -> None:
    backend = unison.Spark(spark)
    assert backend.slots() == 2  # local[2]
    assert backend.listen_host == "127.0.0.1"
    assert unison.Spark(spark, slots=5).slots() == 5
    with pytest.raises(ValueError, match="slots"):
        unison.Spark(slots=0)
    with pytest.raises(ValueError, match="max_trial_files_bytes"):
        unison.Spark(max_trial_files_bytes=10**9)


def test_a_python_worker_killed_on_local_master_gets_a_replacement_job(spark: Any, tmp_path: Path) -> None:
    # local[N] never retries a failed task: the slot's job fails, and the backend starts a new one.
    def train(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1 and ctx.attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.5)
        return x

    backend = unison.Spark(spark)
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=8, seed=5)
    r = unison.run(train, search, backend=backend, storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 8
    assert dict(zip(r.trials["trial_id"], r.trials["attempts"], strict=True))[1] == 2
    log = (r.path / "workers" / "spark.log").read_text()
    assert "job 0 ended after" in log and "failed" in log  # the slot job of the killed worker
    replaced = [line for line in log.splitlines() if " job 1: {" in line]
    assert len(replaced) == 1 and "'error': None" in replaced[0], log  # its replacement connected
    tracker = spark.sparkContext.statusTracker()
    states = sorted(tracker.getJobInfo(j).status for j in tracker.getJobIdsForGroup(backend.job_group))
    assert states == ["FAILED", "SUCCEEDED", "SUCCEEDED"]
    assert active_jobs(spark) == []


def test_executors_that_cannot_reach_the_driver_abort_the_search_saying_so(spark: Any, tmp_path: Path,
                                                                           monkeypatch: Any) -> None:
    backend = unison.Spark(spark)
    # Workers are sent to an address where nothing listens (the driver binds 127.0.0.1 only).
    monkeypatch.setattr(backend, "_connect_host", lambda bound: "127.0.0.2")
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=4, seed=6)
    start = time.monotonic()
    with pytest.raises(unison.WorkerError, match="could not connect to the driver") as info:
        unison.run(lambda x: x, search, backend=backend, storage=tmp_path, progress=False)
    assert "127.0.0.2" in str(info.value) and "listen_host" in str(info.value)
    assert time.monotonic() - start < 30
    assert active_jobs(spark) == []
    path = next(tmp_path.iterdir())
    assert json.loads((path / "experiment.json").read_text())["status"] == "failed"
