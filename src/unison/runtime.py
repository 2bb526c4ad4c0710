"""Running one trial: inject arguments, capture output, call the function, check what it returned.

The same code runs a trial in the calling process (inline backend) and in a worker process (local,
Spark): only the way ``reporter`` reaches the driver differs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import numbers
import os
import re
import reprlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unison import protocol, trialfiles
from unison.ablate import component_generators
from unison.context import Context, _default_device
from unison.dist import session_for
from unison.errors import MetricNotReported, TrialStopped
from unison.injection import build_arguments, once, takes_no_arguments

Decide = Callable[[int, dict[str, float]], "str | None"]
"""``decide(step, metrics)``: how a reporter asks the scheduler; ``None`` to go on, else why to stop."""

MAX_METRICS = protocol.MAX_METRICS
"""The most metrics a trial may return, or report in one ``reporter.report`` call (the protocol's bound
for one message: here the trial fails with a message that says what to do instead)."""
MAX_METRICS_BYTES = 1024 * 1024
"""The most bytes (as JSON) the metrics a trial returns, or reports in one call, may take."""
MAX_ERROR_CHARS = 64 * 1024  # a failed trial's error (traceback) keeps its first and last part


def _short(value: Any) -> str:
    """A bounded ``repr`` for messages (a huge list must not become a huge error)."""
    return reprlib.repr(value)


def _oversize(what: str, metrics: dict[Any, Any], measure: bool = False) -> str | None:
    """Why ``metrics`` (returned, or reported in one call) are over the caps, or ``None``: their count,
    and with ``measure`` (numbers by then) their size as JSON."""
    size = None
    if len(metrics) <= MAX_METRICS:
        if not measure:
            return None
        size = len(json.dumps(metrics))
        if size <= MAX_METRICS_BYTES:
            return None
    found = f"{len(metrics)} metrics" if size is None else f"{size} bytes of metrics"
    return (f"{what} {found}: at most {MAX_METRICS} metrics and {MAX_METRICS_BYTES // 1024 // 1024} MiB "
            f"may be sent to the driver at once. Return or report a few summary numbers, and write big "
            f"things (predictions, arrays, per-example scores) to files in ctx.trial_dir, which the "
            f"experiment keeps")


def to_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (or a 0-d array/tensor), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        try:
            inner = item()
        except Exception:  # noqa: BLE001 - anything that is not a scalar is simply not a number
            return None
        return None if isinstance(inner, bool) else to_number(inner)
    return None


class Reporter:
    """``reporter`` in the training function: records intermediate metrics, may stop the trial.

    Once the scheduler has stopped the trial, ``stop_reason`` says why and the stop is final: every
    later ``report`` raises :class:`unison.TrialStopped` at once, without recording anything, and the
    trial is recorded as ``stopped`` even if the function caught the exception and returned (the Keras
    callback does exactly that, to end ``fit`` cleanly).

    The experiment's first report must hold the metric(s) the search optimizes: if it does not, this
    report raises :class:`unison.MetricNotReported`, ``metric_error`` says why, every later ``report``
    raises it again, and the trial fails (with ``error_kind: missing_metric``: the search aborts)
    even if the function caught it.
    """

    def __init__(self, decide: Decide | None = None, log: io.TextIOBase | None = None) -> None:
        self._decide = decide
        self._log = log
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self.count = 0
        self.stop_reason: str | None = None
        self.metric_error: str | None = None

    def report(self, step: int | None = None, **metrics: Any) -> None:
        """Record metrics at ``step`` (default: 0, 1, 2, ... per call).

        Raises :class:`unison.TrialStopped` when the scheduler stops the trial; let it propagate.
        Raises :class:`unison.MetricNotReported` when the experiment's first report lacks the metric
        the search optimizes.
        """
        if self.stop_reason is not None:
            raise TrialStopped(self.stop_reason)
        if self.metric_error is not None:
            raise MetricNotReported(self.metric_error)
        if step is None:
            step = self.count
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"reporter.report(step=...) must be an int, got {step!r}")
        problem = _oversize("reporter.report() got", metrics)
        if problem is not None:
            raise ValueError(problem)
        clean: dict[str, float] = {}
        for name, value in metrics.items():
            number = to_number(value)
            if number is None:
                raise TypeError(
                    f"reporter.report({name}={_short(value)}): metrics must be numbers "
                    f"(got {type(value).__name__})"
                )
            clean[name] = number
        problem = _oversize("reporter.report() got", clean, measure=True)
        if problem is not None:
            raise ValueError(problem)
        self.count += 1
        self.last_step, self.last_metrics = int(step), clean
        if self._log is not None:
            self._log.write(json.dumps({"step": int(step), **clean}) + "\n")
        try:
            reason = None if self._decide is None else self._decide(int(step), clean)
        except MetricNotReported as exc:
            self.metric_error = str(exc)
            raise
        if reason is not None:
            self.stop_reason = str(reason) or f"stopped at step {int(step)}"
            raise TrialStopped(self.stop_reason)


def normalize_metrics(returned: Any, metric: str | list[str]) -> tuple[dict[str, float] | None, str | None]:
    """Turn what the function returned into ``{name: float}``; on a problem, ``(None, message)``.

    A bare number is the optimized metric; a multi-objective search (``metric`` a list of names)
    needs a dict.
    """
    names = [metric] if isinstance(metric, str) else list(metric)
    if isinstance(returned, dict):
        problem = _oversize("the function returned", returned)
        if problem is not None:
            return None, problem
    number = to_number(returned)
    if number is not None and len(names) == 1:
        metrics = {names[0]: number}
    elif isinstance(returned, dict):
        metrics = {}
        for name, value in returned.items():
            number = to_number(value)
            if number is None:
                return None, (
                    f"metric {_short(name)} is {_short(value)} ({type(value).__name__}); the function "
                    f"must return a number or a dict of numbers"
                )
            metrics[str(name)] = number
    else:
        return None, (
            f"the function returned {_short(returned)} ({type(returned).__name__}); return "
            + (f"a number (the metric {names[0]!r}) or " if len(names) == 1 else "")
            + f"a dict of numbers that includes {', '.join(map(repr, names))}"
        )
    for name, value in metrics.items():
        if not math.isfinite(value):
            return None, f"metric {name!r} is {value} (not finite): the trial diverged or divided by zero"
    problem = _oversize("the function returned", metrics, measure=True)
    if problem is not None:
        return None, problem
    return metrics, None


_CUT_NOTE = re.compile(rb"^(?:\[unison: |\{\"unison\": \")(\d+) bytes of earlier ")


def _limit_text(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"


class _LazyLog(io.TextIOBase):
    """A line-buffered log file opened on first write, so quiet trials cost no file.

    It never holds more than ``limit`` bytes (default :data:`unison.trialfiles.LOG_LIMIT_BYTES`): a
    write that would pass the limit rewrites the file to its last ``limit / 2`` bytes (from a line
    start) under a first line ``[unison: N bytes of earlier output were cut (log limit 8 MiB)]``, so
    the file is rewritten once per ``limit / 2`` bytes written, never once per line. ``json_note``
    writes that line as a JSON object instead (for ``metrics.jsonl``). ``cut``: how many bytes this
    log dropped.
    """

    def __init__(self, path: Path, limit: int | None = None, json_note: bool = False) -> None:
        self.path = path
        self.limit = trialfiles.LOG_LIMIT_BYTES if limit is None else int(limit)
        self.json_note = json_note
        self.cut = 0
        self._file: io.BufferedWriter | None = None
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.write_bytes(text.encode("utf-8", "backslashreplace"))
        return len(text)

    def write_bytes(self, data: bytes) -> None:
        """Append ``data`` (already encoded), within the limit."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            self._size = os.fstat(self._file.fileno()).st_size  # a retried trial's log goes on
        if self._size + len(data) > self.limit:
            self._keep_last(data)
        else:
            self._file.write(data)
            self._size += len(data)
        if b"\n" in data:
            self._file.flush()

    def _keep_last(self, data: bytes) -> None:
        """Rewrite the log as its last part (ending with ``data``) under a note of what was cut."""
        assert self._file is not None
        self._file.flush()
        keep = self.limit // 2
        with open(self.path, "rb") as f:
            head = f.read(200)
            if len(data) < keep:
                f.seek(max(0, self._size - (keep - len(data))))
                tail = f.read() + data
            else:
                tail = data[-keep:]
        newline = tail.find(b"\n")
        if 0 <= newline < len(tail) - 1:
            tail = tail[newline + 1:]
        match = _CUT_NOTE.match(head)
        old_note = head.find(b"\n") + 1 if match else 0
        earlier = int(match.group(1)) if match else 0
        dropped = self._size - old_note + len(data) - len(tail)
        self.cut += dropped
        what = "reports" if self.json_note else "output"
        note = f"{earlier + dropped} bytes of earlier {what} were cut (log limit {_limit_text(self.limit)})"
        line = json.dumps({"unison": note}) if self.json_note else f"[unison: {note}]"
        self._file.close()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(line.encode() + b"\n" + tail)
        self._size = len(line) + 1 + len(tail)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def isatty(self) -> bool:
        return False


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

    def run(self, trial: dict[str, Any], decide: Decide | None,
            notify: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Run one trial described by ``trial`` (``trial_id``, ``hparams``, ``trial_dir``, ...).

        A rank of a distributed trial (``trial["dist"]``, see :mod:`unison.dist`) runs inside its
        process group, logs into ``rank-<r>/`` unless it is rank 0, and calls ``notify(traceback)``
        as soon as its function raises."""
        session = session_for(trial, notify)
        trial_dir = Path(trial["trial_dir"])
        ctx = Context(
            trial_id=trial["trial_id"],
            trial_dir=trial_dir,
            device=self.device,
            seed=trial.get("seed"),
            attempt=trial.get("attempt", 0),
        )
        log_dir = trial_dir
        if session is not None:
            session.bind(ctx)
            log_dir, decide = session.log_dir(trial_dir), session.decide(decide)
        metrics_log = _LazyLog(log_dir / "metrics.jsonl", json_note=True)
        reporter = Reporter(decide, metrics_log)
        outcome: dict[str, Any] = {"trial_id": trial["trial_id"], "error": None}
        saved = sys.stdout, sys.stderr
        out = err = None
        if self.capture_output:
            out, err = _LazyLog(log_dir / "stdout.log"), _LazyLog(log_dir / "stderr.log")
            sys.stdout, sys.stderr = out, err
        start = time.perf_counter()
        try:
            model_fn, data = component_generators(trial.get("component"), self.model_fn, self.data,
                                                  self.variants)
            with _framework_scope(), session or contextlib.nullcontext():
                if session is not None:
                    model_fn = session.wrap_model_fn(model_fn)
                kwargs = build_arguments(self.names, trial["hparams"], reporter, ctx, model_fn, data)
                returned = self.fn(**kwargs)
        except TrialStopped as stop:
            outcome["status"] = "stopped"
            outcome["metrics"] = reporter.last_metrics
            outcome["stop_reason"] = str(stop) or f"stopped at step {reporter.last_step}"
        except KeyboardInterrupt:
            # In the driver's own process (inline) it is the user's Ctrl-C: it propagates. A worker
            # process never gets the terminal's Ctrl-C (its own session), so there the function raised
            # it: a failed trial.
            if self.interrupt_propagates:
                raise
            outcome["status"] = "failed"
            outcome["error"] = traceback.format_exc()
            if err is not None:
                err.write(outcome["error"])
        except BaseException:  # SystemExit too: a trial calling sys.exit() fails, the worker lives on
            outcome["status"] = "failed"
            outcome["error"] = traceback.format_exc()
            if err is not None:
                err.write(outcome["error"])
        else:
            if reporter.stop_reason is not None:
                # The scheduler stopped the trial and the function ended by itself (the Keras callback
                # ends fit after that epoch): stopped, with the metrics the scheduler judged.
                outcome["status"] = "stopped"
                outcome["metrics"] = reporter.last_metrics
                outcome["stop_reason"] = reporter.stop_reason
            elif ctx.is_chief:  # the chief's return value is the result; other ranks' are not judged
                outcome.update(self._judge(returned))
            else:
                outcome["status"] = "completed"
        finally:
            outcome["duration"] = time.perf_counter() - start
            metrics_log.close()
            if self.capture_output:
                sys.stdout, sys.stderr = saved
                out.close()
                err.close()
        if reporter.metric_error is not None:  # failed at its first report, even if the function went on
            outcome.update(status="failed", error_kind="missing_metric", error=reporter.metric_error)
        outcome.setdefault("metrics", reporter.last_metrics)
        outcome["steps"] = reporter.count
        outcome["last_step"] = reporter.last_step
        cut = {log.path.name: log.cut for log in (metrics_log, out, err) if log is not None and log.cut}
        if cut:
            outcome["logs_cut"] = cut
        error = outcome.get("error")
        if isinstance(error, str) and len(error) > MAX_ERROR_CHARS:  # e.g. an exception with a huge message
            half = MAX_ERROR_CHARS // 2
            outcome["error"] = (f"{error[:half]}\n[unison: {len(error) - 2 * half} characters of this error "
                                f"were cut]\n{error[-half:]}")
        return outcome

    def _judge(self, returned: Any) -> dict[str, Any]:
        """The status (and metrics or error) of a trial whose function returned ``returned``."""
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


def _framework_scope() -> Any:
    """Per-trial framework state: with Keras loaded, a fresh layer-naming scope (see
    :func:`unison.frameworks.keras.fresh_layer_names`); otherwise nothing."""
    if "keras" in sys.modules:
        from unison.frameworks.keras import fresh_layer_names

        return fresh_layer_names()
    return contextlib.nullcontext()
