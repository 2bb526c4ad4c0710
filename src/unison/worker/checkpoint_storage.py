"""``checkpoint_storage=``: a shared file system where workers write checkpoints themselves.

A location is either a plain local path that every worker sees (a shared mount: the os handles it,
with the atomic rename and fsync of :mod:`unison.worker.checkpoints`), or any fsspec URL
(``file:///mnt/shared/ckpts``, ``s3://bucket/ckpts``, ``hdfs://namenode/ckpts``), whose file system
fsspec provides. Experiment ``E``'s trial 7 keeps its checkpoints in
``<location>/<E's folder name>/trials/0007/checkpoints/``. fsspec is imported here only, and only when
a URL is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_FIX = ("pass a folder every worker sees (a shared mount: /mnt/shared/ckpts) or an fsspec URL the driver "
        "and every worker can write to (file:///mnt/shared/ckpts, s3://bucket/ckpts, hdfs://host/ckpts)")


def is_url(location: Any) -> bool:
    """Whether ``location`` is a URL (``scheme://...``), as opposed to a plain local path."""
    return isinstance(location, str) and "://" in location


def normalize(location: str | os.PathLike[str]) -> str:
    """``location`` as recorded in ``experiment.json``: a URL without trailing slashes, a plain path
    made absolute (workers may run in another directory)."""
    text = os.fspath(location)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"checkpoint_storage={location!r} names no folder: {_FIX}")
    if is_url(text):
        scheme, _, rest = text.partition("://")
        if scheme == "file" and not rest.startswith("/"):  # file://relative: relative to this directory
            rest = os.path.abspath(rest)
        return f"{scheme}://{rest.rstrip('/') or '/'}"
    return str(Path(text).expanduser().absolute())


def join(location: str, *parts: str) -> str:
    """``location`` (a URL or a path) with ``parts`` appended, ``/``-separated for a URL."""
    if is_url(location):
        return "/".join([location.rstrip("/"), *parts])
    return os.path.join(location, *parts)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path on it. Raises ``ValueError`` for a protocol fsspec
    does not know (or a file system that cannot be opened) and ``ImportError`` when fsspec, or the
    package of a protocol it knows (s3fs, gcsfs, pyarrow), is not installed."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise ImportError(f"checkpoint_storage={url!r} is a URL, which takes fsspec: pip install fsspec "
                          f"(or 'unison[storage]'), or pass a plain path every worker sees") from exc
    try:
        fs, path = url_to_fs(url)
    except ImportError as exc:  # a protocol fsspec knows, whose package is missing
        raise ImportError(f"checkpoint_storage={url!r}: {exc} (fsspec needs it for this protocol)") from exc
    except ValueError as exc:
        if "protocol not known" not in str(exc).lower():
            raise ValueError(f"checkpoint_storage={url!r} cannot be opened ({_short(exc)}): {_FIX}") from exc
        from fsspec.registry import known_implementations

        scheme = url.partition("://")[0]
        some = ", ".join(f"{p}://" for p in ("file", "s3", "gcs", "abfs", "hdfs", "sftp")
                         if p in known_implementations)
        raise ValueError(f"checkpoint_storage={url!r}: fsspec knows no protocol {scheme!r}. Use one it knows "
                         f"({some}, ...) or a plain path every worker sees") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. hdfs:// without a JVM: say which URL, and what to do
        raise ValueError(f"checkpoint_storage={url!r} cannot be opened ({_short(exc)}): {_FIX}") from exc
    return fs, path


def local_path(fs: Any) -> bool:
    """Whether fsspec file system ``fs`` is this machine's own (``file://``): its paths are local paths."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def is_file(location: str) -> bool:
    """Whether ``location`` (a URL or a path) is a file; ``False`` where it cannot be asked."""
    try:
        if is_url(location):
            fs, path = filesystem(location)
            return bool(fs.isfile(path))
        return Path(location).is_file()
    except (OSError, ValueError, ImportError):
        return False


def check_writable(location: str) -> None:
    """Create the folder ``location`` names, write a probe file into it and delete it: the driver's
    check before any trial runs. Raises ``ValueError`` (``ImportError`` for a missing package) naming
    the location and what would work."""
    import secrets

    probe = f".unison-probe-{os.getpid()}-{secrets.token_hex(4)}"
    fs, path = filesystem(location) if is_url(location) else (None, location)
    try:
        if fs is None:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / probe).write_bytes(b"unison")
            (Path(path) / probe).unlink()
        else:
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(f"{path.rstrip('/')}/{probe}", b"unison")
            fs.rm_file(f"{path.rstrip('/')}/{probe}")
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means workers cannot write there
        raise ValueError(f"checkpoint_storage={location!r}: the driver cannot create files there "
                         f"({_short(exc)}): {_FIX}") from exc
