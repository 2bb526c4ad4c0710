"""Messages for names a user got wrong: one format, with a "did you mean" where a close name exists."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" did you mean 'tpe'?"`` for the choice closest to ``name``, or ``""`` if none is close.

    The comparison ignores case; a string that is not close to any choice gets no suggestion.
    """
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
    from unison.worker.injection import INJECTABLE

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
