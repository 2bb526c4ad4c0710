"""The experiment loops: feed a :class:`SearchDriver` trials from in-process calls or from workers.

:class:`RemoteLoop` handles one event at a time: each kind of message a worker sends has its method
(``_on_<kind>``). Distributed trials (``workers_per_trial`` > 1) are dispatched as gangs of workers
by :class:`unison.driver.gangs.GangDispatch`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from unison import trialfiles
from unison.backends.base import Backend
from unison.driver.checkpoint_inbox import CheckpointInbox, send_checkpoint
from unison.driver.driver import SearchDriver, TrialState
from unison.driver.gangs import GangDispatch
from unison.driver.server import CLOSED, MALFORMED, Event, Peer, Server
from unison.errors import MetricNotReported, WorkerError
from unison.launch import LaunchSpec
from unison.protocol import (
    ABORT,
    CHECKPOINT_CHUNK,
    DECISION,
    FATAL,
    FILES,
    HELLO,
    RANK_FAILED,
    READY,
    REPORT,
    SHUTDOWN,
    TRIAL,
    AbortMessage,
    CheckpointChunkMessage,
    DecisionMessage,
    FatalMessage,
    FilesMessage,
    RankFailedMessage,
    ReadyMessage,
    ReportMessage,
    TrialOutcome,
    new_secret,
    trial_message,
)
from unison.worker.checkpoint_ship import CHECKPOINT_LIMIT_MB
from unison.worker.checkpoints import Policy
from unison.worker.runtime import TrialRunner

TICK_S = 0.1
LINGER_S = 3.0  # after the last trial: how long to wait for ranks still sending their logs


def run_inline(driver: SearchDriver, runner: TrialRunner, progress: Any) -> None:
    """Run the trials one after another in this thread.

    Up to ``driver.concurrency`` trials are started (suggested) before the oldest one runs and
    reports, which reproduces in one process, deterministically, what asynchronous workers see:
    suggestions made while other trials are still in flight.
    """
    window: deque[tuple[Any, dict[str, Any]]] = deque()
    while not driver.finished:
        while (trial := driver.next_trial()) is not None:
            window.append((trial, driver.start(trial, "inline", socket.gethostname(), os.getpid())))
        if not window:
            break
        trial, message = window.popleft()

        timer = _InlineTimer(driver.search.trial_timeout_s)

        def decide(step: int, metrics: dict[str, float], checkpoint: dict[str, Any] | None = None,
                   _id: int = trial.trial_id, _timer: _InlineTimer = timer) -> str | None:
            with _timer.paused():  # never interrupt the driver's own journal writes
                return driver.report(_id, step, metrics, checkpoint)

        saved, outcome = (sys.stdout, sys.stderr), None
        trial.started_at = time.monotonic()
        try:
            with timer:
                outcome = runner.run(message, decide)
        except TrialTimeout:  # the alarm came during the runner's own setup or cleanup
            sys.stdout, sys.stderr = saved
        if timer.fired or outcome is None:  # where it was interrupted is in its stderr.log
            driver.time_out(trial.trial_id)
        else:
            driver.finish(outcome)
        progress.update(driver.summary())


def _inbox(driver: SearchDriver, backend: Backend) -> CheckpointInbox:
    """Where the checkpoints shipped by ``backend``'s workers arrive, within its per-trial limit."""
    mb = getattr(backend, "checkpoint_limit_mb", CHECKPOINT_LIMIT_MB)
    name = f"{type(backend).__name__}(checkpoint_limit_mb={mb:g})"
    return CheckpointInbox(driver.store, int(mb * 1024 * 1024), name)


class TrialTimeout(BaseException):
    """Raised inside an inline trial that ran past ``trial_timeout_s`` (a ``BaseException``, so an
    ``except Exception`` in the function does not swallow it)."""


class _InlineTimer:
    """``trial_timeout_s`` for a trial run in this thread: ``SIGALRM`` raises :class:`TrialTimeout`
    in the function (again every second if the function swallows it). Only the main thread receives
    signals, so elsewhere (and without ``signal.setitimer``) the limit is not enforced, with a warning."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.fired = False
        self._armed = self._due = False
        self._old: Any = None
        self._usable = (seconds is not None and hasattr(signal, "setitimer")
                        and threading.current_thread() is threading.main_thread())
        if seconds is not None and not self._usable:
            warnings.warn(f"trial_timeout_s={seconds} is not enforced by the inline backend outside the "
                          f"main thread: use backend='local' to bound each trial", stacklevel=3)

    def __enter__(self) -> _InlineTimer:
        if self._usable:
            self._old = signal.signal(signal.SIGALRM, self._on_alarm)
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds or 0.0, 1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._usable:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old if self._old is not None else signal.SIG_DFL)

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._fire()
        else:
            self._due = True

    def _fire(self) -> None:
        self.fired, self._due = True, False
        raise TrialTimeout(f"the trial ran longer than trial_timeout_s={self.seconds}")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No alarm inside this block; one that came meanwhile is raised when it ends."""
        armed, self._armed = self._armed, False
        try:
            yield
        finally:
            self._armed = armed
            if armed and self._due:
                self._fire()


class RemoteLoop:
    """Serves trials to workers started by a backend, one event at a time."""

    def __init__(self, driver: SearchDriver, backend: Backend, payload_path: Path, log_dir: Path,
                 progress: Any, workers_per_trial: int = 1, dist_options: dict[str, Any] | None = None,
                 barrier: bool = False) -> None:
        """``workers_per_trial`` > 1 runs every trial as that many ranks (``dist_options``: the
        process group's ``process_group``, ``timeout_s``, ``strategy``); ``barrier`` asks the backend
        to start all workers at once as one gang (Spark: a barrier stage)."""
        self.driver, self.backend, self.progress = driver, backend, progress
        self.payload_path, self.log_dir = payload_path, log_dir
        self.waiting: deque[Peer] = deque()
        self.peers: dict[int, Peer] = {}
        self.k = workers_per_trial
        self.dist_options = dict(dist_options or {})
        self.barrier = barrier
        self.aborting: set[int] = set()  # aborted peers whose saved files (or end) may still come
        self.gangs = GangDispatch(self, workers_per_trial, self.dist_options)
        # Heartbeats need no handler: the server noted when the peer was last seen.
        self._handlers: dict[str, Callable[[Peer, Any], None]] = {
            HELLO: self._on_hello, READY: self._on_ready, REPORT: self._on_report,
            RANK_FAILED: self._on_rank_failed, FILES: self._on_files, FATAL: self._on_fatal,
            CHECKPOINT_CHUNK: self._on_checkpoint_chunk,
        }
        # Workers without the driver's disk ship their checkpoints (and are shipped those they resume from)
        self.inbox = None if backend.shared_filesystem else _inbox(driver, backend)

    def run(self, workers: int) -> None:
        """Have the backend start ``workers`` workers and serve them trials until the experiment is
        over; then shut them down."""
        server = Server(new_secret(), host=self.backend.listen_host, port=self.backend.listen_port)
        self.server = server
        self.driver.suggest_ahead()  # a learning optimizer's next suggestion: computed while workers are busy
        try:
            self.backend.start(LaunchSpec(server.address, server.secret, self.payload_path, self.log_dir,
                                          workers, self.driver.store.path.name, barrier=self.barrier))
            next_tick = 0.0
            while not self.driver.finished:
                if self.driver.suggester is not None:  # all answered: the next suggestion may start now
                    self.driver.suggester.release()
                try:
                    event = server.events.get(timeout=TICK_S)
                except queue.Empty:
                    event = None
                if event is not None:
                    self._handle(event)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_S
                    self._tick(now)
            self._linger(server)
        finally:
            for peer in list(self.peers.values()):
                try:
                    peer.conn.send({"t": SHUTDOWN})
                except OSError:
                    pass
            # Close before stopping: a worker that connected too late to be greeted (or to be sent
            # SHUTDOWN) then sees its connection end and exits instead of waiting to be killed.
            server.close()
            try:
                self.backend.stop(force=self.driver.abort_error is not None or not self.driver.finished)
            finally:
                if self.inbox is not None:
                    self.inbox.close()
                # After the workers' stop, which need not wait for a suggestion being computed ahead
                late_error = self.driver.close_suggester()
        if late_error is not None:  # the optimizer failed on the last result: as it would on any other
            raise late_error

    def _tick(self, now: float) -> None:
        self._check_heartbeats(now)
        self._check_timeouts(now)
        self.gangs.tick(now)  # a rank's failure held for a peer's death to show
        self.backend.poll()
        self.progress.update(self.driver.summary())

    def _linger(self, server: Server) -> None:
        """The experiment is over, but ranks of a failed trial may still be sending what they logged
        (the failed rank's outcome, an aborted rank's files): take those for up to LINGER_S."""
        deadline = time.monotonic() + LINGER_S
        while (self.gangs or self.aborting) and time.monotonic() < deadline:
            try:
                event = server.events.get(timeout=TICK_S)
            except queue.Empty:
                continue
            self._handle(event)

    # ------------------------------------------------------------------ events
    def _handle(self, event: Event) -> None:
        peer = event.peer
        if event.kind == CLOSED and self.inbox is not None:
            self.inbox.forget_peer(peer.peer_id)  # a checkpoint it was shipping
        if event.kind == MALFORMED:  # the server drops the peer next; its CLOSED event handles its trial
            self._log_drop(peer, (event.message or {}).get("error"))
        elif peer.aborted:
            self._on_aborted_peer(peer, event)
        elif event.kind == CLOSED:
            self._on_closed(peer)
        else:
            message = event.message or {}
            handler = self._handlers.get(message.get("t", ""))
            if handler is not None:
                handler(peer, message)

    def _on_aborted_peer(self, peer: Peer, event: Event) -> None:
        """An event of a peer told to end itself: only the files it saves, and its end, still matter."""
        if event.kind == CLOSED:
            self.peers.pop(peer.peer_id, None)
            self.aborting.discard(peer.peer_id)
        elif event.message is not None and event.message.get("t") == FILES:
            self.write_files(event.message["trial_id"], event.message["files"])
            self.aborting.discard(peer.peer_id)

    def _log_drop(self, peer: Peer, error: Any) -> None:
        """Note in ``peer``'s log that its connection was dropped after a malformed message."""
        self._log_note(peer, f"dropped the connection of {peer.name} (peer {peer.peer_id}, pid "
                             f"{peer.info.get('pid')}) after a malformed message: {error}")

    def _log_note(self, peer: Peer, text: str) -> None:
        """Append ``text`` to ``peer``'s log in the experiment's ``workers`` folder."""
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"{peer.name}.log", "a", encoding="utf-8") as log:
                log.write(f"\nunison driver: {text}\n")
        except (OSError, ValueError):
            pass

    def _drop(self, peer: Peer, error: str) -> None:
        """Drop ``peer`` for a message that contradicts what the driver knows of it (its CLOSED event
        then treats the trial it runs as lost)."""
        self._log_drop(peer, error)
        peer.conn.close()

    def _on_closed(self, peer: Peer) -> None:
        self.peers.pop(peer.peer_id, None)
        if peer in self.waiting:
            self.waiting.remove(peer)
        if peer.reserved_id is not None:
            self.driver.unreserve(peer.reserved_id)
            peer.reserved_id = None
        gang = self.gangs.of(peer)
        if gang is not None:
            self.gangs.rank_lost(gang, peer)
            self.dispatch_waiting()
        elif peer.trial_id is not None:
            self.driver.lose(peer.trial_id, self._death(peer))
            peer.trial_id = None
            self.dispatch_waiting()

    def _on_hello(self, peer: Peer, message: dict[str, Any]) -> None:
        """A :class:`HelloMessage`, kept as the peer's ``info``."""
        peer.info = message
        self.peers[peer.peer_id] = peer
        self.backend.worker_connected(message)

    def _on_ready(self, peer: Peer, message: ReadyMessage) -> None:
        if "port" in message:
            peer.endpoint = {"address": message.get("address"), "port": message["port"],
                             "gpus": message.get("gpus", 0)}
        if "result" in message:
            result = message["result"]
            if peer.trial_id not in (None, result["trial_id"]):
                self._drop(peer, f"ready message: 'result'['trial_id'] is {result['trial_id']}, but the "
                                 f"worker is running trial {peer.trial_id}")
                return
            if peer.trial_id is not None:
                gang = self.gangs.of(peer)
                if gang is not None:
                    self.gangs.rank_finished(gang, peer, result)
                else:
                    self._finish(peer, result)
        if peer.reserved_id is not None:  # the worker has gone on to the trial it held
            self._start(peer, self.driver.trials[peer.reserved_id])
            peer.reserved_id = None
        self._dispatch(peer)
        self.dispatch_waiting()

    def _on_report(self, peer: Peer, message: ReportMessage) -> None:
        trial = self.driver.trials.get(message["trial_id"])
        if trial is not None and trial.status == "running" and trial.trial_id != peer.trial_id:
            self._drop(peer, f"report message: 'trial_id' is {trial.trial_id}, a trial this worker does not "
                             f"run (it runs {peer.trial_id})")
            return
        stop: str | None
        if trial is None or trial.status != "running":  # e.g. another rank failed meanwhile
            stop = "the trial already ended"
            if self.inbox is not None:
                self.inbox.discard(message["trial_id"], peer.peer_id)
        else:
            checkpoint = cast(dict[str, Any] | None, message.get("checkpoint"))
            refused = self._commit_shipped(peer, trial, checkpoint)
            if refused is not None:  # the worker's reporter raises it in the function: the trial fails
                self._decide(peer, message, DecisionMessage(t=DECISION, stop=None, fail=refused))
                return
            try:
                stop = self.driver.report(message["trial_id"], message["step"], message["metrics"],
                                          checkpoint)
            except MetricNotReported as exc:  # the worker's reporter raises it in the function
                self._decide(peer, message, DecisionMessage(t=DECISION, stop=None, error=str(exc)))
                return
        self._decide(peer, message, DecisionMessage(t=DECISION, stop=stop))

    def _decide(self, peer: Peer, report: ReportMessage, decision: DecisionMessage) -> None:
        """Answer ``report``; saying whether any report is judged (without a scheduler none is: the
        worker then sends the next ones without waiting). A report that did not wait is answered only
        when there is something to say, naming its trial (the worker reads it at its next report)."""
        if report.get("wait", True):
            decision["judged"] = self.driver.scheduler is not None
        elif decision["stop"] is None and not decision.get("error") and not decision.get("fail"):
            return
        else:
            decision["trial_id"] = report["trial_id"]
        self.send(peer, decision)

    def _commit_shipped(self, peer: Peer, trial: TrialState, checkpoint: dict[str, Any] | None) -> str | None:
        """Put into place the checkpoint a report names whose files ``peer`` shipped just before it (before
        the report journals it); why it is refused, if it is (the report is then not recorded)."""
        if checkpoint is None or "shipped" not in checkpoint or self.inbox is None:
            return None  # none, or written by the worker itself (the driver's disk, checkpoint_storage=)
        policy = Policy.from_message(self.driver.checkpoint_spec(trial))
        return self.inbox.commit(peer.peer_id, trial.trial_id, checkpoint, policy)

    def _on_checkpoint_chunk(self, peer: Peer, message: CheckpointChunkMessage) -> None:
        """Part of a checkpoint the trial ``peer`` runs is saving (its report follows)."""
        if self.inbox is None or message["trial_id"] != peer.trial_id:
            why = ("workers of this backend share the driver's disk" if self.inbox is None
                   else f"it runs {peer.trial_id}")
            self._drop(peer, f"checkpoint_chunk message: 'trial_id' is {message['trial_id']}, but {why}")
            return
        ack = self.inbox.chunk(peer.peer_id, message)
        if ack is not None:
            self.send(peer, ack)

    def _on_rank_failed(self, peer: Peer, message: RankFailedMessage) -> None:
        gang = self.gangs.of(peer)
        if gang is not None:
            self.gangs.rank_failed(gang, peer, message["trial_id"], message["error"])

    def _on_files(self, peer: Peer, message: FilesMessage) -> None:
        self.write_files(message["trial_id"], message["files"])

    def _on_fatal(self, peer: Peer, message: FatalMessage) -> None:
        self.driver.abort(WorkerError(f"worker {peer.name} could not load the training function:\n"
                                      f"{message['error']}"))

    def _finish(self, peer: Peer, outcome: TrialOutcome) -> None:
        """Record the result of the trial ``peer`` was running, with the files it shipped (workers
        that do not share the driver's disk send a trial's logs and small files in its result)."""
        if self.inbox is not None:
            self.inbox.discard(outcome["trial_id"], peer.peer_id)  # a checkpoint refused mid-way
        files = outcome.pop("files", None)
        if files:
            problem = self.write_files(outcome["trial_id"], files)
            if problem:
                outcome.setdefault("files_skipped", []).append(problem)
        self.driver.finish(cast(dict[str, Any], outcome))
        peer.trial_id = None

    def write_files(self, trial_id: int, files: dict[str, bytes]) -> str | None:
        """Write the files shipped for ``trial_id`` into its folder; what went wrong, if anything."""
        try:
            trialfiles.write(self.driver.store.trial_dir(trial_id), files)
        except (OSError, ValueError) as exc:
            return f"writing the shipped files failed: {exc}"
        return None

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, peer: Peer) -> None:
        if self.k > 1:
            if self.driver.finished:
                self.send(peer, {"t": SHUTDOWN})
            elif peer not in self.waiting:
                self.waiting.append(peer)
            return
        if peer.trial_id is None:
            trial = self.driver.next_trial()
            if trial is not None:
                self.send(peer, trial_message(self._start(peer, trial)))
            elif self.driver.finished:
                self.send(peer, {"t": SHUTDOWN})
            elif peer not in self.waiting:
                self.waiting.append(peer)
        if peer.trial_id is not None and self._may_reserve(peer):
            trial = self.driver.next_trial(reserve=True)
            if trial is not None:
                peer.reserved_id = trial.trial_id
                self.send(peer, trial_message(self.driver.reserve(trial)))

    def _start(self, peer: Peer, trial: TrialState) -> dict[str, Any]:
        peer.trial_id = trial.trial_id
        return self.driver.start(trial, peer.name, peer.info.get("host"), peer.info.get("pid"),
                                 node=peer.info.get("node"), gpus=peer.info.get("gpus"))

    def _may_reserve(self, peer: Peer) -> bool:
        """Whether to hand busy ``peer`` its next trial now, so it starts without a round trip to the
        driver. Not when the optimizer learns from results, nor while another worker is idle, nor near
        the end (the last trials go to whichever worker frees up first)."""
        return (peer.reserved_id is None and self.driver.prefetch and not self.waiting
                and self.driver.unstarted() > len(self.peers))

    def dispatch_waiting(self) -> None:
        """Give the idle workers trials (gangs of them start distributed trials); shut them all down
        once the experiment is over."""
        if self.k > 1:
            self.gangs.dispatch()
        else:
            while self.waiting and self.driver.can_start() and not self.driver.finished:
                peer = self.waiting.popleft()
                self._dispatch(peer)
                if peer.trial_id is None:
                    break
        if self.driver.finished:
            while self.waiting:
                self.send(self.waiting.popleft(), {"t": SHUTDOWN})

    def send(self, peer: Peer, message: Mapping[str, Any]) -> None:
        """Send ``message`` to ``peer``; if its connection is broken, close it. A ``trial`` message that
        resumes from a checkpoint goes after that checkpoint's files to a worker without the driver's disk."""
        try:
            if message.get("t") == TRIAL and self.inbox is not None:
                self._ship_resume(peer, cast(dict[str, Any], message))
            peer.conn.send(message)
        except OSError:
            peer.conn.close()  # its reader thread reports it closed; the trial is retried then

    def _ship_resume(self, peer: Peer, message: dict[str, Any]) -> None:
        """Send ``peer`` the checkpoint that the trial of ``message`` resumes from (a path on the driver's
        disk; not one in shared storage, ``root``); one that cannot be read is left out of ``message``."""
        spec = message.get("checkpoint") or {}
        if not spec.get("path") or spec.get("root"):
            return
        problem = send_checkpoint(peer.conn.send, message["trial_id"], spec["step"], Path(spec["path"]))
        if problem is not None:
            self._log_note(peer, f"trial {message['trial_id']} starts without its checkpoint: {problem}")
            message["checkpoint"] = {**spec, "path": None, "step": None}

    # ------------------------------------------------------------------ ticks
    def _check_timeouts(self, now: float) -> None:
        """End the trials running past ``trial_timeout_s``: record each (failed, or queued again with
        ``retry_on_timeout``) and end the processes of its workers, every rank of a distributed trial
        (the backend replaces them)."""
        overdue, trial_limit = self.driver.overdue(now), self.driver.search.trial_timeout_s
        for trial in overdue:
            self.gangs.timed_out(trial.trial_id)
            self.driver.time_out(trial.trial_id)
            reason = f"timeout: the trial ran longer than trial_timeout_s={trial_limit}"
            for peer in [p for p in self.peers.values() if p.trial_id == trial.trial_id and not p.aborted]:
                self._end_worker(peer, trial.trial_id, reason)
        if overdue:
            self.dispatch_waiting()

    def _end_worker(self, peer: Peer, trial_id: int, reason: str) -> None:
        """End ``peer``'s process, which runs ``trial_id``: killed by the backend where it can, else told
        to end itself (``abort``, as the other ranks of a failed distributed trial are)."""
        peer.trial_id = None
        if peer.reserved_id is not None:  # the trial it held for later goes to another worker
            self.driver.unreserve(peer.reserved_id)
            peer.reserved_id = None
        peer.aborted = True
        self.aborting.add(peer.peer_id)
        if peer in self.waiting:
            self.waiting.remove(peer)
        self.backend.worker_aborted(peer.info)
        if not self.backend.kill_worker(peer.info):
            self.send(peer, AbortMessage(t=ABORT, trial_id=trial_id, reason=reason))

    def _death(self, peer: Peer) -> str:
        """Why ``peer``'s trial was lost, with how its process ended where the backend can tell (it
        waits a moment for the process to be reaped: the connection closes as the process dies)."""
        ended = self.backend.worker_exit(peer.info, wait_s=0.5)
        if ended is None:
            return f"worker {peer.name} died or lost its connection while running the trial"
        how = f"was {ended}" if ended.startswith("killed") else f"exited with {ended}"
        return f"worker {peer.name} died while running the trial: its process {how}"

    def _check_heartbeats(self, now: float) -> None:
        """Drop the peers silent past ``heartbeat_timeout``, except those whose backend vouches that
        their process runs: a function holding the GIL in one long C call starves the heartbeat thread
        (one stuck for good is ended by ``trial_timeout_s``). Where the backend cannot tell (Spark),
        a trial that holds the GIL longer than ``heartbeat_timeout`` is lost and retried."""
        limit = self.backend.heartbeat_timeout
        for peer in list(self.peers.values()):
            if now - peer.last_seen > limit and self.backend.worker_alive(peer.info) is not True:
                peer.conn.close()
