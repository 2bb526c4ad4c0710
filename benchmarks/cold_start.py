"""The first search in a fresh Python process, as a user's script runs it: unison against peers.

Every measurement runs in a new interpreter (``python cold_start.py --child ...``), so nothing is warm:
the imports, the worker processes, the optimizer. Timed from the call (``unison.run``, ``optimize``,
``pool.map``) to its return; the imports are timed on their own before it.

(a) 200 trials that do nothing, 2 workers, random sampling: unison ``Local(workers=2)`` (each start mode
    it has), a fork ``ProcessPoolExecutor(2)``, Optuna with 2 threads (in-memory study).
(b) 40 trials of 0.5 s, each reporting 5 times (every 0.1 s), 2 at a time, each side's default
    optimizer: ideal 40 x 0.5 / 2 = 10 s; efficiency = ideal / wall (also with the import added: a peer
    imports Optuna before the call, unison imports it inside). unison ``Local(workers=2)``, Optuna
    with 2 threads, Optuna with 2 processes sharing a journal file (``JournalStorage``; the processes'
    start is timed), a plain ``ProcessPoolExecutor(2)``. Target (issue 19, target 5): unison >= 0.985
    and ahead of every peer.
(c) unison's cold path split with its journal's time stamps: the call until the experiment is marked
    running (store, payload, optimizer), until the first trial starts (worker processes, handshake, the
    first suggestion); target: the call to the first trial start <= 100 ms.

Contenders are interleaved over ``--repeats`` (default 5) and the median reported. Figures go to a table
on stdout and to ``benchmarks/results/cold_start.json``.

    python benchmarks/cold_start.py             # about 3 minutes on 2 cores
    python benchmarks/cold_start.py --quick     # a smoke run (1 repeat, smaller sizes)
"""

from __future__ import annotations

import argparse
import inspect
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

HERE = Path(__file__).resolve().parent
TARGETS = {"efficiency_min": 0.985, "first_start_s_max": 0.100}
REPORTS, REPORT_EVERY_S = 5, 0.1


# ---------------------------------------------------------------------------------- trial functions
def noop_trial(x: float) -> float:
    return x


def reporting_trial(x: float, reporter: Any = None) -> float:
    """0.5 s of "training", reporting every 0.1 s (to unison's reporter, or nowhere)."""
    for step in range(REPORTS):
        time.sleep(REPORT_EVERY_S)
        if reporter is not None:
            reporter.report(step=step, loss=x * (REPORTS - step))
    return x


def optuna_reporting(trial: Any) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    for step in range(REPORTS):
        time.sleep(REPORT_EVERY_S)
        trial.report(x * (REPORTS - step), step)
    return x


def optuna_noop(trial: Any) -> float:
    return trial.suggest_float("x", 0.0, 1.0)


# ---------------------------------------------------------------------------------- child runs
def journal_marks(path: Path) -> dict[str, float]:
    """The journal's first ``running`` status and first trial start (Unix times)."""
    marks: dict[str, float] = {}
    with open(path / "journal.jsonl", encoding="utf-8") as f:
        for line in f:
            ev = json.loads(line)
            if ev.get("e") == "status" and ev.get("status") == "running":
                marks.setdefault("running", ev["t"])
            elif ev.get("e") == "start":
                marks["first_start"] = min(marks.get("first_start", ev["t"]), ev["t"])
    return marks


def child_unison(workload: str, trials: int, start: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    import unison
    imported = time.perf_counter() - t0
    kwargs = {"start": start} if start else {}
    backend = unison.Local(workers=2, **kwargs)
    if workload == "noop":
        fn: Any = noop_trial
        search = unison.Search({"x": unison.uniform(0, 1)}, metric="x", trials=trials, optimizer="random",
                               seed=0)
    else:
        fn = reporting_trial
        search = unison.Search({"x": unison.uniform(0, 1)}, metric="loss", mode="min", trials=trials, seed=0)
    storage = Path(tempfile.mkdtemp(prefix="unison-cold-"))
    t_call = time.time()
    t1 = time.perf_counter()
    result = unison.run(fn, search, backend=backend, progress=False, storage=storage)
    wall = time.perf_counter() - t1
    done = sum(1 for r in result.rows if r["status"] == "completed")
    marks = journal_marks(result.path)
    shutil.rmtree(storage, ignore_errors=True)
    if done != trials:
        raise RuntimeError(f"unison completed {done}/{trials} trials")
    return {"import_s": imported, "wall_s": wall, "setup_s": marks["running"] - t_call,
            "first_start_s": marks["first_start"] - t_call}


def child_pool(workload: str, trials: int) -> dict[str, Any]:
    import concurrent.futures as cf
    import multiprocessing

    fn = noop_trial if workload == "noop" else reporting_trial
    t1 = time.perf_counter()
    with cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        out = list(pool.map(fn, [i / trials for i in range(trials)]))
    wall = time.perf_counter() - t1
    assert len(out) == trials
    return {"import_s": 0.0, "wall_s": wall}


def child_optuna_threads(workload: str, trials: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    import optuna
    imported = time.perf_counter() - t0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = optuna.samplers
    sampler = samplers.RandomSampler(seed=0) if workload == "noop" else samplers.TPESampler(seed=0)
    fn = optuna_noop if workload == "noop" else optuna_reporting
    t1 = time.perf_counter()
    study = optuna.create_study(sampler=sampler, pruner=optuna.pruners.NopPruner())
    study.optimize(fn, n_trials=trials, n_jobs=2)
    wall = time.perf_counter() - t1
    assert len(study.trials) == trials
    return {"import_s": imported, "wall_s": wall}


def _optuna_process(journal: str, trials: int) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(journal))
    study = optuna.load_study(study_name="cold", storage=storage, sampler=optuna.samplers.TPESampler(),
                              pruner=optuna.pruners.NopPruner())
    study.optimize(optuna_reporting, n_trials=trials)


def child_optuna_processes(workload: str, trials: int) -> dict[str, Any]:
    import multiprocessing

    t0 = time.perf_counter()
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    imported = time.perf_counter() - t0
    folder = Path(tempfile.mkdtemp(prefix="optuna-cold-"))
    journal = str(folder / "journal.log")
    t1 = time.perf_counter()
    optuna.create_study(study_name="cold", storage=JournalStorage(JournalFileBackend(journal)))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_optuna_process, args=(journal, trials // 2)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    wall = time.perf_counter() - t1
    shutil.rmtree(folder, ignore_errors=True)
    if any(proc.exitcode for proc in procs):
        raise RuntimeError("an Optuna process failed")
    return {"import_s": imported, "wall_s": wall}


CHILDREN = {"pool": child_pool, "optuna-threads": child_optuna_threads,
            "optuna-processes": child_optuna_processes}


# ---------------------------------------------------------------------------------- the parent
def unison_start_modes() -> list[str | None]:
    """``None`` (the default) and every other start mode ``Local`` offers (its ``start=`` choices)."""
    import unison

    if "start" not in inspect.signature(unison.Local).parameters:
        return [None]
    return [None, "fresh"]


def in_child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         timeout=300, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def contenders(workload: str) -> list[tuple[str, tuple[str, ...]]]:
    named: list[tuple[str, tuple[str, ...]]] = []
    for mode in unison_start_modes():
        named.append((f"unison Local(2){'' if mode is None else f', start={mode!r}'}",
                      ("unison", workload, mode or "")))
    named += [("ProcessPoolExecutor(2), fork", ("pool", workload)),
              ("Optuna, 2 threads", ("optuna-threads", workload))]
    if workload == "report":
        named.append(("Optuna, 2 processes, journal file", ("optuna-processes", workload)))
    return named


def run(repeats: int, sizes: dict[str, int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for workload, trials in sizes.items():
        named = contenders(workload)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in named}
        for _ in range(repeats):
            for name, args in named:
                runs[name].append(in_child(*args[:2], str(trials), *args[2:]))
        table = {}
        for name, rows in runs.items():
            summary = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
            if workload == "report":
                ideal = trials * REPORTS * REPORT_EVERY_S / 2
                summary["efficiency"] = ideal / summary["wall_s"]
                # what the whole script waits for: a peer imports its library before the call, unison in it
                summary["efficiency_with_import"] = ideal / statistics.median(
                    r["wall_s"] + r["import_s"] for r in rows)
            else:
                summary["trials_per_s"] = trials / summary["wall_s"]
            table[name] = summary
        results[workload] = {"trials": trials, "contenders": table, "runs": runs}
    return results


def print_report(res: dict[str, Any]) -> None:
    for workload, block in res["results"].items():
        ideal = block["trials"] * REPORTS * REPORT_EVERY_S / 2
        title = ("(a) no-op trials" if workload == "noop"
                 else f"(b) 0.5 s trials with 5 reports, ideal {ideal:.0f} s")
        print(f"\n{title}, {block['trials']} trials, 2 workers, median of {res['repeats']} fresh processes")
        for name, s in block["contenders"].items():
            extra = (f"efficiency {s['efficiency']:.3f} ({s['efficiency_with_import']:.3f} with import)"
                     if "efficiency" in s else f"{s['trials_per_s']:.0f}/s")
            phases = (f"  setup {s['setup_s'] * 1000:.0f} ms, first start {s['first_start_s'] * 1000:.0f} ms"
                      if "first_start_s" in s else "")
            imported = s['import_s'] * 1000
            print(f"  {name:40s} {s['wall_s']:7.3f} s  {extra:38s} import {imported:.0f} ms{phases}")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]
            if Path("/proc/loadavg").exists() else None}


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def child_main(args: list[str]) -> int:
    kind, workload, trials = args[0], args[1], int(args[2])
    if kind == "unison":
        out = child_unison(workload, trials, args[3] if len(args) > 3 and args[3] else None)
    else:
        out = CHILDREN[kind](workload, trials)
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    use_cached_bytecode()  # as an installed unison runs (see _bytecode.py)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 50 no-op and 8 reporting trials")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per contender (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    sizes = {"noop": 50, "report": 8} if args.quick else {"noop": 200, "report": 40}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res = {"date": started, "machine": machine(), "repeats": repeats, "targets": TARGETS,
           "results": run(repeats, sizes)}
    res["machine"]["loadavg_end"] = (Path("/proc/loadavg").read_text().split()[:3]
                                     if Path("/proc/loadavg").exists() else None)
    print_report(res)
    report = res["results"]["report"]["contenders"]
    ours = report["unison Local(2)"]
    peers = [s["efficiency"] for name, s in report.items() if not name.startswith("unison")
             and not name.startswith("ProcessPool")]
    first = res["results"]["noop"]["contenders"]["unison Local(2)"]["first_start_s"]
    ahead = ours["efficiency"] >= TARGETS["efficiency_min"] and ours["efficiency"] > max(peers)
    print(f"\ntargets: efficiency {ours['efficiency']:.3f} >= {TARGETS['efficiency_min']} and ahead of every "
          f"peer ({max(peers):.3f}): {verdict(ahead)}; "
          f"call -> first trial start {first * 1000:.0f} ms <= 100 ms: {verdict(first <= 0.1)}")
    out = args.out or HERE / "results" / ("cold_start-quick.json" if args.quick else "cold_start.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
