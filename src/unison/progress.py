"""Live progress of a search: a bar in a terminal, an updating line in Jupyter, plain lines in logs."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _fmt_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def describe(summary: dict[str, Any], metric: str) -> str:
    """One line: ``12/40 done · 2 running · 1 failed · 3 stopped · best accuracy=0.93 · 00:14``."""
    finished = summary["completed"] + summary["failed"] + summary["stopped"]
    parts = [f"{finished}/{summary['planned']} trials", f"{summary['running']} running"]
    if summary["failed"]:
        parts.append(f"{summary['failed']} failed")
    if summary["stopped"]:
        parts.append(f"{summary['stopped']} stopped")
    if summary["best"] is not None:
        parts.append(f"best {metric}={summary['best']:.6g}")
    parts.append(_fmt_elapsed(summary["elapsed"]))
    return " · ".join(parts)


class NoProgress:
    """Shows nothing."""

    def start(self, title: str) -> None: ...

    def update(self, summary: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any], message: str = "") -> None: ...


class PlainProgress(NoProgress):
    """For logs and pipes: a plain line when something changes, at most every ``every`` seconds."""

    def __init__(self, metric: str, stream: TextIO, every: float = 5.0) -> None:
        self.metric, self.stream, self.every = metric, stream, every
        self._last_time = 0.0
        self._last_line = ""

    def start(self, title: str) -> None:
        print(title, file=self.stream, flush=True)

    def update(self, summary: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last_time < self.every:
            return
        line = describe(summary, self.metric)
        if line.split(" · ")[:-1] != self._last_line.split(" · ")[:-1]:
            print(line, file=self.stream, flush=True)
            self._last_line, self._last_time = line, now

    def close(self, summary: dict[str, Any], message: str = "") -> None:
        print(describe(summary, self.metric), file=self.stream, flush=True)
        if message:
            print(message, file=self.stream, flush=True)


class TerminalProgress(NoProgress):
    """A rich progress bar, redrawn in place on a terminal."""

    def __init__(self, metric: str, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.metric = metric
        # Bound to the real stream now: trial output captured in this process must not reach the bar.
        self.console = Console(file=stream)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, transient=False,
            refresh_per_second=8,
        )
        self.task: Any = None

    def start(self, title: str) -> None:
        self.console.print(title)
        self.task = self.bar.add_task("search", total=None, status="")
        self.bar.start()

    def update(self, summary: dict[str, Any]) -> None:
        finished = summary["completed"] + summary["failed"] + summary["stopped"]
        status = describe(summary, self.metric).split(" · ", 1)[1]
        self.bar.update(self.task, completed=finished, total=summary["planned"], status=status)

    def close(self, summary: dict[str, Any], message: str = "") -> None:
        self.update(summary)
        self.bar.stop()
        if message:
            self.console.print(message)


class NotebookProgress(NoProgress):
    """An HTML line in a Jupyter output cell, updated in place."""

    def __init__(self, metric: str) -> None:
        from IPython.display import HTML, display

        self.metric, self._html = metric, HTML
        self._handle = display(HTML("starting…"), display_id=True)
        self._last = 0.0

    def _render(self, summary: dict[str, Any]) -> Any:
        finished = summary["completed"] + summary["failed"] + summary["stopped"]
        import html

        return self._html(
            f"<progress value='{finished}' max='{summary['planned']}' style='width:30em'></progress> "
            f"<code>{html.escape(describe(summary, self.metric))}</code>"
        )

    def start(self, title: str) -> None:
        print(title)

    def update(self, summary: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            self._handle.update(self._render(summary))

    def close(self, summary: dict[str, Any], message: str = "") -> None:
        self._handle.update(self._render(summary))
        if message:
            print(message)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def make_progress(enabled: bool | None, metric: str) -> NoProgress:
    """``None`` picks by where output goes: notebook, terminal (TTY), or plain lines."""
    if enabled is False:
        return NoProgress()
    stream = sys.stdout
    if _in_notebook():
        return NotebookProgress(metric)
    if stream.isatty():
        return TerminalProgress(metric, stream)
    return PlainProgress(metric, stream)
