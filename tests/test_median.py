"""The median stopping rule: decisions on hand-made report sequences, and in a real inline search."""

from __future__ import annotations

import json

import pytest

import unison

# Three finished trials (in "max" terms). Running averages up to step 2: 0.6, 0.5, 0.4 -> median 0.5,
# while their values *at* step 2 are 0.7, 0.6, 0.5 -> median 0.6.
FINISHED = {
    0: [0.5, 0.6, 0.7, 0.8],
    1: [0.4, 0.5, 0.6, 0.7],
    2: [0.3, 0.4, 0.5, 0.6],
}


def sign(mode: str) -> float:
    return 1.0 if mode == "max" else -1.0


def scheduler(mode: str, finished=FINISHED, grace_period: int = 2, min_trials: int = 3):
    """A MedianStopping that has seen ``finished`` trials report and complete."""
    median = unison.MedianStopping(grace_period=grace_period, min_trials=min_trials)
    median.setup(mode)
    for trial_id, values in finished.items():
        for step, value in enumerate(values):
            assert median.on_report(trial_id, step, sign(mode) * value) is unison.CONTINUE
        median.on_complete(trial_id, "completed")
    return median


def feed(median, trial_id: int, values: list[float], mode: str) -> list:
    return [median.on_report(trial_id, step, sign(mode) * v) for step, v in enumerate(values)]


MODES = pytest.mark.parametrize("mode", ["max", "min"])


@MODES
def test_no_stop_before_grace_period(mode):
    median = scheduler(mode)
    decisions = feed(median, 10, [0.0, 0.0], mode)  # steps 0 and 1 < grace_period 2
    assert decisions == [unison.CONTINUE] * 2
    # the same trial shape stops at step 2
    assert isinstance(feed(median, 11, [0.0, 0.0, 0.0], mode)[2], unison.Stop)


@MODES
def test_no_stop_before_min_trials_finished(mode):
    two = {k: v for k, v in FINISHED.items() if k < 2}
    median = scheduler(mode, finished=two)
    assert feed(median, 10, [0.0, 0.0, 0.0, 0.0], mode) == [unison.CONTINUE] * 4
    # a trial still running does not count: one more *finished* trial does
    median.on_report(2, 0, sign(mode) * 0.3)
    assert feed(median, 11, [0.0, 0.0, 0.0], mode) == [unison.CONTINUE] * 3
    median.on_complete(2, "completed")
    assert isinstance(feed(median, 12, [0.0, 0.0, 0.0], mode)[2], unison.Stop)


@MODES
def test_failed_trials_do_not_count_towards_min_trials(mode):
    median = scheduler(mode, finished={k: v for k, v in FINISHED.items() if k < 2})
    median.on_report(2, 0, sign(mode) * 0.3)
    median.on_complete(2, "failed")
    assert feed(median, 10, [0.0, 0.0, 0.0], mode) == [unison.CONTINUE] * 3


@MODES
def test_stops_a_trial_worse_than_the_median_of_running_averages(mode):
    median = scheduler(mode)
    decisions = feed(median, 10, [0.1, 0.2, 0.45], mode)  # best 0.45 < median 0.5
    assert decisions[:2] == [unison.CONTINUE] * 2
    stop = decisions[2]
    assert isinstance(stop, unison.Stop) and "median" in stop.reason


@MODES
def test_keeps_a_trial_better_than_the_median_of_running_averages(mode):
    median = scheduler(mode)
    # 0.55 beats the median of running averages (0.5) though not the median of step-2 values (0.6)
    assert feed(median, 10, [0.1, 0.2, 0.55, 0.55], mode) == [unison.CONTINUE] * 4


@MODES
def test_judges_by_the_best_value_so_far_not_the_latest(mode):
    median = scheduler(mode)
    # dropped to 0.1 at step 2, but reached 0.9 at step 1: its best beats the median
    assert feed(median, 10, [0.2, 0.9, 0.1], mode) == [unison.CONTINUE] * 3


def test_a_retried_trial_starts_over():
    median = scheduler("max")
    feed(median, 10, [0.9, 0.9], "max")
    median.on_complete(10, "retried")
    # had the first attempt's 0.9 been kept, the trial would go on
    assert isinstance(feed(median, 10, [0.1, 0.1, 0.1], "max")[2], unison.Stop)


def test_setup_forgets_an_earlier_search():
    median = scheduler("max")
    median.setup("max")  # a second run of the same Search
    assert feed(median, 10, [0.0, 0.0, 0.0], "max") == [unison.CONTINUE] * 3


@pytest.mark.parametrize("kwargs, message", [({"grace_period": -1}, "grace_period"),
                                             ({"min_trials": 0}, "min_trials")])
def test_invalid_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unison.MedianStopping(**kwargs)


# ----------------------------------------------------------------------------------- in a search
QUALITIES = [1.0, 0.9, 0.8, 0.1, 0.95, 0.05]


def quality_train(q, reporter):
    for step in range(5):
        reporter.report(step=step, acc=q)
    return {"acc": q}


@MODES
def test_inline_search_records_bad_trials_as_stopped_with_last_value_and_step(tmp_path, mode):
    space = {"q": unison.choice([sign(mode) * q for q in QUALITIES])}
    search = unison.Search(space, metric="acc", mode=mode, optimizer="grid", scheduler="median")
    r = unison.run(quality_train, search, backend="inline", storage=tmp_path, progress=False)
    rows = {row["trial_id"]: row for row in r.rows}
    assert [rows[i]["status"] for i in range(6)] == [
        "completed", "completed", "completed", "stopped", "completed", "stopped"]
    for i in (3, 5):
        row = rows[i]
        assert row["value"] == sign(mode) * QUALITIES[i]  # the last reported value
        assert row["metrics"] == {"acc": sign(mode) * QUALITIES[i]}
        assert row["last_step"] == 1  # the default grace_period is 1: stopped at the first decision
        assert row["steps"] == 2
        assert "median" in row["stop_reason"]
        lines = (r.path / "trials" / f"{i:04d}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [0, 1]
    for i in (0, 1, 2, 4):
        assert rows[i]["steps"] == 5 and rows[i]["last_step"] == 4
    assert r.best.hparams == {"q": sign(mode) * 1.0}
    table = r.trials
    assert list(table["status"]) == [rows[i]["status"] for i in range(6)]
    ends = [json.loads(line) for line in (r.path / "journal.jsonl").read_text().splitlines()]
    stopped = sorted(e["id"] for e in ends if e.get("e") == "end" and e["status"] == "stopped")
    assert stopped == [3, 5]


def test_reusing_a_search_with_a_scheduler_instance_makes_the_same_decisions(tmp_path):
    space = {"q": unison.choice([0.5, 1.0, 0.9, 0.8])}
    search = unison.Search(space, metric="acc", optimizer="grid", scheduler=unison.MedianStopping())
    first = unison.run(quality_train, search, backend="inline", storage=tmp_path, progress=False)
    second = unison.run(quality_train, search, backend="inline", storage=tmp_path, progress=False)
    assert list(first.trials["status"]) == ["completed", "completed", "completed", "stopped"]
    assert list(second.trials["status"]) == list(first.trials["status"])
