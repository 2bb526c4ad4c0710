"""Asynchronous TPE + ASHA on real worker processes: early stopping happens and the search learns."""

from __future__ import annotations

import math
import statistics

import pytest

import unison

CENTRE = {"a": 1.5, "b": -2.0, "c": 0.5, "d": 3.0}
SPACE = {**{name: unison.uniform(-5.0, 5.0) for name in CENTRE}, "epochs": 9}


def quality(hparams: dict[str, float]) -> float:
    """1.0 at CENTRE, falling off as a 4-D Gaussian bowl: random sampling rarely gets close."""
    return math.exp(-sum((hparams[k] - c) ** 2 for k, c in CENTRE.items()) / 8.0)


def train(hparams: dict[str, float], reporter: unison.Reporter) -> dict[str, float]:
    score = 0.0
    for epoch in range(hparams["epochs"]):
        score = quality(hparams) * (1.0 - math.exp(-(epoch + 1) / 2.0))  # curves keep their order
        reporter.report(step=epoch, score=score)
    return {"score": score, "quality": quality(hparams)}


def best_quality(tmp_path, optimizer: str, scheduler, seed: int) -> tuple[float, int]:
    search = unison.Search(SPACE, metric="score", mode="max", trials=40, optimizer=optimizer,
                           scheduler=scheduler, seed=seed)
    result = unison.run(train, search, backend=unison.Local(workers=2), storage=tmp_path,
                        progress=False)
    trials = result.trials
    assert len(trials) == 40 and set(trials["status"]) <= {"completed", "stopped"}
    completed = trials[trials["status"] == "completed"]
    return float(completed["quality"].max()), int((trials["status"] == "stopped").sum())


@pytest.mark.slow
def test_tpe_with_asha_stops_trials_early_and_beats_random(tmp_path):
    tpe, random = [], []
    for seed in range(3):
        found, stopped = best_quality(tmp_path, "tpe", unison.ASHA(max_resource=9), seed)
        assert stopped >= 10, f"ASHA stopped only {stopped} of 40 trials"
        tpe.append(found)
        random.append(best_quality(tmp_path, "random", None, seed)[0])
    assert statistics.median(tpe) > statistics.median(random), (tpe, random)
    assert statistics.median(tpe) > statistics.median(random) + 0.1
