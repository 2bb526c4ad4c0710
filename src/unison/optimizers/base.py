"""The optimizer interface: propose hyperparameters, learn from results."""

from __future__ import annotations

from typing import Any


class Optimizer:
    """Proposes hyperparameters for trials and learns from their results.

    The driver calls :meth:`suggest` once per new trial (trial numbers count up from 0) and
    :meth:`observe` when a trial ends. ``suggest`` may be called again before earlier trials were
    observed: that is how asynchronous search keeps every worker busy. Return ``None`` from
    ``suggest`` when there is nothing left to propose (a finished grid).

    Set ``adaptive = False`` on an optimizer whose suggestions do not depend on observed results
    (random, grid, quasi-random): the remote backends then hand each worker its next trial while
    the current one runs, which hides the round trip between trials. A trial handed out that way
    is journaled when it starts; a resumed search calls ``suggest`` again for the numbers that were
    handed out but never started.
    """

    adaptive: bool = True

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        """Called once before the first suggestion with the search's space, mode and seed."""
        self.space, self.mode, self.seed = space, mode, seed

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        """Hyperparameters for trial ``trial_number``, or ``None`` when exhausted."""
        raise NotImplementedError

    def observe(self, trial_number: int, hparams: dict[str, Any], value: float | list[float] | None,
                status: str) -> None:
        """A trial ended: ``status`` is ``completed``, ``stopped`` or ``failed`` (``value`` None)."""

    def close(self) -> None:
        """The driver is done with the optimizer (the experiment ended, failed or was interrupted):
        release what it holds, such as a process of its own. Called once by the driver; by default,
        nothing. An exception raised here (the one a last :meth:`observe` left, say) ends the
        experiment as one raised by ``observe`` would."""

    def size(self) -> int | None:
        """How many distinct suggestions exist (a grid's size), or ``None`` when unbounded."""
        return None
