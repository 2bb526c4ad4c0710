"""``ctx``: where a call of the training function runs, and helpers that depend on it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unison.worker.rank import RankSession


def _default_device() -> str:
    """``"cuda:0"`` in a worker its backend gave GPUs (``CUDA_VISIBLE_DEVICES`` lists only those: the
    first is device 0), else ``"cuda"``, when torch sees CUDA; else ``"cpu"``. Torch is imported to
    answer only in a worker given GPUs (it is there to use them), else only asked if loaded."""
    import importlib.util

    from unison.gpus import assigned_gpus

    gpus = assigned_gpus()
    torch = sys.modules.get("torch")
    if torch is None and gpus and importlib.util.find_spec("torch") is not None:
        import torch
    if torch is not None and torch.cuda.is_available():
        return "cuda:0" if gpus else "cuda"
    return "cpu"


def _map_location(device: str) -> str | None:
    """Where torch tensors of a checkpoint go: the CPU when this process has no GPU (a checkpoint
    saved on a GPU machine still loads), else where they were saved."""
    return "cpu" if device == "cpu" else None


class Context:
    """What the training function gets as ``ctx``.

    Attributes:
        trial_id: the trial's number in its experiment (0 for a single run).
        trial_dir: a private folder for this trial's files; they are kept in the experiment. It is
            created when first asked for (a trial that writes nothing costs no folder).
        rank, world_size, local_rank: the process's place in a distributed run (0, 1, 0 otherwise);
            ``local_rank`` counts the ranks on the same host.
        device: ``"cuda"`` when torch is loaded and sees a GPU (``"cuda:0"``, the first of its own
            GPUs, when the backend gave the worker some), else ``"cpu"``; in a distributed run this
            rank's device (``"cuda:<local_rank>"``, ``"cuda:0"`` with GPUs of its own, or ``"cpu"``).
        gpus: the physical ids of the GPUs the backend gave this worker process (its
            ``CUDA_VISIBLE_DEVICES``, e.g. ``["2", "3"]``), ``[]`` when it gave none
            (``Search(gpus_per_trial=...)``, ``Distributed(gpus_per_worker=...)``).
        seed: a per-trial seed the function may use for its own randomness.
        attempt: 0 the first time a trial runs, 1.. when it is re-run after its worker died.
        checkpoint: what the trial resumes from: ``None`` on a first attempt; on a retry after its
            worker died, or after the driver crashed and the search was resumed, the last checkpoint
            the trial saved (``reporter.report(checkpoint=...)``), as the object it was saved as (a
            directory checkpoint: the path of its restored directory). Loaded when first asked for.
        checkpoint_step: the step of ``checkpoint`` (``None`` without one). A function written as
            ``start = ctx.checkpoint_step + 1 if ctx.checkpoint else 0`` resumes itself.
    """

    def __init__(self, trial_id: int, trial_dir: str | Path, rank: int = 0, world_size: int = 1,
                 local_rank: int = 0, device: str = "cpu", seed: int | None = None, attempt: int = 0,
                 checkpoint_path: str | Path | None = None, checkpoint_step: int | None = None,
                 gpus: list[str] | None = None) -> None:
        from unison.gpus import assigned_gpus

        self.trial_id, self._trial_dir, self._trial_dir_made = trial_id, Path(trial_dir), False
        self.gpus = assigned_gpus() if gpus is None else list(gpus)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.seed, self.attempt = device, seed, attempt
        self._session: RankSession | None = None
        # a URL (checkpoint_storage="s3://...") stays a string: Path would fold its "//"
        self.checkpoint_path: Path | str | None = (
            None if checkpoint_path is None else checkpoint_path if "://" in str(checkpoint_path)
            else Path(checkpoint_path))
        self.checkpoint_step = checkpoint_step if checkpoint_path is not None else None
        self._checkpoint: Any = None
        self._checkpoint_loaded = checkpoint_path is None

    @property
    def checkpoint(self) -> Any:
        if not self._checkpoint_loaded:
            from unison.worker.checkpoints import load_checkpoint

            assert self.checkpoint_path is not None
            self._checkpoint = load_checkpoint(self.checkpoint_path, map_location=_map_location(self.device))
            self._checkpoint_loaded = True
        return self._checkpoint

    @property
    def trial_dir(self) -> Path:
        if not self._trial_dir_made:
            self._trial_dir.mkdir(parents=True, exist_ok=True)
            self._trial_dir_made = True
        return self._trial_dir

    def __repr__(self) -> str:
        return (f"Context(trial_id={self.trial_id}, trial_dir={str(self._trial_dir)!r}, rank={self.rank}, "
                f"world_size={self.world_size}, local_rank={self.local_rank}, device={self.device!r}, "
                f"seed={self.seed}, attempt={self.attempt}, checkpoint_step={self.checkpoint_step})")

    @property
    def is_chief(self) -> bool:
        """Whether this process is the one whose result counts (rank 0)."""
        return self.rank == 0

    def prepare(self, obj: Any) -> Any:
        """Make ``obj`` (a model, DataLoader or optimizer) ready for this context.

        In distributed training a ``torch.nn.Module`` is moved to ``device`` and wrapped in
        ``DistributedDataParallel`` (sharded with FSDP for ``strategy="fsdp"``; an already wrapped
        model is returned as is), a ``DataLoader`` is re-created with a ``DistributedSampler`` over
        this rank's part of its dataset (shuffled if the loader shuffled; its epoch advances each
        time the loader is iterated again), and an optimizer is returned unchanged (DDP averages the
        gradients during ``backward``). Outside distributed training this returns ``obj`` unchanged.
        """
        if self._session is None:
            return obj
        return self._session.prepare(obj)

    def shard(self, data: Any, even: bool = False) -> Any:
        """This process's disjoint part of ``data``; the whole of it outside distributed training.

        Splits a pandas DataFrame/Series, a NumPy array or torch tensor (first axis), a dict or tuple
        of those, a list, or a map-style torch ``Dataset`` (as a ``Subset``) into ``world_size``
        contiguous blocks whose union is ``data`` and whose sizes differ by at most one. With
        ``even=True`` every rank gets ``len(data) // world_size`` rows (the remainder is left out),
        so that loops over batches take the same number of steps on every rank, as DDP requires.

        In a TensorFlow multi-worker trial a ``tf.data.Dataset`` becomes a per-worker dataset (see
        :mod:`unison.frameworks.tensorflow`); ``model.fit`` shards NumPy input by itself.
        """
        if self.world_size == 1:
            return data
        if self._session is not None:
            return self._session.shard(data, even)
        from unison.worker.rank import shard

        return shard(data, self.rank, self.world_size, even)
