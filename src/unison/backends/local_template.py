"""The worker template of the local backend: a fresh, single-threaded interpreter that imports the
worker's modules (and ``Local(preload=[...])``) once, then forks one worker per request.

One template per :meth:`Local.start`, so an experiment's workers never inherit what an earlier
experiment's trials did. The template runs ``python -m unison.backends.local_template`` with two pipe
descriptors of its parent's (the backend): requests come in, events go out, one JSON object a line
(never pickles). Requests: ``{"op": "spawn", "id", "env", "log", "cwd"}`` and ``{"op": "kill", "pid"}``.
Events: ``{"ev": "ready"}`` or ``{"ev": "error", "module", "error"}`` once, then ``{"ev": "spawned",
"id", "pid"}`` (or ``"spawn_failed"``) per request, and ``{"ev": "exit", "pid", "code"}`` per worker
that ended. A worker runs in a session of its own; when it ends the template SIGKILLs its process group
while its pid is still unreaped (so still names the group), reaps it and reports the exit status as
``Popen.returncode`` would (negative: killed by that signal). When the backend closes the request pipe
(or goes away) the template kills every worker's group and exits.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from unison.errors import WorkerError

_WORKER_MODULES = ("unison.worker.serve", "unison.payload", "cloudpickle", "unison.trialfiles",
                   "unison.worker.ctx", "unison.worker.injection", "unison.worker.reporter")
MAX_LINE = 1 << 20  # a request line longer than this is refused (the backend never sends one)
_FIELDS = {"spawn": {"op": str, "id": int, "env": dict, "log": str, "cwd": str},
           "kill": {"op": str, "pid": int}}


def check_request(line: bytes) -> dict[str, Any]:
    """A request line as a dict, or a ValueError saying what is wrong with it."""
    if len(line) > MAX_LINE:
        raise ValueError(f"request of {len(line)} bytes, over {MAX_LINE}")
    request = json.loads(line)
    fields = _FIELDS.get(str(request.get("op"))) if isinstance(request, dict) else None
    if fields is None or set(request) != set(fields):
        raise ValueError(f"unknown request {line[:200]!r}: expected one of {sorted(_FIELDS)} and its fields")
    for key, kind in fields.items():
        if not isinstance(request[key], kind) or isinstance(request[key], bool):
            raise ValueError(f"request field {key!r} must be a {kind.__name__}, got {request[key]!r}")
    if request["op"] == "spawn" and not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in request["env"].items()):
        raise ValueError("request field 'env' must map strings to strings")
    return request


class _Template:
    def __init__(self, requests: int, events: int) -> None:
        self.requests, self.events = requests, events
        self.children: set[int] = set()
        self.buffer = b""

    def send(self, event: dict[str, Any]) -> None:
        os.write(self.events, json.dumps(event).encode() + b"\n")

    def loop(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.wake = (wake_r, wake_w)
        while True:
            ready, _, _ = select.select([self.requests, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
            self.reap()
            if self.requests in ready:
                chunk = os.read(self.requests, 65536)
                if not chunk:
                    break
                self.buffer += chunk
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    self.handle(line)
                if len(self.buffer) > MAX_LINE:
                    raise ValueError(f"request line over {MAX_LINE} bytes")
        for pid in list(self.children):
            _killpg(pid)
        self.reap(block=True)

    def handle(self, line: bytes) -> None:
        request = check_request(line)
        if request["op"] == "kill":
            if request["pid"] in self.children:  # unreaped: its pid still names its group
                _killpg(request["pid"])
                try:  # (forked a moment ago, before its setsid: no group of that number yet)
                    os.kill(request["pid"], signal.SIGKILL)
                except OSError:
                    pass
            return
        try:
            pid = self.fork(request)
        except OSError as e:
            try:
                with open(request["log"], "a") as log:
                    print(f"unison: the worker template could not fork this worker: {e}", file=log)
            except OSError:
                pass
            self.send({"ev": "spawn_failed", "id": request["id"], "error": str(e)})
            return
        self.children.add(pid)
        self.send({"ev": "spawned", "id": request["id"], "pid": pid})

    def fork(self, request: dict[str, Any]) -> int:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            os.close(log)
            raise
        if pid == 0:
            self.child(request, log)  # never returns
        os.close(log)
        return pid

    def child(self, request: dict[str, Any], log: int) -> None:
        code = 1
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in (self.requests, self.events, *self.wake):
                os.close(fd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(null)
            os.close(log)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            _reseed()
            from unison.worker import serve

            sys.argv = [serve.__file__]
            serve.main()  # ends the process itself
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - the worker's log must say why it could not start
            traceback.print_exc()
        finally:
            os._exit(code)

    def reap(self, block: bool = False) -> None:
        """Report every worker that ended, after SIGKILLing its group while its pid still names it."""
        while self.children:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG))
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            _killpg(pid)
            _, status = os.waitpid(pid, 0)
            self.children.discard(pid)
            try:
                self.send({"ev": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
            except OSError:  # the backend went away
                pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reseed() -> None:
    """Give a forked worker random states of its own, as a fresh interpreter has (``random`` reseeds
    itself at fork; numpy's legacy global state does not)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


READY_TIMEOUT_S = 300.0  # how long the template may take to import its modules (torch: seconds)
SPAWN_TIMEOUT_S = 10.0  # how long a fork may take before the backend starts a fresh interpreter instead


class WorkerTemplate:
    """The backend's side of a template process: start it, fork workers from it, learn how they ended.

    :meth:`spawn` only sends the request (the fork happens while the backend goes on); a reader thread
    turns the template's events into each worker's pid and exit status. If the template itself ends,
    every worker forked from it still running is SIGKILLed with its group (its trial is retried),
    :attr:`dead` says why, and :meth:`spawn` returns ``None`` from then on.
    """

    def __init__(self, env: dict[str, str], preload: list[str], log: Path) -> None:
        requests_r, self._requests = os.pipe()
        self._events, events_w = os.pipe()
        try:
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", __name__, str(requests_r), str(events_w), *preload],
                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    pass_fds=(requests_r, events_w), start_new_session=True,
                )
        except BaseException:
            for fd in (self._requests, self._events):
                os.close(fd)
            raise
        finally:
            os.close(requests_r)
            os.close(events_w)
        self.dead: str | None = None
        self._pids: dict[int, int] = {}  # request id -> the worker's pid, once forked
        self._ids: dict[int, int] = {}  # pid -> request id, while the worker runs
        self._codes: dict[int, int] = {}  # request id -> exit status (negative: killed by that signal)
        self._asked: dict[int, float] = {}  # request id -> when, until the template answers
        self._next_id = 0
        self._ready: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._preload, self._log = preload, log
        threading.Thread(target=self._read, name="unison-template", daemon=True).start()

    def wait_ready(self) -> None:
        """Return once the template has imported its modules (it starts while the caller goes on);
        raise :class:`WorkerError` saying why if it cannot, the template closed."""
        try:
            self._wait_ready(self._preload, self._log)
        except BaseException:  # (Ctrl-C during a slow preload too: no template left behind)
            self.close()
            raise

    def _wait_ready(self, preload: list[str], log: Path) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._ready is not None or self.dead is not None, READY_TIMEOUT_S)
        ready = self._ready or {}
        if ready.get("ev") == "ready":
            return
        self.close()
        if ready.get("ev") == "error":
            raise WorkerError(
                f"Local(preload={preload!r}): importing {ready.get('module')!r} failed in the worker "
                f"template, so no worker could run; check the name, or install it in the environment of "
                f"{sys.executable}:\n{ready.get('error')}"
            )
        why = self.dead or f"it did not start within {READY_TIMEOUT_S:g} s"
        try:
            tail = log.read_text(errors="replace")[-3000:].strip()
        except OSError:
            tail = ""
        raise WorkerError(f"the local backend's worker template failed to start ({why}); see {log}"
                          + (f":\n{tail}" if tail else "") + "\n(Local(start='fresh') starts each worker as "
                          "a new interpreter instead)")

    def _read(self) -> None:
        try:
            with os.fdopen(self._events, "rb") as events:
                for line in events:
                    self._event(json.loads(line))
        except Exception:  # noqa: BLE001 - a line it cannot read: the template is treated as gone
            self.proc.kill()
        finally:
            self._ended()

    def _ended(self) -> None:
        """The template is gone: its workers' groups are killed and every worker counts as ended."""
        code = self.proc.wait()
        with self._changed:
            self.dead = f"the worker template process ended with {_describe(code)}"
            for pid, request_id in self._ids.items():
                _killpg(pid)  # reparented, not reaped: its pid names its group until it ends
                self._codes[request_id] = -signal.SIGKILL
            for request_id in self._asked:
                self._codes[request_id] = -signal.SIGKILL
            self._ids.clear()
            self._asked.clear()
            self._changed.notify_all()

    def _event(self, event: dict[str, Any]) -> None:
        with self._changed:
            kind = event.get("ev")
            if kind in ("ready", "error"):
                self._ready = event
            elif kind == "spawned":
                self._asked.pop(event["id"], None)
                self._pids[event["id"]], self._ids[event["pid"]] = event["pid"], event["id"]
            elif kind == "spawn_failed":  # an early death: the backend replaces it, and gives up after 3
                self._asked.pop(event["id"], None)
                self._codes[event["id"]] = 1
            elif kind == "exit" and event["pid"] in self._ids:
                self._codes[self._ids.pop(event["pid"])] = event["code"]
            self._changed.notify_all()

    def _send(self, request: dict[str, Any]) -> bool:
        try:
            with self._send_lock:
                if self._requests < 0:
                    return False
                os.write(self._requests, json.dumps(request).encode() + b"\n")
            return True
        except OSError:
            return False

    def spawn(self, env: dict[str, str], log: Path) -> ForkedWorker | None:
        """Ask for a worker forked with ``env``, its output appended to ``log``; ``None`` if the
        template is gone (:attr:`dead` says why: start a fresh interpreter instead)."""
        with self._changed:
            if self.dead is not None:
                return None
            request_id, self._next_id = self._next_id, self._next_id + 1
            self._asked[request_id] = time.monotonic()
        if not self._send({"op": "spawn", "id": request_id, "env": env, "log": str(log), "cwd": os.getcwd()}):
            return None
        return ForkedWorker(self, request_id)

    def pid(self, request_id: int) -> int:
        """The pid of the worker forked for ``request_id`` (waiting for the template's answer), or -1
        if none was (the fork failed, or the template is gone)."""
        def answered() -> bool:
            return request_id in self._pids or request_id in self._codes

        with self._changed:
            if not self._changed.wait_for(answered, SPAWN_TIMEOUT_S):
                self.proc.kill()  # hung: its end ends its workers, and the backend starts fresh ones
                self._changed.wait_for(answered, 5.0)
            return self._pids.get(request_id, -1)

    def code(self, request_id: int, timeout: float | None = 0.0) -> int | None:
        """The worker's exit status once it ended (waiting up to ``timeout`` seconds; ``None``: for
        good), else ``None``. A template that leaves a fork unanswered for
        :data:`SPAWN_TIMEOUT_S` is taken for hung and killed."""
        with self._changed:
            asked = self._asked.get(request_id)
            if asked is not None and time.monotonic() - asked > SPAWN_TIMEOUT_S:
                self.proc.kill()
            if timeout is None or timeout > 0:
                self._changed.wait_for(lambda: request_id in self._codes, timeout)
            return self._codes.get(request_id)

    def kill(self, request_id: int) -> None:
        """SIGKILL the worker's group unless it was reaped (the template checks)."""
        pid = self.pid(request_id)
        if pid > 0:
            self._send({"op": "kill", "pid": pid})

    def close(self) -> None:
        """End the template: it kills what is left of its workers' groups and exits."""
        with self._send_lock:  # (a kill being sent finishes first; none is written to a reused fd after)
            requests, self._requests = self._requests, -1
        try:
            os.close(requests)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class ForkedWorker:
    """A worker forked by a :class:`WorkerTemplate`, shaped like the backend's handle of a fresh one."""

    def __init__(self, template: WorkerTemplate, request_id: int) -> None:
        self.template, self.request_id = template, request_id

    @property
    def pid(self) -> int:
        """The worker's pid (-1 if the fork failed)."""
        return self.template.pid(self.request_id)

    def exited(self) -> bool:
        """Whether the worker has ended (its group is then killed already)."""
        return self.template.code(self.request_id) is not None

    def wait_exited(self) -> None:
        """Block until the worker has ended."""
        self.template.code(self.request_id, timeout=None)

    def kill_group(self) -> None:
        """SIGKILL the worker and its process group."""
        self.template.kill(self.request_id)

    def reap(self) -> int | None:
        """The exit status once the worker ended, else ``None``."""
        return self.template.code(self.request_id)


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def main() -> None:
    """The template's entry point: ``python -m unison.backends.local_template REQUESTS_FD EVENTS_FD
    [MODULE ...]``."""
    requests, events = int(sys.argv[1]), int(sys.argv[2])
    template = _Template(requests, events)
    module = "unison.worker"
    try:
        for module in (*_WORKER_MODULES, *sys.argv[3:]):
            importlib.import_module(module)
        gc.freeze()  # a forked worker's collections then leave the template's objects (and pages) alone
    except BaseException:  # noqa: BLE001 - the backend reports it to the user, naming the module
        template.send({"ev": "error", "module": module, "error": traceback.format_exc()[-4000:]})
        os._exit(1)
    template.send({"ev": "ready"})
    template.loop()
    os._exit(0)


if __name__ == "__main__":
    main()
