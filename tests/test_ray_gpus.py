"""GPUs on the Ray backend, on a machine without any: a local Ray told it has 2 GPUs (``num_gpus=2``)
hands them out as it would real ones, setting each actor's ``CUDA_VISIBLE_DEVICES``; unison's slot
actors reserve what the context asks (``gpus_per_trial``, ``gpus_per_worker``) and their workers must
report exactly the GPUs Ray gave them.

A trial records what it saw in a file of the test's folder (every actor runs on this machine); where
trials must run at once they meet at a barrier of files first.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers_gpus import recorder, starts, views

import unison

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

SPACE = {"x": unison.uniform(0.0, 1.0)}


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Any:
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # as tests/test_ray.py: a Ray of its own, no token
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def test_a_gpu_per_trial_gives_each_concurrent_actor_its_own_and_the_next_experiment_none(
    tmp_path: Path,
) -> None:
    backend = unison.Ray(keep_actors=True)
    r = unison.run(recorder(tmp_path / "gpu", together=2), unison.Search(SPACE, trials=2, seed=1,
                                                                         gpus_per_trial=1),
                   backend=backend, storage=tmp_path / "runs", progress=False)
    assert r.status == "completed" and all(row["status"] == "completed" for row in r.rows)
    seen = views(tmp_path / "gpu")
    assert len({v["pid"] for v in seen}) == 2  # two actors, at once
    assert sorted(v["cvd"] for v in seen) == ["0", "1"]  # Ray's ids, one each, none shared
    for view in seen:
        assert view["unison_gpus"] == view["cvd"] and view["ctx_gpus"] == [view["cvd"]]
        assert view["device"] == "cpu"  # torch sees no CUDA here
    assert r.trials.set_index("trial_id")["gpus"].to_dict() == {v["trial_id"]: v["cvd"] for v in seen}
    # The same backend, no GPU asked: back to num_gpus_per_slot=0, and the kept GPU actors are not reused
    with backend:
        r = unison.run(recorder(tmp_path / "cpu"), unison.Search(SPACE, trials=1, seed=2), backend=backend,
                       storage=tmp_path / "runs", progress=False)
    assert backend.num_gpus_per_slot == 0
    (view,) = views(tmp_path / "cpu")
    assert view["pid"] not in {v["pid"] for v in seen}
    assert view["unison_gpus"] is None and view["ctx_gpus"] == [] and r.trials["gpus"].isna().all()


def test_half_a_gpu_per_trial_puts_two_actors_on_each_gpu(tmp_path: Path) -> None:
    backend = unison.Ray(num_cpus_per_slot=0.5)  # 4 slots: min(2 CPUs / 0.5, 2 GPUs / 0.5)
    r = unison.run(recorder(tmp_path / "seen", together=4), unison.Search(SPACE, trials=4, seed=3,
                                                                          gpus_per_trial=0.5),
                   backend=backend, storage=tmp_path / "runs", progress=False)
    assert r.status == "completed"
    assert json.loads((r.path / "experiment.json").read_text())["workers"] == 4
    seen = views(tmp_path / "seen")
    assert len({v["pid"] for v in seen}) == 4
    assert Counter(v["cvd"] for v in seen) == {"0": 2, "1": 2}
    assert all(v["ctx_gpus"] == [v["cvd"]] for v in seen)


def test_two_ranks_each_get_their_own_gpu_and_join_a_gloo_group_without_cuda(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    r = unison.run(recorder(tmp_path / "seen", together=2),
                   unison.Distributed(workers=2, hparams={"x": 1.0}, gpus_per_worker=1),
                   backend=unison.Ray(), storage=tmp_path / "runs", progress=False)
    assert r.value == 1.0
    ranks = sorted(views(tmp_path / "seen"), key=lambda rank: rank["rank"])
    assert [rank["rank"] for rank in ranks] == [0, 1]
    assert sorted(rank["cvd"] for rank in ranks) == ["0", "1"]
    assert all(rank["ctx_gpus"] == [rank["cvd"]] for rank in ranks)
    assert {(rank["backend"], rank["device"]) for rank in ranks} == {("gloo", "cpu")}  # torch sees no CUDA
    (start,) = starts(r.path)
    assert start["gpus"] == [ranks[0]["cvd"], ranks[1]["cvd"]]  # the trial's: every rank's, in order


def test_gpus_per_trial_against_another_num_gpus_per_slot_fails_before_anything_starts(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "runs"
    with pytest.raises(ValueError, match=(
        r"^Search\(gpus_per_trial=0.5\) asks for 0.5 GPU\(s\) per Ray actor, but "
        r"Ray\(num_gpus_per_slot=1\) reserves another amount: leave num_gpus_per_slot unset")):
        unison.run(lambda x: x, unison.Search(SPACE, trials=1, gpus_per_trial=0.5),
                   backend=unison.Ray(num_gpus_per_slot=1), storage=storage, progress=False)
    assert not storage.exists() or not any(storage.iterdir())  # nothing written
