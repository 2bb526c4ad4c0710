"""Grid search: every combination of the ``choice`` values and constants, in order."""

from __future__ import annotations

import math
from typing import Any

from unison.optimizers.base import Optimizer
from unison.space import Distribution


class GridSearch(Optimizer):
    """Enumerates the Cartesian product of the space; continuous ranges are rejected."""

    def setup(self, space: dict[str, Any], mode: str, seed: int | None) -> None:
        super().setup(space, mode, seed)
        self._axes = [
            (name, dist.grid_values(name) if isinstance(dist, Distribution) else [dist])
            for name, dist in space.items()
        ]

    def size(self) -> int:
        return math.prod(len(values) for _, values in self._axes)

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number >= self.size():
            return None
        point: dict[str, Any] = {}
        rest = trial_number
        for name, values in reversed(self._axes):  # the last axis varies fastest, like itertools.product
            rest, index = divmod(rest, len(values))
            point[name] = values[index]
        return {name: point[name] for name, _ in self._axes}
