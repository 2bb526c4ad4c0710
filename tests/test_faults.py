"""Fault tests of the local backend with real worker processes (no mocks).

Workers killed mid-trial, strangers on the driver's port, training functions that raise or return
nonsense, the driver itself killed or interrupted, and per-trial output capture.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import protocol

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers_train must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from helpers_train import make_search, train  # noqa: E402
from processes import alive, journal, read_until_closed, start_driver, wait_for  # noqa: E402

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------- helpers
def children(ppid: int) -> set[int]:
    """The pids whose parent is ``ppid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            found.add(int(entry.name))
    return found


def ended(path: Path) -> set[int]:
    return {ev["id"] for ev in journal(path) if ev.get("e") == "end"}


def experiment_dir(storage: Path) -> Path:
    """The single experiment folder under ``storage`` (once it exists)."""
    return wait_for(lambda: [p for p in storage.iterdir() if (p / "journal.jsonl").is_file()],
                    20, f"an experiment journal under {storage}")[0]


def local(workers: int = 2) -> unison.Local:
    return unison.Local(workers=workers)


def worker_pids(work: Path) -> set[int]:
    return {int(p.read_text()) for p in work.glob("pid-*") if p.read_text()}


# ------------------------------------------------------------- 1. a worker killed in a trial
def _assert_retried(r: unison.SearchResult, killed: int, trials: int) -> None:
    frame = r.trials
    assert len(frame) == trials
    assert list(frame["status"]) == ["completed"] * trials, frame[["trial_id", "status", "error"]]
    attempts = dict(zip(frame["trial_id"], frame["attempts"], strict=True))
    assert attempts[killed] == 2
    assert all(n == 1 for tid, n in attempts.items() if tid != killed)
    lost = [ev for ev in journal(r.path) if ev["e"] == "lost"]
    assert [(ev["id"], ev["attempt"]) for ev in lost] == [(killed, 0)]
    assert r.status == "completed"


# With random search a busy worker also holds its next trial (not started): its death must put that
# trial back without counting an attempt.
@pytest.mark.parametrize("optimizer", ["tpe", "random"])
def test_worker_that_kills_itself_mid_trial_is_retried(tmp_path: Path, optimizer: str) -> None:
    def fn(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1 and ctx.attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)
        return x

    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=6, seed=1, optimizer=optimizer),
                   backend=local(), storage=tmp_path, progress=False)
    _assert_retried(r, killed=1, trials=6)


@pytest.mark.parametrize("optimizer", ["tpe", "random"])
def test_worker_killed_from_outside_mid_trial_is_retried(tmp_path: Path, optimizer: str) -> None:
    work = tmp_path / "work"
    work.mkdir()

    def fn(x: float, ctx: Any) -> float:
        (work / f"pid-{ctx.trial_id}-{ctx.attempt}").write_text(str(os.getpid()))
        time.sleep(30 if (ctx.trial_id, ctx.attempt) == (0, 0) else 0.05)
        return x

    killed: list[int] = []

    def killer() -> None:
        pid_file = work / "pid-0-0"
        pid = wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 20, "trial 0 to start")
        os.kill(int(pid), signal.SIGKILL)
        killed.append(int(pid))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    start = time.monotonic()
    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=6, seed=2, optimizer=optimizer),
                   backend=local(), storage=tmp_path / "runs", progress=False)
    thread.join(5)
    assert killed, "the test never killed the worker"
    assert time.monotonic() - start < 20  # the loss was noticed at once, not after the 30 s sleep
    _assert_retried(r, killed=0, trials=6)
    assert int((work / "pid-0-1").read_text()) != killed[0]  # the retry ran in another process


def test_worker_death_with_no_retries_fails_the_trial_and_the_search_goes_on(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        if ctx.trial_id == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=5, seed=3, max_retries=0),
                   backend=local(), storage=tmp_path, progress=False)
    assert r.status == "completed"
    by_id = {row["trial_id"]: row for row in r.rows}
    assert by_id[1]["status"] == "failed"
    assert by_id[1]["attempts"] == 1
    assert "died" in by_id[1]["error"] and "max_retries=0" in by_id[1]["error"]
    assert [by_id[t]["status"] for t in (0, 2, 3, 4)] == ["completed"] * 4
    assert [ev["id"] for ev in journal(r.path) if ev["e"] == "lost"] == [1]


# ------------------------------------------------------- 2. strangers on the driver's socket
def _listening_address(port: int) -> str | None:
    """The local address (hex, as in /proc/net/tcp) of the socket listening on ``port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                return address
    return None


def test_wrong_secret_garbage_and_silent_peers_do_not_disturb_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "HANDSHAKE_TIMEOUT_S", 1.0)  # the driver runs in this process
    work = tmp_path / "work"
    work.mkdir()
    done_marker = work / "attacks-done"

    def fn(x: float, ctx: Any) -> float:
        (work / "address").write_text(os.environ["UNISON_DRIVER"])
        deadline = time.monotonic() + 15
        while not done_marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # every trial waits for the attacks: the search is live during them
        return x

    findings: dict[str, Any] = {}

    def attack() -> None:
        try:
            text = wait_for(lambda: (work / "address").is_file() and (work / "address").read_text(),
                            20, "a trial to write the driver address")
            host, port = text.rsplit(":", 1)
            address = (host, int(port))
            findings["host"] = host
            findings["listening"] = _listening_address(int(port))
            silent = socket.create_connection(address, timeout=5)
            try:
                protocol.client_connect(address, os.urandom(protocol.SECRET_BYTES), timeout=5)
                findings["wrong_secret"] = "accepted"
            except ConnectionError as exc:  # ProtocolError is a ConnectionError
                findings["wrong_secret"] = type(exc).__name__
            with socket.create_connection(address, timeout=5) as garbage:
                header = protocol._recv_exact(garbage, len(protocol.MAGIC) + protocol.NONCE_BYTES)
                garbage.sendall(os.urandom(200))  # not an answer to the challenge: bytes of noise
                findings["garbage"] = header + read_until_closed(garbage, 5)
            started = time.monotonic()
            findings["silent"] = read_until_closed(silent, 5)
            findings["silent_wait"] = time.monotonic() - started
            silent.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            findings["error"] = exc
        finally:
            done_marker.write_text("done")

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=6, seed=4),
                   backend=local(), storage=tmp_path / "runs", progress=False)
    thread.join(10)
    assert "error" not in findings, findings.get("error")
    assert findings["host"] == "127.0.0.1"
    assert findings["listening"] == "0100007F"  # 127.0.0.1, not 0.0.0.0: unreachable from other hosts
    assert findings["wrong_secret"] != "accepted"
    # The driver sends its challenge, then hangs up on a peer that cannot answer it.
    for key in ("garbage", "silent"):
        assert len(findings[key]) == len(protocol.MAGIC) + protocol.NONCE_BYTES, findings[key]
        assert findings[key].startswith(protocol.MAGIC)
    assert findings["silent_wait"] < 4  # dropped after the handshake timeout, not kept open
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * 6
    assert not [ev for ev in journal(r.path) if ev["e"] == "lost"]


# ----------------------------------------------------------------- 3. functions that fail
def test_raising_trial_fails_with_its_traceback_and_the_others_complete(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> float:
        if ctx.trial_id == 2:
            raise ValueError(f"boom in trial {ctx.trial_id}")
        return x

    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=5, seed=5),
                   backend=local(), storage=tmp_path, progress=False)
    assert r.status == "completed"
    frame = r.trials.set_index("trial_id")
    assert frame.loc[2, "status"] == "failed"
    assert frame.loc[2, "error"] == "ValueError: boom in trial 2"
    assert frame.loc[2, "attempts"] == 1  # an exception is the function's fault: never retried
    assert [frame.loc[t, "status"] for t in (0, 1, 3, 4)] == ["completed"] * 4
    end = [ev for ev in journal(r.path) if ev["e"] == "end" and ev["id"] == 2]
    assert len(end) == 1 and end[0]["status"] == "failed"
    assert end[0]["error"].startswith("Traceback (most recent call last)")
    assert "in fn" in end[0]["error"] and "ValueError: boom in trial 2" in end[0]["error"]
    assert "ValueError: boom in trial 2" in (r.path / "trials" / "0002" / "stderr.log").read_text()


@pytest.mark.parametrize("optimizer", ["tpe", "random"])
def test_max_failures_aborts_naming_the_first_failure(tmp_path: Path, optimizer: str) -> None:
    def fn(x: float, ctx: Any) -> float:
        if ctx.trial_id in (1, 3, 5):
            raise RuntimeError(f"broken trial {ctx.trial_id}")
        time.sleep(0.05)
        return x

    search = unison.Search({"x": unison.uniform(0, 1)}, trials=12, seed=6, max_failures=2,
                           optimizer=optimizer)
    with pytest.raises(unison.SearchAborted) as info:
        unison.run(fn, search, backend=local(), storage=tmp_path, progress=False)
    message = str(info.value)
    path = next(tmp_path.iterdir())
    failed = [ev["id"] for ev in journal(path) if ev["e"] == "end" and ev["status"] == "failed"]
    assert len(failed) >= 2
    first = failed[0]
    assert "max_failures=2" in message
    assert f"trial {first} with" in message and f"RuntimeError: broken trial {first}" in message
    meta = json.loads((path / "experiment.json").read_text())
    assert meta["status"] == "aborted"
    assert len(ended(path)) < 12  # it stopped early
    # The record holds the trials that started (random search also hands busy workers their next
    # trial ahead: those never started and are not in it).
    started = {ev["id"] for ev in journal(path) if ev["e"] == "start"}
    rows = unison.SearchResult.load(path).rows
    assert {row["trial_id"] for row in rows} == started
    assert {row["status"] for row in rows} <= {"completed", "failed", "running"}


def test_nan_and_non_numeric_metrics_fail_their_trials(tmp_path: Path) -> None:
    def fn(x: float, ctx: Any) -> Any:
        if ctx.trial_id == 0:
            return float("nan")
        if ctx.trial_id == 1:
            return {"value": "not a number"}
        return {"value": x}

    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=4, seed=7),
                   backend=local(), storage=tmp_path, progress=False)
    assert r.status == "completed"
    rows = {row["trial_id"]: row for row in r.rows}
    assert rows[0]["status"] == "failed" and "nan" in rows[0]["error"] and "not finite" in rows[0]["error"]
    assert rows[1]["status"] == "failed"
    assert "'not a number'" in rows[1]["error"] and "str" in rows[1]["error"]
    assert "number" in rows[1]["error"].split("'not a number'", 1)[1]
    assert [rows[t]["status"] for t in (2, 3)] == ["completed"] * 2
    assert r.best is not None and r.best.trial_id in (2, 3)


def test_missing_metric_aborts_naming_the_returned_keys(tmp_path: Path) -> None:
    def fn(x: float) -> dict[str, float]:
        return {"acc": x, "f1": x / 2}

    search = unison.Search({"x": unison.uniform(0, 1)}, metric="loss", mode="min", trials=6, seed=8)
    with pytest.raises(unison.SearchAborted) as info:
        unison.run(fn, search, backend=local(), storage=tmp_path, progress=False)
    message = str(info.value)
    assert "['acc', 'f1']" in message and "'loss'" in message
    path = next(tmp_path.iterdir())
    assert json.loads((path / "experiment.json").read_text())["status"] == "aborted"


# ------------------------------------------------------------ 4. the driver process killed
def test_driver_killed_leaves_no_workers_and_resume_finishes_the_sequence(tmp_path: Path) -> None:
    trials = 10
    proc, storage, work = start_driver(tmp_path, trials=trials, sleep=0.4)
    try:
        path = experiment_dir(storage)
        wait_for(lambda: len(ended(path)) >= 2, 20, "two trials to end")
        workers = children(proc.pid) | worker_pids(work)
        proc.kill()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert len(workers) >= 2
    wait_for(lambda: not [p for p in workers if alive(p)], 8, f"orphaned workers {workers} to exit")

    before = journal(path)
    done_before = {ev["id"] for ev in before if ev["e"] == "end"}
    started_before = {ev["id"] for ev in before if ev["e"] == "start"}
    assert len(started_before) < trials  # there is something left to resume

    r = unison.resume(path, train, backend=unison.Local(workers=2), progress=False)
    assert r.status == "completed"
    assert len(r.trials) == trials
    assert list(r.trials["status"]) == ["completed"] * trials
    runs = Counter(int(line) for line in (work / "ran.txt").read_text().split())
    assert set(runs) == set(range(trials))
    assert all(runs[tid] == 1 for tid in done_before), runs  # ended trials were not run again
    assert json.loads((path / "experiment.json").read_text())["status"] == "completed"

    # The resumed search continued the seeded sequence: the same trials as an uninterrupted run.
    fresh = unison.run(lambda x, k: x + k, make_search(work, trials=trials, sleep=0.4),
                       backend="inline", storage=tmp_path / "fresh", progress=False)
    assert {row["trial_id"]: row["hparams"] for row in r.rows} == \
        {row["trial_id"]: row["hparams"] for row in fresh.rows}


# ------------------------------------------------------------------------------ 5. Ctrl-C
def test_ctrl_c_interrupts_stops_workers_and_is_resumable(tmp_path: Path) -> None:
    trials = 6
    proc, storage, work = start_driver(tmp_path, trials=trials, sleep=0.5)
    try:
        path = experiment_dir(storage)
        wait_for(lambda: len(list(work.glob("pid-*"))) >= 2, 20, "two trials to run")
        workers = children(proc.pid) | worker_pids(work)
        proc.send_signal(signal.SIGINT)
        proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = (tmp_path / "driver.out").read_text()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in output, output
    assert "finished:" not in output
    assert len(workers) >= 2
    assert not [p for p in workers if alive(p)], "worker processes outlived the interrupted driver"
    meta = json.loads((path / "experiment.json").read_text())
    assert meta["status"] == "interrupted"
    assert json.loads((path / "result.json").read_text())["status"] == "interrupted"
    assert len(ended(path)) < trials

    r = unison.resume(path, train, backend=unison.Local(workers=2), progress=False)
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * trials
    assert json.loads((path / "experiment.json").read_text())["status"] == "completed"


# ------------------------------------------------------------------ 6. output per trial
def test_worker_output_goes_to_the_trial_folder_not_the_driver(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    def fn(x: float, ctx: Any) -> float:
        print(f"hello from trial {ctx.trial_id}")
        print(f"warning from trial {ctx.trial_id}", file=sys.stderr)
        return x

    capfd.readouterr()
    r = unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=3, seed=9),
                   backend=local(), storage=tmp_path, progress=False)
    out, err = capfd.readouterr()
    assert list(r.trials["status"]) == ["completed"] * 3
    for tid in range(3):
        folder = r.path / "trials" / f"{tid:04d}"
        assert (folder / "stdout.log").read_text() == f"hello from trial {tid}\n"
        assert (folder / "stderr.log").read_text() == f"warning from trial {tid}\n"
    assert "from trial" not in out and "from trial" not in err


# ------------------------------------------------------------------ a worker that starts late
def test_a_late_worker_does_not_hold_up_the_end_of_the_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # worker-1 takes a second to start (a cold machine): worker-0 runs every trial and the search
    # is over before worker-1 connects. It must then exit by itself, not be waited for and killed.
    slow = tmp_path / "slowstart"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('UNISON_WORKER') == 'worker-1':\n    time.sleep(1.0)\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()  # (a sitecustomize runs as an interpreter starts: fresh workers)
    r = unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=3, seed=10),
                   backend=unison.Local(workers=2, start="fresh"), storage=tmp_path / "runs", progress=False)
    elapsed = time.monotonic() - start
    assert list(r.trials["status"]) == ["completed"] * 3
    assert set(r.trials["worker"]) == {"worker-0"}
    assert elapsed < 2.8, f"the search took {elapsed:.1f} s to shut down its workers"
