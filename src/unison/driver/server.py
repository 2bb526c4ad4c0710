"""The driver's listening socket: accepts workers, authenticates them, queues their messages.

Every connection gets a thread. Until it has authenticated (within the handshake deadline, see
:mod:`unison.protocol`) it is *pending*; at most ``max_pending`` connections are pending at once: a
connection beyond that makes room by dropping the oldest pending one (counted in ``rejected``), so
idle or trickling strangers hold neither many threads nor the door: a worker, which answers the
challenge in one round trip, gets in even while hundreds of them keep connecting. An authenticated
connection's thread turns frames into events on one queue; the driver's loop is the only consumer,
so driver state is touched by one thread only.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from unison.protocol import Connection, MalformedMessage, ProtocolError, server_handshake

MAX_PENDING_HANDSHAKES = 64

# The kinds of :class:`Event`.
MESSAGE = "message"      # a validated message arrived
MALFORMED = "malformed"  # the peer sent a message that failed validation; CLOSED follows
CLOSED = "closed"        # the peer went away


@dataclass
class Peer:
    """One authenticated worker connection as the driver sees it."""

    peer_id: int
    conn: Connection
    info: dict[str, Any] = field(default_factory=dict)
    last_seen: float = 0.0
    trial_id: int | None = None
    reserved_id: int | None = None  # the trial it was handed to start after this one (not started)
    waiting: bool = False
    endpoint: dict[str, Any] = field(default_factory=dict)  # distributed: address, port, gpus
    aborted: bool = False  # told to end itself: its trial is no longer its own

    @property
    def name(self) -> str:
        return str(self.info.get("worker", f"peer-{self.peer_id}"))


@dataclass
class Event:
    """``kind`` is :data:`MESSAGE` (``message`` set: a validated message), :data:`MALFORMED`
    (``message`` is ``{"error": what was wrong}``; the connection is closed next, and a :data:`CLOSED`
    event follows) or :data:`CLOSED` (the peer went away)."""

    kind: str
    peer: Peer
    message: dict[str, Any] | None = None


class Server:
    """Listens on ``host`` (loopback by default) and feeds authenticated messages to ``events``.

    ``rejected`` counts connections that did not authenticate (a wrong answer, the deadline passed,
    or dropped to make room beyond ``max_pending``); ``handshake_timeout_s`` defaults to
    :data:`unison.protocol.HANDSHAKE_TIMEOUT_S`."""

    def __init__(self, secret: bytes, host: str = "127.0.0.1", port: int = 0,
                 max_pending: int = MAX_PENDING_HANDSHAKES, handshake_timeout_s: float | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"Server(max_pending={max_pending}): must be at least 1, e.g. 64")
        self.secret = secret
        self.events: queue.Queue[Event] = queue.Queue()
        self.rejected = 0
        self.max_pending = max_pending
        self.handshake_timeout_s = handshake_timeout_s
        self._ids = itertools.count(1)
        self._sock = socket.create_server((host, port), backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._closed = threading.Event()
        self._peers: dict[int, Peer] = {}
        self._pending: dict[int, socket.socket] = {}  # connection number -> socket, oldest first
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="unison-accept", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """How many connections are awaiting authentication now."""
        with self._lock:
            return len(self._pending)

    def _accept_loop(self) -> None:
        numbers = itertools.count()
        while not self._closed.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            number = next(numbers)
            with self._lock:
                while len(self._pending) >= self.max_pending:
                    # Drop the oldest: it has had the longest to answer a challenge a worker answers at once.
                    oldest = self._pending.pop(next(iter(self._pending)))
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)  # wakes its thread, which closes it and counts it
                    except OSError:
                        pass
                self._pending[number] = sock
            try:
                threading.Thread(target=self._serve, args=(sock, number), name="unison-peer",
                                 daemon=True).start()
            except RuntimeError:  # no thread to spare now: refuse this one, keep accepting
                with self._lock:
                    self._pending.pop(number, None)
                    self.rejected += 1
                sock.close()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            conn = server_handshake(sock, self.secret, self.handshake_timeout_s)
        except (ProtocolError, OSError):
            conn = None
        with self._lock:
            evicted = self._pending.pop(number, None) is None  # dropped to make room, or the server closed
            closed = self._closed.is_set()
            peer = None
            if conn is not None and not evicted and not closed:
                peer = Peer(next(self._ids), conn, last_seen=time.monotonic())
                self._peers[peer.peer_id] = peer
            elif not closed:
                self.rejected += 1
        if peer is None:
            try:
                sock.close()
            except OSError:
                pass
            return
        conn = peer.conn
        try:
            while True:
                message = conn.recv()
                peer.last_seen = time.monotonic()
                self.events.put(Event(MESSAGE, peer, message))
        except MalformedMessage as exc:
            self.events.put(Event(MALFORMED, peer, {"error": str(exc)}))
        except Exception:  # noqa: BLE001 - any broken stream ends the peer
            pass
        finally:
            with self._lock:
                self._peers.pop(peer.peer_id, None)
            conn.close()
            self.events.put(Event(CLOSED, peer))

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            peers = list(self._peers.values())
            pending = list(self._pending.values())
            self._pending.clear()
        for sock in pending:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for peer in peers:
            peer.conn.close()
