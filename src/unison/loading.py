"""Reading a past experiment back: finding it by directory or by name, and building its result object.

What ``unison.load`` does, kept beside the result classes so that the report (and anything else below
the front) can read experiments the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from unison._validate import did_you_mean
from unison.driver.store import DEFAULT_STORAGE, ExperimentStore
from unison.result import PipelineResult, RunResult, SearchResult


def find_experiment(path_or_name: str | Path, storage: str | Path | None = None) -> Path:
    """``path_or_name`` itself if it is an experiment directory (or any path); for a bare name (no
    ``/``) that is not one, the newest experiment of that name under ``storage`` (default
    ``./unison-runs``). Raises ``FileNotFoundError`` with a did-you-mean for an unknown name."""
    path = Path(path_or_name)
    by_name = isinstance(path_or_name, str) and _is_bare_name(path_or_name)
    if by_name and not (path / "experiment.json").is_file():
        return _newest_named(str(path_or_name), Path(storage if storage is not None else DEFAULT_STORAGE))
    return path


def load_result(path: str | Path) -> RunResult | SearchResult | PipelineResult:
    """The result object of the experiment in ``path``, by its kind (see :func:`unison.load`)."""
    kind = ExperimentStore(path).read_experiment().get("kind")  # FileNotFoundError: not an experiment
    if kind in ("single", "distributed"):
        return RunResult.load(path)
    if kind == "pipeline":
        return PipelineResult.load(path)
    return SearchResult.load(path)


def _is_bare_name(text: str) -> bool:
    return bool(text) and text not in (".", "..") and "/" not in text and os.sep not in text


def _newest_named(name: str, root: Path) -> Path:
    """The newest experiment directory under ``root`` whose ``experiment.json`` gives it ``name``."""
    if not root.is_dir():
        raise FileNotFoundError(f"no experiment directory {name!r}, and no experiment named {name!r}: the "
                                f"storage folder {root} does not exist (pass storage= the folder given to "
                                f"unison.run(storage=...))")
    found: dict[str, list[tuple[float, str, Path]]] = {}
    for child in root.iterdir():
        try:
            meta = json.loads((child / "experiment.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not an experiment directory
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            created = meta.get("created")
            found.setdefault(meta["name"], []).append(
                (float(created) if isinstance(created, (int, float)) else 0.0, child.name, child))
    if name not in found:
        names = sorted(found)
        hint = did_you_mean(name, names)
        listed = f"The names there: {names}" if names else "It holds no experiment"
        raise FileNotFoundError(f"no experiment directory {name!r}, and no experiment named {name!r} under "
                                f"{root}:{hint or ''} {listed} (or pass the experiment's directory, or "
                                f"storage= the folder given to unison.run(storage=...))")
    return max(found[name])[2]
