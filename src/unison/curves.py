"""Every intermediate report of an experiment as one long table: ``result.curves``.

A search's, an ablation's or a distributed run's reports come from the journal's ``report`` events:
they are complete (a trial's ``metrics.jsonl`` is cut past its size limit, and a Spark executor sends it
back only within a size limit) and a retried trial's reports are those of its last attempt (its
``metrics.jsonl`` goes on across attempts). A single run journals its reports too; one recorded before
it did (no report event in its journal) has them read from ``trials/0000/metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison.driver.store import ExperimentStore

if TYPE_CHECKING:
    import pandas as pd

    from unison.result import RunResult, SearchResult

BASE_COLUMNS = ("trial_id", "step")
TIME_COLUMN = "time"
ABLATION_COLUMNS = ("component", "seed")


def trial_reports(events: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Each trial's reports in the order made, from a journal's events: ``{"step", "metrics", "t"}``
    each (``t`` is ``None`` where the event carries no time). A trial that started again (a retry, a
    rerun after its worker was lost, a paused trial's turn) keeps the reports up to the checkpoint it
    resumed from, if any, and those after its last start."""
    reports: dict[int, list[dict[str, Any]]] = {}
    for ev in events:
        tid, kind = ev.get("id"), ev.get("e")
        if tid is None:
            continue
        if kind == "start":  # from a checkpoint, the reports up to its step stand; the later ones are redone
            resumed = ev.get("resumed_from")
            kept = reports.get(tid, []) if isinstance(resumed, int) else []
            reports[tid] = [r for r in kept if isinstance(r["step"], int) and r["step"] <= (resumed or 0)]
        elif kind == "report" and tid in reports:
            reports[tid].append({"step": ev.get("step"), "metrics": ev.get("metrics") or {},
                                 "t": ev.get("t")})
    return reports


def file_reports(path: Path) -> list[dict[str, Any]]:
    """The reports in one ``metrics.jsonl``: each line ``{"step": s, <metric>: value, ...}``; the note a
    cut file starts with (``{"unison": "... were cut ..."}``) and torn lines are skipped."""
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        step = record.pop("step")
        reports.append({"step": step, "metrics": record, "t": None})
    return reports


def _ablation_specs(events: list[dict[str, Any]]) -> dict[int, tuple[Any, Any]]:
    """Each ablation trial's component name and seed, from its start event."""
    specs: dict[int, tuple[Any, Any]] = {}
    for ev in events:
        if ev.get("e") == "start" and ev.get("id") is not None:
            spec = ev.get("spec") or {}
            specs[ev["id"]] = ((spec.get("component") or {}).get("name"), spec.get("seed"))
    return specs


def declared_metrics(meta: dict[str, Any]) -> list[str]:
    """The metric(s) an experiment optimizes, from its ``experiment.json`` (none for a single run)."""
    declared = meta.get(str(meta.get("kind")))
    metric = declared.get("metric") if isinstance(declared, dict) else None
    if isinstance(metric, str):
        return [metric]
    return [m for m in metric if isinstance(m, str)] if isinstance(metric, list) else []


def _metric_column(name: str, fixed: tuple[str, ...]) -> str:
    return f"metric:{name}" if name in fixed else name


def curves_frame(result: SearchResult | RunResult) -> pd.DataFrame:
    """Every report of ``result``'s experiment, one row each, in the order made per trial (trials by
    id): ``trial_id``, for an ablation ``component`` and ``seed``, ``step``, one column per reported
    metric (the optimized ones first; a metric named like a fixed column gets a ``metric:`` prefix;
    ``NaN`` where a report lacks it), then ``time`` (unix seconds the driver received the report,
    ``NaN`` where the record holds none). A trial stopped early simply has fewer rows; a trial that
    reported nothing has none. With no report at all: an empty frame with these columns.
    """
    import pandas as pd

    store = ExperimentStore(result.path)
    meta = store.read_experiment()
    events = store.read_journal()
    reports = trial_reports(events)
    if meta.get("kind") == "single" and not any(reports.values()):  # its reports are not journaled
        reports = {0: file_reports(store.trial_dir(0) / "metrics.jsonl")}
    specs = _ablation_specs(events) if meta.get("kind") == "ablation" else None
    fixed = (*BASE_COLUMNS, *(ABLATION_COLUMNS if specs is not None else ()), TIME_COLUMN)
    names = list(dict.fromkeys([*declared_metrics(meta),
                                *(m for trial in reports.values() for r in trial for m in r["metrics"])]))
    metric_columns = [_metric_column(n, fixed) for n in names]
    columns = ["trial_id", *(ABLATION_COLUMNS if specs is not None else ()), "step", *metric_columns,
               TIME_COLUMN]
    frame = pd.DataFrame.from_records(_records(reports, specs, fixed), columns=columns)
    frame[[*metric_columns, TIME_COLUMN]] = frame[[*metric_columns, TIME_COLUMN]].astype(float)
    return frame.astype({"trial_id": "int64", "step": "int64"})


def _records(reports: dict[int, list[dict[str, Any]]], specs: dict[int, tuple[Any, Any]] | None,
             fixed: tuple[str, ...]) -> list[dict[str, Any]]:
    """One record per report, trials by id; ``specs``: an ablation's component and seed per trial."""
    records = []
    for tid in sorted(reports):
        for report in reports[tid]:
            record: dict[str, Any] = {"trial_id": tid}
            if specs is not None:
                record["component"], record["seed"] = specs.get(tid, (None, None))
            record["step"] = report["step"]
            for name, value in report["metrics"].items():
                record[_metric_column(name, fixed)] = value
            record[TIME_COLUMN] = math.nan if report["t"] is None else float(report["t"])
            records.append(record)
    return records
