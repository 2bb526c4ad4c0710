"""The ``pbt`` plot of a population-based-training search: a real PBT search of 4 members on 4 local
worker processes, its plotly figure's traces and its matplotlib drawing read back against the trial
table, the curves and the journal's clone events, the PNG, the HTML report, and a search that is not
PBT."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import plots

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")

STEPS = 20
MEMBERS = 4
PNG = b"\x89PNG\r\n\x1a\n"


def gain(lr: float, step: int) -> float:
    """What one step adds to the score: most for lr near 0.1 before step 10 and near 0.01 after."""
    target = 0.1 if step < 10 else 0.01
    return 1.0 - abs(math.log10(lr) - math.log10(target))


def train(lr: float, reporter: Any, ctx: Any) -> dict[str, float]:
    """A score that accumulates ``gain``; a clone resumes its parent's checkpoint."""
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
    score = ctx.checkpoint["score"] if ctx.checkpoint is not None else 0.0
    for step in range(start, STEPS):
        score += gain(lr, step)
        time.sleep(0.02)
        reporter.report(step=step, checkpoint={"score": score}, score=score)
    return {"score": score}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> unison.SearchResult:
    """A PBT search: 4 members on 4 workers, a decision every 4 steps."""
    pbt = unison.PBT(perturbation_interval=4, hyperparam_mutations={"lr": unison.loguniform(1e-3, 1.0)},
                     seed=0)
    study = unison.Search({"lr": unison.loguniform(1e-3, 1.0)}, metric="score", mode="max", trials=MEMBERS,
                          scheduler=pbt, seed=1)
    out = unison.run(train, study, backend=unison.Local(workers=MEMBERS),
                     storage=tmp_path_factory.mktemp("pbt"), progress=False)
    assert isinstance(out, unison.SearchResult)
    assert out.trials["parent"].notna().any(), "the PBT search made no clone: nothing to test"
    return out


@pytest.fixture(scope="module")
def fig(result: unison.SearchResult) -> Any:
    return result.plot("pbt")


def clone_events(result: unison.SearchResult) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in (result.path / "journal.jsonl").read_text().splitlines()]
    return [ev for ev in events if ev.get("e") == "clone"]


def reported(result: unison.SearchResult) -> dict[int, list[tuple[int, float]]]:
    """Each trial's (step, score) reports, in step order."""
    out: dict[int, list[tuple[int, float]]] = {}
    for row in result.curves.sort_values(["trial_id", "step"]).itertuples():
        out.setdefault(int(row.trial_id), []).append((int(row.step), float(row.score)))
    return out


def traces(fig: Any, part: str) -> dict[int, Any]:
    drawn = [t for t in fig.data if t.meta["part"] == part]
    by_trial = {t.meta["trial_id"]: t for t in drawn}
    assert len(by_trial) == len(drawn), f"a trial has two {part} traces"
    return by_trial


# --------------------------------------------------------------------------------------- kinds
def test_pbt_is_the_default_kind_of_a_pbt_search(result: unison.SearchResult, fig: Any) -> None:
    assert plots.kinds(result)[0] == "pbt"
    assert "curves" in plots.kinds(result)
    clones = int(result.trials["parent"].notna().sum())
    assert clones == len(clone_events(result))
    title = f"score by step: population of {MEMBERS}, {clones} clone{'' if clones == 1 else 's'}"
    assert fig.layout.title.text.startswith(title)
    assert result.plot().layout.title.text == fig.layout.title.text


def test_a_search_that_is_not_pbt_does_not_list_pbt(tmp_path: Path) -> None:
    study = unison.Search({"lr": unison.loguniform(1e-3, 1.0)}, metric="score", mode="max", trials=2, seed=0)
    plain = unison.run(train, study, backend="inline", storage=tmp_path, progress=False)
    assert isinstance(plain, unison.SearchResult)
    assert "member" not in plain.trials.columns
    assert "pbt" not in plots.kinds(plain)
    assert plots.kinds(plain)[0] == "curves"
    with pytest.raises(ValueError, match=r"'pbt' does not apply .* population-based-training search"):
        plain.plot("pbt")


def test_the_metric_option_names_what_was_reported(result: unison.SearchResult) -> None:
    with pytest.raises(ValueError, match=r"plot\('pbt', metric='scor'\): the trials reported \['score'\]. "
                                         r"did you mean 'score'"):
        result.plot("pbt", metric="scor")
    with pytest.raises(TypeError, match=r"'pbt' takes the options \['metric'\]"):
        result.plot("pbt", params=["lr"])


# --------------------------------------------------------------------------------------- lines
def test_every_trial_that_reported_is_a_line_in_its_members_colour(result: unison.SearchResult,
                                                                     fig: Any) -> None:
    lines = traces(fig, "line")
    points = reported(result)
    assert set(lines) == set(points)
    members = dict(zip(result.trials["trial_id"], result.trials["member"], strict=True))
    colours: dict[int, set[str]] = {}
    for tid, trace in lines.items():
        assert trace.meta["member"] == members[tid]
        assert trace.name == f"member {members[tid]}"
        assert list(trace.x) == [s for s, _ in points[tid]]
        assert list(trace.y) == pytest.approx([v for _, v in points[tid]])
        colours.setdefault(members[tid], set()).add(trace.line.color)
    assert set(colours) == set(range(MEMBERS))
    assert all(len(c) == 1 for c in colours.values()), colours  # one colour per member ...
    assert len({next(iter(c)) for c in colours.values()}) == MEMBERS  # ... and a different one each
    shown = sorted(t.name for t in fig.data if t.showlegend is not False)
    assert shown == [f"member {m}" for m in range(MEMBERS)]


def test_a_clone_starts_with_a_dashed_connector_from_its_parents_value(result: unison.SearchResult,
                                                                        fig: Any) -> None:
    connectors = traces(fig, "clone")
    points = reported(result)
    clones = result.trials[result.trials["parent"].notna()]
    drawn = [row for row in clones.itertuples() if int(row.trial_id) in points]
    assert {int(row.trial_id) for row in drawn} == set(connectors)
    for row in drawn:
        tid, parent, cloned_step = int(row.trial_id), int(row.parent), int(row.cloned_step)
        trace = connectors[tid]
        assert trace.line.dash == "dash"
        assert trace.line.color == traces(fig, "line")[tid].line.color
        assert (trace.meta["parent"], trace.meta["cloned_step"]) == (parent, cloned_step)
        inherited = dict(points[parent])[cloned_step]  # the parent's value at the checkpoint's step
        first_step, first_value = points[tid][0]
        assert list(trace.x) == [cloned_step, first_step]
        assert list(trace.y) == pytest.approx([inherited, first_value])
        # the clone really continued from that value: its first report adds one step's gain to it
        assert first_step == cloned_step + 1
        assert first_value == pytest.approx(inherited + gain(row.lr, first_step))


def test_a_replaced_trial_ends_in_an_x(result: unison.SearchResult, fig: Any) -> None:
    replaced = {ev["replaces"] for ev in clone_events(result)}
    stop_reasons = dict(zip(result.trials["trial_id"], result.trials["stop_reason"], strict=True))
    assert all(str(stop_reasons[tid]).startswith("replaced by") for tid in replaced)
    for tid, trace in traces(fig, "line").items():
        assert trace.meta["replaced"] is (tid in replaced)
        symbol = "x" if tid in replaced else "circle"
        assert trace.marker.symbol == symbol
        assert list(trace.marker.size)[-1] > 0 and set(list(trace.marker.size)[:-1]) <= {0}


def test_the_best_trial_is_thick_and_on_top(result: unison.SearchResult, fig: Any) -> None:
    assert result.best is not None
    best = result.best.trial_id
    lines = traces(fig, "line")
    assert lines[best].meta["best"] is True
    assert all(t.line.width < lines[best].line.width for tid, t in lines.items() if tid != best)
    assert fig.data[-1].meta["trial_id"] == best


def test_the_hover_names_the_trial_its_parent_and_hparams(result: unison.SearchResult, fig: Any) -> None:
    import pandas as pd

    lines = traces(fig, "line")
    for row in result.trials.itertuples():
        if int(row.trial_id) not in lines:
            continue
        text = lines[int(row.trial_id)].text[0]
        assert text.startswith(f"trial {row.trial_id} ({row.status}), member {row.member}")
        assert f"lr={row.lr:.4g}" in text
        lineage = f"clone of trial {row.parent} at step {row.cloned_step}"
        assert (lineage in text) is bool(pd.notna(row.parent))


# ------------------------------------------------------------------------------- the PNG, the report
def test_the_png_draws_the_same_segments(result: unison.SearchResult, fig: Any, tmp_path: Path) -> None:
    from matplotlib.colors import to_hex

    from unison.plots import static

    target = result.plot("pbt", path=tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)
    assert target.layout.title.text == fig.layout.title.text
    drawn = static.pbt(result)
    ax = drawn.axes[0]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(dashed) == len(traces(fig, "clone"))
    assert len(crosses) == sum(t.meta["replaced"] for t in traces(fig, "line").values())
    colours = {t.meta["member"]: t.line.color for t in fig.data}
    legend = {text.get_text(): to_hex(handle.get_color())
              for text, handle in zip(ax.get_legend().get_texts(), ax.get_legend().get_lines(), strict=True)}
    assert {f"member {m}": c for m, c in colours.items()}.items() <= legend.items()
    assert ax.get_title() == fig.layout.title.text.split("<br>")[0]


def test_the_html_report_draws_the_pbt_plot(result: unison.SearchResult, tmp_path: Path) -> None:
    from unison.report import write_report

    page = write_report(result, tmp_path / "report.html").read_text()
    assert "<div class='plot' data-kind='pbt'>" in page
    assert "id=\"plot-pbt\"" in page
    assert "plot-error" not in page
