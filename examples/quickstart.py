"""The README's tour, runnable: a single run, then a search, of one unchanged training function.

    python examples/quickstart.py
"""

from __future__ import annotations

import math

import unison


def train(lr: float, units: int, reporter: unison.Reporter, ctx: unison.Context) -> dict[str, float]:
    """A stand-in for real training: accuracy rises per epoch, best near lr=0.01, units=128."""
    accuracy = 0.0
    for epoch in range(10):
        accuracy = (1 - math.exp(-(epoch + 1) / 3)) * math.exp(-(math.log10(lr) + 2) ** 2) \
            * (1 - abs(math.log2(units) - 7) / 10)
        reporter.report(step=epoch, accuracy=accuracy)
    (ctx.trial_dir / "notes.txt").write_text(f"lr={lr} units={units}\n")
    return {"accuracy": accuracy}


if __name__ == "__main__":
    single = unison.run(train, hparams={"lr": 0.01, "units": 64})
    print("single run:", single.metrics)

    space = {"lr": unison.loguniform(1e-4, 1e-1), "units": unison.integer(16, 256, log=True)}
    search = unison.Search(space, metric="accuracy", mode="max", trials=30, scheduler="median", seed=0)
    result = unison.run(train, search, backend=unison.Local(workers=2))
    print("best:", result.best)
    print(result.trials[["trial_id", "status", "lr", "units", "accuracy", "steps"]].head(10))
