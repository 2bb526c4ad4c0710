"""Search-space distributions: sampling ranges, validation messages, JSON round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import unison
from unison.space import Distribution, space_from_dict, space_to_dict, validate_space

DRAWS = 4000


def draws(dist, seed: int = 0, n: int = DRAWS) -> list:
    rng = np.random.default_rng(seed)
    return [dist.sample(rng) for _ in range(n)]


# ------------------------------------------------------------------------------------- sampling
def test_uniform_samples_inside_half_open_range_and_spreads_over_it():
    values = draws(unison.uniform(-2.0, 3.0))
    assert all(isinstance(v, float) for v in values)
    assert all(-2.0 <= v < 3.0 for v in values)
    # uniform: about a fifth of the draws in each fifth of the range
    counts = np.histogram(values, bins=5, range=(-2.0, 3.0))[0]
    assert counts.min() > DRAWS / 5 * 0.8


def test_loguniform_samples_inside_range_and_is_uniform_in_log_space():
    values = draws(unison.loguniform(1e-5, 1e-1))
    assert all(isinstance(v, float) for v in values)
    assert all(1e-5 <= v <= 1e-1 for v in values)
    decades = np.histogram(np.log10(values), bins=4, range=(-5, -1))[0]
    assert decades.min() > DRAWS / 4 * 0.8  # each decade gets about a quarter
    assert abs(np.median(values) - 1e-3) < 1e-3  # the geometric mean, far below the arithmetic 0.05


def test_integer_bounds_are_inclusive_and_every_value_is_drawn():
    values = draws(unison.integer(3, 7))
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    assert set(values) == {3, 4, 5, 6, 7}


def test_integer_with_equal_bounds_is_a_constant():
    assert set(draws(unison.integer(4, 4), n=50)) == {4}


def test_integer_log_stays_in_range_reaches_both_bounds_and_favours_small_values():
    values = draws(unison.integer(1, 100, log=True))
    assert all(isinstance(v, int) for v in values)
    assert min(values) == 1 and max(values) == 100
    assert all(1 <= v <= 100 for v in values)
    below_ten = sum(v < 10 for v in values) / len(values)
    assert 0.4 < below_ten < 0.6  # log scale: [1, 10) is half of [1, 101) in log space


def test_choice_draws_only_its_values_and_all_of_them():
    values = draws(unison.choice(["relu", "tanh", None, 3]), n=500)
    assert set(map(repr, values)) == {"'relu'", "'tanh'", "None", "3"}


def test_sampling_is_reproducible_with_a_seeded_generator():
    dist = unison.loguniform(1e-4, 1.0)
    assert draws(dist, seed=5, n=20) == draws(dist, seed=5, n=20)
    assert draws(dist, seed=5, n=20) != draws(dist, seed=6, n=20)


# ----------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make", [unison.uniform, unison.loguniform])
@pytest.mark.parametrize("low, high", [(1.0, 1.0), (2.0, 1.0)])
def test_float_ranges_reject_empty_or_inverted(make, low, high):
    with pytest.raises(ValueError, match=r"empty or inverted range.*low must be less than high"):
        make(low, high)


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-1.0, 1.0), (-2.0, -1.0)])
def test_loguniform_rejects_non_positive_bounds(low, high):
    with pytest.raises(ValueError, match=r"positive bounds.*uniform\(\)"):
        unison.loguniform(low, high)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_uniform_rejects_non_finite_bounds(bad):
    with pytest.raises(ValueError, match="must be finite"):
        unison.uniform(0.0, bad)


@pytest.mark.parametrize("bad", ["1", None, True])
def test_uniform_rejects_non_numbers(bad):
    with pytest.raises(TypeError, match="must be a number"):
        unison.uniform(bad, 2.0)


def test_integer_rejects_inverted_range_and_explains_inclusive_bounds():
    with pytest.raises(ValueError, match=r"inverted range.*both inclusive"):
        unison.integer(5, 4)


@pytest.mark.parametrize("low", [0, -3])
def test_integer_log_needs_low_of_at_least_one(low):
    with pytest.raises(ValueError, match=r"log=True\) needs low >= 1"):
        unison.integer(low, 10, log=True)


@pytest.mark.parametrize("low, high", [(1.5, 3), (1, 3.0), (True, 3)])
def test_integer_rejects_non_int_bounds(low, high):
    with pytest.raises(TypeError, match="must be an int"):
        unison.integer(low, high)


def test_choice_rejects_an_empty_list():
    with pytest.raises(ValueError, match=r"choice\(\[\]\) is empty"):
        unison.choice([])


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", math.nan])
def test_choice_rejects_values_that_are_not_json(value):
    with pytest.raises(TypeError, match=r"not JSON-serializable.*Use a name"):
        unison.choice(["ok", value])


@pytest.mark.parametrize("values", ["abc", 3, None])
def test_choice_rejects_a_non_list(values):
    with pytest.raises(TypeError, match="takes a list of values"):
        unison.choice(values)


@pytest.mark.parametrize("name", ["learning-rate", "2nd", "", "a b", 7])
def test_space_rejects_names_that_are_not_identifiers(name):
    with pytest.raises(ValueError, match="valid Python identifier"):
        validate_space({name: unison.uniform(0, 1)})


def test_space_rejects_non_json_constants():
    with pytest.raises(TypeError, match=r"constant hyperparameter 'act'.*not JSON-serializable"):
        validate_space({"act": object()})


def test_space_must_be_a_mapping():
    with pytest.raises(TypeError, match="dict of name -> distribution"):
        validate_space([unison.uniform(0, 1)])


def test_search_validates_its_space_where_it_is_written():
    with pytest.raises(ValueError, match="valid Python identifier"):
        unison.Search({"learning-rate": unison.loguniform(1e-4, 1e-1)})


# ------------------------------------------------------------------------------------ round trip
def test_space_to_dict_and_back_is_the_same_space_through_json():
    space = {
        "lr": unison.loguniform(1e-4, 0.1),
        "dropout": unison.uniform(0.0, 0.5),
        "units": unison.integer(16, 256),
        "layers": unison.integer(1, 8, log=True),
        "act": unison.choice(["relu", "tanh", None, [1, 2], {"k": 1}]),
        "epochs": 20,
        "tags": ["a", "b"],
    }
    stored = json.loads(json.dumps(space_to_dict(space)))
    rebuilt = space_from_dict(stored)
    assert rebuilt == space
    assert list(rebuilt) == list(space)
    assert type(rebuilt["lr"]) is type(space["lr"])
    assert rebuilt["layers"].log is True and rebuilt["units"].log is False
    # the rebuilt space samples exactly what the original does
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    for name, dist in space.items():
        if isinstance(dist, Distribution):
            assert dist.sample(rng_a) == rebuilt[name].sample(rng_b)


def test_distributions_compare_by_value():
    assert unison.uniform(0, 1) == unison.uniform(0.0, 1.0)
    assert unison.uniform(0, 1) != unison.loguniform(0.1, 1)
    assert unison.integer(1, 5) != unison.integer(1, 5, log=True)
    assert len({unison.choice([1, 2]), unison.choice([1, 2])}) == 1
