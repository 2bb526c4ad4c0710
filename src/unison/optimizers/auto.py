"""``optimizer="auto"``: Gaussian-process search while trials are few, TPE beyond that.

The route is decided from what the optimizer knows when the search starts (the space and the
objectives) and, as trials go on, from how many were suggested and (``timing``, on by default) from
how fast results come against how long GP's suggestions take. Measurements behind the defaults are in
``benchmarks/README.md`` ("Search quality").
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import deque
from typing import Any

from unison.optimizers.base import Optimizer
from unison.optimizers.gp_startup import GPStart, draws_supported
from unison.optimizers.optuna import OptunaOptimizer
from unison.optimizers.process import Offloaded, OptimizerProcess
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


_STARTUP = 10  # Optuna's GPSampler samples at random until this many trials completed, then fits
_FIT_GUESS_S = 0.1  # what a GP suggestion costs at the least (one core, a few dimensions): measured
_CHECKS = (3, 12, 40)  # after this many GP suggestions from a fitted model, its cost is looked at again
_RECENT = 20  # the results whose pace is compared with GP's cost
_WARM_AFTER = 3  # results after which GP's process is started, if they come slowly
# what GP's models need (torch alone takes a second or more to import): its process imports them at
# start, then fits a throwaway model (a first fit's one-time cost)
_GP_MODULES = ("optuna", "scipy.optimize", "torch", "optuna._gp.gp", "optuna._gp.acqf",
               "optuna._gp.optim_mixed", "optuna._gp.prior", "optuna._gp.search_space",
               "unison.optimizers.optuna:warm_up_gp")


def _start_gp_process() -> OptimizerProcess | None:
    """A process for GP's models, importing their modules while the first trials run; ``None`` if it
    cannot start (GP then fits its models in the driver)."""
    try:
        return OptimizerProcess(_GP_MODULES)
    except OSError as exc:
        print(f"unison: GP's process could not start ({exc}); its models are fitted in the driver",
              file=sys.stderr)
        return None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class AutoSearch(Optimizer):
    """GP (Optuna's ``GPSampler``) while trials are few and slow enough to hide its suggestions, TPE
    otherwise. ``optimizer="auto"``, the default.

    Args:
        gp_trials: how many trials GP suggests before TPE takes over (GP's cost per suggestion grows
            with the trials seen; TPE starts from every trial finished by then). Default 100.
        gp_max_dims: spaces with more hyperparameters than this use TPE from the start. Default 16.
        timing: hand over to TPE early when results come too fast for GP: when GP is about to fit
            its first model (after its 10 random trials) and results arrive more often than every
            0.2 s (on average), or when, after its 3rd, 12th and 40th suggestion from a model, its
            median suggestion takes more than half the mean time between the last 20 results (the
            workers would wait for it). Default on. The points where
            this is decided are fixed, the outcome depends on measured times: the sequence of
            suggestions is the same for a seed unless the trials' pace is near those limits.
            ``timing=False`` (or ``optimizer="gp"``) makes it depend on the seed and the results
            alone, on every machine.

    Multi-objective searches, conditional or mostly categorical spaces use TPE throughout
    (:func:`route`). ``self.sampler`` is ``"gp"`` or ``"tpe"`` (what suggests now), ``self.reason`` why.

    GP's random start is drawn in the driver, as Optuna draws it but without importing Optuna
    (:class:`~unison.optimizers.gp_startup.GPStart`; for numeric and categorical spaces with an int seed,
    else with Optuna); its models are fitted in a process of its own (:mod:`unison.optimizers.process`),
    so that neither torch's import nor the fits hold the driver's interpreter lock while it hands out
    trials. The process starts after the 3rd result when results come slowly (or ``timing=False``),
    importing torch while the trials run, or else when GP fits its first model; GP is handed over to it
    then (its calls so far replayed there: the same study, trials in flight included), and suggests
    exactly what it would have in the driver. If the process cannot start or dies, GP goes on in the driver
    (from the same state: the same suggestions), saying so on stderr. :meth:`close` ends the process;
    so does TPE's take-over, once GP's last trial has ended.
    """

    def __init__(self, *, gp_trials: int = 100, gp_max_dims: int = 16, timing: bool = True) -> None:
        for name, value in (("gp_trials", gp_trials), ("gp_max_dims", gp_max_dims)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AutoSearch({name}=...) must be a non-negative int, got {value!r}")
        if not isinstance(timing, bool):
            raise ValueError(f"AutoSearch(timing=...) must be True or False, got {timing!r}")
        self.gp_trials, self.gp_max_dims, self.timing = gp_trials, gp_max_dims, timing

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        super().setup(space, mode, seed)
        self.sampler, self.reason = route(space, mode, self.gp_max_dims)
        if self.sampler == "gp" and self.gp_trials == 0:
            self.sampler, self.reason = "tpe", "gp_trials=0"
        missing = [m for m in ("torch", "scipy") if importlib.util.find_spec(m) is None]
        if self.sampler == "gp" and missing:
            self.sampler, self.reason = "tpe", f"GP needs {' and '.join(missing)} (not installed)"
        self._finished: list[tuple[int, dict[str, Any], Any, str]] = []
        self._completed = 0  # trials that completed: GP fits a model from _STARTUP of them
        # when the last of this search's own trials ended (not resumed ones)
        self._result_times: deque[float] = deque(maxlen=_RECENT + 1)
        self._fit_s: list[float] = []  # GP's suggestions from a fitted model
        self._prechecked = False
        self._checks_done = 0
        self._owner: dict[int, Optimizer] = {}
        self._gp: Optimizer | None = None  # an OptunaOptimizer, Offloaded once it fits models
        self._process: OptimizerProcess | None = None  # GP's, once started (_gp_process)
        self._process_tried = False
        self._tpe: OptunaOptimizer | None = None
        if self.sampler == "gp" and seed is not None and draws_supported(space, seed):
            self._gp = GPStart(space, mode, seed)  # its first trials wait for neither optuna nor numpy
        elif self.sampler == "gp":
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

    def _pace(self) -> float | None:
        """The mean time between the last results (workers that end together come in pairs), if two
        have ended."""
        times = self._result_times
        return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None

    def _switch(self, trial_number: int) -> str | None:
        """Why GP hands over to TPE before ``trial_number``, or ``None`` while it goes on."""
        if trial_number >= self.gp_trials:
            return f"{self.gp_trials} trials suggested by GP (gp_trials)"
        if not self.timing:
            return None
        if self._completed >= _STARTUP and not self._prechecked:
            self._prechecked = True  # once, before GP's first model (which also imports torch)
            pace = self._pace()
            if pace is not None and pace < 2 * _FIT_GUESS_S:
                return (f"results arrive every {pace:.3g} s: GP's suggestions (~{_FIT_GUESS_S:g} s and up) "
                        f"would hold the trials up")
        if self._checks_done < len(_CHECKS) and len(self._fit_s) >= _CHECKS[self._checks_done]:
            self._checks_done += 1
            fit_s, pace = _median(self._fit_s), self._pace()
            if pace is not None and fit_s > pace / 2:
                return (f"GP's suggestions take {fit_s:.3g} s, more than half the time between results "
                        f"({pace:.3g} s)")
        return None

    def _warm_up(self, trial_number: int) -> None:
        """Start GP's process once ``_WARM_AFTER`` results came, slowly (or ``timing=False``), and the
        search goes on (a trial is asked for), so that torch is imported while trials run."""
        if (len(self._result_times) >= _WARM_AFTER and self.sampler == "gp" and not self._process_tried
                and _STARTUP < self.gp_trials and trial_number < self.gp_trials):  # else GP fits no model
            pace = self._pace()
            if not self.timing or (pace is not None and pace >= 2 * _FIT_GUESS_S):
                self._gp_process()

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number in self._owner:
            return self._owner[trial_number].suggest(trial_number)
        self._warm_up(trial_number)
        if self.sampler == "gp":
            why = self._switch(trial_number)
            if why is not None:
                self.sampler, self.reason = "tpe", why
                self._start_tpe()
                self._release_gp_if_done()
        optimizer = self._gp if self.sampler == "gp" else self._tpe
        assert optimizer is not None
        fitted = optimizer is self._gp and self._completed >= _STARTUP
        if fitted and not isinstance(optimizer, Offloaded):
            optimizer = self._offload_gp()
        start = time.perf_counter()
        hparams = optimizer.suggest(trial_number)
        if fitted:
            self._fit_s.append(time.perf_counter() - start)
        self._owner[trial_number] = optimizer
        return hparams

    def observe(self, trial_number: int, hparams: dict[str, Any], value: float | list[float] | None,
                status: str) -> None:
        if status == "completed" and value is not None:
            self._completed += 1
        owner = self._owner.pop(trial_number, None)
        if self._tpe is None:  # what TPE is told when it takes over
            self._finished.append((trial_number, hparams, value, status))
        if owner is None:  # a resumed experiment's earlier trial: both samplers learn from it
            for optimizer in (self._gp, self._tpe):
                if optimizer is not None:
                    optimizer.observe(trial_number, hparams, value, status)
            return
        self._result_times.append(time.perf_counter())
        owner.observe(trial_number, hparams, value, status)
        if self._tpe is not None and owner is not self._tpe:
            self._tpe.observe(trial_number, hparams, value, status)  # a GP trial that ended after the switch
            self._release_gp_if_done()

    def _offload_gp(self) -> Offloaded:
        """GP, about to fit its first model, handed over to its process (started now if it was not),
        with its trials in flight."""
        start = self._gp
        assert start is not None
        if isinstance(start, GPStart):  # Optuna's GP takes over from the calls it made
            offloaded = Offloaded(OptunaOptimizer("gp"), self._gp_process(), start.history)
        else:
            offloaded = Offloaded(start, self._gp_process())
        offloaded.hand_over()
        self._owner = {n: offloaded if o is start else o for n, o in self._owner.items()}
        self._gp = offloaded
        return offloaded

    def _gp_process(self) -> OptimizerProcess | None:
        """GP's process, started at the first call (``None`` if it could not start)."""
        if not self._process_tried:
            self._process_tried = True
            self._process = _start_gp_process()
        return self._process

    def _release_gp_if_done(self) -> None:
        """After TPE took over: end GP (and its process) once none of its trials is in flight."""
        if self._gp is not None and all(o is not self._gp for o in self._owner.values()):
            gp, process, self._gp, self._process = self._gp, self._process, None, None
            try:
                gp.close()
            finally:
                if process is not None:
                    process.close()

    def close(self) -> None:
        """End GP's process, if it was started."""
        gp, process = getattr(self, "_gp", None), getattr(self, "_process", None)
        self._process = None
        try:
            if gp is not None:
                gp.close()
        finally:
            if process is not None:
                process.close()

    def __repr__(self) -> str:
        return (f"AutoSearch(gp_trials={self.gp_trials}, gp_max_dims={self.gp_max_dims}, "
                f"timing={self.timing})")
