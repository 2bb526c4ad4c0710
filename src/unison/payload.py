"""Shipping the training function to workers: one cloudpickled file the driver writes.

Workers read the file from the driver's disk (local backend) or receive its bytes through the
engine (Spark). It is never sent over the driver's socket.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import msgpack


def _culprit(obj: Any, label: str, depth: int = 0) -> str | None:
    """Name the part of ``obj`` (closure variable, global, default) that cannot be pickled."""
    import cloudpickle

    code = getattr(obj, "__code__", None)
    if code is None or depth > 3:
        return None
    parts: list[tuple[str, Any]] = []
    for name, cell in zip(code.co_freevars, getattr(obj, "__closure__", None) or (), strict=False):
        try:
            parts.append((f"closure variable {name!r}", cell.cell_contents))
        except ValueError:
            continue
    globs = getattr(obj, "__globals__", {})
    parts += [(f"global {name!r}", globs[name]) for name in code.co_names if name in globs]
    parts += [("default of a parameter", d) for d in getattr(obj, "__defaults__", None) or ()]
    for where, value in parts:
        try:
            cloudpickle.dumps(value)
        except Exception as exc:  # noqa: BLE001 - we are looking for exactly this failure
            inner = _culprit(value, where, depth + 1)
            return inner or f"{label}: its {where} ({type(value).__name__}) cannot be pickled ({exc})"
    return None


def dumps_payload(parts: dict[str, Any]) -> bytes:
    """Serialize the callables and objects workers need, naming what cannot be pickled."""
    import cloudpickle

    try:
        blob = cloudpickle.dumps(parts)
    except Exception:  # noqa: BLE001 - pickle the parts one by one to name the one that fails
        for key, obj in parts.items():
            try:
                cloudpickle.dumps(obj)
            except Exception as exc:  # noqa: BLE001
                label = getattr(obj, "__qualname__", None) or type(obj).__name__
                detail = _culprit(obj, f"{key} {label!r}") or f"{key} {label!r} cannot be pickled ({exc})"
                raise TypeError(
                    f"cannot send {key} to worker processes: {detail}. Create such objects inside the "
                    f"function (or model_fn/data_fn), or use backend='inline' to run in this process"
                ) from exc
        raise
    return msgpack.packb({"sys_path": [p for p in sys.path if p], "env": framework_env(), "blob": blob},
                         use_bin_type=True)


def framework_env() -> dict[str, str]:
    """Environment variables a worker needs to load the same frameworks as the driver.

    ``KERAS_BACKEND``: Keras picks its backend at its first import, from this variable (or
    ``~/.keras/keras.json``). A Spark executor does not inherit the driver's environment, so the
    backend the driver's Keras runs on (or the variable, if Keras is not loaded here) travels with the
    function and is set before the function is unpickled.
    """
    keras = sys.modules.get("keras")
    backend = None
    if keras is not None:
        try:
            backend = keras.backend.backend()
        except Exception:  # noqa: BLE001 - a half-imported or unusual Keras: fall back to the variable
            backend = None
    backend = backend or os.environ.get("KERAS_BACKEND")
    return {"KERAS_BACKEND": backend} if backend else {}


def _apply_env(env: dict[str, str]) -> None:
    """Set ``env`` in this worker; fail clearly if Keras is already loaded here with another backend."""
    wanted = env.get("KERAS_BACKEND")
    if not wanted:
        return
    keras = sys.modules.get("keras")
    if keras is not None:
        current = keras.backend.backend()
        if current != wanted:
            raise RuntimeError(
                f"this worker process already loaded Keras with the {current!r} backend, but the driver "
                f"runs Keras on {wanted!r}; Keras cannot switch backends in a running process. Use "
                f"fresh worker processes (on Spark: spark.python.worker.reuse=false) or the same "
                f"KERAS_BACKEND everywhere"
            )
        return
    os.environ["KERAS_BACKEND"] = wanted


def loads_payload(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`dumps_payload`, run in a worker: restores the driver's import path first."""
    import cloudpickle

    outer = msgpack.unpackb(data, raw=False)
    for entry in reversed(outer["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    _apply_env(outer.get("env") or {})
    parts: dict[str, Callable[..., Any]] = cloudpickle.loads(outer["blob"])
    return parts
