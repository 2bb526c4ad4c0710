"""Asynchronous successive halving, ASHA (Li et al., "A System for Massively Parallel Hyperparameter
Tuning", MLSys 2020, arXiv:1810.05934), in its early-stopping form."""

from __future__ import annotations

import math
from typing import Any

from unison._validate import check_number
from unison.schedulers.base import CONTINUE, Decision, Scheduler, Stop


def check_resources(owner: str, min_resource: Any, max_resource: Any, reduction_factor: Any,
                    max_required: bool) -> tuple[int, int | None, int]:
    """Validate the three numbers ASHA and Hyperband share; return them as ints."""
    min_resource = check_number(min_resource, "min_resource", owner=owner, integer=True, low=1)
    reduction_factor = check_number(reduction_factor, "reduction_factor", owner=owner, integer=True, low=2)
    if max_resource is None:
        if max_required:
            raise ValueError(f"{owner}(max_resource=...) is required: the most steps a trial runs")
        return min_resource, None, reduction_factor
    max_resource = check_number(max_resource, "max_resource", owner=owner, integer=True, low=1)
    if max_resource <= min_resource:
        raise ValueError(
            f"{owner}(max_resource={max_resource}) must be greater than min_resource={min_resource}: "
            f"with no resource level between them there is nothing to stop a trial at"
        )
    return min_resource, max_resource, reduction_factor


class ASHA(Scheduler):
    """Asynchronous successive halving: at each rung, only the top ``1/reduction_factor`` of trials go on.

    **Resource.** A trial's resource at a report is ``step + 1``: the report with ``step=0`` ends the
    first unit (the first epoch), ``step=k`` ends unit ``k + 1``. Report once per epoch with
    ``step=epoch`` (or leave ``step`` out: the reporter counts 0, 1, 2, ...).

    **Rungs.** The milestones are ``min_resource * reduction_factor**k`` for ``k = 0, 1, ...``, strictly
    below ``max_resource`` (``ASHA(1, 27, 3)``: resources 1, 3, 9, i.e. steps 0, 2, 8). A trial that
    reaches ``max_resource`` has had its whole budget and is never stopped there. With
    ``max_resource=None`` the rungs go on without bound (1, 3, 9, 27, ...) as far as trials report;
    by the rule for first arrivals below, a trial that runs further than all the others is never
    stopped beyond the last rung the others reached. Without a bound, the last epoch itself can be a
    rung (27 epochs with the defaults: the last report, step 26, is resource 27), and a trial stopped
    there is recorded as ``stopped`` rather than ``completed``: give ``max_resource=epochs`` to avoid
    that.

    **Decision.** The first report at or past a milestone (a trial that skips a step still meets the
    rung) records the trial's value there, and the trial is judged against every value recorded at that
    rung so far, its own included (asynchronous: whoever has arrived, not a full cohort). With ``n``
    values recorded, the trial goes on if its value is among the best ``floor(n / reduction_factor)``
    of them (a tie with the cutoff goes on), else it is stopped with a :class:`Stop` that names the
    rung, its value and the cutoff.

    **First arrivals.** The first ``reduction_factor - 1`` trials to reach a rung always go on: the top
    ``1/reduction_factor`` of fewer than ``reduction_factor`` values is empty, and stopping on that
    would stop nearly every trial at its first rung before anything can be compared.

    A trial's recorded values stay when it completes, is stopped or fails (they are what later trials
    are compared to); a ``retried`` trial (its worker died; it runs again from the start) is forgotten.
    Reports with a non-finite value are ignored.

    Args:
        min_resource: the first rung (in units of ``step + 1``); every trial runs at least this long.
        max_resource: the most a trial runs (the function's number of epochs), or ``None``.
        reduction_factor: ``eta``; about one trial in ``reduction_factor`` goes on at each rung.
        grace_period: Ray Tune's name for ``min_resource``; give one or the other.
    """

    def __init__(self, min_resource: int = 1, max_resource: int | None = None, reduction_factor: int = 3,
                 grace_period: int | None = None) -> None:
        if grace_period is not None:
            if min_resource not in (1, grace_period):
                raise ValueError(
                    f"ASHA(min_resource={min_resource!r}, grace_period={grace_period!r}): grace_period is "
                    f"another name for min_resource; give only one of them"
                )
            min_resource = grace_period
        self.min_resource, self.max_resource, self.reduction_factor = check_resources(
            "ASHA", min_resource, max_resource, reduction_factor, max_required=False)
        self.mode = "max"
        self._rungs: dict[int, dict[int, float]] = {}

    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this scheduler (JSON-friendly)."""
        return {"min_resource": self.min_resource, "max_resource": self.max_resource,
                "reduction_factor": self.reduction_factor}

    def setup(self, mode: str) -> None:
        """Start a new search: forget the trials of any earlier run of the same ``Search``."""
        super().setup(mode)
        self._rungs = {}

    # ------------------------------------------------------------------------------------- rungs
    def milestones(self, upto: int | None = None) -> list[int]:
        """The rung resources up to ``upto`` (inclusive); all of them when ``max_resource`` is set and
        ``upto`` is ``None``."""
        if upto is None and self.max_resource is None:
            raise ValueError("ASHA(max_resource=None) has no last rung: pass upto=...")
        found, resource = [], self.min_resource
        while (self.max_resource is None or resource < self.max_resource) and (
                upto is None or resource <= upto):
            found.append(resource)
            resource *= self.reduction_factor
        return found

    def recorded(self, milestone: int) -> dict[int, float]:
        """The values recorded at the rung of resource ``milestone``, by trial id (a copy)."""
        return dict(self._rungs.get(milestone, {}))

    def cutoff(self, values: list[float]) -> float | None:
        """The worst value that still goes on among ``values``; ``None`` while everyone goes on."""
        keep = len(values) // self.reduction_factor
        if keep == 0:
            return None
        return sorted(values, reverse=self.mode == "max")[keep - 1]

    # ---------------------------------------------------------------------------------- decisions
    def on_report(self, trial_id: int, step: int, value: float) -> Decision:
        """Record the trial's value at each rung it reaches with this report; stop it below a cutoff."""
        if not math.isfinite(value):
            return CONTINUE
        resource = step + 1
        decision: Decision = CONTINUE
        for rung, milestone in enumerate(self.milestones(upto=resource)):
            recorded = self._rungs.setdefault(milestone, {})
            if trial_id in recorded:
                continue
            recorded[trial_id] = value
            cutoff = self.cutoff(list(recorded.values()))
            if decision is CONTINUE and cutoff is not None and self.better(cutoff, value):
                decision = Stop(
                    f"ASHA rung {rung} (resource {milestone}, step {milestone - 1}): value {value:.6g} is "
                    f"worse than the cutoff {cutoff:.6g}, the top 1/{self.reduction_factor} of "
                    f"{len(recorded)} trials at this rung (mode={self.mode})"
                )
        return decision

    def on_complete(self, trial_id: int, status: str) -> None:
        if status == "retried":
            for recorded in self._rungs.values():
                recorded.pop(trial_id, None)

    def __repr__(self) -> str:
        return (f"ASHA(min_resource={self.min_resource}, max_resource={self.max_resource}, "
                f"reduction_factor={self.reduction_factor})")
