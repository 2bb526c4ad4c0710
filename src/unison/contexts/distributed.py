"""``Distributed``: one run of the training function as ``workers`` data-parallel processes.

A distributed run is a search-like experiment with a single trial that spans ``workers`` worker
slots (see ``Search(workers_per_trial=...)``): the same driver, journal, backends and worker loop
run it. Each rank calls the unchanged training function; what differs is injected (``ctx.rank``,
a DDP-wrapped ``model``, ``ctx.prepare``, ``ctx.shard``; with ``framework="tensorflow"`` a Keras
model built in a ``MultiWorkerMirroredStrategy`` scope).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison._validate import check_number
from unison.driver.plan import Plan
from unison.errors import RunFailed, SearchAborted

if TYPE_CHECKING:
    from unison.result import RunResult, SearchResult

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
    return check_number(timeout_s, "timeout_s", owner=owner, low=0, low_inclusive=False, unit="seconds")


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
        mode: ``"max"`` (default) or ``"min"``: which direction of ``metric`` is better, for the best
            checkpoint kept besides the latest ones (``keep_checkpoints``).
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
        max_retries: how often the run is started again (every rank, on fresh workers) after a rank's
            worker died or went silent (not after the function raised). Default 0: a rank that dies
            fails the run. With checkpoints (rank 0's ``reporter.report(checkpoint=...)``) every rank
            of the new attempt gets the last one as ``ctx.checkpoint`` and resumes from it.
        keep_checkpoints: as for :class:`unison.Search`: how many of the run's latest checkpoints are
            kept, besides its best one by ``metric``. Default 2. A distributed run's checkpoint is rank
            0's (the other ranks' ``checkpoint=`` is ignored): with FSDP every rank writes its shard with
            ``torch.distributed.checkpoint.save(state, checkpoint_id=directory)`` into one new
            directory they all see (e.g. ``ctx.trial_dir / "dcp" / str(step)``) and rank 0 passes it
            (it is copied); a retry reads it back with ``dcp.load(state, checkpoint_id=ctx.checkpoint)``.
            The result's ``checkpoint`` is the latest one's folder (:func:`unison.load_checkpoint`
            reads it).
        gpus_per_worker: the GPUs of each rank (default 0: none asked for; each rank then uses
            ``cuda:<local_rank>`` of the GPUs it sees). A whole number: the backend
            (``unison.Local(gpus=...)``) starts every rank's process with ``CUDA_VISIBLE_DEVICES`` set
            to exactly its GPUs, ``ctx.device`` is ``"cuda:0"`` and ``ctx.gpus`` their physical ids,
            and the process group is ``nccl`` when every rank's torch sees a GPU.
    """

    gpus_per_worker: int = 0  # what a run pickled before the option existed has

    def __init__(
        self,
        workers: int,
        hparams: Mapping[str, Any] | None = None,
        process_group: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        strategy: str | None = None,
        metric: str | None = None,
        framework: str = "torch",
        max_retries: int = 0,
        keep_checkpoints: int = 2,
        mode: str = "max",
        gpus_per_worker: int = 0,
    ) -> None:
        from unison._validate import check_hparam_names
        from unison.contexts.search import check_keep_checkpoints
        from unison.space import Distribution, validate_space

        self.workers = check_number(workers, "workers", owner="Distributed", integer=True, low=1)
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
            torch_only: dict[str, Any] = {"process_group": process_group, "strategy": strategy}
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
        self.max_retries = check_number(max_retries, "max_retries", owner="Distributed", integer=True, low=0)
        self.keep_checkpoints = check_keep_checkpoints(keep_checkpoints, "Distributed")
        if mode not in ("max", "min"):
            raise ValueError(f"Distributed(mode=...) must be 'max' or 'min' (which direction of metric= is "
                             f"better, for the best checkpoint kept); got {mode!r}")
        self.mode = mode
        self.gpus_per_worker = check_number(gpus_per_worker, "gpus_per_worker", owner="Distributed",
                                            integer=True, low=0)

    @property
    def dist_options(self) -> dict[str, Any]:
        """What every rank's trial message carries besides its place in the group."""
        return {"process_group": self.process_group, "timeout_s": self.timeout_s, "strategy": self.strategy,
                "framework": self.framework}

    def to_search(self) -> Any:
        """The one-trial search that runs this: its hyperparameters fixed, ``workers`` slots per trial.

        A rank that dies fails the run unless ``max_retries`` says to start it again.
        """
        from unison.contexts.search import Search

        return Search(dict(self.hparams), metric=self.metric or "value", mode=self.mode, trials=1,
                      optimizer="random", max_retries=self.max_retries, workers_per_trial=self.workers,
                      keep_checkpoints=self.keep_checkpoints,
                      gpus_per_trial=self.workers * self.gpus_per_worker)

    def to_dict(self) -> dict[str, Any]:
        described = {"workers": self.workers, "hparams": self.hparams, "metric": self.metric,
                     **self.dist_options}
        if self.framework == "torch":  # only when set: runs stored before the option existed compare equal
            del described["framework"]
        if self.max_retries:
            described["max_retries"] = self.max_retries
        if self.keep_checkpoints != 2:
            described["keep_checkpoints"] = self.keep_checkpoints
        if self.mode != "max":
            described["mode"] = self.mode
        if self.gpus_per_worker:
            described["gpus_per_worker"] = self.gpus_per_worker
        return described

    def to_plan(self, model: Any = None, data: Any = None) -> Plan:
        """What the driver runs: a one-trial search of ``workers`` ranks, presented as rank 0's result."""
        from unison.result import DistributedRecord

        if self.framework == "tensorflow":  # fail here, not in every rank
            from unison.frameworks.tensorflow import check_keras_backend

            check_keras_backend()
        search = self.to_search()

        def make_result(path: Path, rows: list[dict[str, Any]], status: str) -> DistributedRecord:
            return DistributedRecord(path, search.metrics, search.modes, rows, status)

        def on_abort(exc: SearchAborted) -> RunFailed:  # e.g. the chief did not return the metric= it names
            return RunFailed(f"the distributed run ({self.workers} ranks) failed: {exc}")

        return Plan("distributed", search, self.to_dict(), make_result, hparam_names=search.hparam_names,
                    dist_options=self.dist_options, require_metric=self.metric is not None, context=self,
                    present=self._present, on_abort=on_abort)

    def _present(self, result: SearchResult) -> RunResult:
        """What a distributed run returns: rank 0's metrics, like a single run; a failure raises."""
        from unison.result import RunResult

        rows = result.rows
        row = rows[0] if rows else None
        if row is None or row["status"] != "completed":
            why = (row or {}).get("error") or f"the run ended {(row or {}).get('status', result.status)}"
            raise RunFailed(f"the distributed run ({self.workers} ranks) failed; see {result.path}:\n{why}",
                            result.path)
        metrics = dict(row["metrics"])
        if self.metric is not None:
            value = metrics[self.metric]
        else:
            value = next(iter(metrics.values())) if len(metrics) == 1 else None
        return RunResult(metrics=metrics, value=value, returned=metrics, path=result.path,
                         duration=row["duration"])

    def __repr__(self) -> str:
        framework = f", framework={self.framework!r}" if self.framework != "torch" else ""
        return (f"Distributed(workers={self.workers}, hparams={self.hparams}, "
                f"process_group={self.process_group!r}, strategy={self.strategy!r}{framework})")
