"""unison: one training function, run as a single run, a hyperparameter search, an ablation or a
distributed job, on this machine or a cluster. Importing unison loads no ML framework.

The public names load on first use (PEP 562), so a worker process, which imports only
``unison.worker.serve``, does not pay for the driver's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from unison._version import __version__

_PUBLIC = {
    "unison.api": ("load", "replay", "resume", "run"),
    "unison.backends.base": ("Backend",),
    "unison.backends.inline": ("Inline",),
    "unison.backends.local": ("Local",),
    "unison.backends.ray": ("Ray",),
    "unison.backends.spark": ("Spark",),
    "unison.callbacks": ("Callback",),
    "unison.mlflow_logger": ("MLflowLogger",),
    "unison.notebook": ("context_backend",),
    "unison.tensorboard_logger": ("TensorBoardLogger",),
    "unison.worker.ctx": ("Context",),
    "unison.worker.checkpoints": ("load_checkpoint",),
    "unison.contexts.ablation": ("Ablation", "Ablator", "Component", "LeaveOneOut"),
    "unison.contexts.distributed": ("Distributed",),
    "unison.contexts.pipeline": ("Pipeline",),
    "unison.contexts.search": ("Search",),
    "unison.errors": (
        "ExperimentLocked", "MetricNotReported", "RunFailed", "SearchAborted", "StorageFull", "TrialStopped",
        "WorkerError",
    ),
    "unison.optimizers": ("GridSearch", "Optimizer", "OptunaOptimizer", "RandomSearch"),
    "unison.result": ("AblationResult", "Best", "PipelineResult", "RunResult", "SearchResult"),
    "unison.worker.reporter": ("Reporter",),
    "unison.schedulers": ("ASHA", "CONTINUE", "Continue", "Exploit", "Hyperband", "MedianStopping", "PBT",
                          "Pause", "Scheduler", "Stop"),
    "unison.space": ("choice", "integer", "loguniform", "uniform"),
}
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

__all__ = [*_HOME, "__version__"]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:  # a submodule, as ``import unison`` then ``unison.space`` would give
        try:
            return importlib.import_module(f"unison.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"unison.{name}":
                raise
            raise AttributeError(f"module 'unison' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext unison``: registers the cell magic ``%%context`` (see :mod:`unison.notebook`)."""
    from unison.notebook import load_ipython_extension as load

    load(ipython)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from unison.api import load, replay, resume, run  # noqa: F401
    from unison.backends.base import Backend  # noqa: F401
    from unison.backends.inline import Inline  # noqa: F401
    from unison.backends.local import Local  # noqa: F401
    from unison.backends.ray import Ray  # noqa: F401
    from unison.backends.spark import Spark  # noqa: F401
    from unison.callbacks import Callback  # noqa: F401
    from unison.contexts.ablation import Ablation, Ablator, Component, LeaveOneOut  # noqa: F401
    from unison.contexts.distributed import Distributed  # noqa: F401
    from unison.contexts.pipeline import Pipeline  # noqa: F401
    from unison.contexts.search import Search  # noqa: F401
    from unison.errors import (  # noqa: F401
        ExperimentLocked,
        MetricNotReported,
        RunFailed,
        SearchAborted,
        StorageFull,
        TrialStopped,
        WorkerError,
    )
    from unison.mlflow_logger import MLflowLogger  # noqa: F401
    from unison.notebook import context_backend  # noqa: F401
    from unison.optimizers import GridSearch, Optimizer, OptunaOptimizer, RandomSearch  # noqa: F401
    from unison.result import AblationResult, Best, PipelineResult, RunResult, SearchResult  # noqa: F401
    from unison.schedulers import (  # noqa: F401
        ASHA,
        CONTINUE,
        PBT,
        Continue,
        Exploit,
        Hyperband,
        MedianStopping,
        Pause,
        Scheduler,
        Stop,
    )
    from unison.space import choice, integer, loguniform, uniform  # noqa: F401
    from unison.tensorboard_logger import TensorBoardLogger  # noqa: F401
    from unison.worker.checkpoints import load_checkpoint  # noqa: F401
    from unison.worker.ctx import Context  # noqa: F401
    from unison.worker.reporter import Reporter  # noqa: F401
