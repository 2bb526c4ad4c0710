"""Looking at results (issue 14): ``r.curves``, ``r.to_optuna()``, ``r.importance()`` and
``unison.load``, on real experiments run inline (a worker process where a retry or ranks need one)."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

import unison

optuna = pytest.importorskip("optuna")


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]


def metrics_file(path: Path, trial_id: int) -> list[dict[str, Any]]:
    file = path / "trials" / f"{trial_id:04d}" / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def asha_search(tmp_path: Path, name: str = "curvy") -> unison.SearchResult:
    """8 trials of 6 steps under ASHA (some stop early); ``lr`` near 0.9 is best."""
    def train(lr, width, reporter):
        for step in range(6):
            reporter.report(step=step, acc=lr * (step + 1) / 6, loss=1.0 - lr * step / 6)
        return {"acc": lr, "loss": 1.0 - lr}

    search = unison.Search({"lr": unison.uniform(0.1, 1.0), "width": unison.integer(1, 4)}, metric="acc",
                           trials=8, optimizer="random", scheduler=unison.ASHA(max_resource=6), seed=3)
    result = unison.run(train, search, backend="inline", storage=tmp_path, name=name, progress=False)
    assert isinstance(result, unison.SearchResult)
    return result


def ablation(tmp_path: Path) -> unison.AblationResult:
    def train(model, seed, reporter):
        score = 0.8 + 0.01 * seed - (0.1 if model == "small" else 0.0)
        for step in range(3):
            reporter.report(step=step, score=score * (step + 1) / 3)
        return {"score": score}

    study = unison.Ablation(base={"depth": 2}, variants={"small": lambda hparams: "small"}, metric="score",
                            repeats=2, seed=5)
    result = unison.run(train, study, model=lambda hparams: "big", backend="inline", storage=tmp_path,
                        progress=False)
    assert isinstance(result, unison.AblationResult)
    return result


# ------------------------------------------------------------------------------------------- curves
def test_curves_of_a_search_hold_every_report_and_stopped_trials_end_early(tmp_path):
    r = asha_search(tmp_path)
    curves = r.curves
    assert list(curves.columns) == ["trial_id", "step", "acc", "loss", "time"]
    reports = [ev for ev in journal(r.path) if ev["e"] == "report"]
    assert len(curves) == len(reports)
    for row in r.rows:
        mine = curves[curves["trial_id"] == row["trial_id"]]
        assert list(mine["step"]) == list(range(row["steps"]))  # no padding past where it ended
        expected = metrics_file(r.path, row["trial_id"])
        assert mine[["step", "acc", "loss"]].to_dict("records") == expected
    lengths = curves.groupby("trial_id").size()
    stopped = [row["trial_id"] for row in r.rows if row["status"] == "stopped"]
    completed = [row["trial_id"] for row in r.rows if row["status"] == "completed"]
    assert stopped and completed, "ASHA should stop some of the 8 trials"
    assert all(lengths[s] < 6 for s in stopped) and all(lengths[c] == 6 for c in completed)


def test_curves_time_is_when_the_driver_received_each_report(tmp_path):
    r = asha_search(tmp_path)
    reports = [ev for ev in journal(r.path) if ev["e"] == "report"]
    if not all("t" in ev for ev in reports):
        pytest.skip("the journal's report events carry no time yet ('t', written by SearchDriver.report)")
    starts = {ev["id"]: ev["t"] for ev in journal(r.path) if ev["e"] == "start"}
    curves = r.curves
    assert curves["time"].notna().all()
    assert (curves["time"] >= curves["trial_id"].map(starts)).all()
    assert curves.groupby("trial_id")["time"].apply(lambda t: t.is_monotonic_increasing).all()


def test_curves_of_an_ablation_name_each_trials_component_and_seed(tmp_path):
    r = ablation(tmp_path)
    curves = r.curves
    assert list(curves.columns) == ["trial_id", "component", "seed", "step", "score", "time"]
    trials = r.trials.set_index("trial_id")
    assert len(curves) == 3 * len(trials)
    for tid, group in curves.groupby("trial_id"):
        assert set(group["component"]) == {trials.loc[tid, "component"]}
        assert set(group["seed"]) == {trials.loc[tid, "seed"]}
        assert group["score"].iloc[-1] == pytest.approx(trials.loc[tid, "score"])


def test_curves_of_a_single_run_come_from_its_metrics_file(tmp_path):
    def train(reporter):
        for step in (0, 5, 10):
            reporter.report(step=step, loss=1.0 / (step + 1))
        reporter.report(step=10, val_loss=0.5)  # another metric, at a step already reported
        return {"loss": 0.1}

    r = unison.run(train, storage=tmp_path)
    curves = r.curves
    assert list(curves.columns) == ["trial_id", "step", "loss", "val_loss", "time"]
    assert list(curves["step"]) == [0, 5, 10, 10]
    assert curves["loss"].iloc[:3].tolist() == [1.0, 1.0 / 6, 1.0 / 11]
    assert math.isnan(curves["loss"].iloc[3]) and curves["val_loss"].iloc[3] == 0.5


def test_curves_of_an_experiment_without_reports_is_an_empty_frame_with_the_columns(tmp_path):
    r = unison.run(lambda x: {"acc": x}, unison.Search({"x": unison.uniform(0, 1)}, metric="acc", trials=2),
                   backend="inline", storage=tmp_path, progress=False)
    curves = r.curves
    assert curves.empty and list(curves.columns) == ["trial_id", "step", "acc", "time"]


def test_curves_of_a_retried_trial_are_its_last_attempts(tmp_path):
    def train(ctx, reporter):
        for step in range(3):
            reporter.report(step=step, value=1.0, attempt=ctx.attempt)
            if ctx.trial_id == 0 and ctx.attempt == 0 and step == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies: the trial runs again
        return {"value": 1.0}

    r = unison.run(train, unison.Search({"x": 1}, trials=2), backend=unison.Local(workers=1),
                   storage=tmp_path, progress=False)
    assert r.trials.set_index("trial_id").loc[0, "attempts"] == 2
    first = r.curves[r.curves["trial_id"] == 0]
    assert list(first["step"]) == [0, 1, 2] and set(first["attempt"]) == {1.0}
    assert len(metrics_file(r.path, 0)) == 5  # the file goes on across attempts; the curves do not


# ---------------------------------------------------------------------------------------- to_optuna
def mixed_space_search(tmp_path: Path) -> unison.SearchResult:
    """A search over every kind of distribution, a constant and a conditional parameter, where some
    trials fail and some are stopped."""
    space = {
        "lr": unison.loguniform(1e-3, 1.0),
        "drop": unison.uniform(0.0, 0.5),
        "layers": unison.integer(1, 4),
        "opt": unison.choice(["sgd", "adam"]),
        "shape": unison.choice([[8, 8], [16]]),
        "momentum": unison.uniform(0.5, 0.99).when(opt="sgd"),
        "batch": 32,
    }

    def train(hparams, reporter):
        if hparams["layers"] == 4:
            raise RuntimeError("four layers do not fit")
        for step in range(4):
            reporter.report(step=step, acc=hparams["lr"] * (step + 1) - hparams["drop"])
        return {"acc": hparams["lr"] * 4 - hparams["drop"], "loss": hparams["drop"]}

    search = unison.Search(space, metric="acc", trials=16, optimizer="random", seed=11,
                           scheduler=unison.MedianStopping(grace_period=1))
    result = unison.run(train, search, backend="inline", storage=tmp_path, progress=False)
    assert isinstance(result, unison.SearchResult)
    return result


def test_to_optuna_holds_every_trial_with_its_params_values_state_and_reports(tmp_path):
    r = mixed_space_search(tmp_path)
    study = r.to_optuna()
    assert isinstance(study, optuna.Study) and study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.user_attrs["fixed_hparams"] == {"batch": 32}
    states = {"completed": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL"}
    assert {row["status"] for row in r.rows} == set(states), "the search should give each state"
    starts = {ev["id"]: ev["t"] for ev in journal(r.path) if ev["e"] == "start"}
    reports = [ev for ev in journal(r.path) if ev["e"] == "report"]
    assert len(study.trials) == len(r.rows)
    for trial, row in zip(study.trials, r.rows, strict=True):
        assert trial.user_attrs["unison_trial_id"] == row["trial_id"] == trial.number
        assert trial.state.name == states[row["status"]]
        expected = {k: v for k, v in row["hparams"].items() if k != "batch"}
        expected["shape"] = json.dumps(expected["shape"])  # lists are JSON strings in Optuna
        assert trial.params == expected
        assert ("momentum" in trial.params) == (row["hparams"]["opt"] == "sgd")
        assert trial.values == ([row["metrics"]["acc"]] if row["status"] == "completed" else None)
        assert trial.intermediate_values == {ev["step"]: ev["metrics"]["acc"] for ev in reports
                                             if ev["id"] == row["trial_id"]}
        assert trial.datetime_start == datetime.datetime.fromtimestamp(starts[row["trial_id"]])
        assert trial.duration == pytest.approx(datetime.timedelta(seconds=row["duration"] or 0.0),
                                               abs=datetime.timedelta(milliseconds=1))
        if row["status"] == "failed":
            assert trial.user_attrs["error"] == "RuntimeError: four layers do not fit"
        if row["status"] == "stopped":
            assert trial.user_attrs["stop_reason"] == row["stop_reason"]
    dist = study.trials[0].distributions
    assert isinstance(dist["lr"], optuna.distributions.FloatDistribution) and dist["lr"].log
    assert isinstance(dist["layers"], optuna.distributions.IntDistribution)
    assert dist["opt"].choices == ("sgd", "adam")


def test_optuna_visualization_draws_the_study(tmp_path):
    import optuna.visualization as ov

    r = mixed_space_search(tmp_path)
    study = r.to_optuna()
    completed = [row for row in r.rows if row["status"] == "completed"]
    history = ov.plot_optimization_history(study)
    assert sorted(history.data[0].y) == sorted(row["metrics"]["acc"] for row in completed)
    reported = {ev["id"] for ev in journal(r.path) if ev["e"] == "report"}
    intermediate = ov.plot_intermediate_values(study)
    assert len(intermediate.data) == len(reported)  # a line per trial that reported
    importances = ov.plot_param_importances(study)
    # PED-ANOVA (Optuna's default) rates conditional parameters too
    assert set(importances.data[0].y) == {"lr", "drop", "layers", "opt", "shape", "momentum"}


def test_to_optuna_of_an_ablation_has_component_and_seed_as_params(tmp_path):
    r = ablation(tmp_path)
    study = r.to_optuna()
    assert study.user_attrs["fixed_hparams"] == {"depth": 2}
    trials = r.trials.set_index("trial_id")
    for trial in study.trials:
        tid = trial.user_attrs["unison_trial_id"]
        assert trial.params == {"component": trials.loc[tid, "component"], "seed": trials.loc[tid, "seed"]}
        assert trial.values == [trials.loc[tid, "score"]]
    assert study.trials[0].distributions["component"].choices == ("baseline", "small")
    assert study.trials[0].distributions["seed"].choices == (5, 6)
    assert set(r.importance()["param"]) == {"component", "seed"}


def test_to_optuna_of_a_multi_objective_search_and_its_pareto_importance(tmp_path):
    def train(x, y):
        return {"acc": x, "cost": x * x + y}

    search = unison.Search({"x": unison.uniform(0, 1), "y": unison.uniform(0, 0.01)}, metric=["acc", "cost"],
                           mode=["max", "min"], trials=12, optimizer="random", seed=2)
    r = unison.run(train, search, backend="inline", storage=tmp_path, progress=False)
    study = r.to_optuna()
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.values for t in study.trials] == [[row["metrics"]["acc"], row["metrics"]["cost"]]
                                                for row in r.rows]
    assert {t.number for t in study.best_trials} == {b.trial_id for b in r.pareto}
    assert set(r.importance()["param"]) == {"x", "y"}  # PED-ANOVA: importance for the Pareto front
    with pytest.raises(ValueError, match=r"name one, e.g. importance\(metric='acc'\)"):
        r.importance(evaluator="fanova")
    assert r.importance("cost", evaluator="fanova")["param"].iloc[0] == "x"


def test_to_optuna_keeps_a_trial_that_never_ended_as_running(tmp_path):
    r = asha_search(tmp_path)
    cut = tmp_path / "cut"  # the directory as a killed driver leaves it: trial 3 started, never ended
    shutil.copytree(r.path, cut)
    lines = (cut / "journal.jsonl").read_text().splitlines(keepends=True)
    events = [json.loads(line) for line in lines]
    start = next(i for i, ev in enumerate(events) if ev["e"] == "start" and ev["id"] == 3)
    (cut / "journal.jsonl").write_text("".join(lines[:start + 2]))  # its start and its first report
    study = unison.SearchResult.load(cut).to_optuna()
    assert [t.state.name for t in study.trials][3] == "RUNNING"
    assert study.trials[3].datetime_complete is None and len(study.trials) == 4


# --------------------------------------------------------------------------------------- importance
def test_importance_ranks_the_parameter_the_function_depends_on_first(tmp_path):
    def train(strong, unused):
        return {"acc": -((strong - 0.7) ** 2), "noise": unused}

    search = unison.Search({"strong": unison.uniform(0, 1), "unused": unison.uniform(0, 1)}, metric="acc",
                           trials=40, optimizer="random", seed=4)
    r = unison.run(train, search, backend="inline", storage=tmp_path, progress=False)
    for evaluator in ("ped-anova", "fanova"):
        frame = r.importance(evaluator=evaluator)
        assert list(frame.columns) == ["param", "importance"]
        assert list(frame["param"]) == ["strong", "unused"], (evaluator, frame)
        assert frame["importance"].sum() == pytest.approx(1.0)
        assert frame["importance"].is_monotonic_decreasing
    noise = r.importance("noise", mode="max")  # a reported metric the search did not optimize
    assert list(noise["param"]) == ["unused", "strong"]
    assert r.importance(evaluator=optuna.importance.PedAnovaImportanceEvaluator()).equals(r.importance())


def test_importance_says_what_was_wrong(tmp_path):
    r = asha_search(tmp_path)
    with pytest.raises(ValueError, match=r"unknown importance evaluator 'fanva': did you mean 'fanova'\?"):
        r.importance(evaluator="fanva")
    with pytest.raises(ValueError, match=r"reported \['acc', 'loss'\]: did you mean 'acc'\?"):
        r.importance("accc")
    with pytest.raises(ValueError, match=r"'loss' is not what the experiment optimized.*mode='max' or"):
        r.importance("loss")
    with pytest.raises(ValueError, match=r"importance\(mode=...\) must be 'max' or 'min'"):
        r.importance(mode="maximize")
    one = unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=1), backend="inline",
                     storage=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"at least 2 completed trials with a value of value; .* has 1 of 1"):
        one.importance()


# --------------------------------------------------------------------------------------------- load
def test_load_reads_each_kind_back_as_run_returned_it(tmp_path):
    search = asha_search(tmp_path)
    loaded = unison.load(search.path)
    assert type(loaded) is unison.SearchResult and loaded.rows == search.rows
    assert loaded.best == search.best and loaded.curves.equals(search.curves)
    abl = ablation(tmp_path)
    loaded_abl = unison.load(str(abl.path))
    assert type(loaded_abl) is unison.AblationResult and loaded_abl.ablation.equals(abl.ablation)
    single = unison.run(lambda lr: {"acc": lr, "loss": 1 - lr}, hparams={"lr": 0.25}, storage=tmp_path,
                        metric="acc")
    assert unison.load(single.path) == single  # returned: the metrics, which is what it returned here


def test_load_of_a_run_that_failed_raises_its_error(tmp_path):
    def train():
        raise KeyError("no such column")

    with pytest.raises(KeyError):
        unison.run(train, storage=tmp_path, name="broken")
    with pytest.raises(unison.RunFailed, match=r"(?s)it ended failed:\n.*KeyError: 'no such column'"):
        unison.load("broken", storage=tmp_path)


def test_load_of_a_distributed_run(tmp_path):
    pytest.importorskip("torch")

    def train(ctx, reporter, lr):
        for step in range(3):
            reporter.report(step=step, acc=0.1 * step * (ctx.rank + 1))
        return {"acc": 0.5, "loss": lr}

    r = unison.run(train, unison.Distributed(workers=2, hparams={"lr": 0.3}, metric="acc"), backend="local",
                   storage=tmp_path, progress=False)
    assert unison.load(r.path) == r
    assert list(unison.load(r.path).curves["acc"]) == pytest.approx([0.0, 0.1, 0.2])  # rank 0's reports


def test_load_by_name_finds_the_newest_experiment_of_that_name(tmp_path, monkeypatch):
    older = asha_search(tmp_path, name="churn")
    newer = asha_search(tmp_path, name="churn")
    asha_search(tmp_path, name="other")
    assert unison.load("churn", storage=tmp_path).path == newer.path != older.path
    monkeypatch.chdir(tmp_path.parent)  # the default storage is ./unison-runs
    shutil.copytree(newer.path, tmp_path.parent / "unison-runs" / newer.path.name)
    assert unison.load("churn").path == Path("unison-runs") / newer.path.name
    with pytest.raises(FileNotFoundError, match=r"no experiment named 'chrun' under .*: did you mean "
                                                 r"'churn'\? The names there: \['churn', 'other'\]"):
        unison.load("chrun", storage=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"storage folder .*nowhere does not exist"):
        unison.load("churn", storage=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a unison experiment directory"):
        unison.load(tmp_path / "churn")
