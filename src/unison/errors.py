"""Exceptions users see."""

from __future__ import annotations


class TrialStopped(BaseException):  # noqa: N818 - the public name says what happened
    """Raised inside ``reporter.report`` when the scheduler stops the trial early.

    It derives from ``BaseException`` so that a training function's ``except Exception`` does not
    swallow it; the runtime catches it and records the trial as stopped with its last reported value.
    """


class SearchAborted(RuntimeError):
    """A search ended before its trials were done (too many failures, a configuration error)."""


class WorkerError(RuntimeError):
    """A worker could not start or load the training function."""


class RunFailed(RuntimeError):
    """A distributed run (``unison.Distributed``) failed: the message names the rank that failed
    first and holds its traceback; ``path`` is the experiment directory (every rank's logs are in
    ``trials/0000/``, rank ``r``'s in ``trials/0000/rank-<r>/``)."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class ExperimentLocked(RuntimeError):
    """Another driver is running this experiment (it holds the experiment directory's lock).

    ``holder`` describes it (``host``, ``pid``, ``since``) as far as the lock file says."""

    def __init__(self, message: str, holder: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.holder = holder or {}


class StorageFull(OSError):
    """The experiment's storage ran out of space (or quota). Nothing recorded before is lost:
    free space and ``unison.resume(path, fn)`` continues the experiment. ``path`` is the
    experiment directory."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class MetricNotReported(ValueError):
    """Raised by ``reporter.report`` when the experiment's first report lacks the metric the search
    optimizes (a misspelled ``metric=``): the trial fails at once and the search aborts, instead of
    every trial running to its end for nothing. The message names what was reported."""
