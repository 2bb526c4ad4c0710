"""A trial's captured output (``unison.worker.capture``): the trial's writes into its logs, a console
thread's to the console, and nothing into a log once the capture ended."""

from __future__ import annotations

import io
import sys
import threading

from unison.worker.capture import OutputCapture, mark_console_thread, unmark_console_thread


def test_stdout_and_stderr_go_to_their_own_logs_even_when_they_are_one_stream(monkeypatch) -> None:
    console = io.StringIO()
    monkeypatch.setattr(sys, "stdout", console)
    monkeypatch.setattr(sys, "stderr", console)  # as some notebooks and tools set them up
    out, err = io.StringIO(), io.StringIO()
    capture = OutputCapture(out, err)
    print("to stdout")
    print("to stderr", file=sys.stderr)
    capture.close()
    late = sys.stdout
    print("after", file=late)  # a writer that kept the routed stream: the console now
    assert (out.getvalue(), err.getvalue()) == ("to stdout\n", "to stderr\n")
    assert console.getvalue() == "after\n"
    assert sys.stdout is console and sys.stderr is console


def test_a_console_thread_prints_to_the_console_while_a_trial_is_captured(monkeypatch) -> None:
    console = io.StringIO()
    monkeypatch.setattr(sys, "stdout", console)
    out, err = io.StringIO(), io.StringIO()

    def callback_thread() -> None:
        mark_console_thread()
        try:
            print("from the callback thread")
        finally:
            unmark_console_thread()

    capture = OutputCapture(out, err)
    print("from the trial")
    thread = threading.Thread(target=callback_thread)
    thread.start()
    thread.join()
    capture.close()
    assert out.getvalue() == "from the trial\n"
    assert console.getvalue() == "from the callback thread\n"


def test_a_nested_capture_gives_the_outer_one_its_logs_back(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    outer, inner = io.StringIO(), io.StringIO()
    first = OutputCapture(outer, io.StringIO())
    second = OutputCapture(inner, io.StringIO())
    print("inner")
    second.close()
    print("outer")
    first.close()
    assert (outer.getvalue(), inner.getvalue()) == ("outer\n", "inner\n")
