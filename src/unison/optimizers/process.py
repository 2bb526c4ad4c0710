"""An optimizer run in a Python process of its own, so that its work never holds the driver's
interpreter lock.

:class:`OptimizerProcess` starts ``python -m unison.optimizers.process_child`` with pipes to its stdin
and stdout (not :mod:`multiprocessing`, whose spawn would import the user's ``__main__`` script again).
The child imports its heavy modules at once (optuna, scipy, torch), while the driver goes on, then
waits to be handed the optimizer (:meth:`OptimizerProcess.load`). Each message is a frame: its length
(8 bytes), then a pickle; the optimizer itself is sent with cloudpickle (its space may hold the user's
objects). Pickle is safe here: the pipes join the driver to its own child and nothing else writes to
them; they are never a socket.

``suggest`` sends a request and waits for the answer (reading the pipe releases the interpreter lock);
``observe`` is sent without waiting (the pipe keeps the order). An exception the optimizer raises in the
child is raised in the driver at the next call that waits for an answer, with the child's traceback as
its cause. The child exits when its stdin closes, so it never outlives the driver (killed or crashed);
:meth:`OptimizerProcess.close` ends it (reaped on a thread of its own, killed after
:data:`CLOSE_TIMEOUT_S`), and so does a finalizer when the object is collected or the interpreter exits.

:class:`Offloaded` runs an optimizer that is set up in such a process. If the process cannot start, is
not handed the optimizer (it cannot be pickled, or unpickled there), or dies, it says so on stderr and
the optimizer goes on in the driver: the calls sent since the hand-over are replayed on the copy the
driver kept, which reproduces the child's state (same seed, same calls, same suggestions).
"""

from __future__ import annotations

import pickle
import signal
import struct
import subprocess
import sys
import threading
import traceback
import weakref
from collections.abc import Sequence
from typing import IO, Any

from unison.optimizers.base import Optimizer

__all__ = ["OptimizerProcess", "Offloaded", "OptimizerProcessGone", "ChildTraceback"]

CLOSE_TIMEOUT_S = 2.0  # how long close() waits for the child to exit before killing it
_LENGTH = struct.Struct("!Q")


class OptimizerProcessGone(RuntimeError):
    """The optimizer's process cannot answer: it did not start, exited, or its pipes closed."""


class ChildTraceback(Exception):
    """The cause of an exception raised in the optimizer's process: its traceback there, as text."""


def write_frame(stream: IO[bytes], message: Any) -> None:
    """Send ``message`` (pickled) as one frame."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    """The next frame's message; ``EOFError`` when the stream ended (between frames or inside one)."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the stream ended")
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the stream ended inside a message")
    return pickle.loads(data)


def error_reply(exc: BaseException) -> tuple[Any, ...]:
    """The reply that carries ``exc`` to the driver: the exception pickled (``None`` if it cannot
    be), its type's name, message and traceback text."""
    try:
        blob: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - the text below still says what happened
        blob = None
    text = "".join(traceback.format_exception(exc))
    return ("error", blob, type(exc).__name__, str(exc), text)


def _end(proc: subprocess.Popen[bytes], reap_now: bool = False) -> None:
    """Close the child's stdin (it exits when it reads the end) and reap it on a thread of its own (a
    process that loaded torch takes ~30 ms to exit, which the experiment's end need not wait for), or
    here with ``reap_now``."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:  # (BrokenPipeError flushing what is left: the child is gone)
        pass
    if reap_now:
        _reap(proc)
        return
    try:
        threading.Thread(target=_reap, args=(proc,), name="unison-optimizer-reaper", daemon=True).start()
    except RuntimeError:  # the interpreter is exiting: no thread to wait on it, and nothing to keep
        proc.kill()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the child, killing it if it does not exit within :data:`CLOSE_TIMEOUT_S`; then close its
    stdout (after: a thread may be reading it, until the child has ended)."""
    try:
        proc.wait(CLOSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class OptimizerProcess:
    """A child Python process that runs one optimizer, started now; it imports ``preload``'s modules
    (``"module:function"`` calls the function too, to warm up; a module that is missing is skipped:
    the optimizer's own call then says what is missing) before it reads :meth:`load`'s optimizer.
    Calls are made one at a time (a lock keeps them so)."""

    def __init__(self, preload: Sequence[str] = ()) -> None:
        # A session of its own: Ctrl-C in the terminal reaches the driver, which closes the child.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unison.optimizers.process_child", *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.gone: str | None = None  # why the process cannot answer, once it cannot
        self.loaded = False  # whether it was handed an optimizer (load)
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _end, self.proc)

    def load(self, optimizer: Optimizer) -> None:
        """Hand ``optimizer`` (set up) over to the process, which answers the calls from now on.
        :class:`OptimizerProcessGone` if it cannot take it (the error, the child's, says why)."""
        import cloudpickle

        try:
            blob = cloudpickle.dumps(optimizer)
        except Exception as exc:  # noqa: BLE001 - a lock, a generator...: it stays in the driver
            raise OptimizerProcessGone(f"{optimizer!r} cannot be pickled for its process: {exc}") from exc
        try:
            self._request("load", (list(sys.path), blob))
            self.loaded = True
        except OptimizerProcessGone:
            raise
        except Exception as exc:  # noqa: BLE001 - raised by the child's unpickling
            raise OptimizerProcessGone(f"the optimizer's process (pid {self.pid}) could not load "
                                       f"{optimizer!r}: {type(exc).__name__}: {exc}") from exc

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        """The optimizer's ``suggest(trial_number)``, computed in the process."""
        return self._request("suggest", trial_number)

    def setup(self, space: dict[str, Any], mode: str | list[str], seed: int | None) -> None:
        """Send the optimizer's ``setup`` without waiting (an exception it raises comes back at the next
        call that waits for an answer)."""
        with self._lock:
            self._send(("setup", (space, mode, seed)))

    def observe(self, trial_number: int, hparams: dict[str, Any], value: Any, status: str) -> None:
        """Send the optimizer's ``observe`` without waiting; an exception it raises comes back at the
        next call that waits for an answer."""
        with self._lock:
            self._send(("observe", (trial_number, hparams, value, status)))

    def close(self) -> None:
        """End the process (killed if it does not exit within :data:`CLOSE_TIMEOUT_S`); raise the
        exception a last ``observe`` raised there, if no call raised it yet. Again: nothing. A process
        never handed an optimizer is killed at once (it may still be importing torch: nothing to wait for)."""
        if self.gone is not None:
            return
        if not self.loaded:
            self.gone = "it was closed"
            self.proc.kill()
            self._finalizer()
            return
        try:
            self._request("close", None)
        except OptimizerProcessGone:
            pass
        finally:
            self.gone = "it was closed"
            self._finalizer()

    def _request(self, op: str, arg: Any) -> Any:
        with self._lock:
            self._send((op, arg))
            try:
                assert self.proc.stdout is not None
                reply = read_frame(self.proc.stdout)
            except EOFError:
                raise self._lost("closed its output") from None
            except BaseException:  # (Ctrl-C inside a frame) the stream is out of step from here on
                self._lost("was interrupted")
                raise
        if reply[0] == "ok":
            return reply[1]
        raise self._child_error(*reply[1:])

    def _send(self, message: Any) -> None:
        if self.gone is not None:
            raise OptimizerProcessGone(f"the optimizer's process (pid {self.pid}) is gone: {self.gone}")
        try:
            assert self.proc.stdin is not None
            write_frame(self.proc.stdin, message)
        except (BrokenPipeError, ValueError):  # (ValueError: the pipe is closed)
            raise self._lost("stopped reading its input") from None

    def _lost(self, what: str) -> OptimizerProcessGone:
        """The process cannot answer any more: end it and say how it ended."""
        if self._finalizer.detach() is not None:
            _end(self.proc, reap_now=True)  # (its exit status says how it ended)
        code = self.proc.returncode
        if code is not None and code < 0:
            how = f"{what}: killed by {signal.Signals(-code).name}"
        elif code is not None:
            how = f"{what}: exit code {code}"
        else:
            how = what
        self.gone = how
        return OptimizerProcessGone(f"the optimizer's process (pid {self.pid}) {how}")

    def _child_error(self, blob: bytes | None, name: str, message: str, text: str) -> BaseException:
        exc: Any = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except Exception:  # noqa: BLE001 - an exception type the driver cannot rebuild: its text
                exc = None
        if not isinstance(exc, BaseException):
            exc = RuntimeError(f"{name}: {message}")
        exc.__cause__ = ChildTraceback(f"raised in the optimizer's process (pid {self.pid}):\n{text}")
        return exc


class Offloaded(Optimizer):
    """``local`` (an optimizer that is set up) run in ``process``, handed over at the first call; in
    the driver when ``process`` is ``None`` or fails (see the module's docstring). A pickled copy keeps
    ``local`` and the calls it has not seen, not the process: it goes on in-process.

    ``history``: calls ``local`` has not seen yet, made elsewhere (``("setup", (space, mode, seed))``,
    ``("suggest", (number, hparams))`` with the hyperparameters given then, ``("observe", args)``); they
    are replayed on the process at the hand-over, each suggestion checked against the one given (a
    difference is reported on stderr), or on ``local`` when it goes on in the driver."""

    def __init__(self, local: Optimizer, process: OptimizerProcess | None,
                 history: Sequence[tuple[str, Any]] = ()) -> None:
        self.local, self.process = local, process
        self.adaptive = local.adaptive
        self.loaded = False
        # sent to the process (or made elsewhere, the history) and not seen by local
        self.calls: list[tuple[str, Any]] = list(history)

    def hand_over(self) -> None:
        """Send ``local`` to the process now (the first call does otherwise), then the history; on
        failure it stays here."""
        if self.process is not None and not self.loaded:
            try:
                self.process.load(self.local)
                for op, arg in self.calls:
                    self._send_history(self.process, op, arg)
                self.loaded = True
            except OptimizerProcessGone as exc:
                self._fall_back(exc)

    def _send_history(self, process: OptimizerProcess, op: str, arg: Any) -> None:
        if op == "setup":
            process.setup(*arg)
        elif op == "observe":
            process.observe(*arg)
        else:
            number, given = arg if isinstance(arg, tuple) else (arg, None)
            hparams = process.suggest(number)
            if given is not None and hparams != given:
                print(f"unison: trial {number} ran with {given!r}, which {self.local!r} would have "
                      f"suggested as {hparams!r}; it learns from the latter", file=sys.stderr)

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        self.hand_over()
        if self.process is not None:
            try:
                hparams = self.process.suggest(trial_number)
                self.calls.append(("suggest", trial_number))
                return hparams
            except OptimizerProcessGone as exc:
                self._fall_back(exc)
        self._replay()
        return self.local.suggest(trial_number)

    def observe(self, trial_number: int, hparams: dict[str, Any], value: float | list[float] | None,
                status: str) -> None:
        args = (trial_number, hparams, value, status)
        if self.process is not None and self.loaded:
            try:
                self.process.observe(*args)
                self.calls.append(("observe", args))
                return
            except OptimizerProcessGone as exc:
                self._fall_back(exc)
        self._replay()
        self.local.observe(*args)

    def close(self) -> None:
        """End the process (see :meth:`OptimizerProcess.close`), then ``local``'s own :meth:`close`."""
        process, self.process = self.process, None
        try:
            if process is not None:
                process.close()
        finally:
            self.local.close()

    def _fall_back(self, exc: OptimizerProcessGone) -> None:
        """Go on in the driver (the caller replays the calls the process was sent)."""
        process, self.process = self.process, None
        if process is not None:
            print(f"unison: {self.local!r} goes on in the driver's process ({exc})", file=sys.stderr)
            try:
                process.close()
            except Exception:  # noqa: BLE001 - the replay below raises what local raises
                pass

    def _replay(self) -> None:
        """Make ``local`` what the process was: the same calls, in the same order."""
        calls, self.calls = self.calls, []
        for op, arg in calls:
            if op == "setup":
                self.local.setup(*arg)
            elif op == "suggest":
                self.local.suggest(arg[0] if isinstance(arg, tuple) else arg)
            else:
                self.local.observe(*arg)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "process": None, "loaded": False}

    def __repr__(self) -> str:
        return f"Offloaded({self.local!r})"
