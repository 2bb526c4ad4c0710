"""An ablation's checks before any trial runs: every feature and module it removes exists, and the
training function asks for what the study changes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unison.worker.ablate import feature_names
from unison.worker.generators import call_generator

if TYPE_CHECKING:
    from unison.contexts.ablation import Ablation


def check_reaches(study: Ablation, fn: Callable[..., Any], names: list[str]) -> None:
    """A study that removes features (modules, variants) needs a function that asks for the dataset
    (the model): otherwise every component would silently look like it does not matter."""
    fn_name = getattr(fn, "__qualname__", repr(fn))
    if any(c.features for c in study.components) and not {"dataset", "data_fn"} & set(names):
        raise TypeError(f"the ablation removes features, but {fn_name} asks for neither 'dataset' nor "
                        f"'data_fn': add a 'dataset' parameter and train on it")
    if any(c.modules or c.variant for c in study.components) and not {"model", "model_fn"} & set(names):
        raise TypeError(f"the ablation changes the model, but {fn_name} asks for neither 'model' nor "
                        f"'model_fn': add a 'model' parameter (or call model_fn(hparams)) and train it")


def check_targets(study: Ablation, model: Any, data: Any) -> None:
    """Fail before any trial runs if a component removes a feature or module that does not exist.

    This builds the dataset (if features are removed) and each model that loses modules once, here,
    with the base hyperparameters and the first seed.
    """
    hparams = {**study.base, "seed": study.seed}
    if model is None and (study.modules or study.variants):
        what = "modules= removes model modules" if study.modules else "variants= compares model generators"
        raise ValueError(f"Ablation({what}: pass the base model generator as model=model_fn to unison.run")
    features = [c for c in study.components if c.features]
    if features:
        _check_features(study, features, data, hparams)
    generators: dict[str | None, list[tuple[str, ...]]] = {}
    for component in study.components:
        if component.modules:
            generators.setdefault(component.variant, []).append(tuple(component.modules))
    for variant, removals in generators.items():
        _check_modules(study.variants[variant] if variant else model, variant, removals, hparams)


def _check_features(study: Ablation, components: list[Any], data: Any, hparams: dict[str, Any]) -> None:
    """Every column the components remove, and the label, exist in the dataset."""
    if data is None:
        raise ValueError("Ablation(features=...) removes dataset columns: pass data= to unison.run")
    dataset = call_generator(data, hparams) if callable(data) else data
    names = feature_names(dataset)
    if names is None:
        raise TypeError(f"feature ablation needs a pandas DataFrame, a dict of arrays or a NumPy structured "
                        f"array as the dataset; {'data_fn returned' if callable(data) else 'data= is'} a "
                        f"{type(dataset).__name__}")
    for component in components:
        unknown = [c for c in component.features if c not in names]
        if unknown:
            raise ValueError(f"feature(s) {unknown} of component {component.name!r} are not in the dataset; "
                             f"its columns are {names}")
    if study.label is not None and study.label not in names:
        raise ValueError(f"label={study.label!r} is not a column of the dataset; its columns are {names}")


def _check_modules(model_fn: Any, variant: str | None, removals: list[tuple[str, ...]],
                   hparams: dict[str, Any]) -> None:
    """Every module path exists in the PyTorch model that ``model_fn`` builds; for a Keras model, every
    layer exists and each component's layers can be removed (so a layer that cannot be taken out fails
    here, naming it, before any trial runs)."""
    from unison.frameworks.detect import is_keras_model

    which = f"the variant {variant!r}" if variant else "model_fn"
    paths = list(dict.fromkeys(path for removal in removals for path in removal))
    if "keras" in sys.modules:  # a model_fn that builds a Keras model names its layers as a trial would
        from unison.frameworks.keras import fresh_layer_names

        with fresh_layer_names():
            built = call_generator(model_fn, hparams)
    else:
        built = call_generator(model_fn, hparams)
    if is_keras_model(built):
        from unison.frameworks.keras import layer_names, remove_layers

        names = layer_names(built)
        unknown = [m for m in paths if m not in names]
        if unknown:
            raise ValueError(f"layer(s) {unknown} are not in the Keras model {which} builds; its layers are "
                             f"{names}")
        for removal in removals:
            remove_layers(built, list(removal))  # raises, naming the layer and why, if it cannot go
        return
    if not hasattr(built, "get_submodule"):
        raise TypeError(f"module ablation needs a Keras model or a torch.nn.Module; {which} returned a "
                        f"{type(built).__name__}")
    from unison.frameworks.torch import module_names

    names = module_names(built)
    unknown = [m for m in paths if m not in names]
    if unknown:
        raise ValueError(f"module(s) {unknown} are not in the model {which} builds; its modules are {names}")
