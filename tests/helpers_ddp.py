"""One PyTorch training function for the distributed tests, importable by name in worker processes and
Spark executors (the driver ships its ``sys.path``).

``train`` is written once and run unchanged as a single run, a search, a search of 2-rank trials and a
2-rank distributed run. Each call records what it saw in ``ctx.trial_dir / rank-<r>.json``: its place
in the group, the rows ``ctx.shard`` gave it, the rows the (prepared) DataLoader gave it per epoch and
the sampler's epoch then, its losses, and a digest of its final parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import numpy as np
import torch

ROWS = 64  # divisible by 2 ranks and by the batch size: no padding, no ragged batch


def data_fn() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32))[:, None]
    return {"x": x, "y": y, "idx": np.arange(ROWS)}


def model_fn(hparams: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(hparams.get("init_seed", 0))
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _mse(model: Any, data: dict[str, np.ndarray]) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(data["x"]))
        return float(torch.nn.functional.mse_loss(predicted, torch.from_numpy(data["y"])))


def digest(model: torch.nn.Module) -> str:
    inner = getattr(model, "module", model)
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in inner.parameters())
    return hashlib.sha256(weights).hexdigest()


def train(hparams: dict[str, Any], model: Any, dataset: dict[str, np.ndarray], reporter: Any,
          ctx: Any) -> dict[str, float]:
    from torch.utils.data import DataLoader, TensorDataset

    record: dict[str, Any] = {
        "rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank, "device": ctx.device,
        "is_chief": ctx.is_chief, "pid": os.getpid(), "model": type(model).__name__,
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "shard": ctx.shard(dataset)["idx"].tolist(), "seen": [], "epochs": [], "losses": [],
        "full_before": _mse(model, dataset),
    }
    loader = ctx.prepare(DataLoader(TensorDataset(*(torch.from_numpy(dataset[k]) for k in ("x", "y", "idx"))),
                                    batch_size=8, shuffle=True))
    optimizer = ctx.prepare(torch.optim.SGD(model.parameters(), lr=hparams["lr"]))
    try:
        for epoch in range(hparams["epochs"]):
            rows = []
            for x, y, idx in loader:
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                rows += idx.tolist()
            record["seen"].append(rows)
            record["epochs"].append(getattr(loader.sampler, "epoch", None))
            record["losses"].append(_mse(model, dataset))
            reporter.report(step=epoch, loss=record["losses"][-1])
    finally:  # a stopped trial records what it did too
        record["full_after"] = _mse(model, dataset)
        record["digest"] = digest(model)
        record["loader_passes"] = getattr(loader, "epochs", None)
        (ctx.trial_dir / f"rank-{ctx.rank}.json").write_text(json.dumps(record))
    return {"loss": record["losses"][-1], "first_loss": record["losses"][0]}


def train_failing_on_rank_1(ctx: Any, model: Any) -> float:
    """Rank 1 raises at its third step; rank 0 is then waiting for it in an all-reduce."""
    (ctx.trial_dir / f"pid-{ctx.rank}").write_text(str(os.getpid()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.ones(8, 4)
    for step in range(10_000):
        if ctx.rank == 1 and step == 3:
            (ctx.trial_dir / "raised-at").write_text(repr(time.time()))
            raise ValueError(f"rank {ctx.rank} cannot go on at step {step}")
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 0.0
