"""A search whose trials checkpoint every epoch and resume themselves, and the best model read back.

A small PyTorch regression, 4 trials on 2 worker processes. The first trial's worker dies at epoch 6
of its first attempt (``os._exit``, as an out-of-memory kill would end it): the trial runs again on
a fresh worker, gets its last checkpoint as ``ctx.checkpoint`` and goes on from epoch 6 instead of
from the start. Then the best trial's checkpoint is loaded into a fresh model. No downloads; about
half a minute.

    python examples/checkpoints.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import unison

EPOCHS, DIE_AT = 12, 6


def data_fn() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    return {"x": x, "y": torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]}


def model_fn(hparams: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, hparams["units"]), nn.Tanh(), nn.Linear(hparams["units"], 1))


def evaluate(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(model(data["x"]), data["y"]).item()


def train(hparams: dict[str, Any], model: nn.Module, dataset: dict[str, torch.Tensor], reporter: Any,
          ctx: Any) -> dict[str, float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=hparams["lr"])
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
    if ctx.checkpoint is not None:  # a retry: go on from the last checkpoint
        model.load_state_dict(ctx.checkpoint["model"])
        optimizer.load_state_dict(ctx.checkpoint["optimizer"])
    for epoch in range(start, EPOCHS):
        if ctx.trial_id == 0 and ctx.attempt == 0 and epoch == DIE_AT:
            os._exit(3)  # the worker dies mid-trial
        for batch in torch.randperm(512, generator=torch.Generator().manual_seed(epoch)).split(64):
            loss = nn.functional.mse_loss(model(dataset["x"][batch]), dataset["y"][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        reporter.report(step=epoch, checkpoint=state, loss=evaluate(model, dataset))
    return {"loss": evaluate(model, dataset), "started_at": start}


if __name__ == "__main__":
    space = {"lr": unison.loguniform(1e-3, 3e-2), "units": unison.choice([16, 32, 64])}
    search = unison.Search(space, metric="loss", mode="min", trials=4, optimizer="random", seed=1,
                           keep_checkpoints=1)
    r = unison.run(train, search, model=model_fn, data=data_fn, backend=unison.Local(workers=2))
    assert isinstance(r, unison.SearchResult) and r.best is not None and r.best.checkpoint is not None
    table = r.trials[["trial_id", "status", "attempts", "started_at", "loss", "checkpoint"]]
    table = table.assign(checkpoint=[str(Path(p).relative_to(r.path)) for p in table["checkpoint"]])
    print(table.to_string(index=False))
    first = r.trials.set_index("trial_id").loc[0]
    print(f"trial 0 ran {first['attempts']} times, the last from epoch {first['started_at']:.0f}")

    print("best checkpoint:", r.best.checkpoint)
    saved = unison.load_checkpoint(r.best.checkpoint)  # what the report saved: a dict of state_dicts
    print("load_checkpoint returns:", {name: type(value).__name__ for name, value in saved.items()},
          "with", sorted(saved["model"]))
    model = model_fn(r.best.hparams)
    model.load_state_dict(saved["model"])
    print(f"the best model's loss: {evaluate(model, data_fn()):.5f} (recorded: {r.best.metrics['loss']:.5f})")
