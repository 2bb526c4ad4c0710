"""``unison.Pipeline``: stages run in order in one pipeline directory, each a normal experiment; a stage
without hyperparameters takes the previous search's best; errors before anything runs; ``unison show``,
``report`` and ``load`` of a pipeline; resume after an interrupt and after a driver SIGKILL; local
workers and a Spark local-cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import unison
from unison import cli

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # workers and the killed driver import this module by name
    sys.path.insert(0, str(TESTS))

from processes import journal, wait_for  # noqa: E402

_rng = np.random.default_rng(0)
DATA = {"a": _rng.normal(size=200), "b": _rng.normal(size=200)}
DATA["y"] = 2.0 * DATA["a"] + 0.1 * _rng.normal(size=200)


def train(x: float, dataset: dict[str, Any], hparams: dict[str, Any],
          ctx: unison.Context) -> dict[str, float]:
    """Best near x = 0.3; the feature ``a`` adds 0.1 (an ablation shows it), ``b`` nothing."""
    features = [name for name in dataset if name != "y"]
    workdir, sleep = hparams.get("workdir"), hparams.get("sleep", 0.0)
    if workdir is not None:
        stage = "final" if ctx.world_size > 1 else ("ablation" if "seed" in hparams else "search")
        if ctx.rank == 0:
            with open(Path(workdir) / "ran.txt", "a", encoding="utf-8") as f:
                f.write(f"{stage} {ctx.trial_id}\n")
        if stage == "ablation":
            time.sleep(sleep)
    return {"score": -abs(x - 0.3) + 0.1 * ("a" in features), "n": float(len(features)),
            "world": float(ctx.world_size)}


def space(**constants: Any) -> dict[str, Any]:
    return {"x": unison.uniform(0.0, 1.0), **constants}


def three_stages(trials: int = 6, **constants: Any) -> unison.Pipeline:
    return unison.Pipeline(
        search=unison.Search(space(**constants), metric="score", mode="max", trials=trials, seed=1),
        ablation=unison.Ablation(features=["a", "b"], label="y", repeats=2),
        final=unison.Distributed(workers=2),
    )


def stage_meta(path: Path, stage: str) -> dict[str, Any]:
    return json.loads(next((path / "stages").glob(f"*-{stage}/experiment.json")).read_text())


def check_three_stages(r: unison.PipelineResult, trials: int = 6) -> None:
    """What a completed search -> ablation -> final pipeline of ``train`` must show."""
    assert isinstance(r, unison.PipelineResult) and r.status == "completed"
    assert list(r.stages) == ["search", "ablation", "final"]
    assert [p.name for p in sorted((r.path / "stages").iterdir())] == ["1-search", "2-ablation", "3-final"]
    best = r.search.best
    assert best is not None and len(r.search.trials) == trials
    ablation = stage_meta(r.path, "ablation")
    assert ablation["kind"] == "ablation" and ablation["name"].endswith("/ablation")
    assert ablation["ablation"]["base"] == best.hparams  # the base is the search's best
    assert ablation["ablation"]["metric"] == "score"  # metric and mode are the search's
    table = r.ablation.ablation.set_index("component")
    assert table.loc["a", "diff"] == pytest.approx(-0.1) and table.loc["b", "diff"] == pytest.approx(0.0)
    final = stage_meta(r.path, "final")
    assert final["distributed"]["hparams"] == best.hparams and final["distributed"]["metric"] == "score"
    assert isinstance(r.final, unison.RunResult)
    assert r.final.metrics["world"] == 2.0  # two ranks ran it
    assert r.final.value == r.final.metrics["score"] == pytest.approx(best.metric)
    meta = json.loads((r.path / "experiment.json").read_text())
    assert meta["kind"] == "pipeline" and meta["status"] == "completed"
    assert [s["name"] for s in meta["pipeline"]["stages"]] == ["search", "ablation", "final"]


# ------------------------------------------------------------------------- inline: the whole path
def test_search_refine_and_ablation_run_in_one_pipeline_directory(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    flow = unison.Pipeline(
        search=unison.Search(space(), metric="score", mode="max", trials=6, seed=1),
        refine=unison.Search(lambda best: {"x": unison.uniform(best.hparams["x"] - 0.05,
                                                               best.hparams["x"] + 0.05)}, trials=4, seed=2),
        ablation=unison.Ablation(features=["a", "b"], label="y", repeats=2),
    )
    heard: list[tuple[str, str]] = []

    class Heard(unison.Callback):
        def on_experiment_start(self, experiment: Any) -> None:
            heard.append((experiment.name, experiment.kind))

    r = unison.run(train, flow, data=DATA, backend="inline", storage=tmp_path, name="churn",
                   callbacks=[Heard()])
    out = capsys.readouterr().out
    assert heard == [("churn/search", "search"), ("churn/refine", "search"), ("churn/ablation", "ablation")]
    assert isinstance(r, unison.PipelineResult) and r.status == "completed"
    assert "stage 2/3 'refine' (search) starts with the best trial of stage 'search'" in out
    assert "unison: churn/refine: 4 trials" in out  # the stage's own progress names the stage
    first, refine = r.search.best, r.refine.best
    assert first is not None and refine is not None and r.best == refine
    declared = stage_meta(r.path, "refine")
    assert declared["name"] == "churn/refine" and declared["search"]["metric"] == "score"
    assert declared["search"]["space"]["x"]["low"] == pytest.approx(first.hparams["x"] - 0.05)
    assert all(abs(x - first.hparams["x"]) <= 0.05 for x in r.refine.trials["x"])
    assert stage_meta(r.path, "ablation")["ablation"]["base"] == refine.hparams  # the latest search's best
    assert r.stages["ablation"] is r.ablation and len(r.ablation.trials) == 6
    with pytest.raises(AttributeError, match="no stage 'ablaton'; did you mean 'ablation'"):
        _ = r.ablaton

    for loaded in (unison.load(r.path), unison.load("churn", storage=tmp_path)):
        assert isinstance(loaded, unison.PipelineResult) and loaded.path == r.path
        assert loaded.statuses == {"search": "completed", "refine": "completed", "ablation": "completed"}
        assert loaded.refine.best == refine and loaded.best == refine
    assert "refine" in repr(r) and "<td>ablation</td>" in r._repr_html_()

    capsys.readouterr()
    assert cli.main(["show", str(r.path)]) == 0
    shown = capsys.readouterr().out
    assert "kind=pipeline" in shown and "status=completed" in shown
    assert f"stage 2 refine (search, completed): best trial {refine.trial_id}: score=" in shown
    assert "stage 3 ablation (ablation, completed): most important: a" in shown
    assert cli.main(["report", str(r.path)]) == 0
    page = (r.path / "report.html").read_text()
    assert "href='stages/3-ablation/report.html'" in page
    assert (r.path / "stages" / "3-ablation" / "report.html").is_file()


def test_a_declared_base_and_metric_are_kept(tmp_path: Path) -> None:
    flow = unison.Pipeline(search=unison.Search(space(), metric="score", trials=3, seed=0),
                           ablation=unison.Ablation(base={"x": 0.9}, features=["a"], label="y", metric="n",
                                                    mode="min"))
    r = unison.run(train, flow, data=DATA, backend="inline", storage=tmp_path, progress=False)
    declared = stage_meta(r.path, "ablation")["ablation"]
    assert declared["base"] == {"x": 0.9} and (declared["metric"], declared["mode"]) == ("n", "min")
    assert r.ablation.ablation.set_index("component").loc["a", "diff"] == -1.0  # one feature fewer


def checkpointing(x: float, dataset: dict[str, Any], reporter: Any) -> dict[str, float]:
    """Reports ``score`` 0, 1, 2, 3 with a checkpoint at each step."""
    for step in range(4):
        reporter.report(step=step, checkpoint={"step": step}, score=float(step))
    return {"score": -abs(x - 0.3) + 0.1 * ("a" in dataset)}


def test_stages_built_from_the_best_trial_keep_every_option_they_were_given(tmp_path: Path) -> None:
    flow = unison.Pipeline(
        search=unison.Search(space(), metric="score", trials=2, seed=0),
        ablation=unison.Ablation(features=["a"], label="y", keep_checkpoints=1),
        final=unison.Distributed(workers=1, max_retries=3, keep_checkpoints=1, mode="min", timeout_s=42.0))
    r = unison.run(checkpointing, flow, data=DATA, backend="inline", storage=tmp_path, progress=False)
    ablation, final = stage_meta(r.path, "ablation")["ablation"], stage_meta(r.path, "final")["distributed"]
    assert (ablation["keep_checkpoints"], ablation["metric"]) == (1, "score")
    assert final["hparams"] == r.search.best.hparams and final["metric"] == "score"  # taken from the search
    declared = (final["max_retries"], final["keep_checkpoints"], final["mode"], final["timeout_s"])
    assert declared == (3, 1, "min", 42.0)

    def kept(stage: str) -> list[list[int]]:
        trials = sorted(next((r.path / "stages").glob(f"*-{stage}")).glob("trials/*/checkpoints"))
        return [sorted(int(c.name.split("-")[1]) for c in folder.iterdir()) for folder in trials]

    assert kept("ablation") == [[3], [3]]  # keep_checkpoints=1: the last, which is the best (mode max)
    assert kept("final") == [[0, 3]]  # the last and the best by mode="min"
    assert kept("search") == [[2, 3], [2, 3]]  # the default: the last two


# ----------------------------------------------------------------------------- errors, up front
@pytest.mark.parametrize("make, error, match", [
    (lambda: unison.Pipeline(), ValueError, "needs at least one stage"),
    (lambda: unison.Pipeline(search={"x": 1}), TypeError, r"must be a unison.Search, unison.Ablation or "),
    (lambda: unison.Pipeline(ablation=unison.Ablation(features=["a"])), ValueError,
     "stage 'ablation': the Ablation has no base= and no Search stage runs before it .* pass base="),
    (lambda: unison.Pipeline(ablation=unison.Ablation(base={"x": 1}, features=["a"]),
                             final=unison.Distributed(workers=2)), ValueError,
     "stage 'final': the Distributed run has no hparams= .* pass hparams=.*or put a unison.Search stage"),
    (lambda: unison.Pipeline(refine=unison.Search(lambda best: {})), ValueError,
     r"stage 'refine': Search\(space=<function>\) .* pass space= a dict"),
    (lambda: unison.Pipeline(search=unison.Search(space(), metric=["score", "n"], mode=["max", "min"]),
                             final=unison.Distributed(workers=2)), ValueError, "several objectives"),
    (lambda: unison.Pipeline(search=unison.Search(space(seed=unison.integer(0, 9))),
                             ablation=unison.Ablation(features=["a"])), ValueError, "'seed' .* rename it"),
    (lambda: unison.Pipeline(path=unison.Search(space())), ValueError, "taken by PipelineResult.path"),
])
def test_a_pipeline_that_cannot_run_is_refused_where_it_is_written(make: Any, error: type,
                                                                    match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_a_callable_space_outside_a_pipeline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use it as a stage of a unison.Pipeline after a Search stage"):
        unison.run(train, unison.Search(lambda best: {"x": 1.0}), data=DATA, backend="inline",
                   storage=tmp_path)


@pytest.mark.parametrize("fn, backend, match", [
    (train, "inline", "stage 'final' runs each trial as 2 processes, which backend 'inline' cannot"),
    (lambda x, y: x, "local", "'y'"),  # a parameter nothing can inject
    (lambda x: x, "local", "the ablation removes features, but .* asks for neither 'dataset' nor 'data_fn'"),
])
def test_what_can_be_checked_fails_before_anything_is_written(tmp_path: Path, fn: Any, backend: str,
                                                              match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        unison.run(fn, three_stages(), data=DATA, backend=backend, storage=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_metric_the_function_does_not_return_fails_at_that_stage_naming_the_fix(tmp_path: Path) -> None:
    flow = unison.Pipeline(search=unison.Search(space(), metric="score", trials=3, seed=0),
                           ablation=unison.Ablation(features=["a"], label="y", metric="accuracy"))
    with pytest.raises(ValueError, match=r"stage 'ablation' reads the metric 'accuracy', but the training "
                                         r"function does not return it .*\['n', 'score', 'world'\]\): pass "
                                         r"unison.Ablation\(metric=...\) one of those"):
        unison.run(train, flow, data=DATA, backend="inline", storage=tmp_path, progress=False)
    r = unison.load(next(tmp_path.iterdir()))
    assert isinstance(r, unison.PipelineResult) and r.status == "failed"
    assert r.statuses == {"search": "completed", "ablation": "pending"}
    with pytest.raises(AttributeError, match="stage 'ablation' has no result: it is pending"):
        _ = r.ablation


# ---------------------------------------------------------------------------------- resume inline
def test_an_interrupted_pipeline_resumes_at_its_stage_without_rerunning_the_search(tmp_path: Path) -> None:
    calls: list[str] = []
    interrupt = [True]

    def interrupted(x: float, dataset: Any, hparams: dict[str, Any], ctx: unison.Context) -> dict[str, float]:
        calls.append("ablation" if "seed" in hparams else "search")
        if calls.count("ablation") == 3 and interrupt and interrupt.pop():  # in the 3rd ablation trial, once
            raise KeyboardInterrupt
        return train(x, dataset, hparams, ctx)

    flow = unison.Pipeline(search=unison.Search(space(), metric="score", trials=6, seed=1),
                           ablation=unison.Ablation(features=["a", "b"], label="y", repeats=2))
    with pytest.raises(KeyboardInterrupt) as info:
        unison.run(interrupted, flow, data=DATA, backend="inline", storage=tmp_path, progress=False)
    path = next(tmp_path.iterdir())
    assert info.value.unison_experiment == path  # type: ignore[attr-defined]
    assert json.loads((path / "experiment.json").read_text())["status"] == "interrupted"
    search_journal = (path / "stages" / "1-search" / "journal.jsonl").read_bytes()
    assert calls.count("search") == 6

    calls.clear()
    r = unison.run(interrupted, flow, data=DATA, backend="inline", resume=path, progress=False)
    assert isinstance(r, unison.PipelineResult) and r.status == "completed" and r.path == path
    assert "search" not in calls and calls.count("ablation") == 4  # the two ended trials are kept
    assert (path / "stages" / "1-search" / "journal.jsonl").read_bytes() == search_journal
    assert list(r.ablation.trials["status"]) == ["completed"] * 6
    events = [ev.get("status") for ev in journal(path) if ev["e"] == "status"]
    assert events == ["running", "interrupted", "resumed", "completed"]
    other = unison.Pipeline(search=unison.Search(space(), metric="score", trials=5, seed=1))
    with pytest.raises(ValueError, match="the pipeline differs from the one stored in"):
        unison.run(train, other, data=DATA, backend="inline", resume=path)


# ---------------------------------------------------------------------------- local worker processes
@pytest.mark.slow
def test_search_ablation_final_on_local_workers(tmp_path: Path) -> None:
    r = unison.run(train, three_stages(), data=DATA, backend=unison.Local(workers=2), storage=tmp_path,
                   name="churn", progress=False)
    assert isinstance(r, unison.PipelineResult)
    check_three_stages(r)
    assert stage_meta(r.path, "final")["workers"] == 2


def fails_in_final(x: float, workdir: str, ctx: unison.Context) -> float:
    if ctx.world_size > 1 and (Path(workdir) / "fail").exists():
        raise RuntimeError("the final run broke")
    return x


@pytest.mark.slow
def test_a_failed_final_stage_runs_again_on_resume(tmp_path: Path) -> None:
    (tmp_path / "fail").touch()
    flow = unison.Pipeline(search=unison.Search(space(workdir=str(tmp_path)), trials=2, seed=0),
                           final=unison.Distributed(workers=2))
    broke = r"(?s)stage 'final' of the pipeline .* failed: .*the final run broke.*Resuming the pipeline runs"
    with pytest.raises(unison.RunFailed, match=broke):
        unison.run(fails_in_final, flow, backend=unison.Local(workers=2), storage=tmp_path / "runs",
                   progress=False)
    path = next((tmp_path / "runs").iterdir())
    failed = unison.load(path)
    assert isinstance(failed, unison.PipelineResult) and failed.status == "failed"
    assert failed.statuses["final"] == "failed" and "final" not in failed.stages
    (tmp_path / "fail").unlink()
    r = unison.resume(path, fails_in_final, backend=unison.Local(workers=2), progress=False)
    assert isinstance(r, unison.PipelineResult) and r.status == "completed"
    assert r.final.value == pytest.approx(r.search.best.metric)
    assert (path / "stages" / "2-final.failed-1" / "experiment.json").is_file()  # the failed run is kept


def drive(storage: str, workdir: str) -> None:
    """The killed driver of the test below: the pipeline on two local workers."""
    flow = three_stages(workdir=workdir, sleep=0.5)
    unison.run(train, flow, data=DATA, backend=unison.Local(workers=2), storage=storage, name="killed",
               progress=False)


@pytest.mark.slow
def test_driver_killed_during_the_ablation_resumes_there(tmp_path: Path) -> None:
    storage, work = tmp_path / "runs", tmp_path / "work"
    work.mkdir()
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_pipeline; " \
           f"test_pipeline.drive({str(storage)!r}, {str(work)!r})"
    with open(tmp_path / "driver.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        ablation = wait_for(lambda: [p for p in storage.glob("*/stages/2-ablation")
                                     if (p / "journal.jsonl").is_file()], 60, "the ablation stage")[0]
        wait_for(lambda: any(ev["e"] == "end" for ev in journal(ablation)), 60, "an ablation trial to end")
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "driver.out").read_text()
    path = ablation.parent.parent
    search_journal = (path / "stages" / "1-search" / "journal.jsonl").read_bytes()
    ended_before = {ev["id"] for ev in journal(ablation) if ev["e"] == "end"}
    assert 0 < len(ended_before) < 6 and not (path / "stages" / "3-final").exists()

    r = unison.resume(path, train, data=DATA, backend=unison.Local(workers=2), progress=False)
    assert isinstance(r, unison.PipelineResult) and r.path == path
    check_three_stages(r)
    assert (path / "stages" / "1-search" / "journal.jsonl").read_bytes() == search_journal
    runs = Counter(tuple(line.split()) for line in (work / "ran.txt").read_text().splitlines())
    assert sum(n for (stage, _), n in runs.items() if stage == "search") == 6  # the search ran once
    assert all(runs[("ablation", str(tid))] == 1 for tid in ended_before)  # ended trials were kept
    assert {tid for (stage, tid) in runs if stage == "ablation"} == {str(t) for t in range(6)}
    assert runs[("final", "0")] == 1
    assert stage_meta(path, "ablation")["status"] == "completed"


# ------------------------------------------------------------------------------------------ Spark
@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("pyspark")
    from spark_support import cluster_session

    return cluster_session(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_search_ablation_final_on_a_spark_local_cluster(spark: Any, tmp_path: Path) -> None:
    from spark_support import active_jobs

    backend = unison.Spark(spark)
    r = unison.run(train, three_stages(trials=4), data=DATA, backend=backend, storage=tmp_path,
                   name="churn", progress=False)
    assert isinstance(r, unison.PipelineResult)
    check_three_stages(r, trials=4)
    assert stage_meta(r.path, "search")["backend"].startswith("Spark(")
    assert active_jobs(spark) == []
