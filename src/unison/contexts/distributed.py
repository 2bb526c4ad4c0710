"""``Distributed``: one run of the training function as ``workers`` data-parallel processes.

A distributed run is a search-like experiment with a single trial that spans ``workers`` worker
slots (see ``Search(workers_per_trial=...)``): the same driver, journal, backends and worker loop
run it. Each rank calls the unchanged training function; what differs is injected (``ctx.rank``,
a DDP-wrapped ``model``, ``ctx.prepare``, ``ctx.shard``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

PROCESS_GROUPS = (None, "gloo", "nccl")
STRATEGIES = (None, "ddp", "fsdp")
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
    """Run the training function once, as ``workers`` data-parallel processes (PyTorch DDP).

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
            hanging (default 300 s).
        strategy: ``None``/``"ddp"``: the injected ``model`` is wrapped in
            ``DistributedDataParallel``; ``"fsdp"``: it is sharded with FSDP2's ``fully_shard``
            (every direct child with parameters, then the whole model).
        metric: which entry of the returned dict is ``result.value`` (default: the only entry, or
            the number returned). Naming a metric the function does not return fails the run.
    """

    def __init__(
        self,
        workers: int,
        hparams: Mapping[str, Any] | None = None,
        process_group: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        strategy: str | None = None,
        metric: str | None = None,
    ) -> None:
        from unison.space import Distribution, validate_space

        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
            raise ValueError(f"Distributed(workers=...) must be a whole number >= 1, got {workers!r}")
        self.workers = int(workers)
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"Distributed(hparams=...) must be a dict, got {type(hparams).__name__}")
        self.hparams = validate_space(dict(hparams or {}))
        sampled = [name for name, value in self.hparams.items() if isinstance(value, Distribution)]
        if sampled:
            raise TypeError(f"Distributed(hparams=...) takes fixed values, but {sampled} are distributions: "
                            f"run a unison.Search (with workers_per_trial= for distributed trials) and pass "
                            f"hparams=search_result.best.hparams")
        self.timeout_s = check_dist_options(process_group, timeout_s, strategy, "Distributed")
        self.process_group, self.strategy = process_group, strategy
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise ValueError(f"Distributed(metric=...) must name a returned metric, got {metric!r}")
        self.metric = metric

    @property
    def dist_options(self) -> dict[str, Any]:
        """What every rank's trial message carries besides its place in the group."""
        return {"process_group": self.process_group, "timeout_s": self.timeout_s, "strategy": self.strategy}

    def to_search(self) -> Any:
        """The one-trial search that runs this: its hyperparameters fixed, ``workers`` slots per trial.

        A rank that dies fails the run (``max_retries=0``): the run is not silently started again.
        """
        from unison.contexts.search import Search

        return Search(dict(self.hparams), metric=self.metric or "value", mode="max", trials=1,
                      optimizer="random", max_retries=0, workers_per_trial=self.workers)

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "hparams": self.hparams, "metric": self.metric, **self.dist_options}

    def __repr__(self) -> str:
        return (f"Distributed(workers={self.workers}, hparams={self.hparams}, "
                f"process_group={self.process_group!r}, strategy={self.strategy!r})")
