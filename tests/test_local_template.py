"""The local backend's worker template (``Local(start="fork-server", preload=[...])``): real template and
worker processes, and the isolation between experiments."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import unison
from unison.worker.fork_server import check_request


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of the test's own modules on the workers' (and this process's) path."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "f19_state.py").write_text("VALUE = None\n")
    (folder / "f19_heavy.py").write_text("LOADED = True\n")
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _sets_state(x: float) -> dict[str, float]:
    import f19_state

    leaked = f19_state.VALUE is not None
    f19_state.VALUE = "set by a trial"
    return {"loss": x, "leaked": float(leaked), "heavy": float("f19_heavy" in sys.modules),
            "forked": float(os.getppid() != int(os.environ["F19_DRIVER"])), "template": float(os.getppid())}


def _run(fn: Any, tmp_path: Path, trials: int = 2, **local: Any) -> unison.SearchResult:
    return unison.run(fn, unison.Search({"x": unison.uniform(0, 1)}, trials=trials, seed=0, metric="loss"),
                      backend=unison.Local(workers=1, **local), storage=tmp_path / "runs", progress=False)


@pytest.mark.slow
def test_a_trials_globals_never_reach_the_next_experiments_workers(
    tmp_path: Path, modules: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("F19_DRIVER", str(os.getpid()))
    first = _run(_sets_state, tmp_path, preload=["f19_heavy"])
    metrics = [row["metrics"] for row in first.rows]
    # One worker ran both trials: the second saw the first's global (same process), so it was kept...
    assert [m["leaked"] for m in metrics] == [0.0, 1.0]
    # ...and the preloaded module was there without the trial importing it, in a forked worker.
    assert all(m["heavy"] == 1.0 and m["forked"] == 1.0 for m in metrics)
    again = _run(_sets_state, tmp_path, trials=1, preload=["f19_heavy"])  # the same settings: kept template
    assert again.rows[0]["metrics"]["template"] == metrics[0]["template"]
    assert again.rows[0]["metrics"]["leaked"] == 0.0  # forked from the template, which ran no trial
    second = _run(_sets_state, tmp_path, trials=1)
    assert second.rows[0]["metrics"]["leaked"] == 0.0  # another template: nothing of the first experiment
    assert second.rows[0]["metrics"]["heavy"] == 0.0  # preload= belonged to the first backend
    fresh = _run(_sets_state, tmp_path, trials=1, start="fresh")
    assert fresh.rows[0]["metrics"]["forked"] == 0.0  # a fresh interpreter is the driver's own child


def _crashes_then_kills_the_template(x: float, ctx: Any) -> float:
    if ctx.trial_id == 0 and ctx.attempt == 0:
        os._exit(3)
    if ctx.trial_id == 1 and ctx.attempt == 0:
        os.kill(os.getppid(), signal.SIGKILL)  # the template (this worker dies with it)
        signal.pause()
    return x


@pytest.mark.slow
def test_a_crashed_worker_is_forked_again_and_a_dead_template_falls_back_to_fresh_starts(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    r = _run(_crashes_then_kills_the_template, tmp_path, trials=3)
    assert [row["status"] for row in r.rows] == ["completed"] * 3
    assert "the local worker template is gone" in capfd.readouterr().err
    logs = sorted((Path(r.path) / "workers").glob("worker-*.log"))
    assert len(logs) >= 3  # the crashed worker's and the killed one's replacements


class _SeesTheTemplate(unison.optimizers.RandomSearch):
    """Notes, as the driver sets the optimizer up, the worker template the backend already started."""

    def __init__(self, backend: unison.Local, fail: bool = False) -> None:
        self.backend, self.fail = backend, fail
        self.seen: Any = None

    def setup(self, space: dict[str, Any], mode: Any, seed: int | None) -> None:
        prepared = self.backend._prepared  # noqa: SLF001 - what prepare() started
        self.seen = None if prepared is None else prepared[1].proc
        self.started_log = None if prepared is None else prepared[1]._started_log  # noqa: SLF001
        if self.fail:
            raise RuntimeError("setup failed")
        super().setup(space, mode, seed)


def test_the_template_starts_while_the_driver_sets_up_and_ends_if_it_cannot_start(
    tmp_path: Path, modules: Path
) -> None:
    (modules / "f19_noisy.py").write_text("print('f19_noisy imported in the template', flush=True)\n")
    backend = unison.Local(workers=1, preload=["f19_noisy"])
    optimizer = _SeesTheTemplate(backend)
    r = unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=2, optimizer=optimizer),
                   backend=backend, storage=tmp_path, progress=False)
    assert optimizer.seen is not None and optimizer.seen.poll() is None  # started early, kept for the next
    assert len(r.rows) == 2
    # Started before the experiment's folder existed, its output moved there, and the first file is gone.
    log = (Path(r.path) / "workers" / "template.log").read_text()
    assert "f19_noisy imported in the template" in log
    assert optimizer.started_log is not None and not os.path.exists(optimizer.started_log)
    again = _SeesTheTemplate(backend)
    unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=2, optimizer=again),
               backend=backend, storage=tmp_path, progress=False)
    assert again.seen is optimizer.seen  # the same settings: the kept template served this experiment
    failing = _SeesTheTemplate(backend, fail=True)
    with pytest.raises(RuntimeError, match="setup failed"):
        unison.run(lambda x: x, unison.Search({"x": unison.uniform(0, 1)}, trials=2, optimizer=failing),
                   backend=backend, storage=tmp_path, progress=False)
    assert failing.seen is not None and failing.seen.poll() is not None  # closed, not left running
    assert backend._prepared is None  # noqa: SLF001
    assert optimizer.seen.poll() is not None  # the kept template served the failed start: closed with it


def test_a_preload_that_fails_to_import_names_the_module(tmp_path: Path) -> None:
    with pytest.raises(unison.WorkerError, match=r"(?s)importing 'f19_no_such_module'.*ModuleNotFoundError"):
        _run(lambda x: x, tmp_path, preload=["f19_no_such_module"])


def test_start_and_preload_are_checked() -> None:
    with pytest.raises(ValueError, match="did you mean 'fork-server'"):
        unison.Local(start="forkserver")
    with pytest.raises(ValueError, match=r"list of module names"):
        unison.Local(preload="torch")
    assert "start='fresh'" in repr(unison.Local(workers=2, start="fresh"))


def test_the_template_accepts_only_well_formed_requests() -> None:
    good = b'{"op": "kill", "pid": 12}'
    assert check_request(good) == {"op": "kill", "pid": 12}
    for bad in (b'{"op": "kill", "pid": "12"}', b'{"op": "exec", "cmd": "sh"}', b'[1]',
                b'{"op": "spawn", "id": 1, "env": {"A": 1}, "log": "x", "cwd": "/"}',
                b'{"op": "kill", "pid": 1, "extra": 0}'):
        with pytest.raises(ValueError):
            check_request(bad)


def _pid_of_parent(x: float) -> dict[str, float]:
    return {"loss": x, "template": float(os.getppid())}


def test_an_experiment_like_the_last_reuses_its_template_and_another_starts_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unison.backends.local_template import SHELF

    SHELF.clear()
    first = _run(_pid_of_parent, tmp_path, trials=1)
    second = _run(_pid_of_parent, tmp_path, trials=1)
    template = second.rows[0]["metrics"]["template"]
    assert first.rows[0]["metrics"]["template"] == template  # forked by the same template
    assert (Path(second.path) / "workers" / "template.log").exists()
    monkeypatch.setenv("F19_SOMETHING", "changed")  # another environment: what it imported may differ
    third = _run(_pid_of_parent, tmp_path, trials=1)
    assert third.rows[0]["metrics"]["template"] != template
    SHELF.clear()
    assert not os.path.exists(f"/proc/{int(template)}")  # the first template ended when the third was kept


def _preloaded_version(x: float) -> dict[str, float]:
    import f19_heavy

    return {"loss": x, "version": float(getattr(f19_heavy, "VERSION", 0)), "template": float(os.getppid())}


def test_a_kept_template_is_not_reused_once_a_preloaded_module_of_the_users_changed(
    modules: Path, tmp_path: Path
) -> None:
    from unison.backends.local_template import SHELF

    SHELF.clear()
    first = _run(_preloaded_version, tmp_path, trials=1, preload=["f19_heavy"])
    same = _run(_preloaded_version, tmp_path, trials=1, preload=["f19_heavy"])
    assert same.rows[0]["metrics"]["template"] == first.rows[0]["metrics"]["template"]
    heavy = modules / "f19_heavy.py"
    heavy.write_text("VERSION = 2\n")
    stat = heavy.stat()
    os.utime(heavy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # later, whatever the clock's grain
    edited = _run(_preloaded_version, tmp_path, trials=1, preload=["f19_heavy"])
    assert edited.rows[0]["metrics"]["template"] != first.rows[0]["metrics"]["template"]
    assert edited.rows[0]["metrics"]["version"] == 2.0
    SHELF.clear()


def _edits_the_preloaded_module(x: float) -> dict[str, float]:
    import f19_heavy

    path = Path(f19_heavy.__file__)
    stat = path.stat()
    path.write_text("VERSION = 3\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    return {"loss": x, "template": float(os.getppid())}


def test_a_preloaded_module_edited_while_an_experiment_runs_is_seen_by_the_next(
    modules: Path, tmp_path: Path
) -> None:
    """The template is kept under what its modules were when it imported them, not when it ended."""
    from unison.backends.local_template import SHELF

    SHELF.clear()
    first = _run(_edits_the_preloaded_module, tmp_path, trials=1, preload=["f19_heavy"])
    after = _run(_preloaded_version, tmp_path, trials=1, preload=["f19_heavy"])
    assert after.rows[0]["metrics"]["template"] != first.rows[0]["metrics"]["template"]
    assert after.rows[0]["metrics"]["version"] == 3.0
    SHELF.clear()


def test_the_template_starts_before_the_drivers_own_modules_load(tmp_path: Path) -> None:
    # A fresh process, as a user's script: unison.run starts the template first, then imports the
    # experiment runner (its ~20 ms of imports overlap the template's own start on another core).
    script = f"""
import sys
import unison
from unison.backends import local_template

seen = []
start = local_template.WorkerTemplate.__init__
def noting(self, *args, **kwargs):
    seen.append("unison.driver.experiment" in sys.modules)
    start(self, *args, **kwargs)
local_template.WorkerTemplate.__init__ = noting

r = unison.run(lambda x: x, unison.Search({{"x": unison.uniform(0, 1)}}, trials=3, metric="x", seed=0),
               backend=unison.Local(workers=1), storage={str(tmp_path)!r}, progress=False)
assert len(r.rows) == 3
print(seen)
"""
    import subprocess

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "[False]", done.stdout  # one template, started before the runner loaded
