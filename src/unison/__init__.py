"""unison: one training function, run as a single run, a hyperparameter search, an ablation or a
distributed job, on this machine or a cluster. Importing unison loads no ML framework."""

from unison.api import resume, run
from unison.backends.base import Backend
from unison.backends.inline import Inline
from unison.backends.local import Local
from unison.backends.spark import Spark
from unison.context import Context
from unison.contexts.ablation import Ablation, Ablator, Component, LeaveOneOut
from unison.contexts.distributed import Distributed
from unison.contexts.search import Search
from unison.errors import RunFailed, SearchAborted, TrialStopped, WorkerError
from unison.optimizers import GridSearch, Optimizer, OptunaOptimizer, RandomSearch
from unison.result import AblationResult, Best, RunResult, SearchResult
from unison.runtime import Reporter
from unison.schedulers import ASHA, Hyperband, MedianStopping, Scheduler, Stop
from unison.space import choice, integer, loguniform, uniform

__version__ = "0.1.0"

__all__ = [
    "run", "resume", "Search", "Ablation", "Distributed", "RunFailed", "Ablator", "LeaveOneOut", "Component",
    "AblationResult",
    "uniform", "loguniform", "integer", "choice",
    "Backend", "Inline", "Local", "Spark", "Context", "Reporter",
    "Optimizer", "RandomSearch", "GridSearch", "OptunaOptimizer",
    "Scheduler", "Stop", "MedianStopping", "ASHA", "Hyperband",
    "TrialStopped", "SearchAborted", "WorkerError",
    "Best", "RunResult", "SearchResult", "__version__",
]
