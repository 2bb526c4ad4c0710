"""A :class:`unison.Callback` writing each trial as a TensorBoard run, for the Scalars and HParams dashboards.

Event files are written with ``tensorboardX`` (no TensorFlow needed), imported when the logger is
built so that ``import unison`` stays light. Each trial gets a run folder of its own holding its
reported metrics as scalars at their steps, and, once it ended, the HParams plugin's session summary:
its hyperparameters, its status and the final metrics (the last value of each scalar). TensorBoard
builds the HParams dashboard's columns from those sessions, so no experiment-level configuration is
written: TensorBoard keeps only one such configuration per folder it is pointed at, which would hide
the other experiments' hyperparameters when that folder holds several.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from unison.callbacks import Callback, ExperimentInfo, TrialInfo

INSTALL_HINT = "pip install 'unison[tensorboard]'"
STATUS_HPARAM = "unison/status"  # unison's own status ("stopped" included) as a column of the dashboard
_PLUGIN = "hparams"
_START_TAG, _END_TAG = "_hparams_/session_start_info", "_hparams_/session_end_info"


def _import_tensorboardx() -> Any:
    try:
        import tensorboardX
    except ImportError as exc:
        raise ImportError(f"unison.TensorBoardLogger writes event files with tensorboardX, which is not "
                          f"installed ({exc}): run {INSTALL_HINT}") from None
    return tensorboardX


class _Run:
    """One trial's run folder: its writer and what it wrote last, per metric."""

    def __init__(self, writer: Any, started: float) -> None:
        self.writer, self.started = writer, started
        self.last_step = 0
        self.last: dict[str, tuple[int, float]] = {}  # metric -> (step, value) written last


class TensorBoardLogger(Callback):
    """Writes every trial as a TensorBoard run: its reported metrics and its HParams summary.

    Args:
        logdir: where the runs go: ``<logdir>/<experiment name>/<trial id>``. ``None`` (the default)
            puts them in the experiment directory: ``<experiment>/tensorboard/<trial id>``. The trial
            id is written with four digits (``0007``), so runs sort in the order the trials began.

    View them with ``tensorboard --logdir <experiment>/tensorboard`` (or ``--logdir <logdir>``).
    Raises ``ImportError`` when tensorboardX is not installed.
    """

    def __init__(self, logdir: str | Path | None = None) -> None:
        """Only checks that the writer is installed; nothing is written before a trial starts."""
        self._tbx = _import_tensorboardx()
        self.logdir = None if logdir is None else Path(logdir)
        self.root: Path | None = None  # this experiment's folder of runs, known at its start
        self._runs: dict[int, _Run] = {}

    def run_dir(self, trial_id: int) -> Path:
        """The run folder of trial ``trial_id`` in the current experiment."""
        if self.root is None:
            raise RuntimeError("TensorBoardLogger.run_dir: no experiment has started yet")
        return self.root / f"{trial_id:04d}"

    def on_experiment_start(self, experiment: ExperimentInfo) -> None:
        """Choose the experiment's folder of runs."""
        self._close_all()
        self.root = (experiment.path / "tensorboard" if self.logdir is None
                     else self.logdir / experiment.name)

    def on_trial_start(self, trial: TrialInfo) -> None:
        """Open the trial's writer (a new attempt of a trial keeps the one it has)."""
        self._run(trial)

    def on_report(self, trial: TrialInfo, step: int, metrics: dict[str, float]) -> None:
        """One scalar per metric, at ``step``."""
        run = self._run(trial)
        for name, value in metrics.items():
            self._scalar(run, name, value, step)
        run.last_step = step

    def on_trial_end(self, trial: TrialInfo) -> None:
        """The final metrics at the last step (those not already its last scalar), the HParams
        session summary; then close the trial's writer."""
        run = self._run(trial)
        for name, value in trial.metrics.items():
            if run.last.get(name) != (run.last_step, value):
                self._scalar(run, name, value, run.last_step)
        for summary in self._session(trial, run.started):
            run.writer.file_writer.add_summary(summary, run.last_step)
        run.writer.close()
        del self._runs[trial.trial_id]

    def on_experiment_end(self, result: Any) -> None:
        """Close the writers of trials that never ended."""
        self._close_all()

    # ------------------------------------------------------------------------------ helpers
    def _run(self, trial: TrialInfo) -> _Run:
        run = self._runs.get(trial.trial_id)
        if run is None:
            folder = self.run_dir(trial.trial_id)
            folder.mkdir(parents=True, exist_ok=True)
            run = _Run(self._tbx.SummaryWriter(logdir=str(folder), flush_secs=10), time.time())
            self._runs[trial.trial_id] = run
        return run

    @staticmethod
    def _scalar(run: _Run, name: str, value: float, step: int) -> None:
        run.writer.add_scalar(name, value, global_step=step)
        run.last[name] = (step, value)

    def _session(self, trial: TrialInfo, started: float) -> list[Any]:
        """The HParams plugin's session start and end summaries of an ended trial."""
        from tensorboardX.proto import api_pb2, plugin_hparams_pb2, summary_pb2

        start = plugin_hparams_pb2.SessionStartInfo(model_uri=str(trial.trial_dir), start_time_secs=started)
        for name, value in _session_hparams(trial).items():
            if isinstance(value, bool):
                start.hparams[name].bool_value = value
            elif isinstance(value, (int, float)):
                start.hparams[name].number_value = float(value)
            else:
                start.hparams[name].string_value = value if isinstance(value, str) else _text(value)
        status = api_pb2.STATUS_FAILURE if trial.status == "failed" else api_pb2.STATUS_SUCCESS
        end = plugin_hparams_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        summaries = []
        for tag, data in ((_START_TAG, plugin_hparams_pb2.HParamsPluginData(session_start_info=start)),
                          (_END_TAG, plugin_hparams_pb2.HParamsPluginData(session_end_info=end))):
            plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name=_PLUGIN,
                                                            content=data.SerializeToString())
            metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)
            summaries.append(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                                  metadata=metadata)]))
        return summaries

    def _close_all(self) -> None:
        for run in self._runs.values():
            run.writer.close()
        self._runs.clear()


def _session_hparams(trial: TrialInfo) -> dict[str, Any]:
    """The trial's hyperparameters (``None`` left out), its component and seed if it has them, its status."""
    hparams = {name: value for name, value in trial.hparams.items() if value is not None}
    extra = {"component": trial.component, "seed": trial.seed}
    hparams.update({name: value for name, value in extra.items()
                    if value is not None and name not in hparams})
    hparams[STATUS_HPARAM] = trial.status
    return hparams


def _text(value: Any) -> str:
    """A hyperparameter that is not a number, a string or a bool, as the dashboard shows it."""
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)
