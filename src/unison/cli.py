"""The ``unison`` command: ``demo``, ``ls``, ``show``, ``resume`` and ``spark-standalone``.

Ctrl-C ends any command with one line (what was interrupted, the command that resumes it) and exit
status 130, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from unison.backends.base import Backend
from unison.driver.store import DEFAULT_STORAGE, ExperimentStore
from unison.result import AblationResult, RunResult, SearchResult


def _cmd_demo(args: argparse.Namespace) -> int:
    import unison
    from unison import demo

    backend = unison.Inline() if args.backend == "inline" else unison.Local(workers=args.workers)
    search = unison.Search(demo.SPACE, metric="accuracy", mode="max", trials=args.trials,
                           optimizer="random", scheduler="median", seed=args.seed)
    result = unison.run(demo.train, search, data=demo.load_digits_split, backend=backend,
                        storage=args.storage, name="digits-demo")
    assert isinstance(result, SearchResult)  # unison.run with a Search returns one
    columns = ["trial_id", "status", *demo.SPACE, "accuracy", "steps", "duration", "worker"]
    top = result.trials.sort_values("accuracy", ascending=False).head(5)[columns]
    print("\nthe five best trials:")
    print(top.to_string(index=False))
    print(f"\nexperiment directory: {result.path}")
    print(f"inspect it with: unison show {result.path}")
    return 0


def _resume_backend(args: argparse.Namespace) -> str | Backend:
    import unison

    if args.backend == "inline":
        return unison.Inline()
    if args.backend == "spark":
        return "spark"
    return unison.Local(workers=args.workers)


def _cmd_resume(args: argparse.Namespace) -> int:
    """Finish an experiment with the function, generators and data it stored in ``payload.bin``."""
    import cloudpickle

    import unison
    from unison.payload import loads_payload

    path = Path(args.experiment)
    try:
        meta = ExperimentStore(path).read_experiment()
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    kind = meta.get("kind")
    if kind not in ("search", "ablation", "distributed"):
        print(f"error: {path} holds a {kind!r} experiment: a single run has nothing to resume (run it "
              f"again); `unison resume` continues searches, ablations and distributed runs", file=sys.stderr)
        return 1
    if meta.get("status") == "completed":
        print(f"{path}: the {kind} already completed; nothing to resume (see: unison show {path})")
        return 0
    payload_file = path / "payload.bin"
    if not payload_file.is_file():
        why = meta.get("payload_error") or "an older unison stored the function only for worker backends"
        print(f"error: {path} has no payload.bin, so its training function is not stored ({why}). Resume it "
              f"from Python with the same function: unison.resume({str(path)!r}, train, model=..., data=...)",
              file=sys.stderr)
        return 1
    try:
        parts = loads_payload(payload_file.read_bytes())
        context = None if parts.get("context") is None else cloudpickle.loads(parts["context"])
    except Exception as exc:  # noqa: BLE001 - e.g. the module defining the function is not importable
        print(f"error: cannot load the training function stored in {payload_file}: "
              f"{type(exc).__name__}: {exc}. Run `unison resume` where that code can be imported (the same "
              f"environment and working directory), or resume from Python with unison.resume(...)",
              file=sys.stderr)
        return 1
    fn, generators = parts["fn"], {"model": parts.get("model_fn"), "data": parts.get("data")}
    backend = _resume_backend(args)
    if context is None and kind != "search":  # a search can be rebuilt from experiment.json
        what = "Ablation" if kind == "ablation" else "Distributed run"
        print(f"error: {path} holds a {kind} whose {what} could not be stored in payload.bin "
              f"(experiment.json keeps only its description, from which it cannot be rebuilt: model "
              f"variants and custom ablators are code). Resume it from Python, passing the same one: "
              f"unison.run(train, study, model=..., data=..., resume={str(path)!r})", file=sys.stderr)
        return 1
    result: RunResult | SearchResult
    if context is None:
        result = unison.resume(path, fn, **generators, backend=backend)
    else:
        result = unison.run(fn, context, **generators, backend=backend, resume=path)
    if kind == "distributed":
        print(f"metrics: {json.dumps(result.metrics)}")
    print(f"\nexperiment directory: {result.path}")
    print(f"inspect it with: unison show {result.path}")
    return 0


def _summary(path: Path) -> dict[str, Any] | None:
    store = ExperimentStore(path)
    try:
        meta = store.read_experiment()
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    result = store.read_result() or {}
    if meta.get("kind") in ("search", "ablation"):
        loaded = SearchResult.load(path)
        ended = sum(r["status"] in ("completed", "failed", "stopped") for r in loaded.rows)
        trials = f"{ended}/{result.get('planned', '?')}"
        metric = loaded.metric
        if isinstance(loaded, AblationResult):
            best = loaded.headline()
        elif len(loaded.metrics) > 1:
            best = f"{len(loaded.pareto)} on the Pareto front"
        else:
            best = "-" if loaded.best is None else f"{metric}={loaded.best.metric:.6g}"
    else:
        trials, best = "1", json.dumps(result.get("metrics")) if result else "-"
    return {
        "experiment": str(path), "kind": meta.get("kind", "?"), "status": meta.get("status", "?"),
        "trials": trials, "best": best,
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("created", 0))),
    }


def _print_table(rows: list[dict[str, Any]], title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    if not rows:
        return
    for column in rows[0]:
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    # Folding cells to 80 columns splits paths and numbers over lines in a pipe or a log: lay the
    # table out at its natural width when the output is not a terminal.
    Console(width=None if sys.stdout.isatty() else 10_000).print(table)


def _cmd_ls(args: argparse.Namespace) -> int:
    root = Path(args.storage)
    if not root.is_dir():
        print(f"no experiments: {root} does not exist (experiments are written to ./{DEFAULT_STORAGE} "
              f"unless storage= says otherwise)", file=sys.stderr)
        return 1
    rows = [s for p in sorted(root.iterdir()) if p.is_dir() and (s := _summary(p)) is not None]
    if not rows:
        print(f"no experiments in {root}")
        return 0
    _print_table(rows, title=f"experiments in {root}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    path = Path(args.experiment)
    store = ExperimentStore(path)
    try:
        meta = store.read_experiment()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"experiment {path}  kind={meta.get('kind')}  status={meta.get('status')}  "
          f"backend={meta.get('backend', '-')}")
    if meta.get("kind") not in ("search", "ablation"):
        print(json.dumps(store.read_result() or {}, indent=2))
        return 0
    result = SearchResult.load(path)
    frame = result.trials
    if frame.empty:
        print("no trials recorded yet")
        return 0
    import pandas as pd

    with pd.option_context("display.max_rows", args.rows, "display.max_columns", None, "display.width", 200):
        print(frame.drop(columns=["error"]).to_string(index=False, max_rows=args.rows))
    failed = frame[frame["status"] == "failed"]
    for _, row in failed.head(3).iterrows():
        print(f"trial {row['trial_id']} failed: {row['error']}")
    if isinstance(result, AblationResult):
        _print_ablation(result)
    elif len(result.metrics) > 1:
        print(f"\nPareto front of {result.metrics} ({result.modes}):")
        for best in result.pareto:
            print(f"  trial {best.trial_id}: {dict(zip(result.metrics, best.metric, strict=True))} "
                  f"with {best.hparams}")
    elif result.best is not None:
        print(f"\nbest trial {result.best.trial_id}: {result.metric}={result.best.metric:.6g} "
              f"with {result.best.hparams}")
    return 0


def _print_ablation(result: AblationResult) -> None:
    """The ablation table (one row per component, the baseline first) and its headline."""
    import pandas as pd

    print(f"\nablation of {result.metric} ({result.mode}; diff = component minus baseline, paired by "
          f"seed; rank 1 = most important):")
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(result.ablation.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    print(result.headline())


def _cmd_spark_standalone(args: argparse.Namespace) -> int:
    from unison import spark_standalone as standalone

    state_dir = Path(args.dir) if args.dir else standalone.default_dir()
    try:
        if args.action == "start":
            info = standalone.start(state_dir, port=args.port, webui_port=args.webui_port,
                                    cores=args.cores, memory=args.memory, timeout=args.timeout)
            print(info["master_url"])  # alone on stdout: MASTER=$(unison spark-standalone start)
            print(f"Spark standalone master {info['master_url']} (web UI {info.get('web_ui')}) with one "
                  f"worker ({info.get('cores')} cores, {info.get('memory')}) registered; pids "
                  f"{info['master_pid']}, {info['worker_pid']}; logs and work folder in {info['dir']}\n"
                  f"stop it with: unison spark-standalone stop"
                  + (f" --dir {args.dir}" if args.dir else ""), file=sys.stderr)
            return 0
        if args.action == "stop":
            stopped = standalone.stop(state_dir)
            print(f"stopped {len(stopped)} Spark process(es) {stopped} of {state_dir}" if stopped
                  else f"no Spark standalone cluster runs from {state_dir}")
            return 0
        info = standalone.status(state_dir)
        if info["running"]:
            print(f"running: {info['master_url']} (web UI {info.get('web_ui')}), master pid "
                  f"{info['master_pid']}, worker pid {info['worker_pid']}, in {state_dir}")
            return 0
        print(f"not running (from {state_dir})")
        return 3
    except standalone.StandaloneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unison", description="Run and inspect unison experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a real small search (a NumPy MLP on the digits data)")
    demo.add_argument("--trials", type=int, default=40, help="number of trials (default 40)")
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU cores)")
    demo.add_argument("--backend", choices=["local", "inline"], default="local")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--storage", default=None, help=f"where experiments go (default ./{DEFAULT_STORAGE})")
    demo.set_defaults(func=_cmd_demo)
    ls = sub.add_parser("ls", help="list experiments, their status and best result")
    ls.add_argument("storage", nargs="?", default=DEFAULT_STORAGE)
    ls.set_defaults(func=_cmd_ls)
    show = sub.add_parser("show", help="show an experiment's trial table and best trial (or "
                                          "ablation table)")
    show.add_argument("experiment", help="an experiment directory")
    show.add_argument("--rows", type=int, default=60, help="at most this many trial rows (default 60)")
    show.set_defaults(func=_cmd_show)
    resume = sub.add_parser("resume", help="finish an interrupted experiment with the function, model and "
                                           "data generators it stored (no Python needed)")
    resume.add_argument("experiment", help="an experiment directory")
    resume.add_argument("--backend", choices=["local", "inline", "spark"], default="local",
                        help="where the remaining trials run (default local; spark: SparkSession.builder."
                             "getOrCreate(), i.e. spark-defaults and SPARK_* settings)")
    resume.add_argument("--workers", type=int, default=None,
                        help="local worker processes (default: CPU cores)")
    resume.set_defaults(func=_cmd_resume)
    spark = sub.add_parser(
        "spark-standalone",
        help="start, stop or check a Spark standalone master and worker on 127.0.0.1 (from pip's pyspark)")
    spark.add_argument("action", choices=["start", "stop", "status"])
    spark.add_argument("--dir", default=None,
                       help="where pid files, logs and the worker's work folder go "
                            "(default ~/.cache/unison/spark-standalone)")
    spark.add_argument("--port", type=int, default=7077, help="the master's port (0: any free one)")
    spark.add_argument("--webui-port", type=int, default=8080, help="the master's web UI port (0: any)")
    spark.add_argument("--cores", type=int, default=None, help="the worker's cores (default: all)")
    spark.add_argument("--memory", default="2g", help="the worker's memory for executors (default 2g)")
    spark.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for them to start")
    spark.set_defaults(func=_cmd_spark_standalone)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``unison`` command; return its exit status (130 after Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        print(_interrupted_line(exc), file=sys.stderr, flush=True)
        return 130
    except Exception as exc:
        from unison.errors import ExperimentLocked, RunFailed, SearchAborted, StorageFull, WorkerError

        if not isinstance(exc, (ExperimentLocked, RunFailed, SearchAborted, StorageFull, WorkerError)):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _interrupted_line(exc: KeyboardInterrupt) -> str:
    """One line: what was interrupted and, where an experiment was running, the command resuming it."""
    path, command = getattr(exc, "unison_experiment", None), getattr(exc, "unison_resume", None)
    if command:
        return f"unison: interrupted; the experiment {path} is resumable with: {command}"
    if path is not None:
        return (f"unison: interrupted; the experiment {path} is resumable from Python only (its function "
                f"could not be stored): unison.resume({str(path)!r}, train, ...)")
    return "unison: interrupted"


if __name__ == "__main__":
    sys.exit(main())
