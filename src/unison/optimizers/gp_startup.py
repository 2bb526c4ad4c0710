"""GP's first suggestions, drawn as Optuna draws them, without importing Optuna.

Optuna's ``GPSampler(seed=s)`` suggests at random until 10 trials completed: its
``RandomSampler(seed=s)`` draws each hyperparameter with ``numpy.random.RandomState(s).uniform`` over
the parameter's transformed bounds (log scale for log ranges, ``[low - 0.5, high + 0.5]`` for integers,
one draw per choice for a categorical, whose largest draw wins) and maps the draw back.
:class:`RandomSamplerDraws` does the same in pure Python (``RandomState``'s generator is Python's
Mersenne Twister; its seeding is reproduced below), so that the default optimizer's first trials wait
neither for ``import optuna`` (~130 ms) nor for numpy, and its sequences stay what Optuna draws (a test
compares them with ``OptunaOptimizer("gp")`` trial by trial).
"""

from __future__ import annotations

import math
import random
from typing import Any

from unison.optimizers.base import Optimizer
from unison.space import Choice, Distribution, Integer, LogUniform, Uniform, dependency_order

__all__ = ["GPStart", "RandomSamplerDraws", "draws_supported"]

_MT_N = 624


def _mt19937_key(seed: int) -> tuple[int, ...]:
    """The state ``RandomState(seed)`` starts from (``init_genrand``), for ``random.Random.setstate``."""
    key, value = [], seed & 0xFFFFFFFF
    for pos in range(_MT_N):
        key.append(value)
        value = (1812433253 * (value ^ (value >> 30)) + pos + 1) & 0xFFFFFFFF
    return (*key, _MT_N)


def draws_supported(space: dict[str, Any], seed: int | None) -> bool:
    """Whether :class:`RandomSamplerDraws` reproduces Optuna for ``space`` and ``seed``: numeric ranges
    and choices without conditions, a seed ``RandomState`` accepts."""
    kinds = (Uniform, LogUniform, Integer, Choice)
    dists = [d for d in space.values() if isinstance(d, Distribution)]
    return (seed is not None and 0 <= seed <= 0xFFFFFFFF and bool(dists)
            and all(type(d) in kinds for d in dists))


def _single(dist: Distribution) -> bool:
    if isinstance(dist, Choice):
        return len(dist.values) == 1
    return bool(dist.low == dist.high)  # type: ignore[attr-defined]


class RandomSamplerDraws:
    """The hyperparameters ``OptunaOptimizer("gp")`` suggests while GP has no model yet, one trial per
    :meth:`suggest` call, in the order Optuna asks (define-by-run, parents first)."""

    def __init__(self, space: dict[str, Any], seed: int) -> None:
        if not draws_supported(space, seed):
            raise ValueError("RandomSamplerDraws needs numeric ranges or choices and a seed in [0, 2**32)")
        self.space = space
        self._order = dependency_order(space)
        self._rng = random.Random()
        self._rng.setstate((3, _mt19937_key(seed), None))

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._rng.random()

    def _draw(self, dist: Distribution) -> Any:
        if _single(dist):  # Optuna returns a one-value range's value without drawing
            if isinstance(dist, Choice):
                return dist.values[0]
            return int(dist.low) if isinstance(dist, Integer) else float(dist.low)  # type: ignore[attr-defined]
        if isinstance(dist, Choice):
            draws = [self._uniform(0.0, 1.0) for _ in dist.values]
            return dist.values[draws.index(max(draws))]
        if isinstance(dist, Integer):
            return self._integer(int(dist.low), int(dist.high), dist.log)
        low, high = float(dist.low), float(dist.high)  # type: ignore[attr-defined]
        if isinstance(dist, LogUniform):
            value = math.exp(self._uniform(math.log(low), math.log(high)))
            return min(max(value, low), math.nextafter(high, high - 1))
        return min(self._uniform(low, high), math.nextafter(high, high - 1))

    def _integer(self, low: int, high: int, log: bool) -> int:
        if log:
            value = int(round(math.exp(self._uniform(math.log(low - 0.5), math.log(high + 0.5)))))
        else:
            value = math.floor((self._uniform(low - 0.5, high + 0.5) - low) / 1 + 0.5) + low
        return min(max(value, low), high)

    def suggest(self) -> dict[str, Any]:
        """The next trial's hyperparameters."""
        hparams = {name: self._draw(d) if isinstance(d, Distribution) else d
                   for name, d in ((n, self.space[n]) for n in self._order)}
        return {name: hparams[name] for name in self.space}


class GPStart(Optimizer):
    """``OptunaOptimizer("gp")`` until its first model, without Optuna: :class:`RandomSamplerDraws`'
    suggestions, and every call recorded in :attr:`history` for the ``OptunaOptimizer`` that takes over
    (:class:`unison.optimizers.process.Offloaded` replays it), which then holds the same study as if it
    had suggested from the start. Asked again for a trial in flight, the same suggestion."""

    def __init__(self, space: dict[str, Any], mode: str | list[str], seed: int) -> None:
        self.space, self.mode, self.seed = space, mode, seed
        self.draws = RandomSamplerDraws(space, seed)
        self.history: list[tuple[str, Any]] = [("setup", (space, mode, seed))]
        self._given: dict[int, dict[str, Any]] = {}

    def suggest(self, trial_number: int) -> dict[str, Any]:
        if trial_number not in self._given:
            self._given[trial_number] = self.draws.suggest()
            self.history.append(("suggest", (trial_number, dict(self._given[trial_number]))))
        return dict(self._given[trial_number])

    def observe(self, trial_number: int, hparams: dict[str, Any], value: float | list[float] | None,
                status: str) -> None:
        self._given.pop(trial_number, None)
        self.history.append(("observe", (trial_number, hparams, value, status)))

    def __repr__(self) -> str:
        return "GPStart()"
