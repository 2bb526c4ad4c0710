"""Gang scheduling: distributed trials (``workers_per_trial`` = k > 1) for :class:`RemoteLoop`.

A trial starts once k workers are idle; each gets the trial message plus ``dist`` (its rank, the
group's size, its local rank among the gang's workers on its host, rank 0's address and free port for
the rendezvous, the process-group options). Only rank 0 reports. The trial ends when every rank has
sent its outcome, or at once when one rank fails (its ``rank_failed`` notice, its outcome, or its
connection lost): the ranks still running are then told to ``abort`` (they end their processes; the
backend replaces them).

A rank whose function failed because a peer's connection broke (gloo's ``Connection reset by peer``
in an all-reduce, see :data:`PEER_LOST_ERRORS`) is usually the survivor of a peer that died: its
notice can reach the driver before the dead peer's connection closes. Its failure is then held for
up to :data:`PEER_LOST_GRACE_S`: a rank that dies meanwhile makes the trial lost (retried within
``max_retries``), a rank that fails of a cause of its own fails it at once; otherwise it fails with
the held traceback. The verdict of a death always rests on a connection that closed (or a process
the backend saw end), never on an error's text, which only decides whether to wait for one.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from unison.backends.base import Backend
from unison.driver.driver import SearchDriver, TrialState
from unison.driver.server import Peer
from unison.protocol import ABORT, AbortMessage, DistSpec, TrialOutcome, trial_message

PEER_LOST_GRACE_S = 2.0  # how long a rank's peer-connection failure waits for a peer's death to show
# What a rank's traceback says when a collective failed because a peer went away (gloo, NCCL, the
# torch store, TensorFlow's collectives): such a failure waits for the evidence of a death.
PEER_LOST_ERRORS = re.compile(
    r"connection (reset|closed) by peer|broken pipe|socket closed|remote process exited"
    r"|NCCL communicator was aborted|ncclRemoteError|UnavailableError", re.IGNORECASE)


def lost_a_peer(error: str) -> bool:
    """Whether a rank's traceback ``error`` says a collective broke because a peer's connection did."""
    return PEER_LOST_ERRORS.search(error) is not None


def _last_line(error: str, limit: int = 300) -> str:
    lines = [line for line in error.splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


class GangHost(Protocol):
    """What gang scheduling needs of the loop that serves the workers."""

    driver: SearchDriver
    backend: Backend
    waiting: deque[Peer]  # idle workers, oldest first
    aborting: set[int]  # aborted peers whose saved files (or end) may still come

    def send(self, peer: Peer, message: Mapping[str, Any]) -> None:
        """Send ``message`` to ``peer``; a broken connection closes it."""

    def write_files(self, trial_id: int, files: dict[str, bytes]) -> str | None:
        """Write files shipped for ``trial_id``; what went wrong, if anything."""

    def dispatch_waiting(self) -> None:
        """Give the idle workers trials, or shut them down once the experiment is over."""


@dataclass
class Held:
    """The failure a gang's trial ends with unless a rank dies by ``deadline`` (``time.monotonic()``);
    ``raw``: the failing rank's own traceback."""

    outcome: TrialOutcome
    rank: int
    raw: str
    deadline: float


@dataclass
class Gang:
    """The workers running one distributed trial, by rank, and the outcomes they sent (or, for a rank
    no longer awaited, its status: ``lost``, ``aborted``)."""

    trial_id: int
    members: list[Peer]
    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)
    ended: bool = False
    reporters: set[int] = field(default_factory=set)  # ranks that said they failed (outcome to follow)
    held: Held | None = None  # a peer-connection failure waiting for a peer's death to show

    def rank_of(self, peer: Peer) -> int:
        """``peer``'s rank in this gang."""
        return next(i for i, member in enumerate(self.members) if member is peer)

    def settle(self, rank: int, status: str) -> None:
        """Stop waiting for ``rank``'s outcome."""
        self.outcomes[rank] = TrialOutcome(trial_id=self.trial_id, status=status)

    @property
    def done(self) -> bool:
        """Ended, with no rank's outcome still to come."""
        return self.ended and len(self.outcomes) == len(self.members)


class GangDispatch:
    """Starts distributed trials on gangs of ``size`` idle workers of ``host`` and ends them."""

    def __init__(self, host: GangHost, size: int, options: dict[str, Any]) -> None:
        """``options``: the process group's ``process_group``, ``timeout_s``, ``strategy``,
        ``framework``."""
        self.host, self.size, self.options = host, size, options
        self.gangs: dict[int, Gang] = {}

    def __bool__(self) -> bool:
        """Whether a trial still awaits an outcome from one of its ranks."""
        return bool(self.gangs)

    def of(self, peer: Peer) -> Gang | None:
        """The gang whose trial ``peer`` runs, if it runs one."""
        return self.gangs.get(peer.trial_id) if peer.trial_id is not None else None

    def dispatch(self) -> None:
        """Start distributed trials while ``size`` workers are idle."""
        driver, waiting = self.host.driver, self.host.waiting
        while len(waiting) >= self.size and driver.can_start() and not driver.finished:
            members = self._idle_gang(waiting)
            if members is None:
                break
            trial = driver.next_trial()
            if trial is None:
                waiting.extendleft(reversed(members))  # idle still, at the front as they were
                break
            # Ranks on one host get consecutive numbers (local ranks 0, 1, ...), rank 0's host first.
            hosts = list(dict.fromkeys(str(m.info.get("host")) for m in members))
            members.sort(key=lambda m: (hosts.index(str(m.info.get("host"))), m.peer_id))
            self._start(trial, members)

    def _idle_gang(self, waiting: deque[Peer]) -> list[Peer] | None:
        """``size`` idle workers, taken from ``waiting``: the oldest ones, or, where the backend placed
        workers in groups (:meth:`Backend.gang_group`), the first group whose workers are all idle
        (``None`` while none is)."""
        group_of = self.host.backend.gang_group
        grouped = [(peer, group_of(peer.info)) for peer in waiting]
        if all(group is None for _, group in grouped):
            return [waiting.popleft() for _ in range(self.size)]
        groups: dict[Any, list[Peer]] = {}
        for peer, group in grouped:
            if group is None:  # a worker the backend no longer counts (replaced, not yet seen gone)
                continue
            members = groups.setdefault(group, [])
            members.append(peer)
            if len(members) == self.size:
                for member in members:
                    waiting.remove(member)
                return members
        return None

    def _start(self, trial: TrialState, members: list[Peer]) -> None:
        self.gangs[trial.trial_id] = Gang(trial.trial_id, members)
        ranks = [{"worker": m.name, "host": m.info.get("host"), "pid": m.info.get("pid"),
                  **({"node": m.info["node"]} if "node" in m.info else {}),
                  **({"gpus": m.info["gpus"]} if m.info.get("gpus") else {})} for m in members]
        chief = members[0]
        gpus = [gpu for m in members for gpu in m.info.get("gpus") or ()]
        message = self.host.driver.start(trial, ",".join(m.name for m in members), chief.info.get("host"),
                                         chief.info.get("pid"), ranks=ranks, node=chief.info.get("node"),
                                         gpus=gpus)
        for rank, member in enumerate(members):
            member.trial_id = trial.trial_id
            self.host.send(member, trial_message(message, self._dist(members, rank)))

    def _dist(self, members: list[Peer], rank: int) -> DistSpec:
        """Where rank ``rank`` of the gang ``members`` stands in its process group."""
        chief, member = members[0], members[rank]
        backend = self.options.get("process_group") or (
            "nccl" if all(m.endpoint.get("gpus") for m in members) else "gloo")
        hosts = [m.info.get("host") for m in members]
        return DistSpec(
            rank=rank, world_size=len(members),
            local_rank=hosts[:rank].count(hosts[rank]), local_world_size=hosts.count(hosts[rank]),
            master_addr=chief.endpoint.get("address"), master_port=chief.endpoint.get("port"),
            address=member.endpoint.get("address"), backend=backend,
            timeout_s=self.options.get("timeout_s"),
            strategy=self.options.get("strategy"),
            peers=[f"{m.endpoint.get('address')}:{m.endpoint.get('port')}" for m in members],
            framework=self.options.get("framework", "torch"),
        )

    @staticmethod
    def _rank_error(gang: Gang, rank: int, error: Any) -> str:
        member = gang.members[rank]
        where = f"{member.name} on {member.info.get('host')}, pid {member.info.get('pid')}"
        return f"rank {rank} of {len(gang.members)} ({where}) failed:\n{error}"

    def rank_failed(self, gang: Gang, peer: Peer, trial_id: int, error: str) -> None:
        """``peer``'s function raised in ``trial_id``: the trial fails now (after a peer-connection
        error, unless a rank dies within :data:`PEER_LOST_GRACE_S`), the other ranks abort (``peer``
        sends its own outcome once it has cleaned up)."""
        if not gang.ended and trial_id == gang.trial_id:
            rank = gang.rank_of(peer)
            gang.reporters.add(rank)
            failed = TrialOutcome(trial_id=gang.trial_id, status="failed",
                                  error=self._rank_error(gang, rank, error))
            self._failure(gang, rank, failed, error)

    def _failure(self, gang: Gang, rank: int, failed: TrialOutcome, error: str) -> None:
        """Rank ``rank`` failed with traceback ``error``: end the trial with ``failed``, or hold it
        while the error says a peer's connection broke."""
        if not lost_a_peer(error):
            gang.held = None
            self._end(gang, failed)
            return
        if gang.held is None:
            gang.held = Held(failed, rank, error, time.monotonic() + PEER_LOST_GRACE_S)
        self._settle_held(gang, time.monotonic())

    def _settle_held(self, gang: Gang, now: float) -> None:
        """End a held failure once no rank is left that could still die, or at its deadline (lost if
        the backend saw a rank's process end meanwhile, else failed)."""
        held = gang.held
        if held is None or gang.ended:
            return
        awaited = [r for r in range(len(gang.members)) if r not in gang.outcomes and r not in gang.reporters]
        if awaited and now < held.deadline:
            return
        dead = [r for r in awaited if self.host.backend.worker_alive(gang.members[r].info) is False]
        if dead:
            self._lose(gang, dead[0])
            self.host.dispatch_waiting()
        else:
            gang.held = None
            self._end(gang, held.outcome)

    def tick(self, now: float) -> None:
        """End the held failures whose grace has passed."""
        for gang in list(self.gangs.values()):
            self._settle_held(gang, now)

    def rank_finished(self, gang: Gang, peer: Peer, outcome: TrialOutcome) -> None:
        """One rank's outcome: a failure ends the trial at once; otherwise it ends with rank 0's
        outcome once every rank has sent one."""
        rank = gang.rank_of(peer)
        files = outcome.pop("files", None)
        problem = self.host.write_files(gang.trial_id, files) if files else None
        if problem:
            outcome.setdefault("files_skipped", []).append(problem)
        gang.outcomes[rank] = outcome
        peer.trial_id = None
        if not gang.ended:
            if outcome.get("status") == "failed":
                error = self._rank_error(gang, rank, outcome.get("error"))
                failed: TrialOutcome = {**outcome, "error": error}
                if rank != 0:
                    chief = gang.outcomes.get(0)
                    failed["metrics"] = (chief.get("metrics") if chief is not None else None) or {}
                    failed.pop("error_kind", None)
                self._failure(gang, rank, failed, str(outcome.get("error") or ""))
            elif gang.held is not None:
                self._settle_held(gang, time.monotonic())
            elif len(gang.outcomes) == len(gang.members):
                chief = gang.outcomes[0].copy()
                skipped = [s for o in gang.outcomes.values() for s in o.get("files_skipped") or ()]
                if skipped:
                    chief["files_skipped"] = skipped
                self._end(gang, chief)
        self._forget_if_done(gang)

    def rank_lost(self, gang: Gang, peer: Peer) -> None:
        """A rank's worker died or went silent: the trial is lost (retried or failed), the others abort."""
        rank = gang.rank_of(peer)
        peer.trial_id = None
        gang.settle(rank, "lost")
        if not gang.ended:
            self._lose(gang, rank)
        self._forget_if_done(gang)

    def _lose(self, gang: Gang, rank: int) -> None:
        """Rank ``rank`` died: the trial is lost, every rank still running aborts (a held failure, the
        survivor's, is what the death caused: the reason quotes it)."""
        gang.ended = True
        reason = (f"rank {rank} of {len(gang.members)} ({gang.members[rank].name}) died or lost its "
                  f"connection while running the trial")
        if gang.held is not None:
            reason += f" (rank {gang.held.rank} had reported: {_last_line(gang.held.raw)})"
            gang.held = None
        self.host.driver.lose(gang.trial_id, reason)
        self._abort_others(gang, f"rank {rank} died")

    def timed_out(self, trial_id: int) -> None:
        """``trial_id`` ran past its time limit: no outcome of its ranks is awaited any more (the loop
        ends their processes)."""
        gang = self.gangs.get(trial_id)
        if gang is not None:
            gang.ended, gang.held = True, None
            for rank in range(len(gang.members)):
                if rank not in gang.outcomes:
                    gang.settle(rank, "aborted")
            self._forget_if_done(gang)

    def _end(self, gang: Gang, outcome: TrialOutcome) -> None:
        """Record the trial's outcome; abort the ranks still running (except those that reported their
        failure: each sends its own outcome once it has cleaned up)."""
        gang.ended = True
        self.host.driver.finish(cast(dict[str, Any], outcome))
        error = str(outcome.get("error") or "another rank failed")
        reason = "the trial ended" if outcome.get("status") != "failed" else error.splitlines()[0]
        self._abort_others(gang, reason, gang.reporters)
        self.host.dispatch_waiting()

    def _abort_others(self, gang: Gang, reason: str, spare: Collection[int] = ()) -> None:
        for rank, member in enumerate(gang.members):
            if rank in gang.outcomes or rank in spare or member.trial_id != gang.trial_id:
                continue
            gang.settle(rank, "aborted")
            member.trial_id = None
            member.aborted = True
            self.host.aborting.add(member.peer_id)
            if member in self.host.waiting:
                self.host.waiting.remove(member)
            self.host.send(member, AbortMessage(t=ABORT, trial_id=gang.trial_id, reason=reason))
            self.host.backend.worker_aborted(member.info)

    def _forget_if_done(self, gang: Gang) -> None:
        if gang.done:
            self.gangs.pop(gang.trial_id, None)
