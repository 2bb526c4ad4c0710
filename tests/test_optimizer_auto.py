"""optimizer="auto": its routing decisions, the GP -> TPE hand-over, and a search that runs with it."""

from __future__ import annotations

import pytest

import unison
from unison.optimizers import AutoSearch, make_optimizer
from unison.optimizers.auto import route

NUMERIC = {"x": unison.uniform(-2, 2), "y": unison.loguniform(1e-3, 1.0), "n": unison.integer(1, 8)}


@pytest.mark.parametrize(
    ("space", "mode", "expected", "why"),
    [
        (NUMERIC, "min", "gp", "3 numeric"),
        (NUMERIC, ["min", "max"], "tpe", "several objectives"),
        ({**NUMERIC, "z": unison.uniform(0, 1).when(n=1)}, "min", "tpe", "conditional"),
        ({"a": unison.choice(["p", "q"]), "b": unison.choice([1, 2]), "x": unison.uniform(0, 1)},
         "max", "tpe", "mostly categorical"),
        ({"a": unison.choice(["p", "q"]), "x": unison.uniform(0, 1)}, "max", "gp", "2 numeric"),
        ({f"x{i}": unison.uniform(0, 1) for i in range(17)}, "min", "tpe", "17 hyperparameters"),
        ({"lr": 0.1}, "min", "tpe", "nothing to optimize"),
    ],
)
def test_route(space: dict, mode: object, expected: str, why: str) -> None:
    sampler, reason = route(space, mode, gp_max_dims=16)
    assert sampler == expected
    assert why in reason


def test_auto_is_a_registered_name_with_did_you_mean() -> None:
    assert isinstance(make_optimizer("auto"), AutoSearch)
    with pytest.raises(ValueError, match=r"did you mean 'auto'\?.*'auto'"):
        unison.Search(NUMERIC, optimizer="atuo")
    with pytest.raises(ValueError, match="gp_trials"):
        AutoSearch(gp_trials=-1)


def _hparams(result: unison.Result) -> list[dict]:
    return [{k: t[k] for k in NUMERIC} for t in result.trials.to_dict("records")]


def test_search_runs_hands_over_to_tpe_and_is_reproducible(tmp_path) -> None:
    """GP for the first 12 trials (10 of them its random start), TPE for the rest; same seed, same run."""

    def objective(x: float, y: float, n: int) -> float:
        return (x - 0.5) ** 2 + y + 0.01 * n

    runs = []
    for i in range(2):
        optimizer = AutoSearch(gp_trials=12)
        search = unison.Search(NUMERIC, metric="value", mode="min", trials=15, optimizer=optimizer, seed=3,
                               max_concurrent=2)
        result = unison.run(objective, search, backend="inline", progress=False,
                            storage=str(tmp_path / str(i)))
        assert (optimizer.sampler, optimizer.reason) == ("tpe", "12 trials suggested by GP (gp_trials)")
        assert len(result.trials) == 15 and (result.trials["status"] == "completed").all()
        runs.append(_hparams(result))
    assert runs[0] == runs[1]
    assert len({tuple(h.values()) for h in runs[0]}) == 15  # TPE's start did not repeat GP's points


def test_timing_rule_switches_only_when_asked() -> None:
    """Trials that end at once are shorter than any suggestion: with timing=True TPE takes over."""
    for timing, expected in ((False, "gp"), (True, "tpe")):
        optimizer = AutoSearch(timing=timing, min_gp_seconds=0.0)
        optimizer.setup(NUMERIC, "min", 0)
        for number in range(3):
            hparams = optimizer.suggest(number)
            optimizer.observe(number, hparams, hparams["x"] ** 2, "completed")
        assert optimizer.sampler == expected
        if timing:
            assert "shorter than GP's suggestions" in optimizer.reason
