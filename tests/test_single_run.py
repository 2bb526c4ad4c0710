"""A single run goes through the same trial runtime as a search trial: it rejects what a trial rejects,
with the same message, and still behaves as plain Python (exceptions, output)."""

from __future__ import annotations

import json
import math

import pytest

import unison


def search_trial_error(fn, tmp_path) -> str:
    """The error a one-trial inline search records for ``fn``'s returned value."""
    r = unison.run(fn, unison.Search({"x": 1}, metric="acc", trials=1), backend="inline",
                   storage=tmp_path / "search", progress=False)
    (row,) = r.rows
    assert row["status"] == "failed"
    return row["error"]


@pytest.mark.parametrize("returned", [
    {"acc": float("nan")},
    {"acc": math.inf},
    {"acc": "high"},
    {"acc": [0.1, 0.2]},
    "accuracy: 0.9",
], ids=["nan", "inf", "a-string-value", "a-list-value", "a-string"])
def test_a_single_run_rejects_what_a_search_trial_rejects_with_the_same_message(tmp_path, returned):
    def train(x=1):
        return returned

    expected = search_trial_error(train, tmp_path)
    with pytest.raises(ValueError) as info:
        unison.run(train, storage=tmp_path / "single", metric="acc")
    assert str(info.value) == expected
    (experiment,) = (tmp_path / "single").iterdir()
    assert json.loads((experiment / "experiment.json").read_text())["status"] == "failed"
    end = json.loads((experiment / "journal.jsonl").read_text().splitlines()[-1])
    assert end["status"] == "failed" and end["error"] == expected


def test_a_single_run_that_returns_nothing_completes_with_no_metrics(tmp_path):
    r = unison.run(lambda reporter: reporter.report(step=0, loss=0.5), storage=tmp_path)
    assert r.metrics == {} and r.value is None and r.returned is None
    (experiment,) = tmp_path.iterdir()
    reports = (experiment / "trials" / "0000" / "metrics.jsonl").read_text()
    assert json.loads(reports) == {"step": 0, "loss": 0.5}


def test_a_single_run_reports_are_checked_as_a_trials_are(tmp_path):
    def train(reporter):
        reporter.report(step=0, loss="low")

    with pytest.raises(TypeError, match=r"reporter.report\(loss='low'\): metrics must be numbers"):
        unison.run(train, storage=tmp_path)


def test_a_keyboard_interrupt_in_a_single_run_reaches_the_caller_and_is_recorded(tmp_path):
    def train():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        unison.run(train, storage=tmp_path)
    (experiment,) = tmp_path.iterdir()
    assert json.loads((experiment / "experiment.json").read_text())["status"] == "interrupted"


def test_hyperparameters_passed_as_the_context_say_where_they_go(tmp_path):
    with pytest.raises(TypeError, match=r"context must be None, a unison.Search, .* got dict; to run once "
                                        r"with these hyperparameters, pass them as hparams="):
        unison.run(lambda lr: lr, {"lr": 0.1}, storage=tmp_path)
    with pytest.raises(TypeError, match=r"got str$"):
        unison.run(lambda: 1.0, "search", storage=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was written
