"""A hyperparameter search on Spark: the same function and Search as on this machine, backend="spark".

    python examples/spark_search.py                        # a local[*] SparkSession
    spark-submit --master spark://127.0.0.1:7077 examples/spark_search.py   # uses spark-submit's session

Executors must run a Python with unison installed (PYSPARK_PYTHON, or spark.pyspark.python) and must
reach the driver (see "Running on a real cluster" in the README).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import unison


def train(lr: float, momentum: float, reporter: Any, ctx: Any) -> dict[str, float]:
    """A stand-in for real training: a noisy quadratic bowl, reported per epoch."""
    loss = 1.0
    for epoch in range(5):
        loss = (lr - 0.01) ** 2 * 1e3 + (momentum - 0.9) ** 2 + 0.1 / (epoch + 1)
        reporter.report(step=epoch, loss=loss)
        time.sleep(0.05)
    (ctx.trial_dir / "summary.txt").write_text(f"lr={lr} momentum={momentum} loss={loss}\n")
    return {"loss": loss}


def main() -> None:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    # Under spark-submit this is its session (--master, --conf); under plain python, local[*].
    spark = SparkSession.builder.config("spark.ui.showConsoleProgress", "false").getOrCreate()
    space = {"lr": unison.loguniform(1e-4, 1e-1), "momentum": unison.uniform(0.5, 0.99)}
    search = unison.Search(space, metric="loss", mode="min", trials=12, optimizer="random",
                           scheduler="median", seed=0)
    result = unison.run(train, search, backend=unison.Spark(spark))
    print(result.trials[["trial_id", "status", "lr", "momentum", "loss", "worker", "host", "pid"]])
    print(f"best: {result.best.hparams} loss={result.best.metric:.4g}; files in {result.path}")
    spark.stop()


if __name__ == "__main__":
    main()
