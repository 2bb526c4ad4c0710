"""A user-written optimizer: a local search that perturbs the best hyperparameters found so far.

    python examples/custom_optimizer.py

An optimizer subclasses ``unison.Optimizer`` and implements ``suggest`` (hyperparameters for the next
trial) and ``observe`` (a trial ended). The driver calls both from one thread; ``suggest`` may be
called again before earlier trials were observed (workers run trials concurrently), and after
``unison.resume`` ``observe`` also receives the trials of the earlier run, which this instance never
suggested: an optimizer that learns only in ``observe``, like this one, handles both for free.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import unison
from unison.space import Choice, Distribution, Integer, LogUniform, Uniform, dependency_order, is_active


class PerturbBest(unison.Optimizer):
    """Random points for ``warmup`` trials, then the best point so far with every hyperparameter
    nudged: floats by a Gaussian step of ``scale`` times their range (log ranges on a log scale),
    integers likewise rounded, and a choice switched to another value with probability ``scale``."""

    def __init__(self, warmup: int = 6, scale: float = 0.1) -> None:
        if warmup < 1 or not 0 < scale <= 1:
            raise ValueError(f"PerturbBest needs warmup >= 1 and 0 < scale <= 1, got {warmup}, {scale}")
        self.warmup, self.scale = warmup, scale

    def setup(self, space: dict[str, Any], mode: str, seed: int | None) -> None:
        super().setup(space, mode, seed)  # keeps self.space, self.mode, self.seed
        self.best: tuple[float, dict[str, Any]] | None = None

    def suggest(self, trial_number: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed or 0, trial_number])  # reproducible per trial
        explore = self.best is None or trial_number < self.warmup
        hparams: dict[str, Any] = {}
        for name in dependency_order(self.space):  # parents before the parameters that depend on them
            dist = self.space[name]
            if not is_active(dist, hparams):
                continue  # a conditional hyperparameter whose condition does not hold
            if not isinstance(dist, Distribution):
                hparams[name] = dist  # a constant
            elif explore or name not in self.best[1]:
                hparams[name] = dist.sample(rng)
            else:
                hparams[name] = self._perturb(getattr(dist, "dist", dist), self.best[1][name], rng)
        return {name: hparams[name] for name in self.space if name in hparams}

    def _perturb(self, dist: Distribution, value: Any, rng: np.random.Generator) -> Any:
        if isinstance(dist, Choice):
            return dist.sample(rng) if rng.random() < self.scale else value
        if isinstance(dist, LogUniform) or (isinstance(dist, Integer) and dist.log):
            low, high, x = math.log(dist.low), math.log(dist.high), math.log(value)
            x = math.exp(min(max(x + rng.normal(0, self.scale * (high - low)), low), high))
        elif isinstance(dist, (Uniform, Integer)):
            x = min(max(value + rng.normal(0, self.scale * (dist.high - dist.low)), dist.low), dist.high)
        else:
            return dist.sample(rng)
        return int(round(x)) if isinstance(dist, Integer) else float(x)

    def observe(self, trial_number: int, hparams: dict[str, Any], value: Any, status: str) -> None:
        if status != "completed" or value is None or not math.isfinite(value):
            return  # stopped early or failed: nothing to compare
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better:
            self.best = (value, dict(hparams))


def train(lr: float, units: int, dropout: float, act: str, reporter: unison.Reporter) -> dict[str, float]:
    """A stand-in for training: best near lr=3e-3, units=96, dropout=0.2, act='gelu'."""
    score = 0.0
    for epoch in range(5):
        score = (1 - math.exp(-(epoch + 1) / 2)) * math.exp(
            -(math.log10(lr) + 2.5) ** 2 - (math.log2(units) - math.log2(96)) ** 2 / 4
            - 4 * (dropout - 0.2) ** 2
        ) * (1.0 if act == "gelu" else 0.9)
        reporter.report(step=epoch, accuracy=score)
    return {"accuracy": score}


if __name__ == "__main__":
    space = {
        "lr": unison.loguniform(1e-5, 1e-1),
        "units": unison.integer(8, 512, log=True),
        "dropout": unison.uniform(0.0, 0.6),
        "act": unison.choice(["relu", "gelu", "tanh"]),
    }
    search = unison.Search(space, metric="accuracy", mode="max", trials=40, seed=0,
                           optimizer=PerturbBest(warmup=8, scale=0.15))
    result = unison.run(train, search, backend="local", progress=False)
    print("best:", result.best)
    trials = result.trials.sort_values("trial_id")
    print("best so far every 8 trials:", [round(v, 3) for v in trials["accuracy"].cummax().iloc[7::8]])
