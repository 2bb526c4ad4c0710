"""An importable training function for the fault tests that run the driver in another process.

Workers import this module by name (the driver ships its ``sys.path``), and so does the test
process when it resumes the experiment, so all three run exactly the same function.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import unison


def make_search(workdir: str | Path, trials: int = 10, sleep: float = 0.4, seed: int = 7) -> unison.Search:
    """The search both the driver script and the test build: same space, same seed."""
    space = {
        "x": unison.uniform(0.0, 1.0),
        "k": unison.integer(1, 1000),
        "workdir": str(workdir),
        "sleep": sleep,
    }
    return unison.Search(space, metric="value", mode="max", trials=trials, seed=seed,
                         optimizer="random")


def train(x: float, k: int, workdir: str, sleep: float, ctx: Any) -> dict[str, float]:
    """Records its pid, sleeps, then appends its trial id to ``ran.txt`` (one line per finished run)."""
    work = Path(workdir)
    (work / f"pid-{ctx.trial_id}-{ctx.attempt}").write_text(str(os.getpid()))
    time.sleep(sleep)
    with open(work / "ran.txt", "a", encoding="utf-8") as f:
        f.write(f"{ctx.trial_id}\n")
    return {"value": x + k}
