"""The driver's end of checkpoint shipping, for workers without its disk (Spark executors).

A worker ships each checkpoint it saves as ``checkpoint_chunk`` messages right before the ``report``
that names it (see :mod:`unison.worker.checkpoint_ship`). :class:`CheckpointInbox` writes each chunk
to disk as it comes, into ``trials/<id>/checkpoints/.tmp-step-<n>-<driver pid>/``, and acknowledges
it; when the report arrives it checks that the bytes and files received are those the worker sent,
renames the folder into place (``step-<n>``, fsynced: the same commit as
:func:`unison.worker.checkpoints.save_checkpoint`) and prunes the trial's checkpoints by its policy.

What a peer can make the driver hold: one checkpoint in flight per trial (a chunk of another step
replaces it), one file open per trial, and on disk at most the per-trial limit (``limit_bytes``, the
backend's ``checkpoint_limit_mb``) for the trial's checkpoints, the arriving one included. Over it,
the checkpoint is refused: its chunks are deleted, the worker is told at once, and the report fails
the trial with a message naming the limit. Any other problem taking a chunk or committing (the
driver's disk full, a ``meta.json`` that is no checkpoint's) refuses the checkpoint the same way: a
worker can fail its own trial, never the experiment. A trial's partial checkpoint is removed when its
worker goes away. The other way, :func:`send_checkpoint` ships the checkpoint a trial resumes from.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unison.driver.store import ExperimentStore
from unison.protocol import CHECKPOINT_ACK, CheckpointAckMessage
from unison.worker.checkpoint_ship import ChunkBudgetExceeded, ChunkWriter, chunks
from unison.worker.checkpoints import FOLDER, MAX_META_BYTES, META, Policy, fsync_path, prune, step_name

_HOW_TO_FIX = ("Raise checkpoint_limit_mb, keep fewer checkpoints (keep_checkpoints=1: a trial holds "
               "up to keep_checkpoints + 2 at once), or have the workers write checkpoints to storage "
               "they share (checkpoint_storage=...)")


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def _committed_bytes(root: Path) -> int:
    """What the checkpoints under ``root`` hold (not the folders of writes under way, ``.tmp-``/``.old-``)."""
    total = 0
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith("."):
            total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return total


@dataclass
class _Arriving:
    """A checkpoint under way: who sends it, where it is written (``writer``: ``None`` until its first
    chunk is taken), what its trial holds already, why it is refused (if it is)."""

    peer_id: int
    step: int
    folder: Path
    writer: ChunkWriter | None = None
    held: int = 0
    error: str | None = None

    def drop(self) -> None:
        """Close the file being written and delete the folder, whatever state the disk is in."""
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:
            pass  # the file's last buffered bytes could not be written: it is deleted anyway
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class CheckpointInbox:
    """Receives the checkpoints workers ship, writing them into their trials' folders of ``store``.

    ``limit_bytes``: what one trial's checkpoints may hold on the driver's disk; ``limit_name``: how
    the user sets it, for the message (``Spark(checkpoint_limit_mb=4096)``)."""

    def __init__(self, store: ExperimentStore, limit_bytes: int, limit_name: str) -> None:
        self.store, self.limit_bytes, self.limit_name = store, limit_bytes, limit_name
        self._arriving: dict[int, _Arriving] = {}

    def chunk(self, peer_id: int, message: Mapping[str, Any]) -> CheckpointAckMessage | None:
        """Write the ``checkpoint_chunk`` ``message`` that ``peer_id`` (which runs its trial) sent; the
        acknowledgement to send back, ``None`` for a chunk of a checkpoint already refused."""
        trial_id, step = message["trial_id"], message["step"]
        arriving = self._arriving.get(trial_id)
        if arriving is None or arriving.step != step or arriving.peer_id != peer_id:
            self.discard(trial_id)  # at most one checkpoint in flight per trial
            folder = self.store.trial_dir(trial_id) / FOLDER / f".tmp-{step_name(step)}-{os.getpid()}"
            arriving = self._arriving[trial_id] = _Arriving(peer_id, step, folder)
        if arriving.error is not None:
            return None
        ack = CheckpointAckMessage(t=CHECKPOINT_ACK, trial_id=trial_id, step=step)
        try:
            writer = arriving.writer or self._begin(arriving)
            writer.write(message)
        except ChunkBudgetExceeded:
            self._refuse(arriving, (
                f"trial {trial_id}'s checkpoint of step {step} would take what its checkpoints hold on the "
                f"driver's disk past the per-trial limit, {self.limit_name} ({_mib(self.limit_bytes)}): the "
                f"checkpoints it keeps hold {_mib(arriving.held)}, which leaves "
                f"{_mib(max(self.limit_bytes - arriving.held, 0))} for this one, and it is larger. "
                f"{_HOW_TO_FIX}"))
            ack["error"] = arriving.error
        except Exception as exc:  # noqa: BLE001 - what the disk or writer cannot take fails its trial only
            self._refuse(arriving, f"trial {trial_id}'s checkpoint of step {step} could not be received by "
                                   f"the driver: {type(exc).__name__}: {exc}")
            ack["error"] = arriving.error
        return ack

    def _begin(self, arriving: _Arriving) -> ChunkWriter:
        """Create the folder ``arriving`` is written into (anew) and its writer, within the trial's limit."""
        arriving.held = _committed_bytes(arriving.folder.parent)
        shutil.rmtree(arriving.folder, ignore_errors=True)
        arriving.writer = ChunkWriter(arriving.folder, arriving.step,
                                      budget=max(self.limit_bytes - arriving.held, 0), fsync=True)
        return arriving.writer

    @staticmethod
    def _refuse(arriving: _Arriving, error: str) -> None:
        arriving.error = error
        arriving.drop()

    def commit(self, peer_id: int, trial_id: int, checkpoint: Mapping[str, Any],
               policy: Policy) -> str | None:
        """Put into place the checkpoint a report of ``trial_id`` names (``{"step", "path", "size",
        "shipped", "files"}``) and prune the trial's checkpoints by ``policy``; ``None`` once it is in
        place, else why it is refused (the report then fails the trial)."""
        step = checkpoint["step"]
        arriving = self._arriving.get(trial_id)
        if arriving is None or arriving.peer_id != peer_id or arriving.step != step:
            self.discard(trial_id, peer_id)
            return (f"trial {trial_id}'s report names a checkpoint of step {step} whose files did not reach "
                    f"the driver")
        del self._arriving[trial_id]
        writer = arriving.writer
        try:
            if arriving.error is not None or writer is None:
                return arriving.error or f"trial {trial_id}'s checkpoint of step {step} has no files"
            writer.close()
            problem = self._mismatch(writer, checkpoint)
            if problem is None:
                root = writer.folder.parent
                self._put_in_place(writer.folder, root / step_name(step))
                prune(root, policy)
            return problem
        except Exception as exc:  # noqa: BLE001 - a checkpoint the driver cannot save fails its trial only
            return (f"trial {trial_id}'s checkpoint of step {step} could not be saved by the driver: "
                    f"{type(exc).__name__}: {exc}")
        finally:
            arriving.drop()  # gone already once it is in place

    @staticmethod
    def _mismatch(writer: ChunkWriter, checkpoint: Mapping[str, Any]) -> str | None:
        """What is wrong with the checkpoint ``writer`` received, given what the report says was sent."""
        if checkpoint.get("path") != f"{FOLDER}/{step_name(writer.step)}":
            return f"the report of step {writer.step} names the checkpoint {checkpoint.get('path')!r}"
        sent = (checkpoint.get("shipped"), checkpoint.get("files"))
        if not writer.complete or (writer.received, len(writer.files)) != sent:
            return (f"the checkpoint of step {writer.step} arrived incomplete: the driver received "
                    f"{writer.received} bytes in {len(writer.files)} whole files"
                    f"{'' if META in writer.files else f' (no {META})'}, the worker sent {sent[0]} bytes in "
                    f"{sent[1]} files")
        import json

        try:
            size = (writer.folder / META).stat().st_size
            if size > MAX_META_BYTES:
                return (f"the checkpoint of step {writer.step} has a {META} of {size} bytes, over the "
                        f"{MAX_META_BYTES} a checkpoint's may hold")
            meta = json.loads((writer.folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            return (f"the checkpoint of step {writer.step} has an unreadable {META}: "
                    f"{type(exc).__name__}: {exc}")
        if not isinstance(meta, dict) or meta.get("step") != writer.step:
            return f"the checkpoint of step {writer.step} has a {META} of another step"
        return None

    @staticmethod
    def _put_in_place(tmp: Path, final: Path) -> None:
        """Rename the written folder ``tmp`` to ``final`` (replacing a checkpoint of the same step that a
        retry saved again), fsynced: the commit of :func:`unison.worker.checkpoints.save_checkpoint`."""
        fsync_path(tmp)
        root = final.parent
        if final.exists():
            old = root / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            (old / META).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)

    def discard(self, trial_id: int, peer_id: int | None = None) -> None:
        """Delete ``trial_id``'s checkpoint under way, if any (only ``peer_id``'s, when given)."""
        arriving = self._arriving.get(trial_id)
        if arriving is not None and peer_id in (None, arriving.peer_id):
            del self._arriving[trial_id]
            arriving.drop()

    def forget_peer(self, peer_id: int) -> None:
        """``peer_id`` went away: delete the checkpoints it was sending."""
        for trial_id in [t for t, a in self._arriving.items() if a.peer_id == peer_id]:
            self.discard(trial_id)

    def close(self) -> None:
        """Delete every checkpoint still under way."""
        for trial_id in list(self._arriving):
            self.discard(trial_id)


def send_checkpoint(send: Callable[[Mapping[str, Any]], None], trial_id: int, step: int,
                    folder: Path) -> str | None:
    """Ship the checkpoint in ``folder`` (on the driver's disk) to a worker, as ``checkpoint_chunk``
    messages given to ``send`` (its ``OSError`` propagates); what went wrong reading it, if anything."""
    parts = chunks(folder, trial_id, step)
    while True:
        try:
            chunk = next(parts, None)
        except OSError as exc:
            return f"reading the checkpoint {folder} failed: {exc}"
        if chunk is None:
            return None
        send(chunk)
