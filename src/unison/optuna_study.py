"""A search or an ablation as an in-memory ``optuna.Study`` (``result.to_optuna()``), and
hyperparameter importance computed by Optuna's evaluators (``result.importance()``).

Optuna is imported only when one of these is called.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from unison._validate import did_you_mean, lookup
from unison.curves import trial_reports
from unison.driver.store import ExperimentStore
from unison.space import Distribution, space_from_dict

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from unison.result import SearchResult

EVALUATORS = {"ped-anova": "PedAnovaImportanceEvaluator", "fanova": "FanovaImportanceEvaluator"}
_STATES = {"completed": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL", "running": "RUNNING",
           "pending": "WAITING"}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna's log at WARNING (no "A new study created in memory") while a study is built."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


class _Params:
    """An experiment's hyperparameters as Optuna params: a search's space (each distribution mapped as
    unison's Optuna optimizers map it; constants left out: they never vary), or an ablation's
    component and seed (categorical)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        from unison.optimizers.optuna import _Param

        kind = meta.get("kind")
        declared = meta.get(str(kind)) or {}
        self.ablation = kind == "ablation"
        self.params: dict[str, Any] = {}
        self.fixed: dict[str, Any] = {}
        if self.ablation:
            import optuna.distributions as od

            names = [c["name"] for c in declared.get("components", [])]
            seeds = [declared.get("seed", 0) + r for r in range(declared.get("repeats", 1))]
            self.fixed = dict(declared.get("base") or {})
            self.distributions = {"component": od.CategoricalDistribution(names),
                                  "seed": od.CategoricalDistribution(seeds)}
            return
        # A distributed run's hyperparameters are all fixed.
        space = space_from_dict(declared.get("space") or {}) if kind == "search" else declared.get("hparams")
        space = space or {}
        self.fixed = {name: v for name, v in space.items() if not isinstance(v, Distribution)}
        self.params = {name: _Param(name, v) for name, v in space.items() if isinstance(v, Distribution)}
        self.distributions = {name: param.optuna for name, param in self.params.items()}

    def of(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """One trial's params and their distributions (an inactive conditional parameter has none)."""
        if self.ablation:
            spec = row.get("spec") or {}
            params = {"component": (spec.get("component") or {}).get("name"), "seed": spec.get("seed")}
        else:
            params = {}
            for name, param in self.params.items():
                if name in row["hparams"]:
                    with contextlib.suppress(ValueError):  # not a point of the space: left out
                        params[name] = param.to_optuna(row["hparams"][name])
        params = {k: v for k, v in params.items() if _contains(self.distributions[k], v)}
        return params, {name: self.distributions[name] for name in params}


def _contains(distribution: Any, value: Any) -> bool:
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _times(events: list[dict[str, Any]]) -> dict[int, float]:
    """Each trial's last start (unix seconds), from the journal."""
    return {ev["id"]: ev["t"] for ev in events if ev.get("e") == "start" and ev.get("id") is not None
            and isinstance(ev.get("t"), (int, float))}


def _values(row: dict[str, Any], objectives: list[str]) -> list[float] | None:
    """The trial's final values of ``objectives``, or ``None`` if one is missing or NaN."""
    metrics = row.get("metrics") or {}
    values = [metrics.get(name) for name in objectives]
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return None
    return [float(v) for v in values]  # type: ignore[arg-type]


def _user_attrs(row: dict[str, Any], ablation: bool) -> dict[str, Any]:
    attrs = {"unison_trial_id": row["trial_id"], "status": row["status"],
             "metrics": dict(row.get("metrics") or {}), "attempts": row.get("attempts")}
    if row.get("stop_reason"):
        attrs["stop_reason"] = row["stop_reason"]
    if row.get("error"):
        attrs["error"] = str(row["error"]).strip().splitlines()[-1]
    if ablation:
        spec = row.get("spec") or {}
        attrs["component"], attrs["seed"] = (spec.get("component") or {}).get("name"), spec.get("seed")
    return attrs


def _trial(row: dict[str, Any], params: _Params, objectives: list[str], reports: list[dict[str, Any]],
           start: float | None) -> optuna.trial.FrozenTrial:
    """One unison trial as an Optuna trial."""
    import optuna

    state = getattr(optuna.trial.TrialState, _STATES.get(row["status"], "FAIL"))
    values = _values(row, objectives) if state == optuna.trial.TrialState.COMPLETE else None
    attrs = _user_attrs(row, params.ablation)
    if state == optuna.trial.TrialState.COMPLETE and values is None:
        state = optuna.trial.TrialState.FAIL
        attrs["unison_note"] = f"completed without a value of {', '.join(objectives)} (or NaN)"
    intermediate: dict[int, float] = {}
    if len(objectives) == 1:  # Optuna keeps intermediate values for one objective only
        for report in reports:
            value = report["metrics"].get(objectives[0])
            if isinstance(value, (int, float)) and math.isfinite(value):
                intermediate[int(report["step"])] = float(value)
    param_values, distributions = params.of(row)
    trial = optuna.trial.create_trial(state=state, values=values, params=param_values,
                                      distributions=distributions, user_attrs=attrs,
                                      intermediate_values=intermediate)
    if state != optuna.trial.TrialState.WAITING and start is not None:
        trial.datetime_start = datetime.datetime.fromtimestamp(start)
        if state.is_finished():
            trial.datetime_complete = trial.datetime_start + datetime.timedelta(
                seconds=float(row.get("duration") or 0.0))
    return trial


def build_study(result: SearchResult, objectives: list[str] | None = None,
                modes: list[str] | None = None) -> optuna.Study:
    """``result`` as a study optimizing ``objectives`` in ``modes`` (default: what the experiment
    optimized). See :func:`to_optuna`."""
    import optuna

    store = ExperimentStore(result.path)
    meta, events = store.read_experiment(), store.read_journal()
    objectives = list(result.metrics) if objectives is None else objectives
    modes = list(result.modes) if modes is None else modes
    rows = result.rows
    params = _Params(meta)
    reports, starts = trial_reports(events), _times(events)
    with _quiet():
        study = optuna.create_study(study_name=result.path.name,
                                    directions=["maximize" if m == "max" else "minimize" for m in modes])
        study.set_user_attr("unison_path", str(result.path))
        study.set_user_attr("unison_kind", meta.get("kind"))
        study.set_user_attr("fixed_hparams", params.fixed)
        study.add_trials([_trial(row, params, objectives, reports.get(row["trial_id"], []),
                                 starts.get(row["trial_id"])) for row in rows])  # rows: by trial id
    return study


def to_optuna(result: SearchResult) -> optuna.Study:
    """The experiment as an in-memory ``optuna.Study``, so that Optuna's tools (``optuna.visualization``,
    ``optuna.importance``, ``study.trials_dataframe()``) work on it.

    One Optuna trial per unison trial, in trial-id order (``trial.number`` is the position,
    ``user_attrs["unison_trial_id"]`` the unison id), with:

    - **params**: a search's sampled hyperparameters, each with the Optuna distribution of its
      unison one (``uniform`` -> ``FloatDistribution``, ``loguniform`` -> ``FloatDistribution(log=True)``,
      ``integer`` -> ``IntDistribution``, ``choice`` -> ``CategoricalDistribution``, holding JSON strings
      for list or dict values, as unison's Optuna optimizers do). A conditional hyperparameter appears
      in the trials where it applied. Constants are no params (they never vary): they are in
      ``study.user_attrs["fixed_hparams"]``. An ablation's params are ``component`` and ``seed``.
    - **values**: the final value of each optimized metric (``study.directions`` from the modes).
    - **state**: completed -> ``COMPLETE``, stopped early -> ``PRUNED``, failed -> ``FAIL``, still
      running (or never ended: an interrupted experiment) -> ``RUNNING``, waiting to run again after its
      worker was lost -> ``WAITING``. A completed trial without a value (or a NaN one) -> ``FAIL``.
    - **intermediate values**: the reports of the optimized metric by step (one objective only, as in
      Optuna; non-finite ones left out).
    - **user_attrs**: ``unison_trial_id``, ``status``, ``metrics`` (all final metrics), ``attempts``,
      ``stop_reason`` and ``error`` (its last line) where there is one; an ablation's ``component`` and
      ``seed``.
    - **datetime_start** from the journal's start of the trial's last attempt, **datetime_complete**
      that plus the trial's duration.
    """
    return build_study(result)


def make_evaluator(spec: Any) -> Any:
    """The Optuna importance evaluator ``spec`` names (a key of :data:`EVALUATORS`), or ``spec`` itself if
    it is one; raises with a did-you-mean for an unknown name."""
    import optuna

    if isinstance(spec, optuna.importance.BaseImportanceEvaluator):
        return spec
    name = lookup("importance evaluator", spec, EVALUATORS,
                  "an optuna.importance.BaseImportanceEvaluator instance")
    if spec == "fanova":
        try:
            import sklearn  # noqa: F401 - Optuna's fANOVA fits scikit-learn's random forests
        except ImportError:
            raise ImportError("evaluator='fanova' needs scikit-learn: pip install scikit-learn") from None
        return optuna.importance.FanovaImportanceEvaluator(seed=0)  # the same importances on every call
    return getattr(optuna.importance, name)()


def _objective(result: SearchResult, metric: str | None, mode: str | None,
               evaluator: Any) -> tuple[list[str], list[str]]:
    """What importance is computed for: the objective(s) and their modes."""
    import optuna

    if mode not in (None, "max", "min"):
        raise ValueError(f"importance(mode=...) must be 'max' or 'min' (or None: the metric's mode in the "
                         f"experiment), got {mode!r}")
    if metric is None:
        # PED-ANOVA rates importance for a Pareto front from Optuna 5 on
        pareto = (isinstance(evaluator, optuna.importance.PedAnovaImportanceEvaluator)
                  and int(optuna.__version__.split(".")[0]) >= 5)
        if len(result.metrics) > 1 and not pareto:
            raise ValueError(f"the search optimizes {result.metrics}: name one, e.g. "
                             f"importance(metric={result.metrics[0]!r}); only evaluator='ped-anova' "
                             f"computes importance for the Pareto front (metric=None), from Optuna 5 on")
        return list(result.metrics), list(result.modes)
    reported = list(dict.fromkeys(name for row in result.rows for name in (row.get("metrics") or {})))
    if metric not in reported:
        hint = did_you_mean(metric, reported) or " it is not among them."
        raise ValueError(f"importance(metric={metric!r}): the trials of {result.path} reported "
                         f"{reported}:{hint}")
    if metric in result.metrics:
        return [metric], [mode or result.modes[result.metrics.index(metric)]]
    if mode is None:
        raise ValueError(f"importance(metric={metric!r}): {metric!r} is not what the experiment optimized "
                         f"({result.metrics}), so say which way is better: mode='max' or mode='min'")
    return [metric], [mode]


def param_importance(result: SearchResult, metric: str | None = None, evaluator: Any = "ped-anova",
                     mode: str | None = None) -> pd.DataFrame:
    """How much each parameter mattered, from the completed trials: a DataFrame with ``param`` and
    ``importance`` (summing to 1), most important first, computed by
    ``optuna.importance.get_param_importances`` on :func:`to_optuna`'s study.

    Args:
        result: a search or an ablation (whose params are ``component`` and ``seed``).
        metric: the final metric to explain (default: the optimized one; for several, their Pareto
            front with PED-ANOVA). Another reported metric needs ``mode``.
        evaluator: ``"ped-anova"`` (default: Optuna's ``PedAnovaImportanceEvaluator``, what matters to
            reach the best trials), ``"fanova"`` (``FanovaImportanceEvaluator``, variance explained by a
            random forest; needs scikit-learn) or an ``optuna.importance`` evaluator instance.
        mode: ``"max"`` or ``"min"``, which way ``metric`` is better (default: its mode in the search).
    """
    import optuna
    import pandas as pd

    chosen = make_evaluator(evaluator)
    objectives, modes = _objective(result, metric, mode, chosen)
    study = build_study(result, objectives, modes)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        raise ValueError(f"importance needs at least 2 completed trials with a value of "
                         f"{', '.join(objectives)}; {result.path} has {len(done)} of {len(result.rows)} "
                         f"trials (stopped and failed trials do not count)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        importances = optuna.importance.get_param_importances(study, evaluator=chosen)
    frame = pd.DataFrame({"param": list(importances), "importance": [float(v) for v in importances.values()]})
    return frame.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)


__all__ = ["EVALUATORS", "build_study", "param_importance", "to_optuna"]
