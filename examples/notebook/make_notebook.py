"""Writes ``unison_notebook.ipynb`` beside this file: the example notebook, clean (no outputs).

Edit the cells here, then run ``python examples/notebook/make_notebook.py``; a test checks that the
committed notebook is what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

TITLE = """\
# Churn: one notebook, every distribution context

The training function is written once (one cell); each context below is one cell guarded by
`%%context`, which runs it only when the notebook's `context` parameter names it. Interactively the
context is `"single"`; from a shell, a scheduler or Airflow:

```
unison notebook examples/notebook/unison_notebook.ipynb --context search            # local workers
unison notebook examples/notebook/unison_notebook.ipynb --context search --backend spark
unison notebook examples/notebook/unison_notebook.ipynb --context ablation          # around the search's best
unison notebook examples/notebook/unison_notebook.ipynb --context distributed       # final training, 2 ranks
unison notebook examples/notebook/unison_notebook.ipynb --context pipeline          # all three in one call
```

Each step finds the previous one by name (`unison.load(name)`), so nothing but the context is passed."""

PARAMETERS = """\
context = "single"  # which %%context cells run: single, search, ablation, distributed, pipeline
backend = "local"  # where trials run (unison.context_backend()): local, inline or spark
trials = 6  # the search's size
epochs = 6  # training epochs per run
name = "churn"  # the search's experiment name: the later contexts find its best by this name
storage = None  # the folder of experiment directories (None: ./unison-runs)"""

SETUP = """\
%load_ext unison
import numpy as np
import pandas as pd
import torch
from torch import nn

import unison"""

DATA = """\
def load_customers() -> pd.DataFrame:
    \"\"\"The data generator: a synthetic customer table in which income matters most, tenure
    (non-linearly) less, age a little, noise not at all.\"\"\"
    rng = np.random.default_rng(0)
    age, income, tenure, noise = rng.normal(size=(4, 1200))
    logit = 2.5 * income - 2.0 * (tenure**2 - 1) + 0.4 * age
    churn = (logit + rng.logistic(size=1200) > 0).astype(np.float32)
    return pd.DataFrame({"age": age, "income": income, "tenure": tenure, "noise": noise, "churn": churn})"""

MODEL = """\
class Churn(nn.Module):
    \"\"\"A small MLP; LazyLinear takes the input width, so it fits the table without a feature.\"\"\"

    def __init__(self, units: int, dropout: float) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.LazyLinear(units), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(units, units), nn.ReLU())  # residual
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(units, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)
        h = h + self.block2(h)
        return self.out(self.dropout(h)).squeeze(-1)


def model_fn(hparams: dict) -> nn.Module:
    \"\"\"The model generator.\"\"\"
    return Churn(hparams["units"], hparams["dropout"])"""

TRAIN = """\
def train(model, dataset, hparams, reporter, ctx) -> dict:
    \"\"\"The one training function of every context: the ablation decides which columns `dataset`
    has and what `model` lacks; in distributed training `model` is wrapped in DDP and each rank
    trains on its shard of the rows.\"\"\"
    torch.set_num_threads(1)
    torch.manual_seed(ctx.seed or 0)
    x = torch.tensor(dataset.drop(columns="churn").to_numpy(), dtype=torch.float32)
    y = torch.tensor(dataset["churn"].to_numpy())
    fit, held_out = ctx.shard(torch.arange(900), even=True), torch.arange(900, len(y))
    with torch.no_grad():
        model(x[:2])  # the lazy layer takes the input width before the optimizer sees the parameters
    optimizer = torch.optim.Adam(model.parameters(), lr=hparams["lr"])
    accuracy = 0.0
    for epoch in range(hparams["epochs"]):
        model.train()
        for batch in fit[torch.randperm(len(fit))].split(150):
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = ((model(x[held_out]) > 0).float() == y[held_out]).float().mean().item()
        reporter.report(step=epoch, accuracy=accuracy)
    return {"accuracy": accuracy}"""

SPACE = """\
space = {
    "lr": unison.loguniform(1e-3, 3e-2),
    "units": unison.choice([8, 16, 32]),
    "dropout": unison.uniform(0.0, 0.3),
    "epochs": epochs,
}"""

SINGLE = """\
%%context single
run = unison.run(train, hparams={"lr": 0.01, "units": 16, "dropout": 0.1, "epochs": epochs},
                 model=model_fn, data=load_customers, name=f"{name}-single", storage=storage)
run.metrics"""

SEARCH = """\
%%context search
search = unison.Search(space, metric="accuracy", mode="max", trials=trials, seed=0)
found = unison.run(train, search, model=model_fn, data=load_customers, backend=unison.context_backend(),
                   name=name, storage=storage)
found.best"""

ABLATION = """\
%%context ablation
best = unison.load(name, storage=storage).best.hparams  # the newest search called `name`
study = unison.Ablation(base=best, features=["age", "income"], modules=["block2"], label="churn",
                        metric="accuracy", mode="max", repeats=2)
ablated = unison.run(train, study, model=model_fn, data=load_customers, backend=unison.context_backend(),
                     name=f"{name}-ablation", storage=storage)
ablated.ablation"""

DISTRIBUTED = """\
%%context distributed
best = unison.load(name, storage=storage).best.hparams
final = unison.run(train, unison.Distributed(workers=2, hparams=best, metric="accuracy"), model=model_fn,
                   data=load_customers, backend=unison.context_backend(), name=f"{name}-final",
                   storage=storage)
final.metrics"""

PIPELINE = """\
%%context pipeline
flow = unison.Pipeline(
    search=unison.Search(space, metric="accuracy", mode="max", trials=trials, seed=0),
    ablation=unison.Ablation(features=["age", "income"], modules=["block2"], label="churn", repeats=2),
    final=unison.Distributed(workers=2),  # hparams: the search's best
)
piped = unison.run(train, flow, model=model_fn, data=load_customers, backend=unison.context_backend(),
                   name=f"{name}-pipeline", storage=storage)
piped.search.best, piped.final.metrics"""


def markdown(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text)


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(text)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def build() -> nbformat.NotebookNode:
    """The example notebook."""
    cells = [
        markdown(TITLE),
        markdown("**Parameters** (the cell tagged `parameters`: papermill injects new values after it)."),
        code(PARAMETERS, "parameters"),
        code(SETUP),
        markdown("**The data and model generators**, called by unison where each run happens."),
        code(DATA),
        code(MODEL),
        markdown("**The training function**, the same in every context."),
        code(TRAIN),
        code(SPACE),
        markdown("**One cell per context.** A single run with fixed hyperparameters:"),
        code(SINGLE),
        markdown("A hyperparameter search, on the backend the parameters name:"),
        code(SEARCH),
        markdown("An ablation study around the search's best configuration:"),
        code(ABLATION),
        markdown("The final training with the best configuration, as 2 data-parallel processes (DDP, gloo):"),
        code(DISTRIBUTED),
        markdown("Or all three in one call, as one pipeline:"),
        code(PIPELINE),
    ]
    for number, cell in enumerate(cells):  # stable ids: the file changes only when a cell does
        cell["id"] = f"cell-{number:02d}"
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    return notebook


TARGET = Path(__file__).with_name("unison_notebook.ipynb")


def text() -> str:
    """The notebook's file contents."""
    notebook = build()
    nbformat.validate(notebook)
    return nbformat.writes(notebook) + "\n"


if __name__ == "__main__":
    TARGET.write_text(text(), encoding="utf-8")
    print(f"wrote {TARGET}", file=sys.stderr)
