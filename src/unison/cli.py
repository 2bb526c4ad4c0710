"""The ``unison`` command: ``demo``, ``ls``, ``show``, ``report``, ``resume``, ``replay``, ``export``,
``notebook`` and ``spark-standalone``.

Ctrl-C ends any command with one line (what was interrupted, the command that resumes it) and exit
status 130, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison._bulk import collector_paused
from unison.backends.base import Backend
from unison.driver.store import DEFAULT_STORAGE, ExperimentStore
from unison.result import AblationResult, PipelineResult, RunResult, SearchResult, trial_records

if TYPE_CHECKING:
    import pandas as pd


def _cmd_demo(args: argparse.Namespace) -> int:
    import unison
    from unison import demo

    backend = unison.Inline() if args.backend == "inline" else unison.Local(workers=args.workers)
    search = unison.Search(demo.SPACE, metric="accuracy", mode="max", trials=args.trials,
                           optimizer="random", scheduler="median", seed=args.seed)
    result = unison.run(demo.train, search, data=demo.load_digits_split, backend=backend,
                        storage=args.storage, name="digits-demo")
    assert isinstance(result, SearchResult)  # unison.run with a Search returns one
    top = result.trials.sort_values("accuracy", ascending=False, kind="stable").head(5).reset_index(drop=True)
    print("\nthe five best trials:")
    _print_trials(result, _Table.from_frame(top), 5, max(40, shutil.get_terminal_size().columns))
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
    if kind not in ("search", "ablation", "distributed", "pipeline"):
        print(f"error: {path} holds a {kind!r} experiment: a single run has nothing to resume (run it "
              f"again); `unison resume` continues searches, ablations, distributed runs and pipelines",
              file=sys.stderr)
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
    result: RunResult | SearchResult | PipelineResult
    if context is None:
        result = unison.resume(path, fn, **generators, backend=backend)
    else:
        result = unison.run(fn, context, **generators, backend=backend, resume=path)
    if kind == "distributed":
        print(f"metrics: {json.dumps(result.metrics)}")
    print(f"\nexperiment directory: {result.path}")
    print(f"inspect it with: unison show {result.path}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    """Run one trial again in this process, with the function, generators and data stored in
    ``payload.bin``: its metrics, or its traceback (and with ``--pdb`` a post-mortem) and exit status 1."""
    import traceback

    from unison.driver.rerun import ReplayFailed, prepare_replay, user_traceback

    try:
        replay = prepare_replay(args.experiment, args.trial)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    component = replay.message.get("component")
    print(f"unison: replaying trial {replay.trial_id} of {replay.source}: hparams "
          f"{json.dumps(replay.message['hparams'], default=str)}, seed {replay.message.get('seed')}"
          + (f", component {component.get('name')!r}" if isinstance(component, dict) else ""),
          file=sys.stderr)
    try:
        result = replay.run()
    except ReplayFailed as exc:
        print(f"error: {exc}\nreplay directory: {replay.path}", file=sys.stderr)
        return 1
    except Exception as exc:  # the function's own: its traceback, as Python prints it
        traceback.print_exception(type(exc), exc, user_traceback(exc))
        print(f"replay directory: {replay.path}", file=sys.stderr, flush=True)
        if args.pdb:
            import pdb

            pdb.post_mortem(exc.__traceback__)
        return 1
    print(f"metrics: {json.dumps(result.metrics)}")
    print(f"replay directory: {result.path}")
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
    elif meta.get("kind") == "pipeline":
        stages = PipelineResult.load(path).records
        trials = f"{sum(s.status == 'completed' for s in stages)}/{len(stages)} stages"
        best = stages[-1].summary() if stages else "-"
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
    width = None if args.wide else max(40, shutil.get_terminal_size().columns)
    _print_header(path, meta, width)
    if meta.get("kind") == "pipeline":
        _print_pipeline(PipelineResult.load(path), width)
        return 0
    if meta.get("kind") not in ("search", "ablation"):
        _print_run(store, meta, width)
        return 0
    result = SearchResult.load(path)
    table = _Table.of(result)
    if not len(table):
        print("no trials recorded yet")
        return 0
    if "checkpoint" in table.data:  # a trial's folder says the rest
        table.data["checkpoint"] = [Path(p).name if isinstance(p, str) else p
                                    for p in table.data["checkpoint"]]
    _print_trials(result, table, args.rows, width)
    failed = [i for i, status in enumerate(table.data["status"]) if status == "failed"]
    for i in failed[:3]:
        _say(f"trial {table.data['trial_id'][i]} failed: {table.data['error'][i]}", width)
    if isinstance(result, AblationResult):
        _print_ablation(result, width)
    elif len(result.metrics) > 1:
        print()
        _say(f"Pareto front of {result.metrics} ({result.modes}):", width)
        for best in result.pareto:
            _say(f"  trial {best.trial_id}: {dict(zip(result.metrics, best.metric, strict=True))} "
                 f"with {best.hparams}", width)
    elif result.best is not None:
        print()
        _say(f"best trial {result.best.trial_id}: {result.metric}={result.best.metric:.6g} "
             f"with {result.best.hparams}", width)
        if result.best.checkpoint is not None:
            _say(f"its checkpoint: {result.best.checkpoint} (unison.load_checkpoint(path) reads it)", width)
    return 0


def _print_pipeline(result: PipelineResult, width: int | None) -> None:
    """Each stage of a pipeline: its status, its best trial (an ablation's headline, a run's metrics)
    and the command showing its trials."""
    for n, stage in enumerate(result.records, start=1):
        _say(f"stage {n} {stage.name} ({stage.kind}, {stage.status}): {stage.summary()}", width)
        _say(f"    unison show {stage.path}", width, indent="      ")


def _say(text: str, width: int | None, indent: str = "    ") -> None:
    """Print ``text`` wrapped at ``width`` columns, its later lines indented (whole if ``width`` is None)."""
    if width is None or len(text) <= width:
        print(text)
        return
    print(textwrap.fill(text, width=width, subsequent_indent=indent, break_on_hyphens=False))


def _print_header(path: Path, meta: dict[str, Any], width: int | None) -> None:
    """What the experiment is, then the versions and git commit it recorded. The path is never cut."""
    fields = f"kind={meta.get('kind')}  status={meta.get('status')}  backend={meta.get('backend', '-')}"
    if width is None or len(f"experiment {path}  {fields}") <= width:
        print(f"experiment {path}  {fields}")
    else:
        print(f"experiment {path}")
        _say(f"  {fields}", width)
    recorded = ", ".join(f"{name} {version}" for name, version in (meta.get("versions") or {}).items())
    git = meta.get("git")
    if git:
        dirty = {True: " with uncommitted changes", None: " (uncommitted changes not checked)"}.get(
            git.get("dirty", False), "")
        recorded += f"; git commit {str(git.get('commit'))[:12]}{dirty}"
    if recorded:
        _say(f"  recorded: {recorded}", width)


# How a trial ran: after its hyperparameters and metrics, in this order.
_RUN_COLUMNS = ("steps", "duration", "stop_reason", "last_step", "worker", "host", "pid", "attempts")
_INTEGER_COLUMNS = frozenset({"trial_id", "steps", "last_step", "pid", "attempts", "seed"})
_MAX_CELL = 40  # a longer text is cut to this many characters unless --wide
_MIN_CUT = 12  # a text column that does not fit whole is cut to the room left, if at least this much


def _cell(value: Any, column: str = "") -> str:
    """A table cell: empty for a missing value, whole numbers as integers, other floats to 6 digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType":
        return ""  # NAType: pandas' missing value in an Int64 column (a PBT member's parent)
    if isinstance(value, float):
        if column in _INTEGER_COLUMNS and value.is_integer():
            return str(int(value))
        if column.startswith("duration"):  # seconds: to the millisecond
            return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.0f}"
        return f"{value:.6g}"
    if isinstance(value, (str, int)):  # bool too: True, not true
        return str(value)
    return json.dumps(value, default=str)  # a list or dict choice, as it was declared


@dataclass
class _Table:
    """The trial table's columns, each a list of cells, in the order of ``result.trials``: built from the
    rows themselves for a search (no pandas to import, no DataFrame of 100k rows to build to print 60)."""

    data: dict[str, list[Any]]

    @classmethod
    def of(cls, result: SearchResult) -> _Table:
        if type(result) is not SearchResult:  # an ablation's table adds its own columns
            return cls.from_frame(result.trials)
        with collector_paused():
            records = sorted(trial_records(result.rows), key=lambda r: r["trial_id"])
            columns: dict[str, None] = {}
            for record in records:
                if not columns.keys() >= record.keys():
                    columns.update(dict.fromkeys(record))
            if all(len(record) == len(columns) for record in records):  # each has every column
                return cls({name: list(map(operator.itemgetter(name), records)) for name in columns})
            return cls({name: [record.get(name) for record in records] for name in columns})

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> _Table:
        return cls({name: frame[name].tolist() for name in frame.columns})

    @property
    def columns(self) -> list[str]:
        return list(self.data)

    def __len__(self) -> int:
        return len(next(iter(self.data.values()), []))


def _column_order(result: SearchResult, frame: _Table) -> tuple[list[str], list[str]]:
    """The trial table's columns, the most telling first (id, status, component, objectives, steps,
    seed, hyperparameters, the other metrics, how the trial ran; ``error`` is printed below the table),
    and which of them are hyperparameters."""
    def metric_column(name: str) -> str:
        return f"metric:{name}" if f"metric:{name}" in frame.columns else name

    reported = (metric_column(name) for row in result.rows for name in (row.get("metrics") or {}))
    metrics = [c for c in dict.fromkeys(reported) if c in frame.columns]
    objectives = [c for c in map(metric_column, result.metrics) if c in metrics]
    first = [c for c in ("trial_id", "status", "component") if c in frame.columns]
    taken = {*first, *metrics, *_RUN_COLUMNS, "error"}
    hparams = [c for c in frame.columns if c not in taken]
    if isinstance(result, AblationResult) and "seed" in hparams:  # what pairs an ablation's trials
        hparams.insert(0, hparams.pop(hparams.index("seed")))
    rest = [c for c in metrics if c not in objectives]
    ran = [c for c in _RUN_COLUMNS if c in frame.columns]  # steps first: how far a stopped trial got
    return [*first, *objectives, *ran[:1], *hparams, *rest, *ran[1:]], hparams


def _print_trials(result: SearchResult, frame: _Table, max_rows: int, width: int | None) -> None:
    """The trial table, at most ``width`` columns wide: the columns that fit, in order of importance,
    the hyperparameters every trial shares on a line above it, the columns left out named below it.
    ``width=None``: every column of ``result.trials``, whole."""
    order, hparams = (list(frame.columns), []) if width is None else _column_order(result, frame)
    facts = {c: _ColumnFacts.of(frame.data[c], c) for c in order}
    numeric = {c: facts[c].numeric for c in order}
    hidden: list[str] = []
    if width is not None:
        shared = [c for c in hparams if len(frame) > 1 and facts[c].same is not None]
        if shared:
            _say("same in every trial: " + ", ".join(f"{c}={facts[c].same}" for c in shared), width)
        # a column with nothing in it (no trial stopped, say) says nothing
        order = [c for c in order if c not in shared and facts[c].filled]
    picked = _rows_shown(len(frame), max_rows)
    longest = 10**9 if width is None else _MAX_CELL
    cells = {c: [_cut(_cell(frame.data[c][i], c), longest) for i in picked] for c in order}
    widths = {c: max(len(c), *map(len, cells[c])) for c in order}
    if width is not None:
        order, hidden = _fit(order, widths, numeric, width)
    for line in _render(order, cells, numeric, widths):
        print(line)
    if len(picked) < len(frame):
        print(f"({len(frame) - len(picked)} of {len(frame)} trials not shown: --rows N shows more)")
    if hidden:
        names = ", ".join(hidden[:6]) + (f" and {len(hidden) - 6} more" if len(hidden) > 6 else "")
        _say(f"not shown (too wide for {width} columns): {names}; unison show --wide shows every column",
             width)


@dataclass
class _ColumnFacts:
    """What the trial table needs to know of a whole column, found without formatting every cell (a
    100k-trial table prints 60 rows): ``same``: the text every cell shows (``None``: they differ, or
    all are empty); ``filled``: whether a cell shows anything; ``numeric``: whether every cell that
    shows something is a number (aligned right, never cut)."""

    same: str | None
    filled: bool
    numeric: bool

    @classmethod
    def of(cls, column: list[Any], name: str) -> _ColumnFacts:
        try:
            values: Any = dict.fromkeys(column)  # each value once (a float column: each NaN too)
        except TypeError:  # unhashable cells (a list or dict choice)
            values = column
        kinds = set(map(type, values))
        if bool in kinds:  # True == 1 and False == 0 are one key: keep them all
            values = column
        texts: dict[str, None] = {}
        if kinds <= {int, float, type(None)}:  # numbers and blanks: no need to look at every value
            for value in values:
                texts[_cell(value, name)] = None
                if len(texts) == 2:
                    break
            return cls(_only_text(texts), any(v is not None and v == v for v in values), True)
        numeric, filled = True, False
        for value in values:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if len(texts) < 2:  # two different texts settle `same`; only numbers and blanks matter after
                text = _cell(value, name)
                texts[text] = None
                shown = bool(text)
            else:  # a number is shown unless it is NaN; anything else, by its text
                shown = value == value if number else bool(_cell(value, name))
            if shown:
                filled = True
                numeric = numeric and number
        return cls(_only_text(texts), filled, numeric)


def _only_text(texts: dict[str, None]) -> str | None:
    """The one text every cell of a column shows, unless they differ or it is empty."""
    return next(iter(texts)) if len(texts) == 1 and "" not in texts else None


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fit(order: list[str], widths: dict[str, int], numeric: dict[str, bool],
         width: int) -> tuple[list[str], list[str]]:
    """The columns of ``order`` that fit in ``width``, two spaces apart, and those that do not. A text
    column that does not fit whole is narrowed to the room left (``widths`` changes) if that is at
    least ``_MIN_CUT``; a number is never cut."""
    shown: list[str] = []
    hidden: list[str] = []
    used = 0
    for column in order:
        room = width - used - (2 if shown else 0)
        if widths[column] > room and not numeric[column] and room >= _MIN_CUT:
            widths[column] = room
        if widths[column] <= room:
            used += widths[column] + (2 if shown else 0)
            shown.append(column)
        else:
            hidden.append(column)
    return shown, hidden


def _rows_shown(count: int, max_rows: int) -> list[int]:
    """Which rows of ``count`` to print: all of them, or the first and the last ``max_rows // 2``."""
    if count <= max_rows:
        return list(range(count))
    head = max(1, max_rows // 2)
    return [*range(head), *range(count - max(0, max_rows - head), count)]


def _render(columns: list[str], cells: dict[str, list[str]], numeric: dict[str, bool],
            widths: dict[str, int]) -> list[str]:
    """The table's lines: a header, then one line per row; numbers aligned right, text left."""
    def line(texts: list[str]) -> str:
        padded = (_cut(t, widths[c]).rjust(widths[c]) if numeric[c] else _cut(t, widths[c]).ljust(widths[c])
                  for c, t in zip(columns, texts, strict=True))
        return "  ".join(padded).rstrip()

    count = len(cells[columns[0]]) if columns else 0
    return [line(columns), *(line([cells[c][i] for c in columns]) for i in range(count))]


def _print_run(store: ExperimentStore, meta: dict[str, Any], width: int | None) -> None:
    """A single or distributed run: its hyperparameters, its metrics, then its seed, value and duration,
    its latest checkpoint (rank 0's), and its error if it failed."""
    kind = meta.get("kind")
    declared = meta if kind == "single" else meta.get(str(kind)) or {}
    outcome = store.read_result() or {}
    journal = store.read_journal()
    end: dict[str, Any] = next((e for e in reversed(journal) if e.get("e") == "end"), {})
    saved = next((e["path"] for e in reversed(journal) if e.get("e") == "checkpoint" and e.get("id") == 0
                  and isinstance(e.get("path"), str) and e["path"]), None)
    _print_pairs("hyperparameters", declared.get("hparams") or {}, width)
    _print_pairs("metrics", outcome.get("metrics") or end.get("metrics") or {}, width)
    run = {"seed": meta.get("seed"), "ranks": declared.get("workers") if kind == "distributed" else None,
           "value": outcome.get("value"), "duration (s)": outcome.get("duration", end.get("duration"))}
    _print_pairs("run", {name: value for name, value in run.items() if value is not None}, width)
    if saved is not None:  # relative to the experiment, or a URL (checkpoint_storage=)
        checkpoint = saved if "://" in saved else store.path / saved
        _say(f"its checkpoint: {checkpoint} (unison.load_checkpoint(path) reads it)", width)
    error = outcome.get("error") or end.get("error")
    if error:
        _say(f"error: {str(error).strip().splitlines()[-1]}", width)


def _print_pairs(title: str, pairs: dict[str, Any], width: int | None) -> None:
    """``title:``, then one ``name  value`` line per pair, the values aligned."""
    print(f"{title}:" if pairs else f"{title}: (none)")
    column = min(max(map(len, pairs), default=0), 30)
    for name, value in pairs.items():
        _say(f"  {name.ljust(column)}  {_cell(value, name)}", width, indent=" " * (column + 4))


def _print_ablation(result: AblationResult, width: int | None) -> None:
    """The ablation table (one row per component, the baseline first) and its headline; without the
    spread of each mean (``std``, then ``ci_low`` and ``ci_high``) where the table is wider than ``width``."""
    print()
    _say(f"ablation of {result.metric} ({result.mode}; diff = component minus baseline, paired by seed; "
         f"rank 1 = most important):", width)
    table = result.ablation
    for dropped in ([], ["std"], ["std", "ci_low", "ci_high"]):
        text = table.drop(columns=dropped).to_string(index=False, na_rep="",
                                                     float_format=lambda v: f"{v:.6g}")
        if width is None or max(map(len, text.splitlines())) <= width:
            break
    print(text)
    _say(result.headline(), width)


def _cmd_report(args: argparse.Namespace) -> int:
    """Write an experiment's report, one self-contained HTML file; ``--open`` opens it in a browser."""
    from unison.report import write_report

    try:
        target = write_report(args.experiment, args.output)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report written to {target}")
    if args.open:
        import webbrowser

        if not webbrowser.open(target.resolve().as_uri()):
            print(f"no browser could be started here: open {target} in one", file=sys.stderr)
    return 0


def _cmd_notebook(args: argparse.Namespace) -> int:
    from unison.notebook.execute import command

    return command(args)


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


def _cmd_export(args: argparse.Namespace) -> int:
    from unison.mlflow_logger import MLflowLogger

    path = Path(args.experiment)
    if not (path / "experiment.json").is_file():
        print(f"error: {path} is not an experiment directory (it has no experiment.json)", file=sys.stderr)
        return 1
    meta = ExperimentStore(path).read_experiment()
    # a pipeline is exported stage by stage: each stage is an experiment of its own, with its own run tree
    stages = ([p.parent for p in sorted((path / "stages").glob("*/experiment.json"))]
              if meta.get("kind") == "pipeline" else [path])
    for experiment in stages:
        try:
            logger = MLflowLogger(args.tracking_uri, args.experiment_name,
                                  log_artifacts=not args.no_artifacts)
        except (ImportError, ConnectionError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if _export_one(experiment, logger) != 0:
            return 1
    return 0


def _export_one(path: Path, logger: Any) -> int:
    """Export the experiment in ``path`` through ``logger`` (an MLflowLogger); the exit status."""
    from unison.api import load
    from unison.driver.backfill import backfill
    from unison.errors import RunFailed

    logged = logger.logged_run(path)
    if logged is not None:
        print(f"error: {path} is in MLflow at {logger.tracking_uri} already, as the run {logged} (see "
              f"{path / 'mlflow.json'}); exporting it again would log every metric twice. Delete that run "
              f"(or {path / 'mlflow.json'}) to export it again", file=sys.stderr)
        return 1
    try:
        result = load(path)
    except RunFailed:
        result = None  # a single or distributed run that failed: its parent run ends FAILED
    trials = backfill(path, [logger], result)
    print(f"exported {path} to MLflow at {logger.tracking_uri}: the run {logger.parent_run_id} and "
          f"{trials} nested trial run(s)")
    return 0


def _add_demo_ls_show(sub: Any) -> None:
    """The ``demo``, ``ls`` and ``show`` subcommands, added to ``sub`` (the subparsers)."""
    demo = sub.add_parser("demo", help="run a real small search (a NumPy MLP on the digits data)")
    demo.add_argument("--trials", type=int, default=40, help="number of trials (default 40)")
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU cores)")
    demo.add_argument("--backend", choices=["local", "inline"], default="local",
                      help="where trials run: local worker processes (default), or inline, one at a time "
                           "in this process")
    demo.add_argument("--seed", type=int, default=0,
                      help="seeds the random search (default 0): a seed tries the same hyperparameters "
                           "every time")
    demo.add_argument("--storage", default=None, help=f"where experiments go (default ./{DEFAULT_STORAGE})")
    demo.set_defaults(func=_cmd_demo)
    ls = sub.add_parser("ls", help="list experiments, their status and best result")
    ls.add_argument("storage", nargs="?", default=DEFAULT_STORAGE,
                    help=f"the folder holding the experiments (default ./{DEFAULT_STORAGE})")
    ls.set_defaults(func=_cmd_ls)
    show = sub.add_parser("show", help="show an experiment's trial table and best trial (or "
                                          "ablation table)")
    show.add_argument("experiment", help="an experiment directory")
    show.add_argument("--rows", type=int, default=60, help="at most this many trial rows (default 60)")
    show.add_argument("--wide", action="store_true",
                      help="every column of the trial table, whole, however wide (default: as many as fit "
                           "the terminal, the others named below the table)")
    show.set_defaults(func=_cmd_show)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unison", description="Run and inspect unison experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo_ls_show(sub)
    report = sub.add_parser("report", help="write an experiment's report: one self-contained HTML file with "
                                           "its summary, best trial, sortable trial table and plots")
    report.add_argument("experiment", help="an experiment directory")
    report.add_argument("-o", "--output", default=None,
                        help="the HTML file to write (default: report.html in the experiment directory)")
    report.add_argument("--open", action="store_true", help="open the report in a web browser")
    report.set_defaults(func=_cmd_report)
    resume = sub.add_parser("resume", help="finish an interrupted experiment with the function, model and "
                                           "data generators it stored (no Python needed)")
    resume.add_argument("experiment", help="an experiment directory")
    resume.add_argument("--backend", choices=["local", "inline", "spark"], default="local",
                        help="where the remaining trials run (default local; spark: SparkSession.builder."
                             "getOrCreate(), i.e. spark-defaults and SPARK_* settings)")
    resume.add_argument("--workers", type=int, default=None,
                        help="local worker processes (default: CPU cores)")
    resume.set_defaults(func=_cmd_resume)
    replay = sub.add_parser("replay", help="run one trial of an experiment again in this process, to debug "
                                           "it: the same hyperparameters, seed and ablated component, output "
                                           "on the terminal")
    replay.add_argument("experiment", help="an experiment directory")
    replay.add_argument("trial", type=int, help="the trial's number (the trial_id column of `unison show`)")
    replay.add_argument("--pdb", action="store_true",
                        help="on an exception, start pdb's post-mortem debugger where it was raised")
    replay.set_defaults(func=_cmd_replay)
    export = sub.add_parser("export", help="log an experiment already run to a tracking system (as the "
                                           "callbacks would have while it ran)")
    export.add_argument("target", choices=["mlflow"], help="where to: mlflow (a parent run, a nested run "
                                                            "per trial)")
    export.add_argument("experiment", help="an experiment directory")
    export.add_argument("--tracking-uri", default=None,
                        help="the MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default)")
    export.add_argument("--experiment-name", default=None,
                        help="the MLflow experiment (default: the unison experiment's name)")
    export.add_argument("--no-artifacts", action="store_true",
                        help="leave out the trials' files (logs, what the function wrote)")
    export.set_defaults(func=_cmd_export)
    notebook = sub.add_parser("notebook", help="run a notebook with papermill in a distribution context "
                                               "(its %%%%context cells), its parameters injected")
    notebook.add_argument("notebook", help="the .ipynb to run")
    notebook.add_argument("--context", default=None,
                          help="the notebook's parameter `context`: which %%%%context cells run (single, "
                               "search, ablation, distributed, pipeline)")
    notebook.add_argument("--backend", default=None,
                          help="the notebook's parameter `backend`, which unison.context_backend() returns "
                               "(local, inline, spark)")
    notebook.add_argument("-p", "--parameter", action="append", metavar="KEY=VALUE",
                          help="another parameter (repeatable); a VALUE that parses as JSON is that value, "
                               "else a string")
    notebook.add_argument("-o", "--output", default=None,
                          help="also write the executed notebook here (it goes into every experiment "
                               "directory the notebook made)")
    notebook.add_argument("--kernel", default=None,
                          help="the Jupyter kernel to run it in (default: the notebook's kernelspec)")
    notebook.add_argument("--cwd", default=None,
                          help="the kernel's working directory (default: the current one)")
    notebook.set_defaults(func=_cmd_notebook)
    spark = sub.add_parser(
        "spark-standalone",
        help="start, stop or check a Spark standalone master and worker on 127.0.0.1 (from pip's pyspark)")
    spark.add_argument("action", choices=["start", "stop", "status"],
                       help="start them (and wait until the worker registered), stop them, or say whether "
                            "they run")
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
    except BrokenPipeError:  # `unison show DIR | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's last flush fails silently
        return 0
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
