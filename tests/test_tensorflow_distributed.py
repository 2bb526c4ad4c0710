"""TensorFlow multi-worker training: ``Distributed(workers=2, framework="tensorflow")`` runs one Keras
function (``model.compile``/``model.fit(..., callbacks=callbacks)``, no mention of a strategy) as two
real worker processes, locally and as a Spark barrier stage, and every worker ends with the same
weights.

Keras picks its backend at its first import and this pytest process may hold Keras on torch, so the
runs happen in ``tf_scenarios.py``, in a process of its own with ``KERAS_BACKEND=tensorflow``, once
per module; the tests read back what every rank recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import unison

TESTS = Path(__file__).resolve().parent
HAS_TF = importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("keras") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="tensorflow and keras are not installed")


def scenario(which: str, out: Path) -> dict[str, Any]:
    """Run ``tf_scenarios.py which out`` with Keras on TensorFlow; return its summary."""
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, str(TESTS / "tf_scenarios.py"), which, str(out)], env=env,
                          capture_output=True, text=True, timeout=280, cwd=out)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "summary.json").read_text())


def ranks(path: str | Path, n: int = 2) -> list[dict[str, Any]]:
    trial = Path(path) / "trials" / "0000"
    return [json.loads((trial / f"rank-{r}.json").read_text()) for r in range(n)]


def check_two_workers(path: str | Path) -> list[dict[str, Any]]:
    """What every 2-worker TensorFlow run of ``tf_scenarios.train`` must show."""
    r0, r1 = ranks(path)
    assert [r0["rank"], r1["rank"]] == [0, 1] and r0["world_size"] == r1["world_size"] == 2
    assert r0["is_chief"] and not r1["is_chief"] and r0["pid"] != r1["pid"]
    # one cluster of both ranks' addresses, in rank order; each rank is its own task in it
    c0, c1 = json.loads(r0["tf_config"]), json.loads(r1["tf_config"])
    assert c0["cluster"] == c1["cluster"] and len(c0["cluster"]["worker"]) == 2
    assert (c0["task"], c1["task"]) == ({"type": "worker", "index": 0}, {"type": "worker", "index": 1})
    # the model lives in the strategy: built in its scope by the unchanged model_fn, compiled in train
    assert r0["strategy"] == r1["strategy"] == "MultiWorkerStrategy" and r0["replicas"] == 2
    assert not r0["torch_loaded"] and not r1["torch_loaded"]  # a TensorFlow rank does not pay for torch
    # model_fn seeds each rank differently: the chief's initial weights reached every worker
    assert r0["before"] == r1["before"]
    # the same weights on both workers after training, and they changed
    assert r0["after"] == r1["after"] != r0["before"]
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < 0.5 * r0["losses"][0]
    assert r0["evaluated"] == r1["evaluated"]
    return [r0, r1]


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return scenario("local", tmp_path_factory.mktemp("tf-local"))


# ------------------------------------------------------------------------------- validation
@needs_tf
def test_the_framework_is_chosen_explicitly_and_validated(tmp_path: Path) -> None:
    run = unison.Distributed(workers=2, framework="tensorflow")
    assert run.dist_options["framework"] == "tensorflow" and run.to_dict()["framework"] == "tensorflow"
    assert "framework='tensorflow'" in repr(run)
    torch_run = unison.Distributed(workers=2)
    assert torch_run.framework == "torch" and torch_run.dist_options["framework"] == "torch"
    assert "framework" not in torch_run.to_dict()  # runs stored before the option existed compare equal
    with pytest.raises(ValueError, match=r"must be 'torch' .* or 'tensorflow' .*; got 'tf'"):
        unison.Distributed(workers=2, framework="tf")
    with pytest.raises(ValueError, match=r"Distributed\(process_group='gloo'\) configures PyTorch's"):
        unison.Distributed(workers=2, framework="tensorflow", process_group="gloo")
    with pytest.raises(ValueError, match=r"Distributed\(strategy='fsdp', timeout_s=30\) configures PyTorch"):
        unison.Distributed(workers=2, framework="tensorflow", strategy="fsdp", timeout_s=30)


@needs_tf
def test_declaring_a_tensorflow_run_imports_no_framework() -> None:
    code = ("import sys, unison, unison.frameworks.tensorflow\n"
            "unison.Distributed(workers=2, framework='tensorflow')\n"
            "print([m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@needs_tf
def test_keras_on_another_backend_fails_before_any_worker_starts(tmp_path: Path) -> None:
    code = ("import unison\n"
            "try:\n"
            "    unison.run(lambda model: 1.0, unison.Distributed(workers=2, framework='tensorflow'),\n"
            f"               model=lambda: None, storage={str(tmp_path)!r})\n"
            "except RuntimeError as exc:\n"
            "    print(exc)\n")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "Keras runs on the 'torch' backend here. Set KERAS_BACKEND=tensorflow" in out.stdout, out.stderr
    assert not list(tmp_path.iterdir())


def test_a_keras_model_in_a_pytorch_trial_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    if "keras" not in sys.modules:  # the lighter backend, as test_keras.py picks
        monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "torch"))
    keras = pytest.importorskip("keras")
    from unison.frameworks.torch import prepare

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(TypeError, match=r"Distributed\(workers=N, framework='tensorflow'\)"):
        prepare(model, "cpu", 0, 2, None, 0)


# ------------------------------------------------------------------------ local worker processes
@pytest.mark.slow
@needs_tf
def test_two_workers_end_with_identical_weights_and_the_chief_result(local_runs: dict[str, Any]) -> None:
    r0, r1 = check_two_workers(local_runs["numpy"])
    # NumPy input: fit shards every global batch of 64 rows (32 per worker): 512 rows, 8 steps an epoch
    assert r0["steps"] == r1["steps"] == 8 * 3
    metrics = local_runs["numpy_metrics"]
    assert metrics["rank"] == 0 and metrics["accuracy"] == r0["evaluated"][1] > 0.9  # the chief's result
    trial = Path(local_runs["numpy"]) / "trials" / "0000"
    reports = [json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines()]
    assert [report["step"] for report in reports] == [0, 1, 2]
    assert (trial / "rank-1" / "metrics.jsonl").is_file()  # the callbacks ran on every worker
    assert "TF_CONFIG" not in os.environ
    assert local_runs["timings"]["numpy"] < 60


@pytest.mark.slow
@needs_tf
def test_the_same_function_as_a_single_run_uses_no_strategy(local_runs: dict[str, Any]) -> None:
    (alone,) = ranks(local_runs["single"], 1)
    assert alone["world_size"] == 1 and alone["tf_config"] is None and alone["replicas"] == 1
    assert alone["strategy"] == "_DefaultDistributionStrategy" and alone["steps"] == 8 * 3


@pytest.mark.slow
@needs_tf
def test_ctx_shard_of_a_dataset_gives_each_worker_its_own_rows(local_runs: dict[str, Any]) -> None:
    r0, r1 = check_two_workers(local_runs["per_worker"])
    assert not set(r0["shard_rows"]) & set(r1["shard_rows"])
    assert sorted(r0["shard_rows"] + r1["shard_rows"]) == list(range(512))
    # each worker trained on all of its 256 rows, in batches of 32 of its own: 8 steps an epoch
    assert r0["steps"] == r1["steps"] == 8 * 3


@pytest.mark.slow
@needs_tf
def test_a_failing_worker_fails_the_run_at_once(local_runs: dict[str, Any]) -> None:
    message = local_runs["failure"]
    assert "rank 1 of 2" in message and "ValueError: rank 1 cannot go on" in message
    trial = Path(local_runs["failing"]) / "trials" / "0000"
    raised = float((trial / "raised-at").read_text())
    assert local_runs["caught"] - raised < 5.0, "rank 0 waited in a collective instead of being aborted"
    assert "aborted by the driver" in (trial / "stderr.log").read_text()


@pytest.mark.slow
@needs_tf
def test_a_process_joins_one_cluster_and_says_so(local_runs: dict[str, Any]) -> None:
    ran_before, joined = local_runs["second_cluster"]
    assert "TensorFlow ran operations in this worker process before the trial started" in ran_before
    assert "already was a worker of a TensorFlow cluster" in joined
    assert "spark.python.worker.reuse=false" in joined


# ----------------------------------------------------------------------------------------- Spark
@pytest.mark.slow
@needs_tf
def test_two_workers_as_a_spark_barrier_stage(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    summary = scenario("spark", tmp_path)
    r0, r1 = check_two_workers(summary["spark"])
    assert summary["driver_pid"] not in (r0["pid"], r1["pid"])
    assert summary["spark_metrics"]["accuracy"] == r0["evaluated"][1]
    assert "in one barrier stage" in (Path(summary["spark"]) / "workers" / "spark.log").read_text()
