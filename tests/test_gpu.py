"""GPUs for real (``@pytest.mark.gpu``: skipped, with the reason, where torch sees no CUDA GPU).

A search with one GPU per trial and with half a GPU per trial on ``Local(gpus="auto")``, each trial
training on ``ctx.device``; a 2-rank DDP run and a 2-rank FSDP run on NCCL, one GPU per rank, whose
ranks end with equal weights, the full batch's (these two need 2 GPUs: NCCL refuses two ranks on one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from helpers_gpus import meet  # noqa: E402

import unison  # noqa: E402
from unison.gpus import detect_gpus  # noqa: E402

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # this module must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

pytestmark = pytest.mark.gpu
SPACE = {"lr": unison.loguniform(0.01, 0.1)}
STEPS, LR = 20, 0.05


def _gpus() -> list[str]:
    ids, found = detect_gpus()
    assert ids, f"torch sees CUDA but Local(gpus='auto') found no GPU ({found})"
    return ids


def two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (NCCL refuses two ranks on one GPU); torch sees "
                    f"{torch.cuda.device_count()}")


def _data() -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def model_fn(hparams: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))



def search_trial(lr: float, ctx: Any, barrier: str = "", together: int = 0) -> dict[str, float]:
    """Trains on ``ctx.device`` and records which GPU it had and when it ran."""
    started = time.time()
    if barrier:
        meet(Path(barrier), str(ctx.trial_id), together)
    model = model_fn({}).to(ctx.device)
    x, y = (t.to(ctx.device) for t in _data())
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    (ctx.trial_dir / "seen.json").write_text(json.dumps({
        "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "ctx_gpus": ctx.gpus, "device": ctx.device,
        "visible": torch.cuda.device_count(), "param_device": str(next(model.parameters()).device),
        "pid": os.getpid(), "started": started, "ended": time.time()}))
    return {"value": -loss.item()}


def _seen(result: Any) -> list[dict[str, Any]]:
    return [json.loads((result.path / "trials" / f"{tid:04d}" / "seen.json").read_text())
            for tid in result.trials["trial_id"]]


def test_a_search_with_one_gpu_per_trial_trains_each_trial_on_a_gpu_of_its_own(tmp_path: Path) -> None:
    ids = _gpus()
    r = unison.run(search_trial, unison.Search(SPACE, trials=2 * len(ids), seed=0, gpus_per_trial=1),
                   backend=unison.Local(workers=len(ids)), storage=tmp_path, progress=False)
    assert r.status == "completed" and (r.trials["status"] == "completed").all()
    views = _seen(r)
    for view in views:
        assert view["visible"] == 1 and view["device"] == "cuda:0" and view["param_device"] == "cuda:0"
        assert view["cvd"] in ids and view["ctx_gpus"] == [view["cvd"]]
    for a in views:  # trials that ran at the same time had different GPUs
        for b in views:
            if a is not b and a["started"] < b["ended"] and b["started"] < a["ended"]:
                assert a["cvd"] != b["cvd"]
    assert list(r.trials["gpus"]) == [view["cvd"] for view in views]


def test_half_a_gpu_per_trial_puts_two_training_trials_on_each_gpu(tmp_path: Path) -> None:
    ids = _gpus()
    together = 2 * len(ids)
    barrier = str(tmp_path / "barrier")

    def train(lr: float, ctx: Any) -> dict[str, float]:  # every trial runs at once, two on each GPU
        return search_trial(lr, ctx, barrier, together)

    r = unison.run(train, unison.Search(SPACE, trials=together, seed=1, gpus_per_trial=0.5),
                   backend=unison.Local(workers=together), storage=tmp_path / "runs", progress=False)
    assert r.status == "completed"
    views = _seen(r)
    assert len({view["pid"] for view in views}) == together
    assert Counter(view["cvd"] for view in views) == dict.fromkeys(ids, 2)
    assert all(view["param_device"] == "cuda:0" for view in views)


def ranks_train(model: Any, ctx: Any) -> dict[str, float]:
    """Full-batch SGD on this rank's half, on its GPU; each rank saves its full final weights."""
    import torch.distributed as dist

    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = (t.to(ctx.device) for t in ctx.shard(_data()))
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = {k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
               for k, v in model.state_dict().items()}
    torch.save(weights, ctx.trial_dir / f"weights-{ctx.rank}.pt")
    (ctx.trial_dir / f"rank-{ctx.rank}.json").write_text(json.dumps({
        "backend": dist.get_backend(), "device": ctx.device, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ctx_gpus": ctx.gpus, "param_device": str(next(model.parameters()).device)}))
    return {"loss": loss.item()}


def _reference() -> dict[str, Any]:
    """The same training on the full batch in this process, on the CPU (DDP and FSDP average the two
    equal halves' gradients: the full batch's)."""
    model = model_fn({})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_on_nccl_one_gpu_each_end_with_equal_weights(tmp_path: Path, strategy: str) -> None:
    two_gpus()
    ids = _gpus()
    run = unison.Distributed(workers=2, strategy=strategy, metric="loss", mode="min", gpus_per_worker=1)
    r = unison.run(ranks_train, run, model=model_fn, backend=unison.Local(gpus=ids[:2]), storage=tmp_path,
                   progress=False)
    trial = r.path / "trials" / "0000"
    ranks = [json.loads((trial / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["backend"] for rank in ranks] == ["nccl", "nccl"]  # chosen: every rank has a GPU
    assert sorted(rank["cvd"] for rank in ranks) == sorted(ids[:2])
    assert all(rank["device"] == rank["param_device"] == "cuda:0" for rank in ranks)
    assert all(rank["ctx_gpus"] == [rank["cvd"]] for rank in ranks)
    w0, w1 = (torch.load(trial / f"weights-{rank}.pt") for rank in (0, 1))
    reference = _reference()
    for name, value in reference.items():
        assert torch.equal(w0[name], w1[name]), name
        assert torch.allclose(w0[name], value, atol=1e-4), name
