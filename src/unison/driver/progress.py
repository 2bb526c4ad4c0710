"""Live progress of a search: a bar in a terminal, an output updated in place in Jupyter, plain lines
in logs and pipes."""

from __future__ import annotations

import html
import sys
import time
import warnings
from typing import Any, TextIO


def _fmt_elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def finished_trials(summary: dict[str, Any]) -> int:
    """Trials that ended, less those replaced by a clone (which goes on in their place)."""
    return summary["completed"] + summary["failed"] + summary["stopped"] - summary.get("replaced", 0)


def describe(summary: dict[str, Any], metric: str) -> str:
    """One line: ``12/40 done · 2 running · 1 failed · 3 stopped · best accuracy=0.93 · 00:14``; a
    population (PBT) counts its members: ``2/8 trials · 4 running · 9 replaced by clones · ...``."""
    replaced = summary.get("replaced", 0)
    finished = finished_trials(summary)
    parts = [f"{finished}/{summary['planned']} trials", f"{summary['running']} running"]
    if summary["failed"]:
        parts.append(f"{summary['failed']} failed")
    if summary["stopped"] - replaced > 0:
        parts.append(f"{summary['stopped'] - replaced} stopped")
    if replaced:
        parts.append(f"{replaced} replaced by clones")
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
        finished = finished_trials(summary)
        status = describe(summary, self.metric).split(" · ", 1)[1]
        self.bar.update(self.task, completed=finished, total=summary["planned"], status=status)

    def close(self, summary: dict[str, Any], message: str = "") -> None:
        self.update(summary)
        self.bar.stop()
        if message:
            self.console.print(message)


class NotebookProgress(NoProgress):
    """One output in a Jupyter cell (title, bar, counts, best, elapsed, then the closing message),
    updated in place through its display id rather than printed line after line.

    The bundle carries ``text/plain`` next to ``text/html`` for front ends that do not render HTML.
    Updates are sent only when what they show changed, and at most every ``min_interval`` seconds;
    :meth:`close` always sends the final state.
    """

    min_interval = 0.2

    def __init__(self, metric: Any, display: Any = None) -> None:
        if display is None:
            from IPython.display import display
        self.metric, self._display = metric, display
        self._handle: Any = None
        self._title = ""
        self._sent = ""
        self._last = 0.0

    def _bundle(self, summary: dict[str, Any] | None, message: str = "") -> dict[str, str]:
        title = html.escape(self._title)
        lines = [self._title]
        body = [f"<div style='font-family:monospace'>{title}</div>"] if title else []
        if summary is None:
            lines.append("starting…")
            body.append("<progress style='width:30em'></progress> <code>starting…</code>")
        else:
            finished = finished_trials(summary)
            line = describe(summary, self.metric)
            lines.append(line)
            body.append(f"<progress value='{finished}' max='{summary['planned']}' style='width:30em'>"
                        f"</progress> <code>{html.escape(line)}</code>")
        if message:
            lines.append(message)
            body.append(f"<div style='font-family:monospace'>{html.escape(message)}</div>")
        return {"text/plain": "\n".join(x for x in lines if x),
                "text/html": "<div class='unison-progress'>" + "".join(body) + "</div>"}

    def _show(self, bundle: dict[str, str]) -> None:
        if self._handle is None:
            self._handle = self._display(bundle, raw=True, display_id=True)
        else:
            self._handle.update(bundle, raw=True)
        self._sent, self._last = bundle["text/html"], time.monotonic()

    def start(self, title: str) -> None:
        self._title = title
        self._show(self._bundle(None))

    def update(self, summary: dict[str, Any]) -> None:
        if time.monotonic() - self._last < self.min_interval:
            return
        bundle = self._bundle(summary)
        if bundle["text/html"] != self._sent:
            self._show(bundle)

    def close(self, summary: dict[str, Any], message: str = "") -> None:
        self._show(self._bundle(summary, message))


def _quiet_tqdm_auto() -> None:
    """Import ``tqdm.auto`` without its "IProgress not found" warning.

    optuna imports ``tqdm.auto`` (for its own progress bar, which unison never shows); in a kernel
    without ipywidgets that import warns on stderr, in the cell of the user's first search. Called
    when this module is imported (before a search builds its optimizer), in a kernel only.
    """
    if "tqdm.auto" in sys.modules:
        return
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="IProgress not found")
            import tqdm.auto  # noqa: F401
    except Exception:  # tqdm missing or broken: optuna will say so itself
        pass


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel's shell or a subclass such as Colab's),
    not a terminal IPython. Imports nothing: outside a kernel IPython is never loaded here."""
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    ipython = sys.modules.get("IPython")
    if zmqshell is None or ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and isinstance(shell, zmqshell.ZMQInteractiveShell)


if _in_notebook():
    _quiet_tqdm_auto()


def make_progress(enabled: bool | None, metric: str | list[str]) -> NoProgress:
    """``None`` picks by where output goes: notebook, terminal (TTY), or plain lines."""
    metric = metric if isinstance(metric, str) else "/".join(metric)
    if enabled is False:
        return NoProgress()
    stream = sys.stdout
    if _in_notebook():
        return NotebookProgress(metric)
    if stream.isatty():
        return TerminalProgress(metric, stream)
    return PlainProgress(metric, stream)
