"""What ``experiment.json`` records for reproducing an experiment: the versions of unison, Python and the
libraries the driver has loaded (never importing one), and the git commit of the caller's directory."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import unison
from unison.driver.experiment import RECORDED_MODULES, GitProbe, versions

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def meta(result) -> dict:
    return json.loads((result.path / "experiment.json").read_text())


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A git repository with one commit, the current directory; git looks no higher than tmp_path."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    root = tmp_path / "project"
    root.mkdir()
    git("init", "-q", cwd=root)
    (root / "train.py").write_text("lr = 0.1\n")
    git("add", "train.py", cwd=root)
    git("commit", "-q", "-m", "first", cwd=root)
    monkeypatch.chdir(root)
    return root


def square(x):
    return {"score": x * x}


def test_versions_name_unison_python_and_only_loaded_libraries():
    found = versions()
    assert found["unison"] == unison.__version__ and found["python"] == platform.python_version()
    for module, name in RECORDED_MODULES.items():
        if module in sys.modules and hasattr(sys.modules[module], "__version__"):
            assert found[name] == str(sys.modules[module].__version__)
        else:
            assert name not in found


def test_a_library_is_recorded_when_loaded_and_never_imported(tmp_path):
    script = (
        "import json, sys, unison\n"
        "r = unison.run(lambda: 1.0, storage=sys.argv[1])\n"
        "before = json.loads((r.path / 'experiment.json').read_text())['versions']\n"
        "import numpy\n"
        "r = unison.run(lambda: 1.0, storage=sys.argv[1])\n"
        "after = json.loads((r.path / 'experiment.json').read_text())['versions']\n"
        "print(json.dumps([before, after, numpy.__version__, 'torch' in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    before, after, numpy_version, torch_loaded = json.loads(done.stdout.splitlines()[-1])
    assert "numpy" not in before and after["numpy"] == numpy_version
    assert "torch" not in after and not torch_loaded  # recording looked at sys.modules, imported nothing


def test_single_run_and_search_record_the_commit_of_the_current_directory(repo):
    head = git("rev-parse", "HEAD", cwd=repo)
    single = unison.run(square, hparams={"x": 2.0}, storage=repo / "runs")
    assert meta(single)["git"] == {"commit": head, "dirty": False}
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="score", trials=2)
    found = unison.run(square, search, backend="inline", storage=repo / "runs", progress=False)
    assert meta(found)["git"] == {"commit": head, "dirty": False}
    assert meta(found)["versions"]["unison"] == unison.__version__


def test_a_changed_tracked_file_is_dirty_an_untracked_one_is_not(repo):
    (repo / "notes.txt").write_text("not tracked\n")
    assert GitProbe.start().result()["dirty"] is False
    (repo / "train.py").write_text("lr = 0.2\n")
    assert GitProbe.start().result()["dirty"] is True
    with pytest.raises(ZeroDivisionError):  # a failed run records it too
        unison.run(lambda: 1 / 0, storage=repo / "runs")
    (failed,) = (p for p in (repo / "runs").iterdir())
    recorded = json.loads((failed / "experiment.json").read_text())
    assert recorded["status"] == "failed" and recorded["git"]["dirty"] is True


def test_a_subdirectory_of_the_repository_has_its_commit(repo):
    (repo / "sub").mkdir()
    assert GitProbe.start(repo / "sub").result() == {"commit": git("rev-parse", "HEAD", cwd=repo),
                                                     "dirty": False}


def test_outside_a_repository_or_without_git_nothing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert "git" not in meta(unison.run(square, hparams={"x": 1.0}, storage=tmp_path / "runs"))
    git("init", "-q", cwd=tmp_path)  # a repository without a commit: nothing to point at
    assert GitProbe.start().result() is None
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git not installed
    (tmp_path / "f").write_text("x")
    assert GitProbe.start().result() is None
    assert "git" not in meta(unison.run(square, hparams={"x": 1.0}, storage=tmp_path / "runs"))


def test_a_git_that_hangs_costs_at_most_the_timeout(repo, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    result = unison.run(square, hparams={"x": 3.0}, storage=repo / "runs")
    assert time.monotonic() - start < 5  # GIT_TIMEOUT_S for status, half of it for rev-parse
    assert result.metrics == {"score": 9.0} and "git" not in meta(result)
