"""A worker inside a Spark task (``serve(..., exit_when_driver_gone=False)``) stops the trial under way
the moment its driver hangs up, so no trial code outlives ``Spark.stop`` (issue 11, defect 11).

These tests need no Spark: the worker runs ``serve`` in the main thread of a real process, as a
PySpark Python worker does, against a real driver socket on 127.0.0.1. ``test_spark.py`` checks the
same end to end on ``local-cluster``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from unison.driver.server import Event, Server
from unison.payload import dumps_payload
from unison.protocol import new_secret

pytestmark = pytest.mark.slow  # starts worker processes

WORKER = """
import sys, time
from unison.worker.serve import serve
host, port, secret, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), sys.argv[4]
n = serve((host, port), secret, open(payload, "rb").read(), "spark-0", 0.2, shared_filesystem=False,
          exit_when_driver_gone=False)
print(f"serve returned {n} at {time.time()!r}", flush=True)
"""


def sleeping(x: float, ctx: Any) -> float:
    time.sleep(30)  # a blocking call
    return x


def busy(x: float, ctx: Any) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a busy Python loop
        pass
    return x


def stubborn(x: float, ctx: Any) -> float:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # swallows every interruption
        try:
            time.sleep(30)
        except BaseException:  # noqa: BLE001, S110
            pass
    return x


def next_message(server: Server, kind: str, timeout: float = 30.0) -> Event:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = server.events.get(timeout=max(0.01, deadline - time.monotonic()))
        if event.kind == "message" and event.message is not None and event.message.get("t") == kind:
            return event
    raise AssertionError(f"no {kind!r} message from the worker within {timeout} s")


def run_until_hang_up(fn: Any, tmp_path: Path, trials: int = 1) -> tuple[subprocess.Popen[str], float]:
    """Start a worker, hand it ``trials`` trials of ``fn`` (the next ones to start after the first, as
    the driver's prefetch does), hang up 0.5 s into the first; the process and when."""
    payload = tmp_path / "payload.bin"
    payload.write_bytes(dumps_payload({"fn": fn, "names": ["x", "ctx"], "metric": ["value"]}))
    server = Server(new_secret())
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, server.address[0], str(server.address[1]), server.secret.hex(),
         str(payload)], stdout=subprocess.PIPE, text=True)
    try:
        ready = next_message(server, "ready")
        for trial_id in range(trials):
            ready.peer.conn.send({"t": "trial", "trial_id": trial_id, "hparams": {"x": 0.5}, "attempt": 0,
                                  "seed": 1, "trial_dir": str(tmp_path / f"trial-{trial_id}")})
        time.sleep(0.5)
    finally:
        server.close()  # what the driver does before Spark.stop
    return worker, time.monotonic()


@pytest.mark.parametrize(("fn", "trials"), [(sleeping, 1), (busy, 1), (sleeping, 3)],
                         ids=["sleep", "busy-loop", "with-next-trials-handed-over"])
def test_a_spark_worker_interrupts_its_trial_when_the_driver_hangs_up(fn: Any, trials: int,
                                                                     tmp_path: Path) -> None:
    worker, hung_up = run_until_hang_up(fn, tmp_path, trials)
    try:
        out, _ = worker.communicate(timeout=10)
    finally:
        worker.kill()
    ended = time.monotonic() - hung_up
    # serve returned: the Spark task ends normally, leaving Spark nothing to retry
    assert worker.returncode == 0 and out.startswith("serve returned "), out
    assert ended < 1.5, f"the trials ran on {ended:.1f} s after the driver hung up"


def test_a_trial_that_swallows_the_interruption_ends_with_its_process(tmp_path: Path) -> None:
    worker, hung_up = run_until_hang_up(stubborn, tmp_path)
    try:
        out, _ = worker.communicate(timeout=10)
    finally:
        worker.kill()
    ended = time.monotonic() - hung_up
    assert worker.returncode == 3 and out == "", out  # DRIVER_GONE_EXIT, from the reader thread
    assert ended < 2.5, f"the trial ran on {ended:.1f} s after the driver hung up"
