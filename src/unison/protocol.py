"""Driver <-> worker wire protocol: mutual HMAC challenge-response, then length-prefixed msgpack.

Handshake (fixed sizes, nothing parsed before it succeeds):
    driver -> worker: MAGIC (8 bytes) + nonce (32 random bytes)
    worker -> driver: HMAC-SHA256(secret, b"worker" + nonce)   (32 bytes)
    driver -> worker: HMAC-SHA256(secret, b"driver" + nonce)   (32 bytes)
A peer that sends anything else, or nothing within the timeout, is disconnected. After the
handshake every message is a 4-byte big-endian length and a msgpack map; pickled bytes never
cross the socket.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import threading
from typing import Any

import msgpack

MAGIC = b"UNISON01"
NONCE_BYTES = 32
SECRET_BYTES = 32  # 256 bits, per experiment
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HANDSHAKE_TIMEOUT_S = 5.0
_LENGTH = struct.Struct(">I")


class ProtocolError(ConnectionError):
    """The peer is not a unison peer with the experiment's secret, or broke the framing."""


def new_secret() -> bytes:
    """A fresh random per-experiment secret."""
    return os.urandom(SECRET_BYTES)


def _mac(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise ConnectionError("connection closed by peer")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class Connection:
    """A framed, authenticated message stream. ``send`` is thread-safe; one thread receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = msgpack.packb(message, use_bin_type=True)
        with self._send_lock:
            self.sock.sendall(_LENGTH.pack(len(data)) + data)

    def recv(self) -> dict[str, Any]:
        (length,) = _LENGTH.unpack(_recv_exact(self.sock, _LENGTH.size))
        if length > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {length} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit")
        message = msgpack.unpackb(_recv_exact(self.sock, length), raw=False, strict_map_key=True)
        if not isinstance(message, dict):
            raise ProtocolError("message is not a map")
        return message

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def server_handshake(sock: socket.socket, secret: bytes) -> Connection:
    """Authenticate a worker that connected to the driver; raises :class:`ProtocolError`."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    nonce = os.urandom(NONCE_BYTES)
    try:
        sock.sendall(MAGIC + nonce)
        answer = _recv_exact(sock, 32)
    except (OSError, ConnectionError) as exc:
        raise ProtocolError(f"handshake failed: {exc}") from None
    if not hmac.compare_digest(answer, _mac(secret, b"worker", nonce)):
        raise ProtocolError("peer did not prove it holds the experiment secret")
    sock.sendall(_mac(secret, b"driver", nonce))
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock)


def client_connect(address: tuple[str, int], secret: bytes, timeout: float = 30.0) -> Connection:
    """Connect to the driver and run the worker side of the handshake."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    header = _recv_exact(sock, len(MAGIC) + NONCE_BYTES)
    if header[: len(MAGIC)] != MAGIC:
        sock.close()
        raise ProtocolError(f"{address} is not a unison driver")
    nonce = header[len(MAGIC) :]
    sock.sendall(_mac(secret, b"worker", nonce))
    if not hmac.compare_digest(_recv_exact(sock, 32), _mac(secret, b"driver", nonce)):
        sock.close()
        raise ProtocolError("driver did not prove it holds the experiment secret")
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock)
