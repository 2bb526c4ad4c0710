"""What the GPU tests share: a barrier trials meet at, and a training function that records the GPUs
its worker was given (tests/test_gpus.py, test_gpu.py, test_ray_gpus.py, test_spark_gpus.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from processes import journal


def meet(folder: Path, name: str, count: int, timeout: float = 120.0) -> None:
    """Arrive at the barrier ``folder`` as ``name`` and wait until ``count`` trials (or ranks) have:
    they ran at the same time. Workers must share this machine's disk (they do in the tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("")
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.iterdir()))} of {count} trials ran at once")
        time.sleep(0.02)


def recorder(folder: Path, together: int = 1) -> Any:
    """A training function that writes what GPUs it sees into ``folder`` (``seen-<trial>-<rank>.json``),
    then meets ``together`` trials (or ranks) at ``folder/barrier``."""

    def train(x: float, ctx: Any) -> dict[str, float]:
        seen = {"trial_id": ctx.trial_id, "rank": ctx.rank, "pid": os.getpid(),
                "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "unison_gpus": os.environ.get("UNISON_GPUS"),
                "ctx_gpus": ctx.gpus, "device": ctx.device}
        if ctx.world_size > 1:
            import torch.distributed as dist

            seen["backend"] = dist.get_backend()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"seen-{ctx.trial_id}-{ctx.rank}.json").write_text(json.dumps(seen))
        if together > 1:
            meet(folder / "barrier", f"{ctx.trial_id}-{ctx.rank}", together)
        return {"value": x}

    return train


def starts(path: Path) -> list[dict[str, Any]]:
    """The journal's start events."""
    return [event for event in journal(path) if event.get("e") == "start"]


def views(folder: Path) -> list[dict[str, Any]]:
    """What each trial (or rank) recorded with :func:`recorder`."""
    return [json.loads(file.read_text()) for file in sorted(folder.glob("seen-*.json"))]
