"""The worker runtime: connect, ask for work, run trials, report, repeat.

The same loop runs in a local worker process and inside a Spark task. A local worker process runs
``python -m unison.worker``; the backend passes its address, the secret and the payload location in
the environment (see :mod:`unison.launch`).

One thread reads the driver's messages and queues them for the main thread, which runs trials: so
the worker hears the driver while the function runs. The reader handles ``abort`` itself (another
rank of this worker's distributed trial failed, and this rank may be stuck in a collective that
would only time out): it flushes the trial's logs (ships them, without the driver's disk) and ends
the process at once with :data:`ABORT_EXIT`; the backend starts a new worker in its place. Inside
a Spark task it also stops the trial under way when the driver hangs up (:func:`_stop_trials`).

A worker without the driver's disk (Spark executors) runs each trial in a temporary folder: it streams
each checkpoint the trial saves to the driver before the report naming it, and the reader thread
stages the checkpoint a trial resumes from, which the driver streams before its ``trial`` message
(see :mod:`unison.worker.checkpoint_ship`); the trial's other files go back in its result.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from unison.gpus import assigned_gpus
from unison.launch import ABORT_EXIT, DRIVER_GONE_EXIT, worker_settings
from unison.protocol import (
    ABORT,
    CHECKPOINT_ACK,
    CHECKPOINT_CHUNK,
    DECISION,
    FATAL,
    FILES,
    HEARTBEAT,
    HELLO,
    RANK_FAILED,
    READY,
    REPORT,
    TRIAL,
    CheckpointSaved,
    Connection,
    FatalMessage,
    FilesMessage,
    HelloMessage,
    RankFailedMessage,
    ReadyMessage,
    ReportMessage,
    TrialOutcome,
    client_connect,
)
from unison.worker.checkpoints import FOLDER, SHIP_CHECKPOINTS, Policy
from unison.worker.reporter import Decide
from unison.worker.runtime import TrialRunner

if TYPE_CHECKING:
    from unison.worker.checkpoint_ship import ShippingCheckpointer, Staging

# imported where used: only workers without the driver's disk (Spark) ship checkpoints and files

UNWAITED_REPORTS = 32  # reports sent without waiting for the driver before one waits (when none is judged)
STOP_GRACE_S = 2.0  # how long a trial interrupted because the driver hung up may take to end
_CLOSED = "_closed"  # what the reader thread queues when the connection ends (no message kind)


class _DriverGone(BaseException):
    """Raised in the trial's thread when the driver hangs up while the trial runs (inside a Spark
    task): nobody will collect the trial's result. A ``BaseException``, so ``except Exception`` in
    the function does not keep the trial going."""


class _TrialInterrupter:
    """Stops the trial running in the main thread of a Spark task's worker once the driver hung up.

    Cancelling the Spark job does not do it: PySpark ends the Python worker only after its task-kill
    timeout, and the function runs on until then. The reader thread sends SIGINT to the main thread
    (``pthread_kill``: unlike ``_thread.interrupt_main()`` a real signal, so a blocking call such as
    ``time.sleep`` returns with EINTR at once) and the handler installed here raises
    :class:`_DriverGone` there, which ends a blocking call as it ends a busy Python loop, while the
    task itself returns normally (Spark sees no failed task, retries nothing and logs nothing). A
    SIGINT that is not ours goes to the handler that was installed before.
    """

    def __init__(self, current: dict[str, Any]) -> None:
        self._current = current
        self._thread_id = threading.get_ident()
        self._lock = threading.Lock()
        self._pending = False  # a SIGINT of ours is on its way to the main thread
        self._closed = False
        self._fired = False
        self._streams = sys.stdout, sys.stderr
        self._previous = signal.signal(signal.SIGINT, self._handle)

    @classmethod
    def install(cls, current: dict[str, Any]) -> _TrialInterrupter | None:
        """One for the calling thread, or ``None`` where signals cannot reach it (not the main thread)."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
            return None
        return cls(current)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._pending:
            self._pending = False
            if self._current.get("trial_id") is not None:
                raise _DriverGone("the driver hung up while this trial ran")
            return
        previous = self._previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # what this SIGINT would have done without us: end the process
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (``serve`` is returning)."""
        return self._closed

    def interrupt(self) -> bool:
        """Called from another thread: interrupt the trial under way, if any; whether one was."""
        with self._lock:
            if self._closed or self._current.get("trial_id") is None:
                return False
            self._pending = self._fired = True
            signal.pthread_kill(self._thread_id, signal.SIGINT)
            return True

    def close(self) -> None:
        """In the main thread, once no trial runs: take a SIGINT of ours still on its way, then put
        back the previous handler (and the standard streams, if a trial was cut off redirecting them)."""
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + STOP_GRACE_S
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.01)  # the signal ends this sleep, and its handler runs here
        signal.signal(signal.SIGINT, self._previous)
        if self._fired:
            sys.stdout, sys.stderr = self._streams


def _heartbeat(conn: Connection, interval: float, stop: threading.Event, exit_process: bool) -> None:
    while not stop.wait(interval):
        try:
            conn.send({"t": HEARTBEAT})
        except OSError:
            if exit_process:
                os._exit(DRIVER_GONE_EXIT)  # the driver is gone: nobody will collect this worker's results
            conn.close()  # the reader thread sees it and stops the trial under way (_stop_trials)
            return


def _read(conn: Connection, inbox: queue.Queue[dict[str, Any]], current: dict[str, Any],
          shared_filesystem: bool, ship_limit: int, staging: Staging | None = None) -> None:
    """The reader thread: queue the driver's messages; act on ``abort`` at once.

    Without the driver's disk (``staging``), the chunks of the checkpoint a trial resumes from are
    written into ``staging``, never queued, and the ``trial`` message after them is pointed at that
    copy before it is queued (it may be one the worker holds while it runs another). When the driver
    hangs up, a worker inside a Spark task (``current["interrupter"]`` is not ``None``) stops its
    trials now: see :func:`_stop_trials`.
    """
    try:
        while True:
            message = conn.recv()
            kind = message.get("t")
            if kind == ABORT:
                _abort(conn, message, current, shared_filesystem, ship_limit)
            elif staging is not None and kind == CHECKPOINT_CHUNK:
                staging.add(message)
                continue
            elif staging is not None and kind == TRIAL:
                staging.resolve(message)
            elif kind == DECISION and "trial_id" in message:  # on a report that did not wait: a stop
                current["late"].append(message)
                continue
            inbox.put(message)
    except Exception:  # noqa: BLE001 - any broken stream: the main thread sees the driver is gone
        inbox.put({"t": _CLOSED})
        if current.get("interrupter", True) is not None:  # None: a local worker, which the backend ends
            _stop_trials(current, shared_filesystem)


def _stop_trials(current: dict[str, Any], shared_filesystem: bool) -> None:
    """The driver hung up: interrupt each trial that runs in the next :data:`STOP_GRACE_S` (the one
    under way, one the driver had queued or handed over to start next), then end this process if one
    still runs (it swallowed the interruption, or sits in a long C call). Nobody would collect their
    results, and they must not run on past ``Spark.stop``."""
    deadline = time.monotonic() + STOP_GRACE_S
    interrupted: set[int] = set()
    while time.monotonic() < deadline:
        interrupter: _TrialInterrupter | None = current.get("interrupter")  # set once the payload loaded
        if interrupter is not None:
            if interrupter.closed:
                return  # serve() returned
            trial_id = current.get("trial_id")
            if trial_id is not None and trial_id not in interrupted and interrupter.interrupt():
                interrupted.add(trial_id)
        time.sleep(0.02)
    if current.get("trial_id") is not None:
        _flush_std_streams()
        if not shared_filesystem and current.get("local_dir"):
            import shutil

            shutil.rmtree(current["local_dir"], ignore_errors=True)
        if current.get("staging") is not None:
            current["staging"].close()
        os._exit(DRIVER_GONE_EXIT)


def _abort(conn: Connection, message: dict[str, Any], current: dict[str, Any], shared_filesystem: bool,
           ship_limit: int) -> None:
    """End this process now, after saving what the trial under way logged."""
    try:
        trial_id = current.get("trial_id")
        if trial_id is not None:
            print(f"\nunison: this worker was aborted by the driver: {message.get('reason', '')}",
                  file=sys.stderr)
        _flush_std_streams()
        local_dir = current.get("local_dir")
        if trial_id is not None and not shared_filesystem and local_dir:
            import shutil

            from unison import trialfiles

            shutil.rmtree(Path(local_dir) / FOLDER, ignore_errors=True)  # a checkpoint being shipped
            files, _ = trialfiles.collect(Path(local_dir), ship_limit)
            conn.send(FilesMessage(t=FILES, trial_id=trial_id, files=files))
            shutil.rmtree(local_dir, ignore_errors=True)
    finally:
        if current.get("staging") is not None:
            current["staging"].close()
        os._exit(ABORT_EXIT)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _next(inbox: queue.Queue[dict[str, Any]]) -> dict[str, Any]:
    message = inbox.get()
    if message.get("t") == _CLOSED:
        raise ConnectionError("the driver closed the connection")
    return message


def serve(
    address: tuple[str, int],
    secret: bytes,
    payload: bytes,
    worker: str,
    heartbeat_interval: float = 1.0,
    shared_filesystem: bool = True,
    ship_limit: int | None = None,
    exit_when_driver_gone: bool = True,
    node: str | None = None,
) -> int:
    """Serve trials for the driver at ``address`` until it says shut down; return the trial count.

    ``shared_filesystem``: whether this worker sees the driver's disk. If not, each trial runs in a
    temporary folder whose files travel back in the result (see :mod:`unison.trialfiles`, at most
    ``ship_limit`` bytes a trial). ``exit_when_driver_gone``: end the process at once when the
    driver stops answering (a worker process of the local backend); otherwise (inside a Spark task)
    the trial under way is interrupted (see :func:`_read`) and the loop returns, so the task ends
    cleanly; call it from the main thread there (signals reach no other). ``node``: the cluster node
    this worker runs on (a Ray node id), told to the driver in the hello (the trial table's ``node``).
    """
    from unison import trialfiles

    ship_limit = trialfiles.SHIP_LIMIT_BYTES if ship_limit is None else ship_limit
    session = _Session.open(address, secret, worker, heartbeat_interval, exit_when_driver_gone,
                            shared_filesystem, ship_limit, node)
    loaded = session.load(payload)
    if loaded is None:
        return 0
    current = session.current
    current["interrupter"] = None if exit_when_driver_gone else _TrialInterrupter.install(current)
    return session.serve_trials(*loaded)


class _Session:
    """A worker's connection to the driver, the threads that read it and send heartbeats, and the
    trials it runs."""

    def __init__(self, conn: Connection, shared_filesystem: bool, ship_limit: int) -> None:
        self.conn = conn
        self.shared_filesystem, self.ship_limit = shared_filesystem, ship_limit
        self.stop = threading.Event()  # ends the heartbeat thread
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        # trial_id, local_dir, interrupter, staging: seen by the reader thread
        self.current: dict[str, Any] = {}
        # Without the driver's disk: the checkpoints the driver ships for trials that resume from them
        self.staging: Staging | None = None
        if not shared_filesystem:
            from unison.worker.checkpoint_ship import Staging

            self.staging = Staging()
        self.current["staging"] = self.staging
        # The driver may hand this worker its next trial while one runs: it waits here, and the worker
        # starts it right after sending the result (the driver counts it started when that arrives).
        self.held: deque[dict[str, Any]] = deque()
        # Decisions on reports that did not wait (the reader thread puts them here): read at the next report
        self.current["late"] = deque()
        self.judged = True  # until the driver's first decision says no report is judged
        self.unanswered = 0  # reports sent without waiting since the last that waited

    @classmethod
    def open(cls, address: tuple[str, int], secret: bytes, worker: str, heartbeat_interval: float,
             exit_when_driver_gone: bool, shared_filesystem: bool, ship_limit: int,
             node: str | None = None) -> _Session:
        """Connect to the driver, say hello, and start the heartbeat and reader threads."""
        conn = client_connect(address, secret)
        hello = HelloMessage(t=HELLO, worker=worker, host=socket.gethostname(), pid=os.getpid())
        if node is not None:
            hello["node"] = node
        gpus = assigned_gpus()
        if gpus:
            hello["gpus"] = gpus
        conn.send(hello)
        session = cls(conn, shared_filesystem, ship_limit)
        threading.Thread(target=_heartbeat, daemon=True,
                         args=(conn, heartbeat_interval, session.stop, exit_when_driver_gone)).start()
        threading.Thread(target=_read, name="unison-reader", daemon=True,
                         args=(conn, session.inbox, session.current, shared_filesystem, ship_limit,
                               session.staging)).start()
        return session

    def load(self, payload: bytes) -> tuple[TrialRunner, _Endpoint | None] | None:
        """The trial runner (and, in a distributed experiment, this worker's endpoint) that ``payload``
        describes; ``None`` if it cannot be loaded: the driver is then told why, and the connection
        closed."""
        from unison.payload import loads_payload

        try:
            parts = loads_payload(payload)
            # A KeyboardInterrupt here is the function's own (a worker never gets the terminal's): a failure.
            runner = TrialRunner.from_parts(parts, interrupt_propagates=False)
            distributed = parts.get("distributed")
            endpoint = _Endpoint(self.conn, parts.get("framework", "torch")) if distributed else None
        except Exception:  # noqa: BLE001 - the driver must learn why this worker cannot work
            import traceback

            self.conn.send(FatalMessage(t=FATAL, error=traceback.format_exc()))
            self.conn.close()
            return None
        return runner, endpoint

    def serve_trials(self, runner: TrialRunner, endpoint: _Endpoint | None) -> int:
        """Ask for trials and run them until the driver says shut down or goes away; how many ran."""
        done = 0
        message = ReadyMessage(t=READY)
        try:
            while True:
                if endpoint is not None:  # where this worker would host a process group as rank 0
                    endpoint.describe(message)
                self.conn.send(message)
                request = self.held.popleft() if self.held else self._next_request()
                if request["t"] != TRIAL:
                    break
                message = ReadyMessage(t=READY, result=self._run(runner, request))
                done += 1
        except (ConnectionError, OSError, _DriverGone):
            pass  # the driver went away; nothing left to do
        finally:
            self.current["trial_id"] = None
            if self.current["interrupter"] is not None:
                self.current["interrupter"].close()
            self.stop.set()
            self.conn.close()
            if self.staging is not None:
                self.staging.close()
        return done

    def _next_request(self) -> dict[str, Any]:
        """The driver's next message other than a late ``checkpoint_ack`` (of a refused checkpoint)."""
        message = _next(self.inbox)
        while message.get("t") == CHECKPOINT_ACK:
            message = _next(self.inbox)
        return message

    def _run(self, runner: TrialRunner, request: dict[str, Any]) -> TrialOutcome:
        """Run the trial of the ``trial`` message ``request``."""
        trial_id = request["trial_id"]
        decide = functools.partial(self._decide, trial_id)
        notify = functools.partial(self._notify, trial_id)
        self.current["late"].clear()  # (a stop left from an earlier attempt of the same trial is old news)
        self.current.update(trial_id=trial_id, local_dir=None)
        if self.shared_filesystem:
            result = runner.run(request, decide, notify)
        else:
            result = self._run_shipped(runner, request, decide, notify)
        self.current["trial_id"] = None
        return cast(TrialOutcome, result)

    def _run_shipped(self, runner: TrialRunner, request: dict[str, Any], decide: Decide,
                     notify: Callable[[str], None]) -> dict[str, Any]:
        """Run the trial in a temporary folder, whose files travel back in its outcome (this worker does
        not see the driver's disk)."""
        import shutil
        import tempfile

        from unison import trialfiles

        trial_id = request["trial_id"]
        local_dir = tempfile.mkdtemp(prefix=f"unison-trial-{trial_id}-")
        self.current["local_dir"] = local_dir
        try:
            ship = functools.partial(self._shipping, trial_id)
            result = runner.run({**request, "trial_dir": local_dir, SHIP_CHECKPOINTS: ship}, decide, notify)
            # Checkpoints went to the driver as they were saved: what is left of one is no trial file
            shutil.rmtree(Path(local_dir) / FOLDER, ignore_errors=True)
            result["files"], skipped = trialfiles.collect(Path(local_dir), self.ship_limit)
            if skipped:
                result["files_skipped"] = skipped
        finally:
            self.current["local_dir"] = None
            shutil.rmtree(local_dir, ignore_errors=True)
            if self.staging is not None:
                self.staging.discard(trial_id)  # the copy of the checkpoint it resumed from
        return result

    def _shipping(self, trial_id: int, root: Path, policy: Policy) -> ShippingCheckpointer:
        """What saves ``trial_id``'s checkpoints into ``root`` and ships them to the driver."""
        from unison.worker.checkpoint_ship import ShippingCheckpointer

        return ShippingCheckpointer(root, policy, trial_id, self.conn.send, self._next_ack)

    def _next_ack(self) -> dict[str, Any]:
        """The driver's next ``checkpoint_ack`` (a trial it hands over meanwhile is held)."""
        reply = _next(self.inbox)
        while reply.get("t") == TRIAL:
            self.held.append(reply)
            reply = _next(self.inbox)
        if reply.get("t") != CHECKPOINT_ACK:
            raise ConnectionError(f"expected the driver's checkpoint_ack, got a {reply.get('t')!r} message")
        return reply

    def _decide(self, trial_id: int, step: int, metrics: dict[str, float],
                checkpoint: dict[str, Any] | None = None) -> str | None:
        """Send the driver a report (with the checkpoint it saved, already on disk, or shipped) and wait
        for its decision; a trial it hands over meanwhile is held. Raises :class:`CheckpointRefused`
        when the driver refused the shipped checkpoint.

        Once the driver has said that no report is judged (no scheduler), a report without a checkpoint
        does not wait, except every :data:`UNWAITED_REPORTS`-th (which bounds what the driver holds); a
        stop the driver sent meanwhile (the trial ended for another reason) is read here first."""
        late = self._late_decision(trial_id)
        if late is not None:
            return self._verdict(late)
        report = ReportMessage(t=REPORT, trial_id=trial_id, step=step, metrics=metrics)
        if checkpoint is not None:
            report["checkpoint"] = cast(CheckpointSaved, checkpoint)
        if not self.judged and checkpoint is None and self.unanswered < UNWAITED_REPORTS:
            report["wait"] = False
            self.conn.send(report)
            self.unanswered += 1
            return None
        self.conn.send(report)
        self.unanswered = 0
        reply = _next(self.inbox)
        while reply.get("t") in (TRIAL, CHECKPOINT_ACK):  # acks: of the chunks of the checkpoint shipped
            if reply["t"] == TRIAL:
                self.held.append(reply)
            reply = _next(self.inbox)
        if reply.get("t") != DECISION:
            raise ConnectionError(f"expected the driver's decision, got a {reply.get('t')!r} message")
        self.judged = reply.get("judged", True)
        return self._verdict(reply)

    def _late_decision(self, trial_id: int) -> dict[str, Any] | None:
        """The first decision the driver sent on one of ``trial_id``'s reports that did not wait (older
        trials' are dropped)."""
        late = self.current["late"]
        while late:
            message = late.popleft()
            if message["trial_id"] == trial_id:
                return cast(dict[str, Any], message)
        return None

    @staticmethod
    def _verdict(reply: dict[str, Any]) -> str | None:
        """What a decision means for the trial: ``None`` to go on, the reason to stop; or it raises."""
        if reply.get("fail"):  # the driver refused the checkpoint (over its limit, or incomplete)
            from unison.worker.checkpoint_ship import CheckpointRefused

            raise CheckpointRefused(reply["fail"])
        if reply.get("error"):  # the experiment's first report lacks the optimized metric
            from unison.errors import MetricNotReported

            raise MetricNotReported(reply["error"])
        return reply["stop"]

    def _notify(self, trial_id: int, error: str) -> None:
        """Tell the driver this rank's function raised, before it cleans up."""
        self.conn.send(RankFailedMessage(t=RANK_FAILED, trial_id=trial_id, error=error))


class _Endpoint:
    """What a worker of a distributed experiment tells the driver in each ``ready``: the address its
    peers reach it at (the one its connection to the driver uses: 127.0.0.1 for local workers, the
    executor's interface on Spark), a port free right now for a rendezvous it may host, and its GPUs
    (counted by torch, to choose nccl or gloo; not for TensorFlow ranks, which need not load torch)."""

    def __init__(self, conn: Connection, framework: str = "torch") -> None:
        from unison.worker.rank import gpu_count

        self.address = str(conn.sock.getsockname()[0])
        self.gpus = gpu_count() if framework == "torch" else 0

    def describe(self, message: ReadyMessage) -> None:
        """Add this endpoint to ``message``, with a port free now."""
        from unison.worker.rank import free_port

        message["address"] = self.address
        message["port"] = free_port(self.address)
        message["gpus"] = self.gpus


def main() -> None:
    """The entry point of a worker process: serve the driver named in the environment, then exit."""
    settings = worker_settings()
    serve(settings.address, settings.secret, settings.payload, settings.worker, settings.heartbeat_interval)
    # End as multiprocessing's children do, without the interpreter's teardown (tens of ms with large
    # libraries loaded, while the driver waits for the exit), but after the atexit handlers (loggers,
    # trackers the function started) and with the standard streams flushed.
    atexit._run_exitfuncs()
    _flush_std_streams()
    os._exit(0)


if __name__ == "__main__":
    main()
