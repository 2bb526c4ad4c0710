"""Callbacks: code of the user's (or a tracking logger) told what an experiment does, in the driver.

A :class:`Callback` is passed as ``unison.run(..., callbacks=[...])`` or named: a string of
:data:`BUILTIN_CALLBACKS`, in ``callbacks=`` or in the environment as ``UNISON_CALLBACKS=name1,name2``.
Its methods are called on one background thread of the driver (see
:mod:`unison.driver.callbacks_runner`), fed from the events the experiment's journal records, so a
callback sees what is recorded, cannot change it, and never slows the trials.

A built-in callback is one entry of :data:`BUILTIN_CALLBACKS`: a name and a factory that takes no
argument and returns the callback. The factory runs before anything is written, so one needing an
extra imports it there and fails with the ``pip install`` line to run, e.g.
``BUILTIN_CALLBACKS["mlflow"] = _lazy("unison.mlflow_logger", "MLflowLogger")`` (see the end of this module).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unison._validate import lookup

ENVIRONMENT_VARIABLE = "UNISON_CALLBACKS"
IDLE_S = 1.0  # Callback.flush is called when no event came for this long


@dataclass(frozen=True)
class ExperimentInfo:
    """The experiment a callback is told about.

    Attributes:
        name: the experiment's name.
        kind: ``"single"``, ``"search"``, ``"ablation"`` or ``"distributed"``.
        path: the experiment directory.
        declaration: what was asked, as stored in ``experiment.json`` (the search space and settings,
            the ablation plan, the distributed configuration; a single run's hyperparameters and seed).
        backend: the backend's repr (``None`` for a single run, which runs in the caller's process).
        resumed: whether this driver continues an experiment begun before (callbacks then hear only
            of what happens from now on).
    """

    name: str
    kind: str
    path: Path
    declaration: dict[str, Any]
    backend: str | None = None
    resumed: bool = False


@dataclass(frozen=True)
class TrialInfo:
    """One trial, as the journal records it when the callback is told about it.

    Attributes:
        trial_id: the trial's number.
        hparams: its hyperparameters.
        status: ``"running"`` (in ``on_trial_start`` and ``on_report``), then ``"completed"``,
            ``"failed"`` or ``"stopped"`` (in ``on_trial_end``).
        metrics: the final metrics (``{}`` until the trial ended, or when it reported none).
        stop_reason: why the scheduler stopped it (status ``"stopped"``).
        error: why it failed (status ``"failed"``): the traceback or the reason.
        duration: seconds the attempt ran, once it ended.
        attempt: 0 for the first attempt, 1 after its worker was lost once, ...
        worker: the worker that ran it.
        host: the host the worker ran on.
        node: the cluster node the worker ran on (a Ray node id: two nodes may share a host), else ``None``.
        gpus: the physical ids of the GPUs the backend gave the trial's worker (every rank's, in rank
            order, for a distributed trial), ``[]`` without any.
        trial_dir: the trial's folder (logs, ``metrics.jsonl``, what the function wrote in it).
        component: an ablation trial's component (its name), else ``None``.
        seed: an ablation trial's seed, a single run's seed, else ``None``.
        started: when the attempt started (unix seconds, as the journal records it), if known.
    """

    trial_id: int
    hparams: dict[str, Any]
    status: str
    trial_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    error: str | None = None
    duration: float | None = None
    attempt: int = 0
    worker: str | None = None
    host: str | None = None
    node: str | None = None
    gpus: list[str] = field(default_factory=list)
    component: str | None = None
    seed: int | None = None
    started: float | None = None


class Callback:
    """Told what an experiment does; subclass it and override the methods you need (each is a no-op).

    The methods are called in the driver, on one thread of their own, in the order the events were
    recorded: ``on_experiment_start``, then for each trial ``on_trial_start``, its ``on_report`` calls and
    ``on_trial_end``, then ``on_experiment_end``. A trial run again after its worker was lost gets
    ``on_trial_start`` again (with ``attempt`` + 1). ``flush`` is called whenever no event came for
    :data:`IDLE_S` seconds. A method that raises is reported once, in a warning, and that callback is
    called no more; the experiment goes on.
    """

    def on_experiment_start(self, experiment: ExperimentInfo) -> None:
        """The experiment starts (or resumes: ``experiment.resumed``)."""

    def on_trial_start(self, trial: TrialInfo) -> None:
        """A trial (or a new attempt of one) starts."""

    def on_report(self, trial: TrialInfo, step: int, metrics: dict[str, float]) -> None:
        """The trial called ``reporter.report(step, **metrics)``."""

    def on_trial_end(self, trial: TrialInfo) -> None:
        """The trial ended: ``trial.status``, ``metrics``, ``stop_reason``, ``error``, ``duration``."""

    def flush(self) -> None:
        """No event came for :data:`IDLE_S` seconds: a callback that holds events back (to send them in
        batches) sends them now."""

    def on_experiment_end(self, result: Any) -> None:
        """The experiment ended: ``result`` is its :class:`unison.SearchResult` (an ablation's
        :class:`unison.AblationResult`; ``result.status`` says how it ended), a single run's
        :class:`unison.RunResult`, or ``None`` when a single run failed or the experiment could not start."""


def _lazy(module: str, name: str) -> Callable[[], Callback]:
    """A factory that imports ``module`` when called and returns ``module.name()``."""
    def make() -> Callback:
        callback: Callback = getattr(importlib.import_module(module), name)()
        return callback
    return make


# name -> a factory with no arguments; see the module docstring for how to add one
BUILTIN_CALLBACKS: dict[str, Callable[[], Callback]] = {}
BUILTIN_CALLBACKS["mlflow"] = _lazy("unison.mlflow_logger", "MLflowLogger")
BUILTIN_CALLBACKS["tensorboard"] = _lazy("unison.tensorboard_logger", "TensorBoardLogger")

_ACCEPTED = "a unison.Callback instance"


def _check(spec: object, where: str) -> Callback | Callable[[], Callback]:
    """``spec`` itself if it is a :class:`Callback`, the factory of a known name; else raise."""
    if isinstance(spec, Callback):
        return spec
    if isinstance(spec, str):
        try:
            return lookup("callback", spec, BUILTIN_CALLBACKS, _ACCEPTED)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    hint = (f": pass an instance, {spec.__name__}()" if isinstance(spec, type) and issubclass(spec, Callback)
            else "")
    raise TypeError(f"{where} must hold unison.Callback instances or callback names (one of "
                    f"{sorted(BUILTIN_CALLBACKS)}), got {spec!r} (a {type(spec).__name__}){hint}")


def resolve_callbacks(callbacks: Iterable[Callback | str] | Callback | str | None,
                      environ: dict[str, str] | None = None) -> list[Callback]:
    """The callbacks of ``callbacks=`` and of ``UNISON_CALLBACKS``, built; raises before anything runs.

    Every name is checked before any is built, and a name given twice (or both ways) is built once.
    Raises ``ValueError`` (with a did-you-mean) for an unknown name and ``TypeError`` for anything that
    is neither a :class:`Callback` nor a string.
    """
    if callbacks is None:
        specs: list[object] = []
    elif isinstance(callbacks, (Callback, str)):
        specs = [callbacks]
    elif isinstance(callbacks, Iterable) and not isinstance(callbacks, (bytes, dict)):
        specs = list(callbacks)
    else:
        raise TypeError(f"callbacks= must be a list of unison.Callback instances or callback names, got "
                        f"{callbacks!r} (a {type(callbacks).__name__})")
    env = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, "")
    checked = [_check(spec, "callbacks=") for spec in specs]
    checked += [_check(name.strip(), f"{ENVIRONMENT_VARIABLE}={env!r}") for name in env.split(",")
                if name.strip()]
    built: list[Callback] = []
    made: set[int] = set()  # the factories called: a name given twice is one callback
    for item in checked:
        if isinstance(item, Callback):
            built.append(item)
        elif id(item) not in made:
            made.add(id(item))
            built.append(item())
    return built
