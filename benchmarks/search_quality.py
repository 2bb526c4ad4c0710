"""Search quality: best value found in 60 trials on Branin and Hartmann-6, over 10 seeds.

Side by side in one run: unison random, unison TPE and unison GP, each with 1 and 4 trials in
flight (the inline backend holds 4 suggestions open before results arrive, exactly what 4
asynchronous workers see, but deterministic), and Optuna's own TPE run directly and sequentially.

    python benchmarks/search_quality.py            # full: 60 trials x 10 seeds
    python benchmarks/search_quality.py --quick    # 30 trials x 3 seeds, TPE and random only
    python benchmarks/search_quality.py --seeds 300 --optimizers random,tpe --out /tmp/sq300.json
                                                   # the TPE ratio with the seed-to-seed noise averaged out
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import unison

BRANIN_MIN = 0.397887
HARTMANN6_MIN = -3.32237


def branin(x1: float, x2: float) -> float:
    """Branin-Hoo on [-5, 10] x [0, 15]; three global minima of 0.397887."""
    a, b, c = 1.0, 5.1 / (4 * math.pi**2), 5 / math.pi
    r, s, t = 6.0, 10.0, 1 / (8 * math.pi)
    return a * (x2 - b * x1**2 + c * x1 - r) ** 2 + s * (1 - t) * math.cos(x1) + s


_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                  [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])


def hartmann6(**x: float) -> float:
    """Hartmann-6 on [0, 1]^6; global minimum -3.32237."""
    v = np.array([x[f"x{i}"] for i in range(6)])
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (v - _H6_P) ** 2, axis=1))))


PROBLEMS = {
    "branin": (lambda x1, x2: branin(x1, x2),
               {"x1": unison.uniform(-5, 10), "x2": unison.uniform(0, 15)}, BRANIN_MIN),
    "hartmann6": (hartmann6, {f"x{i}": unison.uniform(0, 1) for i in range(6)}, HARTMANN6_MIN),
}


def run_unison(problem: str, optimizer: str, concurrent: int, trials: int, seed: int, storage: str) -> float:
    fn, space, _ = PROBLEMS[problem]

    def objective(hparams: dict[str, float]) -> float:
        return fn(**hparams)

    search = unison.Search(space, metric="value", mode="min", trials=trials, optimizer=optimizer,
                           seed=seed, max_concurrent=concurrent)
    result = unison.run(objective, search, backend="inline", progress=False, storage=storage)
    return result.best.metric


def run_optuna(problem: str, trials: int, seed: int) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fn, space, _ = PROBLEMS[problem]

    def objective(trial: optuna.Trial) -> float:
        return fn(**{n: trial.suggest_float(n, d.low, d.high) for n, d in space.items()})

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    return study.best_value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--optimizers", default=None,
                        help="unison optimizers, comma-separated (default random,tpe,gp)")
    parser.add_argument("--out", default="benchmarks/results/search_quality.json")
    args = parser.parse_args()
    trials = args.trials or (30 if args.quick else 60)
    seeds = range(args.seeds or (3 if args.quick else 10))
    optimizers = (args.optimizers.split(",") if args.optimizers
                  else ["random", "tpe"] if args.quick else ["random", "tpe", "gp"])
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for problem, (_, _, optimum) in PROBLEMS.items():
            configs = [("optuna-tpe", 1)] + [(f"unison-{o}", k) for o in optimizers for k in (1, 4)]
            for name, concurrent in configs:
                start = time.perf_counter()
                bests = [
                    run_optuna(problem, trials, s) if name == "optuna-tpe"
                    else run_unison(problem, name.split("-", 1)[1], concurrent, trials, s, storage)
                    for s in seeds
                ]
                regrets = [b - optimum for b in bests]
                row = {"problem": problem, "optimizer": name, "concurrent": concurrent,
                       "median_best": statistics.median(bests), "median_regret": statistics.median(regrets),
                       "mean_regret": statistics.fmean(regrets), "seconds": time.perf_counter() - start}
                rows.append(row)
                print(f"{problem:10s} {name:13s} x{concurrent}  median best {row['median_best']:9.5f}  "
                      f"median regret {row['median_regret']:9.5f}  ({row['seconds']:.1f} s)", flush=True)
    print()
    for problem in PROBLEMS:
        ref = next(r for r in rows if r["problem"] == problem and r["optimizer"] == "optuna-tpe")
        tpe4 = next((r for r in rows if r["problem"] == problem and r["optimizer"] == "unison-tpe"
                     and r["concurrent"] == 4), None)
        rnd = next((r for r in rows if r["problem"] == problem and r["optimizer"] == "unison-random"
                    and r["concurrent"] == 4), None)
        if tpe4 is not None:
            ratio = tpe4["median_regret"] / ref["median_regret"] if ref["median_regret"] > 0 else float("inf")
            print(f"{problem}: unison TPE x4 regret / Optuna TPE x1 regret = {ratio:.2f} (target <= 1.10)"
                  + (f"; random x4 regret {rnd['median_regret']:.4f}" if rnd is not None else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trials": trials, "seeds": len(seeds), "rows": rows,
                               "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]},
                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
