"""The scheduler interface: decide, at each report, whether a trial goes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias


@dataclass(frozen=True)
class Continue:
    """A decision to let a trial go on; use the constant :data:`CONTINUE`."""


CONTINUE = Continue()


@dataclass(frozen=True)
class Stop:
    """A decision to stop a trial, with the reason shown in the trial table."""

    reason: str


@dataclass(frozen=True)
class Exploit(Stop):
    """A decision to stop a trial and put a clone of trial ``source`` in its place: a new trial with
    ``hparams`` that starts from ``source``'s latest checkpoint (population-based training)."""

    source: int
    hparams: dict[str, Any]


@dataclass(frozen=True)
class Pause(Stop):
    """A decision to stop a trial for now and run it again later from its latest checkpoint, so that
    waiting trials get a turn (population-based training with fewer slots than members)."""


Decision: TypeAlias = Continue | Stop


def decision_of(returned: object, scheduler_name: str) -> Decision:
    """The :data:`Decision` that ``on_report`` of the scheduler class ``scheduler_name`` returned.

    ``Continue`` and ``Stop`` pass through; the older ``True`` / ``False`` (also NumPy's booleans, as
    a comparison of NumPy numbers gives) still work and become ``CONTINUE`` /
    ``Stop("stopped by <scheduler_name>")``. Anything else is a ``TypeError``.
    """
    if isinstance(returned, (Continue, Stop)):
        return returned
    kind = type(returned)
    if kind is bool or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")):
        return CONTINUE if returned else Stop(f"stopped by {scheduler_name}")
    hint = " (does it miss a return statement?)" if returned is None else ""
    raise TypeError(
        f"{scheduler_name}.on_report returned {returned!r} ({kind.__name__}){hint}; it must return "
        f"unison.CONTINUE to let the trial go on or unison.Stop(reason) to stop it (True / False are "
        f"accepted too)"
    )


class Scheduler:
    """Early-stopping rule. The driver calls :meth:`on_report` for every intermediate report of the
    optimized metric, and :meth:`on_complete` when a trial ends. ``mode`` is ``"max"`` or ``"min"``.

    :meth:`on_report` returns a decision: ``unison.CONTINUE`` (the one :class:`Continue`) lets the trial
    go on, ``unison.Stop(reason)`` stops it now, with ``reason`` shown in the trial table. For
    compatibility, ``True`` is taken as ``CONTINUE`` and ``False`` as a ``Stop`` naming the scheduler.
    """

    def setup(self, mode: str) -> None:
        """Called once before the first report."""
        self.mode = mode

    def on_start(self, trial_id: int, hparams: dict[str, Any], cloned_step: int | None = None) -> None:
        """Trial ``trial_id`` starts (again, after a retry) with ``hparams``; a clone made by an
        :class:`Exploit` decision starts from its parent's checkpoint of step ``cloned_step``."""

    def on_report(self, trial_id: int, step: int, value: float) -> Decision:
        """Return ``CONTINUE`` to let the trial go on, or ``Stop(reason)`` to stop it now."""
        return CONTINUE

    def on_complete(self, trial_id: int, status: str) -> None:
        """The trial ended with ``status`` (``completed``, ``stopped``, ``failed``), or ``retried``:
        its worker died and it will run again from the start, so forget its reports."""

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` in this search's mode."""
        return a > b if self.mode == "max" else a < b
