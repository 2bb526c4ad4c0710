"""Optimizers: random search reproducibility, grid enumeration, user-written optimizers."""

from __future__ import annotations

import itertools

import pytest

import unison

SPACE = {
    "lr": unison.loguniform(1e-4, 1e-1),
    "dropout": unison.uniform(0.0, 0.5),
    "units": unison.integer(16, 256),
    "act": unison.choice(["relu", "tanh", "gelu"]),
    "epochs": 5,
}


def random_search(seed: int) -> unison.RandomSearch:
    optimizer = unison.RandomSearch()
    optimizer.setup(SPACE, "max", seed)
    return optimizer


# ---------------------------------------------------------------------------------------- random
def test_random_search_same_seed_gives_same_hparams():
    a = [random_search(42).suggest(n) for n in range(10)]
    b = [random_search(42).suggest(n) for n in range(10)]
    assert a == b
    assert all(set(h) == set(SPACE) and h["epochs"] == 5 for h in a)
    assert len({h["lr"] for h in a}) == 10  # and the trials differ from one another


def test_random_search_different_seed_gives_different_hparams():
    a = [random_search(1).suggest(n) for n in range(5)]
    b = [random_search(2).suggest(n) for n in range(5)]
    assert all(x["lr"] != y["lr"] for x, y in zip(a, b, strict=True))


def test_random_suggestion_does_not_depend_on_call_order():
    in_order = random_search(7)
    forward = [in_order.suggest(n) for n in range(8)]
    shuffled = random_search(7)
    for n in [5, 7, 0, 3, 3, 1, 6, 2, 4]:
        assert shuffled.suggest(n) == forward[n]
    # trial 7 asked first on a fresh optimizer is trial 7 asked last
    assert random_search(7).suggest(7) == forward[7]


def test_random_samples_respect_their_ranges():
    optimizer = random_search(0)
    for n in range(200):
        h = optimizer.suggest(n)
        assert 1e-4 <= h["lr"] <= 1e-1
        assert 0.0 <= h["dropout"] < 0.5
        assert 16 <= h["units"] <= 256 and isinstance(h["units"], int)
        assert h["act"] in ("relu", "tanh", "gelu")


def test_search_rejects_a_negative_seed_before_running():
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        unison.Search(SPACE, seed=-1)


# ------------------------------------------------------------------------------------------ grid
GRID_SPACE = {"a": unison.choice([1, 2]), "const": "x", "b": unison.choice(["p", "q", "r"]),
              "n": unison.integer(0, 1)}


def grid(space=GRID_SPACE) -> unison.GridSearch:
    optimizer = unison.GridSearch()
    optimizer.setup(space, "max", None)
    return optimizer


def test_grid_enumerates_the_cartesian_product_in_order_with_constants():
    optimizer = grid()
    expected = [
        {"a": a, "const": "x", "b": b, "n": n}
        for a, b, n in itertools.product([1, 2], ["p", "q", "r"], [0, 1])
    ]
    assert optimizer.size() == 12
    points = [optimizer.suggest(i) for i in range(12)]
    assert points == expected
    assert all(list(p) == list(GRID_SPACE) for p in points)  # keys keep the space's order
    assert optimizer.suggest(12) is None


@pytest.mark.parametrize("dist", [unison.uniform(0, 1), unison.loguniform(1e-3, 1.0),
                                  unison.integer(0, 10**6)])
def test_grid_rejects_ranges_it_cannot_enumerate(dist):
    with pytest.raises(ValueError, match=r"grid search cannot enumerate .* for 'lr'.*choice\("):
        unison.Search({"lr": dist, "a": unison.choice([1, 2])}, optimizer="grid")


def test_grid_instance_is_validated_like_the_name():
    with pytest.raises(ValueError, match="grid search cannot enumerate"):
        unison.Search({"lr": unison.uniform(0, 1)}, optimizer=unison.GridSearch())


def test_grid_default_trials_is_the_whole_grid_and_more_trials_is_an_error():
    search = unison.Search(GRID_SPACE, optimizer="grid")
    assert search.planned_trials(search.build_optimizer()) == 12
    unison.Search(GRID_SPACE, optimizer="grid", trials=12)  # exactly the grid is fine
    with pytest.raises(ValueError, match=r"grid has 12 points but trials=13"):
        unison.Search(GRID_SPACE, optimizer="grid", trials=13)


def test_grid_search_runs_every_point_once_in_order(tmp_path):
    def train(a, b, n, const):
        return a * 10 + n

    r = unison.run(train, unison.Search(GRID_SPACE, optimizer="grid"), backend="inline",
                   storage=tmp_path, progress=False)
    table = r.trials
    assert len(table) == 12
    assert list(zip(table["a"], table["b"], table["n"], strict=True)) == list(
        itertools.product([1, 2], ["p", "q", "r"], [0, 1])
    )
    assert (table["const"] == "x").all()
    assert r.best.metric == 21


def test_unknown_optimizer_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown optimizer 'tpee'") as info:
        unison.Search(SPACE, optimizer="tpee")
    assert "'grid'" in str(info.value) and "'random'" in str(info.value)
    assert "unison.Optimizer" in str(info.value)


# ----------------------------------------------------------------------------------- user-written
class Ladder(unison.Optimizer):
    """Proposes x = 0, 10, 20, then stops; remembers what it observed."""

    def setup(self, space, mode, seed):
        super().setup(space, mode, seed)
        self.observed: list[tuple[int, dict, float | None, str]] = []

    def suggest(self, trial_number):
        return {"x": trial_number * 10, "tag": "ladder"} if trial_number < 3 else None

    def observe(self, trial_number, hparams, value, status):
        self.observed.append((trial_number, hparams, value, status))


def test_user_optimizer_is_used_by_run_and_observes_every_result(tmp_path):
    ladder = Ladder()
    search = unison.Search({"x": unison.integer(0, 100), "tag": "t"}, metric="score", trials=5,
                           optimizer=ladder)

    def train(x):
        return {"score": -abs(x - 12)}

    r = unison.run(train, search, backend="inline", storage=tmp_path, progress=False)
    assert list(r.trials["x"]) == [0, 10, 20]  # suggest() returned None after three
    assert set(r.trials["tag"]) == {"ladder"}
    assert ladder.observed == [
        (0, {"x": 0, "tag": "ladder"}, -12.0, "completed"),
        (1, {"x": 10, "tag": "ladder"}, -2.0, "completed"),
        (2, {"x": 20, "tag": "ladder"}, -8.0, "completed"),
    ]
    assert r.best.hparams["x"] == 10 and r.best.trial_id == 1
