"""The local backend: worker processes on this machine, connected to the driver over loopback."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import IO

from unison.backends.base import Backend
from unison.errors import WorkerError
from unison.worker import ABORT_EXIT, ENV_ADDRESS, ENV_HEARTBEAT, ENV_PAYLOAD, ENV_SECRET, ENV_WORKER

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_LIVE: weakref.WeakSet[Local] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for backend in list(_LIVE):
        backend.stop(force=True)


class Local(Backend):
    """Worker processes on this machine.

    Args:
        workers: how many worker processes (trials at once; a distributed trial takes
            ``workers_per_trial`` of them). Default: one per CPU core, and at least the ranks of one
            distributed trial.
        heartbeat_interval: seconds between a worker's heartbeats.
        heartbeat_timeout: a worker silent this long loses its trial, which is retried elsewhere.
            Default: 10 heartbeat intervals.
    """

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float | None = None,
    ) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"Local(workers=...) must be a whole number >= 1, got {workers!r}")
        if not heartbeat_interval > 0:
            raise ValueError(f"Local(heartbeat_interval=...) must be > 0, got {heartbeat_interval!r}")
        self.workers = workers
        self.heartbeat_interval = float(heartbeat_interval)
        self.heartbeat_timeout = (
            float(heartbeat_timeout) if heartbeat_timeout is not None else 10 * self.heartbeat_interval
        )
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self._spawned = 0
        self._early_deaths = 0
        self._stopping = False

    def slots(self) -> int:
        return self.workers or os.cpu_count() or 1

    def gang_slots(self, k: int) -> int:
        # Without workers= a distributed trial gets its k processes even on fewer cores.
        return self.workers or max(os.cpu_count() or 1, k)

    def start(self, address: tuple[str, int], secret: bytes, payload_path: Path, log_dir: Path,
              workers: int, barrier: bool = False) -> None:
        self._env = dict(os.environ)
        self._env.update({
            ENV_ADDRESS: f"{address[0]}:{address[1]}",
            ENV_SECRET: secret.hex(),
            ENV_PAYLOAD: str(payload_path),
            ENV_HEARTBEAT: str(self.heartbeat_interval),
            "PYTHONUNBUFFERED": "1",
        })
        # Numerical libraries start one thread per core in every worker; split the cores instead,
        # unless the user chose a number.
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in _THREAD_VARS:
            self._env.setdefault(var, threads)
        self._log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        _LIVE.add(self)
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        name = f"worker-{self._spawned}"
        self._spawned += 1
        log = open(self._log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        env = dict(self._env, **{ENV_WORKER: name})
        # A new session: Ctrl-C in the terminal reaches the driver only, which stops the workers.
        proc = subprocess.Popen(
            [sys.executable, "-c", "from unison.worker import main; main()"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.started_at = time.monotonic()  # type: ignore[attr-defined]
        self._procs[name] = proc
        self._logs[name] = log

    def poll(self) -> None:
        if self._stopping:
            return
        for name, proc in list(self._procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._procs[name]
            self._logs.pop(name).close()
            lived = time.monotonic() - proc.started_at  # type: ignore[attr-defined]
            # An aborted worker (another rank of its trial failed) did not fail to start.
            self._early_deaths = self._early_deaths + 1 if lived < 5.0 and code not in (0, ABORT_EXIT) else 0
            if self._early_deaths >= 3:
                log = (self._log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise WorkerError(
                    f"local worker processes keep exiting right after start (exit code {code}); the last "
                    f"one's output ({self._log_dir / (name + '.log')}):\n{log}"
                )
            self._spawn()  # keep every slot filled; the driver retries the trial it was running

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one worker process (used by fault-injection tests)."""
        self._procs[name].send_signal(sig)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def stop(self, force: bool = False) -> None:
        self._stopping = True
        procs = list(self._procs.values())
        if force:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        # Block in waitpid (Popen.wait with a timeout polls with sleeps that add up to tens of ms per
        # search) and let a timer kill whatever is still running after a grace period.
        killer = threading.Timer(3.0, lambda: [p.kill() for p in procs if p.poll() is None])
        killer.daemon = True
        killer.start()
        try:
            for proc in procs:
                proc.wait()
        finally:
            killer.cancel()
        for log in self._logs.values():
            log.close()
        self._procs.clear()
        self._logs.clear()
        _LIVE.discard(self)

    def __repr__(self) -> str:
        return f"Local(workers={self.slots()})"
