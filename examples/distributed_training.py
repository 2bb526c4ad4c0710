"""One PyTorch training function as a single run, a search of 2-process DDP trials, and a 2-process
distributed run with the best hyperparameters (scikit-learn's digits, CPU, gloo).

    python examples/distributed_training.py            # local worker processes
    python examples/distributed_training.py --spark    # the same on a local[2] SparkSession
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import unison


def data_fn() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    return {"train": TensorDataset(x[:1400], y[:1400]), "val": (x[1400:], y[1400:])}


def model_fn(hparams: dict[str, Any]) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, hparams["units"]), torch.nn.ReLU(),
                               torch.nn.Linear(hparams["units"], 10))


def train(hparams: dict[str, Any], model: torch.nn.Module, dataset: dict[str, Any], reporter: Any,
          ctx: Any) -> dict[str, float]:
    torch.manual_seed(0)
    loader = ctx.prepare(DataLoader(dataset["train"], batch_size=32, shuffle=True))  # this rank's part
    optimizer = torch.optim.Adam(model.parameters(), lr=hparams["lr"])
    x_val, y_val = ctx.shard(dataset["val"])  # each rank evaluates its part of the validation set
    accuracy = 0.0
    for epoch in range(hparams["epochs"]):
        model.train()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x.to(ctx.device)), y.to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = (model(x_val.to(ctx.device)).argmax(1) == y_val.to(ctx.device)).float().sum()
        if ctx.world_size > 1:  # the accuracy over every rank's part
            counts = torch.stack([correct, torch.tensor(float(len(y_val)))])
            torch.distributed.all_reduce(counts)
            correct, total = counts[0], counts[1]
        else:
            total = torch.tensor(float(len(y_val)))
        accuracy = float(correct / total)
        reporter.report(step=epoch, accuracy=accuracy)  # on every rank; rank 0's decision counts
    return {"accuracy": accuracy}


if __name__ == "__main__":
    backend: Any = "local"
    if "--spark" in sys.argv:
        import os

        from pyspark.sql import SparkSession

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = SparkSession.builder.master("local[2]").config("spark.ui.showConsoleProgress", "false") \
            .getOrCreate()
        backend = unison.Spark(spark)

    single = unison.run(train, hparams={"lr": 0.01, "units": 32, "epochs": 3}, model=model_fn, data=data_fn)
    print("single run:", single.metrics)

    space = {"lr": unison.loguniform(1e-3, 3e-2), "units": unison.choice([16, 64]), "epochs": 6}
    search = unison.Search(space, metric="accuracy", mode="max", trials=4, seed=0, optimizer="random",
                           scheduler=unison.MedianStopping(grace_period=2, min_trials=2), workers_per_trial=2)
    found = unison.run(train, search, model=model_fn, data=data_fn, backend=backend)
    print(found.trials[["trial_id", "status", "lr", "units", "accuracy", "last_step", "worker"]])

    run = unison.run(train, unison.Distributed(workers=2, hparams=found.best.hparams, metric="accuracy"),
                     model=model_fn, data=data_fn, backend=backend)
    print(f"distributed run: accuracy {run.value:.3f}, logs in {run.path / 'trials' / '0000'}")
