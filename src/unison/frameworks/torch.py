"""PyTorch integration: module ablation, and distributed training (process groups, DDP/FSDP wrapping,
``ctx.prepare`` of models and DataLoaders, the ranks' agreement on a scheduler decision)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from unison.worker.rank import RankSession


class AblatedModule(torch.nn.Module):
    """Stands in for a removed submodule: passes its (first) input through unchanged.

    On the first call it runs the removed module once (without gradients, on the input's device,
    leaving the random number generators as they were) to check that its output had the input's
    shape; otherwise the next layer would fail with a message that does not say which ablation
    caused it.
    """

    def __init__(self, path: str, removed: torch.nn.Module) -> None:
        super().__init__()
        self.path = path
        self._removed = [removed]  # a list, so its parameters are not registered and not trained
        self._checked = False

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._checked:
            self._check(x, *args, **kwargs)
            self._checked = True
            self._removed.clear()
        return x

    def _check(self, x: Any, *args: Any, **kwargs: Any) -> None:
        """Raise if the removed module's output does not have the shape of its input."""
        removed = self._removed[0]
        device = getattr(x, "device", None)
        if device is not None:
            removed.to(device)
        cuda = [device.index or 0] if device is not None and device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            out = removed(x, *args, **kwargs)
        in_shape, out_shape = _shape(x), _shape(out)
        if in_shape != out_shape:
            raise ValueError(
                f"cannot ablate module {self.path!r} ({type(removed).__name__}): replacing it by an "
                f"identity needs its output to have its input's shape, but it maps {in_shape} to "
                f"{out_shape}. Ablate a module whose input and output shapes agree (an activation, a "
                f"dropout, a residual block), or pass a variant model_fn without it"
            )

    def extra_repr(self) -> str:
        return f"ablated={self.path!r}"


def _shape(value: Any) -> Any:
    """A tensor's shape as a tuple; otherwise the value's type name."""
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else type(value).__name__


def replace_with_identity(model: torch.nn.Module, path: str) -> None:
    """Replace the submodule at dotted ``path`` with an :class:`AblatedModule`."""
    try:
        removed = model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        raise KeyError(f"the model has no module {path!r}; its modules are {names}") from None
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, AblatedModule(path, removed))


def module_names(model: torch.nn.Module) -> list[str]:
    """Every submodule's dotted path."""
    return [name for name, _ in model.named_modules() if name]


# ------------------------------------------------------------------------------ distributed training
def init_process_group(backend: str, rank: int, world_size: int, local_rank: int, timeout_s: float) -> str:
    """Join the default process group (``MASTER_ADDR``/``MASTER_PORT`` are set); return this rank's
    device: ``cuda:0`` when the backend gave the rank GPUs of its own, else ``cuda:<i>`` when it sees
    a GPU (``i`` = ``local_rank`` modulo the GPUs it sees), else ``cpu``."""
    import datetime

    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed: distributed training needs it")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "nccl" and not gpus:
        raise RuntimeError(f"process_group='nccl' needs a GPU on every rank, but rank {rank} sees none: use "
                           f"process_group='gloo' (or leave it None: gloo unless every rank has a GPU)")
    device = "cpu"
    if gpus:
        from unison.gpus import assigned_gpus

        # A rank given GPUs of its own sees only those: its device is the first. Else ranks sharing a
        # host's GPUs take one each by local rank.
        index = 0 if assigned_gpus() else local_rank % gpus
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    if dist.is_initialized():  # left over from a call that did not clean up: start afresh
        destroy_process_group()
    release_retired()
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return device


# Process groups of ended trials, kept alive until the next trial of this process starts (see
# destroy_process_group).
_RETIRED: list[Any] = []


def destroy_process_group() -> None:
    """Tear down every process group, without freeing them yet.

    Freeing a gloo process group right after its last collective can deadlock: its destructor joins
    the group's threads while holding the GIL, and a thread that is still releasing the last
    collective's tensors needs the GIL to free their Python objects. That happens when the last
    reference goes with the training function's locals (a DDP model holds the group). So the groups
    are unregistered now and referenced here until :func:`release_retired` frees them, when their
    threads have long been idle.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        from torch.distributed.distributed_c10d import _world

        _RETIRED.extend(_world.pg_map.keys())
    except (ImportError, AttributeError):
        _RETIRED.append(dist.group.WORLD)
    dist.destroy_process_group()


def release_retired() -> None:
    """Free the process groups of earlier trials (their threads are idle by now)."""
    _RETIRED.clear()


def broadcast_object(value: Any, device: str) -> Any:
    """``value`` of rank 0, on every rank (a small picklable object, such as a stop decision)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=torch.device(device) if device.startswith("cuda") else None)
    return box[0]


def prepare(obj: Any, device: str, rank: int, world_size: int, strategy: str | None, seed: int) -> Any:
    """``ctx.prepare`` in a distributed trial: a model is moved to ``device`` and wrapped in DDP (or
    sharded with FSDP), a DataLoader is re-created with a :class:`DistributedSampler`, an optimizer
    is returned unchanged (DDP averages the gradients in ``backward``; FSDP needs the optimizer
    created from the sharded model's parameters, which the injected ``model`` already is)."""
    from torch.utils.data import DataLoader

    from unison.frameworks.detect import is_keras_model

    if is_keras_model(obj):
        raise TypeError("this distributed trial runs PyTorch DDP, which cannot train a Keras model: run "
                        "Keras models data-parallel with unison.Distributed(workers=N, "
                        "framework='tensorflow') and KERAS_BACKEND=tensorflow (a Search with "
                        "workers_per_trial > 1 runs PyTorch trials only)")
    if isinstance(obj, torch.nn.Module):
        return wrap_model(obj, device, strategy)
    if isinstance(obj, DataLoader):
        return distributed_loader(obj, rank, world_size, seed, device)
    if isinstance(obj, torch.optim.Optimizer):
        return obj
    raise TypeError(f"ctx.prepare does not know how to distribute a {type(obj).__name__}: it takes a "
                    f"torch.nn.Module, a DataLoader or an optimizer; for a dataset use ctx.shard(data)")


def wrap_model(model: torch.nn.Module, device: str, strategy: str | None) -> torch.nn.Module:
    """``model`` on ``device``, wrapped for data-parallel training (unchanged if already wrapped)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, LazyDistributedDataParallel)) or _is_fsdp(model):
        return model
    model = model.to(device)
    lazy = [name for name, p in model.named_parameters() if torch.nn.parameter.is_lazy(p)]
    if strategy == "fsdp":
        if lazy:
            layer = type(model.get_submodule(lazy[0].rpartition(".")[0])).__name__
            raise ValueError(f"strategy='fsdp' cannot shard {type(model).__name__}: its parameter "
                             f"{lazy[0]!r} ({layer}) is not initialized before the first forward pass, and "
                             f"FSDP replaces the parameters it shards, so an optimizer built from them "
                             f"would train stale ones: use a non-lazy first layer (e.g. "
                             f"nn.Linear(in_features, ...)) or strategy='ddp' (as the default None), which "
                             f"wraps a lazy model at its first forward")
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"the model ({type(model).__name__}) has no trainable parameters: there is nothing "
                         f"for DistributedDataParallel to synchronize")
    if lazy:
        return LazyDistributedDataParallel(model, device)
    return _ddp(model, device)


def _ddp(model: torch.nn.Module, device: str) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                   else None)


class LazyDistributedDataParallel(torch.nn.Module):
    """DDP for a model with lazy (uninitialized) parameters, such as a first ``nn.LazyLinear``: DDP
    refuses those, so the wrapper is built at the first forward pass.

    That first call runs ``module`` once on its inputs (without gradients, in eval mode so batch
    statistics and dropout are untouched) to materialize the parameters, wraps it in
    ``DistributedDataParallel`` (whose constructor broadcasts rank 0's parameters, so the ranks
    agree), then runs the real forward through DDP. Lazy parameters are materialized in place, so
    ``parameters()`` (the inner module's, the very same objects) and an optimizer built from them
    before the first forward keep training the synchronized model. ``module`` is the plain model, as
    with DDP (``model.module.state_dict()`` has the model's own keys).
    """

    def __init__(self, module: torch.nn.Module, device: str) -> None:
        super().__init__()
        self.module = module
        self._device = device
        self._ddp: Any = None  # not a registered submodule: its parameters are ``module``'s
        self._sync = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._ddp is None:
            modes = {m: m.training for m in self.module.modules()}
            self.module.eval()
            try:
                with torch.no_grad():
                    self.module(*args, **kwargs)
            finally:
                for m, training in modes.items():
                    m.training = training
            object.__setattr__(self, "_ddp", _ddp(self.module, self._device))
        self._ddp.require_backward_grad_sync = self._sync
        return self._ddp(*args, **kwargs)

    def train(self, mode: bool = True) -> LazyDistributedDataParallel:
        super().train(mode)
        if self._ddp is not None:
            self._ddp.training = mode
        return self

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """As ``DistributedDataParallel.no_sync``: gradients accumulate locally inside the block."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old
            if self._ddp is not None:
                self._ddp.require_backward_grad_sync = old


def _is_fsdp(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def distributed_loader(loader: Any, rank: int, world_size: int, seed: int, device: str = "cpu") -> Any:
    """``loader`` re-created over this rank's part of its dataset (a :class:`DistributedSampler`
    that shuffles if ``loader`` did), as a :class:`DistributedLoader` that advances the sampler's
    epoch each time it is iterated again. On a CUDA ``device`` it pins its batches' memory (the
    copies to the GPU are then faster, and ``.to(device, non_blocking=True)`` overlaps them)."""
    import inspect

    from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(loader, DistributedLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError("ctx.prepare cannot shard a DataLoader over an IterableDataset (it has no index for "
                        "a sampler): split the stream by ctx.rank and ctx.world_size in its __iter__")
    if loader.batch_size is None:
        raise TypeError("ctx.prepare cannot shard a DataLoader built with a batch_sampler: build it with "
                        "batch_size= (and shuffle=) instead, or shard its dataset with ctx.shard(dataset)")
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler):
        if not isinstance(sampler, (RandomSampler, SequentialSampler)):
            raise TypeError(f"ctx.prepare cannot shard a DataLoader with a {type(sampler).__name__}: it "
                            f"replaces a sequential or shuffling sampler by a DistributedSampler; shard the "
                            f"dataset with ctx.shard(dataset) and build the loader on that instead")
        sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                     shuffle=isinstance(sampler, RandomSampler), seed=seed)
    accepted = inspect.signature(DataLoader.__init__).parameters
    kwargs = {name: getattr(loader, name) for name in (
        "batch_size", "num_workers", "collate_fn", "pin_memory", "drop_last", "timeout", "worker_init_fn",
        "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers", "pin_memory_device",
        "in_order") if name in accepted and hasattr(loader, name)}
    if not kwargs.get("num_workers"):
        kwargs.pop("prefetch_factor", None)  # only valid with worker processes
    if device.startswith("cuda"):
        kwargs["pin_memory"] = True
    return DistributedLoader(loader.dataset, sampler=sampler, **kwargs)


class DistributedLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`DistributedSampler` whose epoch advances on every new iteration:
    the first pass uses epoch 0, the next epoch 1, ..., so the shuffling differs per epoch without
    the training function calling ``set_epoch``. ``epochs`` counts the passes begun."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epochs = 0

    def __iter__(self) -> Any:
        sampler = self.sampler
        assert isinstance(sampler, torch.utils.data.DistributedSampler)  # distributed_loader made it one
        sampler.set_epoch(self.epochs)
        self.epochs += 1
        return super().__iter__()


class TorchRankSession(RankSession):
    """One rank of a PyTorch distributed trial: a torch process group for the call, DDP/FSDP models,
    sharded DataLoaders."""

    def _start(self) -> str:
        """Join the group (the environment is set); return this rank's device."""
        return init_process_group(self.backend, self.rank, self.world_size, self.local_rank, self.timeout_s)

    def _stop(self) -> None:
        """Leave the group (also after a failure)."""
        destroy_process_group()

    def _broadcast(self, value: Any) -> Any:
        return broadcast_object(value, self.device)

    def prepare(self, obj: Any) -> Any:
        return prepare(obj, self.device, self.rank, self.world_size, self.strategy,
                       self.seed if self.seed is not None else 0)
