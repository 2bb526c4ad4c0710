"""Removing components for an ablation trial: columns from a dataset, submodules or layers from a model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from unison.worker.generators import call_generator


def feature_names(data: Any) -> list[str] | None:
    """The column names of a DataFrame, dict of arrays or NumPy structured array; else ``None``."""
    columns = getattr(data, "columns", None)
    if columns is not None:
        return [str(c) for c in columns]
    if isinstance(data, Mapping):
        return [str(k) for k in data]
    dtype = getattr(data, "dtype", None)
    if dtype is not None and getattr(dtype, "names", None):
        return list(dtype.names)
    return None


def drop_features(data: Any, columns: list[str]) -> Any:
    """``data`` without ``columns``; the input is left unchanged."""
    names = feature_names(data)
    if names is None:
        raise TypeError(
            f"cannot remove features from a {type(data).__name__}: feature ablation works on pandas "
            f"DataFrames, dicts of arrays and NumPy structured arrays"
        )
    missing = [c for c in columns if c not in names]
    if missing:
        raise KeyError(f"features {missing} are not in the dataset; its columns are {names}")
    if hasattr(data, "drop") and hasattr(data, "columns"):
        return data.drop(columns=columns)
    if isinstance(data, Mapping):
        return {k: v for k, v in data.items() if k not in columns}
    from numpy.lib import recfunctions

    keep = [n for n in names if n not in columns]
    return recfunctions.repack_fields(data[keep])


def remove_modules(model: Any, paths: list[str]) -> Any:
    """``model`` without the named components: PyTorch submodules (dotted paths) are replaced by an
    identity in place; Keras layers (names) are removed and a new model is returned."""
    from unison.frameworks.detect import is_keras_model

    if is_keras_model(model):  # first: a Keras model on the torch backend is a torch.nn.Module too
        from unison.frameworks.keras import remove_layers

        return remove_layers(model, paths)
    if type(model).__module__.startswith("torch") or hasattr(model, "get_submodule"):
        from unison.frameworks.torch import replace_with_identity

        for path in paths:
            replace_with_identity(model, path)
        return model
    raise TypeError(
        f"cannot remove modules from a {type(model).__name__}: module ablation works on torch.nn.Module "
        f"models (submodules by dotted path) and Keras 3 models (layers by name)"
    )


def component_generators(
    component: Mapping[str, Any] | None,
    model_fn: Callable[..., Any] | None,
    data: Any,
    variants: Mapping[str, Callable[..., Any]],
) -> tuple[Callable[..., Any] | None, Any]:
    """The model generator and data (generator) a trial of ``component`` uses."""
    if not component:
        return model_fn, data
    if component.get("variant"):
        model_fn = variants[component["variant"]]
    modules = list(component.get("modules") or ())
    features = list(component.get("features") or ())
    if modules and model_fn is None:
        raise ValueError(f"component {component.get('name')!r} removes modules {modules}, but no model "
                         f"generator was given: pass model=model_fn to unison.run")
    if modules:
        base_model_fn = model_fn

        def model_fn(hparams: Any = None, _g: Any = base_model_fn) -> Any:
            return remove_modules(call_generator(_g, hparams), modules)

    if features:
        base_data = data

        def data(hparams: Any = None, _d: Any = base_data) -> Any:
            return drop_features(call_generator(_d, hparams) if callable(_d) else _d, features)

    return model_fn, data
