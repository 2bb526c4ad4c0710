"""The search driver: what runs next, what stops early, what is recorded.

``SearchDriver`` holds all decisions and all trial state. It is driven by one thread: the inline
loop calls it between trials, the remote loop (``unison.driver.dispatch``) calls it for each worker message.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison.driver.store import ExperimentStore
from unison.errors import SearchAborted
from unison.result import objective_value
from unison.schedulers.base import Exploit, Pause, Stop, decision_of
from unison.schedulers.pbt import PBT
from unison.worker.checkpoint_storage import is_file, is_url, join

if TYPE_CHECKING:
    from unison.contexts.search import Search
    from unison.driver.suggester import Suggester

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
    node: str | None = None  # the cluster node (a Ray node id) where the worker said it runs on one
    gpus: list[str] | None = None  # the GPUs its backend gave the worker (every rank's, in rank order)
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
    ran: bool = False  # whether an attempt of it started (a worker may have left checkpoints in its folder)
    # The checkpoints journaled for this trial, oldest first: {"step", "path"} (relative to the experiment)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    # Population-based training: {"member": slot, "parent": id, "cloned_step": step} (a clone), or
    # {"member": id} (a first member); None outside PBT
    lineage: dict[str, Any] | None = None
    replaces: int | None = None  # a clone: the trial it took the place of
    turns: int = 0  # how often a Pause decision stopped it, to run again later
    reported: int = 0  # its reports over all its attempts and turns

    @property
    def is_clone(self) -> bool:
        """Whether this trial is a clone an :class:`unison.Exploit` decision made (not a suggestion)."""
        return bool(self.lineage) and "parent" in self.lineage  # type: ignore[operator]

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
            "node": self.node,
            "gpus": ",".join(self.gpus) if self.gpus else None,
            "pid": self.pid,
            "attempts": self.attempt + 1,
            "stop_reason": self.stop_reason,
            "error": self.error,
            **({"checkpoint": self.checkpoints[-1]["path"]} if self.checkpoints else {}),  # the latest: kept
            **(self.lineage or {}),
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
        # Population-based training: clones take ids from ``planned`` on, so the optimizer's numbers
        # (0 .. planned-1, the first members) stay its own
        self.population = isinstance(self.scheduler, PBT)
        if isinstance(self.scheduler, PBT):
            self.scheduler.reseed(seed)
        self.next_clone = self.planned
        self.warned_no_checkpoint = False
        self.replaced = 0  # trials an Exploit decision replaced by a clone (they end "stopped")
        self.paused: set[int] = set()  # pending because a Pause decision stopped them (PBT's turn-taking)
        self.pausing: set[int] = set()  # running, told to stop for a Pause: requeued when they end
        self.leaving: set[int] = set()  # running, told to stop for a clone: their slots come free
        if isinstance(self.scheduler, PBT):
            self.scheduler.waiting = self._waiting
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
        # checkpoint_storage=: where workers write checkpoints (a URL or a shared path); None: trial folders
        self.checkpoint_storage: str | None = None
        self.suggester: Suggester | None = None  # suggestions computed ahead (remote backends): suggest_ahead
        self.optimizer_closed = False  # close_optimizer

    # ----------------------------------------------------------------- resume
    def replay(self, events: list[dict[str, Any]]) -> None:
        """Rebuild state from a journal: ended trials are kept, unfinished ones are queued again."""
        reports: dict[int, list[tuple[int, float]]] = {}
        for ev in events:
            kind, tid = ev.get("e"), ev.get("id")
            if not isinstance(tid, int):  # a status event: no trial's
                continue
            if kind == "start":
                trial = self.trials.get(tid) or TrialState(tid, ev["hparams"], spec=ev.get("spec") or {},
                                                           lineage=ev.get("lineage"))
                trial.attempt, trial.worker, trial.status = ev.get("attempt", 0), ev.get("worker"), "running"
                trial.host, trial.node, trial.pid = ev.get("host"), ev.get("node"), ev.get("pid")
                trial.gpus, trial.ran = ev.get("gpus"), True
                self.trials[tid] = trial
                if not trial.is_clone:
                    self.next_number = max(self.next_number, tid + 1)
                reports[tid] = []
            elif kind == "clone":
                self._replay_clone(ev)
            elif kind == "report":
                if tid in self.trials:
                    self.trials[tid].reported += 1
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
            elif kind == "pause" and tid in self.trials:
                self.trials[tid].status, self.trials[tid].last_step = "pending", ev.get("step")
                self.trials[tid].turns += 1
                self.paused.add(tid)
        for number in range(self.next_number):  # handed to a worker as its next trial, never started
            hparams = None if number in self.trials else self.optimizer.suggest(number)
            if hparams is not None:
                spec = self.trial_spec(number) if self.trial_spec is not None else {}
                self.trials[number] = TrialState(number, hparams, spec=spec,
                                                 lineage={"member": number} if self.population else None)
        replaced = {t.replaces: t.trial_id for t in self.trials.values() if t.replaces is not None}
        for tid in sorted(self.trials):  # unfinished when the driver stopped: run them again
            trial = self.trials[tid]
            if trial.status in FINAL:
                continue
            if tid in replaced:  # its clone was made, but the driver stopped before it ended
                clone = self.trials[replaced[tid]]
                reason = (f"replaced by a clone of trial {(clone.lineage or {}).get('parent')} (trial "
                          f"{clone.trial_id}; the driver stopped before this trial ended)")
                self._end(trial, {"trial_id": tid, "status": "stopped", "metrics": trial.metrics,
                                  "stop_reason": reason})
                continue
            trial.status = "pending"
            (self.pending.appendleft if trial.is_clone else self.pending.append)(tid)
            if self.population and self.scheduler is not None and reports.get(tid):
                # PBT ranks unfinished trials by their latest value, waiting ones too
                self.scheduler.on_start(tid, trial.hparams, None)
                self.scheduler.on_report(tid, *reports[tid][-1])

    def _replay_clone(self, ev: dict[str, Any]) -> None:
        """A clone the journal records (``e: clone``): a trial that starts from its copied checkpoint."""
        lineage = {k: ev[k] for k in ("member", "parent", "cloned_step")}
        saved = {"step": ev["cloned_step"], "path": ev["path"]}
        self.trials[ev["id"]] = TrialState(ev["id"], ev["hparams"], lineage=lineage,
                                           replaces=ev.get("replaces"), checkpoints=[saved])
        self.next_clone = max(self.next_clone, ev["id"] + 1)
        self.replaced += 1

    # --------------------------------------------------------------- decisions
    def can_start(self) -> bool:
        """Whether another trial may start now (``concurrency`` bounds the trials in flight)."""
        return self.concurrency is None or self.running < self.concurrency

    @property
    def prefetch(self) -> bool:
        """Whether a busy worker may be handed its next trial: only when suggestions do not depend
        on results (a learning optimizer would propose it knowing less)."""
        return not getattr(self.optimizer, "adaptive", True) and not self.population

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
        if not self.population:  # queued again (a retry) first, then a new suggestion
            return self._take(self.pending[0]) if self.pending else self._suggest()
        # a population keeps step: the least advanced first (a new member is at the start)
        # (on a tie, the older trial: a clone waits for the paused parent it shares a checkpoint with)
        behind = min(self.pending, key=lambda t: (self._progress(t), t), default=None)
        if behind is not None and self._progress(behind) < 0:
            return self._take(behind)
        return self._suggest() or (self._take(behind) if behind is not None else None)

    def _progress(self, trial_id: int) -> int:
        """The step a queued trial resumes after: its newest checkpoint's (-1: none, from the start)."""
        saved = self.trials[trial_id].checkpoints
        return saved[-1]["step"] if saved else -1

    def _waiting(self) -> bool:
        """Whether queued trials outnumber the slots free now or soon (those of trials told to stop)."""
        free = max(self.concurrency - self.running, 0) if self.concurrency is not None else 0
        return self.unstarted() > free + len(self.pausing) + len(self.leaving)

    def _take(self, trial_id: int) -> TrialState:
        self.pending.remove(trial_id)
        self.paused.discard(trial_id)
        return self.trials[trial_id]

    def _suggest(self) -> TrialState | None:
        if self.exhausted or self.next_number >= self.planned:
            return None
        if self.suggester is None:
            hparams = self.optimizer.suggest(self.next_number)
        else:
            hparams = self.suggester.suggest(self.next_number)
        if hparams is None:
            self.exhausted = True
            return None
        if self.suggester is not None and self.next_number + 1 < self.planned and self.abort_error is None:
            self.suggester.prefetch(self.next_number + 1)  # computed while the workers are busy
        spec = self.trial_spec(self.next_number) if self.trial_spec is not None else {}
        trial = TrialState(self.next_number, hparams, spec=spec,
                           lineage={"member": self.next_number} if self.population else None)
        self.trials[trial.trial_id] = trial
        self.next_number += 1
        return trial

    def suggest_ahead(self) -> None:
        """Compute a learning optimizer's suggestions on a background thread, one ahead of the trials
        taken (:mod:`unison.driver.suggester`); :meth:`close_suggester` ends it. Off for an optimizer
        that does not learn (its trials are handed out ahead instead: :attr:`prefetch`), for PBT, and for
        one trial at a time (a sequential search: each suggestion knows every result before it)."""
        sequential = self.concurrency is not None and self.concurrency <= 1
        if (self.suggester is None and getattr(self.optimizer, "adaptive", True) and not self.population
                and not sequential):
            from unison.driver.suggester import Suggester

            self.suggester = Suggester(self.optimizer)

    def close_suggester(self) -> BaseException | None:
        """End the background suggestions (a suggestion computed ahead and not taken is dropped);
        return the error the optimizer's last ``observe`` raised, if nothing raised it yet."""
        suggester, self.suggester = self.suggester, None
        return None if suggester is None else suggester.close()

    def close_optimizer(self) -> BaseException | None:
        """The experiment is over: end the background suggestions and :meth:`Optimizer.close` the
        optimizer (its process, if it has one), once; return the error either left (a last ``observe``'s)."""
        error = self.close_suggester()
        if not self.optimizer_closed:
            self.optimizer_closed = True
            try:
                self.optimizer.close()
            except Exception as exc:  # noqa: BLE001 - the caller raises it, unless another error ended the run
                error = error or exc
        return error

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
              pid: int | None = None, ranks: list[dict[str, Any]] | None = None,
              node: str | None = None, gpus: list[str] | None = None) -> dict[str, Any]:
        """Record that ``trial`` starts on ``worker`` (process ``pid`` on ``host``, cluster node ``node``
        if the worker named one, with the GPUs ``gpus`` its backend gave it); return the message that
        describes it. A distributed trial names its ranks' workers, hosts, pids and GPUs in ``ranks``
        (``worker``, ``host``, ``pid``, ``node`` are then rank 0's, the workers joined by commas;
        ``gpus`` every rank's, in rank order)."""
        self.reserved.discard(trial.trial_id)
        trial.status, trial.worker, trial.host, trial.pid = "running", worker, host, pid
        trial.node, trial.gpus = node, list(gpus) if gpus else None
        trial.started_at = time.monotonic()
        self.running += 1
        message = self.message(trial)
        trial.ran = True
        resumed = message["checkpoint"].get("step")
        self.store.append(
            {"e": "start", "id": trial.trial_id, "hparams": trial.hparams, "attempt": trial.attempt,
             "worker": worker, "host": host, "pid": pid, "t": time.time(),
             **({"node": node} if node is not None else {}), **({"gpus": trial.gpus} if trial.gpus else {}),
             **({"spec": trial.spec} if trial.spec else {}), **({"ranks": ranks} if ranks else {}),
             **({"lineage": trial.lineage} if trial.lineage else {}),
             **({"resumed_from": resumed} if resumed is not None else {})}
        )
        if self.scheduler is not None:
            self.scheduler.on_start(trial.trial_id, trial.hparams, resumed)
        return message

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
        checkpoint still on disk, as a path on the driver's disk (a URL with ``checkpoint_storage=``) and
        never its bytes. With ``checkpoint_storage=``, ``root``: the folder the worker writes them into."""
        spec: dict[str, Any] = {"keep": self.search.keep_checkpoints, "mode": self.search.modes[0],
                                "metric": None if len(self.search.metrics) > 1 else self.search.metrics[0]}
        saved = self._newest_checkpoint(trial)  # a worker orphaned by a driver crash may have pruned some
        if saved is not None:
            spec.update(path=self.checkpoint_location(saved["path"]), step=saved["step"])
        shared = self._shared_trial_folder(trial.trial_id)
        if shared is not None:
            spec["root"] = join(shared, "checkpoints")
        return spec

    def checkpoint_location(self, path: str) -> str:
        """A journaled checkpoint ``path`` as a full location: relative ones are under the experiment;
        those on ``checkpoint_storage=`` are journaled whole (an absolute path, or a URL)."""
        return path if "://" in path else str(self.store.path / path)

    def _shared_trial_folder(self, trial_id: int) -> str | None:
        """With ``checkpoint_storage=``, trial ``trial_id``'s folder there:
        ``<storage>/<the experiment's folder name>/trials/0007``; else ``None``."""
        if self.checkpoint_storage is None:
            return None
        trial = self.store.trial_dir(trial_id).relative_to(self.store.path).as_posix()
        return join(self.checkpoint_storage, self.store.path.name, *trial.split("/"))

    def report(self, trial_id: int, step: int, metrics: dict[str, float],
               checkpoint: dict[str, Any] | None = None) -> str | None:
        """Record an intermediate report (and the checkpoint saved with it: ``{"step", "path", "size"}``,
        ``path`` relative to the trial folder); return ``None`` to continue or the reason to stop.

        Raises :class:`unison.MetricNotReported` if this is the experiment's first report and it lacks
        a metric the search optimizes (the trial then fails with ``error_kind: missing_metric``)."""
        self.store.append({"e": "report", "id": trial_id, "step": step, "metrics": metrics, "t": time.time()})
        if trial_id in self.trials:
            self.trials[trial_id].reported += 1
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
        if isinstance(decision, (Exploit, Pause)) and checkpoint is None:
            # PBT acts where the trial saved its state: a clone or a paused trial resumes from the
            # newest checkpoint, and deciding again before the next one would redo the same steps forever
            return None
        if isinstance(decision, Exploit):
            if not self._clone(self.trials[trial_id], decision):
                return None
            self.leaving.add(trial_id)
        if isinstance(decision, Pause):
            self.pausing.add(trial_id)
        return decision.reason or f"stopped by the scheduler at step {step}"

    def _clone(self, trial: TrialState, decision: Exploit) -> bool:
        """Queue a clone of ``decision.source`` in ``trial``'s place, first, its first checkpoint a copy
        of the source's newest; ``False`` (``trial`` goes on) when the source has none on disk."""
        source = self.trials.get(decision.source)
        saved = self._newest_checkpoint(source) if source is not None else None
        if saved is None:
            self._warn_no_checkpoint(decision.source)
            return False
        clone_id = self.next_clone
        try:
            path = self._copy_checkpoint(saved["path"], clone_id)
        except OSError as exc:  # e.g. the source's worker pruned it meanwhile, or the disk is full
            import warnings

            warnings.warn(f"PBT could not copy trial {decision.source}'s checkpoint for a clone ({exc}): "
                          f"trial {trial.trial_id} goes on", stacklevel=2)
            return False
        self.next_clone += 1
        member = (trial.lineage or {}).get("member", trial.trial_id)
        lineage = {"member": member, "parent": decision.source, "cloned_step": saved["step"]}
        self.store.append({"e": "clone", "id": clone_id, "hparams": decision.hparams, **lineage,
                           "replaces": trial.trial_id, "path": path, "t": time.time()})
        self.trials[clone_id] = TrialState(clone_id, dict(decision.hparams), lineage=lineage,
                                           replaces=trial.trial_id,
                                           checkpoints=[{"step": saved["step"], "path": path}])
        self.pending.appendleft(clone_id)
        self.replaced += 1
        return True

    def _copy_checkpoint(self, path: str, trial_id: int) -> str:
        """Copy the journaled checkpoint ``path`` into trial ``trial_id``'s checkpoints (on the shared
        storage with ``checkpoint_storage=``); the copy's path as journaled."""
        from unison.worker.checkpoints import FOLDER, copy_checkpoint, copy_checkpoint_url

        source, shared = self.checkpoint_location(path), self._shared_trial_folder(trial_id)
        if shared is None:  # a clone id is new: anything in its folder is a copy a crash left unjournaled
            shutil.rmtree(self.store.trial_dir(trial_id) / FOLDER, ignore_errors=True)
            copied = copy_checkpoint(Path(source), self.store.trial_dir(trial_id) / FOLDER)
            return copied.relative_to(self.store.path).as_posix()
        if is_url(shared):
            return copy_checkpoint_url(source, join(shared, FOLDER))
        return str(copy_checkpoint(Path(source), Path(shared) / FOLDER))

    def _newest_checkpoint(self, trial: TrialState) -> dict[str, Any] | None:
        """``trial``'s newest journaled checkpoint still on disk (its worker prunes older ones); if none
        is, the newest whole one in its folder (saved, and the older pruned, by a worker that died before
        its report reached the journal)."""
        for saved in reversed(trial.checkpoints):
            if is_file(join(self.checkpoint_location(saved["path"]), "meta.json")):
                return saved
        if self.checkpoint_storage is not None or not trial.ran:  # never started: its folder holds none
            return None
        from unison.worker.checkpoints import FOLDER, newest_on_disk

        folder = self.store.trial_dir(trial.trial_id) / FOLDER
        found = newest_on_disk(folder)
        if found is None:
            return None
        return {"step": found[0], "path": found[1].relative_to(self.store.path).as_posix()}

    def _warn_no_checkpoint(self, source: int) -> None:
        if self.warned_no_checkpoint:
            return
        self.warned_no_checkpoint = True
        import warnings

        warnings.warn(f"population-based training needs trial {source}'s checkpoint to clone it or to "
                      f"run it again later, but it saved none: it goes on as it is. Save one with each "
                      f"report (reporter.report(step=..., checkpoint=state, ...)) and resume from "
                      f"ctx.checkpoint", stacklevel=2)

    def _record_checkpoint(self, trial_id: int, checkpoint: dict[str, Any]) -> None:
        """Journal a checkpoint a report saved (its folder is on disk already): relative to the experiment,
        or its full location on ``checkpoint_storage=`` (``checkpoint["path"]``, ``checkpoints/step-<n>``
        as the protocol allows, is joined with the folder the trial message named)."""
        shared = self._shared_trial_folder(trial_id)
        if shared is not None:
            path = join(shared, *checkpoint["path"].split("/"))
        else:
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
        self.leaving.discard(trial.trial_id)
        if trial.trial_id in self.pausing:
            self.pausing.discard(trial.trial_id)
            if outcome["status"] == "stopped":  # as told: it runs again later from its checkpoint
                self._pause(trial, outcome)
                return
        self._end(trial, outcome)

    def _pause(self, trial: TrialState, outcome: dict[str, Any]) -> None:
        self.store.append({"e": "pause", "id": trial.trial_id, "step": outcome.get("last_step"),
                           "reason": outcome.get("stop_reason"), "t": time.time()})
        trial.status = "pending"
        trial.last_step = outcome["last_step"] if outcome.get("last_step") is not None else trial.last_step
        trial.turns += 1
        self.pending.append(trial.trial_id)
        self.paused.add(trial.trial_id)

    def _end(self, trial: TrialState, outcome: dict[str, Any]) -> None:
        event = {
            "e": "end", "id": trial.trial_id, "status": outcome["status"],
            "metrics": outcome.get("metrics") or {}, "error": outcome.get("error"),
            "duration": outcome.get("duration"), "steps": outcome.get("steps", 0),
            "last_step": outcome.get("last_step"), "stop_reason": outcome.get("stop_reason"),
            "worker": trial.worker,
        }
        if trial.turns:  # it ran in turns: its steps are all its turns', not the last one's
            event.update(steps=trial.reported, last_step=event["last_step"] if event["last_step"] is not None
                         else trial.last_step)
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
        self.pausing.discard(trial_id)
        if trial_id in self.leaving:  # its clone goes on in its place: it is not run again
            self.leaving.discard(trial_id)
            self._end(trial, {"trial_id": trial_id, "status": "stopped", "metrics": trial.metrics,
                              "stop_reason": f"replaced by a clone; then {reason}"})
            return
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
        self.pausing.discard(trial_id)
        self.leaving.discard(trial_id)
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
        if not trial.is_clone:  # the optimizer suggested it (a clone is PBT's)
            observe = self.optimizer.observe if self.suggester is None else self.suggester.observe
            observe(trial.trial_id, trial.hparams, trial.value, trial.status)
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
            "replaced": self.replaced,
            "running": self.running,
            "best": None if self.best is None else self.best.value,
            "elapsed": time.monotonic() - self.started_at,
        }
