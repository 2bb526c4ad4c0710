"""Tracking with no logging call in the training function: a search logged to MLflow and TensorBoard.

    pip install 'unison[mlflow,tensorboard]'
    python examples/tracking.py                     # MLflow in ./mlflow.db, TensorBoard in the experiment
    mlflow ui --backend-store-uri sqlite:///mlflow.db
    tensorboard --logdir unison-runs/<experiment>/tensorboard

The same search with no code change: ``UNISON_CALLBACKS=mlflow,tensorboard
MLFLOW_TRACKING_URI=sqlite:///mlflow.db python your_script.py``; or, after the fact,
``unison export mlflow unison-runs/<experiment> --tracking-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import math
import sys

import unison


def train(lr: float, units: int, reporter: unison.Reporter, ctx: unison.Context) -> dict[str, float]:
    """A stand-in for real training: accuracy rises per epoch, best near lr=0.01, units=128."""
    accuracy = 0.0
    for epoch in range(8):
        accuracy = (1 - math.exp(-(epoch + 1) / 3)) * math.exp(-(math.log10(lr) + 2) ** 2) \
            * (1 - abs(math.log2(units) - 7) / 10)
        reporter.report(step=epoch, accuracy=accuracy)
    print(f"trained lr={lr:.4g} units={units}")  # lands in the trial's stdout.log, an MLflow artifact
    return {"accuracy": accuracy}


def main(trials: int = 12) -> None:
    from mlflow import MlflowClient

    uri = "sqlite:///mlflow.db"
    space = {"lr": unison.loguniform(1e-4, 1e-1), "units": unison.integer(16, 256, log=True)}
    search = unison.Search(space, metric="accuracy", mode="max", trials=trials, scheduler="asha", seed=0)
    result = unison.run(train, search, backend=unison.Local(workers=2), name="tracking-example",
                        callbacks=[unison.MLflowLogger(uri, experiment_name="tracking-example"),
                                   unison.TensorBoardLogger()])
    print("best:", result.best)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tracking-example")
    runs = client.search_runs([experiment.experiment_id], f"tags.`unison.experiment_dir` = '{result.path}'")
    (parent,) = runs
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    print(f"MLflow: parent run {parent.info.run_id} (best trial {parent.data.tags['unison.best_trial_id']}), "
          f"{len(children)} nested trial runs (their ids: {result.path / 'mlflow.json'})")
    for child in sorted(children, key=lambda r: int(r.data.tags["unison.trial_id"])):
        history = client.get_metric_history(child.info.run_id, "accuracy")
        print(f"  {child.info.run_name}: {child.data.tags['unison.status']:9s} "
              f"{len(history)} reports, lr={child.data.params['lr'][:8]} units={child.data.params['units']}")
    print("TensorBoard runs:", sorted(p.name for p in (result.path / "tensorboard").iterdir()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
