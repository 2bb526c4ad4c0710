"""The life of a local worker process: how it starts, dies, is replaced, and what it leaves behind.

Real worker processes, real signals, a real journal: workers SIGKILLed again and again after they
ran trials, training functions that end their own process, children a trial leaves running, and a
function that holds the GIL long enough to starve the worker's heartbeat thread.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import unison

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from processes import alive, journal, wait_for  # noqa: E402


# ------------------------------------------------------------------- validation (fast)
@pytest.mark.parametrize("timeout", [0, -1, -0.5, 0.0])
def test_heartbeat_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_timeout=.*must be > 0 seconds, e\.g\. 10"):
        unison.Local(heartbeat_timeout=timeout)


@pytest.mark.parametrize("timeout", ["10", [10], True, float("nan"), float("inf")])
def test_heartbeat_timeout_must_be_a_finite_number(timeout: Any) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_timeout=.*e\.g\. 10"):
        unison.Local(heartbeat_timeout=timeout)


def test_heartbeat_timeout_must_exceed_the_interval() -> None:
    with pytest.raises(ValueError, match=r"larger than heartbeat_interval \(2\.0 s\)"):
        unison.Local(heartbeat_interval=2.0, heartbeat_timeout=1.0)
    with pytest.raises(ValueError, match=r"larger than heartbeat_interval"):
        unison.Local(heartbeat_interval=1.0, heartbeat_timeout=1.0)
    assert unison.Local(heartbeat_interval=0.2, heartbeat_timeout=1.0).heartbeat_timeout == 1.0
    assert unison.Local(heartbeat_interval=0.5).heartbeat_timeout == 5.0


@pytest.mark.parametrize("interval", [0, -1, "1", None, True, float("nan")])
def test_heartbeat_interval_must_be_a_positive_number(interval: Any) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_interval=.*must be > 0 seconds"):
        unison.Local(heartbeat_interval=interval)


def test_keyboard_interrupt_in_the_inline_backend_is_the_users_ctrl_c(tmp_path: Path) -> None:
    def fn(x: float) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=2, seed=0), backend="inline",
                   storage=tmp_path, progress=False)


# ------------------------------------------------------ 1. workers killed after they worked
@pytest.mark.slow
def test_workers_killed_again_and_again_after_they_ran_trials_do_not_abort_the_search(
    tmp_path: Path,
) -> None:
    """Issue 11, defect 1: 60 trials of 0.5 s on two workers, ten SIGKILLs 0.6-1.6 s apart. Each killed
    worker had authenticated and run trials, so none of those deaths means "workers cannot start"."""
    storage = tmp_path / "runs"
    storage.mkdir()
    killed: list[int] = []
    done = threading.Event()

    def fn(x: float) -> float:
        time.sleep(0.5)
        return x

    def killer() -> None:
        rng = random.Random(11)
        path = wait_for(lambda: [p for p in storage.iterdir() if (p / "journal.jsonl").is_file()],
                        30, "the experiment's journal")[0]
        while len(killed) < 10 and not done.is_set():
            time.sleep(rng.uniform(0.6, 1.6))
            events = journal(path)
            ended = {ev["id"] for ev in events if ev.get("e") == "end"}
            # The newest first attempt still running: each trial is killed at most once, so its
            # retries stay within max_retries whatever the timing.
            running = [ev for ev in events if ev.get("e") == "start" and ev["attempt"] == 0
                       and ev["id"] not in ended and ev["pid"] not in killed and alive(ev["pid"])]
            if running:
                pid = running[-1]["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=60, seed=4, optimizer="random"),
                       backend=unison.Local(workers=2), storage=storage, progress=False)
    finally:
        done.set()
        thread.join(5)
    assert len(killed) == 10, f"the test killed only {len(killed)} workers"
    assert r.status == "completed"
    ends = Counter(ev["id"] for ev in journal(r.path) if ev["e"] == "end")
    assert set(ends) == set(range(60)), f"trials never ended: {sorted(set(range(60)) - set(ends))}"
    assert [tid for tid, n in ends.items() if n != 1] == [], "trials ended more than once"
    assert list(r.trials["status"]) == ["completed"] * 60
    lost = [ev["id"] for ev in journal(r.path) if ev["e"] == "lost"]
    assert 1 <= len(lost) <= 10 and len(set(lost)) == len(lost)


@pytest.mark.slow
def test_workers_that_never_say_hello_still_abort_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of defect 1: a worker that dies before it authenticates cannot start, and three
    in a row end the search with the last one's output."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('UNISON_WORKER'):\n"
        "    print('cannot start: no such library', file=sys.stderr, flush=True)\n    os._exit(4)\n"
    )
    path = os.pathsep.join(filter(None, [str(broken), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    with pytest.raises(unison.WorkerError, match=r"(?s)exit code 4.*cannot start: no such library"):
        unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=3, seed=0),
                   backend=unison.Local(workers=1, start="fresh"), storage=tmp_path / "runs",
                   progress=False)


# ------------------------------------------------------- 2. a trial that ends its own process
def _ends_its_process(x: float, ctx: Any) -> float:
    import ctypes

    if ctx.trial_id == 1:
        os._exit(3)
    if ctx.trial_id == 2:
        os.kill(os.getpid(), signal.SIGSEGV)
    if ctx.trial_id == 3:
        ctypes.string_at(0)  # a real segfault
    if ctx.trial_id == 4:
        raise KeyboardInterrupt
    time.sleep(0.05)
    return x


@pytest.mark.slow
def test_a_function_that_ends_its_process_fails_its_trial_saying_how_and_the_search_goes_on(
    tmp_path: Path,
) -> None:
    """Issue 11, defects 1 and 9: each such trial is retried max_retries times (its worker died) and then
    failed with how the process ended; KeyboardInterrupt in a worker is the trial's failure (no retry)."""
    r = unison.run(_ends_its_process,
                   unison.Search({"x": unison.uniform(0, 1)}, trials=7, seed=5, max_retries=2),
                   backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert r.status == "completed"
    rows = {row["trial_id"]: row for row in r.rows}
    assert [rows[t]["status"] for t in range(7)] == ["completed", "failed", "failed", "failed", "failed",
                                                     "completed", "completed"]
    assert "worker-" in rows[1]["error"] and "exited with exit code 3" in rows[1]["error"]
    assert "killed by signal 11 (SIGSEGV)" in rows[2]["error"]
    assert "killed by signal 11 (SIGSEGV)" in rows[3]["error"]
    for tid in (1, 2, 3):
        assert rows[tid]["attempts"] == 3
        assert "max_retries=2" in rows[tid]["error"]
    assert rows[4]["error"].rstrip().endswith("KeyboardInterrupt"), rows[4]["error"]
    assert rows[4]["attempts"] == 1
    lost = Counter(ev["id"] for ev in journal(r.path) if ev["e"] == "lost")
    assert lost == {1: 3, 2: 3, 3: 3}


# ------------------------------------------------------------ 3. children of a trial
def _starts_a_child(x: float, ctx: Any) -> float:
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    (Path(ctx.trial_dir) / "child.pid").write_text(str(child.pid))
    return x


@pytest.mark.slow
def test_children_a_trial_started_do_not_outlive_the_search(tmp_path: Path) -> None:
    """Issue 11, defect 8: ending a worker ends its process group, and with it what its trials started."""
    r = unison.run(_starts_a_child, unison.Search({"x": unison.uniform(0, 1)}, trials=3, seed=6),
                   backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 3
    pids = [int((r.path / "trials" / f"{t:04d}" / "child.pid").read_text()) for t in range(3)]
    try:
        # SIGKILLed with the worker's group as it exits; on a loaded machine the kill takes a moment
        wait_for(lambda: not [p for p in pids if alive(p)], 5.0, "the children to end with the search")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------- 4. the GIL and heartbeats
def _holds_the_gil(seconds: float) -> dict[str, float]:
    """Holds the GIL for about ``seconds`` in one C call, and measures how long a Python thread (as
    the worker's heartbeat thread) was starved meanwhile."""
    start = time.perf_counter()
    sum(range(1_000_000))
    n = int(1_000_000 * seconds / max(time.perf_counter() - start, 1e-6))
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.02)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    time.sleep(0.1)
    sum(range(n))
    time.sleep(0.1)
    stop.set()
    thread.join()
    return {"value": 1.0, "starved": max(b - a for a, b in zip(ticks, ticks[1:], strict=False))}


@pytest.mark.slow
def test_a_function_holding_the_gil_longer_than_the_heartbeat_timeout_is_not_declared_dead(
    tmp_path: Path,
) -> None:
    """Issue 11: a local worker whose process is alive is not dropped for a missed heartbeat."""
    r = unison.run(_holds_the_gil, unison.Search({"seconds": 3.0}, metric="value", trials=1),
                   backend=unison.Local(workers=1, heartbeat_interval=0.2, heartbeat_timeout=1.0),
                   storage=tmp_path, progress=False)
    events = journal(r.path)
    assert [ev["e"] for ev in events if ev["e"] in ("start", "lost")] == ["start"]
    assert list(r.trials["status"]) == ["completed"]
    starved = r.rows[0]["metrics"]["starved"]
    assert starved > 1.5, f"the function held the GIL for only {starved:.2f} s: the test proves nothing"


# ------------------------------------------------------------- kill_worker (per-trial timeouts)
def _hangs_with_a_child(x: float, ctx: Any, workdir: str) -> float:
    import subprocess

    work = Path(workdir)
    if ctx.attempt == 0:
        child = subprocess.Popen(["sleep", "60"])
        (work / "child.pid").write_text(str(child.pid))
        time.sleep(30)
    pid = int((work / "child.pid").read_text())
    stat = Path(f"/proc/{pid}/stat")
    (work / "child-alive-at-retry").write_text(
        str(stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")))
    return x


@pytest.mark.slow
def test_kill_worker_ends_the_worker_and_its_children_at_once_and_the_worker_is_replaced(
    tmp_path: Path,
) -> None:
    storage, work = tmp_path / "runs", tmp_path / "work"
    storage.mkdir()
    work.mkdir()
    backend = unison.Local(workers=1)
    answers: list[bool] = []

    def killer() -> None:
        path = wait_for(lambda: [p for p in storage.iterdir() if (p / "journal.jsonl").is_file()],
                        30, "the experiment's journal")[0]
        wait_for(lambda: (work / "child.pid").is_file(), 30, "the trial to start its child")
        start = next(ev for ev in journal(path) if ev["e"] == "start")
        answers.append(backend.kill_worker({"worker": start["worker"], "pid": start["pid"]}))
        answers.append(backend.kill_worker({"worker": "worker-99", "pid": 1}))  # not one of ours

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    began = time.monotonic()
    r = unison.run(_hangs_with_a_child, unison.Search({"x": 0.5, "workdir": str(work)}, metric="value",
                                                      trials=1),
                   backend=backend, storage=storage, progress=False)
    thread.join(5)
    assert answers == [True, False]
    assert time.monotonic() - began < 20  # not after the 30 s sleep
    assert list(r.trials["status"]) == ["completed"]
    assert r.rows[0]["attempts"] == 2
    assert (work / "child-alive-at-retry").read_text() == "False"  # the group died with the worker
    lost = [ev for ev in journal(r.path) if ev["e"] == "lost"]
    assert len(lost) == 1 and "killed by signal 9 (SIGKILL)" in lost[0]["reason"], lost
    assert r.rows[0]["worker"] == "worker-1"  # the replacement
