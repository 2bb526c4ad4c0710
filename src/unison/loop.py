"""The experiment loops: feed a :class:`SearchDriver` trials from in-process calls or from workers."""

from __future__ import annotations

import os
import queue
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from unison import trialfiles
from unison.backends.base import Backend
from unison.driver import SearchDriver
from unison.errors import WorkerError
from unison.protocol import new_secret
from unison.runtime import TrialRunner
from unison.server import Event, Peer, Server

TICK_S = 0.1


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

        def decide(step: int, metrics: dict[str, float], _id: int = trial.trial_id) -> str | None:
            return driver.report(_id, step, metrics)

        driver.finish(runner.run(message, decide))
        progress.update(driver.summary())


class RemoteLoop:
    """Serves trials to workers started by a backend, one event at a time."""

    def __init__(self, driver: SearchDriver, backend: Backend, payload_path: Path, log_dir: Path,
                 progress: Any) -> None:
        self.driver, self.backend, self.progress = driver, backend, progress
        self.payload_path, self.log_dir = payload_path, log_dir
        self.waiting: deque[Peer] = deque()
        self.peers: dict[int, Peer] = {}

    def run(self, workers: int) -> None:
        server = Server(new_secret(), host=self.backend.listen_host, port=self.backend.listen_port)
        self.server = server
        try:
            self.backend.start(server.address, server.secret, self.payload_path, self.log_dir, workers)
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
                    self.backend.poll()
                    self.progress.update(self.driver.summary())
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
        if event.kind == "closed":
            self.peers.pop(peer.peer_id, None)
            if peer in self.waiting:
                self.waiting.remove(peer)
            if peer.trial_id is not None:
                driver.lose(peer.trial_id,
                            f"worker {peer.name} died or lost its connection while running the trial")
                peer.trial_id = None
                self._dispatch_waiting()
            return
        message = event.message or {}
        kind = message.get("t")
        if kind == "ready":
            if "result" in message and peer.trial_id is not None:
                self._finish(peer, message["result"])
            self._dispatch(peer)
            self._dispatch_waiting()
        elif kind == "report":
            stop = driver.report(message["trial_id"], message["step"], message["metrics"])
            self._send(peer, {"t": "decision", "stop": stop})
        elif kind == "hello":
            peer.info = message
            self.peers[peer.peer_id] = peer
        elif kind == "fatal":
            driver.abort(WorkerError(f"worker {peer.name} could not load the training function:\n"
                                     f"{message.get('error')}"))

    def _finish(self, peer: Peer, outcome: dict[str, Any]) -> None:
        """Record the result of the trial ``peer`` was running, with the files it shipped (workers
        that do not share the driver's disk send a trial's logs and small files in its result)."""
        files = outcome.pop("files", None)
        if files:
            try:
                trialfiles.write(self.driver.store.trial_dir(peer.trial_id), files)
            except (OSError, ValueError) as exc:
                outcome.setdefault("files_skipped", []).append(f"writing the shipped files failed: {exc}")
        self.driver.finish(outcome)
        peer.trial_id = None

    def _dispatch(self, peer: Peer) -> None:
        trial = self.driver.next_trial()
        if trial is not None:
            peer.trial_id = trial.trial_id
            info = peer.info
            self._send(peer, {"t": "trial", **self.driver.start(trial, peer.name, info.get("host"),
                                                                info.get("pid"))})
        elif self.driver.finished:
            self._send(peer, {"t": "shutdown"})
        elif peer not in self.waiting:
            self.waiting.append(peer)

    def _dispatch_waiting(self) -> None:
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

    def _check_heartbeats(self, now: float) -> None:
        limit = self.backend.heartbeat_timeout
        for peer in list(self.peers.values()):
            if now - peer.last_seen > limit:
                peer.conn.close()
