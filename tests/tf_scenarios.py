"""TensorFlow multi-worker runs of one Keras training function, for ``test_tensorflow_distributed.py``.

Keras picks its backend at its first import, so these run in a process of their own::

    KERAS_BACKEND=tensorflow python tests/tf_scenarios.py local OUTDIR
    KERAS_BACKEND=tensorflow python tests/tf_scenarios.py spark OUTDIR

``local``: the unchanged ``train`` as a single run and as 2-worker ``Distributed`` runs on worker
processes (NumPy input sharded by ``fit``; a per-worker ``tf.data`` dataset from ``ctx.shard``), a
run whose rank 1 fails, and the checks that keep a process from joining a second cluster.
``spark``: a 2-worker run as a barrier stage on ``local[2]``. Every rank writes what it saw to
``rank-<r>.json`` in the trial's folder; the experiment paths go to ``OUTDIR/summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import unison  # noqa: E402

ROWS, EPOCHS = 512, 3


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Two linearly separable classes in 8 dimensions (no arguments: loaded once per worker)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 8)).astype("float32")
    return x, (x @ rng.normal(size=8) > 0).astype("int32")


def model_fn(hparams: dict[str, Any]) -> keras.Model:
    """A small MLP, initialized differently on every rank (seeded by its TF_CONFIG task): only the
    strategy's broadcast of the chief's initial weights makes the ranks start alike."""
    task = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]["index"]
    keras.utils.set_random_seed(100 + task)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                             keras.layers.Dense(2, activation="softmax", name="out")])


def digest(model: keras.Model) -> str:
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()


class CountSteps(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.steps += 1


def train(model: keras.Model, dataset: Any, callbacks: list, hparams: dict[str, Any],
          ctx: unison.Context) -> dict[str, float]:
    """The Keras way, written once: compile (here, not in model_fn), fit with the injected callbacks,
    evaluate. What the rank saw goes to ``rank-<r>.json``."""
    x, y = dataset
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    before = digest(model)
    counter = CountSteps()
    shard_rows = None
    if hparams.get("per_worker"):  # a per-worker dataset: batch_size is per worker
        import tensorflow as tf

        shard_rows = [int(i) for i in ctx.shard(tf.data.Dataset.range(ROWS)).as_numpy_iterator()]
        data = ctx.shard(tf.data.Dataset.from_tensor_slices((x, y))).batch(32)
        history = model.fit(data, epochs=hparams["epochs"], callbacks=[*callbacks, counter], verbose=0)
    else:
        history = model.fit(x, y, batch_size=64, epochs=hparams["epochs"], callbacks=[*callbacks, counter],
                            verbose=0)
    loss, accuracy = model.evaluate(x, y, batch_size=128, verbose=0)
    strategy = model.distribute_strategy
    (ctx.trial_dir / f"rank-{ctx.rank}.json").write_text(json.dumps({
        "rank": ctx.rank, "world_size": ctx.world_size, "is_chief": ctx.is_chief, "device": ctx.device,
        "pid": os.getpid(), "tf_config": os.environ.get("TF_CONFIG"),
        "strategy": type(strategy).__name__, "replicas": strategy.num_replicas_in_sync,
        "before": before, "after": digest(model), "steps": counter.steps, "losses": history.history["loss"],
        "shard_rows": shard_rows, "evaluated": [loss, accuracy], "torch_loaded": "torch" in sys.modules,
    }))
    return {"accuracy": accuracy, "loss": loss, "rank": ctx.rank}


def train_failing_on_rank_1(model: keras.Model, dataset: Any, callbacks: list, ctx: unison.Context) -> float:
    x, y = dataset
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    if ctx.rank == 1:
        (ctx.trial_dir / "raised-at").write_text(str(time.time()))
        raise ValueError("rank 1 cannot go on")
    model.fit(x, y, batch_size=64, epochs=50, verbose=0)  # waits for rank 1 in its first all-reduce
    return 1.0


def distributed(storage: Path, **hparams: Any) -> unison.RunResult:
    return unison.run(train, unison.Distributed(workers=2, hparams={"epochs": EPOCHS, **hparams},
                                                framework="tensorflow", metric="accuracy"),
                      model=model_fn, data=make_data, storage=storage, progress=False)


def second_cluster_messages() -> list[str]:
    """What a process that already ran TensorFlow, then joined a cluster, is told when a trial would
    make it join one (again)."""
    from unison.worker.rank import free_port
    from unison.worker.runtime import session_for

    trial = {"seed": 0, "dist": {"rank": 0, "world_size": 1, "master_addr": "127.0.0.1", "master_port": 1,
                                 "peers": [f"127.0.0.1:{free_port('127.0.0.1')}"], "framework": "tensorflow"}}
    messages = []
    for _ in range(2):
        try:
            with session_for(trial):
                pass
        except RuntimeError as exc:
            messages.append(str(exc))
    assert "TF_CONFIG" not in os.environ
    return messages


def run_local(out: Path) -> dict[str, Any]:
    storage = out / "runs"
    timings = {}
    start = time.monotonic()
    single = unison.run(train, hparams={"epochs": EPOCHS}, model=model_fn, data=make_data, storage=storage,
                        metric="accuracy")
    timings["single"] = time.monotonic() - start
    start = time.monotonic()
    numpy_run = distributed(storage)
    timings["numpy"] = time.monotonic() - start
    start = time.monotonic()
    per_worker = distributed(storage, per_worker=True)
    timings["per_worker"] = time.monotonic() - start
    failure = ""
    start = time.monotonic()
    try:
        unison.run(train_failing_on_rank_1, unison.Distributed(workers=2, framework="tensorflow"),
                   model=model_fn, data=make_data, storage=storage / "failing", progress=False)
    except unison.RunFailed as exc:
        failure = str(exc)
    caught = time.time()
    timings["failing"] = time.monotonic() - start
    return {"single": str(single.path), "single_metrics": single.metrics,
            "numpy": str(numpy_run.path), "numpy_metrics": numpy_run.metrics,
            "per_worker": str(per_worker.path), "per_worker_metrics": per_worker.metrics,
            "failure": failure, "failing": str(next((storage / "failing").iterdir())), "caught": caught,
            "second_cluster": second_cluster_messages(), "timings": timings}


def run_spark(out: Path) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from spark_support import start_session

    spark = start_session("local[2]", out)
    try:
        start = time.monotonic()
        run = unison.Distributed(workers=2, hparams={"epochs": EPOCHS}, framework="tensorflow",
                                 metric="accuracy")
        result = unison.run(train, run, model=model_fn, data=make_data, backend=unison.Spark(spark),
                            storage=out / "runs", progress=False)
        elapsed = time.monotonic() - start
    finally:
        spark.stop()
    return {"spark": str(result.path), "spark_metrics": result.metrics, "driver_pid": os.getpid(),
            "timings": {"spark": elapsed}}


if __name__ == "__main__":
    which, target = sys.argv[1], Path(sys.argv[2])
    summary = run_local(target) if which == "local" else run_spark(target)
    (target / "summary.json").write_text(json.dumps(summary))
