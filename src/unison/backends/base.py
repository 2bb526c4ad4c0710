"""The backend interface: start workers somewhere, tell the driver how many slots exist."""

from __future__ import annotations

from pathlib import Path


class Backend:
    """Starts worker runtimes that connect back to the driver. A new backend is a small class.

    ``in_process`` backends (inline) run trials in the driver's own thread instead.
    ``shared_filesystem``: whether workers see the driver's disk. If so they write a trial's files
    straight into its folder in the experiment directory; if not (Spark executors) they ship them
    back in the trial's result (:mod:`unison.trialfiles`).
    ``listen_host``/``listen_port``: where the driver listens for this backend's workers.
    """

    name = "backend"
    in_process = False
    shared_filesystem = True
    listen_host = "127.0.0.1"
    listen_port = 0
    heartbeat_interval = 1.0
    heartbeat_timeout = 10.0

    def slots(self) -> int:
        """How many trials can run at once."""
        raise NotImplementedError

    def start(self, address: tuple[str, int], secret: bytes, payload_path: Path, log_dir: Path,
              workers: int) -> None:
        """Start ``workers`` workers that connect to ``address`` and load ``payload_path``."""
        raise NotImplementedError

    def poll(self) -> None:
        """Called regularly while the experiment runs: replace lost workers, raise if none can start."""

    def stop(self, force: bool = False) -> None:
        """Stop every worker; ``force`` kills at once instead of letting them finish their loop."""
