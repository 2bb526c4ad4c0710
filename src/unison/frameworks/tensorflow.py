"""TensorFlow multi-worker training: one rank of a ``Distributed(workers=N, framework="tensorflow")`` run.

Each rank is one worker of a TensorFlow cluster. Before the training function is called, the rank
sets ``TF_CONFIG`` (the cluster: every rank's ``address:port``, in rank order, each a port found
free on the rank's host; the task: ``worker`` number ``rank``, worker 0 being the chief), creates a
``tf.distribute.MultiWorkerMirroredStrategy`` and enters its scope for the whole call: the model
``model_fn(hparams)`` builds, the user's ``model.compile`` (its optimizer must be created in the scope
too) and ``model.fit`` all happen inside it, and the function never mentions the strategy.

**Input.** ``fit`` shards its input across the workers (TensorFlow's auto-sharding: NumPy arrays and
in-memory datasets by data, each worker taking its part of every global batch of ``batch_size``
rows; file-based datasets by file). ``ctx.shard(dataset)`` of a ``tf.data.Dataset`` instead makes a
per-worker dataset: this worker's elements, all of the same count on every worker, with
auto-sharding turned off; ``fit`` then trains each worker on all of its elements, so ``batch_size``
is per worker (the global batch is ``world_size`` times larger), as with PyTorch DDP.

**Limits.** TensorFlow configures its collectives once per process, so a worker process joins one
cluster: it runs this trial only (a second one fails at once, saying so). A search of multi-worker
TensorFlow trials is therefore not supported. Only rank 0 reports to the driver; a ``Distributed``
run has no scheduler, so the ranks never need to agree on a stop.

TensorFlow is imported only when a rank starts.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from unison.worker.rank import RankSession, shard
from unison.worker.reporter import Decide

_joined: str | None = None  # the TF_CONFIG of the cluster this process joined, if any


def tf_config(peers: list[str], rank: int) -> dict[str, Any]:
    """The ``TF_CONFIG`` of ``rank`` in the cluster of ``peers`` (``address:port`` by rank)."""
    return {"cluster": {"worker": list(peers)}, "task": {"type": "worker", "index": int(rank)}}


def keras_backend() -> str | None:
    """The backend Keras runs on in this process (or will run on: ``KERAS_BACKEND``), if known."""
    from unison.payload import framework_env

    return framework_env().get("KERAS_BACKEND")


def check_keras_backend() -> None:
    """Raise unless Keras runs (or will run) on TensorFlow here: a Keras model on another backend would
    ignore the strategy and train alone on every rank."""
    backend = keras_backend()
    if backend not in (None, "tensorflow"):
        raise RuntimeError(
            f"Distributed(framework='tensorflow') trains Keras models with TensorFlow's "
            f"MultiWorkerMirroredStrategy, but Keras runs on the {backend!r} backend here. Set "
            f"KERAS_BACKEND=tensorflow before anything imports keras, or use framework='torch' for PyTorch "
            f"models"
        )


def is_tf_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``tf.data.Dataset`` (without importing TensorFlow)."""
    tf = sys.modules.get("tensorflow")
    dataset = getattr(getattr(tf, "data", None), "Dataset", None)
    return isinstance(dataset, type) and isinstance(obj, dataset)


def shard_dataset(dataset: Any, rank: int, world_size: int) -> Any:
    """``rank``'s elements of ``dataset`` (every ``world_size``-th, from the ``rank``-th), as a
    per-worker dataset: auto-sharding off. When the dataset's length is known, the last
    ``len % world_size`` elements are left out, so every worker gets as many elements (and runs as
    many steps) as the others."""
    import tensorflow as tf

    count = int(dataset.cardinality())
    if count >= 0:
        dataset = dataset.take(count - count % world_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.shard(world_size, rank).with_options(options)


@functools.cache
def _strategy_class() -> type:
    import tensorflow as tf

    off = tf.data.experimental.AutoShardPolicy.OFF

    class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """``MultiWorkerMirroredStrategy`` as Keras 3's ``fit`` needs it, with per-worker datasets.

        - ``reduce``: Keras 3 reduces a whole input batch (a tuple) to build the model before ``fit``,
          and the scalar logs of each step with ``axis=0``; the multi-worker strategy takes one value
          and an axis the value has, and fails on both (keras-team/keras#20585): a structure is
          reduced value by value, a scalar across the replicas only.
        - ``experimental_distribute_dataset``: a dataset with auto-sharding off (``ctx.shard``) is
          this worker's own data: it is distributed as is (no rebatching, which would make Keras,
          counting the dataset's batches, run out of steps halfway through an epoch).
        """

        def reduce(self, reduce_op: Any, value: Any, axis: Any = None) -> Any:
            if tf.nest.is_nested(value):
                return tf.nest.map_structure(
                    lambda v: None if v is None else self.reduce(reduce_op, v, axis), value)
            if axis is not None:
                first = value.values[0] if hasattr(value, "values") else value
                if getattr(getattr(first, "shape", None), "rank", None) == 0:
                    axis = None
            return super().reduce(reduce_op, value, axis)

        def experimental_distribute_dataset(self, dataset: Any, options: Any = None) -> Any:
            if dataset.options().experimental_distribute.auto_shard_policy == off:
                return self.distribute_datasets_from_function(lambda _: dataset, options)
            return super().experimental_distribute_dataset(dataset, options)

    MultiWorkerStrategy.__module__ = __name__
    return MultiWorkerStrategy


class TensorFlowRankSession(RankSession):
    """One rank of a TensorFlow multi-worker trial: ``TF_CONFIG``, the strategy and its scope for the
    call."""

    def __init__(self, dist: Mapping[str, Any], seed: int | None,
                 notify: Callable[[str], None] | None = None) -> None:
        super().__init__(dist, seed, notify)
        self.peers = [str(peer) for peer in dist.get("peers") or ()]
        if len(self.peers) != self.world_size:
            raise ValueError(f"a TensorFlow trial of {self.world_size} ranks needs every rank's address, got "
                             f"{self.peers}")
        self.tf_strategy: Any = None  # (``strategy`` is the torch option, None here)
        self._scope: Any = None
        self._warned = False

    def _environment(self) -> dict[str, str]:
        return {"TF_CONFIG": json.dumps(tf_config(self.peers, self.rank))}

    def _start(self) -> str:
        global _joined
        check_keras_backend()
        config = os.environ["TF_CONFIG"]
        if _joined is not None:
            raise RuntimeError(
                "this worker process already was a worker of a TensorFlow cluster (an earlier "
                "Distributed(framework='tensorflow') run), and TensorFlow cannot join another one in the "
                "same process. On Spark, let every task start a fresh Python worker: "
                "spark.python.worker.reuse=false"
            )
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus and self.local_world_size > 1:  # ranks sharing a host share its GPUs out
            tf.config.set_visible_devices(gpus[self.local_rank % len(gpus)], "GPU")
        _joined = config
        try:
            self.tf_strategy = _strategy_class()()
        except RuntimeError as exc:
            if "configured at program startup" not in str(exc):
                raise
            raise RuntimeError(
                "TensorFlow ran operations in this worker process before the trial started (for instance "
                "when the module of the training function was imported), so it cannot join the cluster: "
                "MultiWorkerMirroredStrategy must come first. Create tensors and models inside the function, "
                "model_fn or data_fn, not at import time"
            ) from exc
        self._scope = self.tf_strategy.scope()
        self._scope.__enter__()
        return "gpu" if gpus else "cpu"

    def _stop(self) -> None:
        if self._scope is not None:
            scope, self._scope = self._scope, None
            scope.__exit__(None, None, None)

    def decide(self, chief_decide: Decide | None) -> Decide:
        """Rank 0 asks the driver; the other ranks only record their reports."""

        def decide(step: int, metrics: dict[str, float],
                   checkpoint: dict[str, Any] | None = None) -> str | None:
            return (chief_decide(step, metrics, checkpoint) if self.rank == 0 and chief_decide is not None
                    else None)

        return decide

    def wrap_model_fn(self, model_fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
        return model_fn  # the whole call runs in the strategy's scope: models built there are mirrored

    def prepare(self, obj: Any) -> Any:
        from unison.frameworks.detect import is_keras_model

        if is_keras_model(obj) or is_tf_dataset(obj):
            return obj
        raise TypeError(f"ctx.prepare in a TensorFlow multi-worker trial takes a Keras model or a "
                        f"tf.data.Dataset (returned as they are: the model is built in the strategy's scope, "
                        f"fit shards its input), not a {type(obj).__name__}; for a per-worker dataset use "
                        f"ctx.shard(dataset)")

    def shard(self, data: Any, even: bool = False) -> Any:
        if is_tf_dataset(data):
            return shard_dataset(data, self.rank, self.world_size)
        if not self._warned:
            self._warned = True
            warnings.warn(
                "ctx.shard split the data for a TensorFlow multi-worker trial, but model.fit shards NumPy "
                "input across the workers by itself: fitting on this part would train each worker on only "
                f"1/{self.world_size} of its part. Pass the whole arrays to fit, or make a per-worker "
                "dataset with ctx.shard(tf.data.Dataset.from_tensor_slices((x, y)))",
                stacklevel=3,
            )
        return shard(data, self.rank, self.world_size, even)
