"""Driver <-> worker wire protocol: mutual HMAC challenge-response, then length-prefixed msgpack.

Handshake (fixed sizes, nothing parsed before it succeeds):
    driver -> worker: MAGIC (8 bytes) + nonce (32 random bytes)
    worker -> driver: HMAC-SHA256(secret, b"worker" + nonce)   (32 bytes)
    driver -> worker: HMAC-SHA256(secret, b"driver" + nonce)   (32 bytes)
A peer that sends anything else, or does not finish within :data:`HANDSHAKE_TIMEOUT_S` (one deadline
for the whole handshake, however slowly the bytes trickle in), is disconnected. After the handshake
every message is a 4-byte big-endian length and a msgpack map; pickled bytes never cross the socket.

Every message received is checked against the schema of its kind (:func:`validate`): the kinds the
driver receives are in :data:`TO_DRIVER`, those a worker receives in :data:`TO_WORKER`. A message of
an unknown kind, without a required key, with a value of the wrong type or beyond a bound
(:data:`MAX_METRICS`, :data:`MAX_NAME_CHARS`, :data:`MAX_TEXT_CHARS`, ...) raises
:class:`MalformedMessage`; keys a schema does not name are ignored (newer peers may send more).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, TypedDict, cast

import msgpack

from unison.gpus import GPU_ID, MAX_GPU_ID_CHARS, MAX_GPUS

MAGIC = b"UNISON01"
NONCE_BYTES = 32
SECRET_BYTES = 32  # 256 bits, per experiment
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT_S = 3.0  # the whole handshake, not each read
HANDSHAKE_ATTEMPTS = 3  # a worker's tries when the driver hangs up during the handshake
_RECV_CHUNK = 1024 * 1024  # a frame's buffer grows with the bytes that arrive, not with its announced length
_LENGTH = struct.Struct(">I")

# ----------------------------------------------------------------------------- message kinds
# What workers send the driver.
HELLO: Final = "hello"              # worker, host, pid (and a Ray node id): who it is
READY: Final = "ready"              # asks for a trial; carries the previous trial's result and, in
                                    # distributed experiments, the endpoint it would host a process group at
REPORT: Final = "report"            # an intermediate report: trial_id, step, metrics; answered by DECISION
RANK_FAILED: Final = "rank_failed"  # a rank's function raised: trial_id, error (its outcome follows)
FILES: Final = "files"              # an aborted rank's shipped files: trial_id, files
FATAL: Final = "fatal"              # the worker cannot load the training function: error
CHECKPOINT_CHUNK: Final = "checkpoint_chunk"  # (both ways) part of a checkpoint's file, for a worker
                                    # without the driver's disk: trial_id, step, file, offset, data, last
HEARTBEAT: Final = "hb"             # still alive
# What the driver sends workers.
TRIAL: Final = "trial"              # run (or hold, to run next) this trial
DECISION: Final = "decision"        # the answer to a REPORT: stop (None to go on, else the reason)
ABORT: Final = "abort"              # end the process now: another rank of this trial failed, or it timed out
SHUTDOWN: Final = "shutdown"        # no more trials
CHECKPOINT_ACK: Final = "checkpoint_ack"  # a CHECKPOINT_CHUNK was written: trial_id, step (error: refused)

MAX_METRICS = 1_000            # metrics in one report or result
MAX_NAME_CHARS = 1_000         # a metric, host, address, file name, status, ...
MAX_TEXT_CHARS = 16 * 1024 * 1024  # a traceback, a stop reason (the frame limit bounds the total anyway)
MAX_FILES = 100_000            # files shipped in one message
MAX_HPARAMS = 10_000
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # the data of one checkpoint_chunk
MAX_CHECKPOINT_FILES = 100_000     # files in one shipped checkpoint
TRIAL_STATUSES = ("completed", "failed", "stopped")
_WORKER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]*")  # it names the worker's log file


class ProtocolError(ConnectionError):
    """The peer is not a unison peer with the experiment's secret, or broke the framing."""


class MalformedMessage(ProtocolError):
    """An authenticated peer sent a message that does not match its kind's schema (or no message at all:
    bytes that are not msgpack, a frame over :data:`MAX_MESSAGE_BYTES`)."""


def new_secret() -> bytes:
    """A fresh random per-experiment secret."""
    return os.urandom(SECRET_BYTES)


# ---------------------------------------------------------------------------------- schemas
class _Invalid(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")


_Check = Callable[[Any, str], None]


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _integer(lo: int | None = None, hi: int | None = None) -> _Check:
    def check(value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"must be an int, got {_type_name(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise _Invalid(path, f"must be {bounds}, got {value}")
    return check


def _number(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(path, f"must be a number, got {_type_name(value)}")


def _text(max_chars: int, pattern: re.Pattern[str] | None = None) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _Invalid(path, f"must be a str, got {_type_name(value)}")
        if len(value) > max_chars:
            raise _Invalid(path, f"has {len(value)} characters, at most {max_chars} are allowed")
        if pattern is not None and not pattern.fullmatch(value):
            raise _Invalid(path, f"must match {pattern.pattern!r}, got {value[:80]!r}")
    return check


def _one_of(*choices: str) -> _Check:
    def check(value: Any, path: str) -> None:
        if value not in choices or not isinstance(value, str):
            raise _Invalid(path, f"must be one of {', '.join(map(repr, choices))}, got {value!r:.80}")
    return check


def _optional(inner: _Check) -> _Check:
    def check(value: Any, path: str) -> None:
        if value is not None:
            inner(value, path)
    return check


def _blob(value: Any, path: str) -> None:
    if not isinstance(value, bytes):
        raise _Invalid(path, f"must be bytes, got {_type_name(value)}")


def _bounded_blob(max_bytes: int) -> _Check:
    def check(value: Any, path: str) -> None:
        _blob(value, path)
        if len(value) > max_bytes:
            raise _Invalid(path, f"has {len(value)} bytes, at most {max_bytes} are allowed")
    return check


def _boolean(value: Any, path: str) -> None:
    if not isinstance(value, bool):
        raise _Invalid(path, f"must be a bool, got {_type_name(value)}")


def _relative_path(max_chars: int) -> _Check:
    """A ``/``-separated path that stays inside the folder it is relative to."""
    text = _text(max_chars)

    def check(value: Any, path: str) -> None:
        text(value, path)
        if (value.startswith("/") or "\\" in value or "\0" in value
                or any(part in ("", ".", "..") for part in value.split("/"))):
            raise _Invalid(path, f"must be a relative path inside its folder (no '..', '.' or empty part, "
                                 f"no leading '/', no backslash), got {value[:80]!r}")
    return check


def _anything(value: Any, path: str) -> None:
    pass


def _mapping(values: _Check, max_items: int, keys: _Check | None = None) -> _Check:
    key_check = keys or _text(MAX_NAME_CHARS)

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, f"must be a map, got {_type_name(value)}")
        if len(value) > max_items:
            raise _Invalid(path, f"has {len(value)} entries, at most {max_items} are allowed")
        for key, item in value.items():
            key_check(key, f"{path} key {key!r:.80}")
            values(item, f"{path}[{key!r}]")
    return check


def _sequence(items: _Check, max_items: int) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list):
            raise _Invalid(path, f"must be a list, got {_type_name(value)}")
        if len(value) > max_items:
            raise _Invalid(path, f"has {len(value)} items, at most {max_items} are allowed")
        for i, item in enumerate(value):
            items(item, f"{path}[{i}]")
    return check


class _Field:
    __slots__ = ("check", "required")

    def __init__(self, check: _Check, required: bool = True) -> None:
        self.check, self.required = check, required


def _opt(check: _Check) -> _Field:
    return _Field(check, required=False)


_Schema = dict[str, _Field]


def _check_fields(message: dict[str, Any], schema: _Schema, prefix: str) -> None:
    for key, spec in schema.items():
        path = f"{prefix}[{key!r}]" if prefix else repr(key)
        if key not in message:
            if spec.required:
                raise _Invalid(path, "is missing")
            continue
        spec.check(message[key], path)


def _record(schema: _Schema) -> _Check:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(path, f"must be a map, got {_type_name(value)}")
        _check_fields(value, schema, path)
    return check


_TRIAL_ID = _integer(0)
_METRICS = _mapping(_number, MAX_METRICS)
_FILES = _mapping(_blob, MAX_FILES, keys=_text(4096))
_NAME = _text(MAX_NAME_CHARS)
_TEXT = _text(MAX_TEXT_CHARS)

#: A trial's outcome as :meth:`TrialRunner.run` returns it (the ``result`` of ``ready``).
RESULT_SCHEMA: _Schema = {
    "trial_id": _Field(_TRIAL_ID),
    "status": _Field(_one_of(*TRIAL_STATUSES)),
    "metrics": _opt(_optional(_METRICS)),
    "error": _opt(_optional(_TEXT)),
    "error_kind": _opt(_optional(_NAME)),
    "duration": _opt(_optional(_number)),
    "steps": _opt(_integer(0)),
    "last_step": _opt(_optional(_integer())),
    "stop_reason": _opt(_optional(_TEXT)),
    "files": _opt(_FILES),
    "files_skipped": _opt(_sequence(_TEXT, MAX_FILES)),
    "logs_cut": _opt(_mapping(_integer(0), 16)),  # log file name -> bytes cut; journaled as sent
}

#: A checkpoint a report saved (``report``'s ``checkpoint``): its step, its folder relative to the
#: trial folder (only ``checkpoints/step-<n>``: a worker names no other path) and its size in bytes.
CHECKPOINT_SAVED_SCHEMA: _Schema = {
    "step": _Field(_integer()),
    "path": _Field(_text(64, re.compile(r"checkpoints/step--?\d{6,}"))),
    "size": _Field(_integer(0)),
    # a worker without the driver's disk: the bytes and files it sent as checkpoint_chunk messages
    "shipped": _opt(_integer(0)),
    "files": _opt(_integer(0, MAX_CHECKPOINT_FILES)),
}

#: A part of one file of a checkpoint (``checkpoint_chunk``, both ways): a worker without the driver's
#: disk ships each checkpoint it saves before the report naming it, and the driver ships the one a
#: trial resumes from before its ``trial`` message. ``file`` is relative to the checkpoint's folder;
#: a file's chunks come in order (``offset``), its last one says ``last``.
CHECKPOINT_CHUNK_SCHEMA: _Schema = {
    "trial_id": _Field(_TRIAL_ID),
    "step": _Field(_integer()),
    "file": _Field(_relative_path(4096)),
    "offset": _Field(_integer(0)),
    "data": _Field(_bounded_blob(MAX_CHUNK_BYTES)),
    "last": _Field(_boolean),
}

#: What a trial message says of checkpoints (``trial``'s ``checkpoint``): how many to keep and by which
#: metric, and the one to resume from (``path`` on the driver's disk, ``step``), if any. Never its bytes.
#: ``root``: with ``checkpoint_storage=``, the trial's checkpoints folder there (a URL or a shared path),
#: which the worker writes into directly; ``path`` is then a checkpoint there.
CHECKPOINT_SPEC_SCHEMA: _Schema = {
    "keep": _Field(_integer(0)),
    "metric": _opt(_optional(_NAME)),
    "mode": _opt(_one_of("max", "min")),
    "path": _opt(_optional(_text(4096))),
    "step": _opt(_optional(_integer())),
    "root": _opt(_optional(_text(4096))),
}

#: One schema per kind of message the driver receives.
TO_DRIVER: dict[str, _Schema] = {
    HELLO: {
        "worker": _Field(_text(200, _WORKER_NAME)),
        "host": _Field(_NAME),
        "pid": _Field(_integer(0)),
        "node": _opt(_text(200, _WORKER_NAME)),  # the cluster node (Ray's node id), beside the hostname
        # the physical ids of the GPUs its backend gave it (CUDA_VISIBLE_DEVICES), see unison.gpus
        "gpus": _opt(_sequence(_text(MAX_GPU_ID_CHARS, GPU_ID), MAX_GPUS)),
    },
    READY: {
        "result": _opt(_record(RESULT_SCHEMA)),
        "address": _opt(_NAME),
        "port": _opt(_integer(0, 65535)),
        "gpus": _opt(_integer(0)),
    },
    REPORT: {"trial_id": _Field(_TRIAL_ID), "step": _Field(_integer()), "metrics": _Field(_METRICS),
             "checkpoint": _opt(_record(CHECKPOINT_SAVED_SCHEMA)), "wait": _opt(_boolean)},
    RANK_FAILED: {"trial_id": _Field(_TRIAL_ID), "error": _Field(_TEXT)},
    FILES: {"trial_id": _Field(_TRIAL_ID), "files": _Field(_FILES)},
    FATAL: {"error": _Field(_TEXT)},
    HEARTBEAT: {},
    CHECKPOINT_CHUNK: CHECKPOINT_CHUNK_SCHEMA,
}

#: One schema per kind of message a worker receives.
TO_WORKER: dict[str, _Schema] = {
    TRIAL: {
        "trial_id": _Field(_TRIAL_ID),
        "hparams": _Field(_mapping(_anything, MAX_HPARAMS)),
        "trial_dir": _Field(_text(4096)),
        "attempt": _opt(_integer(0)),
        "seed": _opt(_optional(_integer())),
        "dist": _opt(_mapping(_anything, 1000)),
        "checkpoint": _opt(_record(CHECKPOINT_SPEC_SCHEMA)),
    },
    DECISION: {"stop": _Field(_optional(_TEXT)), "error": _opt(_optional(_TEXT)),
               "fail": _opt(_optional(_TEXT)), "judged": _opt(_boolean), "trial_id": _opt(_TRIAL_ID)},
    ABORT: {"trial_id": _opt(_optional(_TRIAL_ID)), "reason": _opt(_optional(_TEXT))},
    SHUTDOWN: {},
    CHECKPOINT_CHUNK: CHECKPOINT_CHUNK_SCHEMA,
    CHECKPOINT_ACK: {"trial_id": _Field(_TRIAL_ID), "step": _Field(_integer()),
                     "error": _opt(_optional(_TEXT))},
}


# ---------------------------------------------------------------------------- typed messages
# The shapes of the schemas above, for type checkers: a message that passed :func:`validate` has the
# shape of its kind's TypedDict. Each kind's required keys sit in a base class, its optional ones below.
class _TrialOutcomeKeys(TypedDict):
    trial_id: int
    status: str  # one of TRIAL_STATUSES on the wire


class TrialOutcome(_TrialOutcomeKeys, total=False):
    """A trial's outcome as :meth:`unison.worker.runtime.TrialRunner.run` returns it and ``ready``
    carries it (:data:`RESULT_SCHEMA`)."""

    metrics: dict[str, float] | None
    error: str | None
    error_kind: str | None
    duration: float | None
    steps: int
    last_step: int | None
    stop_reason: str | None
    files: dict[str, bytes]  # relative path -> contents, from a worker without the driver's disk
    files_skipped: list[str]
    logs_cut: dict[str, int]


class _HelloKeys(TypedDict):
    t: Literal["hello"]
    worker: str
    host: str
    pid: int


class HelloMessage(_HelloKeys, total=False):
    """A worker's first message: who it is, the cluster node it runs on if it runs on one (Ray's
    node id: two Ray nodes may share a hostname), and the GPUs its backend gave it, if any."""

    node: str
    gpus: list[str]


class _ReadyKeys(TypedDict):
    t: Literal["ready"]


class ReadyMessage(_ReadyKeys, total=False):
    """A worker asks for a trial, with the previous trial's outcome and, in a distributed experiment,
    the endpoint it would host a process group at."""

    result: TrialOutcome
    address: str
    port: int
    gpus: int


class _ReportKeys(TypedDict):
    t: Literal["report"]
    trial_id: int
    step: int
    metrics: dict[str, float]


class _CheckpointSavedKeys(TypedDict):
    step: int
    path: str  # relative to the trial folder: checkpoints/step-<n>
    size: int


class CheckpointSaved(_CheckpointSavedKeys, total=False):
    """A checkpoint saved with a report (:data:`CHECKPOINT_SAVED_SCHEMA`)."""

    shipped: int  # bytes sent in checkpoint_chunk messages (a worker without the driver's disk)
    files: int


class CheckpointChunkMessage(TypedDict):
    """Part of one file of a checkpoint (:data:`CHECKPOINT_CHUNK_SCHEMA`)."""

    t: Literal["checkpoint_chunk"]
    trial_id: int
    step: int
    file: str
    offset: int
    data: bytes
    last: bool


class _CheckpointAckKeys(TypedDict):
    t: Literal["checkpoint_ack"]
    trial_id: int
    step: int


class CheckpointAckMessage(_CheckpointAckKeys, total=False):
    """The driver wrote a checkpoint_chunk (``error``: it refused it, and the rest of that checkpoint)."""

    error: str | None


class ReportMessage(_ReportKeys, total=False):
    """An intermediate report, answered by a :class:`DecisionMessage`; with ``wait: False`` (the driver
    said no report is judged) only when there is something to say, a stop naming the trial."""

    checkpoint: CheckpointSaved
    wait: bool


class RankFailedMessage(TypedDict):
    """A rank's function raised (its outcome follows once it has cleaned up)."""

    t: Literal["rank_failed"]
    trial_id: int
    error: str


class FilesMessage(TypedDict):
    """The files an aborted rank saved."""

    t: Literal["files"]
    trial_id: int
    files: dict[str, bytes]


class FatalMessage(TypedDict):
    """The worker cannot load the training function."""

    t: Literal["fatal"]
    error: str


class DistSpec(TypedDict):
    """A rank's place in a distributed trial (the ``dist`` of its ``trial`` message)."""

    rank: int
    world_size: int
    local_rank: int  # among the trial's ranks on this host
    local_world_size: int
    master_addr: str | None  # rank 0's endpoint, where the process group meets
    master_port: int | None
    address: str | None  # this rank's own address
    backend: str  # nccl or gloo
    timeout_s: float | None
    strategy: Any
    peers: list[str]  # every rank's address:port, by rank
    framework: str


class _TrialKeys(TypedDict):
    t: Literal["trial"]
    trial_id: int
    hparams: dict[str, Any]
    trial_dir: str


class TrialMessage(_TrialKeys, total=False):
    """Run (or hold, to run next) this trial; build it with :func:`trial_message`."""

    attempt: int
    seed: int | None
    dist: DistSpec
    component: dict[str, Any]  # an ablation trial's component
    checkpoint: dict[str, Any]  # keep, metric, mode; path, step to resume from; root (CHECKPOINT_SPEC_SCHEMA)


class _DecisionKeys(TypedDict):
    t: Literal["decision"]
    stop: str | None  # None: go on; else why the trial stops


class DecisionMessage(_DecisionKeys, total=False):
    """The driver's answer to a :class:`ReportMessage`."""

    error: str | None  # the report lacks the metric the search optimizes
    fail: str | None  # the checkpoint the report names was refused: the trial fails with this
    judged: bool  # False: the search has no scheduler, later reports may be sent without waiting
    trial_id: int  # set on the answer to a report that did not wait (read at the trial's next report)


class _AbortKeys(TypedDict):
    t: Literal["abort"]


class AbortMessage(_AbortKeys, total=False):
    """End the worker's process now."""

    trial_id: int | None
    reason: str | None


def trial_message(trial: Mapping[str, Any], dist: DistSpec | None = None) -> TrialMessage:
    """The ``trial`` message for ``trial`` (what :meth:`SearchDriver.start` or ``reserve`` returns:
    ``trial_id``, ``hparams``, ``trial_dir``, ...), with ``dist`` for a rank of a distributed trial."""
    message = cast(TrialMessage, {"t": TRIAL, **trial})
    if dist is not None:
        message["dist"] = dist
    return message


DRIVER = "driver"  # ``receiver`` of :func:`validate`: a message a worker sent the driver
WORKER = "worker"  # a message the driver sent a worker
_SCHEMAS = {DRIVER: TO_DRIVER, WORKER: TO_WORKER}


def validate(message: Any, receiver: str) -> dict[str, Any]:
    """Return ``message`` if it is a well-formed message for ``receiver`` (:data:`DRIVER` or
    :data:`WORKER`); otherwise raise :class:`MalformedMessage` saying what is wrong, e.g.
    ``report message: 'trial_id' is missing``, or
    ``ready message: 'result'['steps'] must be an int, got str``."""
    schemas = _SCHEMAS[receiver]
    if not isinstance(message, dict):
        raise MalformedMessage(f"message must be a map, got {_type_name(message)}")
    kind = message.get("t")
    if not isinstance(kind, str) or kind not in schemas:
        what = "has no kind ('t' is missing)" if "t" not in message else f"has an unknown kind {kind!r:.80}"
        raise MalformedMessage(f"message {what}: a {receiver} accepts {', '.join(map(repr, schemas))}")
    try:
        _check_fields(message, schemas[kind], "")
    except _Invalid as exc:
        raise MalformedMessage(f"{kind} message: {exc}") from None
    return message


# ------------------------------------------------------------------------------- transport
def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes from ``sock``; with ``deadline`` (a :func:`time.monotonic` time), all of them by then
    (``TimeoutError`` otherwise), however they trickle in. The buffer grows as bytes arrive."""
    buffer = bytearray()
    while len(buffer) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out with {len(buffer)} of {n} bytes received")
            sock.settimeout(remaining)
        chunk = sock.recv(min(n - len(buffer), _RECV_CHUNK))
        if not chunk:
            raise ConnectionError("connection closed by peer")
        buffer += chunk
    return bytes(buffer)


class Connection:
    """A framed, authenticated message stream. ``send`` is thread-safe; one thread receives.

    ``receiver`` (:data:`DRIVER` or :data:`WORKER`): :meth:`recv` validates each message against the
    schemas of what that side receives; ``None``: no validation."""

    def __init__(self, sock: socket.socket, receiver: str | None = None) -> None:
        self.sock = sock
        self.receiver = receiver
        self._send_lock = threading.Lock()

    def send(self, message: Mapping[str, Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        with self._send_lock:
            self.sock.sendall(_LENGTH.pack(len(data)) + data)

    def recv(self) -> dict[str, Any]:
        """The next message. Raises ``ConnectionError`` when the stream ends, :class:`MalformedMessage`
        on a frame over the limit, bytes that are not a msgpack map, or a message that fails
        :func:`validate`."""
        (length,) = _LENGTH.unpack(_recv_exact(self.sock, _LENGTH.size))
        if length > MAX_MESSAGE_BYTES:  # refused before reading (or allocating) any of it
            raise MalformedMessage(f"message of {length} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit")
        data = _recv_exact(self.sock, length)
        try:
            message = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types for broken input
            raise MalformedMessage(f"message is not valid msgpack: {type(exc).__name__}: {exc}") from None
        if self.receiver is not None:
            return validate(message, self.receiver)
        if not isinstance(message, dict):
            raise MalformedMessage(f"message must be a map, got {_type_name(message)}")
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def server_handshake(sock: socket.socket, secret: bytes, timeout: float | None = None) -> Connection:
    """Authenticate a worker that connected to the driver within ``timeout`` seconds in all (default
    :data:`HANDSHAKE_TIMEOUT_S`); raises :class:`ProtocolError`. The connection validates what it
    receives as the driver."""
    deadline = time.monotonic() + (HANDSHAKE_TIMEOUT_S if timeout is None else timeout)
    nonce = os.urandom(NONCE_BYTES)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(MAGIC + nonce)
        answer = _recv_exact(sock, 32, deadline)
    except (OSError, ConnectionError) as exc:
        raise ProtocolError(f"handshake failed: {exc}") from None
    if not hmac.compare_digest(answer, _mac(secret, b"worker", nonce)):
        raise ProtocolError("peer did not prove it holds the experiment secret")
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    try:
        sock.sendall(_mac(secret, b"driver", nonce))
    except OSError as exc:
        raise ProtocolError(f"handshake failed: {exc}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock, receiver=DRIVER)


def client_connect(address: tuple[str, int], secret: bytes, timeout: float = 30.0) -> Connection:
    """Connect to the driver and run the worker side of the handshake, each within ``timeout`` seconds
    (the driver is not hurried: it greets a connection as soon as it accepts it). A driver that hangs
    up during the handshake (it drops the oldest waiting connection when too many arrive at once, e.g.
    a hundred workers starting together) is tried again, up to :data:`HANDSHAKE_ATTEMPTS` times in all.
    The connection validates what it receives as a worker."""
    for attempt in range(1, HANDSHAKE_ATTEMPTS + 1):
        sock = socket.create_connection(address, timeout=timeout)
        deadline = time.monotonic() + max(timeout, HANDSHAKE_TIMEOUT_S)
        try:
            return _client_handshake(sock, address, secret, deadline)
        except ProtocolError:
            raise
        except ConnectionError as exc:  # closed or reset by the driver, not a wrong answer
            if attempt == HANDSHAKE_ATTEMPTS:
                raise ProtocolError(
                    f"the driver at {address[0]}:{address[1]} hung up during the handshake {attempt} times "
                    f"({exc}): this worker's secret is not the experiment's, or the driver is flooded with "
                    f"connections") from None
            time.sleep(0.1 * 2**attempt)
    raise AssertionError("unreachable")


def _client_handshake(sock: socket.socket, address: tuple[str, int], secret: bytes,
                      deadline: float) -> Connection:
    try:
        header = _recv_exact(sock, len(MAGIC) + NONCE_BYTES, deadline)
        if header[: len(MAGIC)] != MAGIC:
            raise ProtocolError(f"{address} is not a unison driver")
        nonce = header[len(MAGIC) :]
        sock.sendall(_mac(secret, b"worker", nonce))
        if not hmac.compare_digest(_recv_exact(sock, 32, deadline), _mac(secret, b"driver", nonce)):
            raise ProtocolError("driver did not prove it holds the experiment secret")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock, receiver=WORKER)
