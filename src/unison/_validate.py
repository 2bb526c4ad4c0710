"""Checks of what a user passed, each with one message format.

Numbers: :func:`check_number` (``"Search(trials=...) must be a whole number >= 1, got 0"``). Names:
:func:`lookup` and :func:`unknown_name_error` (``"unknown optimizer 'tpee': did you mean 'tpe'? ..."``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# The argument names a training function can ask unison for, instead of a hyperparameter.
INJECTABLE = ("hparams", "reporter", "ctx", "model", "dataset", "model_fn", "data_fn", "callbacks")


class InvalidNumberError(ValueError, TypeError):
    """A number argument of the wrong type or out of range: a ``ValueError`` and a ``TypeError``, as
    callers raised one or the other before both went through :func:`check_number`."""


def is_number(value: object, *, integer: bool = False, finite: bool = False) -> bool:
    """Whether ``value`` is a real number (an integral one if ``integer``; a finite one if ``finite``).

    ``True`` and ``False`` are never numbers here, though Python counts them as ints.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return False
    return not finite or integer or math.isfinite(value)


def _describe(integer: bool, low: float | None, high: float | None, low_inclusive: bool,
              high_inclusive: bool, unit: str) -> str:
    """What a number must be, e.g. ``"a whole number >= 1"``, ``"a non-negative int"``, ``"a number"``."""
    unit = f" of {unit}" if unit else ""
    if low is None and high is None:
        return f"an int{unit}" if integer else f"a number{unit}"
    if low == 0 and low_inclusive and high is None:
        return f"a non-negative {'int' if integer else 'number'}{unit}"
    noun = f"a whole number{unit}" if integer else f"a number{unit}"
    above = f"{'>=' if low_inclusive else '>'} {low}"
    below = f"{'<=' if high_inclusive else '<'} {high}"
    if low is None:
        return f"{noun} {below}"
    if high is None:
        return f"{noun} {above}"
    if low_inclusive and high_inclusive:
        return f"{noun} between {low} and {high}"
    return f"{noun} {above} and {below}"


def check_number(
    value: Any,
    name: str,
    *,
    owner: str,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_none: bool = False,
    finite: bool = True,
    unit: str = "",
) -> Any:
    """``value`` as an ``int`` (``integer=True``) or a ``float``, or :class:`InvalidNumberError`.

    The message has one format, ``"{owner}({name}=...) must be {what}, got {value!r}"`` (just
    ``"{name} must be ..."`` when ``owner`` is ``""``), ``what`` describing every condition, e.g.
    ``"Search(trials=...) must be a whole number >= 1, got 0"``; an unbounded number that is not
    finite gets ``"must be finite"``. Booleans are never numbers.

    Args:
        value: what the user passed.
        name: the parameter's name (``"trials"``).
        owner: what it was passed to (``"Search"``), shown as ``Search(trials=...)``.
        integer: an integral number is needed (returned as ``int``); else any real one (a ``float``).
        low, high: the bounds, each ``None`` for none.
        low_inclusive, high_inclusive: whether a bound itself is allowed.
        allow_none: ``None`` is accepted (and returned); the message does not say so, None being
            the default wherever it is allowed.
        finite: ``inf`` and ``nan`` are refused.
        unit: what the number counts, e.g. ``"seconds"``: ``"a number of seconds > 0"``.
    """
    if value is None and allow_none:
        return None
    what = _describe(integer, low, high, low_inclusive, high_inclusive, unit)
    ok = is_number(value, integer=integer)
    if ok and finite and not is_number(value, integer=integer, finite=True):
        ok = False
        what = "finite" if low is None and high is None else what
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if ok:
        return int(value) if integer else float(value)
    where = f"{owner}({name}=...)" if owner else name
    raise InvalidNumberError(f"{where} must be {what}, got {value!r}")


def lookup(kind: str, spec: object, registry: Mapping[str, T], alternative: str = "") -> T:
    """``registry[spec]`` for a registered name, else :func:`unknown_name_error`'s ``ValueError``.

    Args:
        kind: what is named (``"optimizer"``), for the message.
        spec: what the user passed.
        registry: the names that exist, each with its value (a class, for the ``make_*`` functions).
        alternative: what else is accepted, e.g. ``"an instance of unison.Optimizer"``.
    """
    if isinstance(spec, str) and spec in registry:
        return registry[spec]
    raise unknown_name_error(kind, spec, registry, alternative)


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" did you mean 'tpe'?"`` for the choice closest to ``name``, or ``""`` if none is close.

    The comparison ignores case; a string that is not close to any choice gets no suggestion.
    """
    import difflib

    if not isinstance(name, str) or not name:
        return ""
    options = [c for c in choices if isinstance(c, str)]
    lowered = {c.lower(): c for c in options}
    matches = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    if not matches or lowered[matches[0]] == name:
        return ""
    return f" did you mean {lowered[matches[0]]!r}?"


def unknown_name_error(kind: str, name: object, choices: Iterable[str], alternative: str = "") -> ValueError:
    """``ValueError("unknown optimizer 'tpee': did you mean 'tpe'? Use one of [...] or ...")``.

    Args:
        kind: what was named (``"optimizer"``, ``"scheduler"``, ``"backend"``).
        name: what the user passed.
        choices: the names that exist.
        alternative: what else is accepted, e.g. ``"an instance of unison.Optimizer"``.
    """
    names = sorted(choices)
    hint = did_you_mean(name, names)
    use = f"one of {names}" + (f" or {alternative}" if alternative else "")
    if hint:
        return ValueError(f"unknown {kind} {name!r}:{hint} Use {use}")
    return ValueError(f"unknown {kind} {name!r}: use {use}")


def check_hparam_names(names: Iterable[str], where: str) -> None:
    """Raise if a hyperparameter is named like something unison injects (``reporter``, ``ctx``, ...):
    the function could not receive both, so the name must change before anything runs."""
    clashes = [n for n in names if n in INJECTABLE]
    if clashes:
        raise ValueError(
            f"{where}: hyperparameter name(s) {clashes} clash with unison's injectable names "
            f"({', '.join(INJECTABLE)}): a training function asking for {clashes[0]!r} gets unison's "
            f"{clashes[0]}, not the hyperparameter. Rename the hyperparameter (e.g. {clashes[0]!r} -> "
            f"{clashes[0] + '_name'!r})"
        )


def missing_metric_message(what: str, reported: Iterable[str], missing: list[str], fix: str) -> str:
    """Why a trial fails when the metric the search optimizes is not among those it gave.

    ``what`` says where the metrics came from (``"the function returned the metrics"``), ``fix`` what
    to do with the missing name (``"return it too"``). A reported name close to the first missing
    one is offered as "did you mean".
    """
    names = sorted(reported)
    hint = did_you_mean(missing[0], names)
    return (f"{what} {names} but the search optimizes {', '.join(map(repr, missing))}:"
            f"{hint or ' not among them.'} Either {fix}, or set metric= to one of {names}")
