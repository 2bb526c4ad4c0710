"""The backend interface: start workers somewhere, tell the driver how many slots exist."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from unison.launch import LaunchSpec

if TYPE_CHECKING:
    from unison.gpus import GpuRequest

_REGISTRY: dict[str, type[Backend]] = {}


def registered_backends() -> dict[str, type[Backend]]:
    """The backend classes defined so far, by name (see :func:`unison.backends.backend_names`)."""
    return dict(_REGISTRY)


class Backend:
    """Starts worker runtimes that connect back to the driver. A new backend is a small class.

    ``in_process`` backends (inline) run trials in the driver's own thread instead.
    ``shared_filesystem``: whether workers see the driver's disk. If so they write a trial's files
    straight into its folder in the experiment directory; if not (Spark executors) they ship them
    back in the trial's result (:mod:`unison.trialfiles`).
    ``listen_host``/``listen_port``: where the driver listens for this backend's workers.
    """

    name = "backend"
    """What ``backend=`` calls it; a subclass that sets it is found by that name."""
    in_process = False
    shared_filesystem = True
    listen_host = "127.0.0.1"
    listen_port = 0
    heartbeat_interval = 1.0
    heartbeat_timeout = 10.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):  # a subclass that only changes behaviour keeps its parent's name
            _REGISTRY.setdefault(cls.name, cls)

    def slots(self) -> int:
        """How many trials can run at once."""
        raise NotImplementedError

    def use_gpus(self, request: GpuRequest) -> None:
        """Give each worker started from now on ``request.per_worker`` GPUs of its own (``0``: none, and
        forget what an earlier experiment asked), before anything starts; raise a ``ValueError`` saying
        what exists when a trial's GPUs do not fit. This default places no GPU: it refuses any."""
        if not request.per_worker:
            return
        if self.in_process:
            raise ValueError(f"{request.what}: the inline backend runs trials one at a time in the driver's "
                             f"own process, which cannot give a trial GPUs of its own: use backend='local' "
                             f"(unison.Local(gpus=[...]) to name the GPUs)")
        raise ValueError(f"{request.what}: the {self.name!r} backend does not give trials GPUs of their own: "
                         f"use unison.Local(gpus=[...]), unison.Spark or unison.Ray, or leave {request.knob} "
                         f"unset")

    def gang_slots(self, k: int) -> int:
        """How many worker slots exist for trials of ``k`` ranks each (a backend may wait, up to a
        limit, until ``k`` exist, or offer ``k`` where its default would be fewer)."""
        return self.slots()

    def gang_group(self, info: dict[str, Any]) -> Hashable | None:
        """Which group of workers the worker ``info`` (its hello) belongs to, when the backend placed
        the ranks of each trial of a search with ``workers_per_trial`` together (Ray's placement
        groups): the driver then starts each trial on the idle workers of one group. ``None``: any
        idle workers will do."""
        return None

    def prepare(self, workers: int) -> None:
        """Begin, before :meth:`start`, what takes a while and needs nothing from the driver (Local:
        its worker template), so it overlaps the driver's own set-up; called as the experiment begins,
        before its folder exists. ``workers``: how many are expected (:meth:`start` may ask for
        another number). Either :meth:`start` or :meth:`cancel_prepared` follows. This default does
        nothing."""

    def cancel_prepared(self) -> None:
        """Undo :meth:`prepare` when the experiment does not start after all."""

    def start(self, spec: LaunchSpec) -> None:
        """Start ``spec.workers`` workers that connect to ``spec.address`` with ``spec.secret`` and load
        ``spec.payload_path`` (see :class:`unison.launch.LaunchSpec`)."""
        raise NotImplementedError

    def worker_aborted(self, info: dict[str, Any]) -> None:
        """The driver told the worker described by ``info`` (its hello) to end its process: its exit
        is expected, not a sign that workers cannot start."""

    def worker_connected(self, info: dict[str, Any]) -> None:
        """The worker described by ``info`` (its hello: ``worker``, ``host``, ``pid``) authenticated:
        it started fine, so its exit, however soon, is not a sign that workers cannot start."""

    def worker_alive(self, info: dict[str, Any]) -> bool | None:
        """Whether the worker's process is known to be running (``None``: this backend cannot tell).
        A silent worker whose process is alive (a function holding the GIL starves its heartbeat
        thread) is not dropped for a missed heartbeat."""
        return None

    def worker_exit(self, info: dict[str, Any], wait_s: float = 0.0) -> str | None:
        """How the worker's process ended (``"exit code 3"``, ``"killed by signal 9 (SIGKILL)"``),
        waiting up to ``wait_s`` for it to end; ``None`` if it is still running or unknown."""
        return None

    def kill_worker(self, info: dict[str, Any]) -> bool:
        """End the worker's process (and whatever it started) now; ``False`` if this backend cannot
        (the driver then asks the worker to end itself)."""
        return False

    def poll(self) -> None:
        """Called regularly while the experiment runs: replace lost workers, raise if none can start."""

    def stop(self, force: bool = False) -> None:
        """Stop every worker; ``force`` kills at once instead of letting them finish their loop."""
