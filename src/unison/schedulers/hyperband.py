"""Asynchronous Hyperband: ASHA brackets with different early-stopping rates (Li et al., "Hyperband",
JMLR 2018; the asynchronous form from Li et al., "A System for Massively Parallel Hyperparameter
Tuning", MLSys 2020)."""

from __future__ import annotations

import math
from typing import Any

from unison.schedulers.asha import ASHA, check_resources
from unison.schedulers.base import CONTINUE, Decision, Scheduler, Stop


class Hyperband(Scheduler):
    """Several :class:`ASHA` brackets; each trial runs in one of them.

    **Brackets.** With ``s_max`` the largest ``s`` such that ``min_resource * reduction_factor**s <=
    max_resource``, bracket ``b = 0 .. s_max`` is an ASHA whose first rung is ``min_resource *
    reduction_factor**b`` (same ``max_resource`` and ``reduction_factor``; resource = ``step + 1``, rungs
    strictly below ``max_resource``, as in :class:`ASHA`). Bracket 0 is the most aggressive; the last
    bracket starts at or near ``max_resource`` and, when ``max_resource`` is an exact power, stops
    nothing (Hyperband's plain random-search bracket). Hyperband hedges over how early a trial can be
    judged.

    **Assignment.** Deterministic, from the trial id alone, so a resumed or retried trial lands in the
    same bracket: ``bracket_of(trial_id) = cycle[trial_id % len(cycle)]``. The cycle gives bracket ``b``
    Hyperband's ``n_s = ceil((s_max + 1) / (s + 1) * reduction_factor**s)`` trials (``s = s_max - b``
    halvings), so every bracket spends about the same budget, interleaved by smooth weighted
    round-robin so that the first few trials already visit every bracket (``Hyperband(1, 27, 3)``:
    27, 12, 6 and 4 of every 49 trials, starting 0, 1, 0, 2, 0, 3, ...).

    Args:
        min_resource: the first rung of the most aggressive bracket (in units of ``step + 1``).
        max_resource: the most a trial runs (the function's number of epochs).
        reduction_factor: ``eta``, shared by all brackets.
    """

    def __init__(self, min_resource: int, max_resource: int, reduction_factor: int = 3) -> None:
        self.min_resource, self.max_resource, self.reduction_factor = check_resources(
            "Hyperband", min_resource, max_resource, reduction_factor, max_required=True)
        most = max_resource if self.max_resource is None else self.max_resource  # required: never None
        s_max, resource = 0, self.min_resource
        while resource * self.reduction_factor <= most:
            s_max, resource = s_max + 1, resource * self.reduction_factor
        self.s_max = s_max
        # ``None``: a bracket that starts at max_resource and stops nothing
        self.brackets: list[ASHA | None] = []
        for b in range(s_max + 1):
            start = self.min_resource * self.reduction_factor**b
            self.brackets.append(
                ASHA(start, self.max_resource, self.reduction_factor) if start < self.max_resource else None)
        self.sizes = [math.ceil((s_max + 1) / (s_max - b + 1) * self.reduction_factor ** (s_max - b))
                      for b in range(s_max + 1)]
        self.cycle = _smooth_round_robin(self.sizes)
        self.mode = "max"

    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this scheduler (JSON-friendly)."""
        return {"min_resource": self.min_resource, "max_resource": self.max_resource,
                "reduction_factor": self.reduction_factor}

    def bracket_of(self, trial_id: int) -> int:
        """The bracket (0 = most aggressive) that trial ``trial_id`` runs in."""
        return self.cycle[trial_id % len(self.cycle)]

    def bracket_milestones(self, bracket: int) -> list[int]:
        """The rung resources of ``bracket`` (empty for a bracket that stops nothing)."""
        asha = self.brackets[bracket]
        return [] if asha is None else asha.milestones()

    def setup(self, mode: str) -> None:
        """Start a new search: forget the trials of any earlier run of the same ``Search``."""
        super().setup(mode)
        for asha in self.brackets:
            if asha is not None:
                asha.setup(mode)

    def on_report(self, trial_id: int, step: int, value: float) -> Decision:
        """The decision of the trial's bracket, its reason prefixed with the bracket."""
        bracket = self.bracket_of(trial_id)
        asha = self.brackets[bracket]
        if asha is None:
            return CONTINUE
        decision = asha.on_report(trial_id, step, value)
        if isinstance(decision, Stop):
            return Stop(f"Hyperband bracket {bracket}: {decision.reason}")
        return decision

    def on_complete(self, trial_id: int, status: str) -> None:
        asha = self.brackets[self.bracket_of(trial_id)]
        if asha is not None:
            asha.on_complete(trial_id, status)

    def __repr__(self) -> str:
        return (f"Hyperband(min_resource={self.min_resource}, max_resource={self.max_resource}, "
                f"reduction_factor={self.reduction_factor})")


def _smooth_round_robin(weights: list[int]) -> list[int]:
    """One full cycle of smooth weighted round-robin: index ``i`` appears ``weights[i]`` times, spread
    out (at each turn the index with the largest accumulated credit goes, lowest index on ties)."""
    total, credit, cycle = sum(weights), [0] * len(weights), []
    for _ in range(total):
        for i, w in enumerate(weights):
            credit[i] += w
        pick = max(range(len(weights)), key=lambda i: (credit[i], -i))
        credit[pick] -= total
        cycle.append(pick)
    return cycle
