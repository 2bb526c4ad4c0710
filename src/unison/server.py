"""The driver's listening socket: accepts workers, authenticates them, queues their messages.

Every connection gets a reader thread that turns frames into events on one queue; the driver's
loop is the only consumer, so driver state is touched by one thread only.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from unison.protocol import Connection, ProtocolError, server_handshake


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
    """``kind`` is ``message`` (``message`` set) or ``closed`` (the peer went away)."""

    kind: str
    peer: Peer
    message: dict[str, Any] | None = None


class Server:
    """Listens on ``host`` (loopback by default) and feeds authenticated messages to ``events``."""

    def __init__(self, secret: bytes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.secret = secret
        self.events: queue.Queue[Event] = queue.Queue()
        self.rejected = 0
        self._ids = itertools.count(1)
        self._sock = socket.create_server((host, port), backlog=128)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._closed = threading.Event()
        self._peers: dict[int, Peer] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="unison-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), name="unison-peer", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        import time

        try:
            conn = server_handshake(sock, self.secret)
        except (ProtocolError, OSError):
            self.rejected += 1
            try:
                sock.close()
            except OSError:
                pass
            return
        peer = Peer(next(self._ids), conn, last_seen=time.monotonic())
        with self._lock:
            if self._closed.is_set():  # authenticated just as the driver closed: nothing to serve
                conn.close()
                return
            self._peers[peer.peer_id] = peer
        try:
            while True:
                message = conn.recv()
                peer.last_seen = time.monotonic()
                self.events.put(Event("message", peer, message))
        except (ConnectionError, OSError, ValueError, Exception):  # noqa: BLE001 - any broken stream ends the peer
            pass
        finally:
            with self._lock:
                self._peers.pop(peer.peer_id, None)
            conn.close()
            self.events.put(Event("closed", peer))

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
        for peer in peers:
            peer.conn.close()
