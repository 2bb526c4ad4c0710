"""What a backend is given to start an experiment's workers, and how a worker process learns it.

The driver hands a backend one :class:`LaunchSpec`. A backend that starts worker processes passes it
on through :meth:`LaunchSpec.worker_environment` (the secret in the environment, never on the command
line, which other users can read); the process reads it back with :func:`worker_settings`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

ABORT_EXIT = 75
"""The exit status of a worker the driver aborted (not a crash: backends replace it)."""
DRIVER_GONE_EXIT = 3
"""The exit status of a worker whose driver went away."""

_ADDRESS = "UNISON_DRIVER"
_SECRET = "UNISON_SECRET"
_PAYLOAD = "UNISON_PAYLOAD"
_WORKER = "UNISON_WORKER"
_HEARTBEAT = "UNISON_HEARTBEAT"


@dataclass(frozen=True)
class LaunchSpec:
    """Where the workers connect, how they authenticate, what they load, where their logs go.

    Attributes:
        address: the driver's ``(host, port)``.
        secret: the experiment's shared secret (workers prove they hold it before anything is read).
        payload_path: ``payload.bin``: the training function, its generators and data.
        log_dir: the folder for the workers' own logs (``workers/`` of the experiment directory).
        workers: how many workers to start.
        experiment: the experiment's name (for job groups and log lines).
        barrier: the workers are the ranks of one distributed run and must all run at once (Spark
            starts them as one barrier stage); a backend whose workers all start anyway ignores it.
    """

    address: tuple[str, int]
    secret: bytes
    payload_path: Path
    log_dir: Path
    workers: int
    experiment: str = "experiment"
    barrier: bool = False

    def worker_environment(self, worker: str, heartbeat_interval: float) -> dict[str, str]:
        """The environment variables that tell a worker process (``python -m unison.worker``) its job."""
        return {
            _ADDRESS: f"{self.address[0]}:{self.address[1]}",
            _SECRET: self.secret.hex(),
            _PAYLOAD: str(self.payload_path),
            _WORKER: worker,
            _HEARTBEAT: str(heartbeat_interval),
        }


class WorkerSettings:
    """What a worker process was started with (see :func:`worker_settings`)."""

    __slots__ = ("address", "secret", "payload", "worker", "heartbeat_interval")

    def __init__(self, address: tuple[str, int], secret: bytes, payload: bytes, worker: str,
                 heartbeat_interval: float) -> None:
        self.address, self.secret, self.payload = address, secret, payload
        self.worker, self.heartbeat_interval = worker, heartbeat_interval


def worker_settings() -> WorkerSettings:
    """Read (and remove, for the secret) what :meth:`LaunchSpec.worker_environment` set."""
    host, port = os.environ[_ADDRESS].rsplit(":", 1)
    secret = bytes.fromhex(os.environ.pop(_SECRET))
    with open(os.environ[_PAYLOAD], "rb") as f:
        payload = f.read()
    return WorkerSettings((host, int(port)), secret, payload,
                          os.environ.get(_WORKER, f"{socket.gethostname()}:{os.getpid()}"),
                          float(os.environ.get(_HEARTBEAT, "1.0")))
