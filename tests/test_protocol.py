"""The wire protocol at its boundary, over real sockets on 127.0.0.1: both sides of the HMAC handshake
reject a forged digest, every message is checked against its kind's schema (a malformed one from an
authenticated peer drops that peer, not the driver), and slow or idle strangers cannot hold the door.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from processes import read_until_closed

import unison
from unison import protocol
from unison.driver.server import Event, Server
from unison.launch import LaunchSpec
from unison.protocol import DRIVER, WORKER, MalformedMessage, ProtocolError, validate

HEADER = len(protocol.MAGIC) + protocol.NONCE_BYTES
HELLO = {"t": "hello", "worker": "worker-0", "host": "localhost", "pid": 1234}


def mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    """The handshake's digest, computed here independently of the code under test."""
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def frame(message: Any) -> bytes:
    data = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(data)) + data


def next_event(server: Server, timeout: float = 3.0) -> Event:
    return server.events.get(timeout=timeout)


@pytest.fixture
def server() -> Any:
    s = Server(protocol.new_secret())
    yield s
    s.close()


def raw_authenticated(server: Server) -> socket.socket:
    """A plain socket that completes the handshake by hand (so the test controls every byte after it)."""
    sock = socket.create_connection(server.address, timeout=5)
    header = recv_exact(sock, HEADER)
    nonce = header[len(protocol.MAGIC):]
    sock.sendall(mac(server.secret, b"worker", nonce))
    assert recv_exact(sock, 32) == mac(server.secret, b"driver", nonce)
    return sock


# ------------------------------------------------------------------------------ the handshake
def test_server_rejects_a_forged_digest_and_accepts_the_right_one(server: Server) -> None:
    with socket.create_connection(server.address, timeout=5) as forger:
        header = recv_exact(forger, HEADER)
        assert header.startswith(protocol.MAGIC)
        nonce = header[len(protocol.MAGIC):]
        forged = bytearray(mac(server.secret, b"worker", nonce))
        forged[0] ^= 1  # one bit off
        forger.sendall(bytes(forged))
        assert read_until_closed(forger, 5) == b""  # no driver digest: just hung up on
    deadline = time.monotonic() + 3
    while server.rejected < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.rejected == 1
    time.sleep(0.1)
    assert server.events.empty()  # nothing the forger sent reached the driver
    # The right digest (computed independently) is answered with the driver's and its messages arrive.
    with raw_authenticated(server) as worker:
        worker.sendall(frame(HELLO))
        event = next_event(server)
        assert (event.kind, event.message) == ("message", HELLO)
    assert server.rejected == 1


def fake_driver(secret: bytes, answer: str) -> tuple[tuple[str, int], dict[str, Any], threading.Thread]:
    """A listening socket that runs the driver's side of the handshake, answering the worker's digest
    with the right digest (``answer="right"``) or a forged one; what it saw goes in the dict."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {}

    def serve() -> None:
        with listener:
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                nonce = os.urandom(protocol.NONCE_BYTES)
                conn.sendall(protocol.MAGIC + nonce)
                seen["worker_proof_ok"] = recv_exact(conn, 32) == mac(secret, b"worker", nonce)
                digest = mac(secret, b"driver", nonce)
                conn.sendall(digest if answer == "right" else bytes(32))
                conn.sendall(frame({"t": "shutdown"}))
                read_until_closed(conn, 5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[:2], seen, thread


def test_client_rejects_a_driver_that_answers_with_a_forged_digest() -> None:
    secret = protocol.new_secret()
    address, seen, thread = fake_driver(secret, "forged")
    with pytest.raises(ProtocolError, match="driver did not prove it holds the experiment secret"):
        protocol.client_connect(address, secret, timeout=5)
    thread.join(5)
    assert seen["worker_proof_ok"]
    # The same exchange with the right digest connects.
    address, seen, thread = fake_driver(secret, "right")
    conn = protocol.client_connect(address, secret, timeout=5)
    assert conn.recv() == {"t": "shutdown"}
    conn.close()
    thread.join(5)


def test_a_worker_tries_again_when_the_driver_hangs_up_during_the_handshake() -> None:
    """A driver flooded with connections drops the oldest waiting one: a worker it dropped reconnects."""
    secret = protocol.new_secret()
    listener = socket.create_server(("127.0.0.1", 0))
    greeted: list[str] = []

    def serve() -> None:
        with listener:
            listener.settimeout(5)
            first, _ = listener.accept()
            first.sendall(protocol.MAGIC + os.urandom(protocol.NONCE_BYTES))
            first.close()  # dropped before it could answer
            greeted.append("dropped")
            sock, _ = listener.accept()
            conn = protocol.server_handshake(sock, secret)
            greeted.append("served")
            conn.send({"t": "shutdown"})
            read_until_closed(sock, 5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = protocol.client_connect(listener.getsockname()[:2], secret, timeout=5)
    assert conn.recv() == {"t": "shutdown"}
    conn.close()
    thread.join(5)
    assert greeted == ["dropped", "served"]


def test_a_worker_with_the_wrong_secret_gives_up_saying_why(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="hung up during the handshake 3 times .*secret is not the"):
        protocol.client_connect(server.address, protocol.new_secret(), timeout=5)
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 2
    while server.rejected < protocol.HANDSHAKE_ATTEMPTS and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.rejected == protocol.HANDSHAKE_ATTEMPTS
    assert server.events.empty()


# ------------------------------------------------------------------------- message schemas
MALFORMED_TO_DRIVER = [
    ({"t": "report"}, "report message: 'trial_id' is missing"),
    ({"t": "report", "trial_id": "3", "step": 0, "metrics": {}},
     "report message: 'trial_id' must be an int, got str"),
    ({"t": "report", "trial_id": True, "step": 0, "metrics": {}}, "'trial_id' must be an int, got bool"),
    ({"t": "report", "trial_id": -1, "step": 0, "metrics": {}}, "'trial_id' must be >= 0, got -1"),
    ({"t": "report", "trial_id": 3, "step": 1.5, "metrics": {}}, "'step' must be an int, got float"),
    ({"t": "report", "trial_id": 3, "step": 0}, "report message: 'metrics' is missing"),
    ({"t": "report", "trial_id": 3, "step": 0, "metrics": [1.0]}, "'metrics' must be a map, got list"),
    ({"t": "report", "trial_id": 3, "step": 0, "metrics": {"acc": "high"}},
     "report message: 'metrics'['acc'] must be a number, got str"),
    ({"t": "report", "trial_id": 3, "step": 0, "metrics": {"acc": True}}, "must be a number, got bool"),
    ({"t": "report", "trial_id": 3, "step": 0, "metrics": {f"m{i}": 1.0 for i in range(1001)}},
     "'metrics' has 1001 entries, at most 1000 are allowed"),
    ({"t": "report", "trial_id": 3, "step": 0, "metrics": {"x" * 1001: 1.0}},
     "has 1001 characters, at most 1000 are allowed"),
    ({"t": "hello", "worker": "w", "host": "h"}, "hello message: 'pid' is missing"),
    ({"t": "hello", "worker": "../../etc/passwd", "host": "h", "pid": 1},
     "hello message: 'worker' must match"),
    ({"t": "hello", "worker": "w", "host": None, "pid": 1}, "'host' must be a str, got None"),
    ({"t": "hello", "worker": "w", "host": "h", "pid": 1, "node": 7}, "hello message: 'node' must be a str"),
    ({"t": "hello", "worker": "w", "host": "h", "pid": 1, "node": "f" * 201},
     "'node' has 201 characters, at most 200 are allowed"),
    ({"t": "hello", "worker": "w", "host": "h", "pid": 1, "node": "node/../x"},
     "hello message: 'node' must match"),
    ({"t": "ready", "port": 70000}, "ready message: 'port' must be between 0 and 65535, got 70000"),
    ({"t": "ready", "gpus": "2"}, "'gpus' must be an int, got str"),
    ({"t": "ready", "result": "done"}, "ready message: 'result' must be a map, got str"),
    ({"t": "ready", "result": {"status": "completed"}}, "ready message: 'result'['trial_id'] is missing"),
    ({"t": "ready", "result": {"trial_id": 1}}, "'result'['status'] is missing"),
    ({"t": "ready", "result": {"trial_id": 1, "status": "great"}},
     "'result'['status'] must be one of 'completed', 'failed', 'stopped', got 'great'"),
    ({"t": "ready", "result": {"trial_id": 1, "status": "completed", "metrics": {"a": [1]}}},
     "'result'['metrics']['a'] must be a number, got list"),
    ({"t": "ready", "result": {"trial_id": 1, "status": "completed", "steps": "4"}},
     "'result'['steps'] must be an int, got str"),
    ({"t": "ready", "result": {"trial_id": 1, "status": "failed", "error": 7}},
     "'result'['error'] must be a str"),
    ({"t": "ready", "result": {"trial_id": 1, "status": "completed", "files": {"a.txt": "text"}}},
     "'result'['files']['a.txt'] must be bytes, got str"),
    ({"t": "ready", "result": {"trial_id": 1, "status": "completed", "logs_cut": {"stdout.log": "all"}}},
     "'result'['logs_cut']['stdout.log'] must be an int, got str"),
    ({"t": "rank_failed", "trial_id": 2}, "rank_failed message: 'error' is missing"),
    ({"t": "files", "trial_id": 2, "files": {"x": 1}}, "files message: 'files'['x'] must be bytes, got int"),
    ({"t": "fatal"}, "fatal message: 'error' is missing"),
    ({"t": "trial", "trial_id": 1}, "message has an unknown kind 'trial': a driver accepts 'hello'"),
    ({"t": 5}, "message has an unknown kind 5"),
    ({"trial_id": 1}, "message has no kind ('t' is missing)"),
    ([1, 2], "message must be a map, got list"),
]


@pytest.mark.parametrize(("message", "error"), MALFORMED_TO_DRIVER, ids=lambda v: None)
def test_each_malformed_message_to_the_driver_is_rejected_with_a_clear_message(message: Any,
                                                                               error: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        validate(message, DRIVER)
    assert error in str(info.value)


def test_messages_workers_really_send_are_valid() -> None:
    from unison.worker.runtime import TrialRunner

    def fn(x: float, reporter: Any) -> dict[str, float]:
        reporter.report(step=0, loss=1.0)
        reporter.report(step=1, loss=0.9, checkpoint={"w": x})
        return {"value": x, "loss": 0.5}

    reports: list[dict[str, Any]] = []

    def decide(step: int, metrics: dict[str, float], checkpoint: dict[str, Any] | None = None) -> None:
        reports.append({"t": "report", "trial_id": 7, "step": step, "metrics": metrics,
                        **({"checkpoint": checkpoint} if checkpoint else {})})

    import tempfile

    with tempfile.TemporaryDirectory() as trial_dir:
        result = TrialRunner(fn, ["x", "reporter"], "value").run(
            {"trial_id": 7, "hparams": {"x": 0.5}, "trial_dir": trial_dir}, decide)
    assert result["status"] == "completed"
    assert reports[1]["checkpoint"]["path"] == "checkpoints/step-000001"
    node = {**HELLO, "node": "a" * 56}  # a Ray node id: 56 hex characters
    for message in [HELLO, node, {"t": "ready"}, {"t": "ready", "result": result}, *reports,
                    {"t": "ready", "address": "127.0.0.1", "port": 29500, "gpus": 0},
                    {"t": "rank_failed", "trial_id": 7, "error": "Traceback ..."},
                    {"t": "files", "trial_id": 7, "files": {"stdout.log": b"hi\n"}},
                    {"t": "fatal", "error": "Traceback ..."}, {"t": "hb"},
                    {"t": "ready", "result": {**result, "files": {}, "files_skipped": ["big.bin"],
                                              "logs_cut": {"stdout.log": 10}}}]:
        wire = msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)
        assert validate(wire, DRIVER) == wire


@pytest.mark.parametrize(("message", "error"), [
    ({"t": "trial", "hparams": {}, "trial_dir": "/tmp/x"}, "trial message: 'trial_id' is missing"),
    ({"t": "trial", "trial_id": 1, "hparams": [], "trial_dir": "/tmp/x"},
     "'hparams' must be a map, got list"),
    ({"t": "trial", "trial_id": 1, "hparams": {}}, "trial message: 'trial_dir' is missing"),
    ({"t": "decision"}, "decision message: 'stop' is missing"),
    ({"t": "decision", "stop": 3}, "'stop' must be a str, got int"),
    ({"t": "abort", "trial_id": "x"}, "abort message: 'trial_id' must be an int, got str"),
    ({"t": "report", "trial_id": 1}, "unknown kind 'report': a worker accepts 'trial'"),
], ids=lambda v: None)
def test_malformed_messages_to_a_worker_are_rejected(message: Any, error: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        validate(message, WORKER)
    assert error in str(info.value)
    for good in ({"t": "trial", "trial_id": 1, "hparams": {"lr": 0.1}, "trial_dir": "/tmp/x", "attempt": 0,
                  "seed": 5, "dist": {"rank": 0}, "component": None},
                 {"t": "decision", "stop": None}, {"t": "decision", "stop": "pruned", "error": None},
                 {"t": "abort", "trial_id": 1, "reason": "timeout"}, {"t": "shutdown"}):
        assert validate(good, WORKER) == good


def test_an_authenticated_peer_sending_a_malformed_report_is_dropped_with_the_reason(server: Server) -> None:
    conn = protocol.client_connect(server.address, server.secret, timeout=5)
    conn.send(HELLO)
    conn.send({"t": "report"})
    kinds = [next_event(server) for _ in range(3)]
    assert [e.kind for e in kinds] == ["message", "malformed", "closed"]
    assert kinds[1].message == {"error": "report message: 'trial_id' is missing"}
    assert kinds[1].peer is kinds[0].peer is kinds[2].peer
    assert read_until_closed(conn.sock, 5) == b""  # the driver hung up on it
    conn.close()


@pytest.mark.parametrize(("payload", "error"), [
    (struct.pack(">I", 0xFFFFFFFF), "message of 4294967295 bytes exceeds the 67108864 byte limit"),
    (struct.pack(">I", 1) + b"\xc1", "message is not valid msgpack"),
    (frame([1, 2, 3]), "message must be a map, got list"),
    (frame({"t": "shutdown"}), "unknown kind 'shutdown'"),
], ids=["length-over-limit", "not-msgpack", "not-a-map", "wrong-direction"])
def test_broken_frames_from_an_authenticated_peer_are_malformed(server: Server, payload: bytes,
                                                                error: str) -> None:
    with raw_authenticated(server) as sock:
        started = time.monotonic()
        sock.sendall(payload)  # an oversized length comes with no body: refused without waiting for one
        event = next_event(server)
        assert event.kind == "malformed" and error in event.message["error"]
        assert time.monotonic() - started < 1
        assert next_event(server).kind == "closed"
        assert read_until_closed(sock, 5) == b""


def test_a_worker_drops_a_driver_that_sends_a_malformed_message() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    secret = protocol.new_secret()

    def drive() -> None:
        with listener:
            sock, _ = listener.accept()
            conn = protocol.server_handshake(sock, secret)
            conn.send({"t": "decision"})  # no 'stop'
            read_until_closed(sock, 5)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    conn = protocol.client_connect(listener.getsockname()[:2], secret, timeout=5)
    with pytest.raises(MalformedMessage, match="decision message: 'stop' is missing"):
        conn.recv()
    conn.close()
    thread.join(5)


# ------------------------------------------------------------------------------------ slowloris
def test_a_peer_trickling_its_answer_is_cut_off_at_the_handshake_deadline(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HANDSHAKE_TIMEOUT_S", 1.5)
    with socket.create_connection(server.address, timeout=5) as slow:
        started = time.monotonic()
        assert len(recv_exact(slow, HEADER)) == HEADER
        stop = threading.Event()

        def trickle() -> None:  # one byte each 0.5 s: a per-read timeout never fires
            while not stop.wait(0.5):
                try:
                    slow.send(b"\x00")
                except OSError:
                    return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            assert read_until_closed(slow, 6) == b""
        finally:
            stop.set()
        waited = time.monotonic() - started
    assert waited < 1.5 + 1.0, f"cut off after {waited:.1f} s"
    assert server.rejected == 1


def test_idle_connections_beyond_the_cap_are_dropped_and_workers_are_still_served(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HANDSHAKE_TIMEOUT_S", 5.0)
    early = protocol.client_connect(server.address, server.secret, timeout=5)  # in before the flood
    early.send(HELLO)
    assert next_event(server).message == HELLO
    idle = []
    try:
        flood_started = time.monotonic()
        for _ in range(200):  # connected, sending nothing
            idle.append(socket.create_connection(server.address, timeout=5))
        early.send({"t": "hb"})
        assert next_event(server, timeout=1).message == {"t": "hb"}  # served during the flood
        cap = 64
        deadline = time.monotonic() + 2
        while server.rejected < 200 - cap and time.monotonic() < deadline:
            time.sleep(0.01)
        # Long before the handshake deadline, all but the cap were dropped (not left holding threads).
        assert server.rejected >= 200 - cap
        assert time.monotonic() - flood_started < 5.0
        assert server.pending <= cap
        # A new worker gets in at once, with the idle ones still holding every pending slot.
        started = time.monotonic()
        late = protocol.client_connect(server.address, server.secret, timeout=5)
        late.send({**HELLO, "worker": "worker-1"})
        event = next_event(server, timeout=1)
        assert event.kind == "message" and event.message["worker"] == "worker-1"
        assert time.monotonic() - started < 1
        assert server.pending <= cap
        late.close()
    finally:
        for sock in idle:
            sock.close()
        early.close()


def test_connections_beyond_the_cap_make_the_oldest_pending_one_go() -> None:
    server = Server(protocol.new_secret(), max_pending=4, handshake_timeout_s=10)
    try:
        first = [socket.create_connection(server.address, timeout=5) for _ in range(4)]
        for sock in first:
            assert len(recv_exact(sock, HEADER)) == HEADER  # each is pending: it got its challenge
        assert server.pending == 4 and server.rejected == 0
        extra = socket.create_connection(server.address, timeout=5)
        assert len(recv_exact(extra, HEADER)) == HEADER
        assert read_until_closed(first[0], 2) == b""  # the oldest was refused at once
        for sock in first[1:]:
            sock.settimeout(0.2)
            with pytest.raises(socket.timeout):
                sock.recv(1)  # still open
        assert server.pending == 4
        deadline = time.monotonic() + 2
        while server.rejected < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.rejected == 1
        for sock in [*first, extra]:
            sock.close()
    finally:
        server.close()
    with pytest.raises(ValueError, match="max_pending=0"):
        Server(protocol.new_secret(), max_pending=0)


# ------------------------------------------------------------------------ a search under attack
INTRUDER = """
import os, sys, time
from unison import protocol
MISCHIEF = {
    "report": lambda trial_id: {"t": "report"},  # no trial_id, step or metrics
    "result": lambda trial_id: {"t": "ready", "result": {"trial_id": trial_id + 1000, "status": "completed"}},
}
host, port = os.environ["INTRUDER_DRIVER"].rsplit(":", 1)
conn = protocol.client_connect((host, int(port)), bytes.fromhex(os.environ["INTRUDER_SECRET"]))
conn.send({"t": "hello", "worker": "intruder", "host": "localhost", "pid": os.getpid()})
conn.send({"t": "ready"})
print("connected", flush=True)
while True:
    try:
        message = conn.recv()
    except ConnectionError:
        sys.exit(0)
    if message["t"] == "trial" and os.environ["INTRUDER_SENDS"] == "spoof":
        print("got trial", message["trial_id"], flush=True)
        for n in range(300):  # report for the other trials until one runs on a real worker
            try:
                conn.send({"t": "report", "trial_id": message["trial_id"] + 1 + n % 7, "step": 0,
                           "metrics": {"value": 99.0}})
                conn.recv()
            except ConnectionError:
                sys.exit(0)
            time.sleep(0.01)
    elif message["t"] == "trial":
        print("got trial", message["trial_id"], flush=True)
        conn.send(MISCHIEF[os.environ["INTRUDER_SENDS"]](message["trial_id"]))
    elif message["t"] == "shutdown":
        sys.exit(0)
"""


class IntrudedLocal(unison.Local):
    """The local backend, plus one process that holds the experiment's secret and misbehaves."""

    intruder: subprocess.Popen[bytes] | None = None

    def __init__(self, sends: str, workers: int) -> None:
        super().__init__(workers=workers)
        self.sends = sends

    def start(self, spec: LaunchSpec) -> None:
        address = spec.address
        env = dict(os.environ, INTRUDER_DRIVER=f"{address[0]}:{address[1]}",
                   INTRUDER_SECRET=spec.secret.hex(),
                   INTRUDER_SENDS=self.sends)
        self.intruder = subprocess.Popen([sys.executable, "-c", INTRUDER], env=env, stdout=subprocess.PIPE)
        assert self.intruder.stdout is not None
        self.intruder.stdout.readline()  # "connected": it is heard before the real workers start
        super().start(spec)

    def stop(self, force: bool = False) -> None:
        super().stop(force=force)
        if self.intruder is not None:
            try:
                self.intruder.wait(10)
            except subprocess.TimeoutExpired:
                self.intruder.kill()
                self.intruder.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("sends", "problem"), [
    ("report", "malformed message: report message: 'trial_id' is missing"),
    ("result", "malformed message: ready message: 'result'['trial_id'] is 10"),  # not the trial it runs
    ("spoof", "a trial this worker does not run"),  # reports for another worker's trial
])
def test_a_search_survives_an_authenticated_peer_sending_a_malformed_message(tmp_path: Path, sends: str,
                                                                             problem: str) -> None:
    def fn(x: float) -> float:
        time.sleep(0.3)
        return x

    backend = IntrudedLocal(sends, workers=2)
    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=8, seed=3),
                   backend=backend, storage=tmp_path, progress=False)
    assert backend.intruder is not None and backend.intruder.returncode == 0
    got = backend.intruder.stdout.read().decode() if backend.intruder.stdout else ""
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 8
    events = [json.loads(line) for line in (r.path / "journal.jsonl").read_text().splitlines()]
    ends = [ev["id"] for ev in events if ev["e"] == "end"]
    assert sorted(ends) == list(range(8))  # each trial ended once
    assert not [ev for ev in events if ev["e"] == "report"]  # fn reports nothing: nor was the intruder heard
    log = (r.path / "workers" / "intruder.log").read_text()
    assert problem in log
    # It connects before the real workers and is handed a trial: that trial is lost, then run by a worker.
    assert got.startswith("got trial"), got
    stolen = int(got.split()[2])
    assert [ev for ev in events if ev["e"] == "lost" and ev["id"] == stolen]
    assert r.trials.set_index("trial_id").loc[stolen, "worker"].startswith("worker-")
