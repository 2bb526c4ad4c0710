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
from unison.result import AblationResult

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
        self._waiting: dict[int, tuple[TrialInfo, float]] = {}  # started, no run yet: (trial, when noted)
        self._artifact_uris: dict[str, str] = {}  # run id -> its artifact URI, for the runs created here
        self._pending: dict[int, list[Any]] = {}  # trial id -> reported metrics (mlflow Metric) not yet sent
        self._pending_since = 0.0  # when the oldest of them was reported
        self._last_stamp = 0  # the last metric timestamp given (ms): each is later, so histories keep order
        if self.tracking_uri.startswith(("http://", "https://")):
            self.check()
            # else MLflow prints two "View run/experiment at" lines for every trial that ends
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

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

    def logged_run(self, experiment_dir: str | Path) -> str | None:
        """The parent run that ``experiment_dir/mlflow.json`` names in this tracking store, if it still
        exists there (the experiment was logged or exported to it before), else ``None``."""
        self._client = _import_mlflow().tracking.MlflowClient(self.tracking_uri)
        self._path = Path(experiment_dir)
        stored = self._read_run_ids()
        parent = stored.get("parent") if stored.get("tracking_uri") == self.tracking_uri else None
        return parent if isinstance(parent, str) and self._exists(parent) else None

    @property
    def parent_run_id(self) -> str | None:
        """The parent run of the experiment being logged (or last logged)."""
        return self._parent

    # ------------------------------------------------------------------------- the callback methods
    def on_experiment_start(self, experiment: ExperimentInfo) -> None:
        """Find or create the MLflow experiment; continue the parent run of ``mlflow.json`` or start one."""
        parent = self.logged_run(experiment.path)
        stored = self._read_run_ids()
        if parent is not None:
            self._parent = parent
            self._experiment_id = self._client.get_run(parent).info.experiment_id
            self._children = {int(k): v for k, v in (stored.get("trials") or {}).items()}
            self._client.update_run(parent, status="RUNNING")
            return
        name = self.experiment_name or experiment.name
        found = self._client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found is not None else self._client.create_experiment(name)
        self._experiment_id = experiment_id
        tags = {"mlflow.runName": Path(experiment.path).name, "unison.kind": experiment.kind,
                "unison.backend": experiment.backend or "in the caller's process",
                "unison.version": __version__, "unison.experiment_dir": str(experiment.path)}
        run = self._client.create_run(experiment_id, tags=_clip_values(tags, MAX_TAG_VALUE))
        self._parent, self._children = run.info.run_id, {}
        self._log(self._parent, params=_flatten(experiment.declaration))
        self._write_run_ids()

    def on_trial_start(self, trial: TrialInfo) -> None:
        """Continue the trial's child run (a new attempt, a resumed trial), or note the trial: its run
        is created at its end, or once it ran :data:`FLUSH_S` seconds, with all it has by then."""
        if self._parent is None:
            return
        self._reported[trial.trial_id] = {}
        self._pending.pop(trial.trial_id, None)  # a lost attempt's reports, never sent: not this attempt's
        run_id = self._children.get(trial.trial_id)
        if run_id is not None and self._exists(run_id):
            self._client.update_run(run_id, status="RUNNING")
            self._open.add(trial.trial_id)
            self._log(run_id, params=_flatten(_params(trial)), tags=_start_tags(trial))
        else:
            self._waiting[trial.trial_id] = (trial, time.time())
        self._flush(due_only=True)

    def on_report(self, trial: TrialInfo, step: int, metrics: dict[str, float]) -> None:
        """Keep the report's metrics at ``step``; they go in batches, at least every :data:`FLUSH_S`
        seconds while the experiment runs, and at the trial's end."""
        if trial.trial_id not in self._children and trial.trial_id not in self._waiting:
            return
        from mlflow.entities import Metric

        step = step if isinstance(step, int) else 0
        numbers = _numbers(metrics)
        if not self._pending:
            self._pending_since = time.time()
        stamp = self._stamp()
        pending = self._pending.setdefault(trial.trial_id, [])
        pending.extend(Metric(_key(k), v, stamp, step) for k, v in numbers.items())
        last = self._reported.setdefault(trial.trial_id, {})
        last.update({key: (step, value) for key, value in numbers.items()})
        self._flush(due_only=True)

    def on_trial_end(self, trial: TrialInfo) -> None:
        """Log the final metrics (those not already the last reported value), the status tags and the
        trial's files; end the child run (FINISHED when completed or stopped, else FAILED)."""
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
        waiting = self._waiting.pop(trial.trial_id, None)
        params: dict[str, Any] = {}
        run_id = self._children.get(trial.trial_id)
        if waiting is not None:  # a short trial: one run made with all it has
            run_id, params = self._create(waiting[0], end_tags=tags), _flatten(_params(waiting[0]))
            tags = {}
        if run_id is None:
            return
        self._log(run_id, params=params, metrics=final, step=final_step, tags=tags,
                  reported=self._pending.pop(trial.trial_id, []))
        if self.log_artifacts and trial.trial_dir.is_dir() and any(trial.trial_dir.iterdir()):
            self._log_artifacts(run_id, trial.trial_dir)
        ended = (trial.started + trial.duration if trial.started is not None and trial.duration is not None
                 else time.time())
        self._client.set_terminated(run_id, _END_STATUS.get(trial.status, "FAILED"), int(ended * 1000))
        self._open.discard(trial.trial_id)

    def flush(self) -> None:
        """Nothing happened for a second: create the runs of the trials waiting and send the reports."""
        if self._parent is not None:
            self._flush()

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
        try:
            self._log(self._parent, metrics=_numbers(best.metrics) if best is not None else {}, tags=tags)
            if self.log_artifacts:
                self._log_result_files(result)
        finally:  # the parent run is never left RUNNING
            self._client.set_terminated(self._parent, _EXPERIMENT_END_STATUS.get(status, "FINISHED"))

    # ------------------------------------------------------------------------------------- helpers
    def _log_result_files(self, result: Any) -> None:
        assert self._path is not None and self._parent is not None
        if (self._path / "result.json").is_file():
            self._client.log_artifact(self._parent, str(self._path / "result.json"))
        if not isinstance(result, AblationResult):
            return
        with tempfile.TemporaryDirectory(prefix="unison-mlflow-") as folder:
            result.ablation.to_csv(Path(folder) / "ablation.csv", index=False)
            try:
                result.plot(path=Path(folder) / "ablation.png")  # drawn by matplotlib
            except ImportError:
                pass  # no plotly: the PNG is there all the same; no matplotlib: the table goes alone
            self._client.log_artifacts(self._parent, folder)

    def _flush(self, due_only: bool = False) -> None:
        """Create the runs of the trials that waited :data:`FLUSH_S` seconds (``due_only``; else of all
        waiting) with their params, then send the pending reports (``due_only``: if the oldest waited
        that long)."""
        now = time.time()
        for trial_id, (trial, since) in list(self._waiting.items()):
            if not due_only or now - since >= FLUSH_S:
                del self._waiting[trial_id]
                self._log(self._create(trial), params=_flatten(_params(trial)),
                          reported=self._pending.pop(trial_id, []))
        if not self._pending or (due_only and now - self._pending_since < FLUSH_S):
            return
        pending, self._pending = self._pending, {}
        for trial_id, metrics in pending.items():
            if trial_id in self._waiting:  # (its run is not made yet: keep them for it)
                self._pending[trial_id] = metrics
            else:
                self._log(self._children[trial_id], reported=metrics)
        self._pending_since = now

    def _create(self, trial: TrialInfo, end_tags: dict[str, str | None] | None = None) -> str:
        """Create the trial's child run (started when the trial did), noted in ``mlflow.json``."""
        name = f"trial {trial.trial_id:04d}" + (f" ({trial.component}, seed {trial.seed})"
                                                if trial.component is not None else "")
        tags = {"mlflow.parentRunId": self._parent, "mlflow.runName": name, **_start_tags(trial),
                **(end_tags or {})}
        started = int((trial.started if trial.started is not None else time.time()) * 1000)
        run = self._client.create_run(self._experiment_id, start_time=started,
                                      tags=_clip_values(tags, MAX_TAG_VALUE))
        run_id: str = run.info.run_id
        self._children[trial.trial_id] = run_id
        self._artifact_uris[run_id] = run.info.artifact_uri
        self._open.add(trial.trial_id)
        self._write_run_ids()
        return run_id

    def _log_artifacts(self, run_id: str, folder: Path) -> None:
        """Copy ``folder`` into the run's artifacts (straight into a local store's artifact folder when
        the run was created here, with no lookup of the run)."""
        uri = self._artifact_uris.pop(run_id, None)
        if uri is None or self.tracking_uri.startswith(("http://", "https://")):  # a server's repo needs it
            self._client.log_artifacts(run_id, str(folder))
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(uri).log_artifacts(str(folder))

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


def _params(trial: TrialInfo) -> dict[str, Any]:
    """A trial's params: its hyperparameters, with an ablation's component and the seed."""
    params = dict(trial.hparams)
    if trial.component is not None:
        params["component"] = trial.component
    if trial.seed is not None:
        params.setdefault("seed", trial.seed)
    return params


def _start_tags(trial: TrialInfo) -> dict[str, str | None]:
    return {"unison.trial_id": str(trial.trial_id), "unison.attempt": str(trial.attempt),
            "unison.worker": trial.worker, "unison.host": trial.host, "unison.status": trial.status}


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
