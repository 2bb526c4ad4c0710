"""Running one trial: inject arguments, capture output, call the function, check what it returned.

The same code runs a trial in the calling process (inline backend) and in a worker process (local,
Spark): only the way ``reporter`` reaches the driver differs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison.errors import TrialStopped
from unison.worker.ablate import component_generators
from unison.worker.capture import OutputCapture
from unison.worker.checkpoints import FOLDER, SHIP_CHECKPOINTS, Checkpointer, Policy
from unison.worker.ctx import Context, _default_device
from unison.worker.generators import once, takes_no_arguments
from unison.worker.injection import build_arguments
from unison.worker.logs import LazyLog
from unison.worker.metrics import MAX_ERROR_CHARS, normalize_metrics
from unison.worker.reporter import Decide, Reporter

if TYPE_CHECKING:
    from unison.worker.rank import RankSession


class TrialCall:
    """One call of the training function: its outcome (what the driver records), what it returned,
    and the exception it raised (``None`` if it did not)."""

    __slots__ = ("outcome", "returned", "error")

    def __init__(self, outcome: dict[str, Any], returned: Any = None,
                 error: BaseException | None = None) -> None:
        self.outcome, self.returned, self.error = outcome, returned, error


class _TrialLogs:
    """A trial's ``metrics.jsonl`` and, when output is captured, its ``stdout.log``/``stderr.log`` in
    place of ``sys.stdout``/``sys.stderr`` until :meth:`close`."""

    def __init__(self, log_dir: Path, capture_output: bool) -> None:
        self.metrics = LazyLog(log_dir / "metrics.jsonl", json_note=True)
        self._streams: tuple[LazyLog, LazyLog] | None = None
        self._capture: OutputCapture | None = None
        if capture_output:
            self._streams = LazyLog(log_dir / "stdout.log"), LazyLog(log_dir / "stderr.log")
            self._capture = OutputCapture(*self._streams)

    def write_error(self, text: str) -> None:
        """Append a failed trial's traceback to its captured ``stderr.log``."""
        if self._streams is not None:
            self._streams[1].write(text)

    def close(self) -> None:
        self.metrics.close()
        if self._capture is not None:
            self._capture.close()
        if self._streams is not None:
            for log in self._streams:
                log.close()

    def cut(self) -> dict[str, int]:
        """How many bytes each log dropped, for those that dropped any."""
        logs = [self.metrics, *(self._streams or ())]
        return {log.path.name: log.cut for log in logs if log.cut}


class TrialRunner:
    """Runs trials of one training function; built once per worker."""

    def __init__(
        self,
        fn: Callable[..., Any],
        names: list[str],
        metric: str | list[str],
        model_fn: Callable[..., Any] | None = None,
        data: Any = None,
        capture_output: bool = True,
        variants: dict[str, Callable[..., Any]] | None = None,
        require_metric: bool = True,
        interrupt_propagates: bool = True,
    ) -> None:
        """``require_metric=False``: a returned dict without ``metric`` still completes (a distributed
        run without ``metric=`` returns whatever it likes, as a single run does).
        ``interrupt_propagates=False``: a ``KeyboardInterrupt`` raised in the function fails the trial
        instead of ending the caller (a worker process, which never gets the terminal's Ctrl-C)."""
        self.interrupt_propagates = interrupt_propagates
        self.fn, self.names = fn, names
        self.require_metric = require_metric
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.model_fn = model_fn
        # A data generator that takes no hyperparameters gives the same data to every trial: load it
        # once per worker instead of once per trial.
        self.data = once(data) if callable(data) and takes_no_arguments(data) else data
        self.capture_output = capture_output
        self.variants = variants or {}
        self.device = _default_device()

    @classmethod
    def from_parts(cls, parts: Mapping[str, Any], interrupt_propagates: bool) -> TrialRunner:
        """The runner of an experiment's payload parts (see :func:`unison.payload.dumps_payload`): the
        one way a worker and the inline backend build it."""
        return cls(parts["fn"], parts["names"], parts["metric"], parts.get("model_fn"), parts.get("data"),
                   variants=parts.get("variants"), require_metric=parts.get("require_metric", True),
                   interrupt_propagates=interrupt_propagates)

    def run(self, trial: dict[str, Any], decide: Decide | None,
            notify: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Run one trial described by ``trial`` (``trial_id``, ``hparams``, ``trial_dir``, ...); return
        its outcome, as the driver records it.

        A rank of a distributed trial (``trial["dist"]``, see :mod:`unison.worker.rank`) runs inside its
        process group, logs into ``rank-<r>/`` unless it is rank 0, and calls ``notify(traceback)``
        as soon as its function raises."""
        return self.call(trial, decide, notify).outcome

    def call(self, trial: dict[str, Any], decide: Decide | None,
             notify: Callable[[str], None] | None = None) -> TrialCall:
        """:meth:`run`, keeping what the function returned and the exception it raised (a single run
        raises it again in the caller, as plain Python would)."""
        session = session_for(trial, notify)
        resume = trial.get("checkpoint") or {}
        ctx = Context(trial_id=trial["trial_id"], trial_dir=Path(trial["trial_dir"]), device=self.device,
                      seed=trial.get("seed"), attempt=trial.get("attempt", 0),
                      checkpoint_path=resume.get("path"), checkpoint_step=resume.get("step"))
        log_dir = Path(trial["trial_dir"])
        if session is not None:
            session.bind(ctx)
            log_dir, decide = session.log_dir(log_dir), session.decide(decide)
        logs = _TrialLogs(log_dir, self.capture_output)
        reporter = Reporter(decide, logs.metrics, checkpointer=_checkpointer(trial, ctx),
                            first_step=0 if ctx.checkpoint_step is None else ctx.checkpoint_step + 1)
        call = TrialCall({"trial_id": trial["trial_id"], "error": None})
        start = time.perf_counter()
        try:
            try:
                call.returned = self._invoke(trial, reporter, ctx, session)
            except TrialStopped as stop:
                call.outcome.update(status="stopped", metrics=reporter.last_metrics,
                                    stop_reason=str(stop) or f"stopped at step {reporter.last_step}")
            except KeyboardInterrupt as exc:
                # In the driver's own process (inline, a single run) it is the user's Ctrl-C: it
                # propagates. A worker process never gets the terminal's Ctrl-C (its own session), so
                # there the function raised it: a failed trial.
                if self.interrupt_propagates:
                    raise
                self._failed(call, exc, logs)
            except BaseException as exc:  # SystemExit too: sys.exit() fails the trial, the worker lives on
                self._failed(call, exc, logs)
            else:
                call.outcome.update(self._ended(reporter, ctx, call.returned))
        finally:
            call.outcome["duration"] = time.perf_counter() - start
            logs.close()
        self._complete(call.outcome, reporter, logs)
        return call

    def _invoke(self, trial: dict[str, Any], reporter: Reporter, ctx: Context,
                session: RankSession | None) -> Any:
        """Build the arguments the function asks for and call it, inside its framework's scopes."""
        model_fn, data = component_generators(trial.get("component"), self.model_fn, self.data, self.variants)
        with _framework_scope(), session or contextlib.nullcontext():
            if session is not None:
                model_fn = session.wrap_model_fn(model_fn)
            kwargs = build_arguments(self.names, trial["hparams"], reporter, ctx, model_fn, data)
            return self.fn(**kwargs)

    @staticmethod
    def _failed(call: TrialCall, exc: BaseException, logs: _TrialLogs) -> None:
        import traceback

        call.error = exc
        call.outcome.update(status="failed", error=traceback.format_exc())
        logs.write_error(call.outcome["error"])

    def _ended(self, reporter: Reporter, ctx: Context, returned: Any) -> dict[str, Any]:
        """The outcome of a function that returned ``returned``."""
        if reporter.stop_reason is not None:
            # The scheduler stopped the trial and the function ended by itself (the Keras callback ends
            # fit after that epoch): stopped, with the metrics the scheduler judged.
            return {"status": "stopped", "metrics": reporter.last_metrics,
                    "stop_reason": reporter.stop_reason}
        if ctx.is_chief:  # the chief's return value is the result; other ranks' are not judged
            return self._judge(returned)
        return {"status": "completed"}

    @staticmethod
    def _complete(outcome: dict[str, Any], reporter: Reporter, logs: _TrialLogs) -> None:
        """What every outcome holds besides its status: steps, metrics, cut logs, a bounded error."""
        if reporter.metric_error is not None:  # failed at its first report, even if the function went on
            outcome.update(status="failed", error_kind="missing_metric", error=reporter.metric_error)
        outcome.setdefault("metrics", reporter.last_metrics)
        outcome["steps"] = reporter.count
        outcome["last_step"] = reporter.last_step
        cut = logs.cut()
        if cut:
            outcome["logs_cut"] = cut
        error = outcome.get("error")
        if isinstance(error, str) and len(error) > MAX_ERROR_CHARS:  # e.g. an exception with a huge message
            half = MAX_ERROR_CHARS // 2
            outcome["error"] = (f"{error[:half]}\n[unison: {len(error) - 2 * half} characters of this error "
                                f"were cut]\n{error[-half:]}")

    def _judge(self, returned: Any) -> dict[str, Any]:
        """The status (and metrics or error) of a trial whose function returned ``returned``."""
        if returned is None and not self.require_metric:  # e.g. a single run that only prints
            return {"status": "completed", "metrics": {}}
        metrics, problem = normalize_metrics(returned, self.metrics)
        if metrics is None:
            return {"status": "failed", "error": problem}
        missing = [m for m in self.metrics if m not in metrics]
        if missing and self.require_metric:
            from unison._validate import missing_metric_message

            return {
                "status": "failed",
                "error_kind": "missing_metric",
                "error": missing_metric_message("the function returned the metrics", metrics, missing,
                                                f"return {missing[0]!r} too"),
            }
        return {"status": "completed", "metrics": metrics}


def _checkpointer(trial: Mapping[str, Any], ctx: Context) -> Checkpointer | None:
    """What saves the trial's checkpoints into its folder: rank 0's (a distributed trial's checkpoint is
    its rank 0's; the other ranks' ``checkpoint=`` is ignored). A worker without the driver's disk
    saves each into its temporary trial folder and ships it to the driver in chunks (the trial's
    ``SHIP_CHECKPOINTS`` entry, see :mod:`unison.worker.checkpoint_ship`), unless the checkpoints go to
    shared storage (``root``, ``checkpoint_storage=``)."""
    if not ctx.is_chief:
        return None
    root = (trial.get("checkpoint") or {}).get("root")
    if root:  # checkpoint_storage=: the trial's checkpoints folder on shared storage, written directly
        return Checkpointer(root, Policy.from_message(trial.get("checkpoint")))
    ship = trial.get(SHIP_CHECKPOINTS)  # a worker without the driver's disk (serve._run_shipped)
    if ship is not None:  # saved into the temporary trial folder, shipped to the driver in chunks
        return ship(Path(trial["trial_dir"]) / FOLDER, Policy.from_message(trial.get("checkpoint")))
    return Checkpointer(Path(trial["trial_dir"]) / FOLDER, Policy.from_message(trial.get("checkpoint")))


def _framework_scope() -> contextlib.AbstractContextManager[None]:
    """Per-trial framework state: with Keras loaded, a fresh layer-naming scope (see
    :func:`unison.frameworks.keras.fresh_layer_names`); otherwise nothing."""
    if "keras" in sys.modules:
        from unison.frameworks.keras import fresh_layer_names

        return fresh_layer_names()
    return contextlib.nullcontext()


def session_for(trial: Mapping[str, Any], notify: Callable[[str], None] | None = None) -> RankSession | None:
    """The framework's rank session of a distributed trial's message, ``None`` for an ordinary trial."""
    dist = trial.get("dist")
    if not dist:
        return None
    if dist.get("framework") == "tensorflow":
        from unison.frameworks.tensorflow import TensorFlowRankSession

        return TensorFlowRankSession(dist, trial.get("seed"), notify)
    from unison.frameworks.torch import TorchRankSession

    return TorchRankSession(dist, trial.get("seed"), notify)
