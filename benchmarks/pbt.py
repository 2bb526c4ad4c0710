"""Population-based training against random search with the same compute (and Ray Tune's PBT).

The task (``pbt_task.py``): a 64-64-10 MLP on scikit-learn's digits, 30% of its training labels
replaced by random digits, SGD with batch 16, 32 steps of one epoch each, where a learning rate that
decays during training beats every fixed one. Searched: ``lr`` log-uniform in [1e-3, 1] and
``momentum`` in {0, 0.5, 0.9}; the search's metric is the validation accuracy, the figure reported is
the test accuracy of the trial with the best final validation accuracy. Per seed, in one run:

1. unison random search, 8 trials of 32 steps;
2. unison ``PBT(perturbation_interval=4, quantile_fraction=0.25, resample_probability=0.25)``, a
   population of 8 members of 32 steps each, a stopped member's remaining steps done by its clone
   (which resumes at its parent's checkpoint: the steps actually trained are counted and shown);
3. with ``--ray PYTHON`` (a Python with ``ray[tune]`` and scikit-learn): Ray Tune's
   ``PopulationBasedTraining`` with the same settings, through ``pbt_ray.py``.

    python benchmarks/pbt.py                        # 10 seeds, about 3 minutes
    python benchmarks/pbt.py --ray .venv-ray-bench/bin/python    # and Ray Tune's PBT: about 9 minutes
    python benchmarks/pbt.py --quick                # 1 seed, 8 steps: a smoke run
    python benchmarks/pbt.py --check-task           # why this task: fixed rates vs decays, no search
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pbt_task

import unison

cloudpickle.register_pickle_by_value(pbt_task)  # the workers do not have benchmarks/ on their path

POPULATION = 8
INTERVAL = 4
SPACE = {"lr": unison.loguniform(1e-3, 1.0), "momentum": unison.choice([0.0, 0.5, 0.9])}
MUTATIONS = {"lr": unison.loguniform(1e-3, 1.0), "momentum": [0.0, 0.5, 0.9]}


def train(hparams: dict[str, Any], dataset: dict[str, Any], reporter: Any, ctx: Any) -> dict[str, float]:
    """The unison trial: resumes from ``ctx.checkpoint`` (a PBT clone's copy of its parent's state)."""
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0

    def report(step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        reporter.report(step=step, checkpoint=state, **metrics)

    return pbt_task.run_trial(hparams, dataset, ctx.seed, start, ctx.checkpoint, report,
                              steps=hparams["steps"])


def run_unison(method: str, seed: int, steps: int, workers: int, storage: str) -> dict[str, Any]:
    """One search (``"random"`` or ``"pbt"``); its best trial's figures, wall time and work done."""
    scheduler = None
    if method == "pbt":
        scheduler = unison.PBT(perturbation_interval=INTERVAL, hyperparam_mutations=MUTATIONS,
                               quantile_fraction=0.25, resample_probability=0.25, seed=seed)
    search = unison.Search({**SPACE, "steps": steps}, metric="acc", mode="max", trials=POPULATION,
                           optimizer="random", scheduler=scheduler, seed=seed, keep_checkpoints=2)
    data = pbt_task.load_split()  # before the clock: the first call imports scikit-learn
    start = time.perf_counter()
    result = unison.run(train, search, data=data, backend=unison.Local(workers=workers), storage=storage,
                        progress=False)
    seconds = time.perf_counter() - start
    trials = result.trials
    return {"method": method, "seed": seed, "best_val": float(result.best.metric),
            "best_test": float(result.best.metrics["test_acc"]), "seconds": seconds,
            "steps_trained": len(result.curves), "trials": len(trials),
            "best_trial": int(result.best.trial_id),
            "best_status": str(trials.loc[trials["trial_id"] == result.best.trial_id, "status"].iloc[0]),
            "best_hparams": {k: result.best.hparams[k] for k in ("lr", "momentum")},
            "statuses": {str(k): int(v) for k, v in trials["status"].value_counts().items()}}


def run_ray(python: str, seeds: list[int], steps: int, out: Path) -> dict[str, Any]:
    """Ray Tune's PBT on the same task, in ``python`` (another virtualenv): one row per seed, Ray's
    version and the seconds ``ray.init`` took (once, not in the rows' wall times)."""
    script = Path(__file__).with_name("pbt_ray.py")
    command = [python, str(script), "--seeds", ",".join(map(str, seeds)), "--steps", str(steps),
               "--population", str(POPULATION), "--interval", str(INTERVAL), "--out", str(out)]
    print("running", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)
    return dict(json.loads(out.read_text()))


def interval(values: list[float]) -> tuple[float, float, float]:
    """The mean and its two-sided 95% Student-t interval."""
    from scipy import stats  # type: ignore[import-untyped]

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: mean test and validation accuracy with intervals, wall time; the paired differences
    of every other method against random search, seed by seed."""
    by = {m: {r["seed"]: r for r in rows if r["method"] == m} for m in methods}
    out: dict[str, Any] = {}
    for m in methods:
        test = [r["best_test"] for r in by[m].values()]
        out[m] = {"test": interval(test), "val": interval([r["best_val"] for r in by[m].values()]),
                  "seconds": statistics.median(r["seconds"] for r in by[m].values()),
                  "steps": statistics.median(r["steps_trained"] for r in by[m].values()),
                  "steps_max": max(r["steps_trained"] for r in by[m].values()), "n": len(test)}
    for m in methods:
        if m == "random" or "random" not in methods:
            continue
        seeds = sorted(set(by[m]) & set(by["random"]))
        diffs = [by[m][s]["best_test"] - by["random"][s]["best_test"] for s in seeds]
        out[f"{m} - random"] = {"test": interval(diffs), "n": len(diffs),
                                "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs),
                                "losses": sum(d < 0 for d in diffs)}
    return out


def _fmt(triple: tuple[float, float, float], signed: bool = False) -> str:
    mean, low, high = triple
    sign = "+" if signed else ""
    return f"{mean:{sign}.4f} ({low:{sign}.4f} to {high:{sign}.4f})"


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any], methods: list[str]) -> None:
    print("\nper seed: test accuracy of the trial with the best final validation accuracy (val in brackets)")
    for seed in sorted({r["seed"] for r in rows}):
        cells = [f"{m} {r['best_test']:.4f} ({r['best_val']:.4f})" for m in methods for r in rows
                 if r["method"] == m and r["seed"] == seed]
        print(f"  seed {seed}: " + "   ".join(cells))
    print("\n| method | best test accuracy, mean (95% CI) | best val accuracy | s / seed | steps (max) |")
    print("|---|---:|---:|---:|---:|")
    for m in methods:
        s = summary[m]
        print(f"| {m} | {_fmt(s['test'])} | {_fmt(s['val'])} | {s['seconds']:.1f} | {s['steps']:.0f} "
              f"({s['steps_max']}) |")
    for name, s in summary.items():
        if " - " in name:
            print(f"| **{name}**, paired | {_fmt(s['test'], signed=True)} | | | "
                  f"{s['wins']} wins, {s['ties']} ties, {s['losses']} losses |")


def check_task(steps: int, seeds: int = 4) -> None:
    """Print the final accuracies of fixed learning rates and of step decays (no search): the reason
    for the task is that a decay beats every fixed rate."""
    data = pbt_task.load_split()

    def final(schedule: Any, momentum: float, seed: int) -> dict[str, float]:
        state, metrics = pbt_task.fresh_state(seed), {}
        for step in range(steps):  # one step at a time, each at its own rate
            hparams = {"lr": schedule(step), "momentum": momentum}
            metrics = pbt_task.run_trial(hparams, data, seed, step, state, lambda *_: None, steps=step + 1)
        return metrics

    def show(name: str, schedule: Any, momentum: float) -> None:
        runs = [final(schedule, momentum, seed) for seed in range(seeds)]
        print(f"  {name:36s} val {statistics.fmean(r['acc'] for r in runs):.4f}  "
              f"test {statistics.fmean(r['test_acc'] for r in runs):.4f}", flush=True)

    print(f"mean final accuracy over {seeds} seeds, {steps} steps")
    for momentum in (0.0, 0.5, 0.9):
        for lr in (0.003, 0.01, 0.03, 0.1, 0.3):
            show(f"fixed lr {lr}, momentum {momentum}", lambda _, lr=lr: lr, momentum)
    for lr in (0.3, 1.0):
        for decay in (0.5, 0.7):
            decayed = lambda step, lr=lr, d=decay: lr * d ** (step // INTERVAL)  # noqa: E731
            show(f"lr {lr} x {decay} every {INTERVAL} steps", decayed, 0.0)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), cpu)
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "unison": unison.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (default 10)")
    parser.add_argument("--steps", type=int, default=pbt_task.STEPS)
    parser.add_argument("--workers", type=int, default=2,
                        help="local workers for both searches (default 2: PBT's members take turns)")
    parser.add_argument("--ray", metavar="PYTHON", help="a Python with ray[tune] and scikit-learn")
    parser.add_argument("--check-task", action="store_true",
                        help="no search: fixed learning rates against step decays, 4 seeds each")
    parser.add_argument("--only", choices=["random", "pbt"], help="run one unison method only")
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 steps; writes pbt-quick.json")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.check_task:
        check_task(args.steps)
        return 0
    if args.quick:
        args.seeds, args.steps = 1, 8
    out = Path(args.out or f"benchmarks/results/pbt{'-quick' if args.quick else ''}.json")
    methods = [args.only] if args.only else ["random", "pbt"]
    seeds = list(range(args.seeds))
    rows: list[dict[str, Any]] = []
    ray: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as storage:
        for seed in seeds:
            for method in methods if seed % 2 == 0 else methods[::-1]:  # share the machine's drift
                row = run_unison(method, seed, args.steps, args.workers, storage)
                rows.append(row)
                print(f"seed {seed} {method:6s}: test {row['best_test']:.4f} val {row['best_val']:.4f} "
                      f"{row['seconds']:.1f} s, {row['trials']} trials, {row['steps_trained']} steps",
                      flush=True)
        if args.ray:
            ray = run_ray(args.ray, seeds, args.steps, Path(storage) / "ray.json")
            rows += [{**r, "method": "ray-pbt"} for r in ray.pop("rows")]
            methods.append("ray-pbt")
            print(f"Ray {ray['ray']}: ray.init took {ray['init_seconds']:.1f} s (not in the wall times)")
    summary = summarize(rows, methods)
    print_table(rows, summary, methods)
    if "pbt" in summary and "random" in summary:
        met = summary["pbt"]["test"][0] >= summary["random"]["test"][0]
        print(f"\ntarget (PBT's mean best final accuracy >= random search's over {len(seeds)} seeds): "
              f"{'met' if met else 'NOT met'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "args": vars(args), "ray": ray, "rows": rows, "summary": summary}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
