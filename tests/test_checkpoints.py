"""Checkpoints (issue 16): saved with a report, kept and pruned, loaded back, resumed from after a
worker or the driver was SIGKILLed (real processes, the local backend) and on the inline backend."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import protocol
from unison.errors import StorageFull
from unison.worker import checkpoints
from unison.worker.checkpoints import Policy, load_checkpoint, prune, save_checkpoint

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers_checkpoint must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from helpers_checkpoint import STEPS, expected_loss, make_search, train  # noqa: E402
from processes import alive, journal, start_script, wait_for  # noqa: E402


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in root.iterdir() if p.name.startswith("step-"))


def _trajectory(lr: float) -> list[float]:
    """The loss :func:`helpers_checkpoint.train` reports at each step."""
    w, losses = 1.0, []
    for step in range(STEPS):
        w = w * (1 - lr) + 0.001 * step
        losses.append(w)
    return losses


# ------------------------------------------------------------------ saving, loading, pruning
def test_an_object_is_saved_atomically_and_loads_back(tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path / "checkpoints", {"w": [1, 2, 3]}, 7, value=0.5)
    assert info["path"] == "checkpoints/step-000007" and info["step"] == 7 and info["size"] > 0
    folder = tmp_path / info["path"]
    assert json.loads((folder / "meta.json").read_text())["format"] == "pickle"
    assert load_checkpoint(folder) == {"w": [1, 2, 3]}
    assert load_checkpoint(folder / "object.pkl") == {"w": [1, 2, 3]}  # a file of it names it too
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000007"]  # no temp left


def test_a_negative_step_has_a_folder_the_protocol_accepts(tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path / "checkpoints", 1, -3)
    assert info["path"] == "checkpoints/step--000003"
    report = {"t": "report", "trial_id": 0, "step": -3, "metrics": {}, "checkpoint": info}
    assert protocol.validate(report, protocol.DRIVER) is report
    assert load_checkpoint(tmp_path / info["path"]) == 1


def test_a_directory_is_copied_and_loads_as_its_path(tmp_path: Path) -> None:
    source = tmp_path / "mine"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "weights.bin").write_bytes(b"abc")
    info = save_checkpoint(tmp_path / "checkpoints", source, 3)
    (source / "sub" / "weights.bin").write_bytes(b"changed later")  # the checkpoint is a copy
    restored = load_checkpoint(tmp_path / info["path"])
    assert (restored / "sub" / "weights.bin").read_bytes() == b"abc"


def test_a_torch_state_dict_is_saved_with_torch_save(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    info = save_checkpoint(tmp_path / "checkpoints", {"model": model.state_dict(), "epoch": 4}, 4)
    folder = tmp_path / info["path"]
    assert (folder / "object.pt").is_file()
    loaded = load_checkpoint(folder)
    assert loaded["epoch"] == 4
    assert torch.equal(loaded["model"]["weight"], model.state_dict()["weight"])


def test_a_path_that_is_no_directory_says_what_to_pass(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file.*Write the checkpoint's files into a directory"):
        save_checkpoint(tmp_path / "checkpoints", tmp_path / "model.pt", 0)
    with pytest.raises(ValueError, match="is not there"):
        save_checkpoint(tmp_path / "checkpoints", str(tmp_path / "missing"), 0)


def test_an_unpicklable_checkpoint_names_its_type_and_what_to_pass(tmp_path: Path) -> None:
    reporter = unison.Reporter(checkpointer=checkpoints.Checkpointer(tmp_path, Policy()))
    with pytest.raises(TypeError, match=r"cannot save a _thread\.lock.*state_dict.*plain dict"):
        reporter.report(step=0, checkpoint=threading.Lock(), loss=1.0)
    assert reporter.count == 0  # nothing was recorded
    assert not list(tmp_path.iterdir())  # and nothing left behind


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path: Path, monkeypatch: Any) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, {"w": 1}, 1)

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "_write_file", full)
    with pytest.raises(StorageFull, match="step 2.*The checkpoints saved before are intact"):
        save_checkpoint(root, {"w": 2}, 2)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == ["step-000001"]
    assert load_checkpoint(root / "step-000001") == {"w": 1}


def test_pruning_keeps_the_last_ones_and_the_best(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step, loss in enumerate([5.0, 1.0, 3.0, 4.0, 6.0]):
        save_checkpoint(root, {"step": step}, step, value=loss)
    (root / "step-000009").mkdir()  # a deletion cut short: no meta.json
    (root / ".tmp-step-000010-999999999").mkdir()  # a write of a process that died
    assert prune(root, Policy(keep=2, metric="loss", mode="min")) == [0, 2]
    assert _steps(root) == [1, 3, 4]
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000003", "step-000004"]
    prune(root, Policy(keep=1, metric=None))
    assert _steps(root) == [4]


def test_keep_checkpoints_is_checked() -> None:
    with pytest.raises(ValueError, match=r"Search\(keep_checkpoints=0\) must be an int of at least 1"):
        unison.Search({"x": unison.uniform(0, 1)}, keep_checkpoints=0)
    with pytest.raises(ValueError, match=r"Ablation\(keep_checkpoints='2'\)"):
        unison.Ablation({"x": 1}, features={"a": ["a"]}, keep_checkpoints="2")  # type: ignore[arg-type]
    search = unison.Search({"x": unison.uniform(0, 1)}, keep_checkpoints=3)
    assert unison.Search.from_dict(search.to_dict()).keep_checkpoints == 3
    assert search.replace(trials=4).keep_checkpoints == 3


def test_the_protocol_checks_checkpoint_fields() -> None:
    report = {"t": "report", "trial_id": 1, "step": 3, "metrics": {"loss": 1.0},
              "checkpoint": {"step": 3, "path": "checkpoints/step-000003", "size": 10}}
    assert protocol.validate(report, protocol.DRIVER) is report
    bad = {**report, "checkpoint": {"step": 3, "path": "../../elsewhere", "size": 10}}
    with pytest.raises(protocol.MalformedMessage, match=r"'checkpoint'\['path'\] must match"):
        protocol.validate(bad, protocol.DRIVER)
    trial = {"t": "trial", "trial_id": 1, "hparams": {}, "trial_dir": "/x",
             "checkpoint": {"keep": 2, "metric": "loss", "mode": "min", "path": "/x/c", "step": 4}}
    assert protocol.validate(trial, protocol.WORKER) is trial
    with pytest.raises(protocol.MalformedMessage, match=r"'checkpoint'\['keep'\] is missing"):
        protocol.validate({**trial, "checkpoint": {"path": "/x/c"}}, protocol.WORKER)


# ---------------------------------------------------------------------------- inline searches
def test_inline_search_records_checkpoints_and_keeps_the_last_ones(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = unison.run(train, make_search(work, trials=2, keep=1), backend="inline", storage=tmp_path / "runs",
                   progress=False)
    assert list(r.trials["status"]) == ["completed", "completed"]
    for row in r.rows:
        assert row["checkpoint"] == str(r.path / "trials" / f"{row['trial_id']:04d}" / "checkpoints" /
                                        f"step-{STEPS - 1:06d}")
        assert load_checkpoint(row["checkpoint"])["w"] == pytest.approx(expected_loss(row["hparams"]["lr"]))
        # keep=1: the last one, plus the best by the loss (it falls, then rises again)
        losses = _trajectory(row["hparams"]["lr"])
        best = losses.index(min(losses))
        assert _steps(Path(row["checkpoint"]).parent) == sorted({best, STEPS - 1})
    assert r.best is not None and r.best.checkpoint is not None
    assert list(r.trials["checkpoint"]) == [row["checkpoint"] for row in r.rows]
    events = [ev for ev in journal(r.path) if ev["e"] == "checkpoint"]
    assert len(events) == 2 * STEPS
    assert events[0]["path"] == "trials/0000/checkpoints/step-000000" and events[0]["size"] > 0
    assert unison.load(r.path).best.checkpoint == r.best.checkpoint  # read back from the journal
    ran = (work / "computed.txt").read_text().splitlines()
    assert ran.count("0 0 start 0") == 1  # a first attempt has no checkpoint


def test_inline_directory_checkpoints_and_the_unpicklable_error(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = unison.run(train, make_search(work, form="directory"), backend="inline", storage=tmp_path / "runs",
                   progress=False)
    restored = load_checkpoint(r.best.checkpoint)  # type: ignore[union-attr]
    assert float((restored / "w.txt").read_text()) == pytest.approx(expected_loss(r.best.hparams["lr"]))  # type: ignore[union-attr]

    def bad(reporter: Any) -> float:
        reporter.report(step=0, checkpoint=threading.Lock(), value=1.0)
        return 1.0

    failed = unison.run(bad, unison.Search({}, trials=1), backend="inline", storage=tmp_path / "bad",
                        progress=False)
    assert failed.rows[0]["status"] == "failed"
    assert "cannot save a _thread.lock" in failed.rows[0]["error"]
    assert "a directory you wrote" in failed.rows[0]["error"]


# ------------------------------------------------------------- real processes: SIGKILL
@pytest.mark.slow
@pytest.mark.parametrize("form", ["object", "directory"])
def test_a_worker_killed_at_step_12_resumes_from_its_checkpoint(tmp_path: Path, form: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = unison.run(train, make_search(work, kill_at=12, form=form), backend=unison.Local(workers=2),
                   storage=tmp_path / "runs", progress=False)
    assert r.rows[0]["status"] == "completed", r.rows[0]["error"]
    assert r.rows[0]["attempts"] == 2
    events = journal(r.path)
    lost = next(i for i, ev in enumerate(events) if ev["e"] == "lost")
    before = [ev["step"] for ev in events[:lost] if ev["e"] == "report"]
    after = [ev["step"] for ev in events[lost:] if ev["e"] == "report"]
    assert before == list(range(12)) and after == list(range(12, STEPS))  # 0..11 were not recomputed
    computed = (work / "computed.txt").read_text().splitlines()
    assert "0 1 start 12" in computed
    assert [line for line in computed if line.startswith("0 1 ") and "start" not in line] == \
        [f"0 1 {step}" for step in range(12, STEPS)]
    # the same final metrics as an uninterrupted run
    fresh = unison.run(train, make_search(tmp_path / "work", form=form), backend="inline",
                       storage=tmp_path / "fresh", progress=False)
    assert r.rows[0]["metrics"] == fresh.rows[0]["metrics"]
    assert r.rows[0]["metrics"]["loss"] == pytest.approx(expected_loss(r.rows[0]["hparams"]["lr"]))


def _run_driver(tmp_path: Path, backend: str, trials: int) -> tuple[subprocess.Popen[bytes], Path, Path]:
    storage, work = tmp_path / "runs", tmp_path / "work"
    storage.mkdir()
    work.mkdir()
    return start_script(tmp_path, "checkpoint_driver.py", storage, work, trials, 0.15, backend), storage, work


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "inline"])
def test_a_resumed_search_restarts_running_trials_from_their_checkpoints(tmp_path: Path,
                                                                         backend: str) -> None:
    trials = 2
    proc, storage, work = _run_driver(tmp_path, backend, trials)
    try:
        path = wait_for(lambda: [p for p in storage.iterdir() if (p / "journal.jsonl").is_file()], 30,
                        "the experiment's journal")[0]
        wanted = {0} if backend == "inline" else {0, 1}  # inline runs one trial at a time

        def checkpointed() -> bool:
            steps: dict[int, int] = {}
            for ev in journal(path):
                if ev["e"] == "checkpoint":
                    steps[ev["id"]] = ev["step"]
            return all(steps.get(tid, -1) >= 4 for tid in wanted)

        wait_for(checkpointed, 60, f"trials {wanted} to checkpoint step 4")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    before = journal(path)
    last = {}
    for ev in before:
        if ev["e"] == "checkpoint":
            last[ev["id"]] = ev["step"]
    wait_for(lambda: not [ev for ev in before if ev["e"] == "start" and ev.get("pid") and alive(ev["pid"])
                          and ev["pid"] != os.getpid()], 10, "the orphaned workers to exit")

    chosen = unison.Local(workers=2) if backend == "local" else "inline"
    r = unison.resume(path, train, backend=chosen, progress=False)
    assert r.status == "completed"
    assert list(r.trials["status"]) == ["completed"] * trials
    computed = (work / "computed.txt").read_text().splitlines()
    for tid, step in last.items():
        starts = [line for line in computed if line.startswith(f"{tid} ") and " start " in line]
        # the first run started at 0; the resumed run at the step after the checkpoint journaled last
        # (or one an orphaned worker saved in its last moment: never from scratch)
        assert starts[0].endswith("start 0") and len(starts) == 2, starts
        assert int(starts[1].split()[-1]) >= step + 1, (starts, step)
        assert computed.count(f"{tid} 0 0") + computed.count(f"{tid} 1 0") <= 1  # step 0 ran once
    for row in r.rows:
        assert row["metrics"]["loss"] == pytest.approx(expected_loss(row["hparams"]["lr"]))


def test_a_result_read_back_has_the_same_checkpoints(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    r = unison.run(train, make_search(work, trials=2), backend="inline", storage=tmp_path / "runs",
                   progress=False)
    loaded = unison.load(r.path)
    assert loaded.rows == r.rows
    assert json.loads((r.path / "result.json").read_text())["best"]["checkpoint"] == str(r.best.checkpoint)  # type: ignore[union-attr]


def test_a_single_run_journals_its_checkpoints_and_torch_stays_unloaded(tmp_path: Path) -> None:
    script = f"""
import sys, unison
def train(reporter):
    for step in range(3):
        reporter.report(step=step, checkpoint={{"step": step}}, value=step)
    return step
r = unison.run(train, hparams={{}}, storage={str(tmp_path)!r}, progress=False)
import json
events = [json.loads(l) for l in open(r.path / "journal.jsonl")]
print([e["path"] for e in events if e["e"] == "checkpoint"])
print(unison.load_checkpoint(r.path / "trials/0000/checkpoints/step-000002"))
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-3] == str([f"trials/0000/checkpoints/step-{s:06d}" for s in range(3)])
    assert lines[-2] == "{'step': 2}"
    assert lines[-1] == "False"  # a checkpoint without tensors never imports torch
