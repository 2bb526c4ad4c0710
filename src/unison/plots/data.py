"""What each of unison's own plot kinds draws, read from a result as plain lists.

The plotly figures (:mod:`unison.plots.interactive`) and the matplotlib PNGs (:mod:`unison.plots.static`)
draw the same kind from the same data, so a saved PNG shows what ``result.plot()`` shows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from unison._validate import did_you_mean
from unison.driver.store import ExperimentStore

# Columns of ``result.curves`` that are not reported metrics.
CURVE_KEYS = frozenset({"trial_id", "step", "time", "component", "seed", "attempt", "status"})
# One colour per trial status (and the best trial), per ablation verdict, for both drawings.
COLORS = {"completed": "#4c72b0", "best": "#dd8452", "stopped": "#a6a6a6", "failed": "#c44e52",
          "running": "#8172b3", "pending": "#ccb974"}
STATUS_LABELS = {"completed": "completed", "stopped": "stopped early (×)", "failed": "failed",
                 "running": "running", "pending": "pending"}
# One colour per population member (a PBT search), cycled past ten members (matplotlib's tab10).
MEMBER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf")
EFFECT_COLORS = {"worse": "#c44e52", "better": "#4c72b0", "no effect shown": "#a6a6a6"}
EFFECT_LABELS = {"worse": "worse without it", "better": "better without it",
                 "no effect shown": "no effect shown (95% interval contains 0)"}


@dataclass
class Curve:
    """One trial's reported ``metric`` by step."""

    trial_id: int
    status: str
    steps: list[float]
    values: list[float]
    label: str
    best: bool = False


@dataclass
class Segment:
    """One trial of a population-based-training search: its reported ``metric`` by step in its
    population slot ``member``. A clone's line starts at ``start``, its parent's point at ``cloned_step``
    (the value its checkpoint inherited); a ``replaced`` trial's slot was taken by a later clone."""

    trial_id: int
    member: int
    status: str
    steps: list[float]
    values: list[float]
    label: str
    parent: int | None = None
    cloned_step: int | None = None
    start: tuple[float, float] | None = None
    replaced: bool = False
    best: bool = False

    @property
    def color(self) -> str:
        """The member's colour."""
        return MEMBER_COLORS[self.member % len(MEMBER_COLORS)]


@dataclass
class History:
    """The completed trials' values in trial order and in order of their end (seconds since the
    experiment started), each with the best value so far."""

    metric: str
    trial_ids: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    best_by_trial: list[float] = field(default_factory=list)
    end_times: list[float] = field(default_factory=list)
    values_by_time: list[float] = field(default_factory=list)
    best_by_time: list[float] = field(default_factory=list)


@dataclass
class Bar:
    """One attempt of a trial on one worker: it started ``start`` seconds after the experiment did."""

    worker: str
    trial_id: int
    attempt: int
    start: float
    duration: float
    status: str


@dataclass
class Effect:
    """One removed component: the mean difference to the baseline, its 95% interval and its verdict."""

    component: str
    diff: float
    low: float
    high: float
    effect: str


def trial_rows(result: Any) -> list[dict[str, Any]]:
    """The result's trial records; a single run is one completed trial."""
    rows = getattr(result, "rows", None)
    if rows is not None:
        return list(rows)
    return [{"trial_id": 0, "status": "completed", "hparams": {}, "metrics": dict(result.metrics)}]


def objective_metrics(result: Any) -> list[str]:
    """The metrics the experiment optimized (none for a single run)."""
    return list(getattr(result, "metrics", [])) if hasattr(result, "modes") else []


def reported_metrics(frame: Any) -> list[str]:
    """The metric columns of a ``result.curves`` frame, in their order."""
    return [str(c) for c in frame.columns if c not in CURVE_KEYS]


def curve_metric(result: Any, frame: Any, metric: str | None, kind: str = "curves") -> str:
    """The reported metric a ``curves`` (or ``pbt``) plot shows: ``metric``, or the optimized one (else
    the first)."""
    reported = reported_metrics(frame)
    if not reported:
        raise ValueError(f"plot({kind!r}): no trial reported a metric "
                         "(reporter.report(step=..., name=value))")
    if metric is None:
        return next((m for m in objective_metrics(result) if m in reported), reported[0])
    if metric not in reported:
        hint = did_you_mean(metric, reported)
        message = f"plot({kind!r}, metric={metric!r}): the trials reported {reported}.{hint}"
        raise ValueError(message.rstrip("."))
    return metric


def objective(result: Any, kind: str, metric: str | None) -> tuple[str, str]:
    """An optimized metric and its mode: ``metric``, or the first the experiment optimized."""
    names = objective_metrics(result)
    if metric is None:
        return names[0], result.modes[0]
    if metric not in names:
        hint = did_you_mean(metric, names)
        raise ValueError(f"plot({kind!r}, metric={metric!r}) shows an optimized metric, one of "
                         f"{names}.{hint}".rstrip("."))
    return metric, result.modes[names.index(metric)]


def curves(result: Any, frame: Any, metric: str) -> list[Curve]:
    """Each trial that reported ``metric``: its steps and values, in trial order."""
    rows = {row["trial_id"]: row for row in trial_rows(result)}
    best = getattr(result, "best", None)
    out = []
    for trial_id, group in frame.groupby("trial_id", sort=True):
        points = group[["step", metric]].dropna().sort_values("step", kind="stable")
        if points.empty:
            continue
        row = rows.get(int(trial_id), {"status": "completed", "hparams": {}})
        label = f"trial {int(trial_id)} ({row['status']})" + _hparams_text(row.get("hparams") or {})
        out.append(Curve(int(trial_id), row["status"], points["step"].tolist(), points[metric].tolist(),
                         label, best is not None and best.trial_id == int(trial_id)))
    return out


def curves_title(metric: str, drawn: list[Curve]) -> str:
    """``"accuracy by step: 12 trials, 7 stopped early"``."""
    stopped = sum(c.status == "stopped" for c in drawn)
    return f"{metric} by step: {len(drawn)} trials" + (f", {stopped} stopped early" if stopped else "")


def is_population(rows: list[dict[str, Any]]) -> bool:
    """Whether the trials are a population-based-training search's (they have a population slot)."""
    return any(isinstance(row.get("member"), int) for row in rows)


def population(result: Any, frame: Any, metric: str) -> list[Segment]:
    """Each trial of a population-based-training search that reported ``metric``, in trial order, with
    where its line starts (a clone: its parent's point at ``cloned_step``) and whether it was replaced."""
    rows = [row for row in trial_rows(result) if isinstance(row.get("member"), int)]
    points = {int(tid): group[["step", metric]].dropna().sort_values("step", kind="stable")
              for tid, group in frame.groupby("trial_id", sort=True)}
    last_in_slot = {row["member"]: row["trial_id"] for row in sorted(rows, key=lambda r: r["trial_id"])}
    best = getattr(result, "best", None)
    out = []
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        tid, own = row["trial_id"], points.get(row["trial_id"])
        if own is None or own.empty:
            continue
        parent = row["parent"] if isinstance(row.get("parent"), int) else None
        cloned = row["cloned_step"] if isinstance(row.get("cloned_step"), int) else None
        start = _point_at(points.get(parent), metric, cloned) if parent is not None else None
        out.append(Segment(tid, row["member"], row["status"], own["step"].tolist(), own[metric].tolist(),
                           _segment_label(row, parent, cloned), parent, cloned, start,
                           replaced=last_in_slot[row["member"]] != tid,
                           best=best is not None and best.trial_id == tid))
    return out


def _point_at(points: Any, metric: str, step: int | None) -> tuple[float, float] | None:
    """The last of ``points`` at or before ``step`` (a checkpoint's step is a reported step)."""
    if points is None or step is None:
        return None
    before = points[points["step"] <= step]
    return None if before.empty else (float(before["step"].iloc[-1]), float(before[metric].iloc[-1]))


def _segment_label(row: dict[str, Any], parent: int | None, cloned: int | None) -> str:
    lineage = f"<br>clone of trial {parent} at step {cloned}" if parent is not None else ""
    return (f"trial {row['trial_id']} ({row['status']}), member {row['member']}{lineage}"
            + _hparams_text(row.get("hparams") or {}))


def population_title(result: Any, metric: str) -> str:
    """``"score by step: population of 4, 6 clones"``."""
    rows = [row for row in trial_rows(result) if isinstance(row.get("member"), int)]
    members = len({row["member"] for row in rows})
    clones = sum(isinstance(row.get("parent"), int) for row in rows)
    return f"{metric} by step: population of {members}, {clones} clone{'' if clones == 1 else 's'}"


def _hparams_text(hparams: dict[str, Any]) -> str:
    if not hparams:
        return ""
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v, default=str)}"
                      for k, v in hparams.items())
    return f"<br>{shown}"


def _start_times(events: list[dict[str, Any]]) -> tuple[float, dict[int, float]]:
    """When the experiment started, and each trial's last start."""
    times = [ev["t"] for ev in events if isinstance(ev.get("t"), (int, float))]
    origin = min(times) if times else 0.0
    starts = {ev["id"]: float(ev["t"]) for ev in events if ev.get("e") == "start" and "t" in ev}
    return origin, starts


def history(result: Any, metric: str, mode: str) -> History:
    """The completed trials' ``metric``, with the best so far, by trial and by wall time."""
    origin, starts = _start_times(ExperimentStore(result.path).read_journal())
    pick = max if mode == "max" else min
    out = History(metric)
    done = [r for r in trial_rows(result)
            if r["status"] == "completed" and _is_number((r.get("metrics") or {}).get(metric))]
    for row in sorted(done, key=lambda r: r["trial_id"]):
        out.trial_ids.append(row["trial_id"])
        out.values.append(float(row["metrics"][metric]))
        out.best_by_trial.append(pick(out.best_by_trial[-1], out.values[-1]) if out.best_by_trial
                                 else out.values[-1])
    ends = []
    for row in done:
        start = starts.get(row["trial_id"])
        if start is not None:
            ends.append((start + float(row.get("duration") or 0.0) - origin, float(row["metrics"][metric])))
    for end, value in sorted(ends):
        out.end_times.append(end)
        out.values_by_time.append(value)
        out.best_by_time.append(pick(out.best_by_time[-1], value) if out.best_by_time else value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def timeline(result: Any) -> list[Bar]:
    """Every attempt that ended, as a bar on its worker; an attempt lost with its worker has no
    recorded end and is not drawn."""
    events = ExperimentStore(result.path).read_journal()
    origin, _ = _start_times(events)
    open_starts: dict[int, dict[str, Any]] = {}
    bars = []
    for ev in events:
        kind, trial_id = ev.get("e"), ev.get("id")
        if not isinstance(trial_id, int):
            continue
        if kind == "start" and "t" in ev:
            open_starts[trial_id] = ev
        elif kind == "lost":
            open_starts.pop(trial_id, None)
        elif kind == "end" and trial_id in open_starts:
            start = open_starts.pop(trial_id)
            worker = str(ev.get("worker") or start.get("worker") or "?")
            bars.append(Bar(worker, int(trial_id), int(start.get("attempt") or 0), float(start["t"]) - origin,
                            float(ev.get("duration") or 0.0), str(ev.get("status"))))
    return bars


def workers_in_order(bars: list[Bar]) -> list[str]:
    """The workers by name, numbers in their numeric order (``worker-2`` before ``worker-10``)."""
    def key(name: str) -> list[tuple[int, Any]]:
        return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name)]

    return sorted({bar.worker for bar in bars}, key=key)


def ablation_effects(result: Any) -> list[Effect]:
    """Each removed component with a measured difference, in the ablation table's order."""
    return [Effect(r["component"], r["diff"], r["diff_ci_low"], r["diff_ci_high"], r["effect"])
            for r in result.removal_effects() if not math.isnan(r["diff"])]
