"""The worker runtime: connect, ask for work, run trials, report, repeat.

The same loop runs in a local worker process and inside a Spark task. Run as a process with
``python -m unison.worker``; the driver passes its address, the secret and the payload location in
the environment (never on the command line, which other users can read).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

from unison.protocol import Connection, client_connect
from unison.runtime import TrialRunner

ENV_ADDRESS = "UNISON_DRIVER"
ENV_SECRET = "UNISON_SECRET"
ENV_PAYLOAD = "UNISON_PAYLOAD"
ENV_WORKER = "UNISON_WORKER"
ENV_HEARTBEAT = "UNISON_HEARTBEAT"


def _heartbeat(conn: Connection, interval: float, stop: threading.Event, exit_process: bool) -> None:
    while not stop.wait(interval):
        try:
            conn.send({"t": "hb"})
        except OSError:
            if exit_process:
                os._exit(3)  # the driver is gone: nobody will collect this worker's results
            conn.close()  # the serving loop ends when the trial under way returns
            return


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

    conn = client_connect(address, secret)
    conn.send({"t": "hello", "worker": worker, "host": socket.gethostname(), "pid": os.getpid()})
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(conn, heartbeat_interval, stop, exit_when_driver_gone),
                     daemon=True).start()
    try:
        parts = loads_payload(payload)
        runner = TrialRunner(
            parts["fn"], parts["names"], parts["metric"], parts.get("model_fn"), parts.get("data"),
            variants=parts.get("variants"),
        )
    except Exception:  # noqa: BLE001 - the driver must learn why this worker cannot work
        conn.send({"t": "fatal", "error": traceback.format_exc()})
        conn.close()
        return 0
    done = 0
    message: dict[str, Any] = {"t": "ready"}
    try:
        while True:
            conn.send(message)
            request = conn.recv()
            if request["t"] != "trial":
                break
            trial_id = request["trial_id"]

            def decide(step: int, metrics: dict[str, float], _id: int = trial_id) -> str | None:
                conn.send({"t": "report", "trial_id": _id, "step": step, "metrics": metrics})
                return conn.recv()["stop"]

            if shared_filesystem:
                result = runner.run(request, decide)
            else:
                local_dir = tempfile.mkdtemp(prefix=f"unison-trial-{trial_id}-")
                try:
                    result = runner.run({**request, "trial_dir": local_dir}, decide)
                    result["files"], skipped = trialfiles.collect(
                        Path(local_dir), trialfiles.SHIP_LIMIT_BYTES if ship_limit is None else ship_limit)
                    if skipped:
                        result["files_skipped"] = skipped
                finally:
                    shutil.rmtree(local_dir, ignore_errors=True)
            message = {"t": "ready", "result": result}
            done += 1
    except (ConnectionError, OSError):
        pass  # the driver went away; nothing left to do
    finally:
        stop.set()
        conn.close()
    return done


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
    sys.stdout.flush()


if __name__ == "__main__":
    main()
