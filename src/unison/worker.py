"""The worker runtime: connect, ask for work, run trials, report, repeat.

The same loop runs in a local worker process and inside a Spark task. Run as a process with
``python -m unison.worker``; the driver passes its address, the secret and the payload location in
the environment (never on the command line, which other users can read).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import traceback
from typing import Any

from unison.protocol import Connection, client_connect
from unison.runtime import TrialRunner

ENV_ADDRESS = "UNISON_DRIVER"
ENV_SECRET = "UNISON_SECRET"
ENV_PAYLOAD = "UNISON_PAYLOAD"
ENV_WORKER = "UNISON_WORKER"
ENV_HEARTBEAT = "UNISON_HEARTBEAT"


def _heartbeat(conn: Connection, interval: float, stop: threading.Event) -> None:
    while not stop.wait(interval):
        try:
            conn.send({"t": "hb"})
        except OSError:
            os._exit(3)  # the driver is gone: nobody will collect this worker's results


def serve(
    address: tuple[str, int],
    secret: bytes,
    payload: bytes,
    worker: str,
    heartbeat_interval: float = 1.0,
) -> int:
    """Serve trials for the driver at ``address`` until it says shut down; return the trial count."""
    from unison.payload import loads_payload

    conn = client_connect(address, secret)
    conn.send({"t": "hello", "worker": worker, "host": socket.gethostname(), "pid": os.getpid()})
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(conn, heartbeat_interval, stop), daemon=True).start()
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

            message = {"t": "ready", "result": runner.run(request, decide)}
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
