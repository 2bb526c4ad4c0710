"""``unison.run`` and ``unison.resume``: validate, pick the context and backend, return a result."""

from __future__ import annotations

import json
import numbers
import platform
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unison.backends.base import Backend
from unison.backends.inline import Inline
from unison.backends.local import Local
from unison.backends.spark import Spark
from unison.contexts.ablation import Ablation
from unison.contexts.distributed import Distributed
from unison.contexts.search import Search
from unison.driver.store import ExperimentStore
from unison.result import RunResult, SearchResult
from unison.worker.injection import build_arguments, check_injectable
from unison.worker.logs import LazyLog
from unison.worker.metrics import to_number
from unison.worker.reporter import Reporter

BACKENDS: dict[str, Callable[[], Backend]] = {"inline": Inline, "local": Local, "spark": Spark}


def resolve_backend(backend: str | Backend | None) -> Backend:
    """A backend instance from ``None`` (local), a name, or an instance."""
    if backend is None:
        return Local()
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in BACKENDS:
        return BACKENDS[backend]()
    from unison._validate import unknown_name_error

    raise unknown_name_error("backend", backend, BACKENDS, "an instance such as unison.Local(workers=4)")


def _versions() -> dict[str, str]:
    from unison import __version__

    return {"unison": __version__, "python": platform.python_version()}


def run(
    fn: Callable[..., Any],
    context: Search | Ablation | Distributed | None = None,
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
) -> RunResult | SearchResult:
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
    """
    if not callable(fn):
        raise TypeError(f"unison.run needs a training function as its first argument, got {fn!r}")
    if model is not None and not callable(model):
        raise TypeError(f"model= must be a model generator (a function hparams -> model), got {model!r}")
    if context is None:
        if resume is not None:
            raise ValueError(
                "resume= continues a search: pass the Search too, or use unison.resume(path, fn)"
            )
        if backend is not None and resolve_backend(backend).name != "inline":
            raise ValueError(
                "a single run executes in this process; backend= applies to a search (unison.Search)"
            )
        return _run_single(fn, hparams or {}, model, data, storage, name, metric)
    if hparams is not None:
        raise ValueError("hparams= is for a single run; a Search takes its hyperparameters from its space")
    if isinstance(context, Search):
        plan = _search_plan(context)
    elif isinstance(context, Ablation):
        plan = _ablation_plan(context, model, data)
    elif isinstance(context, Distributed):
        if metric is not None:
            raise ValueError("metric= is for a single run; pass unison.Distributed(..., metric=...) instead")
        from unison.errors import RunFailed, SearchAborted

        plan = _distributed_plan(context)
        try:
            searched = _run_search(fn, plan, model, data, backend, storage, name, resume, progress)
        except SearchAborted as exc:  # e.g. the chief did not return the metric= it names
            raise RunFailed(f"the distributed run ({context.workers} ranks) failed: {exc}") from None
        return _distributed_result(searched, context)
    else:
        raise TypeError(
            f"unison.run: context must be None, a unison.Search, a unison.Ablation or a unison.Distributed, "
            f"got {type(context).__name__}"
        )
    return _run_search(fn, plan, model, data, backend, storage, name, resume, progress)


def resume(
    path: str | Path,
    fn: Callable[..., Any],
    *,
    model: Callable[..., Any] | None = None,
    data: Any = None,
    backend: str | Backend | None = None,
    progress: bool | None = None,
) -> SearchResult:
    """Finish the search stored in ``path``: trials that ended are kept, the rest run."""
    meta = ExperimentStore(path).read_experiment()
    if meta.get("kind") == "ablation":
        raise ValueError(
            f"{path} holds an ablation: resume it with unison.run(fn, ablation, model=..., data=..., "
            f"resume={str(path)!r}), passing the same unison.Ablation, or from a shell with "
            f"`{resume_command(path)}` (which loads the study stored in payload.bin)"
        )
    if meta.get("kind") != "search":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} experiment; only searches can be resumed")
    search = Search.from_dict(meta["search"])
    result = run(fn, search, model=model, data=data, backend=backend, resume=path, progress=progress)
    assert isinstance(result, SearchResult)
    return result


# ---------------------------------------------------------------------------------------- single run
def _single_run_seed(hparams: dict[str, Any]) -> int:
    """``ctx.seed`` of a single run: ``hparams["seed"]`` when it is an int, as in an ablation's trials;
    else a fresh random one, recorded in ``experiment.json``, so that ``torch.manual_seed(ctx.seed)``
    works in a single run as it does in every other context."""
    given = hparams.get("seed")
    if isinstance(given, numbers.Integral) and not isinstance(given, bool):
        return int(given)
    return secrets.randbits(31)


def _run_single(fn: Callable[..., Any], hparams: dict[str, Any], model: Any, data: Any,
                storage: str | Path | None, name: str | None, metric: str | None) -> RunResult:
    if not isinstance(hparams, dict):
        raise TypeError(f"hparams= must be a dict, got {type(hparams).__name__}")
    names = check_injectable(fn, hparams, model is not None, data is not None)
    from unison.worker.ctx import Context, _default_device

    seed = _single_run_seed(hparams)
    store = ExperimentStore.create(storage, name or getattr(fn, "__name__", "run"))  # locked until closed
    store.resumable = False
    try:
        store.write_experiment({"kind": "single", "name": name or fn.__name__, "status": "running",
                                "hparams": hparams, "seed": seed, "created": time.time(),
                                "versions": _versions()},
                               durable=False)  # a single run is not resumed: only its outcome is fsynced
        trial_dir = store.trial_dir(0)
        metrics_log = LazyLog(trial_dir / "metrics.jsonl")
        reporter = Reporter(None, metrics_log)
        ctx = Context(trial_id=0, trial_dir=trial_dir, device=_default_device(), seed=seed)
        store.append({"e": "start", "id": 0, "hparams": hparams, "attempt": 0, "worker": "inline",
                      "t": time.time()})
        start = time.perf_counter()
        try:
            returned = fn(**build_arguments(names, hparams, reporter, ctx, model, data))
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            try:
                store.append({"e": "end", "id": 0, "status": status, "error": traceback.format_exc(),
                              "duration": time.perf_counter() - start, "steps": reporter.count})
                store.update_experiment(status=status)
            except OSError:
                pass  # e.g. a full disk: the function's own error is the one to raise
            raise
        finally:
            metrics_log.close()
        duration = time.perf_counter() - start
        number = to_number(returned)
        problem = None
        if number is not None:
            metrics: dict[str, Any] = {metric or "value": number}
            value: Any = number
        elif isinstance(returned, dict):
            metrics = dict(returned)
            if metric is None:
                value = next(iter(metrics.values())) if len(metrics) == 1 else None
            elif metric in metrics:
                value = metrics[metric]
            else:
                value, problem = None, (f"metric={metric!r} is not among the returned keys "
                                        f"{sorted(metrics)}: name one of them, or leave metric= unset")
        else:
            metrics, value = {}, None
        if problem is not None:
            store.append({"e": "end", "id": 0, "status": "failed", "error": problem, "duration": duration})
            store.update_experiment(status="failed")
            raise ValueError(problem)
        store.append({"e": "end", "id": 0, "status": "completed", "metrics": metrics, "duration": duration,
                      "steps": reporter.count, "last_step": reporter.last_step})
        store.write_result({"status": "completed", "metrics": metrics, "value": value, "duration": duration},
                           sync_dir=False)  # update_experiment fsyncs the directory
        store.update_experiment(status="completed")
    finally:
        store.close()
    return RunResult(metrics=metrics, value=value, returned=returned, path=store.path, duration=duration)


# ------------------------------------------------------------------------------------------ search
@dataclass
class _Plan:
    """What a search-like experiment (a search, an ablation) runs and how its result is built."""

    kind: str
    search: Search
    declaration: dict[str, Any]
    make_result: Callable[[Path, list[dict[str, Any]], str], SearchResult]
    trial_spec: Callable[[int], dict[str, Any]] | None = None
    variants: dict[str, Callable[..., Any]] = field(default_factory=dict)
    hparam_names: list[str] = field(default_factory=list)
    check_names: Callable[[Callable[..., Any], list[str]], None] | None = None
    dist_options: dict[str, Any] = field(default_factory=dict)  # process_group, timeout_s, strategy
    require_metric: bool = True  # a trial that does not return the search's metric fails
    context: Any = None  # the Search or Ablation itself, stored in payload.bin for `unison resume DIR`


def _search_plan(search: Search) -> _Plan:
    return _Plan("search", search, search.to_dict(),
                 lambda path, rows, status: SearchResult(path, search.metrics, search.modes, rows, status),
                 hparam_names=search.hparam_names, context=search)


class _DistributedRecord(SearchResult):
    """The one-trial search behind a distributed run; its ``result.json`` also holds rank 0's metrics."""

    def summary_extra(self) -> dict[str, Any]:
        row = self._rows[0] if self._rows else {}
        return {"metrics": row.get("metrics") or {}, "trial_status": row.get("status"),
                "error": row.get("error")}


def _distributed_plan(run: Distributed) -> _Plan:
    if run.framework == "tensorflow":  # fail here, not in every rank
        from unison.frameworks.tensorflow import check_keras_backend

        check_keras_backend()
    search = run.to_search()

    def make_result(path: Path, rows: list[dict[str, Any]], status: str) -> SearchResult:
        return _DistributedRecord(path, search.metrics, search.modes, rows, status)

    return _Plan("distributed", search, run.to_dict(), make_result,
                 hparam_names=search.hparam_names, dist_options=run.dist_options,
                 require_metric=run.metric is not None, context=run)


def _distributed_result(result: SearchResult, run: Distributed) -> RunResult:
    """What a distributed run returns: rank 0's metrics, like a single run; a failure raises."""
    from unison.errors import RunFailed

    rows = result.rows
    row = rows[0] if rows else None
    if row is None or row["status"] != "completed":
        why = (row or {}).get("error") or f"the run ended {(row or {}).get('status', result.status)}"
        raise RunFailed(f"the distributed run ({run.workers} ranks) failed; see {result.path}:\n{why}",
                        result.path)
    metrics = dict(row["metrics"])
    if run.metric is not None:
        value = metrics[run.metric]
    else:
        value = next(iter(metrics.values())) if len(metrics) == 1 else None
    return RunResult(metrics=metrics, value=value, returned=metrics, path=result.path,
                     duration=row["duration"])


def _ablation_plan(study: Ablation, model: Any, data: Any) -> _Plan:
    from unison.result import AblationResult

    _check_ablation_targets(study, model, data)

    def trial_spec(n: int) -> dict[str, Any]:
        component, seed = study.configuration(n)
        return {"component": component.to_dict(), "seed": seed}

    return _Plan("ablation", study.to_search(), study.to_dict(),
                 lambda path, rows, status: AblationResult(path, study.metric, study.mode, rows, status),
                 trial_spec=trial_spec, variants=dict(study.variants),
                 hparam_names=[*study.base, "seed"],
                 check_names=lambda fn, names: _check_ablation_reaches(study, fn, names), context=study)


def _check_ablation_reaches(study: Ablation, fn: Callable[..., Any], names: list[str]) -> None:
    """A study that removes features (modules, variants) needs a function that asks for the dataset
    (the model): otherwise every component would silently look like it does not matter."""
    fn_name = getattr(fn, "__qualname__", repr(fn))
    if any(c.features for c in study.components) and not {"dataset", "data_fn"} & set(names):
        raise TypeError(f"the ablation removes features, but {fn_name} asks for neither 'dataset' nor "
                        f"'data_fn': add a 'dataset' parameter and train on it")
    if any(c.modules or c.variant for c in study.components) and not {"model", "model_fn"} & set(names):
        raise TypeError(f"the ablation changes the model, but {fn_name} asks for neither 'model' nor "
                        f"'model_fn': add a 'model' parameter (or call model_fn(hparams)) and train it")


def _check_ablation_targets(study: Ablation, model: Any, data: Any) -> None:
    """Fail before any trial runs if a component removes a feature or module that does not exist.

    This builds the dataset (if features are removed) and each model that loses modules once, here,
    with the base hyperparameters and the first seed.
    """
    hparams = {**study.base, "seed": study.seed}
    if model is None and (study.modules or study.variants):
        what = "modules= removes model modules" if study.modules else "variants= compares model generators"
        raise ValueError(f"Ablation({what}: pass the base model generator as model=model_fn to unison.run")
    features = [c for c in study.components if c.features]
    if features:
        _check_features(study, features, data, hparams)
    generators: dict[str | None, list[tuple[str, ...]]] = {}
    for component in study.components:
        if component.modules:
            generators.setdefault(component.variant, []).append(tuple(component.modules))
    for variant, removals in generators.items():
        _check_modules(study.variants[variant] if variant else model, variant, removals, hparams)


def _check_features(study: Ablation, components: list[Any], data: Any, hparams: dict[str, Any]) -> None:
    """Every column the components remove, and the label, exist in the dataset."""
    from unison.worker.ablate import feature_names
    from unison.worker.injection import call_generator

    if data is None:
        raise ValueError("Ablation(features=...) removes dataset columns: pass data= to unison.run")
    dataset = call_generator(data, hparams) if callable(data) else data
    names = feature_names(dataset)
    if names is None:
        raise TypeError(f"feature ablation needs a pandas DataFrame, a dict of arrays or a NumPy structured "
                        f"array as the dataset; {'data_fn returned' if callable(data) else 'data= is'} a "
                        f"{type(dataset).__name__}")
    for component in components:
        unknown = [c for c in component.features if c not in names]
        if unknown:
            raise ValueError(f"feature(s) {unknown} of component {component.name!r} are not in the dataset; "
                             f"its columns are {names}")
    if study.label is not None and study.label not in names:
        raise ValueError(f"label={study.label!r} is not a column of the dataset; its columns are {names}")


def _check_modules(model_fn: Any, variant: str | None, removals: list[tuple[str, ...]],
                   hparams: dict[str, Any]) -> None:
    """Every module path exists in the PyTorch model that ``model_fn`` builds; for a Keras model, every
    layer exists and each component's layers can be removed (so a layer that cannot be taken out fails
    here, naming it, before any trial runs)."""
    from unison.frameworks.detect import is_keras_model
    from unison.worker.injection import call_generator

    which = f"the variant {variant!r}" if variant else "model_fn"
    paths = list(dict.fromkeys(path for removal in removals for path in removal))
    if "keras" in sys.modules:  # a model_fn that builds a Keras model names its layers as a trial would
        from unison.frameworks.keras import fresh_layer_names

        with fresh_layer_names():
            built = call_generator(model_fn, hparams)
    else:
        built = call_generator(model_fn, hparams)
    if is_keras_model(built):
        from unison.frameworks.keras import layer_names, remove_layers

        names = layer_names(built)
        unknown = [m for m in paths if m not in names]
        if unknown:
            raise ValueError(f"layer(s) {unknown} are not in the Keras model {which} builds; its layers are "
                             f"{names}")
        for removal in removals:
            remove_layers(built, list(removal))  # raises, naming the layer and why, if it cannot go
        return
    if not hasattr(built, "get_submodule"):
        raise TypeError(f"module ablation needs a Keras model or a torch.nn.Module; {which} returned a "
                        f"{type(built).__name__}")
    from unison.frameworks.torch import module_names

    names = module_names(built)
    unknown = [m for m in paths if m not in names]
    if unknown:
        raise ValueError(f"module(s) {unknown} are not in the model {which} builds; its modules are {names}")


def _experiment_payload(fn: Callable[..., Any], names: list[str], plan: _Plan, model: Any, data: Any,
                        in_process: bool) -> tuple[bytes | None, str | None]:
    """``payload.bin``'s bytes: what workers load (the function, its generators, the data), and the
    pickled Search or Ablation (bytes, unpickled only by ``unison resume DIR``).

    Every experiment stores it, so any can be resumed from the command line. An inline experiment
    whose function cannot be pickled still runs: ``(None, why)``, and only Python can resume it.
    """
    import cloudpickle

    from unison.payload import dumps_payload

    try:
        context = None if plan.context is None else cloudpickle.dumps(plan.context)
    except Exception:  # noqa: BLE001 - e.g. a custom optimizer holding a lock: resume needs Python then
        context = None
    parts = {"fn": fn, "names": names, "metric": plan.search.metrics, "model_fn": model, "data": data,
             "variants": plan.variants, "distributed": plan.search.workers_per_trial > 1,
             "require_metric": plan.require_metric,
             "framework": plan.dist_options.get("framework", "torch"), "context": context}
    try:
        return dumps_payload(parts), None
    except TypeError as exc:
        if not in_process:
            raise
        return None, str(exc)


def _run_search(fn: Callable[..., Any], plan: _Plan, model: Any, data: Any,
                backend_spec: str | Backend | None, storage: str | Path | None, name: str | None,
                resume_path: str | Path | None, progress: bool | None) -> SearchResult:
    from unison.driver.dispatch import RemoteLoop, run_inline
    from unison.driver.driver import SearchDriver
    from unison.driver.progress import make_progress
    from unison.worker.runtime import TrialRunner

    search = plan.search
    backend = resolve_backend(backend_spec)
    k = search.workers_per_trial
    if k > 1 and backend.in_process:
        what = "unison.Distributed" if plan.kind == "distributed" else f"Search(workers_per_trial={k})"
        raise ValueError(f"{what} runs each trial as {k} processes: use backend='local' or 'spark', not "
                         f"{backend.name!r}")
    gang_slots = backend.gang_slots(k) if k > 1 else 0  # before anything is written: it may fail
    if k > 1 and gang_slots < k:
        raise ValueError(f"a trial of {k} ranks needs {k} worker slots, but {backend!r} has {gang_slots}: "
                         f"give the backend more workers, or use fewer ranks per trial")
    names = check_injectable(fn, plan.hparam_names, model is not None or bool(plan.variants),
                             data is not None, search.conditional_names)
    if plan.check_names is not None:
        plan.check_names(fn, names)
    payload, payload_error = _experiment_payload(fn, names, plan, model, data, backend.in_process)

    if resume_path is not None:
        store = ExperimentStore(resume_path)
        meta = store.read_experiment()
        if meta.get("kind") != plan.kind:
            raise ValueError(f"{resume_path} holds a {meta.get('kind')!r} experiment, not a {plan.kind}")
        if meta[plan.kind] != json.loads(json.dumps(plan.declaration)):
            raise ValueError(
                f"the {plan.kind} differs from the one stored in {resume_path}: pass the same one"
                + (f", or call unison.resume({str(resume_path)!r}, fn) to use the stored one"
                   if plan.kind == "search" else "")
            )
        seed, name = meta["seed"], meta["name"]
        store.lock()  # held until store.close(); unison.ExperimentLocked if another driver runs it
        events = store.read_journal()
    else:
        name = name or getattr(fn, "__name__", plan.kind)
        store = ExperimentStore.create(storage, name)  # locked until store.close()
        seed = search.seed if search.seed is not None else secrets.randbits(31)
        meta = {"kind": plan.kind, "name": name, plan.kind: plan.declaration, "seed": seed,
                "function": getattr(fn, "__qualname__", repr(fn)), "created": time.time(),
                "versions": _versions()}
        events = []

    try:  # from here on the store holds the lock: release it if the search cannot start
        driver = SearchDriver(search, store, seed, plan.trial_spec)
        driver.require_metric = plan.require_metric
        driver.replay(events)
        remaining = driver.planned - sum(driver.counts.values())
        if k > 1:  # trials of k ranks: floor(slots / k) at once, k workers each
            at_once = max(1, min(gang_slots // k, remaining, search.max_concurrent or remaining))
            workers, driver.concurrency = at_once * k, at_once
        else:
            workers = max(1, min(backend.slots(), remaining, search.max_concurrent or remaining))
            # Inline runs one trial at a time but may hold max_concurrent suggestions open (see run_inline).
            driver.concurrency = search.max_concurrent or workers
        store.write_experiment({**meta, "status": "running", "backend": repr(backend),
                                "workers": workers, "argv": sys.argv, "payload_error": payload_error})
        store.append({"e": "status", "status": "resumed" if events else "running", "t": time.time()})

        show = make_progress(progress, search.metric)
        if plan.kind == "distributed":
            show.start(f"unison: {name}: distributed run of {k} ranks on {backend!r} -> {store.path}")
        else:
            show.start(f"unison: {name}: {driver.planned} trials on {backend!r} with {workers} slot(s)"
                       + (f", {k} ranks per trial" if k > 1 else "") + f" -> {store.path}")
    except BaseException:
        store.close()
        raise
    status, ended = "failed", False
    payload_path = store.path / "payload.bin"
    try:
        if payload is not None:  # before any trial starts: `unison resume DIR` loads it
            payload_path.write_bytes(payload)
        if driver.finished:
            pass
        elif backend.in_process:
            runner = TrialRunner(fn, names, search.metrics, model, data, variants=plan.variants)
            run_inline(driver, runner, show)
        else:
            RemoteLoop(driver, backend, payload_path, store.path / "workers", show, workers_per_trial=k,
                       dist_options=plan.dist_options, barrier=plan.kind == "distributed").run(workers)
        status = "aborted" if driver.abort_error is not None else "completed"
        ended = True
    except KeyboardInterrupt as exc:
        status = "interrupted"
        # For the command line's one-line message: where the experiment is and the command resuming it.
        exc.unison_experiment = store.path  # type: ignore[attr-defined]
        exc.unison_resume = resume_command(store.path, backend) if payload is not None else None  # type: ignore[attr-defined]
        raise
    except OSError as exc:  # a full disk anywhere in the experiment: say so, and that resume continues it
        full = store.storage_full(exc)
        if full is None:
            raise
        status = "interrupted"
        if full is exc:
            raise
        raise full from None  # its message names the file; __context__ keeps the original
    finally:
        # A trial handed to a busy worker but never started is not part of the record (resume runs it).
        rows = [t.row() for t in sorted(driver.trials.values(), key=lambda t: t.trial_id)
                if t.status != "reserved"]
        result = plan.make_result(store.path, rows, status)
        try:
            store.append({"e": "status", "status": status, "t": time.time()})
            store.update_experiment(status=status)
            store.write_result({
                "status": status, "counts": driver.counts, "planned": driver.planned,
                "best": None if result.best is None else vars(result.best),
                "pareto": [vars(b) for b in result.pareto] if search.is_multi_objective else None,
                "elapsed": driver.summary()["elapsed"],
                **result.summary_extra(),
            })
        except OSError:
            if ended:  # nothing else went wrong: this is the error to raise
                raise
            # best effort (e.g. on a full disk): the error that ended the search is the one raised
        finally:
            store.close()  # releases the lock
        hint = _resume_hint(fn, model, data, store.path, plan, backend, payload is not None) \
            if status == "interrupted" else None
        show.close(driver.summary(), _closing_message(status, result, store.path, driver, plan.kind, hint))
    if driver.abort_error is not None:
        raise driver.abort_error
    return result


def _source_name(obj: Any, fallback: str) -> str:
    """The name ``obj`` has where the user typed the call: a name bound to it in ``__main__`` (a
    script, a notebook), else ``module.name`` for a function of a module ``__main__`` imported, else
    its own ``__name__``; ``fallback`` when none is a valid name."""
    main = sys.modules.get("__main__")
    bound = dict(vars(main)) if main is not None else {}
    for name, value in bound.items():
        if value is obj and name.isidentifier() and not name.startswith("_"):
            return name
    own = getattr(obj, "__name__", None)
    if not (isinstance(own, str) and own.isidentifier()):
        return fallback
    module = getattr(obj, "__module__", None)
    for name, value in bound.items():
        try:
            if (type(value).__name__ == "module" and getattr(value, "__name__", None) == module
                    and getattr(value, own, None) is obj and not name.startswith("_")):
                return f"{name}.{own}"
        except Exception:  # noqa: BLE001 - a module with an odd __getattr__: not the one we look for
            continue
    return own


def _resume_hint(fn: Callable[..., Any], model: Any, data: Any, path: Path, plan: _Plan, backend: Backend,
                 from_shell: bool) -> str:
    """A call that resumes the experiment in ``path`` as printed, with the user's names for ``fn`` and
    its ``model=``/``data=`` generators, and (when ``payload.bin`` was written) the shell command."""
    args = [_source_name(fn, "train")]
    if model is not None:
        args.append(f"model={_source_name(model, 'model_fn')}")
    if data is not None:
        args.append(f"data={_source_name(data, 'data_fn' if callable(data) else '<the same data>')}")
    if backend.name == "inline":
        args.append("backend='inline'")
    custom = any(isinstance(plan.declaration.get(key), dict) and "custom" in plan.declaration[key]
                 for key in ("optimizer", "scheduler"))
    if plan.kind == "search" and not custom:
        call = f"unison.resume({str(path)!r}, {', '.join(args)})"
    else:
        context = _source_name(plan.context, {"search": "search", "ablation": "study"}.get(plan.kind, "run"))
        args.insert(1, context)
        call = f"unison.run({', '.join(args)}, resume={str(path)!r})"
    if from_shell:
        call += f" or, from a shell, `{resume_command(path, backend)}`"
    return call


def resume_command(path: str | Path, backend: Backend | None = None) -> str:
    """The shell command that resumes the experiment in ``path`` (``unison resume DIR``)."""
    import shlex

    inline = backend is not None and backend.name == "inline"
    return f"unison resume {shlex.quote(str(path))}" + (" --backend inline" if inline else "")


def _closing_message(status: str, result: SearchResult, path: Path, driver: Any, kind: str = "search",
                     resume_hint: str | None = None) -> str:
    from unison.result import AblationResult

    if status == "interrupted" and resume_hint is not None:
        return f"interrupted: the experiment is resumable with {resume_hint}"

    if kind == "distributed" and status == "completed":
        row = result.rows[0] if result.rows else {}
        if row.get("status") != "completed":
            return f"the run {row.get('status', 'did not end')}: see {path / 'trials' / '0000'}"
        return f"completed: {row.get('metrics')}"
    if isinstance(result, AblationResult):
        if status == "interrupted":
            return (f"interrupted: resume it with unison.run(train, ablation, model=..., data=..., "
                    f"resume={str(path)!r})")
        if status != "aborted":
            return f"{result.headline()}; see result.ablation"
    if status == "interrupted":
        return (f"interrupted: the experiment is resumable with unison.resume({str(path)!r}, train) "
                f"(or `unison.run(train, search, resume=...)`)")
    if status == "aborted":
        lines = [line for line in str(driver.abort_error).splitlines() if line.strip()] or [""]
        cause = f" {lines[-1].strip()}" if len(lines) > 1 else ""  # a traceback's last line: the error
        return f"aborted: {lines[0]}{cause}"
    if len(result.metrics) > 1 and result.pareto:
        return f"{len(result.pareto)} trial(s) on the Pareto front of {result.metrics}: see result.pareto"
    if result.best is None:
        return f"no trial completed; see {path / 'journal.jsonl'}"
    best = result.best
    return f"best trial {best.trial_id}: {result.metric}={best.metric:.6g} with {best.hparams}"
