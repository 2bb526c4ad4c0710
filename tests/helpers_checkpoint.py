"""An importable, checkpointing training function for the checkpoint fault tests.

Workers import this module by name (the driver ships its ``sys.path``), and so do the test process
and ``checkpoint_driver.py``, so all of them run exactly the same function.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import unison

STEPS = 20


def make_search(workdir: str | Path, trials: int = 1, sleep: float = 0.0, kill_at: int = -1,
                form: str = "object", keep: int = 2) -> unison.Search:
    """A search of ``trials`` trials of :func:`train`: ``kill_at`` >= 0 makes attempt 0 of each trial
    SIGKILL its own process at that step; ``form``: ``"object"`` or ``"directory"`` checkpoints."""
    space = {"lr": unison.uniform(0.01, 0.1), "workdir": str(workdir), "sleep": sleep, "kill_at": kill_at,
             "form": form}
    return unison.Search(space, metric="loss", mode="min", trials=trials, seed=3, optimizer="random",
                         keep_checkpoints=keep)


def expected_loss(lr: float) -> float:
    """The final loss of an uninterrupted :func:`train` run with ``lr``."""
    w = 1.0
    for step in range(STEPS):
        w = w * (1 - lr) + 0.001 * step
    return w


def _restore(ctx: Any, form: str) -> float:
    if form == "directory":
        return float((Path(ctx.checkpoint) / "w.txt").read_text())
    return float(ctx.checkpoint["w"])


def train(lr: float, workdir: str, sleep: float, kill_at: int, form: str, reporter: Any,
          ctx: Any) -> dict[str, float]:
    """20 steps of a deterministic update, a checkpoint each step; ``computed.txt`` gets a line
    ``trial attempt step`` for every step computed (so a test sees which steps a retry redid)."""
    start = ctx.checkpoint_step + 1 if ctx.checkpoint else 0
    w = _restore(ctx, form) if ctx.checkpoint else 1.0
    with open(Path(workdir) / "computed.txt", "a", encoding="utf-8") as log:
        log.write(f"{ctx.trial_id} {ctx.attempt} start {start}\n")
    for step in range(start, STEPS):
        if step == kill_at and ctx.attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        w = w * (1 - lr) + 0.001 * step
        with open(Path(workdir) / "computed.txt", "a", encoding="utf-8") as log:
            log.write(f"{ctx.trial_id} {ctx.attempt} {step}\n")
        if form == "directory":
            folder = ctx.trial_dir / "scratch"
            folder.mkdir(exist_ok=True)
            (folder / "w.txt").write_text(repr(w))
            reporter.report(step=step, checkpoint=folder, loss=w)
        else:
            reporter.report(step=step, checkpoint={"w": w}, loss=w)
        time.sleep(sleep)
    return {"loss": w}
