"""ASHA and asynchronous Hyperband: rungs, promotion decisions on hand-made reports, bracket
assignment, a real inline search, storing and rebuilding, and resume."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

import unison
from unison.contexts.search import Search
from unison.driver.driver import SearchDriver
from unison.driver.store import ExperimentStore

MODES = pytest.mark.parametrize("mode", ["max", "min"])


def sign(mode: str) -> float:
    """Values are written in "max" terms; in "min" mode they are negated, so the same trials win."""
    return 1.0 if mode == "max" else -1.0


def asha(mode: str, *args, **kwargs) -> unison.ASHA:
    scheduler = unison.ASHA(*args, **kwargs)
    scheduler.setup(mode)
    return scheduler


# ------------------------------------------------------------------------------------------ rungs
@pytest.mark.parametrize("kwargs, milestones", [
    ({"min_resource": 1, "max_resource": 16, "reduction_factor": 2}, [1, 2, 4, 8]),
    ({"min_resource": 1, "max_resource": 17, "reduction_factor": 2}, [1, 2, 4, 8, 16]),
    ({"min_resource": 3, "max_resource": 40, "reduction_factor": 2}, [3, 6, 12, 24]),
    ({"min_resource": 1, "max_resource": 27, "reduction_factor": 3}, [1, 3, 9]),
    ({"min_resource": 1, "max_resource": 28, "reduction_factor": 3}, [1, 3, 9, 27]),
    ({"min_resource": 2, "max_resource": 100, "reduction_factor": 3}, [2, 6, 18, 54]),
])
def test_rung_milestones_are_min_resource_times_powers_of_rf_below_max_resource(kwargs, milestones):
    assert unison.ASHA(**kwargs).milestones() == milestones


def test_without_max_resource_the_rungs_go_on_without_bound():
    scheduler = unison.ASHA()
    assert scheduler.params() == {"min_resource": 1, "max_resource": None, "reduction_factor": 3}
    assert scheduler.milestones(upto=100) == [1, 3, 9, 27, 81]
    assert unison.ASHA(reduction_factor=2).milestones(upto=64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="upto"):
        scheduler.milestones()


def test_a_rung_is_met_at_step_milestone_minus_one():
    """Resource = step + 1: with rungs at resources 1, 3, 9 a trial is judged at steps 0, 2 and 8."""
    scheduler = asha("max", 1, 27, 3)
    met = []
    for step in range(27):
        before = {m: len(scheduler.recorded(m)) for m in scheduler.milestones()}
        scheduler.on_report(0, step, 1.0)
        met += [step for m in scheduler.milestones() if len(scheduler.recorded(m)) > before[m]]
    assert met == [0, 2, 8]


# ---------------------------------------------------------------------------------- decisions
# ASHA(1, 9, 3): rungs at resources 1 and 3 (steps 0 and 2). Values in "max" terms, arrival order.
RUNG0 = [(0, 0.5), (1, 0.4), (2, 0.3), (3, 0.9), (4, 0.6), (5, 0.7), (6, 0.5)]
#  n=1, 2: first arrivals go on | n=3: top 1 of {.5 .4 .3} -> cutoff .5, 0.3 stops
#  n=4: cutoff .9, 0.9 goes on  | n=5: cutoff .9, 0.6 stops | n=6: top 2 -> cutoff .7, 0.7 goes on (tie)
#  n=7: top 2 -> cutoff .7, 0.5 stops
RUNG0_GOES_ON = {0: True, 1: True, 2: False, 3: True, 4: False, 5: True, 6: False}
# At step 2, the survivors 0, 3, 1, 5 arrive in that order: .55 and .95 go on (first arrivals),
# .45 stops (cutoff .95 of 3), .97 goes on (the best of 4).
RUNG1 = [(0, 0.55), (3, 0.95), (1, 0.45), (5, 0.97)]
RUNG1_GOES_ON = {0: True, 3: True, 1: False, 5: True}


@MODES
def test_promotion_decisions_on_a_hand_made_sequence(mode):
    s = sign(mode)
    scheduler = asha(mode, 1, 9, 3)
    decisions = {tid: scheduler.on_report(tid, 0, s * v) for tid, v in RUNG0}
    assert {tid: d is unison.CONTINUE for tid, d in decisions.items()} == RUNG0_GOES_ON
    stop = decisions[2]
    assert isinstance(stop, unison.Stop)
    assert "rung 0" in stop.reason and "step 0" in stop.reason
    assert f"{s * 0.3:.6g}" in stop.reason and f"cutoff {s * 0.5:.6g}" in stop.reason
    assert f"cutoff {s * 0.7:.6g}" in decisions[6].reason

    for tid in (0, 3, 1, 5):  # no rung at resource 2 (step 1): everyone goes on
        assert scheduler.on_report(tid, 1, s * 0.0) is unison.CONTINUE
    decisions = {tid: scheduler.on_report(tid, 2, s * v) for tid, v in RUNG1}
    assert {tid: d is unison.CONTINUE for tid, d in decisions.items()} == RUNG1_GOES_ON
    assert "rung 1" in decisions[1].reason and "resource 3, step 2" in decisions[1].reason
    assert f"cutoff {s * 0.95:.6g}" in decisions[1].reason

    # the best trial runs to max_resource (9, step 8) and is never stopped: there is no rung there
    assert all(scheduler.on_report(5, step, s * 0.0) is unison.CONTINUE for step in range(3, 9))
    assert scheduler.recorded(1) == {tid: s * v for tid, v in RUNG0}  # recorded(resource)
    assert scheduler.recorded(3) == {tid: s * v for tid, v in RUNG1}
    assert scheduler.recorded(9) == {}


def test_a_trial_that_skips_steps_still_meets_every_rung_it_passed():
    scheduler = asha("max", 1, 27, 3)
    for tid, v in [(0, 0.9), (1, 0.8), (2, 0.7)]:
        for step in range(9):
            scheduler.on_report(tid, step, v)
    decision = scheduler.on_report(3, 5, 0.1)  # first report at resource 6: rungs 1 and 3 passed
    assert isinstance(decision, unison.Stop)
    assert "rung 0" in decision.reason  # the first failing rung is named
    assert scheduler.recorded(1)[3] == 0.1 and scheduler.recorded(3)[3] == 0.1
    assert 3 not in scheduler.recorded(9)


def test_a_retried_trial_is_forgotten_and_judged_again_from_the_start():
    scheduler = asha("max", 1, 9, 3)
    for tid, v in RUNG0[:3]:
        scheduler.on_report(tid, 0, v)
    scheduler.on_complete(2, "retried")
    assert 2 not in scheduler.recorded(1)
    assert scheduler.on_report(2, 0, 0.95) is unison.CONTINUE  # the new attempt is the best so far
    scheduler.on_complete(1, "failed")  # failed, stopped and completed trials stay as references
    assert scheduler.recorded(1) == {0: 0.5, 1: 0.4, 2: 0.95}


def test_setup_forgets_an_earlier_search_and_non_finite_values_are_ignored():
    scheduler = asha("max", 1, 9, 3)
    for tid, v in RUNG0[:2]:
        scheduler.on_report(tid, 0, v)
    assert scheduler.on_report(9, 0, math.nan) is unison.CONTINUE and 9 not in scheduler.recorded(1)
    scheduler.setup("max")
    assert scheduler.recorded(1) == {}
    assert scheduler.on_report(2, 0, 0.3) is unison.CONTINUE  # a first arrival again


def test_grace_period_is_another_name_for_min_resource():
    assert unison.ASHA(grace_period=4, max_resource=50).milestones() == [4, 12, 36]
    with pytest.raises(ValueError, match="grace_period"):
        unison.ASHA(min_resource=2, grace_period=4)


@pytest.mark.parametrize("cls, kwargs, message", [
    (unison.ASHA, {"min_resource": 0}, "min_resource"),
    (unison.ASHA, {"min_resource": 1.5}, "min_resource"),
    (unison.ASHA, {"reduction_factor": 1}, "reduction_factor"),
    (unison.ASHA, {"reduction_factor": True}, "reduction_factor"),
    (unison.ASHA, {"max_resource": 0}, "max_resource"),
    (unison.ASHA, {"min_resource": 5, "max_resource": 5}, "greater than min_resource"),
    (unison.Hyperband, {"min_resource": 1, "max_resource": None}, "required"),
    (unison.Hyperband, {"min_resource": 9, "max_resource": 3}, "greater than min_resource"),
    (unison.Hyperband, {"min_resource": 1, "max_resource": 9, "reduction_factor": 0}, "reduction_factor"),
])
def test_invalid_arguments_are_rejected(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_hyperband_by_name_asks_for_its_resources():
    with pytest.raises(ValueError, match=r"Hyperband\(min_resource=..., max_resource=...\)"):
        unison.Search({"x": unison.uniform(0, 1)}, scheduler="hyperband")


# ---------------------------------------------------------------------------------- hyperband
def test_hyperband_brackets_and_their_rungs():
    hb = unison.Hyperband(1, 27, 3)
    assert hb.s_max == 3
    assert [hb.bracket_milestones(b) for b in range(4)] == [[1, 3, 9], [3, 9], [9], []]
    assert hb.sizes == [27, 12, 6, 4]  # Hyperband's n_s = ceil((s_max+1)/(s+1) * 3**s)
    hb = unison.Hyperband(2, 20, 2)  # 2, 4, 8, 16 <= 20: four brackets, the last with one rung
    assert [hb.bracket_milestones(b) for b in range(4)] == [[2, 4, 8, 16], [4, 8, 16], [8, 16], [16]]


def test_hyperband_assigns_trials_to_brackets_deterministically_by_trial_id():
    hb = unison.Hyperband(1, 27, 3)
    cycle = len(hb.cycle)
    assert cycle == sum(hb.sizes) == 49
    assert Counter(hb.bracket_of(t) for t in range(cycle)) == {0: 27, 1: 12, 2: 6, 3: 4}
    assert [hb.bracket_of(t) for t in range(6)] == [0, 1, 0, 2, 0, 3]  # every bracket early on
    assert all(hb.bracket_of(t) == hb.bracket_of(t + cycle) for t in range(cycle))
    assert [unison.Hyperband(1, 27, 3).bracket_of(t) for t in range(100)] == [
        hb.bracket_of(t) for t in range(100)]


@MODES
def test_hyperband_brackets_stop_at_their_own_rungs(mode):
    s = sign(mode)
    hb = unison.Hyperband(1, 9, 3)  # brackets: rungs [1, 3], [3], [] (starts at 9: stops nothing)
    hb.setup(mode)
    by_bracket: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for tid in range(60):
        by_bracket[hb.bracket_of(tid)].append(tid)
    values = [0.9, 0.8, 0.1]  # the third arrival at a rung is worse than the cutoff

    def first_stop(tid: int, value: float) -> tuple[int, unison.Stop] | None:
        for step in range(9):
            decision = hb.on_report(tid, step, s * value)
            if isinstance(decision, unison.Stop):
                return step, decision
        return None

    results = {b: [first_stop(t, v) for t, v in zip(by_bracket[b][:3], values, strict=True)]
               for b in (0, 1, 2)}
    assert results[0][:2] == [None, None] and results[0][2][0] == 0  # bracket 0 judges at step 0
    assert "bracket 0" in results[0][2][1].reason and "resource 1" in results[0][2][1].reason
    assert results[1][:2] == [None, None] and results[1][2][0] == 2  # bracket 1 first judges at step 2
    assert "bracket 1" in results[1][2][1].reason and "resource 3" in results[1][2][1].reason
    assert results[2] == [None, None, None]  # bracket 2 never stops anything
    # the brackets keep separate records
    assert set(hb.brackets[1].recorded(3)) == set(by_bracket[1][:3])
    hb.on_complete(by_bracket[1][2], "retried")
    assert set(hb.brackets[1].recorded(3)) == set(by_bracket[1][:2])


# ----------------------------------------------------------------------------------- a search
QUALITIES = [0.5, 0.6, 0.2, 0.9, 0.3, 0.8, 0.1, 0.95, 0.4]
# "asha" = ASHA(): rungs at steps 0, 2, 8. Rung 0 in arrival order: .5 .6 go on (first arrivals);
# .2 stops (cutoff .6); .9 goes on; .3 stops; .8 goes on (top 2 of 6); .1 stops; .95 goes on (top 2 of
# 8); .4 stops (top 3 of 9). Rung 1: .5 .6 .9 go on, .8 stops (top 1 of 4), .95 goes on.
STATUSES = ["completed", "completed", "stopped", "completed", "stopped", "stopped", "stopped",
            "completed", "stopped"]
STOPPED_AT = {2: 0, 4: 0, 5: 2, 6: 0, 8: 0}
INTERRUPT = {"q": None}


def quality_train(q, reporter):
    if INTERRUPT["q"] is not None and abs(q) == INTERRUPT["q"]:
        raise KeyboardInterrupt
    for step in range(9):
        reporter.report(step=step, acc=q)
    return {"acc": q}


def quality_search(mode: str, scheduler="asha") -> Search:
    space = {"q": unison.choice([sign(mode) * q for q in QUALITIES])}
    return unison.Search(space, metric="acc", mode=mode, optimizer="grid", scheduler=scheduler)


@MODES
def test_inline_search_with_asha_stops_trials_at_rungs(tmp_path, mode):
    r = unison.run(quality_train, quality_search(mode), backend="inline", progress=False, storage=tmp_path)
    table = r.trials
    assert list(table["status"]) == STATUSES
    reasons = list(table["stop_reason"])
    for tid, step in STOPPED_AT.items():
        rung = 0 if step == 0 else 1
        assert f"rung {rung}" in reasons[tid] and f"step {step}" in reasons[tid]
        assert r.rows[tid]["last_step"] == step
    assert r.best.hparams == {"q": sign(mode) * 0.95}
    assert list(table["status"])[QUALITIES.index(0.95)] == "completed"
    stored = json.loads((r.path / "experiment.json").read_text())["search"]
    assert stored["scheduler"] == "asha"  # a name stays a name


def test_a_resumed_search_rebuilds_the_scheduler_state(tmp_path):
    search = quality_search("max")
    INTERRUPT["q"] = 0.95  # interrupt at trial 7: trials 0-6 ended, 7 and 8 run after the resume
    try:
        with pytest.raises(KeyboardInterrupt):
            unison.run(quality_train, search, backend="inline", progress=False, storage=tmp_path)
    finally:
        INTERRUPT["q"] = None
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]

    # replay feeds each ended trial's reports, then on_complete: the rungs hold what was recorded
    store = ExperimentStore(path)
    meta = store.read_experiment()
    driver = SearchDriver(search, store, meta["seed"])
    driver.replay(store.read_journal())
    store.close()
    assert driver.scheduler.recorded(1) == dict(enumerate(QUALITIES[:7]))
    assert driver.scheduler.recorded(3) == {0: 0.5, 1: 0.6, 3: 0.9, 5: 0.8}

    # trial 8 (0.4) is stopped only because the 8 earlier values at rung 0 were rebuilt: on an empty
    # scheduler it would be the second arrival and go on
    r = unison.run(quality_train, search, backend="inline", progress=False, resume=path)
    assert list(r.trials["status"]) == STATUSES
    assert r.best.hparams == {"q": 0.95}


# ------------------------------------------------------------------------------ store / rebuild
@pytest.mark.parametrize("name, scheduler, params", [
    ("asha", unison.ASHA(2, 30, 2), {"min_resource": 2, "max_resource": 30, "reduction_factor": 2}),
    ("asha", unison.ASHA(), {"min_resource": 1, "max_resource": None, "reduction_factor": 3}),
    ("asha", unison.ASHA(grace_period=4, max_resource=40),
     {"min_resource": 4, "max_resource": 40, "reduction_factor": 3}),
    ("hyperband", unison.Hyperband(1, 81, 3), {"min_resource": 1, "max_resource": 81, "reduction_factor": 3}),
    ("hyperband", unison.Hyperband(3, 50, 2), {"min_resource": 3, "max_resource": 50, "reduction_factor": 2}),
    ("median", unison.MedianStopping(grace_period=2, min_trials=4), {"grace_period": 2, "min_trials": 4}),
])
def test_search_to_dict_and_back_rebuilds_builtin_schedulers_with_their_parameters(name, scheduler, params):
    search = Search({"x": unison.uniform(0, 1)}, mode="min", scheduler=scheduler)
    stored = json.loads(json.dumps(search.to_dict()))
    assert stored["scheduler"] == {"name": name, "params": params}
    rebuilt = Search.from_dict(stored)
    assert type(rebuilt.scheduler) is type(scheduler)
    assert rebuilt.scheduler.params() == params
    for key, value in params.items():  # the rebuilt scheduler runs with them, not only reports them
        assert getattr(rebuilt.scheduler, key) == value, key
    assert rebuilt.to_dict() == stored  # what resume compares with experiment.json


@pytest.mark.parametrize("name", ["asha", "median", None])
def test_scheduler_names_are_stored_as_names(name):
    search = Search({"x": unison.uniform(0, 1)}, scheduler=name)
    assert search.to_dict()["scheduler"] == name
    assert Search.from_dict(search.to_dict()).scheduler == name


def test_custom_and_unknown_schedulers_are_not_rebuilt():
    class Mine(unison.ASHA):
        pass

    stored = Search({"x": 1}, scheduler=Mine()).to_dict()
    assert stored["scheduler"]["custom"].endswith("<locals>.Mine")  # a subclass is not the builtin
    with pytest.raises(ValueError, match="custom scheduler"):
        Search.from_dict(stored)
    with pytest.raises(ValueError, match="unknown scheduler 'bohb'"):
        Search.from_dict({**stored, "scheduler": {"name": "bohb", "params": {}}})
