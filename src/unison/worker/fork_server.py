"""The local backend's fork server (its "worker template"): a fresh, single-threaded interpreter that
imports the worker's modules (and ``Local(preload=[...])``) once, then forks one worker per request.

It imports only what it needs itself, so that it is ready soon after the search starts; the backend's
side is :class:`unison.backends.local_template.WorkerTemplate`. It never runs a trial: every worker is
forked afresh from its pristine state, so an experiment's workers never inherit what an earlier
experiment's trials did (the backend may keep it for the next experiment: see ``TemplateShelf``).

It runs ``python -m unison.worker.fork_server`` with two pipe descriptors of its parent's (the
backend): requests come in, events go out, one JSON object a line (never pickles). Requests:
``{"op": "spawn", "id", "env", "log", "cwd"}``, ``{"op": "kill", "pid"}`` and ``{"op": "log", "path",
"started"}`` (its own output moves to ``path``, with what it wrote to the file ``started`` before the
experiment's folder existed). Events: ``{"ev": "ready"}`` or ``{"ev": "error", "module", "error"}``
once, then ``{"ev": "spawned", "id", "pid"}`` (or ``"spawn_failed"``) per request, and ``{"ev":
"exit", "pid", "code"}`` per worker that ended. A worker runs in a session of its own; when it ends
the template SIGKILLs its process group while its pid is still unreaped (so still names the group),
reaps it and reports the exit status as ``Popen.returncode`` would (negative: killed by that signal).
When the backend closes the request pipe (or goes away) the template kills every worker's group and
exits.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import sys
from typing import Any

WORKER_MODULES = ("unison.worker.serve", "unison.payload", "cloudpickle", "unison.trialfiles",
                   "unison.worker.ctx", "unison.worker.injection", "unison.worker.reporter")
MAX_LINE = 1 << 20  # a request line longer than this is refused (the backend never sends one)
_FIELDS: dict[str, dict[str, type]] = {
    "spawn": {"op": str, "id": int, "env": dict, "log": str, "cwd": str},
    "kill": {"op": str, "pid": int},
    "log": {"op": str, "path": str, "started": str},
}


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
            kill_group(pid)
        self.reap(block=True)

    def handle(self, line: bytes) -> None:
        request = check_request(line)
        if request["op"] == "log":
            move_output(request["started"], request["path"])
            return
        if request["op"] == "kill":
            if request["pid"] in self.children:  # unreaped: its pid still names its group
                kill_group(request["pid"])
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
            import traceback

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
            kill_group(pid)
            _, status = os.waitpid(pid, 0)
            self.children.discard(pid)
            try:
                self.send({"ev": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
            except OSError:  # the backend went away
                pass


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` names, if there is one."""
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


def move_output(started: str, path: str) -> None:
    """Write this process's output to ``path`` from now on, after what it wrote to the file ``started``
    so far (``""``: none to move, the next experiment's folder takes over from the last one's)."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if started:
            with open(started, "rb") as before:
                os.write(out, before.read())
            os.unlink(started)
    except OSError:
        pass
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def main() -> None:
    """The template's entry point: ``python -m unison.worker.fork_server REQUESTS_FD EVENTS_FD
    [MODULE ...]``."""
    requests, events = int(sys.argv[1]), int(sys.argv[2])
    template = _Template(requests, events)
    module = "unison.worker"
    try:
        for module in (*WORKER_MODULES, *sys.argv[3:]):
            importlib.import_module(module)
        gc.freeze()  # a forked worker's collections then leave the template's objects (and pages) alone
    except BaseException:  # noqa: BLE001 - the backend reports it to the user, naming the module
        import traceback

        template.send({"ev": "error", "module": module, "error": traceback.format_exc()[-4000:]})
        os._exit(1)
    template.send({"ev": "ready"})
    template.loop()
    os._exit(0)


if __name__ == "__main__":
    main()
