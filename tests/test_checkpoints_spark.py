"""Checkpoints of workers without the driver's disk (issue 16): Spark executors stream each checkpoint
to the driver in chunks before the report naming it, and the driver streams the one a retried trial
resumes from back before its ``trial`` message.

The Spark tests run on the shared ``local-cluster[2,1,1024]`` session (executor JVMs of their own;
the Spark backend never assumes they share the driver's disk): each trial runs in a temporary folder
of its own, and its checkpoints reach ``trials/<id>/checkpoints`` only through the socket. The
protocol and the driver's inbox are also tested without Spark, on real files.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from processes import journal

import unison
from unison import protocol
from unison.driver.checkpoint_inbox import CheckpointInbox, send_checkpoint
from unison.driver.store import ExperimentStore
from unison.worker.checkpoint_ship import CHUNK_BYTES, ChunkBudgetExceeded, ChunkWriter, Staging, chunks
from unison.worker.checkpoints import MAX_META_BYTES, Policy, load_checkpoint, prune, save_checkpoint
from unison.worker.serve import _read

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from spark_support import cluster_session  # skips the Spark tests without pyspark

    return cluster_session(tmp_path_factory.getbasetemp())


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in folder.iterdir() if p.name.startswith("step-"))


def _chunk(**overrides: Any) -> dict[str, Any]:
    chunk = {"t": protocol.CHECKPOINT_CHUNK, "trial_id": 3, "step": 7, "file": "data/sub/weights.bin",
             "offset": 0, "data": b"abc", "last": True}
    return {**chunk, **overrides}


# ------------------------------------------------------------------------ protocol (no Spark)
def test_the_protocol_bounds_checkpoint_chunks_both_ways() -> None:
    for receiver in (protocol.DRIVER, protocol.WORKER):
        good = _chunk()
        assert protocol.validate(good, receiver) is good
        assert protocol.validate(_chunk(data=b"\0" * protocol.MAX_CHUNK_BYTES), receiver)
        escaping = ("../escape", "data/../../escape", "/etc/passwd", "data//x", "./meta.json", "data\\x", "")
        for path in escaping:
            with pytest.raises(protocol.MalformedMessage, match=r"checkpoint_chunk message: 'file' must be a "
                                                                r"relative path inside its folder"):
                protocol.validate(_chunk(file=path), receiver)
        with pytest.raises(protocol.MalformedMessage, match=r"'data' has 4194305 bytes, at most 4194304"):
            protocol.validate(_chunk(data=b"\0" * (protocol.MAX_CHUNK_BYTES + 1)), receiver)
        with pytest.raises(protocol.MalformedMessage, match=r"'last' must be a bool, got int"):
            protocol.validate(_chunk(last=1), receiver)
        with pytest.raises(protocol.MalformedMessage, match=r"'offset' must be >= 0"):
            protocol.validate(_chunk(offset=-1), receiver)
    ack = {"t": protocol.CHECKPOINT_ACK, "trial_id": 3, "step": 7, "error": "over the limit"}
    assert protocol.validate(ack, protocol.WORKER) is ack
    with pytest.raises(protocol.MalformedMessage, match="unknown kind 'checkpoint_ack'"):
        protocol.validate(ack, protocol.DRIVER)  # the driver acknowledges; it is never acknowledged


# ------------------------------------------------------------------ the driver's inbox (no Spark)
def _ship(inbox: CheckpointInbox, folder: Path, trial_id: int, step: int, peer: int = 1) -> dict[str, Any]:
    """Feed ``inbox`` the chunks of ``folder`` as a worker sends them; the report's checkpoint entry."""
    shipped = files = 0
    for chunk in chunks(folder, trial_id, step):
        ack = inbox.chunk(peer, protocol.validate(dict(chunk), protocol.DRIVER))
        assert ack is not None and not ack.get("error"), ack
        shipped, files = shipped + len(chunk["data"]), files + chunk["last"]
    return {"step": step, "path": f"checkpoints/step-{step:06d}", "size": 0, "shipped": shipped,
            "files": files}


def test_the_inbox_writes_chunks_into_place_and_prunes(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path / "exp")
    inbox = CheckpointInbox(store, 64 * MIB, "Spark(checkpoint_limit_mb=64)")
    work = tmp_path / "worker"
    source = work / "mine"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "big.bin").write_bytes(os.urandom(3 * CHUNK_BYTES + 5))  # several chunks
    (source / "empty").write_bytes(b"")
    policy = Policy(keep=1, metric="loss", mode="min")
    for step, loss in enumerate([3.0, 1.0, 2.0]):
        info = save_checkpoint(work / "checkpoints", source, step, value=loss)
        assert inbox.commit(1, 5, _ship(inbox, work / info["path"], 5, step), policy) is None
    root = store.trial_dir(5) / "checkpoints"
    assert _steps(root) == [1, 2]  # the last one, and the best by the loss
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]  # no temporary folder
    restored = load_checkpoint(root / "step-000002")
    assert (restored / "sub" / "big.bin").read_bytes() == (source / "sub" / "big.bin").read_bytes()
    assert (restored / "empty").read_bytes() == b""


def test_the_inbox_refuses_what_does_not_add_up_and_forgets_a_peer_gone(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path / "exp")
    inbox = CheckpointInbox(store, 64 * MIB, "Spark(checkpoint_limit_mb=64)")
    work = tmp_path / "worker" / "checkpoints"
    info = save_checkpoint(work, {"w": list(range(1000))}, 4)
    report = _ship(inbox, work.parent / info["path"], 0, 4)
    problem = inbox.commit(1, 0, {**report, "shipped": report["shipped"] + 1}, Policy())
    assert problem is not None and "arrived incomplete" in problem and "the worker sent" in problem
    root = store.trial_dir(0) / "checkpoints"
    assert list(root.iterdir()) == []  # nothing half-written stays
    assert "did not reach the driver" in (inbox.commit(1, 0, report, Policy()) or "")  # nothing in flight
    # a file whose last chunk never came, then a second file: refused, and the rest of it ignored
    first = inbox.chunk(1, _chunk(trial_id=0, step=5, file="object.pkl", last=False))
    assert first is not None and not first.get("error")
    refused = inbox.chunk(1, _chunk(trial_id=0, step=5, file="meta.json"))
    assert refused is not None and "object.pkl ended without its last chunk" in (refused.get("error") or "")
    assert inbox.chunk(1, _chunk(trial_id=0, step=5, file="other")) is None
    # a peer that goes away mid-checkpoint leaves nothing behind
    inbox.chunk(2, _chunk(trial_id=1, step=0, file="object.pkl", last=False))
    partial = [p.name for p in (store.trial_dir(1) / "checkpoints").iterdir()]
    assert partial == [f".tmp-step-000000-{os.getpid()}"]
    inbox.forget_peer(2)
    assert list((store.trial_dir(1) / "checkpoints").iterdir()) == []


def _folder_with_meta(folder: Path, meta: bytes) -> Path:
    """A checkpoint-shaped folder whose ``meta.json`` holds ``meta`` (what a bad worker can ship)."""
    folder.mkdir(parents=True)
    (folder / "object.pkl").write_bytes(b"\0" * 100)
    (folder / "meta.json").write_bytes(meta)
    return folder


def test_the_inbox_refuses_a_nested_or_oversized_meta_json_without_raising(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path / "exp")
    inbox = CheckpointInbox(store, 64 * MIB, "Spark(checkpoint_limit_mb=64)")
    work = tmp_path / "worker" / "checkpoints"
    good = save_checkpoint(work, {"w": 1}, 1)
    assert inbox.commit(1, 0, _ship(inbox, work.parent / good["path"], 0, 1), Policy(keep=5)) is None
    nested = _folder_with_meta(tmp_path / "nested", b"[" * 200_000)  # json.loads: RecursionError
    problem = inbox.commit(1, 0, _ship(inbox, nested, 0, 2), Policy(keep=5))
    assert problem is not None and "unreadable meta.json: RecursionError" in problem
    padded = b'{"step": 3, "pad": "' + b"x" * MAX_META_BYTES + b'"}'  # valid JSON, of the right step
    problem = inbox.commit(1, 0, _ship(inbox, _folder_with_meta(tmp_path / "big", padded), 0, 3),
                           Policy(keep=5))
    assert problem is not None and f"over the {MAX_META_BYTES} a checkpoint's may hold" in problem
    root = store.trial_dir(0) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # the good one kept, no leftovers


def test_a_chunk_the_driver_cannot_write_is_refused_without_raising(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path / "exp")
    inbox = CheckpointInbox(store, 64 * MIB, "Spark(checkpoint_limit_mb=64)")
    blocker = store.trial_dir(2) / "checkpoints"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"not a folder")  # the checkpoint's folder cannot be created under it
    ack = inbox.chunk(1, _chunk(trial_id=2, step=4, file="object.pkl", last=True))
    assert ack is not None and "could not be received by the driver" in (ack.get("error") or "")
    assert "Error" in (ack.get("error") or "")  # the OSError's kind and message, for the trial's error
    assert inbox.chunk(1, _chunk(trial_id=2, step=4, file="meta.json")) is None  # the rest is ignored
    report = {"step": 4, "path": "checkpoints/step-000004", "size": 0, "shipped": 6, "files": 2}
    assert inbox.commit(1, 2, report, Policy()) == ack["error"]  # the report fails the trial with it
    assert blocker.read_bytes() == b"not a folder"


@pytest.mark.parametrize("as_url", [False, True])
def test_pruning_takes_a_bad_meta_json_for_no_checkpoint(tmp_path: Path, as_url: bool) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(root, {"w": step}, step)
    _folder_with_meta(root / "step-000003", b"[" * 200_000)
    _folder_with_meta(root / "step-000004", b'{"step": 4, "pad": "' + b"x" * MAX_META_BYTES + b'"}')
    assert prune(root.as_uri() if as_url else root, Policy(keep=5)) == []
    assert _steps(root) == [1, 2]  # neither is a checkpoint: removed as a write cut short would be


def test_a_chunk_writer_never_leaves_its_folder(tmp_path: Path) -> None:
    writer = ChunkWriter(tmp_path / "in", 0)
    with pytest.raises(ValueError, match="no path inside the checkpoint"):
        writer.write(_chunk(file="../out"))  # refused even without the protocol's check
    assert not (tmp_path / "out").exists()
    small = ChunkWriter(tmp_path / "small", 0, budget=3 * 4096)  # each file and folder counts 4 KiB
    small.write(_chunk(file="a", data=b""))
    with pytest.raises(ChunkBudgetExceeded):
        small.write(_chunk(file="d/e/f", data=b""))  # empty files cannot fill the disk's inodes
    assert not (tmp_path / "small" / "d").exists()


def test_the_worker_stages_a_shipped_checkpoint_for_the_trial_message_after_it(tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path / "driver" / "checkpoints", {"w": 7}, 11)
    folder = tmp_path / "driver" / info["path"]
    driver_end, worker_end = socket.socketpair()
    driver = protocol.Connection(driver_end)
    inbox: queue.Queue[dict[str, Any]] = queue.Queue()
    staging = Staging()
    reader = threading.Thread(target=_read, daemon=True,
                              args=(protocol.Connection(worker_end, receiver=protocol.WORKER), inbox,
                                    {"interrupter": None}, False, 0, staging))
    reader.start()

    def trial(trial_id: int) -> dict[str, Any]:
        return {"t": "trial", "trial_id": trial_id, "hparams": {}, "trial_dir": "/on/the/driver",
                "checkpoint": {"keep": 2, "path": str(folder), "step": 11}}

    assert send_checkpoint(driver.send, 4, 11, folder) is None
    driver.send(trial(4))
    driver.send(trial(5))  # its checkpoint was not shipped
    first, second = inbox.get(timeout=10), inbox.get(timeout=10)
    assert first["t"] == second["t"] == "trial"  # the chunks were written, not queued
    staged = Path(first["checkpoint"]["path"])
    assert not staged.is_relative_to(tmp_path) and load_checkpoint(staged) == {"w": 7}
    assert second["checkpoint"]["path"] is None and second["checkpoint"]["step"] is None  # never the driver's
    staging.discard(4)
    assert not staged.exists()
    driver.close()
    reader.join(10)


# ----------------------------------------------------------------------------------- Spark
@pytest.mark.slow
def test_twelve_mib_checkpoints_reach_the_driver_pruned_and_load_back(spark: Any, tmp_path: Path) -> None:
    steps = 4

    def train(x: float, reporter: Any, ctx: Any) -> float:
        import numpy as np

        (ctx.trial_dir / "ran_in.txt").write_text(str(ctx.trial_dir))
        for step in range(steps):
            weights = np.random.default_rng([ctx.trial_id, step]).standard_normal(12 * MIB // 8)
            loss = [3.0, 1.0, 2.0, 2.5][step] + x
            reporter.report(step=step, checkpoint={"weights": weights, "step": step}, loss=loss)
        return 2.5 + x

    search = unison.Search({"x": unison.uniform(0.0, 0.1)}, metric="loss", mode="min", trials=2, seed=0,
                           keep_checkpoints=1)
    r = unison.run(train, search, backend=unison.Spark(spark), storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 2, r.trials["error"].tolist()
    import numpy as np

    for row in r.rows:
        tid = row["trial_id"]
        folder = r.path / "trials" / f"{tid:04d}" / "checkpoints"
        ran_in = Path((folder.parent / "ran_in.txt").read_text())  # shipped back with the trial's files
        assert not ran_in.is_relative_to(r.path) and not ran_in.exists()  # a temporary folder of its own
        assert _steps(folder) == [1, 3]  # keep_checkpoints=1: the last, and the best by the loss
        assert sorted(p.name for p in folder.iterdir()) == ["step-000001", "step-000003"]
        for step in (1, 3):
            saved = load_checkpoint(folder / f"step-{step:06d}")
            expected = np.random.default_rng([tid, step]).standard_normal(12 * MIB // 8)
            assert saved["step"] == step and np.array_equal(saved["weights"], expected)
    assert r.best is not None and r.best.checkpoint is not None
    best = load_checkpoint(r.best.checkpoint)
    assert best["step"] == 3 and Path(r.best.checkpoint).is_relative_to(r.path)
    assert np.array_equal(best["weights"],
                          np.random.default_rng([r.best.trial_id, 3]).standard_normal(12 * MIB // 8))
    events = journal(r.path)
    assert sorted((ev["id"], ev["step"]) for ev in events if ev["e"] == "checkpoint") == \
        [(tid, step) for tid in (0, 1) for step in range(steps)]
    ends = [ev for ev in events if ev["e"] == "end"]
    assert all("files_skipped" not in ev for ev in ends), ends  # checkpoints no longer go with the files


@pytest.mark.slow
def test_a_killed_spark_worker_resumes_from_its_shipped_checkpoint(spark: Any, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    total = 20

    def train(lr: float, kill: bool, reporter: Any, ctx: Any) -> dict[str, float]:
        start = ctx.checkpoint_step + 1 if ctx.checkpoint else 0
        w = float(ctx.checkpoint["w"]) if ctx.checkpoint else 1.0
        with open(work / "computed.txt", "a", encoding="utf-8") as log:
            log.write(f"{ctx.attempt} start {start} {ctx.checkpoint_path}\n")
        for step in range(start, total):
            if kill and step == 12 and ctx.attempt == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # the executor's Python worker dies mid-trial
            w = w * (1 - lr) + 0.001 * step
            with open(work / "computed.txt", "a", encoding="utf-8") as log:
                log.write(f"{ctx.attempt} {step}\n")
            reporter.report(step=step, checkpoint={"w": w, "pad": b"\0" * 100_000}, loss=w)
        return {"loss": w}

    def search(kill: bool) -> unison.Search:
        return unison.Search({"lr": 0.05, "kill": kill}, metric="loss", mode="min", trials=1, seed=3)

    r = unison.run(train, search(True), backend=unison.Spark(spark), storage=tmp_path / "runs",
                   progress=False)
    assert r.rows[0]["status"] == "completed", r.rows[0]["error"]
    assert r.rows[0]["attempts"] == 2
    events = journal(r.path)
    lost = next(i for i, ev in enumerate(events) if ev["e"] == "lost")
    assert [ev["step"] for ev in events[:lost] if ev["e"] == "report"] == list(range(12))
    assert [ev["step"] for ev in events[lost:] if ev["e"] == "report"] == list(range(12, total))
    computed = (work / "computed.txt").read_text().splitlines()
    starts = [line.split() for line in computed if " start " in line]
    assert [s[:3] for s in starts] == [["0", "start", "0"], ["1", "start", "12"]]
    staged = Path(starts[1][3])  # the retry loaded a copy shipped to its worker, not the driver's folder
    assert not staged.is_relative_to(r.path) and not staged.exists()  # deleted when the trial ended
    assert [line for line in computed if line.startswith("1 ") and "start" not in line] == \
        [f"1 {step}" for step in range(12, total)]
    fresh = unison.run(train, search(False), backend="inline", storage=tmp_path / "fresh", progress=False)
    assert r.rows[0]["metrics"] == fresh.rows[0]["metrics"]


@pytest.mark.slow
def test_checkpoints_over_the_per_trial_limit_fail_the_trial(spark: Any, tmp_path: Path) -> None:
    def train(reporter: Any, ctx: Any) -> float:
        size = MIB + MIB // 5 if ctx.trial_id == 0 else 12 * MIB  # trial 1's is refused while it streams
        for step in range(4):
            reporter.report(step=step, checkpoint={"blob": os.urandom(size)}, value=float(step))
        return 4.0

    backend = unison.Spark(spark, checkpoint_limit_mb=3)
    r = unison.run(train, unison.Search({}, trials=2, keep_checkpoints=2), backend=backend,
                   storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["failed", "failed"]
    # trial 0: 2 kept (2.4 MiB) plus the third arriving exceed 3 MiB, so the report of step 2 fails it;
    # trial 1: its first checkpoint alone exceeds 3 MiB
    for row, step in zip(r.rows, (2, 0), strict=True):
        assert f"CheckpointRefused: trial {row['trial_id']}'s checkpoint of step {step} " in row["error"]
        assert "Spark(checkpoint_limit_mb=3)" in row["error"] and "checkpoint_storage=" in row["error"]
        assert "keep_checkpoints=1" in row["error"]
    folders = [r.path / "trials" / f"{tid:04d}" / "checkpoints" for tid in (0, 1)]
    assert sorted(p.name for p in folders[0].iterdir()) == ["step-000000", "step-000001"]  # no partial one
    assert len(load_checkpoint(folders[0] / "step-000001")["blob"]) == MIB + MIB // 5
    assert list(folders[1].iterdir()) == []
    events = journal(r.path)
    for tid, kept in ((0, [0, 1]), (1, [])):
        # the refused report is not recorded
        assert [ev["step"] for ev in events if ev["e"] == "report" and ev["id"] == tid] == kept
        assert [ev["step"] for ev in events if ev["e"] == "checkpoint" and ev["id"] == tid] == kept


@pytest.mark.slow
def test_a_pbt_population_takes_turns_and_clones_on_spark(spark: Any, tmp_path: Path) -> None:
    """Population-based training on executors: a clone's first checkpoint is copied on the driver
    and streamed to whichever executor runs it; 4 members on 2 slots take turns."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from helpers_pbt import check_population, make_search, train

    r = unison.run(train, make_search(population=4, sleep=0.0), backend=unison.Spark(spark), storage=tmp_path,
                   progress=False)
    assert r.status == "completed"
    check_population(r, 4)  # clones resumed from their parents' checkpoints, one completed per member
    events = journal(r.path)
    assert any(ev["e"] == "pause" for ev in events)
    assert {ev["worker"] for ev in events if ev["e"] == "start"} <= {"spark-0", "spark-1"}
