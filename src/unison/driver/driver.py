"""The search driver: what runs next, what stops early, what is recorded.

``SearchDriver`` holds all decisions and all trial state. It is driven by one thread: the inline
loop calls it between trials, the remote loop (``unison.driver.dispatch``) calls it for each worker message.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unison.driver.store import ExperimentStore
from unison.errors import SearchAborted
from unison.result import objective_value
from unison.schedulers.base import Stop, decision_of

if TYPE_CHECKING:
    from unison.contexts.search import Search

FINAL = ("completed", "failed", "stopped")


@dataclass
class TrialState:
    """The driver's record of one trial."""

    trial_id: int
    hparams: dict[str, Any]
    status: str = "pending"  # pending | reserved | running | completed | failed | stopped
    attempt: int = 0
    worker: str | None = None
    host: str | None = None
    pid: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    value: float | list[float] | None = None  # a list: one value per metric of a multi-objective search
    error: str | None = None
    steps: int = 0
    last_step: int | None = None
    duration: float | None = None
    stop_reason: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None  # time.monotonic() when this attempt started (for trial_timeout_s)
    # The checkpoints journaled for this trial, oldest first: {"step", "path"} (relative to the experiment)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The trial as one flat record (for the trial table and result.json)."""
        return {
            "trial_id": self.trial_id,
            "status": self.status,
            "hparams": self.hparams,
            "metrics": self.metrics,
            "value": self.value,
            "steps": self.steps,
            "last_step": self.last_step,
            "duration": self.duration,
            "worker": self.worker,
            "host": self.host,
            "pid": self.pid,
            "attempts": self.attempt + 1,
            "stop_reason": self.stop_reason,
            "error": self.error,
            **({"checkpoint": self.checkpoints[-1]["path"]} if self.checkpoints else {}),  # the latest: kept
            **({"spec": self.spec} if self.spec else {}),
        }


def trial_seed(seed: int, trial_id: int) -> int:
    """The ``ctx.seed`` of trial ``trial_id`` in an experiment seeded ``seed``."""
    return (seed * 1_000_003 + trial_id) % 2**32


class SearchDriver:
    """Decisions and records for one search experiment."""

    def __init__(self, search: Search, store: ExperimentStore, seed: int,
                 trial_spec: Callable[[int], dict[str, Any]] | None = None) -> None:
        """``trial_spec(n)`` adds context-specific fields to trial ``n`` (an ablation's component
        and seed); they travel to the worker and into the journal."""
        self.search, self.store = search, store
        self.trial_spec = trial_spec
        self.seed = seed
        self.optimizer = search.build_optimizer(seed)
        self.scheduler = search.build_scheduler()
        self.planned = search.planned_trials(self.optimizer)
        self.trials: dict[int, TrialState] = {}
        self.pending: deque[int] = deque()
        self.next_number = 0
        self.exhausted = False
        self.running = 0
        self.reserved: set[int] = set()  # handed to a busy worker as its next trial, not started yet
        self.failures = 0
        self.first_failure: TrialState | None = None
        self.abort_error: BaseException | None = None
        self.best: TrialState | None = None
        self.counts = {"completed": 0, "failed": 0, "stopped": 0}
        self.started_at = time.monotonic()
        self.concurrency: int | None = search.max_concurrent
        # The first report of the experiment must hold the optimized metric(s) (Ray Tune's rule): a
        # misspelled metric= then fails at once, not after whole trials. Off for a run without metric=.
        self.require_metric = True
        self.metric_checked = False

    # ----------------------------------------------------------------- resume
    def replay(self, events: list[dict[str, Any]]) -> None:
        """Rebuild state from a journal: ended trials are kept, unfinished ones are queued again."""
        reports: dict[int, list[tuple[int, float]]] = {}
        for ev in events:
            kind, tid = ev.get("e"), ev.get("id")
            if not isinstance(tid, int):  # a status event: no trial's
                continue
            if kind == "start":
                trial = self.trials.get(tid) or TrialState(tid, ev["hparams"], spec=ev.get("spec") or {})
                trial.attempt, trial.worker, trial.status = ev.get("attempt", 0), ev.get("worker"), "running"
                trial.host, trial.pid = ev.get("host"), ev.get("pid")
                self.trials[tid] = trial
                self.next_number = max(self.next_number, tid + 1)
                reports[tid] = []
            elif kind == "report":
                value = ev["metrics"].get(self.search.metrics[0])
                if value is not None and self.scheduler is not None:
                    reports.setdefault(tid, []).append((ev["step"], value))
            elif kind == "end":
                self._apply_end(self.trials[tid], ev)
                if self.scheduler is not None:
                    for step, value in reports.get(tid, []):
                        self.scheduler.on_report(tid, step, value)
                    self.scheduler.on_complete(tid, ev["status"])
                self._account(self.trials[tid])
            elif kind == "checkpoint" and tid in self.trials:
                self.trials[tid].checkpoints.append({"step": ev["step"], "path": ev["path"]})
            elif kind == "lost":
                self.trials[tid].attempt = ev.get("attempt", 0) + 1
                self.trials[tid].status = "pending"
        for number in range(self.next_number):  # handed to a worker as its next trial, never started
            hparams = None if number in self.trials else self.optimizer.suggest(number)
            if hparams is not None:
                spec = self.trial_spec(number) if self.trial_spec is not None else {}
                self.trials[number] = TrialState(number, hparams, spec=spec)
        for tid in sorted(self.trials):  # unfinished when the driver stopped: run them again
            if self.trials[tid].status not in FINAL:
                self.trials[tid].status = "pending"
                self.pending.append(tid)

    # --------------------------------------------------------------- decisions
    def can_start(self) -> bool:
        """Whether another trial may start now (``concurrency`` bounds the trials in flight)."""
        return self.concurrency is None or self.running < self.concurrency

    @property
    def prefetch(self) -> bool:
        """Whether a busy worker may be handed its next trial: only when suggestions do not depend
        on results (a learning optimizer would propose it knowing less)."""
        return not getattr(self.optimizer, "adaptive", True)

    def unstarted(self) -> int:
        """How many trials are still to start (queued again or not yet suggested)."""
        more = 0 if self.exhausted else max(self.planned - self.next_number, 0)
        return len(self.pending) + more

    def next_trial(self, reserve: bool = False) -> TrialState | None:
        """The next trial to run, or ``None`` when there is nothing to start now.

        ``reserve``: the trial is for a busy worker, which starts it when its current trial ends (so
        ``max_concurrent`` does not apply now); record it with :meth:`reserve`."""
        if self.abort_error is not None or not (reserve or self.can_start()):
            return None
        if self.pending:
            return self.trials[self.pending.popleft()]
        if self.exhausted or self.next_number >= self.planned:
            return None
        hparams = self.optimizer.suggest(self.next_number)
        if hparams is None:
            self.exhausted = True
            return None
        spec = self.trial_spec(self.next_number) if self.trial_spec is not None else {}
        trial = TrialState(self.next_number, hparams, spec=spec)
        self.trials[trial.trial_id] = trial
        self.next_number += 1
        return trial

    @property
    def finished(self) -> bool:
        if self.abort_error is not None:
            return True
        more = not self.exhausted and self.next_number < self.planned
        return not more and not self.pending and self.running == 0 and not self.reserved

    def reserve(self, trial: TrialState) -> dict[str, Any]:
        """Hand ``trial`` to a busy worker as its next one; return the message that describes it.
        It is journaled when it starts (:meth:`start`), or queued again (:meth:`unreserve`)."""
        trial.status = "reserved"
        self.reserved.add(trial.trial_id)
        return self.message(trial)

    def unreserve(self, trial_id: int) -> None:
        """The worker holding reserved ``trial_id`` went away before starting it: queue it again,
        first, without counting an attempt."""
        self.reserved.discard(trial_id)
        self.trials[trial_id].status = "pending"
        self.pending.appendleft(trial_id)

    def start(self, trial: TrialState, worker: str, host: str | None = None,
              pid: int | None = None, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Record that ``trial`` starts on ``worker`` (process ``pid`` on ``host``); return the
        message that describes it. A distributed trial names its ranks' workers, hosts and pids in
        ``ranks`` (``worker``, ``host``, ``pid`` are then rank 0's, the workers joined by commas)."""
        self.reserved.discard(trial.trial_id)
        trial.status, trial.worker, trial.host, trial.pid = "running", worker, host, pid
        trial.started_at = time.monotonic()
        self.running += 1
        self.store.append(
            {"e": "start", "id": trial.trial_id, "hparams": trial.hparams, "attempt": trial.attempt,
             "worker": worker, "host": host, "pid": pid, "t": time.time(),
             **({"spec": trial.spec} if trial.spec else {}), **({"ranks": ranks} if ranks else {})}
        )
        return self.message(trial)

    def message(self, trial: TrialState) -> dict[str, Any]:
        """What a worker needs to run ``trial``."""
        return {
            "trial_id": trial.trial_id,
            "hparams": trial.hparams,
            "trial_dir": str(self.store.trial_dir(trial.trial_id)),
            "attempt": trial.attempt,
            "seed": trial_seed(self.seed, trial.trial_id),
            "checkpoint": self.checkpoint_spec(trial),
            **trial.spec,
        }

    def checkpoint_spec(self, trial: TrialState) -> dict[str, Any]:
        """The trial message's ``checkpoint``: which checkpoints to keep (the last ``keep_checkpoints``
        plus the best by the search's first metric) and the one to resume from: the newest journaled
        checkpoint still on disk, as a path on the driver's disk and never its bytes (a worker without
        that disk is where checkpoint shipping plugs in, issue 16, later)."""
        spec: dict[str, Any] = {"keep": self.search.keep_checkpoints, "mode": self.search.modes[0],
                                "metric": None if len(self.search.metrics) > 1 else self.search.metrics[0]}
        for saved in reversed(trial.checkpoints):
            folder = self.store.path / saved["path"]
            if (folder / "meta.json").is_file():  # a worker orphaned by a driver crash may have pruned it
                spec.update(path=str(folder), step=saved["step"])
                break
        return spec

    def report(self, trial_id: int, step: int, metrics: dict[str, float],
               checkpoint: dict[str, Any] | None = None) -> str | None:
        """Record an intermediate report (and the checkpoint saved with it: ``{"step", "path", "size"}``,
        ``path`` relative to the trial folder); return ``None`` to continue or the reason to stop.

        Raises :class:`unison.MetricNotReported` if this is the experiment's first report and it lacks
        a metric the search optimizes (the trial then fails with ``error_kind: missing_metric``)."""
        self.store.append({"e": "report", "id": trial_id, "step": step, "metrics": metrics, "t": time.time()})
        if checkpoint is not None:
            self._record_checkpoint(trial_id, checkpoint)
        if not self.metric_checked and self.require_metric:
            missing = [m for m in self.search.metrics if m not in metrics]
            if missing:
                from unison._validate import missing_metric_message
                from unison.errors import MetricNotReported

                raise MetricNotReported(missing_metric_message(
                    f"the experiment's first report (trial {trial_id}, step {step}) has the metrics",
                    metrics, missing, f"report {missing[0]!r} in it too"))
            self.metric_checked = True
        value = metrics.get(self.search.metrics[0])
        if self.scheduler is None or value is None or not math.isfinite(value):
            return None
        returned = self.scheduler.on_report(trial_id, step, value)
        try:
            decision = decision_of(returned, type(self.scheduler).__name__)
        except TypeError as exc:  # a broken scheduler: every trial would meet it, on every backend
            self.abort(SearchAborted(f"the scheduler cannot decide: {exc}"))
            return None
        if not isinstance(decision, Stop):
            return None
        return decision.reason or f"stopped by the scheduler at step {step}"

    def _record_checkpoint(self, trial_id: int, checkpoint: dict[str, Any]) -> None:
        """Journal a checkpoint a report saved (its folder is on disk already)."""
        trial_dir = self.store.trial_dir(trial_id).relative_to(self.store.path)
        path = (trial_dir / checkpoint["path"]).as_posix()
        self.store.append({"e": "checkpoint", "id": trial_id, "step": checkpoint["step"], "path": path,
                           "size": checkpoint.get("size"), "t": time.time()})
        trial = self.trials.get(trial_id)
        if trial is not None:
            trial.checkpoints.append({"step": checkpoint["step"], "path": path})

    def finish(self, outcome: dict[str, Any]) -> None:
        """Record a trial's outcome (from the trial runner) and learn from it."""
        trial = self.trials[outcome["trial_id"]]
        if trial.status != "running":
            return  # a late result of a trial already given up on
        self.running -= 1
        self._end(trial, outcome)

    def _end(self, trial: TrialState, outcome: dict[str, Any]) -> None:
        event = {
            "e": "end", "id": trial.trial_id, "status": outcome["status"],
            "metrics": outcome.get("metrics") or {}, "error": outcome.get("error"),
            "duration": outcome.get("duration"), "steps": outcome.get("steps", 0),
            "last_step": outcome.get("last_step"), "stop_reason": outcome.get("stop_reason"),
            "worker": trial.worker,
        }
        if outcome.get("files_skipped"):
            event["files_skipped"] = outcome["files_skipped"]
        if outcome.get("logs_cut"):
            event["logs_cut"] = outcome["logs_cut"]
        self.store.append(event)
        self._apply_end(trial, event)
        if self.scheduler is not None:
            self.scheduler.on_complete(trial.trial_id, trial.status)
        self._account(trial)
        if outcome.get("error_kind") == "missing_metric" and self.abort_error is None:
            self.abort_error = SearchAborted(outcome["error"])

    def lose(self, trial_id: int, reason: str) -> None:
        """The worker running ``trial_id`` died or went silent: retry it or fail it."""
        trial = self.trials[trial_id]
        if trial.status != "running":
            return
        self.running -= 1
        self.store.append({"e": "lost", "id": trial_id, "attempt": trial.attempt, "reason": reason})
        if self.scheduler is not None:
            self.scheduler.on_complete(trial_id, "retried")
        if trial.attempt < self.search.max_retries:
            trial.attempt += 1
            trial.status = "pending"
            self.pending.appendleft(trial_id)
            return
        self._end(trial, {
            "trial_id": trial_id, "status": "failed",
            "error": f"{reason}; gave up after {trial.attempt + 1} attempts (max_retries="
                     f"{self.search.max_retries})",
        })

    def overdue(self, now: float) -> list[TrialState]:
        """The running trials that started more than ``trial_timeout_s`` before ``now``
        (``time.monotonic()``); none when the search sets no limit."""
        limit = self.search.trial_timeout_s
        if limit is None:
            return []
        return [t for t in self.trials.values()
                if t.status == "running" and t.started_at is not None and now - t.started_at > limit]

    def time_out(self, trial_id: int) -> None:
        """``trial_id`` ran past ``trial_timeout_s`` (its process is being ended): fail it, or with
        ``retry_on_timeout`` run it again while attempts remain."""
        trial = self.trials[trial_id]
        if trial.status != "running":
            return
        reason = f"timeout: the trial ran longer than trial_timeout_s={self.search.trial_timeout_s}"
        if self.search.retry_on_timeout:
            self.lose(trial_id, reason)
            return
        self.running -= 1
        elapsed = None if trial.started_at is None else time.monotonic() - trial.started_at
        self._end(trial, {"trial_id": trial_id, "status": "failed", "duration": elapsed, "error": reason})

    def abort(self, error: BaseException) -> None:
        if self.abort_error is None:
            self.abort_error = error

    # ---------------------------------------------------------------- helpers
    def _apply_end(self, trial: TrialState, event: dict[str, Any]) -> None:
        trial.status = event["status"]
        trial.metrics = event.get("metrics") or {}
        trial.value = objective_value(trial.metrics, self.search.metrics)
        trial.error = event.get("error")
        trial.duration = event.get("duration")
        trial.steps = event.get("steps") or 0
        trial.last_step = event.get("last_step")
        trial.stop_reason = event.get("stop_reason")
        trial.worker = event.get("worker", trial.worker)

    def _account(self, trial: TrialState) -> None:
        self.counts[trial.status] += 1
        if trial.status == "completed" and isinstance(trial.value, float) and self._better(trial.value):
            self.best = trial
        self.optimizer.observe(trial.trial_id, trial.hparams, trial.value, trial.status)
        if trial.status == "failed":
            self.failures += 1
            if self.first_failure is None:
                self.first_failure = trial
            limit = self.search.max_failures
            if limit is not None and self.failures >= limit and self.abort_error is None:
                self.abort_error = SearchAborted(
                    f"{self.failures} trial(s) failed, reaching max_failures={limit}. The first failure, "
                    f"trial {self.first_failure.trial_id} with {self.first_failure.hparams}:\n"
                    f"{self.first_failure.error}"
                )

    def _better(self, value: float) -> bool:
        """Whether ``value`` beats the best completed trial so far."""
        if self.best is None:
            return True
        best = self.best.value
        assert isinstance(best, float)  # only single-objective searches keep a best trial
        return value > best if self.search.mode == "max" else value < best

    def summary(self) -> dict[str, Any]:
        """Counts for progress displays."""
        return {
            "planned": self.planned,
            "completed": self.counts["completed"],
            "failed": self.counts["failed"],
            "stopped": self.counts["stopped"],
            "running": self.running,
            "best": None if self.best is None else self.best.value,
            "elapsed": time.monotonic() - self.started_at,
        }
