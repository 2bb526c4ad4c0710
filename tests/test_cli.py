"""The ``unison`` command: ``demo``, ``ls`` and ``show``, and plain output when stdout is not a TTY."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import unison
from unison import cli

ANSI = "\x1b["


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m unison.cli ARGS`` with stdout and stderr pipes (not a terminal)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    return subprocess.run([sys.executable, "-m", "unison.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def score_train(x, reporter):
    reporter.report(step=0, score=x)
    return {"score": x}


@pytest.fixture
def search_dir(tmp_path) -> Path:
    """A finished inline search in ``tmp_path/runs``."""
    search = unison.Search({"x": unison.choice([0.25, 0.75, 0.5])}, metric="score", optimizer="grid")
    r = unison.run(score_train, search, backend="inline", storage=tmp_path / "runs", name="cli-test",
                   progress=False)
    return r.path


def test_ls_lists_an_experiment_with_its_status_and_best(search_dir, capsys):
    assert cli.main(["ls", str(search_dir.parent)]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if search_dir.name in line]  # one line, not folded
    assert "search" in line and "completed" in line and "3/3" in line and "score=0.75" in line
    assert ANSI not in out


def test_ls_shows_single_runs_too(tmp_path, capsys):
    unison.run(lambda: {"acc": 0.5}, storage=tmp_path, name="single")
    assert cli.main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "single" in out and "completed" in out and '"acc": 0.5' in out


def test_ls_of_a_missing_folder_fails_with_a_message(tmp_path, capsys):
    assert cli.main(["ls", str(tmp_path / "nothing")]) != 0
    assert "does not exist" in capsys.readouterr().err


def test_show_prints_the_trial_table_and_the_best_trial(search_dir, capsys):
    assert cli.main(["show", str(search_dir)]) == 0
    out = capsys.readouterr().out
    assert "status=completed" in out
    header = next(line for line in out.splitlines() if "trial_id" in line)
    for column in ("status", "x", "score", "steps", "duration", "worker"):
        assert column in header.split()
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["0", "completed"],
                                                                             ["1", "completed"],
                                                                             ["2", "completed"])]
    assert len(rows) == 3
    assert "best trial 1: score=0.75 with {'x': 0.75}" in out
    assert ANSI not in out


def test_show_of_a_missing_experiment_exits_non_zero_with_a_clear_message(capsys):
    assert cli.main(["show", "/nonexistent"]) != 0
    err = capsys.readouterr().err
    assert "/nonexistent is not a unison experiment directory" in err


def test_show_missing_experiment_as_a_command():
    done = run_cli("show", "/nonexistent")
    assert done.returncode != 0
    assert "not a unison experiment directory" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_demo_ls_and_show_end_to_end_without_ansi_codes(tmp_path):
    storage = tmp_path / "runs"
    demo = run_cli("demo", "--trials", "6", "--workers", "2", "--storage", str(storage))
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert re.search(r"best trial \d+: accuracy=0\.\d+ with \{'lr'", demo.stdout)
    assert "the five best trials" in demo.stdout
    (experiment,) = storage.iterdir()
    meta = json.loads((experiment / "experiment.json").read_text())
    assert meta["status"] == "completed" and meta["kind"] == "search"
    rows = unison.SearchResult.load(experiment).rows
    assert len(rows) == 6 and all(r["status"] in ("completed", "stopped") for r in rows)

    ls = run_cli("ls", str(storage))
    assert ls.returncode == 0, ls.stderr
    (line,) = [line for line in ls.stdout.splitlines() if experiment.name in line]
    assert "completed" in line and "6/6" in line

    show = run_cli("show", str(experiment))
    assert show.returncode == 0, show.stderr
    assert "trial_id" in show.stdout and "best trial" in show.stdout

    for done in (demo, ls, show):
        assert ANSI not in done.stdout and ANSI not in done.stderr
