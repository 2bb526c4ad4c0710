"""``unison.run`` and ``unison.resume``: validate, pick the context and backend, return a result."""

from __future__ import annotations

import platform
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unison.backends.base import Backend
from unison.backends.inline import Inline
from unison.backends.local import Local
from unison.contexts.search import Search
from unison.injection import build_arguments, check_injectable
from unison.result import RunResult, SearchResult
from unison.runtime import Reporter, _LazyLog, to_number
from unison.store import ExperimentStore

BACKENDS: dict[str, Callable[[], Backend]] = {"inline": Inline, "local": Local}


def resolve_backend(backend: str | Backend | None) -> Backend:
    """A backend instance from ``None`` (local), a name, or an instance."""
    if backend is None:
        return Local()
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in BACKENDS:
        return BACKENDS[backend]()
    raise ValueError(
        f"unknown backend {backend!r}: use one of {sorted(BACKENDS)} or an instance such as "
        f"unison.Local(workers=4)"
    )


def _versions() -> dict[str, str]:
    from unison import __version__

    return {"unison": __version__, "python": platform.python_version()}


def run(
    fn: Callable[..., Any],
    context: Search | None = None,
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
            ``data_fn``.
        context: ``None`` for a single run in this process, or a :class:`unison.Search`.
        hparams: the hyperparameters of a single run.
        model: a model generator ``model_fn(hparams) -> model``, injected as ``model``.
        data: a data generator ``data_fn(hparams) -> dataset`` or the dataset itself.
        backend: where a search runs: ``"local"`` (default: worker processes, one per CPU core),
            ``"inline"`` (this process, one trial at a time) or a backend instance.
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
        return _run_search(fn, context, model, data, backend, storage, name, resume, progress)
    raise TypeError(f"unison.run: context must be None or a unison.Search, got {type(context).__name__}")


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
    if meta.get("kind") != "search":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} experiment; only searches can be resumed")
    search = Search.from_dict(meta["search"])
    result = run(fn, search, model=model, data=data, backend=backend, resume=path, progress=progress)
    assert isinstance(result, SearchResult)
    return result


# ---------------------------------------------------------------------------------------- single run
def _run_single(fn: Callable[..., Any], hparams: dict[str, Any], model: Any, data: Any,
                storage: str | Path | None, name: str | None, metric: str | None) -> RunResult:
    if not isinstance(hparams, dict):
        raise TypeError(f"hparams= must be a dict, got {type(hparams).__name__}")
    names = check_injectable(fn, hparams, model is not None, data is not None)
    from unison.context import Context, _default_device

    store = ExperimentStore.create(storage, name or getattr(fn, "__name__", "run"))
    store.write_experiment({"kind": "single", "name": name or fn.__name__, "status": "running",
                            "hparams": hparams, "created": time.time(), "versions": _versions()})
    trial_dir = store.trial_dir(0)
    trial_dir.mkdir(parents=True)
    metrics_log = _LazyLog(trial_dir / "metrics.jsonl")
    reporter = Reporter(None, metrics_log)
    ctx = Context(trial_id=0, trial_dir=trial_dir, device=_default_device())
    store.append({"e": "start", "id": 0, "hparams": hparams, "attempt": 0, "worker": "inline",
                  "t": time.time()})
    start = time.perf_counter()
    try:
        returned = fn(**build_arguments(names, hparams, reporter, ctx, model, data))
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        store.append({"e": "end", "id": 0, "status": status, "error": traceback.format_exc(),
                      "duration": time.perf_counter() - start, "steps": reporter.count})
        store.update_experiment(status=status)
        raise
    finally:
        metrics_log.close()
        store.close()
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
            value, problem = None, (f"metric={metric!r} is not among the returned keys {sorted(metrics)}: "
                                    f"name one of them, or leave metric= unset")
    else:
        metrics, value = {}, None
    if problem is not None:
        store.append({"e": "end", "id": 0, "status": "failed", "error": problem, "duration": duration})
        store.update_experiment(status="failed")
        store.close()
        raise ValueError(problem)
    store.append({"e": "end", "id": 0, "status": "completed", "metrics": metrics, "duration": duration,
                  "steps": reporter.count, "last_step": reporter.last_step})
    store.write_result({"status": "completed", "metrics": metrics, "value": value, "duration": duration})
    store.update_experiment(status="completed")
    store.close()
    return RunResult(metrics=metrics, value=value, returned=returned, path=store.path, duration=duration)


# ------------------------------------------------------------------------------------------ search
def _run_search(fn: Callable[..., Any], search: Search, model: Any, data: Any,
                backend_spec: str | Backend | None, storage: str | Path | None, name: str | None,
                resume_path: str | Path | None, progress: bool | None) -> SearchResult:
    from unison.driver import SearchDriver
    from unison.loop import RemoteLoop, run_inline
    from unison.progress import make_progress
    from unison.runtime import TrialRunner

    backend = resolve_backend(backend_spec)
    names = check_injectable(fn, search.hparam_names, model is not None, data is not None,
                             search.conditional_names)
    payload = None
    if not backend.in_process:
        from unison.payload import dumps_payload

        payload = dumps_payload({"fn": fn, "names": names, "metric": search.metrics,
                                 "model_fn": model, "data": data})

    if resume_path is not None:
        store = ExperimentStore(resume_path)
        meta = store.read_experiment()
        if meta.get("kind") != "search":
            raise ValueError(f"{resume_path} holds a {meta.get('kind')!r} experiment, not a search")
        if meta["search"] != search.to_dict():
            raise ValueError(
                f"the Search differs from the one stored in {resume_path}: pass the same Search, or call "
                f"unison.resume({str(resume_path)!r}, fn) to use the stored one"
            )
        seed, name = meta["seed"], meta["name"]
        events = store.read_journal()
    else:
        name = name or getattr(fn, "__name__", "search")
        store = ExperimentStore.create(storage, name)
        seed = search.seed if search.seed is not None else secrets.randbits(31)
        meta = {"kind": "search", "name": name, "search": search.to_dict(), "seed": seed,
                "function": getattr(fn, "__qualname__", repr(fn)), "created": time.time(),
                "versions": _versions()}
        events = []

    driver = SearchDriver(search, store, seed)
    driver.replay(events)
    remaining = driver.planned - sum(driver.counts.values())
    workers = max(1, min(backend.slots(), remaining, search.max_concurrent or remaining))
    # Inline runs one trial at a time but may hold max_concurrent suggestions open (see run_inline).
    driver.concurrency = search.max_concurrent or workers
    store.write_experiment({**meta, "status": "running", "backend": repr(backend),
                            "workers": workers, "argv": sys.argv})
    store.append({"e": "status", "status": "resumed" if events else "running", "t": time.time()})

    show = make_progress(progress, search.metric)
    show.start(f"unison: {name}: {driver.planned} trials on {backend!r} with {workers} slot(s) "
               f"-> {store.path}")
    status = "failed"
    try:
        if driver.finished:
            pass
        elif backend.in_process:
            run_inline(driver, TrialRunner(fn, names, search.metrics, model, data), show)
        else:
            payload_path = store.path / "payload.bin"
            payload_path.write_bytes(payload)
            RemoteLoop(driver, backend, payload_path, store.path / "workers", show).run(workers)
        status = "aborted" if driver.abort_error is not None else "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        store.append({"e": "status", "status": status, "t": time.time()})
        rows = [t.row() for t in sorted(driver.trials.values(), key=lambda t: t.trial_id)]
        result = SearchResult(store.path, search.metrics, search.modes, rows, status)
        store.update_experiment(status=status)
        store.write_result({
            "status": status, "counts": driver.counts, "planned": driver.planned,
            "best": None if result.best is None else vars(result.best),
            "pareto": [vars(b) for b in result.pareto] if search.is_multi_objective else None,
            "elapsed": driver.summary()["elapsed"],
        })
        store.close()
        show.close(driver.summary(), _closing_message(status, result, store.path, driver))
    if driver.abort_error is not None:
        raise driver.abort_error
    return result


def _closing_message(status: str, result: SearchResult, path: Path, driver: Any) -> str:
    if status == "interrupted":
        return (f"interrupted: the experiment is resumable with unison.resume({str(path)!r}, train) "
                f"(or `unison.run(train, search, resume=...)`)")
    if status == "aborted":
        return f"aborted: {str(driver.abort_error).splitlines()[0]}"
    if len(result.metrics) > 1 and result.pareto:
        return f"{len(result.pareto)} trial(s) on the Pareto front of {result.metrics}: see result.pareto"
    if result.best is None:
        return f"no trial completed; see {path / 'journal.jsonl'}"
    best = result.best
    return f"best trial {best.trial_id}: {result.metric}={best.metric:.6g} with {best.hparams}"
