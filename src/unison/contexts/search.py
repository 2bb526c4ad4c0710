"""``Search``: the declaration of a hyperparameter search."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from unison._validate import check_hparam_names, check_number
from unison.driver.plan import Plan
from unison.optimizers import BUILTIN_OPTIMIZERS, GridSearch, Optimizer, make_optimizer
from unison.schedulers import BUILTIN_SCHEDULERS, PBT, Scheduler, make_scheduler
from unison.space import Conditional, space_from_dict, space_to_dict, validate_space

DEFAULT_RANDOM_TRIALS = 20


def _positive_int(value: Any, name: str, allow_none: bool = True) -> int | None:
    return check_number(value, name, owner="Search", integer=True, low=1, allow_none=allow_none)


def check_keep_checkpoints(value: Any, owner: str) -> int:
    """``keep_checkpoints`` checked: an int of at least 1 (the latest checkpoint is what a retry resumes
    from, so it is always kept)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}(keep_checkpoints={value!r}) must be an int of at least 1: how many of a "
                         f"trial's latest checkpoints to keep (the best one is kept besides)")
    return value


def check_trial_timeout(value: Any, owner: str) -> float | None:
    """Validate ``trial_timeout_s``: ``None`` (no limit) or a number of seconds > 0, as a float."""
    return check_number(value, "trial_timeout_s", owner=owner, low=0, low_inclusive=False, allow_none=True,
                        unit="seconds")


def check_gpus_per_trial(value: Any, workers_per_trial: int | None, owner: str) -> int | float:
    """``gpus_per_trial`` checked: a whole number of GPUs or a fraction ``1/n`` of one (``n`` trials
    share it); split over a trial's ranks, whole GPUs per rank (NCCL refuses two ranks on one GPU)."""
    from unison.gpus import check_gpu_fraction

    gpus = check_gpu_fraction(value, "gpus_per_trial", owner)
    ranks = workers_per_trial or 1
    if ranks > 1 and gpus and (not isinstance(gpus, int) or gpus % ranks):
        raise ValueError(f"{owner}(gpus_per_trial={value!r}, workers_per_trial={ranks}): every rank of a "
                         f"trial needs whole GPUs of its own (NCCL refuses two ranks on one GPU), so "
                         f"gpus_per_trial must be a multiple of {ranks}, e.g. {ranks} (one GPU per rank)")
    return gpus


def _as_list(value: Any, repeat: int) -> list[Any]:
    """A string repeated ``repeat`` times, a list or tuple as a list, anything else as ``[]``."""
    if isinstance(value, str):
        return [value] * repeat
    return list(value) if isinstance(value, (list, tuple)) else []


class Search:
    """A hyperparameter search over ``space``, optimizing ``metric`` in direction ``mode``.

    Args:
        space: dict of hyperparameter name -> distribution (``uniform``, ``loguniform``, ``integer``,
            ``choice``) or constant. In a :class:`unison.Pipeline`, also a function ``best -> dict``
            given the best trial (:class:`unison.Best`) of the search stage before it, e.g. a narrower
            space around it: ``space=lambda best: {"lr": unison.loguniform(best.hparams["lr"] / 3,
            best.hparams["lr"] * 3)}``.
        metric: the name of the metric to optimize: a key of the dict the function returns (a bare
            number returned by the function is this metric). A list of names makes a
            multi-objective search: the result's ``pareto`` holds the non-dominated trials.
        mode: ``"max"`` or ``"min"``, or one of those per metric.
        trials: how many trials to run. Default: the whole grid for ``optimizer="grid"``, else 20.
        optimizer: ``"auto"`` (default: Optuna's GP for the first 100 trials of a small numeric
            single-objective space, as long as results come slowly enough to hide its suggestions;
            TPE after that and otherwise; see :class:`unison.optimizers.AutoSearch`), ``"tpe"``,
            ``"gp"`` (needs torch), ``"cmaes"``, ``"qmc"``, ``"nsga2"`` (Optuna's samplers,
            asynchronous: suggestions account for trials still running), ``"random"``, ``"grid"``,
            or a :class:`unison.Optimizer` instance.
        scheduler: early stopping: ``None``, ``"median"``, ``"asha"`` (``unison.ASHA()``: rungs at
            steps 0, 2, 8, 26, ...), or a :class:`unison.Scheduler` instance such as
            ``unison.ASHA(max_resource=epochs)``, ``unison.Hyperband(1, epochs)`` or
            ``unison.MedianStopping(grace_period=2)``.
        seed: makes the sequence of suggested hyperparameters reproducible.
        max_concurrent: at most this many trials run at once (default: every worker slot).
        max_failures: abort the search once this many trials have failed (default ``None``: never
            abort; every failure is recorded and the search goes on).
        max_retries: how often a trial whose worker died (not one whose function raised) is run
            again on another worker before it counts as failed. Default 2.
        workers_per_trial: run every trial as this many data-parallel processes (PyTorch DDP, as
            :class:`unison.Distributed` does for one run). A trial starts once that many workers are
            idle; ``floor(slots / workers_per_trial)`` trials run at once. Default 1.
        trial_timeout_s: the longest a trial may run, in seconds of wall time from its start
            (default ``None``: no limit). Past it the trial's process is ended (every rank of a
            distributed trial), the trial is recorded ``failed`` with an error starting
            ``"timeout"``, and its worker is replaced. This bounds the whole trial; the
            ``timeout_s`` of :class:`unison.Distributed` only bounds one collective (torch's
            process-group timeout). On the inline backend it is enforced with ``SIGALRM`` when the
            search runs on the main thread (not enforced on other threads).
        retry_on_timeout: run a trial that hit ``trial_timeout_s`` again, counting an attempt, up to
            ``max_retries`` times (default ``False``: a timed-out trial fails at once).
        keep_checkpoints: how many of a trial's latest checkpoints (``reporter.report(checkpoint=...)``)
            are kept, besides its best one by ``metric``; older ones are deleted. Default 2.
        gpus_per_trial: the GPUs each trial gets (default 0: none asked for, the workers see what they
            see today): a whole number, or a fraction ``1/n`` of one GPU (``0.5``: two trials share
            each GPU). The backend (``unison.Local(gpus=...)``) starts every worker process with
            ``CUDA_VISIBLE_DEVICES`` set to exactly its GPUs (``ctx.gpus`` lists their physical ids,
            ``ctx.device`` is ``"cuda:0"``, the trial table's ``gpus`` column records them), and at most
            ``floor(GPUs / gpus_per_trial)`` trials run at once. With ``workers_per_trial=k`` the
            trial's GPUs are split over its ranks: a multiple of ``k``.
    """

    gpus_per_trial: int | float = 0  # what a search pickled before the option existed has

    def __init__(
        self,
        space: dict[str, Any] | Callable[[Any], dict[str, Any]],
        metric: str | list[str] = "value",
        mode: str | list[str] = "max",
        trials: int | None = None,
        optimizer: str | Optimizer = "auto",
        scheduler: str | Scheduler | None = None,
        seed: int | None = None,
        max_concurrent: int | None = None,
        max_failures: int | None = None,
        max_retries: int = 2,
        workers_per_trial: int = 1,
        trial_timeout_s: float | None = None,
        retry_on_timeout: bool = False,
        keep_checkpoints: int = 2,
        gpus_per_trial: float = 0,
    ) -> None:
        # A function of the best trial so far: a pipeline calls it, then replace(space=...), before the stage.
        self.space_fn: Callable[[Any], dict[str, Any]] | None = space if callable(space) else None
        self.space = {} if self.space_fn is not None else validate_space(space)
        check_hparam_names(self.space, "Search(space)")
        metrics = _as_list(metric, 1)
        named = all(isinstance(m, str) and m for m in metrics)
        if not metrics or not named or len(set(metrics)) < len(metrics):
            raise ValueError(
                f"metric must name a returned metric (a string), or be a list of distinct names for a "
                f"multi-objective search; got {metric!r}"
            )
        modes = _as_list(mode, len(metrics))
        if len(modes) != len(metrics) or any(m not in ("max", "min") for m in modes):
            raise ValueError(
                f"mode must be 'max' or 'min' (or a list of those, one per metric {metrics}); got {mode!r}"
            )
        self.metrics, self.modes = metrics, modes
        self.metric = metric if isinstance(metric, str) or len(metrics) > 1 else metrics[0]
        self.mode = mode if isinstance(mode, str) or len(modes) > 1 else modes[0]
        if self.is_multi_objective and scheduler is not None:
            raise ValueError(
                "early stopping compares one metric: a multi-objective search takes scheduler=None"
            )
        self.trials = _positive_int(trials, "trials")
        self.optimizer = optimizer
        make_optimizer(optimizer)  # validates the name now, before any worker starts
        self.scheduler = scheduler
        make_scheduler(scheduler)
        if isinstance(scheduler, PBT):
            self._check_population(scheduler)
        # owner="": tests match the message "seed must be a non-negative int".
        self.seed = check_number(seed, "seed", owner="", integer=True, low=0, allow_none=True)
        self.max_concurrent = _positive_int(max_concurrent, "max_concurrent")
        self.max_failures = _positive_int(max_failures, "max_failures")
        self.max_retries = check_number(max_retries, "max_retries", owner="Search", integer=True, low=0)
        self.workers_per_trial = _positive_int(workers_per_trial, "workers_per_trial", allow_none=False)
        self.trial_timeout_s = check_trial_timeout(trial_timeout_s, "Search")
        if not isinstance(retry_on_timeout, bool):
            raise ValueError(f"Search(retry_on_timeout=...) must be True or False, got {retry_on_timeout!r}")
        self.retry_on_timeout = retry_on_timeout
        self.keep_checkpoints = check_keep_checkpoints(keep_checkpoints, "Search")
        self.gpus_per_trial = check_gpus_per_trial(gpus_per_trial, self.workers_per_trial, "Search")
        if (optimizer == "grid" or isinstance(optimizer, GridSearch)) and self.space_fn is None:
            size = self.build_optimizer().size()
            if size is not None and self.trials is not None and self.trials > size:
                raise ValueError(
                    f"the grid has {size} points but trials={self.trials}: leave trials unset to run "
                    f"the whole grid, or use optimizer='random' to sample more"
                )

    @property
    def is_multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def hparam_names(self) -> list[str]:
        return list(self.space)

    @property
    def conditional_names(self) -> list[str]:
        """Hyperparameters that only some trials have."""
        return [name for name, dist in self.space.items() if isinstance(dist, Conditional)]

    def build_optimizer(self, seed: int | None = None) -> Optimizer:
        """A fresh optimizer set up for this search (``seed`` overrides the search's own)."""
        optimizer = make_optimizer(self.optimizer)
        optimizer.setup(self.space, self.mode, self.seed if seed is None else seed)
        return optimizer

    def _check_population(self, pbt: PBT) -> None:
        """PBT's population is ``trials=N``, and it mutates hyperparameters of the space."""
        if self.trials is None or self.trials < 2:
            raise ValueError(f"Search(scheduler=PBT(...), trials={self.trials!r}): trials is the "
                             f"population's size, at least 2 (e.g. trials=8); the clones that replace "
                             f"members come on top")
        if self.space_fn is None:
            from unison._validate import lookup

            for name in pbt.hyperparam_mutations:
                if name not in self.space:
                    lookup("PBT hyperparam_mutations name", name, dict.fromkeys(self.space),
                           "a hyperparameter of the search's space")

    def build_scheduler(self) -> Scheduler | None:
        scheduler = make_scheduler(self.scheduler)
        if scheduler is not None:
            scheduler.setup(self.modes[0])
        return scheduler

    def planned_trials(self, optimizer: Optimizer) -> int:
        """The number of trials this search runs."""
        if self.trials is not None:
            return self.trials
        size = optimizer.size()
        return size if size is not None else DEFAULT_RANDOM_TRIALS

    def replace(self, **changes: Any) -> Search:
        """This search with some settings changed (``space=``, ``metric=``, ...), the others the same."""
        settings = {"space": self.space_fn or self.space, "metric": self.metric, "mode": self.mode,
                    "trials": self.trials, "optimizer": self.optimizer, "scheduler": self.scheduler,
                    "seed": self.seed, "max_concurrent": self.max_concurrent,
                    "max_failures": self.max_failures, "max_retries": self.max_retries,
                    "workers_per_trial": self.workers_per_trial, "trial_timeout_s": self.trial_timeout_s,
                    "retry_on_timeout": self.retry_on_timeout, "keep_checkpoints": self.keep_checkpoints,
                    "gpus_per_trial": self.gpus_per_trial}
        return Search(**{**settings, **changes})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in ``experiment.json``. Names stay names; an instance of a builtin class
        that has ``params()`` is stored as ``{"name": ..., "params": {...}}`` and rebuilt by
        :meth:`from_dict`; any other instance is stored by class name only and cannot be rebuilt."""

        def describe(obj: Any, builtins: dict[str, Any]) -> Any:
            if obj is None or isinstance(obj, str):
                return obj
            for name, cls in builtins.items():
                if type(obj) is cls and callable(getattr(obj, "params", None)):
                    return {"name": name, "params": dict(obj.params())}
            return {"custom": type(obj).__qualname__}

        space = ({"space": None, "space_fn": getattr(self.space_fn, "__qualname__", repr(self.space_fn))}
                 if self.space_fn is not None else {"space": space_to_dict(self.space)})
        return {
            **space,
            "metric": self.metric,
            "mode": self.mode,
            "trials": self.trials,
            "optimizer": describe(self.optimizer, BUILTIN_OPTIMIZERS),
            "scheduler": describe(self.scheduler, BUILTIN_SCHEDULERS),
            "seed": self.seed,
            "max_concurrent": self.max_concurrent,
            "max_failures": self.max_failures,
            "max_retries": self.max_retries,
            # Only when set: searches stored before the option existed resume unchanged.
            **({"workers_per_trial": self.workers_per_trial} if self.workers_per_trial != 1 else {}),
            **({"trial_timeout_s": self.trial_timeout_s} if self.trial_timeout_s is not None else {}),
            **({"retry_on_timeout": True} if self.retry_on_timeout else {}),
            **({"keep_checkpoints": self.keep_checkpoints} if self.keep_checkpoints != 2 else {}),
            **({"gpus_per_trial": self.gpus_per_trial} if self.gpus_per_trial else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Search:
        """Rebuild a search stored by :meth:`to_dict`; custom optimizers cannot be rebuilt."""
        data = dict(data)
        if data.get("space") is None and "space_fn" in data:
            raise ValueError(f"this search's space is computed by a function ({data['space_fn']}), which "
                             f"cannot be stored: pass the same Search again")
        for key, builtins in (("optimizer", BUILTIN_OPTIMIZERS), ("scheduler", BUILTIN_SCHEDULERS)):
            spec = data.get(key)
            if isinstance(spec, dict) and "custom" in spec:
                raise ValueError(
                    f"this experiment used a custom {key} ({spec['custom']}); pass the same Search again: "
                    f"unison.run(train, search, resume=...)"
                )
            if isinstance(spec, dict) and "name" in spec:
                if spec["name"] not in builtins:
                    raise ValueError(f"unknown {key} {spec['name']!r} in the stored search: this version "
                                     f"of unison knows {sorted(builtins)}")
                data[key] = builtins[spec["name"]](**spec.get("params", {}))
        data["space"] = space_from_dict(data["space"])
        return cls(**data)

    def to_plan(self, model: Any = None, data: Any = None) -> Plan:
        """What the driver runs for this search (``model``/``data``: unused, a search checks none)."""
        from unison.result import SearchResult

        if self.space_fn is not None:
            raise ValueError("Search(space=<function>) computes its space from the best trial of a search "
                             "before it: use it as a stage of a unison.Pipeline after a Search stage, or "
                             "pass space= a dict")

        def make_result(path: Path, rows: list[dict[str, Any]], status: str) -> SearchResult:
            return SearchResult(path, self.metrics, self.modes, rows, status)

        return Plan("search", self, self.to_dict(), make_result, hparam_names=self.hparam_names, context=self)

    def __repr__(self) -> str:
        return (
            f"Search(metric={self.metric!r}, mode={self.mode!r}, trials={self.trials}, "
            f"optimizer={self.optimizer!r}, scheduler={self.scheduler!r}, seed={self.seed})"
        )
