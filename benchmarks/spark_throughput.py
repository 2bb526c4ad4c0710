"""unison on Spark vs Hyperopt's SparkTrials vs unison's local backend, on one SparkSession (local[2]).

(a) throughput: 100 trials that do nothing, 2 at a time. Trials per second over the wall time of the
    whole search call (for unison: starting the slot jobs or worker processes, the trials, stopping
    them; for Hyperopt: ``fmin`` with ``SparkTrials(parallelism=2)``, which runs one Spark job per
    trial). Target: unison on Spark >= 20x SparkTrials.
(b) efficiency: 40 trials that sleep 0.5 s, 2 at a time: ideal time 40 x 0.5 / 2 = 10 s; efficiency =
    ideal / measured wall time.

Warm mode: the SparkSession is started (and every contender warmed up with a few trials) before
anything is timed: the figures are "after the session is up".

Cold mode (c), as a user's script runs it: in a fresh Python process (``--cold-repeats`` of them,
interleaved with the warm repeats), create a ``local[2]`` SparkSession just before the search and run
(b) once on it; efficiency = ideal / (search call -> return), the session's own start not counted. The
child also writes a timeline (session start, call, the backend's start/stop, each worker's hello,
the first trial start, the last trial end, return). Targets: >= 0.93 cold, >= 0.97 warm.

unison's contenders are repeated (``--repeats``, interleaved, median reported); SparkTrials, at
seconds per trial, runs ``--hyperopt-repeats`` times (default 1; ``--no-hyperopt`` leaves it out).
Both search with random sampling (unison ``optimizer="random"``, Hyperopt ``rand.suggest``), so the
optimizer's own cost does not enter. The figures go to a table on stdout
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bytecode import use_cached_bytecode

import unison

HERE = Path(__file__).resolve().parent
SLEEP_S = 0.5
SLOTS = 2
TARGETS = {"throughput_vs_sparktrials_min": 20.0, "efficiency_min": 0.97, "cold_efficiency_min": 0.93}


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


# ---------------------------------------------------------------------------------------- cold
def cold_child(trials: int) -> None:
    """One cold search in this fresh process: a new SparkSession, then (b) once; a JSON line on stdout."""
    marks: dict[str, list[float]] = {}

    def stamp(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            marks.setdefault(f"{name} >", []).append(time.time())
            try:
                return fn(*args, **kwargs)
            finally:
                marks.setdefault(f"{name} <", []).append(time.time())
        return wrapped

    from unison.backends.spark import Spark
    from unison.driver.dispatch import RemoteLoop

    Spark.start = stamp("backend start", Spark.start)
    Spark.stop = stamp("backend stop", Spark.stop)
    RemoteLoop._on_hello = stamp("hello", RemoteLoop._on_hello)
    t_session = time.time()
    spark = start_spark(warm=False)
    t_up = time.time()
    storage = Path(tempfile.mkdtemp(prefix="unison-bench-cold-"))
    try:
        search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                               optimizer="random", seed=0)
        t_call = time.time()
        result = unison.run(sleep_trial, search, backend=unison.Spark(spark, slots=SLOTS), storage=storage,
                            progress=False)
        t_return = time.time()
        assert list(result.trials["status"]) == ["completed"] * trials, result.trials
        events = [json.loads(line) for line in (result.path / "journal.jsonl").read_text().splitlines()]
    finally:
        spark.stop()
        shutil.rmtree(storage, ignore_errors=True)
    starts = {e["id"]: e["t"] for e in events if e["e"] == "start"}
    last_end = max(starts[e["id"]] + e["duration"] for e in events if e["e"] == "end")
    timeline = {"session start": t_session, "session up": t_up, "call": t_call,
                **{k: min(v) if k.endswith(">") else max(v) for k, v in marks.items() if "hello" not in k},
                "first hello": min(marks["hello >"]), "last hello": max(marks["hello >"]),
                "first trial start": min(starts.values()), "last trial end": last_end, "return": t_return}
    timeline = {k: v - t_call for k, v in sorted(timeline.items(), key=lambda kv: kv[1])}
    print(json.dumps({"wall_s": t_return - t_call, "startup_s": min(starts.values()) - t_call,
                      "session_start_s": t_up - t_session, "timeline_s": timeline}))


def run_cold(trials: int) -> dict[str, Any]:
    """(c) in a fresh interpreter: this script with ``--cold-child``."""
    proc = subprocess.run([sys.executable, __file__, "--cold-child", str(trials)], capture_output=True,
                          text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the cold child failed ({proc.returncode}):\n{proc.stdout}\n"
                           f"{proc.stderr[-4000:]}")
    return dict(json.loads(lines[-1]))


# ---------------------------------------------------------------------------------------- main
def start_spark(warm: bool = True) -> Any:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{SLOTS}]").appName("unison-spark-throughput")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "1g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    if warm:
        spark.sparkContext.parallelize(range(SLOTS), SLOTS).count()
    return spark


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trivial", type=int, default=100, help="trials of (a) (default 100)")
    parser.add_argument("--sleepy", type=int, default=40, help="trials of (b) and (c) (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of unison's contenders (default 3)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh processes of (c) (default 3)")
    parser.add_argument("--hyperopt-repeats", type=int, default=1, help="repeats of SparkTrials (default 1)")
    parser.add_argument("--no-hyperopt", action="store_true", help="leave SparkTrials out")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 and 8 trials, once each")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes")
    parser.add_argument("--cold-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.trivial, args.sleepy, args.repeats, args.cold_repeats, args.hyperopt_repeats = 20, 8, 1, 1, 1
    return args


Runs = dict[str, dict[str, list[dict[str, Any]]]]


def _measure(args: argparse.Namespace, spark: Any, storage: Path) -> Runs:
    contenders = {
        "unison Spark": lambda fn, n: run_unison(unison.Spark(spark, slots=SLOTS), fn, n, storage),
        "unison Local": lambda fn, n: run_unison(unison.Local(workers=SLOTS), fn, n, storage),
        "SparkTrials": lambda fn, n: run_sparktrials(
            spark, hyperopt_noop if fn is noop_trial else hyperopt_sleep, n),
    }
    if args.no_hyperopt:
        del contenders["SparkTrials"]
    for run in contenders.values():  # warm-up: JVM, Python workers, imports
        run(noop_trial, 4)
    runs: Runs = {name: {"trivial": [], "sleepy": []} for name in contenders}
    runs["unison Spark, cold"] = {"sleepy": []}
    workloads = (("trivial", noop_trial, args.trivial), ("sleepy", sleep_trial, args.sleepy))
    for workload, fn, trials in workloads:
        rounds = max(args.repeats, args.hyperopt_repeats, args.cold_repeats if workload == "sleepy" else 0)
        for repeat in range(rounds):
            if workload == "sleepy" and repeat < args.cold_repeats:  # interleaved with the warm ones
                runs["unison Spark, cold"]["sleepy"].append(run_cold(trials))
                print(f"  {workload:8s} {'unison Spark, cold':18s} "
                      f"{runs['unison Spark, cold']['sleepy'][-1]['wall_s']:7.2f} s", flush=True)
            for name, run in contenders.items():
                limit = args.hyperopt_repeats if name == "SparkTrials" else args.repeats
                if repeat < limit:
                    runs[name][workload].append(run(fn, trials))
                    wall = runs[name][workload][-1]["wall_s"]
                    print(f"  {workload:8s} {name:18s} {wall:7.2f} s", flush=True)
    return runs


def _table(args: argparse.Namespace, runs: Runs) -> dict[str, Any]:
    ideal = args.sleepy * SLEEP_S / SLOTS
    table: dict[str, dict[str, Any]] = {}
    for name, by_workload in runs.items():
        sleepy = by_workload["sleepy"]
        sleepy_wall = statistics.median(r["wall_s"] for r in sleepy)
        row: dict[str, Any] = {"sleepy_wall_s": sleepy_wall, "efficiency": ideal / sleepy_wall,
                               "sleepy_walls_s": [r["wall_s"] for r in sleepy],
                               "startup_s": statistics.median(r["startup_s"] for r in sleepy)
                               if "startup_s" in sleepy[0] else None}
        if "trivial" in by_workload:
            trivial_wall = statistics.median(r["wall_s"] for r in by_workload["trivial"])
            row.update(trivial_wall_s=trivial_wall, trials_per_s=args.trivial / trivial_wall)
        if "timeline_s" in sleepy[0]:
            row["timeline_s"] = sorted(sleepy, key=lambda r: r["wall_s"])[len(sleepy) // 2]["timeline_s"]
            row["session_start_s"] = statistics.median(r["session_start_s"] for r in sleepy)
        table[name] = row
    return table


def main() -> None:
    use_cached_bytecode()  # as an installed unison runs (see _bytecode.py)
    args = _arguments()
    if args.cold_child is not None:
        cold_child(args.cold_child)
        return
    name = "spark_throughput-quick.json" if args.quick else "spark_throughput.json"
    out = args.out or HERE / "results" / name
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    started = time.perf_counter()
    spark = start_spark()
    session_s = time.perf_counter() - started
    storage = Path(tempfile.mkdtemp(prefix="unison-bench-"))
    try:
        runs = _measure(args, spark, storage)
    finally:
        spark.stop()
        shutil.rmtree(storage, ignore_errors=True)
    table = _table(args, runs)
    ratio = (table["unison Spark"]["trials_per_s"] / table["SparkTrials"]["trials_per_s"]
             if "SparkTrials" in table else None)
    warm, cold = table["unison Spark"]["efficiency"], table["unison Spark, cold"]["efficiency"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": _versions(),
        "loadavg_before": load_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if load_before else None,
        "session_start_s": session_s,
        "trivial_trials": args.trivial, "sleepy_trials": args.sleepy, "sleep_s": SLEEP_S, "slots": SLOTS,
        "ideal_sleepy_s": args.sleepy * SLEEP_S / SLOTS, "repeats": args.repeats,
        "cold_repeats": args.cold_repeats,
        "hyperopt_repeats": 0 if args.no_hyperopt else args.hyperopt_repeats,
        "results": table,
        "throughput_vs_sparktrials": ratio,
        "targets": TARGETS,
        "met": {"throughput_vs_sparktrials": None if ratio is None
                else ratio >= TARGETS["throughput_vs_sparktrials_min"],
                "efficiency": warm >= TARGETS["efficiency_min"],
                "cold_efficiency": cold >= TARGETS["cold_efficiency_min"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print(args, report, out)


def _print(args: argparse.Namespace, report: dict[str, Any], out: Path) -> None:
    table, ratio = report["results"], report["throughput_vs_sparktrials"]
    print(f"\nSparkSession local[{SLOTS}] up in {report['session_start_s']:.1f} s (not counted); "
          f"{report['machine']}; load average {report['loadavg_before']} -> {report['loadavg_after']}")
    print(f"{'':20s} {args.trivial} trivial trials      {args.sleepy} trials of {SLEEP_S} s "
          f"(ideal {report['ideal_sleepy_s']:.1f} s)")
    for name, row in table.items():
        trivial = (f"{row['trivial_wall_s']:6.2f} s {row['trials_per_s']:8.1f}/s" if "trials_per_s" in row
                   else f"{'-':>19s}")
        print(f"{name:20s} {trivial}    {row['sleepy_wall_s']:6.2f} s  efficiency {row['efficiency']:.3f}")
    cold = table["unison Spark, cold"]
    print("\ncold timeline (median run; seconds from the search call):")
    for what, t in cold["timeline_s"].items():
        print(f"  {t:+7.3f}  {what}")
    met = {k: "not run" if v is None else "met" if v else "NOT met" for k, v in report["met"].items()}
    if ratio is not None:
        print(f"\nunison on Spark / SparkTrials throughput: {ratio:.1f}x (target >= "
              f"{TARGETS['throughput_vs_sparktrials_min']:.0f}x: {met['throughput_vs_sparktrials']})")
    print(f"unison on Spark efficiency, warm: {table['unison Spark']['efficiency']:.3f} (target >= "
          f"{TARGETS['efficiency_min']}: {met['efficiency']}); cold: {cold['efficiency']:.3f} (target >= "
          f"{TARGETS['cold_efficiency_min']}: {met['cold_efficiency']})")
    print(f"written to {out}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("unison", "pyspark", "hyperopt"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


if __name__ == "__main__":
    main()
