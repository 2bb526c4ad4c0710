"""optimizer="auto": its routing decisions, the GP -> TPE hand-over, and a search that runs with it."""

from __future__ import annotations

import re

import pytest

import unison
from unison.optimizers import AutoSearch, make_optimizer
from unison.optimizers.auto import route
from unison.optimizers.process import Offloaded

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
        optimizer = AutoSearch(gp_trials=12, timing=False)
        search = unison.Search(NUMERIC, metric="value", mode="min", trials=15, optimizer=optimizer, seed=3,
                               max_concurrent=2)
        result = unison.run(objective, search, backend="inline", progress=False,
                            storage=str(tmp_path / str(i)))
        assert (optimizer.sampler, optimizer.reason) == ("tpe", "12 trials suggested by GP (gp_trials)")
        assert len(result.trials) == 15 and (result.trials["status"] == "completed").all()
        runs.append(_hparams(result))
    assert runs[0] == runs[1]
    assert len({tuple(h.values()) for h in runs[0]}) == 15  # TPE's start did not repeat GP's points


class _Clock:
    """Stands in for ``time.perf_counter`` in the auto module: the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.processes: list[str] = []

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    """The auto module's clock, moved by the test; ``clock.processes`` records the GP processes started
    (none is: GP stays in this process)."""
    fake = _Clock()
    monkeypatch.setattr("unison.optimizers.auto.time.perf_counter", fake)
    monkeypatch.setattr("unison.optimizers.auto._start_gp_process", lambda: fake.processes.append("gp"))
    return fake


def _drive(optimizer: AutoSearch, trials: int, pace_s: float, clock: _Clock) -> None:
    """Suggest and complete ``trials`` one after the other, a result every ``pace_s`` seconds."""
    for number in range(trials):
        hparams = optimizer.suggest(number)
        clock.now += pace_s
        optimizer.observe(number, hparams, (hparams["x"] - 0.5) ** 2 + hparams["y"], "completed")


def test_fast_results_hand_over_to_tpe_before_gp_fits_a_model(clock: _Clock) -> None:
    """Results every 10 ms: TPE takes over when GP's random start ends, before any model is fitted;
    with timing=False GP goes on (its suggestions then depend on the seed and results alone)."""
    fast = AutoSearch()
    fast.setup(NUMERIC, "min", 0)
    _drive(fast, 12, 0.01, clock)
    assert fast.sampler == "tpe" and fast.reason.startswith("results arrive every 0.01 s")
    assert fast._fit_s == []  # noqa: SLF001 - no GP model was fitted
    assert clock.processes == []  # nor GP's process started for one
    untimed = AutoSearch(timing=False)
    untimed.setup(NUMERIC, "min", 0)
    _drive(untimed, 11, 0.01, clock)
    assert untimed.sampler == "gp" and len(untimed._fit_s) == 1  # noqa: SLF001


@pytest.mark.parametrize(("cost_s", "expected"), [(0.5, "gp"), (1.5, "tpe")])
def test_gp_stays_while_it_takes_under_half_the_time_between_results(
    monkeypatch: pytest.MonkeyPatch, clock: _Clock, cost_s: float, expected: str
) -> None:
    """Results every 2 s, GP's suggestions cost 0.5 s (the clock moved by a slow stand-in): GP stays
    past its third model-based suggestion; at 1.5 s each it hands over there, saying why."""
    optimizer = AutoSearch()
    optimizer.setup(NUMERIC, "min", 0)
    real = Offloaded.suggest  # GP's model-based suggestions (its random start is drawn apart)

    def slow(self: Offloaded, number: int) -> dict:
        clock.now += cost_s
        return real(self, number)

    monkeypatch.setattr(Offloaded, "suggest", slow)
    _drive(optimizer, 14, 2.0, clock)
    assert optimizer.sampler == expected, optimizer.reason
    assert clock.processes == ["gp"]  # slow results: GP's process started ahead of its first model, once
    if expected == "tpe":
        # (the time between results includes GP's own 1.5 s: the trials ran one after another)
        assert re.fullmatch(r"GP's suggestions take 1.5 s, more than half the time between results "
                            r"\(2\.\d+ s\)", optimizer.reason)
        assert len(optimizer._fit_s) == 3  # noqa: SLF001 - decided at the third
