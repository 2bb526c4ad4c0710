"""Running a plan as an experiment: its directory, its driver, its dispatch, its result.

:func:`run_experiment` is what ``unison.run`` hands a search, an ablation or a distributed run to,
once the context has become a :class:`~unison.driver.plan.Plan` and the backend an instance.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unison._bulk import collector_paused
from unison._version import __version__
from unison.backends.base import Backend
from unison.callbacks import Callback, ExperimentInfo
from unison.driver.callbacks_runner import CallbackRunner
from unison.driver.driver import SearchDriver
from unison.driver.messages import closing_message, resume_command, resume_hint
from unison.driver.plan import Plan, prepare_backend
from unison.driver.progress import make_progress
from unison.driver.store import ExperimentStore
from unison.errors import SearchAborted
from unison.result import SearchResult
from unison.worker.injection import check_injectable


@dataclass
class UserCode:
    """What the user passed to ``unison.run``: the training function and its generators."""

    fn: Callable[..., Any]
    model: Any = None
    data: Any = None


# The libraries whose versions an experiment records when the driver has loaded them (never importing
# one), by module name, with the name recorded.
RECORDED_MODULES = {"numpy": "numpy", "pandas": "pandas", "torch": "torch", "tensorflow": "tensorflow",
                    "keras": "keras", "jax": "jax", "sklearn": "scikit-learn", "pyspark": "pyspark",
                    "optuna": "optuna"}
GIT_TIMEOUT_S = 1.0  # for `git status` (a big repository, a cold cache); past it only the commit is kept


def versions() -> dict[str, str]:
    """The versions an experiment records in ``experiment.json``: unison's, Python's, and those of the
    libraries of :data:`RECORDED_MODULES` already imported in this process."""
    found = {"unison": __version__, "python": platform.python_version()}
    for module_name, name in RECORDED_MODULES.items():
        module = sys.modules.get(module_name)
        version = getattr(module, "__version__", None) if module is not None else None
        if version is not None:
            found[name] = str(version)
    return found


class GitProbe:
    """The git commit of a work tree and whether tracked files differ from it, from ``git status`` run
    in a process of its own: :meth:`start` starts it and returns at once, so that it runs while the
    caller goes on (a single run: while the function runs), and :meth:`result` waits for it."""

    # (core.fsmonitor off: a repository's own config must not make unison run its command)
    STATUS = ["-c", "core.fsmonitor=false", "status", "--porcelain=v2", "--branch", "--untracked-files=no"]

    def __init__(self, process: subprocess.Popen[str] | None = None, cwd: Path | None = None) -> None:
        self._process, self._cwd = process, cwd
        self._deadline = time.monotonic() + GIT_TIMEOUT_S
        self._result: dict[str, Any] | None = None

    @classmethod
    def start(cls, cwd: str | Path | None = None) -> GitProbe:
        """Start ``git status`` in ``cwd`` (default: the current directory); no process at all when no
        folder from ``cwd`` up holds a ``.git`` (and ``GIT_DIR`` is unset) or git is not installed."""
        try:
            where = Path.cwd() if cwd is None else Path(cwd).absolute()
        except OSError:  # the current directory was removed
            return cls()
        if "GIT_DIR" not in os.environ and not any((d / ".git").exists() for d in (where, *where.parents)):
            return cls()
        try:
            process = subprocess.Popen(["git", *cls.STATUS], cwd=where, env=_git_environment(),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no git
            return cls()
        return cls(process, where)

    def result(self) -> dict[str, Any] | None:
        """``{"commit": sha, "dirty": bool}`` (``dirty`` is ``None`` when ``git status`` ran past
        :data:`GIT_TIMEOUT_S`), or ``None`` outside a work tree, before its first commit, without git."""
        process, self._process = self._process, None
        if process is None or self._cwd is None:
            return self._result
        try:
            out, _ = process.communicate(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # a huge tree, a cold cache: the commit alone, if git says it soon
            process.kill()
            process.communicate()
            commit = _git(["rev-parse", "--verify", "--quiet", "HEAD"], self._cwd, GIT_TIMEOUT_S / 2)
            self._result = {"commit": commit.strip(), "dirty": None} if commit else None
            return self._result
        lines = out.splitlines() if process.returncode == 0 else []
        heads = [line.split()[2] for line in lines if line.startswith("# branch.oid ")]
        if heads and heads[0] != "(initial)":
            self._result = {"commit": heads[0], "dirty": any(not line.startswith("#") for line in lines)}
        return self._result

    def fields(self) -> dict[str, Any]:
        """``{"git": result}`` for ``experiment.json``, or nothing when there is no commit to record."""
        found = self.result()
        return {} if found is None else {"git": found}

    def close(self) -> None:
        """End ``git status`` if it still runs (nothing waits for its answer any more)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.communicate()


def _git_environment() -> dict[str, str]:
    return {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # status must not take the index lock from the user


def _git(arguments: list[str], cwd: Path, timeout: float) -> str | None:
    """``git ARGUMENTS``'s output, or ``None`` if it fails, times out or git is missing."""
    try:
        done = subprocess.run(["git", *arguments], cwd=cwd, env=_git_environment(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """What ``experiment.json`` records to reproduce the experiment: ``versions`` and, where the current
    directory is in a git work tree, ``git`` (its commit and whether tracked files differ from it)."""
    return {"versions": versions(), **GitProbe.start().fields()}


NOTEBOOK_ENV = "UNISON_NOTEBOOK_RUN"  # set by `unison notebook` for the kernel: JSON, see notebook_origin


def notebook_origin(path: Path) -> dict[str, Any]:
    """``{"notebook": {"path": ..., "parameters": {...}}}`` for the ``experiment.json`` of an experiment
    made while ``unison notebook`` runs a notebook (it describes the run in :data:`NOTEBOOK_ENV`), once
    ``path`` is appended to the file the command reads back to put the executed notebook there; else
    ``{}``."""
    try:
        origin = json.loads(os.environ.get(NOTEBOOK_ENV) or "null")
    except ValueError:
        return {}
    if not isinstance(origin, dict):
        return {}
    record = origin.pop("record", None)
    if isinstance(record, str):
        try:
            with open(record, "a", encoding="utf-8") as made:
                made.write(f"{Path(path).absolute()}\n")
        except OSError:
            pass  # the experiment runs regardless; only the executed notebook is not copied into it
    return {"notebook": origin}


def run_experiment(code: UserCode, plan: Plan, backend: Backend, storage: str | Path | None = None,
                   name: str | None = None, resume_path: str | Path | None = None,
                   progress: bool | None = None, callbacks: list[Callback] | None = None,
                   path: str | Path | None = None, checkpoint_storage: str | Path | None = None) -> Any:
    """Run ``plan`` on ``backend`` (or finish the experiment in ``resume_path``); return what the plan
    presents (a result object), raising the plan's error if the experiment aborted. ``callbacks`` hear
    of every event journaled from the moment the experiment is opened. ``path``: a new experiment's
    exact directory (a pipeline's stage) instead of a new one under ``storage``.
    ``checkpoint_storage``: where workers write checkpoints (see :func:`unison.run`); on resume, the
    one ``experiment.json`` records."""
    gang_slots = prepare_backend(plan, backend)  # before anything is written: it may fail
    try:
        shared = _checkpoint_storage(checkpoint_storage, resume_path)
        names = check_injectable(code.fn, plan.hparam_names, code.model is not None or bool(plan.variants),
                                 code.data is not None, plan.search.conditional_names)
        if plan.check_names is not None:
            plan.check_names(code.fn, names)
        parts = _payload_parts(code, names, plan)
        payload, payload_error = _payload(parts, backend.in_process)
        store, meta, events = _open_store(code, plan, storage, name, resume_path, path)
    except BaseException:
        backend.cancel_prepared()
        raise
    if shared is not None:
        meta["checkpoint_storage"] = shared
    runner = None
    driver: SearchDriver | None = None
    try:  # from here on the store holds the lock: release it if the experiment cannot start
        declaration = json.loads(json.dumps(meta[plan.kind], default=str))  # the callbacks' own copy
        runner = CallbackRunner.start(callbacks or [], ExperimentInfo(
            meta["name"], plan.kind, store.path, declaration, repr(backend), bool(events)), store)
        driver = SearchDriver(plan.search, store, meta["seed"], plan.trial_spec)
        driver.require_metric = plan.require_metric
        driver.checkpoint_storage = shared
        with collector_paused():  # a long journal: millions of small objects, no cycle
            driver.replay(events)
        workers = _size(driver, plan, backend, gang_slots)
        store.write_experiment({**meta, "status": "running", "backend": repr(backend), "workers": workers,
                                "argv": sys.argv, "payload_error": payload_error})
        store.append({"e": "status", "status": "resumed" if events else "running", "t": time.time()})
        show = make_progress(progress, plan.search.metric)
        show.start(_headline(meta["name"], plan, driver, backend, workers, store.path))
    except BaseException:
        backend.cancel_prepared()
        if driver is not None:
            driver.close_optimizer()
        if runner is not None:
            runner.close(None)
        store.close()
        raise
    run = _Run(code, plan, backend, driver, store, show, parts, payload is not None, runner)
    try:
        result = run.dispatch(payload, workers)
    except SearchAborted as exc:
        if plan.on_abort is not None:
            raise plan.on_abort(exc) from None
        raise
    return plan.present(result)


def _checkpoint_storage(given: str | Path | None, resume_path: str | Path | None) -> str | None:
    """The experiment's ``checkpoint_storage=`` as recorded (see
    :func:`unison.worker.checkpoint_storage.normalize`), checked writable before anything is written;
    on resume the recorded one (passing another is an error: the journal names checkpoints there)."""
    from unison.worker.checkpoint_storage import check_writable, normalize

    location = None if given is None else normalize(given)
    if resume_path is not None:
        stored = ExperimentStore(resume_path).read_experiment().get("checkpoint_storage")
        if location is not None and location != stored:
            where = "its own folder" if stored is None else f"checkpoint_storage={stored!r}"
            raise ValueError(f"{resume_path} keeps its checkpoints in {where}, not in {location!r}: resume "
                             f"it without checkpoint_storage= (it uses the recorded place)")
        location = stored if isinstance(stored, str) else None
    if location is not None:
        check_writable(location)
    return location


def _payload_parts(code: UserCode, names: list[str], plan: Plan) -> dict[str, Any]:
    """What workers load (the function, its generators, the data, how to judge a trial) and the pickled
    context (bytes, unpickled only by ``unison resume DIR``)."""
    import cloudpickle

    try:
        context = None if plan.context is None else cloudpickle.dumps(plan.context)
    except Exception:  # noqa: BLE001 - e.g. a custom optimizer holding a lock: resume needs Python then
        context = None
    return {"fn": code.fn, "names": names, "metric": plan.search.metrics, "model_fn": code.model,
            "data": code.data, "variants": plan.variants, "distributed": plan.workers_per_trial > 1,
            "require_metric": plan.require_metric,
            "framework": plan.dist_options.get("framework", "torch"), "context": context}


def _payload(parts: dict[str, Any], in_process: bool) -> tuple[bytes | None, str | None]:
    """``payload.bin``'s bytes. Every experiment stores it, so any can be resumed from the command line.
    An inline experiment whose function cannot be pickled still runs: ``(None, why)``, and only Python
    can resume it."""
    from unison.payload import dumps_payload

    try:
        return dumps_payload(parts), None
    except TypeError as exc:
        if not in_process:
            raise
        return None, str(exc)


Opened = tuple[ExperimentStore, dict[str, Any], list[dict[str, Any]]]


def _open_store(code: UserCode, plan: Plan, storage: str | Path | None, name: str | None,
                resume_path: str | Path | None, path: str | Path | None = None) -> Opened:
    """A new experiment directory (``path``, or a new one under ``storage``), or the one in
    ``resume_path`` after checking it holds this plan; with its ``experiment.json`` (``meta``) and
    journal. The store is locked until it is closed."""
    if resume_path is None:
        name = name or str(getattr(code.fn, "__name__", plan.kind))
        store = ExperimentStore.create(storage, name) if path is None else ExperimentStore.create_at(path)
        seed = plan.search.seed if plan.search.seed is not None else secrets.randbits(31)
        meta = {"kind": plan.kind, "name": name, plan.kind: plan.declaration, "seed": seed,
                "function": getattr(code.fn, "__qualname__", repr(code.fn)), "created": time.time(),
                **provenance(), **notebook_origin(store.path)}
        return store, meta, []
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
    store.lock()  # unison.ExperimentLocked if another driver runs it
    return store, meta, store.read_journal()


def _size(driver: SearchDriver, plan: Plan, backend: Backend, gang_slots: int) -> int:
    """How many workers to start, and how many trials the driver runs at once."""
    search, k = plan.search, plan.workers_per_trial
    remaining = driver.unstarted() + driver.running
    if k > 1:  # trials of k ranks: floor(slots / k) at once, k workers each
        at_once = max(1, min(gang_slots // k, remaining, search.max_concurrent or remaining))
        driver.concurrency = at_once
        return at_once * k
    workers = max(1, min(backend.slots(), remaining, search.max_concurrent or remaining))
    # Inline runs one trial at a time but may hold max_concurrent suggestions open (see run_inline).
    driver.concurrency = search.max_concurrent or workers
    return workers


def _headline(name: str, plan: Plan, driver: SearchDriver, backend: Backend, workers: int, path: Path) -> str:
    k = plan.workers_per_trial
    if plan.kind == "distributed":
        return f"unison: {name}: distributed run of {k} ranks on {backend!r} -> {path}"
    return (f"unison: {name}: {driver.planned} trials on {backend!r} with {workers} slot(s)"
            + (f", {k} ranks per trial" if k > 1 else "") + f" -> {path}")


@dataclass
class _Run:
    """One started experiment: dispatch its trials, then record how it ended, whatever happened."""

    code: UserCode
    plan: Plan
    backend: Backend
    driver: SearchDriver
    store: ExperimentStore
    show: Any
    parts: dict[str, Any]  # the payload's parts: the inline backend runs them in this process
    from_shell: bool  # payload.bin was written: `unison resume DIR` works
    callbacks: CallbackRunner | None = None  # closed once the experiment's end is recorded

    def dispatch(self, payload: bytes | None, workers: int) -> SearchResult:
        """Serve every trial; the result, once the experiment's end is recorded."""
        status, ended = "failed", False
        try:
            if payload is not None:  # before any trial starts: `unison resume DIR` loads it
                (self.store.path / "payload.bin").write_bytes(payload)
            if not self.driver.finished:
                self._serve(workers)
            late_error = self.driver.close_optimizer()
            if late_error is not None:  # the optimizer failed on the last result: as it would on any other
                raise late_error
            status = "aborted" if self.driver.abort_error is not None else "completed"
            ended = True
        except KeyboardInterrupt as exc:
            status = "interrupted"
            # For the command line's one-line message: where the experiment is and the command resuming it.
            exc.unison_experiment = self.store.path  # type: ignore[attr-defined]
            exc.unison_resume = (  # type: ignore[attr-defined]
                resume_command(self.store.path, self.backend) if self.from_shell else None)
            raise
        except OSError as exc:  # a full disk anywhere in the experiment: say so, and that resume continues it
            full = self.store.storage_full(exc)
            if full is None:
                raise
            status = "interrupted"
            if full is exc:
                raise
            raise full from None  # its message names the file; __context__ keeps the original
        finally:
            self.backend.cancel_prepared()  # (when no worker was started: a resumed, finished search)
            self.driver.close_optimizer()  # (after an error or an interruption: that is the one raised)
            result = self._record_end(status, ended)
        if self.driver.abort_error is not None:
            raise self.driver.abort_error
        return result

    def _serve(self, workers: int) -> None:
        from unison.driver.dispatch import RemoteLoop, run_inline

        plan, driver = self.plan, self.driver
        if self.backend.in_process:
            from unison.worker.runtime import TrialRunner

            run_inline(driver, TrialRunner.from_parts(self.parts, interrupt_propagates=True), self.show)
        else:
            RemoteLoop(driver, self.backend, self.store.path / "payload.bin", self.store.path / "workers",
                       self.show, workers_per_trial=plan.workers_per_trial, dist_options=plan.dist_options,
                       barrier=plan.kind == "distributed").run(workers)

    def _record_end(self, status: str, ended: bool) -> SearchResult:
        """Write the experiment's end (journal, ``experiment.json``, ``result.json``), release its lock,
        and close the progress display with a closing message."""
        driver, store, plan = self.driver, self.store, self.plan
        # A trial handed to a busy worker but never started is not part of the record (resume runs it).
        with collector_paused():
            rows = [t.row() for t in sorted(driver.trials.values(), key=lambda t: t.trial_id)
                    if t.status != "reserved"]
            result = plan.make_result(store.path, rows, status)
        try:
            store.append({"e": "status", "status": status, "t": time.time()})
            store.update_experiment(status=status)
            store.write_result({
                "status": status, "counts": driver.counts, "planned": driver.planned,
                "best": None if result.best is None else vars(result.best),
                "pareto": [vars(b) for b in result.pareto] if plan.search.is_multi_objective else None,
                "elapsed": driver.summary()["elapsed"],
                **result.summary_extra(),
            })
        except OSError:
            if ended:  # nothing else went wrong: this is the error to raise
                raise
            # best effort (e.g. on a full disk): the error that ended the experiment is the one raised
        finally:
            try:
                if self.callbacks is not None:  # with the lock held: a callback may write its own files
                    self.callbacks.close(result)
            finally:
                store.close()  # releases the lock
        hint = (resume_hint(self.code.fn, self.code.model, self.code.data, store.path, plan, self.backend,
                            self.from_shell) if status == "interrupted" else None)
        closing = closing_message(status, result, store.path, driver, plan.kind, hint)
        self.show.close(driver.summary(), closing)
        return result
