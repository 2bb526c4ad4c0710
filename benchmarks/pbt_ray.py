"""Ray Tune's ``PopulationBasedTraining`` on ``pbt_task.py``'s task, for ``pbt.py --ray PYTHON``.

Runs in a Python that has ``ray[tune]`` and scikit-learn (not unison's virtualenv), e.g.

    python3 -m venv .venv-ray-bench && .venv-ray-bench/bin/pip install 'ray[tune]' scikit-learn
    .venv-ray-bench/bin/python benchmarks/pbt_ray.py --seeds 0,1,2,3,4 --out /tmp/ray.json

The same training loop (``pbt_task.run_trial``), space, population, interval, mutations, quantile and
resample probability as ``pbt.py``'s unison PBT; Ray's checkpoints are directories, so the state is
pickled into one, every step as in the unison run. 2 CPUs, one per trial: with 8 members Ray takes
turns (pauses members) as unison does with 2 workers. Writes one row per seed to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import pbt_task

MOMENTA = [0.0, 0.5, 0.9]


def train(config: dict[str, Any], data: dict[str, Any]) -> None:
    """The Ray trial: resumes from ``tune.get_checkpoint()`` (a clone's copy of its parent's state)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    state, start = None, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = pickle.loads(Path(folder, "state.pkl").read_bytes())
        state, start = saved["state"], saved["step"] + 1
    seed = zlib.crc32(tune.get_context().get_trial_id().encode())  # its own, like unison's ctx.seed

    def report(step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "state.pkl").write_bytes(pickle.dumps({"state": state, "step": step}))
            tune.report({**metrics, "step": step}, checkpoint=tune.Checkpoint.from_directory(folder))

    pbt_task.run_trial(config, data, seed, start, state, report, steps=config["steps"])


def _report_counter() -> Any:
    """A Tune callback that counts the reports (steps trained) of all trials."""
    from ray import tune

    class ReportCounter(tune.Callback):
        def __init__(self) -> None:
            self.reports = 0

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            self.reports += 1

    return ReportCounter()


def run_seed(seed: int, args: argparse.Namespace, data: dict[str, Any], storage: str) -> dict[str, Any]:
    """One Ray Tune PBT search; its best member's figures, wall time and work done."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    counter = _report_counter()
    random.seed(seed)  # Ray's PBT draws its parents and mutations from the random module
    pbt = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=args.interval,
        hyperparam_mutations={"lr": tune.loguniform(1e-3, 1.0), "momentum": MOMENTA},
        quantile_fraction=0.25, resample_probability=0.25)
    space = {"lr": tune.loguniform(1e-3, 1.0), "momentum": tune.choice(MOMENTA), "steps": args.steps}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train, data=data), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="acc", mode="max", num_samples=args.population, scheduler=pbt,
                                    search_alg=BasicVariantGenerator(random_state=seed), reuse_actors=True),
        # num_to_keep=2 would force a snapshot of the experiment's state at every other checkpoint
        run_config=tune.RunConfig(name=f"pbt-seed-{seed}", storage_path=storage, verbose=0,
                                  callbacks=[counter]))
    start = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - start
    best = results.get_best_result(metric="acc", mode="max", scope="last")
    metrics = best.metrics
    return {"seed": seed, "best_val": float(metrics["acc"]), "best_test": float(metrics["test_acc"]),
            "seconds": seconds, "steps_trained": counter.reports, "trials": len(results),
            "best_step": int(metrics["step"]), "exploits": getattr(pbt, "_num_perturbations", None),
            "best_hparams": {k: best.config[k] for k in ("lr", "momentum")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated")
    parser.add_argument("--steps", type=int, default=pbt_task.STEPS)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - started
    data = pbt_task.load_split()
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = run_seed(seed, args, data, storage)
            rows.append(row)
            print(f"ray seed {seed}: test {row['best_test']:.4f} val {row['best_val']:.4f} "
                  f"{row['seconds']:.1f} s, {row['steps_trained']} steps", flush=True)
    ray.shutdown()
    Path(args.out).write_text(json.dumps({"ray": ray.__version__, "init_seconds": init_seconds,
                                          "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
