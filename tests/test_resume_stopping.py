"""Resuming a search with early stopping: a trial the scheduler stopped before the driver died is not
run again, and keeps its ``last_step`` and ``stop_reason``.

The driver runs as its own process (this file, run as a script) and is SIGKILLed part way; the test
resumes the experiment in its own process and reads the journal.

Usage as a driver: ``python tests/test_resume_stopping.py STORAGE SCHEDULER BACKEND TRIALS``
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # this module must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from processes import journal, wait_for  # noqa: E402

import unison  # noqa: E402
from unison.result import SearchResult  # noqa: E402

STEPS = 4
NAP = 0.04  # per step: a trial that runs to the end takes ~0.16 s


def train(x: float, reporter: Any) -> dict[str, float]:
    """A learning curve that rises to ``x``: the scheduler compares trials by ``x``."""
    value = 0.0
    for step in range(STEPS):
        time.sleep(NAP)
        value = x * (step + 1) / STEPS
        reporter.report(step=step, value=value)
    return {"value": value}


def make_search(scheduler: str, trials: int) -> unison.Search:
    """The search of the driver process (the test resumes it from ``experiment.json``)."""
    schedulers = {"asha": unison.ASHA(min_resource=1, max_resource=STEPS, reduction_factor=2),
                  "median": unison.MedianStopping(grace_period=1, min_trials=3)}
    return unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                         optimizer="random", seed=11, scheduler=schedulers[scheduler])


def backend(name: str) -> Any:
    return unison.Local(workers=2) if name == "local" else "inline"


def main() -> None:
    storage, scheduler, backend_name, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    result = unison.run(train, make_search(scheduler, trials), backend=backend(backend_name), storage=storage,
                        progress=False)
    print(f"finished: {result.status}", flush=True)


# ------------------------------------------------------------------------------------ helpers
def ends(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {ev["id"]: ev for ev in events if ev["e"] == "end"}


def run_and_kill(tmp_path: Path, scheduler: str, backend_name: str, trials: int) -> tuple[Path, list]:
    """Start the driver, SIGKILL it once some trial was stopped and some trials are left; return the
    experiment folder and the journal as the killed driver left it."""
    storage = tmp_path / "runs"
    storage.mkdir()
    with open(tmp_path / "driver.out", "wb") as out:
        args = [sys.executable, __file__, str(storage), scheduler, backend_name, str(trials)]
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        path = wait_for(lambda: next((p for p in storage.iterdir() if (p / "journal.jsonl").is_file()), None),
                        30, "the experiment's journal")

        def ready() -> bool:
            ended = ends(journal(path))
            stopped = [ev for ev in ended.values() if ev["status"] == "stopped"]
            return len(stopped) >= 2 and len(ended) >= trials // 3

        wait_for(ready, 40, f"two stopped trials (driver output: {tmp_path / 'driver.out'})")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = (tmp_path / "driver.out").read_text()
    assert "finished:" not in output, f"the driver ended before it was killed: {output}"
    time.sleep(0.3)  # local workers notice their driver is gone and exit
    return path, journal(path)


# -------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["inline", "local"])
@pytest.mark.parametrize("scheduler", ["asha", "median"])
def test_resume_does_not_rerun_stopped_trials_and_keeps_their_stop(
        tmp_path: Path, scheduler: str, backend_name: str) -> None:
    trials = 18
    path, before = run_and_kill(tmp_path, scheduler, backend_name, trials)
    ended_before = ends(before)
    starts_before = Counter(ev["id"] for ev in before if ev["e"] == "start")
    stopped_before = {tid: ev for tid, ev in ended_before.items() if ev["status"] == "stopped"}
    assert len(ended_before) < trials, "nothing was left to resume"
    assert len(stopped_before) >= 2

    r = unison.resume(path, train, backend=backend(backend_name), progress=False)
    assert r.status == "completed"
    assert len(r.trials) == trials
    assert set(r.trials["status"]) <= {"completed", "stopped"}, r.trials[["trial_id", "status", "error"]]

    after = journal(path)
    starts = Counter(ev["id"] for ev in after if ev["e"] == "start")
    assert Counter(ev["id"] for ev in after if ev["e"] == "end") == Counter(range(trials))
    for tid in range(trials):
        if tid in ended_before:  # ended (completed or stopped) before the kill: never started again
            assert starts[tid] == 1, (tid, ended_before[tid]["status"], starts[tid])
        else:  # unfinished at the kill (or never started): run once more
            assert starts[tid] == starts_before.get(tid, 0) + 1, (tid, starts[tid], starts_before.get(tid))

    rows = {row["trial_id"]: row for row in r.rows}
    for tid, ev in stopped_before.items():
        assert ev["stop_reason"] and ev["last_step"] in range(STEPS), ev
        row = rows[tid]
        assert (row["status"], row["last_step"], row["stop_reason"]) == \
            ("stopped", ev["last_step"], ev["stop_reason"]), (row, ev)
        assert row["metrics"] == ev["metrics"]
    stored = {row["trial_id"]: row for row in SearchResult.load(path).rows}  # read back from the journal
    for tid, ev in stopped_before.items():
        assert (stored[tid]["status"], stored[tid]["last_step"], stored[tid]["stop_reason"]) == \
            ("stopped", ev["last_step"], ev["stop_reason"])


if __name__ == "__main__":
    main()
