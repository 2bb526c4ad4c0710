"""Keras models and one training function, shared by ``test_keras.py`` and its per-backend runs.

Keras picks its backend at its first import, so one process tests one backend: ``test_keras.py``
imports this module with ``KERAS_BACKEND`` as it finds it (torch by default), and runs it as a script
once per backend::

    KERAS_BACKEND=tensorflow python tests/keras_scenarios.py OUTDIR

which runs the unchanged ``train`` as a single run, as a search with ASHA on ``Local(workers=2)`` and
as ablations of a Sequential and a Functional model, and writes the experiment paths to
``OUTDIR/summary.json`` for the test to check. Its worker processes get the Keras backend only
through the payload (see the end of this file). With ``--spark`` it runs the same search and the
Sequential ablation on Spark (``local[2]``) instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import unison  # noqa: E402

EPOCHS = 6
L = keras.layers


def make_data() -> tuple[np.ndarray, ...]:
    """Two linearly separable classes in 8 dimensions: a train and a validation split (a data generator
    without arguments: loaded once per worker)."""
    n, rng = 384, np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x @ rng.normal(size=8) > 0).astype("int32")
    return x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4:], y[n * 3 // 4:]


def _init(hparams: dict[str, Any], k: int) -> Any:
    """A seeded initializer (seeding this way keeps TensorFlow out of a torch-backend process, which
    keras.utils.set_random_seed imports whenever it is installed)."""
    return keras.initializers.GlorotUniform(seed=int(hparams.get("seed", 0)) * 10 + k)


def _compile(model: keras.Model, hparams: dict[str, Any]) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(hparams.get("lr", 0.02)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def sequential_fn(hparams: dict[str, Any]) -> keras.Model:
    """Input(8) -> hidden(16) -> dropout -> hidden2(16) -> out(2): ``dropout`` and ``hidden2`` keep
    the shape, ``hidden`` does not."""
    return _compile(keras.Sequential([
        keras.Input(shape=(8,), name="features"),
        L.Dense(16, activation="relu", name="hidden", kernel_initializer=_init(hparams, 1)),
        L.Dropout(0.1, name="dropout", seed=1),
        L.Dense(16, activation="relu", name="hidden2", kernel_initializer=_init(hparams, 2)),
        L.Dense(2, activation="softmax", name="out", kernel_initializer=_init(hparams, 3)),
    ], name="seq"), hparams)


def functional_fn(hparams: dict[str, Any]) -> keras.Model:
    """A residual Functional model: ``block`` and ``act`` can be bypassed; ``proj`` (8 -> 16) and
    ``add`` (two inputs) cannot."""
    inputs = keras.Input(shape=(8,), name="features")
    h = L.Dense(16, name="proj", kernel_initializer=_init(hparams, 1))(inputs)
    a = L.Dense(16, activation="relu", name="block", kernel_initializer=_init(hparams, 2))(h)
    s = L.Add(name="add")([h, a])
    n = L.Activation("relu", name="act")(s)
    out = L.Dense(2, activation="softmax", name="out", kernel_initializer=_init(hparams, 3))(n)
    return _compile(keras.Model(inputs, out, name="res"), hparams)


def train(model: keras.Model, dataset: Any, callbacks: list, hparams: dict[str, Any],
          ctx: unison.Context) -> dict[str, float]:
    """The Keras way: ``fit`` with the injected callbacks, then evaluate. Writes what it saw after
    ``fit`` (epochs trained, layer names, backend) into the trial's folder."""
    x_train, y_train, x_val, y_val = dataset
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=hparams["epochs"],
                        batch_size=64, callbacks=callbacks, verbose=0)
    (ctx.trial_dir / "after_fit.json").write_text(json.dumps({
        "epochs_trained": len(history.history["loss"]),
        "layers": [layer.name for layer in model.layers],
        "backend": keras.backend.backend(),
    }))
    loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
    return {"val_accuracy": float(accuracy), "val_loss": float(loss)}


def asha_search() -> unison.Search:
    """Trials that learn (lr 0.05, 0.01) and trials that cannot (lr 1e-6); ASHA's rungs are at
    resources 2 and 4 (steps 1 and 3), so a trial it stops has trained 2 or 4 of its 6 epochs, and
    every poor trial that reaches a rung after a better one is stopped there."""
    space = {"lr": unison.choice([0.05, 1e-6, 0.01]), "rep": unison.choice([0, 1]), "epochs": EPOCHS}
    return unison.Search(space, metric="val_accuracy", mode="max", optimizer="grid", seed=0,
                         scheduler=unison.ASHA(min_resource=2, max_resource=EPOCHS, reduction_factor=2))


def ablation(modules: list[str]) -> unison.Ablation:
    return unison.Ablation(base={"lr": 0.05, "epochs": 3}, modules=modules, metric="val_accuracy",
                           mode="max", repeats=1)


def run_all(out: Path) -> dict[str, Any]:
    """Every context, with this process's Keras backend; returns the experiment paths."""
    storage = out / "runs"
    single = unison.run(train, hparams={"lr": 0.05, "epochs": 3}, model=sequential_fn, data=make_data,
                        storage=storage, metric="val_accuracy")
    search = unison.run(train, asha_search(), model=sequential_fn, data=make_data,
                        backend=unison.Local(workers=2), storage=storage, progress=False)
    sequential = unison.run(train, ablation(["dropout", "hidden2"]), model=sequential_fn, data=make_data,
                            backend="inline", storage=storage, progress=False)
    functional = unison.run(train, ablation(["block", "act"]), model=functional_fn, data=make_data,
                            backend="inline", storage=storage, progress=False)
    return {"backend": keras.backend.backend(), "single": str(single.path), "single_value": single.value,
            "search": str(search.path), "sequential": str(sequential.path),
            "functional": str(functional.path)}


def run_spark(out: Path) -> dict[str, Any]:
    """The search and the Sequential ablation on Spark ``local[2]``; returns the experiment paths."""
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = (SparkSession.builder.master("local[2]").appName("unison-keras-tests")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.local.dir", str(out / "spark-local")).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    try:
        storage = out / "runs"
        search = unison.run(train, asha_search(), model=sequential_fn, data=make_data,
                            backend=unison.Spark(spark), storage=storage, progress=False)
        sequential = unison.run(train, ablation(["dropout", "hidden2"]), model=sequential_fn,
                                data=make_data, backend=unison.Spark(spark), storage=storage, progress=False)
    finally:
        spark.stop()
    return {"backend": keras.backend.backend(), "search": str(search.path),
            "sequential": str(sequential.path)}


if __name__ == "__main__":
    # Keras has its backend now. The worker processes must learn it from the payload, as Spark
    # executors (which do not inherit the driver's environment) do: with torch, a worker that did not
    # would run Keras on its default, tensorflow, and the test sees it in after_fit.json.
    os.environ.pop("KERAS_BACKEND", None)
    target = Path(sys.argv[1])
    summary = run_spark(target) if "--spark" in sys.argv[2:] else run_all(target)
    (target / "summary.json").write_text(json.dumps(summary))
