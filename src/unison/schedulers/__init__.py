"""Schedulers: early stopping. ``make_scheduler`` turns a name into an instance."""

from __future__ import annotations

import inspect
from typing import Any

from unison._validate import lookup
from unison.schedulers.asha import ASHA
from unison.schedulers.base import CONTINUE, Continue, Decision, Exploit, Pause, Scheduler, Stop, decision_of
from unison.schedulers.hyperband import Hyperband
from unison.schedulers.median import MedianStopping
from unison.schedulers.pbt import PBT

# By name, each is built with its defaults: ``"asha"`` is ``ASHA()`` (min_resource=1, reduction_factor=3,
# no max_resource); ``"hyperband"`` needs its resources, so the name alone is refused with a hint.
BUILTIN_SCHEDULERS = {"median": MedianStopping, "asha": ASHA, "hyperband": Hyperband}

__all__ = ["Scheduler", "Stop", "Exploit", "Pause", "PBT", "Continue", "CONTINUE", "Decision", "decision_of",
           "MedianStopping", "ASHA", "Hyperband", "BUILTIN_SCHEDULERS", "make_scheduler"]


def make_scheduler(spec: Any) -> Scheduler | None:
    """A scheduler from ``None``, a name in ``BUILTIN_SCHEDULERS`` or a :class:`Scheduler` instance."""
    if spec is None or isinstance(spec, Scheduler):
        return spec
    cls = lookup("scheduler", spec, BUILTIN_SCHEDULERS, "an instance of unison.Scheduler (or None)")
    required = [p.name for p in inspect.signature(cls).parameters.values()
                 if p.default is inspect.Parameter.empty
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ValueError(
            f"scheduler={spec!r} cannot be built by name: {cls.__name__} needs {', '.join(required)}. "
            f"Pass an instance, e.g. unison.{cls.__name__}("
            f"{', '.join(f'{name}=...' for name in required)})"
        )
    return cls()
