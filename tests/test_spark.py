"""The Spark backend on ``local-cluster[2,1,1024]``: two real executor JVMs, each with its own Python
workers, a driver they reach over TCP, and no shared notion of the trial folders.

Workers killed mid-trial (the Python worker, the executor JVM), failing functions, files shipped
back (and what does not fit), and an interrupted search that must leave no Spark job behind.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from processes import journal

# spark_support also skips this module without pyspark
from spark_support import active_jobs, registered_executors, start_session

import unison

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # A session of its own, not the shared one (spark_support.cluster_session): the interruption tests
    # time Spark's cancellation of fresh Python workers; warm reused workers end their tasks first
    session = start_session("local-cluster[2,1,1024]", tmp_path_factory.getbasetemp(), executors=2)
    yield session
    session.stop()


def job_states(spark: Any, group: str) -> list[str]:
    tracker = spark.sparkContext.statusTracker()
    return [tracker.getJobInfo(j).status for j in tracker.getJobIdsForGroup(group)]


def search(trials: int = 6, seed: int = 0, **kwargs: Any) -> unison.Search:
    return unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                         seed=seed, **kwargs)


def wait_for_executors(spark: Any, n: int) -> None:
    deadline = time.monotonic() + 60
    while registered_executors(spark) < n:
        assert time.monotonic() < deadline, f"{n} executors did not register within 60 s"
        time.sleep(0.2)


def executor_jvm(pid: int) -> int | None:
    """The executor JVM (CoarseGrainedExecutorBackend) that ``pid`` descends from, if any."""
    try:
        while pid > 1:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"CoarseGrainedExecutorBackend" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    except FileNotFoundError:  # the process ended
        pass
    return None


# ----------------------------------------------------------------- where trials run, what comes back
def test_trials_run_in_both_executors_and_their_files_reach_the_driver(spark: Any, tmp_path: Path) -> None:
    def train(x: float, reporter: Any, ctx: Any) -> dict[str, float]:
        print(f"stdout of trial {ctx.trial_id}")
        print(f"stderr of trial {ctx.trial_id}", file=sys.stderr)
        (ctx.trial_dir / "model.txt").write_text(f"{ctx.trial_id} {x} written in {ctx.trial_dir}")
        (ctx.trial_dir / "ckpt").mkdir()
        (ctx.trial_dir / "ckpt" / "weights.bin").write_bytes(bytes(range(256)) * 4)
        for step in range(2):
            reporter.report(step=step, value=x * (step + 1))
        time.sleep(0.4)  # long enough for both slots to take trials
        return {"value": 2 * x, "executor_pid": executor_jvm(os.getpid()) or 0}

    backend = unison.Spark(spark)
    r = unison.run(train, search(trials=6), backend=backend, storage=tmp_path, progress=False)

    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 6
    pids = set(r.trials["pid"])
    assert len(pids) >= 2 and os.getpid() not in pids, r.trials[["worker", "host", "pid"]]
    assert len(set(r.trials["executor_pid"]) - {0}) == 2  # two executor JVMs, not one with two workers
    assert set(r.trials["worker"]) == {"spark-0", "spark-1"}
    for row in r.rows:
        folder = r.path / "trials" / f"{row['trial_id']:04d}"
        assert (folder / "stdout.log").read_text() == f"stdout of trial {row['trial_id']}\n"
        assert (folder / "stderr.log").read_text() == f"stderr of trial {row['trial_id']}\n"
        model = (folder / "model.txt").read_text().split()
        assert model[:2] == [str(row["trial_id"]), str(row["hparams"]["x"])]
        assert not model[-1].startswith(str(r.path))  # the executor wrote into a folder of its own
        assert (folder / "ckpt" / "weights.bin").read_bytes() == bytes(range(256)) * 4
        reports = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [rep["step"] for rep in reports] == [0, 1]
    assert (r.path / "workers" / "spark.log").read_text().count("job group") == 1
    assert active_jobs(spark) == []
    assert set(job_states(spark, backend.job_group)) == {"SUCCEEDED"}
    meta = json.loads((r.path / "experiment.json").read_text())
    assert meta["backend"] == "Spark(master='local-cluster[2,1,1024]')" and meta["workers"] == 2


def test_files_over_the_per_trial_limit_stay_behind_with_a_note(spark: Any, tmp_path: Path) -> None:
    def train(x: float, ctx: Any) -> float:
        print("a short log")
        (ctx.trial_dir / "small.txt").write_text("small")
        (ctx.trial_dir / "big.bin").write_bytes(b"\0" * 20_000)
        return x

    r = unison.run(train, search(trials=2), backend=unison.Spark(spark, max_trial_files_bytes=4096),
                   storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 2
    ends = {ev["id"]: ev for ev in journal(r.path) if ev["e"] == "end"}
    for tid in (0, 1):
        folder = r.path / "trials" / f"{tid:04d}"
        assert (folder / "stdout.log").read_text() == "a short log\n"
        assert (folder / "small.txt").read_text() == "small"
        assert not (folder / "big.bin").exists()
        assert ends[tid]["files_skipped"] == ["big.bin (19.5 KiB): not shipped"]
        note = (folder / "stderr.log").read_text()
        assert "at most 4.0 KiB per trial" in note and "big.bin (19.5 KiB): not shipped" in note


# ------------------------------------------------------------------------------------ failures
def test_a_killed_python_worker_mid_trial_is_retried_elsewhere(spark: Any, tmp_path: Path) -> None:
    def train(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1 and ctx.attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)  # the executor's Python worker dies mid-trial
        time.sleep(0.2)
        return x

    backend = unison.Spark(spark)
    r = unison.run(train, search(trials=5, seed=1), backend=backend, storage=tmp_path, progress=False)
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 5
    attempts = dict(zip(r.trials["trial_id"], r.trials["attempts"], strict=True))
    assert attempts == {0: 1, 1: 2, 2: 1, 3: 1, 4: 1}
    events = journal(r.path)
    assert [(ev["id"], ev["attempt"]) for ev in events if ev["e"] == "lost"] == [(1, 0)]
    starts = [ev for ev in events if ev["e"] == "start" and ev["id"] == 1]
    assert starts[0]["pid"] != starts[1]["pid"]  # the retry ran in another Python worker
    assert active_jobs(spark) == []


def test_a_failing_function_fails_its_trial_not_the_spark_job(spark: Any, tmp_path: Path) -> None:
    def train(x: float, ctx: Any) -> float:
        if ctx.trial_id == 2:
            raise RuntimeError(f"bad trial {ctx.trial_id}")
        return x

    backend = unison.Spark(spark)
    r = unison.run(train, search(trials=5, seed=2), backend=backend, storage=tmp_path, progress=False)
    assert r.status == "completed"
    frame = r.trials.set_index("trial_id")
    assert frame.loc[2, "status"] == "failed" and frame.loc[2, "error"] == "RuntimeError: bad trial 2"
    assert frame.loc[2, "attempts"] == 1
    assert [frame.loc[t, "status"] for t in (0, 1, 3, 4)] == ["completed"] * 4
    assert "RuntimeError: bad trial 2" in (r.path / "trials" / "0002" / "stderr.log").read_text()
    assert set(job_states(spark, backend.job_group)) == {"SUCCEEDED"}  # no Spark task failed
    assert not [ev for ev in journal(r.path) if ev["e"] == "lost"]


def test_an_interrupted_search_cancels_its_spark_jobs(spark: Any, tmp_path: Path) -> None:
    def train(x: float) -> float:
        time.sleep(60)
        return x

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            paths = list(tmp_path.glob("*/journal.jsonl"))
            if paths and sum(ev["e"] == "start" for ev in journal(paths[0].parent)) >= 2:
                break
            time.sleep(0.05)
        _thread.interrupt_main()  # Ctrl-C

    backend = unison.Spark(spark)
    threading.Thread(target=interrupt_when_running, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, search(trials=4, seed=3), backend=backend, storage=tmp_path, progress=False)
    assert time.monotonic() - start < 40  # not after the 60 s trials
    assert active_jobs(spark) == []
    assert set(job_states(spark, backend.job_group)) == {"FAILED"}  # cancelled
    path = next(tmp_path.iterdir())
    assert json.loads((path / "experiment.json").read_text())["status"] == "interrupted"


def test_a_killed_executor_jvm_mid_trial_is_retried_on_another_executor(spark: Any, tmp_path: Path) -> None:
    def train(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1 and ctx.attempt == 0:
            jvm = executor_jvm(os.getpid())
            assert jvm is not None
            os.kill(jvm, signal.SIGKILL)
            time.sleep(30)  # this Python worker dies with its executor, before this ends
        time.sleep(0.3)
        return x

    r = unison.run(train, search(trials=4, seed=4), backend=unison.Spark(spark), storage=tmp_path,
                   progress=False)
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 4
    assert dict(zip(r.trials["trial_id"], r.trials["attempts"], strict=True))[1] == 2
    assert [(ev["id"], ev["attempt"]) for ev in journal(r.path) if ev["e"] == "lost"] == [(1, 0)]
    assert active_jobs(spark) == []


def test_no_trial_code_runs_after_an_interrupted_search_returns(spark: Any, tmp_path: Path) -> None:
    ends = tmp_path / "ends"
    ends.mkdir()
    interrupted: list[float] = []

    def train(x: float, ctx: Any) -> float:
        deadline = time.monotonic() + 3.0
        if ctx.trial_id % 2:
            while time.monotonic() < deadline:  # a busy Python loop
                pass
        else:
            time.sleep(3.0)  # a blocking call
        (ends / f"{ctx.trial_id}").write_text(repr(time.time()))
        return x

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            paths = list(tmp_path.glob("experiments/*/journal.jsonl"))
            if paths and sum(ev["e"] == "start" for ev in journal(paths[0].parent)) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # both trials are inside their function now
        interrupted.append(time.time())
        _thread.interrupt_main()  # Ctrl-C

    wait_for_executors(spark, 2)  # the test before killed one
    backend = unison.Spark(spark)
    threading.Thread(target=interrupt_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, search(trials=4, seed=5), backend=backend,
                   storage=tmp_path / "experiments", progress=False)
    returned = time.time()
    assert active_jobs(spark) == []
    time.sleep(4.0)  # past the end of the 3 s trials, had they gone on
    ended = {p.name: float(p.read_text()) for p in ends.iterdir()}  # a trial may end before Ctrl-C
    late = {name: round(at - returned, 2) for name, at in ended.items() if at > interrupted[0]}
    log = next(tmp_path.glob("experiments/*/workers/spark.log")).read_text()
    assert late == {}, f"interrupted trials ran to their end (s after the search returned): {late}\n{log}"


def test_an_aborted_search_stops_trials_that_ignore_the_interruption(spark: Any, tmp_path: Path) -> None:
    beats = tmp_path / "beats"
    beats.mkdir()

    def train(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1:
            time.sleep(1.0)
            (tmp_path / "failed_at").write_text(repr(time.time()))
            raise RuntimeError("this failure aborts the search")
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            (beats / f"{ctx.trial_id}").write_text(repr(time.time()))  # this trial's code still runs
            try:
                time.sleep(0.1)
            except BaseException:  # noqa: BLE001, S110 - swallows the worker's interruption
                pass
        return x

    # slots=3 on two executors: a slot job waiting for an executor must not hold stop up
    wait_for_executors(spark, 2)
    backend = unison.Spark(spark, slots=3)
    with pytest.raises(unison.SearchAborted):
        unison.run(train, search(trials=4, seed=6, max_failures=1), backend=backend,
                   storage=tmp_path / "experiments", progress=False)
    returned = time.time()
    assert active_jobs(spark) == []
    time.sleep(4.0)  # past Spark's 2 s task-kill timeout
    late = {p.name: round(float(p.read_text()) - returned, 2) for p in beats.iterdir()}
    assert late and max(late.values()) < 0, f"trial code ran this long after the search returned: {late}"
    stopping = returned - float((tmp_path / "failed_at").read_text())
    assert stopping < 7, f"the search took {stopping:.1f} s to end after its failure"  # not stop's 10 s
    log = next(tmp_path.glob("experiments/*/workers/spark.log")).read_text()
    assert "still running 1 s after the driver hung up" in log and "though cancelled" not in log, log
    assert "RUNNING" not in job_states(spark, backend.job_group)
