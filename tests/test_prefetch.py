"""A busy worker is handed its next trial ahead of time when the optimizer does not learn.

The driver's side (reserve, start, unreserve, resume) is checked on the driver itself; the worker's
side (a trial message arriving while the worker waits for a scheduler decision) with real workers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import unison
from unison.driver.driver import SearchDriver
from unison.driver.store import ExperimentStore


def make_driver(tmp_path: Path, optimizer: str = "random", trials: int = 6,
                max_concurrent: int | None = 2) -> SearchDriver:
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=trials, seed=3,
                           optimizer=optimizer, max_concurrent=max_concurrent)
    return SearchDriver(search, ExperimentStore.create(tmp_path, "prefetch"), seed=3)


def journal(driver: SearchDriver) -> list[dict[str, Any]]:
    driver.store.close()
    return driver.store.read_journal()


def test_only_optimizers_that_do_not_learn_prefetch(tmp_path: Path) -> None:
    assert make_driver(tmp_path, "random").prefetch
    assert make_driver(tmp_path, "qmc").prefetch
    assert not make_driver(tmp_path, "tpe").prefetch

    class Learner(unison.Optimizer):
        def suggest(self, trial_number: int) -> dict[str, Any]:
            return {"x": 0.5}

    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=2, optimizer=Learner())
    driver = SearchDriver(search, ExperimentStore.create(tmp_path, "learner"), seed=0)
    assert not driver.prefetch  # a user-written optimizer is taken to learn unless it says otherwise


def test_a_reserved_trial_is_journaled_when_it_starts_and_keeps_the_search_open(tmp_path: Path) -> None:
    driver = make_driver(tmp_path, trials=2, max_concurrent=1)
    first = driver.next_trial()
    driver.start(first, "w0")
    assert driver.next_trial() is None  # max_concurrent=1 is reached for idle workers...
    second = driver.next_trial(reserve=True)  # ...but the busy worker may hold its next one
    message = driver.reserve(second)
    assert message["trial_id"] == second.trial_id == 1
    assert second.status == "reserved"
    assert [ev["id"] for ev in journal(driver) if ev["e"] == "start"] == [0]

    driver.finish({"trial_id": 0, "status": "completed", "metrics": {"value": 1.0}})
    assert not driver.finished  # the reserved trial has not run yet
    driver.start(second, "w0")
    assert driver.running == 1 and not driver.reserved
    driver.finish({"trial_id": 1, "status": "completed", "metrics": {"value": 2.0}})
    assert driver.finished
    assert [ev["id"] for ev in journal(driver) if ev["e"] == "start"] == [0, 1]


def test_an_unstarted_reserved_trial_goes_back_first_without_an_attempt(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    running = driver.next_trial()
    driver.start(running, "w0")
    held = driver.next_trial(reserve=True)
    driver.reserve(held)
    # The worker dies: its running trial is lost (an attempt), its held trial was never started.
    driver.lose(running.trial_id, "worker died")
    driver.unreserve(held.trial_id)
    assert list(driver.pending) == [held.trial_id, running.trial_id]
    assert held.attempt == 0 and held.status == "pending"
    assert running.attempt == 1
    assert [(ev["e"], ev["id"]) for ev in journal(driver) if ev["e"] in ("start", "lost")] == \
        [("start", 0), ("lost", 0)]


def test_resume_runs_the_numbers_that_were_handed_out_but_never_started(tmp_path: Path) -> None:
    driver = make_driver(tmp_path)
    trials = [driver.next_trial() for _ in range(3)]
    driver.start(trials[0], "w0")
    driver.reserve(trials[1])  # held by w0 when the driver died
    driver.start(trials[2], "w1")
    driver.finish({"trial_id": 0, "status": "completed", "metrics": {"value": 1.0}})
    events = journal(driver)

    again = SearchDriver(driver.search, ExperimentStore(driver.store.path), seed=3)
    again.replay(events)
    assert list(again.pending) == [1, 2]
    assert again.trials[1].hparams == trials[1].hparams  # the same suggestion as before
    assert again.trials[0].status == "completed"
    assert again.next_number == 3


def test_trials_held_while_a_worker_waits_for_a_decision_run_with_their_own_hparams(tmp_path: Path) -> None:
    def train(x: float, reporter: Any) -> float:
        for step in range(4):
            reporter.report(step=step, value=x * (step + 1))
        return x * 4

    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", mode="max", trials=12, seed=5,
                           optimizer="random", scheduler="median")
    r = unison.run(train, search, backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert r.status == "completed"
    assert len(r.trials) == 12
    assert set(r.trials["status"]) <= {"completed", "stopped"}
    events = [json.loads(line) for line in (r.path / "journal.jsonl").read_text().splitlines()]
    hparams = {ev["id"]: ev["hparams"]["x"] for ev in events if ev["e"] == "start"}
    assert sorted(hparams) == list(range(12))
    reports = [ev for ev in events if ev["e"] == "report"]
    assert reports
    for ev in reports:  # every report came from the trial it names, not from a held one
        assert abs(ev["metrics"]["value"] - hparams[ev["id"]] * (ev["step"] + 1)) < 1e-9
    for row in r.rows:
        if row["status"] == "completed":
            assert abs(row["metrics"]["value"] - row["hparams"]["x"] * 4) < 1e-9


@pytest.mark.slow
def test_a_busy_worker_runs_the_trial_it_was_handed_after_its_current_one(tmp_path: Path) -> None:
    # Trial 0 is slow, the others quick. The worker running trial 0 is handed its next trial (the
    # next number) at once; it must run that trial as soon as trial 0 ends, on the same worker, even
    # though the other worker ran every later number meanwhile. Without holding, trials would start
    # in the order of their numbers.
    def train(x: float, reporter: Any, ctx: Any) -> float:
        for step in range(3):
            time.sleep(0.6 if ctx.trial_id == 0 else 0.01)
            reporter.report(step=step, value=x)
        return x

    trials = 10
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", mode="max", trials=trials, seed=5,
                           optimizer="random")
    r = unison.run(train, search, backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert r.status == "completed" and list(r.trials["status"]) == ["completed"] * trials
    events = [json.loads(line) for line in (r.path / "journal.jsonl").read_text().splitlines()]
    starts = [ev for ev in events if ev["e"] == "start"]
    assert sorted(ev["id"] for ev in starts) == list(range(trials))  # each trial started once
    slow_worker = next(ev["worker"] for ev in starts if ev["id"] == 0)
    order = [(ev["e"], ev["id"], ev.get("worker")) for ev in events if ev["e"] in ("start", "end")]
    end_of_slow = order.index(("end", 0, slow_worker))
    assert end_of_slow + 1 < len(order), f"no trial was left for the slow worker: nothing was held {order}"
    held = order[end_of_slow + 1]
    assert held[0] == "start" and held[2] == slow_worker, order  # the slow worker went straight on...
    later = [tid for kind, tid, worker in order[:end_of_slow] if kind == "start" and worker != slow_worker]
    assert later and held[1] < max(later), order  # ...to a number it was handed before later ones ran
    assert [ev["id"] for ev in starts] != sorted(ev["id"] for ev in starts)
