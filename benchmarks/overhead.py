"""How much does unison cost on top of a plain process pool? Measured side by side in one run.

(a) search overhead: the same trial (sleep 50 ms, return a number) run N times through
    ``unison.run(fn, Search(...), backend=Local(workers=2))`` and through a plain
    ``concurrent.futures.ProcessPoolExecutor(2)`` map over the same inputs. Both wall times include
    starting the workers. Target: unison / pool <= 1.03.
(b) throughput: trials that do nothing, unison's local backend with 2 workers, in trials per second
    (target >= 1,000/s); the plain pool and unison's inline backend for reference.
(w) worker start: ``Local``'s spawn request to the worker's hello at a listening socket (median), for
    ``start="fork-server"`` (the default on Linux: forked from the experiment's template process)
    and ``start="fresh"`` (a new interpreter). Target: fork-server <= 15 ms. (a) and (b) run unison
    with both start modes; the targets apply to the default (fork-server): (a) <= 1.015, (b) >= 50%
    of the fork pool's rate.
(c) single-run overhead: ``unison.run(train, hparams=...)`` minus calling ``train(...)`` directly
    (median of many calls; target < 20 ms).
(d) tracking: the search of (a) with ``callbacks=[unison.MLflowLogger("sqlite:///...")]`` against the
    same search with no callback. Target: the trials' path (first trial start to the last trial's end,
    from the journal) with MLflow / without <= 1.05, since logging runs off the trials' path. The
    end-to-end ratio is reported beside it: the experiment's end waits for MLflow to catch up.

unison's searches use ``optimizer="random"``, so that the framework is measured and not the
optimizer; unison's default optimizer (``auto``) is shown for reference in (a) and (b), and TPE in (a).

Each measurement is repeated (``--repeats``, default 3) with the contenders interleaved, so the
machine's noise is shared; the median is reported. The figures go to a table on stdout and to
``benchmarks/results/overhead.json``.

    python benchmarks/overhead.py            # the full run (about 2 minutes on 2 cores)
    python benchmarks/overhead.py --repeats 5
    python benchmarks/overhead.py --quick    # a smoke run (a few seconds)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bytecode import use_cached_bytecode

import unison

HERE = Path(__file__).resolve().parent
SLEEP_S = 0.05
TARGETS = {"search_ratio_max": 1.015, "throughput_min_per_s": 1000.0, "single_run_added_ms_max": 20.0,
           "tracking_trials_ratio_max": 1.05, "worker_start_ms_max": 15.0,
           "throughput_pool_fraction_min": 0.5}
START_MODES = ("fork-server", "fresh")


# ------------------------------------------------------------------------------ trial functions
# Module level, so the plain pool can pickle them by reference; unison ships them with cloudpickle.
def sleep_trial(x: float) -> float:
    time.sleep(SLEEP_S)
    return x


def noop_trial(x: float) -> float:
    return x


def train(hparams: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": hparams["lr"] * 10.0}


# ------------------------------------------------------------------------------------- helpers
def make_search(trials: int, optimizer: str | None = "random") -> unison.Search:
    """The benchmark's search; ``optimizer=None`` leaves unison's default optimizer."""
    extra = {} if optimizer is None else {"optimizer": optimizer}
    return unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=trials, seed=0, **extra)


def search_inputs(trials: int) -> list[float]:
    """The exact ``x`` values unison's random search draws, so the pool gets the same inputs."""
    optimizer = make_search(trials).build_optimizer()
    return [optimizer.suggest(n)["x"] for n in range(trials)]


def journal_phases(path: Path, t_call: float, t_return: float) -> dict[str, float]:
    """Split a unison search's wall time with its journal's time stamps.

    ``startup_s``: the call until the first trial starts (store, payload, worker processes, handshake);
    ``run_s``: the first trial start until the search is marked done (after the workers have exited);
    ``finish_s``: the rest (result files). ``steady_per_s``: trials started per second between the
    first and the last trial start, i.e. the dispatch rate with start-up and wind-down left out.
    """
    starts, done = [], None
    with open(path / "journal.jsonl", encoding="utf-8") as f:
        for line in f:
            ev = json.loads(line)
            if ev.get("e") == "start":
                starts.append(ev["t"])
            elif ev.get("e") == "status" and ev.get("status") not in ("running", "resumed"):
                done = ev["t"]
    starts.sort()
    done = done if done is not None else t_return
    span = starts[-1] - starts[0]
    return {"startup_s": starts[0] - t_call, "run_s": done - starts[0], "finish_s": t_return - done,
            "steady_per_s": (len(starts) - 1) / span if span > 0 else float("nan")}


def time_unison_search(fn: Any, trials: int, backend: Any, storage: Path,
                       optimizer: str | None = "random",
                       callbacks: list[Any] | None = None) -> dict[str, Any]:
    search = make_search(trials, optimizer)
    t_call = time.time()
    t0 = time.perf_counter()
    result = unison.run(fn, search, backend=backend, progress=False, storage=storage, callbacks=callbacks)
    wall = time.perf_counter() - t0
    t_return = time.time()
    done = sum(1 for r in result.rows if r["status"] == "completed")
    if done != trials:
        raise RuntimeError(f"unison completed {done}/{trials} trials; see {result.path}")
    phases = journal_phases(result.path, t_call, t_return)
    shutil.rmtree(result.path, ignore_errors=True)
    return {"wall_s": wall, **phases}


def time_pool(fn: Any, inputs: list[float], workers: int, method: str | None = None) -> float:
    """Wall time of a fresh pool (start-up included) mapping ``fn`` over ``inputs``."""
    ctx = multiprocessing.get_context(method) if method else None
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        out = list(pool.map(fn, inputs))
    wall = time.perf_counter() - t0
    assert len(out) == len(inputs)
    return wall


def med(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------ benchmarks
def run_contenders(contenders: dict[str, Any], repeats: int) -> dict[str, list[Any]]:
    """Run every contender ``repeats`` times, interleaved (order reversed every other round)."""
    runs: dict[str, list[Any]] = {name: [] for name in contenders}
    for rep in range(repeats):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for name in order:
            runs[name].append(contenders[name]())
    return runs


def summarize_unison(runs: list[dict[str, Any]], trials: int) -> dict[str, Any]:
    wall = med([r["wall_s"] for r in runs])
    return {
        "wall_s": wall,
        "per_s": trials / wall,
        "steady_per_s": med([r["steady_per_s"] for r in runs]),
        "phases_s": {k: med([r[k] for r in runs]) for k in ("startup_s", "run_s", "finish_s")},
    }


def bench_search(trials: int, workers: int, repeats: int, storage: Path) -> dict[str, Any]:
    inputs = search_inputs(trials)
    runs = run_contenders({
        "unison": lambda: time_unison_search(sleep_trial, trials, unison.Local(workers=workers), storage),
        "unison_fresh": lambda: time_unison_search(sleep_trial, trials,
                                                   unison.Local(workers=workers, start="fresh"), storage),
        "pool": lambda: time_pool(sleep_trial, inputs, workers),
        "pool_spawn": lambda: time_pool(sleep_trial, inputs, workers, "spawn"),
        "unison_default_optimizer": lambda: time_unison_search(
            sleep_trial, trials, unison.Local(workers=workers), storage, optimizer=None),
        "unison_tpe": lambda: time_unison_search(  # issue 19, target 2: TPE off the critical path
            sleep_trial, trials, unison.Local(workers=workers), storage, optimizer="tpe"),
    }, repeats)
    u = summarize_unison(runs["unison"], trials)
    d = summarize_unison(runs["unison_default_optimizer"], trials)
    tpe = summarize_unison(runs["unison_tpe"], trials)
    p = med(runs["pool"])
    return {
        "trials": trials, "workers": workers, "sleep_s": SLEEP_S, "ideal_s": trials * SLEEP_S / workers,
        "unison_s": u["wall_s"], "pool_s": p, "pool_spawn_s": med(runs["pool_spawn"]),
        "ratio": u["wall_s"] / p, "start": unison.Local().start_mode,
        "fresh": {"wall_s": med([r["wall_s"] for r in runs["unison_fresh"]]),
                  "ratio": med([r["wall_s"] for r in runs["unison_fresh"]]) / p},
        "ratio_per_repeat": [r["wall_s"] / q for r, q in zip(runs["unison"], runs["pool"], strict=True)],
        # wall time added per trial on its worker slot: (unison - pool) * workers / trials
        "overhead_ms_per_trial": (u["wall_s"] - p) * workers / trials * 1e3,
        "unison_phases_s": u["phases_s"],
        "default_optimizer": {"optimizer": unison.Search({"x": 1.0}).optimizer, "wall_s": d["wall_s"],
                              "ratio": d["wall_s"] / p},
        "tpe": {"wall_s": tpe["wall_s"], "ratio": tpe["wall_s"] / p},
        "runs": runs,
    }


def bench_throughput(trials: int, workers: int, repeats: int, storage: Path) -> dict[str, Any]:
    inputs = search_inputs(trials)
    runs = run_contenders({
        "unison_local": lambda: time_unison_search(noop_trial, trials, unison.Local(workers=workers),
                                                   storage),
        "unison_local_fresh": lambda: time_unison_search(
            noop_trial, trials, unison.Local(workers=workers, start="fresh"), storage),
        "unison_inline": lambda: time_unison_search(noop_trial, trials, unison.Inline(), storage),
        "pool": lambda: time_pool(noop_trial, inputs, workers),
        "pool_spawn": lambda: time_pool(noop_trial, inputs, workers, "spawn"),
        "unison_local_default_optimizer": lambda: time_unison_search(
            noop_trial, trials, unison.Local(workers=workers), storage, optimizer=None),
    }, repeats)
    out: dict[str, Any] = {"trials": trials, "workers": workers}
    for who in ("unison_local", "unison_local_fresh", "unison_inline", "unison_local_default_optimizer"):
        out[who] = summarize_unison(runs[who], trials)
    out["unison_local_default_optimizer"]["optimizer"] = unison.Search({"x": 1.0}).optimizer
    for who in ("pool", "pool_spawn"):
        out[who] = {"wall_s": med(runs[who]), "per_s": trials / med(runs[who])}
    out["pool_fraction"] = out["unison_local"]["per_s"] / out["pool"]["per_s"]
    out["pool_fraction_fresh"] = out["unison_local_fresh"]["per_s"] / out["pool"]["per_s"]
    out["runs"] = runs
    return out


def time_worker_starts(start: str, starts: int, storage: Path) -> list[float]:
    """Seconds from ``Local``'s spawn request to the worker's hello, ``starts`` times (after one start
    that is not timed: it includes the template's own start). Each worker then exits by itself: its
    payload is not one, so it tells the driver's side so and ends."""
    import socket

    from unison.launch import LaunchSpec
    from unison.protocol import new_secret, server_handshake

    folder = Path(tempfile.mkdtemp(prefix=f"starts-{start}-", dir=storage))
    (folder / "payload.bin").write_bytes(b"not a payload")
    listener = socket.create_server(("127.0.0.1", 0))
    secret = new_secret()
    spec = LaunchSpec(listener.getsockname()[:2], secret, folder / "payload.bin", folder / "workers", 1)
    backend = unison.Local(workers=1, start=start)
    times = []
    try:
        t0 = time.perf_counter()
        backend.start(spec)
        for i in range(starts + 1):
            if i:
                t0 = time.perf_counter()
                backend._spawn(0)  # what the backend does to replace a worker: the spawn request
            sock, _ = listener.accept()
            conn = server_handshake(sock, secret, timeout=30)
            hello = conn.recv()
            if i:
                times.append(time.perf_counter() - t0)
            assert hello["t"] == "hello", hello
            conn.close()
    finally:
        backend.stop(force=True)
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
    return times


def time_bare_forks(starts: int) -> list[float]:
    """The floor under (w) on this machine now: ``os.fork()`` to a byte from the child over loopback."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    times = []
    for _ in range(starts):
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            with socket.create_connection(listener.getsockname()[:2]) as sock:
                sock.sendall(b"!")
            os._exit(0)
        sock, _ = listener.accept()
        sock.recv(1)
        times.append(time.perf_counter() - t0)
        sock.close()
        os.waitpid(pid, 0)
    listener.close()
    return times


def bench_worker_start(starts: int, repeats: int, storage: Path) -> dict[str, Any]:
    contenders = {mode: lambda mode=mode: time_worker_starts(mode, starts, storage) for mode in START_MODES}
    runs = run_contenders({**contenders, "bare_fork": lambda: time_bare_forks(starts)}, repeats)
    return {"starts": starts * repeats,
            **{mode: {"median_ms": med([t for r in runs[mode] for t in r]) * 1e3,
                      "max_ms": max(t for r in runs[mode] for t in r) * 1e3} for mode in runs}}


def bench_single(calls: int, repeats: int, storage: Path) -> dict[str, Any]:
    hparams = {"lr": 0.01, "epochs": 1}
    medians_direct, medians_unison = [], []
    for _ in range(repeats):
        direct, wrapped = [], []
        for _ in range(calls):  # interleaved call by call
            t0 = time.perf_counter()
            train(hparams=hparams)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = unison.run(train, hparams=hparams, storage=storage)
            wrapped.append(time.perf_counter() - t0)
            shutil.rmtree(result.path, ignore_errors=True)
        medians_direct.append(med(direct))
        medians_unison.append(med(wrapped))
    d, u = med(medians_direct), med(medians_unison)
    return {"calls": calls, "direct_ms": d * 1e3, "unison_ms": u * 1e3, "added_ms": (u - d) * 1e3,
            "unison_ms_per_repeat": [x * 1e3 for x in medians_unison]}


def bench_tracking(trials: int, workers: int, repeats: int, storage: Path) -> dict[str, Any]:
    """(d): the search of (a) with an MLflowLogger writing to a SQLite store, and without it."""
    from mlflow.tracking import MlflowClient

    def with_mlflow() -> dict[str, Any]:
        folder = Path(tempfile.mkdtemp(prefix="mlflow-", dir=storage))
        uri = f"sqlite:///{folder}/mlflow.db"
        # creates the database's tables outside the timing, and keeps the artifacts out of ./mlruns
        MlflowClient(uri).create_experiment("overhead-benchmark", artifact_location=(folder / "art").as_uri())
        logger = unison.MLflowLogger(uri, "overhead-benchmark")
        return time_unison_search(sleep_trial, trials, unison.Local(workers=workers), storage,
                                  callbacks=[logger])

    runs = run_contenders({
        "none": lambda: time_unison_search(sleep_trial, trials, unison.Local(workers=workers), storage),
        "mlflow": with_mlflow,
    }, repeats)
    n, m = summarize_unison(runs["none"], trials), summarize_unison(runs["mlflow"], trials)
    return {
        "trials": trials, "workers": workers, "sleep_s": SLEEP_S,
        "none": n, "mlflow": m,
        "trials_ratio": m["phases_s"]["run_s"] / n["phases_s"]["run_s"],
        "wall_ratio": m["wall_s"] / n["wall_s"],
        "drain_s": m["phases_s"]["finish_s"],  # the experiment's end waiting for MLflow
        # MLflow is the slower side: from the first trial's start until it caught up, per trial
        "mlflow_ms_per_trial": (m["phases_s"]["finish_s"] + m["phases_s"]["run_s"]) / trials * 1e3,
        "runs": runs,
    }


# --------------------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "unison": unison.__version__,
            "mp_start_method": multiprocessing.get_start_method()}


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\nunison overhead benchmark: {res['date']}, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
          f"median of {res['repeats']} repeat(s); unison runs use optimizer='random' unless marked\n")
    if "search" in res:
        print_search(res)
    if "tracking" in res:
        print_tracking(res["tracking"])


def print_tracking(k: dict[str, Any]) -> None:
    width = 50
    print(f"(d) tracking: {k['trials']} trials x sleep {k['sleep_s'] * 1e3:.0f} ms on {k['workers']} "
          f"workers, MLflowLogger to SQLite against no callback")
    for label, key in (("no callback", "none"), ("callbacks=[MLflowLogger('sqlite:///...')]", "mlflow")):
        r = k[key]
        print(f"    {label:<{width}}{r['wall_s']:8.3f} s   trials {r['phases_s']['run_s']:.3f} s, "
              f"end (waiting for the callbacks) {r['phases_s']['finish_s']:.3f} s")
    target = TARGETS["tracking_trials_ratio_max"]
    print(f"    => trials' path ratio {k['trials_ratio']:.4f}, target <= {target}: "
          f"{verdict(k['trials_ratio'] <= target)}; end to end {k['wall_ratio']:.3f} "
          f"(MLflow to SQLite took in one trial per {k['mlflow_ms_per_trial']:.0f} ms)\n")


def print_search(res: dict[str, Any]) -> None:
    m, s, t, c = res["machine"], res["search"], res["throughput"], res["single"]
    pool = f"ProcessPoolExecutor({s['workers']}) [{m['mp_start_method']}]"
    spawn = f"ProcessPoolExecutor({s['workers']}) [spawn]"
    local = f"unison Local(workers={s['workers']})"
    width = 50
    print(f"\nunison overhead benchmark: {res['date']}, {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
          f"median of {res['repeats']} repeat(s); unison runs use optimizer='random' unless marked\n")

    ph = s["unison_phases_s"]
    print(f"(a) search: {s['trials']} trials x sleep {s['sleep_s'] * 1e3:.0f} ms on {s['workers']} workers "
          f"(ideal {s['ideal_s']:.2f} s), wall time with worker start-up")
    print(f"    {local:<{width}}{s['unison_s']:8.3f} s   start-up {ph['startup_s']:.3f} s, trials + worker "
          f"exit {ph['run_s']:.3f} s, rest {ph['finish_s']:.3f} s")
    fresh = f"{local[:-1]}, start='fresh')"
    print(f"    {fresh:<{width}}{s['fresh']['wall_s']:8.3f} s   ratio {s['fresh']['ratio']:.4f}")
    print(f"    {pool:<{width}}{s['pool_s']:8.3f} s")
    print(f"    {spawn:<{width}}{s['pool_spawn_s']:8.3f} s   (reference)")
    do = s["default_optimizer"]
    label = f"{local[:-1]}, default optimizer {do['optimizer']!r})"
    print(f"    {label:<{width}}{do['wall_s']:8.3f} s   (reference: ratio {do['ratio']:.4f})")
    if "tpe" in s:
        label = f"{local[:-1]}, optimizer='tpe')"
        print(f"    {label:<{width}}{s['tpe']['wall_s']:8.3f} s   (ratio {s['tpe']['ratio']:.4f}, "
              f"issue 19 target <= 1.03)")
    print(f"    => ratio unison (start={s['start']!r})/pool {s['ratio']:.4f}, "
          f"target <= {TARGETS['search_ratio_max']}: "
          f"{verdict(s['ratio'] <= TARGETS['search_ratio_max'])}; "
          f"{s['overhead_ms_per_trial']:.2f} ms added per trial per worker slot\n")

    print(f"(b) throughput: {t['trials']} no-op trials, {t['workers']} workers, trials/s end to end "
          f"(steady: between first and last trial start)")
    default = f"{local[:-1]}, default optimizer {t['unison_local_default_optimizer']['optimizer']!r})"
    for label, key in ((local, "unison_local"), (fresh, "unison_local_fresh"),
                       ("unison Inline()", "unison_inline"), (default, "unison_local_default_optimizer")):
        r = t[key]
        print(f"    {label:<{width}}{r['per_s']:8.0f}/s  ({r['wall_s']:.3f} s; "
              f"steady {r['steady_per_s']:.0f}/s)")
    for label, key in ((pool, "pool"), (spawn, "pool_spawn")):
        print(f"    {label:<{width}}{t[key]['per_s']:8.0f}/s  ({t[key]['wall_s']:.3f} s)")
    lo, frac = t["unison_local"]["per_s"], t["pool_fraction"]
    print(f"    => unison Local {lo:.0f}/s, target >= {TARGETS['throughput_min_per_s']:.0f}/s: "
          f"{verdict(lo >= TARGETS['throughput_min_per_s'])}; {frac:.0%} of the fork pool's rate "
          f"(start='fresh': {t['pool_fraction_fresh']:.0%}), target >= "
          f"{TARGETS['throughput_pool_fraction_min']:.0%}: "
          f"{verdict(frac >= TARGETS['throughput_pool_fraction_min'])}\n")

    w = res["worker_start"]
    print(f"(w) worker start: spawn request -> hello at the driver's socket, median of {w['starts']}")
    for mode in START_MODES:
        print(f"    {f'Local(start={mode!r})':<{width}}{w[mode]['median_ms']:8.2f} ms  "
              f"(max {w[mode]['max_ms']:.1f} ms)")
    print(f"    {'os.fork() + connect, the floor (reference)':<{width}}{w['bare_fork']['median_ms']:8.2f} ms")
    print(f"    => fork-server {w['fork-server']['median_ms']:.2f} ms, target <= "
          f"{TARGETS['worker_start_ms_max']:.0f} ms: "
          f"{verdict(w['fork-server']['median_ms'] <= TARGETS['worker_start_ms_max'])}\n")

    print(f"(c) single run: median of {c['calls']} calls")
    print(f"    {'train(...) called directly':<{width}}{c['direct_ms']:8.3f} ms")
    print(f"    {'unison.run(train, hparams=...)':<{width}}{c['unison_ms']:8.3f} ms")
    print(f"    => added {c['added_ms']:.2f} ms, target < {TARGETS['single_run_added_ms_max']:.0f} ms: "
          f"{verdict(c['added_ms'] < TARGETS['single_run_added_ms_max'])}\n")


def main(argv: list[str] | None = None) -> int:
    use_cached_bytecode()  # as an installed unison runs (see _bytecode.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run with small sizes")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=["overhead", "tracking"], default=None,
                        help="only (a)-(c), or only (d) (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/overhead.json; "
                             "overhead-quick.json with --quick)")
    parser.add_argument("--storage", type=Path, default=None,
                        help="where experiment directories go (default: a temporary folder)")
    args = parser.parse_args(argv)

    repeats = args.repeats or (1 if args.quick else 3)
    search_trials, throughput_trials, single_calls = (40, 200, 5) if args.quick else (200, 1000, 30)
    worker_starts = 5 if args.quick else 20
    name = "overhead" + ("-tracking" if args.only == "tracking" else "") + ("-quick" if args.quick else "")
    out = args.out or HERE / "results" / f"{name}.json"

    tmp = Path(tempfile.mkdtemp(prefix="unison-bench-", dir=args.storage))
    try:
        # warm-up, not measured: imports, first-use caches, first process start-ups
        time_unison_search(noop_trial, 4, unison.Local(workers=args.workers), tmp)
        time_unison_search(noop_trial, 4, unison.Inline(), tmp)
        time_pool(noop_trial, [0.0] * 4, args.workers)
        shutil.rmtree(unison.run(train, hparams={"lr": 0.1}, storage=tmp).path)

        res: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine(),
            "quick": args.quick,
            "repeats": repeats,
            "targets": TARGETS,
        }
        if args.only != "tracking":
            print(f"(a) search overhead: {search_trials} trials x {repeats} ...", file=sys.stderr, flush=True)
            res["search"] = bench_search(search_trials, args.workers, repeats, tmp)
            print(f"(b) throughput: {throughput_trials} trials x {repeats} ...", file=sys.stderr, flush=True)
            res["throughput"] = bench_throughput(throughput_trials, args.workers, repeats, tmp)
            print(f"(w) worker start: {worker_starts} starts x {repeats} ...", file=sys.stderr, flush=True)
            res["worker_start"] = bench_worker_start(worker_starts, repeats, tmp)
            print(f"(c) single run: {single_calls} calls x {repeats} ...", file=sys.stderr, flush=True)
            res["single"] = bench_single(single_calls, repeats, tmp)
        if args.only != "overhead":
            print(f"(d) tracking: {search_trials} trials x {repeats} ...", file=sys.stderr, flush=True)
            res["tracking"] = bench_tracking(search_trials, args.workers, repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    res["met"] = {}
    if "search" in res:
        res["met"].update({
            "search_ratio": res["search"]["ratio"] <= TARGETS["search_ratio_max"],
            "throughput": res["throughput"]["unison_local"]["per_s"] >= TARGETS["throughput_min_per_s"],
            "single_run": res["single"]["added_ms"] < TARGETS["single_run_added_ms_max"],
            "throughput_pool_fraction": (res["throughput"]["pool_fraction"]
                                         >= TARGETS["throughput_pool_fraction_min"]),
            "worker_start": (res["worker_start"]["fork-server"]["median_ms"]
                             <= TARGETS["worker_start_ms_max"]),
        })
    if "tracking" in res:
        res["met"]["tracking_trials_ratio"] = (res["tracking"]["trials_ratio"]
                                               <= TARGETS["tracking_trials_ratio_max"])
    print_report(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
