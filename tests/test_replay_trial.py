"""``unison.replay(DIR, trial_id)`` and ``unison replay DIR TRIAL``: one trial of a real experiment run
again in this process, with its hyperparameters, seed and ablated component, from the stored payload or
a given function; its exception raised from the user's code, its metrics as recorded, the experiment
itself never written; and the errors that say what to pass instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import unison

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # this module must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

UNLUCKY = 3


def train_or_fail(x: int, scale: float, reporter: unison.Reporter, ctx: unison.Context) -> dict[str, float]:
    """Reports twice, writes a file, fails for ``x == UNLUCKY``; deterministic in ``x`` and ``ctx.seed``."""
    print(f"replay-check: trial {ctx.trial_id} x={x}")
    noise = float(np.random.default_rng(ctx.seed).random())
    for step in range(2):
        reporter.report(step=step, loss=x * scale / (step + 1) + noise)
    (ctx.trial_dir / "note.txt").write_text(f"x={x}")
    if x == UNLUCKY:
        raise ValueError(f"x={x} is unlucky")
    return {"loss": x * scale / 2 + noise, "seed": float(ctx.seed), "trial": float(ctx.trial_id)}


def train_fixed(x: int, ctx: unison.Context) -> dict[str, float]:
    """The fix: the same trial, without the failure."""
    return {"loss": float(x), "seed": float(ctx.seed)}


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with a digest of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``unison ARGS`` in a fresh interpreter whose current directory is ``cwd``: the function is found
    through the import path stored in the payload."""
    return subprocess.run([sys.executable, "-m", "unison.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120, cwd=cwd)


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]


def end_of(path: Path, trial_id: int) -> dict[str, Any]:
    (end,) = [ev for ev in journal(path) if ev.get("e") == "end" and ev["id"] == trial_id]
    return end


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory) -> unison.SearchResult:
    """A search on two local worker processes in which exactly one trial (x == UNLUCKY) fails."""
    storage = tmp_path_factory.mktemp("replay") / "runs"
    space = {"x": unison.choice([1, 2, 3, 4]), "scale": 0.5}
    result = unison.run(train_or_fail, unison.Search(space, metric="loss", mode="min", trials=4,
                                                     optimizer="grid", seed=11),
                        backend=unison.Local(workers=2), storage=storage, name="replayed", progress=False)
    assert isinstance(result, unison.SearchResult)
    assert sorted(result.trials["status"]) == ["completed", "completed", "completed", "failed"]
    return result


def failed_id(result: unison.SearchResult) -> int:
    (trial_id,) = result.trials.loc[result.trials["status"] == "failed", "trial_id"]
    return int(trial_id)


def completed_ids(result: unison.SearchResult) -> list[int]:
    return [int(t) for t in result.trials.loc[result.trials["status"] == "completed", "trial_id"]]


def test_a_failed_trial_replays_raising_its_exception_from_the_users_function(search, capsys):
    trial_id = failed_id(search)
    before, siblings = snapshot(search.path), set(search.path.parent.iterdir())
    recorded = end_of(search.path, trial_id)["error"].strip().splitlines()[-1]
    with pytest.raises(ValueError) as info:
        unison.replay(search.path, trial_id)
    assert f"{type(info.value).__name__}: {info.value}" == recorded == f"ValueError: x={UNLUCKY} is unlucky"
    innermost = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (Path(innermost.filename), innermost.name) == (Path(__file__), "train_or_fail")
    assert innermost.line == 'raise ValueError(f"x={x} is unlucky")'
    # output on the terminal (here pytest's capture), not into a log file
    assert f"replay-check: trial {trial_id} x={UNLUCKY}" in capsys.readouterr().out
    assert snapshot(search.path) == before  # the replayed experiment is never written
    (replay_dir,) = set(search.path.parent.iterdir()) - siblings  # beside the replayed experiment
    assert replay_dir.name.startswith(f"replayed-replay-{trial_id}-")
    meta = json.loads((replay_dir / "experiment.json").read_text())
    assert meta["kind"] == "single" and meta["status"] == "failed"
    assert meta["replay_of"] == {"experiment": str(search.path.resolve()), "trial": trial_id}
    assert "x=3 is unlucky" in end_of(replay_dir, 0)["error"]
    assert not (replay_dir / "trials" / "0000" / "stderr.log").exists()  # nothing was captured
    with pytest.raises(unison.RunFailed, match="unlucky"):
        unison.load(replay_dir)


def test_a_completed_trial_replays_to_the_same_metrics_reports_and_files(search, tmp_path):
    for trial_id in completed_ids(search):
        replayed = unison.replay(search.path, trial_id, storage=tmp_path)
        recorded = end_of(search.path, trial_id)["metrics"]
        assert replayed.metrics == recorded and replayed.metrics["trial"] == trial_id
        assert replayed.value == recorded["loss"]
        assert replayed.returned == recorded  # what the function returned, itself
        assert replayed.path.parent == tmp_path
        assert replayed.path.name.startswith(f"replayed-replay-{trial_id}-")
        original, again = search.path / "trials" / f"{trial_id:04d}", replayed.path / "trials" / "0000"
        assert (again / "metrics.jsonl").read_text() == (original / "metrics.jsonl").read_text()
        assert (again / "note.txt").read_text() == (original / "note.txt").read_text()
        assert unison.load(replayed.path).metrics == recorded


def test_fn_given_runs_with_the_stored_hyperparameters_and_seed(search, tmp_path):
    trial_id = failed_id(search)
    fixed = unison.replay(search.path, trial_id, fn=train_fixed, storage=tmp_path)
    seed = json.loads((search.path / "experiment.json").read_text())["seed"]
    assert fixed.metrics == {"loss": float(UNLUCKY), "seed": float((seed * 1_000_003 + trial_id) % 2**32)}
    other = completed_ids(search)[0]  # the seed formula matches what the trial itself got
    assert unison.replay(search.path, other, fn=train_fixed, storage=tmp_path).metrics["seed"] == \
        end_of(search.path, other)["metrics"]["seed"]


# ----------------------------------------------------------------------------------------- ablation
def net_fn(hparams: dict[str, Any]) -> Any:
    """A torch model with named submodules (torch is imported only where a test uses it)."""
    from collections import OrderedDict

    import torch

    torch.manual_seed(hparams["seed"])
    nn = torch.nn
    return nn.Sequential(OrderedDict(inp=nn.Linear(2, 4), act=nn.Tanh(), out=nn.Linear(4, 1)))


def count_ablated(model: Any) -> dict[str, float]:
    """How many of the model's submodules an ablation replaced, and its output on a fixed input."""
    import torch

    ablated = sum(type(m).__name__ == "AblatedModule" for m in model.modules())
    return {"ablated": float(ablated), "act": float(isinstance(model.act, torch.nn.Tanh)),
            "out": float(model(torch.ones(1, 2)).item())}


def world(ctx: unison.Context, lr: float) -> dict[str, float]:
    """Where a rank of a distributed run finds itself."""
    return {"world_size": float(ctx.world_size), "rank": float(ctx.rank), "lr": lr}


def columns() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 64))
    return {"A": a, "B": b, "y": 2 * a + b}


def fit_columns(dataset: dict[str, np.ndarray], hparams: dict[str, Any],
                ctx: unison.Context) -> dict[str, float]:
    """Least squares on the columns it is given; says which ones it saw."""
    assert hparams["seed"] == ctx.seed
    x = np.column_stack([dataset[c] for c in sorted(dataset) if c != "y"] + [np.ones(len(dataset["y"]))])
    w, *_ = np.linalg.lstsq(x, dataset["y"], rcond=None)
    mse = float(np.mean((x @ w - dataset["y"]) ** 2))
    return {"mse": mse, "has_a": float("A" in dataset), "has_b": float("B" in dataset),
            "seed": float(ctx.seed)}


def test_an_ablation_trial_replays_with_its_feature_removed(tmp_path):
    study = unison.Ablation(features=["A", "B"], label="y", metric="mse", mode="min", repeats=2, seed=5)
    result = unison.run(fit_columns, study, data=columns, backend=unison.Local(workers=2),
                        storage=tmp_path / "runs", progress=False)
    assert isinstance(result, unison.AblationResult)
    by_component = {row.component: int(row.trial_id) for row in result.trials.itertuples()}
    assert set(by_component) == {"baseline", "A", "B"}
    for component, trial_id in by_component.items():
        replayed = unison.replay(result.path, trial_id)
        assert replayed.metrics == end_of(result.path, trial_id)["metrics"]
        assert (replayed.metrics["has_a"], replayed.metrics["has_b"]) == \
            {"baseline": (1.0, 1.0), "A": (0.0, 1.0), "B": (1.0, 0.0)}[component]
    # a given function gets the stored data, still ablated, and the trial's own seed
    trial_b = by_component["B"]
    seen: dict[str, Any] = {}

    def peek(dataset: dict[str, Any], ctx: unison.Context) -> float:
        seen.update(columns=sorted(dataset), seed=ctx.seed)
        return 0.0

    unison.replay(result.path, trial_b, fn=peek)
    hparams = result.trials.set_index("trial_id").loc[trial_b]
    assert seen == {"columns": ["A", "y"], "seed": int(hparams["seed"])}


def test_a_module_ablation_trial_replays_with_its_module_replaced(tmp_path):
    pytest.importorskip("torch")
    study = unison.Ablation(modules=["act"], metric="ablated", mode="min", repeats=1)
    result = unison.run(count_ablated, study, model=net_fn, backend="inline", storage=tmp_path / "runs",
                        progress=False)
    assert isinstance(result, unison.AblationResult)
    table = result.trials.set_index("component")
    for component, ablated in (("baseline", 0.0), ("act", 1.0)):
        trial_id = int(table.loc[component, "trial_id"])
        replayed = unison.replay(result.path, trial_id)
        assert replayed.metrics == end_of(result.path, trial_id)["metrics"]
        assert (replayed.metrics["ablated"], replayed.metrics["act"]) == (ablated, 1.0 - ablated)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_replays_a_completed_trial_printing_its_metrics(search):
    trial_id = completed_ids(search)[0]
    done = run_cli("replay", str(search.path), str(trial_id), cwd=search.path.parent)
    assert done.returncode == 0, done.stderr
    metrics_line = next(line for line in done.stdout.splitlines() if line.startswith("metrics: "))
    assert json.loads(metrics_line.removeprefix("metrics: ")) == end_of(search.path, trial_id)["metrics"]
    assert f"replay-check: trial {trial_id}" in done.stdout  # the function's output, on the terminal
    assert f"replaying trial {trial_id} of {search.path}" in done.stderr


def test_cli_prints_the_failed_trials_traceback_from_the_users_code_and_exits_1(search):
    trial_id = failed_id(search)
    done = run_cli("replay", str(search.path), str(trial_id), cwd=search.path.parent)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    start = lines.index("Traceback (most recent call last):")
    assert lines[start + 1].startswith(f'  File "{__file__}"') and "in train_or_fail" in lines[start + 1]
    assert f"ValueError: x={UNLUCKY} is unlucky" in lines
    assert "unison/driver" not in done.stderr  # unison's own frames are left out


def test_cli_pdb_opens_a_post_mortem_in_the_users_frame(search):
    done = run_cli("replay", str(search.path), str(failed_id(search)), "--pdb", stdin="p x * 100\nq\n",
                   cwd=search.path.parent)
    assert done.returncode == 1
    assert "(Pdb)" in done.stdout and str(UNLUCKY * 100) in done.stdout
    assert '-> raise ValueError(f"x={x} is unlucky")' in done.stdout


def test_cli_errors_say_what_is_wrong_and_exit_1(search, tmp_path):
    done = run_cli("replay", str(search.path), "17", cwd=tmp_path)
    assert done.returncode == 1 and "has no trial 17: did you mean trial 3?" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_cli("replay", str(tmp_path), "0", cwd=tmp_path)
    assert done.returncode == 1 and "is not a unison experiment directory" in done.stderr


# -------------------------------------------------------------------------------------------- errors
def test_unknown_never_started_and_badly_typed_trial_ids(search, tmp_path):
    with pytest.raises(ValueError, match=r"no trial 9: did you mean trial 3\? The trials that started: 0-3$"):
        unison.replay(search.path, 9)
    with pytest.raises(ValueError, match=r"has no trial -1: did you mean trial 0\?"):
        unison.replay(search.path, -1)
    with pytest.raises(TypeError, match="trial_id must be a trial's number"):
        unison.replay(search.path, 1.5)  # type: ignore[arg-type]
    # trial 1 handed to a busy worker as its next trial, the driver stopped before it started: its
    # journal has no start (nor end) of trial 1
    copy = tmp_path / "copy"
    shutil.copytree(search.path, copy)
    lines = (copy / "journal.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("id") != 1]
    (copy / "journal.jsonl").write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match=r"trial 1 of .* never started .* The trials that started: 0, 2-3"):
        unison.replay(copy, 1)
    with pytest.raises(FileNotFoundError, match="not a unison experiment directory"):
        unison.replay(tmp_path, 0)


def test_without_a_stored_function_fn_is_asked_for_then_used(tmp_path):
    single = unison.run(train_fixed, hparams={"x": 5, "seed": 42}, storage=tmp_path)  # stores no payload
    with pytest.raises(ValueError, match=r"has no payload\.bin, .*a single run stores no payload.*fn=train"):
        unison.replay(single.path, 0)
    replayed = unison.replay(single.path, 0, fn=train_fixed)
    assert replayed.metrics == single.metrics == {"loss": 5.0, "seed": 42.0}


def test_a_distributed_trial_replays_as_one_process_with_a_warning(tmp_path):
    pytest.importorskip("torch")
    run = unison.run(world, unison.Distributed(workers=2, hparams={"lr": 0.1}),
                     backend=unison.Local(workers=2), storage=tmp_path / "runs", progress=False)
    assert run.metrics["world_size"] == 2.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replayed = unison.replay(run.path, 0)
    assert replayed.metrics == {"world_size": 1.0, "rank": 0.0, "lr": 0.1}
    (warning,) = [w for w in caught if "ranks" in str(w.message)]
    assert "ran as 2 ranks; it replays as one process" in str(warning.message)
    assert warning.filename == __file__  # the warning points at the call of unison.replay
