"""Telling callbacks about an experiment already recorded: what ``unison export mlflow DIR`` runs.

The experiment's journal is read back and its events are delivered, in order and on the calling thread,
by the same :class:`~unison.driver.callbacks_runner.CallbackRunner` code that feeds callbacks while an
experiment runs, so a logger replayed writes what it would have written live. The journal of a single
run recorded before its reports were journaled has none: they are read from its ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unison.callbacks import Callback, ExperimentInfo
from unison.curves import file_reports
from unison.driver.callbacks_runner import CallbackRunner
from unison.driver.store import ExperimentStore


def backfill(path: str | Path, callbacks: list[Callback], result: Any) -> int:
    """Call ``callbacks`` for the finished (or interrupted) experiment in ``path`` as if it ran now:
    ``on_experiment_start``, every trial's events, then ``on_experiment_end(result)``. Holds the
    experiment's lock meanwhile (raises :class:`unison.ExperimentLocked` if a driver is running it).
    Returns how many trials were told of."""
    store = ExperimentStore.open(path)
    try:
        meta = store.read_experiment()
        kind = str(meta.get("kind", "search"))
        if kind == "single":
            declared: Any = {"hparams": meta.get("hparams"), "seed": meta.get("seed")}
        else:
            declared = meta.get(kind) or {}
        declaration = json.loads(json.dumps(declared, default=str))
        backend = meta.get("backend") if kind != "single" else None
        info = ExperimentInfo(str(meta.get("name", store.path.name)), kind, store.path, declaration, backend)
        events = store.read_journal()
        if kind == "single" and not any(e.get("e") == "report" for e in events):
            events = _with_single_run_reports(events, store.trial_dir(0))
        runner = CallbackRunner(callbacks, info, store, seed=meta.get("seed") if kind == "single" else None)
        runner.replay(events, result)
        return len({e["id"] for e in events if e.get("e") == "start" and isinstance(e.get("id"), int)})
    finally:
        store.close()


def _with_single_run_reports(events: list[dict[str, Any]], trial_dir: Path) -> list[dict[str, Any]]:
    """``events`` with the reports of ``trial_dir/metrics.jsonl`` put before the trial's end event."""
    reports = [{"e": "report", "id": 0, "step": r["step"], "metrics": r["metrics"]}
               for r in file_reports(trial_dir / "metrics.jsonl") if isinstance(r["step"], int)]
    ends = [i for i, e in enumerate(events) if e.get("e") == "end"]
    at = ends[0] if ends else len(events)
    return [*events[:at], *reports, *events[at:]]
