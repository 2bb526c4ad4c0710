"""Per-trial limits: the time limit (``trial_timeout_s``), the cap on a trial's logs and the cap on
what a trial may return or report at once. Real worker processes for the local backend, the driver's
own thread (with ``SIGALRM``) for the inline one."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import trialfiles
from unison.worker.logs import LazyLog
from unison.worker.metrics import MAX_METRICS
from unison.worker.reporter import Reporter

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from processes import alive, journal  # noqa: E402


def events(path: Path, kind: str, trial_id: int) -> list[dict[str, Any]]:
    return [ev for ev in journal(path) if ev.get("e") == kind and ev.get("id") == trial_id]


def search(trials: int, **options: Any) -> unison.Search:
    return unison.Search({"x": unison.uniform(0, 1)}, trials=trials, optimizer="random", seed=3, **options)


# ------------------------------------------------------------------------- declaring the limit
@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("inf"), "5", True])
def test_trial_timeout_must_be_a_positive_number_of_seconds(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"Search\(trial_timeout_s=\.\.\.\) must be a number of seconds > 0"):
        search(2, trial_timeout_s=bad)
    with pytest.raises(ValueError, match=r"Ablation\(trial_timeout_s=\.\.\.\) must be a number"):
        unison.Ablation(base={"a": 1}, features=["f"], trial_timeout_s=bad)


def test_retry_on_timeout_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"Search\(retry_on_timeout=\.\.\.\) must be True or False"):
        search(2, trial_timeout_s=1, retry_on_timeout="yes")
    with pytest.raises(ValueError, match=r"Ablation\(retry_on_timeout=\.\.\.\) must be True or False"):
        unison.Ablation(base={"a": 1}, features=["f"], retry_on_timeout=1)


def test_the_limit_round_trips_through_experiment_json_and_old_searches_still_load() -> None:
    stored = json.loads(json.dumps(search(2, trial_timeout_s=2, retry_on_timeout=True).to_dict()))
    assert stored["trial_timeout_s"] == 2.0 and stored["retry_on_timeout"] is True
    again = unison.Search.from_dict(stored)
    assert (again.trial_timeout_s, again.retry_on_timeout) == (2.0, True)
    assert again.to_dict() == stored
    plain = search(2).to_dict()
    # Unset, the options are not stored: experiment.json files written before them compare equal.
    assert "trial_timeout_s" not in plain and "retry_on_timeout" not in plain
    old = unison.Search.from_dict(plain)
    assert (old.trial_timeout_s, old.retry_on_timeout) == (None, False)


def test_an_ablation_takes_the_limit_to_its_search() -> None:
    study = unison.Ablation(base={"a": 1}, features=["f", "g"], trial_timeout_s=3, retry_on_timeout=True)
    plan = study.to_search()
    assert (plan.trial_timeout_s, plan.retry_on_timeout) == (3.0, True)
    assert study.to_dict()["trial_timeout_s"] == 3.0 and study.to_dict()["retry_on_timeout"] is True
    assert "trial_timeout_s" not in unison.Ablation(base={"a": 1}, features=["f"]).to_dict()


# ----------------------------------------------------------------------- inline: SIGALRM
def test_inline_trial_past_its_limit_fails_with_timeout_and_the_search_goes_on(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1:
            while True:
                time.sleep(0.01)
        if ctx.trial_id == 2:  # swallows the first interruption: interrupted again a second later
            try:
                time.sleep(30)
            except BaseException:  # noqa: BLE001, S110 - exactly what a careless function does
                pass
            time.sleep(30)
        return x

    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    r = unison.run(fn, search(4, trial_timeout_s=0.5), backend="inline", storage=tmp_path, progress=False)
    assert time.monotonic() - started < 8
    assert signal.getsignal(signal.SIGALRM) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    frame = r.trials.set_index("trial_id")
    assert list(frame["status"]) == ["completed", "failed", "failed", "completed"]
    for tid in (1, 2):
        assert frame.loc[tid, "error"] == "timeout: the trial ran longer than trial_timeout_s=0.5"
        assert frame.loc[tid, "attempts"] == 1
        (end,) = events(r.path, "end", tid)
        assert end["status"] == "failed" and end["error"].startswith("timeout")
        assert 0.5 <= end["duration"] < 5
    # where it was stuck is in the trial's stderr.log
    assert "in fn" in (r.path / "trials" / "0001" / "stderr.log").read_text()
    assert sys.stdout is not None and not isinstance(sys.stdout, LazyLog)


def test_inline_retry_on_timeout_runs_the_trial_max_retries_plus_one_times(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        if ctx.trial_id == 0:
            time.sleep(30)
        return x

    r = unison.run(fn, search(2, trial_timeout_s=0.3, retry_on_timeout=True, max_retries=2),
                   backend="inline", storage=tmp_path, progress=False)
    frame = r.trials.set_index("trial_id")
    assert frame.loc[0, "status"] == "failed" and frame.loc[0, "attempts"] == 3
    assert frame.loc[0, "error"].startswith("timeout: the trial ran longer than trial_timeout_s=0.3")
    assert "gave up after 3 attempts" in frame.loc[0, "error"]
    assert [ev["attempt"] for ev in events(r.path, "start", 0)] == [0, 1, 2]
    assert frame.loc[1, "status"] == "completed"


# ------------------------------------------------------------------------- log caps
def test_lazy_log_keeps_the_last_part_under_a_note_and_rewrites_only_when_crossing(tmp_path: Path) -> None:
    log = LazyLog(tmp_path / "stdout.log", limit=4096)
    lines = [f"line {i}\n" for i in range(5000)]
    rewrites = 0
    for line in lines:
        size = log._size
        log.write(line)
        rewrites += log._size < size
    log.close()
    data = (tmp_path / "stdout.log").read_bytes()
    assert len(data) <= 4096
    note, *kept = data.decode().splitlines(keepends=True)
    assert note.startswith("[unison: ")
    assert note.endswith("bytes of earlier output were cut (log limit 4096 bytes)]\n")
    assert kept == lines[-len(kept):]  # whole lines, the last ones, in order
    total = sum(map(len, lines))
    assert int(note.split()[1]) == log.cut == total - sum(map(len, kept))
    assert rewrites <= total // 2048 + 1  # once per half limit written, not once per line


def test_metrics_log_note_is_a_json_line(tmp_path: Path) -> None:
    log = LazyLog(tmp_path / "metrics.jsonl", limit=2048, json_note=True)
    for step in range(500):
        log.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
    log.close()
    first, *rest = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "bytes of earlier reports were cut" in first["unison"]
    assert rest[-1]["step"] == 499


def test_shipped_logs_of_retried_attempts_stay_within_the_cap_too(tmp_path: Path) -> None:
    # Spark workers ship each attempt's logs; the driver appends them to the trial's logs.
    attempt = b"".join(b"attempt %d line %07d\n" % (a, i) for a in (0, 1) for i in range(300_000))
    first, second = attempt[: len(attempt) // 2], attempt[len(attempt) // 2:]
    assert len(first) + len(second) > trialfiles.LOG_LIMIT_BYTES
    trialfiles.write(tmp_path, {"stdout.log": first})
    trialfiles.write(tmp_path, {"stdout.log": second})
    data = (tmp_path / "stdout.log").read_bytes()
    assert len(data) <= trialfiles.LOG_LIMIT_BYTES
    assert data.startswith(b"[unison: ") and data.endswith(b"attempt 1 line 0299999\n")


def _print_30_mb(x: float, ctx: Any) -> float:
    chunk = "".join(f"{ctx.trial_id} line {i:07d} " + "y" * 80 + "\n" for i in range(10_000))  # ~1 MB
    for _ in range(30):
        sys.stdout.write(chunk)
    print("the last line printed")
    return x


def _assert_log_cut(path: Path, trial_id: int) -> None:
    log = path / "trials" / f"{trial_id:04d}" / "stdout.log"
    assert log.stat().st_size <= trialfiles.LOG_LIMIT_BYTES
    text = log.read_text()
    first, last = text.split("\n", 1)[0], text.rstrip("\n").rsplit("\n", 1)[-1]
    assert first.startswith("[unison: ")
    assert first.endswith("bytes of earlier output were cut (log limit 8 MiB)]")
    assert last == "the last line printed"
    (end,) = events(path, "end", trial_id)
    assert end["logs_cut"]["stdout.log"] > 20_000_000
    assert end["logs_cut"]["stdout.log"] == int(first.split()[1])


def test_a_trial_printing_30_mb_leaves_a_capped_log_inline(tmp_path: Path) -> None:
    started = time.monotonic()
    r = unison.run(_print_30_mb, search(1), backend="inline", storage=tmp_path, progress=False)
    assert time.monotonic() - started < 10
    assert r.trials["status"].tolist() == ["completed"]
    _assert_log_cut(r.path, 0)


# ----------------------------------------------------------------------- result caps
def test_report_over_the_caps_raises_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"1001 metrics: at most 1000 metrics and 1 MiB.*ctx\.trial_dir"):
        Reporter().report(step=0, **{f"m{i}": 1.0 for i in range(MAX_METRICS + 1)})
    with pytest.raises(ValueError, match=r"bytes of metrics: at most 1000 metrics and 1 MiB.*ctx\.trial_dir"):
        Reporter().report(step=0, **{"n" * (2 * 1024 * 1024): 1.0})
    reporter = Reporter()
    reporter.report(step=0, **{f"m{i}": 1.0 for i in range(MAX_METRICS)})  # at the cap is fine
    assert len(reporter.last_metrics) == MAX_METRICS


def test_a_million_returned_numbers_fail_the_trial_fast_inline(tmp_path: Path) -> None:
    def fn(x: float, reporter: Any, ctx: Any) -> Any:
        if ctx.trial_id == 0:
            return {f"m{i}": float(i) for i in range(1_000_000)}
        if ctx.trial_id == 1:
            reporter.report(step=0, **{f"m{i}": float(i) for i in range(5000)})
        if ctx.trial_id == 2:
            return list(range(1_000_000))  # the message shows a bounded repr of it
        if ctx.trial_id == 3:
            raise ValueError("z" * 5_000_000)
        return x

    started = time.monotonic()
    r = unison.run(fn, search(5), backend="inline", storage=tmp_path, progress=False)
    assert time.monotonic() - started < 15
    frame = r.trials.set_index("trial_id")
    assert list(frame["status"]) == ["failed"] * 4 + ["completed"]
    ends = {tid: events(r.path, "end", tid)[0] for tid in range(4)}
    expected = "the function returned 1000000 metrics: at most 1000 metrics and 1 MiB"
    assert ends[0]["error"].startswith(expected)
    assert "ctx.trial_dir" in ends[0]["error"]
    assert "ValueError: reporter.report() got 5000 metrics" in ends[1]["error"]
    assert len(ends[2]["error"]) < 1000 and "list" in ends[2]["error"]
    assert len(ends[3]["error"]) < 70_000 and "characters of this error were cut" in ends[3]["error"]
    assert (r.path / "journal.jsonl").stat().st_size < 500_000


# ------------------------------------------------------------------ local worker processes
@pytest.mark.slow
def test_hung_trial_on_local_workers_is_ended_and_recorded_as_timeout(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        import os

        (ctx.trial_dir / "pid").write_text(str(os.getpid()))
        if ctx.trial_id == 1:
            while True:  # heartbeats go on (the GIL is free): only the time limit ends this
                time.sleep(0.05)
        time.sleep(0.5)  # the other trials outlast the limit on one worker: the hung one is replaced
        return x

    started = time.monotonic()
    r = unison.run(fn, search(6, trial_timeout_s=1), backend=unison.Local(workers=2), storage=tmp_path,
                   progress=False)
    assert time.monotonic() - started < 20
    frame = r.trials.set_index("trial_id")
    assert frame.loc[1, "status"] == "failed"
    assert frame.loc[1, "error"] == "timeout: the trial ran longer than trial_timeout_s=1.0"
    assert frame.loc[1, "attempts"] == 1
    assert [frame.loc[t, "status"] for t in (0, 2, 3, 4, 5)] == ["completed"] * 5
    (end,) = events(r.path, "end", 1)
    assert end["error"].startswith("timeout") and 1.0 <= end["duration"] < 5
    assert len(events(r.path, "start", 1)) == 1
    assert not alive(int((r.path / "trials" / "0001" / "pid").read_text()))
    assert (r.path / "workers" / "worker-2.log").is_file()  # the replacement


@pytest.mark.slow
def test_retry_on_timeout_on_local_workers_attempts_max_retries_plus_one(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        import os

        (ctx.trial_dir / f"pid-{ctx.attempt}").write_text(str(os.getpid()))
        if ctx.trial_id == 0:
            time.sleep(60)
        return x

    r = unison.run(fn, search(3, trial_timeout_s=0.8, retry_on_timeout=True, max_retries=1),
                   backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    frame = r.trials.set_index("trial_id")
    assert frame.loc[0, "status"] == "failed" and frame.loc[0, "attempts"] == 2
    assert frame.loc[0, "error"].startswith("timeout: the trial ran longer than trial_timeout_s=0.8")
    assert [ev["attempt"] for ev in events(r.path, "start", 0)] == [0, 1]
    assert [ev["reason"][:7] for ev in events(r.path, "lost", 0)] == ["timeout", "timeout"]
    assert [frame.loc[t, "status"] for t in (1, 2)] == ["completed"] * 2
    pids = [int((r.path / "trials" / "0000" / f"pid-{a}").read_text()) for a in (0, 1)]
    assert pids[0] != pids[1] and not any(alive(pid) for pid in pids)


@pytest.mark.slow
def test_large_output_and_large_results_on_local_workers(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> Any:
        if ctx.trial_id == 0:  # as _print_30_mb (a module-level function would not reach the workers)
            chunk = "".join(f"{ctx.trial_id} line {i:07d} " + "y" * 80 + "\n" for i in range(10_000))
            for _ in range(30):
                sys.stdout.write(chunk)
            print("the last line printed")
        if ctx.trial_id == 1:
            return {f"m{i}": float(i) for i in range(1_000_000)}
        return x

    started = time.monotonic()
    r = unison.run(fn, search(4), backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert time.monotonic() - started < 20
    frame = r.trials.set_index("trial_id")
    assert list(frame["status"]) == ["completed", "failed", "completed", "completed"]
    assert "ctx.trial_dir" in frame.loc[1, "error"]
    assert events(r.path, "end", 1)[0]["error"].startswith("the function returned 1000000 metrics")
    _assert_log_cut(r.path, 0)


class _NoKill(unison.Local):
    """Local workers, but the backend cannot kill one (as on Spark): the driver must ask it to end."""

    def kill_worker(self, info: dict[str, Any]) -> bool:
        return False


@pytest.mark.slow
def test_a_backend_that_cannot_kill_gets_the_worker_aborted(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        import os

        (ctx.trial_dir / "pid").write_text(str(os.getpid()))
        if ctx.trial_id == 0:
            while True:
                time.sleep(0.05)
        return x

    r = unison.run(fn, search(3, trial_timeout_s=1), backend=_NoKill(workers=2), storage=tmp_path,
                   progress=False)
    frame = r.trials.set_index("trial_id")
    assert frame.loc[0, "status"] == "failed" and frame.loc[0, "error"].startswith("timeout")
    assert [frame.loc[t, "status"] for t in (1, 2)] == ["completed"] * 2
    assert not alive(int((r.path / "trials" / "0000" / "pid").read_text()))
    assert "aborted by the driver: timeout" in (r.path / "trials" / "0000" / "stderr.log").read_text()


@pytest.mark.slow
def test_a_distributed_trial_past_its_limit_ends_every_rank(tmp_path: Path) -> None:
    pytest.importorskip("torch")

    def fn(x: float, ctx: Any) -> float:
        import os

        (ctx.trial_dir / f"pid-{ctx.rank}").write_text(str(os.getpid()))
        if ctx.trial_id == 0:
            time.sleep(60)
        return x

    # One trial: replacement workers would import torch again (seconds each on a busy machine).
    r = unison.run(fn, search(1, trial_timeout_s=1.5, workers_per_trial=2), backend=unison.Local(workers=2),
                   storage=tmp_path, progress=False)
    frame = r.trials.set_index("trial_id")
    assert frame.loc[0, "status"] == "failed"
    assert frame.loc[0, "error"] == "timeout: the trial ran longer than trial_timeout_s=1.5"
    (end,) = events(r.path, "end", 0)
    assert end["error"].startswith("timeout")
    pids = [int((r.path / "trials" / "0000" / f"pid-{rank}").read_text()) for rank in (0, 1)]
    assert len(set(pids)) == 2 and not any(alive(pid) for pid in pids)
