"""What ``unison.run`` returns: ``RunResult`` for a single run, ``SearchResult`` for a search."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison.driver.store import ExperimentStore

if TYPE_CHECKING:
    import pandas as pd

_FIXED_COLUMNS = ("trial_id", "status")
_TAIL_COLUMNS = ("steps", "last_step", "duration", "worker", "host", "pid", "attempts", "stop_reason",
                 "error")


@dataclass(frozen=True)
class Best:
    """A best completed trial: its id, hyperparameters, optimized value (a list of values in a
    multi-objective search) and all its final metrics."""

    trial_id: int
    hparams: dict[str, Any]
    metric: Any
    metrics: dict[str, float]


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
    """

    metrics: dict[str, Any]
    value: Any
    returned: Any
    path: Path
    duration: float

    def _repr_html_(self) -> str:
        """In Jupyter: the value, the metrics as a table, the duration and the experiment directory."""
        value = f"{self.value:.6g}" if isinstance(self.value, float) else str(self.value)
        value = "" if self.value is None else f": value <b>{_esc(value)}</b>"
        rows = [*self.metrics.items(), ("duration (s)", self.duration)]
        return (f"<div class='unison-result'><p><b>RunResult</b>{value}<br>"
                f"<small><code>{_esc(self.path)}</code></small></p>{_html_table(['metric', 'value'], rows)}"
                f"</div>")


def trials_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A pandas DataFrame with one row per trial: id, status, hparams, final metrics, the rest."""
    import pandas as pd

    records = []
    for row in rows:
        record: dict[str, Any] = {k: row[k] for k in _FIXED_COLUMNS}
        for name, value in row["hparams"].items():  # a hyperparameter called e.g. "steps" keeps its value
            taken = name in _FIXED_COLUMNS or name in _TAIL_COLUMNS
            record[f"hparam:{name}" if taken else name] = value
        for name, value in (row.get("metrics") or {}).items():
            key = name if name not in record and name not in _TAIL_COLUMNS else f"metric:{name}"
            record[key] = value
        record.update({k: row.get(k) for k in _TAIL_COLUMNS})
        if record["error"]:
            record["error"] = record["error"].strip().splitlines()[-1]
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if not frame.empty:
        frame = frame.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return frame


def rows_from_journal(events: list[dict[str, Any]], metric: str | list[str]) -> list[dict[str, Any]]:
    """The trial rows recorded in a journal (trials that never ended show as ``running``)."""
    rows: dict[int, dict[str, Any]] = {}
    for ev in events:
        kind, tid = ev.get("e"), ev.get("id")
        if tid is None:  # an experiment's status event, not a trial's
            continue
        if kind == "start":
            row = rows.setdefault(tid, {"trial_id": tid, "metrics": {}, "steps": 0})
            row.update(status="running", hparams=ev["hparams"], worker=ev.get("worker"),
                       host=ev.get("host"), pid=ev.get("pid"), attempts=ev.get("attempt", 0) + 1)
            if ev.get("spec"):  # an ablation trial's component and seed
                row["spec"] = ev["spec"]
        elif kind == "report" and tid in rows:
            rows[tid]["steps"] += 1
            rows[tid]["last_step"] = ev["step"]
            rows[tid]["metrics"] = ev["metrics"]
        elif kind == "end" and tid in rows:
            row = rows[tid]
            row.update({k: ev.get(k) for k in ("status", "metrics", "error", "duration", "steps",
                                                "last_step", "stop_reason", "worker")})
            row["metrics"] = ev.get("metrics") or {}
            row["value"] = objective_value(row["metrics"], [metric] if isinstance(metric, str) else metric)
        elif kind == "lost" and tid in rows:
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
        return Best(row["trial_id"], dict(row["hparams"]), row["value"], dict(row["metrics"]))

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

    def _repr_html_(self) -> str:
        """In Jupyter: the counts, then the best trial (or the Pareto front) as a table."""
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
        return f"<div class='unison-result'>{self._html_header()}{body}</div>"


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

    def headline(self) -> str:
        """One line: the most important component and its difference to the baseline."""
        ranked = [r for r in ablation_table(self._rows, self.modes[0]) if r["rank"] is not None]
        if not ranked:
            return "no component has a completed trial paired with a baseline trial"
        top = min(ranked, key=lambda r: r["rank"])
        return f"most important: {top['component']} ({self.metrics[0]} {top['diff']:+.4g} without it)"

    def plot(self, path: str | Path | None = None) -> Path:
        """Save a bar chart of each component's difference to the baseline, with 95% error bars, as
        ``ablation.png`` in the experiment directory (or at ``path``); return where it went.

        Needs matplotlib (``pip install 'unison[plot]'``); leaves pyplot's state and backend alone.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install 'unison[plot]'") from None
        records = [r for r in ablation_table(self._rows, self.modes[0]) if r["kind"] != "baseline"]
        names = [r["component"] for r in records]
        diffs = [r["diff"] for r in records]
        errors = [[0.0 if math.isnan(r[bound]) else abs(r["diff"] - r[bound]) for r in records]
                  for bound in ("diff_ci_low", "diff_ci_high")]
        worse = [(d < 0) if self.modes[0] == "max" else (d > 0) for d in diffs]
        fig = Figure(figsize=(max(4.0, 0.8 * len(names) + 2), 3.5))
        ax = fig.subplots()
        ax.bar(names, diffs, yerr=errors, capsize=4, color=["#c44e52" if w else "#4c72b0" for w in worse])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{self.metrics[0]} minus baseline")
        ax.set_title("ablation: effect of removing each component (red: worse without it)")
        ax.tick_params(axis="x", labelrotation=30 if len(names) > 4 else 0)
        fig.tight_layout()
        target = Path(path) if path is not None else self.path / "ablation.png"
        fig.savefig(target, dpi=120)
        return target

    def _repr_html_(self) -> str:
        """In Jupyter: the counts, the headline, then the ablation table."""
        table = self.ablation.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="")
        return (f"<div class='unison-result'>{self._html_header()}<p>{_esc(self.headline())}</p>"
                f"{table}</div>")

    def __repr__(self) -> str:
        return (f"AblationResult({len(self._rows)} trials, status={self.status}, {self.headline()}, "
                f"path={self.path})")


_ABLATION_COLUMNS = ["component", "kind", "n", "mean", "std", "ci_low", "ci_high", "diff", "diff_ci_low",
                     "diff_ci_high", "rank"]
_RESULT_CLASSES: dict[str, type[SearchResult]] = {"search": SearchResult, "ablation": AblationResult}


class DistributedRecord(SearchResult):
    """The one-trial search behind a distributed run; its ``result.json`` also holds rank 0's metrics."""

    def summary_extra(self) -> dict[str, Any]:
        row = self._rows[0] if self._rows else {}
        return {"metrics": row.get("metrics") or {}, "trial_status": row.get("status"),
                "error": row.get("error")}
