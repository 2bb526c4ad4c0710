"""``unison.TensorBoardLogger``: real experiments, read back with TensorBoard's own ``EventAccumulator``.

Each trial's run folder must hold its ``metrics.jsonl`` as scalars (same steps, same values at float32,
the precision of a TensorBoard scalar), the final metrics a report did not already give at the last
step, and the HParams plugin's session summary: the trial's hyperparameters and status.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import unison

pytest.importorskip("tensorboardX")
pytest.importorskip("tensorboard")

# TensorBoard reads files through TensorFlow when it is installed (seconds to import); its documented
# "no_tensorflow" marker module makes it use its own file reader, as it would without TensorFlow.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2  # noqa: E402

QUALITIES = [0.2, 0.9, 0.5, 0.8]  # on a grid with ASHA: the 2nd is best, a later one stops at rung 0


def train(q: float, reporter: unison.Reporter) -> dict[str, float]:
    if q < 0:
        raise ValueError("a failing trial")
    for step in range(9):
        reporter.report(step=step, acc=q * (step + 1) / 9, loss=1 - q)
    return {"acc": q, "val": q / 2}  # "val" is never reported: it lands at the last step


def search(qualities: list[float]) -> unison.Search:
    return unison.Search({"q": unison.choice(qualities), "opt": unison.choice(["sgd"])}, metric="acc",
                         mode="max", optimizer="grid", scheduler=unison.ASHA())


def expected_series(trial_dir: Path, final: dict[str, float]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as series per metric, then each final metric not already the last point there."""
    series: dict[str, list[tuple[int, float]]] = {}
    last_step = 0
    file = trial_dir / "metrics.jsonl"
    for line in file.read_text().splitlines() if file.is_file() else []:
        row = json.loads(line)
        last_step = row.pop("step")
        for name, value in row.items():
            series.setdefault(name, []).append((last_step, value))
    for name, value in final.items():
        if series.get(name, [None])[-1] != (last_step, value):
            series.setdefault(name, []).append((last_step, value))
    return {name: [(step, float(np.float32(v))) for step, v in points] for name, points in series.items()}


def read_run(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict, int]:
    """A run folder's scalars, its session's hyperparameters and its session end status, as TensorBoard
    reads them."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    hparams = {}
    for name, value in start.session_start_info.hparams.items():
        hparams[name] = getattr(value, value.WhichOneof("kind"))
    return scalars, hparams, end.session_end_info.status


def check_runs(result: unison.SearchResult, root: Path) -> dict[int, dict]:
    """Every trial of ``result`` has its run in ``root``, equal to its record; returns the hparams read."""
    trials = result.trials.set_index("trial_id")
    assert sorted(p.name for p in root.iterdir()) == [f"{tid:04d}" for tid in trials.index]
    read = {}
    for tid, row in trials.iterrows():
        trial_dir = result.path / "trials" / f"{tid:04d}"
        final = {} if row["status"] == "failed" else {
            name: row[name] for name in ("acc", "val", "loss") if name in row and not np.isnan(row[name])}
        scalars, hparams, status = read_run(root / f"{tid:04d}")
        assert scalars == expected_series(trial_dir, final), f"trial {tid}"
        assert hparams["unison/status"] == row["status"] and hparams["q"] == row["q"]
        assert hparams["opt"] == "sgd"
        assert status == (api_pb2.STATUS_FAILURE if row["status"] == "failed" else api_pb2.STATUS_SUCCESS)
        read[tid] = hparams
    return read


def test_an_inline_search_writes_one_run_per_trial(tmp_path):
    result = unison.run(train, search(QUALITIES), backend="inline", storage=tmp_path, progress=False,
                        callbacks=[unison.TensorBoardLogger()])
    statuses = set(result.trials["status"])
    assert statuses == {"completed", "stopped"}
    check_runs(result, result.path / "tensorboard")
    scalars, _, _ = read_run(result.path / "tensorboard" / "0001")
    assert scalars["val"] == [(8, pytest.approx(0.45))]  # a final metric no report gave


def test_the_name_and_a_logdir_work_and_a_failing_trial_is_a_failure(tmp_path, monkeypatch):
    result = unison.run(train, search([0.2, 0.9, -1.0, 0.5]), backend="inline", storage=tmp_path / "runs",
                        progress=False, callbacks=["tensorboard"])
    assert set(result.trials["status"]) == {"completed", "failed", "stopped"}
    check_runs(result, result.path / "tensorboard")
    monkeypatch.setenv("UNISON_CALLBACKS", "tensorboard")
    logdir = tmp_path / "tb"
    result = unison.run(train, search([0.3]), backend="inline", storage=tmp_path / "runs", progress=False,
                        name="named", callbacks=[unison.TensorBoardLogger(logdir=logdir)])
    check_runs(result, logdir / "named")
    assert (result.path / "tensorboard" / "0000").is_dir()  # and the one named in the environment


def test_a_single_run_logs(tmp_path):
    r = unison.run(train, hparams={"q": 0.6}, storage=tmp_path, callbacks=[unison.TensorBoardLogger()])
    scalars, hparams, status = read_run(r.path / "tensorboard" / "0000")
    assert scalars == expected_series(r.path / "trials" / "0000", r.metrics)
    seed = json.loads((r.path / "experiment.json").read_text())["seed"]
    assert hparams == {"q": 0.6, "seed": seed, "unison/status": "completed"}
    assert status == api_pb2.STATUS_SUCCESS


def test_a_missing_tensorboardx_fails_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # what an uninstalled package imports as
    with pytest.raises(ImportError, match=r"pip install 'unison\[tensorboard\]'"):
        unison.run(train, search([0.5]), backend="inline", storage=tmp_path / "runs",
                   callbacks=["tensorboard"])
    assert not (tmp_path / "runs").exists()


def test_import_unison_does_not_load_the_writer():
    code = ("import sys, unison; unison.TensorBoardLogger; "
            "assert 'tensorboardX' not in sys.modules, 'tensorboardX loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
