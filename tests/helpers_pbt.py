"""An importable training function for the population-based-training tests, and their search.

The best learning rate changes halfway (0.1 for steps 0-9, 0.01 after), so a schedule beats every fixed
learning rate: the task PBT is for. Workers import this module by name, as does ``pbt_driver.py``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import unison

STEPS = 20


def gain(lr: float, step: int) -> float:
    """What one step adds to the score: 1 at the best learning rate of that step, less away from it."""
    best = 0.1 if step < STEPS // 2 else 0.01
    return 1.0 - abs(math.log10(lr) - math.log10(best))


def train(lr: float, sleep: float, reporter: Any, ctx: Any) -> dict[str, float]:
    """``STEPS`` steps, a checkpoint with each report; resumes from ``ctx.checkpoint``."""
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
    score = ctx.checkpoint["score"] if ctx.checkpoint is not None else 0.0
    for step in range(start, STEPS):
        score += gain(lr, step)
        time.sleep(sleep)
        reporter.report(step=step, checkpoint={"score": score}, score=score)
    return {"score": score}


def make_search(population: int = 4, sleep: float = 0.02, seed: int = 1,
                interval: int = 4) -> unison.Search:
    """A PBT search of :func:`train` over ``lr`` with ``population`` members."""
    mutations = {"lr": unison.loguniform(1e-3, 1.0)}
    pbt = unison.PBT(perturbation_interval=interval, hyperparam_mutations=mutations, seed=seed)
    return unison.Search({"lr": unison.loguniform(1e-3, 1.0), "sleep": sleep}, metric="score", mode="max",
                         trials=population, scheduler=pbt, seed=seed, optimizer="random")


def check_population(r: Any, population: int) -> None:
    """What holds for any PBT search that ran to its end (workers import this module: pytest only here)."""
    import pytest

    rows = {row["trial_id"]: row for row in r.rows}
    clones = [row for row in rows.values() if row.get("parent") is not None]
    assert clones, "no trial was ever replaced"
    # each member slot ends with exactly one completed trial: clones take the place of stopped ones
    completed = [row for row in rows.values() if row["status"] == "completed"]
    assert sorted(row["member"] for row in completed) == list(range(population))
    curves = r.curves
    for clone in clones:
        parent, cloned = rows[clone["parent"]], clone["cloned_step"]
        own = curves[curves.trial_id == clone["trial_id"]].sort_values("step")
        if own.empty:  # queued, then the search ended (every other member was done)
            continue
        assert own.step.iloc[0] == cloned + 1  # it resumed after its parent's checkpoint, not from 0
        inherited = own.score.iloc[0] - gain(clone["hparams"]["lr"], cloned + 1)
        theirs = curves[(curves.trial_id == parent["trial_id"]) & (curves.step == cloned)].score
        assert inherited == pytest.approx(float(theirs.iloc[0]))  # the parent's state at that step
    for row in rows.values():
        if row["status"] == "stopped":
            assert row["stop_reason"].startswith("replaced by a clone of trial")
    table = r.trials.set_index("trial_id")
    best = r.best
    schedule = table.loc[best.trial_id, "schedule"]
    assert schedule[0][0] == 0 and schedule[-1][1] == best.hparams
    assert [step for step, _ in schedule] == sorted(step for step, _ in schedule)
    assert str(table["parent"].dtype) == "Int64"
