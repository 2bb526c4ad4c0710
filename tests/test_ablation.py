"""Ablation studies: feature, module and variant ablation, repeats and paired seeds, custom ablators,
errors before any trial runs, the result table and plot, ``unison show``/``ls``, resume, and the same
table on every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import unison
from unison import cli
from unison.contexts.ablation import BASELINE

torch = pytest.importorskip("torch")
nn = torch.nn

SPARK_REGISTERED = "spark" in unison.backends.backend_names()


# --------------------------------------------------------------------------------- tabular problem
def tabular(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """The label ``y`` depends strongly on A, weakly on B, not at all on C."""
    rng = np.random.default_rng(seed)
    a, b, c, noise = rng.normal(size=(4, n))
    return pd.DataFrame({"A": a, "B": b, "C": c, "y": 3.0 * a + 0.7 * b + 0.3 * noise})


def columns_of(dataset: Any) -> dict[str, np.ndarray]:
    """Name -> column for a DataFrame, a dict of arrays or a NumPy structured array."""
    if isinstance(dataset, pd.DataFrame):
        return {str(c): dataset[c].to_numpy() for c in dataset.columns}
    if isinstance(dataset, dict):
        return {k: np.asarray(v) for k, v in dataset.items()}
    return {name: dataset[name] for name in dataset.dtype.names}


def r2_score(dataset: Any, seed: int, ridge: float = 0.0) -> dict[str, float]:
    """Least squares (with a ridge penalty) on a split drawn from ``seed``; the held-out R². Fails if
    the label is gone."""
    cols = columns_of(dataset)
    y = cols.pop("y")  # the label is never removed: a KeyError here fails the trial
    x = np.column_stack([*cols.values(), np.ones(len(y))])
    idx = np.random.default_rng(seed).permutation(len(y))
    train, test = idx[: len(y) // 2], idx[len(y) // 2:]
    w = np.linalg.solve(x[train].T @ x[train] + ridge * np.eye(x.shape[1]), x[train].T @ y[train])
    r2 = 1.0 - np.mean((x[test] @ w - y[test]) ** 2) / np.var(y[test])
    return {"r2": float(r2), "n_features": float(len(cols))}


def fit_r2(dataset: Any, hparams: dict[str, Any], ctx: unison.Context) -> dict[str, float]:
    """The study's training function: the injected seed picks the split."""
    assert hparams["seed"] == ctx.seed, (hparams["seed"], ctx.seed)
    return r2_score(dataset, hparams["seed"], hparams.get("ridge", 0.0))


def feature_study(**kwargs: Any) -> unison.Ablation:
    options = {"features": ["A", "B", "C"], "label": "y", "metric": "r2", "mode": "max", "repeats": 5}
    return unison.Ablation(**{**options, **kwargs})


def run_inline(fn: Any, study: unison.Ablation, tmp_path: Path, **kwargs: Any) -> unison.AblationResult:
    result = unison.run(fn, study, backend="inline", storage=tmp_path / "runs", progress=False, **kwargs)
    assert isinstance(result, unison.AblationResult)
    return result


def row(table: pd.DataFrame, component: str) -> pd.Series:
    (index,) = table.index[table["component"] == component]
    return table.loc[index]


def check_feature_ranking(table: pd.DataFrame) -> None:
    assert list(table["component"]) == ["baseline", "A", "B", "C"]
    assert list(table["kind"]) == ["baseline", "feature", "feature", "feature"]
    assert list(table["n"]) == [5, 5, 5, 5]
    assert str(table["rank"].dtype) == "Int64"
    assert table["rank"].isna().tolist() == [True, False, False, False]
    assert [row(table, c)["rank"] for c in "ABC"] == [1, 2, 3]
    a, b, c = (row(table, name) for name in "ABC")
    assert a["diff"] < -0.5 and a["diff_ci_high"] < 0  # clearly needed
    assert -0.2 < b["diff"] < 0 and b["diff_ci_high"] < 0  # needed a little, and the interval says so
    assert c["diff_ci_low"] <= 0 <= c["diff_ci_high"]  # not needed: the interval contains 0
    assert abs(c["diff"]) < 0.01
    assert row(table, "baseline")["diff"] == 0.0


# ------------------------------------------------------------------------------- feature ablation
def test_feature_ablation_ranks_a_over_b_over_c_on_a_dataframe(tmp_path):
    result = run_inline(fit_r2, feature_study(), tmp_path, data=tabular())
    check_feature_ranking(result.ablation)
    trials = result.trials
    assert len(trials) == 20 and set(trials["status"]) == {"completed"}
    assert (trials.loc[trials["component"] == "baseline", "n_features"] == 3).all()
    assert (trials.loc[trials["component"] != "baseline", "n_features"] == 2).all()


@pytest.mark.parametrize("form", ["dict", "structured"])
def test_feature_ablation_on_a_dict_of_arrays_and_a_structured_array(tmp_path, form):
    frame = tabular()
    if form == "dict":
        data: Any = {name: frame[name].to_numpy() for name in frame.columns}
    else:
        data = frame.to_records(index=False)
        assert isinstance(data, np.ndarray) and data.dtype.names == ("A", "B", "C", "y")
    reference = run_inline(fit_r2, feature_study(), tmp_path / "frame", data=frame).ablation
    table = run_inline(fit_r2, feature_study(), tmp_path / form, data=data).ablation
    check_feature_ranking(table)
    pd.testing.assert_frame_equal(table, reference)


def test_a_data_generator_is_ablated_too(tmp_path):
    seen: list[tuple[str, ...]] = []

    def train(data_fn, hparams):
        seen.append(tuple(data_fn(hparams).columns))
        return 0.0

    run_inline(train, unison.Ablation(features=["A", "C"], label="y", repeats=1), tmp_path,
               data=lambda hparams: tabular(50))
    assert seen == [("A", "B", "C", "y"), ("B", "C", "y"), ("A", "B", "y")]


def test_feature_groups_are_removed_together(tmp_path):
    study = feature_study(features={"ab": ["A", "B"], "c": ["C"]}, repeats=2)
    table = run_inline(fit_r2, study, tmp_path, data=tabular()).ablation
    assert list(table["component"]) == ["baseline", "ab", "c"]
    assert row(table, "ab")["diff"] < -0.9 and row(table, "ab")["rank"] == 1
    assert row(table, "c")["rank"] == 2


def test_an_unknown_feature_fails_before_any_trial_runs_listing_the_columns(tmp_path):
    calls = []
    with pytest.raises(ValueError, match=r"\['D'\].*its columns are \['A', 'B', 'C', 'y'\]"):
        unison.run(lambda dataset: calls.append(1) or 0.0, feature_study(features=["A", "D"]),
                   data=tabular(), backend="inline", storage=tmp_path / "runs", progress=False)
    assert calls == [] and not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match=r"label='target' is not a column.*\['A', 'B', 'C', 'y'\]"):
        unison.run(lambda dataset: 0.0, feature_study(label="target"), data=tabular(),
                   backend="inline", storage=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_feature_ablation_needs_data_with_columns(tmp_path):
    with pytest.raises(ValueError, match="pass data="):
        unison.run(lambda: 0.0, feature_study(), backend="inline", storage=tmp_path)
    with pytest.raises(TypeError, match="DataFrame, a dict of arrays or a NumPy structured array.*list"):
        unison.run(lambda dataset: 0.0, feature_study(), data=[[1, 2, 3]], backend="inline",
                   storage=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_function_that_never_sees_the_ablated_part_fails_before_any_trial_runs(tmp_path):
    with pytest.raises(TypeError, match="removes features, but .* asks for neither 'dataset' nor 'data_fn'"):
        unison.run(lambda hparams: 0.0, feature_study(), data=tabular(), backend="inline",
                   storage=tmp_path / "runs")
    with pytest.raises(TypeError, match="changes the model, but .* asks for neither 'model' nor 'model_fn'"):
        unison.run(lambda dataset: 0.0, module_study(), model=net_fn, data=tabular(), backend="inline",
                   storage=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_the_label_is_never_ablated():
    with pytest.raises(ValueError, match="label column 'y' cannot be ablated"):
        feature_study(features=["A", "y"])
    with pytest.raises(ValueError, match="label column 'y' cannot be ablated"):
        feature_study(features={"everything": ["A", "B", "C", "y"]})

    class DropEverything(unison.Ablator):
        def components(self, features, modules, variants):
            return [BASELINE, unison.Component("all", "custom", features=("A", "y"))]

    with pytest.raises(ValueError, match="component 'all' removes the label column 'y'"):
        feature_study(ablator=DropEverything())


# ----------------------------------------------------------------------------- module ablation
class Net(nn.Module):
    """A one-hidden-layer regressor with a dropout at p=0 that never changes the output."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(2, hidden)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(p=0.0)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Any) -> Any:
        return self.out(self.drop(self.act(self.inp(x))))


def net_fn(hparams: dict[str, Any]) -> Net:
    torch.manual_seed(hparams["seed"])
    return Net(hparams.get("hidden", 16))


def small_net_fn(hparams: dict[str, Any]) -> Net:
    torch.manual_seed(hparams["seed"])
    return Net(2)


def regression_data() -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 2, generator=gen) * 4 - 2
    return x, torch.sin(2 * x[:, :1]) * x[:, 1:]


def fit(model: Any, steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    x, y = regression_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    ablated = sum(type(m).__name__ == "AblatedModule" for m in model.modules())
    return {"mse": loss.item(), "ablated": float(ablated),
            "params": float(sum(p.numel() for p in model.parameters()))}


def train_with_model(model, steps):
    return fit(model, steps)


def train_with_model_fn(model_fn, hparams, ctx):
    assert ctx.seed == hparams["seed"]
    return fit(model_fn(hparams), hparams["steps"])


def module_study(**kwargs: Any) -> unison.Ablation:
    options = {"base": {"steps": 150}, "modules": ["drop", "act"], "metric": "mse", "mode": "min",
               "repeats": 2}
    return unison.Ablation(**{**options, **kwargs})


@pytest.mark.parametrize("train", [train_with_model, train_with_model_fn])
def test_module_ablation_no_op_module_is_zero_needed_module_hurts(tmp_path, train):
    result = run_inline(train, module_study(), tmp_path, model=net_fn)
    table = result.ablation
    assert list(table["component"]) == ["baseline", "drop", "act"]
    assert list(table["kind"]) == ["baseline", "module", "module"]
    assert abs(row(table, "drop")["diff"]) < 1e-6  # the same seeds, the same model: the same loss
    act = row(table, "act")
    assert act["diff"] > 0.05 and act["diff_ci_low"] > 0  # linear now: a clearly worse fit
    assert act["mean"] > 3 * row(table, "baseline")["mean"]
    assert (act["rank"], row(table, "drop")["rank"]) == (1, 2)
    ablated = result.trials.groupby("component")["ablated"].max()
    assert ablated.to_dict() == {"baseline": 0, "drop": 1, "act": 1}  # model_fn(hparams) is ablated too


def test_ablating_a_module_that_changes_the_shape_fails_that_trial_naming_both_shapes(tmp_path):
    result = run_inline(train_with_model, module_study(modules=["inp", "drop"], repeats=1), tmp_path,
                        model=net_fn)
    trials = result.trials.set_index("component")
    assert trials.loc["inp", "status"] == "failed"
    error = trials.loc["inp", "error"]
    assert "'inp'" in error and "Linear" in error and "(64, 2)" in error and "(64, 16)" in error
    assert trials.loc["baseline", "status"] == trials.loc["drop", "status"] == "completed"
    inp = row(result.ablation, "inp")
    assert inp["n"] == 0 and pd.isna(inp["rank"]) and np.isnan(inp["diff"])
    assert row(result.ablation, "drop")["rank"] == 1


def test_an_unknown_module_fails_before_any_trial_runs_listing_the_modules(tmp_path):
    with pytest.raises(ValueError, match=r"\['body'\] are not in the model.*\['inp', 'act', 'drop', 'out'\]"):
        unison.run(train_with_model, module_study(modules=["act", "body"]), model=net_fn,
                   backend="inline", storage=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="pass the base model generator as model=model_fn"):
        unison.run(train_with_model, module_study(), backend="inline", storage=tmp_path / "runs")
    with pytest.raises(TypeError, match="torch.nn.Module; model_fn returned a dict"):
        unison.run(lambda model: 0.0, module_study(), model=lambda: {}, backend="inline",
                   storage=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_variants_run_as_extra_configurations(tmp_path):
    study = module_study(modules=["act"], variants={"small": small_net_fn})
    result = run_inline(train_with_model, study, tmp_path, model=net_fn)
    table = result.ablation
    assert list(table["component"]) == ["baseline", "act", "small"]
    assert row(table, "small")["kind"] == "variant" and row(table, "small")["n"] == 2
    params = result.trials.groupby("component")["params"].max()
    assert params["small"] == 2 * 2 + 2 + 2 + 1 < params["baseline"] == 16 * 2 + 16 + 16 + 1
    with pytest.raises(ValueError, match="variants= compares model generators"):
        unison.run(train_with_model, unison.Ablation(variants={"small": small_net_fn}), backend="inline")


# ------------------------------------------------------------------------ repeats, seeds, ablators
def test_repeats_run_every_configuration_with_the_same_seeds_paired(tmp_path):
    def train(dataset, seed, hparams, ctx):
        # seed + number of columns: each component's values vary with the seed, its difference does not
        return {"v": seed + len(dataset.columns), "ctx_seed": ctx.seed, "hp_seed": hparams["seed"]}

    study = unison.Ablation(features=["A", "B"], label="y", metric="v", repeats=3, seed=10)
    result = run_inline(train, study, tmp_path, data=tabular(20))
    trials = result.trials
    assert (trials["seed"] == trials["ctx_seed"]).all() and (trials["seed"] == trials["hp_seed"]).all()
    for component, seeds in trials.groupby("component")["seed"]:
        assert sorted(seeds) == [10, 11, 12], component
    table = result.ablation
    assert list(table["n"]) == [3, 3, 3]
    a = row(table, "A")
    assert a["std"] == pytest.approx(1.0)  # the seeds differ ...
    assert a["diff"] == a["diff_ci_low"] == a["diff_ci_high"] == -1.0  # ... but the pairs agree exactly


class KeepOnlyOne(unison.Ablator):
    """For each feature group, a configuration that keeps only that group."""

    def components(self, features, modules, variants):
        def others(group):
            return tuple(col for name, cols in features.items() if name != group for col in cols)

        return [unison.Component("all", "baseline"),
                *(unison.Component(f"only {g}", "keep", features=others(g)) for g in features)]


def test_a_user_written_ablator_plugs_in(tmp_path):
    seen = set()

    def train(dataset, hparams, ctx):
        seen.add(tuple(dataset.columns))
        return fit_r2(dataset, hparams, ctx)

    result = run_inline(train, feature_study(ablator=KeepOnlyOne(), repeats=2), tmp_path, data=tabular())
    assert seen == {("A", "B", "C", "y"), ("A", "y"), ("B", "y"), ("C", "y")}
    table = result.ablation
    assert list(table["component"]) == ["all", "only A", "only B", "only C"]
    assert list(table["kind"]) == ["baseline", "keep", "keep", "keep"]
    means = table.set_index("component")["mean"]
    assert means["only A"] > means["only B"] > means["only C"]
    assert row(table, "only C")["rank"] == 1  # the worst on its own


def test_ablators_must_return_a_baseline_and_distinct_names():
    class NoBaseline(unison.Ablator):
        def components(self, features, modules, variants):
            return [unison.Component("A", "feature", features=("A",))]

    class Twice(unison.Ablator):
        def components(self, features, modules, variants):
            return [BASELINE, unison.Component("x", "a"), unison.Component("x", "b")]

    with pytest.raises(ValueError, match="must start with the baseline"):
        feature_study(ablator=NoBaseline())
    with pytest.raises(ValueError, match=r"the same name \['x'\]"):
        feature_study(ablator=Twice())
    with pytest.raises(ValueError, match=r"the same name \['act'\]"):
        unison.Ablation(features=["act"], modules=["act"])
    with pytest.raises(TypeError, match="must be a unison.Ablator"):
        unison.Ablation(features=["A"], ablator=object())


def test_ablation_declaration_errors():
    with pytest.raises(ValueError, match="at least one component"):
        unison.Ablation(base={"lr": 0.1})
    with pytest.raises(TypeError, match=r"fixed values, but \['lr'\] are distributions"):
        unison.Ablation(base={"lr": unison.loguniform(1e-3, 1e-1)}, features=["A"])
    with pytest.raises(ValueError, match="must not contain 'seed'"):
        unison.Ablation(base={"seed": 1}, features=["A"])
    with pytest.raises(ValueError, match="removes nothing"):
        unison.Ablation(features={"empty": []})
    with pytest.raises(TypeError, match="list of names"):
        unison.Ablation(features="A")
    with pytest.raises(ValueError, match="at least 1"):
        unison.Ablation(features=["A"], repeats=0)
    with pytest.raises(TypeError, match="model generators"):
        unison.Ablation(variants={"small": "not a function"})
    with pytest.raises(TypeError, match="label column"):
        unison.Ablation(features=["A"], label=3)


def test_an_ablation_starts_from_a_search_result(tmp_path):
    search = unison.Search({"ridge": unison.choice([0.0, 1e5])}, metric="r2", optimizer="grid", seed=0)

    found = unison.run(lambda dataset, ridge: r2_score(dataset, 0, ridge), search, data=tabular(),
                       backend="inline", storage=tmp_path, progress=False)
    assert found.best.hparams == {"ridge": 0.0}
    with pytest.raises(ValueError, match=r"a 'search' experiment; AblationResult.load reads \['ablation'\]"):
        unison.AblationResult.load(found.path)
    result = run_inline(fit_r2, feature_study(base=found.best.hparams, repeats=2), tmp_path, data=tabular())
    assert (result.trials["ridge"] == 0.0).all()
    assert [row(result.ablation, c)["rank"] for c in "AB"] == [1, 2]


# ---------------------------------------------------------------------------- result, plot, CLI
def test_plot_draws_the_chart_and_saves_ablation_png(tmp_path):
    pytest.importorskip("plotly")
    pytest.importorskip("matplotlib")
    result = run_inline(fit_r2, feature_study(repeats=2), tmp_path, data=tabular())
    assert {trace.meta["effect"] for trace in result.plot().data} >= {"worse"}
    result.plot(path=result.path / "ablation.png")
    assert (result.path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_json_reload_show_and_ls(tmp_path, capsys):
    result = run_inline(fit_r2, feature_study(), tmp_path, data=tabular())
    loaded = unison.SearchResult.load(result.path)
    assert isinstance(loaded, unison.AblationResult)
    pd.testing.assert_frame_equal(loaded.ablation, result.ablation)
    assert "most important: A" in repr(loaded)
    assert isinstance(unison.AblationResult.load(result.path), unison.AblationResult)
    single = unison.run(lambda: 1.0, storage=tmp_path / "runs")
    with pytest.raises(ValueError, match="holds a 'single' experiment"):
        unison.SearchResult.load(single.path)

    assert cli.main(["show", str(result.path)]) == 0
    out = capsys.readouterr().out
    assert "kind=ablation" in out and "ablation of r2" in out and "most important: A" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert lines["A"][:3] == ["A", "feature", "5"] and lines["A"][-1] == "1"
    assert lines["C"][-1] == "3" and lines["baseline"][-1] == "<NA>"

    assert cli.main(["ls", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if result.path.name in line]
    assert "ablation" in line and "completed" in line and "20/20" in line and "most important: A" in line


# -------------------------------------------------------------------------------------- resume
def test_an_interrupted_ablation_resumes_with_the_same_study(tmp_path):
    calls: list[int] = []
    interrupt_at = {"trial": 6}

    def train(dataset, hparams, ctx):
        if ctx.trial_id == interrupt_at["trial"]:
            raise KeyboardInterrupt
        calls.append(ctx.trial_id)
        return fit_r2(dataset, hparams, ctx)

    study = feature_study(repeats=3)
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, study, data=tabular(), backend="inline", storage=tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    partial = unison.SearchResult.load(path)
    assert partial.status == "interrupted" and list(partial.ablation["n"]) == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="resume it with unison.run"):
        unison.resume(path, train)
    with pytest.raises(ValueError, match="differs from the one stored"):
        unison.run(train, feature_study(repeats=4), data=tabular(), backend="inline", resume=path)

    interrupt_at["trial"] = -1
    result = unison.run(train, study, data=tabular(), backend="inline", resume=path, progress=False)
    assert calls == list(range(12))  # nothing that ended ran twice
    assert result.status == "completed" and list(result.ablation["n"]) == [3, 3, 3, 3]
    fresh = run_inline(fit_r2, study, tmp_path / "fresh", data=tabular())
    pd.testing.assert_frame_equal(result.ablation, fresh.ablation)


# ------------------------------------------------------------------------------------ backends
def assert_same_table(table: pd.DataFrame, reference: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(table, reference, check_exact=False, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_the_same_study_on_inline_and_local_gives_the_same_table(tmp_path):
    study = feature_study(repeats=3)
    inline = run_inline(fit_r2, study, tmp_path, data=tabular())
    local = unison.run(fit_r2, study, data=tabular(), backend=unison.Local(workers=2),
                       storage=tmp_path / "local", progress=False)
    assert set(local.trials["worker"]) != {"inline"}
    assert_same_table(local.ablation, inline.ablation)
    check = unison.run(train_with_model_fn, module_study(variants={"small": small_net_fn}), model=net_fn,
                       backend=unison.Local(workers=2), storage=tmp_path / "local", progress=False)
    reference = run_inline(train_with_model_fn, module_study(variants={"small": small_net_fn}), tmp_path,
                           model=net_fn)
    pd.testing.assert_frame_equal(check.ablation, reference.ablation, check_exact=False, rtol=1e-5,
                                  atol=1e-7)


@pytest.fixture(scope="module")
def spark_session(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A ``local-cluster`` Spark with real executor JVMs, started as every Spark test module starts it
    (``spark_support``: executors run this interpreter, the UI is off, executor folders stay out of
    site-packages), once both executors have registered."""
    pytest.importorskip("pyspark")
    from spark_support import cluster_session

    return cluster_session(tmp_path_factory.getbasetemp())


@pytest.mark.slow
@pytest.mark.skipif(not SPARK_REGISTERED, reason="the Spark backend is not registered")
def test_the_same_study_on_a_spark_local_cluster_gives_the_same_table(spark_session, tmp_path):
    study = feature_study(repeats=3)
    inline = run_inline(fit_r2, study, tmp_path, data=tabular())
    on_spark = unison.run(fit_r2, study, data=tabular(), backend="spark", storage=tmp_path / "spark",
                          progress=False)
    assert all(str(w).startswith("spark") for w in on_spark.trials["worker"])
    assert_same_table(on_spark.ablation, inline.ablation)


def fit_checkpointing(model: Any, reporter: Any) -> dict[str, float]:
    """Three Adam steps, each reported with the model's state_dict as its checkpoint and the mse after it."""
    x, y = regression_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            mse = torch.nn.functional.mse_loss(model(x), y).item()
        reporter.report(step=step, checkpoint={"model": model.state_dict(), "step": step}, mse=mse)
    return {"mse": mse}


@pytest.mark.slow
@pytest.mark.skipif(not SPARK_REGISTERED, reason="the Spark backend is not registered")
def test_an_ablations_trials_checkpoint_on_a_spark_local_cluster(spark_session: Any,
                                                                tmp_path: Path) -> None:
    study = module_study(modules=["act"], variants={"small": small_net_fn}, repeats=1, base={})
    r = unison.run(fit_checkpointing, study, model=net_fn, backend="spark", storage=tmp_path, progress=False)
    trials = r.trials.set_index("component")
    assert list(trials["status"]) == ["completed"] * 3, list(trials["error"])
    assert all(str(w).startswith("spark") for w in trials["worker"])
    x, y = regression_data()
    for component, trial in trials.iterrows():
        folder = r.path / "trials" / f"{trial['trial_id']:04d}" / "checkpoints"
        assert Path(trial["checkpoint"]) == folder / "step-000002"  # streamed to the driver's disk
        saved = unison.load_checkpoint(trial["checkpoint"])
        assert saved["step"] == 2
        model = (small_net_fn if component == "small" else net_fn)({"seed": trial["seed"]})
        if component == "act":
            model.act = nn.Identity()  # what the ablation put in its place
        model.load_state_dict(saved["model"])
        with torch.no_grad():  # the trial's own final weights: they give the mse it reported
            assert torch.nn.functional.mse_loss(model(x), y).item() == pytest.approx(trial["mse"], rel=1e-6)
        steps = sorted(p.name for p in folder.iterdir())
        assert steps[-2:] == ["step-000001", "step-000002"] and len(steps) <= 3  # keep 2, plus the best
