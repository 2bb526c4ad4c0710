"""Which arguments a training function asks for, and building them for one call."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from unison._validate import INJECTABLE
from unison.worker.generators import call_generator

if TYPE_CHECKING:
    from unison.worker.ctx import Context
    from unison.worker.reporter import Reporter


def requested_parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """The parameters of ``fn`` that the framework has to fill."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of {fn!r}: {exc}") from None
    return [
        p
        for p in signature.parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]


def check_injectable(
    fn: Callable[..., Any],
    hparam_names: Iterable[str],
    has_model: bool,
    has_data: bool,
    conditional_names: Iterable[str] = (),
) -> list[str]:
    """Validate that every parameter of ``fn`` can be injected; return the names to inject.

    A conditional hyperparameter is absent from trials where it does not apply, so a parameter
    named after one needs a default value.
    """
    conditional_names = set(conditional_names)
    hparam_names = list(hparam_names)
    fn_name = getattr(fn, "__qualname__", repr(fn))
    clashes = sorted(set(hparam_names) & set(INJECTABLE))
    if clashes:
        raise ValueError(
            f"hyperparameter name(s) {clashes} clash with unison's injectable names {list(INJECTABLE)}: "
            f"rename them (e.g. {clashes[0]!r} -> {clashes[0] + '_name'!r})"
        )
    names = []
    for p in requested_parameters(fn):
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(f"{fn_name}: parameter {p.name!r} is positional-only; unison injects by name")
        if p.name in ("model", "model_fn") and not has_model:
            raise TypeError(
                f"{fn_name} asks for {p.name!r} but no model generator was given: pass "
                f"model=model_fn (a function hparams -> model) to unison.run"
            )
        if p.name in ("dataset", "data_fn") and not has_data:
            raise TypeError(
                f"{fn_name} asks for {p.name!r} but no data was given: pass data=data_fn (a function "
                f"hparams -> dataset) or data=<object> to unison.run"
            )
        if p.name in conditional_names and p.default is inspect.Parameter.empty:
            raise TypeError(
                f"{fn_name} asks for {p.name!r}, a conditional hyperparameter that some trials do not "
                f"have: give the parameter a default value, e.g. {p.name}=None"
            )
        if p.name in INJECTABLE or p.name in hparam_names:
            names.append(p.name)
        elif p.default is inspect.Parameter.empty:
            raise TypeError(
                f"{fn_name} asks for {p.name!r}, which unison cannot inject. Injectable names: "
                f"{', '.join(INJECTABLE)}, or a hyperparameter name "
                f"({', '.join(hparam_names) if hparam_names else 'none defined'}). Rename the parameter, "
                f"add it to the hyperparameters, or give it a default value"
            )
    return names


def build_arguments(
    names: list[str],
    hparams: dict[str, Any],
    reporter: Reporter,
    ctx: Context,
    model_fn: Callable[..., Any] | None,
    data: Any,
) -> dict[str, Any]:
    """The keyword arguments for one call; the model and dataset are built only if asked for."""
    kwargs: dict[str, Any] = {}
    for name in names:
        if name == "hparams":
            kwargs[name] = dict(hparams)
        elif name == "reporter":
            kwargs[name] = reporter
        elif name == "callbacks":  # Keras: imported only for a function that asks for it
            from unison.frameworks.keras import callbacks

            kwargs[name] = callbacks(reporter)
        elif name == "ctx":
            kwargs[name] = ctx
        elif name == "model":
            assert model_fn is not None  # check_injectable refused "model" without a model generator
            kwargs[name] = call_generator(model_fn, hparams)
        elif name == "model_fn":
            kwargs[name] = lambda hp=None, _g=model_fn: call_generator(_g, hparams if hp is None else hp)
        elif name == "dataset":
            kwargs[name] = call_generator(data, hparams) if callable(data) else data
        elif name == "data_fn":
            kwargs[name] = (
                (lambda hp=None, _g=data: call_generator(_g, hparams if hp is None else hp))
                if callable(data)
                else (lambda hp=None, _d=data: _d)
            )
        elif name in hparams:  # an inactive conditional hyperparameter keeps the parameter's default
            kwargs[name] = hparams[name]
    return kwargs
