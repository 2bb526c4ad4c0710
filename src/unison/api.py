"""``unison.run`` and ``unison.resume``: check the call, turn the context into a plan, hand it over;
``unison.load``: a past experiment's result, by directory or by name.

A single run goes to :func:`unison.driver.single.run_single`; a search, an ablation and a distributed
run each become a :class:`~unison.driver.plan.Plan` (``context.to_plan``) that
:func:`unison.driver.experiment.run_experiment` runs on the backend.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard, cast

from unison.backends import resolve_backend
from unison.backends.base import Backend
from unison.callbacks import Callback, resolve_callbacks
from unison.contexts.ablation import Ablation
from unison.contexts.distributed import Distributed
from unison.contexts.search import Search
from unison.contexts.single import SingleRun
from unison.driver.plan import prepare_backend

if TYPE_CHECKING:
    from unison.contexts.pipeline import Pipeline
    from unison.result import PipelineResult, RunResult, SearchResult

# The driver's own modules (the experiment runner, the store, the dispatch loop: ~20 ms of imports) load
# inside the functions, after a search's backend has begun starting its workers (Backend.prepare).


def run(
    fn: Callable[..., Any],
    context: Search | Ablation | Distributed | Pipeline | None = None,
    *,
    hparams: dict[str, Any] | None = None,
    model: Callable[..., Any] | None = None,
    data: Any = None,
    backend: str | Backend | None = None,
    storage: str | Path | None = None,
    name: str | None = None,
    metric: str | None = None,
    resume: str | Path | None = None,
    progress: bool | None = None,
    callbacks: list[Callback | str] | None = None,
    checkpoint_storage: str | Path | None = None,
) -> RunResult | SearchResult | PipelineResult:
    """Run the training function ``fn`` once, or as the experiment ``context`` describes.

    Args:
        fn: the training function; it asks by parameter name for any of ``hparams``, a
            hyperparameter's name, ``reporter``, ``ctx``, ``model``, ``dataset``, ``model_fn``,
            ``data_fn``, ``callbacks`` (Keras: pass them to ``model.fit``).
        context: ``None`` for a single run in this process, a :class:`unison.Search`, a
            :class:`unison.Ablation`, or a :class:`unison.Distributed` (one run as N data-parallel
            processes: returns a :class:`RunResult` with rank 0's metrics, raises
            :class:`unison.RunFailed` with the failing rank's traceback).
        hparams: the hyperparameters of a single run.
        model: a model generator ``model_fn(hparams) -> model``, injected as ``model``.
        data: a data generator ``data_fn(hparams) -> dataset`` or the dataset itself.
        backend: where a search (or a distributed run) runs: ``"local"`` (default: worker processes,
            one per CPU core), ``"inline"`` (this process, one trial at a time), ``"spark"`` (one
            long-lived Spark task per slot on the active SparkSession) or a backend instance such as
            ``unison.Spark(...)``.
        storage: the folder that holds experiment directories (default ``./unison-runs``).
        name: the experiment's name (default: the function's name).
        metric: for a single run, which entry of a returned dict is ``result.value``.
        resume: an experiment directory to finish instead of starting a new one.
        progress: show live progress (default: when a search runs; ``False`` silences it).
        callbacks: :class:`unison.Callback` instances (or their names) told, in the driver, of the
            experiment's start, each trial's start, reports and end, and the experiment's end; the
            names in the environment variable ``UNISON_CALLBACKS`` (comma-separated) are added.
        checkpoint_storage: where workers write the trials' checkpoints instead of the experiment
            folder: a path every worker sees (a shared mount) or any fsspec URL (``file:///mnt/shared``,
            ``s3://bucket/ckpts``, ``hdfs://...``); trial 7's are then in ``<checkpoint_storage>/<the
            experiment's folder name>/trials/0007/checkpoints/``. Checked writable before any trial
            runs; recorded in ``experiment.json``, so a resumed experiment uses it again.
    """
    if not callable(fn):
        raise TypeError(f"unison.run needs a training function as its first argument, got {fn!r}")
    if model is not None and not callable(model):
        raise TypeError(f"model= must be a model generator (a function hparams -> model), got {model!r}")
    callback_list = resolve_callbacks(callbacks)  # before anything is written: a name may be unknown
    _check_checkpoint_storage(context, checkpoint_storage)
    if context is None:
        if resume is not None:
            raise ValueError(
                "resume= continues a search: pass the Search too, or use unison.resume(path, fn)"
            )
        if backend is not None and resolve_backend(backend).name != "inline":
            raise ValueError(
                "a single run executes in this process; backend= applies to a search (unison.Search)"
            )
        from unison.driver.experiment import UserCode
        from unison.driver.single import run_single

        return run_single(UserCode(fn, model, data), SingleRun(hparams, metric), storage, name, callback_list)
    if _is_pipeline(context):
        if hparams is not None or metric is not None:
            raise ValueError("hparams= and metric= are for a single run; a Pipeline's stages take theirs "
                             "from their declarations (or from the search stage before them)")
        from unison.contexts.pipeline import run_pipeline
        from unison.driver.experiment import UserCode

        return run_pipeline(UserCode(fn, model, data), context, resolve_backend(backend), storage, name,
                            resume, progress, callback_list)
    _check_context(context, hparams, metric)
    return _run_plan(fn, cast("Search | Ablation | Distributed", context), model, data, backend, storage,
                     name, resume, progress, callback_list, checkpoint_storage)


def _run_plan(fn: Callable[..., Any], context: Search | Ablation | Distributed, model: Any, data: Any,
              backend: str | Backend | None, storage: str | Path | None, name: str | None,
              resume: str | Path | None, progress: bool | None, callback_list: list[Callback],
              checkpoint_storage: str | Path | None) -> RunResult | SearchResult:
    """A search, an ablation or a distributed run: its plan, run on the backend."""
    plan = context.to_plan(model, data)
    target = resolve_backend(backend)
    prepare_backend(plan, target)  # Local's worker template starts now, while the driver's modules load
    try:
        from unison.driver.experiment import UserCode, run_experiment

        result: RunResult | SearchResult = run_experiment(UserCode(fn, model, data), plan, target, storage,
                                                          name, resume, progress, callback_list,
                                                          checkpoint_storage=checkpoint_storage)
    except BaseException:
        target.cancel_prepared()
        raise
    return result


def _is_pipeline(context: Any) -> TypeGuard[Pipeline]:
    """Whether ``context`` is a :class:`unison.Pipeline`, without importing its module (which loads the
    driver's): a pipeline exists only once the module was imported."""
    module = sys.modules.get("unison.contexts.pipeline")
    return module is not None and isinstance(context, module.Pipeline)


def _check_checkpoint_storage(context: Any, checkpoint_storage: str | Path | None) -> None:
    if checkpoint_storage is not None and (context is None or _is_pipeline(context)):
        why = ("a single run saves them in its experiment folder" if context is None else
               "a Pipeline's stages do not take it yet: run the stage that checkpoints on its own")
        raise ValueError(f"checkpoint_storage= is for a Search, an Ablation or a Distributed run, whose "
                         f"workers write checkpoints; {why}")


def _check_context(context: Any, hparams: dict[str, Any] | None, metric: str | None) -> None:
    """Raise unless ``context`` makes a plan, and ``hparams=`` / ``metric=`` (a single run's) are unset."""
    if not callable(getattr(context, "to_plan", None)):  # a context is anything that makes a plan
        hint = ("; to run once with these hyperparameters, pass them as hparams=..."
                if isinstance(context, dict) else "")
        raise TypeError(
            f"unison.run: context must be None, a unison.Search, a unison.Ablation, a unison.Distributed or "
            f"a unison.Pipeline, got {type(context).__name__}{hint}"
        )
    if hparams is not None:
        raise ValueError("hparams= is for a single run; a Search takes its hyperparameters from its space")
    if metric is not None and isinstance(context, Distributed):
        raise ValueError("metric= is for a single run; pass unison.Distributed(..., metric=...) instead")


def resume(
    path: str | Path,
    fn: Callable[..., Any],
    *,
    model: Callable[..., Any] | None = None,
    data: Any = None,
    backend: str | Backend | None = None,
    progress: bool | None = None,
    callbacks: list[Callback | str] | None = None,
) -> SearchResult | PipelineResult:
    """Finish the search stored in ``path``: trials that ended are kept, the rest run. ``callbacks``
    (as in :func:`run`) hear only of what happens from now on. A pipeline's directory: its completed
    stages are read back, the interrupted one resumes, the later ones run (with the stored pipeline)."""
    from unison.contexts.pipeline import stored_pipeline
    from unison.driver.messages import resume_command
    from unison.driver.store import ExperimentStore
    from unison.result import PipelineResult, SearchResult

    meta = ExperimentStore(path).read_experiment()
    if meta.get("kind") == "pipeline":
        flow = run(fn, stored_pipeline(path), model=model, data=data, backend=backend, resume=path,
                   progress=progress, callbacks=callbacks)
        assert isinstance(flow, PipelineResult)
        return flow
    if meta.get("kind") == "ablation":
        raise ValueError(
            f"{path} holds an ablation: resume it with unison.run(fn, ablation, model=..., data=..., "
            f"resume={str(path)!r}), passing the same unison.Ablation, or from a shell with "
            f"`{resume_command(path)}` (which loads the study stored in payload.bin)"
        )
    if meta.get("kind") != "search":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} experiment; only searches can be resumed")
    search = Search.from_dict(meta["search"])
    result = run(fn, search, model=model, data=data, backend=backend, resume=path, progress=progress,
                 callbacks=callbacks)
    assert isinstance(result, SearchResult)
    return result


def replay(
    experiment_dir: str | Path,
    trial_id: int,
    fn: Callable[..., Any] | None = None,
    *,
    model: Callable[..., Any] | None = None,
    data: Any = None,
    storage: str | Path | None = None,
) -> RunResult:
    """Run trial ``trial_id`` of the experiment in ``experiment_dir`` again, in this process, to debug it:
    the same hyperparameters, ``ctx.seed`` and ablated component, through the same injection as every
    trial, with output on the terminal and ``pdb`` usable; an exception of the function is raised as a
    plain call raises it. Returns a :class:`RunResult` (``metrics`` as the trial's row holds them,
    ``returned`` what the function returned, ``path`` the replay's own directory).

    Args:
        experiment_dir: a search's, ablation's, distributed or single run's directory; only read.
        trial_id: the trial's number (the ``trial_id`` column of ``r.trials``).
        fn: the training function to run (e.g. with a fix); default: the one stored in ``payload.bin``.
        model, data: the model generator and data (generator); default: the stored ones. For a trial of
            a model variant, ``model`` is that variant's generator.
        storage: where the replay is recorded, as a single run named ``<name>-replay-<trial_id>``
            (default: the folder holding ``experiment_dir``).
    """
    from unison.driver.rerun import prepare_replay

    return prepare_replay(experiment_dir, trial_id, fn, model, data).run(storage)


def load(path_or_name: str | Path,
         storage: str | Path | None = None) -> RunResult | SearchResult | PipelineResult:
    """A past experiment as its result object, as ``unison.run`` returned it: a :class:`SearchResult`
    for a search, an :class:`AblationResult` for an ablation, a :class:`RunResult` for a single or a
    distributed run (one that did not complete raises :class:`unison.RunFailed`, as the run did), a
    :class:`PipelineResult` for a pipeline.
    Finished or not: a search still running shows its trials so far.

    Args:
        path_or_name: an experiment directory, or the name an experiment was given
            (``unison.run(..., name=...)``, by default the training function's name): the newest
            experiment of that name under ``storage``.
        storage: the folder holding experiment directories, as passed to ``unison.run(storage=...)``
            (default ``./unison-runs``); only used to find a name.
    """
    from unison.loading import find_experiment, load_result

    return load_result(find_experiment(path_or_name, storage))
