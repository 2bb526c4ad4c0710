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
from typing import IO, Any

from unison import gpus as _gpus
from unison._validate import check_number, is_number, lookup
from unison.backends.base import Backend
from unison.backends.local_template import SHELF, ForkedWorker, WorkerTemplate
from unison.errors import WorkerError
from unison.launch import ABORT_EXIT, LaunchSpec

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_LIVE: weakref.WeakSet[Local] = weakref.WeakSet()


def describe_exit(code: int) -> str:
    """How a process ended, from its ``Popen.returncode``: ``"exit code 3"`` or
    ``"killed by signal 11 (SIGSEGV)"``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


def _seconds(name: str, value: Any, example: str, also: str = "") -> float:
    """``value`` as a positive, finite number of seconds, or a ValueError naming ``Local(name=...)``."""
    if not (is_number(value, finite=True) and value > 0):
        raise ValueError(f"Local({name}=...) must be > 0 seconds, e.g. {example}{also}; got {value!r}")
    return float(value)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the worker has ended, without reaping it (its pid, and so its group, stay reserved)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped elsewhere
        return proc.poll() is not None


def _wait_exited(proc: subprocess.Popen[bytes]) -> None:
    """Block until the worker has ended, without reaping it."""
    if proc.returncode is None:
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass


def _killpg_unreaped(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker's process group, unless the worker was reaped (its pid, and so the group's
    id, may belong to someone else by then). Call it holding the backend's reap lock."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _Fresh:
    """A worker started as a fresh interpreter: a ``Popen`` and the backend's reap lock (a group is
    killed only while its leader's pid is held, unreaped)."""

    def __init__(self, proc: subprocess.Popen[bytes], reap_lock: threading.Lock) -> None:
        self.proc, self.pid, self._lock = proc, proc.pid, reap_lock

    def exited(self) -> bool:
        return _exited(self.proc)

    def wait_exited(self) -> None:
        _wait_exited(self.proc)

    def kill_group(self) -> None:
        with self._lock:
            _killpg_unreaped(self.proc)

    def reap(self) -> int | None:
        """The exit status once the worker ended, else ``None``; what it started dies with it (its
        group is killed while the worker's unreaped pid still names it)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        if not _exited(self.proc):
            return None
        with self._lock:
            _killpg_unreaped(self.proc)
            return self.proc.wait()


_Worker = _Fresh | ForkedWorker
START_MODES = ("fork-server", "fresh")


def default_start() -> str:
    """``"fork-server"`` on Linux, ``"fresh"`` where forking is unsafe (macOS, Windows)."""
    return "fork-server" if sys.platform.startswith("linux") else "fresh"


def _check_preload(preload: Any) -> list[str]:
    if isinstance(preload, str) or not isinstance(preload, (list, tuple)) or not all(
            isinstance(m, str) and m and all(p.isidentifier() for p in m.split(".")) for m in preload):
        raise ValueError(f"Local(preload=...) must be a list of module names, e.g. ['torch', 'numpy']; "
                         f"got {preload!r}")
    return list(preload)


@atexit.register
def _kill_leftovers() -> None:
    for backend in list(_LIVE):
        backend.stop(force=True)
    SHELF.clear()


class Local(Backend):
    """Worker processes on this machine.

    Args:
        workers: how many worker processes (trials at once; a distributed trial takes
            ``workers_per_trial`` of them). Default: one per CPU core, and at least the ranks of one
            distributed trial.
        heartbeat_interval: seconds between a worker's heartbeats.
        heartbeat_timeout: a worker silent this long whose process is no longer running loses its
            trial, which is retried elsewhere (a worker whose process died is usually noticed at once,
            by its closed connection). A silent worker whose process still runs keeps its trial: a
            function holding the GIL in one long C call starves the heartbeat thread (a trial stuck
            for good is what ``Search(trial_timeout_s=...)`` ends). Seconds, larger than
            ``heartbeat_interval``; default: 10 heartbeat intervals.
        gpus: the GPUs the workers may use: ``"auto"`` (default: those ``CUDA_VISIBLE_DEVICES`` lists if
            it is set, else those ``nvidia-smi -L`` lists, looked up only when a context asks for GPUs),
            a list of ids (``[0, 1]``, taken as given: no CUDA check) or ``0`` (none: every worker gets
            an empty ``CUDA_VISIBLE_DEVICES``). With ``Search(gpus_per_trial=g)`` (or ``Ablation``,
            or ``Distributed(gpus_per_worker=g)``) each worker process gets a fixed set of ``g`` GPUs
            (a fraction ``1/n``: ``n`` workers share one) in ``CUDA_VISIBLE_DEVICES``, kept by the
            worker that replaces it, and ``min(workers, floor(GPUs / g))`` trials run at once. Without
            such a request the workers see the listed GPUs (all of them, with ``"auto"``).
        start: how worker processes start. ``"fork-server"`` (the default on Linux): each
            experiment starts one template process (or takes the last one's, below), a fresh
            interpreter that imports the worker's modules and ``preload`` once, and forks every
            worker (replacements too) from it in about a millisecond. It never runs a trial, so
            nothing a trial did reaches another worker; when the experiment ends it is kept for the
            next experiment of this process with the same settings (see ``TemplateShelf``: 5
            minutes unused at most). ``"fresh"`` (the default on macOS and
            Windows, where forking is unsafe): each worker is a new interpreter (~90 ms, plus its
            imports). If the template dies, workers start fresh from then on (a line on stderr says so).
        preload: modules the template imports before it forks (``["torch", "numpy"]``), so each
            worker starts with them loaded; one that fails to import fails :meth:`start` with its name.
            Ignored with ``start="fresh"``. Import only what forks safely: a module that starts
            threads or a CUDA context at import leaves the forked workers without them.

    Each worker runs in a session (and process group) of its own: Ctrl-C in the terminal reaches the
    driver only, and ending a worker (when it exits, is killed or the search stops) SIGKILLs its group,
    so the processes its trials started end with it (unless they moved to a session of their own).
    """

    name = "local"

    def __init__(
        self,
        workers: int | None = None,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float | None = None,
        gpus: str | int | list[int] | list[str] = "auto",
        start: str | None = None,
        preload: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.workers = check_number(workers, "workers", owner="Local", integer=True, low=1, allow_none=True)
        self.start_mode = default_start() if start is None else lookup(
            "Local(start=...) mode", start, {m: m for m in START_MODES})
        if self.start_mode == "fork-server" and not hasattr(os, "fork"):
            raise ValueError(f"Local(start='fork-server') needs os.fork, which {sys.platform} lacks: "
                             f"use start='fresh'")
        self.preload = _check_preload(preload)
        self._template: WorkerTemplate | None = None
        self._prepared: tuple[dict[str, str], WorkerTemplate] | None = None  # see prepare()
        self.gpus = _gpus.check_gpu_ids(gpus)
        self._gpu_slots: list[list[str]] | None = None  # each slot's GPUs, while a context asks for GPUs
        self.heartbeat_interval = _seconds("heartbeat_interval", heartbeat_interval, "1")
        if heartbeat_timeout is None:
            self.heartbeat_timeout = 10 * self.heartbeat_interval
        else:
            self.heartbeat_timeout = _seconds("heartbeat_timeout", heartbeat_timeout, "10",
                                              ", and larger than heartbeat_interval")
            if self.heartbeat_timeout <= self.heartbeat_interval:
                raise ValueError(
                    f"Local(heartbeat_timeout={heartbeat_timeout!r}) must be larger than heartbeat_interval "
                    f"({self.heartbeat_interval} s), or every worker is dropped between two heartbeats: "
                    f"e.g. {10 * self.heartbeat_interval:g} (10 intervals, the default)"
                )
        self._procs: dict[str, _Worker] = {}
        self._slot_of: dict[str, int] = {}  # a worker's slot: its replacement gets the slot's GPUs
        self._logs: dict[str, IO[bytes]] = {}
        self._spawned = 0
        self._early_deaths = 0  # workers in a row that ended before they said hello
        self._connected: set[str] = set()  # workers that authenticated: they started fine
        self._killed: set[str] = set()  # workers ended on purpose (kill_worker)
        self._exits: dict[str, str] = {}  # how each reaped worker ended, by name
        self._reap_lock = threading.Lock()  # a group is killed only while its leader's pid is held
        self._stopping = False

    def slots(self) -> int:
        return self._gpu_bound(self.workers or os.cpu_count() or 1)

    def gang_slots(self, k: int) -> int:
        # Without workers= a distributed trial gets its k processes even on fewer cores.
        return self._gpu_bound(self.workers or max(os.cpu_count() or 1, k))

    def _gpu_bound(self, slots: int) -> int:
        return slots if self._gpu_slots is None else min(slots, len(self._gpu_slots))

    def use_gpus(self, request: _gpus.GpuRequest) -> None:
        """Give each worker started from now on ``request.per_worker`` GPUs of its own (none: forget
        an earlier request); raise if a trial's GPUs do not fit."""
        if not request.per_worker:
            self._gpu_slots = None
            return
        ids, found = (_gpus.detect_gpus() if self.gpus == "auto" else (self.gpus, ""))
        self._gpu_slots = _gpus.slot_gpus(ids, request, f"Local(gpus={self._gpus_arg()})", found)

    def _gpus_arg(self) -> str:
        """``gpus=`` as the user could have written it."""
        if isinstance(self.gpus, str) or not self.gpus:
            return repr(self.gpus) if isinstance(self.gpus, str) else "0"
        return "[" + ", ".join(g if g.isdigit() else repr(g) for g in self.gpus) + "]"

    def _gpu_environment(self, slot: int) -> dict[str, str]:
        """What tells the worker of ``slot`` its GPUs (nothing when no context asked for any and
        ``gpus="auto"``: the workers see what the driver sees)."""
        if self._gpu_slots is not None:
            return _gpus.worker_environment(self._gpu_slots[slot])
        if self.gpus == "auto":
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}

    @staticmethod
    def _worker_env(workers: int) -> dict[str, str]:
        """The environment of the template and the workers (before each worker's own variables)."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop(_gpus.GPUS_VAR, None)  # a worker's GPUs are the ones this backend gives it
        # Numerical libraries start one thread per core in every worker; split the cores instead,
        # unless the user chose a number.
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for var in _THREAD_VARS:
            env.setdefault(var, threads)
        return env

    def prepare(self, workers: int) -> None:
        """Start the worker template (``start="fork-server"``) while the driver sets up; :meth:`start`
        uses it (its output moves into the experiment's ``workers/`` folder then). A template prepared
        already for the same environment is kept (``unison.run`` prepares before the experiment runner
        does)."""
        env = self._worker_env(workers)
        if (self._prepared is not None and self.start_mode == "fork-server" and self._prepared[1].dead is None
                and (self._prepared[0] == env or not self.preload)):
            return
        self.cancel_prepared()
        if self.start_mode == "fork-server":
            _LIVE.add(self)
            kept = SHELF.take(SHELF.key(env, self.preload))
            self._prepared = (env, kept or WorkerTemplate(env, self.preload, None))

    def cancel_prepared(self) -> None:
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            prepared[1].close()

    def _take_template(self, log_dir: Path) -> WorkerTemplate:
        """The template :meth:`prepare` started if it fits this start (the same environment when it
        preloads modules, which may read it), else a new one."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            env, template = prepared
            if env == self._env or not self.preload:
                template.move_log(log_dir / "template.log")
                return template
            template.close()
        kept = SHELF.take(SHELF.key(self._env, self.preload))
        if kept is not None:
            kept.move_log(log_dir / "template.log")
            return kept
        return WorkerTemplate(self._env, self.preload, log_dir / "template.log")

    def start(self, spec: LaunchSpec) -> None:
        workers, log_dir = spec.workers, spec.log_dir
        self._spec = spec
        self._env = self._worker_env(workers)
        self._log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._early_deaths = 0
        _LIVE.add(self)
        if self._gpu_slots is not None and workers > len(self._gpu_slots):
            self.cancel_prepared()
            raise ValueError(f"{workers} workers asked for, but {self!r} has GPUs for {len(self._gpu_slots)}")
        self._template = None
        if self.start_mode == "fork-server":
            template = self._take_template(log_dir)
            template.wait_ready()
            self._template = template
        for slot in range(workers):
            self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        name = f"worker-{self._spawned}"
        self._spawned += 1
        log = open(self._log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        env = dict(self._env, **self._spec.worker_environment(name, self.heartbeat_interval),
                   **self._gpu_environment(slot))
        self._procs[name] = self._forked(env, name) or self._fresh(env, log)
        self._logs[name] = log
        self._slot_of[name] = slot

    def _forked(self, env: dict[str, str], name: str) -> ForkedWorker | None:
        """A worker forked from the template, or ``None`` (no template, or it is gone: say so once)."""
        template = self._template
        if template is None:
            return None
        worker = template.spawn(env, self._log_dir / f"{name}.log")
        if worker is None:
            self._template = None
            why = template.dead or "its request pipe is closed"
            print(f"unison: the local worker template is gone ({why}); starting workers as fresh "
                  f"interpreters from now on (its log: {self._log_dir / 'template.log'})", file=sys.stderr)
            template.close()
        return worker

    def _fresh(self, env: dict[str, str], log: IO[bytes]) -> _Fresh:
        # A new session: Ctrl-C in the terminal reaches the driver only, which stops the workers; and
        # a process group of its own, ended with the worker, so what its trials start ends with it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "unison.worker"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return _Fresh(proc, self._reap_lock)

    def poll(self) -> None:
        if self._stopping:
            return
        for name, proc in list(self._procs.items()):
            code = proc.reap()
            if code is None:
                continue
            del self._procs[name]
            self._logs.pop(name).close()
            self._exits[name] = describe_exit(code)
            started = name in self._connected or name in self._killed
            self._connected.discard(name)
            self._killed.discard(name)
            # Only a worker that ended before it ever said hello failed to start; one that
            # authenticated (however soon it died after) or was aborted (another rank of its trial
            # failed) did not.
            if not started and code not in (0, ABORT_EXIT):
                self._early_deaths += 1
                if self._early_deaths >= 3:
                    log = (self._log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise WorkerError(
                        f"local worker processes keep exiting before they connect to the driver "
                        f"({self._early_deaths} in a row, the last with {describe_exit(code)}); the last "
                        f"one's output ({self._log_dir / (name + '.log')}):\n{log}"
                    )
            self._spawn(self._slot_of.pop(name))  # keep every slot filled; the driver retries its trial

    def worker_connected(self, info: dict[str, Any]) -> None:
        name = self._own(info)
        if name is not None:
            self._connected.add(name)
            self._early_deaths = 0

    def worker_alive(self, info: dict[str, Any]) -> bool | None:
        name = self._own(info)
        if name is None:
            return False if str(info.get("worker")) in self._exits else None
        return not self._procs[name].exited()

    def worker_exit(self, info: dict[str, Any], wait_s: float = 0.0) -> str | None:
        name = self._own(info)
        if name is None:
            return self._exits.get(str(info.get("worker")))
        proc = self._procs[name]
        deadline = time.monotonic() + wait_s
        while not proc.exited():
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)
        code = proc.reap()
        return None if code is None else describe_exit(code)

    def kill_worker(self, info: dict[str, Any]) -> bool:
        """End the worker's process group now (the worker and whatever its trials started); the next
        :meth:`poll` starts a worker in its place."""
        name = self._own(info)
        if name is None:
            return False
        self._killed.add(name)
        self._procs[name].kill_group()
        return True

    def _own(self, info: dict[str, Any]) -> str | None:
        """The name of the running worker process ``info`` (a hello) describes, if it is one of ours."""
        name = info.get("worker")
        proc = self._procs.get(name) if isinstance(name, str) else None
        if proc is None or (info.get("pid") is not None and info.get("pid") != proc.pid):
            return None
        return name

    def stop(self, force: bool = False) -> None:
        self._stopping = True
        procs = list(self._procs.values())
        if force:
            for proc in procs:
                proc.kill_group()
        # Block in waitid (Popen.wait with a timeout polls with sleeps that add up to tens of ms per
        # search) and let a timer kill whatever is still running after a grace period.
        def kill_remaining() -> None:
            for proc in procs:
                proc.kill_group()

        killer = threading.Timer(3.0, kill_remaining)
        killer.daemon = True
        killer.start()
        try:
            for proc in procs:
                proc.wait_exited()
                proc.reap()
        finally:
            killer.cancel()
            killer.join()  # (one that already fired finishes its kills before the template is closed)
        if self._template is not None:
            if force:
                self._template.close()
            else:  # for the next experiment like this one (see TemplateShelf)
                SHELF.put(self._template)
            self._template = None
        self.cancel_prepared()
        for log in self._logs.values():
            log.close()
        self._procs.clear()
        self._logs.clear()
        self._slot_of.clear()
        _LIVE.discard(self)

    def __repr__(self) -> str:
        gpus = "" if self.gpus == "auto" else f", gpus={self._gpus_arg()}"
        start = "" if self.start_mode == default_start() else f", start={self.start_mode!r}"
        preload = f", preload={self.preload!r}" if self.preload else ""
        return f"Local(workers={self.slots()}{gpus}{start}{preload})"
