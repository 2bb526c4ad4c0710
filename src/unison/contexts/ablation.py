"""``Ablation``: what does each part of the model and the data contribute?

A study is a baseline plus one trial per removed component (a feature or feature group, a model
module, or a named model variant), each repeated ``repeats`` times with different seeds, run in
parallel by the same driver and backends as a search.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unison.driver.plan import Plan
from unison.optimizers.base import Optimizer


@dataclass(frozen=True)
class Component:
    """One configuration of a study: what is removed (nothing for the baseline) or swapped in."""

    name: str
    kind: str  # baseline | feature | module | variant | (anything a custom Ablator uses)
    features: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "features": list(self.features),
                "modules": list(self.modules), "variant": self.variant}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Component:
        return cls(data["name"], data["kind"], tuple(data.get("features", ())),
                   tuple(data.get("modules", ())), data.get("variant"))


BASELINE = Component("baseline", "baseline")


class Ablator:
    """Turns the declared features, modules and variants into the configurations to run.

    The first configuration returned must be the baseline (nothing removed); every component needs
    its own name (it is the row's name in ``result.ablation``). Subclass this for other designs,
    e.g. leave-two-out or keep-only-one.
    """

    def components(self, features: dict[str, list[str]], modules: list[str],
                   variants: list[str]) -> list[Component]:
        """The configurations to run.

        Args:
            features: ``{group name: [columns]}`` (a plain list of features gives one group per column).
            modules: the declared module paths.
            variants: the declared variant names.
        """
        raise NotImplementedError


class LeaveOneOut(Ablator):
    """The baseline, then one configuration per feature group, module and variant."""

    def components(self, features: dict[str, list[str]], modules: list[str],
                   variants: list[str]) -> list[Component]:
        plan = [BASELINE]
        plan += [Component(name, "feature", features=tuple(cols)) for name, cols in features.items()]
        plan += [Component(path, "module", modules=(path,)) for path in modules]
        plan += [Component(name, "variant", variant=name) for name in variants]
        return plan


def _names(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"Ablation({what}=...) takes a list of names, got {value!r}")
    if not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"Ablation({what}=...) names must be non-empty strings, got {value!r}")
    if len(set(value)) < len(value):
        raise ValueError(f"Ablation({what}=...) names a component twice: {value!r}")
    return list(value)


def _feature_groups(features: Sequence[str] | Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """``features=`` as ``{group name: [columns]}``: a list of names is one group per column."""
    if not isinstance(features, Mapping):
        return {name: [name] for name in _names(features, "features")}
    groups: dict[str, list[str]] = {}
    for group, columns in features.items():
        if not isinstance(group, str) or not group:
            raise TypeError(f"Ablation(features={{...}}) group names must be non-empty strings, "
                            f"got {group!r}")
        groups[group] = _names(columns, f"features[{group!r}]")
        if not groups[group]:
            raise ValueError(f"Ablation(features={{{group!r}: []}}) removes nothing: list its columns")
    return groups


def _fixed_base(base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The study's hyperparameters: fixed, JSON-able values (no distributions), without ``seed``."""
    from unison.space import Distribution, validate_space

    checked = validate_space(dict(base or {}))
    sampled = [name for name, value in checked.items() if isinstance(value, Distribution)]
    if sampled:
        raise TypeError(
            f"Ablation(base=...) takes fixed values, but {sampled} are distributions: run a "
            f"unison.Search first and pass base=search_result.best.hparams"
        )
    if "seed" in checked:
        raise ValueError("Ablation(base=...) must not contain 'seed': the study injects one per repeat")
    return checked


def _check_components(components: Any, ablator: Ablator, label: str | None,
                      variants: Mapping[str, Any]) -> None:
    """What an ablator returned: the baseline first, then distinct named components that never remove
    the label and only swap in declared variants."""
    who = f"{type(ablator).__name__}.components()"
    if not isinstance(components, list) or not all(isinstance(c, Component) for c in components):
        raise TypeError(f"{who} must return a list of unison.Component, got {components!r}")
    if not components or components[0].kind != "baseline":
        raise ValueError(f"{who} must start with the baseline, a component of kind 'baseline' that "
                         f"removes nothing, e.g. unison.Component('baseline', 'baseline')")
    if len(components) < 2:
        raise ValueError("an ablation needs at least one component: pass features=, modules= or variants=")
    names = [c.name for c in components]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"{who} gives several components the same name {twice}: every row of the result needs its "
            f"own name (e.g. a feature and a module both called {twice[0]!r}: rename one, or use "
            f"features={{'{twice[0]}_feature': [...]}})"
        )
    for component in components:
        if label is not None and label in component.features:
            raise ValueError(f"component {component.name!r} removes the label column {label!r}, which is "
                             f"never ablated: remove it from the component's features")
        if component.variant is not None and component.variant not in variants:
            raise ValueError(f"component {component.name!r} uses the variant {component.variant!r}, but "
                             f"variants= declares only {sorted(variants)}")


class Ablation:
    """A leave-one-component-out study around the hyperparameters ``base``.

    Args:
        base: the hyperparameters every configuration uses (e.g. ``search_result.best.hparams``).
        features: feature (column) names to remove one at a time, or ``{"group": [columns]}`` to
            remove groups of columns together.
        modules: what to remove from the model, one at a time: dotted paths of PyTorch submodules
            (replaced by an identity) or names of Keras layers (removed from a Sequential model,
            bypassed in a Functional one).
        variants: ``{name: model_fn}``: alternative model generators, each run as a configuration.
        label: the label column, which is never removed.
        metric, mode: what the training function returns and which direction is better.
        repeats: how often every configuration runs, each time with another seed (the seed is
            injected as ``hparams["seed"]`` and ``ctx.seed``; the same seeds for every configuration,
            so differences are paired).
        seed: the first seed; repeat ``r`` uses ``seed + r``.
        ablator: a :class:`Ablator` (default :class:`LeaveOneOut`).
        max_concurrent, max_failures, max_retries: as for :class:`unison.Search`.
        trial_timeout_s, retry_on_timeout: as for :class:`unison.Search`: a configuration's run that
            takes longer than ``trial_timeout_s`` seconds is ended and recorded ``failed`` (reason
            ``timeout``), and run again only with ``retry_on_timeout=True``.
        keep_checkpoints: as for :class:`unison.Search`: how many of a run's latest checkpoints are kept
            (besides its best one). Default 2.
        gpus_per_trial: as for :class:`unison.Search`: the GPUs each configuration's run gets (a whole
            number, or a fraction ``1/n``: ``n`` runs share a GPU). Default 0: none asked for.
    """

    gpus_per_trial: int | float = 0  # what a study pickled before the option existed has

    def __init__(
        self,
        base: Mapping[str, Any] | None = None,
        features: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        modules: Sequence[str] | None = None,
        variants: Mapping[str, Callable[..., Any]] | None = None,
        label: str | None = None,
        metric: str = "value",
        mode: str = "max",
        repeats: int = 1,
        seed: int = 0,
        ablator: Ablator | None = None,
        max_concurrent: int | None = None,
        max_failures: int | None = None,
        max_retries: int = 2,
        trial_timeout_s: float | None = None,
        retry_on_timeout: bool = False,
        keep_checkpoints: int = 2,
        gpus_per_trial: float = 0,
    ) -> None:
        from unison._validate import check_hparam_names, check_number
        from unison.contexts.search import check_gpus_per_trial, check_keep_checkpoints, check_trial_timeout

        self.trial_timeout_s = check_trial_timeout(trial_timeout_s, "Ablation")
        self.keep_checkpoints = check_keep_checkpoints(keep_checkpoints, "Ablation")
        self.gpus_per_trial = check_gpus_per_trial(gpus_per_trial, 1, "Ablation")
        if not isinstance(retry_on_timeout, bool):
            raise ValueError(f"Ablation(retry_on_timeout=...) must be True or False, "
                             f"got {retry_on_timeout!r}")
        self.retry_on_timeout = retry_on_timeout
        self.base = _fixed_base(base)
        check_hparam_names(self.base, "Ablation(base)")
        self.features = _feature_groups(features)
        self.modules = _names(modules, "modules")
        variants = dict(variants or {})
        for name, gen in variants.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"Ablation(variants=...) names must be non-empty strings, got {name!r}")
            if not callable(gen):
                raise TypeError(f"Ablation(variants={{{name!r}: ...}}) must map names to model generators")
        self.variants = variants
        if label is not None and (not isinstance(label, str) or not label):
            raise TypeError(f"Ablation(label=...) names the label column (a string), got {label!r}")
        if label is not None and any(label in cols for cols in self.features.values()):
            raise ValueError(f"the label column {label!r} cannot be ablated: remove it from features=")
        self.label = label
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must name a returned metric, got {metric!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.repeats = check_number(repeats, "repeats", owner="Ablation", integer=True)
        self.seed = check_number(seed, "seed", owner="Ablation", integer=True)
        if self.repeats < 1:  # not check_number's low=1: tests match "at least 1"
            raise ValueError(f"Ablation(repeats={repeats}) must be at least 1")
        self.ablator = ablator or LeaveOneOut()
        if not isinstance(self.ablator, Ablator):
            raise TypeError(f"Ablation(ablator=...) must be a unison.Ablator, got {self.ablator!r}")
        self.components = self.ablator.components(self.features, self.modules, list(self.variants))
        _check_components(self.components, self.ablator, label, self.variants)
        self.max_concurrent, self.max_failures, self.max_retries = max_concurrent, max_failures, max_retries

    @property
    def trials(self) -> int:
        return len(self.components) * self.repeats

    def configuration(self, trial_number: int) -> tuple[Component, int]:
        """The component and seed of trial ``trial_number`` (repeats of a seed run side by side)."""
        repeat, index = divmod(trial_number, len(self.components))
        return self.components[index], self.seed + repeat

    def to_search(self) -> Any:
        """The search that runs this study: fixed hyperparameters, one trial per configuration."""
        from unison.contexts.search import Search

        return Search(dict(self.base), metric=self.metric, mode=self.mode, trials=self.trials,
                      optimizer=_AblationPlan(self), max_concurrent=self.max_concurrent,
                      max_failures=self.max_failures, max_retries=self.max_retries,
                      trial_timeout_s=self.trial_timeout_s, retry_on_timeout=self.retry_on_timeout,
                      keep_checkpoints=self.keep_checkpoints, gpus_per_trial=self.gpus_per_trial)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "features": self.features, "modules": self.modules,
            "variants": sorted(self.variants), "label": self.label, "metric": self.metric,
            "mode": self.mode, "repeats": self.repeats, "seed": self.seed,
            "ablator": type(self.ablator).__qualname__,
            "components": [c.to_dict() for c in self.components],
            # Only when set: studies stored before the options existed resume unchanged.
            **({"trial_timeout_s": self.trial_timeout_s} if self.trial_timeout_s is not None else {}),
            **({"retry_on_timeout": True} if self.retry_on_timeout else {}),
            **({"keep_checkpoints": self.keep_checkpoints} if self.keep_checkpoints != 2 else {}),
            **({"gpus_per_trial": self.gpus_per_trial} if self.gpus_per_trial else {}),
        }

    def to_plan(self, model: Any = None, data: Any = None) -> Plan:
        """What the driver runs for this study; fails first if a component removes a feature or module
        that ``data``/``model`` do not have."""
        from unison.contexts.ablation_checks import check_reaches, check_targets
        from unison.result import AblationResult

        check_targets(self, model, data)

        def trial_spec(n: int) -> dict[str, Any]:
            component, seed = self.configuration(n)
            return {"component": component.to_dict(), "seed": seed}

        def make_result(path: Path, rows: list[dict[str, Any]], status: str) -> AblationResult:
            return AblationResult(path, self.metric, self.mode, rows, status)

        return Plan("ablation", self.to_search(), self.to_dict(), make_result, trial_spec=trial_spec,
                    variants=dict(self.variants), hparam_names=[*self.base, "seed"],
                    check_names=lambda fn, names: check_reaches(self, fn, names), context=self)

    def __repr__(self) -> str:
        return (f"Ablation({len(self.components) - 1} components x {self.repeats} repeats, "
                f"metric={self.metric!r}, mode={self.mode!r})")


@dataclass
class _AblationPlan(Optimizer):
    """Suggests the study's configurations in order: the base hyperparameters plus the seed."""

    adaptive = False
    study: Ablation
    space: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number >= self.study.trials:
            return None
        _, seed = self.study.configuration(trial_number)
        return {**self.study.base, "seed": seed}

    def size(self) -> int:
        return self.study.trials
