"""A scheduler's decision: ``CONTINUE`` or ``Stop(reason)``, the older ``True`` / ``False`` still
accepted, anything else refused with a message; the driver stops on a ``Stop`` whatever its truth."""

from __future__ import annotations

import json

import pytest

import unison
from unison.schedulers.base import Decision, decision_of

MESSAGE = "must return unison.CONTINUE to let the trial go on or unison.Stop(reason) to stop it"


class StopTrialOneAt(unison.Scheduler):
    """Stops trial 1 at ``step`` with ``stop``; lets everything else go on with ``go``."""

    def __init__(self, go: object, stop: object, step: int = 1) -> None:
        self.go, self.stop, self.step = go, stop, step

    def on_report(self, trial_id: int, step: int, value: float) -> Decision:
        return self.stop if trial_id == 1 and step == self.step else self.go  # type: ignore[return-value]


def train(q, reporter):
    for step in range(4):
        reporter.report(step=step, acc=q)
    return {"acc": q}


def run(scheduler: unison.Scheduler, tmp_path, backend: str = "inline") -> unison.SearchResult:
    search = unison.Search({"q": unison.choice([0.1, 0.2, 0.3])}, metric="acc", optimizer="grid",
                           scheduler=scheduler)
    return unison.run(train, search, backend=backend, storage=tmp_path, progress=False)


def test_the_decisions_are_explicit_and_public():
    assert isinstance(unison.CONTINUE, unison.Continue) and unison.Continue() == unison.CONTINUE
    assert unison.Scheduler().on_report(0, 0, 1.0) is unison.CONTINUE
    assert unison.Stop("why").reason == "why"


@pytest.mark.parametrize("returned, expected", [
    (True, unison.CONTINUE),
    (False, unison.Stop("stopped by Custom")),
    (unison.CONTINUE, unison.CONTINUE),
    (unison.Stop("too slow"), unison.Stop("too slow")),
])
def test_decision_of_turns_the_old_booleans_into_decisions(returned, expected):
    assert decision_of(returned, "Custom") == expected


@pytest.mark.parametrize("returned", ["nope", None, 1, 0])
def test_decision_of_refuses_anything_else_and_says_what_was_returned(returned):
    with pytest.raises(TypeError, match="Custom.on_report returned") as info:
        decision_of(returned, "Custom")
    assert repr(returned) in str(info.value) and MESSAGE in str(info.value)


def test_a_numpy_boolean_counts_as_a_boolean():
    numpy = pytest.importorskip("numpy")
    assert decision_of(numpy.float64(2.0) > 1.0, "Custom") is unison.CONTINUE
    assert decision_of(numpy.float64(0.0) > 1.0, "Custom") == unison.Stop("stopped by Custom")


@pytest.mark.parametrize("go, stop, reason", [
    (True, False, "stopped by StopTrialOneAt"),
    (unison.CONTINUE, unison.Stop("told to stop"), "told to stop"),
])
def test_a_custom_scheduler_stops_a_trial_in_a_real_search(tmp_path, go, stop, reason):
    rows = {row["trial_id"]: row for row in run(StopTrialOneAt(go, stop), tmp_path).rows}
    assert [rows[i]["status"] for i in range(3)] == ["completed", "stopped", "completed"]
    assert rows[1]["last_step"] == 1 and rows[1]["stop_reason"] == reason
    assert rows[0]["steps"] == rows[2]["steps"] == 4


class TruthyStop(unison.Stop):
    """A ``Stop`` that is truthy: the driver must stop on its type, not on its truth value."""

    def __bool__(self) -> bool:
        return True


def test_the_driver_stops_on_a_stop_whatever_its_truth_value(tmp_path):
    assert bool(unison.Stop("why"))  # no longer falsy
    rows = {row["trial_id"]: row for row in run(StopTrialOneAt(True, TruthyStop("truthy")), tmp_path).rows}
    assert rows[1]["status"] == "stopped" and rows[1]["stop_reason"] == "truthy"


@pytest.mark.parametrize("backend", ["inline", pytest.param("local", marks=pytest.mark.slow)])
def test_a_scheduler_returning_something_else_aborts_the_search_with_the_message(tmp_path, backend):
    with pytest.raises(unison.SearchAborted, match=r"the scheduler cannot decide: StopTrialOneAt.on_report "
                                                   r"returned 'nope' \(str\)") as info:
        run(StopTrialOneAt("nope", "nope"), tmp_path, backend)
    assert MESSAGE in str(info.value)
    (experiment,) = tmp_path.iterdir()
    assert json.loads((experiment / "result.json").read_text())["status"] == "aborted"
