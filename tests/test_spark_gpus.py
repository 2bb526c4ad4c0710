"""GPUs on the Spark backend, on a machine without any: Spark's own resource scheduling hands out the
GPU addresses a discovery script lists (``{"name": "gpu", "addresses": ["0", "1"]}``, which is how Spark
tests it), and each slot task's worker must run with exactly the addresses Spark gave its task.

One ``local-cluster[1,2,1024]`` session: one executor of two cores and two GPUs, one GPU per task.
Spark's ``local[N]`` mode schedules no custom resources (a task asking for a GPU never starts), so it
cannot be used here; a standalone master would do as well as ``local-cluster``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers_gpus import recorder, starts, views

# spark_support also skips this module without pyspark
from spark_support import start_session

import unison
from unison.backends.spark import _tasks_per_executor

pytestmark = pytest.mark.slow

SPACE = {"x": unison.uniform(0.0, 1.0)}
GPU_CONF = {"spark.worker.resource.gpu.amount": "2", "spark.executor.resource.gpu.amount": "2",
            "spark.task.resource.gpu.amount": "1"}


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.getbasetemp()
    script = base / "discover-gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    session = start_session("local-cluster[1,2,1024]", base, executors=1,
                            **GPU_CONF, **{"spark.worker.resource.gpu.discoveryScript": str(script)})
    yield session
    session.stop()


def test_concurrent_trials_each_get_the_gpu_spark_gave_their_task(spark: Any, tmp_path: Path) -> None:
    backend = unison.Spark(spark)
    assert backend.slots() == 2  # min(2 cores / 1 cpu, 2 GPUs / 1 GPU) per task
    r = unison.run(recorder(tmp_path / "seen", together=2),
                   unison.Search(SPACE, trials=2, seed=1, gpus_per_trial=1), backend=backend,
                   storage=tmp_path / "runs", progress=False)
    assert r.status == "completed" and all(row["status"] == "completed" for row in r.rows)
    seen = views(tmp_path / "seen")
    assert len(seen) == 2 and len({v["pid"] for v in seen}) == 2  # two Python workers, at once
    assert sorted(v["cvd"] for v in seen) == ["0", "1"]  # one GPU each, none shared
    for view in seen:
        assert view["unison_gpus"] == view["cvd"] and view["ctx_gpus"] == [view["cvd"]]
        assert view["device"] == "cpu"  # torch sees no CUDA here
    assert r.trials.set_index("trial_id")["gpus"].to_dict() == {v["trial_id"]: v["cvd"] for v in seen}


def test_the_ranks_of_a_barrier_stage_each_get_their_own_gpu(spark: Any, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    r = unison.run(recorder(tmp_path / "seen", together=2),
                   unison.Distributed(workers=2, hparams={"x": 1.0}, gpus_per_worker=1),
                   backend=unison.Spark(spark), storage=tmp_path / "runs", progress=False)
    assert r.value == 1.0
    ranks = views(tmp_path / "seen")
    assert sorted(rank["rank"] for rank in ranks) == [0, 1]
    assert sorted(rank["cvd"] for rank in ranks) == ["0", "1"]
    assert all(rank["ctx_gpus"] == [rank["cvd"]] for rank in ranks)
    assert {rank["backend"] for rank in ranks} == {"gloo"}  # no CUDA for torch: NCCL is not chosen
    by_rank = sorted(ranks, key=lambda rank: rank["rank"])
    (start,) = starts(r.path)
    assert start["gpus"] == [by_rank[0]["cvd"], by_rank[1]["cvd"]]  # the trial's: every rank's, in order


def test_gpus_per_trial_other_than_the_session_s_fails_naming_the_conf(spark: Any, tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    with pytest.raises(ValueError, match=(
        r"^Search\(gpus_per_trial=0.5\) needs 0.5 GPU\(s\) per Spark task, but the SparkSession on "
        r"local-cluster\[1,2,1024\] sets spark.task.resource.gpu.amount=1: .*"
        r"spark.task.resource.gpu.amount=0.5, spark.executor.resource.gpu.amount .*"
        r"spark.executor.resource.gpu.discoveryScript.*spark.worker.resource.gpu.discoveryScript")):
        unison.run(lambda x: x, unison.Search(SPACE, trials=1, gpus_per_trial=0.5),
                   backend=unison.Spark(spark), storage=storage, progress=False)
    assert not storage.exists() or not any(storage.iterdir())  # nothing written


@pytest.mark.parametrize(("conf", "cores", "tasks"), [
    ({}, 4, 4),
    ({"spark.task.cpus": "2"}, 4, 2),
    (GPU_CONF, 4, 2),  # 2 GPUs, 1 per task: fewer than the 4 cores allow
    ({**GPU_CONF, "spark.task.resource.gpu.amount": "0.5"}, 4, 4),
    ({**GPU_CONF, "spark.task.resource.gpu.amount": "0.25"}, 4, 4),  # the cores bound it again
    ({"spark.executor.resource.gpu.amount": "1", "spark.task.resource.gpu.amount": "2"}, 4, 0),
])
def test_tasks_per_executor_counts_cores_and_gpus(conf: dict[str, str], cores: int, tasks: int) -> None:
    # The fallback of Spark._concurrent_tasks when the JVM's maxNumConcurrentTasks cannot be asked.
    assert _tasks_per_executor(conf, cores) == tasks
