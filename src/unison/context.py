"""``ctx``: where a call of the training function runs, and helpers that depend on it."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _default_device() -> str:
    torch = sys.modules.get("torch")  # never import torch just to answer this
    if torch is not None and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@dataclass
class Context:
    """What the training function gets as ``ctx``.

    Attributes:
        trial_id: the trial's number in its experiment (0 for a single run).
        trial_dir: a private folder for this trial's files; they are kept in the experiment.
        rank, world_size, local_rank: the process's place in a distributed run (0, 1, 0 otherwise).
        device: ``"cuda"`` when torch is loaded and sees a GPU, else ``"cpu"``.
        seed: a per-trial seed the function may use for its own randomness.
        attempt: 0 the first time a trial runs, 1.. when it is re-run after its worker died.
    """

    trial_id: int
    trial_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    seed: int | None = None
    attempt: int = 0

    @property
    def is_chief(self) -> bool:
        """Whether this process is the one whose result counts (rank 0)."""
        return self.rank == 0

    def prepare(self, obj: Any) -> Any:
        """Make ``obj`` (a model, DataLoader or optimizer) ready for this context.

        Outside distributed training this returns ``obj`` unchanged.
        """
        return obj

    def shard(self, data: Any) -> Any:
        """This process's disjoint part of ``data``; the whole of it outside distributed training."""
        return data
