"""Optuna's samplers (TPE, GP, CMA-ES, QMC, NSGA-II) behind unison's :class:`Optimizer` interface.

Optuna is imported only when an optimizer is set up (``import unison`` does not load it). Each
optimizer keeps an in-memory study: :meth:`OptunaOptimizer.suggest` asks it for a trial, drawing the
hyperparameters define-by-run, parents first (a conditional one whose condition does not hold is never
drawn), and :meth:`OptunaOptimizer.observe` tells it how the trial ended; Optuna's log and warnings are
silenced during its calls only. How each sampler treats trials still running, how ended trials are
told, and the measurements behind TPE's settings are in ``benchmarks/README.md`` ("Optuna's samplers
and trials in flight").
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from unison._validate import is_number
from unison.optimizers.base import Optimizer
from unison.space import (
    Choice,
    Conditional,
    Distribution,
    Integer,
    LogUniform,
    Uniform,
    dependency_order,
    is_active,
)

__all__ = [
    "OptunaOptimizer",
    "TPESearch",
    "GPSearch",
    "CmaEsSearch",
    "QMCSearch",
    "NSGA2Search",
    "SAMPLERS",
]

#: sampler names -> the class in ``optuna.samplers``
SAMPLERS = {
    "tpe": "TPESampler",
    "gp": "GPSampler",
    "cmaes": "CmaEsSampler",
    "qmc": "QMCSampler",
    "nsga2": "NSGAIISampler",
}

# what a sampler needs beyond optuna: (module, pip package)
_REQUIREMENTS = {
    "gp": [("torch", "torch"), ("scipy", "scipy")],
    "cmaes": [("cmaes", "cmaes")],
    "qmc": [("scipy", "scipy")],
}

_STOPPED_AS = ("pruned", "completed")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's log at ERROR and no warnings, for the duration of one call into optuna."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _directions(mode: Any) -> list[Literal["maximize", "minimize"]]:
    """``"max"``/``"min"`` or a list of them -> optuna's study directions."""
    modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, Sequence) else None
    if not modes or any(m not in ("max", "min") for m in modes):
        raise ValueError(
            f"mode must be 'max', 'min' or (multi-objective) a list of them such as ['max', 'min'], "
            f"got {mode!r}"
        )
    return ["maximize" if m == "max" else "minimize" for m in modes]


class _Param:
    """One distribution of the space and its optuna counterpart (choices mapped to labels)."""

    def __init__(self, name: str, dist: Distribution) -> None:
        import optuna.distributions as od

        self.name = name
        inner = dist.dist if isinstance(dist, Conditional) else dist
        self.inner = inner
        self.labels: list[Any] | None = None
        self.choices: list[Any] = []  # a Choice's values, as the user gave them
        self.optuna: od.FloatDistribution | od.IntDistribution | od.CategoricalDistribution
        if isinstance(inner, Uniform):
            self.optuna = od.FloatDistribution(inner.low, inner.high)
        elif isinstance(inner, LogUniform):
            self.optuna = od.FloatDistribution(inner.low, inner.high, log=True)
        elif isinstance(inner, Integer):
            self.optuna = od.IntDistribution(inner.low, inner.high, log=inner.log)
        elif isinstance(inner, Choice):
            values = self.choices = list(inner.values)
            primitive = all(v is None or isinstance(v, (str, bool, int, float)) for v in values)
            # optuna holds None/bool/int/float/str; values it would confuse (1 and True, 1 and 1.0)
            # or cannot hold (lists, dicts) become JSON strings, mapped back on the way out
            if primitive and len(set(values)) == len(values):
                self.labels = list(values)
            else:
                self.labels = [json.dumps(v, sort_keys=True) for v in values]
            self.optuna = od.CategoricalDistribution(self.labels)
        else:
            raise TypeError(f"{name!r}: optuna optimizers cannot sample {dist!r}")

    def suggest(self, trial: Any) -> Any:
        import optuna.distributions as od

        d = self.optuna
        if self.labels is not None:
            label = trial.suggest_categorical(self.name, self.labels)
            return self.choices[self.labels.index(label)]
        if isinstance(d, od.IntDistribution):
            return int(trial.suggest_int(self.name, d.low, d.high, log=d.log))
        assert isinstance(d, od.FloatDistribution)
        return float(trial.suggest_float(self.name, d.low, d.high, log=d.log))

    def to_optuna(self, value: Any) -> Any:
        """The value optuna stores for ``value`` (a stored hyperparameter); ``ValueError`` if none."""
        if self.labels is not None:
            key = json.dumps(value, sort_keys=True)
            for i, v in enumerate(self.choices):
                if json.dumps(v, sort_keys=True) == key:
                    return self.labels[i]
            raise ValueError(f"{value!r} is not one of {self.choices!r}")
        if not is_number(value):
            raise ValueError(f"{value!r} is not a number")
        value = int(value) if isinstance(self.inner, Integer) else float(value)
        if not self.optuna._contains(self.optuna.to_internal_repr(value)):
            raise ValueError(f"{value!r} is outside {self.inner!r}")
        return value


def warm_up_gp() -> None:
    """Fit one throwaway GP model (a float and an int, 10 trials): most of a first fit's time (~0.3 s
    of 0.35) is torch's and scipy's one-time start, paid here rather than by the search's first model.
    Its study and seed are its own: the search's suggestions do not change."""
    import optuna

    with _quiet():
        study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=0))
        for i in range(11):
            trial = study.ask()
            x, n = trial.suggest_float("x", 0.0, 1.0), trial.suggest_int("n", 1, 4)
            study.tell(trial, (x - 0.3) ** 2 + 0.1 * n + 0.01 * i)


class OptunaOptimizer(Optimizer):
    """An optuna sampler as a unison optimizer.

    Args:
        sampler: ``"tpe"``, ``"gp"``, ``"cmaes"``, ``"qmc"``, ``"nsga2"``, an
            ``optuna.samplers.BaseSampler`` subclass (built with ``sampler_kwargs`` and the search's
            seed) or instance (used as given, copied at each :meth:`setup`; its own seed applies).
        stopped_as: how an early-stopped trial is told: ``"pruned"`` (default, Optuna's convention)
            or ``"completed"`` (its last reported value counts like a final one).
        **sampler_kwargs: passed to the sampler, e.g. ``n_startup_trials=5``. They override
            unison's defaults (``constant_liar=True`` for TPE, scrambled Sobol points for QMC) and,
            with ``seed=``, the search's seed.

    ``mode`` may be a list such as ``["max", "min"]`` (multi-objective: ``tpe``, ``gp``, ``qmc``,
    ``nsga2``); :meth:`observe` then takes a list of values. The optuna study is ``self.study``
    after :meth:`setup` (its categorical parameters hold JSON strings for list or dict choices).
    """

    def __init__(self, sampler: Any = "tpe", *, stopped_as: str = "pruned", **sampler_kwargs: Any) -> None:
        if isinstance(sampler, str):
            if sampler not in SAMPLERS:
                raise ValueError(
                    f"unknown optuna sampler {sampler!r}: use one of {sorted(SAMPLERS)}, an "
                    f"optuna.samplers.BaseSampler subclass or instance"
                )
            for module, package in _REQUIREMENTS.get(sampler, []):  # fail where the search is declared
                if importlib.util.find_spec(module) is None:
                    raise ImportError(
                        f"optimizer {sampler!r} (optuna's {SAMPLERS[sampler]}) needs {package!r}, which "
                        f"is not installed: pip install {package}"
                    )
        else:
            import optuna  # the caller built an optuna object: optuna is loaded already

            base = optuna.samplers.BaseSampler
            if isinstance(sampler, base):
                if sampler_kwargs:
                    raise ValueError(
                        f"sampler keyword arguments {sorted(sampler_kwargs)} apply to a sampler name or "
                        f"class; {type(sampler).__name__} is already built: configure it there"
                    )
            elif not (isinstance(sampler, type) and issubclass(sampler, base)):
                raise TypeError(
                    f"sampler must be a name ({sorted(SAMPLERS)}), an optuna.samplers.BaseSampler "
                    f"subclass or instance, got {sampler!r}"
                )
        if stopped_as not in _STOPPED_AS:
            raise ValueError(f"stopped_as must be one of {_STOPPED_AS}, got {stopped_as!r}")
        self.sampler_spec = sampler
        self.sampler_kwargs = dict(sampler_kwargs)
        self.stopped_as = stopped_as
        self.study: Any = None

    # ------------------------------------------------------------------ setup
    def _default_kwargs(self, name: str) -> dict[str, Any]:
        if name == "tpe":
            kwargs: dict[str, Any] = {"constant_liar": True}
            if any(isinstance(d, Conditional) for d in self.space.values()):
                kwargs.update(multivariate=True, group=True)  # learns each conditional sub-space
            return kwargs
        if name == "qmc":
            return {"scramble": True}  # so the seed matters (unscrambled Sobol ignores it)
        return {}

    def _build_sampler(self, seed: int | None) -> Any:
        import optuna

        spec = self.sampler_spec
        if isinstance(spec, optuna.samplers.BaseSampler):
            return copy.deepcopy(spec)
        if isinstance(spec, str):
            kwargs = {**self._default_kwargs(spec), "seed": seed, **self.sampler_kwargs}
            cls = getattr(optuna.samplers, SAMPLERS[spec])
        else:
            cls = spec
            takes_seed = "seed" in inspect.signature(cls).parameters
            kwargs = {**({"seed": seed} if takes_seed else {}), **self.sampler_kwargs}
        return cls(**kwargs)

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        import optuna

        super().setup(space, mode, seed)
        directions = _directions(mode)
        self.n_objectives = len(directions)
        if self.sampler_spec == "cmaes" and self.n_objectives > 1:
            raise ValueError(
                f"optimizer 'cmaes' optimizes one objective, got mode={mode!r}: use 'nsga2', 'tpe' or "
                f"'gp' for several objectives"
            )
        self._order = dependency_order(space)
        with _quiet():
            self._params = {
                name: _Param(name, dist) for name, dist in space.items() if isinstance(dist, Distribution)
            }
            self.sampler = self._build_sampler(seed)
            self.study = optuna.create_study(
                storage=optuna.storages.InMemoryStorage(), sampler=self.sampler, directions=directions
            )
        self._running: dict[int, tuple[Any, dict[str, Any]]] = {}

    # ------------------------------------------------------- suggest / observe
    def suggest(self, trial_number: int) -> dict[str, Any]:
        if trial_number in self._running:  # asked again before it ended: the same suggestion
            return dict(self._running[trial_number][1])
        with _quiet():
            trial = self.study.ask()
            hparams: dict[str, Any] = {}
            for name in self._order:
                dist = self.space[name]
                if not is_active(dist, hparams):
                    continue
                hparams[name] = self._params[name].suggest(trial) if name in self._params else dist
        hparams = {name: hparams[name] for name in self.space if name in hparams}
        self._running[trial_number] = (trial, hparams)
        return dict(hparams)

    def observe(self, trial_number: int, hparams: dict[str, Any], value: float | list[float] | None,
                status: str) -> None:
        import optuna

        TrialState = optuna.trial.TrialState
        values = self._values(value)
        if status == "completed" and values is not None:
            state = TrialState.COMPLETE
        elif status == "stopped" and self.stopped_as == "completed" and values is not None:
            state = TrialState.COMPLETE
        elif status == "stopped":
            state = TrialState.PRUNED
        else:
            state = TrialState.FAIL
        # a pruned trial's value is its last intermediate value; optuna has those for one objective
        partial = values[0] if state == TrialState.PRUNED and values and self.n_objectives == 1 else None

        entry = self._running.pop(trial_number, None)
        with _quiet():
            if entry is None:
                self._add_finished(hparams, state, values, partial)
                return
            trial = entry[0]
            if partial is not None:
                trial.report(partial, step=0)
            self.study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)

    def _values(self, value: Any) -> list[float] | None:
        """The objective value(s) as a list of finite floats, or ``None`` when there is none."""
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(items) != self.n_objectives:
            raise ValueError(
                f"expected {self.n_objectives} objective value(s) for mode={self.mode!r}, got {value!r}"
            )
        out = []
        for v in items:
            if not is_number(v, finite=True):
                return None
            out.append(float(v))
        return out

    def _add_finished(self, hparams: dict[str, Any], state: Any, values: list[float] | None,
                      partial: float | None) -> None:
        """Add a trial that ended elsewhere (a resumed experiment's earlier run) to the study."""
        import optuna

        params: dict[str, Any] = {}
        distributions: dict[str, optuna.distributions.BaseDistribution] = {}
        for name in self._order:
            if name not in self._params or name not in hparams or not is_active(self.space[name], hparams):
                continue
            try:
                params[name] = self._params[name].to_optuna(hparams[name])
            except ValueError:
                return  # not a point of this space (the space changed): nothing to learn from it
            distributions[name] = self._params[name].optuna
        complete = state == optuna.trial.TrialState.COMPLETE
        trial = optuna.trial.create_trial(
            state=state,
            values=values if complete else ([partial] if partial is not None else None),
            params=params,
            distributions=distributions,
            intermediate_values={0: partial} if partial is not None else None,
        )
        self.study.add_trial(trial)

    def __repr__(self) -> str:
        spec = self.sampler_spec if isinstance(self.sampler_spec, str) else type(self.sampler_spec).__name__
        extra = "".join(f", {k}={v!r}" for k, v in self.sampler_kwargs.items())
        return f"{type(self).__name__}({spec!r}{extra})"


class _Named(OptunaOptimizer):
    _sampler = ""

    def __init__(self, *, stopped_as: str = "pruned", **sampler_kwargs: Any) -> None:
        super().__init__(self._sampler, stopped_as=stopped_as, **sampler_kwargs)

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.sampler_kwargs.items())
        return f"{type(self).__name__}({extra})"


class TPESearch(_Named):
    """Tree-structured Parzen Estimator (``optimizer="tpe"``): optuna's default, good for most spaces,
    conditional ones included; ``constant_liar`` keeps concurrent suggestions apart."""

    _sampler = "tpe"


class GPSearch(_Named):
    """Gaussian-process Bayesian optimization (``optimizer="gp"``): sample-efficient on small budgets
    of expensive trials; each suggestion costs more (needs ``torch`` and ``scipy``)."""

    _sampler = "gp"


class CmaEsSearch(_Named):
    """CMA-ES (``optimizer="cmaes"``): for continuous spaces and budgets of hundreds of trials;
    categorical hyperparameters are sampled at random (needs ``cmaes``). Single objective only."""

    _sampler = "cmaes"


class QMCSearch(_Named):
    """Quasi-Monte Carlo (``optimizer="qmc"``): scrambled Sobol points, a space-filling alternative
    to random search (needs ``scipy``)."""

    _sampler = "qmc"
    adaptive = False


class NSGA2Search(_Named):
    """NSGA-II (``optimizer="nsga2"``): a genetic algorithm for multi-objective searches
    (population 50 unless ``population_size=`` says otherwise)."""

    _sampler = "nsga2"
