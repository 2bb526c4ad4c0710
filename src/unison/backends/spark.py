"""The Spark backend: one long-lived Spark task per slot, each running the worker runtime.

Every slot is a one-task Spark job whose task runs :func:`unison.worker.serve.serve`, the same loop as a
local worker process: it connects back to the driver over the authenticated protocol and pulls
trials until the driver says shut down. The driver decides what runs, so a task that Spark
relaunches (a retry, a lost executor) is simply a new worker and never re-runs a finished trial; a
trial whose worker died is retried by the driver on another slot. The training function (the
payload) travels in the task closure when it is small (up to 1 MiB), else once per executor as a
Spark broadcast; the experiment secret travels in the task closure; neither crosses the driver's
socket. pyspark is imported only when a Spark backend is used.

A distributed run (``unison.Distributed``) is one barrier stage instead: its ``workers`` tasks are
scheduled together or not at all (Spark's gang scheduling), each running the same worker loop; the
driver makes them the ranks of its one trial. A search with ``workers_per_trial=k`` keeps the
per-slot jobs and the driver groups k idle slots into each trial (see the README).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import IO, Any

from unison import gpus as _gpus
from unison._validate import check_number
from unison.backends.base import Backend
from unison.errors import WorkerError
from unison.launch import LaunchSpec
from unison.trialfiles import MAX_SHIP_LIMIT_BYTES, SHIP_LIMIT_BYTES
from unison.worker.checkpoint_ship import CHECKPOINT_LIMIT_MB

EARLY_DEATH_S = 10.0  # a slot job that ends this soon after its launch did not get to work
MAX_EARLY_DEATHS = 3  # ... this many times in a row on one slot: the search is aborted
STOP_CANCEL_S = 1.0  # stop(): slot tasks still running this long after the driver hung up are cancelled
STOP_WAIT_S = 10.0  # ... and stop() waits this long in all for Spark to report every slot task ended
INLINE_PAYLOAD_BYTES = 1 << 20  # a payload up to this size travels in the task closure, not a broadcast
_WILDCARDS = ("", "0.0.0.0", "::")
_LOCAL_MASTER = re.compile(r"local(?:\[(\*|\d+)(?:,\s*\d+)?\])?$")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[\s*(\d+)\s*,\s*(\d+)\s*,\s*\d+\s*\]$")
TASK_GPUS = "spark.task.resource.gpu.amount"
EXECUTOR_GPUS = "spark.executor.resource.gpu.amount"
_GPU_CONF = (f"{EXECUTOR_GPUS} (GPUs per executor), {TASK_GPUS} (GPUs per task: 1, or 0.5 for two tasks per "
             f"GPU) and a discovery script that lists each executor's GPUs "
             f"(spark.executor.resource.gpu.discoveryScript, or spark.worker.resource.gpu.amount and "
             f"spark.worker.resource.gpu.discoveryScript on a standalone cluster)")


def _tasks_per_executor(conf: Any, cores: int) -> int:
    """How many tasks one executor of ``cores`` cores runs at once: cores ÷ ``spark.task.cpus``, or
    fewer where its GPUs ÷ ``spark.task.resource.gpu.amount`` are."""
    tasks = cores // int(conf.get("spark.task.cpus", "1"))
    per_task = float(conf.get(TASK_GPUS, "0"))
    if per_task > 0:
        gpus = float(conf.get(EXECUTOR_GPUS, "0"))
        tasks = min(tasks, int(gpus / per_task + 1e-9))
    return tasks


def _task_gpu_environment(task: Any) -> None:
    """Give this Python worker the GPUs Spark assigned the task (``TaskContext.resources()["gpu"]``, set
    when ``spark.task.resource.gpu.amount`` is): ``CUDA_VISIBLE_DEVICES`` and ``UNISON_GPUS`` name them;
    without any, a reused Python worker forgets an earlier task's ``UNISON_GPUS``."""
    resource = (task.resources() if task is not None else {}).get("gpu")
    addresses = _gpus.visible_ids(",".join(resource.addresses)) if resource is not None else []
    if addresses:
        os.environ.update(_gpus.worker_environment(addresses))
    else:
        os.environ.pop(_gpus.GPUS_VAR, None)


def _serve_slot(address: tuple[str, int], secret: bytes, payload: Any, slot: int | None, generation: int,
                heartbeat_interval: float, shared_filesystem: bool, ship_limit: int, partition: Any) -> Any:
    """The body of a slot's Spark task (runs on an executor): serve trials, then report how it went.

    It returns normally when the driver says shut down, hangs up or cannot be reached, so that Spark
    never retries it; an exception here is a broken executor, which Spark retries as usual.
    ``slot=None``: a task of a barrier stage, named after its partition. ``payload``: the bytes, or
    a broadcast of them.
    """
    from pyspark import TaskContext

    from unison.worker.serve import serve

    task = TaskContext.get()
    # The partition is left unread, so PySpark does not reuse this Python worker for a later task
    # (SPARK-26549): reusing it (0.3 s sooner to a search's first trial on a warm session) let a trial
    # interrupted by the driver's hang-up run on in CI, and a reused process keeps its first CUDA device.
    del partition
    _task_gpu_environment(task)
    if slot is None:
        slot = task.partitionId() if task is not None else 0
    attempt = task.attemptNumber() if task is not None else 0
    name = f"spark-{slot}" if (generation, attempt) == (0, 0) else f"spark-{slot}.{generation}.{attempt}"
    info: dict[str, Any] = {"slot": slot, "worker": name, "host": socket.gethostname(), "pid": os.getpid(),
                            "trials": 0, "error": None}
    try:
        data = payload if isinstance(payload, bytes) else payload.value
        info["trials"] = serve(address, secret, data, name, heartbeat_interval,
                               shared_filesystem=shared_filesystem, ship_limit=ship_limit,
                               exit_when_driver_gone=False)
    except (ConnectionError, OSError) as exc:  # the driver is unreachable, or already gone
        info["error"] = f"{type(exc).__name__}: {exc}"
    yield info


@dataclass
class _SlotJob:
    slot: int
    generation: int
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)
    info: dict[str, Any] | None = None
    error: str | None = None


def _spark_error(exc: BaseException) -> str:
    """The useful part of an error from a Spark job: the Python traceback from the executor."""
    text = str(exc)
    at = text.find("PythonException")
    if at >= 0:
        text = text[at:]
    return text[:4000]


class Spark(Backend):
    """Trials on a Spark cluster: one long-lived Spark task per slot, pulling trials from the driver.

    Args:
        spark: the ``SparkSession`` (or ``SparkContext``) to use. Default: the active session, or
            one built from the usual Spark configuration (``spark-submit``, ``spark-defaults.conf``).
        slots: how many trials run at once. Default: what the cluster offers (executors × cores ÷
            ``spark.task.cpus``; ``N`` for ``local[N]``), capped by the number of trials. Set it
            with dynamic allocation, where the executors come only once tasks wait.
        listen_host: the interface the driver listens on for its workers. Default: 127.0.0.1 on a
            ``local*`` master; else ``spark.driver.bindAddress`` or ``spark.driver.host``. Workers
            connect to this address, or to ``spark.driver.host`` when it is a wildcard (0.0.0.0).
        listen_port: the driver's port for its workers (default: any free port); fix it where a
            firewall or a Kubernetes service must let executors reach the driver.
        heartbeat_interval: seconds between a worker's heartbeats.
        heartbeat_timeout: a worker silent this long loses its trial, which is retried elsewhere.
            Default: 10 heartbeat intervals.
        max_trial_files_bytes: how much of a trial's files (logs, then files written into
            ``ctx.trial_dir``, smallest first) an executor ships back to the driver's experiment
            directory (default 8 MiB; at most 48 MiB). See :mod:`unison.trialfiles`. Checkpoints do
            not count: each is streamed to the driver as it is saved.
        executor_wait_s: how long to wait for executors to register before counting slots.
        checkpoint_limit_mb: what one trial's checkpoints (``reporter.report(checkpoint=...)``) may
            hold on the driver's disk at once, the one arriving included (default 4096 MiB). An
            executor streams each checkpoint it saves to the driver in chunks, which keeps the
            trial's last ``keep_checkpoints`` plus its best; a checkpoint that would go past this
            fails its trial, with a message saying so. Raise it, keep fewer, or let the executors
            write checkpoints to storage they share (``checkpoint_storage=``).
    """

    name = "spark"
    shared_filesystem = False

    def __init__(
        self,
        spark: Any = None,
        slots: int | None = None,
        listen_host: str | None = None,
        listen_port: int = 0,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float | None = None,
        max_trial_files_bytes: int = SHIP_LIMIT_BYTES,
        executor_wait_s: float = 60.0,
        checkpoint_limit_mb: float = CHECKPOINT_LIMIT_MB,
    ) -> None:
        slots = check_number(slots, "slots", owner="Spark", integer=True, low=1, allow_none=True)
        heartbeat_interval = check_number(heartbeat_interval, "heartbeat_interval", owner="Spark", low=0,
                                          low_inclusive=False, unit="seconds")
        heartbeat_timeout = check_number(heartbeat_timeout, "heartbeat_timeout", owner="Spark", low=0,
                                         low_inclusive=False, allow_none=True, unit="seconds")
        if heartbeat_timeout is not None and not heartbeat_timeout > heartbeat_interval:
            raise ValueError(f"Spark(heartbeat_timeout=...) must exceed heartbeat_interval, got "
                             f"{heartbeat_timeout!r}")
        listen_port = check_number(listen_port, "listen_port", owner="Spark", integer=True, low=0, high=65535)
        max_trial_files_bytes = check_number(max_trial_files_bytes, "max_trial_files_bytes", owner="Spark",
                                             integer=True, low=0, high=MAX_SHIP_LIMIT_BYTES, unit="bytes")
        self._spark = spark
        self.requested_slots = slots
        self._listen_host = listen_host
        self.listen_port = listen_port
        self.heartbeat_interval = float(heartbeat_interval)
        self.heartbeat_timeout = (
            float(heartbeat_timeout) if heartbeat_timeout is not None else 10 * self.heartbeat_interval
        )
        self.max_trial_files_bytes = max_trial_files_bytes
        self.executor_wait_s = float(executor_wait_s)
        self.checkpoint_limit_mb = check_number(checkpoint_limit_mb, "checkpoint_limit_mb", owner="Spark",
                                                low=0, low_inclusive=False, unit="MiB")
        self._sc: Any = None
        self._jobs: dict[int, _SlotJob] = {}
        self._early: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._log: IO[str] | None = None
        self._payload: Any = None
        self.job_group: str | None = None
        self._barrier_tasks = 0  # > 0: the workers are one barrier stage of that many tasks
        self._aborted: set[int] = set()
        self._connected: set[tuple[int, int]] = set()  # (slot or rank, generation) of workers that said hello

    # ------------------------------------------------------------------ the cluster
    @property
    def spark_context(self) -> Any:
        """The ``SparkContext`` this backend runs on (found or created on first use)."""
        if self._sc is None:
            self._sc = self._find_context()
        return self._sc

    def _find_context(self) -> Any:
        try:
            from pyspark import SparkContext
            from pyspark.sql import SparkSession
        except ImportError as exc:
            raise ImportError("backend='spark' needs pyspark: pip install 'unison[spark]'") from exc
        spark = self._spark
        if spark is None:
            active = SparkContext._active_spark_context
            if active is not None and getattr(active, "_jsc", None) is not None:
                return active
            spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
        if isinstance(spark, SparkContext):
            return spark
        if type(spark).__module__.startswith("pyspark.sql.connect"):
            raise ValueError(
                "Spark(spark=...) got a Spark Connect session; unison starts its workers as Spark tasks "
                "through the RDD API, which needs a classic SparkSession (spark-submit, pyspark, or "
                "SparkSession.builder.master(...)) on the driver"
            )
        sc = getattr(spark, "sparkContext", None)
        if sc is None:
            raise TypeError(f"Spark(spark=...) must be a SparkSession or SparkContext, got {spark!r}")
        return sc

    @property
    def master(self) -> str:
        return str(self.spark_context.master)

    def _is_local(self) -> bool:
        return self.master.startswith("local")

    def _concurrent_tasks(self) -> int:
        """How many tasks the cluster runs at once now: executors × what one executor runs at once,
        which is cores ÷ spark.task.cpus, or fewer where its GPUs ÷ spark.task.resource.gpu.amount are
        (Spark's scheduler counts both; so does its default resource profile, asked first)."""
        sc = self.spark_context
        try:
            jsc = sc._jsc.sc()
            return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
        except Exception:  # noqa: BLE001 - a private JVM method: fall back to the configuration
            pass
        conf = sc.getConf()
        if m := _LOCAL_MASTER.match(self.master):
            threads = m.group(1)
            cores = 1 if threads is None else (os.cpu_count() or 1) if threads == "*" else int(threads)
            return cores // int(conf.get("spark.task.cpus", "1"))
        if m := _LOCAL_CLUSTER.match(self.master):
            return int(m.group(1)) * _tasks_per_executor(conf, int(m.group(2)))
        executors = max(0, sc._jsc.sc().getExecutorMemoryStatus().size() - 1)  # minus the driver
        return executors * _tasks_per_executor(conf, int(conf.get("spark.executor.cores", "1")))

    def use_gpus(self, request: _gpus.GpuRequest) -> None:
        """Spark assigns GPUs itself, from the session's resource configuration: each task gets
        ``spark.task.resource.gpu.amount`` of its executor's GPUs, and its worker sees exactly those
        (``CUDA_VISIBLE_DEVICES``, ``ctx.gpus``). Raise, before anything starts, when the session's
        GPUs per task are not ``request.per_worker`` or its master cannot schedule GPUs."""
        if not request.per_worker:
            return
        conf = self.spark_context.getConf()
        if _LOCAL_MASTER.match(self.master):
            raise ValueError(
                f"{request.what}: Spark's {self.master} mode does not schedule GPUs (a task that asks "
                f"for one never starts): use a cluster (standalone, YARN, Kubernetes, or "
                f"local-cluster[N,cores,memory] on one machine) whose SparkSession sets {_GPU_CONF}")
        task = conf.get(TASK_GPUS)
        try:
            amount = float(task) if task is not None else None
        except ValueError:
            amount = None
        if amount is None or abs(amount - request.per_worker) > 1e-9:
            what = "does not set it" if task is None else f"sets {TASK_GPUS}={task}"
            raise ValueError(
                f"{request.what} needs {request.per_worker:g} GPU(s) per Spark task, but the SparkSession "
                f"on {self.master} {what}: Spark places the GPUs, so build the session with "
                f"{TASK_GPUS}={request.per_worker:g}, {_GPU_CONF}")

    def gang_slots(self, k: int) -> int:
        """The slots for trials of ``k`` ranks: waits up to ``executor_wait_s`` until ``k`` task slots
        exist (executors register over time) and fails saying how many there are if they do not."""
        if self.requested_slots is not None:
            return self.requested_slots
        deadline = time.monotonic() + self.executor_wait_s
        while (n := self._concurrent_tasks()) < k and time.monotonic() < deadline:
            time.sleep(0.25)
        if n < k:
            raise WorkerError(
                f"a distributed trial of {k} ranks needs {k} Spark task slots at once, but {self.master} "
                f"offers {n} (executors × cores ÷ spark.task.cpus) after waiting "
                f"{self.executor_wait_s:.0f} s for executors to register: add executors or cores, use "
                f"fewer workers, or raise unison.Spark(executor_wait_s=...)"
            )
        return n

    def slots(self) -> int:
        if self.requested_slots is not None:
            return self.requested_slots
        deadline = time.monotonic() + self.executor_wait_s
        while (n := self._concurrent_tasks()) < 1 and time.monotonic() < deadline:
            time.sleep(0.25)  # executors are still registering with the driver
        if n < 1:
            raise WorkerError(
                f"no Spark executors registered with {self.master} within {self.executor_wait_s:.0f} s "
                f"(or spark.task.cpus exceeds their cores): check the cluster, or pass "
                f"unison.Spark(slots=N) (with dynamic allocation executors come only once tasks wait)"
            )
        return n

    @property
    def listen_host(self) -> str:  # type: ignore[override]
        """The interface the driver binds for its workers."""
        if self._listen_host is not None:
            return self._listen_host
        if self._is_local():
            return "127.0.0.1"  # executors of local[N] and local-cluster run on this machine
        conf = self.spark_context.getConf()
        return conf.get("spark.driver.bindAddress") or conf.get("spark.driver.host") or socket.gethostname()

    def _connect_host(self, bound: str) -> str:
        """The address executors connect to, given the one the driver bound."""
        if bound not in _WILDCARDS:
            return bound
        return self.spark_context.getConf().get("spark.driver.host") or socket.getfqdn()

    # ------------------------------------------------------------------ the workers
    def start(self, spec: LaunchSpec) -> None:
        address, secret, payload_path, log_dir = spec.address, spec.secret, spec.payload_path, spec.log_dir
        workers, barrier = spec.workers, spec.barrier
        sc = self.spark_context
        self._address = (self._connect_host(address[0]), address[1])
        self._secret = secret
        experiment = spec.experiment
        self.job_group = f"unison-{experiment}-{secrets.token_hex(4)}"
        self._description = f"unison: {experiment}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = log_dir / "spark.log"
        self._log = open(self._log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._stopping = False
        self._early.clear()  # a backend instance may serve one search after another
        # Through Spark, never over the driver's socket: a small payload in the task closure (no
        # broadcast to set up, which costs a cold session ~0.2 s), a bigger one once per executor.
        data = payload_path.read_bytes()
        self._payload = data if len(data) <= INLINE_PAYLOAD_BYTES else sc.broadcast(data)
        self._barrier_tasks = workers if barrier else 0
        self._aborted.clear()
        self._connected.clear()
        self._note(f"master {sc.master}, {workers} slot(s){' in one barrier stage' if barrier else ''}, "
                   f"workers connect to {self._address[0]}:{self._address[1]}, job group {self.job_group}")
        for slot in range(1 if barrier else workers):
            self._launch(slot, 0)

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
            self._log.flush()

    def _launch(self, slot: int, generation: int) -> None:
        from pyspark import InheritableThread

        job = _SlotJob(slot, generation)
        # An InheritableThread keeps the caller's local properties (a scheduler pool, say).
        job.thread = InheritableThread(target=self._run_job, args=(job,), name=f"unison-spark-slot-{slot}",
                                       daemon=True)
        self._jobs[slot] = job
        job.thread.start()

    def _run_job(self, job: _SlotJob) -> None:
        sc = self.spark_context
        barrier = self._barrier_tasks
        task = functools.partial(_serve_slot, self._address, self._secret, self._payload,
                                 None if barrier else job.slot, job.generation, self.heartbeat_interval,
                                 self.shared_filesystem, self.max_trial_files_bytes)
        try:
            with self._lock:
                if self._stopping:
                    return
                what = f"{barrier} ranks (barrier stage)" if barrier else f"worker slot {job.slot}"
                sc.setJobGroup(self.job_group, f"{self._description}: {what}", interruptOnCancel=True)
            if barrier:
                infos = sc.parallelize(range(barrier), barrier).barrier().mapPartitions(task).collect()
            else:
                infos = sc.parallelize([job.slot], 1).mapPartitions(task).collect()
            job.info = next((i for i in infos if i.get("error")), infos[0]) if infos else None
        except BaseException as exc:  # noqa: BLE001 - reported by poll()
            job.error = _spark_error(exc) if not self._stopping else "cancelled"

    def poll(self) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        for slot, job in list(self._jobs.items()):
            assert job.thread is not None
            if job.thread.is_alive():
                if now - job.started > EARLY_DEATH_S:
                    self._early[slot] = 0
                continue
            error = job.error or (job.info or {}).get("error")
            self._note(f"slot {slot} job {job.generation} ended after {now - job.started:.1f} s: "
                       + (f"failed: {error}" if error else f"{job.info}"))
            unreachable = bool((job.info or {}).get("error"))  # the driver is listening: a real problem
            aborted = slot in self._aborted  # the driver ended its worker: expected, not a failed start
            self._aborted.discard(slot)
            if unreachable or (error and not aborted and now - job.started < EARLY_DEATH_S):
                self._early[slot] = self._early.get(slot, 0) + 1
                if self._early[slot] >= MAX_EARLY_DEATHS:
                    raise WorkerError(self._explain(error or ""))
            # The slot's worker is gone while the search goes on (its task failed more often than
            # Spark retries, or its connection was dropped): start a new one in its place.
            self._launch(slot, job.generation + 1)

    def worker_connected(self, info: dict[str, Any]) -> None:
        if m := re.match(r"spark-(\d+)(?:\.(\d+)\.\d+)?$", str(info.get("worker", ""))):
            self._connected.add((int(m.group(1)), int(m.group(2) or 0)))

    def _has_worker(self, job: _SlotJob) -> bool:
        """Whether a worker of this slot job said hello: then its task runs, and ends by itself."""
        if self._barrier_tasks:
            return any(generation == job.generation for _, generation in self._connected)
        return (job.slot, job.generation) in self._connected

    def worker_aborted(self, info: dict[str, Any]) -> None:
        if self._barrier_tasks:
            self._aborted.add(0)
        elif m := re.match(r"spark-(\d+)", str(info.get("worker", ""))):
            self._aborted.add(int(m.group(1)))

    def _explain(self, error: str) -> str:
        if "PythonException" not in error and ("onnection" in error or "timed out" in error):
            return (
                f"Spark tasks on {self.master} could not connect to the driver at "
                f"{self._address[0]}:{self._address[1]} ({error}). Executors must reach that address: set "
                f"unison.Spark(listen_host=...) or spark.driver.host to an address they can route to, and "
                f"open the port (unison.Spark(listen_port=...) fixes it). Details in {self._log_path}"
            )
        return (
            f"Spark tasks that run unison workers keep failing right after they start on {self.master}. "
            f"Is unison installed on the executors, in the same version as on the driver, for the Python "
            f"that PYSPARK_PYTHON names (the driver uses {sys.executable})? The last error:\n{error}"
        )

    def stop(self, force: bool = False) -> None:
        """Return once every slot's task has ended, so no trial code runs on after it.

        The driver has told the workers to shut down or hung up on them (it closes its server first),
        and a worker whose driver hangs up stops its trial at once (:func:`unison.worker.serve._read`), so
        each running slot task ends by itself within moments, and Spark sees a task that succeeded.
        What still runs :data:`STOP_CANCEL_S` later is cancelled: a task whose function ignored the
        interruption (Spark counts it killed, not failed, and retries nothing when its worker ends
        its own process soon after, or PySpark does after its task-kill timeout), and a slot job
        still waiting for an executor. Either way this waits until Spark reports every slot task
        ended, up to :data:`STOP_WAIT_S`, and says in ``spark.log`` what still ran then. A cancelled
        job ends on the driver at once (the status tracker shows no active job) while its task runs
        on: only the tasks tell.
        """
        sc = self._sc
        jobs = list(self._jobs.values())
        with self._lock:
            self._stopping = True
        if not jobs or sc is None:
            return
        start = time.monotonic()
        running = self._wait_for_slot_tasks(start + STOP_CANCEL_S)
        if running:
            self._note(f"{', '.join(running)}: still running {STOP_CANCEL_S:g} s after the driver hung up "
                       f"on the workers: cancelled")
            if any(job.thread is not None and job.thread.is_alive() for job in jobs):  # else: cancelled
                try:
                    sc.cancelJobGroup(self.job_group)
                except Exception:  # noqa: BLE001 - the context may be stopping too
                    self._note(f"cancelJobGroup failed: {traceback.format_exc()}")
            running = self._wait_for_slot_tasks(start + STOP_WAIT_S)
        if running:
            self._note(f"{', '.join(running)}: still running {STOP_WAIT_S:g} s after the driver hung up "
                       f"on the workers, though cancelled; their trial code may run on")
        deadline = time.monotonic() + 30.0
        while running or any(job.thread is not None and job.thread.is_alive() for job in jobs):
            try:  # cancels every slot job still pending or running
                sc.cancelJobGroup(self.job_group)
            except Exception:  # noqa: BLE001 - the context may be stopping too
                self._note(f"cancelJobGroup failed: {traceback.format_exc()}")
            for job in jobs:
                assert job.thread is not None
                job.thread.join(max(0.0, min(0.5, deadline - time.monotonic())))
            # Again, for a job that was being submitted while the group was cancelled.
            if not any(job.thread.is_alive() for job in jobs if job.thread is not None):
                break
            if time.monotonic() >= deadline:
                self._note("slot jobs still running 30 s after they were cancelled")
                break
        self._wait_until_no_job_runs(deadline)
        try:
            if not isinstance(self._payload, bytes):
                self._payload.destroy(blocking=False)
        except Exception:  # noqa: BLE001
            pass
        for job in jobs:
            self._note(f"slot {job.slot} job {job.generation}: "
                       + (f"{job.info}" if job.info else f"failed: {job.error}"))
        self._note("stopped" + (" (cancelled)" if force else ""))
        if self._log is not None:
            self._log.close()
            self._log = None
        self._jobs.clear()

    def _wait_for_slot_tasks(self, deadline: float) -> list[str]:
        """Wait until every slot task of ours has ended; return what still runs at ``deadline``.

        A job thread returns when its job ends, which is when its task ended unless someone cancelled
        the job: PySpark's own Ctrl-C handler cancels all jobs before unison hears of it, and a
        cancelled job ends on the driver while its task runs on. Spark's status tracker counts a task
        active until its executor reports it ended, so it has the last word.
        """
        while True:
            alive = [job for job in self._jobs.values() if job.thread is not None and job.thread.is_alive()]
            try:
                active = self._active_tasks()
            except Exception:  # noqa: BLE001 - the context may be stopping too: the threads still tell
                self._note(f"reading Spark's status tracker failed: {traceback.format_exc()}")
                active = {}
            if (not alive and not active) or time.monotonic() >= deadline:
                if alive:  # a slot job without a worker waits for an executor, or is still starting
                    return [f"slot {job.slot}" + ("" if self._has_worker(job) else " (no worker yet)")
                            for job in alive]
                return [f"{n} task(s) of cancelled Spark job {job_id}" for job_id, n in active.items()]
            time.sleep(0.05)

    def _active_tasks(self) -> dict[int, int]:
        """Running tasks per ended Spark job of ours (the status store writes a running stage's task
        count lazily, but a finished or cancelled stage's at once, and again when its last task ends)."""
        tracker = self.spark_context.statusTracker()
        active: dict[int, int] = {}
        for job_id in tracker.getJobIdsForGroup(self.job_group):
            info = tracker.getJobInfo(job_id)
            if info is None or info.status == "RUNNING":
                continue  # its thread is still waiting for it
            stages = [stage for stage in map(tracker.getStageInfo, info.stageIds) if stage is not None]
            if n := sum(stage.numActiveTasks for stage in stages):
                active[job_id] = n
        return active

    def _wait_until_no_job_runs(self, deadline: float) -> None:
        """Wait until Spark's status tracker (updated asynchronously) shows no job of ours running."""
        try:
            tracker = self.spark_context.statusTracker()
            while time.monotonic() < deadline:
                infos = [tracker.getJobInfo(j) for j in tracker.getJobIdsForGroup(self.job_group)]
                if not [i for i in infos if i is not None and i.status in ("RUNNING", "UNKNOWN")]:
                    return
                time.sleep(0.02)
        except Exception:  # noqa: BLE001 - the context may be stopping too
            return

    def __repr__(self) -> str:
        slots = "" if self.requested_slots is None else f", slots={self.requested_slots}"
        master = self._sc.master if self._sc is not None else "?"
        return f"Spark(master={master!r}{slots})"
