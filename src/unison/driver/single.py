"""A single run: the training function called once in this process, through the same
:class:`~unison.worker.runtime.TrialRunner` as every trial, with its record in an experiment directory.

Output is not captured and an exception reaches the caller unchanged, so ``print``, ``pdb`` and
tracebacks behave as plain Python; what the function returns is checked as a trial's result is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison.callbacks import Callback, ExperimentInfo
from unison.driver.callbacks_runner import CallbackRunner
from unison.driver.experiment import GitProbe, UserCode, notebook_origin, versions
from unison.driver.store import ExperimentStore
from unison.result import RunResult
from unison.worker.injection import check_injectable
from unison.worker.runtime import TrialCall, TrialRunner

if TYPE_CHECKING:
    from unison.contexts.single import SingleRun


def run_single(code: UserCode, run: SingleRun, storage: str | Path | None = None,
               name: str | None = None, callbacks: list[Callback] | None = None) -> RunResult:
    """Call ``code.fn`` once with ``run.hparams``; its metrics and value, or its exception, raised.
    ``callbacks`` hear of its start, its reports and its end."""
    names = check_injectable(code.fn, run.hparams, code.model is not None, code.data is not None)
    name = name or str(getattr(code.fn, "__name__", "run"))
    store = ExperimentStore.create(storage, name)  # locked until closed
    store.resumable = False
    callback_runner, result = None, None
    git = GitProbe.start()  # runs while the function does; its answer is recorded with the outcome
    try:
        declaration = json.loads(json.dumps({"hparams": run.hparams, "seed": run.seed}, default=str))
        callback_runner = CallbackRunner.start(callbacks or [], ExperimentInfo(
            name, "single", store.path, declaration), store, seed=run.seed)
        store.write_experiment({"kind": "single", "name": name, "status": "running", "hparams": run.hparams,
                                "seed": run.seed, "created": time.time(), "versions": versions(),
                                **notebook_origin(store.path)},
                               durable=False)  # a single run is not resumed: only its outcome is fsynced
        runner = TrialRunner(code.fn, names, run.metric or "value", code.model, code.data,
                             capture_output=False, require_metric=False)
        trial = {"trial_id": 0, "hparams": run.hparams, "trial_dir": str(store.trial_dir(0)),
                 "seed": run.seed}
        store.append({"e": "start", "id": 0, "hparams": run.hparams, "attempt": 0, "worker": "inline",
                      "t": time.time()})
        call = call_recorded(runner, trial, store, git)
        result = _record(call, run, store, git)
        return result
    finally:
        git.close()
        try:
            if callback_runner is not None:
                callback_runner.close(result)
        finally:
            store.close()


def call_recorded(runner: TrialRunner, trial: dict[str, Any], store: ExperimentStore,
                  git: GitProbe) -> TrialCall:
    """Run the function as trial 0 of ``store``; on Ctrl-C or an exception, record how it ended and raise
    it again. Its reports are journaled with their time (so callbacks hear them, and ``r.curves`` has
    it); nothing stops it."""
    start = time.perf_counter()

    def decide(step: int, metrics: dict[str, float], checkpoint: dict[str, Any] | None = None) -> None:
        store.append({"e": "report", "id": 0, "step": step, "metrics": metrics, "t": time.time()})
        if checkpoint is not None:  # journaled as a search's are: trials/0000/checkpoints/step-<n>
            path = (store.trial_dir(0).relative_to(store.path) / checkpoint["path"]).as_posix()
            store.append({"e": "checkpoint", "id": 0, "step": checkpoint["step"], "path": path,
                          "size": checkpoint.get("size"), "t": time.time()})

    try:
        call = runner.call(trial, decide=decide)
    except KeyboardInterrupt:
        _record_failure(store, git, "interrupted", "KeyboardInterrupt", time.perf_counter() - start)
        raise
    if call.error is not None:
        _record_failure(store, git, "failed", call.outcome["error"], call.outcome["duration"],
                        call.outcome.get("steps"))
        raise call.error
    return call


def _record_failure(store: ExperimentStore, git: GitProbe, status: str, error: str, duration: float,
                    steps: int | None = None) -> None:
    try:
        store.append({"e": "end", "id": 0, "status": status, "error": error, "duration": duration,
                      **({"steps": steps} if steps is not None else {})})
        store.update_experiment(status=status, **git.fields())
    except OSError:
        pass  # e.g. a full disk: the function's own error is the one to raise


def _record(call: TrialCall, run: SingleRun, store: ExperimentStore, git: GitProbe) -> RunResult:
    """Record a returned call: its metrics and value, or why what it returned is not a result."""
    outcome = call.outcome
    duration = outcome["duration"]
    completed = outcome["status"] == "completed"  # else what it returned is not a result: a failure
    problem = None if completed else outcome.get("error")
    metrics: dict[str, float] = outcome["metrics"] if completed else {}
    if completed and run.metric is not None and metrics and run.metric not in metrics:
        problem = (f"metric={run.metric!r} is not among the returned keys {sorted(metrics)}: name one of "
                   f"them, or leave metric= unset")
    if problem is not None:
        store.append({"e": "end", "id": 0, "status": "failed", "error": problem, "duration": duration})
        store.update_experiment(status="failed", **git.fields())
        raise ValueError(problem)
    if run.metric is not None and run.metric in metrics:
        value: float | None = metrics[run.metric]
    else:
        value = next(iter(metrics.values())) if len(metrics) == 1 else None
    store.append({"e": "end", "id": 0, "status": "completed", "metrics": metrics, "duration": duration,
                  "steps": outcome["steps"], "last_step": outcome["last_step"]})
    store.write_result({"status": "completed", "metrics": metrics, "value": value, "duration": duration},
                       sync_dir=False)  # update_experiment fsyncs the directory
    store.update_experiment(status="completed", **git.fields())
    return RunResult(metrics=metrics, value=value, returned=call.returned, path=store.path, duration=duration)
