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
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unison.ablate import component_generators
from unison.context import Context, _default_device
from unison.dist import session_for
from unison.errors import TrialStopped
from unison.injection import build_arguments, once, takes_no_arguments

Decide = Callable[[int, dict[str, float]], "str | None"]
"""``decide(step, metrics)``: how a reporter asks the scheduler; ``None`` to go on, else why to stop."""


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
    """

    def __init__(self, decide: Decide | None = None, log: io.TextIOBase | None = None) -> None:
        self._decide = decide
        self._log = log
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self.count = 0
        self.stop_reason: str | None = None

    def report(self, step: int | None = None, **metrics: Any) -> None:
        """Record metrics at ``step`` (default: 0, 1, 2, ... per call).

        Raises :class:`unison.TrialStopped` when the scheduler stops the trial; let it propagate.
        """
        if self.stop_reason is not None:
            raise TrialStopped(self.stop_reason)
        if step is None:
            step = self.count
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"reporter.report(step=...) must be an int, got {step!r}")
        clean: dict[str, float] = {}
        for name, value in metrics.items():
            number = to_number(value)
            if number is None:
                raise TypeError(
                    f"reporter.report({name}={value!r}): metrics must be numbers "
                    f"(got {type(value).__name__})"
                )
            clean[name] = number
        self.count += 1
        self.last_step, self.last_metrics = int(step), clean
        if self._log is not None:
            self._log.write(json.dumps({"step": int(step), **clean}) + "\n")
        reason = None if self._decide is None else self._decide(int(step), clean)
        if reason is not None:
            self.stop_reason = str(reason) or f"stopped at step {int(step)}"
            raise TrialStopped(self.stop_reason)


def normalize_metrics(returned: Any, metric: str | list[str]) -> tuple[dict[str, float] | None, str | None]:
    """Turn what the function returned into ``{name: float}``; on a problem, ``(None, message)``.

    A bare number is the optimized metric; a multi-objective search (``metric`` a list of names)
    needs a dict.
    """
    names = [metric] if isinstance(metric, str) else list(metric)
    number = to_number(returned)
    if number is not None and len(names) == 1:
        metrics = {names[0]: number}
    elif isinstance(returned, dict):
        metrics = {}
        for name, value in returned.items():
            number = to_number(value)
            if number is None:
                return None, (
                    f"metric {name!r} is {value!r} ({type(value).__name__}); the function must return a "
                    f"number or a dict of numbers"
                )
            metrics[str(name)] = number
    else:
        return None, (
            f"the function returned {returned!r} ({type(returned).__name__}); return "
            + (f"a number (the metric {names[0]!r}) or " if len(names) == 1 else "")
            + f"a dict of numbers that includes {', '.join(map(repr, names))}"
        )
    for name, value in metrics.items():
        if not math.isfinite(value):
            return None, f"metric {name!r} is {value} (not finite): the trial diverged or divided by zero"
    return metrics, None


class _LazyLog(io.TextIOBase):
    """A line-buffered log file opened on first write, so quiet trials cost no file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.TextIOWrapper | None = None

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        return self._file.write(text)

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
    ) -> None:
        """``require_metric=False``: a returned dict without ``metric`` still completes (a distributed
        run without ``metric=`` returns whatever it likes, as a single run does)."""
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
        metrics_log = _LazyLog(log_dir / "metrics.jsonl")
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
            raise
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
        outcome.setdefault("metrics", reporter.last_metrics)
        outcome["steps"] = reporter.count
        outcome["last_step"] = reporter.last_step
        return outcome

    def _judge(self, returned: Any) -> dict[str, Any]:
        """The status (and metrics or error) of a trial whose function returned ``returned``."""
        metrics, problem = normalize_metrics(returned, self.metrics)
        if metrics is None:
            return {"status": "failed", "error": problem}
        missing = [m for m in self.metrics if m not in metrics]
        if missing and self.require_metric:
            return {
                "status": "failed",
                "error_kind": "missing_metric",
                "error": (
                    f"the function returned the metrics {sorted(metrics)} but the search optimizes "
                    f"{', '.join(map(repr, missing))}: return {missing[0]!r} too, or set "
                    f"Search(metric=...) to one of {sorted(metrics)}"
                ),
            }
        return {"status": "completed", "metrics": metrics}


def _framework_scope() -> Any:
    """Per-trial framework state: with Keras loaded, a fresh layer-naming scope (see
    :func:`unison.frameworks.keras.fresh_layer_names`); otherwise nothing."""
    if "keras" in sys.modules:
        from unison.frameworks.keras import fresh_layer_names

        return fresh_layer_names()
    return contextlib.nullcontext()
