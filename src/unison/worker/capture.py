"""A trial's ``print`` into its logs while unison's own threads keep printing to the console.

``sys.stdout`` and ``sys.stderr`` become a :class:`RoutedStream` while a trial's output is captured.
Writes from a thread marked with :func:`mark_console_thread` (the driver's callback thread, on the
inline backend where trials run in the driver's process) go to the stream that was there before;
every other write goes to the trial's log. The routed streams are made once per console stream and
kept, never dropped: CPython's ``print`` holds ``sys.stdout`` without a reference while it writes, so
swapping in a fresh object per trial and letting it go could free it under another thread's print.
"""

from __future__ import annotations

import io
import sys
import threading
from typing import TextIO

_CONSOLE_THREADS: set[int] = set()
_ROUTED: dict[tuple[str, int], RoutedStream] = {}  # by role ("stdout", "stderr") and console stream
_MAKING = threading.Lock()


def mark_console_thread() -> None:
    """Send what the calling thread prints to the console, never into a trial's captured log."""
    _CONSOLE_THREADS.add(threading.get_ident())


def unmark_console_thread() -> None:
    """Undo :func:`mark_console_thread` for the calling thread (before it ends)."""
    _CONSOLE_THREADS.discard(threading.get_ident())


class RoutedStream(io.TextIOBase):
    """Writes to ``target`` (a trial's log) when one is set and the writer is not a console thread,
    else to ``console``. Setting and clearing the target waits for a write under way."""

    def __init__(self, console: TextIO) -> None:
        self.console = console
        self._target: io.TextIOBase | None = None
        self._lock = threading.RLock()

    @classmethod
    def around(cls, console: TextIO, role: str) -> RoutedStream:
        """The one routed stream of ``role`` (``"stdout"``, ``"stderr"``) in front of ``console``
        (itself when it already is one). By role: where ``sys.stdout is sys.stderr`` (a notebook may
        do that), each still gets a stream, and a log, of its own."""
        if isinstance(console, RoutedStream):
            return console
        with _MAKING:
            routed = _ROUTED.get((role, id(console)))
            if routed is None or routed.console is not console:
                routed = _ROUTED[(role, id(console))] = cls(console)
            return routed

    def capture(self, target: io.TextIOBase | None) -> io.TextIOBase | None:
        """Route non-console writes to ``target`` from now on (``None``: to the console again);
        return the target it had."""
        with self._lock:
            previous, self._target = self._target, target
            return previous

    def _destination(self) -> TextIO | io.TextIOBase:
        if self._target is None or threading.get_ident() in _CONSOLE_THREADS:
            return self.console
        return self._target

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            return self._destination().write(text)

    def flush(self) -> None:
        with self._lock:
            self._destination().flush()

    def isatty(self) -> bool:
        return bool(self._destination().isatty())

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8" if self._target is not None else getattr(self.console, "encoding", "utf-8")


class OutputCapture:
    """``sys.stdout``/``sys.stderr`` routed into ``stdout``/``stderr`` until :meth:`close`."""

    def __init__(self, stdout: io.TextIOBase, stderr: io.TextIOBase) -> None:
        self._saved = sys.stdout, sys.stderr
        self._routed = RoutedStream.around(sys.stdout, "stdout"), RoutedStream.around(sys.stderr, "stderr")
        logs = stdout, stderr
        self._outer = [routed.capture(log) for routed, log in zip(self._routed, logs, strict=True)]
        sys.stdout, sys.stderr = self._routed

    def close(self) -> None:
        """Stop capturing; a write under way finishes first, later ones go where they went before."""
        for routed, outer in zip(self._routed, self._outer, strict=True):
            routed.capture(outer)
        sys.stdout, sys.stderr = self._saved
