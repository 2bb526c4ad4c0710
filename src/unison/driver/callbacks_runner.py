"""Turning an experiment's journal events into :class:`unison.Callback` calls, on a thread of their own.

The :class:`~unison.driver.store.ExperimentStore` hands every line it appends to its listeners; the
runner's listener only puts the line on a queue, and one background thread decodes it and calls the
callbacks. A slow callback therefore delays only the other callbacks, never a trial, and a callback
gets its own copy of what was written, so it cannot change the record.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import warnings
from typing import Any

from unison.callbacks import IDLE_S, Callback, ExperimentInfo, TrialInfo
from unison.driver.store import ExperimentStore
from unison.worker.capture import mark_console_thread, unmark_console_thread

DRAIN_TIMEOUT_S = 30.0  # how long the experiment's end waits for the callbacks to catch up
_END = object()  # the queue's last item


class CallbackRunner:
    """Feeds ``callbacks`` the events ``store`` appends, from :meth:`start` until :meth:`close`."""

    def __init__(self, callbacks: list[Callback], experiment: ExperimentInfo, store: ExperimentStore,
                 seed: int | None = None) -> None:
        """``seed``: what a trial's ``seed`` is when its start event names none (a single run's)."""
        self.callbacks = list(callbacks)
        self.experiment, self.store, self.seed = experiment, store, seed
        self.disabled: set[int] = set()  # indices of the callbacks that raised
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._trials: dict[int, TrialInfo] = {}  # the running trials, as their start event said
        self._result: Any = None
        self._dropping = False  # the drain timed out: skip the events still queued
        self._current = ""  # "Class.method" being called, for the timeout's warning
        self._thread = threading.Thread(target=self._run, name="unison-callbacks", daemon=True)
        self._closed = False
        self._strict = False  # a callback that raises: raise (replay), not warn and disable it

    @classmethod
    def start(cls, callbacks: list[Callback], experiment: ExperimentInfo, store: ExperimentStore,
              seed: int | None = None) -> CallbackRunner | None:
        """A started runner listening to ``store``, or ``None`` when there are no callbacks."""
        if not callbacks:
            return None
        runner = cls(callbacks, experiment, store, seed)
        store.listeners.append(runner.listen)
        runner._thread.start()
        return runner

    def listen(self, line: bytes) -> None:
        """The store's listener: queue one journal line (quick, never raises)."""
        self._queue.put(line)

    def close(self, result: Any, timeout: float | None = None) -> None:
        """Stop listening, let the callbacks take what is queued (at most ``timeout`` seconds, default
        :data:`DRAIN_TIMEOUT_S`), then ``on_experiment_end(result)``. Warns if some events were dropped."""
        if self._closed:
            return
        self._closed = True
        if self.listen in self.store.listeners:
            self.store.listeners.remove(self.listen)
        self._result = result
        self._queue.put(_END)
        wait = DRAIN_TIMEOUT_S if timeout is None else timeout
        self._thread.join(wait)
        if self._thread.is_alive():
            self._dropping = True
            left = max(self._queue.qsize() - 1, 0)  # (less the end marker)
            _warn(f"unison: the callbacks of experiment {self.experiment.path} had not taken {left} "
                  f"event(s) {wait:g} s after it ended ({self._current or 'a callback'} was still running): "
                  f"those events are dropped, and on_experiment_end is called once that call returns. "
                  f"Make the callback quicker (it runs once per event)")
            # The same callbacks may serve the next experiment (a pipeline's next stage): let this
            # one's on_experiment_end come first, unless a call hangs.
            self._thread.join(wait)

    # ------------------------------------------------------------------------------ the thread
    def replay(self, events: list[dict[str, Any]], result: Any) -> None:
        """Call the callbacks, on this thread, for an experiment already recorded: its start, ``events``
        (the journal's, in order), then its end with ``result``. For a runner that was never started;
        a callback that raises ends the replay with its exception (nothing else is running to spare)."""
        self._strict = True
        self._call("on_experiment_start", self.experiment)
        for event in events:
            self._deliver(event)
        self._call("on_experiment_end", result)

    def _run(self) -> None:
        mark_console_thread()  # on the inline backend a trial's capture must not take what a callback prints
        try:
            self._serve()
        finally:
            unmark_console_thread()

    def _serve(self) -> None:
        self._call("on_experiment_start", self.experiment)
        while True:
            try:
                item = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                self._call("flush")
                continue
            if item is _END:
                break
            if not self._dropping:
                self._deliver(json.loads(item))
        self._call("on_experiment_end", self._result)

    def _deliver(self, event: dict[str, Any]) -> None:
        kind, tid = event.get("e"), event.get("id")
        if not isinstance(tid, int):  # a status event: the experiment's start and end are called apart
            return
        if kind == "start":
            trial = self._started(tid, event)
            self._trials[tid] = trial
            self._call("on_trial_start", trial)
        elif kind == "report" and tid in self._trials:
            self._call("on_report", self._trials[tid], event.get("step"), event.get("metrics") or {})
        elif kind == "end":
            self._call("on_trial_end", self._ended(tid, event))
        # "lost": the trial runs again (a new start event) or fails (an end event)

    def _started(self, tid: int, event: dict[str, Any]) -> TrialInfo:
        spec = event.get("spec") or {}
        component = spec.get("component")
        return TrialInfo(
            trial_id=tid, hparams=dict(event.get("hparams") or {}), status="running",
            trial_dir=self.store.trial_dir(tid), attempt=event.get("attempt", 0), worker=event.get("worker"),
            host=event.get("host"), node=event.get("node"), gpus=list(event.get("gpus") or ()),
            seed=spec.get("seed", self.seed),
            component=component.get("name") if isinstance(component, dict) else None, started=event.get("t"))

    def _ended(self, tid: int, event: dict[str, Any]) -> TrialInfo:
        started = self._trials.pop(tid, None) or TrialInfo(tid, {}, "running", self.store.trial_dir(tid))
        return TrialInfo(
            trial_id=tid, hparams=started.hparams, status=event.get("status", "failed"),
            trial_dir=started.trial_dir, metrics=event.get("metrics") or {},
            stop_reason=event.get("stop_reason"), error=event.get("error"), duration=event.get("duration"),
            attempt=started.attempt, worker=event.get("worker", started.worker), host=started.host,
            node=started.node, gpus=started.gpus, component=started.component, seed=started.seed,
            started=started.started)

    def _call(self, method: str, *args: Any) -> None:
        """Call ``method`` of every callback still enabled; one that raises is warned of and disabled."""
        for index, callback in enumerate(self.callbacks):
            if index in self.disabled:
                continue
            name = f"{type(callback).__name__}.{method}"
            self._current = name
            try:
                getattr(callback, method)(*args)
            except BaseException as exc:  # noqa: BLE001 - a callback must never end the experiment
                if self._strict:
                    raise
                self.disabled.add(index)
                _warn(f"unison: the callback {name} raised {type(exc).__name__}: {exc}; it is called no "
                      f"more in experiment {self.experiment.path} (the experiment goes on). Fix the "
                      f"callback, or leave it out of callbacks=")
        self._current = ""


def _warn(message: str) -> None:
    """A ``RuntimeWarning``; printed instead when the warning filter turns it into an error, since
    this thread's exception would reach nobody."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Exception:  # noqa: BLE001
        print(message, file=sys.stderr)
