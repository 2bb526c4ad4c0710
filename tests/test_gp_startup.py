"""GP's first suggestions drawn without Optuna are Optuna's own, trial by trial."""

from __future__ import annotations

import pytest

import unison
from unison.optimizers.gp_startup import RandomSamplerDraws, draws_supported
from unison.optimizers.optuna import OptunaOptimizer

SPACES = {
    "branin": {"x": unison.uniform(-5, 10), "y": unison.uniform(0, 15)},
    "mixed": {"lr": unison.loguniform(1e-5, 1e-1), "units": unison.integer(16, 256),
              "batch": unison.integer(8, 512, log=True), "act": unison.choice(["relu", "tanh", "gelu"]),
              "p": unison.uniform(0, 0.5), "epochs": 3, "shape": unison.choice([[1, 2], {"a": 1}, None])},
    "edges": {"a": unison.integer(-3, 3), "tiny": unison.uniform(1.0, 1.0 + 1e-12),
              "wide": unison.loguniform(1, 1e9), "one": unison.integer(5, 5),
              "only": unison.choice(["x"])},
}


@pytest.mark.parametrize("space", SPACES.values(), ids=SPACES.keys())
def test_the_draws_are_optunas_gp_sampler_before_its_first_model(space):
    for seed in [*range(25), 2**31 - 1, 2**32 - 1]:
        optuna_gp = OptunaOptimizer("gp")
        optuna_gp.setup(space, "max", seed)
        ours = RandomSamplerDraws(space, seed)
        assert [ours.suggest() for _ in range(12)] == [optuna_gp.suggest(n) for n in range(12)], seed


def test_spaces_and_seeds_it_cannot_reproduce_are_refused():
    x = {"x": unison.uniform(0, 1)}
    assert draws_supported(x, 0) and draws_supported(x, 2**32 - 1)
    assert not draws_supported(x, None) and not draws_supported(x, 2**32) and not draws_supported(x, -1)
    assert not draws_supported({"c": 1}, 0)  # nothing to draw
    conditional = {"opt": unison.choice(["sgd", "adam"]),
                   "momentum": unison.uniform(0, 1).when(opt="sgd")}
    assert not draws_supported(conditional, 0)
    with pytest.raises(ValueError, match="seed in"):
        RandomSamplerDraws(x, 2**32)
