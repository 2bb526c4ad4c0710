"""Keras 3 integration: the ``callbacks`` injectable and layer ablation by name.

Keras is imported only when a function asks for ``callbacks`` or an ablation removes layers from a
Keras model; it picks its backend (``KERAS_BACKEND``: ``torch``, ``tensorflow``, ``jax``) at its first
import, so set the variable before anything imports Keras. Local worker processes inherit the
driver's environment, and the payload carries the driver's Keras backend to workers elsewhere
(see :mod:`unison.payload`).

**Stopping.** The reporting callback reports each epoch's numeric logs with
``reporter.report(step=epoch, **logs)``. When the scheduler stops the trial, the callback does not
raise out of ``fit`` (that would skip the other callbacks' ``on_train_end``, the optimizer's last
step and whatever the function does after ``fit``); it sets ``model.stop_training``, so ``fit``
returns after that epoch, and the reporter remembers the stop: the runtime records the trial as
``stopped`` with the metrics of the epoch the scheduler judged, whatever the function returns. Any
later ``reporter.report`` and any later ``fit`` with the same callbacks raise
:class:`unison.TrialStopped` at once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from unison.errors import TrialStopped

if TYPE_CHECKING:
    from unison.worker.reporter import Reporter


# ------------------------------------------------------------------------------------------ callbacks
def callbacks(reporter: Reporter) -> list[Any]:
    """The injected ``callbacks``: a fresh list for one trial, to pass to ``model.fit``."""
    return [report_callback(reporter)]


def report_callback(reporter: Reporter) -> Any:
    """A Keras callback that reports epoch logs to ``reporter`` and ends ``fit`` when told to stop."""
    return _callback_class()(reporter)


@functools.cache
def _callback_class() -> type:
    import keras

    from unison.worker.metrics import to_number

    class ReportCallback(keras.callbacks.Callback):
        """Reports each epoch's numeric logs to unison; ends ``fit`` after the epoch the scheduler stops.

        Args:
            reporter: the trial's ``reporter``.
        """

        def __init__(self, reporter: Reporter) -> None:
            super().__init__()
            self.reporter = reporter

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            # A stopped trial does not train again (a second fit after the stop): nothing has run yet
            # in this fit, so leaving it by raising is clean.
            if self.reporter.stop_reason is not None:
                raise TrialStopped(self.reporter.stop_reason)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            metrics = {str(k): v for k, v in (logs or {}).items() if to_number(v) is not None}
            try:
                self.reporter.report(step=int(epoch), **metrics)
            except TrialStopped:
                self.model.stop_training = True  # fit returns after this epoch; the reporter remembers

    ReportCallback.__module__ = __name__
    ReportCallback.__qualname__ = "ReportCallback"
    return ReportCallback


@contextlib.contextmanager
def fresh_layer_names() -> Iterator[None]:
    """Within the block, Keras names layers as in a fresh process (``dense``, ``dense_1``, ...).

    Keras numbers automatic layer names per process, so the tenth model a worker builds would call its
    first layer ``dense_27``: a trial builds its model in a fresh naming scope, so a layer named by
    Keras is found by the same name in every trial, on every backend. The process's own counters come
    back after the block (a notebook's next model is named as if the block had not happened).
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # another Keras layout: names stay as Keras makes them
        yield
        return
    key = "object_name_uids"
    saved = global_state.get_global_attribute(key)
    global_state.set_global_attribute(key, None)  # Keras creates a new counter on first use
    try:
        yield
    finally:
        global_state.set_global_attribute(key, saved)


# ------------------------------------------------------------------------------------------ ablation
def layer_names(model: Any) -> list[str]:
    """The names of the model's (top-level) layers, in order."""
    return [layer.name for layer in model.layers]


def _kind(model: Any) -> str:
    import keras

    if isinstance(model, keras.Sequential):
        return "sequential"
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - another Keras layout
        Functional = None  # noqa: N806
    if Functional is not None and isinstance(model, Functional):
        return "functional"
    return "subclassed"


def remove_layers(model: Any, names: list[str]) -> Any:
    """A model like ``model`` without the layers ``names``; the layers that stay keep their weights.

    A Sequential model is rebuilt from the other layers. In a Functional model each removed layer is
    bypassed: its input goes where its output went, which needs exactly one input and one output of
    the same shape and dtype. A compiled model is compiled again with the same arguments.

    Raises:
        KeyError: a name that is not a layer of the model (the message lists the layers).
        ValueError: a layer that cannot be removed (the message names it and says why).
        TypeError: a subclassed model, whose ``call`` is code that cannot be rewritten.
    """
    names = list(dict.fromkeys(names))
    existing = layer_names(model)
    unknown = [n for n in names if n not in existing]
    if unknown:
        raise KeyError(f"the Keras model {model.name!r} has no layer(s) {unknown}; its layers are {existing}")
    kind = _kind(model)
    if kind == "subclassed":
        raise TypeError(
            f"cannot remove layer {names[0]!r} from {type(model).__name__} {model.name!r}: it is a "
            f"subclassed Keras model, whose call() is Python code that unison cannot rewrite. Layer removal "
            f"works on Sequential and Functional models; for this one pass a model_fn without the layer as a "
            f"variant: "
            f"Ablation(variants={{'no {names[0]}': model_fn_without_it}})"
        )
    if kind == "sequential":
        rebuilt = _remove_from_sequential(model, names)
    else:
        rebuilt = _remove_from_functional(model, names)
    if not model.trainable:  # a frozen model stays frozen (its layers keep their own flags either way)
        rebuilt.trainable = False
    _compile_like(model, rebuilt)
    return rebuilt


def _nodes_in(model: Any, layer: Any) -> list[Any]:
    """The calls (graph nodes) of ``layer`` that belong to ``model``'s graph."""
    nodes = list(getattr(layer, "_inbound_nodes", []))
    own = getattr(model, "_nodes", None)
    if own is None:
        return nodes
    return [node for i, node in enumerate(nodes) if f"{id(layer)}_ib-{i}" in own]


def _bypass_check(model: Any, layer: Any, owner: Any = None) -> None:
    """Raise unless ``layer`` is called once in ``model``'s graph with one input and one output of one
    shape; ``owner`` is the model the user built (a Sequential's graph is an inner Functional)."""
    where = f"layer {layer.name!r} ({type(layer).__name__}) of the Keras model {(owner or model).name!r}"
    if type(layer).__name__ == "InputLayer":
        raise ValueError(f"cannot remove {where}: it is an input of the model")
    nodes = _nodes_in(model, layer)
    if len(nodes) != 1:
        raise ValueError(
            f"cannot remove {where}: it is called {len(nodes)} times in the model (a shared layer); "
            f"unison removes a layer by passing its one input through in place of its one output"
        )
    (node,) = nodes
    inputs, outputs = list(node.input_tensors), list(node.output_tensors)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"cannot remove {where}: it takes {len(inputs)} input(s) and gives {len(outputs)} output(s); "
            f"removing a layer passes its input through in place of its output, which needs exactly one "
            f"of each. Pass a variant model_fn without it instead"
        )
    (x,), (y,) = inputs, outputs
    if tuple(x.shape) != tuple(y.shape) or x.dtype != y.dtype:
        raise ValueError(
            f"cannot remove {where}: it maps {_describe(x)} to {_describe(y)}, and passing its input "
            f"through in its place needs both to agree. Remove a layer whose input and output shapes agree "
            f"(an activation, a dropout, a normalization, a residual block), or pass a variant model_fn "
            f"without it"
        )


def _describe(tensor: Any) -> str:
    return f"shape {tuple(tensor.shape)} {tensor.dtype}"


def _remove_from_sequential(model: Any, names: list[str]) -> Any:
    import keras

    layers = {layer.name: layer for layer in model.layers}
    built = bool(model.built and getattr(model, "_functional", None) is not None)
    if built:
        # The layers after a removed one were built for its output: they can take its input only if
        # the shapes agree. An unbuilt Sequential has no shapes yet; its layers build on what arrives.
        functional = model._functional
        for name in names:
            _bypass_check(functional, layers[name], owner=model)
    kept = [layer for layer in model.layers if layer.name not in names]
    first = model._layers[0] if model._layers else None
    if first is not None and type(first).__name__ == "InputLayer":
        start = [keras.Input(batch_shape=first.batch_shape, dtype=first.dtype, name=first.name)]
    else:
        start = []
    return keras.Sequential([*start, *kept], name=model.name)


def _remove_from_functional(model: Any, names: list[str]) -> Any:
    import keras

    for name in names:
        _bypass_check(model, model.get_layer(name))
    removed = {id(model.get_layer(name)) for name in names}

    def call_function(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if id(layer) in removed:
            tensors = [t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)]
            return tensors[0]  # exactly one: checked above
        return layer(*args, **kwargs)

    # clone_model recompiles from the serialized config, which fails for a loss or metric that is a plain
    # Python function: clone it as uncompiled and compile it with the original objects afterwards.
    compiled = getattr(model, "compiled", False)
    model.compiled = False
    try:
        rebuilt = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                           call_function=call_function)
    finally:
        model.compiled = compiled
    return rebuilt


def _compile_like(model: Any, rebuilt: Any) -> None:
    """Compile ``rebuilt`` with the arguments ``model`` was compiled with, if it was."""
    if not getattr(model, "compiled", False):
        return
    import keras

    stored = getattr(model, "_compile_config", None)
    arguments = getattr(stored, "config", None)
    if not isinstance(arguments, dict):
        rebuilt.compile_from_config(model.get_compile_config())
        return
    arguments = dict(arguments)
    optimizer = arguments.get("optimizer")
    if isinstance(optimizer, keras.optimizers.Optimizer) and optimizer.built:
        arguments["optimizer"] = optimizer.__class__.from_config(optimizer.get_config())
    rebuilt.compile(**arguments)
