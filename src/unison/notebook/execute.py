"""``unison notebook NOTEBOOK --context X``: run a notebook with papermill, its parameters injected.

The kernel inherits :data:`~unison.driver.experiment.NOTEBOOK_ENV`, which describes the run (the
notebook, its parameters, and a file to list experiments in): every experiment the notebook makes
records the notebook and its parameters in ``experiment.json`` and lists its directory in that file,
and the executed notebook is then written into each of those directories (for a pipeline's stage: the
pipeline's directory) and to ``--output``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import tempfile
from argparse import Namespace
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unison.driver.experiment import NOTEBOOK_ENV
from unison.notebook import BACKEND_ENV, CONTEXT_ENV

INSTALL_HINT = "pip install 'unison[notebook]'"


class NotebookError(Exception):
    """The notebook could not be run at all (no papermill, no such file or kernel)."""


@dataclass
class Executed:
    """What running a notebook did: the experiments it made, where the executed notebook was written,
    its cells (as nbformat's JSON), and papermill's ``PapermillExecutionError`` if a cell failed (the run
    stopped there)."""

    experiments: list[Path] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    cells: list[dict[str, Any]] = field(default_factory=list)
    failure: Any = None


def parse_parameters(pairs: list[str]) -> dict[str, Any]:
    """``["trials=4", "name=churn"]`` as ``{"trials": 4, "name": "churn"}``: a value that parses as JSON
    is that value (``4``, ``0.5``, ``true``, ``null``, ``[1, 2]``), any other is the string itself."""
    parameters: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key.isidentifier():
            raise ValueError(f"-p takes KEY=VALUE, KEY a Python name, e.g. -p trials=8; got {pair!r}")
        try:
            parameters[key] = json.loads(text)
        except ValueError:
            parameters[key] = text
    return parameters


def _papermill() -> Any:
    try:
        import papermill
    except ImportError as exc:
        raise NotebookError(f"`unison notebook` runs notebooks with papermill, which is not installed: "
                            f"{INSTALL_HINT}") from exc
    return papermill


def _defaults(papermill: Any, notebook: Path) -> dict[str, Any]:
    """The values the notebook's parameters cell sets, where they are literals."""
    found: dict[str, Any] = {}
    for name, parameter in papermill.inspect_notebook(str(notebook)).items():
        try:
            found[name] = ast.literal_eval(parameter["default"])
        except (ValueError, SyntaxError, TypeError):
            found[name] = parameter["default"]  # an expression: its source
    return found


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (the kernel inherits it), restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _made(record: Path) -> list[Path]:
    """The experiment directories listed in ``record``, each as its outermost experiment directory (a
    pipeline's stage as the pipeline's), once each."""
    lines = record.read_text(encoding="utf-8").splitlines() if record.is_file() else []
    tops = []
    for path in (Path(line) for line in lines if line):
        outer = [p for p in path.parents if (p / "experiment.json").is_file()]
        tops.append(outer[-1] if outer else path)
    return [p for p in dict.fromkeys(tops) if p.is_dir()]


def run_notebook(notebook: str | Path, parameters: dict[str, Any], output: str | Path | None = None,
                 kernel: str | None = None, cwd: str | Path | None = None, echo: bool = True) -> Executed:
    """Execute ``notebook`` with papermill, ``parameters`` injected after its parameters cell; write the
    executed notebook into each experiment directory it made and to ``output``. A failing cell does
    not raise: it is :attr:`Executed.failure`. ``echo``: the cells' printed output goes to this
    process's stdout and stderr as it comes."""
    papermill = _papermill()
    source = Path(notebook).absolute()
    if not source.is_file():
        raise NotebookError(f"no notebook {str(notebook)!r} (from {Path.cwd()})")
    with tempfile.TemporaryDirectory(prefix="unison-notebook-") as scratch:
        record, executed = Path(scratch) / "experiments.txt", Path(scratch) / source.name
        origin = {"path": str(source), "name": source.name,
                  "parameters": {**_defaults(papermill, source), **parameters}, "record": str(record)}
        settings = {NOTEBOOK_ENV: json.dumps(origin, default=str)}
        for name, env in (("context", CONTEXT_ENV), ("backend", BACKEND_ENV)):
            if isinstance(parameters.get(name), str):
                settings[env] = parameters[name]
        outcome = Executed()
        with _environment(settings):
            try:
                papermill.execute_notebook(str(source), str(executed), parameters=parameters,
                                           kernel_name=kernel, progress_bar=False, cwd=cwd,
                                           stdout_file=sys.stdout if echo else None,
                                           stderr_file=sys.stderr if echo else None)
            except papermill.PapermillExecutionError as exc:
                outcome.failure = exc
            except Exception as exc:
                raise _explained(exc, kernel) from exc
        outcome.experiments = _made(record)
        targets = [p / source.name for p in outcome.experiments] + ([Path(output)] if output else [])
        if executed.is_file():
            outcome.cells = json.loads(executed.read_text(encoding="utf-8")).get("cells", [])
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(executed, target)
                outcome.written.append(target)
    return outcome


def _explained(exc: Exception, kernel: str | None) -> Exception:
    """A :class:`NotebookError` saying what to do for the errors a user can fix, else ``exc``."""
    kind = type(exc).__name__
    if kind == "NoSuchKernel":
        return NotebookError(
            f"no Jupyter kernel named {str(getattr(exc, 'name', kernel))!r} (the notebook's kernelspec, or "
            f"--kernel): pass --kernel NAME with one `jupyter kernelspec list` shows, or install this "
            f"Python's with `python -m ipykernel install --user` (needs {INSTALL_HINT})")
    if kind == "DeadKernelError":
        return NotebookError(f"the notebook's kernel died while running it (out of memory, or a crash in "
                             f"native code): {exc}")
    return exc


def describe_failure(outcome: Executed, notebook: str | Path) -> str:
    """The message for a failed cell: which cell (as numbered in ``notebook``, papermill's injected
    parameters not counted), its first lines, the error's name and message, and where the executed
    notebook (with the traceback) is."""
    failure, cells = outcome.failure, outcome.cells
    index = failure.cell_index
    injected = sum("injected-parameters" in (c.get("metadata", {}).get("tags") or []) for c in cells[:index])
    ran = f" (In [{failure.exec_count}])" if failure.exec_count is not None else ""
    error = f"{failure.ename}: {failure.evalue}"
    if not failure.evalue and index < len(cells):  # an error IPython only printed (a magic's UsageError)
        printed = [o.get("text", "") for o in cells[index].get("outputs", []) if o.get("name") == "stderr"]
        lines = "".join("".join(t) if isinstance(t, list) else t for t in printed).strip().splitlines()
        error = lines[-1] if lines else error
    source = [line for line in str(failure.source).splitlines() if line.strip()]
    head = "\n".join(f"    {line}" for line in source[:3]) + ("\n    ..." if len(source) > 3 else "")
    where = ("the executed notebook, with the traceback: " + ", ".join(map(str, outcome.written))
             if outcome.written else "pass -o OUT.ipynb to keep the executed notebook, with the traceback")
    return (f"error: cell {index + 1 - injected}{ran} of {Path(notebook).name} failed: {error}\n"
            f"  the cell:\n{head}\n  {where}")


def command(args: Namespace) -> int:
    """``unison notebook``: run the notebook, say where it was written; 1 if a cell failed."""
    try:
        parameters = parse_parameters(args.parameter or [])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in ("context", "backend"):
        if getattr(args, name) is not None:
            parameters[name] = getattr(args, name)
    try:
        outcome = run_notebook(args.notebook, parameters, args.output, args.kernel, args.cwd)
    except NotebookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if outcome.failure is not None:
        print(describe_failure(outcome, args.notebook), file=sys.stderr)
        return 1
    for target in outcome.written:
        print(f"executed notebook written to {target}")
    if not outcome.experiments:
        print("the notebook made no experiment" + ("" if args.output else ": pass -o OUT.ipynb to keep the "
                                                                            "executed notebook"))
    return 0
