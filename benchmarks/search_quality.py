"""Search quality with 4 trials in flight: unison's optimizers against Optuna's constant-liar TPE.

Side by side in one run, per problem (Branin, Hartmann-6, Ackley-10) and seed (0..N-1):

- ``peer``: Optuna's ``TPESampler(constant_liar=True, seed=s)`` driven directly with ask/tell and 4
  trials held open (ask 4, tell the oldest, ask the next: what unison's inline ``max_concurrent=4``
  shows its optimizer);
- ``optuna-seq``: Optuna's sequential ``TPESampler(seed=s)``, 60 trials (the reference for "within 84
  trials");
- unison's optimizers (``tpe``, ``gp``, ``auto``; ``default`` is whichever ``Search`` uses by
  default) on the inline backend with ``max_concurrent=4``. ``auto`` runs with ``timing=False``:
  the problems take microseconds, so its timing rule would hand over to TPE at once; without it,
  auto does what it does for trials long enough to hide GP's suggestions.

Every 4-in-flight contender runs ``--horizon`` (84) trials; its regret at ``--trials`` (60) is the
best of its first 60 results (the same trials a 60-trial search runs). Reported per problem: median
regret with a bootstrap 90% interval, the ratio of median regrets to the peer's with a paired
bootstrap 90% interval (seeds resampled), the trial count at which the median best-so-far reaches
sequential TPE's 60-trial median regret, and the seconds per suggestion.

    nice -n 15 python benchmarks/search_quality.py --slow-seeds 20      # 200 seeds, gp and auto on 20
    python benchmarks/search_quality.py --quick                         # 5 seeds, 30 trials, a minute
    python benchmarks/search_quality.py --seeds 3 --optimizers gp,auto  # time 3 seeds per contender
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

import unison

_H6_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])
_H6_A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14],
                  [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
_H6_P = 1e-4 * np.array([[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
                         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]])


def branin(x: dict[str, float]) -> float:
    """Branin-Hoo on [-5, 10] x [0, 15]; three global minima of 0.397887."""
    x1, x2 = x["x0"], x["x1"]
    b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def hartmann6(x: dict[str, float]) -> float:
    """Hartmann-6 on [0, 1]^6; global minimum -3.32237."""
    v = np.array([x[f"x{i}"] for i in range(6)])
    return float(-np.sum(_H6_ALPHA * np.exp(-np.sum(_H6_A * (v - _H6_P) ** 2, axis=1))))


def ackley10(x: dict[str, float]) -> float:
    """Ackley in 10 dimensions on [-32.768, 32.768]^10; global minimum 0 at the origin."""
    v = np.array([x[f"x{i}"] for i in range(10)])
    return float(-20 * np.exp(-0.2 * np.sqrt(np.mean(v**2))) - np.exp(np.mean(np.cos(2 * np.pi * v)))
                 + 20 + math.e)


# name -> (function, box per dimension, known minimum)
PROBLEMS: dict[str, tuple[Any, list[tuple[float, float]], float]] = {
    "branin": (branin, [(-5.0, 10.0), (0.0, 15.0)], 0.397887),
    "hartmann6": (hartmann6, [(0.0, 1.0)] * 6, -3.32237),
    "ackley10": (ackley10, [(-32.768, 32.768)] * 10, 0.0),
}
SLOW = ("gp", "auto")  # run on --slow-seeds seeds


class _Timed(unison.Optimizer):
    """Wraps an optimizer and adds up the seconds its ``suggest`` takes."""

    def __init__(self, inner: unison.Optimizer) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0
        self.adaptive = inner.adaptive

    def setup(self, space: dict[str, Any], mode: Any, seed: int | None) -> None:
        self.inner.setup(space, mode, seed)

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        start = time.perf_counter()
        out = self.inner.suggest(trial_number)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def observe(self, trial_number: int, hparams: dict[str, Any], value: Any, status: str) -> None:
        self.inner.observe(trial_number, hparams, value, status)


def _curve(values: list[float], optimum: float) -> list[float]:
    """Best-so-far regret after each result."""
    out, best = [], math.inf
    for v in values:
        best = min(best, v)
        out.append(best - optimum)
    return out


def run_optuna(problem: str, seed: int, trials: int, in_flight: int) -> tuple[list[float], float]:
    """Optuna's TPE by ask/tell with ``in_flight`` trials held open (liar on when > 1)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fn, box, optimum = PROBLEMS[problem]
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        f"x{i}": optuna.distributions.FloatDistribution(lo, hi) for i, (lo, hi) in enumerate(box)}
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=in_flight > 1)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    open_trials: list[Any] = []
    values: list[float] = []
    seconds = 0.0
    asked = 0
    while len(values) < trials:
        while len(open_trials) < in_flight and asked < trials:
            start = time.perf_counter()
            open_trials.append(study.ask(dists))
            seconds += time.perf_counter() - start
            asked += 1
        trial = open_trials.pop(0)  # the oldest ends first, as on unison's inline backend
        values.append(fn(trial.params))
        study.tell(trial, values[-1])
    return _curve(values, optimum), seconds / trials


def run_unison(problem: str, optimizer: str, seed: int, trials: int,
               storage: str) -> tuple[list[float], float]:
    """A unison search on the inline backend, 4 in flight; the values in the order they arrived."""
    from unison.optimizers import AutoSearch, make_optimizer

    fn, box, optimum = PROBLEMS[problem]
    space = {f"x{i}": unison.uniform(lo, hi) for i, (lo, hi) in enumerate(box)}
    values: list[float] = []

    def objective(hparams: dict[str, float]) -> float:
        values.append(fn(hparams))
        return values[-1]

    # The problems take microseconds: auto's timing would hand over to TPE at once. timing=False
    # stands for trials long enough to hide GP's suggestions, which is what auto then does.
    timed = _Timed(AutoSearch(timing=False) if optimizer == "auto" else make_optimizer(optimizer))
    search = unison.Search(space, metric="value", mode="min", trials=trials, optimizer=timed,
                           seed=seed, max_concurrent=4)
    unison.run(objective, search, backend="inline", progress=False, storage=storage)
    return _curve(values, optimum), timed.seconds / max(timed.calls, 1)


def default_optimizer() -> str:
    """The optimizer ``unison.Search`` uses when none is named."""
    import inspect

    return str(inspect.signature(unison.Search).parameters["optimizer"].default)


def one_run(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """One (problem, contender, seed): its best-so-far regret curve and seconds per suggestion."""
    problem, contender, seed, trials = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)  # the same for gp and auto; one core per process
    except ImportError:
        pass
    start = time.perf_counter()
    if contender in ("peer", "optuna-seq"):
        curve, per = run_optuna(problem, seed, trials, 4 if contender == "peer" else 1)
    else:
        with tempfile.TemporaryDirectory() as storage:
            curve, per = run_unison(problem, contender, seed, trials, storage)
    return {"problem": problem, "contender": contender, "seed": seed, "curve": curve,
            "suggest_s": per, "seconds": time.perf_counter() - start}


def _bootstrap(stat: Any, n: int, resamples: int = 2000) -> tuple[float, float]:
    """5th and 95th percentiles of ``stat(indices)`` over seeds resampled with replacement."""
    rng = np.random.default_rng(12345)
    draws = [stat(rng.integers(0, n, n)) for _ in range(resamples)]
    return float(np.percentile(draws, 5)), float(np.percentile(draws, 95))


def summarize(runs: list[dict[str, Any]], trials: int, horizon: int) -> list[dict[str, Any]]:
    """Per problem and contender: median regret (90% CI), ratio to the peer (paired 90% CI), reach."""
    rows = []
    for problem in dict.fromkeys(r["problem"] for r in runs):
        by: dict[str, dict[int, dict[str, Any]]] = {}
        for r in runs:
            if r["problem"] == problem:
                by.setdefault(r["contender"], {})[r["seed"]] = r
        peer, seq = by.get("peer", {}), by.get("optuna-seq", {})
        seq_target = statistics.median(r["curve"][trials - 1] for r in seq.values()) if seq else None
        for contender, seeds in by.items():
            regrets = np.array([seeds[s]["curve"][trials - 1] for s in sorted(seeds)])
            row: dict[str, Any] = {
                "problem": problem, "contender": contender, "seeds": len(seeds),
                "median_regret": float(np.median(regrets)),
                "median_regret_90": _bootstrap(lambda i, v=regrets: np.median(v[i]), len(regrets)),
                "mean_regret": float(np.mean(regrets)),
                "suggest_s": statistics.fmean(r["suggest_s"] for r in seeds.values()),
                "seconds_per_search": statistics.fmean(r["seconds"] for r in seeds.values()),
            }
            paired = sorted(set(seeds) & set(peer))
            if contender != "peer" and paired and contender != "optuna-seq":
                mine = np.array([seeds[s]["curve"][trials - 1] for s in paired])
                theirs = np.array([peer[s]["curve"][trials - 1] for s in paired])
                row["paired_seeds"] = len(paired)
                row["ratio_to_peer"] = float(np.median(mine) / np.median(theirs))
                row["ratio_to_peer_90"] = _bootstrap(
                    lambda i, a=mine, b=theirs: np.median(a[i]) / np.median(b[i]), len(paired))
            if contender != "optuna-seq" and seq_target is not None:
                curves = np.array([seeds[s]["curve"][:horizon] for s in sorted(seeds)])
                medians = np.median(curves, axis=0)
                hit = np.nonzero(medians <= seq_target)[0]
                row["sequential_60_regret"] = seq_target
                row["trials_to_sequential_60"] = int(hit[0]) + 1 if len(hit) else None
            rows.append(row)
    return rows


def _print(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        ratio = (f"  ratio {r['ratio_to_peer']:.3f} [{r['ratio_to_peer_90'][0]:.3f}, "
                 f"{r['ratio_to_peer_90'][1]:.3f}]" if "ratio_to_peer" in r else "")
        reach = (f"  reaches seq-60 at {r.get('trials_to_sequential_60')}"
                 if "sequential_60_regret" in r else "")
        lo, hi = r["median_regret_90"]
        print(f"{r['problem']:10s} {r['contender']:10s} n={r['seeds']:3d}  "
              f"median regret {r['median_regret']:.5f} "
              f"[{lo:.5f}, {hi:.5f}]{ratio}{reach}  {r['suggest_s'] * 1000:.1f} ms/suggestion", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 seeds, 30 trials (horizon 42), TPE family")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 200)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (split a run)")
    parser.add_argument("--slow-seeds", type=int, default=None,
                        help="seeds for gp and auto (default --seeds)")
    parser.add_argument("--trials", type=int, default=None, help="default 60")
    parser.add_argument("--horizon", type=int, default=None,
                        help="trials run with 4 in flight (1.4 x trials)")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--optimizers", default=None, help="contenders (default peer,optuna-seq,tpe,gp,auto)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes (at most 2 on a shared 2-core machine)")
    parser.add_argument("--raw", default=None, help="append each run to this JSONL file (and reuse it)")
    parser.add_argument("--no-run", action="store_true", help="only summarize the runs in --raw")
    parser.add_argument("--out", default="benchmarks/results/search_quality.json")
    args = parser.parse_args()
    trials = args.trials or (30 if args.quick else 60)
    horizon = args.horizon or round(trials * 1.4)
    n_seeds = args.seeds or (5 if args.quick else 200)
    slow_seeds = args.slow_seeds if args.slow_seeds is not None else n_seeds
    contenders = (args.optimizers.split(",") if args.optimizers
                  else ["peer", "optuna-seq", "tpe"] if args.quick
                  else ["peer", "optuna-seq", "tpe", "gp", "auto"])
    problems = args.problems.split(",")
    for p in problems:
        if p not in PROBLEMS:
            parser.error(f"unknown problem {p!r}: use some of {list(PROBLEMS)}")
    done: list[dict[str, Any]] = []
    if args.raw and Path(args.raw).exists():
        for line in Path(args.raw).read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by a run that was stopped
                done.append(json.loads(line))
    have = {(r["problem"], r["contender"], r["seed"]) for r in done if len(r["curve"]) >= horizon
            or (r["contender"] == "optuna-seq" and len(r["curve"]) >= trials)}
    jobs = [(p, c, s, trials if c == "optuna-seq" else horizon) for s in range(args.first_seed, n_seeds)
            for p in problems
            for c in contenders if (c not in SLOW or s < slow_seeds) and (p, c, s) not in have
            and not args.no_run]
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    start = time.perf_counter()
    raw = open(args.raw, "a") if args.raw else None
    with ProcessPoolExecutor(max(1, min(args.jobs, 2))) as pool:
        for i, run in enumerate(pool.map(one_run, jobs, chunksize=1)):
            done.append(run)
            if raw:
                raw.write(json.dumps(run) + "\n")
                raw.flush()
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{len(jobs)} runs, {time.perf_counter() - start:.0f} s", flush=True)
    if raw:
        raw.close()
    runs = [r for r in done
            if r["problem"] in problems and r["seed"] < n_seeds and r["contender"] in contenders]
    rows = summarize(runs, trials, horizon)
    _print(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import optuna

    out.write_text(json.dumps({
        "trials": trials, "horizon": horizon, "seeds": n_seeds, "slow_seeds": slow_seeds,
        "in_flight": 4, "default_optimizer": default_optimizer(), "rows": rows,
        "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
        "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
                   f"optuna {optuna.__version__}",
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
