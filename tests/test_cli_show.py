"""``unison show`` fits the terminal: at most its width (``--wide``: every column, whole), empty cells
rather than NaN or None, a single run's hyperparameters and metrics; every argument has help text."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import unison
from unison import cli

NAMES = [f"hyperparameter_{i}" for i in range(12)]


def wide_train(hparams, reporter):
    if hparams["activation_function_name"] == "broken":
        raise ValueError("this trial fails with a message far longer than any terminal is wide, " * 3)
    value = sum(hparams[name] for name in NAMES) / len(NAMES)
    for step in range(4):
        reporter.report(step=step, accuracy=value, loss=1 - value)
    return {"accuracy": value, "loss": 1 - value}


@pytest.fixture(scope="module")
def wide_search(tmp_path_factory) -> tuple[Path, unison.SearchResult]:
    """A finished search over 14 hyperparameters (one constant) in which some trials stopped early
    (long stop reasons) and some failed, and the folder holding it."""
    root = tmp_path_factory.mktemp("show")
    space = {name: unison.uniform(0, 1) for name in NAMES}
    space["activation_function_name"] = unison.choice(["relu", "tanh", "broken"])
    space["epochs"] = 10
    search = unison.Search(space, metric="accuracy", mode="max", trials=16, optimizer="random",
                           scheduler="median", seed=3)
    result = unison.run(wide_train, search, backend="inline", storage=root / "runs", name="wide",
                        progress=False)
    statuses = set(result.trials["status"])
    assert {"completed", "stopped", "failed"} <= statuses, statuses  # what the table must show
    return root, result


def show(root: Path, *args: str, columns: int = 80) -> str:
    """``unison show ARGS`` as a command, in ``root`` (paths relative to it), with COLUMNS set."""
    env = {**os.environ, "COLUMNS": str(columns)}
    done = subprocess.run([sys.executable, "-m", "unison.cli", "show", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def relative(result, root: Path) -> str:
    return str(result.path.relative_to(root))


def header_of(out: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith("trial_id")).split()


def trial_rows(out: str) -> list[list[str]]:
    """The trial table's rows, split on whitespace: those starting with a trial id and a status."""
    rows = [line.split() for line in out.splitlines()]
    return [r for r in rows if len(r) > 1 and r[0].isdigit() and r[1] in ("completed", "stopped", "failed")]


@pytest.mark.parametrize("columns", [80, 120])
def test_show_fits_the_terminal_width(wide_search, columns):
    root, result = wide_search
    out = show(root, relative(result, root), columns=columns)
    too_long = [line for line in out.splitlines() if len(line) > columns]
    assert not too_long, "\n".join(too_long)
    header = header_of(out)
    assert header[:3] == ["trial_id", "status", "accuracy"]  # the objective before the hyperparameters
    assert "NaN" not in out and "None" not in out and "nan" not in out
    hidden = [c for c in result.trials.columns if c not in header and c not in ("epochs", "error")]
    assert hidden  # 14 hyperparameters cannot all fit, even in 120 columns
    assert "not shown" in out and "--wide" in out and hidden[0] in out
    assert "same in every trial: epochs=10" in out
    best = result.best
    assert f"best trial {best.trial_id}: accuracy={best.metric:.6g}" in out
    assert repr(best.hparams[NAMES[-1]]) in out  # the best trial's hyperparameters, all of them, wrapped
    assert "failed: ValueError: this trial fails" in out
    assert [int(row[0]) for row in trial_rows(out)] == list(result.trials["trial_id"])


def test_show_wide_shows_every_column_whole(wide_search):
    root, result = wide_search
    out = show(root, "--wide", relative(result, root), columns=80)
    assert header_of(out) == list(result.trials.columns)
    stopped = result.trials[result.trials["status"] == "stopped"].iloc[0]
    assert stopped["stop_reason"] in out  # not cut
    assert len(trial_rows(out)) == len(result.trials)
    completed = result.trials[result.trials["status"] == "completed"].iloc[0]
    (row,) = [r for r in trial_rows(out) if r[0] == str(completed["trial_id"])]
    assert "NaN" not in row and "None" not in row  # its stop_reason and error cells are empty
    assert row[-1] == str(completed["attempts"])  # nothing after the last column: both are empty
    assert max(map(len, out.splitlines())) > 200


def test_show_rows_keeps_the_first_and_last_trials(wide_search, capsys, monkeypatch):
    root, result = wide_search
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["show", "--rows", "4", str(result.path)]) == 0
    out = capsys.readouterr().out
    assert [int(row[0]) for row in trial_rows(out)] == [0, 1, 14, 15]
    assert "12 of 16 trials not shown" in out


def test_show_a_single_run_lists_its_hyperparameters_and_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    hparams = {"learning_rate": 0.003, "units": 64, "activation": "gelu", "layers": [64, 32]}
    result = unison.run(lambda learning_rate, units: {"accuracy": 0.91, "loss": 0.25}, hparams=hparams,
                        storage=tmp_path)
    assert cli.main(["show", str(result.path)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert ["hyperparameters:"] in lines and ["metrics:"] in lines
    for row in (["learning_rate", "0.003"], ["units", "64"], ["activation", "gelu"],
                ["layers", "[64,", "32]"], ["accuracy", "0.91"], ["loss", "0.25"]):
        assert row in lines, out
    assert "kind=single" in out and "status=completed" in out and "None" not in out
    assert "its checkpoint" not in out  # it saved none
    seed = json.loads((result.path / "experiment.json").read_text())["seed"]
    assert ["seed", str(seed)] in lines


def checkpointed_run(reporter):
    for step in range(3):
        reporter.report(step=step, checkpoint={"step": step}, loss=1.0 / (step + 1))
    return {"loss": 1.0 / 3}


@pytest.mark.parametrize("context", [None, unison.Distributed(workers=1, metric="loss")],
                         ids=["single", "distributed"])
def test_show_a_run_that_checkpointed_names_its_latest_checkpoint(tmp_path, capsys, context):
    if context is None:
        result = unison.run(checkpointed_run, hparams={}, storage=tmp_path)
    else:
        result = unison.run(checkpointed_run, context, backend="inline", storage=tmp_path, progress=False)
    assert result.checkpoint is not None and result.checkpoint.name == "step-000002"
    assert cli.main(["show", "--wide", str(result.path)]) == 0
    out = capsys.readouterr().out
    assert f"its checkpoint: {result.checkpoint} (unison.load_checkpoint(path) reads it)" in out
    assert unison.load_checkpoint(result.checkpoint) == {"step": 2}


def test_show_a_failed_single_run_says_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")

    def broken(x):
        raise RuntimeError(f"x={x} is out of range")

    with pytest.raises(RuntimeError):
        unison.run(broken, hparams={"x": 7}, storage=tmp_path)
    (path,) = tmp_path.iterdir()
    assert cli.main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "status=failed" in out and "error: RuntimeError: x=7 is out of range" in out
    assert "metrics: (none)" in out and ["x", "7"] in [line.split() for line in out.splitlines()]


def ablation_train(dataset, hparams):
    return {"score": float(len(dataset)) + 0.1 * hparams["seed"] + (0.5 if "income" in dataset else 0.0)}


def test_show_an_ablation_fits_with_empty_cells_for_the_baseline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    data = {"income": [1.0, 2.0], "tenure_in_months": [3.0, 4.0], "age": [5.0, 6.0], "y": [0.0, 1.0]}
    study = unison.Ablation(base={"lr": 0.1, "units": 32}, features=["income", "tenure_in_months", "age"],
                            label="y", metric="score", repeats=3)
    result = unison.run(ablation_train, study, data=data, backend="inline", storage=tmp_path, progress=False)
    monkeypatch.chdir(tmp_path)  # a short path: a path is printed whole, however long
    assert cli.main(["show", result.path.name]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80
    assert "same in every trial: lr=0.1, units=32" in out
    assert header_of(out)[:4] == ["trial_id", "status", "component", "score"] and "seed" in header_of(out)
    table = out[out.index("ablation of score"):]
    baseline = next(line.split() for line in table.splitlines() if line.split()[:1] == ["baseline"])
    assert "NaN" not in table and baseline[:3] == ["baseline", "baseline", "3"]
    assert "most important: income" in out


def test_show_prints_the_recorded_versions(tmp_path, capsys):
    result = unison.run(lambda: 1.0, storage=tmp_path)
    assert cli.main(["show", str(result.path)]) == 0
    assert f"recorded: unison {unison.__version__}, python " in capsys.readouterr().out


def arguments(parser: argparse.ArgumentParser, prefix: str = "unison") -> list[tuple[str, argparse.Action]]:
    """Every argument of ``parser`` and of its subcommands, named by its command."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += arguments(sub, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((prefix, action))
    return found


def test_every_argument_of_every_command_has_help_text():
    found = arguments(cli.build_parser())
    assert len(found) > 15
    missing = [f"{command} {action.dest}" for command, action in found if not action.help]
    assert not missing, f"arguments without help text: {missing}"
    demo = {action.dest: action.help for command, action in found if command == "unison demo"}
    assert "seed" in demo["seed"] and "inline" in demo["backend"]


def test_ls_help_names_its_argument():
    done = subprocess.run([sys.executable, "-m", "unison.cli", "ls", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "the folder holding the experiments" in done.stdout


def test_column_facts_read_from_distinct_values_agree_with_every_cell():
    """The table decides "same in every trial", "empty" and "numeric" from each distinct value once (a
    100k-trial table); the answer must be the one every cell's text gives."""
    def facts(cells):
        return cli._ColumnFacts.of(cells, "x")

    assert facts([0.5, 0.5, 0.5]) == cli._ColumnFacts("0.5", True, True)
    assert facts([False, 0, False]).same is None  # False == 0 as a key, but they print differently
    assert facts([True, True]) == cli._ColumnFacts("True", True, False)
    assert facts([None, float("nan"), None]) == cli._ColumnFacts(None, False, True)
    assert facts([0.1, 0.2, float("nan"), 3]) == cli._ColumnFacts(None, True, True)
    assert facts(["a", None, 2.0]) == cli._ColumnFacts(None, True, False)
    assert facts([[1, 2], [1, 2]]) == cli._ColumnFacts("[1, 2]", True, False)  # unhashable choices
    assert facts([None, "", "relu"]) == cli._ColumnFacts(None, True, False)
    many = [i / 7 for i in range(10_000)] + ["text"]
    assert facts(many) == cli._ColumnFacts(None, True, False)
