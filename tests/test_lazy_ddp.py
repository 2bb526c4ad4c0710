"""A model whose first layer is ``nn.LazyLinear`` (issue 12): ONE training function runs unchanged as a
single run, a feature ablation (whose narrower input the lazy layer adapts to), a 2-rank DDP run and a
search of 2-rank trials, with real gloo process groups in real worker processes.

Under DDP the model cannot be wrapped before its first forward pass (DDP rejects uninitialized
parameters), so it is wrapped at its first forward; the optimizer ``train`` builds before that pass must
keep training the same parameter objects, which the ranks must end with identical and changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import unison  # noqa: E402

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # this module must be importable by name in the worker processes
    sys.path.insert(0, str(TESTS))

ROWS = 64
FEATURES = ("a", "b", "c")
HPARAMS = {"lr": 0.05, "epochs": 3}


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    cols = {name: rng.normal(size=ROWS).astype(np.float32) for name in FEATURES}
    return {**cols, "y": (2.0 * cols["a"] - cols["b"] + 0.5 * cols["c"]).astype(np.float32)}


def model_fn(hparams: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.LazyLinear(16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def digest(model: torch.nn.Module) -> str:
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
    return hashlib.sha256(weights).hexdigest()


def train(hparams: dict[str, Any], model: Any, dataset: dict[str, np.ndarray], ctx: Any,
          reporter: Any) -> dict[str, float]:
    """The one function: every column but ``y`` is a feature, however many the ablation left."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.from_numpy(np.column_stack([dataset[k] for k in dataset if k != "y"]))
    y = torch.from_numpy(dataset["y"])[:, None]
    optimizer = torch.optim.SGD(model.parameters(), lr=hparams["lr"])  # before the first forward pass
    loss_fn = torch.nn.functional.mse_loss
    with torch.no_grad():
        before = float(loss_fn(model(x), y))  # the first forward: materializes the lazy layer
    initial = digest(model)
    loader = ctx.prepare(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    for epoch in range(hparams["epochs"]):
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            after = float(loss_fn(model(x), y))
        reporter.report(step=epoch, loss=after)
    record = {"rank": ctx.rank, "world_size": ctx.world_size, "model": type(model).__name__,
              "inner": type(getattr(model, "module", model)).__name__, "in_features": x.shape[1],
              "initial": initial, "final": digest(model), "before": before, "after": after,
              "state_dict": sorted(getattr(model, "module", model).state_dict())}
    (ctx.trial_dir / f"rank-{ctx.rank}.json").write_text(json.dumps(record))
    return {"loss": after, "before": before, "in_features": float(x.shape[1])}


def ranks(trial_dir: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads((trial_dir / f"rank-{r}.json").read_text()) for r in range(n)]


def check_two_ranks(trial_dir: Path) -> None:
    r0, r1 = ranks(trial_dir, 2)
    assert [r0["rank"], r1["rank"]] == [0, 1] and r0["world_size"] == 2
    assert r0["inner"] == "Sequential" and r0["model"] != "Sequential"  # wrapped; .module is the plain one
    assert r0["state_dict"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert r0["initial"] == r1["initial"]  # rank 0's materialized parameters were broadcast
    assert r0["final"] == r1["final"]  # and stayed identical: the gradients were averaged
    assert r0["final"] != r0["initial"]  # the optimizer built before the first forward trained them
    assert r0["after"] == r1["after"] < 0.5 * r0["before"]


@pytest.mark.slow
def test_one_lazy_model_function_as_single_run_ablation_and_two_rank_ddp(tmp_path: Path) -> None:
    single = unison.run(train, hparams=HPARAMS, model=model_fn, data=data(), storage=tmp_path / "single",
                        progress=False)
    (alone,) = ranks(single.path / "trials" / "0000", 1)
    assert alone["model"] == "Sequential" and alone["in_features"] == 3
    assert alone["final"] != alone["initial"] and single.metrics["loss"] < 0.5 * single.metrics["before"]

    study = unison.Ablation(base=HPARAMS, features=["c"], label="y", metric="loss", mode="min")
    ablation = unison.run(train, study, model=model_fn, data=data(), backend="inline",
                          storage=tmp_path / "ablation", progress=False)
    trials = ablation.trials.set_index("component")
    assert set(trials["status"]) == {"completed"}
    assert trials.loc["baseline", "in_features"] == 3 and trials.loc["c", "in_features"] == 2

    run = unison.run(train, unison.Distributed(workers=2, hparams=HPARAMS, metric="loss"), model=model_fn,
                     data=data(), storage=tmp_path / "ddp", progress=False)
    assert isinstance(run, unison.RunResult)
    check_two_ranks(run.path / "trials" / "0000")


@pytest.mark.slow
def test_a_search_of_two_rank_trials_with_a_lazy_model(tmp_path: Path) -> None:
    search = unison.Search({"lr": unison.choice([0.05, 0.04]), "epochs": 3}, metric="loss", mode="min",
                           optimizer="grid", workers_per_trial=2)
    result = unison.run(train, search, model=model_fn, data=data(), backend=unison.Local(workers=2),
                        storage=tmp_path, progress=False)
    assert list(result.trials["status"]) == ["completed", "completed"]
    for row in result.rows:
        check_two_ranks(result.path / "trials" / f"{row['trial_id']:04d}")


def test_a_lazy_model_is_not_sharded_with_fsdp_before_its_first_forward() -> None:
    from unison.frameworks.torch import wrap_model

    with pytest.raises(ValueError, match="LazyLinear.*non-lazy first layer.*strategy='ddp'"):
        wrap_model(model_fn({}), "cpu", "fsdp")
