"""The median stopping rule (Golovin et al., Google Vizier, 2017)."""

from __future__ import annotations

import statistics
from collections import defaultdict

from unison._validate import check_number
from unison.schedulers.base import CONTINUE, Decision, Scheduler, Stop


class MedianStopping(Scheduler):
    """Stop a trial whose best value so far is worse than the median of the other trials' running
    averages at the same step.

    A decision is made only from step ``grace_period`` on, and only once ``min_trials`` trials have
    finished (completed or stopped); until then every trial continues.
    """

    def __init__(self, grace_period: int = 1, min_trials: int = 3) -> None:
        owner = "MedianStopping"
        self.grace_period = check_number(grace_period, "grace_period", owner=owner, integer=True, low=0)
        self.min_trials = check_number(min_trials, "min_trials", owner=owner, integer=True, low=1)
        self._history: dict[int, list[tuple[int, float]]] = defaultdict(list)
        self._finished: list[int] = []

    def params(self) -> dict[str, int]:
        """The constructor arguments that rebuild this scheduler (JSON-friendly)."""
        return {"grace_period": self.grace_period, "min_trials": self.min_trials}

    def setup(self, mode: str) -> None:
        """Start a new search: forget the trials of any earlier run of the same ``Search``."""
        super().setup(mode)
        self._history = defaultdict(list)
        self._finished = []

    def on_report(self, trial_id: int, step: int, value: float) -> Decision:
        """Stop the trial if its best value so far is worse than the median of the finished trials."""
        self._history[trial_id].append((step, value))
        if step < self.grace_period or len(self._finished) < self.min_trials:
            return CONTINUE
        averages = []
        for other in self._finished:
            upto = [v for s, v in self._history[other] if s <= step]
            if upto:
                averages.append(sum(upto) / len(upto))
        if len(averages) < self.min_trials:
            return CONTINUE
        values = [v for _, v in self._history[trial_id]]
        best = max(values) if self.mode == "max" else min(values)
        median = statistics.median(averages)
        if self.better(median, best):
            return Stop(
                f"median rule at step {step}: best so far {best:.6g} is worse than the median "
                f"{median:.6g} of {len(averages)} finished trials"
            )
        return CONTINUE

    def on_complete(self, trial_id: int, status: str) -> None:
        if status == "retried":
            self._history.pop(trial_id, None)
        elif status in ("completed", "stopped") and self._history.get(trial_id):
            self._finished.append(trial_id)
