"""Optimizers: what to try next. ``make_optimizer`` turns a name into an instance."""

from __future__ import annotations

from typing import Any

from unison._validate import lookup
from unison.optimizers.auto import AutoSearch
from unison.optimizers.base import Optimizer
from unison.optimizers.grid import GridSearch
from unison.optimizers.optuna import (  # imports optuna only when an optimizer is set up
    CmaEsSearch,
    GPSearch,
    NSGA2Search,
    OptunaOptimizer,
    QMCSearch,
    TPESearch,
)
from unison.optimizers.random import RandomSearch

BUILTIN_OPTIMIZERS = {
    "random": RandomSearch,
    "grid": GridSearch,
    "tpe": TPESearch,
    "gp": GPSearch,
    "cmaes": CmaEsSearch,
    "qmc": QMCSearch,
    "nsga2": NSGA2Search,
    "auto": AutoSearch,
}

__all__ = [
    "Optimizer", "RandomSearch", "GridSearch", "OptunaOptimizer", "TPESearch", "GPSearch", "CmaEsSearch",
    "QMCSearch", "NSGA2Search", "AutoSearch", "BUILTIN_OPTIMIZERS", "make_optimizer",
]


def make_optimizer(spec: Any) -> Optimizer:
    """An optimizer from a name in ``BUILTIN_OPTIMIZERS`` or an :class:`Optimizer` instance."""
    if isinstance(spec, Optimizer):
        return spec
    return lookup("optimizer", spec, BUILTIN_OPTIMIZERS, "an instance of unison.Optimizer")()
