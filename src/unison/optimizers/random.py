"""Random search: independent samples, reproducible per trial number."""

from __future__ import annotations

from typing import Any

from unison.optimizers.base import Optimizer
from unison.space import Distribution


class RandomSearch(Optimizer):
    """Samples every hyperparameter independently.

    Trial ``n`` draws from a generator seeded with ``(seed, n)``, so the same seed gives the same
    trials on every backend, in any completion order, and a resumed search continues the sequence.
    """

    def suggest(self, trial_number: int) -> dict[str, Any]:
        import numpy as np

        rng = np.random.default_rng([self.seed, trial_number])
        return {
            name: dist.sample(rng) if isinstance(dist, Distribution) else dist
            for name, dist in self.space.items()
        }
