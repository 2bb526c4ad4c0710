"""GPUs on the local backend, on a machine without any: ``Local(gpus=[...])`` is taken as given, so the
assignment (slots, fractions, exclusivity, the replacement of a crashed worker, the ranks of a
distributed run) is checked with real worker processes reading back the ``CUDA_VISIBLE_DEVICES`` they
were started with; and the checks that fail before anything starts.

A trial records what it saw in ``seen.json`` of its folder; where trials must run at once they meet at
a barrier of files first (a trial that never met the others fails after a minute).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers_gpus import meet

import unison
from unison import gpus
from unison.callbacks import TrialInfo
from unison.protocol import DRIVER, ProtocolError, validate

SPACE = {"x": unison.uniform(0, 1)}



def recorder(barrier: Path | None = None, together: int = 0, crash_first: bool = False) -> Any:
    """A training function that records its GPUs; ``together`` trials of it meet at ``barrier``;
    with ``crash_first`` the first attempt of trial 0 kills its worker after recording."""

    def train(x: float, ctx: Any) -> dict[str, float]:
        import signal

        seen = {"trial_id": ctx.trial_id, "attempt": ctx.attempt, "pid": os.getpid(),
                "worker": os.environ.get("UNISON_WORKER"), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "unison_gpus": os.environ.get("UNISON_GPUS"), "ctx_gpus": ctx.gpus, "device": ctx.device,
                "rank": ctx.rank}
        (ctx.trial_dir / f"seen-{ctx.rank}-{ctx.attempt}.json").write_text(json.dumps(seen))
        if crash_first and ctx.trial_id == 0 and ctx.attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if barrier is not None:
            meet(barrier, f"{ctx.trial_id}-{ctx.rank}", together)
        return {"value": x}

    return train


def seen(result: Any) -> list[dict[str, Any]]:
    """What every attempt of every trial (every rank) recorded, by trial, rank and attempt."""
    found = []
    for row in result.rows:
        for file in sorted((result.path / "trials" / f"{row['trial_id']:04d}").glob("seen-*.json")):
            found.append(json.loads(file.read_text()))
    return found


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    lines = (path / "journal.jsonl").read_text().splitlines()
    return [ev for ev in map(json.loads, lines) if ev.get("e") == kind]


class Starts(unison.Callback):
    """Keeps the ``TrialInfo`` of every trial start."""

    def __init__(self) -> None:
        self.infos: list[TrialInfo] = []

    def on_trial_start(self, trial: TrialInfo) -> None:
        self.infos.append(trial)


# ------------------------------------------------------------------------------ the assignment
@pytest.mark.parametrize(("ids", "per_worker", "slots"), [
    (["0", "1", "2", "3"], 1, [["0"], ["1"], ["2"], ["3"]]),
    (["0", "1", "2"], 2, [["0", "1"]]),
    (["4", "6", "7", "9"], 2, [["4", "6"], ["7", "9"]]),
    (["0", "1"], 0.5, [["0"], ["1"], ["0"], ["1"]]),  # spread: fewer workers than slots still use both
    (["5"], 0.25, [["5"]] * 4),
])
def test_slots_get_fixed_disjoint_gpus_or_the_shares_the_fraction_says(
    ids: list[str], per_worker: float, slots: list[list[str]],
) -> None:
    request = gpus.GpuRequest.of("search", per_worker, 1)
    assert gpus.slot_gpus(ids, request, "Local(gpus=...)") == slots


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (1, 1), (2.0, 2), (0.5, 0.5), (0.25, 0.25),
                                                 (1 / 3, 1 / 3)])
def test_gpus_per_trial_is_a_whole_number_or_a_fraction_that_divides_one(value: float, expected: float,
                                                                         ) -> None:
    assert unison.Search(SPACE, trials=1, gpus_per_trial=value).gpus_per_trial == expected
    study = unison.Ablation({"x": 1}, features=["a"], gpus_per_trial=value)
    assert study.to_search().gpus_per_trial == expected


@pytest.mark.parametrize(("value", "message"), [
    (0.3, r"Search\(gpus_per_trial=...\) must be a whole number of GPUs \(0, 1, 2, ...\) or a fraction of "
          r"one GPU that divides it \(0.5, 0.25, 0.2, ...: that many trials share a GPU\), got 0.3"),
    (1.5, "got 1.5"),
    (0.7, "got 0.7"),
    (-1, r"Search\(gpus_per_trial=...\) must be a non-negative number, got -1"),
    (True, "got True"),
    ("1", "got '1'"),
    (float("inf"), "got inf"),
])
def test_a_bad_gpus_per_trial_says_what_is_allowed(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unison.Search(SPACE, trials=1, gpus_per_trial=value)


def test_the_ranks_of_a_trial_each_need_whole_gpus() -> None:
    with pytest.raises(ValueError, match=r"every rank of a trial needs whole GPUs of its own .* must be a "
                                         r"multiple of 2, e.g. 2"):
        unison.Search(SPACE, trials=1, workers_per_trial=2, gpus_per_trial=1)
    assert unison.Search(SPACE, trials=1, workers_per_trial=2, gpus_per_trial=4).gpus_per_trial == 4
    with pytest.raises(ValueError, match=r"Distributed\(gpus_per_worker=...\) must be a non-negative int"):
        unison.Distributed(workers=2, gpus_per_worker=0.5)
    assert unison.Distributed(workers=3, gpus_per_worker=1).to_search().gpus_per_trial == 3


def test_gpus_per_trial_is_stored_only_when_set_and_kept_by_replace() -> None:
    search = unison.Search(SPACE, trials=2, gpus_per_trial=0.5)
    assert search.to_dict()["gpus_per_trial"] == 0.5
    assert unison.Search.from_dict(search.to_dict()).gpus_per_trial == 0.5
    assert search.replace(trials=3).gpus_per_trial == 0.5
    assert "gpus_per_trial" not in unison.Search(SPACE, trials=2).to_dict()  # older experiments resume
    assert unison.Distributed(workers=2, gpus_per_worker=1).to_dict()["gpus_per_worker"] == 1
    assert "gpus_per_worker" not in unison.Distributed(workers=2).to_dict()


@pytest.mark.parametrize(("value", "message"), [
    (2, r"Local\(gpus=...\) must be 'auto' .*, 0 \(none\) or a list of GPU ids such as \[0, 1\]; got 2"),
    ("0,1", "got '0,1'"),
    ([0, 0], r"Local\(gpus=\[0, 0\]\) names a GPU twice"),
    ([0, -1], r"takes GPU ids: ints >= 0 .*got -1 in \[0, -1\]"),
    (["0", "a b"], "got 'a b'"),
    ([1.0], "got 1.0"),
])
def test_a_bad_local_gpus_says_what_is_allowed(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unison.Local(gpus=value)


def test_local_gpus_are_kept_as_id_strings() -> None:
    assert unison.Local(gpus=[0, 3]).gpus == ["0", "3"]
    assert unison.Local(gpus=["GPU-8a1c2d3e", 1]).gpus == ["GPU-8a1c2d3e", "1"]
    assert unison.Local(gpus=0).gpus == [] and unison.Local().gpus == "auto"
    assert repr(unison.Local(workers=2, gpus=[0, 1])) == "Local(workers=2, gpus=[0, 1])"
    assert repr(unison.Local(workers=2)) == "Local(workers=2)"


def test_auto_reads_cuda_visible_devices_else_nvidia_smi(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,GPU-77ab")
    assert gpus.detect_gpus() == (["2", "5", "GPU-77ab"], "CUDA_VISIBLE_DEVICES='2, 5,GPU-77ab'")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,3")  # CUDA stops at the first invalid entry
    assert gpus.detect_gpus()[0] == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus.detect_gpus()[0] == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi on it
    assert gpus.detect_gpus() == ([], "CUDA_VISIBLE_DEVICES unset, no nvidia-smi")


def test_a_hello_carries_short_gpu_ids_and_a_bad_list_is_refused() -> None:
    hello = {"t": "hello", "worker": "worker-0", "host": "h", "pid": 1}
    assert validate({**hello, "gpus": ["0", "GPU-8a1c", "MIG-GPU-8a1c/1/0"]}, DRIVER)["gpus"][1] == "GPU-8a1c"
    for bad, why in [("0,1", "'gpus' must be a list, got str"), ([0], r"'gpus'\[0\] must be a str, got int"),
                     (["0"] * 65, "'gpus' has 65 items, at most 64 are allowed"),
                     (["7" * 97], r"'gpus'\[0\] has 97 characters, at most 96 are allowed"),
                     (["../x"], r"'gpus'\[0\] must match"), (["a b"], r"'gpus'\[0\] must match")]:
        with pytest.raises(ProtocolError, match=f"hello message: {why}"):
            validate({**hello, "gpus": bad}, DRIVER)


# ------------------------------------------------------------------ bad input: nothing starts
def _fails_before_anything_starts(tmp_path: Path, context: Any, backend: Any, message: str,
                                  fn: Any = None, data: Any = None) -> None:
    storage = tmp_path / "runs"
    with pytest.raises(ValueError, match=message):
        unison.run(fn or recorder(), context, backend=backend, storage=storage, progress=False, data=data)
    assert not storage.exists() or not any(storage.iterdir())  # nothing written


def test_more_gpus_per_trial_than_the_backend_has_fails_before_anything_starts(tmp_path: Path) -> None:
    _fails_before_anything_starts(
        tmp_path, unison.Search(SPACE, trials=2, gpus_per_trial=2), unison.Local(gpus=[0]),
        r"^Search\(gpus_per_trial=2\) needs 2 GPUs per trial, but Local\(gpus=\[0\]\) has 1")
    _fails_before_anything_starts(
        tmp_path, unison.Ablation({"x": 0.5}, features=["a"], gpus_per_trial=1), unison.Local(gpus=0),
        r"^Ablation\(gpus_per_trial=1\) needs 1 GPU per trial, but Local\(gpus=0\) has no GPU",
        fn=lambda x, dataset: x, data={"a": [1.0, 2.0], "b": [3.0, 4.0]})
    _fails_before_anything_starts(
        tmp_path, unison.Distributed(workers=2, gpus_per_worker=1), unison.Local(gpus=[3]),
        r"^Distributed\(workers=2, gpus_per_worker=1\) needs 2 GPUs per trial \(1 per rank\), but "
        r"Local\(gpus=\[3\]\) has 1")


def test_gpus_asked_of_auto_finding_none_fail_saying_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    _fails_before_anything_starts(
        tmp_path, unison.Search(SPACE, trials=1, gpus_per_trial=1), unison.Local(),
        r"^Search\(gpus_per_trial=1\) needs 1 GPU per trial, but Local\(gpus='auto'\) found no GPU "
        r"\(CUDA_VISIBLE_DEVICES unset, no nvidia-smi\): pass Local\(gpus=\[...\]\)")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _fails_before_anything_starts(tmp_path, unison.Search(SPACE, trials=1, gpus_per_trial=0.5),
                                  unison.Local(), r"found no GPU \(CUDA_VISIBLE_DEVICES=''\)")


def test_gpus_per_trial_on_the_inline_backend_fails_before_anything_starts(tmp_path: Path) -> None:
    _fails_before_anything_starts(tmp_path, unison.Search(SPACE, trials=1, gpus_per_trial=1), "inline",
                                  r"the inline backend runs trials one at a time in the driver's own "
                                  r"process.*use backend='local'")


# ----------------------------------------------------------------- real worker processes
def test_each_of_four_concurrent_trials_sees_its_own_gpu_and_the_table_records_it(tmp_path: Path) -> None:
    starts = Starts()
    r = unison.run(recorder(tmp_path / "barrier", together=4),
                   unison.Search(SPACE, trials=4, seed=1, gpus_per_trial=1),
                   backend=unison.Local(workers=4, gpus=[0, 1, 2, 3]), storage=tmp_path / "runs",
                   progress=False, callbacks=[starts])
    assert r.status == "completed" and all(row["status"] == "completed" for row in r.rows)
    views = seen(r)
    assert len(views) == 4 and len({v["pid"] for v in views}) == 4  # four processes, all at once
    assert sorted(v["cvd"] for v in views) == ["0", "1", "2", "3"]  # one GPU each, none shared
    for view in views:
        assert view["unison_gpus"] == view["cvd"] and view["ctx_gpus"] == [view["cvd"]]
        assert view["device"] == "cpu"  # torch sees no CUDA here
    table = r.trials.set_index("trial_id")["gpus"]
    assert {v["trial_id"]: v["cvd"] for v in views} == table.to_dict()
    assert list(r.trials.columns[list(r.trials.columns).index("node") + 1:][:1]) == ["gpus"]
    journaled = {ev["id"]: ev["gpus"] for ev in events(r.path, "start")}
    assert journaled == {v["trial_id"]: [v["cvd"]] for v in views}
    assert unison.load(r.path).trials.set_index("trial_id")["gpus"].to_dict() == table.to_dict()
    assert sorted(tuple(info.gpus) for info in starts.infos) == [("0",), ("1",), ("2",), ("3",)]


def test_half_a_gpu_per_trial_puts_two_concurrent_workers_on_each_gpu(tmp_path: Path) -> None:
    r = unison.run(recorder(tmp_path / "barrier", together=4),
                   unison.Search(SPACE, trials=4, seed=2, gpus_per_trial=0.5),
                   backend=unison.Local(workers=4, gpus=[0, 1]), storage=tmp_path / "runs", progress=False)
    assert r.status == "completed"
    assert json.loads((r.path / "experiment.json").read_text())["workers"] == 4
    views = seen(r)
    assert len({v["pid"] for v in views}) == 4
    assert Counter(v["cvd"] for v in views) == {"0": 2, "1": 2}


def test_two_gpus_per_trial_of_three_leave_one_slot(tmp_path: Path) -> None:
    r = unison.run(recorder(), unison.Search(SPACE, trials=3, seed=3, gpus_per_trial=2),
                   backend=unison.Local(workers=4, gpus=[0, 1, 2]), storage=tmp_path / "runs", progress=False)
    assert r.status == "completed"
    assert json.loads((r.path / "experiment.json").read_text())["workers"] == 1
    assert {v["cvd"] for v in seen(r)} == {"0,1"} and {tuple(v["ctx_gpus"]) for v in seen(r)} == {("0", "1")}
    assert set(r.trials["gpus"]) == {"0,1"}


def test_the_worker_that_replaces_a_crashed_one_gets_its_gpus(tmp_path: Path) -> None:
    # One slot of the two GPUs: the replacement must get the slot's GPU 3, not the unused 5.
    r = unison.run(recorder(crash_first=True), unison.Search(SPACE, trials=2, seed=4, gpus_per_trial=1),
                   backend=unison.Local(workers=1, gpus=[3, 5]), storage=tmp_path / "runs", progress=False)
    assert r.status == "completed"
    views = seen(r)
    assert {(v["trial_id"], v["attempt"]) for v in views} == {(0, 0), (0, 1), (1, 0)}
    assert len({v["worker"] for v in views}) >= 2  # trial 0's retry ran in the replacement
    assert {v["cvd"] for v in views} == {"3"}
    assert [ev["gpus"] for ev in events(r.path, "start")] == [["3"]] * 3


def test_auto_hands_out_the_gpus_cuda_visible_devices_lists(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    r = unison.run(recorder(tmp_path / "barrier", together=2),
                   unison.Search(SPACE, trials=2, seed=5, gpus_per_trial=1),
                   backend=unison.Local(workers=2), storage=tmp_path / "runs", progress=False)
    assert sorted(v["cvd"] for v in seen(r)) == ["4", "6"]


def test_without_a_gpu_request_workers_see_what_the_driver_sees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setenv("UNISON_GPUS", "9")  # the driver's own, never a worker's
    backend = unison.Local(workers=1)
    r = unison.run(recorder(), unison.Search(SPACE, trials=1, seed=6), backend=backend,
                   storage=tmp_path / "runs", progress=False)
    (view,) = seen(r)
    assert view["cvd"] == "4,6" and view["unison_gpus"] is None and view["ctx_gpus"] == []
    assert r.trials["gpus"].isna().all() and "gpus" not in events(r.path, "start")[0]
    # gpus=0: no GPU at all for the workers
    r = unison.run(recorder(), unison.Search(SPACE, trials=1, seed=6),
                   backend=unison.Local(workers=1, gpus=0), storage=tmp_path / "runs", progress=False)
    assert seen(r)[0]["cvd"] == "" and seen(r)[0]["ctx_gpus"] == []


def test_two_ranks_each_get_their_own_gpu_and_join_a_gloo_group_without_cuda(tmp_path: Path) -> None:
    pytest.importorskip("torch")

    def train(x: float, ctx: Any) -> dict[str, float]:
        import torch.distributed as dist

        (ctx.trial_dir / f"rank-{ctx.rank}.json").write_text(json.dumps({
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "ctx_gpus": ctx.gpus, "device": ctx.device,
            "backend": dist.get_backend(), "world_size": dist.get_world_size()}))
        return {"value": x}

    r = unison.run(train, unison.Distributed(workers=2, hparams={"x": 1.0}, gpus_per_worker=1),
                   backend=unison.Local(gpus=[5, 7]), storage=tmp_path / "runs", progress=False)
    assert r.value == 1.0
    ranks = [json.loads((r.path / "trials" / "0000" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert sorted(rank["cvd"] for rank in ranks) == ["5", "7"]
    assert all(rank["ctx_gpus"] == [rank["cvd"]] for rank in ranks)
    assert {(rank["backend"], rank["world_size"], rank["device"]) for rank in ranks} == {("gloo", 2, "cpu")}
    (start,) = events(r.path, "start")
    assert [rank["gpus"] for rank in start["ranks"]] == [[ranks[0]["cvd"]], [ranks[1]["cvd"]]]
    assert start["gpus"] == [ranks[0]["cvd"], ranks[1]["cvd"]]  # the trial's: every rank's, in rank order
