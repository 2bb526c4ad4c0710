"""``Distributed``: one run of the training function as ``workers`` data-parallel processes.

A distributed run is a search-like experiment with a single trial that spans ``workers`` worker
slots (see ``Search(workers_per_trial=...)``): the same driver, journal, backends and worker loop
run it. Each rank calls the unchanged training function; what differs is injected (``ctx.rank``,
a DDP-wrapped ``model``, ``ctx.prepare``, ``ctx.shard``; with ``framework="tensorflow"`` a Keras
model built in a ``MultiWorkerMirroredStrategy`` scope).
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Mapping
from typing import Any

PROCESS_GROUPS = (None, "gloo", "nccl")
STRATEGIES = (None, "ddp", "fsdp")
FRAMEWORKS = ("torch", "tensorflow")
DEFAULT_TIMEOUT_S = 300.0


def check_dist_options(process_group: Any, timeout_s: Any, strategy: Any, owner: str) -> float:
    """Validate the options every rank of a distributed trial uses; return ``timeout_s`` as a float."""
    if process_group not in PROCESS_GROUPS:
        raise ValueError(f"{owner}(process_group=...) must be None (gloo on CPU, nccl when every rank has "
                         f"a GPU), 'gloo' or 'nccl'; got {process_group!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"{owner}(strategy=...) must be None or 'ddp' (DistributedDataParallel) or 'fsdp' "
                         f"(fully sharded data parallel); got {strategy!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not timeout_s > 0:
        raise ValueError(f"{owner}(timeout_s=...) must be a number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


class Distributed:
    """Run the training function once, as ``workers`` data-parallel processes (PyTorch DDP, or
    TensorFlow's ``MultiWorkerMirroredStrategy`` for Keras models).

    Args:
        workers: how many processes (ranks). The local backend starts that many worker processes
            (even beyond the CPU count, unless ``unison.Local(workers=...)`` says fewer: then it is an
            error); Spark runs them as one barrier stage of ``workers`` tasks, once that many task
            slots exist.
        hparams: the run's fixed hyperparameters (e.g. ``search_result.best.hparams``).
        process_group: ``None`` (default: ``"nccl"`` when every rank sees a GPU, else ``"gloo"``),
            ``"gloo"`` or ``"nccl"``.
        timeout_s: the process group's timeout: a collective (all-reduce, the agreement on a
            ``reporter.report`` decision) that waits longer than this fails the run instead of
            hanging (default 300 s). It bounds one collective, not the run: a search's
            ``Search(trial_timeout_s=...)`` bounds a whole trial's wall time (every rank's process
            is ended past it).
        strategy: ``None``/``"ddp"``: the injected ``model`` is wrapped in
            ``DistributedDataParallel`` (a model with lazy parameters, e.g. a first ``nn.LazyLinear``,
            at its first forward pass; ``model.module`` and ``model.parameters()`` are the model's own
            from the start); ``"fsdp"``: it is sharded with FSDP2's ``fully_shard`` (every direct child
            with parameters, then the whole model; a lazy model is an error).
        metric: which entry of the returned dict is ``result.value`` (default: the only entry, or
            the number returned). Naming a metric the function does not return fails the run.
        framework: ``"torch"`` (default): every rank joins a torch process group; the injected
            ``model`` is wrapped for DDP (or FSDP). ``"tensorflow"``: every rank is a worker of a
            TensorFlow cluster (``TF_CONFIG`` set for the call, rank 0 the chief) and the whole call
            runs in the scope of a ``tf.distribute.MultiWorkerMirroredStrategy``: the Keras
            ``model`` from ``model_fn(hparams)``, the function's ``model.compile`` and
            ``model.fit(..., callbacks=callbacks)`` are distributed without the function mentioning
            the strategy, and ``fit`` shards its input across the workers (``ctx.shard`` of a
            ``tf.data.Dataset`` gives a per-worker dataset instead). Needs ``KERAS_BACKEND=tensorflow``
            and TensorFlow (``pip install 'unison[tensorflow]'``); a worker process runs one such
            trial (on Spark set ``spark.python.worker.reuse=false`` to run several in one session);
            ``process_group``, ``strategy`` and ``timeout_s`` are PyTorch's and stay unset.
    """

    def __init__(
        self,
        workers: int,
        hparams: Mapping[str, Any] | None = None,
        process_group: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        strategy: str | None = None,
        metric: str | None = None,
        framework: str = "torch",
    ) -> None:
        from unison._validate import check_hparam_names
        from unison.space import Distribution, validate_space

        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
            raise ValueError(f"Distributed(workers=...) must be a whole number >= 1, got {workers!r}")
        self.workers = int(workers)
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"Distributed(hparams=...) must be a dict, got {type(hparams).__name__}")
        self.hparams = validate_space(dict(hparams or {}))
        check_hparam_names(self.hparams, "Distributed(hparams)")
        sampled = [name for name, value in self.hparams.items() if isinstance(value, Distribution)]
        if sampled:
            raise TypeError(f"Distributed(hparams=...) takes fixed values, but {sampled} are distributions: "
                            f"run a unison.Search (with workers_per_trial= for distributed trials) and pass "
                            f"hparams=search_result.best.hparams")
        self.timeout_s = check_dist_options(process_group, timeout_s, strategy, "Distributed")
        self.process_group, self.strategy = process_group, strategy
        if framework not in FRAMEWORKS:
            raise ValueError(f"Distributed(framework=...) must be 'torch' (PyTorch DDP/FSDP, the default) or "
                             f"'tensorflow' (Keras on TensorFlow, MultiWorkerMirroredStrategy); "
                             f"got {framework!r}")
        if framework == "tensorflow":
            torch_only = {"process_group": process_group, "strategy": strategy}
            torch_only = {name: value for name, value in torch_only.items() if value is not None}
            if self.timeout_s != DEFAULT_TIMEOUT_S:
                torch_only["timeout_s"] = timeout_s
            if torch_only:
                given = ", ".join(f"{name}={value!r}" for name, value in torch_only.items())
                raise ValueError(f"Distributed({given}) configures PyTorch's process group, which "
                                 f"framework='tensorflow' does not use (MultiWorkerMirroredStrategy brings "
                                 f"its own collectives; a failed rank ends the others at once): "
                                 f"leave it unset")
            if importlib.util.find_spec("tensorflow") is None:
                raise ImportError("Distributed(framework='tensorflow') needs TensorFlow: "
                                  "pip install 'unison[tensorflow]'")
        self.framework = framework
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ValueError(f"Distributed(metric=...) must name a returned metric, got {metric!r}")
        self.metric = metric

    @property
    def dist_options(self) -> dict[str, Any]:
        """What every rank's trial message carries besides its place in the group."""
        return {"process_group": self.process_group, "timeout_s": self.timeout_s, "strategy": self.strategy,
                "framework": self.framework}

    def to_search(self) -> Any:
        """The one-trial search that runs this: its hyperparameters fixed, ``workers`` slots per trial.

        A rank that dies fails the run (``max_retries=0``): the run is not silently started again.
        """
        from unison.contexts.search import Search

        return Search(dict(self.hparams), metric=self.metric or "value", mode="max", trials=1,
                      optimizer="random", max_retries=0, workers_per_trial=self.workers)

    def to_dict(self) -> dict[str, Any]:
        described = {"workers": self.workers, "hparams": self.hparams, "metric": self.metric,
                     **self.dist_options}
        if self.framework == "torch":  # only when set: runs stored before the option existed compare equal
            del described["framework"]
        return described

    def __repr__(self) -> str:
        framework = f", framework={self.framework!r}" if self.framework != "torch" else ""
        return (f"Distributed(workers={self.workers}, hparams={self.hparams}, "
                f"process_group={self.process_group!r}, strategy={self.strategy!r}{framework})")
