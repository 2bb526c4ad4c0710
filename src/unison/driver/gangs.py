"""Gang scheduling: distributed trials (``workers_per_trial`` = k > 1) for :class:`RemoteLoop`.

A trial starts once k workers are idle; each gets the trial message plus ``dist`` (its rank, the
group's size, its local rank among the gang's workers on its host, rank 0's address and free port for
the rendezvous, the process-group options). Only rank 0 reports. The trial ends when every rank has
sent its outcome, or at once when one rank fails (its ``rank_failed`` notice, its outcome, or its
connection lost): the ranks still running are then told to ``abort`` (they end their processes; the
backend replaces them).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from unison.backends.base import Backend
from unison.driver.driver import SearchDriver, TrialState
from unison.driver.server import Peer
from unison.protocol import ABORT, AbortMessage, DistSpec, TrialOutcome, trial_message


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
class Gang:
    """The workers running one distributed trial, by rank, and the outcomes they sent (or, for a rank
    no longer awaited, its status: ``lost``, ``aborted``)."""

    trial_id: int
    members: list[Peer]
    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)
    ended: bool = False

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
            trial = driver.next_trial()
            if trial is None:
                break
            members = [waiting.popleft() for _ in range(self.size)]
            # Ranks on one host get consecutive numbers (local ranks 0, 1, ...), rank 0's host first.
            hosts = list(dict.fromkeys(str(m.info.get("host")) for m in members))
            members.sort(key=lambda m: (hosts.index(str(m.info.get("host"))), m.peer_id))
            self._start(trial, members)

    def _start(self, trial: TrialState, members: list[Peer]) -> None:
        self.gangs[trial.trial_id] = Gang(trial.trial_id, members)
        ranks = [{"worker": m.name, "host": m.info.get("host"), "pid": m.info.get("pid")} for m in members]
        chief = members[0]
        message = self.host.driver.start(trial, ",".join(m.name for m in members), chief.info.get("host"),
                                         chief.info.get("pid"), ranks=ranks)
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
        """``peer``'s function raised in ``trial_id``: the trial fails now, the other ranks abort
        (``peer`` sends its own outcome once it has cleaned up)."""
        if not gang.ended and trial_id == gang.trial_id:
            failed = TrialOutcome(trial_id=gang.trial_id, status="failed",
                                  error=self._rank_error(gang, gang.rank_of(peer), error))
            self._end(gang, failed, spare=peer)

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
                self._end(gang, failed)
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
            gang.ended = True
            self.host.driver.lose(gang.trial_id, f"rank {rank} of {len(gang.members)} ({peer.name}) died "
                                                 f"or lost its connection while running the trial")
            self._abort_others(gang, f"rank {rank} died")
        self._forget_if_done(gang)

    def timed_out(self, trial_id: int) -> None:
        """``trial_id`` ran past its time limit: no outcome of its ranks is awaited any more (the loop
        ends their processes)."""
        gang = self.gangs.get(trial_id)
        if gang is not None:
            gang.ended = True
            for rank in range(len(gang.members)):
                if rank not in gang.outcomes:
                    gang.settle(rank, "aborted")
            self._forget_if_done(gang)

    def _end(self, gang: Gang, outcome: TrialOutcome, spare: Peer | None = None) -> None:
        """Record the trial's outcome; abort the ranks still running (except ``spare``, which failed and
        sends its own outcome once it has cleaned up)."""
        gang.ended = True
        self.host.driver.finish(cast(dict[str, Any], outcome))
        error = str(outcome.get("error") or "another rank failed")
        reason = "the trial ended" if outcome.get("status") != "failed" else error.splitlines()[0]
        self._abort_others(gang, reason, spare)
        self.host.dispatch_waiting()

    def _abort_others(self, gang: Gang, reason: str, spare: Peer | None = None) -> None:
        for rank, member in enumerate(gang.members):
            if rank in gang.outcomes or member is spare or member.trial_id != gang.trial_id:
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
