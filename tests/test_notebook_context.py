"""The distribution context in notebooks: the ``%%context`` cell magic and ``unison.context_backend``.

The magic runs in IPython's real ``InteractiveShell`` (the shell a Jupyter kernel wraps): cells are
executed as a notebook would, the skip line is what the cell prints, errors are the cell's errors.
``tests/test_papermill.py`` runs the example notebook in a real kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

import unison
from unison.notebook import CONTEXTS

IPython = pytest.importorskip("IPython")
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh IPython shell with ``%load_ext unison`` run, and no UNISON_CONTEXT/UNISON_BACKEND set."""
    monkeypatch.delenv("UNISON_CONTEXT", raising=False)
    monkeypatch.delenv("UNISON_BACKEND", raising=False)
    InteractiveShell.clear_instance()
    ip = InteractiveShell.instance()
    result = ip.run_cell("%load_ext unison")
    assert result.success, result.error_in_exec
    yield ip
    InteractiveShell.clear_instance()  # later tests must not find a running shell


def run(shell: Any, capsys: pytest.CaptureFixture[str], source: str) -> tuple[Any, str]:
    """Run one cell; its result and what it printed."""
    capsys.readouterr()
    result = shell.run_cell(textwrap.dedent(source).strip("\n"))
    return result, capsys.readouterr().out


GUARDED = """
%%context search ablation
ran.append(globals().get("context"))
len(ran) * 10
"""


# --------------------------------------------------------------------------------------- the magic
def test_a_cell_for_other_contexts_is_skipped_with_one_line(
        shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, capsys, 'context = "single"\nran = []')
    result, out = run(shell, capsys, GUARDED)
    assert result.success
    assert out == "skipped: context is 'single'\n"
    assert shell.user_ns["ran"] == []
    assert result.result is None


def test_a_cell_for_the_current_context_runs_and_shows_its_last_value(
        shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, capsys, 'context = "ablation"\nran = []')
    result, out = run(shell, capsys, GUARDED)
    assert result.success, result.error_in_exec
    assert shell.user_ns["ran"] == ["ablation"]  # ran in the notebook's namespace
    assert result.result == 10  # the cell's last expression, displayed as its output
    assert "skipped" not in out and "10" in out
    # Names the cell defines are the notebook's, as in any cell; commas separate names too.
    result, _ = run(shell, capsys, "%%context single, ablation\nmade_here = ran[0].upper()")
    assert result.success and shell.user_ns["made_here"] == "ABLATION"
    result, _ = run(shell, capsys, "%%context ablation\nlen(ran);")  # a trailing ; shows nothing
    assert result.success and result.result is None


def test_the_context_comes_from_the_variable_then_the_environment_then_single(
        shell: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run(shell, capsys, "ran = []")
    assert run(shell, capsys, GUARDED)[1] == "skipped: context is 'single'\n"  # nothing set
    monkeypatch.setenv("UNISON_CONTEXT", "search")
    result, _ = run(shell, capsys, GUARDED)
    assert result.success and shell.user_ns["ran"] == [None]  # `context` is not defined: the cell saw None
    run(shell, capsys, 'context = "distributed"')  # the notebook's variable wins over the environment
    assert run(shell, capsys, GUARDED)[1] == "skipped: context is 'distributed'\n"
    run(shell, capsys, "context = None")  # papermill's -p context=null: unset
    assert run(shell, capsys, GUARDED)[0].success and len(shell.user_ns["ran"]) == 2


def test_an_unknown_context_fails_the_cell_with_did_you_mean(
        shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, capsys, 'context = "search"\nran = []')
    result, out = run(shell, capsys, "%%context serach\nran.append(1)")
    assert isinstance(result.error_in_exec, ValueError)
    message = str(result.error_in_exec)
    assert "unknown context 'serach': did you mean 'search'?" in message
    assert all(name in message for name in CONTEXTS)
    assert shell.user_ns["ran"] == []
    result, _ = run(shell, capsys, "%%context\nran.append(1)")
    assert isinstance(result.error_in_exec, ValueError) and "e.g. `%%context search ablation`" in str(
        result.error_in_exec)
    # The current context is checked too, and says where it came from.
    run(shell, capsys, 'context = "finetuen"')
    result, _ = run(shell, capsys, "%%context search\nran.append(1)")
    assert isinstance(result.error_in_exec, ValueError)
    assert "unknown context 'finetuen'" in str(result.error_in_exec)
    assert "the notebook's variable `context`" in str(result.error_in_exec)
    assert shell.user_ns["ran"] == []


def test_a_notebook_declares_more_contexts(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, capsys, 'unison_contexts = ["finetune"]\ncontext = "finetune"\nran = []')
    result, out = run(shell, capsys, "%%context finetune\nran.append(context)")
    assert result.success and shell.user_ns["ran"] == ["finetune"]
    assert run(shell, capsys, "%%context search\nran.append(2)")[1] == "skipped: context is 'finetune'\n"
    result, _ = run(shell, capsys, "%%context finetnue\nran.append(3)")
    assert "did you mean 'finetune'?" in str(result.error_in_exec)
    run(shell, capsys, 'unison_contexts = "finetune"')  # a string, not a list of names
    result, _ = run(shell, capsys, "%%context finetune\nran.append(4)")
    assert isinstance(result.error_in_exec, TypeError) and "list of non-empty strings" in str(
        result.error_in_exec)
    assert shell.user_ns["ran"] == ["finetune"]


def test_an_error_in_a_guarded_cell_fails_the_cell_and_its_traceback_shows_the_users_line(
        shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, capsys, 'context = "search"')
    result, out = run(shell, capsys, """
        %%context search
        x = 1
        y = x / 0
        """)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert "y = x / 0" in out  # the cell's own line, from IPython's cache of its source
    assert "_run_cell" not in out and "context_cell" not in out  # the magic's frames are hidden
    result, out = run(shell, capsys, "%%context search\nx = (")
    assert isinstance(result.error_in_exec, SyntaxError)


def test_magics_and_shell_syntax_work_inside_a_guarded_cell(
        shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    run(shell, capsys, 'context = "search"')
    result, out = run(shell, capsys, "%%context search\nvalue = %time 6 * 7\nvalue")
    assert result.success, result.error_in_exec
    assert result.result == 42 and "Wall time" in out


def test_importing_unison_notebook_in_a_shell_registers_the_magic() -> None:
    script = textwrap.dedent("""
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        assert not shell.run_cell("%%context single\\npass").success  # no such magic yet
        assert shell.run_cell("import unison.notebook").success
        result = shell.run_cell("%%context single\\nprint('RAN')")
        assert result.success, result.error_in_exec
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "RAN" in done.stdout


# --------------------------------------------------------------------------------- context_backend
def test_context_backend_reads_the_notebooks_parameter(shell: Any, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert unison.context_backend() == "local"
    monkeypatch.setenv("UNISON_BACKEND", "spark")
    assert unison.context_backend() == "spark"
    run(shell, capsys, 'backend = "inline"')
    assert unison.context_backend() == "inline"
    run(shell, capsys, "import unison\nbackend = unison.Local(workers=2)")
    assert unison.context_backend() is shell.user_ns["backend"]
    run(shell, capsys, 'backend = "dask"')
    known = r"unknown backend 'dask'.*'inline', 'local', 'ray', 'spark'.*variable `backend`"
    with pytest.raises(ValueError, match=known):
        unison.context_backend()
    run(shell, capsys, 'backend = "sprak"')
    with pytest.raises(ValueError, match="did you mean 'spark'"):
        unison.context_backend()


def test_a_notebook_search_runs_on_the_backend_its_parameters_name(
        shell: Any, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    run(shell, capsys, f"""
        import unison
        context, backend = "search", "inline"
        def train(x):
            return {{"value": x}}
        storage = {str(tmp_path)!r}
        """)
    result, _ = run(shell, capsys, """
        %%context search
        search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=3, seed=0)
        found = unison.run(train, search, backend=unison.context_backend(), storage=storage, progress=False)
        found
        """)
    assert result.success, result.error_in_exec
    found = shell.user_ns["found"]
    assert result.result is found and len(found.trials) == 3
    assert (found.path / "experiment.json").read_text().count('"backend": "Inline') == 1
    # No `unison notebook` around: experiment.json names no notebook.
    assert '"notebook"' not in (found.path / "experiment.json").read_text()


def test_context_backend_outside_a_notebook_and_import_unison_stays_light() -> None:
    script = textwrap.dedent("""
        import os, sys
        import unison
        assert unison.context_backend() == "local"
        os.environ["UNISON_BACKEND"] = "inline"
        assert unison.context_backend() == "inline"
        assert callable(unison.load_ipython_extension)
        heavy = [m for m in ("IPython", "papermill", "nbformat", "pandas", "torch") if m in sys.modules]
        assert not heavy, heavy
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("UNISON_BACKEND", "UNISON_CONTEXT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
