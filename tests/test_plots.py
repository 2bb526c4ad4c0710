"""Plots of results (``result.plot``, ``unison.plots``): real searches, ablations and single runs,
their figures' data read back, PNG and HTML files, the ablation headline, the Jupyter summary, and a
clear error without plotly."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import plots

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
STEPS = 6


def train(lr: float, units: int, act: str, reporter: Any) -> dict[str, float]:
    """A toy accuracy that rises by step; the best trials have lr near 1e-2 and units near 64."""
    acc = 0.0
    for step in range(STEPS):
        acc = 1 - abs(math.log10(lr) + 2) / 4 - abs(units - 64) / 512 + 0.02 * step + (act == "relu") * 0.01
        reporter.report(step=step, accuracy=acc, loss=1 - acc)
        time.sleep(0.03)
    return {"accuracy": acc, "loss": 1 - acc}


SPACE = {"lr": unison.loguniform(1e-4, 1e-1), "units": unison.integer(16, 256, log=True),
         "act": unison.choice(["relu", "tanh"])}


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> unison.SearchResult:
    """12 trials on 3 local workers with ASHA: some trials stop after their first step."""
    storage = tmp_path_factory.mktemp("plots")
    study = unison.Search(SPACE, metric="accuracy", mode="max", trials=12, scheduler="asha", seed=0)
    result = unison.run(train, study, backend=unison.Local(workers=3), storage=storage, progress=False)
    assert isinstance(result, unison.SearchResult)
    return result


def journal(result: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (result.path / "journal.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------- kinds
def test_a_search_has_every_search_kind_its_curves_first(search: unison.SearchResult) -> None:
    assert plots.kinds(search) == ["curves", "history", "parallel", "importance", "slice", "contour",
                                   "timeline"]
    assert search.plot().layout.title.text.startswith("accuracy by step")


def test_a_search_without_a_completed_trial_has_only_its_timeline(tmp_path: Path) -> None:
    def failing(x: float) -> float:
        raise ValueError("no")

    study = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=2)
    result = unison.run(failing, study, backend="inline", storage=tmp_path, progress=False)
    assert plots.kinds(result) == ["timeline"]
    assert [trace.meta["status"] for trace in result.plot().data] == ["failed"]
    with pytest.raises(ValueError, match=r"'history' does not apply .* with a completed trial"):
        result.plot("history")


def test_an_unknown_kind_or_option_says_what_would_be_right(search: unison.SearchResult) -> None:
    with pytest.raises(ValueError, match=r"unknown plot kind 'curvs': did you mean 'curves'\? Use one of "
                                         r"\['contour', 'curves', 'history'"):
        search.plot("curvs")
    with pytest.raises(ValueError, match=r"'pareto' does not apply .* multi-objective search"):
        search.plot("pareto")
    with pytest.raises(TypeError, match=r"takes the options \['metric'\], not \['metrc'\]. did you mean"):
        search.plot("curves", metrc="loss")
    with pytest.raises(TypeError, match=r"to save one, pass path='x.png'"):
        search.plot("x.png")
    with pytest.raises(ValueError, match=r"saved as .png \(matplotlib\) or .html \(plotly\), not .pdf"):
        search.plot(path="x.pdf")
    with pytest.raises(ValueError, match=r"params=.*'lrr' is not a hyperparameter .* did you mean 'lr'"):
        search.plot("contour", params=["lrr", "units"])
    with pytest.raises(ValueError, match=r"the trials reported \['accuracy', 'loss'\]. did you mean 'loss'"):
        search.plot("curves", metric="los")


# -------------------------------------------------------------------------------------- curves
def test_curves_draw_one_trace_per_trial_and_stopped_trials_end_early(search: unison.SearchResult) -> None:
    fig = search.plot("curves")
    trials = search.trials.set_index("trial_id")
    assert len(fig.data) == len(trials) == 12
    assert sorted(trace.meta["trial_id"] for trace in fig.data) == list(range(12))
    stopped = [t for t in fig.data if t.meta["status"] == "stopped"]
    completed = [t for t in fig.data if t.meta["status"] == "completed"]
    assert stopped and completed
    for trace in fig.data:
        row = trials.loc[trace.meta["trial_id"]]
        assert trace.meta["status"] == row["status"]
        assert len(trace.x) == row["steps"] and list(trace.x) == list(range(row["last_step"] + 1))
    assert all(len(t.x) < STEPS and t.marker.symbol == "x" and t.marker.size[-1] > 0 for t in stopped)
    assert all(len(t.x) == STEPS and t.marker.symbol == "circle" for t in completed)
    assert {t.line.color for t in stopped} == {plots.data.COLORS["stopped"]}
    (best,) = [t for t in fig.data if t.line.width == 3]
    assert best.meta["trial_id"] == search.best.trial_id
    assert best.y[-1] == pytest.approx(search.best.metric)
    assert fig.layout.title.text == f"accuracy by step: 12 trials, {len(stopped)} stopped early"
    loss = search.plot("curves", metric="loss")
    assert loss.layout.yaxis.title.text == "loss" and loss.data[0].y[0] == pytest.approx(1 - fig_y(fig, loss))


def fig_y(fig: Any, other: Any) -> float:
    """The first value of the trace of ``fig`` drawing the same trial as ``other``'s first trace."""
    wanted = other.data[0].meta["trial_id"]
    return next(t.y[0] for t in fig.data if t.meta["trial_id"] == wanted)


def test_history_is_the_best_so_far_by_trial_and_by_wall_time(search: unison.SearchResult) -> None:
    fig = search.plot("history")
    values_by_trial, best_by_trial, values_by_time, best_by_time = fig.data
    completed = search.trials[search.trials["status"] == "completed"]
    assert list(values_by_trial.x) == list(completed["trial_id"])
    assert list(values_by_trial.y) == pytest.approx(list(completed["accuracy"]))
    for best in (best_by_trial, best_by_time):
        assert list(best.y) == sorted(best.y) and best.y[-1] == pytest.approx(search.best.metric)
    assert sorted(values_by_time.y) == sorted(values_by_trial.y)
    assert list(values_by_time.x) == sorted(values_by_time.x) and values_by_time.x[0] > 0


def test_the_timeline_draws_each_trial_as_a_bar_on_its_worker(search: unison.SearchResult) -> None:
    fig = search.plot("timeline")
    ran = Counter(ev["worker"] for ev in journal(search) if ev["e"] == "end")
    drawn = Counter(worker for trace in fig.data for worker in trace.y)
    assert drawn == ran and sum(drawn.values()) == 12
    assert list(fig.layout.yaxis.categoryarray) == sorted(ran, reverse=True)  # worker-0 at the top
    assert {trace.meta["status"] for trace in fig.data} == set(search.trials["status"])
    for trace in fig.data:
        assert len(trace.x) == len(trace.base) == len(trace.customdata)
        assert all(base >= 0 for base in trace.base) and all(width > 0 for width in trace.x)
    stopped = next(t for t in fig.data if t.meta["status"] == "stopped")
    completed = next(t for t in fig.data if t.meta["status"] == "completed")
    assert max(stopped.x) < min(completed.x)  # a stopped trial ran fewer steps, each sleeping
    assert fig.layout.title.text == f"timeline: 12 trials on {len(ran)} workers"


# ------------------------------------------------------------------------------- Optuna's kinds
def test_optunas_kinds_are_drawn_by_optuna_from_to_optuna(search: unison.SearchResult) -> None:
    completed = int((search.trials["status"] == "completed").sum())
    parallel = search.plot("parallel")
    assert sum(trace.mode == "lines" for trace in parallel.data) == completed  # a line per completed trial
    assert list(parallel.layout.xaxis.ticktext) == ["accuracy", "act", "lr", "units"]
    importance = search.plot("importance")
    assert sorted(importance.data[0].y) == ["act", "lr", "units"]
    assert search.plot("slice").data[0].type == "scatter"
    contour = search.plot("contour", params=["units", "act"])
    assert {contour.layout.xaxis.title.text, contour.layout.yaxis.title.text} == {"units", "act"}
    assert {t.type for t in search.plot("contour").data} >= {"contour"}


def test_a_multi_objective_search_defaults_to_its_pareto_front(tmp_path: Path) -> None:
    def two(x: float) -> dict[str, float]:
        return {"acc": x, "lat": (x - 0.3) ** 2}

    study = unison.Search({"x": unison.uniform(0, 1)}, metric=["acc", "lat"], mode=["max", "min"], trials=8,
                          seed=0, optimizer="random")
    result = unison.run(two, study, backend="inline", storage=tmp_path, progress=False)
    assert plots.kinds(result) == ["pareto", "history", "parallel", "importance", "slice", "timeline"]
    fig = result.plot()
    assert fig.layout.xaxis.title.text == "acc" and fig.layout.yaxis.title.text == "lat"
    assert sum(len(trace.x) for trace in fig.data) == 8
    assert result.plot("history", metric="lat").layout.title.text.startswith("lat (min)")
    with pytest.raises(ValueError, match=r"metrics=\['acc'\].*name 2 or 3 of the optimized metrics"):
        result.plot("pareto", metrics=["acc"])
    assert result.plot(path=tmp_path / "pareto.png") is not None
    assert (tmp_path / "pareto.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------------- files
KINDS = ["curves", "history", "timeline", "parallel", "importance", "slice", "contour"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_saves_a_png_drawn_by_matplotlib(search: unison.SearchResult, kind: str,
                                                    tmp_path: Path) -> None:
    import matplotlib

    style = dict(matplotlib.rcParams)
    fig = search.plot(kind, path=tmp_path / f"{kind}.png")
    assert fig.data  # the plotly figure comes back too
    png = (tmp_path / f"{kind}.png").read_bytes()
    assert png[:8] == PNG and len(png) > 10_000
    assert dict(matplotlib.rcParams) == style  # Optuna's "ggplot" style does not leak into pyplot


def test_html_opens_with_no_network(search: unison.SearchResult, tmp_path: Path) -> None:
    search.plot("curves", path=tmp_path / "curves.html")
    text = (tmp_path / "curves.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", text)  # plotly.js is inlined, no CDN
    assert "Plotly.newPlot" in text and len(text) > 1_000_000 and '"trial_id":11' in text.replace(" ", "")


# ------------------------------------------------------------------------------------ ablation
def weighted(dataset: Any, hparams: dict[str, Any]) -> float:
    """Without ``a`` the value drops by 1, without ``c`` it rises by 1; ``b`` only moves the noise,
    which alternates with the seed (+0.1 / -0.1) and with the number of columns."""
    weights = {"a": 1.0, "b": 0.0, "c": -1.0}
    columns = [c for c in dataset.columns if c in weights]
    noise = 0.1 * (-1) ** (hparams["seed"] + len(columns))
    return sum(weights[c] for c in columns) + noise


def ablation(tmp_path: Path, features: list[str], mode: str, repeats: int = 3) -> unison.AblationResult:
    import pandas as pd

    data = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "c": [5.0, 6.0], "y": [0.0, 1.0]})
    study = unison.Ablation(features=features, label="y", metric="value", mode=mode, repeats=repeats)
    result = unison.run(weighted, study, data=data, backend="inline", storage=tmp_path, progress=False)
    assert isinstance(result, unison.AblationResult)
    return result


def test_the_ablation_chart_colours_what_each_interval_shows(tmp_path: Path) -> None:
    result = ablation(tmp_path, ["a", "b", "c"], "max")
    assert [r["effect"] for r in result.removal_effects()] == ["worse", "no effect shown", "better"]
    assert plots.kinds(result) == ["ablation", "timeline"]
    fig = result.plot()
    by_effect = {trace.meta["effect"]: trace for trace in fig.data}
    assert {e: list(t.y) for e, t in by_effect.items()} == {"worse": ["a"], "no effect shown": ["b"],
                                                            "better": ["c"]}
    assert by_effect["no effect shown"].marker.color == plots.data.EFFECT_COLORS["no effect shown"]
    table = result.ablation.set_index("component")
    worse = by_effect["worse"]
    assert worse.x[0] == pytest.approx(table.loc["a", "diff"])
    low = table.loc["a", "diff"] - table.loc["a", "diff_ci_low"]
    assert worse.error_x.arrayminus[0] == pytest.approx(low)
    assert fig.layout.title.text.endswith(f"<sup>{result.headline()}</sup>")
    result.plot(path=result.path / "ablation.png")
    assert (result.path / "ablation.png").read_bytes()[:8] == PNG


def test_the_headline_names_the_removal_that_hurts_by_the_mode(tmp_path: Path) -> None:
    abc = ["a", "b", "c"]
    assert ablation(tmp_path, abc, "max").headline() == "most important: a (value -0.9333 without it)"
    assert ablation(tmp_path, abc, "min").headline() == "most important: c (value +1.067 without it)"
    helped = ablation(tmp_path, ["c"], "max")
    assert helped.headline() == ("no removal made value worse; removing c helped most "
                                 "(value +1.067 without it)")
    assert "most important" not in repr(helped)
    unclear = ablation(tmp_path, ["b"], "min")
    assert unclear.headline() == ("most important: b (value +0.06667 without it; its 95% interval "
                                  "contains 0: no effect shown)")
    assert ablation(tmp_path, ["b"], "max").headline() == (
        "no removal made value worse; removing b changed it most (value +0.06667 without it; its 95% "
        "interval contains 0: no effect shown)")
    once = ablation(tmp_path, ["a"], "max", repeats=1)
    assert once.headline() == "most important: a (value -0.8 without it; one repeat: no interval)"


def test_one_component_gets_a_chart_with_its_whole_title(tmp_path: Path) -> None:
    result = ablation(tmp_path, ["b"], "max")
    fig = plots.static.ablation(result)
    fig.savefig(tmp_path / "one.png")
    fig.canvas.draw()
    width = fig.bbox.width
    for text in (fig._suptitle, fig.axes[0].title):
        box = text.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= width, text.get_text()


# -------------------------------------------------------------------------------- single run
def test_a_single_run_plots_its_curves(tmp_path: Path) -> None:
    result = unison.run(train, hparams={"lr": 0.01, "units": 64, "act": "relu"}, storage=tmp_path)
    assert plots.kinds(result) == ["curves"]
    fig = result.plot()
    (trace,) = fig.data
    assert list(trace.x) == list(range(STEPS)) and trace.y[-1] == pytest.approx(result.metrics["accuracy"])
    silent = unison.run(lambda: 1.0, storage=tmp_path)
    assert plots.kinds(silent) == []
    with pytest.raises(ValueError, match=r"nothing to plot for this RunResult: a plot needs reports"):
        silent.plot()
    assert "<img" not in silent._repr_html_()


# ------------------------------------------------------------------------------------- Jupyter
def test_the_jupyter_summary_shows_the_default_plot_as_an_inline_png(search: unison.SearchResult) -> None:
    html = search._repr_html_()
    assert "best trial" in html and "<script" not in html
    (uri,) = re.findall(r"<img src='data:image/png;base64,([^']+)' alt='curves plot'", html)
    assert base64.b64decode(uri)[:8] == PNG
    assert len(html) < 300_000


def test_without_plotly_a_png_is_still_written_and_the_error_says_what_to_install(
        search: unison.SearchResult, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['plotly'] = None\n"
            "import unison\n"
            f"r = unison.SearchResult.load({str(search.path)!r})\n"
            "try:\n"
            "    r.plot()\n"
            "except ImportError as e:\n"
            "    print('FIGURE', e)\n"
            "try:\n"
            f"    r.plot('curves', path={str(tmp_path / 'c.png')!r})\n"
            "except ImportError as e:\n"
            "    print('PNG', e)\n"
            "print('SUMMARY', '<img' in r._repr_html_())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert "FIGURE interactive plots need plotly: pip install 'unison[plot]'" in out.stdout, out.stderr
    assert "(the PNG at" in out.stdout and "SUMMARY True" in out.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


def test_importing_the_plots_module_loads_no_plotting_library() -> None:
    code = ("import sys, unison, unison.plots, unison.result\n"
            "print([m for m in ('plotly', 'matplotlib', 'pandas', 'optuna') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
