"""``checkpoint_storage=`` (issue 16): workers write checkpoints to shared storage, an fsspec URL or a
plain path, instead of the experiment folder: saved, pruned and loaded there; a SIGKILLed worker's
retry and a resumed search continue from there; a bad URL fails before any trial runs; and on Spark
``local-cluster`` the executors write there themselves. Real fsspec file systems (``file://``, and
``memory://`` for a file system that is not this machine's), real worker processes, real Spark."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import cli
from unison.worker.checkpoints import Policy, copy_checkpoint_url, load_checkpoint, prune, save_checkpoint

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # helpers_checkpoint must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from helpers_checkpoint import STEPS, expected_loss, make_search, train  # noqa: E402
from processes import journal  # noqa: E402

pytest.importorskip("fsspec")


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in folder.iterdir() if p.name.startswith("step-"))


def _location(kind: str, folder: Path) -> str:
    """``checkpoint_storage=`` for ``folder``: fsspec's ``file://`` URL, or the plain path."""
    return f"file://{folder}" if kind == "url" else str(folder)


def _local(location: str) -> Path:
    return Path(location.removeprefix("file://"))


# --------------------------------------------------------------------- on an fsspec file system
def test_a_url_checkpoint_is_written_meta_last_pruned_and_loaded(tmp_path: Path) -> None:
    root = f"file://{tmp_path}/ckpts"
    policy = Policy(keep=2, metric="loss", mode="min")
    for step, loss in enumerate([5.0, 1.0, 3.0, 4.0, 6.0]):
        info = save_checkpoint(root, {"w": step}, step, loss)
        assert info == {"step": step, "path": f"checkpoints/step-{step:06d}", "size": info["size"]}
        prune(root, policy)
    assert _steps(tmp_path / "ckpts") == [1, 3, 4]  # the last two, and the best (loss 1.0)
    assert load_checkpoint(f"{root}/step-000004") == {"w": 4}
    assert load_checkpoint(f"{root}/step-000001/meta.json") == {"w": 1}  # a file of it names it too
    # a folder without meta.json (a write cut short) is no checkpoint, and the next prune removes it
    (tmp_path / "ckpts" / "step-000009").mkdir()
    (tmp_path / "ckpts" / "step-000009" / "object.pkl").write_bytes(b"half")
    with pytest.raises(FileNotFoundError, match="not a unison checkpoint"):
        load_checkpoint(f"{root}/step-000009")
    assert prune(root, policy) == [] and _steps(tmp_path / "ckpts") == [1, 3, 4]
    # the same step saved again replaces it
    save_checkpoint(root, {"w": "again"}, 4, 2.0)
    assert load_checkpoint(f"{root}/step-000004") == {"w": "again"}
    meta = json.loads((tmp_path / "ckpts" / "step-000004" / "meta.json").read_text())
    assert meta["format"] == "pickle" and meta["value"] == 2.0


def test_a_directory_checkpoint_on_a_remote_file_system_is_downloaded(tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "weights.bin").write_bytes(bytes(range(256)))
    (source / "sub" / "config.json").write_text('{"layers": 3}')
    root = f"memory://unison-test-{os.getpid()}/trials/0000/checkpoints"
    info = save_checkpoint(root, source, 3)
    assert info["size"] == 256 + len('{"layers": 3}')
    restored = load_checkpoint(f"{root}/step-000003")  # memory:// is not this machine's disk: a copy
    assert isinstance(restored, Path) and not str(restored).startswith("memory")
    assert (restored / "weights.bin").read_bytes() == bytes(range(256))
    assert (restored / "sub" / "config.json").read_text() == '{"layers": 3}'
    with pytest.raises(TypeError, match="cannot save a _thread.lock"):
        import threading

        save_checkpoint(root, threading.Lock(), 3)
    assert load_checkpoint(f"{root}/step-000003").is_dir()  # a failed save of the same step: untouched


def test_a_url_checkpoint_is_copied_for_a_clone(tmp_path: Path) -> None:
    source_root, clone_root = f"file://{tmp_path}/0000/checkpoints", f"file://{tmp_path}/0009/checkpoints"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.txt").write_text("0.25")
    save_checkpoint(source_root, tmp_path / "model", 12, 0.5)
    copied = copy_checkpoint_url(f"{source_root}/step-000012", clone_root)
    assert copied == f"{clone_root}/step-000012"
    assert (load_checkpoint(copied) / "w.txt").read_text() == "0.25"
    prune(source_root, Policy(keep=0))  # the source's pruning leaves the copy whole
    assert not (tmp_path / "0000" / "checkpoints" / "step-000012").exists()
    assert json.loads((tmp_path / "0009/checkpoints/step-000012/meta.json").read_text())["value"] == 0.5
    with pytest.raises(FileNotFoundError, match="not a unison checkpoint"):
        copy_checkpoint_url(f"{source_root}/step-000012", clone_root)


def test_import_unison_loads_no_fsspec() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, unison; unison.run; unison.load_checkpoint; "
                           "print('fsspec' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ------------------------------------------------------------------------------ searches
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["url", "path"])
def test_a_local_search_keeps_its_checkpoints_on_the_shared_storage(
        tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    work, shared = tmp_path / "work", tmp_path / "shared"
    work.mkdir()
    location = _location(kind, shared)
    r = unison.run(train, make_search(work, trials=2, keep=1), backend=unison.Local(workers=2),
                   storage=tmp_path / "runs", checkpoint_storage=location, progress=False)
    assert list(r.trials["status"]) == ["completed", "completed"], r.trials["error"]
    assert json.loads((r.path / "experiment.json").read_text())["checkpoint_storage"] == location
    assert not list(r.path.glob("trials/*/checkpoints"))  # nothing under the experiment folder
    for row in r.rows:
        trial = f"{row['trial_id']:04d}"
        expected = f"{location}/{r.path.name}/trials/{trial}/checkpoints/step-{STEPS - 1:06d}"
        assert row["checkpoint"] == expected
        assert load_checkpoint(row["checkpoint"])["w"] == pytest.approx(expected_loss(row["hparams"]["lr"]))
        # pruned there: keep=1 keeps the last one plus the best by the loss
        losses, w = [], 1.0
        for step in range(STEPS):
            w = w * (1 - row["hparams"]["lr"]) + 0.001 * step
            losses.append(w)
        folder = shared / r.path.name / "trials" / trial / "checkpoints"
        assert _steps(folder) == sorted({losses.index(min(losses)), STEPS - 1})
    events = [ev for ev in journal(r.path) if ev["e"] == "checkpoint"]
    assert len(events) == 2 * STEPS and all(ev["path"].startswith(f"{location}/") for ev in events)
    assert r.best is not None and r.best.checkpoint is not None
    assert str(r.best.checkpoint) == r.rows[r.best.trial_id]["checkpoint"]
    assert unison.load(r.path).best.checkpoint == r.best.checkpoint  # type: ignore[union-attr]
    assert load_checkpoint(r.best.checkpoint)["w"] == pytest.approx(expected_loss(r.best.hparams["lr"]))
    assert cli.main(["show", "--wide", str(r.path)]) == 0
    assert f"its checkpoint: {r.best.checkpoint} " in capsys.readouterr().out


@pytest.mark.slow
def test_a_worker_killed_mid_trial_resumes_from_the_shared_storage(tmp_path: Path) -> None:
    work, shared = tmp_path / "work", tmp_path / "shared"
    work.mkdir()
    r = unison.run(train, make_search(work, kill_at=12), backend=unison.Local(workers=2),
                   storage=tmp_path / "runs", checkpoint_storage=f"file://{shared}", progress=False)
    assert r.rows[0]["status"] == "completed", r.rows[0]["error"]
    assert r.rows[0]["attempts"] == 2
    events = journal(r.path)
    lost = next(i for i, ev in enumerate(events) if ev["e"] == "lost")
    assert [ev["step"] for ev in events[lost:] if ev["e"] == "report"] == list(range(12, STEPS))
    computed = (work / "computed.txt").read_text().splitlines()
    assert "0 1 start 12" in computed  # the retry read step 11's checkpoint from the URL
    assert r.rows[0]["metrics"]["loss"] == pytest.approx(expected_loss(r.rows[0]["hparams"]["lr"]))
    assert _steps(shared / r.path.name / "trials" / "0000" / "checkpoints")[-1] == STEPS - 1


def _interrupted_once(lr: float, workdir: str, reporter: Any, ctx: Any) -> dict[str, float]:
    """6 steps checkpointed; the first time step 3 comes, Ctrl-C (the search is interrupted)."""
    start = ctx.checkpoint_step + 1 if ctx.checkpoint else 0
    w = ctx.checkpoint["w"] if ctx.checkpoint else 1.0
    with open(Path(workdir) / "starts.txt", "a", encoding="utf-8") as log:
        log.write(f"{ctx.trial_id} {start}\n")
    for step in range(start, 6):
        if step == 3 and not (Path(workdir) / "interrupted").exists():
            (Path(workdir) / "interrupted").touch()
            raise KeyboardInterrupt
        w = w * (1 - lr)
        reporter.report(step=step, checkpoint={"w": w}, loss=w)
    return {"loss": w}


def test_a_resumed_search_uses_the_recorded_checkpoint_storage(tmp_path: Path) -> None:
    work, runs, shared = tmp_path / "work", tmp_path / "runs", tmp_path / "shared"
    work.mkdir()
    search = unison.Search({"lr": 0.5, "workdir": str(work)}, metric="loss", mode="min", trials=1)
    with pytest.raises(KeyboardInterrupt):
        unison.run(_interrupted_once, search, backend="inline", storage=runs,
                   checkpoint_storage=f"file://{shared}", progress=False)
    [path] = list(runs.iterdir())
    with pytest.raises(ValueError, match="keeps its checkpoints in checkpoint_storage="):
        unison.run(_interrupted_once, search, backend="inline", resume=path,
                   checkpoint_storage=tmp_path / "elsewhere", progress=False)
    r = unison.resume(path, _interrupted_once, backend="inline", progress=False)
    assert r.status == "completed"
    assert (work / "starts.txt").read_text().splitlines() == ["0 0", "0 3"]  # from step 2's checkpoint
    assert r.rows[0]["metrics"]["loss"] == pytest.approx(0.5 ** 6)
    assert r.rows[0]["checkpoint"] == f"file://{shared}/{path.name}/trials/0000/checkpoints/step-000005"
    assert not (tmp_path / "elsewhere").exists()


def test_a_storage_the_driver_cannot_use_fails_before_any_trial(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    cases = {"nosuch://bucket/ckpts": "fsspec knows no protocol 'nosuch'",
             f"file://{tmp_path}/a-file/ckpts": "the driver cannot create files there",
             str(tmp_path / "a-file" / "ckpts"): "the driver cannot create files there"}
    for location, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            unison.run(train, make_search(work), backend="inline", storage=tmp_path / "runs",
                       checkpoint_storage=location, progress=False)
        assert repr(location) in str(info.value) and "every worker" in str(info.value)
    assert not (tmp_path / "runs").exists()  # nothing was written: no experiment, no trial ran
    assert not (work / "computed.txt").exists()
    with pytest.raises(ValueError, match="a single run saves them in its experiment folder"):
        unison.run(train, hparams={}, checkpoint_storage=str(tmp_path / "shared"))


# ---------------------------------------------------------------------------------- Spark
def _spark_train(x: float, reporter: Any, ctx: Any) -> dict[str, float]:
    for step in range(4):
        reporter.report(step=step, checkpoint={"x": x, "step": step, "pid": os.getpid()}, value=x * step)
    return {"value": 3 * x}


@pytest.mark.slow
def test_spark_executors_write_checkpoints_to_the_shared_path(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path) -> None:
    from spark_support import cluster_session  # skips without pyspark

    spark = cluster_session(tmp_path_factory.getbasetemp())
    search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="value", mode="max", trials=4, seed=0,
                           keep_checkpoints=1)
    shared = tmp_path / "shared"
    r = unison.run(_spark_train, search, backend=unison.Spark(spark), storage=tmp_path / "runs",
                   checkpoint_storage=shared, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 4, r.trials["error"]
    for row in r.rows:
        folder = shared / r.path.name / "trials" / f"{row['trial_id']:04d}" / "checkpoints"
        assert _steps(folder) == [3]  # keep=1, and the best by value is the last one too
        saved = load_checkpoint(folder / "step-000003")
        assert saved["x"] == row["hparams"]["x"] and saved["pid"] == row["pid"] != os.getpid()
    assert not list(r.path.glob("trials/*/checkpoints"))
    assert r.best is not None and r.best.checkpoint == Path(shared / r.path.name / "trials" /
                                                            f"{r.best.trial_id:04d}" / "checkpoints" /
                                                            "step-000003")
    assert load_checkpoint(r.best.checkpoint)["x"] == r.best.hparams["x"]
