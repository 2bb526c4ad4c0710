"""Suggestions computed ahead, on a thread of their own, while the workers are busy.

A :class:`Suggester` owns every call into one optimizer: ``suggest`` and ``observe`` run in the order
the driver asks for them, one at a time, on a background thread (and under a lock). After trial ``n``
is taken the suggestion for ``n + 1`` is computed at once, with every trial in flight pending in the
optimizer, so that the worker whose trial ends next is handed it without waiting; the ended trial's
result is told after it, and the next suggestion computed behind that. Calls are held until
:meth:`Suggester.release` (the driver's loop calls it once it has answered the message at hand), so the
thread does not compete with the driver's own work for the interpreter lock.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from unison.optimizers.base import Optimizer

_DONE = object()


class _Ticket:
    """One suggestion being computed: its hyperparameters (``None``: the optimizer is exhausted) or error."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.ready = threading.Event()
        self.hparams: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.cancelled = False


class Suggester:
    """Runs ``optimizer``'s calls on one background thread, a suggestion ahead of the driver."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.lock = threading.Lock()
        self.tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.held: list[Any] = []  # queued calls not yet passed to the thread (release)
        self.ahead: _Ticket | None = None
        self.observe_error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="unison-suggester", daemon=True)
        self.thread.start()

    def suggest(self, number: int) -> dict[str, Any] | None:
        """The hyperparameters of trial ``number`` (the one computed ahead if it is ``number``'s);
        an exception ``suggest`` raised is raised here."""
        self._raise_observe_error()
        ticket = self.ahead if self.ahead is not None and self.ahead.number == number else None
        if ticket is None:
            self.discard()
            ticket = self._submit(number)
        self.ahead = None
        if not ticket.ready.is_set():
            self.release()
            ticket.ready.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.hparams

    def prefetch(self, number: int) -> None:
        """Compute trial ``number``'s suggestion next (after the calls already queued), from the next
        :meth:`release`."""
        if self.ahead is None or self.ahead.number != number:
            self.discard()
            self.ahead = self._submit(number)

    def observe(self, trial_number: int, hparams: dict[str, Any], value: Any, status: str) -> None:
        """Queue telling the optimizer how trial ``trial_number`` ended (in order with the suggestions)."""
        self._raise_observe_error()
        self.held.append(("observe", (trial_number, hparams, value, status)))

    def release(self) -> None:
        """Pass the calls queued since the last release to the thread, which starts on them now."""
        held, self.held = self.held, []
        for task in held:
            self.tasks.put(task)

    def discard(self) -> None:
        """The suggestion computed ahead is not needed: not started if it has not begun."""
        if self.ahead is not None:
            self.ahead.cancelled = True
            self.ahead = None

    def close(self) -> BaseException | None:
        """Drop what is computed ahead, finish the queued calls and end the thread; return the error
        an ``observe`` raised that no later call raised."""
        self.discard()
        self.release()
        self.tasks.put(_DONE)
        self.thread.join()
        error, self.observe_error = self.observe_error, None
        return error

    def _submit(self, number: int) -> _Ticket:
        ticket = _Ticket(number)
        self.held.append(("suggest", ticket))
        return ticket

    def _raise_observe_error(self) -> None:
        error, self.observe_error = self.observe_error, None
        if error is not None:
            raise error

    def _serve(self) -> None:
        while (task := self.tasks.get()) is not _DONE:
            kind, arg = task
            if kind == "observe":
                try:
                    with self.lock:
                        self.optimizer.observe(*arg)
                except BaseException as exc:  # raised in the driver at its next call
                    self.observe_error = exc
                continue
            if not arg.cancelled:
                try:
                    with self.lock:
                        arg.hparams = self.optimizer.suggest(arg.number)
                except BaseException as exc:  # raised where the driver takes it
                    arg.error = exc
            arg.ready.set()
