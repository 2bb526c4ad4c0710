"""Chaos: a 60-trial search on ``Local(workers=2)`` under 10 random worker SIGKILLs and 3 driver
SIGKILLs, each followed by a resume, then a last resume to the end. Every trial must end exactly
once, and the final table must equal an uninterrupted inline run with the same seed.

The driver runs as its own process (this file, run as a script), so the test can SIGKILL it.

Usage as a driver: ``python tests/test_chaos.py STORAGE local|inline`` starts the search;
``python tests/test_chaos.py PATH resume`` resumes the experiment in ``PATH`` on the local backend.
"""

from __future__ import annotations

import json
import os
import random
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

from processes import alive, journal, wait_for  # noqa: E402

import unison  # noqa: E402
from unison.result import SearchResult  # noqa: E402

TRIALS = 60
SEED = 2024
# Four driver runs: the first and two resumes are SIGKILLed once this many trials have ended in all; a
# third resume runs to the end. In each run some workers are SIGKILLed mid-trial first.
DRIVER_KILLS_AFTER = (14, 29, 44)
WORKER_KILLS = (3, 3, 2, 2)


def train(x: float, k: int, reporter: Any) -> dict[str, float]:
    """A deterministic function of its hyperparameters that takes 0.1-0.2 s."""
    time.sleep(0.05 + 0.05 * x)
    reporter.report(step=0, value=x * k / 2)
    time.sleep(0.05 + 0.05 * x)
    return {"value": x * k, "other": round(x - k / 1000, 6)}


def make_search() -> unison.Search:
    # Retries are generous: the test kills at most one attempt of a trial, a driver kill none.
    return unison.Search({"x": unison.uniform(0.0, 1.0), "k": unison.integer(1, 100)}, metric="value",
                         mode="max", trials=TRIALS, optimizer="random", seed=SEED, max_retries=5)


def main() -> None:
    target, how = sys.argv[1], sys.argv[2]
    if how == "resume":
        result = unison.resume(target, train, backend=unison.Local(workers=2), progress=False)
    else:
        backend = unison.Local(workers=2) if how == "local" else "inline"
        result = unison.run(train, make_search(), backend=backend, storage=target, progress=False)
    print(f"finished: {result.status}", flush=True)


# ------------------------------------------------------------------------------------ helpers
def driver(args: list[str], out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return subprocess.Popen([sys.executable, __file__, *args], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def ended(path: Path) -> int:
    return len({ev["id"] for ev in journal(path) if ev["e"] == "end"})


class Chaos:
    """Kills the workers of the current driver run mid-trial (never the same trial twice) and the
    driver itself, at points chosen by ``rng`` from the number of trials ended."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.killed_trials: set[int] = set()
        self.killed_pids: list[int] = []

    def kill_a_worker(self, path: Path, since: int, proc: subprocess.Popen[bytes]) -> bool:
        """SIGKILL the worker of a trial running now (started by this run: journal events from
        ``since`` on); ``False`` when none is running or the driver has ended."""
        running = {}
        for ev in journal(path)[since:]:
            if ev["e"] == "start" and ev.get("pid"):
                running[ev["id"]] = ev["pid"]
            elif ev["e"] in ("end", "lost"):
                running.pop(ev["id"], None)
        choices = sorted(tid for tid in running if tid not in self.killed_trials)
        if proc.poll() is not None or not choices:
            return False
        tid = self.rng.choice(choices)
        pid = running[tid]
        if not alive(pid):
            return False
        os.kill(pid, signal.SIGKILL)
        self.killed_trials.add(tid)
        self.killed_pids.append(pid)
        return True

    def run(self, path: Path, proc: subprocess.Popen[bytes], kills: int, ends_at: tuple[int, int],
            out: Path) -> None:
        """While ``proc`` runs from ``ends_at[0]`` ended trials, SIGKILL ``kills`` of its workers, each
        once a random number of trials below ``ends_at[1]`` have ended; then SIGKILL the driver once
        ``ends_at[1]`` trials have ended, or with ``ends_at[1] == TRIALS`` let it finish."""
        since = len(journal(path))
        low, high = ends_at
        targets = sorted(self.rng.sample(range(low + 1, high - 2), kills))
        for target in targets:
            wait_for(lambda t=target: ended(path) >= t or proc.poll() is not None, 40,
                     f"{target} trials to end (driver output {out})")
            wait_for(lambda: self.kill_a_worker(path, since, proc) or proc.poll() is not None, 20,
                     f"a running trial to kill its worker (driver output {out})")
            assert proc.poll() is None, f"the driver ended while workers were to be killed: {out.read_text()}"
        if high == TRIALS:
            assert proc.wait(60) == 0, out.read_text()
            assert "finished: completed" in out.read_text(), out.read_text()
            return
        wait_for(lambda: ended(path) >= high or proc.poll() is not None, 40,
                 f"{high} trials to end (driver output {out})")
        assert proc.poll() is None, f"the driver ended before it was killed: {out.read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def table(result: SearchResult) -> list[tuple[Any, ...]]:
    """The rows as (trial_id, status, hparams, metrics), in trial order."""
    rows = sorted(result.rows, key=lambda row: row["trial_id"])
    return [(row["trial_id"], row["status"], json.dumps(row["hparams"], sort_keys=True),
             json.dumps(row["metrics"], sort_keys=True)) for row in rows]


# --------------------------------------------------------------------------------------- test
@pytest.mark.slow
def test_a_search_under_worker_and_driver_kills_ends_each_trial_once_as_an_undisturbed_run(
        tmp_path: Path) -> None:
    storage, reference = tmp_path / "runs", tmp_path / "reference"
    storage.mkdir()
    reference.mkdir()
    # The uninterrupted run, in parallel (its trials mostly sleep).
    inline = driver([str(reference), "inline"], tmp_path / "reference.out")
    chaos = Chaos(random.Random(SEED))
    out = tmp_path / "driver-0.out"
    proc = driver([str(storage), "local"], out)
    try:
        path = wait_for(lambda: next((p for p in storage.iterdir() if (p / "journal.jsonl").is_file()), None),
                        30, "the experiment's journal")
        bounds = [0, *DRIVER_KILLS_AFTER, TRIALS]
        for run, kills in enumerate(WORKER_KILLS):
            if run:
                out = tmp_path / f"driver-{run}.out"
                proc = driver([str(path), "resume"], out)
            chaos.run(path, proc, kills, (bounds[run], bounds[run + 1]), out)
        assert inline.wait(60) == 0, (tmp_path / "reference.out").read_text()
    finally:
        for p in (proc, inline):
            if p.poll() is None:
                p.kill()
                p.wait(10)

    events = journal(path)
    assert len(chaos.killed_pids) == sum(WORKER_KILLS)
    # Each kill lost its trial (allowing for a trial that ended in the instant before its kill).
    assert sum(1 for ev in events if ev["e"] == "lost") >= sum(WORKER_KILLS) - 2, \
        [ev for ev in events if ev["e"] == "lost"]
    assert Counter(ev["id"] for ev in events if ev["e"] == "end") == Counter(range(TRIALS)), \
        "a trial ended more than once or never"
    assert [ev["status"] for ev in events if ev["e"] == "status"][-1] == "completed"
    result = SearchResult.load(path)
    expected = SearchResult.load(next(reference.iterdir()))
    assert [row["status"] for row in result.rows] == ["completed"] * TRIALS
    assert table(result) == table(expected)
    assert result.best.trial_id == expected.best.trial_id
    pids = {ev["pid"] for ev in events if ev["e"] == "start" and ev.get("pid")}
    wait_for(lambda: not [p for p in pids if alive(p)], 10, f"the workers {sorted(pids)} to exit")


if __name__ == "__main__":
    main()
