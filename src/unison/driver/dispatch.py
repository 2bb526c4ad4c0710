"""The experiment loops: feed a :class:`SearchDriver` trials from in-process calls or from workers.

Distributed trials (``workers_per_trial`` = k > 1) are dispatched as gangs: a trial starts once k
workers are idle; each gets the trial message plus ``dist`` (its rank, the group's size, its local
rank among the gang's workers on its host, rank 0's address and free port for the rendezvous, the
process-group options). Only rank 0 reports. The trial ends when every rank has sent its outcome,
or at once when one rank fails (its ``rank_failed`` notice, its outcome, or its connection lost):
the ranks still running are then told to ``abort`` (they end their processes; the backend replaces
them).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unison import trialfiles
from unison.backends.base import Backend
from unison.driver.driver import SearchDriver
from unison.driver.server import Event, Peer, Server
from unison.errors import MetricNotReported, WorkerError
from unison.launch import LaunchSpec
from unison.protocol import new_secret
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

        def decide(step: int, metrics: dict[str, float], _id: int = trial.trial_id,
                   _timer: _InlineTimer = timer) -> str | None:
            with _timer.paused():  # never interrupt the driver's own journal writes
                return driver.report(_id, step, metrics)

        saved, outcome = (sys.stdout, sys.stderr), None
        trial.started_at = time.monotonic()
        try:
            with timer:
                outcome = runner.run(message, decide)
        except TrialTimeout:  # the alarm came during the runner's own setup or cleanup
            sys.stdout, sys.stderr = saved
        if timer.fired:  # where it was interrupted is in its stderr.log
            driver.time_out(trial.trial_id)
        else:
            driver.finish(outcome)
        progress.update(driver.summary())


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
            signal.setitimer(signal.ITIMER_REAL, self.seconds, 1.0)
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


@dataclass
class _Gang:
    """The workers running one distributed trial, by rank, and the outcomes they sent."""

    trial_id: int
    members: list[Peer]
    outcomes: dict[int, dict[str, Any]] = field(default_factory=dict)
    ended: bool = False

    def rank_of(self, peer: Peer) -> int:
        return next(i for i, member in enumerate(self.members) if member is peer)


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
        self.gangs: dict[int, _Gang] = {}
        self.aborting: set[int] = set()  # aborted peers whose saved files (or end) may still come

    def run(self, workers: int) -> None:
        server = Server(new_secret(), host=self.backend.listen_host, port=self.backend.listen_port)
        self.server = server
        try:
            self.backend.start(LaunchSpec(server.address, server.secret, self.payload_path, self.log_dir,
                                          workers, self.driver.store.path.name, barrier=self.barrier))
            next_tick = 0.0
            while not self.driver.finished:
                try:
                    event = server.events.get(timeout=TICK_S)
                except queue.Empty:
                    event = None
                if event is not None:
                    self._handle(event)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_S
                    self._check_heartbeats(now)
                    self._check_timeouts(now)
                    self.backend.poll()
                    self.progress.update(self.driver.summary())
            self._linger(server)
        finally:
            for peer in list(self.peers.values()):
                try:
                    peer.conn.send({"t": "shutdown"})
                except OSError:
                    pass
            # Close before stopping: a worker that connected too late to be greeted (or to be sent
            # "shutdown") then sees its connection end and exits instead of waiting to be killed.
            server.close()
            self.backend.stop(force=self.driver.abort_error is not None or not self.driver.finished)

    # ------------------------------------------------------------------ events
    def _handle(self, event: Event) -> None:
        peer, driver = event.peer, self.driver
        if event.kind == "malformed":  # the server drops the peer next; its "closed" event handles its trial
            error = (event.message or {}).get("error")
            try:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                with open(self.log_dir / f"{peer.name}.log", "a", encoding="utf-8") as log:
                    log.write(f"\nunison driver: dropped the connection of {peer.name} (peer {peer.peer_id}, "
                              f"pid {peer.info.get('pid')}) after a malformed message: {error}\n")
            except (OSError, ValueError):
                pass
            return
        if peer.aborted:  # told to end itself: only the files it saves still matter
            if event.kind == "closed":
                self.peers.pop(peer.peer_id, None)
                self.aborting.discard(peer.peer_id)
            elif (event.message or {}).get("t") == "files":
                self._write_files(event.message["trial_id"], event.message.get("files") or {})
                self.aborting.discard(peer.peer_id)
            return
        if event.kind == "closed":
            self.peers.pop(peer.peer_id, None)
            if peer in self.waiting:
                self.waiting.remove(peer)
            if peer.reserved_id is not None:
                driver.unreserve(peer.reserved_id)
                peer.reserved_id = None
            gang = self.gangs.get(peer.trial_id) if peer.trial_id is not None else None
            if gang is not None:
                self._rank_lost(gang, peer)
                self._dispatch_waiting()
            elif peer.trial_id is not None:
                driver.lose(peer.trial_id, self._death(peer))
                peer.trial_id = None
                self._dispatch_waiting()
            return
        message = event.message or {}
        kind = message.get("t")
        if kind == "ready":
            if "port" in message:
                peer.endpoint = {"address": message.get("address"), "port": message["port"],
                                 "gpus": message.get("gpus", 0)}
            if "result" in message and peer.trial_id not in (None, message["result"]["trial_id"]):
                self._handle(Event("malformed", peer, {
                    "error": f"ready message: 'result'['trial_id'] is {message['result']['trial_id']}, but "
                             f"the worker is running trial {peer.trial_id}"}))
                peer.conn.close()  # its "closed" event then treats the trial it runs as lost
                return
            if "result" in message and peer.trial_id is not None:
                gang = self.gangs.get(peer.trial_id)
                if gang is not None:
                    self._rank_finished(gang, peer, message["result"])
                else:
                    self._finish(peer, message["result"])
            if peer.reserved_id is not None:  # the worker has gone on to the trial it held
                self._start(peer, self.driver.trials[peer.reserved_id])
                peer.reserved_id = None
            self._dispatch(peer)
            self._dispatch_waiting()
        elif kind == "report":
            trial = driver.trials.get(message["trial_id"])
            if trial is not None and trial.status == "running" and trial.trial_id != peer.trial_id:
                self._handle(Event("malformed", peer, {
                    "error": f"report message: 'trial_id' is {trial.trial_id}, a trial this worker does not "
                             f"run (it runs {peer.trial_id})"}))
                peer.conn.close()  # its "closed" event then treats the trial it runs as lost
                return
            if trial is None or trial.status != "running":  # e.g. another rank failed meanwhile
                stop = "the trial already ended"
            else:
                try:
                    stop = driver.report(message["trial_id"], message["step"], message["metrics"])
                except MetricNotReported as exc:  # the worker's reporter raises it in the function
                    self._send(peer, {"t": "decision", "stop": None, "error": str(exc)})
                    return
            self._send(peer, {"t": "decision", "stop": stop})
        elif kind == "rank_failed":
            gang = self.gangs.get(peer.trial_id) if peer.trial_id is not None else None
            if gang is not None and not gang.ended and message.get("trial_id") == gang.trial_id:
                rank = gang.rank_of(peer)
                self._end_gang(gang, {"trial_id": gang.trial_id, "status": "failed",
                                      "error": self._rank_error(gang, rank, message.get("error"))},
                               spare=peer)
        elif kind == "files":
            self._write_files(message["trial_id"], message.get("files") or {})
        elif kind == "hello":
            peer.info = message
            self.peers[peer.peer_id] = peer
            self.backend.worker_connected(message)
        elif kind == "fatal":
            driver.abort(WorkerError(f"worker {peer.name} could not load the training function:\n"
                                     f"{message.get('error')}"))

    def _finish(self, peer: Peer, outcome: dict[str, Any]) -> None:
        """Record the result of the trial ``peer`` was running, with the files it shipped (workers
        that do not share the driver's disk send a trial's logs and small files in its result)."""
        files = outcome.pop("files", None)
        if files:
            problem = self._write_files(peer.trial_id, files)
            if problem:
                outcome.setdefault("files_skipped", []).append(problem)
        self.driver.finish(outcome)
        peer.trial_id = None

    def _write_files(self, trial_id: int, files: dict[str, bytes]) -> str | None:
        try:
            trialfiles.write(self.driver.store.trial_dir(trial_id), files)
        except (OSError, ValueError) as exc:
            return f"writing the shipped files failed: {exc}"
        return None

    # ------------------------------------------------------------- distributed trials
    def _dispatch_gangs(self) -> None:
        """Start distributed trials while ``k`` workers are idle."""
        driver = self.driver
        while len(self.waiting) >= self.k and driver.can_start() and not driver.finished:
            trial = driver.next_trial()
            if trial is None:
                break
            members = [self.waiting.popleft() for _ in range(self.k)]
            # Ranks on one host get consecutive numbers (local ranks 0, 1, ...), rank 0's host first.
            hosts = list(dict.fromkeys(str(m.info.get("host")) for m in members))
            members.sort(key=lambda m: (hosts.index(str(m.info.get("host"))), m.peer_id))
            self._start_gang(trial, members)
        if driver.finished:
            while self.waiting:
                self._send(self.waiting.popleft(), {"t": "shutdown"})

    def _start_gang(self, trial: Any, members: list[Peer]) -> None:
        gang = _Gang(trial.trial_id, members)
        self.gangs[trial.trial_id] = gang
        ranks = [{"worker": m.name, "host": m.info.get("host"), "pid": m.info.get("pid")} for m in members]
        chief = members[0]
        message = self.driver.start(trial, ",".join(m.name for m in members), chief.info.get("host"),
                                    chief.info.get("pid"), ranks=ranks)
        backend = self.dist_options.get("process_group") or (
            "nccl" if all(m.endpoint.get("gpus") for m in members) else "gloo")
        hosts = [m.info.get("host") for m in members]
        peers = [f"{m.endpoint.get('address')}:{m.endpoint.get('port')}" for m in members]
        for rank, member in enumerate(members):
            member.trial_id = trial.trial_id
            dist = {
                "rank": rank, "world_size": len(members),
                "local_rank": hosts[:rank].count(hosts[rank]), "local_world_size": hosts.count(hosts[rank]),
                "master_addr": chief.endpoint.get("address"), "master_port": chief.endpoint.get("port"),
                "address": member.endpoint.get("address"), "backend": backend,
                "timeout_s": self.dist_options.get("timeout_s"),
                "strategy": self.dist_options.get("strategy"), "peers": peers,
                "framework": self.dist_options.get("framework", "torch"),
            }
            self._send(member, {"t": "trial", **message, "dist": dist})

    def _rank_error(self, gang: _Gang, rank: int, error: Any) -> str:
        member = gang.members[rank]
        where = f"{member.name} on {member.info.get('host')}, pid {member.info.get('pid')}"
        return f"rank {rank} of {len(gang.members)} ({where}) failed:\n{error}"

    def _rank_finished(self, gang: _Gang, peer: Peer, outcome: dict[str, Any]) -> None:
        """One rank's outcome: a failure ends the trial at once; otherwise it ends with rank 0's
        outcome once every rank has sent one."""
        rank = gang.rank_of(peer)
        files = outcome.pop("files", None)
        problem = self._write_files(gang.trial_id, files) if files else None
        if problem:
            outcome.setdefault("files_skipped", []).append(problem)
        gang.outcomes[rank] = outcome
        peer.trial_id = None
        if not gang.ended:
            if outcome.get("status") == "failed":
                failed = {**outcome, "error": self._rank_error(gang, rank, outcome.get("error"))}
                if rank != 0:
                    failed["metrics"] = (gang.outcomes.get(0) or {}).get("metrics") or {}
                    failed.pop("error_kind", None)
                self._end_gang(gang, failed)
            elif len(gang.outcomes) == len(gang.members):
                chief = dict(gang.outcomes[0])
                skipped = [s for o in gang.outcomes.values() for s in o.get("files_skipped") or ()]
                if skipped:
                    chief["files_skipped"] = skipped
                self._end_gang(gang, chief)
        self._forget_if_done(gang)

    def _rank_lost(self, gang: _Gang, peer: Peer) -> None:
        """A rank's worker died or went silent: the trial is lost (retried or failed), the others abort."""
        rank = gang.rank_of(peer)
        peer.trial_id = None
        gang.outcomes[rank] = {"status": "lost"}
        if not gang.ended:
            gang.ended = True
            self.driver.lose(gang.trial_id, f"rank {rank} of {len(gang.members)} ({peer.name}) died or lost "
                                            f"its connection while running the trial")
            self._abort_others(gang, f"rank {rank} died")
        self._forget_if_done(gang)

    def _end_gang(self, gang: _Gang, outcome: dict[str, Any], spare: Peer | None = None) -> None:
        """Record the trial's outcome; abort the ranks still running (except ``spare``, which failed and
        sends its own outcome once it has cleaned up)."""
        gang.ended = True
        self.driver.finish(outcome)
        error = str(outcome.get("error") or "another rank failed")
        reason = "the trial ended" if outcome.get("status") != "failed" else error.splitlines()[0]
        self._abort_others(gang, reason, spare)
        self._dispatch_waiting()

    def _abort_others(self, gang: _Gang, reason: str, spare: Peer | None = None) -> None:
        for rank, member in enumerate(gang.members):
            if rank in gang.outcomes or member is spare or member.trial_id != gang.trial_id:
                continue
            gang.outcomes[rank] = {"status": "aborted"}
            member.trial_id = None
            member.aborted = True
            self.aborting.add(member.peer_id)
            if member in self.waiting:
                self.waiting.remove(member)
            self._send(member, {"t": "abort", "trial_id": gang.trial_id, "reason": reason})
            self.backend.worker_aborted(member.info)

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

    def _forget_if_done(self, gang: _Gang) -> None:
        if gang.ended and len(gang.outcomes) == len(gang.members):
            self.gangs.pop(gang.trial_id, None)

    def _dispatch(self, peer: Peer) -> None:
        if self.k > 1:
            if self.driver.finished:
                self._send(peer, {"t": "shutdown"})
            elif peer not in self.waiting:
                self.waiting.append(peer)
            return
        if peer.trial_id is None:
            trial = self.driver.next_trial()
            if trial is not None:
                self._send(peer, {"t": "trial", **self._start(peer, trial)})
            elif self.driver.finished:
                self._send(peer, {"t": "shutdown"})
            elif peer not in self.waiting:
                self.waiting.append(peer)
        if peer.trial_id is not None and self._may_reserve(peer):
            trial = self.driver.next_trial(reserve=True)
            if trial is not None:
                peer.reserved_id = trial.trial_id
                self._send(peer, {"t": "trial", **self.driver.reserve(trial)})

    def _start(self, peer: Peer, trial: Any) -> dict[str, Any]:
        peer.trial_id = trial.trial_id
        return self.driver.start(trial, peer.name, peer.info.get("host"), peer.info.get("pid"))

    def _may_reserve(self, peer: Peer) -> bool:
        """Whether to hand busy ``peer`` its next trial now, so it starts without a round trip to the
        driver. Not when the optimizer learns from results, nor while another worker is idle, nor near
        the end (the last trials go to whichever worker frees up first)."""
        return (peer.reserved_id is None and self.driver.prefetch and not self.waiting
                and self.driver.unstarted() > len(self.peers))

    def _dispatch_waiting(self) -> None:
        if self.k > 1:
            self._dispatch_gangs()
            return
        while self.waiting and self.driver.can_start() and not self.driver.finished:
            peer = self.waiting.popleft()
            self._dispatch(peer)
            if peer.trial_id is None:
                break
        if self.driver.finished:
            while self.waiting:
                self._send(self.waiting.popleft(), {"t": "shutdown"})

    def _send(self, peer: Peer, message: dict[str, Any]) -> None:
        try:
            peer.conn.send(message)
        except OSError:
            peer.conn.close()  # its reader thread reports it closed; the trial is retried then

    def _check_timeouts(self, now: float) -> None:
        """End the trials running past ``trial_timeout_s``: record each (failed, or queued again with
        ``retry_on_timeout``) and end the processes of its workers, every rank of a distributed trial
        (the backend replaces them)."""
        overdue, trial_limit = self.driver.overdue(now), self.driver.search.trial_timeout_s
        for trial in overdue:
            gang = self.gangs.get(trial.trial_id)
            if gang is not None:
                gang.ended = True
                for rank in range(len(gang.members)):
                    gang.outcomes.setdefault(rank, {"status": "aborted"})
            self.driver.time_out(trial.trial_id)
            reason = f"timeout: the trial ran longer than trial_timeout_s={trial_limit}"
            for peer in [p for p in self.peers.values() if p.trial_id == trial.trial_id and not p.aborted]:
                self._end_worker(peer, trial.trial_id, reason)
            if gang is not None:
                self._forget_if_done(gang)
        if overdue:
            self._dispatch_waiting()

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
            self._send(peer, {"t": "abort", "trial_id": trial_id, "reason": reason})

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
