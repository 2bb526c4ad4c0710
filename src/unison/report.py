"""``unison report``: an experiment as one self-contained HTML page.

The page holds the summary (kind, status, counts, elapsed time, backend, versions), the best trial (or
the Pareto front, or the ablation's headline and table), the trial table (sorted by clicking a column's
header) and the plots that apply to the experiment (:func:`unison.plots.kinds`), drawn by
:func:`unison.plots.figure`. plotly.js is inlined once, so the file opens with no network; a plot that
cannot be drawn shows as a note saying why.
"""

from __future__ import annotations

import html
import json
import numbers
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison.driver.store import ExperimentStore
from unison.errors import RunFailed
from unison.result import AblationResult, PipelineResult, RunResult, SearchResult

if TYPE_CHECKING:
    import pandas as pd

REPORT_NAME = "report.html"
_CAPTIONS = {
    "history": "the best value so far, over trials and over wall time",
    "curves": "every trial's reported metric by step; a stopped trial's line ends early",
    "pbt": "each population member's trials by step; a dashed line joins a clone to its parent's checkpoint, "
           "× marks a replaced trial",
    "parallel": "each trial as a line through its hyperparameters to its value",
    "importance": "how much each hyperparameter explains the value (Optuna's evaluator)",
    "slice": "the value against each hyperparameter",
    "contour": "the value over two hyperparameters",
    "pareto": "the trials no other trial beats in every objective",
    "timeline": "trials as bars per worker over time: idle slots and stragglers",
    "ablation": "each component's difference to the baseline, with its 95% interval",
}


def write_report(path_or_result: str | Path | SearchResult | RunResult | PipelineResult,
                 output: str | Path | None = None) -> Path:
    """Write the experiment's report and return where it went. A pipeline's report lists its stages,
    each linked to its own report (written into the stage's directory).

    Args:
        path_or_result: an experiment directory, or the result ``unison.run`` returned.
        output: the HTML file to write (default: ``report.html`` in the experiment directory; an
            existing directory: ``report.html`` in it).
    """
    if isinstance(path_or_result, (str, Path)) and _is_pipeline(Path(path_or_result)):
        path_or_result = PipelineResult.load(path_or_result)
    if isinstance(path_or_result, PipelineResult):
        return _write_pipeline_report(path_or_result, output)
    if isinstance(path_or_result, (SearchResult, RunResult)):
        result = path_or_result
        meta, saved = _read_files(result.path)
    else:
        result, meta, saved = load_experiment(path_or_result)
    target = Path(output) if output is not None else result.path / REPORT_NAME
    if target.is_dir():
        target = target / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report_html(result, meta, saved), encoding="utf-8")
    return target


def _is_pipeline(directory: Path) -> bool:
    try:
        return bool(ExperimentStore(directory).read_experiment().get("kind") == "pipeline")
    except (OSError, ValueError):  # not an experiment: load_experiment says what to give
        return False


def _write_pipeline_report(result: PipelineResult, output: str | Path | None) -> Path:
    """The stages' reports, then the pipeline's page: its summary and a table of the stages."""
    target = Path(output) if output is not None else result.path / REPORT_NAME
    if target.is_dir():
        target = target / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    meta, _ = _read_files(result.path)
    rows = []
    for n, stage in enumerate(result.records, start=1):
        link = "-"
        if (stage.path / "experiment.json").is_file():
            page = write_report(stage.path)
            link = f"<a href='{_esc(os.path.relpath(page, target.parent))}'>{_esc(stage.name)} report</a>"
        rows.append(f"<tr><td class='num'>{n}</td><td>{_esc(stage.name)}</td><td>{_esc(stage.kind)}</td>"
                    f"<td class='status-{_esc(stage.status)}'>{_esc(stage.status)}</td>"
                    f"<td>{_esc(stage.summary())}</td><td>{link}</td></tr>")
    head = "".join(f"<th scope='col'>{h}</th>" for h in ("", "stage", "kind", "status", "result", "report"))
    stages = f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    body = (f"<section><h2>Summary</h2>{_pipeline_summary(result, meta)}</section>"
            f"<section><h2>Stages</h2>{stages}</section>")
    target.write_text(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>unison report: "
                      f"{_esc(result.name)}</title><style>{_CSS}</style></head><body><header><h1>unison "
                      f"report: {_esc(result.name)} (pipeline)</h1><p><code>{_esc(result.path.resolve())}"
                      f"</code></p></header><main>{body}</main><script>{_SORT_JS}</script></body></html>",
                      encoding="utf-8")
    return target


def _pipeline_summary(result: PipelineResult, meta: dict[str, Any]) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("created", 0)))
    rows: list[tuple[str, Any]] = [("kind", "pipeline"), ("status", result.status), ("created", created)]
    rows += [(key, meta[key]) for key in ("function", "backend") if meta.get(key) is not None]
    if meta.get("versions"):
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in meta["versions"].items())))
    if meta.get("git"):
        rows.append(("git commit", _git_text(meta["git"])))
    return _key_table(rows)


def load_experiment(path: str | Path) -> tuple[SearchResult | RunResult, dict[str, Any], dict[str, Any]]:
    """An experiment directory's result, its ``experiment.json`` and its ``result.json`` (``{}`` while
    it runs). Raises ``FileNotFoundError`` when ``path`` holds no experiment."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: give an experiment directory (one holding "
                                f"experiment.json; `unison ls` lists them)")
    meta, saved = _read_files(directory)
    kind = meta.get("kind")
    if kind in ("search", "ablation"):
        return SearchResult.load(directory), meta, saved
    if kind in ("single", "distributed"):
        try:
            return RunResult.load(directory), meta, saved
        except RunFailed as exc:  # the page still shows what there is, and why the run has no result
            failed = RunResult(metrics={}, value=None, returned={}, path=directory, duration=float("nan"))
            return failed, meta, {**saved, "error": str(exc)}
    raise ValueError(f"{directory} holds a {kind!r} experiment; a report covers 'search', 'ablation', "
                     f"'single' and 'distributed' experiments")


def _read_files(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    store = ExperimentStore(directory)
    if not (directory / "experiment.json").is_file():
        raise FileNotFoundError(f"{directory} holds no experiment.json: give an experiment directory "
                                f"(`unison ls` lists them)")
    return store.read_experiment(), store.read_result() or {}


def report_html(result: SearchResult | RunResult, meta: dict[str, Any], saved: dict[str, Any]) -> str:
    """The whole page, as a string."""
    name = meta.get("name") or result.path.name
    sections = [("summary", "Summary", _summary_section(result, meta, saved)),
                ("best", _best_title(result), _best_section(result, meta))]
    if isinstance(result, SearchResult):
        sections.append(("trials", "Trials", _trials_section(result.trials)))
    plotly_js, plots = _plots(result)
    sections.append(("plots", "Plots", plots))
    nav = " · ".join(f"<a href='#{key}'>{_esc(title)}</a>" for key, title, _ in sections)
    body = "".join(f"<section id='{key}'><h2>{_esc(title)}</h2>{content}</section>"
                   for key, title, content in sections)
    script = f"<script>{plotly_js}</script>" if plotly_js else ""
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>unison report: {_esc(name)}</title><style>{_CSS}</style>{script}</head>"
            f"<body><header><h1>unison report: {_esc(name)}</h1>"
            f"<p><code>{_esc(result.path.resolve())}</code></p><nav>{nav}</nav></header>"
            f"<main>{body}</main><script>{_SORT_JS}</script></body></html>")


# --------------------------------------------------------------------------------------------- summary
def _summary_section(result: SearchResult | RunResult, meta: dict[str, Any], saved: dict[str, Any]) -> str:
    kind = meta.get("kind", "?")
    rows: list[tuple[str, Any]] = [("kind", kind), ("status", meta.get("status", saved.get("status", "?")))]
    if isinstance(result, SearchResult):
        counts: dict[str, int] = {}
        for row in result.rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none"
        declared = meta.get(kind) or {}
        planned = saved.get("planned") or declared.get("trials") or "?"
        rows.append(("trials", f"{len(result.rows)} of {planned} planned ({tally})"))
        rows.append(("metric", _objective(result)))
        for key in ("optimizer", "scheduler"):
            if isinstance(declared, dict) and declared.get(key) is not None:
                rows.append((key, _text(declared[key])))
    elapsed = saved.get("elapsed", saved.get("duration"))
    rows.append(("elapsed", "-" if elapsed is None else _duration(elapsed)))
    rows.append(("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("created", 0)))))
    for key in ("function", "backend", "workers"):
        if meta.get(key) is not None:
            rows.append((key, meta[key]))
    if meta.get("versions"):
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in meta["versions"].items())))
    if meta.get("git"):
        rows.append(("git commit", _git_text(meta["git"])))
    if saved.get("error"):
        rows.append(("error", saved["error"]))
    if meta.get("argv"):
        rows.append(("command", " ".join(str(a) for a in meta["argv"])))
    return _key_table(rows)


def _objective(result: SearchResult) -> str:
    return ", ".join(f"{metric} ({mode})" for metric, mode in zip(result.metrics, result.modes, strict=True))


def _git_text(git: Any) -> str:
    """``{"commit": sha, "dirty": bool | None}`` as one line."""
    if not isinstance(git, dict):
        return _text(git)
    dirty = {True: " (with uncommitted changes)", None: " (uncommitted changes not checked)"}
    return f"{git.get('commit')}{dirty.get(git.get('dirty', False), '')}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ------------------------------------------------------------------------------------------------ best
def _best_title(result: SearchResult | RunResult) -> str:
    if isinstance(result, AblationResult):
        return "Ablation"
    if isinstance(result, SearchResult) and len(result.metrics) > 1:
        return "Pareto front"
    return "Result" if isinstance(result, RunResult) else "Best trial"


def _best_section(result: SearchResult | RunResult, meta: dict[str, Any]) -> str:
    if isinstance(result, RunResult):
        return _run_section(result, meta)
    if isinstance(result, AblationResult):
        return f"<p class='headline'>{_esc(result.headline())}</p>{_frame_table(result.ablation)}"
    if len(result.metrics) > 1:
        return _pareto_section(result)
    best = result.best
    if best is None:
        return "<p class='note'>no trial completed</p>"
    rows = [("trial", best.trial_id), (str(result.metric), best.metric),
            *((f"hparam {k}", v) for k, v in best.hparams.items()),
            *((f"metric {k}", v) for k, v in best.metrics.items() if k != result.metric)]
    return _key_table(rows)


def _run_section(result: RunResult, meta: dict[str, Any]) -> str:
    declared = meta.get("distributed") if meta.get("kind") == "distributed" else meta
    hparams = (declared or {}).get("hparams") or {}
    rows = [*((f"metric {k}", v) for k, v in result.metrics.items()),
            *((f"hparam {k}", v) for k, v in hparams.items())]
    return _key_table(rows) if rows else "<p class='note'>no metrics recorded</p>"


def _pareto_section(result: SearchResult) -> str:
    if not result.pareto:
        return "<p class='note'>no trial completed</p>"
    names = list(dict.fromkeys(k for b in result.pareto for k in b.hparams))
    header = ["trial_id", *result.metrics, *names]
    front = [[b.trial_id, *b.metric, *(b.hparams.get(k) for k in names)] for b in result.pareto]
    return f"<p>{len(front)} trial(s) on the Pareto front</p>{_table(header, front)}"


# ---------------------------------------------------------------------------------------------- tables
def _trials_section(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class='note'>no trials recorded yet</p>"
    return "<p class='hint'>click a column's header to sort by it</p>" + _frame_table(frame)


def _frame_table(frame: pd.DataFrame) -> str:
    rows = [list(values) for values in frame.itertuples(index=False, name=None)]
    return _table([str(c) for c in frame.columns], rows)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th scope='col'>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return (f"<div class='scroll'><table class='sortable'><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _key_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th scope='row'>{_esc(k)}</th>{_cell(v)}</tr>" for k, v in rows)
    return f"<table class='keys'><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    """A table cell; a number keeps its full value in ``data-v`` (what sorting compares)."""
    if _is_missing(value):
        return "<td data-v=''></td>"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        text = _text(value)
        if "\n" in text.strip():  # an error's traceback keeps its lines
            return f"<td><pre>{_esc(text.strip())}</pre></td>"
        css = f" class='status-{text}'" if text in ("completed", "stopped", "failed", "running") else ""
        return f"<td{css}>{_esc(text)}</td>"
    shown = str(int(value)) if isinstance(value, numbers.Integral) else f"{float(value):.6g}"
    return f"<td class='num' data-v='{float(value)!r}'>{shown}</td>"


def _is_missing(value: Any) -> bool:
    """None, NaN, pandas' NA or NaT (a list or dict is a value, not a missing one)."""
    if value is None:
        return True
    if isinstance(value, (list, dict, tuple, str)):
        return False
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------------------- plots
def _plots(result: SearchResult | RunResult) -> tuple[str, str]:
    """plotly.js (empty when plotly is missing) and the plots section's HTML."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        return "", "<p class='note'>plots need plotly: pip install 'unison[plot]'</p>"
    from unison import plots

    try:
        kinds = plots.kinds(result)
    except Exception as exc:  # noqa: BLE001 - the page is still worth having without plots
        return "", f"<p class='note'>no plots: {_esc(type(exc).__name__)}: {_esc(exc)}</p>"
    if not kinds:
        return "", "<p class='note'>no plot applies to this experiment</p>"
    return get_plotlyjs(), "".join(plot_html(result, kind, plots.figure) for kind in kinds)


def plot_html(result: Any, kind: str, figure: Any) -> str:
    """One plot's block: ``figure(result, kind)`` drawn in a ``div`` with the id ``plot-<kind>``, or a
    note saying why it could not be drawn."""
    caption = f"<p class='caption'>{_esc(_CAPTIONS[kind])}</p>" if kind in _CAPTIONS else ""
    try:
        fig = figure(result, kind)
        drawn = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{kind}",
                            default_width="100%", default_height="480px",
                            config={"responsive": True, "displaylogo": False})
    except Exception as exc:  # noqa: BLE001 - one plot that cannot be drawn must not lose the report
        drawn = (f"<p class='note plot-error' data-kind='{_esc(kind)}'>the {_esc(kind)} plot could not be "
                 f"drawn: {_esc(type(exc).__name__)}: {_esc(exc)}</p>")
    return f"<div class='plot' data-kind='{_esc(kind)}'><h3>{_esc(kind)}</h3>{caption}{drawn}</div>"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2933;margin:0;background:#f7f8fa}
header{background:#1f2933;color:#fff;padding:14px 28px}header h1{margin:0;font-size:20px}
header code{color:#cbd2d9}header nav a{color:#9fd3ff;margin-right:4px}
main{padding:8px 28px 40px}section{background:#fff;border:1px solid #e4e7eb;border-radius:6px;
padding:8px 18px 14px;margin:16px 0}h2{font-size:17px}h3{font-size:15px;margin:18px 0 2px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px;border-bottom:1px solid #e4e7eb;
text-align:left;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#f0f4f8;position:sticky;top:0;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
table.keys th{color:#52606d;font-weight:600}table.keys td{text-align:left}
.scroll{overflow:auto;max-height:640px}
.status-completed{color:#1b7f3b}.status-stopped{color:#b26b00}.status-failed{color:#c0392b}
.note{color:#8a4b08;background:#fff8e6;padding:6px 10px;border-radius:4px}
.caption,.hint{color:#616e7c;margin:0 0 6px}.headline{font-weight:600}
pre{margin:0;font-size:12px;white-space:pre-wrap}
"""

# Sorts a table.sortable's rows by the clicked column: numbers (data-v) as numbers, the rest as text,
# empty cells last; a second click reverses.
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        return cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = Number(x), ny = Number(y);
        var order = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""
