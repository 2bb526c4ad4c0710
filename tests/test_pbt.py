"""Population-based training (``unison.PBT``): its decisions and exploration, clones that resume their
parent's checkpoint on real worker processes and inline, lineage in the trial table, and a population
that continues after the driver is SIGKILLed and the search resumed."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import unison
from unison.schedulers.base import CONTINUE, Exploit

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from helpers_pbt import STEPS, check_population, gain, make_search, train  # noqa: E402
from processes import alive, journal, start_script, wait_for  # noqa: E402


def _pbt(**options: Any) -> unison.PBT:
    settings = {"perturbation_interval": 2, "hyperparam_mutations": {"lr": unison.loguniform(1e-3, 1.0)},
                "seed": 0, **options}
    pbt = unison.PBT(**settings)
    pbt.setup("max")
    return pbt


# ------------------------------------------------------------------------------------ decisions
def test_a_bottom_trial_is_replaced_by_a_clone_of_a_top_one_at_its_interval() -> None:
    pbt = _pbt(quantile_fraction=0.25)
    for tid in range(4):
        pbt.on_start(tid, {"lr": 0.1 * (tid + 1)})
    assert pbt.on_report(0, 0, 1.0) is CONTINUE  # before the first interval: no decision
    for tid, value in [(1, 2.0), (2, 3.0), (3, 4.0)]:
        assert pbt.on_report(tid, 1, value) is CONTINUE
    decision = pbt.on_report(0, 2, 1.5)  # two steps on, and the worst of four: replaced
    assert isinstance(decision, Exploit)
    assert decision.source == 3  # the best of four (the top quarter is one trial)
    lr = decision.hparams["lr"]  # perturbed (x0.8 or x1.2) or resampled
    assert lr in (pytest.approx(0.32), pytest.approx(0.48)) or 1e-3 <= lr <= 1.0
    assert "replaced by a clone of trial 3" in decision.reason
    assert pbt.on_report(3, 2, 5.0) is CONTINUE  # the best trial at its interval goes on


def test_a_lone_trial_and_a_middle_trial_go_on() -> None:
    pbt = _pbt(quantile_fraction=0.25)
    pbt.on_start(0, {"lr": 0.1})
    assert pbt.on_report(0, 2, 1.0) is CONTINUE  # nobody to compare with
    for tid in range(1, 4):
        pbt.on_start(tid, {"lr": 0.1})
        pbt.on_report(tid, 1, float(tid))
    assert pbt.on_report(1, 2, 2.5) is CONTINUE  # neither worst nor best of four


def test_min_mode_replaces_the_largest_value() -> None:
    pbt = unison.PBT(perturbation_interval=1, hyperparam_mutations={"lr": [0.1, 0.2]}, seed=0)
    pbt.setup("min")
    for tid, value in enumerate([1.0, 5.0]):
        pbt.on_start(tid, {"lr": 0.1})
        pbt.on_report(tid, 0, value)
    decision = pbt.on_report(1, 1, 6.0)
    assert isinstance(decision, Exploit) and decision.source == 0


def test_exploration_perturbs_within_the_range_and_moves_a_choice_to_a_neighbour() -> None:
    pbt = unison.PBT(perturbation_interval=1, hyperparam_mutations={
        "lr": unison.loguniform(1e-3, 0.1), "width": [16, 32, 64, 128], "depth": unison.integer(1, 8)},
        resample_probability=0.0, seed=5)
    pbt.setup("max")
    seen_lr, seen_width = set(), set()
    for _ in range(200):
        new = pbt.explore({"lr": 0.09, "width": 32, "depth": 8, "other": "kept"})
        assert new["other"] == "kept"
        seen_lr.add(round(new["lr"], 6))
        seen_width.add(new["width"])
        assert 1 <= new["depth"] <= 8 and isinstance(new["depth"], int)
    assert seen_lr == {round(0.09 * 0.8, 6), 0.1}  # x1.2 is clipped to the top
    assert seen_width == {16, 64}
    resampling = unison.PBT(perturbation_interval=1, resample_probability=1.0, seed=5,
                            hyperparam_mutations={"lr": unison.loguniform(1e-3, 0.1)})
    resampling.setup("max")
    draws = {resampling.explore({"lr": 0.05})["lr"] for _ in range(50)}
    assert len(draws) == 50 and all(1e-3 <= v <= 0.1 for v in draws)


@pytest.mark.parametrize(("options", "message"), [
    ({"perturbation_interval": 0}, "perturbation_interval"),
    ({"quantile_fraction": 0.0}, "quantile_fraction"),
    ({"quantile_fraction": 0.6}, "quantile_fraction"),
    ({"hyperparam_mutations": {}}, "at least one hyperparameter"),
    ({"hyperparam_mutations": {"lr": 3}}, "give a distribution"),
])
def test_bad_settings_are_refused_with_what_would_be_right(options: dict[str, Any], message: str) -> None:
    settings = {"perturbation_interval": 2, "hyperparam_mutations": {"lr": [0.1]}, **options}
    with pytest.raises((ValueError, TypeError), match=message):
        unison.PBT(**settings)


def test_a_search_checks_the_population_and_the_mutated_names() -> None:
    pbt = unison.PBT(perturbation_interval=2, hyperparam_mutations={"lrr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        unison.Search({"lr": unison.loguniform(1e-3, 1.0)}, metric="score", trials=4, scheduler=pbt)
    good = unison.PBT(perturbation_interval=2, hyperparam_mutations={"lr": [0.1, 0.2]})
    with pytest.raises(ValueError, match="population"):
        unison.Search({"lr": unison.loguniform(1e-3, 1.0)}, metric="score", trials=1, scheduler=good)


# ------------------------------------------------------------------------------- whole searches
def test_a_local_population_clones_its_best_members(tmp_path: Path) -> None:
    r = unison.run(train, make_search(population=4), backend=unison.Local(workers=4), storage=tmp_path,
                   progress=False)
    assert r.status == "completed"
    check_population(r, 4)
    # what PBT ends with is at least what the best first member would have reached alone
    alone = max(sum(gain(row["hparams"]["lr"], step) for step in range(STEPS)) for row in r.rows
                if row["trial_id"] < 4)
    assert r.best.metric >= alone - 1e-9


@pytest.mark.parametrize("backend", ["inline", "local-2"])
def test_a_population_larger_than_the_slots_takes_turns(tmp_path: Path, backend: str) -> None:
    chosen = "inline" if backend == "inline" else unison.Local(workers=2)
    r = unison.run(train, make_search(population=4, sleep=0.0), backend=chosen, storage=tmp_path,
                   progress=False)
    assert r.status == "completed"
    check_population(r, 4)
    events = journal(r.path)
    pauses = [ev for ev in events if ev["e"] == "pause"]
    assert pauses, "no member was paused for the others to catch up"
    # a paused trial ran again from its checkpoint: no step of it was computed twice
    for tid in {ev["id"] for ev in pauses}:
        steps = [ev["step"] for ev in events if ev["e"] == "report" and ev["id"] == tid]
        assert len(steps) == len(set(steps)) and steps == sorted(steps), (tid, steps)
        row = next(row for row in r.rows if row["trial_id"] == tid)
        assert row["steps"] == len(steps)
    # the members advanced together: every member had run before any passed step 8
    member = {row["trial_id"]: row["member"] for row in r.rows}
    reports = [(member[ev["id"]], ev["step"]) for ev in events if ev["e"] == "report"]
    first_past_8 = next(i for i, (_, step) in enumerate(reports) if step > 8)
    assert {slot for slot, _ in reports[:first_past_8]} == {0, 1, 2, 3}


@pytest.mark.slow
def test_a_resumed_population_continues_where_the_driver_died(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    storage.mkdir()
    proc = start_script(tmp_path, "pbt_driver.py", storage, 4, 0.1)
    try:
        path = wait_for(lambda: [p for p in storage.iterdir() if (p / "journal.jsonl").is_file()], 30,
                        "the experiment's journal")[0]
        wait_for(lambda: sum(ev["e"] == "clone" for ev in journal(path)) >= 2, 90, "two clones")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = journal(path)
    wait_for(lambda: not [ev for ev in before if ev["e"] == "start" and ev.get("pid") and alive(ev["pid"])
                          and ev["pid"] != os.getpid()], 10, "the orphaned workers to exit")
    clones_before = {ev["id"] for ev in before if ev["e"] == "clone"}
    r = unison.run(train, make_search(population=4, sleep=0.1), backend=unison.Local(workers=4),
                   resume=path, progress=False)
    assert r.status == "completed"
    check_population(r, 4)
    ids = {row["trial_id"] for row in r.rows}
    assert clones_before <= ids  # the clones made before the crash are part of the result
    # no trial ran from scratch twice: one that had checkpointed restarted from its checkpoint
    checkpointed = {ev["id"] for ev in before if ev["e"] == "checkpoint"}
    resumed = [ev for ev in journal(path)[len(before):] if ev["e"] == "start" and ev["id"] in checkpointed]
    assert resumed, "no trial that had checkpointed ran again after the resume"
    assert all(isinstance(ev.get("resumed_from"), int) for ev in resumed), resumed


def test_progress_counts_members_not_the_trials_clones_replaced() -> None:
    from unison.driver.progress import describe

    summary = {"planned": 4, "completed": 1, "failed": 0, "stopped": 7, "replaced": 6, "running": 3,
               "best": 9.5, "elapsed": 3.0}
    line = describe(summary, "score")
    assert line.startswith("2/4 trials · 3 running · 1 stopped · 6 replaced by clones")


@pytest.mark.parametrize("url", [True, False])
def test_clones_copy_checkpoints_on_shared_storage(tmp_path: Path, url: bool) -> None:
    shared = tmp_path / "shared"
    storage = f"file://{shared}" if url else str(shared)
    r = unison.run(train, make_search(population=3, sleep=0.0), backend="inline", storage=tmp_path / "runs",
                   checkpoint_storage=storage, progress=False)
    assert r.status == "completed"
    check_population(r, 3)
    clones = [ev for ev in journal(r.path) if ev["e"] == "clone"]
    for ev in clones:
        assert ev["path"].startswith(storage) and f"trials/{ev['id']:04d}/checkpoints/" in ev["path"]
    assert not list((r.path / "trials").rglob("meta.json"))  # nothing under the experiment folder
    assert unison.load_checkpoint(r.best.checkpoint)["score"] == pytest.approx(r.best.metric)


def _sparse_train(lr: float, reporter: Any, ctx: Any) -> dict[str, float]:
    """Checkpoints only every 5th step: PBT decides more often than that."""
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
    score = ctx.checkpoint["score"] if ctx.checkpoint is not None else 0.0
    for step in range(start, STEPS):
        score += gain(lr, step)
        state = {"score": score} if step % 5 == 4 else None
        reporter.report(step=step, checkpoint=state, score=score)
    return {"score": score}


def test_decisions_wait_for_a_report_that_saved_a_checkpoint(tmp_path: Path) -> None:
    """Deciding between checkpoints would resume a clone before its decision step, forever."""
    space = {"lr": unison.loguniform(1e-3, 1.0)}
    pbt = unison.PBT(perturbation_interval=2, hyperparam_mutations=space, seed=0)
    search = unison.Search(space, metric="score", mode="max", trials=3,
                           scheduler=pbt, seed=2)
    r = unison.run(_sparse_train, search, backend="inline", storage=tmp_path, progress=False)
    assert r.status == "completed"
    events = journal(r.path)
    acted = [ev for ev in events if ev["e"] in ("clone", "pause")]
    assert acted and len(r.rows) < 20
    checkpointed = {(ev["id"], ev["step"]) for ev in events if ev["e"] == "checkpoint"}
    for ev in events:
        if ev["e"] == "pause":
            assert (ev["id"], ev["step"]) in checkpointed  # paused where it saved its state
        if ev["e"] == "clone":
            assert ev["cloned_step"] % 5 == 4


def test_a_tie_with_the_top_is_not_a_reason_to_clone() -> None:
    """Equal values (accuracy on a small validation set) would replace clones by clones forever."""
    pbt = _pbt(quantile_fraction=0.25)
    for tid in range(4):
        pbt.on_start(tid, {"lr": 0.1})
        pbt.on_report(tid, 1, 0.5)
    assert pbt.on_report(3, 2, 0.5) is CONTINUE  # the "worst" by the tie-break, but no worse than the best
