"""Asynchrony plus early stopping on a real training workload.

A NumPy MLP on scikit-learn's digits (up to 20 epochs a trial), 40 trials of the same random
configurations, 2 workers, timed three ways in one run:

1. synchronous waves of 2 trials, no stopping: each wave waits for its slowest trial (what one
   Spark job per batch of trials gives), run on a plain ProcessPoolExecutor(2);
2. unison, asynchronous, no stopping (Local backend, 2 workers);
3. unison, asynchronous, with ASHA (min 1 epoch, max 20, reduction factor 3).

    python benchmarks/async_asha.py [--trials 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import unison
from unison import demo

SPACE = {
    "lr": unison.loguniform(1e-3, 0.5),
    "hidden": unison.integer(32, 512, log=True),
    "l2": unison.loguniform(1e-6, 1e-2),
    "batch": unison.choice([8, 16, 32, 64]),
    "epochs": 20,
}


class _Reporter:
    """What a plain script would do without unison: nothing with the intermediate values."""

    def report(self, step: int | None = None, **metrics: Any) -> None:
        pass


class _Ctx:
    def __init__(self, trial_id: int, seed: int) -> None:
        self.trial_id, self.seed = trial_id, seed


_DATA: dict[str, Any] = {}


def plain_trial(args: tuple[int, dict[str, Any]]) -> float:
    trial_id, hparams = args
    if not _DATA:
        _DATA.update(demo.load_digits_split())
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # as unison captures it
        return demo.train(hparams, _DATA, _Reporter(), _Ctx(trial_id, trial_id))["accuracy"]


def configurations(trials: int, seed: int) -> list[dict[str, Any]]:
    optimizer = unison.RandomSearch()
    optimizer.setup(unison.Search(SPACE).space, "max", seed)
    return [optimizer.suggest(n) for n in range(trials)]


def _one_blas_thread() -> None:
    """Match unison's workers, which get one BLAS thread each on a 2-core machine with 2 workers."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def synchronous_waves(configs: list[dict[str, Any]], workers: int) -> tuple[float, float]:
    start = time.perf_counter()
    accuracies: list[float] = []
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=_one_blas_thread) as pool:
        for first in range(0, len(configs), workers):
            wave = list(enumerate(configs))[first : first + workers]
            accuracies += list(pool.map(plain_trial, wave))  # a barrier: the wave waits for its slowest
    return time.perf_counter() - start, max(accuracies)


def unison_search(
    trials: int, seed: int, workers: int, scheduler: Any, storage: str
) -> tuple[float, float, int]:
    search = unison.Search(SPACE, metric="accuracy", mode="max", trials=trials, optimizer="random",
                           scheduler=scheduler, seed=seed)
    start = time.perf_counter()
    result = unison.run(demo.train, search, data=demo.load_digits_split,
                        backend=unison.Local(workers=workers), storage=storage, progress=False)
    elapsed = time.perf_counter() - start
    stopped = int((result.trials["status"] == "stopped").sum())
    return elapsed, result.best.metric, stopped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/async_asha.json")
    args = parser.parse_args()
    configs = configurations(args.trials, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        wall, best = synchronous_waves(configs, args.workers)
        rows.append({"run": "synchronous waves, no stopping", "seconds": wall, "best_accuracy": best,
                     "stopped": 0})
        wall, best, stopped = unison_search(args.trials, args.seed, args.workers, None, storage)
        rows.append({"run": "unison async, no stopping", "seconds": wall, "best_accuracy": best,
                     "stopped": stopped})
        asha = unison.ASHA(min_resource=1, max_resource=20, reduction_factor=3)
        wall, best, stopped = unison_search(args.trials, args.seed, args.workers, asha, storage)
        rows.append({"run": "unison async + ASHA", "seconds": wall, "best_accuracy": best,
                     "stopped": stopped})
    base = rows[0]
    print(f"{args.trials} trials, {args.workers} workers, up to 20 epochs each")
    for row in rows:
        saved = 1 - row["seconds"] / base["seconds"]
        row["time_saved_vs_sync"] = saved
        print(f"  {row['run']:32s} {row['seconds']:7.1f} s  ({saved:+.0%} vs sync)  best accuracy "
              f"{row['best_accuracy']:.4f}  stopped early: {row['stopped']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trials": args.trials, "workers": args.workers, "rows": rows,
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    asha_row = rows[2]
    ok_time = asha_row["time_saved_vs_sync"] >= 0.5
    ok_acc = base["best_accuracy"] - asha_row["best_accuracy"] <= 0.01
    print(f"target (>= 50% less wall time than sync, best accuracy within 1 point): "
          f"{'met' if ok_time and ok_acc else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
