"""Replaying one trial of an experiment in this process: ``unison.replay(DIR, trial_id)``.

The trial runs again with what its journal recorded (hyperparameters, ablated component) and the seed
the driver gave it, through the same :class:`~unison.worker.runtime.TrialRunner` as every trial, as a
single run does: output on the terminal, ``pdb`` usable, the function's own exception raised. The
function, its generators and the data come from the experiment's ``payload.bin`` unless given.

The replay is recorded as a single run of its own, ``<storage>/<name>-replay-<trial>-<stamp>`` beside
the replayed experiment (its journal holds the reports, ``trials/0000/`` the files the function
wrote); the replayed experiment is only read, never written, so one still running can be replayed.
A trial of several ranks replays as one process, a world of one (see :meth:`Replay.run`).
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from unison.driver.driver import trial_seed
from unison.driver.experiment import GitProbe, UserCode, versions
from unison.driver.single import call_recorded
from unison.driver.store import ExperimentStore
from unison.result import RunResult
from unison.worker.injection import check_injectable
from unison.worker.runtime import TrialCall, TrialRunner

_PACKAGE = Path(__file__).resolve().parents[1]  # src/unison: frames there are unison's, not the user's


class ReplayFailed(ValueError):
    """The replayed trial returned, but not a result (e.g. a dict without the experiment's metric):
    the message says why, as the trial's ``error`` in a journal does."""


@dataclass
class Replay:
    """One trial, ready to run again: what the function is given, and where it comes from."""

    source: Path  # the replayed experiment
    trial_id: int
    name: str  # the replayed experiment's name
    code: UserCode
    names: list[str]  # the arguments the function asks for
    metrics: list[str]  # the experiment's metrics: the first is the result's value
    require_metric: bool
    message: dict[str, Any]  # the trial's message, as the driver sent it, without its trial_dir
    variants: dict[str, Callable[..., Any]] = field(default_factory=dict)
    ranks: int = 1
    path: Path | None = None  # the replay's own directory, once :meth:`run` made it

    def run(self, storage: str | Path | None = None) -> RunResult:
        """Call the function once, recorded as a single run under ``storage`` (default: the folder
        holding the replayed experiment); its metrics, or its exception raised unchanged. The function
        sees the trial's ``ctx.trial_id`` and ``ctx.seed``, ``ctx.attempt == 0`` (a first run, in a fresh
        folder) and ``ctx.trial_dir`` in the replay's directory.

        A trial of several ranks runs as rank 0 of a world of one (``ctx.world_size == 1``: no process
        group, ``ctx.prepare`` returns the model unwrapped, ``ctx.shard`` all the data), with a warning:
        a fault of the function's own code reproduces, one of the collectives between ranks does not."""
        if self.ranks > 1:
            warnings.warn(f"trial {self.trial_id} of {self.source} ran as {self.ranks} ranks; it replays as "
                          f"one process (rank 0 of a world of 1, no process group): what fails between ranks "
                          f"does not reproduce", stacklevel=3)
        store = ExperimentStore.create(self.source.parent if storage is None else storage,
                                       f"{self.name}-replay-{self.trial_id}")  # locked until closed
        store.resumable, self.path = False, store.path
        git = GitProbe.start()
        try:
            hparams = self.message["hparams"]
            store.write_experiment({
                "kind": "single", "name": f"{self.name}-replay-{self.trial_id}", "status": "running",
                "hparams": hparams, "seed": self.message.get("seed"), "created": time.time(),
                "replay_of": {"experiment": str(self.source.resolve()), "trial": self.trial_id,
                              **({"component": self.message["component"]} if "component" in self.message
                                 else {})},
                "versions": versions()}, durable=False)
            runner = TrialRunner(self.code.fn, self.names, self.metrics, self.code.model, self.code.data,
                                 capture_output=False, variants=self.variants,
                                 require_metric=self.require_metric)
            store.append({"e": "start", "id": 0, "hparams": hparams, "attempt": 0, "worker": "inline",
                          "t": time.time()})
            call = call_recorded(runner, {**self.message, "trial_dir": str(store.trial_dir(0))}, store, git)
            return self._record(call, store, git)
        finally:
            git.close()
            store.close()

    def _record(self, call: TrialCall, store: ExperimentStore, git: GitProbe) -> RunResult:
        """Record a call that returned: its metrics, or why what it returned is not a result."""
        outcome = call.outcome
        duration = outcome["duration"]
        if outcome["status"] != "completed":
            store.append({"e": "end", "id": 0, "status": "failed", "error": outcome.get("error"),
                          "duration": duration})
            store.update_experiment(status="failed", **git.fields())
            why = outcome.get("error") or f"it stopped itself ({outcome.get('stop_reason')})"
            raise ReplayFailed(f"trial {self.trial_id} of {self.source} failed when replayed: {why}")
        metrics: dict[str, float] = outcome["metrics"]
        value = metrics.get(self.metrics[0], next(iter(metrics.values())) if len(metrics) == 1 else None)
        store.append({"e": "end", "id": 0, "status": "completed", "metrics": metrics, "duration": duration,
                      "steps": outcome["steps"], "last_step": outcome["last_step"]})
        store.write_result({"status": "completed", "metrics": metrics, "value": value, "duration": duration},
                           sync_dir=False)  # update_experiment fsyncs the directory
        store.update_experiment(status="completed", **git.fields())
        return RunResult(metrics=metrics, value=value, returned=call.returned, path=store.path,
                         duration=duration)


def prepare_replay(experiment_dir: str | Path, trial_id: int, fn: Callable[..., Any] | None = None,
                   model: Any = None, data: Any = None) -> Replay:
    """Trial ``trial_id`` of ``experiment_dir``, checked and ready to :meth:`~Replay.run`; nothing runs.

    ``fn`` (default: the stored function) is given the stored model generator and data unless
    ``model``/``data`` are given; for a trial of a model variant, ``model`` is that variant's generator.
    Raises ``FileNotFoundError`` for a directory that holds no experiment, ``ValueError`` for a trial
    that cannot be replayed (unknown, never started, its function not stored and ``fn`` not given).
    """
    source = Path(experiment_dir)
    store = ExperimentStore(source)
    meta = store.read_experiment()
    trial_id = _check_trial_id(trial_id)
    start = _start_event(store.read_journal(), trial_id, source)
    spec = dict(start.get("spec") or {})
    given = fn is not None and model is not None and data is not None  # payload.bin is not needed
    parts = {} if given else _stored_parts(source, meta, trial_id, needed=fn is None)
    code = UserCode(fn if fn is not None else parts["fn"],
                    model if model is not None else parts.get("model_fn"),
                    data if data is not None else parts.get("data"))
    variants = _variants(parts, spec, model, trial_id, source)
    hparams = start["hparams"]
    if fn is None:
        names = list(parts["names"])
    else:
        names = check_injectable(fn, hparams, code.model is not None or bool(variants), code.data is not None)
    message = {"trial_id": trial_id, "hparams": hparams, "attempt": 0, "seed": _seed(meta, trial_id), **spec}
    metrics, require_metric = _judged(meta, parts)
    ranks = len(start.get("ranks") or ())
    return Replay(source, trial_id, str(meta.get("name") or source.name), code, names, metrics,
                  require_metric, message, variants, ranks=ranks or (2 if parts.get("distributed") else 1))


def _variants(parts: dict[str, Any], spec: dict[str, Any], model: Any, trial_id: int,
              source: Path) -> dict[str, Callable[..., Any]]:
    """The model variants of an ablation; a given ``model`` is the generator of the trial's variant."""
    variants = dict(parts.get("variants") or {})
    variant = (spec.get("component") or {}).get("variant")
    if variant is None:
        return variants
    if model is not None:
        variants[variant] = model
    if variant not in variants:
        raise ValueError(f"trial {trial_id} of {source} runs the model variant {variant!r}, whose generator "
                         f"is stored only in payload.bin: pass it as model=")
    return variants


def user_traceback(exc: BaseException) -> TracebackType | None:
    """``exc``'s traceback from its first frame outside unison (the training function's), to print."""
    tb = exc.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE):
        tb = tb.tb_next
    return tb or exc.__traceback__


def _check_trial_id(trial_id: Any) -> int:
    if isinstance(trial_id, str) and trial_id.strip().isdigit():
        return int(trial_id)
    if not isinstance(trial_id, numbers.Integral) or isinstance(trial_id, bool):
        raise TypeError(f"trial_id must be a trial's number (an int, as in the trial table's trial_id "
                        f"column), got {trial_id!r}")
    return int(trial_id)


def _start_event(events: list[dict[str, Any]], trial_id: int, source: Path) -> dict[str, Any]:
    """The journal's last ``start`` of ``trial_id`` (a retried trial's last attempt)."""
    starts = [ev for ev in events if ev.get("e") == "start" and isinstance(ev.get("id"), int)]
    mine = [ev for ev in starts if ev["id"] == trial_id]
    if mine:
        return mine[-1]
    ids = sorted({ev["id"] for ev in starts})
    if not ids:
        raise ValueError(f"no trial of {source} has started yet: there is nothing to replay")
    listed = f"The trials that started: {_ranges(ids)}"
    if 0 <= trial_id < ids[-1]:
        raise ValueError(f"trial {trial_id} of {source} never started (a worker was handed it as its next "
                         f"trial, and the experiment ended first): it has no record to replay. {listed}")
    nearest = min(ids, key=lambda i: (abs(i - trial_id), i))
    raise ValueError(f"{source} has no trial {trial_id}: did you mean trial {nearest}? {listed}")


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as ``"0-2, 5, 7-8"``."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _stored_parts(source: Path, meta: dict[str, Any], trial_id: int, needed: bool) -> dict[str, Any]:
    """The parts of ``payload.bin`` (empty when it is absent and not ``needed``)."""
    from unison.payload import loads_payload

    file = source / "payload.bin"
    if not file.is_file():
        if not needed:
            return {}
        why = ("a single run stores no payload" if meta.get("kind") == "single" else
               meta.get("payload_error") or "an older unison stored the function only for worker backends")
        raise ValueError(f"{source} has no payload.bin, so its training function is not stored ({why}): "
                         f"pass it, with the generators it uses: unison.replay({str(source)!r}, {trial_id}, "
                         f"fn=train, model=model_fn, data=data_fn)")
    try:
        return loads_payload(file.read_bytes())
    except Exception as exc:  # noqa: BLE001 - e.g. the module defining the function is not importable here
        if not needed:  # fn= was given: run it with what was passed (check_injectable says what is missing)
            return {}
        raise ValueError(f"cannot load the training function stored in {file}: {type(exc).__name__}: {exc}. "
                         f"Replay it where that code can be imported (the same environment and working "
                         f"directory), or pass fn=, model= and data=") from exc


def _seed(meta: dict[str, Any], trial_id: int) -> int | None:
    """The ``ctx.seed`` the driver gave the trial (an ablation's spec carries its own, which wins)."""
    seed = meta.get("seed")
    if not isinstance(seed, int):
        return None
    if meta.get("kind") == "single":
        return seed
    return trial_seed(seed, trial_id)


def _judged(meta: dict[str, Any], parts: dict[str, Any]) -> tuple[list[str], bool]:
    """The experiment's metrics (the first is the result's value) and whether a result must hold them:
    from the payload, else from the experiment's declaration."""
    if parts.get("metric"):
        return _names(parts["metric"]), bool(parts.get("require_metric", True))
    kind = meta.get("kind")
    declared = meta.get(str(kind))
    metric = declared.get("metric") if isinstance(declared, dict) else None
    if isinstance(metric, str) or (isinstance(metric, list) and metric):
        return _names(metric), kind in ("search", "ablation", "distributed")
    return ["value"], False


def _names(metric: str | list[str]) -> list[str]:
    return [metric] if isinstance(metric, str) else list(metric)
