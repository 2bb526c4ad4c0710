"""The single run: ``unison.run(train, hparams={...})``, one call in this process."""

from __future__ import annotations

import numbers
import secrets
from collections.abc import Mapping
from typing import Any


class SingleRun:
    """One call of the training function in the calling process, with ``hparams``.

    ``metric`` names the entry of a returned dict that is ``result.value``. ``seed`` (``ctx.seed``) is
    ``hparams["seed"]`` when that is an int, as in an ablation's trials; else a fresh random one,
    recorded in ``experiment.json``, so that ``torch.manual_seed(ctx.seed)`` works in a single run as
    it does in every other context.
    """

    def __init__(self, hparams: Mapping[str, Any] | None = None, metric: str | None = None) -> None:
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"hparams= must be a dict, got {type(hparams).__name__}")
        if metric is not None and not isinstance(metric, str):
            raise TypeError(f"metric= must be the name of a returned metric (a str), got {metric!r}")
        self.hparams = dict(hparams or {})
        self.metric = metric
        given = self.hparams.get("seed")
        if isinstance(given, numbers.Integral) and not isinstance(given, bool):
            self.seed = int(given)
        else:
            self.seed = secrets.randbits(31)

    def __repr__(self) -> str:
        return f"SingleRun(hparams={self.hparams}, metric={self.metric!r})"
