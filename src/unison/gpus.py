"""GPUs for trials and ranks: what a backend may use, how many each worker gets, which ones.

A context asks for GPUs (``Search(gpus_per_trial=g)``, ``Ablation(gpus_per_trial=g)``,
``Distributed(gpus_per_worker=g)``): :class:`GpuRequest` is that ask, per worker process. A backend that
assigns GPUs (``Local(gpus=...)``) turns its GPU ids into one fixed list per slot with :func:`slot_gpus`
and starts each worker with :func:`worker_environment`: ``CUDA_VISIBLE_DEVICES`` set to exactly its GPUs,
and :data:`GPUS_VAR` beside it, which the worker reads back with :func:`assigned_gpus` (``ctx.gpus``, the
hello's ``gpus``). Any backend that sets that variable for its workers (Spark from a task's GPU
resources, Ray from its actor's GPUs) gets the same records.

Nothing here imports torch: ``"auto"`` reads ``CUDA_VISIBLE_DEVICES`` or asks ``nvidia-smi -L``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from unison._validate import check_number, is_number

GPUS_VAR = "UNISON_GPUS"
"""The environment variable that tells a worker process the physical ids of its GPUs, comma-joined."""
GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_:/.-]*")
"""What a GPU id may look like: an index (``"3"``), a ``GPU-<uuid>`` or a ``MIG-...`` device."""
MAX_GPU_ID_CHARS = 96
MAX_GPUS = 64
"""The most GPUs one worker may say it was given (a hello's ``gpus``)."""
_SMI_TIMEOUT_S = 20.0


def check_gpu_fraction(value: Any, name: str, owner: str) -> int | float:
    """``value`` as GPUs per trial: a whole number >= 0 (an ``int``), or a fraction ``1/n`` of one GPU
    (a ``float``: ``n`` trials share a GPU); else a ``ValueError`` saying what is allowed."""
    number = check_number(value, name, owner=owner, low=0)
    if number == int(number):
        return int(number)
    share = round(1 / number) if number < 1 else 0
    if share < 2 or abs(1 / share - number) > 1e-9:
        raise ValueError(f"{owner}({name}=...) must be a whole number of GPUs (0, 1, 2, ...) or a fraction "
                         f"of one GPU that divides it (0.5, 0.25, 0.2, ...: that many trials share a GPU), "
                         f"got {value!r}")
    return 1 / share


def check_gpu_ids(value: Any, owner: str = "Local") -> str | list[str]:
    """A backend's ``gpus=``: ``"auto"``, ``0`` (none: ``[]``) or a list of distinct GPU ids (ints >= 0
    or id strings such as ``"GPU-<uuid>"``), returned as strings."""
    if value == "auto" or (is_number(value, integer=True) and value == 0):
        return "auto" if value == "auto" else []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{owner}(gpus=...) must be 'auto' (the GPUs CUDA_VISIBLE_DEVICES or nvidia-smi "
                         f"lists), 0 (none) or a list of GPU ids such as [0, 1]; got {value!r}")
    ids: list[str] = []
    for item in value:
        text = str(item) if is_number(item, integer=True) and item >= 0 else item
        if not (isinstance(text, str) and len(text) <= MAX_GPU_ID_CHARS and GPU_ID.fullmatch(text)):
            raise ValueError(f"{owner}(gpus=[...]) takes GPU ids: ints >= 0 (as nvidia-smi numbers them) or "
                             f"id strings such as 'GPU-8a1...'; got {item!r} in {value!r}")
        ids.append(text)
    if len(set(ids)) < len(ids):
        raise ValueError(f"{owner}(gpus={value!r}) names a GPU twice: list each GPU once")
    return ids


def visible_ids(variable: str) -> list[str]:
    """The GPU ids a ``CUDA_VISIBLE_DEVICES`` value lists (CUDA ignores the list from the first
    invalid entry on, e.g. ``-1``)."""
    ids: list[str] = []
    for part in variable.split(","):
        part = part.strip()
        if not part or part.startswith("-") or not GPU_ID.fullmatch(part):
            break
        ids.append(part)
    return ids


def detect_gpus() -> tuple[list[str], str]:
    """The GPUs of this machine as ``Local(gpus="auto")`` sees them, and where they were found (for a
    message): those ``CUDA_VISIBLE_DEVICES`` lists if it is set, else those ``nvidia-smi -L`` lists,
    else none."""
    import shutil
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return visible_ids(visible), f"CUDA_VISIBLE_DEVICES={visible!r}"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], "CUDA_VISIBLE_DEVICES unset, no nvidia-smi"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=_SMI_TIMEOUT_S,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"CUDA_VISIBLE_DEVICES unset, nvidia-smi -L failed: {exc}"
    ids = re.findall(r"^GPU (\d+):", listed.stdout, flags=re.MULTILINE)  # MIG devices are indented
    if listed.returncode != 0:
        return [], f"CUDA_VISIBLE_DEVICES unset, nvidia-smi -L exited {listed.returncode}"
    return ids, "CUDA_VISIBLE_DEVICES unset, nvidia-smi -L"


@dataclass(frozen=True)
class GpuRequest:
    """What a context asks of the backend's GPUs.

    Attributes:
        per_worker: GPUs per worker process (``0``: none asked for; ``0.5``: two processes share one).
        ranks: worker processes per trial (a distributed trial's ranks).
        what: the context as the user wrote it, for messages (``"Search(gpus_per_trial=2)"``).
    """

    per_worker: float = 0
    ranks: int = 1
    what: str = ""

    @classmethod
    def of(cls, kind: str, per_trial: float, ranks: int) -> GpuRequest:
        """The request of a plan of kind ``kind`` whose trials take ``per_trial`` GPUs over ``ranks``
        worker processes."""
        per_worker = per_trial / ranks if per_trial else 0
        if kind == "distributed":
            what = f"Distributed(workers={ranks}, gpus_per_worker={per_worker:g})"
        else:
            owner = "Ablation" if kind == "ablation" else "Search"
            also = f", workers_per_trial={ranks}" if ranks > 1 else ""
            what = f"{owner}(gpus_per_trial={per_trial:g}{also})"
        return cls(per_worker, ranks, what)

    @property
    def knob(self) -> str:
        """The argument that asked for the GPUs: ``gpus_per_worker`` or ``gpus_per_trial``."""
        return "gpus_per_worker" if self.what.startswith("Distributed") else "gpus_per_trial"

    @property
    def need(self) -> str:
        """How many GPUs a trial needs, in words: ``"2 GPUs per trial"``."""
        total = self.per_worker * self.ranks
        plural = "" if total == 1 else "s"
        if self.ranks > 1:
            return f"{total:g} GPU{plural} per trial ({self.per_worker:g} per rank)"
        return f"{total:g} GPU{plural} per trial"


def slot_gpus(ids: Sequence[str], request: GpuRequest, backend: str, found: str = "") -> list[list[str]]:
    """The GPUs of each slot of a backend that has the GPUs ``ids``: ``floor(len(ids) / per_worker)``
    slots, whole GPUs in consecutive blocks, a shared GPU spread so that slot ``i`` gets GPU
    ``i % len(ids)`` (fewer slots than GPUs x sharers then still use every GPU). Raise if a trial does
    not fit: ``backend`` names the backend's setting (``"Local(gpus=[0])"``), ``found`` where
    ``"auto"`` looked (when it found none)."""
    per_worker = request.per_worker
    if not ids:
        where = f" found no GPU ({found})" if found else " has no GPU"
        raise ValueError(f"{request.what} needs {request.need}, but {backend}{where}: pass "
                         f"Local(gpus=[...]) with the ids of the GPUs to use, or leave {request.knob} unset "
                         f"to run on the CPU")
    if per_worker >= 1:
        whole = int(per_worker)
        slots = [list(ids[i * whole:(i + 1) * whole]) for i in range(len(ids) // whole)]
    else:
        slots = [[ids[i % len(ids)]] for i in range(len(ids) * round(1 / per_worker))]
    if len(slots) < request.ranks:
        raise ValueError(f"{request.what} needs {request.need}, but {backend} has {len(ids)}: name more GPUs "
                         f"or ask for fewer per trial")
    return slots


def worker_environment(gpus: Sequence[str]) -> dict[str, str]:
    """The environment of a worker process given exactly ``gpus`` (``[]``: none, every GPU hidden)."""
    joined = ",".join(gpus)
    return {"CUDA_VISIBLE_DEVICES": joined, GPUS_VAR: joined}


def assigned_gpus() -> list[str]:
    """The GPUs this process was given by its backend (:data:`GPUS_VAR`), ``[]`` when none."""
    return visible_ids(os.environ.get(GPUS_VAR, ""))[:MAX_GPUS]


def describe(gpus: Sequence[str] | None) -> str | None:
    """A trial's GPUs as the trial table shows them: ``"0,1"``, or ``None`` without any."""
    return ",".join(gpus) if gpus else None


def place(backend: Any, request: GpuRequest) -> None:
    """Tell ``backend`` what each of its workers gets (``backend.use_gpus(request)``; ``0`` GPUs too, so
    that a backend reused by the next experiment forgets the last one's), before anything starts;
    it raises if it cannot place GPUs or has too few (see ``unison.backends.base.Backend.use_gpus``)."""
    backend.use_gpus(request)
