"""``reporter``: what the training function calls to record metrics and to hear the scheduler."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unison._validate import check_number
from unison.errors import MetricNotReported, TrialStopped
from unison.worker.metrics import oversize, short, to_number

if TYPE_CHECKING:
    from unison.worker.checkpoints import Checkpointer

Decide = Callable[..., "str | None"]
"""``decide(step, metrics[, checkpoint])``: how a reporter asks the scheduler; ``None`` to go on, else
why to stop. ``checkpoint``, passed only when the report saved one: ``{"step", "path", "size"}``
(``path`` relative to the trial folder)."""

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

    ``checkpoint=`` saves a checkpoint with the report (see :mod:`unison.worker.checkpoints`) before
    the driver hears of it; without a ``checkpointer`` (a rank other than 0 of a distributed trial,
    whose checkpoint is rank 0's) it is ignored. ``first_step``: the step a report without ``step=``
    gets first (the step after the checkpoint a retried trial resumes from).
    """

    def __init__(self, decide: Decide | None = None, log: io.TextIOBase | None = None,
                 checkpointer: Checkpointer | None = None, first_step: int = 0) -> None:
        self._decide = decide
        self._log = log
        self._checkpointer, self._first_step = checkpointer, first_step
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None
        self.count = 0
        self.stop_reason: str | None = None
        self.metric_error: str | None = None

    def report(self, step: int | None = None, checkpoint: Any = None, **metrics: Any) -> None:
        """Record metrics at ``step`` (default: 0, 1, 2, ... per call) and, with ``checkpoint=``, save a
        checkpoint of that step: a directory the function wrote (its path; it is copied), or a picklable
        object such as a ``state_dict`` or a dict (saved with ``torch.save`` when it holds torch
        tensors, else cloudpickled). It is saved whole before this returns; a retried or resumed trial
        gets the last one as ``ctx.checkpoint`` (and its step as ``ctx.checkpoint_step``). In a
        distributed trial rank 0's checkpoint is the trial's: the other ranks' ``checkpoint=`` is
        ignored (every rank of a retry gets rank 0's as ``ctx.checkpoint``); sharded state (FSDP) is
        saved by every rank into one directory with ``torch.distributed.checkpoint``, which rank 0
        passes.

        Raises :class:`unison.TrialStopped` when the scheduler stops the trial; let it propagate.
        Raises :class:`unison.MetricNotReported` when the experiment's first report lacks the metric
        the search optimizes; ``TypeError`` when ``checkpoint`` cannot be pickled (nothing is recorded).
        """
        if self.stop_reason is not None:
            raise TrialStopped(self.stop_reason)
        if self.metric_error is not None:
            raise MetricNotReported(self.metric_error)
        if step is None:
            step = self._first_step + self.count
        step = check_number(step, "step", owner="reporter.report", integer=True)
        problem = oversize("reporter.report() got", metrics)
        if problem is not None:
            raise ValueError(problem)
        clean: dict[str, float] = {}
        for name, value in metrics.items():
            number = to_number(value)
            if number is None:
                raise TypeError(
                    f"reporter.report({name}={short(value)}): metrics must be numbers "
                    f"(got {type(value).__name__})"
                )
            clean[name] = number
        problem = oversize("reporter.report() got", clean, measure=True)
        if problem is not None:
            raise ValueError(problem)
        saved = None
        if checkpoint is not None and self._checkpointer is not None:
            saved = self._checkpointer.save(checkpoint, int(step), clean)
        self.count += 1
        self.last_step, self.last_metrics = int(step), clean
        if self._log is not None:
            self._log.write(json.dumps({"step": int(step), **clean}) + "\n")
        try:
            if self._decide is None:
                reason = None
            elif saved is None:  # (a decide of two arguments still works without checkpoints)
                reason = self._decide(int(step), clean)
            else:
                reason = self._decide(int(step), clean, saved)
        except MetricNotReported as exc:
            self.metric_error = str(exc)
            raise
        if reason is not None:
            self.stop_reason = str(reason) or f"stopped at step {int(step)}"
            raise TrialStopped(self.stop_reason)


