"""``unison.Callback``: told, in the driver and in the journal's order, what every kind of experiment does.

Each test runs a real experiment and compares what a recording callback heard with what the experiment
directory holds: the journal's start, report and end events, and each trial's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_quality import quality_search as shared_quality_search
from helpers_quality import quality_train

import unison
from unison import callbacks as callbacks_module
from unison.callbacks import ExperimentInfo, TrialInfo


class Recorder(unison.Callback):
    """Keeps every call, in order, with the thread it came on."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[int] = set()

    def _keep(self, *call: Any) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append(call)

    def on_experiment_start(self, experiment: ExperimentInfo) -> None:
        self._keep("experiment_start", experiment)

    def on_trial_start(self, trial: TrialInfo) -> None:
        self._keep("start", trial)

    def on_report(self, trial: TrialInfo, step: int, metrics: dict[str, float]) -> None:
        self._keep("report", trial, step, metrics)

    def on_trial_end(self, trial: TrialInfo) -> None:
        self._keep("end", trial)

    def on_experiment_end(self, result: Any) -> None:
        self._keep("experiment_end", result)

    def of_kind(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]


def reports_on_disk(trial_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """A trial's ``metrics.jsonl``, as (step, metrics) pairs."""
    file = trial_dir / "metrics.jsonl"
    if not file.is_file():
        return []
    lines = [json.loads(line) for line in file.read_text().splitlines()]
    return [(line.pop("step"), line) for line in lines]


def check_against_record(rec: Recorder, path: Path, kind: str) -> None:
    """What ``rec`` heard is the experiment in ``path``: its start, the journal's trial events in order
    (with each trial's reports equal to its metrics.jsonl), its end; all on one thread but this one."""
    assert rec.calls[0][0] == "experiment_start" and rec.calls[-1][0] == "experiment_end"
    experiment = rec.calls[0][1]
    assert experiment.kind == kind and experiment.path == path and not experiment.resumed
    assert len(rec.threads) == 1 and threading.get_ident() not in rec.threads
    heard = [(c[0], c[1].trial_id) for c in rec.calls[1:-1]]
    recorded = [(e["e"], e["id"]) for e in journal(path) if e["e"] in ("start", "report", "end")]
    assert heard == recorded
    ends = {e["id"]: e for e in journal(path) if e["e"] == "end"}
    for _, trial in rec.of_kind("end"):
        end = ends[trial.trial_id]
        assert (trial.status, trial.metrics, trial.stop_reason, trial.error, trial.duration) == (
            end["status"], end.get("metrics") or {}, end.get("stop_reason"), end.get("error"),
            end["duration"])
        assert trial.trial_dir == path / "trials" / f"{trial.trial_id:04d}"
        heard_reports = [(c[2], c[3]) for c in rec.of_kind("report") if c[1].trial_id == trial.trial_id]
        assert heard_reports == reports_on_disk(trial.trial_dir)
    starts = {c[1].trial_id: c[1] for c in rec.of_kind("start")}
    for event in journal(path):
        if event["e"] == "start":
            trial = starts[event["id"]]
            assert (trial.hparams, trial.status) == (event["hparams"], "running")
            assert trial.attempt == event["attempt"]


# ------------------------------------------------------------------------------------ single run
def test_a_single_run_is_heard_start_reports_end(tmp_path):
    def train(lr, reporter):
        for step in range(3):
            reporter.report(step=step, loss=lr * (step + 1))
        return {"loss": lr * 3}

    rec = Recorder()
    r = unison.run(train, hparams={"lr": 0.5}, storage=tmp_path, callbacks=[rec])
    check_against_record(rec, r.path, "single")
    assert [(c[2], c[3]) for c in rec.of_kind("report")] == [(0, {"loss": 0.5}), (1, {"loss": 1.0}),
                                                             (2, {"loss": 1.5})]
    (_, end), = rec.of_kind("end")
    assert end.status == "completed" and end.metrics == {"loss": 1.5} and end.hparams == {"lr": 0.5}
    assert rec.calls[0][1].declaration["hparams"] == {"lr": 0.5} and rec.calls[0][1].backend is None
    assert rec.calls[-1][1] is r


def test_a_failing_single_run_is_heard_failing(tmp_path):
    def train(reporter):
        reporter.report(step=0, loss=1.0)
        raise ZeroDivisionError("boom")

    rec = Recorder()
    with pytest.raises(ZeroDivisionError):
        unison.run(train, storage=tmp_path, callbacks=[rec])
    (path,) = tmp_path.iterdir()
    check_against_record(rec, path, "single")
    (_, end), = rec.of_kind("end")
    assert end.status == "failed" and "ZeroDivisionError: boom" in end.error
    assert rec.calls[-1] == ("experiment_end", None)


# ----------------------------------------------------------------------------------------- search
QUALITIES = [0.5, 0.6, 0.2, 0.9, 0.3, 0.8, 0.1, 0.95, 0.4, -1.0]  # -1: the trial fails


def quality_search() -> unison.Search:
    return shared_quality_search(QUALITIES)


def check_search(rec: Recorder, result: unison.SearchResult) -> None:
    check_against_record(rec, result.path, "search")
    ends = {c[1].hparams["q"]: c[1] for c in rec.of_kind("end")}
    assert len(ends) == len(QUALITIES)
    assert ends[0.95].status == "completed" and ends[0.95].metrics == {"acc": 0.95}
    # 0.1 starts seventh: several trials have reported at rung 0 before it, whichever workers ran them
    assert ends[0.1].status == "stopped" and "rung 0" in ends[0.1].stop_reason
    assert ends[-1.0].status == "failed" and "ValueError: a failing trial" in ends[-1.0].error
    assert rec.calls[-1] == ("experiment_end", result) and result.status == "completed"


def test_an_inline_search_is_heard_in_the_journals_order(tmp_path):
    rec = Recorder()
    result = unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path, progress=False,
                        callbacks=[rec])
    check_search(rec, result)
    assert "Inline" in rec.calls[0][1].backend and rec.calls[0][1].declaration["optimizer"] == "grid"


@pytest.mark.slow
def test_a_local_search_is_heard_in_the_driver(tmp_path):
    rec = Recorder()
    result = unison.run(quality_train, quality_search(), backend=unison.Local(workers=2), storage=tmp_path,
                        progress=False, callbacks=[rec])
    check_search(rec, result)
    workers = {c[1].worker for c in rec.of_kind("start")}
    assert workers and None not in workers and all(c[1].host for c in rec.of_kind("start"))
    # A local worker process names no cluster node: the column is there, empty
    assert all(c[1].node is None for c in rec.of_kind("start")) and result.trials["node"].isna().all()


# --------------------------------------------------------------------------------------- ablation
def test_an_ablation_is_heard_with_component_and_seed(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"A": rng.normal(size=50), "B": rng.normal(size=50)})
    frame["y"] = 2 * frame["A"]

    def train(dataset, hparams):
        return {"score": float(len(dataset.columns)) + hparams["seed"] / 100}

    rec = Recorder()
    study = unison.Ablation(features=["A", "B"], label="y", metric="score", mode="max", repeats=2, seed=7)
    result = unison.run(train, study, data=frame, backend="inline", storage=tmp_path, progress=False,
                        callbacks=[rec])
    check_against_record(rec, result.path, "ablation")
    heard = sorted((c[1].component, c[1].seed, c[1].status) for c in rec.of_kind("end"))
    assert heard == sorted((c, s, "completed") for c in ("baseline", "A", "B") for s in (7, 8))
    assert rec.calls[-1] == ("experiment_end", result)


# ------------------------------------------------------------------------------- failing, slow
class Raising(unison.Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_trial_start(self, trial: TrialInfo) -> None:
        self.calls += 1
        raise RuntimeError("cannot log")


def test_a_raising_callback_is_warned_of_once_and_the_others_hear_everything(tmp_path):
    raising, rec = Raising(), Recorder()
    expected = r"Raising\.on_trial_start raised RuntimeError: cannot log"
    with pytest.warns(RuntimeWarning, match=expected) as got:
        result = unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path,
                            progress=False, callbacks=[raising, rec])
    assert [str(w.message) for w in got].count(str(got[0].message)) == 1
    assert len([w for w in got if "Raising" in str(w.message)]) == 1
    assert raising.calls == 1  # disabled after its first error
    check_search(rec, result)


class Slow(unison.Callback):
    def __init__(self) -> None:
        self.heard: list[tuple[int, float]] = []  # (trial, when its start was heard)

    def on_trial_start(self, trial: TrialInfo) -> None:
        self.heard.append((trial.trial_id, time.time()))
        time.sleep(0.2)


def test_a_slow_callback_does_not_hold_the_trials_back(tmp_path):
    slow = Slow()
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="x", trials=20, seed=1)
    result = unison.run(lambda x: {"x": x}, search, backend="inline", storage=tmp_path, progress=False,
                        callbacks=[slow])
    assert len(slow.heard) == 20  # every event reached it before unison.run returned
    starts = [e["t"] for e in journal(result.path) if e["e"] == "start"]
    # The callback spends 0.2 s per trial; had it run between the trials, the last trial could not have
    # started before the callback heard of the fifth one (0.8 s of its sleep later).
    assert starts[-1] < slow.heard[4][1]


def test_the_experiments_end_waits_a_bounded_time_then_warns(tmp_path, monkeypatch):
    from unison.driver import callbacks_runner

    monkeypatch.setattr(callbacks_runner, "DRAIN_TIMEOUT_S", 0.3)
    slow = Slow()
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="x", trials=10, seed=1)
    with pytest.warns(RuntimeWarning, match=r"had not taken \d+ event\(s\).*Slow\.on_trial_start"):
        unison.run(lambda x: {"x": x}, search, backend="inline", storage=tmp_path, progress=False,
                   callbacks=[slow])
    assert len(slow.heard) < 10


# ----------------------------------------------------------------------------------------- resume
def test_a_resumed_search_is_heard_only_for_what_is_new(tmp_path):
    stop_at = {"q": 0.95}

    def train(q, reporter):
        if q == stop_at["q"]:
            raise KeyboardInterrupt
        return quality_train(q, reporter)

    first, again = Recorder(), Recorder()
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, quality_search(), backend="inline", storage=tmp_path, progress=False,
                   callbacks=[first])
    (path,) = tmp_path.iterdir()
    assert first.calls[-1][0] == "experiment_end" and first.calls[-1][1].status == "interrupted"
    ended_before = {c[1].trial_id for c in first.of_kind("end")}
    assert len(ended_before) == QUALITIES.index(0.95)
    stop_at["q"] = None
    result = unison.resume(path, train, backend="inline", progress=False, callbacks=[again])
    assert again.calls[0][1].resumed and again.calls[0][1].path == path
    heard = {c[1].trial_id for c in again.of_kind("end")}
    assert heard == set(range(len(QUALITIES))) - ended_before
    assert {c[1].trial_id for c in again.of_kind("start")} == heard
    assert again.calls[-1] == ("experiment_end", result) and result.status == "completed"


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("given", "error", "message"), [
    (["recorder"], ValueError, "unknown callback 'recorder'"),
    ([Recorder], TypeError, r"got <class .*Recorder'> \(a type\): pass an instance, Recorder\(\)"),
    ([print], TypeError, "must hold unison.Callback instances or callback names"),
    (42, TypeError, "callbacks= must be a list"),
])
def test_a_bad_callback_fails_before_anything_is_written(tmp_path, given, error, message):
    storage = tmp_path / "runs"
    with pytest.raises(error, match=message):
        unison.run(lambda: 1.0, storage=storage, callbacks=given)
    with pytest.raises(error, match=message):
        unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, metric="x", trials=2),
                   backend="inline", storage=storage, callbacks=given)
    assert not storage.exists()


def test_an_unknown_name_gets_a_did_you_mean(monkeypatch, tmp_path):
    monkeypatch.setitem(callbacks_module.BUILTIN_CALLBACKS, "recorder", Recorder)
    with pytest.raises(ValueError, match=r"unknown callback 'recordr': did you mean 'recorder'\?"):
        unison.run(lambda: 1.0, storage=tmp_path / "runs", callbacks=["recordr"])
    monkeypatch.setenv("UNISON_CALLBACKS", "recorder,recordr")
    with pytest.raises(ValueError, match=r"UNISON_CALLBACKS='recorder,recordr': unknown callback 'recordr'"):
        unison.run(lambda: 1.0, storage=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_names_work_in_callbacks_and_in_the_environment(monkeypatch, tmp_path):
    made: list[Recorder] = []

    def factory() -> Recorder:
        made.append(Recorder())
        return made[-1]

    monkeypatch.setitem(callbacks_module.BUILTIN_CALLBACKS, "recorder", factory)
    monkeypatch.setenv("UNISON_CALLBACKS", " recorder ,")
    r = unison.run(lambda: {"loss": 0.5}, storage=tmp_path)
    (rec,) = made
    check_against_record(rec, r.path, "single")
    made.clear()
    r = unison.run(lambda: {"loss": 0.5}, storage=tmp_path, callbacks=["recorder"])  # named twice: one
    (rec,) = made
    assert rec.of_kind("end")[0][1].metrics == {"loss": 0.5}


PRINTING_SEARCH = '''
import unison

class PrintReports(unison.Callback):
    def on_report(self, trial, step, metrics):
        print(f"heard {trial.trial_id} {step}")

def train(x, reporter):
    for step in range(40):
        print(f"trial says {step}")
        reporter.report(step=step, score=x)
    return {"score": x}

search = unison.Search({"x": unison.uniform(0, 1)}, metric="score", trials=25, seed=3)
result = unison.run(train, search, backend="inline", progress=False, callbacks=[PrintReports()])
print("experiment", result.path)
'''


def test_an_inline_searchs_callback_prints_to_the_console_and_the_trials_into_their_logs(tmp_path):
    # The callback thread prints while the inline trials swap sys.stdout: it crashed the interpreter
    # (a print through a freed stream) or landed in a trial's stdout.log before the streams were routed.
    done = subprocess.run([sys.executable, "-c", PRINTING_SEARCH], cwd=tmp_path, capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raised" not in done.stderr
    heard = [line for line in done.stdout.splitlines() if line.startswith("heard ")]
    assert len(heard) == 25 * 40
    assert "trial says" not in done.stdout
    path = Path(tmp_path, done.stdout.split("experiment ", 1)[1].strip())
    for trial_dir in sorted((path / "trials").iterdir()):
        log = (trial_dir / "stdout.log").read_text()
        assert log.splitlines() == [f"trial says {step}" for step in range(40)], trial_dir
