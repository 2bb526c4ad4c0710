"""One Keras training function (``model.fit``), run as a single run, a search, an ablation and a
distributed run.

Handwritten digits (scikit-learn's 8x8 digits: 1797 images, shipped with the package, nothing
downloaded) classified by a small Keras MLP. The same ``train`` runs unchanged:

1. as a single run in this process,
2. as an asynchronous search over the learning rate, width and dropout on two worker processes,
   with ASHA stopping weak trials: the injected ``callbacks`` report each epoch's logs
   (``val_accuracy``, ...) and end ``fit`` after the epoch at which ASHA stops a trial,
3. as an ablation that removes the layers named ``dropout`` and ``hidden2`` one at a time,
4. as one data-parallel run on two worker processes with TensorFlow's
   ``MultiWorkerMirroredStrategy`` (``Distributed(framework="tensorflow")``): the model is built and
   compiled in the strategy's scope and ``fit`` shards the arrays across the workers, without
   ``train`` or ``model_fn`` mentioning it.

Keras picks its backend when it is first imported; this script uses TensorFlow when it is installed,
else torch, unless ``KERAS_BACKEND`` says otherwise (``KERAS_BACKEND=torch python
examples/keras_mnist_like.py``); the distributed step needs TensorFlow. Worker processes inherit the
variable. About a minute on two cores, mostly spent importing Keras in each process.

    python examples/keras_mnist_like.py [single|search|ablation|distributed|all]
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Any

# before anything imports keras
os.environ.setdefault("KERAS_BACKEND", "tensorflow" if importlib.util.find_spec("tensorflow") else "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import unison  # noqa: E402

EPOCHS = 9


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/validation split of scikit-learn's digits, scaled to [0, 1] (loaded once per worker)."""
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = sklearn_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order].astype("int32")
    return x[:1400], y[:1400], x[1400:], y[1400:]


def model_fn(hparams: dict[str, Any]) -> keras.Model:
    """The model generator: built from the hyperparameters, compiled, with named layers to ablate."""
    keras.utils.set_random_seed(hparams.get("seed", 0))
    units = hparams["units"]
    model = keras.Sequential([
        keras.Input(shape=(64,), name="pixels"),
        keras.layers.Dense(units, activation="relu", name="hidden1"),
        keras.layers.Dropout(hparams["dropout"], name="dropout"),
        keras.layers.Dense(units, activation="relu", name="hidden2"),  # units -> units: removable
        keras.layers.Dense(10, activation="softmax", name="digit"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(hparams["lr"]), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def train(model: keras.Model, dataset: Any, callbacks: list, epochs: int) -> dict[str, float]:
    """The training function: written once, the Keras way."""
    x_train, y_train, x_val, y_val = dataset
    model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=epochs, batch_size=64,
              callbacks=callbacks, verbose=0)
    loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
    return {"val_accuracy": accuracy, "val_loss": loss}


BASE = {"lr": 0.01, "units": 64, "dropout": 0.2, "epochs": EPOCHS}


def single() -> None:
    result = unison.run(train, hparams=BASE, model=model_fn, data=load_digits, metric="val_accuracy")
    print(f"single run ({keras.backend.backend()}): {result.metrics}")


def search() -> None:
    space = {"lr": unison.loguniform(1e-4, 3e-2), "units": unison.integer(16, 128, log=True),
             "dropout": unison.uniform(0.0, 0.5), "epochs": EPOCHS}
    study = unison.Search(space, metric="val_accuracy", mode="max", trials=8, seed=0,
                          scheduler=unison.ASHA(min_resource=1, max_resource=EPOCHS, reduction_factor=3))
    result = unison.run(train, study, model=model_fn, data=load_digits, backend=unison.Local(workers=2))
    print(result.trials[["trial_id", "status", "lr", "units", "dropout", "val_accuracy", "last_step"]])
    print("best:", result.best)


def ablation() -> None:
    study = unison.Ablation(base=BASE, modules=["dropout", "hidden2"], metric="val_accuracy", mode="max",
                            repeats=2)
    # Six trials of about a second each: in this process they take less time than starting worker
    # processes (each imports Keras, ~5 s). With longer trials, backend=unison.Local(workers=2) (or
    # "spark") runs them in parallel, unchanged.
    result = unison.run(train, study, model=model_fn, data=load_digits, backend="inline")
    print(result.ablation[["component", "kind", "n", "mean", "diff", "rank"]])


def distributed() -> None:
    if keras.backend.backend() != "tensorflow":
        print("distributed: needs Keras on TensorFlow "
              "(KERAS_BACKEND=tensorflow, pip install 'unison[tensorflow]')")
        return
    # Two worker processes, each a worker of one TensorFlow cluster; the result is the chief's.
    run = unison.Distributed(workers=2, hparams=BASE, framework="tensorflow", metric="val_accuracy")
    result = unison.run(train, run, model=model_fn, data=load_digits)
    print(f"distributed (2 workers, MultiWorkerMirroredStrategy): {result.metrics}")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    for name, step in {"single": single, "search": search, "ablation": ablation,
                       "distributed": distributed}.items():
        if which in (name, "all"):
            start = time.perf_counter()
            step()
            print(f"-- {name}: {time.perf_counter() - start:.1f} s")
