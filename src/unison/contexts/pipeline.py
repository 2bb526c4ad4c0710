"""``Pipeline``: a search, then an ablation of its best configuration, then the final (distributed)
training with it, declared once and run as one experiment.

The pipeline's directory holds its own ``experiment.json`` (``kind: "pipeline"``, the stages as
declared), a journal of its stages and ``result.json``; each stage is an ordinary experiment, run by
:func:`~unison.driver.experiment.run_experiment` in ``stages/<n>-<name>/``, so progress, callbacks,
payloads and resume work per stage. Resuming runs only what has not completed: a finished stage is read
back, the interrupted one resumes on its own, later ones run.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, TypeVar

from unison.backends.base import Backend
from unison.callbacks import Callback
from unison.contexts.ablation import Ablation
from unison.contexts.distributed import Distributed
from unison.contexts.search import Search
from unison.driver.experiment import UserCode, notebook_origin, provenance, run_experiment
from unison.driver.messages import resume_command
from unison.driver.plan import Plan
from unison.driver.store import ExperimentStore
from unison.errors import RunFailed, SearchAborted
from unison.result import Best, PipelineResult, PipelineStage, SearchResult
from unison.worker.injection import check_injectable

Stage = Search | Ablation | Distributed
_Context = TypeVar("_Context", Ablation, Distributed)


def stage_kind(stage: Stage) -> str:
    """``"search"``, ``"ablation"`` or ``"distributed"``: the ``kind`` of the stage's experiment."""
    if isinstance(stage, Search):
        return "search"
    return "ablation" if isinstance(stage, Ablation) else "distributed"


def takes_best(stage: Stage) -> bool:
    """Whether ``stage`` declares no hyperparameters of its own and takes a search's best trial: an
    Ablation without ``base=``, a Distributed run without ``hparams=``, a Search whose ``space=`` is a
    function of the best trial."""
    if isinstance(stage, Search):
        return stage.space_fn is not None
    if isinstance(stage, Ablation):
        return not stage.base
    return not stage.hparams


class Pipeline:
    """Stages that run one after another as one experiment, e.g. a search, an ablation study of its
    best configuration and the final distributed training with it::

        flow = unison.Pipeline(
            search=unison.Search(space, metric="accuracy", mode="max", trials=60),
            ablation=unison.Ablation(features=["age", "income"], repeats=3),  # base = the best trial
            final=unison.Distributed(workers=4),                              # hparams = the best trial
        )
        r = unison.run(train, flow, model=model_fn, data=data_fn, name="churn")
        r.search.best, r.ablation.ablation, r.final.metrics

    Args:
        **stages: stage name -> a :class:`unison.Search`, :class:`unison.Ablation` or
            :class:`unison.Distributed`, in the order they run. A stage that declares no hyperparameters
            (an Ablation without ``base=``, a Distributed run without ``hparams=``, a Search whose
            ``space=`` is a function ``best -> space``) takes the best trial of the latest search stage
            before it. A ``metric`` (and ``mode``) left at its default is that search's.
    """

    def __init__(self, **stages: Stage) -> None:
        if not stages:
            raise ValueError("unison.Pipeline() needs at least one stage, e.g. unison.Pipeline(search="
                             "unison.Search(space, ...), final=unison.Distributed(workers=2))")
        self.stages: dict[str, Stage] = {}
        self.sources: dict[str, str | None] = {}  # stage -> the search stage before it (None: none)
        latest: str | None = None
        for name, stage in stages.items():
            _check_stage(name, stage)
            source = self.stages.get(latest) if latest is not None else None
            if takes_best(stage):
                _check_source(name, stage, latest, source)
            assert source is None or isinstance(source, Search)
            self.stages[name] = stage if source is None else _inherit_metric(stage, source)
            self.sources[name] = latest
            if isinstance(stage, Search):
                latest = name

    def declaration(self) -> dict[str, Any]:
        """The pipeline as JSON, stored in ``experiment.json`` and compared on resume: each stage's name,
        kind, directory, the search it takes its hyperparameters from (if it does) and declaration."""
        stages = [{"name": name, "kind": stage_kind(stage), "path": f"stages/{n}-{name}",
                   "takes": self.sources[name] if takes_best(stage) else None,
                   "declaration": stage.to_dict()} for n, (name, stage) in enumerate(self.stages.items(), 1)]
        normalized: dict[str, Any] = json.loads(json.dumps({"stages": stages}, default=str))
        return normalized

    def __repr__(self) -> str:
        return "Pipeline(" + ", ".join(f"{name}={stage!r}" for name, stage in self.stages.items()) + ")"


def _check_stage(name: str, stage: Any) -> None:
    if not name.isidentifier():  # it names a folder and an attribute: r.<name>
        raise ValueError(f"unison.Pipeline: the stage name {name!r} is not a Python identifier; name stages "
                         f"as keywords, e.g. unison.Pipeline(search=..., final=...)")
    if not isinstance(stage, (Search, Ablation, Distributed)):
        hint = " (to run once with fixed hyperparameters, use unison.Distributed(workers=1, hparams={...}))" \
            if isinstance(stage, dict) else ""
        raise TypeError(f"unison.Pipeline({name}=...) must be a unison.Search, unison.Ablation or "
                        f"unison.Distributed, got {type(stage).__name__}{hint}")
    if hasattr(PipelineResult, name):
        raise ValueError(f"unison.Pipeline({name}=...): {name!r} is taken by PipelineResult.{name}, so the "
                         f"stage's result could not be read as r.{name}: call the stage something else")


def _check_source(name: str, stage: Stage, latest: str | None, source: Stage | None) -> None:
    """A stage that takes the best trial of a search needs a single-objective search before it."""
    if source is None:
        fix = {"search": "Search(space=<function>) computes its space from the best trial of a search "
                         "before it, but no Search stage runs before it: pass space= a dict",
               "ablation": "the Ablation has no base= and no Search stage runs before it to take the best "
                           "hyperparameters from: pass base={...}",
               "distributed": "the Distributed run has no hparams= and no Search stage runs before it to "
                              "take the best hyperparameters from: pass hparams={...}"}[stage_kind(stage)]
        raise ValueError(f"stage {name!r}: {fix}, or put a unison.Search stage before it")
    assert isinstance(source, Search)
    if source.is_multi_objective:
        raise ValueError(f"stage {name!r} takes the best trial of stage {latest!r}, a search of several "
                         f"objectives {source.metrics} that has no single best (see its pareto): give "
                         f"stage {name!r} its hyperparameters (base= or hparams=), or stage {latest!r} one "
                         f"metric")
    if isinstance(stage, Ablation) and "seed" in source.space:
        raise ValueError(f"stage {name!r}: an Ablation injects its own seed per repeat, but stage {latest!r} "
                         f"searches a hyperparameter 'seed' its base would take: rename it in that space")


def _inherit_metric(stage: Stage, source: Search) -> Stage:
    """``stage`` with the metric and mode of the search before it where it left them at their defaults."""
    if isinstance(stage, Search):
        if stage.metrics != ["value"] or source.metrics == ["value"]:
            return stage
        return stage.replace(metric=source.metric, mode=source.mode if stage.mode == "max" else stage.mode)
    if source.is_multi_objective:
        return stage
    if isinstance(stage, Distributed):
        return stage if stage.metric is not None else _distributed(stage, metric=source.metric)
    metric = source.metric if stage.metric == "value" else stage.metric
    mode = source.mode if metric == source.metric and stage.mode == "max" else stage.mode
    return _ablation(stage, metric=metric, mode=mode)


def _rebuilt(context: _Context, **changes: Any) -> _Context:
    """``context`` built again with some settings changed and every other one kept: each parameter of
    its class's constructor is read back from the attribute of the same name."""
    names = [name for name in inspect.signature(type(context)).parameters if name != "self"]
    unread = [name for name in names if not hasattr(context, name)]
    if unread:  # a constructor parameter its object does not keep under the same name
        raise TypeError(f"{type(context).__name__} keeps no attribute for its parameters {unread}: a "
                        f"pipeline stage could not be built from it")
    return type(context)(**{**{name: getattr(context, name) for name in names}, **changes})


def _ablation(study: Ablation, **changes: Any) -> Ablation:
    """``study`` with some settings changed (``base=``, ``metric=``, ``mode=``)."""
    return _rebuilt(study, **changes)


def _distributed(run: Distributed, **changes: Any) -> Distributed:
    """``run`` with some settings changed (``hparams=``, ``metric=``)."""
    return _rebuilt(run, **changes)


def _bind(name: str, stage: Stage, best: Best) -> Stage:
    """``stage`` with the hyperparameters of ``best``: an Ablation's base, a Distributed run's
    hyperparameters, a Search's space computed from it."""
    try:
        if isinstance(stage, Search):
            assert stage.space_fn is not None
            return stage.replace(space=stage.space_fn(best))
        if isinstance(stage, Ablation):
            return _ablation(stage, base=best.hparams)
        return _distributed(stage, hparams=best.hparams)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"stage {name!r}, given the best trial {best.trial_id} {best.hparams}: "
                        f"{exc}") from exc


def _stage_metrics(stage: Stage) -> list[str]:
    if isinstance(stage, Search):
        return list(stage.metrics)
    return [stage.metric] if stage.metric is not None else []


def _check_metrics(name: str, stage: Stage, best: Best, source: str) -> None:
    """What cannot be checked before the search ran: the stage's metric is one the function returns."""
    missing = [m for m in _stage_metrics(stage) if m not in best.metrics]
    if missing:
        owner = f"unison.{type(stage).__name__}"
        raise ValueError(f"stage {name!r} reads the metric {missing[0]!r}, but the training function does "
                         f"not return it (the best trial of stage {source!r} returned "
                         f"{sorted(best.metrics)}): pass {owner}(metric=...) one of those, or return "
                         f"{missing[0]!r} from the function")


def _check_backend(pipeline: Pipeline, backend: Backend) -> None:
    for name, stage in pipeline.stages.items():
        ranks = stage.workers if isinstance(stage, Distributed) else getattr(stage, "workers_per_trial", 1)
        if ranks > 1 and backend.in_process:
            raise ValueError(f"stage {name!r} runs each trial as {ranks} processes, which backend "
                             f"{backend.name!r} cannot: use backend='local' or 'spark'")


def _precheck(code: UserCode, pipeline: Pipeline) -> dict[str, Plan]:
    """The plans of the stages that declare their own hyperparameters, checked (the function's
    parameters, an ablation's features and modules) before anything runs."""
    plans = {}
    for name, stage in pipeline.stages.items():
        if takes_best(stage):
            _precheck_ablation(code, pipeline, name)
            continue
        plan = stage.to_plan(code.model, code.data)
        names = check_injectable(code.fn, plan.hparam_names, code.model is not None or bool(plan.variants),
                                 code.data is not None, plan.search.conditional_names)
        if plan.check_names is not None:
            plan.check_names(code.fn, names)
        plans[name] = plan
    return plans


def _precheck_ablation(code: UserCode, pipeline: Pipeline, name: str) -> None:
    """What can be checked of an ablation before its base is known: that the function asks for the
    dataset (the model) it removes features (modules) from."""
    from unison.contexts.ablation_checks import check_reaches

    stage, source = pipeline.stages[name], pipeline.stages.get(pipeline.sources[name] or "")
    if isinstance(stage, Ablation) and isinstance(source, Search) and source.space_fn is None:
        has_model = code.model is not None or bool(stage.variants)
        names = check_injectable(code.fn, [*source.space, "seed"], has_model, code.data is not None,
                                 source.conditional_names)
        check_reaches(stage, code.fn, names)


def run_pipeline(code: UserCode, pipeline: Pipeline, backend: Backend, storage: str | Path | None = None,
                 name: str | None = None, resume_path: str | Path | None = None, progress: bool | None = None,
                 callbacks: list[Callback] | None = None) -> PipelineResult:
    """Run every stage of ``pipeline`` on ``backend`` (or finish the pipeline in ``resume_path``)."""
    _check_backend(pipeline, backend)
    plans = _precheck(code, pipeline)
    store, meta = _open(code, pipeline, storage, name, resume_path)
    run = _PipelineRun(code, pipeline, backend, store, meta, plans, progress, callbacks or [])
    return run.run(resumed=resume_path is not None)


def _open(code: UserCode, pipeline: Pipeline, storage: str | Path | None, name: str | None,
          resume_path: str | Path | None) -> tuple[ExperimentStore, dict[str, Any]]:
    """The pipeline's directory, new or (``resume_path``) checked to hold this pipeline; locked."""
    declaration = pipeline.declaration()
    if resume_path is None:
        name = name or str(getattr(code.fn, "__name__", "pipeline"))
        store = ExperimentStore.create(storage, name)
        (store.path / "trials").rmdir()  # the trials are in the stages' directories
        meta = {"kind": "pipeline", "name": name, "pipeline": declaration,
                "function": getattr(code.fn, "__qualname__", repr(code.fn)), "created": time.time(),
                **provenance(), **notebook_origin(store.path)}
    else:
        store = ExperimentStore(resume_path)
        meta = store.read_experiment()
        if meta.get("kind") != "pipeline":
            raise ValueError(f"{resume_path} holds a {meta.get('kind')!r} experiment, not a pipeline: resume "
                             f"it with unison.resume({str(resume_path)!r}, fn)")
        if meta["pipeline"] != declaration:
            raise ValueError(f"the pipeline differs from the one stored in {resume_path} "
                             f"({_first_difference(meta['pipeline'], declaration)}): pass the same one, "
                             f"or call unison.resume({str(resume_path)!r}, fn) to use the stored one")
        store.lock()  # unison.ExperimentLocked if another driver runs it
    try:
        meta["payload_error"] = _write_payload(store, code, pipeline)
    except BaseException:
        store.close()
        raise
    return store, meta


def _first_difference(stored: Any, given: Any, where: str = "") -> str:
    """Where two declarations first differ, e.g. ``stages[1].ablation.repeats: 3 stored, 5 given``."""
    if isinstance(stored, dict) and isinstance(given, dict):
        for key in [*stored, *(k for k in given if k not in stored)]:
            if stored.get(key) != given.get(key):
                return _first_difference(stored.get(key), given.get(key), f"{where}.{key}" if where else key)
    if isinstance(stored, list) and isinstance(given, list) and len(stored) == len(given):
        for i, (a, b) in enumerate(zip(stored, given, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}]")
    return f"{where or 'the declaration'}: {stored!r} stored, {given!r} given"


def _write_payload(store: ExperimentStore, code: UserCode, pipeline: Pipeline) -> str | None:
    """``payload.bin``: the function, its generators and the pipeline, for ``unison.resume(DIR, fn)``
    and ``unison resume DIR``; ``None``, or why it could not be written."""
    import cloudpickle

    from unison.payload import dumps_payload

    try:
        parts = {"fn": code.fn, "model_fn": code.model, "data": code.data,
                 "context": cloudpickle.dumps(pipeline)}
        store.write_bytes("payload.bin", dumps_payload(parts))
    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable function on the inline backend
        return f"{type(exc).__name__}: {exc}"
    return None


def stored_pipeline(path: str | Path) -> Pipeline:
    """The :class:`Pipeline` stored in the pipeline directory ``path`` (its ``payload.bin``)."""
    from unison.payload import loads_payload

    store = ExperimentStore(path)
    meta = store.read_experiment()
    payload = store.path / "payload.bin"
    if not payload.is_file():
        why = meta.get("payload_error") or "no payload.bin"
        raise ValueError(f"{path} does not store its pipeline ({why}): pass the same unison.Pipeline again: "
                         f"unison.run(fn, flow, model=..., data=..., resume={str(path)!r})")
    import cloudpickle

    pipeline = cloudpickle.loads(loads_payload(payload.read_bytes())["context"])
    if not isinstance(pipeline, Pipeline):
        raise ValueError(f"{payload} holds a {type(pipeline).__name__}, not a unison.Pipeline")
    return pipeline


class _PipelineRun:
    """One started pipeline: run its stages in order, then record how it ended, whatever happened."""

    def __init__(self, code: UserCode, pipeline: Pipeline, backend: Backend, store: ExperimentStore,
                 meta: dict[str, Any], plans: dict[str, Plan], progress: bool | None,
                 callbacks: list[Callback]) -> None:
        self.code, self.pipeline, self.backend, self.store = code, pipeline, backend, store
        self.meta, self.plans, self.progress, self.callbacks = meta, plans, progress, callbacks
        self.records: list[PipelineStage] = []

    def run(self, resumed: bool) -> PipelineResult:
        status = "failed"
        try:
            self.store.write_experiment({**self.meta, "status": "running", "backend": repr(self.backend)})
            self.store.append({"e": "status", "status": "resumed" if resumed else "running",
                               "t": time.time()})
            for index, name in enumerate(self.pipeline.stages, start=1):
                self.records.append(self._stage(index, name))
            status = "completed"
        except KeyboardInterrupt as exc:
            status = "interrupted"
            exc.unison_experiment = self.store.path  # type: ignore[attr-defined]
            exc.unison_resume = (  # type: ignore[attr-defined]
                None if self.meta.get("payload_error") else resume_command(self.store.path, self.backend))
            raise
        except SearchAborted:
            status = "aborted"
            raise
        finally:
            self._record_end(status)
        return PipelineResult(self.store.path, self.meta["name"], status, self.records)

    def _stage(self, index: int, name: str) -> PipelineStage:
        """Run stage ``name`` (or resume it, or read it back if it completed before)."""
        stage = self.pipeline.stages[name]
        kind = stage_kind(stage)
        path = self.store.path / "stages" / f"{index}-{name}"
        stored = ExperimentStore(path)
        if stored.exists() and stored.read_experiment().get("status") == "completed":
            record = PipelineStage.load(name, kind, path)
            if record.result is not None:
                self._say(index, name, f"completed before, read back from {path}")
                return record
            _set_aside(path)  # a distributed run that failed: run it again, keeping the failed one
        plan = self._plan(name, stage, path)
        resuming = stored.exists()
        self._say(index, name, "resumes where it stopped" if resuming else self._takes(name, stage))
        self.store.update_experiment(stage=name)
        self.store.append({"e": "stage", "stage": name, "status": "running", "t": time.time()})
        try:
            result = run_experiment(self.code, plan, self.backend, name=f"{self.meta['name']}/{name}",
                                    resume_path=path if resuming else None, progress=self.progress,
                                    callbacks=self.callbacks, path=None if resuming else path)
        except RunFailed as exc:
            self.store.append({"e": "stage", "stage": name, "status": "failed", "t": time.time()})
            raise RunFailed(f"stage {name!r} of the pipeline {self.store.path} failed: {exc}\nResuming the "
                            f"pipeline runs it again: unison.resume({str(self.store.path)!r}, fn, ...)",
                            exc.path) from None
        status = result.status if isinstance(result, SearchResult) else "completed"
        self.store.append({"e": "stage", "stage": name, "status": status, "t": time.time()})
        return PipelineStage(name, kind, path, status, result)

    def _best(self, name: str) -> tuple[str, Best | None] | None:
        """The search stage before ``name`` and its best trial, if there is such a stage."""
        source = self.pipeline.sources[name]
        if source is None:
            return None
        result = next(r.result for r in self.records if r.name == source)
        return source, result.best if isinstance(result, SearchResult) else None

    def _plan(self, name: str, stage: Stage, path: Path) -> Plan:
        """The stage's plan: checked before anything ran, or built now with the best trial before it."""
        found = self._best(name)
        if found is not None and found[1] is not None:
            _check_metrics(name, stage, found[1], found[0])
        if name in self.plans:
            return self.plans[name]
        assert found is not None  # Pipeline() checked that a stage taking a best trial has a search before it
        source, best = found
        if best is None:
            source_path = next(r.path for r in self.records if r.name == source)
            raise RunFailed(f"stage {name!r} takes the best trial of stage {source!r}, but no trial of that "
                            f"search completed (see `unison show {source_path}`): fix what made its trials "
                            f"fail, then run the pipeline again", source_path)
        return _bind(name, stage, best).to_plan(self.code.model, self.code.data)

    def _takes(self, name: str, stage: Stage) -> str:
        found = self._best(name)
        if not takes_best(stage) or found is None:
            return "starts"
        source, best = found
        if best is None:
            return "starts"
        return f"starts with the best trial of stage {source!r} (trial {best.trial_id}: {best.hparams})"

    def _say(self, index: int, name: str, what: str) -> None:
        if self.progress is not False:
            kind = stage_kind(self.pipeline.stages[name])
            print(f"unison: {self.meta['name']}: stage {index}/{len(self.pipeline.stages)} {name!r} ({kind}) "
                  f"{what}", flush=True)

    def _record_end(self, status: str) -> None:
        """Write the pipeline's end (journal, ``experiment.json``, ``result.json``) and release its lock."""
        store = self.store
        try:
            result = PipelineResult(store.path, self.meta["name"], status, self.records)
            store.append({"e": "status", "status": status, "t": time.time()})
            store.update_experiment(status=status)
            best = result.best
            store.write_result({"status": status, "best": None if best is None else vars(best), "stages": [
                {"name": s.name, "kind": s.kind, "status": s.status, "summary": s.summary(),
                 "path": str(s.path.relative_to(store.path))} for s in self.records]})
        except OSError:
            if status == "completed":
                raise
        finally:
            store.close()


def _set_aside(path: Path) -> Path:
    """Rename the stage directory ``path`` to ``<path>.failed-<n>`` (the first free ``n``)."""
    for n in range(1, 1000):
        target = path.with_name(f"{path.name}.failed-{n}")
        if not target.exists():
            path.rename(target)
            return target
    raise FileExistsError(f"too many failed runs kept beside {path}: remove some")

