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

Here the worker writes into the trial folder on the driver's disk (inline, local). A worker without
that disk (every Spark executor, local mode too) saves into its temporary trial folder and streams the
checkpoint to the driver (:mod:`unison.worker.checkpoint_ship`), or writes to ``checkpoint_storage=``:
:class:`Checkpointer` is given the folder to write into. A plain path (a shared mount) is
written as above. An fsspec URL (``checkpoint_storage="s3://..."``, see
:mod:`unison.worker.checkpoint_storage`) has no atomic rename: the files are written into the final
``step-000012/`` and ``meta.json`` last, so the folder is a checkpoint only once it is whole; pruning
deletes ``meta.json`` first, and :func:`load_checkpoint` reads a URL as it reads a path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unison.errors import StorageFull
from unison.worker.checkpoint_storage import filesystem, is_url, local_path

FOLDER = "checkpoints"
META = "meta.json"
#: The entry of the trial dict given to :meth:`unison.worker.runtime.TrialRunner.run` (never on the wire)
#: that makes its checkpoints shipped: called with ``(root, policy)``, it returns the
#: :class:`unison.worker.checkpoint_ship.ShippingCheckpointer` of the trial.
SHIP_CHECKPOINTS = "ship_checkpoints"
#: A ``meta.json`` larger than this is no checkpoint's (unison writes ~100 bytes): it is never read whole.
MAX_META_BYTES = 1024 * 1024
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
def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a rename is durable once its folder is fsynced)."""
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
        import shutil

        shutil.copytree(directory, tmp / "data", symlinks=True)
        for path in sorted((tmp / "data").rglob("*")):
            if path.is_file() and not path.is_symlink():
                fsync_path(path)
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
    import shutil

    try:
        (path / META).unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def _storage_full(step: int, root: Any, what: str, exc: OSError) -> StorageFull:
    return StorageFull(f"saving the checkpoint of step {step} into {root} failed: the {what} is full "
                       f"({exc.strerror}). The checkpoints saved before are intact; free space, or keep "
                       f"fewer (keep_checkpoints=1)", root)


def save_checkpoint(root: Path | str, obj: Any, step: int, value: float | None = None) -> dict[str, Any]:
    """Save ``obj`` (a directory path or a picklable object) as the checkpoint at ``step`` under
    ``root`` (a trial's ``checkpoints`` folder: a path, or an fsspec URL), atomically; return
    ``{"step", "path", "size"}`` (``path``: the folder, relative to ``root``'s parent, the trial folder).

    Raises ``TypeError`` for an object that cannot be pickled, ``ValueError`` for a path that names
    no directory, and :class:`unison.StorageFull` when the disk fills up; the checkpoints saved
    before are then untouched."""
    if is_url(root):
        return _save_url(str(root), obj, step, value)
    root = Path(root)
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
        fsync_path(tmp)
        if final.exists():  # the same step saved again (a retry reached it again): replace it
            old = root / f".old-{step_name(step)}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        fsync_path(root)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            raise _storage_full(step, root, "disk", exc) from exc
        raise
    return {"step": step, "path": f"{FOLDER}/{final.name}", "size": size}


def _parse_meta(data: bytes) -> dict[str, Any] | None:
    """The ``meta.json`` of a checkpoint whose file holds ``data``; ``None`` if it is no checkpoint's (too
    large, not JSON, nested too deep to parse, no integer ``step``)."""
    if len(data) > MAX_META_BYTES:
        return None
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / META, "rb") as f:
            data = f.read(MAX_META_BYTES + 1)  # one byte more tells one too large
    except OSError:
        return None
    return _parse_meta(data)


def _doomed(kept: list[tuple[int, Any, Any]], policy: Policy) -> list[tuple[int, Any, Any]]:
    """Of the checkpoints ``(step, value, folder)`` in ``kept``, those ``policy`` does not keep."""
    kept = sorted(kept, key=lambda k: k[0])
    keep = {k[2] for k in kept[-policy.keep:]} if policy.keep > 0 else set()
    scored = [k for k in kept if isinstance(k[1], (int, float))]
    if policy.metric is not None and scored:
        best = (max if policy.mode == "max" else min)(scored, key=lambda k: k[1])
        keep.add(best[2])
    return [k for k in kept if k[2] not in keep]


def prune(root: Path | str, policy: Policy) -> list[int]:
    """Delete the checkpoints under ``root`` (a path, or an fsspec URL) that ``policy`` does not
    keep, and leftovers of interrupted writes; return the steps deleted."""
    if is_url(root):
        return _prune_url(str(root), policy)
    root = Path(root)
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
    deleted = []
    for step, _, folder in _doomed(kept, policy):
        _remove(folder)
        deleted.append(step)
    return deleted


class Checkpointer:
    """Saves one trial's checkpoints into ``root`` and prunes them by ``policy``; what the reporter
    calls (see :meth:`unison.worker.reporter.Reporter.report`). ``root`` may be an fsspec URL
    (``checkpoint_storage=``): ``location`` is then that URL (``root`` is a local folder's ``Path``
    only for a plain path)."""

    def __init__(self, root: Path | str, policy: Policy) -> None:
        self.location: Path | str = root if is_url(root) else Path(root)
        self.root = Path(root)
        self.policy = policy

    def save(self, obj: Any, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Save ``obj`` as the checkpoint of ``step`` (``metrics``: that report's), then prune."""
        value = metrics.get(self.policy.metric) if self.policy.metric is not None else None
        info = save_checkpoint(self.location, obj, step, value)
        prune(self.location, self.policy)
        return info


# ------------------------------------------------------------------ on an fsspec file system (a URL)
def _remove_url(fs: Any, folder: str) -> None:
    """Delete a checkpoint folder on ``fs``, ``meta.json`` first (as :func:`_remove`)."""
    for remove in (lambda: fs.rm_file(f"{folder}/{META}"), lambda: fs.rm(folder, recursive=True)):
        try:
            remove()
        except OSError:  # not there (any more)
            pass


def _put_directory(fs: Any, directory: Path, target: str) -> int:
    """Copy the files of ``directory`` to ``target`` on ``fs`` (a symlink: the file it names); their size."""
    size = 0
    for here, _, files in os.walk(directory):
        for name in sorted(files):
            source = Path(here) / name
            if not source.is_file():  # a dangling link, a socket
                continue
            relative = source.relative_to(directory).as_posix()
            fs.makedirs(f"{target}/{relative}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(source), f"{target}/{relative}")
            size += source.stat().st_size
    return size


def _write_url(fs: Any, final: str, obj: Any, directory: Path | None, data: bytes | None) -> tuple[str, int]:
    """Write ``obj`` (``directory``: the folder it names; ``data``: its pickle) into ``final``; its
    format and size."""
    if directory is not None:
        return "directory", _put_directory(fs, directory, f"{final}/data")
    if data is not None:
        fs.pipe_file(f"{final}/object.pkl", data)
        return "pickle", len(data)
    import pickle

    import torch

    try:
        with fs.open(f"{final}/object.pt", "wb") as f:
            torch.save(obj, f)
    except (TypeError, AttributeError, ValueError, RecursionError, pickle.PicklingError) as exc:
        raise _unpicklable(obj, exc) from exc
    return "torch", int(fs.size(f"{final}/object.pt"))


def _save_url(root: str, obj: Any, step: int, value: float | None) -> dict[str, Any]:
    """:func:`save_checkpoint` into a URL: the files go straight into ``step-<n>/``, ``meta.json``
    last (the commit marker), after the folder of the same step, if any, was deleted."""
    directory = _as_directory(obj)  # what cannot be saved fails before anything is deleted
    data = None
    if directory is None and not _holds_torch(obj):
        import pickle

        import cloudpickle

        try:
            data = cloudpickle.dumps(obj)
        except (TypeError, AttributeError, ValueError, RecursionError, pickle.PicklingError) as exc:
            raise _unpicklable(obj, exc) from exc
    fs, base = filesystem(root)
    final = f"{base.rstrip('/')}/{step_name(step)}"
    try:
        _remove_url(fs, final)  # the same step saved again (a retry reached it again)
        fs.makedirs(final, exist_ok=True)
        kind, size = _write_url(fs, final, obj, directory, data)
        meta = {"step": step, "format": kind, "size": size,
                "value": value if value is not None and math.isfinite(value) else None}
        fs.pipe_file(f"{final}/{META}", (json.dumps(meta) + "\n").encode())
    except BaseException as exc:
        _remove_url(fs, final)
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            raise _storage_full(step, root, "storage", exc) from exc
        raise
    return {"step": step, "path": f"{FOLDER}/{step_name(step)}", "size": size}


def _read_meta_url(fs: Any, folder: str) -> dict[str, Any] | None:
    try:
        data = fs.cat_file(f"{folder}/{META}", start=0, end=MAX_META_BYTES + 1)
    except (OSError, ValueError):
        return None
    return _parse_meta(data)


def _prune_url(root: str, policy: Policy) -> list[int]:
    """:func:`prune` of a URL: a ``step-<n>`` folder without ``meta.json`` (a write or a deletion cut
    short) is deleted too."""
    fs, base = filesystem(root)
    base = base.rstrip("/")
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    kept: list[tuple[int, Any, str]] = []
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or not name.startswith(_PREFIX):
            continue
        meta = _read_meta_url(fs, f"{base}/{name}")
        if meta is None:
            _remove_url(fs, f"{base}/{name}")
        else:
            kept.append((meta["step"], meta.get("value"), name))
    deleted = []
    for step, _, name in _doomed(kept, policy):
        _remove_url(fs, f"{base}/{name}")
        deleted.append(step)
    return deleted


def copy_checkpoint_url(source: str, root: str) -> str:
    """:func:`copy_checkpoint` on one fsspec URL's file system: the checkpoint ``source`` (a URL) into
    ``root`` (another trial's ``checkpoints`` URL) under the same step's name, ``meta.json`` last;
    return the new folder's URL (a clone's first checkpoint with ``checkpoint_storage=``)."""
    fs, folder = filesystem(source)
    folder = folder.rstrip("/")
    if _read_meta_url(fs, folder) is None:
        raise _not_a_checkpoint(source)
    name = folder.rsplit("/", 1)[-1]
    target = f"{filesystem(root)[1].rstrip('/')}/{name}"
    try:
        _remove_url(fs, target)
        for path in sorted(fs.find(folder)):
            relative = str(path)[len(folder):].strip("/")
            if relative and relative != META and ".." not in relative.split("/"):
                fs.makedirs(f"{target}/{relative}".rsplit("/", 1)[0], exist_ok=True)
                fs.copy(path, f"{target}/{relative}")
        fs.copy(f"{folder}/{META}", f"{target}/{META}")
    except BaseException:
        _remove_url(fs, target)
        raise
    return f"{root.rstrip('/')}/{name}"


# ------------------------------------------------------------------------------------- reading
def _not_a_checkpoint(path: Any) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is not a unison checkpoint (no {META} in it): pass a checkpoint's "
                             f"folder, as r.best.checkpoint or the trial table's checkpoint column give it "
                             f"(e.g. trials/0007/{FOLDER}/{step_name(12)})")


def checkpoint_folder(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: the folder itself, its ``data/`` or one of its files."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / META).is_file():
            return candidate
    raise _not_a_checkpoint(path)


def _download(fs: Any, folder: str) -> Path:
    """A local copy of the directory checkpoint ``folder``'s ``data/``, in a new temporary folder."""
    import tempfile

    source = f"{folder}/data"
    target = Path(tempfile.mkdtemp(prefix=f"unison-{folder.rsplit('/', 1)[-1]}-")) / "data"
    target.mkdir()
    for name in fs.find(source):
        relative = str(name)[len(source):].strip("/")
        if not relative or ".." in relative.split("/"):  # never a file outside the copy
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(name, str(target / relative))
    return target


def _load_url(url: str, map_location: Any) -> Any:
    """:func:`load_checkpoint` of a URL (a directory checkpoint not on this machine: downloaded)."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    for folder in (path, path.rsplit("/", 1)[0]):
        meta = _read_meta_url(fs, folder)
        if meta is not None:
            break
    else:
        raise _not_a_checkpoint(url)
    kind = meta.get("format")
    if kind == "directory":
        return Path(folder) / "data" if local_path(fs) else _download(fs, folder)
    if kind == "torch":
        import torch

        with fs.open(f"{folder}/object.pt", "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=False)  # unison wrote it (below)
    if kind == "pickle":
        import cloudpickle

        return cloudpickle.loads(fs.cat_file(f"{folder}/object.pkl"))
    raise ValueError(f"{url}/{META} names an unknown checkpoint format {kind!r}: it was written by a "
                     f"newer unison, or damaged")


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """The object saved as the checkpoint in ``path`` (a path, or an fsspec URL such as
    ``checkpoint_storage=`` gives; for a directory checkpoint, the path of its restored directory,
    downloaded into a temporary folder from a file system not on this machine). ``map_location``: as
    for ``torch.load``, for an object holding tensors."""
    if is_url(path):
        return _load_url(str(path), map_location)
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


# ------------------------------------------------------------------------------------- copying
def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (a checkpoint's files are never changed in place, only replaced), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def copy_checkpoint(folder: Path, root: Path) -> Path:
    """Copy the checkpoint ``folder`` into ``root`` (another trial's ``checkpoints`` folder) under the
    same step's name, atomically as :func:`save_checkpoint` writes; return the new folder. What
    population-based training gives a clone to start from: the copy outlives the source's pruning."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder.name
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    _remove(tmp)
    try:
        import shutil

        shutil.copytree(folder, tmp, symlinks=True, copy_function=_link_or_copy)
        if _read_meta(tmp) is None:  # the source was pruned while it was copied (meta.json goes first)
            raise FileNotFoundError(f"the checkpoint {folder} was deleted while it was copied")
        fsync_path(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        _remove(tmp)
        raise
    return final


def newest_on_disk(root: Path) -> tuple[int, Path] | None:
    """The step and folder of the newest whole checkpoint (with its ``meta.json``) under ``root``."""
    found = []
    for folder in root.iterdir() if root.is_dir() else []:
        meta = _read_meta(folder) if folder.name.startswith(_PREFIX) else None
        if meta is not None:
            found.append((meta["step"], folder))
    return max(found, key=lambda f: f[0]) if found else None
