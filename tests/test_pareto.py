"""The Pareto front of a multi-objective search, on hand-made results."""

from __future__ import annotations

import pytest

import unison
from unison.result import SearchResult, dominates


def _rows(values: list[tuple[float, float]], statuses: list[str] | None = None) -> list[dict]:
    statuses = statuses or ["completed"] * len(values)
    return [
        {"trial_id": i, "status": s, "hparams": {"i": i}, "metrics": {"acc": a, "lat": lat},
         "value": [a, lat]}
        for i, ((a, lat), s) in enumerate(zip(values, statuses, strict=True))
    ]


def test_dominates_respects_each_objectives_direction():
    modes = ["max", "min"]
    assert dominates([0.9, 10], [0.8, 20], modes)
    assert dominates([0.9, 10], [0.9, 20], modes)  # equal in one, better in the other
    assert not dominates([0.9, 10], [0.9, 10], modes)  # equal is not dominating
    assert not dominates([0.9, 30], [0.8, 20], modes)  # better accuracy, worse latency
    assert dominates([0.8, 20], [0.9, 10], ["min", "max"])


def test_pareto_front_of_a_hand_made_set(tmp_path):
    values = [(0.90, 50), (0.85, 20), (0.80, 30), (0.95, 80), (0.70, 10), (0.85, 25), (0.95, 90)]
    result = SearchResult(tmp_path, ["acc", "lat"], ["max", "min"], _rows(values), "completed")
    assert result.best is None
    # (0.80, 30) is dominated by (0.85, 20); (0.85, 25) too; (0.95, 90) by (0.95, 80).
    assert sorted(b.trial_id for b in result.pareto) == [0, 1, 3, 4]
    assert {tuple(b.metric) for b in result.pareto} == {(0.90, 50), (0.85, 20), (0.95, 80), (0.70, 10)}


def test_only_completed_trials_enter_the_front(tmp_path):
    values = [(0.99, 1), (0.5, 50), (0.6, 40)]
    result = SearchResult(tmp_path, ["acc", "lat"], ["max", "min"],
                          _rows(values, ["failed", "completed", "stopped"]), "completed")
    assert [b.trial_id for b in result.pareto] == [1]


def test_a_multi_objective_search_returns_its_front(tmp_path):
    def f(x: float) -> dict[str, float]:
        return {"acc": x, "lat": x * x}

    search = unison.Search({"x": unison.uniform(0, 1)}, metric=["acc", "lat"], mode=["max", "min"],
                           trials=12, optimizer="random", seed=0)
    result = unison.run(f, search, backend="inline", storage=tmp_path, progress=False)
    # acc and lat both grow with x: every point trades one for the other, so all are on the front.
    assert len(result.pareto) == 12
    with pytest.raises(ValueError, match="multi-objective"):
        unison.Search({"x": unison.uniform(0, 1)}, metric=["acc", "lat"], mode=["max", "min"],
                      scheduler="median")


def test_the_front_of_a_search_is_the_true_front_of_its_trial_table(tmp_path):
    def f(x: float, y: float) -> dict[str, float]:  # many points are dominated, some are not
        return {"acc": x - 0.5 * y, "lat": (1 - x) ** 2 + y}

    search = unison.Search({"x": unison.uniform(0, 1), "y": unison.uniform(0, 1)}, metric=["acc", "lat"],
                           mode=["max", "min"], trials=30, optimizer="random", seed=4)
    result = unison.run(f, search, backend="inline", storage=tmp_path, progress=False)
    table = result.trials
    points = {int(row.trial_id): [row.acc, row.lat] for row in table.itertuples()}
    front = {tid for tid, p in points.items()
             if not any(dominates(q, p, ["max", "min"]) for q in points.values())}
    assert 1 <= len(front) < len(points)
    assert {b.trial_id for b in result.pareto} == front
    assert {tuple(b.metric) for b in result.pareto} == {tuple(points[tid]) for tid in front}
