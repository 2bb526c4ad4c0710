"""Checkpoints: what ``reporter.report(checkpoint=...)`` saves, which are kept, how one is read back.

Where they live: a trial's checkpoints are folders of its trial folder, one per step::

    trials/0007/checkpoints/step-000012/
        meta.json        {"step": 12, "format": "pickle" | "torch" | "directory", "value": 0.93, "size": ...}
        object.pkl       the object, cloudpickled          (format "pickle")
        object.pt        the object, torch.save'd           (format "torch": it holds torch tensors)
        data/            a copy of the directory passed     (format "directory")

A checkpoint is written whole or not at all: into ``checkpoints/.tmp-step-000012-<pid>/``, every file
fsynced, then renamed to ``step-000012`` and the ``checkpoints`` folder fsynced. A folder without
``meta.json`` is not a checkpoint (a deletion cut short, or a write a crash interrupted) and is
removed by the next save. After each save the trial keeps its last ``keep`` checkpoints plus the best
one by the search's metric (its value is in ``meta.json``, so the rule holds across a trial's
attempts); the others are deleted, ``meta.json`` first.

Here the worker writes into the trial folder on the driver's disk (inline, local, Spark local-mode).
A worker without that disk (Spark executors) is where checkpoint shipping or an fsspec
``checkpoint_storage=`` plugs in: :class:`Checkpointer` is given the folder to write into, and
:func:`save_checkpoint` / :func:`load_checkpoint` are the two places that touch the files.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unison.errors import StorageFull

FOLDER = "checkpoints"
META = "meta.json"
_PREFIX = "step-"
_FULL_ERRNOS = frozenset(n for n in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if n is not None)
_WHAT_TO_PASS = ("a directory you wrote (pass its path), a torch state_dict (model.state_dict(), "
                 "optimizer.state_dict()), or a plain dict of numbers, arrays and picklable objects")


def step_name(step: int) -> str:
    """The folder name of the checkpoint at ``step`` (``step-000012``; a negative step: ``step--000003``)."""
    return f"{_PREFIX}{'-' if step < 0 else ''}{abs(step):06d}"


@dataclass(frozen=True)
class Policy:
    """Which checkpoints a trial keeps: the last ``keep``, plus the best by ``metric`` (``mode``)."""

    keep: int = 2
    metric: str | None = None
    mode: str = "max"

    @classmethod
    def from_message(cls, spec: dict[str, Any] | None) -> Policy:
        """The policy of a trial message's ``checkpoint`` entry (the defaults without one)."""
        spec = spec or {}
        return cls(int(spec.get("keep", 2)), spec.get("metric"), spec.get("mode") or "max")


# ------------------------------------------------------------------------------------- writing
def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _holds_torch(obj: Any, depth: int = 0) -> bool:
    """Whether ``obj`` is or holds (in dicts, lists, tuples) a torch tensor, module or optimizer.
    Never imports torch: an object can hold torch values only if torch is loaded already."""
    torch = sys.modules.get("torch")
    if torch is None or depth > 6:
        return False
    if isinstance(obj, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
        return True
    if isinstance(obj, dict):
        return any(_holds_torch(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_torch(v, depth + 1) for v in obj)
    return False


def _unpicklable(obj: Any, exc: BaseException) -> TypeError:
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return TypeError(f"reporter.report(checkpoint=...) cannot save a {kind}: it cannot be pickled "
                     f"({type(exc).__name__}: {exc}). Pass instead {_WHAT_TO_PASS}")


def _as_directory(obj: Any) -> Path | None:
    """The directory a ``checkpoint=`` path names; ``None`` for an object; raises for a path that
    names no directory."""
    if not isinstance(obj, (str, os.PathLike)):
        return None
    path = Path(obj)
    if path.is_dir():
        return path
    what = "a file" if path.is_file() else "not there"
    raise ValueError(f"reporter.report(checkpoint={str(obj)!r}): a path must name a directory you wrote, "
                     f"but it is {what}. Write the checkpoint's files into a directory and pass that, or "
                     f"pass the object itself (a state_dict, a dict)")


def _write_into(tmp: Path, obj: Any) -> str:
    """Write ``obj`` into the new checkpoint folder ``tmp``; its format."""
    directory = _as_directory(obj)
    if directory is not None:
        shutil.copytree(directory, tmp / "data", symlinks=True)
        for path in sorted((tmp / "data").rglob("*")):
            if path.is_file() and not path.is_symlink():
                _fsync_path(path)
        return "directory"
    import pickle

    unpicklable = (TypeError, AttributeError, ValueError, RecursionError, pickle.PicklingError)
    if _holds_torch(obj):
        import torch

        try:
            with open(tmp / "object.pt", "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        except unpicklable as exc:
            raise _unpicklable(obj, exc) from exc
        return "torch"
    import cloudpickle

    try:
        data = cloudpickle.dumps(obj)
    except unpicklable as exc:
        raise _unpicklable(obj, exc) from exc
    _write_file(tmp / "object.pkl", data)
    return "pickle"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, ``meta.json`` first: cut short, it is no checkpoint any more."""
    try:
        (path / META).unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(root: Path, obj: Any, step: int, value: float | None = None) -> dict[str, Any]:
    """Save ``obj`` (a directory path or a picklable object) as the checkpoint at ``step`` under
    ``root`` (a trial's ``checkpoints`` folder), atomically; return ``{"step", "path", "size"}``
    (``path``: the folder, relative to ``root``'s parent, the trial folder).

    Raises ``TypeError`` for an object that cannot be pickled, ``ValueError`` for a path that names
    no directory, and :class:`unison.StorageFull` when the disk fills up; the checkpoints saved
    before are then untouched."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        kind = _write_into(tmp, obj)
        size = _size(tmp)
        meta = {"step": step, "format": kind, "size": size,
                "value": value if value is not None and math.isfinite(value) else None}
        _write_file(tmp / META, (json.dumps(meta) + "\n").encode())
        _fsync_path(tmp)
        if final.exists():  # the same step saved again (a retry reached it again): replace it
            old = root / f".old-{step_name(step)}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        _fsync_path(root)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            raise StorageFull(f"saving the checkpoint of step {step} into {root} failed: the disk is full "
                              f"({exc.strerror}). The checkpoints saved before are intact; free space, or "
                              f"keep fewer (keep_checkpoints=1)", root) from exc
        raise
    return {"step": step, "path": f"{FOLDER}/{final.name}", "size": size}


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def prune(root: Path, policy: Policy) -> list[int]:
    """Delete the checkpoints under ``root`` that ``policy`` does not keep, and leftovers of
    interrupted writes; return the steps deleted."""
    kept: list[tuple[int, float | None, Path]] = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        if folder.name.startswith((".tmp-", ".old-")):
            if not folder.name.endswith(f"-{os.getpid()}"):  # another process's, which died
                _remove(folder)
            continue
        meta = _read_meta(folder) if folder.name.startswith(_PREFIX) else None
        if meta is None:
            if folder.name.startswith(_PREFIX):
                _remove(folder)  # a deletion cut short
            continue
        kept.append((meta["step"], meta.get("value"), folder))
    kept.sort(key=lambda k: k[0])
    keep = {k[2] for k in kept[-policy.keep:]} if policy.keep > 0 else set()
    scored = [k for k in kept if isinstance(k[1], (int, float))]
    if policy.metric is not None and scored:
        best = (max if policy.mode == "max" else min)(scored, key=lambda k: k[1])  # type: ignore[arg-type,return-value]
        keep.add(best[2])
    deleted = []
    for step, _, folder in kept:
        if folder not in keep:
            _remove(folder)
            deleted.append(step)
    return deleted


class Checkpointer:
    """Saves one trial's checkpoints into ``root`` and prunes them by ``policy``; what the reporter
    calls (see :meth:`unison.worker.reporter.Reporter.report`)."""

    def __init__(self, root: Path, policy: Policy) -> None:
        self.root, self.policy = Path(root), policy

    def save(self, obj: Any, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Save ``obj`` as the checkpoint of ``step`` (``metrics``: that report's), then prune."""
        value = metrics.get(self.policy.metric) if self.policy.metric is not None else None
        info = save_checkpoint(self.root, obj, step, value)
        prune(self.root, self.policy)
        return info


# ------------------------------------------------------------------------------------- reading
def checkpoint_folder(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: the folder itself, its ``data/`` or one of its files."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / META).is_file():
            return candidate
    raise FileNotFoundError(f"{path} is not a unison checkpoint (no {META} in it): pass a checkpoint's "
                            f"folder, as r.best.checkpoint or the trial table's checkpoint column give it "
                            f"(e.g. trials/0007/{FOLDER}/{step_name(12)})")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """The object saved as the checkpoint in ``path`` (for a directory checkpoint, the path of its
    restored directory). ``map_location``: as for ``torch.load``, for an object holding tensors."""
    folder = checkpoint_folder(path)
    meta = _read_meta(folder) or {}
    kind = meta.get("format")
    if kind == "directory":
        return folder / "data"
    if kind == "torch":
        import torch

        with open(folder / "object.pt", "rb") as f:
            # unison wrote this file itself; weights_only=False restores any picklable object in it
            return torch.load(f, map_location=map_location, weights_only=False)
    if kind == "pickle":
        import cloudpickle

        return cloudpickle.loads((folder / "object.pkl").read_bytes())
    raise ValueError(f"{folder / META} names an unknown checkpoint format {kind!r}: it was written by a "
                     f"newer unison, or damaged")
