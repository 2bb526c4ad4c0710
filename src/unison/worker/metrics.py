"""What a trial may send the driver as metrics: numbers only, finite, within the protocol's bounds.

One place for the rules, so a single run, a search trial and a reporter reject the same things with
the same messages.
"""

from __future__ import annotations

import json
import math
import numbers
import reprlib
from typing import Any

from unison import protocol

MAX_METRICS = protocol.MAX_METRICS
"""The most metrics a trial may return, or report in one ``reporter.report`` call (the protocol's bound
for one message: here the trial fails with a message that says what to do instead)."""
MAX_METRICS_BYTES = 1024 * 1024
"""The most bytes (as JSON) the metrics a trial returns, or reports in one call, may take."""
MAX_ERROR_CHARS = 64 * 1024  # a failed trial's error (traceback) keeps its first and last part


def short(value: Any) -> str:
    """A bounded ``repr`` for messages (a huge list must not become a huge error)."""
    return reprlib.repr(value)


def oversize(what: str, metrics: dict[Any, Any], measure: bool = False) -> str | None:
    """Why ``metrics`` (returned, or reported in one call) are over the caps, or ``None``: their count,
    and with ``measure`` (numbers by then) their size as JSON."""
    size = None
    if len(metrics) <= MAX_METRICS:
        if not measure:
            return None
        size = len(json.dumps(metrics))
        if size <= MAX_METRICS_BYTES:
            return None
    found = f"{len(metrics)} metrics" if size is None else f"{size} bytes of metrics"
    return (f"{what} {found}: at most {MAX_METRICS} metrics and {MAX_METRICS_BYTES // 1024 // 1024} MiB "
            f"may be sent to the driver at once. Return or report a few summary numbers, and write big "
            f"things (predictions, arrays, per-example scores) to files in ctx.trial_dir, which the "
            f"experiment keeps")


def to_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (or a 0-d array/tensor), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        try:
            inner = item()
        except Exception:  # noqa: BLE001 - anything that is not a scalar is simply not a number
            return None
        return None if isinstance(inner, bool) else to_number(inner)
    return None


def normalize_metrics(returned: Any, metric: str | list[str]) -> tuple[dict[str, float] | None, str | None]:
    """Turn what the function returned into ``{name: float}``; on a problem, ``(None, message)``.

    A bare number is the optimized metric; a multi-objective search (``metric`` a list of names)
    needs a dict.
    """
    names = [metric] if isinstance(metric, str) else list(metric)
    if isinstance(returned, dict):
        problem = oversize("the function returned", returned)
        if problem is not None:
            return None, problem
    number = to_number(returned)
    if number is not None and len(names) == 1:
        metrics = {names[0]: number}
    elif isinstance(returned, dict):
        metrics = {}
        for name, value in returned.items():
            number = to_number(value)
            if number is None:
                return None, (
                    f"metric {short(name)} is {short(value)} ({type(value).__name__}); the function "
                    f"must return a number or a dict of numbers"
                )
            metrics[str(name)] = number
    else:
        return None, (
            f"the function returned {short(returned)} ({type(returned).__name__}); return "
            + (f"a number (the metric {names[0]!r}) or " if len(names) == 1 else "")
            + f"a dict of numbers that includes {', '.join(map(repr, names))}"
        )
    for name, value in metrics.items():
        if not math.isfinite(value):
            return None, f"metric {name!r} is {value} (not finite): the trial diverged or divided by zero"
    problem = oversize("the function returned", metrics, measure=True)
    if problem is not None:
        return None, problem
    return metrics, None


