"""Search-space distributions: ``uniform``, ``loguniform``, ``integer``, ``choice`` and constants.

A space is a plain dict mapping hyperparameter names to a :class:`Distribution` or to a constant.
Constructors validate their arguments, so a bad range fails where it is written.
"""

from __future__ import annotations

import json
import keyword
import math
from collections.abc import Mapping, Sequence
from typing import Any

from unison._validate import check_number

__all__ = [
    "Distribution",
    "Uniform",
    "LogUniform",
    "Integer",
    "Choice",
    "Conditional",
    "is_active",
    "dependency_order",
    "uniform",
    "loguniform",
    "integer",
    "choice",
    "validate_space",
    "space_to_dict",
    "space_from_dict",
]


MAX_GRID_INTEGERS = 1000


class Distribution:
    """A range of values one hyperparameter can take."""

    kind: str = ""

    def sample(self, rng: Any) -> Any:
        """Draw one value with ``rng``'s ``uniform(low, high)`` or ``integers(low, high)``: a
        ``numpy.random.Generator`` or random search's numpy-free
        :class:`~unison.optimizers.seeded_rng.SeededRng`, which draws the same values."""
        raise NotImplementedError

    def grid_values(self, name: str) -> list[Any]:
        """The values grid search enumerates; continuous ranges cannot be enumerated."""
        raise ValueError(
            f"grid search cannot enumerate {self!r} for {name!r}: use choice([...]) with the values "
            f"to try, or optimizer='random' (or another sampling optimizer) for a continuous range"
        )

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def when(self, **conditions: Any) -> Conditional:
        """This hyperparameter exists only when every named parameter has one of the given values.

        ``uniform(0.5, 0.99).when(optimizer="sgd")`` or ``.when(optimizer=["sgd", "rmsprop"])``.
        """
        return Conditional(self, conditions)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Distribution) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


class Uniform(Distribution):
    """A float drawn uniformly from ``[low, high)``."""

    kind = "uniform"

    def __init__(self, low: float, high: float) -> None:
        self.low = check_number(low, "low", owner="uniform")
        self.high = check_number(high, "high", owner="uniform")
        if not self.low < self.high:
            raise ValueError(
                f"uniform({low!r}, {high!r}) is an empty or inverted range: low must be less than high"
            )

    def sample(self, rng: Any) -> float:
        return float(rng.uniform(self.low, self.high))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high}

    def __repr__(self) -> str:
        return f"uniform({self.low!r}, {self.high!r})"


class LogUniform(Distribution):
    """A float whose logarithm is uniform on ``[log(low), log(high))``; both bounds positive."""

    kind = "loguniform"

    def __init__(self, low: float, high: float) -> None:
        self.low = check_number(low, "low", owner="loguniform")
        self.high = check_number(high, "high", owner="loguniform")
        if self.low <= 0 or self.high <= 0:
            raise ValueError(
                f"loguniform({low!r}, {high!r}) needs positive bounds (its logarithm is sampled): "
                f"use e.g. loguniform(1e-5, {high if self.high > 0 else 1.0!r}), or uniform() for a range "
                f"that includes zero or negative values"
            )
        if not self.low < self.high:
            raise ValueError(
                f"loguniform({low!r}, {high!r}) is an empty or inverted range: low must be less than high"
            )

    def sample(self, rng: Any) -> float:
        value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return float(min(max(value, self.low), self.high))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high}

    def __repr__(self) -> str:
        return f"loguniform({self.low!r}, {self.high!r})"


class Integer(Distribution):
    """An integer from ``low`` to ``high`` inclusive, uniform or (``log=True``) log-uniform."""

    kind = "integer"

    def __init__(self, low: int, high: int, log: bool = False) -> None:
        self.low = check_number(low, "low", owner="integer", integer=True)
        self.high = check_number(high, "high", owner="integer", integer=True)
        self.log = bool(log)
        if self.low > self.high:
            raise ValueError(
                f"integer({low!r}, {high!r}) is an inverted range: low must be at most high (both inclusive)"
            )
        if self.log and self.low <= 0:
            raise ValueError(
                f"integer({low!r}, {high!r}, log=True) needs low >= 1 (its logarithm is sampled)"
            )

    def sample(self, rng: Any) -> int:
        if self.log:
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1)))
            return int(min(max(math.floor(x), self.low), self.high))
        return int(rng.integers(self.low, self.high + 1))

    def grid_values(self, name: str) -> list[Any]:
        count = self.high - self.low + 1
        if count > MAX_GRID_INTEGERS:
            raise ValueError(
                f"grid search cannot enumerate the {count} values of {self!r} for {name!r} (more than "
                f"{MAX_GRID_INTEGERS}): use choice([...]) with the values to try, or a sampling optimizer"
            )
        return list(range(self.low, self.high + 1))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log}

    def __repr__(self) -> str:
        return f"integer({self.low!r}, {self.high!r}{', log=True' if self.log else ''})"


class Choice(Distribution):
    """One of a list of values (strings, numbers, booleans, None or JSON-able lists/dicts)."""

    kind = "choice"

    def __init__(self, values: Sequence[Any]) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"choice() takes a list of values, got {values!r}")
        values = list(values)
        if not values:
            raise ValueError("choice([]) is empty: give at least one value")
        for v in values:
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError):
                raise TypeError(
                    f"choice() value {v!r} is not JSON-serializable; hyperparameters are journaled and "
                    f"sent to workers as JSON. Use a name (e.g. 'relu') and map it to the object inside "
                    f"the training function or model_fn"
                ) from None
        self.values = values

    def sample(self, rng: Any) -> Any:
        return self.values[int(rng.integers(len(self.values)))]

    def grid_values(self, name: str) -> list[Any]:
        return list(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": self.values}

    def __repr__(self) -> str:
        return f"choice({self.values!r})"


class Conditional(Distribution):
    """A distribution that applies only when other hyperparameters take given values."""

    kind = "conditional"
    dist: Distribution

    def __init__(self, dist: Distribution, conditions: Mapping[str, Any]) -> None:
        if isinstance(dist, Conditional):
            conditions = {**dist.conditions, **conditions}
            dist = dist.dist
        if not conditions:
            raise ValueError("when() needs at least one condition, e.g. .when(optimizer='sgd')")
        self.dist = dist
        self.conditions: dict[str, list[Any]] = {
            name: list(v) if isinstance(v, (list, tuple)) else [v] for name, v in conditions.items()
        }

    def sample(self, rng: Any) -> Any:
        return self.dist.sample(rng)

    def grid_values(self, name: str) -> list[Any]:
        return self.dist.grid_values(name)

    def to_dict(self) -> dict[str, Any]:
        return {**self.dist.to_dict(), "when": self.conditions}

    def __repr__(self) -> str:
        conds = ", ".join(f"{k}={v[0] if len(v) == 1 else v!r}" for k, v in self.conditions.items())
        return f"{self.dist!r}.when({conds})"


def is_active(dist: Any, hparams: Mapping[str, Any]) -> bool:
    """Whether a (possibly conditional) hyperparameter applies, given its parents' values."""
    if not isinstance(dist, Conditional):
        return True
    return all(name in hparams and hparams[name] in allowed for name, allowed in dist.conditions.items())


def dependency_order(space: Mapping[str, Any]) -> list[str]:
    """Names ordered so that every conditional parameter comes after the parameters it depends on."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"conditional hyperparameters form a cycle through {name!r}")
        visiting.add(name)
        dist = space[name]
        if isinstance(dist, Conditional):
            for parent in dist.conditions:
                visit(parent)
        visiting.discard(name)
        order.append(name)

    for name in space:
        visit(name)
    return order


def uniform(low: float, high: float) -> Uniform:
    """A float drawn uniformly from ``[low, high)``."""
    return Uniform(low, high)


def loguniform(low: float, high: float) -> LogUniform:
    """A positive float drawn uniformly on a log scale (learning rates, regularisation)."""
    return LogUniform(low, high)


def integer(low: int, high: int, log: bool = False) -> Integer:
    """An integer from ``low`` to ``high``, both inclusive; ``log=True`` samples on a log scale."""
    return Integer(low, high, log)


def choice(values: Sequence[Any]) -> Choice:
    """One of ``values``."""
    return Choice(values)


_KINDS = {cls.kind: cls for cls in (Uniform, LogUniform, Integer, Choice)}


def validate_space(space: Any) -> dict[str, Any]:
    """Check a space is a dict of names to distributions or JSON-able constants; return a copy."""
    if not isinstance(space, Mapping):
        raise TypeError(
            f"a search space is a dict of name -> distribution or constant, got {type(space).__name__}"
        )
    checked: dict[str, Any] = {}
    for name, value in space.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(
                f"hyperparameter name {name!r} must be a string that is a valid Python identifier, so "
                f"the training function can ask for it by name"
            )
        if not isinstance(value, Distribution):
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError):
                raise TypeError(
                    f"constant hyperparameter {name!r} = {value!r} is not JSON-serializable; use a "
                    f"string, number, boolean or a list/dict of those"
                ) from None
        checked[name] = value
    for name, value in checked.items():
        if not isinstance(value, Conditional):
            continue
        for parent, allowed in value.conditions.items():
            if parent not in checked:
                raise ValueError(
                    f"{name!r} depends on {parent!r}, which is not in the space; add {parent!r} or fix "
                    f"the condition"
                )
            parent_dist = checked[parent]
            options = (parent_dist.dist if isinstance(parent_dist, Conditional) else parent_dist)
            if isinstance(options, Choice):
                unknown = [v for v in allowed if v not in options.values]
                if unknown:
                    raise ValueError(
                        f"{name!r} applies when {parent!r} is {unknown}, but {parent!r} can only be "
                        f"one of {options.values}"
                    )
    dependency_order(checked)
    return checked


def space_to_dict(space: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a space, as stored in ``experiment.json``."""
    return {
        name: value.to_dict() if isinstance(value, Distribution) else {"kind": "constant", "value": value}
        for name, value in space.items()
    }


def space_from_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild a space stored by :func:`space_to_dict`."""
    space: dict[str, Any] = {}
    for name, spec in data.items():
        spec = dict(spec)
        kind = spec.pop("kind")
        conditions = spec.pop("when", None)
        if kind == "constant":
            space[name] = spec["value"]
            continue
        dist = Choice(spec["values"]) if kind == "choice" else _KINDS[kind](**spec)
        space[name] = dist.when(**conditions) if conditions else dist
    return space
