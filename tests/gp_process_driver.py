"""A search whose GP fits models (``AutoSearch(timing=False)``), run as a fresh process so a test can
see what the driver imported and which processes it left: prints one JSON line.

Usage: ``python tests/gp_process_driver.py STORAGE MODE``: ``local`` (15 trials on ``Local(workers=2)``)
or ``interrupt`` (inline; trial 13 raises ``KeyboardInterrupt``, after GP went to its process).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import unison
from unison.optimizers import AutoSearch
from unison.optimizers.process import Offloaded

SPACE = {"x": unison.uniform(-2, 2), "y": unison.loguniform(1e-3, 1.0)}


def objective(x: float, y: float, ctx: unison.TrialContext) -> float:
    if ctx.trial_id == 13 and os.environ.get("GP_DRIVER_INTERRUPT"):
        raise KeyboardInterrupt
    return (x - 0.5) ** 2 + y


def process_children() -> list[int]:
    """This process's children that are optimizer processes."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"unison.optimizers.process_child" in cmdline:
            found.append(int(stat.parent.name))
    return found


def main() -> None:
    storage, mode = sys.argv[1], sys.argv[2]
    optimizer = AutoSearch(timing=False)
    search = unison.Search(SPACE, metric="value", mode="min", trials=15, optimizer=optimizer, seed=1,
                           max_concurrent=2)
    backend = unison.Local(workers=2) if mode == "local" else "inline"
    if mode == "interrupt":
        os.environ["GP_DRIVER_INTERRUPT"] = "1"
    outcome = "returned"
    try:
        result = unison.run(objective, search, backend=backend, storage=storage, progress=False)
        completed = int((result.trials["status"] == "completed").sum())
    except KeyboardInterrupt:
        outcome, completed = "interrupted", -1
    gp = optimizer._gp  # noqa: SLF001
    print(json.dumps({
        "outcome": outcome, "completed": completed, "sampler": optimizer.sampler,
        "handed_over": isinstance(gp, Offloaded) and gp.loaded, "torch": "torch" in sys.modules,
        "optuna": "optuna" in sys.modules,
        "children": process_children(),
    }), flush=True)


if __name__ == "__main__":
    main()
