"""Random search: independent samples, reproducible per trial number."""

from __future__ import annotations

from typing import Any

from unison.optimizers.base import Optimizer
from unison.optimizers.seeded_rng import SeededRng
from unison.space import Distribution, dependency_order, is_active


class RandomSearch(Optimizer):
    """Samples every hyperparameter independently.

    Trial ``n`` draws from a generator seeded with ``(seed, n)``, so the same seed gives the same
    trials on every backend, in any completion order, and a resumed search continues the sequence.
    The generator draws what ``numpy.random.default_rng([seed, n])`` would, without importing numpy
    (:class:`~unison.optimizers.seeded_rng.SeededRng`).
    """

    adaptive = False

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        import secrets

        super().setup(space, mode, secrets.randbits(31) if seed is None else seed)

    def suggest(self, trial_number: int) -> dict[str, Any]:
        rng = SeededRng([0 if self.seed is None else self.seed, trial_number])
        hparams: dict[str, Any] = {}
        for name in dependency_order(self.space):
            dist = self.space[name]
            if is_active(dist, hparams):
                hparams[name] = dist.sample(rng) if isinstance(dist, Distribution) else dist
        return {name: hparams[name] for name in self.space if name in hparams}
