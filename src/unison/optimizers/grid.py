"""Grid search: every combination of the ``choice`` values, integers and constants, in order."""

from __future__ import annotations

import itertools
import json
from typing import Any

from unison.optimizers.base import Optimizer
from unison.space import Distribution, dependency_order, is_active


class GridSearch(Optimizer):
    """Enumerates the Cartesian product of the space (the last parameter varies fastest).

    Conditional parameters are left out of the points where they do not apply, and the duplicates
    that leaves are dropped. Continuous ranges cannot be enumerated and are rejected.
    """

    adaptive = False

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        super().setup(space, mode, seed)
        axes = [
            (name, dist.grid_values(name) if isinstance(dist, Distribution) else [dist])
            for name, dist in space.items()
        ]
        order = dependency_order(space)
        self._points: list[dict[str, Any]] = []
        seen: set[str] = set()
        for values in itertools.product(*(v for _, v in axes)):
            full = dict(zip((name for name, _ in axes), values, strict=True))
            point: dict[str, Any] = {}
            for name in order:
                if is_active(space[name], point):
                    point[name] = full[name]
            point = {name: point[name] for name in space if name in point}
            key = json.dumps(point, sort_keys=True)
            if key not in seen:
                seen.add(key)
                self._points.append(point)

    def size(self) -> int:
        return len(self._points)

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number >= len(self._points):
            return None
        return dict(self._points[trial_number])
