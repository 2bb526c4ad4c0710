"""The ``unison`` command: ``demo``, ``ls``, ``show`` and ``resume``, Ctrl-C as one line, and plain output
when stdout is not a TTY."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
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


# ------------------------------------------------------------------------ Ctrl-C and `unison resume`
INTERRUPT = {"trial": -1}


def stop_once(x, ctx):
    """Ctrl-C (KeyboardInterrupt in the driver: the inline backend runs the function there) once."""
    if ctx.trial_id == INTERRUPT["trial"]:
        INTERRUPT["trial"] = -1
        raise KeyboardInterrupt
    return {"score": x}


def end_counts(path: Path) -> Counter[int]:
    events = [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]
    return Counter(e["id"] for e in events if e.get("e") == "end")


def test_resume_command_finishes_an_interrupted_inline_search(tmp_path, capsys):
    INTERRUPT["trial"] = 2
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="score", trials=6, optimizer="random", seed=1)
    with pytest.raises(KeyboardInterrupt) as info:
        unison.run(stop_once, search, backend="inline", storage=tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    assert (path / "payload.bin").is_file()  # an inline experiment stores its function too
    assert cli._interrupted_line(info.value) == (f"unison: interrupted; the experiment {path} is resumable "
                                                 f"with: unison resume {path} --backend inline")
    capsys.readouterr()
    assert cli.main(["resume", str(path), "--backend", "inline"]) == 0
    assert f"experiment directory: {path}" in capsys.readouterr().out
    assert end_counts(path) == Counter(range(6))
    assert json.loads((path / "experiment.json").read_text())["status"] == "completed"
    assert cli.main(["resume", str(path)]) == 0  # nothing left: says so
    assert "already completed" in capsys.readouterr().out


def ablation_train(dataset, hparams, ctx):
    if ctx.trial_id == INTERRUPT["trial"]:
        INTERRUPT["trial"] = -1
        raise KeyboardInterrupt
    return {"score": float(len(dataset)) + hparams["seed"]}


def ablation_data():
    return {"a": [0.0, 1.0], "b": [1.0, 2.0], "y": [1.0, 0.0]}


def test_resume_command_finishes_an_interrupted_ablation(tmp_path, capsys):
    INTERRUPT["trial"] = 3
    study = unison.Ablation(base={"lr": 0.1}, features=["a", "b"], label="y", metric="score", repeats=2)
    with pytest.raises(KeyboardInterrupt):
        unison.run(ablation_train, study, data=ablation_data, backend="inline", storage=tmp_path,
                   progress=False)
    (path,) = tmp_path.iterdir()
    assert cli.main(["resume", str(path), "--backend", "inline"]) == 0
    assert end_counts(path) == Counter(range(6))
    result = unison.SearchResult.load(path)
    assert result.status == "completed"
    assert set(result.ablation["component"]) == {"baseline", "a", "b"}


def test_resume_command_says_why_a_function_that_cannot_be_stored_needs_python(tmp_path, capsys):
    lock = threading.Lock()

    def holds_a_lock(x, ctx):
        with lock:
            return stop_once(x, ctx)

    INTERRUPT["trial"] = 1
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="score", trials=3)
    with pytest.raises(KeyboardInterrupt):  # inline runs it all the same
        unison.run(holds_a_lock, search, backend="inline", storage=tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    assert not (path / "payload.bin").exists()
    assert cli.main(["resume", str(path)]) == 1
    err = capsys.readouterr().err
    assert "has no payload.bin" in err and "'lock'" in err and f"unison.resume({str(path)!r}, train" in err


@pytest.mark.slow
def test_ctrl_c_in_demo_prints_one_line_and_unison_resume_finishes_it(tmp_path):
    storage = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
    demo = subprocess.Popen([sys.executable, "-m", "unison.cli", "demo", "--trials", "10", "--workers", "2",
                             "--storage", str(storage)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 60
    journal = None
    while time.monotonic() < deadline and demo.poll() is None:  # mid-search: a trial has started
        journal = next(iter(storage.glob("*/journal.jsonl")), None) if storage.exists() else None
        if journal is not None and '"e": "start"' in journal.read_text():
            break
        time.sleep(0.05)
    assert journal is not None and demo.poll() is None, "the demo never started a trial"
    demo.send_signal(signal.SIGINT)
    out, err = demo.communicate(timeout=60)
    path = journal.parent
    assert demo.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line == f"unison: interrupted; the experiment {path} is resumable with: unison resume {path}"
    assert json.loads((path / "experiment.json").read_text())["status"] == "interrupted"
    assert len(end_counts(path)) < 10

    resumed = run_cli("resume", str(path), "--workers", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert end_counts(path) == Counter(range(10))  # every trial ended, once
    assert json.loads((path / "experiment.json").read_text())["status"] == "completed"
    assert re.search(r"best trial \d+: accuracy=0\.\d+", resumed.stdout)
