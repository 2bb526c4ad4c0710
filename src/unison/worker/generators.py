"""Calling the user's ``model_fn``/``data_fn`` generators: with the hyperparameters if they take them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def call_generator(generator: Callable[..., Any], hparams: dict[str, Any]) -> Any:
    """Call ``model_fn``/``data_fn`` with the hyperparameters if it takes an argument."""
    return generator() if takes_no_arguments(generator) else generator(hparams)


def takes_no_arguments(generator: Callable[..., Any]) -> bool:
    """Whether ``generator`` can only be called without arguments (its result then never varies)."""
    try:
        params = inspect.signature(generator).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def once(generator: Callable[..., Any]) -> Callable[..., Any]:
    """``generator`` called at most once; later calls return the first result."""
    cache: list[Any] = []

    def cached(*_: Any) -> Any:
        if not cache:
            cache.append(generator())
        return cache[0]

    return cached
