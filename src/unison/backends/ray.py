"""The Ray backend: one long-lived Ray actor per slot, each running the worker runtime.

Every slot is an actor whose one method call runs :func:`unison.worker.serve.serve`, the same loop as a
local worker process or a Spark task: it connects back to the driver over the authenticated protocol
and pulls trials until the driver says shut down. The secret and the payload travel as that call's
arguments (the payload once, through Ray's object store), never over the driver's socket. An actor
that dies (killed, its node lost) is a lost worker: the driver retries its trial elsewhere and
:meth:`Ray.poll` starts a new actor in its slot. Every actor is ``ray.kill``-ed when the experiment
ends, however it ends. ray is imported only when a Ray backend is used.

A distributed run (``unison.Distributed``) puts its ranks' actors into one placement group, so that
all of them start together or none does. A search with ``workers_per_trial=k`` gets one placement
group of ``k`` bundles per trial it runs at once; the driver gives each trial the ``k`` actors of one
group (see :meth:`Ray.gang_group`), so ``placement_strategy`` holds for every trial's ranks.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import IO, Any

from unison import gpus as _gpus
from unison._validate import check_number
from unison.backends.base import Backend
from unison.backends.ray_actor import UnisonRayWorker, death_cause, short_error
from unison.errors import WorkerError
from unison.launch import LaunchSpec
from unison.trialfiles import MAX_SHIP_LIMIT_BYTES, SHIP_LIMIT_BYTES
from unison.worker.checkpoint_ship import CHECKPOINT_LIMIT_MB

MAX_EARLY_DEATHS = 3  # actors of one slot in a row that end before they say hello: the search is aborted
STOP_WAIT_S = 5.0  # stop(): how long the actors may take to return after the driver said shut down
DEAD_WAIT_S = 10.0  # ... and how long stop() waits for Ray to report every killed actor dead
_WILDCARDS = ("", "0.0.0.0", "::")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_NAME = re.compile(r"ray-(\d+)(?:\.(\d+))?$")


@dataclass
class _Slot:
    slot: int
    generation: int
    actor: Any
    ref: Any
    started: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"ray-{self.slot}" if self.generation == 0 else f"ray-{self.slot}.{self.generation}"


class Ray(Backend):
    """Trials on a Ray cluster: one long-lived Ray actor per slot, pulling trials from the driver.

    Args:
        address: the cluster to connect to when Ray is not initialized yet (``"auto"``,
            ``"ray://host:10001"``); default: the Ray this process already initialized, else
            ``ray.init()``, which starts a local Ray unless it finds a running one.
        slots: how many trials run at once. Default: the cluster's CPUs ÷ ``num_cpus_per_slot`` (and
            GPUs ÷ ``num_gpus_per_slot`` where that is set), capped by the number of trials.
        num_cpus_per_slot, num_gpus_per_slot: the resources each slot's actor reserves (Ray sets
            ``CUDA_VISIBLE_DEVICES`` for the GPUs).
        runtime_env: each actor's Ray runtime environment (``{"pip": [...]}``, ``{"env_vars": ...}``).
            The nodes need the driver's Python and unison, installed or through this.
        listen_host: the interface the driver listens on for its workers. Default: 127.0.0.1 when every
            Ray node is this machine, else this machine's Ray node address.
        listen_port: the driver's port for its workers (default: any free port).
        heartbeat_interval, heartbeat_timeout: as for ``unison.Local``; a silent actor whose method
            still runs keeps its trial.
        max_trial_files_bytes: how much of a trial's files an actor ships back to the driver's
            experiment directory (default 8 MiB; at most 48 MiB). See :mod:`unison.trialfiles`.
        executor_wait_s: how long to wait for the cluster to hold the slots (or one trial's ranks)
            and for the placement groups of distributed trials, before failing saying what exists.
        checkpoint_limit_mb: what one trial's streamed checkpoints may hold on the driver's disk.
        placement_strategy: how the bundles of a distributed run, or of each trial of a search with
            ``workers_per_trial``, are placed (``"PACK"``, ``"SPREAD"``, ``"STRICT_PACK"``,
            ``"STRICT_SPREAD"``).
        keep_actors: keep the slots' actors alive when an experiment ends well, for the next
            experiment run with this backend (no actor start-up, ~1-3 s, then); they hold their CPUs
            meanwhile, until :meth:`close` (or ``with unison.Ray(keep_actors=True) as backend:``),
            ``ray.shutdown()`` or this process's end. An experiment that fails or is interrupted once
            its workers started kills them all the same (one that fails before, e.g. on its
            arguments, leaves the kept ones for ``close``); a distributed run or a search of k-rank
            trials starts its own. Kept actors keep what their trials imported: a changed module of
            yours is not imported again.
    """

    name = "ray"
    shared_filesystem = False

    def __init__(
        self,
        address: str | None = None,
        slots: int | None = None,
        num_cpus_per_slot: float = 1,
        num_gpus_per_slot: float = 0,
        runtime_env: dict[str, Any] | None = None,
        listen_host: str | None = None,
        listen_port: int = 0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float | None = None,
        max_trial_files_bytes: int = SHIP_LIMIT_BYTES,
        executor_wait_s: float = 60.0,
        checkpoint_limit_mb: float = CHECKPOINT_LIMIT_MB,
        placement_strategy: str = "PACK",
        keep_actors: bool = False,
    ) -> None:
        self.address = address
        self.requested_slots = check_number(slots, "slots", owner="Ray", integer=True, low=1, allow_none=True)
        self.num_cpus_per_slot = check_number(num_cpus_per_slot, "num_cpus_per_slot", owner="Ray", low=0)
        self.num_gpus_per_slot = check_number(num_gpus_per_slot, "num_gpus_per_slot", owner="Ray", low=0)
        self._gpus_asked = self.num_gpus_per_slot  # num_gpus_per_slot as given; use_gpus may set another
        if not (self.num_cpus_per_slot or self.num_gpus_per_slot):
            raise ValueError("Ray(num_cpus_per_slot=0, num_gpus_per_slot=0): a slot must reserve something")
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise TypeError(f"Ray(runtime_env=...) must be a dict, got {runtime_env!r}")
        self.runtime_env = runtime_env
        if placement_strategy not in _STRATEGIES:
            raise ValueError(f"Ray(placement_strategy=...) must be one of {', '.join(_STRATEGIES)}, "
                             f"got {placement_strategy!r}")
        self.placement_strategy = placement_strategy
        if not isinstance(keep_actors, bool):
            raise TypeError(f"Ray(keep_actors=...) must be True or False, got {keep_actors!r}")
        self.keep_actors = keep_actors
        self._idle: list[Any] = []  # actors kept from the last experiment (keep_actors)
        self._idle_job: Any = None  # the Ray job they belong to: another ray.init() ended them
        self._listen_host = listen_host
        self.listen_port = check_number(listen_port, "listen_port", owner="Ray", integer=True, low=0,
                                        high=65535)
        self.heartbeat_interval = float(check_number(heartbeat_interval, "heartbeat_interval", owner="Ray",
                                                     low=0, low_inclusive=False, unit="seconds"))
        timeout = check_number(heartbeat_timeout, "heartbeat_timeout", owner="Ray", low=0,
                               low_inclusive=False, allow_none=True, unit="seconds")
        self.heartbeat_timeout = float(timeout) if timeout is not None else 10 * self.heartbeat_interval
        if not self.heartbeat_timeout > self.heartbeat_interval:
            raise ValueError(f"Ray(heartbeat_timeout=...) must exceed heartbeat_interval, got {timeout!r}")
        self.max_trial_files_bytes = check_number(max_trial_files_bytes, "max_trial_files_bytes", owner="Ray",
                                                  integer=True, low=0, high=MAX_SHIP_LIMIT_BYTES,
                                                  unit="bytes")
        self.executor_wait_s = float(check_number(executor_wait_s, "executor_wait_s", owner="Ray", low=0,
                                                  unit="seconds"))
        self.checkpoint_limit_mb = check_number(checkpoint_limit_mb, "checkpoint_limit_mb", owner="Ray",
                                                low=0, low_inclusive=False, unit="MiB")
        self._slots: dict[int, _Slot] = {}
        self._early: dict[int, int] = {}
        self._connected: set[str] = set()  # workers that said hello: they started fine
        self._aborted: set[str] = set()  # workers the driver ended on purpose
        self._exits: dict[str, str] = {}  # how each ended worker ended, by name
        self._stopping = False
        self._log: IO[str] | None = None
        self._payload: Any = None
        self._groups: list[Any] = []  # placement groups: one of a distributed run, one per gang of a search
        self._ranks = 1  # ranks per trial (gang_slots(k) says k)
        self._group_size = 1  # the bundles of each placement group
        self._token = ""

    # ------------------------------------------------------------------ the cluster
    def _ray(self) -> Any:
        """The ray module, initialized: the user's Ray, else ``ray.init(address)``."""
        try:
            import ray
        except ImportError as exc:
            raise ImportError("backend='ray' needs ray: pip install 'unison[ray]'") from exc
        if not ray.is_initialized():
            ray.init(address=self.address)
        return ray

    def _resources(self) -> tuple[float, float]:
        """The cluster's CPUs and GPUs."""
        total = self._ray().cluster_resources()
        return float(total.get("CPU", 0)), float(total.get("GPU", 0))

    def _fit(self, cpus: float, gpus: float) -> int:
        """How many slots ``cpus`` and ``gpus`` hold."""
        counts = []  # (1.0 // 0.2 is 4.0 in floats: divide, then floor with a little slack)
        if self.num_cpus_per_slot:
            counts.append(int(cpus / self.num_cpus_per_slot + 1e-9))
        if self.num_gpus_per_slot:
            counts.append(int(gpus / self.num_gpus_per_slot + 1e-9))
        return min(counts)

    def use_gpus(self, request: _gpus.GpuRequest) -> None:
        """Each slot's actor reserves ``request.per_worker`` GPUs for this experiment (Ray sets its
        ``CUDA_VISIBLE_DEVICES``; a fraction shares a GPU between actors), and the slots count them;
        ``0`` goes back to ``num_gpus_per_slot`` as given. Raise if that was set to another amount."""
        gpus = request.per_worker or self._gpus_asked
        if request.per_worker and self._gpus_asked and abs(self._gpus_asked - request.per_worker) > 1e-9:
            raise ValueError(f"{request.what} asks for {request.per_worker:g} GPU(s) per Ray actor, but "
                             f"Ray(num_gpus_per_slot={self._gpus_asked:g}) reserves another amount: leave "
                             f"num_gpus_per_slot unset (the context's {request.knob} sets it) or make "
                             f"the two agree")
        if gpus != self.num_gpus_per_slot:
            self.close()  # actors kept from the last experiment hold its GPUs, not these
            self.num_gpus_per_slot = gpus
        if request.per_worker:  # before anything is written: the cluster must hold one trial's GPUs
            self._wait_for(request.ranks, f"{request.what} needs {request.ranks} Ray slot(s) of")

    def slots(self) -> int:
        """``slots``, else as many as the cluster holds; waits up to ``executor_wait_s`` until it
        holds one (an autoscaling cluster may start with no worker node), else fails saying what
        exists."""
        self._ranks = 1
        n = self._wait_for(1, "a Ray slot needs")
        return int(self.requested_slots) if self.requested_slots is not None else n

    def gang_slots(self, k: int) -> int:
        """Slots for trials of ``k`` ranks: waits up to ``executor_wait_s`` for the cluster to hold
        ``k`` (an autoscaling cluster grows), else fails saying what exists and what is needed."""
        self._ranks = k
        n = self._wait_for(k, f"a trial of {k} ranks needs {k} Ray slots of")
        return int(self.requested_slots) if self.requested_slots is not None else n

    def _wait_for(self, k: int, needs: str) -> int:
        """How many slots the cluster holds, once it holds ``k`` (within ``executor_wait_s``); else a
        WorkerError starting with ``needs``. A slot that can never be scheduled would hang the
        experiment: its actor waits for resources for good."""
        deadline = time.monotonic() + self.executor_wait_s
        while (n := self._fit(*self._resources())) < k and time.monotonic() < deadline:
            time.sleep(0.5)
        if n < k:
            cpus, gpus = self._resources()
            raise WorkerError(
                f"{needs} {self._per_slot()} each ({k * self.num_cpus_per_slot:g} CPUs, "
                f"{k * self.num_gpus_per_slot:g} GPUs), but the cluster has {cpus:g} CPUs and {gpus:g} GPUs "
                f"(waited executor_wait_s={self.executor_wait_s:g} s): add nodes, or ask for less per slot "
                f"(num_cpus_per_slot, num_gpus_per_slot, gpus_per_trial)")
        return n

    def _per_slot(self) -> str:
        return f"{self.num_cpus_per_slot:g} CPU" + (f" + {self.num_gpus_per_slot:g} GPU"
                                                   if self.num_gpus_per_slot else "")

    @property
    def listen_host(self) -> str:
        """Where the driver listens: 127.0.0.1 when every Ray node is this machine."""
        if self._listen_host is not None:
            return self._listen_host
        ray = self._ray()
        here = ray.util.get_node_ip_address()
        nodes = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
        return "127.0.0.1" if nodes <= {here, *_LOOPBACK} else str(here)

    @listen_host.setter
    def listen_host(self, value: str | None) -> None:
        self._listen_host = value

    def _connect_host(self, bound: str) -> str:
        """The address actors connect to, given the one the driver bound."""
        return str(self._ray().util.get_node_ip_address()) if bound in _WILDCARDS else bound

    # ------------------------------------------------------------------ the workers
    def start(self, spec: LaunchSpec) -> None:
        ray = self._ray()
        self._address = (self._connect_host(spec.address[0]), spec.address[1])
        self._secret = spec.secret
        self._token = secrets.token_hex(4)
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = spec.log_dir / "ray.log"
        self._log = open(self._log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._stopping = False
        for known in (self._early, self._connected, self._aborted, self._exits):
            known.clear()  # a backend instance may serve one search after another
        self._actor_class = ray.remote(UnisonRayWorker)
        # One copy in Ray's object store, fetched by each actor's node: never over the driver's socket.
        self._payload = ray.put(spec.payload_path.read_bytes())
        self._note(f"Ray {ray.__version__}, {spec.workers} slot(s) of {self._per_slot()}"
                   f"{' in one placement group' if spec.barrier else ''}, workers connect to "
                   f"{self._address[0]}:{self._address[1]}, actors unison-{self._token}-ray-*")
        self._group_size = spec.workers if spec.barrier else self._ranks
        placed = spec.barrier or self._ranks > 1
        reuse = self._take_idle(0 if placed else spec.workers)  # before the groups: they may want those CPUs
        if spec.barrier:
            self._placement_groups(1, spec.workers, f"the {spec.workers} ranks of this distributed run")
        elif self._ranks > 1:
            at_once = spec.workers // self._ranks
            self._placement_groups(at_once, self._ranks, f"{at_once} trial(s) of {self._ranks} ranks at once")
        for slot in range(spec.workers):
            self._launch(slot, 0, reuse[slot] if slot < len(reuse) else None)

    def _placement_groups(self, groups: int, n: int, what: str) -> None:
        """Make ``groups`` placement groups of ``n`` bundles each (the backend's groups, which
        :meth:`stop` removes) and wait up to ``executor_wait_s`` until all are ready, else raise a
        WorkerError saying what ``what`` needs and what the cluster has."""
        ray = self._ray()
        from ray.util.placement_group import placement_group

        bundle = {key: amount for key, amount in (("CPU", self.num_cpus_per_slot),
                                                  ("GPU", self.num_gpus_per_slot)) if amount}
        for index in range(groups):
            self._groups.append(placement_group([bundle] * n, strategy=self.placement_strategy,
                                                name=f"unison-{self._token}-{index}"))
        ready, _ = ray.wait([group.ready() for group in self._groups], num_returns=groups,
                            timeout=self.executor_wait_s)
        if len(ready) < groups:
            cpus, gpus = self._resources()
            raise WorkerError(
                f"{what} need {groups} Ray placement group(s) of {n} bundles of "
                f"{self._per_slot()} ({self.placement_strategy}), which the cluster ({cpus:g} CPUs, "
                f"{gpus:g} GPUs) did not grant within executor_wait_s={self.executor_wait_s:g} s")
        for group in self._groups:
            self._note(f"placement group {group.id.hex()} ready: {n} bundles, {self.placement_strategy}")

    def _take_idle(self, n: int) -> list[Any]:
        """Up to ``n`` kept actors of this Ray, to serve again; the others are killed (their CPUs may be
        wanted by a placement group)."""
        idle, self._idle = self._idle, []
        if idle and self._idle_job != self._ray().get_runtime_context().get_job_id():
            return []  # Ray was shut down and initialized again: those actors are gone
        keep, extra = idle[:n], idle[n:]
        for actor in extra:
            self._kill_actor(actor, "kept actor")
        if keep:
            self._note(f"{len(keep)} kept actor(s) serve this experiment")
        return keep

    def _launch(self, slot: int, generation: int, actor: Any = None) -> None:
        options: dict[str, Any] = {"num_cpus": self.num_cpus_per_slot, "num_gpus": self.num_gpus_per_slot,
                                   "max_restarts": 0, "name": None}
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        if self._groups:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._groups[slot // self._group_size], placement_group_bundle_index=slot % self._group_size)
        record = _Slot(slot, generation, actor, None)
        options["name"] = f"unison-{self._token}-{record.name}"
        if record.actor is None:
            record.actor = self._actor_class.options(**options).remote()
        record.ref = record.actor.serve.remote(self._address, self._secret, self._payload, record.name,
                                               self.heartbeat_interval, self.max_trial_files_bytes)
        self._slots[slot] = record

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            self._log.flush()

    def _done(self, record: _Slot, wait_s: float = 0.0) -> bool:
        ready, _ = self._ray().wait([record.ref], timeout=wait_s)
        return bool(ready)

    def _outcome(self, record: _Slot) -> tuple[dict[str, Any] | None, str | None]:
        """What a finished actor call returned, or why it failed."""
        try:
            return self._ray().get(record.ref), None
        except Exception as exc:  # noqa: BLE001 - the actor died, or serve() raised in it
            return None, short_error(exc)

    def poll(self) -> None:
        """Start a new actor in the slot of each one that ended while the experiment goes on."""
        if self._stopping:
            return
        for slot, record in list(self._slots.items()):
            if not self._done(record):
                continue
            info, error = self._outcome(record)
            error = error or (info or {}).get("error")
            self._note(f"{record.name} ended after {time.monotonic() - record.started:.1f} s: "
                       + (f"failed: {error}" if error else f"{info}"))
            self._exits.setdefault(record.name, f"killed ({death_cause(error)})" if error else "exit code 0")
            self._kill(record)
            started = record.name in self._connected or record.name in self._aborted
            unreachable = bool((info or {}).get("error"))  # the driver is listening: a real problem
            if unreachable or (error and not started):
                self._early[slot] = self._early.get(slot, 0) + 1
                if self._early[slot] >= MAX_EARLY_DEATHS:
                    raise WorkerError(self._explain(error or ""))
            self._launch(slot, record.generation + 1)

    def _explain(self, error: str) -> str:
        if "onnection" in error or "timed out" in error:
            return (f"Ray actors could not connect to the driver at {self._address[0]}:{self._address[1]} "
                    f"({error}). The nodes must reach that address: set unison.Ray(listen_host=...) to one "
                    f"they can route to and open the port (listen_port=... fixes it). Details in "
                    f"{self._log_path}")
        return (f"Ray actors that run unison workers keep failing before they connect to the driver. Is "
                f"unison installed on the nodes, in the driver's version, for their Python (or given "
                f"through runtime_env)? The last error:\n{error}")

    def _kill(self, record: _Slot) -> None:
        self._kill_actor(record.actor, record.name)

    def _kill_actor(self, actor: Any, name: str) -> None:
        try:
            self._ray().kill(actor, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already gone, or Ray is shutting down
            self._note(f"ray.kill({name}) failed: {short_error(exc)}")

    def _own(self, info: dict[str, Any]) -> _Slot | None:
        """The running slot actor ``info`` (a hello) describes, if it is one of ours."""
        match = _NAME.match(str(info.get("worker", "")))
        record = self._slots.get(int(match.group(1))) if match else None
        return record if record is not None and record.name == info.get("worker") else None

    def gang_group(self, info: dict[str, Any]) -> int | None:
        """The placement group of the worker ``info`` (its hello) describes, in a gang search."""
        record = self._own(info)
        if record is None or self._ranks == 1 or len(self._groups) < 2:
            return None
        return record.slot // self._group_size

    def worker_connected(self, info: dict[str, Any]) -> None:
        record = self._own(info)
        if record is not None:
            self._connected.add(record.name)
            self._early[record.slot] = 0

    def worker_aborted(self, info: dict[str, Any]) -> None:
        self._aborted.add(str(info.get("worker")))

    def worker_alive(self, info: dict[str, Any]) -> bool | None:
        record = self._own(info)
        if record is None:
            return False if str(info.get("worker")) in self._exits else None
        return not self._done(record)

    def worker_exit(self, info: dict[str, Any], wait_s: float = 0.0) -> str | None:
        record = self._own(info)
        if record is None:
            return self._exits.get(str(info.get("worker")))
        if not self._done(record, wait_s):
            return None
        info_back, error = self._outcome(record)
        how = f"killed ({death_cause(error)})" if error else "exit code 0"
        self._exits[record.name] = how
        return how

    def kill_worker(self, info: dict[str, Any]) -> bool:
        """``ray.kill`` the worker's actor now; the next :meth:`poll` starts one in its place."""
        record = self._own(info)
        if record is None:
            return False
        self._aborted.add(record.name)
        self._kill(record)
        return True

    def stop(self, force: bool = False) -> None:
        """Return once every actor is dead and the placement group removed.

        The driver has told the workers to shut down or hung up on them, so each actor's call returns
        within moments (a trial the driver hung up on is interrupted); ``force`` does not wait for that.
        Then every actor is ``ray.kill``-ed, and this waits until Ray reports each one dead; with
        ``keep_actors``, those whose call returned well are kept instead, unless ``force``.
        """
        self._stopping = True
        records = list(self._slots.values())
        try:
            if records and self._ray_up():
                self._end_actors(records, force)
        except BaseException:  # a second Ctrl-C while waiting: still kill everything, without waiting
            for record in records:
                self._kill(record)
            self.close(wait=False)
            raise
        finally:
            self._remove_groups()
            self._slots.clear()
            self._payload = None
            self._note("stopped" + (" (forced)" if force else ""))
            if self._log is not None:
                self._log.close()
                self._log = None

    def _end_actors(self, records: list[_Slot], force: bool) -> None:
        """Let the actors' calls return (unless ``force``), then kill them, or keep those that ended
        well (``keep_actors``)."""
        ray = self._ray()
        if not force:
            ray.wait([r.ref for r in records], num_returns=len(records), timeout=STOP_WAIT_S)
        killed = []
        for record in records:
            if self._done(record):
                info, error = self._outcome(record)
                self._note(f"{record.name}: {info if info else f'failed: {error}'}")
                if self.keep_actors and not force and not self._groups and info and not info["error"]:
                    self._idle.append(record.actor)
                    self._idle_job = ray.get_runtime_context().get_job_id()
                    continue
            else:
                self._note(f"{record.name}: still running at stop: killed")
            self._kill(record)
            killed.append(record)
        self._wait_dead(killed)
        if force:
            self.close()

    def close(self, wait: bool = True) -> None:
        """Kill the actors kept for the next experiment (``keep_actors``) and, unless ``wait`` is
        false, wait until Ray reports them dead; the backend stays usable."""
        idle, self._idle = self._idle, []
        if not idle or not self._ray_up() or self._idle_job != self._ray().get_runtime_context().get_job_id():
            return
        records = [_Slot(-1, 0, actor, None) for actor in idle]
        for record in records:
            self._kill_actor(record.actor, "kept actor")
        if wait:
            self._wait_dead(records)

    def __enter__(self) -> Ray:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ray_up(self) -> bool:
        try:
            import ray
        except ImportError:
            return False
        return bool(ray.is_initialized())

    def _wait_dead(self, records: list[_Slot]) -> None:
        """Wait until Ray reports every killed actor dead: a call on each fails (a call that succeeds
        ran before the kill landed, and is made again)."""
        ray = self._ray()
        deadline = time.monotonic() + DEAD_WAIT_S
        alive = list(records)
        while alive and time.monotonic() < deadline:
            pings = {record.actor.__ray_ready__.remote(): record for record in alive}
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=left)
            alive = []
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - dead, as it should be
                    continue
                alive.append(pings[ref])
            alive += [pings[ref] for ref in pings if ref not in ready]
            if alive:
                time.sleep(0.05)
        if alive:
            names = ", ".join(record.name for record in alive)
            self._note(f"{names}: not reported dead {DEAD_WAIT_S:g} s after ray.kill")

    def _remove_groups(self) -> None:
        groups, self._groups = self._groups, []
        if not groups or not self._ray_up():
            return
        from ray.util.placement_group import remove_placement_group

        for group in groups:
            try:
                remove_placement_group(group)
            except Exception as exc:  # noqa: BLE001 - already removed, or Ray is shutting down
                self._note(f"removing placement group {group.id.hex()} failed: {short_error(exc)}")

    def __repr__(self) -> str:
        slots = "" if self.requested_slots is None else f", slots={self.requested_slots}"
        return f"Ray(address={self.address!r}{slots})"
