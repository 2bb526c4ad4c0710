"""unison on Spark vs Hyperopt's SparkTrials vs unison's local backend, on one SparkSession (local[2]).

(a) throughput: 100 trials that do nothing, 2 at a time. Trials per second over the wall time of the
    whole search call (for unison: starting the slot jobs or worker processes, the trials, stopping
    them; for Hyperopt: ``fmin`` with ``SparkTrials(parallelism=2)``, which runs one Spark job per
    trial). Target: unison on Spark >= 20x SparkTrials.
(b) efficiency: 40 trials that sleep 0.5 s, 2 at a time: ideal time 40 x 0.5 / 2 = 10 s; efficiency =
    ideal / measured wall time. Target: >= 0.95 for unison on Spark.

The SparkSession is started (and every contender warmed up with a few trials) before anything is
timed: the figures are "after the session is up". unison's contenders are repeated (``--repeats``,
interleaved, median reported); SparkTrials, at seconds per trial, runs ``--hyperopt-repeats`` times
(default 1). Both search with random sampling (unison ``optimizer="random"``, Hyperopt
``rand.suggest``), so the optimizer's own cost does not enter. The figures go to a table on stdout
and to ``benchmarks/results/spark_throughput.json``.

    pip install -e '.[bench]'                       # hyperopt (and pyspark)
    python benchmarks/spark_throughput.py           # the full run (about 5 minutes on 2 cores)
    python benchmarks/spark_throughput.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import unison

HERE = Path(__file__).resolve().parent
SLEEP_S = 0.5
SLOTS = 2
TARGETS = {"throughput_vs_sparktrials_min": 20.0, "efficiency_min": 0.95}


# ------------------------------------------------------------------------------ trial functions
def noop_trial(x: float) -> float:
    return x


def sleep_trial(x: float) -> float:
    time.sleep(SLEEP_S)
    return x


def hyperopt_noop(params: dict[str, float]) -> float:
    return params["x"]


def hyperopt_sleep(params: dict[str, float]) -> float:
    time.sleep(SLEEP_S)
    return params["x"]


# ---------------------------------------------------------------------------------- contenders
def run_unison(backend: Any, fn: Any, trials: int, storage: Path) -> dict[str, Any]:
    search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                           optimizer="random", seed=0)
    t_call = time.time()
    start = time.perf_counter()
    result = unison.run(fn, search, backend=backend, storage=storage, progress=False)
    wall = time.perf_counter() - start
    assert list(result.trials["status"]) == ["completed"] * trials, result.trials
    starts = [json.loads(line)["t"] for line in (result.path / "journal.jsonl").read_text().splitlines()
              if '"e": "start"' in line]
    return {"wall_s": wall, "startup_s": min(starts) - t_call}


def run_sparktrials(spark: Any, fn: Any, trials: int) -> dict[str, Any]:
    import numpy as np
    from hyperopt import SparkTrials, fmin, hp, rand

    spark_trials = SparkTrials(parallelism=SLOTS, spark_session=spark)
    start = time.perf_counter()
    fmin(fn, {"x": hp.uniform("x", 0.0, 1.0)}, algo=rand.suggest, max_evals=trials, trials=spark_trials,
         show_progressbar=False, rstate=np.random.default_rng(0))
    wall = time.perf_counter() - start
    assert len(spark_trials.trials) == trials
    assert all(t["result"]["status"] == "ok" for t in spark_trials.trials)
    return {"wall_s": wall}


# ---------------------------------------------------------------------------------------- main
def start_spark() -> Any:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{SLOTS}]").appName("unison-spark-throughput")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "1g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.parallelize(range(SLOTS), SLOTS).count()
    return spark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trivial", type=int, default=100, help="trials of (a) (default 100)")
    parser.add_argument("--sleepy", type=int, default=40, help="trials of (b) (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of unison's contenders (default 3)")
    parser.add_argument("--hyperopt-repeats", type=int, default=1, help="repeats of SparkTrials (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 and 8 trials, once each")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes")
    args = parser.parse_args()
    if args.quick:
        args.trivial, args.sleepy, args.repeats, args.hyperopt_repeats = 20, 8, 1, 1
    name = "spark_throughput-quick.json" if args.quick else "spark_throughput.json"
    out = args.out or HERE / "results" / name

    started = time.perf_counter()
    spark = start_spark()
    session_s = time.perf_counter() - started
    storage = Path(tempfile.mkdtemp(prefix="unison-bench-"))
    contenders = {
        "unison Spark": lambda fn, n: run_unison(unison.Spark(spark, slots=SLOTS), fn, n, storage),
        "unison Local": lambda fn, n: run_unison(unison.Local(workers=SLOTS), fn, n, storage),
        "SparkTrials": lambda fn, n: run_sparktrials(
            spark, hyperopt_noop if fn is noop_trial else hyperopt_sleep, n),
    }
    try:
        for run in contenders.values():  # warm-up: JVM, Python workers, imports
            run(noop_trial, 4)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"trivial": [], "sleepy": []}
                                                            for name in contenders}
        workloads = (("trivial", noop_trial, args.trivial), ("sleepy", sleep_trial, args.sleepy))
        for workload, fn, trials in workloads:
            for repeat in range(max(args.repeats, args.hyperopt_repeats)):
                for name, run in contenders.items():
                    limit = args.hyperopt_repeats if name == "SparkTrials" else args.repeats
                    if repeat < limit:
                        runs[name][workload].append(run(fn, trials))
                        print(f"  {workload:8s} {name:13s} {runs[name][workload][-1]['wall_s']:7.2f} s",
                              flush=True)
    finally:
        spark.stop()
        shutil.rmtree(storage, ignore_errors=True)

    ideal = args.sleepy * SLEEP_S / SLOTS
    table: dict[str, dict[str, Any]] = {}
    for name, by_workload in runs.items():
        trivial_wall = statistics.median(r["wall_s"] for r in by_workload["trivial"])
        sleepy_wall = statistics.median(r["wall_s"] for r in by_workload["sleepy"])
        table[name] = {
            "trivial_wall_s": trivial_wall,
            "trials_per_s": args.trivial / trivial_wall,
            "sleepy_wall_s": sleepy_wall,
            "efficiency": ideal / sleepy_wall,
            "startup_s": statistics.median(r["startup_s"] for r in by_workload["sleepy"])
            if "startup_s" in by_workload["sleepy"][0] else None,
        }
    ratio = table["unison Spark"]["trials_per_s"] / table["SparkTrials"]["trials_per_s"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": _versions(),
        "session_start_s": session_s,
        "trivial_trials": args.trivial, "sleepy_trials": args.sleepy, "sleep_s": SLEEP_S, "slots": SLOTS,
        "ideal_sleepy_s": ideal, "repeats": args.repeats, "hyperopt_repeats": args.hyperopt_repeats,
        "results": table,
        "throughput_vs_sparktrials": ratio,
        "targets": TARGETS,
        "met": {"throughput_vs_sparktrials": ratio >= TARGETS["throughput_vs_sparktrials_min"],
                "efficiency": table["unison Spark"]["efficiency"] >= TARGETS["efficiency_min"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nSparkSession local[{SLOTS}] up in {session_s:.1f} s (not counted); {report['machine']}")
    print(f"{'':14s} {args.trivial} trivial trials      {args.sleepy} trials of {SLEEP_S} s "
          f"(ideal {ideal:.1f} s)")
    for name, row in table.items():
        print(f"{name:14s} {row['trivial_wall_s']:6.2f} s {row['trials_per_s']:8.1f}/s    "
              f"{row['sleepy_wall_s']:6.2f} s  efficiency {row['efficiency']:.3f}")
    met = {k: "met" if v else "NOT met" for k, v in report["met"].items()}
    print(f"\nunison on Spark / SparkTrials throughput: {ratio:.1f}x (target >= "
          f"{TARGETS['throughput_vs_sparktrials_min']:.0f}x: {met['throughput_vs_sparktrials']})")
    print(f"unison on Spark efficiency: {table['unison Spark']['efficiency']:.3f} (target >= "
          f"{TARGETS['efficiency_min']}: {met['efficiency']})")
    print(f"written to {out}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("unison", "pyspark", "hyperopt")}


if __name__ == "__main__":
    main()
