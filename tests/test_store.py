"""The experiment store on a real file system: torn journal lines, fsync, the experiment lock, a full disk.

The lock tests run real driver processes (``tests/fault_driver.py``); the full-disk tests mount a real
2 MiB tmpfs (they need root and skip, saying so, without it).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import unison
from unison.driver.store import ExperimentStore

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers_train must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from helpers_train import make_search, train  # noqa: E402
from processes import alive, start_driver, wait_for  # noqa: E402


# --------------------------------------------------------------------------------------- helpers
def strict_journal(path: Path) -> list[dict[str, Any]]:
    """Every line of the journal, each of which must be one complete JSON event ending in a newline."""
    data = (path / "journal.jsonl").read_bytes()
    assert data.endswith(b"\n"), f"the journal does not end on a line boundary: {data[-80:]!r}"
    return [json.loads(line) for line in data.decode().splitlines()]


def loose_journal(path: Path) -> list[dict[str, Any]]:
    """The events readable right now (a line being written is skipped)."""
    return ExperimentStore(path).read_journal()


def ends(events: list[dict[str, Any]]) -> Counter[int]:
    return Counter(ev["id"] for ev in events if ev.get("e") == "end")


def small_search(trials: int = 4) -> unison.Search:
    return unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=trials,
                         seed=3, optimizer="random")


def counting(calls: list[int]) -> Any:
    def fn(x: float, ctx: Any) -> float:
        calls.append(ctx.trial_id)
        return x

    return fn


def cut_after_end(path: Path, trial_id: int) -> bytes:
    """Cut the journal right after trial ``trial_id``'s ``end`` line, dropping that line's newline
    (a driver that died between writing the event and its newline); returns the bytes kept."""
    data = (path / "journal.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    keep = b""
    for line in lines:
        keep += line
        event = json.loads(line)
        if event.get("e") == "end" and event["id"] == trial_id:
            break
    keep = keep.rstrip(b"\n")
    (path / "journal.jsonl").write_bytes(keep)
    return keep


# ----------------------------------------------------------------------- 1. the journal's last line
def test_an_end_line_without_its_newline_is_completed_and_the_trial_not_run_again(tmp_path: Path) -> None:
    calls: list[int] = []
    first = unison.run(counting(calls), small_search(4), backend="inline", storage=tmp_path,
                       progress=False)
    kept = cut_after_end(first.path, 1)
    assert json.loads(kept.splitlines()[-1])["e"] == "end"

    calls.clear()
    r = unison.resume(first.path, counting(calls), backend="inline", progress=False)
    assert r.status == "completed"
    assert sorted(calls) == [2, 3]
    events = strict_journal(first.path)  # every line parses: nothing was glued to the end line
    assert (first.path / "journal.jsonl").read_bytes().startswith(kept + b"\n")
    assert ends(events) == {0: 1, 1: 1, 2: 1, 3: 1}

    calls.clear()  # a second resume sees every trial ended (before the fix it ran trial 1 again)
    again = unison.resume(first.path, counting(calls), backend="inline", progress=False)
    assert calls == []
    assert list(again.trials["status"]) == ["completed"] * 4
    assert ends(strict_journal(first.path)) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert not (first.path / "journal.torn").exists()


def test_a_torn_last_line_is_set_aside_and_never_glued_to(tmp_path: Path) -> None:
    calls: list[int] = []
    first = unison.run(counting(calls), small_search(4), backend="inline", storage=tmp_path,
                       progress=False)
    kept = cut_after_end(first.path, 1) + b"\n"
    torn = b'{"e": "end", "id": 2, "status": "compl'  # the driver died in the middle of this write
    (first.path / "journal.jsonl").write_bytes(kept + torn)
    assert [ev["id"] for ev in loose_journal(first.path) if ev["e"] == "end"] == [0, 1]  # ignored

    calls.clear()
    r = unison.resume(first.path, counting(calls), backend="inline", progress=False)
    assert r.status == "completed"
    assert sorted(calls) == [2, 3]
    data = (first.path / "journal.jsonl").read_bytes()
    assert data.startswith(kept + b'{"e": "status", "status": "resumed"')  # where the torn line was
    assert ends(strict_journal(first.path)) == {0: 1, 1: 1, 2: 1, 3: 1}
    aside = [json.loads(line) for line in (first.path / "journal.torn").read_text().splitlines()]
    assert len(aside) == 1
    assert aside[0]["offset"] == len(kept) and aside[0]["length"] == len(torn)
    assert aside[0]["text"].encode("utf-8", "surrogateescape") == torn


def test_a_torn_line_of_invalid_utf8_is_set_aside_byte_for_byte(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    good = b'{"e": "status", "status": "running"}\n'
    torn = b'{"e": "report", "id": 0, "metrics": {"caf\xc3'  # cut inside a two-byte character
    store.journal_file.write_bytes(good + torn)
    assert store.read_journal() == [{"e": "status", "status": "running"}]
    store.append({"e": "status", "status": "resumed"})
    store.close()
    assert store.journal_file.read_bytes() == good + b'{"e": "status", "status": "resumed"}\n'
    record = json.loads(store.torn_file.read_text())
    assert record["offset"] == len(good)
    assert record["text"].encode("utf-8", "surrogateescape") == torn


# --------------------------------------------------------------------------------------- 2. fsync
def test_end_and_status_events_and_the_json_files_are_fsynced_but_reports_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, int]] = []  # (what was fsynced, its size then), from any thread
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((target, os.fstat(fd).st_size))
        real_fsync(fd)

    def fn(x: float, reporter: Any) -> float:
        for step in range(5):
            reporter.report(step=step, value=x)
        time.sleep(0.3)  # the next trial runs while the previous one's `end` is fsynced
        return x

    monkeypatch.setattr(os, "fsync", spy)
    r = unison.run(fn, small_search(3), backend="inline", storage=tmp_path, progress=False)
    monkeypatch.undo()

    journal = str(r.path / "journal.jsonl")
    offsets, position = [], 0  # (event kind, the journal's size once its line was written)
    for line in (r.path / "journal.jsonl").read_bytes().splitlines(keepends=True):
        position += len(line)
        offsets.append((json.loads(line)["e"], position))
    journal_syncs = [size for target, size in synced if target == journal]
    durable = [size for kind, size in offsets if kind in ("end", "status")]
    assert sum(1 for kind, _ in offsets if kind == "report") == 15
    assert len(journal_syncs) <= len(durable)  # never one per report
    for kind, size in offsets:
        if kind == "status":  # synchronously: the journal's size at the fsync is the line's end
            assert size in journal_syncs, (size, journal_syncs)
    ends_at = [size for kind, size in offsets if kind == "end"]
    for this, following in zip(ends_at[:-1], ends_at[1:], strict=True):
        # fsynced while the next trial ran, not only by the final status event (which covers the last)
        assert any(this <= size < following for size in journal_syncs), (this, following, journal_syncs)
    assert max(journal_syncs) == position
    targets = {target for target, _ in synced}
    assert str(r.path / "experiment.json.tmp") in targets  # before the rename
    assert str(r.path / "result.json.tmp") in targets
    assert str(r.path) in targets  # the directory, after each rename (and the journal's creation)


# ------------------------------------------------------------------------------------ 3. the lock
def test_a_second_store_on_a_locked_experiment_fails_at_once_and_the_lock_is_released_on_close(
    tmp_path: Path,
) -> None:
    first = ExperimentStore.create(tmp_path, "locked")
    first.write_experiment({"kind": "search", "status": "running"})
    holder = json.loads((first.path / "lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["since"] <= time.time()
    with pytest.raises(unison.ExperimentLocked) as caught:
        ExperimentStore.open(first.path)
    message = str(caught.value)
    assert f"pid {os.getpid()}" in message and holder["host"] in message
    assert str(first.path) in message and "unison.resume" in message
    assert caught.value.holder["pid"] == os.getpid()
    first.close()
    second = ExperimentStore.open(first.path)  # free once the holder closed its store
    second.close()


def experiment_of(storage: Path) -> Path:
    return wait_for(lambda: [p for p in storage.iterdir() if (p / "journal.jsonl").is_file()],
                    20, f"an experiment journal under {storage}")[0]


def worker_pids(work: Path) -> set[int]:
    return {int(p.read_text()) for p in work.glob("pid-*") if p.read_text()}


def kill_driver(proc: subprocess.Popen[bytes], work: Path) -> None:
    """SIGKILL the driver; wait for it and for its workers (they exit when their driver is gone)."""
    proc.kill()
    proc.wait(10)
    pids = worker_pids(work)
    wait_for(lambda: not [p for p in pids if alive(p)], 10, f"the killed driver's workers {pids} to exit")


@pytest.mark.slow
def test_resume_of_an_experiment_a_live_driver_runs_fails_at_once_naming_it(tmp_path: Path) -> None:
    proc, storage, work = start_driver(tmp_path, trials=6, sleep=3.0)
    try:
        path = experiment_of(storage)
        wait_for(lambda: list(work.glob("pid-*")), 20, "a trial to start")
        began = time.monotonic()
        with pytest.raises(unison.ExperimentLocked) as caught:
            unison.resume(path, train, backend=unison.Local(workers=2), progress=False)
        assert time.monotonic() - began < 2.0  # at once, not after running anything
        message = str(caught.value)
        assert f"pid {proc.pid}" in message and str(path) in message, message
        assert caught.value.holder["pid"] == proc.pid
        assert proc.poll() is None  # the holder was not disturbed
        kill_driver(proc, work)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    store = ExperimentStore.open(path)  # the kernel dropped the killed driver's lock with it
    store.close()


RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from helpers_train import train
import unison
try:
    r = unison.resume({path!r}, train, backend=unison.Local(workers=2), progress=False)
except unison.ExperimentLocked as exc:
    print("locked:", exc, flush=True)
    sys.exit(3)
print("finished:", r.status, flush=True)
"""


@pytest.mark.slow
def test_two_concurrent_resumes_one_runs_the_other_fails_and_every_trial_ends_once(tmp_path: Path) -> None:
    trials = 8
    proc, storage, work = start_driver(tmp_path, trials=trials, sleep=0.5)
    try:
        path = experiment_of(storage)
        wait_for(lambda: ends(loose_journal(path)), 20, "a trial to end")
        kill_driver(proc, work)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    done_before = set(ends(loose_journal(path)))
    assert len(done_before) < trials

    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(TESTS), path=str(path)))
    resumers = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=60)[0].decode() for p in resumers]
    finally:
        for p in resumers:
            if p.poll() is None:
                p.kill()
    codes = sorted(p.returncode for p in resumers)
    assert codes == [0, 3], outputs
    assert sum("finished: completed" in out for out in outputs) == 1, outputs
    assert sum("locked:" in out for out in outputs) == 1, outputs

    assert ends(strict_journal(path)) == {tid: 1 for tid in range(trials)}
    runs = Counter(int(line) for line in (work / "ran.txt").read_text().split())
    assert set(runs) == set(range(trials))
    assert all(runs[tid] == 1 for tid in done_before), runs


# -------------------------------------------------------------------------------- 4. a full disk
def _tmpfs_skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "a real tmpfs needs Linux"
    if os.geteuid() != 0:
        return "mounting a 2 MiB tmpfs needs root (run the suite as root to test a full disk)"
    return None


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, unmounted afterwards."""
    reason = _tmpfs_skip_reason()
    if reason:
        pytest.skip(reason)
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"could not mount a tmpfs: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, name: str = "ballast") -> Path:
    """Write ``disk/name`` until the file system is full; returns its path."""
    ballast = disk / name
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return ballast


def test_a_failed_append_on_a_full_disk_leaves_no_partial_line(tiny_disk: Path) -> None:
    store = ExperimentStore.create(tiny_disk, "full")
    store.write_experiment({"kind": "search", "status": "running"})
    store.append({"e": "status", "status": "running"})
    before = store.journal_file.read_bytes()
    fill(tiny_disk)
    big = {"e": "end", "id": 0, "status": "completed", "metrics": {f"m{i}": i for i in range(3000)}}
    with pytest.raises(unison.StorageFull) as caught:
        store.append(big)
    assert caught.value.errno == errno.ENOSPC
    assert str(store.path) in str(caught.value) and "full" in str(caught.value)
    assert store.journal_file.read_bytes() == before  # not a byte of the failed event
    # experiment.json is replaced whole or not at all (the reserve is free now: make sure it fails)
    fill(tiny_disk, "ballast-2")
    with pytest.raises(unison.StorageFull):
        store.write_experiment({"kind": "search", "status": "x" * 100_000})
    assert json.loads(store.experiment_file.read_text()) == {"kind": "search", "status": "running"}
    assert not list(store.path.glob("*.tmp"))
    store.close()


def test_a_quota_error_counts_as_a_full_disk_and_other_errors_do_not(tmp_path: Path) -> None:
    store = ExperimentStore(tmp_path)
    quota = store.storage_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "x"))
    assert isinstance(quota, unison.StorageFull) and quota.errno == errno.EDQUOT
    assert "unison.resume" in str(quota) and str(tmp_path) in str(quota)
    assert store.storage_full(OSError(errno.EIO, "I/O error")) is None
    assert store.storage_full(quota) is quota


def full_disk_trial(x: float, k: int, workdir: str, sleep: float, ctx: Any) -> dict[str, float]:
    """Writes a bit to its trial folder; trial 3 (the first time) then fills the disk. Its result is
    bigger than a page, so recording it needs fresh space."""
    work = Path(workdir)
    (work / f"pid-{ctx.trial_id}-{ctx.attempt}-{os.getpid()}").write_text(str(os.getpid()))
    (Path(ctx.trial_dir) / "out.bin").write_bytes(bytes(8192))
    marker = work / "filled"
    if ctx.trial_id == 3 and not marker.exists():
        marker.write_text("")
        fill(Path(ctx.trial_dir).parents[3])
    time.sleep(sleep)
    with open(work / "ran.txt", "a", encoding="utf-8") as f:
        f.write(f"{ctx.trial_id}\n")
    return {"value": x + k, **{f"extra_{i}": float(i) for i in range(400)}}


@pytest.mark.slow
def test_a_full_disk_raises_storage_full_and_resume_finishes_with_nothing_lost(
    tiny_disk: Path, tmp_path: Path
) -> None:
    trials = 8
    work = tmp_path / "work"  # on the ordinary disk: what the test reads about the trials
    work.mkdir()
    search = make_search(work, trials=trials, sleep=0.05)
    storage = tiny_disk / "runs"
    with pytest.raises(unison.StorageFull) as caught:
        unison.run(full_disk_trial, search, backend=unison.Local(workers=1), storage=storage,
                   progress=False)
    path = next(storage.iterdir())
    message = str(caught.value)
    assert str(path) in message and "unison.resume" in message and "full" in message, message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)

    events = strict_journal(path)  # readable to the last line, nothing torn
    assert not (path / "journal.torn").exists()
    ended_before = set(ends(events))
    # Trial 3 filled the disk: its end did not fit, nor trial 2's if the worker had gone on to its
    # next trial (3, handed over in advance) before the driver recorded 2.
    assert ended_before in ({0, 1, 2}, {0, 1}), ended_before
    assert json.loads((path / "experiment.json").read_text())["status"] == "interrupted"
    pids = {int(p.name.rsplit("-", 1)[1]) for p in work.glob("pid-*")}
    assert pids
    wait_for(lambda: not [p for p in pids if alive(p)], 5, f"the workers {pids} to be stopped")

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    r = unison.resume(path, full_disk_trial, backend=unison.Local(workers=1), progress=False)
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * trials
    assert ends(strict_journal(path)) == {tid: 1 for tid in range(trials)}
    runs = Counter(int(line) for line in (work / "ran.txt").read_text().split())
    assert all(runs[tid] == 1 for tid in ended_before), runs  # ended trials were not run again
    assert json.loads((path / "experiment.json").read_text())["status"] == "completed"


def test_a_journal_with_damaged_lines_reads_every_whole_event(tmp_path: Path) -> None:
    """The journal is parsed as one JSON array; a damaged line (torn, not JSON, two values on one line,
    not an object) sends it back line by line, and only the whole events come back, in order."""
    from unison.driver.store import parse_journal

    events = [{"e": "start", "id": i, "hparams": {"x": i / 10}} for i in range(5)]
    whole = "".join(json.dumps(e) + "\n" for e in events).encode()
    assert parse_journal(whole) == events
    assert parse_journal(whole + b'{"e": "end", "id"') == events  # torn last line: no newline
    assert parse_journal(whole + b'{"e": "end"}') == [*events, {"e": "end"}]  # whole, just unended
    damaged = [json.dumps(events[0]), "{not json", json.dumps(events[1]) + ", " + json.dumps(events[2]),
               "[1, 2]", "", json.dumps(events[3]), '"\xff"']
    assert parse_journal("\n".join(damaged).encode() + b"\n") == [events[0], events[3]]
    store = ExperimentStore.create(tmp_path, "x")
    for event in events:
        store.append(event)
    assert ExperimentStore(store.path).read_journal() == events
    store.close()
