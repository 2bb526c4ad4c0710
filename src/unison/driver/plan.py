"""A plan: what an experiment context (a search, an ablation, a distributed run) turns into for the driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unison.backends.base import Backend
    from unison.contexts.search import Search
    from unison.errors import SearchAborted
    from unison.result import SearchResult

MakeResult = Callable[[Path, list[dict[str, Any]], str], "SearchResult"]
"""``make_result(path, rows, status)``: the result object of an experiment from its trial rows."""


@dataclass
class Plan:
    """What the driver runs and how its result is shaped; built by a context's ``to_plan``.

    Attributes:
        kind: ``"search"``, ``"ablation"`` or ``"distributed"`` (the ``kind`` of ``experiment.json``).
        search: the :class:`unison.Search` that drives the trials (optimizer, scheduler, metrics, limits).
        declaration: the context as JSON, stored in ``experiment.json`` and compared on resume.
        make_result: builds the result object from the trial rows.
        trial_spec: what a trial of number ``n`` carries besides its hyperparameters (an ablation's
            component and seed).
        variants: model generators a trial's component may name (an ablation's ``variants=``).
        hparam_names: the names a training function may ask for as hyperparameters.
        check_names: a last check of the names the function asks for (an ablation needs ``dataset``
            to remove features).
        dist_options: a distributed trial's ``process_group``, ``timeout_s``, ``strategy``, ``framework``.
        require_metric: whether a trial that does not return the search's metric fails.
        context: the Search/Ablation/Distributed itself, pickled into ``payload.bin`` for ``unison resume``.
        present: turns the experiment's result into what ``unison.run`` returns (a distributed run
            returns rank 0's metrics as a :class:`unison.RunResult`).
        on_abort: turns an aborted experiment's error into the one ``unison.run`` raises.
    """

    kind: str
    search: Search
    declaration: dict[str, Any]
    make_result: MakeResult
    trial_spec: Callable[[int], dict[str, Any]] | None = None
    variants: dict[str, Callable[..., Any]] = field(default_factory=dict)
    hparam_names: list[str] = field(default_factory=list)
    check_names: Callable[[Callable[..., Any], list[str]], None] | None = None
    dist_options: dict[str, Any] = field(default_factory=dict)
    require_metric: bool = True
    context: Any = None
    present: Callable[[SearchResult], Any] = lambda result: result
    on_abort: Callable[[SearchAborted], Exception] | None = None

    @property
    def workers_per_trial(self) -> int:
        """How many processes (ranks) each trial runs as."""
        return self.search.workers_per_trial or 1


def prepare_backend(plan: Plan, backend: Backend) -> int:
    """Check that ``backend`` can run ``plan``'s trials, then let it begin what it starts slowly
    (:meth:`~unison.backends.base.Backend.prepare`: Local's worker template) while the driver sets up;
    the worker slots a trial of ``k > 1`` ranks may use (0 for ordinary trials). Called again for the
    same experiment, it keeps what the first call began."""
    gang_slots = check_backend(plan, backend)
    if not backend.in_process:
        backend.prepare(expected_workers(plan, backend, gang_slots))
    return gang_slots


def check_backend(plan: Plan, backend: Backend) -> int:
    """The worker slots a trial of ``k > 1`` ranks may use (0 for ordinary trials); raise if ``backend``
    cannot run the plan's trials. A backend that places GPUs is told what each worker gets first: it
    sizes its slots by them."""
    from unison.gpus import GpuRequest, place

    k = plan.workers_per_trial
    place(backend, GpuRequest.of(plan.kind, getattr(plan.search, "gpus_per_trial", 0), k))
    if k == 1:
        return 0
    if backend.in_process:
        what = "unison.Distributed" if plan.kind == "distributed" else f"Search(workers_per_trial={k})"
        raise ValueError(f"{what} runs each trial as {k} processes: use backend='local' or 'spark', not "
                         f"{backend.name!r}")
    gang_slots = backend.gang_slots(k)
    if gang_slots < k:
        raise ValueError(f"a trial of {k} ranks needs {k} worker slots, but {backend!r} has {gang_slots}: "
                         f"give the backend more workers, or use fewer ranks per trial")
    return gang_slots


def expected_workers(plan: Plan, backend: Backend, gang_slots: int) -> int:
    """How many workers an experiment starts (``unison.driver.experiment._size``), before its driver
    exists (a resumed experiment may need fewer)."""
    search, k = plan.search, plan.workers_per_trial
    caps = [n for n in (search.trials, search.max_concurrent) if n]
    return max(1, min([gang_slots // k if k > 1 else backend.slots(), *caps])) * k
