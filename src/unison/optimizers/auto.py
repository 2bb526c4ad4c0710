"""``optimizer="auto"``: Gaussian-process search while trials are few, TPE beyond that.

The route is decided from what the optimizer knows when the search starts (the space and the
objectives) and, as trials go on, from how many were suggested; optionally (``timing=True``) from
observed trial durations against GP's suggestion times. Measurements behind the defaults are in
``benchmarks/README.md`` ("Search quality").
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from unison.optimizers.base import Optimizer
from unison.optimizers.optuna import OptunaOptimizer
from unison.space import Choice, Conditional, Distribution

__all__ = ["AutoSearch", "route"]


def route(space: dict[str, Any], mode: str | list[str], gp_max_dims: int) -> tuple[str, str]:
    """The sampler a search starts with (``"gp"`` or ``"tpe"``) and why, from its space and mode."""
    if not isinstance(mode, str):
        return "tpe", "several objectives: TPE handles them at a fraction of GP's cost"
    dists = {n: d for n, d in space.items() if isinstance(d, Distribution)}
    if any(isinstance(d, Conditional) for d in dists.values()):
        return "tpe", "conditional hyperparameters: GP models only those every trial has"
    if not dists:
        return "tpe", "nothing to optimize"
    categorical = sum(isinstance(d, Choice) for d in dists.values())
    if 2 * categorical > len(dists):
        return "tpe", "mostly categorical hyperparameters"
    if len(dists) > gp_max_dims:
        return "tpe", f"{len(dists)} hyperparameters (GP is used up to {gp_max_dims})"
    return "gp", f"{len(dists)} numeric hyperparameters"


class AutoSearch(Optimizer):
    """GP (Optuna's ``GPSampler``) for the first ``gp_trials`` trials, then TPE.

    Args:
        gp_trials: how many trials GP suggests before TPE takes over (GP's cost per suggestion grows
            with the trials seen; TPE starts from every trial finished by then). Default 100.
        gp_max_dims: spaces with more hyperparameters than this use TPE from the start. Default 16.
        timing: also switch to TPE once GP has spent ``min_gp_seconds`` suggesting and its median
            suggestion takes longer than the median trial (wall time from suggestion to result), so
            very short trials do not wait on GP. Off by default: the sequence of suggestions then
            depends only on the seed and the results, on every machine.
        min_gp_seconds: see ``timing``. Default 10.

    Multi-objective searches, conditional or mostly categorical spaces use TPE throughout
    (:func:`route`). ``self.sampler`` is ``"gp"`` or ``"tpe"`` (what suggests now), ``self.reason`` why.
    """

    def __init__(self, *, gp_trials: int = 100, gp_max_dims: int = 16, timing: bool = False,
                 min_gp_seconds: float = 10.0) -> None:
        for name, value in (("gp_trials", gp_trials), ("gp_max_dims", gp_max_dims)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AutoSearch({name}=...) must be a non-negative int, got {value!r}")
        if not isinstance(timing, bool):
            raise ValueError(f"AutoSearch(timing=...) must be True or False, got {timing!r}")
        self.gp_trials, self.gp_max_dims = gp_trials, gp_max_dims
        self.timing, self.min_gp_seconds = timing, float(min_gp_seconds)

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        super().setup(space, mode, seed)
        self.sampler, self.reason = route(space, mode, self.gp_max_dims)
        if self.sampler == "gp" and self.gp_trials == 0:
            self.sampler, self.reason = "tpe", "gp_trials=0"
        missing = [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]
        if self.sampler == "gp" and missing:
            self.sampler, self.reason = "tpe", f"GP needs {' and '.join(missing)} (not installed)"
        self._finished: list[tuple[int, dict[str, Any], Any, str]] = []
        self._started: dict[int, float] = {}
        self._trial_s: list[float] = []
        self._gp_s: list[float] = []
        self._owner: dict[int, OptunaOptimizer] = {}
        self._gp: OptunaOptimizer | None = None
        self._tpe: OptunaOptimizer | None = None
        if self.sampler == "gp":
            self._gp = OptunaOptimizer("gp")
            self._gp.setup(space, mode, seed)
        else:
            self._start_tpe()

    def _start_tpe(self) -> None:
        """TPE, told every trial that finished so far (seeded apart from GP's seed)."""
        self._tpe = OptunaOptimizer("tpe")
        self._tpe.setup(self.space, self.mode, None if self.seed is None else self.seed + 1)
        for number, hparams, value, status in self._finished:
            self._tpe.observe(number, hparams, value, status)

    def _switch(self, trial_number: int) -> str | None:
        """Why GP hands over to TPE before ``trial_number``, or ``None`` while it goes on."""
        if trial_number >= self.gp_trials:
            return f"{self.gp_trials} trials suggested by GP (gp_trials)"
        if self.timing and self._trial_s and sum(self._gp_s) >= self.min_gp_seconds:
            gp_s = sorted(self._gp_s)[len(self._gp_s) // 2]
            trial_s = sorted(self._trial_s)[len(self._trial_s) // 2]
            if gp_s > trial_s:
                return f"trials ({trial_s:.3g} s) shorter than GP's suggestions ({gp_s:.3g} s)"
        return None

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number in self._owner:
            return self._owner[trial_number].suggest(trial_number)
        if self.sampler == "gp":
            why = self._switch(trial_number)
            if why is not None:
                self.sampler, self.reason = "tpe", why
                self._start_tpe()
        optimizer = self._gp if self.sampler == "gp" else self._tpe
        assert optimizer is not None
        start = time.perf_counter()
        hparams = optimizer.suggest(trial_number)
        now = time.perf_counter()
        if optimizer is self._gp:
            self._gp_s.append(now - start)
        self._owner[trial_number] = optimizer
        self._started[trial_number] = now
        return hparams

    def observe(self, trial_number: int, hparams: dict[str, Any], value: float | list[float] | None,
                status: str) -> None:
        started = self._started.pop(trial_number, None)
        if started is not None:
            self._trial_s.append(time.perf_counter() - started)
        owner = self._owner.pop(trial_number, None)
        if self._tpe is None:  # what TPE is told when it takes over
            self._finished.append((trial_number, hparams, value, status))
        if owner is None:  # a resumed experiment's earlier trial: both samplers learn from it
            for optimizer in (self._gp, self._tpe):
                if optimizer is not None:
                    optimizer.observe(trial_number, hparams, value, status)
            return
        owner.observe(trial_number, hparams, value, status)
        if self._tpe is not None and owner is not self._tpe:
            self._tpe.observe(trial_number, hparams, value, status)  # a GP trial that ended after the switch

    def __repr__(self) -> str:
        return (f"AutoSearch(gp_trials={self.gp_trials}, gp_max_dims={self.gp_max_dims}, "
                f"timing={self.timing})")
