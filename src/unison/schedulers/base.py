"""The scheduler interface: decide, at each report, whether a trial goes on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stop:
    """A decision to stop a trial, with the reason shown in the trial table. It is falsy."""

    reason: str

    def __bool__(self) -> bool:
        return False


class Scheduler:
    """Early-stopping rule. The driver calls :meth:`on_report` for every intermediate report of the
    optimized metric and stops the trial when it returns ``False``; :meth:`on_complete` when a trial
    ends. ``mode`` is ``"max"`` or ``"min"``.
    """

    def setup(self, mode: str) -> None:
        """Called once before the first report."""
        self.mode = mode

    def on_report(self, trial_id: int, step: int, value: float) -> bool | Stop:
        """Return ``True`` to let the trial continue; ``False`` or ``Stop(reason)`` to stop it now."""
        return True

    def on_complete(self, trial_id: int, status: str) -> None:
        """The trial ended with ``status`` (``completed``, ``stopped``, ``failed``), or ``retried``:
        its worker died and it will run again from the start, so forget its reports."""

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` in this search's mode."""
        return a > b if self.mode == "max" else a < b
