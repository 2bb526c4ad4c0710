"""``Ablation``: what does each part of the model and the data contribute?

A study is a baseline plus one trial per removed component (a feature or feature group, a model
module, or a named model variant), each repeated ``repeats`` times with different seeds, run in
parallel by the same driver and backends as a search.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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

    The first configuration returned must be the baseline (nothing removed). Subclass this for
    other designs, e.g. leave-two-out or keep-only-one.
    """

    def components(self, features: dict[str, list[str]], modules: list[str],
                   variants: list[str]) -> list[Component]:
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


class Ablation:
    """A leave-one-component-out study around the hyperparameters ``base``.

    Args:
        base: the hyperparameters every configuration uses (e.g. ``search_result.best.hparams``).
        features: feature (column) names to remove one at a time, or ``{"group": [columns]}`` to
            remove groups of columns together.
        modules: dotted paths of model submodules (PyTorch) to replace by an identity, one at a time.
        variants: ``{name: model_fn}``: alternative model generators, each run as a configuration.
        label: the label column, which is never removed.
        metric, mode: what the training function returns and which direction is better.
        repeats: how often every configuration runs, each time with another seed (the seed is
            injected as ``hparams["seed"]`` and ``ctx.seed``; the same seeds for every configuration,
            so differences are paired).
        seed: the first seed; repeat ``r`` uses ``seed + r``.
        ablator: a :class:`Ablator` (default :class:`LeaveOneOut`).
        max_concurrent, max_failures, max_retries: as for :class:`unison.Search`.
    """

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
    ) -> None:
        from unison.space import validate_space

        self.base = validate_space(dict(base or {}))
        if "seed" in self.base:
            raise ValueError("Ablation(base=...) must not contain 'seed': the study injects one per repeat")
        if isinstance(features, Mapping):
            self.features = {str(k): _names(v, f"features[{k!r}]") for k, v in features.items()}
        else:
            self.features = {name: [name] for name in _names(features, "features")}
        self.modules = _names(modules, "modules")
        variants = dict(variants or {})
        for name, gen in variants.items():
            if not callable(gen):
                raise TypeError(f"Ablation(variants={{{name!r}: ...}}) must map names to model generators")
        self.variants = variants
        if label is not None and any(label in cols for cols in self.features.values()):
            raise ValueError(f"the label column {label!r} cannot be ablated: remove it from features=")
        self.label = label
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must name a returned metric, got {metric!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        for what, value in (("repeats", repeats), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Ablation({what}=...) must be an int, got {value!r}")
        if repeats < 1:
            raise ValueError(f"Ablation(repeats={repeats}) must be at least 1")
        self.repeats, self.seed = int(repeats), int(seed)
        self.ablator = ablator or LeaveOneOut()
        self.components = self.ablator.components(self.features, self.modules, list(self.variants))
        if not self.components or self.components[0].kind != "baseline":
            raise ValueError(f"{type(self.ablator).__name__}.components() must start with the baseline")
        if len(self.components) < 2:
            raise ValueError(
                "an ablation needs at least one component: pass features=, modules= or variants="
            )
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
                      max_failures=self.max_failures, max_retries=self.max_retries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "features": self.features, "modules": self.modules,
            "variants": sorted(self.variants), "label": self.label, "metric": self.metric,
            "mode": self.mode, "repeats": self.repeats, "seed": self.seed,
            "ablator": type(self.ablator).__qualname__,
            "components": [c.to_dict() for c in self.components],
        }

    def __repr__(self) -> str:
        return (f"Ablation({len(self.components) - 1} components x {self.repeats} repeats, "
                f"metric={self.metric!r}, mode={self.mode!r})")


@dataclass
class _AblationPlan(Optimizer):
    """Suggests the study's configurations in order: the base hyperparameters plus the seed."""

    study: Ablation
    space: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number >= self.study.trials:
            return None
        _, seed = self.study.configuration(trial_number)
        return {**self.study.base, "seed": seed}

    def size(self) -> int:
        return self.study.trials
