"""The worker side of a distributed trial: one rank's process group, decisions and data shards.

A trial that spans several worker slots (``unison.Distributed``, ``Search(workers_per_trial=k)``)
reaches each of its ranks as the usual trial message plus ``dist``: the rank's place in the group
(``rank``, ``world_size``, ``local_rank``, ``local_world_size``), the rendezvous address of rank 0
(``master_addr``, ``master_port``) and the group's options (``backend``, ``timeout_s``,
``strategy``). :class:`RankSession` turns that into the process environment, a torch process group
for the duration of the call, and what the function gets injected:

- only rank 0 talks to the scheduler; every rank's ``reporter.report`` then receives rank 0's
  decision through a broadcast, so all ranks stop at the same step;
- ``model`` (and ``model_fn(hparams)``) is built, moved to ``ctx.device`` and wrapped (DDP or FSDP);
- ``ctx.prepare``/``ctx.shard`` shard DataLoaders and datasets.

:func:`shard` is framework-neutral and also serves ``ctx.shard`` outside torch.

A TensorFlow trial (``dist["framework"] == "tensorflow"``, with every rank's ``address:port`` in
``peers``) gets a :class:`unison.frameworks.tensorflow.TensorFlowRankSession` instead, which
overrides the framework hooks (``_environment``, ``_start``, ``_stop``) and what is injected.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from unison.errors import TrialStopped
from unison.worker.generators import call_generator
from unison.worker.reporter import Decide

if TYPE_CHECKING:
    from unison.worker.ctx import Context

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "GLOO_SOCKET_IFNAME")


# ---------------------------------------------------------------------------------------- shards
def shard_bounds(n: int, rank: int, world_size: int, even: bool = False) -> tuple[int, int]:
    """The ``[start, stop)`` rows of ``n`` that belong to ``rank``: contiguous, disjoint blocks whose
    sizes differ by at most one (their union is all ``n``), or with ``even`` all of size
    ``n // world_size`` (the last ``n % world_size`` rows belong to nobody)."""
    if even:
        size = n // world_size
        return rank * size, (rank + 1) * size
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(data: Any, rank: int, world_size: int, even: bool = False) -> Any:
    """``rank``'s disjoint part of ``data`` (see :func:`shard_bounds`).

    Supported: a pandas DataFrame or Series (rows), a NumPy array or torch tensor (first axis), a
    dict of those (each value, all of one length), a tuple of those (``(x, y)``), a list or range,
    and a map-style torch ``Dataset`` (a ``torch.utils.data.Subset``).
    """
    if world_size == 1:
        return data
    n = _length(data)
    start, stop = shard_bounds(n, rank, world_size, even)
    return _take(data, start, stop)


def _length(data: Any) -> int:
    if isinstance(data, Mapping) or isinstance(data, tuple):
        values = list(data.values()) if isinstance(data, Mapping) else list(data)
        if not values:
            raise ValueError("ctx.shard got an empty dict/tuple: nothing to shard")
        lengths = {_length(v) for v in values}
        if len(lengths) != 1:
            raise ValueError(f"ctx.shard needs the parts of a dict/tuple to have one length (rows), got "
                             f"lengths {sorted(lengths)}")
        return lengths.pop()
    if _is_iterable_dataset(data):
        raise TypeError("ctx.shard cannot split a torch IterableDataset (it has no length or index): split "
                        "its stream by ctx.rank and ctx.world_size inside its __iter__")
    if hasattr(data, "iloc") or isinstance(data, (list, range)) or _is_array(data) or _is_dataset(data):
        if getattr(data, "ndim", 1) == 0:
            raise TypeError("ctx.shard cannot split a 0-dimensional array")
        return len(data)
    raise TypeError(f"ctx.shard cannot split a {type(data).__name__}: it splits pandas DataFrames/Series, "
                    f"NumPy arrays, torch tensors, dicts and tuples of those, lists and map-style torch "
                    f"Datasets; for a DataLoader use ctx.prepare(loader)")


def _take(data: Any, start: int, stop: int) -> Any:
    if isinstance(data, Mapping):
        return {k: _take(v, start, stop) for k, v in data.items()}
    if isinstance(data, tuple):
        parts = [_take(v, start, stop) for v in data]
        return type(data)(*parts) if hasattr(data, "_fields") else tuple(parts)  # a namedtuple too
    if hasattr(data, "iloc"):
        return data.iloc[start:stop]
    if isinstance(data, (list, range)) or _is_array(data):
        return data[start:stop]
    from torch.utils.data import Subset

    return Subset(data, range(start, stop))


def _is_array(data: Any) -> bool:
    import numpy as np

    torch = _torch()
    return isinstance(data, np.ndarray) or (torch is not None and isinstance(data, torch.Tensor))


def _is_dataset(data: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__")


def _is_iterable_dataset(data: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(data, torch.utils.data.IterableDataset)


def _torch() -> Any:
    import sys

    return sys.modules.get("torch")  # a torch object means torch is loaded: never import it here


# ------------------------------------------------------------------------------------ endpoints
def free_port(host: str) -> int:
    """A TCP port on ``host`` that nothing listens on now (rank 0's rendezvous port, if chosen)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def gpu_count() -> int:
    """How many GPUs torch sees in this process (0 without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def interface_of(address: str) -> str | None:
    """The name of the network interface that holds the IPv4 ``address`` (Linux), else ``None``.

    Gloo picks the interface it offers its peers from the host name, which on many machines resolves
    to a loopback address other hosts cannot reach: the address that reached the driver is a safer
    choice.
    """
    try:
        import fcntl
        import struct

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError, AttributeError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                request = struct.pack("256s", name[:15].encode())
                packed = fcntl.ioctl(s.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


# ------------------------------------------------------------------------------------- session
class RankSession:
    """One rank of one distributed trial. ``with session:`` holds the process group for the call.

    The framework lives in three hooks a subclass overrides: ``_environment()`` (the variables set
    during the call), ``_start()`` (join the group, return the device) and ``_stop()``.

    ``notify(error)`` tells the driver at once that this rank failed (before the process group is
    torn down, which makes the other ranks' collectives fail too: the driver then knows which rank
    failed first).
    """

    def __init__(self, dist: Mapping[str, Any], seed: int | None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.rank = int(dist["rank"])
        self.world_size = int(dist["world_size"])
        self.local_rank = int(dist.get("local_rank", 0))
        self.local_world_size = int(dist.get("local_world_size", 1))
        self.master_addr = str(dist["master_addr"])
        self.master_port = int(dist["master_port"])
        self.backend = str(dist.get("backend") or "gloo")
        self.timeout_s = float(dist.get("timeout_s") or 300.0)
        self.strategy = dist.get("strategy")
        self.address = dist.get("address")
        self.seed = seed
        self.notify = notify
        self.device = "cpu"
        self._saved_env: dict[str, str | None] = {}
        self.active = False

    # ------------------------------------------------------------------ the call
    def bind(self, ctx: Context) -> None:
        """Give ``ctx`` this rank's place (``device`` is set when the group starts)."""
        ctx.rank, ctx.world_size, ctx.local_rank = self.rank, self.world_size, self.local_rank
        ctx._session = self
        self.ctx = ctx

    def log_dir(self, trial_dir: Path) -> Path:
        """Where this rank's ``stdout.log``, ``stderr.log`` and ``metrics.jsonl`` go: the trial's
        folder for rank 0, ``rank-<r>/`` in it for the others."""
        return trial_dir if self.rank == 0 else trial_dir / f"rank-{self.rank}"

    def __enter__(self) -> RankSession:
        env = self._environment()
        self._saved_env = {key: os.environ.get(key) for key in dict.fromkeys((*ENV_KEYS, *env))}
        os.environ.update(env)
        try:
            self.device = self._start()
        except BaseException:
            self._restore_env()
            raise
        self.active = True
        if getattr(self, "ctx", None) is not None:
            self.ctx.device = self.device
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            # Ranks run only on workers, where a KeyboardInterrupt is the function's own: a failure too.
            if exc is not None and not isinstance(exc, TrialStopped) and self.notify:
                try:
                    self.notify("".join(traceback.format_exception(kind, exc, tb)))
                except OSError:
                    pass
        finally:
            if self.active:
                self.active = False
                self._stop()
            self._restore_env()

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # ------------------------------------------------- the framework (here PyTorch's process group)
    def _environment(self) -> dict[str, str]:
        """The environment variables of this rank during the call."""
        env = {
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }
        if self.backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and self.address:
            interface = interface_of(self.address)
            if interface is not None:
                env["GLOO_SOCKET_IFNAME"] = interface
        return env

    def _start(self) -> str:
        """Join the group (the environment is set); return this rank's device."""
        raise NotImplementedError

    def _stop(self) -> None:
        """Leave the group (also after a failure)."""
        raise NotImplementedError

    def _broadcast(self, value: Any) -> Any:
        """``value`` as rank 0 has it, on every rank."""
        raise NotImplementedError

    # ---------------------------------------------------------------- what is injected
    def decide(self, chief_decide: Decide | None) -> Decide:
        """A ``decide`` for this rank's reporter: rank 0 asks the scheduler, every rank gets its answer."""

        def decide(step: int, metrics: dict[str, float],
                   checkpoint: dict[str, Any] | None = None) -> str | None:
            reason = (chief_decide(step, metrics, checkpoint) if self.rank == 0 and chief_decide is not None
                      else None)
            try:
                chief_step, reason = self._broadcast((step, reason))
            except Exception as exc:
                raise RuntimeError(
                    f"rank {self.rank} of {self.world_size} did not receive rank 0's decision for its "
                    f"reporter.report(step={step}) within the process group's timeout ({self.timeout_s:g} s) "
                    f"or lost its peers: every rank must call reporter.report at the same points (do not "
                    f"report only on the chief); the cause: {type(exc).__name__}: {exc}"
                ) from exc
            if chief_step != step:
                raise RuntimeError(f"rank {self.rank} called reporter.report(step={step}) while rank 0 "
                                   f"reported step {chief_step}: every rank must call reporter.report at the "
                                   f"same points")
            return reason

        return decide

    def wrap_model_fn(self, model_fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """``model_fn`` whose models come moved to this rank's device and wrapped (DDP or FSDP)."""
        if model_fn is None:
            return None
        def distributed_model_fn(hparams: Any = None, _g: Callable[..., Any] = model_fn) -> Any:
            return self.prepare(call_generator(_g, hparams))

        return distributed_model_fn

    def shard(self, data: Any, even: bool = False) -> Any:
        """``ctx.shard`` in this rank: see :func:`shard`."""
        return shard(data, self.rank, self.world_size, even)

    def prepare(self, obj: Any) -> Any:
        """``ctx.prepare`` in this rank: ``obj`` made ready for the framework's distributed training."""
        raise NotImplementedError


