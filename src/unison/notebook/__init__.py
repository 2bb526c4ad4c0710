"""The distribution context in notebooks: one notebook, its cells chosen by the context it runs in.

``%load_ext unison`` (or ``import unison.notebook`` in a notebook) registers the cell magic
``%%context``: a cell that begins ``%%context search ablation`` runs only when the notebook's current
context is one of those, and otherwise prints one line, ``skipped: context is 'single'``. The current
context is the notebook's variable ``context`` (set in a papermill parameters cell), else the
environment variable ``UNISON_CONTEXT``, else ``"single"``. :func:`context_backend` answers the same
way for the backend (``backend``, ``UNISON_BACKEND``, ``"local"``), so the same cells run on a laptop
and on a cluster. ``unison notebook NOTEBOOK --context X`` (:mod:`unison.notebook.execute`) runs a
notebook with papermill.

Nothing of IPython is imported unless a notebook (an IPython shell) is running.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unison.backends.base import Backend

CONTEXTS = ("single", "search", "ablation", "distributed", "pipeline")
"""The contexts every notebook knows; a notebook declares more in a list ``unison_contexts``."""
CONTEXT_ENV, BACKEND_ENV = "UNISON_CONTEXT", "UNISON_BACKEND"
DEFAULT_CONTEXT, DEFAULT_BACKEND = "single", "local"


def _shell() -> Any:
    """The running IPython shell, or ``None`` (never importing IPython to find out)."""
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def _namespace() -> Mapping[str, Any]:
    shell = _shell()
    return shell.user_ns if shell is not None else {}


def known_contexts() -> tuple[str, ...]:
    """The context names a ``%%context`` cell may list: :data:`CONTEXTS`, then those the notebook
    declares in its variable ``unison_contexts`` (a list of names)."""
    extra = _namespace().get("unison_contexts") or ()
    if isinstance(extra, str) or not all(isinstance(name, str) and name for name in extra):
        raise TypeError(f"the notebook's variable unison_contexts declares more context names: it must be a "
                        f"list of non-empty strings, e.g. ['finetune'], got {extra!r}")
    return tuple(dict.fromkeys([*CONTEXTS, *extra]))


def _setting(variable: str, env: str, default: str) -> tuple[Any, str]:
    """The notebook's ``variable``, else the environment variable ``env``, else ``default``; with
    where it came from (for messages). ``None`` counts as unset (papermill's ``-p backend=null``)."""
    value = _namespace().get(variable)
    if value is not None:
        return value, f"the notebook's variable `{variable}`"
    if os.environ.get(env):
        return os.environ[env], f"the environment variable {env}"
    return default, "the default"


def current_context() -> str:
    """The notebook's current context: its variable ``context``, else ``UNISON_CONTEXT``, else
    ``"single"``. An unknown name raises a ``ValueError`` naming the known ones."""
    from unison._validate import unknown_name_error

    value, source = _setting("context", CONTEXT_ENV, DEFAULT_CONTEXT)
    if not isinstance(value, str):
        raise TypeError(f"the current context comes from {source}, which must be a context name such as "
                        f"'search', got {value!r}")
    known = known_contexts()
    if value not in known:
        error = unknown_name_error("context", value, known, "a name declared in unison_contexts = [...]")
        raise ValueError(f"{error} (the current context comes from {source})")
    return value


def context_backend() -> str | Backend:
    """The backend the notebook's parameters ask for, to pass as ``unison.run(..., backend=...)``: the
    notebook's variable ``backend`` (a backend name such as ``"local"``, ``"inline"`` or ``"spark"``,
    or a backend instance), else ``UNISON_BACKEND``, else ``"local"``. ``"spark"`` runs on the active
    SparkSession (or one built from the Spark configuration, e.g. ``PYSPARK_SUBMIT_ARGS``). An unknown
    name raises a ``ValueError`` naming the known ones."""
    from unison._validate import unknown_name_error
    from unison.backends import backend_names
    from unison.backends.base import Backend

    value, source = _setting("backend", BACKEND_ENV, DEFAULT_BACKEND)
    if isinstance(value, Backend):
        return value
    names = backend_names()
    if not isinstance(value, str) or value not in names:
        error = unknown_name_error("backend", value, names,
                                   "a backend instance such as unison.Local(workers=4)")
        raise ValueError(f"{error} (the backend comes from {source})")
    return value


def _wanted(line: str) -> list[str]:
    """The contexts a ``%%context`` line lists (space- or comma-separated), each checked."""
    from unison._validate import unknown_name_error

    known = known_contexts()
    names = [name for name in re.split(r"[\s,]+", line.strip()) if name]
    if not names:
        raise ValueError(f"%%context needs the contexts the cell runs in, e.g. `%%context search ablation`; "
                         f"the known ones: {list(known)}")
    for name in names:
        if name not in known:
            raise unknown_name_error("context", name, known, "a name declared in the notebook's list "
                                                             "unison_contexts")
    return names


def _run_cell(shell: Any, cell: str) -> Any:
    """Run ``cell`` in the notebook's namespace, as IPython would; return its last expression's value
    (the magic's result, which the notebook displays). Its exceptions propagate, failing the cell."""
    __tracebackhide__ = True  # noqa: F841 - IPython leaves this frame out of tracebacks
    source = shell.transform_cell(cell)
    filename = shell.compile.cache(source, shell.execution_count, raw_code=cell)
    tree = ast.parse(source, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), shell.user_global_ns, shell.user_ns)
    if last is None:
        return None
    value = eval(compile(ast.Expression(last.value), filename, "eval"), shell.user_global_ns, shell.user_ns)
    return None if source.rstrip().endswith(";") else value  # a trailing ; hides it, as in any cell


def context_cell(shell: Any, line: str, cell: str) -> Any:
    """``%%context NAME ...``: run ``cell`` if the current context is among the names, else print
    ``skipped: context is '...'``."""
    __tracebackhide__ = True  # noqa: F841
    wanted = _wanted(line)
    current = current_context()
    if current not in wanted:
        print(f"skipped: context is {current!r}")
        return None
    return _run_cell(shell, cell)


def load_ipython_extension(ipython: Any) -> None:
    """Register the cell magic ``%%context`` with the IPython shell ``ipython`` (``%load_ext unison``)."""

    def context(line: str, cell: str) -> Any:
        __tracebackhide__ = True  # noqa: F841
        return context_cell(ipython, line, cell)

    context.__doc__ = (
        "%%context NAME [NAME ...]: run this cell only in these distribution contexts.\n\n"
        "The current context is the notebook's variable `context` (a papermill parameter), else the\n"
        f"environment variable {CONTEXT_ENV}, else {DEFAULT_CONTEXT!r}. Known contexts:\n"
        f"{', '.join(CONTEXTS)}, and those the notebook declares in `unison_contexts = [...]`.\n"
        "A skipped cell prints `skipped: context is '<current>'`.")
    ipython.register_magic_function(context, magic_kind="cell", magic_name="context")


if (_running := _shell()) is not None:  # `import unison.notebook` in a notebook registers the magic
    load_ipython_extension(_running)
