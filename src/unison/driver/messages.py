"""What an experiment says when it ends: its closing line, and how to resume it when interrupted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unison.backends.base import Backend
from unison.driver.plan import Plan
from unison.result import AblationResult, SearchResult


def _source_name(obj: Any, fallback: str) -> str:
    """The name ``obj`` has where the user typed the call: a name bound to it in ``__main__`` (a
    script, a notebook), else ``module.name`` for a function of a module ``__main__`` imported, else
    its own ``__name__``; ``fallback`` when none is a valid name."""
    main = sys.modules.get("__main__")
    bound = dict(vars(main)) if main is not None else {}
    for name, value in bound.items():
        if value is obj and name.isidentifier() and not name.startswith("_"):
            return name
    own = getattr(obj, "__name__", None)
    if not (isinstance(own, str) and own.isidentifier()):
        return fallback
    module = getattr(obj, "__module__", None)
    for name, value in bound.items():
        try:
            if (type(value).__name__ == "module" and getattr(value, "__name__", None) == module
                    and getattr(value, own, None) is obj and not name.startswith("_")):
                return f"{name}.{own}"
        except Exception:  # noqa: BLE001 - a module with an odd __getattr__: not the one we look for
            continue
    return own


def resume_hint(fn: Callable[..., Any], model: Any, data: Any, path: Path, plan: Plan, backend: Backend,
                 from_shell: bool) -> str:
    """A call that resumes the experiment in ``path`` as printed, with the user's names for ``fn`` and
    its ``model=``/``data=`` generators, and (when ``payload.bin`` was written) the shell command."""
    args = [_source_name(fn, "train")]
    if model is not None:
        args.append(f"model={_source_name(model, 'model_fn')}")
    if data is not None:
        args.append(f"data={_source_name(data, 'data_fn' if callable(data) else '<the same data>')}")
    if backend.name == "inline":
        args.append("backend='inline'")
    custom = any(isinstance(plan.declaration.get(key), dict) and "custom" in plan.declaration[key]
                 for key in ("optimizer", "scheduler"))
    if plan.kind == "search" and not custom:
        call = f"unison.resume({str(path)!r}, {', '.join(args)})"
    else:
        context = _source_name(plan.context, {"search": "search", "ablation": "study"}.get(plan.kind, "run"))
        args.insert(1, context)
        call = f"unison.run({', '.join(args)}, resume={str(path)!r})"
    if from_shell:
        call += f" or, from a shell, `{resume_command(path, backend)}`"
    return call


def resume_command(path: str | Path, backend: Backend | None = None) -> str:
    """The shell command that resumes the experiment in ``path`` (``unison resume DIR``)."""
    import shlex

    inline = backend is not None and backend.name == "inline"
    return f"unison resume {shlex.quote(str(path))}" + (" --backend inline" if inline else "")


def closing_message(status: str, result: SearchResult, path: Path, driver: Any, kind: str = "search",
                     resume_hint: str | None = None) -> str:
    if status == "interrupted" and resume_hint is not None:
        return f"interrupted: the experiment is resumable with {resume_hint}"

    if kind == "distributed" and status == "completed":
        row = result.rows[0] if result.rows else {}
        if row.get("status") != "completed":
            return f"the run {row.get('status', 'did not end')}: see {path / 'trials' / '0000'}"
        return f"completed: {row.get('metrics')}"
    if isinstance(result, AblationResult):
        if status == "interrupted":
            return (f"interrupted: resume it with unison.run(train, ablation, model=..., data=..., "
                    f"resume={str(path)!r})")
        if status != "aborted":
            return f"{result.headline()}; see result.ablation"
    if status == "interrupted":
        return (f"interrupted: the experiment is resumable with unison.resume({str(path)!r}, train) "
                f"(or `unison.run(train, search, resume=...)`)")
    if status == "aborted":
        lines = [line for line in str(driver.abort_error).splitlines() if line.strip()] or [""]
        cause = f" {lines[-1].strip()}" if len(lines) > 1 else ""  # a traceback's last line: the error
        return f"aborted: {lines[0]}{cause}"
    if len(result.metrics) > 1 and result.pareto:
        return f"{len(result.pareto)} trial(s) on the Pareto front of {result.metrics}: see result.pareto"
    if result.best is None:
        return f"no trial completed; see {path / 'journal.jsonl'}"
    best = result.best
    return f"best trial {best.trial_id}: {result.metric}={best.metric:.6g} with {best.hparams}"
