"""The package's architecture, checked on its source: no import cycle, imports only downward, short functions.

Every module of ``src/unison`` is parsed with :mod:`ast` (nothing is imported). An import counts
wherever it is written, at module level or inside a function or method, since either runs; an import
under ``if TYPE_CHECKING:`` (or ``if typing.TYPE_CHECKING:``) does not, since it never runs. Imports
made by name at run time (``importlib.import_module``, the lazy public names of ``unison/__init__.py``)
are not seen. ``from unison.a import b`` counts as importing the module ``unison.a.b`` when there is
one, else ``unison.a``.

The layers, lowest first, are ARCHITECTURE.md's. A module belongs to the layer whose prefix is the
longest that matches its dotted name; a package's ``__init__`` belongs to its package's layer, except
the top package ``unison``, which is the front. A module may import modules of its own layer or of a
lower one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80

# (layer name, module prefixes), lowest first
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("unison._version",
              "unison.errors", "unison._validate", "unison.space", "unison.protocol", "unison.launch",
              "unison.payload", "unison.gpus", "unison._bulk")),
    ("parts", ("unison.worker.metrics", "unison.worker.logs", "unison.worker.generators",
               "unison.worker.reporter", "unison.worker.checkpoints",
               "unison.worker.checkpoint_storage", "unison.worker.checkpoint_ship", "unison.worker.rank",
               "unison.worker.ctx", "unison.trialfiles",
               "unison.frameworks.detect", "unison.optimizers", "unison.schedulers")),
    ("frameworks", ("unison.frameworks",)),
    ("worker", ("unison.worker",)),
    ("backends", ("unison.backends", "unison.spark_standalone")),
    ("records", ("unison.driver.store", "unison.driver.server", "unison.driver.progress")),
    ("results", ("unison.result", "unison.curves", "unison.optuna_study", "unison.plots",
                 "unison.report", "unison.loading")),
    ("driver", ("unison.driver", "unison.callbacks", "unison.mlflow_logger",
                "unison.tensorboard_logger")),
    ("contexts", ("unison.contexts",)),
    ("front", ("unison.api", "unison.cli", "unison.demo", "unison.notebook", "unison")),
]


@dataclass
class Module:
    name: str
    path: Path
    # (line, imported unison module), in source order
    imports: list[tuple[int, str]] = field(default_factory=list)


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, modules: dict[str, Module]) -> str | None:
    """The longest known module that ``name`` is or lies inside, None outside unison."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: Module, modules: dict[str, Module]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = {_known(n, modules) for n in names if n == "unison" or n.startswith("unison.")}
    return {t for t in found if t is not None and t != module.name}


@cache
def modules() -> dict[str, Module]:
    """Every module of src/unison by dotted name, with the unison modules it imports."""
    found = {_module_name(p): Module(_module_name(p), p) for p in sorted((SRC / "unison").rglob("*.py"))}
    for module in found.values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in _import_nodes(tree):
            module.imports.extend((node.lineno, t) for t in sorted(_targets(node, module, found)))
        module.imports.sort()
    return found


def layer_of(name: str) -> int | None:
    """The index in LAYERS of the layer of module ``name``: its longest matching prefix."""
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or (prefix != "unison" and name.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle through the strongly connected ``component``: a path from its first module back to it."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        here = queue.pop(0)
        for there in sorted(graph[here] & component):
            if there == start:
                return paths[here] + [start]
            if there not in paths:
                paths[there] = paths[here] + [there]
                queue.append(there)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    missing = [name for name in modules() if layer_of(name) is None]
    assert not missing, f"modules in no layer of LAYERS (add them to it and to ARCHITECTURE.md): {missing}"


def test_no_import_cycle():
    graph = {name: {target for _, target in m.imports} for name, m in modules().items()}
    cycles = [" -> ".join(_cycle_in(c, graph)) for c in _components(graph)]
    assert not cycles, (
        f"{len(cycles)} import cycle(s) among unison modules; each must be broken by moving what both "
        "sides need into a lower module:\n  " + "\n  ".join(cycles)
    )


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, module in modules().items():
        here = layer_of(name)
        for line, target in module.imports:
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                wrong.append(
                    f"{name} (layer {here} {LAYERS[here][0]}) imports {target} (layer {there} "
                    f"{LAYERS[there][0]}) at {module.path.relative_to(SRC.parent)}:{line}"
                )
    assert not wrong, (
        f"{len(wrong)} import(s) from a lower layer up to a higher one; a module may import only its own "
        "layer or a lower one (see ARCHITECTURE.md):\n  " + "\n  ".join(wrong)
    )


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, Function]]:
    """Every function and method of ``tree`` with its qualified name, nested ones too."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def test_no_function_is_longer_than_80_lines():
    long = []
    for module in modules().values():
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        for qualname, node in _functions(tree):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                where = f"{module.path.relative_to(SRC.parent)}:{node.lineno}"
                long.append((lines, f"{module.name}.{qualname} ({where}): {lines} lines"))
    long.sort(reverse=True)
    assert not long, (
        f"{len(long)} function(s) longer than {MAX_FUNCTION_LINES} lines, longest first; split each into "
        "named steps:\n  " + "\n  ".join(text for _, text in long)
    )
