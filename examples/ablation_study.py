"""An ablation study: what does each feature, module and design choice of a small classifier add?

A PyTorch MLP predicts churn from a synthetic customer table in which ``income`` matters most,
``tenure`` (non-linearly) less, ``age`` a little and ``noise`` not at all. The study removes each
feature, replaces each named module by an identity, swaps in a linear model as a variant, and
repeats every configuration with three seeds, in parallel on two worker processes. No downloads;
a few seconds.

    python examples/ablation_study.py
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

import unison


def load_customers() -> pd.DataFrame:
    """The dataset (a data generator without arguments is loaded once per worker)."""
    rng = np.random.default_rng(0)
    age, income, tenure, noise = rng.normal(size=(4, 2000))
    logit = 2.5 * income - 2.0 * (tenure**2 - 1) + 0.4 * age  # tenure: non-linear
    churn = (logit + rng.logistic(size=2000) > 0).astype(np.float32)
    return pd.DataFrame({"age": age, "income": income, "tenure": tenure, "noise": noise, "churn": churn})


class Classifier(nn.Module):
    """``LazyLinear`` infers the input width, so the same model fits the table without a feature."""

    def __init__(self, units: int, dropout: float) -> None:
        super().__init__()
        self.hidden = nn.LazyLinear(units)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(units, units), nn.ReLU())  # a residual block
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(units, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.hidden(x))
        h = h + self.block(h)
        return self.out(self.dropout(h)).squeeze(-1)


def model_fn(hparams: dict[str, Any]) -> nn.Module:
    return Classifier(hparams["units"], hparams["dropout"])


def linear_model_fn(hparams: dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.LazyLinear(1), nn.Flatten(0))


def train(model_fn, dataset: pd.DataFrame, hparams: dict[str, Any], reporter: unison.Reporter) -> dict:
    """Written once: the study decides which columns ``dataset`` has and what ``model_fn`` builds."""
    torch.set_num_threads(1)
    torch.manual_seed(hparams["seed"])  # the study injects seed, seed+1, ... (also as ctx.seed)
    model = model_fn(hparams)  # with the ablated modules replaced, or the variant
    x = torch.tensor(dataset.drop(columns="churn").to_numpy(), dtype=torch.float32)
    y = torch.tensor(dataset["churn"].to_numpy())
    order = torch.randperm(len(y))
    fit, held_out = order[:1500], order[1500:]
    model(x[:1])  # materialize the lazy layer before the optimizer sees the parameters
    opt = torch.optim.Adam(model.parameters(), lr=hparams["lr"])
    accuracy = 0.0
    for epoch in range(hparams["epochs"]):
        model.train()
        for batch in fit[torch.randperm(len(fit))].split(250):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = ((model(x[held_out]) > 0).float() == y[held_out]).float().mean().item()
        reporter.report(step=epoch, accuracy=accuracy)
    return {"accuracy": accuracy}


if __name__ == "__main__":
    study = unison.Ablation(
        base={"lr": 0.01, "units": 32, "dropout": 0.1, "epochs": 10},
        features=["income", "tenure", "age", "noise"],
        modules=["act", "block", "dropout"],
        variants={"linear": linear_model_fn},
        label="churn",
        metric="accuracy",
        mode="max",
        repeats=3,
    )
    result = unison.run(train, study, model=model_fn, data=load_customers, backend=unison.Local(workers=2),
                        name="churn-ablation")
    pd.set_option("display.width", 200)
    print(result.ablation.round(4).to_string(index=False))
    try:
        print("bar chart:", result.plot())
    except ImportError as exc:  # matplotlib is optional
        print(exc)
    print(f"inspect it with: unison show {result.path}")
