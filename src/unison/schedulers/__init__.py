"""Schedulers: early stopping. ``make_scheduler`` turns a name into an instance."""

from __future__ import annotations

from typing import Any

from unison.schedulers.base import Scheduler, Stop
from unison.schedulers.median import MedianStopping

BUILTIN_SCHEDULERS = {"median": MedianStopping}

__all__ = ["Scheduler", "Stop", "MedianStopping", "BUILTIN_SCHEDULERS", "make_scheduler"]


def make_scheduler(spec: Any) -> Scheduler | None:
    """A scheduler from ``None``, a name in ``BUILTIN_SCHEDULERS`` or a :class:`Scheduler` instance."""
    if spec is None or isinstance(spec, Scheduler):
        return spec
    if isinstance(spec, str) and spec in BUILTIN_SCHEDULERS:
        return BUILTIN_SCHEDULERS[spec]()
    raise ValueError(
        f"unknown scheduler {spec!r}: use None, one of {sorted(BUILTIN_SCHEDULERS)} or an instance of "
        f"unison.Scheduler"
    )
