"""The backend's side of the local backend's worker template (its fork server, the process
:mod:`unison.worker.fork_server` runs): start it, fork workers from it, learn how they ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from unison.errors import WorkerError
from unison.worker.fork_server import kill_group

READY_TIMEOUT_S = 300.0  # how long the template may take to import its modules (torch: seconds)
SPAWN_TIMEOUT_S = 10.0  # how long a fork may take before the backend starts a fresh interpreter instead



class WorkerTemplate:
    """The backend's side of a template process: start it, fork workers from it, learn how they ended.

    :meth:`spawn` only sends the request (the fork happens while the backend goes on); a reader thread
    turns the template's events into each worker's pid and exit status. If the template itself ends,
    every worker forked from it still running is SIGKILLed with its group (its trial is retried),
    :attr:`dead` says why, and :meth:`spawn` returns ``None`` from then on.
    """

    def __init__(self, env: dict[str, str], preload: list[str], log: Path | None) -> None:
        """Start the template with ``env``, importing ``preload`` too; its output goes to ``log``, or
        (``None``: the experiment's folder does not exist yet) to a temporary file until
        :meth:`move_log`."""
        # what its workers depend on, read before it imports anything (see TemplateShelf)
        self.key = TemplateShelf.key(env, preload)
        self._started_log: str | None = None
        if log is None:
            out, self._started_log = tempfile.mkstemp(prefix="unison-template-", suffix=".log")
            log = Path(self._started_log)
        else:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        requests_r, self._requests = os.pipe()
        self._events, events_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "unison.worker.fork_server", str(requests_r), str(events_w), *preload],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                pass_fds=(requests_r, events_w), start_new_session=True,
            )
        except BaseException:
            for fd in (self._requests, self._events):
                os.close(fd)
            self._settle_log()
            raise
        finally:
            for fd in (requests_r, events_w, out):
                os.close(fd)
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

    def move_log(self, log: Path) -> None:
        """Have the template write its output to ``log`` from now on (with what it wrote to its
        temporary file, if it started without a folder)."""
        if self._log != log:
            self._log = log
            self._send({"op": "log", "path": str(log), "started": self._started_log or ""})

    def idle(self) -> bool:
        """Whether the template is alive with no worker of its own running or being forked."""
        with self._changed:
            return (self.dead is None and self._ready is not None and self._ready.get("ev") == "ready"
                    and not self._ids and not self._asked and self.proc.poll() is None)

    def forget_workers(self) -> None:
        """Drop what it knows of workers that ended (before another experiment uses it)."""
        with self._changed:
            self._pids = {i: pid for i, pid in self._pids.items() if i not in self._codes}
            self._codes.clear()

    def _settle_log(self) -> None:
        """Once the template is gone: the output it never moved itself goes where :meth:`move_log` said."""
        started, self._started_log = self._started_log, None
        if started is None or not os.path.exists(started):
            return
        try:
            if str(self._log) != started:
                with open(started, "rb") as before, open(self._log, "ab") as after:
                    after.write(before.read())
            os.unlink(started)
        except OSError:
            pass

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
                kill_group(pid)  # reparented, not reaped: its pid names its group until it ends
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
        self._settle_log()


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


class TemplateShelf:
    """The last experiment's idle template, kept for the next experiment of this process that would
    start an identical one (same Python, working directory, environment and ``preload``), as
    ``multiprocessing``'s fork server serves every pool of a program. Its state is what it imported
    before any trial ran: every worker is forked afresh from it. It ends after :data:`IDLE_TEMPLATE_S`
    unused, when another is shelved, or when the interpreter exits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: tuple[WorkerTemplate, threading.Timer] | None = None  # the template, its expiry

    @staticmethod
    def key(env: dict[str, str], preload: list[str]) -> tuple[Any, ...]:
        """What a template's workers depend on, besides each worker's own variables: a ``preload``
        module of the user's edited since the template imported it makes another key."""
        stamps = tuple(_source_stamp(name) for name in preload)
        return sys.executable, os.getcwd(), tuple(preload), stamps, tuple(sorted(env.items()))

    def put(self, template: WorkerTemplate) -> None:
        """Keep ``template`` (idle: its workers ended) for :meth:`take`, under the key it started with (a
        module edited while it ran is not what it imported); close it if it is not idle."""
        if not template.idle():
            template.close()
            return
        template.forget_workers()
        timer = threading.Timer(IDLE_TEMPLATE_S, self._expire, args=(template,))
        timer.daemon = True
        timer.name = "unison-template-shelf"
        with self._lock:
            previous, self._kept = self._kept, (template, timer)
        timer.start()
        if previous is not None:
            previous[1].cancel()
            previous[0].close()

    def take(self, key: tuple[Any, ...]) -> WorkerTemplate | None:
        """The kept template if it matches ``key`` and is still idle (it is the caller's then)."""
        with self._lock:
            kept = self._kept
            if kept is None or kept[0].key != key:
                return None
            self._kept = None
        template, timer = kept
        timer.cancel()
        if template.idle():
            return template
        template.close()
        return None

    def clear(self) -> None:
        """Close the kept template, if any."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            kept[1].cancel()
            kept[0].close()

    def _expire(self, template: WorkerTemplate) -> None:
        with self._lock:
            kept = self._kept
            if kept is None or kept[0] is not template:
                return
            self._kept = None
        template.close()


def _source_stamp(module: str) -> int | None:
    """When the file ``module`` would be imported from last changed (found without importing it or
    its packages), or None where it cannot be told."""
    import importlib.util

    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    origin, places = spec.origin, [Path(p) for p in spec.submodule_search_locations or ()]
    for part in rest:
        found = [f for place in places for f in (place / part / "__init__.py", place / f"{part}.py")
                 if f.is_file()]
        if not found:
            return None
        origin, places = str(found[0]), [found[0].parent] if found[0].name == "__init__.py" else []
    try:
        return os.stat(origin).st_mtime_ns if origin else None
    except OSError:
        return None


IDLE_TEMPLATE_S = 300.0  # how long a kept template waits for the next experiment
SHELF = TemplateShelf()
