"""``unison.run``: single runs, injection by name, validation before anything runs, search results,
the experiment directory, backends agreeing with one another, and a light ``import unison``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import unison

# ------------------------------------------------------------------------------------ single run


def test_single_run_returning_a_number(tmp_path):
    r = unison.run(lambda lr: lr * 2, hparams={"lr": 1.5}, storage=tmp_path)
    assert r.value == 3.0
    assert r.metrics == {"value": 3.0}
    assert r.returned == 3.0
    r = unison.run(lambda: 0.25, storage=tmp_path, metric="loss")
    assert r.metrics == {"loss": 0.25} and r.value == 0.25


def test_single_run_returning_a_dict(tmp_path):
    r = unison.run(lambda: {"accuracy": 0.9, "loss": 0.3}, storage=tmp_path, metric="accuracy")
    assert r.metrics == {"accuracy": 0.9, "loss": 0.3}
    assert r.value == 0.9
    assert unison.run(lambda: {"accuracy": 0.7}, storage=tmp_path).value == 0.7  # the only entry
    assert unison.run(lambda: {"a": 1.0, "b": 2.0}, storage=tmp_path).value is None  # ambiguous
    result = json.loads((r.path / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"] == {"accuracy": 0.9, "loss": 0.3}


class Boom(Exception):
    pass


def test_single_run_exception_propagates_unchanged_from_this_process(tmp_path):
    def train(hparams):
        raise Boom(os.getpid(), threading.get_ident())

    with pytest.raises(Boom) as info:
        unison.run(train, hparams={"x": 1}, storage=tmp_path)
    assert type(info.value) is Boom
    assert info.value.args == (os.getpid(), threading.get_ident())  # raised here, in this thread
    assert info.traceback[-1].name == "train"  # the user's own frame is in the traceback
    (experiment,) = tmp_path.iterdir()
    assert json.loads((experiment / "experiment.json").read_text())["status"] == "failed"
    ends = [json.loads(line) for line in (experiment / "journal.jsonl").read_text().splitlines()]
    assert ends[-1]["status"] == "failed" and "Boom" in ends[-1]["error"]


def test_single_run_prints_reach_the_real_stdout(tmp_path, capsys):
    def train():
        print("hello from train")
        print("to stderr", file=sys.stderr)
        return 1.0

    unison.run(train, storage=tmp_path)
    captured = capsys.readouterr()
    assert "hello from train" in captured.out
    assert "to stderr" in captured.err


# ------------------------------------------------------------------------------------- injection
def test_injects_hparams_and_individual_hyperparameters(tmp_path):
    seen = {}

    def train(lr, hparams, units=99, unused_default="d"):
        seen.update(lr=lr, hparams=hparams, units=units, unused_default=unused_default)
        hparams["lr"] = "mutated"  # a copy: the caller's dict is not changed
        return 0.0

    given = {"lr": 0.01, "units": 64}
    unison.run(train, hparams=given, storage=tmp_path)
    assert seen == {"lr": 0.01, "hparams": {"lr": "mutated", "units": 64}, "units": 64,
                    "unused_default": "d"}
    assert given == {"lr": 0.01, "units": 64}


def test_injected_reporter_records_metrics(tmp_path):
    def train(reporter):
        for step in range(3):
            reporter.report(step=step, loss=1.0 / (step + 1))
        reporter.report(acc=0.5)  # default step: the report count
        return 0.0

    r = unison.run(train, storage=tmp_path)
    lines = [json.loads(line) for line in (r.path / "trials" / "0000" / "metrics.jsonl").read_text()
             .splitlines()]
    assert lines == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 1 / 3},
                     {"step": 3, "acc": 0.5}]


def test_reporter_rejects_non_numeric_metrics(tmp_path):
    def train(reporter):
        reporter.report(step=0, name="abc")

    with pytest.raises(TypeError, match="metrics must be numbers"):
        unison.run(train, storage=tmp_path)


def test_injected_ctx_has_a_trial_dir_whose_files_are_kept(tmp_path):
    seen = {}

    def train(ctx):
        seen.update(exists=ctx.trial_dir.is_dir(), rank=ctx.rank, world_size=ctx.world_size,
                    chief=ctx.is_chief, trial_id=ctx.trial_id)
        (ctx.trial_dir / "model.txt").write_text("weights")
        return 1.0

    r = unison.run(train, storage=tmp_path)
    assert seen == {"exists": True, "rank": 0, "world_size": 1, "chief": True, "trial_id": 0}
    assert (r.path / "trials" / "0000" / "model.txt").read_text() == "weights"


def test_model_is_built_from_model_fn_with_the_hparams(tmp_path):
    calls = []

    def model_fn(hparams):
        calls.append(dict(hparams))
        return ("model", hparams["units"])

    def train(model):
        return {"units": float(model[1])}

    r = unison.run(train, hparams={"units": 32}, model=model_fn, storage=tmp_path)
    assert r.value == 32.0
    assert calls == [{"units": 32}]


def test_model_fn_is_not_called_when_the_function_does_not_ask_for_a_model(tmp_path):
    calls = []
    unison.run(lambda: 1.0, model=lambda hp: calls.append(hp), storage=tmp_path)
    assert calls == []


@pytest.mark.parametrize("data, expected", [
    (lambda hparams: [hparams["n"]] * 3, [4, 4, 4]),  # data_fn(hparams)
    (lambda: [1, 2], [1, 2]),  # a data_fn that takes no hyperparameters
    ([7, 8, 9], [7, 8, 9]),  # the dataset itself
])
def test_dataset_from_data_fn_or_plain_object(tmp_path, data, expected):
    seen = []

    def train(dataset):
        seen.append(dataset)
        return 0.0

    unison.run(train, hparams={"n": 4}, data=data, storage=tmp_path)
    assert seen == [expected]


def test_model_fn_and_data_fn_are_injected_as_generators(tmp_path):
    def model_fn(hparams):
        return {"units": hparams["units"]}

    def data_fn(hparams):
        return list(range(hparams["units"]))

    seen = {}

    def train(model_fn, data_fn, hparams):
        seen["model"] = model_fn(hparams)
        seen["model_default"] = model_fn()  # the trial's own hparams
        seen["model_other"] = model_fn({"units": 1})
        seen["data"] = data_fn()
        return 0.0

    unison.run(train, hparams={"units": 3}, model=model_fn, data=data_fn, storage=tmp_path)
    assert seen == {"model": {"units": 3}, "model_default": {"units": 3}, "model_other": {"units": 1},
                    "data": [0, 1, 2]}


def test_data_fn_of_a_plain_object_returns_it(tmp_path):
    seen = []
    unison.run(lambda data_fn: seen.append(data_fn()) or 0.0, data={"x": 1}, storage=tmp_path)
    assert seen == [{"x": 1}]


# ---------------------------------------------------------------------- validation before running
def assert_nothing_created(storage):
    assert not storage.exists() or not any(storage.iterdir()), list(storage.iterdir())


def test_unknown_parameter_fails_before_running_and_lists_what_can_be_injected(tmp_path):
    storage = tmp_path / "runs"
    calls = []

    def train(hparams, optimizer_state):
        calls.append(1)

    with pytest.raises(TypeError) as info:
        unison.run(train, hparams={"lr": 0.1}, storage=storage)
    message = str(info.value)
    assert "'optimizer_state'" in message
    for name in ("hparams", "reporter", "ctx", "model", "dataset", "model_fn", "data_fn", "lr"):
        assert name in message
    assert calls == []
    assert_nothing_created(storage)


def test_unknown_parameter_in_a_search_fails_before_any_trial(tmp_path):
    storage = tmp_path / "runs"
    with pytest.raises(TypeError, match=r"'units'.*cannot inject.*\(lr\)"):
        unison.run(lambda lr, units: lr, unison.Search({"lr": unison.uniform(0, 1)}, trials=2),
                   backend="inline", storage=storage, progress=False)
    assert_nothing_created(storage)


@pytest.mark.parametrize("param", ["model", "model_fn"])
def test_model_asked_without_model_fails_early(tmp_path, param):
    storage = tmp_path / "runs"
    fn = {"model": lambda model: 0.0, "model_fn": lambda model_fn: 0.0}[param]
    with pytest.raises(TypeError, match=rf"asks for '{param}' but no model generator.*model=model_fn"):
        unison.run(fn, hparams={}, storage=storage)
    assert_nothing_created(storage)


@pytest.mark.parametrize("param", ["dataset", "data_fn"])
def test_dataset_asked_without_data_fails_early(tmp_path, param):
    storage = tmp_path / "runs"
    fn = {"dataset": lambda dataset: 0.0, "data_fn": lambda data_fn: 0.0}[param]
    with pytest.raises(TypeError, match=rf"asks for '{param}' but no data.*data=data_fn"):
        unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=1), backend="inline",
                   storage=storage, progress=False)
    assert_nothing_created(storage)


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "bayes"}, r"unknown optimizer 'bayes'"),
    ({"scheduler": "hyperbandit"}, r"unknown scheduler 'hyperbandit'.*'median'"),  # among others
    ({"trials": 0}, r"trials=\.\.\.\) must be a whole number >= 1, got 0"),
    ({"mode": "best"}, r"mode must be 'max' or 'min'.*'best'"),
])
def test_invalid_search_arguments_fail_when_written(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unison.Search({"x": unison.uniform(0, 1)}, **kwargs)


@pytest.mark.parametrize("single", [True, False])
def test_unknown_backend_name_fails_before_running(tmp_path, single):
    storage = tmp_path / "runs"
    with pytest.raises(ValueError, match=r"unknown backend 'spork'.*'inline'.*'local'"):
        if single:
            unison.run(lambda: 0.0, backend="spork", storage=storage)
        else:
            unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=1),
                       backend="spork", storage=storage, progress=False)
    assert_nothing_created(storage)


@pytest.mark.parametrize("backend", ["local", unison.Local(workers=2)])
def test_unpicklable_closure_is_named_before_workers_start(tmp_path, backend):
    storage = tmp_path / "runs"
    guard = threading.Lock()

    def train(x):
        with guard:
            return x

    with pytest.raises(TypeError, match=r"closure variable 'guard'.*cannot be pickled") as info:
        unison.run(train, unison.Search({"x": unison.uniform(0, 1)}, trials=2), backend=backend,
                   storage=storage, progress=False)
    assert "backend='inline'" in str(info.value)  # says what would work instead
    assert_nothing_created(storage)


def test_unpicklable_closure_is_fine_inline(tmp_path):
    guard = threading.Lock()

    def train(x):
        with guard:
            return x

    r = unison.run(train, unison.Search({"x": unison.uniform(0, 1)}, trials=2, seed=0),
                   backend="inline", storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed", "completed"]


# --------------------------------------------------------------------------------- search results
XS = [3.0, 1.0, 4.0, 1.5, 9.0, 2.0]


def score_train(x, reporter):
    print(f"trial with x={x}")
    reporter.report(step=0, score=x / 2)
    reporter.report(step=1, score=x)
    return {"score": x, "neg": -x}


@pytest.mark.parametrize("mode, best_id, best_x", [("max", 4, 9.0), ("min", 1, 1.0)])
def test_best_trial_for_max_and_min(tmp_path, mode, best_id, best_x):
    search = unison.Search({"x": unison.choice(XS), "tag": "t"}, metric="score", mode=mode,
                           optimizer="grid")
    r = unison.run(score_train, search, backend="inline", storage=tmp_path, progress=False)
    assert r.best.trial_id == best_id
    assert r.best.hparams == {"x": best_x, "tag": "t"}
    assert r.best.metric == best_x
    assert r.best.metrics == {"score": best_x, "neg": -best_x}
    assert r.status == "completed"
    stored = json.loads((r.path / "result.json").read_text())
    assert stored["best"]["trial_id"] == best_id and stored["status"] == "completed"


def test_trials_table_has_one_row_per_trial(tmp_path):
    search = unison.Search({"x": unison.choice(XS), "tag": "t"}, metric="score", optimizer="grid")
    began = time.perf_counter()
    r = unison.run(score_train, search, backend="inline", storage=tmp_path, progress=False)
    wall = time.perf_counter() - began
    table = r.trials
    assert len(table) == len(XS)
    for column in ("trial_id", "status", "x", "tag", "score", "neg", "steps", "duration", "worker"):
        assert column in table.columns, column
    assert list(table["trial_id"]) == list(range(len(XS)))
    assert list(table["x"]) == XS
    assert list(table["score"]) == XS and list(table["neg"]) == [-x for x in XS]
    assert set(table["status"]) == {"completed"}
    assert set(table["steps"]) == {2}
    assert set(table["worker"]) == {"inline"}
    assert (table["duration"] > 0).all() and table["duration"].sum() < wall, (list(table["duration"]), wall)


def test_trial_durations_are_the_time_the_function_ran(tmp_path):
    naps = [0.05, 0.25, 0.15]
    search = unison.Search({"nap": unison.choice(naps)}, metric="value", optimizer="grid")

    def train(nap):
        time.sleep(nap)
        return nap

    table = unison.run(train, search, backend="inline", storage=tmp_path, progress=False).trials
    assert list(table["nap"]) == naps
    for nap, duration in zip(table["nap"], table["duration"], strict=True):
        assert nap <= duration < nap + 0.2, (nap, duration)  # the slack is for a loaded machine


def test_hyperparameter_named_like_a_table_column_keeps_its_value(tmp_path):
    search = unison.Search({"steps": unison.choice([100, 200])}, optimizer="grid")

    def train(steps, reporter):
        reporter.report(step=0, value=1.0)
        return steps / 100

    table = unison.run(train, search, backend="inline", storage=tmp_path, progress=False).trials
    assert list(table["hparam:steps"]) == [100, 200]
    assert list(table["steps"]) == [1, 1]  # the number of reports
    assert list(table["value"]) == [1.0, 2.0]


def test_experiment_directory_layout(tmp_path, capsys):
    search = unison.Search({"x": unison.choice([1.0, 2.0])}, metric="score", optimizer="grid")
    r = unison.run(score_train, search, backend="inline", storage=tmp_path, progress=False)
    assert r.path.parent == tmp_path
    meta = json.loads((r.path / "experiment.json").read_text())
    assert meta["kind"] == "search" and meta["status"] == "completed"
    assert meta["search"]["metric"] == "score"
    events = [json.loads(line) for line in (r.path / "journal.jsonl").read_text().splitlines()]
    assert all(isinstance(e, dict) for e in events)
    assert [e["id"] for e in events if e.get("e") == "start"] == [0, 1]
    assert [e["status"] for e in events if e.get("e") == "end"] == ["completed", "completed"]
    assert json.loads((r.path / "result.json").read_text())["status"] == "completed"
    for trial_id, x in enumerate([1.0, 2.0]):
        trial_dir = r.path / "trials" / f"{trial_id:04d}"
        assert (trial_dir / "stdout.log").read_text() == f"trial with x={x}\n"
        metrics = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
        assert metrics == [{"step": 0, "score": x / 2}, {"step": 1, "score": x}]
    assert "trial with x=" not in capsys.readouterr().out  # trial output goes to its log


def test_search_result_loads_back_from_its_directory(tmp_path):
    search = unison.Search({"x": unison.choice(XS)}, metric="score", optimizer="grid")
    r = unison.run(score_train, search, backend="inline", storage=tmp_path, progress=False)
    loaded = unison.SearchResult.load(r.path)
    assert loaded.best == r.best
    assert list(loaded.trials["x"]) == XS


# ---------------------------------------------------------------------------- backends agree
SPACE = {"x": unison.uniform(0, 1), "k": unison.choice([1, 2, 3]), "n": unison.integer(1, 5),
         "c": 7}


def agree_train(x, k, n, c, reporter):
    reporter.report(step=0, value=x)
    return x * k + n + c


def outcomes(result) -> set[tuple[str, float]]:
    return {(json.dumps(row["hparams"], sort_keys=True), row["value"]) for row in result.rows}


@pytest.fixture(scope="module")
def inline_outcomes(tmp_path_factory):
    search = unison.Search(SPACE, trials=6, seed=11)
    r = unison.run(agree_train, search, backend="inline", storage=tmp_path_factory.mktemp("inline"),
                   progress=False)
    assert len(r.rows) == 6
    return outcomes(r)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", unison.Local(workers=2)], ids=["local", "Local(2)"])
def test_local_backends_give_the_same_trials_as_inline(tmp_path, inline_outcomes, backend):
    search = unison.Search(SPACE, trials=6, seed=11)
    r = unison.run(agree_train, search, backend=backend, storage=tmp_path, progress=False)
    assert r.status == "completed"
    assert set(r.trials["status"]) == {"completed"}
    assert outcomes(r) == inline_outcomes
    assert all(w.startswith("worker-") for w in r.trials["worker"])


@pytest.mark.slow
def test_local_grid_matches_inline_grid(tmp_path):
    space = {"a": unison.choice([1, 2, 3]), "b": unison.integer(0, 2), "c": "const"}

    def run(backend):
        search = unison.Search(space, optimizer="grid", seed=3)
        return unison.run(grid_train, search, backend=backend, storage=tmp_path, progress=False)

    inline, local = run("inline"), run(unison.Local(workers=2))
    assert len(local.rows) == 9
    assert outcomes(local) == outcomes(inline)
    assert local.best.hparams == inline.best.hparams == {"a": 3, "b": 2, "c": "const"}


def grid_train(a, b):
    return a * 10 + b


# -------------------------------------------------------------------------------------- import
def test_import_is_light_and_fast():
    code = (
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import unison\n"
        "elapsed = time.perf_counter() - t\n"
        "heavy = [m for m in ('torch', 'pyspark', 'tensorflow', 'pandas') if m in sys.modules]\n"
        "print(json.dumps({'elapsed': elapsed, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["elapsed"] < 1.0


def test_a_single_run_gets_an_int_seed_like_every_other_context(tmp_path):
    import torch

    def train(hparams, ctx):
        torch.manual_seed(ctx.seed)  # what a search trial's function does: must work unchanged here
        return float(ctx.seed)

    given = unison.run(train, hparams={"seed": 7}, storage=tmp_path)
    assert given.value == 7.0
    drawn = unison.run(train, hparams={"lr": 0.1}, storage=tmp_path)
    recorded = json.loads((drawn.path / "experiment.json").read_text())["seed"]
    assert isinstance(recorded, int) and drawn.value == float(recorded)
