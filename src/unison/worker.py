"""The worker runtime: connect, ask for work, run trials, report, repeat.

The same loop runs in a local worker process and inside a Spark task. A local worker process runs
``unison.worker.main()``; the driver passes its address, the secret and the payload location in
the environment (never on the command line, which other users can read).

One thread reads the driver's messages and queues them for the main thread, which runs trials: so
the worker hears the driver while the function runs. The reader handles ``abort`` itself (another
rank of this worker's distributed trial failed, and this rank may be stuck in a collective that
would only time out): it flushes the trial's logs (ships them, without the driver's disk) and ends
the process at once with :data:`ABORT_EXIT`; the backend starts a new worker in its place.
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from unison.protocol import Connection, client_connect
from unison.runtime import TrialRunner

ENV_ADDRESS = "UNISON_DRIVER"
ENV_SECRET = "UNISON_SECRET"
ENV_PAYLOAD = "UNISON_PAYLOAD"
ENV_WORKER = "UNISON_WORKER"
ENV_HEARTBEAT = "UNISON_HEARTBEAT"
ABORT_EXIT = 75  # the exit status of a worker the driver aborted (not a crash: backends replace it)


def _heartbeat(conn: Connection, interval: float, stop: threading.Event, exit_process: bool) -> None:
    while not stop.wait(interval):
        try:
            conn.send({"t": "hb"})
        except OSError:
            if exit_process:
                os._exit(3)  # the driver is gone: nobody will collect this worker's results
            conn.close()  # the serving loop ends when the trial under way returns
            return


def _read(conn: Connection, inbox: queue.Queue[dict[str, Any]], current: dict[str, Any],
          shared_filesystem: bool, ship_limit: int) -> None:
    """The reader thread: queue the driver's messages; act on ``abort`` at once."""
    try:
        while True:
            message = conn.recv()
            if message.get("t") == "abort":
                _abort(conn, message, current, shared_filesystem, ship_limit)
            inbox.put(message)
    except Exception:  # noqa: BLE001 - any broken stream: the main thread sees the driver is gone
        inbox.put({"t": "_closed"})


def _abort(conn: Connection, message: dict[str, Any], current: dict[str, Any], shared_filesystem: bool,
           ship_limit: int) -> None:
    """End this process now, after saving what the trial under way logged."""
    try:
        trial_id = current.get("trial_id")
        if trial_id is not None:
            print(f"\nunison: this rank was aborted by the driver: {message.get('reason', '')}",
                  file=sys.stderr)
        _flush_std_streams()
        local_dir = current.get("local_dir")
        if trial_id is not None and not shared_filesystem and local_dir:
            from unison import trialfiles

            files, _ = trialfiles.collect(Path(local_dir), ship_limit)
            conn.send({"t": "files", "trial_id": trial_id, "files": files})
            shutil.rmtree(local_dir, ignore_errors=True)
    finally:
        os._exit(ABORT_EXIT)


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _next(inbox: queue.Queue[dict[str, Any]]) -> dict[str, Any]:
    message = inbox.get()
    if message.get("t") == "_closed":
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
) -> int:
    """Serve trials for the driver at ``address`` until it says shut down; return the trial count.

    ``shared_filesystem``: whether this worker sees the driver's disk. If not, each trial runs in a
    temporary folder whose files travel back in the result (see :mod:`unison.trialfiles`, at most
    ``ship_limit`` bytes a trial). ``exit_when_driver_gone``: end the process at once when the
    driver stops answering (a worker process of the local backend); otherwise (inside a Spark task)
    the loop returns, after the trial under way, so the task ends cleanly.
    """
    from unison import trialfiles
    from unison.payload import loads_payload

    ship_limit = trialfiles.SHIP_LIMIT_BYTES if ship_limit is None else ship_limit
    conn = client_connect(address, secret)
    conn.send({"t": "hello", "worker": worker, "host": socket.gethostname(), "pid": os.getpid()})
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(conn, heartbeat_interval, stop, exit_when_driver_gone),
                     daemon=True).start()
    inbox: queue.Queue[dict[str, Any]] = queue.Queue()
    current: dict[str, Any] = {}
    threading.Thread(target=_read, args=(conn, inbox, current, shared_filesystem, ship_limit),
                     name="unison-reader", daemon=True).start()
    try:
        parts = loads_payload(payload)
        runner = TrialRunner(
            parts["fn"], parts["names"], parts["metric"], parts.get("model_fn"), parts.get("data"),
            variants=parts.get("variants"), require_metric=parts.get("require_metric", True),
        )
        endpoint = _Endpoint(conn, parts.get("framework", "torch")) if parts.get("distributed") else None
    except Exception:  # noqa: BLE001 - the driver must learn why this worker cannot work
        conn.send({"t": "fatal", "error": traceback.format_exc()})
        conn.close()
        return 0
    done = 0
    message: dict[str, Any] = {"t": "ready"}
    # The driver may hand this worker its next trial while one runs: it waits here, and the worker
    # starts it right after sending the result (the driver counts it started when that arrives).
    held: deque[dict[str, Any]] = deque()
    try:
        while True:
            if endpoint is not None:  # where this worker would host a process group as rank 0
                message.update(endpoint.describe())
            conn.send(message)
            request = held.popleft() if held else _next(inbox)
            if request["t"] != "trial":
                break
            trial_id = request["trial_id"]

            def decide(step: int, metrics: dict[str, float], _id: int = trial_id) -> str | None:
                conn.send({"t": "report", "trial_id": _id, "step": step, "metrics": metrics})
                reply = _next(inbox)
                while reply.get("t") == "trial":
                    held.append(reply)
                    reply = _next(inbox)
                if reply.get("t") != "decision":
                    raise ConnectionError(f"expected the driver's decision, got a {reply.get('t')!r} message")
                return reply["stop"]

            def notify(error: str, _id: int = trial_id) -> None:
                conn.send({"t": "rank_failed", "trial_id": _id, "error": error})

            current.update(trial_id=trial_id, local_dir=None)
            if shared_filesystem:
                result = runner.run(request, decide, notify)
            else:
                local_dir = tempfile.mkdtemp(prefix=f"unison-trial-{trial_id}-")
                current["local_dir"] = local_dir
                try:
                    result = runner.run({**request, "trial_dir": local_dir}, decide, notify)
                    result["files"], skipped = trialfiles.collect(Path(local_dir), ship_limit)
                    if skipped:
                        result["files_skipped"] = skipped
                finally:
                    current["local_dir"] = None
                    shutil.rmtree(local_dir, ignore_errors=True)
            current["trial_id"] = None
            message = {"t": "ready", "result": result}
            done += 1
    except (ConnectionError, OSError):
        pass  # the driver went away; nothing left to do
    finally:
        stop.set()
        conn.close()
    return done


class _Endpoint:
    """What a worker of a distributed experiment tells the driver in each ``ready``: the address its
    peers reach it at (the one its connection to the driver uses: 127.0.0.1 for local workers, the
    executor's interface on Spark), a port free right now for a rendezvous it may host, and its GPUs
    (counted by torch, to choose nccl or gloo; not for TensorFlow ranks, which need not load torch)."""

    def __init__(self, conn: Connection, framework: str = "torch") -> None:
        from unison.dist import gpu_count

        self.address = str(conn.sock.getsockname()[0])
        self.gpus = gpu_count() if framework == "torch" else 0

    def describe(self) -> dict[str, Any]:
        from unison.dist import free_port

        return {"address": self.address, "port": free_port(self.address), "gpus": self.gpus}


def main() -> None:
    host, port = os.environ[ENV_ADDRESS].rsplit(":", 1)
    secret = bytes.fromhex(os.environ.pop(ENV_SECRET))
    with open(os.environ[ENV_PAYLOAD], "rb") as f:
        payload = f.read()
    serve(
        (host, int(port)),
        secret,
        payload,
        os.environ.get(ENV_WORKER, f"{socket.gethostname()}:{os.getpid()}"),
        float(os.environ.get(ENV_HEARTBEAT, "1.0")),
    )
    # End as multiprocessing's children do, without the interpreter's teardown (tens of ms with large
    # libraries loaded, while the driver waits for the exit), but after the atexit handlers (loggers,
    # trackers the function started) and with the standard streams flushed.
    atexit._run_exitfuncs()
    _flush_std_streams()
    os._exit(0)


if __name__ == "__main__":
    main()
