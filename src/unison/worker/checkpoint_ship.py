"""Checkpoints of workers without the driver's disk (Spark executors), shipped in chunks.

Such a worker saves each checkpoint into its temporary trial folder as any worker does
(:func:`unison.worker.checkpoints.save_checkpoint`), then, before the ``report`` that names it, sends
its files to the driver as ``checkpoint_chunk`` messages on the same connection (so they arrive
first), and deletes its copy: :class:`ShippingCheckpointer`. At most :data:`WINDOW` chunks travel
unacknowledged, so the driver, which writes each chunk to disk as it comes, never queues more of a
checkpoint than that. The driver commits the checkpoint when the report arrives
(:mod:`unison.driver.checkpoint_inbox`) and may refuse it (its per-trial limit): the report then
raises :class:`CheckpointRefused` in the function, which fails the trial.

The other way, the driver ships the checkpoint a trial resumes from right before its ``trial``
message; the worker's reader thread writes it into a staging folder (:class:`Staging`) and points the
message's ``checkpoint.path`` at that copy, deleted when the trial ends. :func:`chunks` reads a
checkpoint folder as messages and :class:`ChunkWriter` writes them back, on either side.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from unison.protocol import (
    CHECKPOINT_CHUNK,
    MAX_CHECKPOINT_FILES,
    CheckpointChunkMessage,
)
from unison.worker.checkpoints import (  # noqa: F401 - SHIP_CHECKPOINTS: importable from here too
    META,
    SHIP_CHECKPOINTS,
    Checkpointer,
    Policy,
    save_checkpoint,
)

CHECKPOINT_LIMIT_MB = 4096  # what one trial's shipped checkpoints may hold on the driver's disk, by default
CHUNK_BYTES = 1024 * 1024  # what one checkpoint_chunk carries (the protocol allows up to 4 MiB)
WINDOW = 8  # chunks a worker sends before it waits for the driver's acknowledgement of the oldest
_ENTRY_BYTES = 4096  # what a ChunkWriter counts against its budget for each file and folder it creates


class CheckpointRefused(RuntimeError):
    """The driver refused a checkpoint this trial shipped (over its per-trial limit, or it arrived
    incomplete); raised by ``reporter.report(checkpoint=...)``, it fails the trial."""


class ChunkError(ValueError):
    """Chunks that do not make up a checkpoint (out of order, a file twice, too many files)."""


class ChunkBudgetExceeded(ChunkError):
    """The chunks of a checkpoint exceed the bytes its :class:`ChunkWriter` may write."""


# ------------------------------------------------------------------------------ reading
def checkpoint_files(folder: Path) -> list[tuple[str, Path]]:
    """The regular files under ``folder`` as ``(relative posix path, path)``, ``meta.json`` last
    (symbolic links are not followed, nor shipped)."""
    found: list[tuple[str, Path]] = []
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(top) / name
            if path.is_file() and not path.is_symlink():
                found.append((path.relative_to(folder).as_posix(), path))
    return sorted(found, key=lambda f: (f[0] == META, f[0]))


def chunks(folder: Path, trial_id: int, step: int,
           size: int = CHUNK_BYTES) -> Iterator[CheckpointChunkMessage]:
    """The ``checkpoint_chunk`` messages of the checkpoint in ``folder``: each file in order, in parts
    of at most ``size`` bytes (an empty file: one empty chunk), ``meta.json`` last. Reads two parts of
    one file at a time, never a whole file."""
    for name, path in checkpoint_files(folder):
        with open(path, "rb") as f:
            offset, data = 0, f.read(size)
            while True:
                following = f.read(size) if len(data) == size else b""
                yield CheckpointChunkMessage(t=CHECKPOINT_CHUNK, trial_id=trial_id, step=step, file=name,
                                             offset=offset, data=data, last=not following)
                if not following:
                    break
                offset, data = offset + len(data), following


# ------------------------------------------------------------------------------ writing
class ChunkWriter:
    """Writes the chunks of one checkpoint into ``folder`` (created) as they come, one file open at a
    time, within ``budget`` bytes (``None``: no bound; each file and folder created counts 4 KiB too,
    so that empty files cannot fill a disk's inodes); ``fsync``: each file is fsynced when its last
    chunk is written."""

    def __init__(self, folder: Path, step: int, budget: int | None = None, fsync: bool = False) -> None:
        self.folder, self.step, self.budget, self.fsync = folder, step, budget, fsync
        self.received = 0  # bytes written
        self._entries = 0  # bytes counted for the files and folders created
        self.files: set[str] = set()  # files written whole
        self._file: IO[bytes] | None = None
        self._name: str | None = None
        self._written = 0
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def complete(self) -> bool:
        """Whether every file begun was written whole, ``meta.json`` among them."""
        return self._file is None and META in self.files

    def write(self, chunk: Mapping[str, Any]) -> None:
        """Write ``chunk`` (a validated ``checkpoint_chunk``). Raises :class:`ChunkError` for chunks that
        do not follow each other, :class:`ChunkBudgetExceeded`, ``OSError`` from the disk."""
        name, data, offset = chunk["file"], chunk["data"], chunk["offset"]
        if name != self._name:
            self._open(name, offset)
        if offset != self._written:
            raise ChunkError(f"{name}: a chunk at offset {offset} came after {self._written} bytes")
        total = self._entries + self.received + len(data)
        if self.budget is not None and total > self.budget:
            raise ChunkBudgetExceeded(f"{total} bytes exceed {self.budget}")
        assert self._file is not None
        self._file.write(data)
        self._written += len(data)
        self.received += len(data)
        if chunk["last"]:
            self._finish_file()

    def _open(self, name: str, offset: int) -> None:
        if self._file is not None:
            raise ChunkError(f"{self._name} ended without its last chunk")
        if name in self.files:
            raise ChunkError(f"{name} came twice")
        if len(self.files) >= MAX_CHECKPOINT_FILES:
            raise ChunkError(f"more than {MAX_CHECKPOINT_FILES} files")
        if offset != 0:
            raise ChunkError(f"{name}: its first chunk is at offset {offset}, not 0")
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts) or name.startswith("/"):
            raise ChunkError(f"{name!r} is no path inside the checkpoint")
        target = self.folder.joinpath(*parts)
        created = [d for d in target.parents if d.is_relative_to(self.folder) and not d.exists()]
        self._entries += _ENTRY_BYTES * (len(created) + 1)
        if self.budget is not None and self._entries + self.received > self.budget:
            raise ChunkBudgetExceeded(f"{len(self.files) + 1} files exceed {self.budget} bytes")
        target.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(target, "xb")  # noqa: SIM115 - closed by its last chunk or close(); never overwrites
        self._name, self._written = name, 0

    def _finish_file(self) -> None:
        assert self._file is not None and self._name is not None
        try:
            if self.fsync:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        self.files.add(self._name)
        self._file, self._name = None, None

    def close(self) -> None:
        """Close the file being written, if any (the folder stays)."""
        if self._file is not None:
            self._file.close()
            self._file, self._name = None, None


# ---------------------------------------------------------------------- worker -> driver
class ShippingCheckpointer(Checkpointer):
    """Saves a trial's checkpoint into ``root`` (the worker's temporary trial folder), ships it to the
    driver in chunks (``send``; ``next_ack`` returns the driver's next ``checkpoint_ack``), then deletes
    it here: the driver keeps and prunes the trial's checkpoints."""

    def __init__(self, root: Path, policy: Policy, trial_id: int, send: Callable[[Mapping[str, Any]], None],
                 next_ack: Callable[[], Mapping[str, Any]]) -> None:
        super().__init__(root, policy)
        self.trial_id, self._send, self._next_ack = trial_id, send, next_ack

    def save(self, obj: Any, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Save ``obj`` as the checkpoint of ``step`` and ship it; what the report says of it, with the
        bytes and files shipped. Raises :class:`CheckpointRefused` when the driver refuses it."""
        value = metrics.get(self.policy.metric) if self.policy.metric is not None else None
        info = save_checkpoint(self.root, obj, step, value)
        folder = self.root.parent / info["path"]
        try:
            shipped, files = self._ship(folder, step)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return {**info, "shipped": shipped, "files": files}

    def _ship(self, folder: Path, step: int) -> tuple[int, int]:
        shipped = files = unacknowledged = 0
        for chunk in chunks(folder, self.trial_id, step):
            while unacknowledged >= WINDOW:
                self._acknowledged()
                unacknowledged -= 1
            self._send(chunk)
            unacknowledged += 1
            shipped += len(chunk["data"])
            files += chunk["last"]
        # The acknowledgements still to come arrive before the decision on the report that follows.
        return shipped, files

    def _acknowledged(self) -> None:
        ack = self._next_ack()
        if ack.get("error"):
            raise CheckpointRefused(ack["error"])


# ---------------------------------------------------------------------- driver -> worker
class Staging:
    """The checkpoints the driver ships to this worker for trials that resume from them, each in a
    temporary folder of its own. The reader thread :meth:`add`\\ s chunks and :meth:`resolve`\\ s the
    ``trial`` message that follows them; the main thread :meth:`discard`\\ s a trial's copy when the
    trial ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._staged: dict[int, tuple[Path, ChunkWriter]] = {}  # trial id -> (its temporary folder, writer)
        self._errors: dict[int, str] = {}

    def add(self, chunk: Mapping[str, Any]) -> None:
        """Write ``chunk`` (a validated ``checkpoint_chunk``) into its trial's staging folder; a chunk of
        another step starts that trial's copy anew. A problem is kept for :meth:`resolve`."""
        trial_id, step = chunk["trial_id"], chunk["step"]
        with self._lock:
            staged = self._staged.get(trial_id)
            if staged is None or staged[1].step != step:
                self._discard(trial_id)
                top = Path(tempfile.mkdtemp(prefix=f"unison-resume-{trial_id}-"))
                staged = self._staged[trial_id] = (top, ChunkWriter(top / "checkpoint", step))
            if trial_id in self._errors:
                return
            try:
                staged[1].write(chunk)
            except (ChunkError, OSError) as exc:
                staged[1].close()
                self._errors[trial_id] = f"{type(exc).__name__}: {exc}"

    def resolve(self, message: dict[str, Any]) -> None:
        """Point ``message``'s checkpoint (a ``trial`` message) at the staged copy of it; without one
        (nothing shipped, or the copy failed) the trial starts without a checkpoint, as this worker cannot
        read the driver's disk. A checkpoint in shared storage (``root``) is left alone."""
        spec = message.get("checkpoint")
        if not spec or not spec.get("path") or spec.get("root"):
            return
        trial_id = message["trial_id"]
        with self._lock:
            staged = self._staged.get(trial_id)
            error = self._errors.get(trial_id)
            writer = staged[1] if staged is not None and error is None else None
            if writer is not None and writer.step == spec.get("step") and writer.complete:
                spec["path"] = str(writer.folder)
                return
        why = error or "it did not arrive"
        print(f"unison: trial {trial_id} starts without its checkpoint of step {spec.get('step')}: {why}",
              file=sys.stderr)
        spec["path"] = spec["step"] = None

    def discard(self, trial_id: int) -> None:
        """Delete ``trial_id``'s staged checkpoint, if any."""
        with self._lock:
            self._discard(trial_id)

    def _discard(self, trial_id: int) -> None:
        self._errors.pop(trial_id, None)
        staged = self._staged.pop(trial_id, None)
        if staged is not None:
            staged[1].close()
            shutil.rmtree(staged[0], ignore_errors=True)

    def close(self) -> None:
        """Delete every staged checkpoint."""
        with self._lock:
            for trial_id in list(self._staged):
                self._discard(trial_id)
