"""Logging experiments to MLflow with no logging call in the training function: :class:`MLflowLogger`.

The run tree: one **parent run** per unison experiment (params: its declaration, flattened; tags: its
kind, backend, unison's version, the experiment directory; at the end the best trial, the best trial's
metrics, ``result.json`` and, for an ablation, its table as CSV and its plot) and one **nested child
run** per trial (params: its hyperparameters; every report as a metric history at its step; tags:
status, stop reason, error, worker, host, attempt, component and seed; the trial's files as
artifacts). The run ids are kept in ``<experiment>/mlflow.json``, so a resumed experiment continues the
same runs. mlflow is imported when a logger is built, never by ``import unison``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unison._version import __version__
from unison.callbacks import Callback, ExperimentInfo, TrialInfo

RUN_IDS_FILE = "mlflow.json"
# MLflow's limits (those of its oldest servers still met: a param value was 500 characters before 2.x)
MAX_PARAM_VALUE = 500
MAX_TAG_VALUE = 5000
MAX_KEY = 250
PER_BATCH = 100  # params or tags in one log_batch call (MLflow's limit)
METRICS_PER_BATCH = 1000  # MLflow's limit
FLUSH_S = 1.0  # reports wait at most this long (until the next event) to go in one batch
CHECK_TIMEOUT_S = 5.0
_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")
_END_STATUS = {"completed": "FINISHED", "stopped": "FINISHED"}  # any other trial status: FAILED
_EXPERIMENT_END_STATUS = {"failed": "FAILED", "aborted": "FAILED", "interrupted": "KILLED"}


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ImportError("unison.MLflowLogger needs mlflow, which is not installed: "
                          "pip install 'unison[mlflow]'") from None
    return mlflow


class MLflowLogger(Callback):
    """Logs every experiment it is given to MLflow: a parent run per experiment, a nested run per trial.

    Args:
        tracking_uri: where runs go (``sqlite:///mlflow.db``, ``http://host:5000``, ...); ``None``
            follows MLflow's convention (``MLFLOW_TRACKING_URI``, else MLflow's default).
        experiment_name: the MLflow experiment (created if missing); ``None``: the unison experiment's name.
        log_artifacts: log each trial's files (logs, what the function wrote in ``ctx.trial_dir``) and
            the experiment's ``result.json`` as artifacts.

    Raises:
        ImportError: mlflow is not installed (``pip install 'unison[mlflow]'``).
        ConnectionError: the tracking URI is an HTTP(S) server that does not answer.
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None,
                 log_artifacts: bool = True) -> None:
        mlflow = _import_mlflow()
        self.tracking_uri: str = tracking_uri if tracking_uri is not None else mlflow.get_tracking_uri()
        self.experiment_name = experiment_name
        self.log_artifacts = log_artifacts
        self._client: Any = None
        self._path: Path | None = None
        self._parent: str | None = None
        self._experiment_id: str | None = None
        self._children: dict[int, str] = {}  # trial id -> child run id, as in mlflow.json
        self._open: set[int] = set()  # trials whose child run is running
        self._reported: dict[int, dict[str, tuple[int, float]]] = {}  # trial -> key -> (last step, value)
        self._pending: dict[str, list[Any]] = {}  # run id -> reported metrics (mlflow Metric) not yet sent
        self._pending_since = 0.0  # when the oldest of them was reported
        self._last_stamp = 0  # the last metric timestamp given (ms): each is later, so histories keep order
        if self.tracking_uri.startswith(("http://", "https://")):
            self.check()

    def check(self) -> None:
        """Raise ``ConnectionError`` unless the HTTP(S) tracking server answers (one quick request)."""
        url = self.tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT_S):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (an error such as 401 is MLflow's client's to handle, with credentials)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConnectionError(
                f"MLflowLogger: the MLflow tracking server at {self.tracking_uri} does not answer "
                f"({reason}). Start it (mlflow server --host HOST --port PORT) or pass the tracking_uri "
                f"of a running one (or a local store such as sqlite:///mlflow.db)") from None

    # ------------------------------------------------------------------------- the callback methods
    def on_experiment_start(self, experiment: ExperimentInfo) -> None:
        """Find or create the MLflow experiment; continue the parent run of ``mlflow.json`` or start one."""
        mlflow = _import_mlflow()
        self._client = mlflow.tracking.MlflowClient(self.tracking_uri)
        self._path = Path(experiment.path)
        stored = self._read_run_ids()
        parent = stored.get("parent") if stored.get("tracking_uri") == self.tracking_uri else None
        if parent is not None and self._exists(parent):
            self._parent = parent
            self._experiment_id = self._client.get_run(parent).info.experiment_id
            self._children = {int(k): v for k, v in (stored.get("trials") or {}).items()}
            self._client.update_run(parent, status="RUNNING")
            return
        name = self.experiment_name or experiment.name
        found = self._client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else self._client.create_experiment(name)
        self._experiment_id = experiment_id
        tags = {"mlflow.runName": self._path.name, "unison.kind": experiment.kind,
                "unison.backend": experiment.backend or "in the caller's process",
                "unison.version": __version__, "unison.experiment_dir": str(self._path)}
        run = self._client.create_run(experiment_id, tags=_clip_values(tags, MAX_TAG_VALUE))
        self._parent, self._children = run.info.run_id, {}
        self._log(self._parent, params=_flatten(experiment.declaration))
        self._write_run_ids()

    def on_trial_start(self, trial: TrialInfo) -> None:
        """Start the trial's child run (or continue it: a new attempt, a resumed trial)."""
        if self._parent is None:
            return
        self._flush(due_only=True)
        tags = {"unison.trial_id": str(trial.trial_id), "unison.attempt": str(trial.attempt),
                "unison.worker": trial.worker, "unison.host": trial.host, "unison.status": trial.status}
        params = dict(trial.hparams)
        if trial.component is not None:
            params["component"] = trial.component
        if trial.seed is not None:
            params.setdefault("seed", trial.seed)
        run_id = self._children.get(trial.trial_id)
        if run_id is not None and self._exists(run_id):
            self._client.update_run(run_id, status="RUNNING")
        else:
            name = f"trial {trial.trial_id:04d}" + (f" ({trial.component}, seed {trial.seed})"
                                                    if trial.component is not None else "")
            run = self._client.create_run(self._experiment_id, tags={
                "mlflow.parentRunId": self._parent, "mlflow.runName": name})
            run_id = self._children[trial.trial_id] = run.info.run_id
            self._write_run_ids()
        self._open.add(trial.trial_id)
        self._reported[trial.trial_id] = {}
        self._log(run_id, params=_flatten(params), tags=tags)

    def on_report(self, trial: TrialInfo, step: int, metrics: dict[str, float]) -> None:
        """Log the report's metrics at ``step`` (reports go in batches, at least every :data:`FLUSH_S`
        seconds while events come, and at the trial's end)."""
        run_id = self._children.get(trial.trial_id)
        if run_id is None:
            return
        from mlflow.entities import Metric

        step = step if isinstance(step, int) else 0
        numbers = _numbers(metrics)
        now = time.time()
        if not self._pending:
            self._pending_since = now
        stamp = self._stamp()
        pending = self._pending.setdefault(run_id, [])
        pending.extend(Metric(_key(k), v, stamp, step) for k, v in numbers.items())
        last = self._reported.setdefault(trial.trial_id, {})
        last.update({key: (step, value) for key, value in numbers.items()})
        self._flush(due_only=True)

    def on_trial_end(self, trial: TrialInfo) -> None:
        """Log the final metrics (those not already the last reported value), the status tags and the
        trial's files; end the child run (FINISHED when completed or stopped, else FAILED)."""
        run_id = self._children.get(trial.trial_id)
        if run_id is None:
            return
        last = self._reported.pop(trial.trial_id, {})
        final_step = max((step for step, _ in last.values()), default=0)
        final = {key: value for key, value in _numbers(trial.metrics).items()
                 if key not in last or last[key][1] != value}
        error = trial.error
        if error is not None and len(error) > MAX_TAG_VALUE:  # a traceback's end says the most
            error = "..." + error[-(MAX_TAG_VALUE - 3):]
        tags = {"unison.status": trial.status, "unison.stop_reason": trial.stop_reason,
                "unison.error": error, "unison.worker": trial.worker,
                "unison.duration_s": None if trial.duration is None else f"{trial.duration:.3f}"}
        self._log(run_id, metrics=final, step=final_step, tags=tags, reported=self._pending.pop(run_id, []))
        if self.log_artifacts and trial.trial_dir.is_dir() and any(trial.trial_dir.iterdir()):
            self._client.log_artifacts(run_id, str(trial.trial_dir))
        self._client.set_terminated(run_id, _END_STATUS.get(trial.status, "FAILED"))
        self._open.discard(trial.trial_id)

    def on_experiment_end(self, result: Any) -> None:
        """Tag the best trial, log the result's files, end the open runs and the parent run."""
        if self._parent is None:
            return
        self._flush()
        for trial_id in sorted(self._open):  # interrupted: their trials run again on resume
            self._client.set_terminated(self._children[trial_id], "KILLED")
        self._open.clear()
        status = getattr(result, "status", "completed") if result is not None else "failed"
        best = getattr(result, "best", None)
        tags: dict[str, str | None] = {"unison.status": status}
        if best is not None:
            tags["unison.best_trial_id"] = str(best.trial_id)
            tags["unison.best_run_id"] = self._children.get(best.trial_id)
            tags["unison.best_metric"] = f"{getattr(result, 'metric', 'metric')}={best.metric}"
        pareto = getattr(result, "pareto", None)
        if best is None and pareto:
            tags["unison.pareto_trial_ids"] = ",".join(str(b.trial_id) for b in pareto)
        self._log(self._parent, metrics=_numbers(best.metrics) if best is not None else {}, tags=tags)
        if self.log_artifacts:
            self._log_result_files(result)
        self._client.set_terminated(self._parent, _EXPERIMENT_END_STATUS.get(status, "FINISHED"))

    # ------------------------------------------------------------------------------------- helpers
    def _log_result_files(self, result: Any) -> None:
        assert self._path is not None and self._parent is not None
        if (self._path / "result.json").is_file():
            self._client.log_artifact(self._parent, str(self._path / "result.json"))
        ablation = getattr(result, "ablation", None)
        if ablation is None:
            return
        with tempfile.TemporaryDirectory(prefix="unison-mlflow-") as folder:
            ablation.to_csv(Path(folder) / "ablation.csv", index=False)
            try:
                result.plot(Path(folder) / "ablation.png")
            except ImportError:
                pass  # no matplotlib: the table goes alone
            self._client.log_artifacts(self._parent, folder)

    def _flush(self, due_only: bool = False) -> None:
        """Send the pending reports (``due_only``: only if the oldest waited :data:`FLUSH_S` seconds)."""
        if not self._pending or (due_only and time.time() - self._pending_since < FLUSH_S):
            return
        pending, self._pending = self._pending, {}
        for run_id, metrics in pending.items():
            self._log(run_id, reported=metrics)

    def _log(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
             step: int = 0, tags: dict[str, str | None] | None = None,
             reported: list[Any] | None = None) -> None:
        """``log_batch`` calls within MLflow's limits: ``reported`` (mlflow Metric objects), then
        ``metrics`` at ``step``, ``params`` and ``tags`` (whose ``None`` values are left out)."""
        from mlflow.entities import Metric, Param, RunTag

        stamp = self._stamp()
        final = [Metric(_key(k), v, stamp, step) for k, v in (metrics or {}).items()]
        metric_list = [*(reported or []), *final]
        param_list = [Param(_key(k), v) for k, v in _clip_values(params or {}, MAX_PARAM_VALUE).items()]
        tag_list = [RunTag(_key(k), v) for k, v in _clip_values(tags or {}, MAX_TAG_VALUE).items()]
        batches = max(-(-len(metric_list) // METRICS_PER_BATCH), -(-len(param_list) // PER_BATCH),
                      -(-len(tag_list) // PER_BATCH))
        per, many = PER_BATCH, METRICS_PER_BATCH
        for i in range(batches):
            self._client.log_batch(run_id, metrics=metric_list[i * many:(i + 1) * many],
                                   params=param_list[i * per:(i + 1) * per],
                                   tags=tag_list[i * per:(i + 1) * per])

    def _stamp(self) -> int:
        """A metric timestamp (ms): now, or just after the last one given."""
        self._last_stamp = max(int(time.time() * 1000), self._last_stamp + 1)
        return self._last_stamp

    def _exists(self, run_id: str) -> bool:
        try:
            self._client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException (not found) or a store of another kind
            return False
        return True

    def _read_run_ids(self) -> dict[str, Any]:
        assert self._path is not None
        try:
            stored = json.loads((self._path / RUN_IDS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return stored if isinstance(stored, dict) else {}

    def _write_run_ids(self) -> None:
        assert self._path is not None
        target = self._path / RUN_IDS_FILE
        partial = target.with_suffix(".json.partial")
        partial.write_text(json.dumps({"tracking_uri": self.tracking_uri, "parent": self._parent,
                                       "trials": {str(k): v for k, v in sorted(self._children.items())}},
                                      indent=1))
        os.replace(partial, target)


def _key(name: str) -> str:
    """``name`` as an MLflow key: characters MLflow refuses become ``_``; at most 250 characters."""
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY] or "_"


def _clip_values(values: dict[str, Any], limit: int) -> dict[str, str]:
    """The entries whose value is not ``None``, as strings of at most ``limit`` characters."""
    clipped = {}
    for key, value in values.items():
        if value is None:
            continue
        text = str(value)  # as mlflow.log_param writes a value
        clipped[key] = text if len(text) <= limit else text[:limit - 3] + "..."
    return clipped


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of ``a.b`` keys (params are flat in MLflow)."""
    return dict(_flat_items(values, prefix))


def _flat_items(values: dict[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries MLflow can log as metrics (numbers and booleans), as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
