"""The optuna-backed optimizers (tpe, gp, cmaes, qmc, nsga2): searches through ``unison.run``,
seeds, conditional spaces, asynchronous suggestions, resumed state and several objectives."""

from __future__ import annotations

import importlib.util
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import unison
from unison.optimizers import BUILTIN_OPTIMIZERS, OptunaOptimizer, make_optimizer
from unison.result import dominates
from unison.space import Distribution, is_active

NEEDS = {"gp": "torch", "cmaes": "cmaes"}
NAMES = ["tpe", "gp", "cmaes", "qmc", "nsga2"]
# a GP suggestion costs ~0.1 s against ~ms for the others: keep its searches short
TRIALS = {"gp": 12}


def optimizer_names(*names: str) -> list[Any]:
    """``names`` as pytest params, skipped where the sampler's extra dependency is missing."""
    return [
        pytest.param(n, marks=pytest.mark.skipif(
            n in NEEDS and importlib.util.find_spec(NEEDS[n]) is None,
            reason=f"optimizer {n!r} needs {NEEDS.get(n)!r} (pip install {NEEDS.get(n)})"))
        for n in names
    ]


SPACE = {
    "x": unison.uniform(-5.0, 5.0),
    "lr": unison.loguniform(1e-4, 1e-1),
    "units": unison.integer(8, 256, log=True),
    "layers": unison.integer(1, 4),
    "act": unison.choice(["relu", "tanh"]),
    "epochs": 3,
}


def objective(x: float, lr: float, units: int, layers: int, act: str) -> float:
    return (x - 1.0) ** 2 + (math.log10(lr) + 2) ** 2 + abs(math.log2(units) - 6) + layers \
        + (0.5 if act == "tanh" else 0.0)


def drive(opt: Any, fn: Any, n: int, start: int = 0) -> list[tuple[dict[str, Any], Any]]:
    """Suggest/observe ``n`` trials one at a time at the optimizer level."""
    seen = []
    for i in range(start, start + n):
        hparams = opt.suggest(i)
        value = fn(hparams)
        opt.observe(i, hparams, value, "completed")
        seen.append((hparams, value))
    return seen


def check_in_space(space: dict[str, Any], hparams: dict[str, Any]) -> None:
    """Every active hyperparameter is present and in range; no inactive one is."""
    for name, dist in space.items():
        active = is_active(dist, hparams)
        assert (name in hparams) == active, (name, hparams)
        if not active:
            continue
        if not isinstance(dist, Distribution):
            assert hparams[name] == dist
            continue
        inner = getattr(dist, "dist", dist)
        value = hparams[name]
        if isinstance(inner, unison.space.Choice):
            assert value in inner.values
        elif isinstance(inner, unison.space.Integer):
            assert type(value) is int and inner.low <= value <= inner.high
        else:
            assert type(value) is float and inner.low <= value <= inner.high


# ------------------------------------------------------------------------------------- imports
def test_import_unison_and_naming_an_optimizer_do_not_import_optuna() -> None:
    code = (
        "import sys, unison\n"
        "s = unison.Search({'x': unison.uniform(0, 1)}, optimizer='tpe', trials=3)\n"
        "assert 'optuna' not in sys.modules, 'optuna imported'\n"
        "s.build_optimizer(0)\n"
        "assert 'optuna' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in NAMES:
        if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
            continue
        opt = make_optimizer(name)
        assert isinstance(opt, OptunaOptimizer) and isinstance(opt, BUILTIN_OPTIMIZERS[name])
    # a missing extra dependency fails where the search is declared, naming what to install
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "torch" else real_find_spec(n, *a))
    with pytest.raises(ImportError, match="optimizer 'gp' .* needs 'torch'.*pip install torch"):
        unison.Search({"x": unison.uniform(0, 1)}, optimizer="gp")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown optuna sampler 'bayes'"):
        OptunaOptimizer("bayes")
    with pytest.raises(ValueError, match="stopped_as"):
        OptunaOptimizer("tpe", stopped_as="ignored")
    import optuna

    with pytest.raises(ValueError, match="already built"):
        OptunaOptimizer(optuna.samplers.TPESampler(seed=0), n_startup_trials=3)
    with pytest.raises(ValueError, match="mode must be"):
        OptunaOptimizer("tpe").setup({"x": unison.uniform(0, 1)}, "maximize", 0)
    with pytest.raises(ValueError, match="one objective"):
        OptunaOptimizer("cmaes").setup({"x": unison.uniform(0, 1)}, ["max", "min"], 0)


# ------------------------------------------------------------------- searches through unison.run
@pytest.mark.parametrize("name", optimizer_names(*NAMES))
def test_named_optimizer_searches_and_a_seed_reproduces_it(name: str, tmp_path: Path) -> None:
    trials = TRIALS.get(name, 16)

    def search(seed: int) -> unison.SearchResult:
        s = unison.Search(SPACE, metric="loss", mode="min", trials=trials, optimizer=name, seed=seed)
        return unison.run(lambda x, lr, units, layers, act: {"loss": objective(x, lr, units, layers, act)},
                          s, backend="inline", progress=False, storage=tmp_path)

    first, again, other = search(0), search(0), search(1)
    assert [r["status"] for r in first.rows] == ["completed"] * trials
    for row in first.rows:
        check_in_space(SPACE, row["hparams"])
    assert [r["hparams"] for r in first.rows] == [r["hparams"] for r in again.rows]
    assert [r["hparams"] for r in first.rows] != [r["hparams"] for r in other.rows]
    assert first.best is not None and first.best.metric == min(r["value"] for r in first.rows)


def test_optuna_optimizer_instance_sampler_class_and_kwargs(tmp_path: Path) -> None:
    import optuna

    opt = OptunaOptimizer(optuna.samplers.TPESampler, n_startup_trials=3)
    s = unison.Search({"x": unison.uniform(0, 1)}, mode="max", trials=6, optimizer=opt, seed=3)
    r = unison.run(lambda x: x, s, backend="inline", progress=False, storage=tmp_path)
    assert len(r.rows) == 6 and len(opt.study.trials) == 6
    assert opt.sampler._n_startup_trials == 3

    # a built sampler is copied at each setup, so one instance can serve several searches
    sampler = optuna.samplers.RandomSampler(seed=5)
    opt = OptunaOptimizer(sampler)
    hparams = []
    for _ in range(2):
        opt.setup({"x": unison.uniform(0, 1)}, "max", None)
        hparams.append(drive(opt, lambda h: h["x"], 3))
    assert hparams[0] == hparams[1] and opt.sampler is not sampler


def test_choice_values_that_optuna_cannot_hold_are_mapped_back() -> None:
    values = [[1, 2], {"a": 1, "b": [2]}, None, 1, True, 1.0, "relu"]
    space = {"v": unison.choice(values), "c": unison.choice([0, 1, 2])}
    opt = make_optimizer("tpe")
    opt.setup(space, "max", 0)
    seen = drive(opt, lambda h: float(h["c"]), 40)
    got = [h["v"] for h, _ in seen]
    for value in got:
        assert any(value == v and type(value) is type(v) for v in values)
    assert {type(v) for v in got} >= {list, dict, type(None)}
    assert all(type(h["c"]) is int for h, _ in seen)


# ---------------------------------------------------------------------------- conditional spaces
CONDITIONAL = {
    "optimizer": unison.choice(["sgd", "adam"]),
    "lr": unison.loguniform(1e-4, 1e-1),
    "momentum": unison.uniform(0.0, 0.99).when(optimizer="sgd"),
    "nesterov": unison.choice([True, False]).when(optimizer="sgd"),
    "dampening": unison.uniform(0.0, 0.5).when(nesterov=False),
    "beta1": unison.uniform(0.8, 0.999).when(optimizer="adam"),
    "amsgrad": unison.choice([False, True]).when(optimizer="adam"),
    "tag": "conditional",
}


def conditional_loss(h: dict[str, Any]) -> float:
    loss = (math.log10(h["lr"]) + 2.5) ** 2
    if h["optimizer"] == "sgd":
        loss += (h["momentum"] - 0.9) ** 2 + (0.0 if h["nesterov"] else h["dampening"])
    else:
        loss += 10 * (h["beta1"] - 0.9) ** 2 + 0.1 * h["amsgrad"]
    return loss


@pytest.mark.parametrize("name", optimizer_names(*NAMES))
def test_a_conditional_space_never_gets_an_inactive_parameter(name: str) -> None:
    opt = make_optimizer(name)
    opt.setup(CONDITIONAL, "min", 0)
    seen = drive(opt, conditional_loss, TRIALS.get(name, 30))
    for hparams, _ in seen:
        check_in_space(CONDITIONAL, hparams)
    assert {h["optimizer"] for h, _ in seen} == {"sgd", "adam"}
    assert any("dampening" in h for h, _ in seen) and any("beta1" in h for h, _ in seen)


def test_tpe_conditional_search_through_run(tmp_path: Path) -> None:
    s = unison.Search(CONDITIONAL, metric="loss", mode="min", trials=30, optimizer="tpe", seed=0)
    r = unison.run(lambda hparams: {"loss": conditional_loss(hparams)}, s, backend="inline",
                   progress=False, storage=tmp_path)
    for row in r.rows:
        check_in_space(CONDITIONAL, row["hparams"])
    assert r.best.metric < 1.0


# ---------------------------------------------------------------------------------- search quality
def test_tpe_beats_random_on_a_quadratic(tmp_path: Path) -> None:
    space = {"x": unison.uniform(-5.0, 5.0), "y": unison.uniform(-5.0, 5.0)}

    def quadratic(x: float, y: float) -> float:
        return (x - 1.3) ** 2 + (y + 2.1) ** 2

    best: dict[str, list[float]] = {"tpe": [], "random": []}
    for seed in range(5):
        for name in best:
            s = unison.Search(space, metric="value", mode="min", trials=40, optimizer=name, seed=seed)
            r = unison.run(quadratic, s, backend="inline", progress=False, storage=tmp_path)
            best[name].append(r.best.metric)
    # measured over 20 seeds: TPE's median best ~0.04, random's ~0.47
    assert statistics.median(best["tpe"]) < 0.5 * statistics.median(best["random"]), best


# --------------------------------------------------------------------------------- asynchronous
def spread(points: list[dict[str, Any]], space: dict[str, Any]) -> float:
    """The smallest distance between two points, each coordinate scaled to [0, 1]."""
    scaled = []
    for p in points:
        coords = []
        for name, dist in space.items():
            if isinstance(dist, unison.space.LogUniform):
                coords.append((math.log(p[name]) - math.log(dist.low)) / math.log(dist.high / dist.low))
            else:
                coords.append((p[name] - dist.low) / (dist.high - dist.low))
        scaled.append(coords)
    return min(math.dist(a, b) for i, a in enumerate(scaled) for b in scaled[i + 1:])


@pytest.mark.parametrize("name", optimizer_names(*NAMES))
def test_suggestions_in_flight_do_not_collapse(name: str) -> None:
    """Four trials suggested while none of them has ended are told apart (a GP that ignored the
    running trials would return one point four times: spread ~1e-4)."""
    space = {"x": unison.uniform(-5.0, 5.0), "y": unison.uniform(-5.0, 5.0),
             "lr": unison.loguniform(1e-4, 1.0)}

    def loss(h: dict[str, Any]) -> float:
        return (h["x"] - 1.0) ** 2 + (h["y"] + 2.0) ** 2 + (math.log10(h["lr"]) + 2) ** 2

    for seed in (0, 1):
        opt = make_optimizer(name)
        opt.setup(space, "min", seed)
        drive(opt, loss, 10)
        in_flight = [opt.suggest(10 + k) for k in range(4)]
        assert spread(in_flight, space) > 0.01, (name, in_flight)
        for k in (3, 1, 0, 2):  # they end in another order than they started
            opt.observe(10 + k, in_flight[k], loss(in_flight[k]), "completed")
        assert sum(t.state.name == "COMPLETE" for t in opt.study.trials) == 14


def test_tpe_search_with_trials_in_flight_through_run(tmp_path: Path) -> None:
    space = {"x": unison.uniform(-5.0, 5.0), "y": unison.uniform(-5.0, 5.0)}
    s = unison.Search(space, mode="min", trials=30, optimizer="tpe", seed=0, max_concurrent=4)
    r = unison.run(lambda x, y: (x - 1) ** 2 + (y + 2) ** 2, s, backend="inline", progress=False,
                   storage=tmp_path)
    points = [row["hparams"] for row in r.rows]
    assert len({(p["x"], p["y"]) for p in points}) == 30
    assert r.best.metric < 1.0


def mean_nearest(points: list[dict[str, Any]]) -> float:
    """The mean distance from each point to its nearest other point."""
    xy = [(p["x"], p["y"]) for p in points]
    return statistics.fmean(
        min(math.dist(a, b) for j, b in enumerate(xy) if j != i) for i, a in enumerate(xy)
    )


def test_tpe_tells_running_trials_to_the_sampler_as_constant_liars() -> None:
    """Trials in flight stay RUNNING in the study and TPE's constant liar ranks them with the bad
    results, so twelve suggestions made with none of them ended spread out; told nothing about
    them (``constant_liar=False``), TPE draws them from one model and they bunch up (measured over
    8 seeds: mean nearest-neighbour distance 1.5-2.3 with the liar, 0.25-0.45 without)."""
    space = {"x": unison.uniform(-5.0, 5.0), "y": unison.uniform(-5.0, 5.0)}

    def loss(h: dict[str, Any]) -> float:
        return (h["x"] - 1.0) ** 2 + (h["y"] + 2.0) ** 2

    for seed in (0, 1, 2):
        spreads = []
        for opt in (OptunaOptimizer("tpe"), OptunaOptimizer("tpe", constant_liar=False)):
            opt.setup(space, "min", seed)
            drive(opt, loss, 12)
            in_flight = [opt.suggest(12 + k) for k in range(12)]
            running = [t for t in opt.study.trials if t.state.name == "RUNNING"]
            assert [t.params for t in running] == in_flight
            spreads.append(mean_nearest(in_flight))
        assert spreads[0] > 2.5 * spreads[1], (seed, spreads)


def test_tpe_with_one_trial_in_flight_is_optunas_sequential_tpe(tmp_path: Path) -> None:
    """With one trial in flight unison's TPE proposes exactly what Optuna's own TPESampler does in
    ``study.optimize`` with the same seed (so the search-quality benchmark compares like with like)."""
    import optuna

    space = {"x": unison.uniform(-5.0, 10.0), "y": unison.uniform(0.0, 15.0)}

    def loss(x: float, y: float) -> float:
        return (y - 0.13 * x**2 + 1.6 * x - 6) ** 2 + 10 * math.cos(x)

    for seed in (0, 1):
        s = unison.Search(space, metric="value", mode="min", trials=20, optimizer="tpe", seed=seed,
                          max_concurrent=1)
        r = unison.run(loss, s, backend="inline", progress=False, storage=tmp_path)
        ours = [(row["hparams"]["x"], row["hparams"]["y"]) for row in r.rows]

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.optimize(lambda t: loss(t.suggest_float("x", -5.0, 10.0), t.suggest_float("y", 0.0, 15.0)),
                       n_trials=20)
        assert ours == [(t.params["x"], t.params["y"]) for t in study.trials]


# -------------------------------------------------------------------------- stopped / failed / resume
def test_stopped_and_failed_trials_are_told_to_optuna() -> None:
    space = {"x": unison.uniform(0.0, 1.0)}
    opt = make_optimizer("tpe")
    opt.setup(space, "max", 0)
    h = [opt.suggest(i) for i in range(5)]
    opt.observe(0, h[0], 0.5, "completed")
    opt.observe(1, h[1], 0.2, "stopped")
    opt.observe(2, h[2], None, "failed")
    opt.observe(3, h[3], float("nan"), "completed")
    opt.observe(4, h[4], None, "stopped")
    states = [(t.state.name, t.value) for t in opt.study.trials]
    assert states == [("COMPLETE", 0.5), ("PRUNED", 0.2), ("FAIL", None), ("FAIL", None), ("PRUNED", None)]

    opt = OptunaOptimizer("tpe", stopped_as="completed")
    opt.setup(space, "max", 0)
    h = opt.suggest(0)
    opt.observe(0, h, 0.2, "stopped")
    assert [(t.state.name, t.value) for t in opt.study.trials] == [("COMPLETE", 0.2)]


def test_replayed_trials_it_never_suggested_teach_a_resumed_optimizer() -> None:
    space = {"x": unison.uniform(-5.0, 5.0), "y": unison.uniform(-5.0, 5.0),
             "act": unison.choice([["relu", 1], {"k": 2}]), "epochs": 3}

    def loss(h: dict[str, Any]) -> float:
        return (h["x"] - 1.3) ** 2 + (h["y"] + 2.1) ** 2 + (0.0 if h["act"] == {"k": 2} else 1.0)

    earlier = make_optimizer("tpe")
    earlier.setup(space, "min", 0)
    seen = drive(earlier, loss, 30)

    resumed = make_optimizer("tpe")  # a new driver process: a fresh optimizer, same seed
    resumed.setup(space, "min", 0)
    for i, (hparams, value) in enumerate(seen):
        resumed.observe(i, hparams, value, "completed")
    resumed.observe(30, {"x": 0.0, "y": 0.0, "act": ["relu", 1], "epochs": 3}, 7.0, "stopped")
    resumed.observe(31, {"x": 4.0, "y": 4.0, "act": ["relu", 1], "epochs": 3}, None, "failed")
    resumed.observe(32, {"x": 99.0, "y": 0.0, "act": ["relu", 1], "epochs": 3}, 1.0, "completed")  # off space
    trials = resumed.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 30 + ["PRUNED", "FAIL"]
    assert [t.value for t in trials[:30]] == [v for _, v in seen]

    fresh = make_optimizer("tpe")  # the same seed without the replay: still in its random start-up
    fresh.setup(space, "min", 0)

    def median_distance(opt: Any) -> float:
        points = [opt.suggest(33 + k) for k in range(10)]
        for h in points:
            check_in_space(space, h)
        return statistics.median(math.dist((h["x"], h["y"]), (1.3, -2.1)) for h in points)

    # measured over 6 seeds: ~0.6 of the fresh optimizer's distance (random points: ~4.2)
    assert median_distance(resumed) < 0.8 * median_distance(fresh)


def test_resumed_search_continues_from_the_journal(tmp_path: Path) -> None:
    space = {"x": unison.uniform(-5.0, 5.0), "y": unison.uniform(-5.0, 5.0)}
    calls = {"n": 0, "stop_at": 15}

    def train(x: float, y: float) -> float:
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt
        return (x - 1.3) ** 2 + (y + 2.1) ** 2

    opt = make_optimizer("tpe")
    search = unison.Search(space, mode="min", trials=25, optimizer=opt, seed=4)
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, search, backend="inline", progress=False, storage=tmp_path)
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    calls["stop_at"] = -1
    r = unison.run(train, search, backend="inline", progress=False, resume=path)
    assert r.status == "completed" and len(r.rows) == 25
    # the resumed optimizer knows all 14 trials of the first run plus the 11 it ran (the
    # interrupted trial ran again with its journaled hparams, told on its end)
    states = [t.state.name for t in opt.study.trials]
    assert states.count("COMPLETE") == 25
    journaled = sorted((row["hparams"]["x"], row["value"]) for row in r.rows)
    told = sorted((t.params["x"], t.value) for t in opt.study.trials)
    assert told == journaled


# ------------------------------------------------------------------------------- several objectives
@pytest.mark.parametrize("name", optimizer_names("tpe", "nsga2", "gp", "qmc"))
def test_multi_objective_suggest_and_observe(name: str) -> None:
    space = {"x": unison.uniform(0.0, 1.0), "y": unison.uniform(0.0, 1.0), "kind": unison.choice(["a", "b"])}

    def values(h: dict[str, Any]) -> list[float]:  # maximize accuracy, minimize cost
        return [h["x"] + (0.1 if h["kind"] == "a" else 0.0), h["x"] ** 2 + h["y"]]

    opt = make_optimizer(name)
    opt.setup(space, ["max", "min"], 0)
    assert [d.name for d in opt.study.directions] == ["MAXIMIZE", "MINIMIZE"]
    seen = drive(opt, values, TRIALS.get(name, 24))
    h = opt.suggest(99)
    opt.observe(99, h, None, "failed")
    opt.observe(100, {"x": 0.5, "y": 0.5, "kind": "a"}, [0.6, 0.75], "completed")  # replayed
    opt.observe(101, {"x": 0.5, "y": 0.5, "kind": "a"}, [0.6, 0.75], "stopped")
    trials = opt.study.trials
    assert [t.values for t in trials[: len(seen)]] == [v for _, v in seen]
    assert [t.state.name for t in trials[len(seen):]] == ["FAIL", "COMPLETE", "PRUNED"]
    with pytest.raises(ValueError, match="2 objective value"):
        opt.observe(102, opt.suggest(102), 0.5, "completed")
    completed = [v for _, v in seen] + [[0.6, 0.75]]
    front = [v for v in completed if not any(dominates(w, v, ["max", "min"]) for w in completed)]
    assert 1 <= len(front) < len(completed)  # the values trade off, and some are dominated
    assert sorted(t.values for t in opt.study.best_trials) == sorted(front)


def test_multi_objective_search_through_run(tmp_path: Path) -> None:
    space = {"x": unison.uniform(0.0, 1.0)}
    s = unison.Search(space, metric=["acc", "cost"], mode=["max", "min"], trials=20, optimizer="nsga2",
                      seed=0)
    r = unison.run(lambda x: {"acc": x, "cost": x ** 2 + 0.1}, s, backend="inline", progress=False,
                   storage=tmp_path)
    assert len(r.rows) == 20 and all(row["status"] == "completed" for row in r.rows)
    assert len(r.pareto) == 20  # every point of this curve is Pareto-optimal
