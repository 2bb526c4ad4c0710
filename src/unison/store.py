"""The experiment directory: ``experiment.json``, ``journal.jsonl``, ``trials/<id>/``, ``result.json``.

The journal is append-only and flushed per event, so a crash loses nothing that was recorded;
resuming an experiment replays it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

DEFAULT_STORAGE = "unison-runs"


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"


class ExperimentStore:
    """One experiment's directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._journal: Any = None

    @classmethod
    def create(cls, storage: str | Path | None, name: str) -> ExperimentStore:
        """A new, uniquely named directory ``<storage>/<name>-<timestamp>``."""
        root = Path(storage if storage is not None else DEFAULT_STORAGE)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = f"{_slug(name)}-{stamp}"
        for n in range(1000):
            path = root / (base if n == 0 else f"{base}-{n}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            (path / "trials").mkdir()
            return cls(path)
        raise FileExistsError(f"could not create a new experiment directory under {root}")

    @property
    def experiment_file(self) -> Path:
        return self.path / "experiment.json"

    @property
    def journal_file(self) -> Path:
        return self.path / "journal.jsonl"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    def exists(self) -> bool:
        return self.experiment_file.is_file()

    def trial_dir(self, trial_id: int) -> Path:
        return self.path / "trials" / f"{trial_id:04d}"

    def write_experiment(self, data: dict[str, Any]) -> None:
        _atomic_write_json(self.experiment_file, data)

    def read_experiment(self) -> dict[str, Any]:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.path} is not a unison experiment directory (no experiment.json in it)"
            )
        return json.loads(self.experiment_file.read_text(encoding="utf-8"))

    def update_experiment(self, **fields: Any) -> None:
        data = self.read_experiment()
        data.update(fields)
        self.write_experiment(data)

    def append(self, event: dict[str, Any]) -> None:
        """Append one event to the journal and flush it to the operating system."""
        if self._journal is None:
            self._journal = open(self.journal_file, "a", encoding="utf-8")  # noqa: SIM115
        self._journal.write(json.dumps(event, default=str) + "\n")
        self._journal.flush()

    def read_journal(self) -> list[dict[str, Any]]:
        """Every complete event; a torn last line (the process died mid-write) is ignored."""
        if not self.journal_file.is_file():
            return []
        events = []
        with open(self.journal_file, encoding="utf-8") as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return events

    def write_result(self, data: dict[str, Any]) -> None:
        _atomic_write_json(self.result_file, data)

    def read_result(self) -> dict[str, Any] | None:
        if not self.result_file.is_file():
            return None
        return json.loads(self.result_file.read_text(encoding="utf-8"))

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
