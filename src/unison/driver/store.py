"""The experiment directory: ``experiment.json``, ``journal.jsonl``, ``trials/<id>/``, ``result.json``.

The journal is append-only: each event is one ``os.write`` of a whole line, so a line is either in
the journal or not (a write that fails partway is cut off again). The experiment's ``status`` events
are fsynced before the driver goes on, a trial's ``end`` within :data:`SYNC_INTERVAL_S` of being
written (by a background thread: the ends written meanwhile share one fsync), and
``experiment.json`` and ``result.json`` are replaced whole and fsynced; reports are flushed to the
operating system only. A driver holds an exclusive lock on the directory (``lock``) while it runs, so
two drivers never run one experiment. Resuming an experiment replays its journal.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from unison._bulk import collector_paused
from unison.errors import ExperimentLocked, StorageFull
from unison.worker.checkpoints import fsync_path

DEFAULT_STORAGE = "unison-runs"
SYNCED_EVENTS = frozenset({"status"})  # fsynced before append returns
BACKGROUND_SYNCED_EVENTS = frozenset({"end"})  # fsynced by a background thread soon after written
SYNC_INTERVAL_S = 0.05  # ... at most once per this interval (a power loss loses at most this much)
RESERVE_BYTES = 64 * 1024  # held while a driver runs, freed on a full disk for the final status
_FULL_ERRNOS = frozenset(n for n in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if n is not None)


def is_storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the file system is out of space or quota (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def _write_all(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(fd, view[done:])




class _Syncer:
    """fsyncs one file descriptor in a background thread whenever asked; requests that arrive while
    an fsync runs share the next one (group commit), so a fast search is not slowed to one trial
    per fsync (1-6 ms on a busy disk)."""

    def __init__(self, fd: int, name: str, then: Callable[[], None]) -> None:
        self._fd, self._then = fd, then  # then: called after each fsync (syncs a new file's directory)
        self._cond = threading.Condition()
        self._asked = self._synced = 0
        self._closing = False
        self.error: OSError | None = None  # the first failed fsync, raised by the store's next write
        self._thread = threading.Thread(target=self._run, name=f"unison-fsync {name}", daemon=True)
        self._thread.start()

    def ask(self) -> None:
        with self._cond:
            self._asked += 1
            self._cond.notify_all()

    def take_error(self) -> OSError | None:
        with self._cond:
            error, self.error = self.error, None
            return error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._synced == self._asked and not self._closing:
                    self._cond.wait()
                if self._synced == self._asked:
                    return
                target = self._asked
            try:
                os.fsync(self._fd)
                self._then()
            except OSError as exc:
                with self._cond:
                    self.error = self.error or exc
            with self._cond:
                self._synced = target
                self._cond.notify_all()
                # Ends written in the next moment share the next fsync: at most one per interval, so
                # the thread's wake-ups do not take the driver's CPU on a fast search.
                self._cond.wait_for(lambda: self._closing, timeout=SYNC_INTERVAL_S)

    def close(self) -> None:
        """Finish the fsyncs asked for, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"


def _is_event(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


class ExperimentStore:
    """One experiment's directory.

    A driver gets its store from :meth:`create` (a new experiment) or :meth:`open` (resuming one),
    both of which take the directory's lock, and gives it back with :meth:`close`. Reading an
    experiment (``ExperimentStore(path).read_journal()``) takes no lock.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.resumable = True  # what a StorageFull message suggests: resume, or run again
        self._fd: int | None = None  # the journal, opened for append
        self._syncer: _Syncer | None = None  # fsyncs the journal's `end` events in the background
        self._journal_dir_pending = False  # a new journal's directory entry is not fsynced yet
        self._size = 0  # the journal's size after the last complete event
        self._lock_fd: int | None = None
        # Called with each event's line (JSON, ending in a newline) once it is in the journal, on the
        # thread that appended it: a listener must be quick and must not raise.
        self.listeners: list[Callable[[bytes], None]] = []

    @classmethod
    def create(cls, storage: str | Path | None, name: str) -> ExperimentStore:
        """A new, uniquely named directory ``<storage>/<name>-<timestamp>``, locked for this driver."""
        root = Path(storage if storage is not None else DEFAULT_STORAGE)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{_slug(name)}-{stamp}"
        for n in range(1000):
            path = root / (base if n == 0 else f"{base}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            store = cls(path)
            store.lock()
            try:
                (path / "trials").mkdir()
            except OSError as exc:
                store.close()
                store._reraise(exc, path / "trials")
            return store
        raise FileExistsError(f"could not create a new experiment directory under {root}")

    @classmethod
    def create_at(cls, path: str | Path) -> ExperimentStore:
        """A new experiment in exactly ``path`` (a pipeline's stage), locked for this driver. ``path`` may
        exist if it holds no experiment yet (a driver stopped before writing ``experiment.json``)."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            cls(path)._reraise(exc, path)
        store = cls(path)
        store.lock()
        if store.exists():
            store.close()
            raise FileExistsError(f"{path} already holds an experiment: resume it, or choose another "
                                  f"directory")
        try:
            (path / "trials").mkdir(exist_ok=True)
        except OSError as exc:
            store.close()
            store._reraise(exc, path / "trials")
        return store

    @classmethod
    def open(cls, path: str | Path) -> ExperimentStore:
        """The existing experiment in ``path``, locked for this driver (to resume it).

        Raises :class:`unison.ExperimentLocked` at once if another driver holds it.
        """
        store = cls(path)
        if not store.exists():
            store.read_experiment()  # raises FileNotFoundError, saying what is missing
        store.lock()
        return store

    # ---------------------------------------------------------------------------------- the lock
    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    @property
    def reserve_file(self) -> Path:
        return self.path / ".space-reserve"

    def lock(self) -> None:
        """Take the experiment's exclusive lock (``flock`` on ``lock``) for as long as this store is
        open. The operating system drops it when the process dies, so a killed driver leaves no
        stale lock. Raises :class:`unison.ExperimentLocked` naming the holder if another driver
        has it."""
        import fcntl

        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder(fd)
            os.close(fd)
            raise self._locked(holder) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        since = time.time()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": since,
                  "since_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))}
        try:  # who holds it is for the message of a second driver; the lock works without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass
        self._make_reserve()

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _locked(self, holder: dict[str, Any]) -> ExperimentLocked:
        if holder.get("pid"):
            who = (f"pid {holder['pid']} on host {holder.get('host', '?')}, running since "
                   f"{holder.get('since_utc', holder.get('since', '?'))}")
            stop = f"wait for it to end, or stop it (kill {holder['pid']} on {holder.get('host', '?')})"
        else:
            who, stop = "a driver that is just starting", "wait for it to end, or stop it"
        return ExperimentLocked(
            f"the experiment {self.path} is being run by another unison driver ({who}); two drivers "
            f"would run its trials twice. {stop.capitalize()}, then resume it with "
            f"unison.resume({str(self.path)!r}, fn)", holder)

    def _make_reserve(self) -> None:
        """Set aside a little space, freed when the disk fills up, so that the experiment's final
        status can still be written."""
        try:
            fd = os.open(self.reserve_file, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            if os.fstat(fd).st_size < RESERVE_BYTES:
                os.pwrite(fd, bytes(RESERVE_BYTES), 0)
        except OSError:
            pass  # no room even for the reserve: writes will say the disk is full
        finally:
            os.close(fd)

    def _release_reserve(self) -> None:
        try:
            self.reserve_file.unlink()
        except OSError:
            pass

    # ---------------------------------------------------------------------------- files and errors
    @property
    def experiment_file(self) -> Path:
        return self.path / "experiment.json"

    @property
    def journal_file(self) -> Path:
        return self.path / "journal.jsonl"

    @property
    def torn_file(self) -> Path:
        """Where torn journal lines are set aside (one JSON line each: offset, length, text)."""
        return self.path / "journal.torn"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    def exists(self) -> bool:
        return self.experiment_file.is_file()

    def trial_dir(self, trial_id: int) -> Path:
        return self.path / "trials" / f"{trial_id:04d}"

    def storage_full(self, exc: BaseException, file: Path | None = None) -> StorageFull | None:
        """``exc`` as a :class:`unison.StorageFull` about this experiment if it says the disk is
        full (``exc`` itself if it already is one), else ``None``. The first one frees the space
        reserve, so the experiment's final status can still be recorded."""
        if isinstance(exc, StorageFull):
            return exc
        if not is_storage_full(exc):
            return None
        assert isinstance(exc, OSError) and exc.errno is not None  # is_storage_full checked both
        self._release_reserve()
        where = file if file is not None else exc.filename
        then = (f"continue it with unison.resume({str(self.path)!r}, fn); trials that had not ended "
                f"run again" if self.resumable else "run it again")
        full = StorageFull(
            f"the disk holding the experiment {self.path} is full ({exc.strerror or os.strerror(exc.errno)}"
            f"{f', writing {where}' if where else ''}). Everything recorded before is kept in its "
            f"journal: free space (or raise the quota), then {then}", self.path)
        full.errno = exc.errno  # (not strerror or filename: OSError's str() would then drop the message)
        return full

    def _reraise(self, exc: BaseException, file: Path) -> NoReturn:
        """Raise ``exc`` again, as a :class:`unison.StorageFull` if it says the disk is full."""
        full = self.storage_full(exc, file)
        if full is None or full is exc:
            raise exc
        raise full from None  # its message says what failed; __context__ keeps the original

    def _atomic_write_json(self, path: Path, data: Any, sync: bool = True, sync_dir: bool = True) -> None:
        """Write ``path`` whole or not at all: a temporary file renamed over it; with ``sync`` the
        file is fsynced before the rename, with ``sync_dir`` too the directory after it."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        text = (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, text)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if sync and sync_dir:
                fsync_path(path.parent)
        except BaseException as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            self._reraise(exc, path)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write the file ``name`` of the experiment directory (e.g. the payload); returns its path."""
        path = self.path / name
        try:
            path.write_bytes(data)
        except OSError as exc:
            self._reraise(exc, path)
        return path

    # ------------------------------------------------------------------------- experiment.json
    def write_experiment(self, data: dict[str, Any], durable: bool = True) -> None:
        """Replace ``experiment.json``; ``durable``: fsynced (with its directory) before this returns."""
        self._atomic_write_json(self.experiment_file, data, sync=durable)

    def read_experiment(self) -> dict[str, Any]:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.path} is not a unison experiment directory (no experiment.json in it)"
            )
        return json.loads(self.experiment_file.read_text(encoding="utf-8"))

    def update_experiment(self, **fields: Any) -> None:
        data = self.read_experiment()
        data.update(fields)
        self.write_experiment(data)

    # ---------------------------------------------------------------------------------- journal
    def append(self, event: dict[str, Any]) -> None:
        """Append one event to the journal as one whole line. A ``status`` event is fsynced before
        this returns, an ``end`` event by a background thread soon after (the next ``status`` event
        and :meth:`close` wait for it). A write that fails leaves no part of the line behind; a full
        disk raises :class:`unison.StorageFull`. Then each of :attr:`listeners` gets the line."""
        line = (json.dumps(event, default=str) + "\n").encode("utf-8")
        if self._fd is None:
            self._open_journal()
        fd = self._fd
        assert fd is not None
        failed = self._syncer.take_error() if self._syncer is not None else None
        if failed is not None:  # an earlier `end` may not be on disk: stop here
            self._reraise(failed, self.journal_file)
        kind = event.get("e")
        try:
            _write_all(fd, line)
            if kind in SYNCED_EVENTS:
                os.fsync(fd)
                self._sync_journal_dir()
        except BaseException as exc:  # a partial line would be glued to the next event: cut it off
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                pass
            self._reraise(exc, self.journal_file)
        self._size += len(line)
        if kind in BACKGROUND_SYNCED_EVENTS:
            if self._syncer is None:
                self._syncer = _Syncer(fd, str(self.journal_file), self._sync_journal_dir)
            self._syncer.ask()
        for listener in self.listeners:
            listener(line)

    def _open_journal(self) -> None:
        """Open the journal for append, first making it end on a line boundary: a complete last
        event that lacks its newline gets one; a torn last line is moved to ``journal.torn``."""
        try:
            fd = os.open(self.journal_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            self._reraise(exc, self.journal_file)
        try:
            size = os.fstat(fd).st_size
            if size == 0:  # its name must outlive a crash with its first durable event
                self._journal_dir_pending = True
            elif os.pread(fd, 1, size - 1) != b"\n":
                size = self._end_on_line_boundary(fd, size)
        except BaseException as exc:
            os.close(fd)
            self._reraise(exc, self.journal_file)
        self._fd, self._size = fd, size

    def _sync_journal_dir(self) -> None:
        if self._journal_dir_pending:  # (two threads may both do it: harmless)
            fsync_path(self.path)
            self._journal_dir_pending = False

    def _end_on_line_boundary(self, fd: int, size: int) -> int:
        start = size
        while start > 0:  # find the start of the last line, reading backwards
            block = os.pread(fd, min(start, 65536), max(0, start - 65536))
            cut = block.rfind(b"\n")
            if cut >= 0:
                start = start - len(block) + cut + 1
                break
            start -= len(block)
        tail = os.pread(fd, size - start, start)
        if _is_event(tail):
            _write_all(fd, b"\n")
            os.fsync(fd)
            return size + 1
        record = {"offset": start, "length": len(tail), "set_aside": time.time(),
                  "text": tail.decode("utf-8", "surrogateescape")}  # .encode(same) gives the bytes back
        torn = os.open(self.torn_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(torn, (json.dumps(record) + "\n").encode("ascii"))
            os.fsync(torn)
        finally:
            os.close(torn)
        os.ftruncate(fd, start)
        os.fsync(fd)
        return start

    def read_journal(self) -> list[dict[str, Any]]:
        """Every complete event; a torn last line (the process died mid-write) is ignored."""
        if not self.journal_file.is_file():
            return []
        return parse_journal(self.journal_file.read_bytes())

    # ------------------------------------------------------------------------------ result.json
    def write_result(self, data: dict[str, Any], sync_dir: bool = True) -> None:
        """Replace ``result.json``, fsynced; ``sync_dir=False`` leaves the directory's fsync to the
        ``experiment.json`` write that follows."""
        self._atomic_write_json(self.result_file, data, sync_dir=sync_dir)

    def read_result(self) -> dict[str, Any] | None:
        if not self.result_file.is_file():
            return None
        return json.loads(self.result_file.read_text(encoding="utf-8"))

    def close(self) -> None:
        """Close the journal (once the events waiting for their fsync have it) and release the lock
        (and the space reserve)."""
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            self._release_reserve()
            try:
                os.ftruncate(self._lock_fd, 0)  # no stale holder for the next driver's message
            except OSError:
                pass
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None


def parse_journal(data: bytes) -> list[dict[str, Any]]:
    """The events of a journal's bytes, one JSON object per line; a line that is not one (torn, or
    damaged) is skipped. The lines are parsed as one JSON array (two thirds of the time of a
    ``json.loads`` per line, which is what a damaged line falls back to)."""
    lines = data.decode("utf-8", errors="replace").split("\n")
    last = lines.pop()  # "" after the newline that ends the last event; else an unended (maybe torn) line
    lines = [line for line in lines if line.strip()]
    with collector_paused():
        try:
            events = json.loads("[" + ",".join(lines) + "]")
        except json.JSONDecodeError:
            events = None
        if events is None or len(events) != len(lines):  # (a damaged line holding a comma-separated pair)
            events = [_event_or_none(line) for line in lines]
        if last.strip():
            events.append(_event_or_none(last))
        return [event for event in events if isinstance(event, dict)]


def _event_or_none(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
