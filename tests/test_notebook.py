"""Progress and results where users look at them: a real Jupyter kernel, a terminal, a pipe.

The notebook tests execute cells in a real IPython kernel (ipykernel, driven by nbclient or
jupyter_client) and read the messages the kernel sends a front end: the progress must be one
output updated in place (``display_data`` then ``update_display_data`` with the same display id),
trial output must stay in the trial's files, and results must render as HTML.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from unison.driver.progress import NotebookProgress, PlainProgress

ANSI = re.compile(r"\x1b\[")

TRAIN = '''
import json, sys, time
import unison

def train(x, reporter):
    print("TRIAL-STDOUT-MARKER", x)
    print("TRIAL-STDERR-MARKER", file=sys.stderr)
    for step in range(3):
        time.sleep(0.04)
        reporter.report(step=step, score=x * (step + 1) / 3)
    return {"score": x, "other": 1.0 - x}

space = {"x": unison.uniform(0.0, 1.0)}
'''


# ------------------------------------------------------------------------------------- kernel helpers
def _kernel_manager(tmp_path: Path) -> Any:
    """A kernel manager for this interpreter's ipykernel, whatever kernels the user has installed."""
    pytest.importorskip("ipykernel")
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = tmp_path / "kernels" / "unison-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "unison test", "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="unison-test", kernel_spec_manager=specs)


def _execute_notebook(tmp_path: Path, cells: list[str]) -> tuple[Any, list[list[dict[str, Any]]]]:
    """Run the cells in a real kernel; return the executed notebook and each cell's iopub messages."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    messages: list[list[dict[str, Any]]] = [[] for _ in cells]

    class RecordingClient(nbclient.NotebookClient):
        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            # The kernel's send time, not ours: a loaded machine may hand us messages in bursts.
            sent = msg.get("header", {}).get("date")
            t = sent.timestamp() if hasattr(sent, "timestamp") else time.time()
            messages[cell_index].append({"msg_type": msg["msg_type"], "content": msg["content"], "t": t})
            return super().process_message(msg, cell, cell_index)

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = RecordingClient(nb, km=_kernel_manager(tmp_path), timeout=180,
                             resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb, messages


def _displays(msgs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    shown = [m["content"] for m in msgs if m["msg_type"] == "display_data"]
    updated = [m["content"] for m in msgs if m["msg_type"] == "update_display_data"]
    return shown, updated


def _streams(msgs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")


def _check_progress(cell: Any, msgs: list[dict[str, Any]], trials: int, best: float) -> None:
    """One progress output, updated in place, throttled, ending with every trial done; nothing else."""
    shown, updated = _displays(msgs)
    assert len(shown) == 1, shown
    display_id = shown[0]["transient"]["display_id"]
    assert display_id
    assert len(updated) >= 2, "the progress was never updated while the search ran"
    assert {u["transient"]["display_id"] for u in updated} == {display_id}
    # Throttled: not one message per driver tick (10/s) nor per event.
    times = [m["t"] for m in msgs if m["msg_type"] in ("display_data", "update_display_data")]
    assert len(times) <= (times[-1] - times[0]) / NotebookProgress.min_interval + 3
    assert "starting" in shown[0]["data"]["text/html"]
    # Nothing printed: no trial output, no warnings, no progress lines.
    assert _streams(msgs) == ""
    assert [o["output_type"] for o in cell.outputs] == ["display_data"]
    # The output the notebook keeps is the final state (nbclient applied the updates to it).
    final = cell.outputs[0]["data"]
    assert final == updated[-1]["data"]
    html, plain = final["text/html"], final["text/plain"]
    assert f"<progress value='{trials}' max='{trials}'" in html
    assert f"{trials}/{trials} trials · 0 running" in html
    assert f"best score={best:.6g}" in html and f"best score={best:.6g}" in plain
    assert "best trial" in plain.splitlines()[-1]
    # Intermediate states showed fewer trials done.
    counts = [int(re.search(r"(\d+)/\d+ trials", u["data"]["text/plain"]).group(1)) for u in updated]
    assert counts == sorted(counts) and counts[0] < trials


@pytest.mark.slow
def test_search_and_single_run_in_a_real_kernel(tmp_path: Path) -> None:
    runs = str(tmp_path / "runs")
    cells = [
        TRAIN,
        f"r = unison.run(train, unison.Search(space, metric='score', mode='max', trials=12, seed=3), "
        f"backend=unison.Local(workers=2), storage={runs!r})",
        "r",
        f"r2 = unison.run(train, unison.Search(space, metric='score', mode='max', trials=6, seed=3), "
        f"backend='inline', storage={runs!r})",
        f"single = unison.run(train, hparams={{'x': 0.25}}, storage={runs!r})\nsingle",
        textwrap.dedent(f"""
            def flaky(x):
                if x > 0.5:
                    raise ValueError("too big")
                return x
            try:
                unison.run(flaky, unison.Search(space, metric='value', trials=20, seed=3, max_failures=1),
                           backend='inline', storage={runs!r})
            except Exception as e:
                print("RAISED", type(e).__name__)
        """),
        "print(json.dumps({'best': [r.best.metric, r2.best.metric], 'path': [str(r.path), str(r2.path)],"
        " 'status': [list(r.trials.status), list(r2.trials.status)]}))",
    ]
    started = time.monotonic()
    nb, msgs = _execute_notebook(tmp_path, cells)
    print(f"notebook executed in {time.monotonic() - started:.1f}s")
    facts = json.loads(nb.cells[6].outputs[0]["text"])
    assert facts["status"] == [["completed"] * 12, ["completed"] * 6]

    # Local workers and the inline backend: progress in place, trial output captured per trial.
    _check_progress(nb.cells[1], msgs[1], 12, facts["best"][0])
    _check_progress(nb.cells[3], msgs[3], 6, facts["best"][1])
    for path in facts["path"]:
        logs = sorted(Path(path, "trials").glob("*/stdout.log"))
        assert logs and all("TRIAL-STDOUT-MARKER" in p.read_text() for p in logs)
        assert all("TRIAL-STDERR-MARKER" in p.read_text() for p in Path(path, "trials").glob("*/stderr.log"))

    # The search result renders as a table of its best trial.
    (result,) = nb.cells[2].outputs
    assert result["output_type"] == "execute_result"
    assert result["data"]["text/plain"].startswith("SearchResult(12 trials, status=completed")
    html = result["data"]["text/html"]
    assert "<table>" in html and "best trial" in html and "12 completed" in html
    assert f"<td>{facts['best'][0]:.6g}</td>" in html and "hparam x" in html and "metric other" in html

    # A single run runs in the calling process: its prints show as in plain Python, no progress.
    single = nb.cells[4]
    assert _displays(msgs[4]) == ([], [])
    assert "TRIAL-STDOUT-MARKER 0.25" in _streams(msgs[4]) and "TRIAL-STDERR-MARKER" in _streams(msgs[4])
    (shown,) = [o for o in single.outputs if o["output_type"] == "execute_result"]
    assert "<td>score</td><td>0.25</td>" in shown["data"]["text/html"]
    assert shown["data"]["text/plain"].startswith("RunResult(metrics={'score': 0.25")

    # An aborted search: the final state shows the failure and why it stopped.
    shown_flaky, updated_flaky = _displays(msgs[5])
    assert len(shown_flaky) == 1
    final = nb.cells[5].outputs[0]["data"]["text/plain"]
    assert "1 failed" in final and "aborted: 1 trial(s) failed" in final
    assert "ValueError: too big" in final  # the closing message names the error, not just the trial
    assert _streams(msgs[5]) == "RAISED SearchAborted\n"


@pytest.mark.slow
def test_interrupting_the_kernel_leaves_a_final_state_and_no_workers(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    km = _kernel_manager(tmp_path)
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        runs = str(tmp_path / "runs")
        msg_id = kc.execute(TRAIN + textwrap.dedent(f"""
            r = unison.run(train, unison.Search(space, metric='score', mode='max', trials=200, seed=1),
                           backend=unison.Local(workers=2), storage={runs!r}, name='stopme')
        """))
        updates: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        interrupted_at = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "update_display_data":
                updates.append(content)
                done = int(re.search(r"(\d+)/\d+ trials", content["data"]["text/plain"]).group(1))
                if done >= 4 and interrupted_at is None:
                    km.interrupt_kernel()
                    interrupted_at = time.monotonic()
            elif kind == "error":
                errors.append(content)
            elif kind == "status" and content["execution_state"] == "idle":
                break
        assert interrupted_at is not None, "the search never showed progress"
        assert [e["ename"] for e in errors] == ["KeyboardInterrupt"]
        final = updates[-1]["data"]["text/plain"]
        assert "interrupted: the experiment is resumable" in final
        assert "/200 trials" in final and "200/200" not in final

        (path,) = Path(runs).glob("stopme-*")
        assert json.loads((path / "experiment.json").read_text())["status"] == "interrupted"
        pids = {json.loads(line).get("pid") for line in (path / "journal.jsonl").read_text().splitlines()}
        pids.discard(None)
        assert pids
        kernel_pid = km.provisioner.process.pid
        assert kernel_pid not in pids  # trials ran in worker processes
        time.sleep(0.5)
        alive = [p for p in pids if _running(psutil, p)]
        assert alive == [], f"worker processes left running after the interrupt: {alive}"
        # The kernel is still usable.
        reply_id = kc.execute("1 + 1")
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != reply_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# ------------------------------------------------------------------------------- without a kernel
class _FakeHandle:
    def __init__(self, sent: list[dict[str, str]]) -> None:
        self.sent = sent

    def update(self, bundle: dict[str, str], raw: bool = False) -> None:
        assert raw
        self.sent.append(bundle)


def _running(psutil: Any, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _summary(completed: int, running: int = 1, elapsed: float = 1.0,
             best: float | None = 0.5) -> dict[str, Any]:
    return {"planned": 10, "completed": completed, "failed": 0, "stopped": 0, "running": running,
            "best": best, "elapsed": elapsed}


def test_notebook_progress_sends_changes_only_throttled_and_always_the_final_state() -> None:
    sent: list[dict[str, str]] = []

    def display(bundle: dict[str, str], raw: bool = False, display_id: bool = False) -> _FakeHandle:
        assert raw and display_id
        sent.append(bundle)
        return _FakeHandle(sent)

    progress = NotebookProgress("acc", display=display)
    progress.start("unison: <demo> -> /tmp/x")
    assert len(sent) == 1 and "&lt;demo&gt;" in sent[0]["text/html"]  # escaped
    progress.update(_summary(1))
    assert len(sent) == 1  # within min_interval of the first display
    progress._last -= 1.0
    progress.update(_summary(1))
    assert len(sent) == 2 and "1/10 trials" in sent[1]["text/plain"]
    progress._last -= 1.0
    progress.update(_summary(1))
    assert len(sent) == 2  # nothing changed: nothing sent
    progress.update(_summary(2))
    assert len(sent) == 3  # the interval counts from the last message sent
    progress.update(_summary(3))
    assert len(sent) == 3
    progress.close(_summary(10, running=0), "best trial 3: acc=0.5")
    assert len(sent) == 4  # the close is never throttled
    assert "10/10 trials · 0 running · best acc=0.5" in sent[-1]["text/plain"]
    assert sent[-1]["text/plain"].endswith("best trial 3: acc=0.5")
    assert "<progress value='10' max='10'" in sent[-1]["text/html"]


def test_plain_progress_prints_lines_when_something_changed() -> None:
    import io

    out = io.StringIO()
    progress = PlainProgress("acc", out, every=0.0)
    progress.start("title")
    progress.update(_summary(1, elapsed=1))
    progress.update(_summary(1, elapsed=2))  # only the time changed
    progress.update(_summary(2, elapsed=3))
    progress.close(_summary(10, running=0, elapsed=4), "done")
    lines = out.getvalue().splitlines()
    assert lines == ["title", "1/10 trials · 1 running · best acc=0.5 · 00:01",
                     "2/10 trials · 1 running · best acc=0.5 · 00:03",
                     "10/10 trials · 0 running · best acc=0.5 · 00:04", "done"]


SCRIPT = '''
import sys, time
import unison

def train(x):
    print("TRIAL-STDOUT-MARKER")
    time.sleep(0.01)
    return x

r = unison.run(train, unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=5, seed=0),
               backend="inline", storage=sys.argv[1])
print("BEST", r.best.metric)
'''


def test_search_output_to_a_pipe_is_plain_lines(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, check=True)
    assert not ANSI.search(out.stdout) and "\r" not in out.stdout
    assert "TRIAL-STDOUT-MARKER" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("unison: train: 5 trials on Inline()")
    assert any(line.startswith("5/5 trials · 0 running · best value=") for line in lines)
    assert lines[-2].startswith("best trial") and lines[-1].startswith("BEST")
    assert len(lines) <= 6


def test_search_on_a_terminal_draws_a_bar_in_place(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path)], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        proc.wait(timeout=60)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, text
    assert "TRIAL-STDOUT-MARKER" not in text
    assert "5/5" in text and "best value=" in text and "BEST" in text
    assert ANSI.search(text)  # rich drew (and redrew) the bar with terminal control codes


def test_terminal_ipython_is_not_taken_for_a_notebook(tmp_path: Path) -> None:
    pytest.importorskip("IPython")
    code = ("import unison.driver.progress as p; "
            "print('KIND', type(p.make_progress(None, 'm')).__name__, p._in_notebook())")
    out = subprocess.run([sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=nocolor",
                          "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "KIND PlainProgress False" in out.stdout, out.stdout + out.stderr


def test_progress_imports_no_ipython_outside_a_kernel() -> None:
    code = ("import sys, unison, unison.driver.progress as p\n"
            "p.make_progress(None, 'm')\n"
            "print([m for m in ('IPython', 'ipykernel', 'tqdm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ results as HTML
def test_results_render_as_html_tables(tmp_path: Path) -> None:
    import pandas as pd

    import unison

    def two(x):
        return {"acc": x, "lat": x * x}

    pareto = unison.run(two, unison.Search({"x": unison.uniform(0, 1)}, metric=["acc", "lat"],
                                           mode=["max", "min"], trials=4, seed=0),
                        backend="inline", storage=tmp_path, progress=False)
    html = pareto._repr_html_()
    assert f"{len(pareto.pareto)} trial(s) on the Pareto front" in html
    assert "<th>acc</th><th>lat</th><th>x</th>" in html and html.count("<tr>") == len(pareto.pareto) + 1

    def fit(dataset):
        return float(len(dataset.columns))

    data = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "y": [0.0, 1.0]})
    study = unison.Ablation(features=["a", "b"], label="y", metric="value", mode="max", repeats=1)
    ablation = unison.run(fit, study, data=data, backend="inline", storage=tmp_path, progress=False)
    html = ablation._repr_html_()
    assert "AblationResult" in html and "3 completed" in html and "most important" in html
    assert "<table" in html and "baseline" in html and "diff_ci_low" in html

    def nothing(x):
        raise ValueError("no")

    failed = unison.run(nothing, unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=2),
                        backend="inline", storage=tmp_path, progress=False)
    assert "no trial completed" in failed._repr_html_() and "2 failed" in failed._repr_html_()
