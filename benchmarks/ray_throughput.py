"""unison on Ray vs Ray Tune's Tuner (default, and with actor reuse) vs unison's local backend, on one Ray.

(a) throughput: 200 trials that do nothing, 2 at a time. Trials per second over the wall time of the
    whole call (for unison: starting the 2 long-lived slot actors or worker processes, the trials,
    stopping them; for Tune: ``Tuner.fit``, which by default starts a new actor per trial, or with
    ``reuse_actors=True`` keeps them). Targets: unison on Ray >= 20x Tune's default, >= 3x Tune with
    actor reuse.
(b) efficiency: 40 trials that sleep 0.5 s, 2 at a time: ideal time 40 x 0.5 / 2 = 10 s; efficiency =
    ideal / measured wall time. Target: >= 0.95 for unison on Ray.
"unison Ray" starts (and kills) its 2 actors in every call; "unison Ray kept" is one
``unison.Ray(keep_actors=True)`` whose actors, started by the warm-up, serve every later call.

One local Ray (``ray.init(address="local", num_cpus=4)``, token authentication off) is started, and every
contender warmed up with a few trials, before anything is timed: the figures are "after Ray is up".
unison's contenders and Tune with actor reuse are repeated (``--repeats``, interleaved, median reported);
Tune's default, at about a second per trial, runs ``--tune-default-repeats`` times (default 1) and on
``--tune-default-trivial`` trivial trials (default 30, not 200: its trials/s is what is compared). Every
side samples at random (unison ``optimizer="random"``, Tune's default ``BasicVariantGenerator``), so the
optimizer's own cost does not enter. The figures go to a table on stdout and to
``benchmarks/results/ray_throughput.json``.

    pip install -e '.[ray]' 'ray[tune]'
    python benchmarks/ray_throughput.py           # the full run (about 8 minutes on 2 cores)
    python benchmarks/ray_throughput.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import unison

HERE = Path(__file__).resolve().parent
SLEEP_S = 0.5
SLOTS = 2
TARGETS = {"throughput_vs_tune_default_min": 20.0, "throughput_vs_tune_reuse_min": 3.0,
           "efficiency_min": 0.95}
UNISON_RAY, UNISON_KEPT, UNISON_LOCAL = "unison Ray", "unison Ray kept", "unison Local"
TUNE_DEFAULT, TUNE_REUSE = "Tune default", "Tune reuse_actors"


# ------------------------------------------------------------------------------ trial functions
def noop_trial(x: float) -> float:
    return x


def sleep_trial(x: float) -> float:
    time.sleep(SLEEP_S)
    return x


def tune_noop(config: dict[str, float]) -> None:
    from ray import tune

    tune.report({"value": config["x"]})


def tune_sleep(config: dict[str, float]) -> None:
    from ray import tune

    time.sleep(SLEEP_S)
    tune.report({"value": config["x"]})


TUNE_FN = {noop_trial: tune_noop, sleep_trial: tune_sleep}


# ---------------------------------------------------------------------------------- contenders
def run_unison(backend: Any, fn: Any, trials: int, storage: Path) -> dict[str, Any]:
    """One search; its wall time split with the journal's time stamps."""
    search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                           optimizer="random", seed=0)
    t_call = time.time()
    start = time.perf_counter()
    result = unison.run(fn, search, backend=backend, storage=storage, progress=False)
    wall = time.perf_counter() - start
    t_return = t_call + wall
    assert list(result.trials["status"]) == ["completed"] * trials, result.trials
    events = [json.loads(line) for line in (result.path / "journal.jsonl").read_text().splitlines()]
    starts = [e["t"] for e in events if e.get("e") == "start"]
    status = [e["t"] for e in events if e.get("e") == "status"]
    return {"wall_s": wall,
            "open_s": status[0] - t_call,  # the call until the experiment is open and running
            "startup_s": min(starts) - t_call,  # the call until the first trial starts
            "trials_s": status[-1] - min(starts),  # first start until the search is recorded done
            "close_s": t_return - status[-1]}  # then stopping the workers, until the call returns


def run_tune(fn: Any, trials: int, storage: Path, reuse: bool) -> dict[str, Any]:
    """One ``Tuner.fit`` with Tune's defaults (``reuse_actors`` aside), quiet."""
    from ray import tune

    logging.getLogger("ray.tune").setLevel(logging.WARNING)

    tuner = tune.Tuner(
        fn, param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=SLOTS, metric="value",
                                    mode="max", reuse_actors=reuse),
        run_config=tune.RunConfig(storage_path=str(storage), name=f"tune-{time.monotonic_ns()}", verbose=0))
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    assert len(results) == trials and not results.errors, results.errors
    assert all("value" in (results[i].metrics or {}) for i in range(trials)), "a Tune trial did not report"
    return {"wall_s": wall}


# ---------------------------------------------------------------------------------------- main
def start_ray() -> float:
    """A local Ray of ``SLOTS`` CPUs of this process's own; how long it took to start."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # before ray is imported: token auth is on by default
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's older reporter: silent at verbose=0 (the new one is not)
    import ray

    started = time.perf_counter()
    # 2 x SLOTS logical CPUs: the kept actors of "unison Ray kept" hold SLOTS of them between its runs
    # (idle: they take no CPU time), and every contender asks for SLOTS at a time
    ray.init(address="local", num_cpus=2 * SLOTS, include_dashboard=False)
    ray.get([ray.remote(lambda: None).remote() for _ in range(SLOTS)])
    return time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--trivial", type=int, default=200, help="trials of (a) (default 200)")
    parser.add_argument("--sleepy", type=int, default=40, help="trials of (b) (default 40)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="repeats of unison's contenders and of Tune with actor reuse (default 3)")
    parser.add_argument("--tune-default-trivial", type=int, default=30,
                        help="trials of (a) for Tune's default, at ~1 trial/s (default 30)")
    parser.add_argument("--tune-default-repeats", type=int, default=1, help="repeats of Tune's default (1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 and 8 trials, once each")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes")
    args = parser.parse_args()
    if args.quick:
        args.trivial, args.sleepy, args.repeats, args.tune_default_trivial = 20, 8, 1, 8
        args.tune_default_repeats = 1
    return args


def measure(args: argparse.Namespace, storage: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every contender warmed up, then both workloads, repeats interleaved."""
    kept = unison.Ray(slots=SLOTS, keep_actors=True)  # one backend: its actors serve every later run
    contenders: dict[str, Callable[[Any, int], dict[str, Any]]] = {
        UNISON_RAY: lambda fn, n: run_unison(unison.Ray(slots=SLOTS), fn, n, storage),
        UNISON_KEPT: lambda fn, n: run_unison(kept, fn, n, storage),
        UNISON_LOCAL: lambda fn, n: run_unison(unison.Local(workers=SLOTS), fn, n, storage),
        TUNE_REUSE: lambda fn, n: run_tune(TUNE_FN[fn], n, storage, reuse=True),
        TUNE_DEFAULT: lambda fn, n: run_tune(TUNE_FN[fn], n, storage, reuse=False),
    }
    for run in contenders.values():  # warm-up: imports, Ray's worker processes, Tune's first start
        run(noop_trial, 4)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"trivial": [], "sleepy": []}
                                                        for name in contenders}
    for workload, fn, trials in (("trivial", noop_trial, args.trivial), ("sleepy", sleep_trial, args.sleepy)):
        for repeat in range(max(args.repeats, args.tune_default_repeats)):
            for name, run in contenders.items():
                limit = args.tune_default_repeats if name == TUNE_DEFAULT else args.repeats
                if repeat >= limit:
                    continue
                n = args.tune_default_trivial if (name, workload) == (TUNE_DEFAULT, "trivial") else trials
                runs[name][workload].append(record := {"trials": n, **run(fn, n)})
                first = f" (first trial after {record['startup_s']:.2f} s)" if "startup_s" in record else ""
                print(f"  {workload:8s} {name:18s} {n:4d} trials {record['wall_s']:7.2f} s{first}",
                      flush=True)
    kept.close()
    return runs


def summarize(runs: dict[str, dict[str, list[dict[str, Any]]]], ideal: float) -> dict[str, dict[str, Any]]:
    """Medians per contender and workload."""
    table: dict[str, dict[str, Any]] = {}
    for name, by_workload in runs.items():
        trivial, sleepy = by_workload["trivial"], by_workload["sleepy"]
        trivial_wall = statistics.median(r["wall_s"] for r in trivial)
        sleepy_wall = statistics.median(r["wall_s"] for r in sleepy)
        row: dict[str, Any] = {
            "trivial_trials": trivial[0]["trials"],
            "trivial_wall_s": trivial_wall,
            "trials_per_s": trivial[0]["trials"] / trivial_wall,
            "sleepy_wall_s": sleepy_wall,
            "efficiency": ideal / sleepy_wall,
            "trivial_walls_s": [r["wall_s"] for r in trivial],
            "sleepy_walls_s": [r["wall_s"] for r in sleepy],
        }
        if "startup_s" in sleepy[0]:
            for part in ("open_s", "startup_s", "trials_s", "close_s"):
                row[f"trivial_{part}"] = statistics.median(r[part] for r in trivial)
                row[f"sleepy_{part}"] = statistics.median(r[part] for r in sleepy)
        table[name] = row
    return table


def main() -> None:
    args = parse_args()
    out = args.out or HERE / "results" / f"ray_throughput{'-quick' if args.quick else ''}.json"
    load_before = os.getloadavg()
    ray_start_s = start_ray()
    import ray

    storage = Path(tempfile.mkdtemp(prefix="unison-bench-"))
    try:
        runs = measure(args, storage)
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    load_after = os.getloadavg()

    ideal = args.sleepy * SLEEP_S / SLOTS
    table = summarize(runs, ideal)
    ours = table[UNISON_RAY]
    ratios = {"throughput_vs_tune_default": ours["trials_per_s"] / table[TUNE_DEFAULT]["trials_per_s"],
              "throughput_vs_tune_reuse": ours["trials_per_s"] / table[TUNE_REUSE]["trials_per_s"]}
    met = {key: value >= TARGETS[f"{key}_min"] for key, value in ratios.items()}
    met["efficiency"] = ours["efficiency"] >= TARGETS["efficiency_min"]
    met["efficiency_kept_actors"] = table[UNISON_KEPT]["efficiency"] >= TARGETS["efficiency_min"]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(), "versions": _versions(),
        "load_average_before": load_before, "load_average_after": load_after,
        "ray_start_s": ray_start_s,
        "trivial_trials": args.trivial, "tune_default_trivial_trials": args.tune_default_trivial,
        "sleepy_trials": args.sleepy, "sleep_s": SLEEP_S, "slots": SLOTS, "ideal_sleepy_s": ideal,
        "repeats": args.repeats, "tune_default_repeats": args.tune_default_repeats,
        "results": table, **ratios, "targets": TARGETS, "met": met,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, out)


def print_report(report: dict[str, Any], out: Path) -> None:
    """The table and the targets, on stdout."""
    table, met = report["results"], {k: "met" if v else "NOT met" for k, v in report["met"].items()}
    load = report["load_average_before"][0], report["load_average_after"][0]
    print(f"\nlocal Ray ({2 * SLOTS} logical CPUs, {SLOTS} trials at a time per contender) up in "
          f"{report['ray_start_s']:.1f} s (not counted); {report['machine']}; load average {load[0]:.2f} "
          f"before, {load[1]:.2f} after")
    print(f"{'':18s} trivial trials                  {report['sleepy_trials']} trials of {SLEEP_S} s "
          f"(ideal {report['ideal_sleepy_s']:.1f} s)")
    for name, row in table.items():
        print(f"{name:18s} {row['trivial_trials']:4d} in {row['trivial_wall_s']:6.2f} s "
              f"{row['trials_per_s']:8.1f}/s    {row['sleepy_wall_s']:6.2f} s  "
              f"efficiency {row['efficiency']:.3f}")
    if report["tune_default_trivial_trials"] != report["trivial_trials"]:
        print(f"({TUNE_DEFAULT} ran {report['tune_default_trivial_trials']} trivial trials, not "
              f"{report['trivial_trials']}: trials/s is what is compared)")
    for key, target in (("throughput_vs_tune_default", "throughput_vs_tune_default_min"),
                        ("throughput_vs_tune_reuse", "throughput_vs_tune_reuse_min")):
        print(f"unison on Ray / {key.removeprefix('throughput_vs_').replace('_', ' ')} throughput: "
              f"{report[key]:.1f}x (target >= {TARGETS[target]:.0f}x: {met[key]})")
    ours = table[UNISON_RAY]
    print(f"unison on Ray efficiency: {ours['efficiency']:.3f} (target >= {TARGETS['efficiency_min']}: "
          f"{met['efficiency']}); 0.5 s workload: {ours['sleepy_open_s']:.2f} s to open the experiment, "
          f"{ours['sleepy_startup_s']:.2f} s to the first trial, {ours['sleepy_trials_s']:.2f} s of trials, "
          f"{ours['sleepy_close_s']:.2f} s to return")
    kept = table[UNISON_KEPT]
    print(f"unison on Ray with keep_actors=True (actors kept from the previous run): efficiency "
          f"{kept['efficiency']:.3f} ({met['efficiency_kept_actors']}), "
          f"{kept['sleepy_startup_s']:.2f} s to the first trial")
    print(f"written to {out}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("unison", "ray")}


if __name__ == "__main__":
    main()
