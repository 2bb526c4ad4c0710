"""What ``unison.run`` returns: ``RunResult`` for a single run, ``SearchResult`` for a search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison._bulk import collector_paused
from unison.driver.store import ExperimentStore
from unison.errors import RunFailed

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import plotly.graph_objects as go

_FIXED_COLUMNS = ("trial_id", "status")
_TAIL_COLUMNS = ("steps", "last_step", "duration", "worker", "host", "node", "gpus", "pid", "attempts",
                 "stop_reason", "error", "checkpoint")
# Population-based training's columns, in a table of a search that used it: the population slot a trial
# fills, the trial it was cloned from, its checkpoint's step, and its hyperparameters' schedule
_LINEAGE_COLUMNS = ("member", "parent", "cloned_step")


@dataclass(frozen=True)
class Best:
    """A best completed trial: its id, hyperparameters, optimized value (a list of values in a
    multi-objective search), all its final metrics and its latest checkpoint's folder (``None`` if
    it saved none; read it with :func:`unison.load_checkpoint`): a ``Path``, or a URL string when the
    experiment ran with ``checkpoint_storage=`` an fsspec URL."""

    trial_id: int
    hparams: dict[str, Any]
    metric: Any
    metrics: dict[str, float]
    checkpoint: Path | str | None = None


def objective_value(metrics: dict[str, float], names: list[str]) -> float | list[float] | None:
    """The optimized value: one float, a list of floats (multi-objective), or ``None`` if missing."""
    if any(name not in metrics for name in names):
        return None
    return metrics[names[0]] if len(names) == 1 else [metrics[name] for name in names]


def dominates(a: list[float], b: list[float], modes: list[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    at_least = all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True))
    return at_least and any(s * x > s * y for s, x, y in zip(signs, a, b, strict=True))


@dataclass
class RunResult:
    """The result of a single run.

    Attributes:
        metrics: the dict the function returned (or ``{"value": x}`` for a bare number).
        value: the bare number returned, the ``metric=`` entry, or the only entry of the dict.
        returned: exactly what the function returned.
        path: the experiment directory.
        checkpoint: the folder of the run's latest checkpoint (``reporter.report(checkpoint=...)``; a
            distributed run's: rank 0's), ``None`` if it saved none; :func:`unison.load_checkpoint`
            reads it. As ``r.best.checkpoint`` of a search.
    """

    metrics: dict[str, Any]
    value: Any
    returned: Any
    path: Path
    duration: float

    @property
    def checkpoint(self) -> Path | str | None:
        """The latest checkpoint's folder, read from the journal (``None`` without one; a URL string
        with ``checkpoint_storage=`` an fsspec URL)."""
        latest = None
        for event in ExperimentStore(self.path).read_journal():
            if event.get("e") == "checkpoint" and event.get("id") == 0 and isinstance(event.get("path"), str):
                latest = event["path"]
        return None if not latest else latest if "://" in latest else Path(self.path) / latest

    @property
    def curves(self) -> pd.DataFrame:
        """Every report of the run: ``trial_id``, ``step``, one column per metric, ``time`` (see
        :func:`unison.curves.curves_frame`)."""
        from unison.curves import curves_frame

        return curves_frame(self)

    @classmethod
    def load(cls, path: str | Path) -> RunResult:
        """Read a single run or a distributed run back from its directory, as ``unison.run`` returned
        it (``returned`` is the metrics: what the function returned itself is not stored). A run that
        did not complete raises :class:`unison.RunFailed` with its error, as ``unison.run`` did."""
        store = ExperimentStore(path)
        meta = store.read_experiment()
        kind = meta.get("kind")
        if kind == "single":
            summary = store.read_result() or {}
            if summary.get("status") != "completed":
                ends = [ev for ev in store.read_journal() if ev.get("e") == "end"]
                raise _not_completed(store.path, meta.get("status"), ends[-1].get("error") if ends else None)
            return cls(metrics=dict(summary["metrics"]), value=summary.get("value"),
                       returned=dict(summary["metrics"]), path=store.path, duration=summary["duration"])
        if kind != "distributed":
            raise ValueError(f"{path} holds a {kind!r} experiment; RunResult.load reads a single or a "
                             f"distributed run: use unison.load (or SearchResult.load) for a search or an "
                             f"ablation")
        metric = meta["distributed"].get("metric")
        rows = rows_from_journal(store.read_journal(), metric or "value")
        if not rows or rows[0]["status"] != "completed":
            raise _not_completed(store.path, rows[0]["status"] if rows else meta.get("status"),
                                 rows[0].get("error") if rows else None)
        metrics = dict(rows[0]["metrics"])
        value = metrics.get(metric) if metric is not None else (
            next(iter(metrics.values())) if len(metrics) == 1 else None)
        return cls(metrics=metrics, value=value, returned=dict(metrics), path=store.path,
                   duration=rows[0]["duration"])

    def plot(self, kind: str | None = None, path: str | Path | None = None, **options: Any) -> go.Figure:
        """The run's reported metric by step (``kind="curves"``, ``metric=`` to pick one) as a plotly
        figure; saved too when ``path`` ends in ``.html`` or ``.png`` (see :meth:`SearchResult.plot`)."""
        from unison.plots import plot

        return plot(self, kind, path, **options)

    def _repr_html_(self) -> str:
        """In Jupyter: the value, the metrics as a table, the duration, the experiment directory and the
        curves, if the run reported."""
        value = f"{self.value:.6g}" if isinstance(self.value, float) else str(self.value)
        value = "" if self.value is None else f": value <b>{_esc(value)}</b>"
        rows = [*self.metrics.items(), ("duration (s)", self.duration)]
        return (f"<div class='unison-result'><p><b>RunResult</b>{value}<br>"
                f"<small><code>{_esc(self.path)}</code></small></p>{_html_table(['metric', 'value'], rows)}"
                f"{_plot_html(self)}</div>")


def _not_completed(path: Path, status: Any, error: Any) -> RunFailed:
    """Why a stored single or distributed run has no result, as the error ``unison.run`` raised."""
    if status in (None, "running"):
        return RunFailed(f"the run in {path} has not ended: it is still running, or its process was "
                         f"stopped before it could record how it ended", path)
    detail = f":\n{str(error).strip()}" if error else ""
    return RunFailed(f"the run in {path} did not complete: it ended {status}{detail}", path)


def trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A pandas DataFrame with one row per trial: id, status, hparams, final metrics, the rest."""
    with collector_paused():
        return _trials_frame(rows)


def _trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame.from_records(trial_records(rows))
    if any("member" in row for row in rows):  # ids and steps, with gaps (a first member has no parent)
        frame = frame.astype({k: "Int64" for k in _LINEAGE_COLUMNS})  # integers, not floats
    if not frame.empty:
        frame = frame.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return frame


def trial_records(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of :func:`trials_frame` as dicts, in the order of ``rows`` (a table with no pandas)."""
    records = []
    lineage = any("member" in row for row in rows)
    by_id = {row["trial_id"]: row for row in rows}
    taken = {*_FIXED_COLUMNS, *_TAIL_COLUMNS}
    for row in rows:
        record: dict[str, Any] = {"trial_id": row["trial_id"], "status": row["status"]}
        for name, value in row["hparams"].items():  # a hyperparameter called e.g. "steps" keeps its value
            record[f"hparam:{name}" if name in taken else name] = value
        for name, value in (row.get("metrics") or {}).items():
            key = name if name not in record and name not in _TAIL_COLUMNS else f"metric:{name}"
            record[key] = value
        for name in _TAIL_COLUMNS:
            record[name] = row.get(name)
        if lineage:
            record.update({k: row.get(k) for k in _LINEAGE_COLUMNS})
            record["schedule"] = hparam_schedule(by_id, row["trial_id"])
        if record["error"]:
            record["error"] = record["error"].strip().splitlines()[-1]
        records.append(record)
    return records


def hparam_schedule(rows: dict[int, dict[str, Any]], trial_id: int) -> list[tuple[int, dict[str, Any]]]:
    """The hyperparameters that trained ``trial_id``'s model, as ``(first step, hparams)`` pairs: its
    ancestors' (population-based training: a clone continues its parent's checkpoint) and then its own."""
    chain: list[dict[str, Any]] = []
    row: dict[str, Any] | None = rows.get(trial_id)
    while row is not None and len(chain) < len(rows):
        chain.append(row)
        parent = row.get("parent")
        row = rows.get(parent) if isinstance(parent, int) else None
    schedule: list[tuple[int, dict[str, Any]]] = []
    for row in reversed(chain):  # the oldest ancestor first
        start = row["cloned_step"] + 1 if isinstance(row.get("cloned_step"), int) else 0
        schedule = [(step, h) for step, h in schedule if step < start] + [(start, dict(row["hparams"]))]
    return schedule


def _gpus_text(gpus: Any) -> str | None:
    """A start event's GPUs as the trial table shows them (as ``TrialState.row`` does): ``"0,1"``, or
    ``None`` without any."""
    return ",".join(map(str, gpus)) if isinstance(gpus, list) and gpus else None


def rows_from_journal(events: list[dict[str, Any]], metric: str | list[str]) -> list[dict[str, Any]]:
    """The trial rows recorded in a journal (trials that never ended show as ``running``)."""
    with collector_paused():
        return _rows_from_journal(events, metric)


_END_FIELDS = ("status", "error", "duration", "steps", "last_step", "stop_reason", "worker")


def _rows_from_journal(events: list[dict[str, Any]], metric: str | list[str]) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    names = [metric] if isinstance(metric, str) else metric
    for ev in events:
        kind, tid = ev.get("e"), ev.get("id")
        if tid is None:  # an experiment's status event, not a trial's
            continue
        if kind == "end":
            row = rows.get(tid)
            if row is not None:
                for field in _END_FIELDS:
                    row[field] = ev.get(field)
                row["metrics"] = ev.get("metrics") or {}
                row["value"] = objective_value(row["metrics"], names)
        elif kind == "start":
            row = rows.setdefault(tid, {"trial_id": tid, "metrics": {}, "steps": 0})
            row.update(status="running", hparams=ev["hparams"], worker=ev.get("worker"),
                       host=ev.get("host"), node=ev.get("node"), pid=ev.get("pid"),
                       gpus=_gpus_text(ev.get("gpus")),
                       attempts=ev.get("attempt", 0) + 1)
            if ev.get("spec"):  # an ablation trial's component and seed
                row["spec"] = ev["spec"]
            row.update(ev.get("lineage") or {})  # population-based training: member, parent, cloned_step
        elif kind == "clone":  # a clone queued in a trial's place; its start event comes when it runs
            rows[tid] = {"trial_id": tid, "status": "pending", "hparams": ev["hparams"], "metrics": {},
                         "steps": 0, "checkpoint": ev.get("path"),
                         **{k: ev[k] for k in _LINEAGE_COLUMNS if k in ev}}
        elif kind == "report" and tid in rows:
            rows[tid]["steps"] += 1
            rows[tid]["last_step"] = ev["step"]
            rows[tid]["metrics"] = ev["metrics"]
        elif kind == "checkpoint" and tid in rows:
            rows[tid]["checkpoint"] = ev.get("path")  # the latest: always kept
        elif kind in ("lost", "pause") and tid in rows:  # to run again (a paused one: from its checkpoint)
            rows[tid]["status"] = "pending"
    return [rows[k] for k in sorted(rows)]


class SearchResult:
    """The result of a search.

    Attributes:
        best: the best completed trial (:class:`Best`), or ``None`` if none completed (or the
            search has several objectives: see ``pareto``).
        pareto: the completed trials no other completed trial dominates (for one objective: the best).
        trials: a pandas DataFrame, one row per trial.
        path: the experiment directory.
        status: ``completed``, ``aborted``, ``interrupted``, ...
    """

    def __init__(self, path: Path, metric: str | list[str], mode: str | list[str],
                 rows: list[dict[str, Any]], status: str) -> None:
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.modes = [mode] * len(self.metrics) if isinstance(mode, str) else list(mode)
        self.metric = self.metrics[0] if len(self.metrics) == 1 else self.metrics
        self.mode = self.modes[0] if len(self.modes) == 1 else self.modes
        self.path, self.status = Path(path), status
        for row in rows:  # the journal names a checkpoint relative to the experiment: here, a full path
            if row.get("checkpoint") and "://" not in row["checkpoint"]:  # (checkpoint_storage=: a URL)
                row["checkpoint"] = str(self.path / row["checkpoint"])
        self._rows = rows
        done = [r for r in rows if r["status"] == "completed" and r.get("value") is not None]
        if len(self.metrics) > 1:
            self.best = None
            front = [r for r in done if not any(dominates(o["value"], r["value"], self.modes) for o in done)]
            self.pareto = [self._as_best(r) for r in front]
        else:
            pick = max if self.mode == "max" else min
            self.best = self._as_best(pick(done, key=lambda r: r["value"])) if done else None
            self.pareto = [] if self.best is None else [self.best]

    @staticmethod
    def _as_best(row: dict[str, Any]) -> Best:
        found = row.get("checkpoint")
        checkpoint = None if not found else found if "://" in found else Path(found)
        return Best(row["trial_id"], dict(row["hparams"]), row["value"], dict(row["metrics"]), checkpoint)

    @property
    def trials(self) -> pd.DataFrame:
        return trials_frame(self._rows)

    def summary_extra(self) -> dict[str, Any]:
        """Kind-specific entries for ``result.json``."""
        return {}

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The trial records as plain dicts."""
        return list(self._rows)

    @property
    def curves(self) -> pd.DataFrame:
        """Every report of every trial, one row each: ``trial_id`` (an ablation: ``component``,
        ``seed``), ``step``, one column per metric, ``time``; a stopped trial's rows end where it
        stopped (see :func:`unison.curves.curves_frame`)."""
        from unison.curves import curves_frame

        return curves_frame(self)

    def to_optuna(self) -> optuna.Study:
        """The experiment as an in-memory ``optuna.Study``: a trial per trial, with its params and
        distributions, values, intermediate values, state and times (see
        :func:`unison.optuna_study.to_optuna`), so that ``optuna.visualization`` and every other Optuna
        tool work on it."""
        from unison.optuna_study import to_optuna

        return to_optuna(self)

    def importance(self, metric: str | None = None, evaluator: Any = "ped-anova",
                   mode: str | None = None) -> pd.DataFrame:
        """Hyperparameter importance from the completed trials (an ablation's: of ``component`` and
        ``seed``), by Optuna's evaluators: a DataFrame with ``param`` and ``importance`` (summing to 1),
        most important first.

        Args:
            metric: the final metric to explain (default: the optimized one).
            evaluator: ``"ped-anova"`` (default, ``optuna.importance.PedAnovaImportanceEvaluator``),
                ``"fanova"`` (``FanovaImportanceEvaluator``, needs scikit-learn) or an evaluator instance.
            mode: ``"max"``/``"min"``: which way a metric the experiment did not optimize is better.
        """
        from unison.optuna_study import param_importance

        return param_importance(self, metric, evaluator, mode)

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        """Read a search or an ablation back from its directory (finished or not).

        ``SearchResult.load`` gives an :class:`AblationResult` for an ablation experiment.
        """
        store = ExperimentStore(path)
        meta = store.read_experiment()
        kind = meta.get("kind")
        result_class = _RESULT_CLASSES.get(kind) if isinstance(kind, str) else None
        if not isinstance(kind, str) or result_class is None or not issubclass(result_class, cls):
            readable = sorted(k for k, c in _RESULT_CLASSES.items() if issubclass(c, cls))
            raise ValueError(f"{path} holds a {kind!r} experiment; {cls.__name__}.load reads {readable}")
        declared = meta[kind]
        rows = rows_from_journal(store.read_journal(), declared["metric"])
        return result_class(store.path, declared["metric"], declared["mode"], rows,
                            meta.get("status", "unknown"))

    def __repr__(self) -> str:
        if self.best is None:
            best = f"{len(self.pareto)} on the Pareto front" if len(self.metrics) > 1 else "none"
        else:
            best = f"{self.metric}={self.best.metric:.6g} {self.best.hparams}"
        return f"SearchResult({len(self._rows)} trials, status={self.status}, best: {best}, path={self.path})"

    def _html_header(self) -> str:
        counts: dict[str, int] = {}
        for row in self._rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        return (f"<p><b>{type(self).__name__}</b>: {len(self._rows)} trials ({_esc(tally) or 'none'}), "
                f"status <b>{_esc(self.status)}</b>, {_esc(self.metric)} ({_esc(self.mode)})<br>"
                f"<small><code>{_esc(self.path)}</code></small></p>")

    def plot(self, kind: str | None = None, path: str | Path | None = None, **options: Any) -> go.Figure:
        """The experiment as a plotly figure (shown inline in Jupyter), saved too when ``path`` ends in
        ``.html`` (plotly.js inlined: it opens with no network) or ``.png`` (drawn by matplotlib: no
        browser needed; without plotly the PNG is written, then the ``ImportError`` is raised).

        ``kind`` (``unison.plots.kinds(result)`` lists those that apply, the default first): a search's
        ``"history"`` (best so far by trial and by wall time), ``"curves"`` (each trial's reports by
        step; stopped trials grey, ending in an x), ``"parallel"``, ``"importance"``, ``"slice"``,
        ``"contour"``, ``"pareto"`` (several objectives; these five drawn by ``optuna.visualization``
        from :meth:`to_optuna`) and ``"timeline"`` (each trial as a bar on its worker); an ablation's
        ``"ablation"``, ``"curves"`` and ``"timeline"``. Options: ``metric=`` (the metric shown),
        ``params=[...]`` (parallel, importance, slice, contour: two, the first two by default),
        ``evaluator=`` (importance: ``"ped-anova"`` or ``"fanova"``), ``metrics=[...]`` (pareto).
        Needs ``pip install 'unison[plot]'`` (plotly and matplotlib).
        """
        from unison.plots import plot

        return plot(self, kind, path, **options)

    def _repr_html_(self) -> str:
        """In Jupyter: the counts, then the best trial (or the Pareto front) as a table, then the default
        plot (a PNG)."""
        if self.best is not None:
            best = self.best
            rows = [("trial", best.trial_id), (self.metric, best.metric)]
            rows += [(f"hparam {k}", v) for k, v in best.hparams.items()]
            rows += [(f"metric {k}", v) for k, v in best.metrics.items() if k != self.metric]
            body = "<p>best trial</p>" + _html_table(["", "value"], rows)
        elif self.pareto:
            names = list(dict.fromkeys(k for b in self.pareto for k in b.hparams))
            rows = [(b.trial_id, *b.metric, *(b.hparams.get(k, "") for k in names)) for b in self.pareto]
            body = (f"<p>{len(self.pareto)} trial(s) on the Pareto front</p>"
                    + _html_table(["trial", *self.metrics, *names], rows))
        else:
            body = "<p>no trial completed</p>"
        return f"<div class='unison-result'>{self._html_header()}{body}{_plot_html(self)}</div>"


def _plot_html(result: Any) -> str:
    """The default plot as an inline PNG: no script and no network, so it shows in any notebook
    viewer, at a few tens of kB; nothing when there is nothing to plot or no matplotlib."""
    from unison import plots

    try:
        available = plots.kinds(result)
        if not available:
            return ""
        uri = plots.png_data_uri(result, available[0])
    except ImportError:
        return ""
    except Exception as exc:  # noqa: BLE001 - the summary shows whatever the plot does
        return f"<p><small>no plot: {_esc(exc)}</small></p>"
    return f"<img src='{uri}' alt='{_esc(available[0])} plot' style='max-width:100%'>"


def _esc(value: Any) -> str:
    import html

    return html.escape(str(value))


def _html_table(header: list[Any], rows: list[tuple[Any, ...]]) -> str:
    def cell(value: Any, tag: str) -> str:
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        return f"<{tag}>{_esc(text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------------------ ablation
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def _mean_interval(values: list[float]) -> tuple[float, float, float, float]:
    """Mean, sample standard deviation and a 95% Student-t interval of the mean."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def _values_by_component(rows: list[dict[str, Any]]) -> tuple[dict[str, dict[Any, float]], dict[str, str]]:
    """Each component's completed values by seed (in the order the components first appear), and
    each component's kind."""
    values: dict[str, dict[Any, float]] = {}
    kinds: dict[str, str] = {}
    for row in rows:
        spec = row.get("spec") or {}
        component = spec.get("component") or {}
        name = component.get("name")
        if name is None:
            continue
        kinds[name] = component.get("kind", "")
        values.setdefault(name, {})
        if row["status"] == "completed" and row.get("value") is not None:
            values[name][spec.get("seed")] = row["value"]
    return values, kinds


def ablation_table(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """One record per component (the baseline first): mean, std and 95% interval over repeats, the
    difference to the baseline paired by seed with its 95% interval, and the importance rank
    (1 = the component whose removal hurts most; ``None`` for the baseline and for a component
    without a completed trial paired with the baseline)."""
    values, kinds = _values_by_component(rows)
    baseline = next((name for name, kind in kinds.items() if kind == "baseline"), None)
    base_values = values.get(baseline, {}) if baseline is not None else {}
    nan = float("nan")
    records = []
    for name, by_seed in values.items():
        record: dict[str, Any] = {"component": name, "kind": kinds[name], "n": len(by_seed)}
        mean, std, low, high = _mean_interval(list(by_seed.values())) if by_seed else (nan,) * 4
        record.update(mean=mean, std=std, ci_low=low, ci_high=high)
        paired = [v - base_values[seed] for seed, v in by_seed.items() if seed in base_values]
        if name == baseline:
            diff, diff_low, diff_high = 0.0, nan, nan
        elif paired:
            diff, _, diff_low, diff_high = _mean_interval(paired)
        else:
            diff, diff_low, diff_high = nan, nan, nan
        record.update(diff=diff, diff_ci_low=diff_low, diff_ci_high=diff_high, rank=None)
        records.append(record)
    records.sort(key=lambda r: r["component"] != baseline)
    # Importance: how much worse the result gets without the component.
    ranked = sorted((r for r in records if r["component"] != baseline and not math.isnan(r["diff"])),
                    key=lambda r: r["diff"] if mode == "max" else -r["diff"])
    for rank, record in enumerate(ranked, start=1):
        record["rank"] = rank
    return records


class AblationResult(SearchResult):
    """The result of an ablation study.

    Attributes:
        ablation: a DataFrame, one row per component, the baseline first: ``component``, ``kind``,
            ``n`` (completed repeats), ``mean``, ``std``, ``ci_low``, ``ci_high`` (95% over repeats),
            ``diff`` (mean difference to the baseline, paired by seed), ``diff_ci_low``,
            ``diff_ci_high`` (its 95% interval), ``rank`` (an ``Int64`` column: 1 = the component
            whose removal hurts most; missing for the baseline).
        trials: one row per trial, as for a search (the hyperparameters include ``seed``).
    """

    @property
    def trials(self) -> pd.DataFrame:
        """One row per trial, as for a search, with the trial's ``component`` after its status."""
        frame = trials_frame(self._rows)
        if frame.empty:
            return frame
        if "component" in frame.columns:  # a base hyperparameter of that name
            frame = frame.rename(columns={"component": "hparam:component"})
        names = {row["trial_id"]: ((row.get("spec") or {}).get("component") or {}).get("name")
                 for row in self._rows}
        frame.insert(2, "component", frame["trial_id"].map(names))
        return frame

    @property
    def ablation(self) -> pd.DataFrame:
        import pandas as pd

        records = ablation_table(self._rows, self.modes[0])
        frame = pd.DataFrame.from_records(records, columns=_ABLATION_COLUMNS)
        frame["rank"] = frame["rank"].astype("Int64")
        return frame

    def summary_extra(self) -> dict[str, Any]:
        return {"ablation": ablation_table(self._rows, self.modes[0])}

    def removal_effects(self) -> list[dict[str, Any]]:
        """The ablation table's records of the removed components (the baseline left out), each with
        ``effect``: ``"worse"`` or ``"better"`` (the metric without the component, by its mode; with
        two or more repeats only when the 95% interval of the difference excludes 0), ``"no effect
        shown"`` (the interval contains 0, or the difference is 0), or ``None`` (not measured)."""
        mode = self.modes[0]
        records = []
        for record in ablation_table(self._rows, mode):
            if record["kind"] == "baseline":
                continue
            diff, low, high = record["diff"], record["diff_ci_low"], record["diff_ci_high"]
            if math.isnan(diff):
                effect = None
            elif diff == 0 or (not math.isnan(low) and low <= 0 <= high):
                effect = "no effect shown"
            else:
                effect = "worse" if (diff < 0) == (mode == "max") else "better"
            records.append({**record, "effect": effect})
        return records

    def headline(self) -> str:
        """One line: the component whose removal hurts most (by the metric's mode) and its difference to
        the baseline, or that no removal made the metric worse, with what its interval shows."""
        measured = [r for r in self.removal_effects() if r["effect"] is not None]
        if not measured:
            return "no component has a completed trial paired with a baseline trial"
        sign = 1.0 if self.modes[0] == "max" else -1.0  # sign * diff < 0: worse without the component
        metric = self.metrics[0]
        top = min(measured, key=lambda r: sign * r["diff"])
        if sign * top["diff"] < 0:
            return f"most important: {top['component']} ({metric} {top['diff']:+.4g} without it{_note(top)})"
        helped = max(measured, key=lambda r: sign * r["diff"])
        if helped["diff"] == 0:
            return f"no removal changed {metric}: every component's difference to the baseline is 0"
        verb = "helped most" if helped["effect"] == "better" else "changed it most"
        return (f"no removal made {metric} worse; removing {helped['component']} {verb} "
                f"({metric} {helped['diff']:+.4g} without it{_note(helped)})")

    def _repr_html_(self) -> str:
        """In Jupyter: the counts, the headline, the ablation table, then its bar chart (a PNG)."""
        table = self.ablation.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
        return (f"<div class='unison-result'>{self._html_header()}<p>{_esc(self.headline())}</p>"
                f"{table}{_plot_html(self)}</div>")

    def __repr__(self) -> str:
        return (f"AblationResult({len(self._rows)} trials, status={self.status}, {self.headline()}, "
                f"path={self.path})")


def _note(record: dict[str, Any]) -> str:
    """What a component's 95% interval says, for the headline: nothing when it excludes 0."""
    if math.isnan(record["diff_ci_low"]):
        return "; one repeat: no interval"
    return "; its 95% interval contains 0: no effect shown" if record["effect"] == "no effect shown" else ""


_ABLATION_COLUMNS = ["component", "kind", "n", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low",
                     "diff_ci_high", "rank"]
_RESULT_CLASSES: dict[str, type[SearchResult]] = {"search": SearchResult, "ablation": AblationResult}


class DistributedRecord(SearchResult):
    """The one-trial search behind a distributed run; its ``result.json`` also holds rank 0's metrics."""

    def summary_extra(self) -> dict[str, Any]:
        row = self._rows[0] if self._rows else {}
        return {"metrics": row.get("metrics") or {}, "trial_status": row.get("status"),
                "error": row.get("error")}


# ------------------------------------------------------------------------------------------ pipeline
@dataclass
class PipelineStage:
    """One stage of a pipeline as recorded: its name, kind (``search``, ``ablation``, ``distributed``),
    experiment directory, status (``completed``, ``running``, ``interrupted``, ``aborted``, ``failed``,
    ``pending``: not started), its result (``None`` until it has one) and, for a failed run, why."""

    name: str
    kind: str
    path: Path
    status: str
    result: SearchResult | RunResult | None = None
    error: str | None = None

    @classmethod
    def load(cls, name: str, kind: str, path: Path) -> PipelineStage:
        """The stage stored in ``path`` (``pending`` if it holds no experiment yet)."""
        store = ExperimentStore(path)
        if not store.exists():
            return cls(name, kind, path, "pending")
        status = str(store.read_experiment().get("status", "unknown"))
        if kind != "distributed":
            return cls(name, kind, path, status, SearchResult.load(path))
        try:
            return cls(name, kind, path, status, RunResult.load(path))
        except RunFailed as exc:  # a run that ended without completing, or has not ended
            return cls(name, kind, path, "failed" if status == "completed" else status, None, str(exc))

    def summary(self) -> str:
        """One line: the best trial, the ablation's headline, or the run's metrics; else the status."""
        result = self.result
        if isinstance(result, AblationResult):
            return result.headline()
        if isinstance(result, SearchResult):
            if len(result.metrics) > 1:
                return f"{len(result.pareto)} trial(s) on the Pareto front"
            if result.best is None:
                return "no trial completed"
            return (f"best trial {result.best.trial_id}: {result.metric}={result.best.metric:.6g} with "
                    f"{result.best.hparams}")
        if isinstance(result, RunResult):
            return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in result.metrics.items()) or "no metrics"
        if self.error and self.error.strip():
            return f"{self.status}: {self.error.strip().splitlines()[-1]}"
        return self.status


class PipelineResult:
    """The result of a :class:`unison.Pipeline`: each stage's result, as ``unison.run`` returns it for
    that stage. A stage's result is also an attribute named after the stage: ``r.search.best``,
    ``r.ablation.ablation``, ``r.final.metrics``.

    Attributes:
        stages: stage name -> its result (a :class:`SearchResult`, :class:`AblationResult` or
            :class:`RunResult`), in stage order; a stage without a result yet is left out.
        statuses: stage name -> its status (``completed``, ``running``, ``interrupted``, ``aborted``,
            ``failed``, ``pending``), every stage.
        best: the best trial of the last search stage that has one (what a later stage took).
        path: the pipeline's directory (each stage's experiment is in ``stages/<n>-<name>/``).
        status: the pipeline's status: ``completed``, ``running``, ``interrupted``, ``aborted``, ``failed``.
    """

    def __init__(self, path: Path, name: str, status: str, stages: list[PipelineStage]) -> None:
        self._path, self._name, self._status = Path(path), name, status
        self._stages = {stage.name: stage for stage in stages}

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._name

    @property
    def status(self) -> str:
        return self._status

    @property
    def stages(self) -> dict[str, SearchResult | RunResult]:
        return {name: s.result for name, s in self._stages.items() if s.result is not None}

    @property
    def statuses(self) -> dict[str, str]:
        return {name: stage.status for name, stage in self._stages.items()}

    @property
    def records(self) -> list[PipelineStage]:
        """Every stage as recorded, in order (with its path, status and result)."""
        return list(self._stages.values())

    @property
    def best(self) -> Best | None:
        searches = [s.result for s in self._stages.values()
                    if type(s.result) is SearchResult and s.result.best is not None]
        return searches[-1].best if searches else None

    def __getattr__(self, name: str) -> Any:
        stages = self.__dict__.get("_stages")
        if name.startswith("_") or stages is None:
            raise AttributeError(name)
        stage = stages.get(name)
        if stage is not None and stage.result is not None:
            return stage.result
        if stage is not None:
            why = f": {stage.error.strip().splitlines()[-1]}" if stage.error else ""
            raise AttributeError(f"the pipeline's stage {name!r} has no result: it is {stage.status}{why} "
                                 f"(see {stage.path}; resuming the pipeline runs it: unison.resume("
                                 f"{str(self._path)!r}, fn, ...))")
        from unison._validate import did_you_mean

        raise AttributeError(f"the pipeline has no stage {name!r};{did_you_mean(name, stages) or ''} its "
                             f"stages are {list(stages)}")

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._stages})

    @classmethod
    def load(cls, path: str | Path) -> PipelineResult:
        """Read a pipeline back from its directory (finished or not)."""
        store = ExperimentStore(path)
        meta = store.read_experiment()
        if meta.get("kind") != "pipeline":
            raise ValueError(f"{path} holds a {meta.get('kind')!r} experiment, not a pipeline: read it with "
                             f"unison.load")
        stages = [PipelineStage.load(s["name"], s["kind"], _inside(store.path, s["path"]))
                  for s in meta["pipeline"]["stages"]]
        return cls(store.path, str(meta.get("name")), str(meta.get("status", "unknown")), stages)

    def __repr__(self) -> str:
        stages = "; ".join(f"{s.name} ({s.kind}, {s.status}): {s.summary()}" for s in self._stages.values())
        return f"PipelineResult({self._name}, status={self._status}, {stages}, path={self._path})"

    def _repr_html_(self) -> str:
        """In Jupyter: the status, then a table of the stages with their status and result."""
        rows = [(s.name, s.kind, s.status, s.summary(), s.path.relative_to(self._path))
                for s in self._stages.values()]
        return (f"<div class='unison-result'><p><b>PipelineResult</b> {_esc(self._name)}: status "
                f"<b>{_esc(self._status)}</b><br><small><code>{_esc(self._path)}</code></small></p>"
                f"{_html_table(['stage', 'kind', 'status', 'result', 'directory'], rows)}</div>")


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing a path that leads out of ``root`` (a stage lies in its pipeline)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{root}/experiment.json names a stage at {relative!r}, outside the pipeline's "
                         f"directory: the file was edited or is not a unison pipeline's")
    return root / relative
