"""What does running DDP through unison cost? Same model, same data, same loop, side by side in one run.

(a) local: a hand-written ``torch.multiprocessing.spawn`` DDP script (init_process_group, DDP, a
    DistributedSampler, ``set_epoch`` by hand) vs ``unison.run(train, unison.Distributed(workers=2))``
    on the local backend (the injected DDP model, ``ctx.prepare(loader)``, one ``reporter.report`` per
    epoch, which rank 0 sends to the driver and all ranks agree on). Per-step time (the loop's wall
    time over the measured epochs divided by their steps; the first epoch is a warm-up) and total wall
    time of the call (start-up, training, shutdown). Target: per-step ratio unison / spawn <= 1.05.
(b) Spark ``local[2]``, on one SparkSession: unison ``Distributed(workers=2)`` with ``backend="spark"``
    (a barrier stage of 2 tasks running the worker loop) vs PySpark's
    ``TorchDistributor(num_processes=2, local_mode=False)`` (a barrier stage of 2 tasks, each starting
    ``torchrun`` with one process) and, for reference, ``local_mode=True`` (``torchrun`` with 2
    processes on the driver). Total wall time of the call. Target: unison not slower.

Every process trains with one thread (``torch.set_num_threads(1)``, 2 ranks on 2 cores), gloo on CPU.
Contenders are interleaved, ``--repeats`` times each; medians are reported. In (b) the session and
its Python workers are warmed up with a trivial job first; unison's first Spark run (Python workers
that import torch for the first time) is reported separately, as "cold", from the later runs, which
reuse Spark's Python workers; every TorchDistributor run starts fresh ``torchrun`` processes.

(c) ``--gpu`` (only where ``torch.cuda.is_available()``): on one GPU, the per-step time of the same small
    training loop hand-written in this process against run by unison (``Search(trials=1,
    gpus_per_trial=1)`` on the local backend: a worker process given the GPU, ``ctx.device``), both
    with a pinned-memory DataLoader and non-blocking copies (target <= 1.05x); then a search's
    throughput (trials per minute, the call's wall time) with ``gpus_per_trial=0.25`` (four trials
    share the GPU) against ``gpus_per_trial=1`` (one at a time) on the same small model.

    python benchmarks/ddp_overhead.py            # about 3 minutes on 2 cores
    python benchmarks/ddp_overhead.py --quick    # a smoke run
    python benchmarks/ddp_overhead.py --gpu      # (c) only, about 2 minutes on one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import unison

HERE = Path(__file__).resolve().parent
WORLD = 2
FEATURES, HIDDEN, CLASSES = 256, 512, 10
ROWS, BATCH = 8192, 64
TARGETS = {"per_step_ratio_max": 1.05, "spark_wall_ratio_max": 1.0}
CONFIG = {"epochs": 4}  # epoch 0 is the warm-up


# ------------------------------------------------------------------------- the shared workload
def make_data() -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def make_model() -> Any:
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES))


def training_loop(model: Any, loader: Any, optimizer: Any, epochs: int,
                  end_of_epoch: Any) -> dict[str, float]:
    """The loop both sides run; returns the per-step time over epochs 1.. and the last loss."""
    import torch

    steps, measured_start = 0, 0.0
    loss = torch.tensor(0.0)
    for epoch in range(epochs):
        if epoch == 1:
            measured_start, steps = time.perf_counter(), 0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        end_of_epoch(epoch, loss.item())
    step_ms = 1000 * (time.perf_counter() - measured_start) / steps
    return {"step_ms": step_ms, "steps": steps, "loss": loss.item()}


# ----------------------------------------------------------------------------- hand-written DDP
def _spawned_rank(rank: int, world: int, port: int, results: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    dataset = make_data()
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = training_loop(model, loader, optimizer, CONFIG["epochs"],
                          lambda epoch, _: sampler.set_epoch(epoch + 1))
    if rank == 0:
        results.put(stats)
    dist.destroy_process_group()


def run_spawn() -> dict[str, Any]:
    import torch.multiprocessing as mp

    start = time.perf_counter()
    results = mp.get_context("spawn").SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned_rank, args=(WORLD, port, results), nprocs=WORLD, join=True)
    stats = results.get()
    return {**stats, "wall_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------- unison
def unison_train(model: Any, dataset: Any, reporter: Any, ctx: Any, epochs: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    loader = ctx.prepare(torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return training_loop(model, loader, optimizer, epochs,
                         lambda epoch, loss: reporter.report(step=epoch, loss=loss))


def run_unison(backend: Any, storage: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = unison.run(unison_train, unison.Distributed(workers=WORLD, hparams=CONFIG), model=make_model,
                        data=make_data, backend=backend, storage=storage, progress=False)
    return {**result.metrics, "wall_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------- TorchDistributor
def _distributor_train(epochs: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dataset = make_data()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = training_loop(model, loader, optimizer, epochs, lambda epoch, _: sampler.set_epoch(epoch + 1))
    dist.destroy_process_group()
    return stats


def run_distributor(local_mode: bool) -> dict[str, Any]:
    from pyspark.ml.torch.distributor import TorchDistributor

    start = time.perf_counter()
    stats = TorchDistributor(num_processes=WORLD, local_mode=local_mode, use_gpu=False).run(
        _distributor_train, CONFIG["epochs"])
    return {**stats, "wall_s": time.perf_counter() - start}


# ------------------------------------------------------------------------------------ (c) one GPU
GPU = {"rows": 32768, "batch": 256, "hidden": 1024, "epochs": 16, "search_trials": 12, "search_epochs": 10}


def gpu_loader(dataset: Any) -> Any:
    import torch

    return torch.utils.data.DataLoader(dataset, batch_size=GPU["batch"], shuffle=True, pin_memory=True)


def make_gpu_data() -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(GPU["rows"], FEATURES, generator=generator)
    return torch.utils.data.TensorDataset(x, torch.randint(0, CLASSES, (GPU["rows"],), generator=generator))


def make_gpu_model() -> Any:
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    hidden = GPU["hidden"]
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def gpu_loop(model: Any, loader: Any, device: str, epochs: int) -> dict[str, float]:
    """The loop both sides run on ``device``: per-step time over epochs 1.. (epoch 0 warms up)."""
    import torch

    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    steps, start = 0, 0.0
    loss = torch.zeros((), device=device)
    for epoch in range(epochs):
        if epoch == 1:
            torch.cuda.synchronize(device)
            start, steps = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    torch.cuda.synchronize(device)
    return {"step_ms": 1000 * (time.perf_counter() - start) / max(steps, 1), "steps": steps,
            "loss": loss.item()}


def gpu_train(model: Any, dataset: Any, ctx: Any, epochs: int) -> dict[str, float]:
    if not ctx.device.startswith("cuda"):
        raise RuntimeError(f"the trial was to run on a GPU, but ctx.device is {ctx.device!r} "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return {**gpu_loop(model, gpu_loader(dataset), ctx.device, epochs), "gpus": len(ctx.gpus)}


def run_gpu_hand() -> dict[str, Any]:
    start = time.perf_counter()
    stats = gpu_loop(make_gpu_model(), gpu_loader(make_gpu_data()), "cuda:0", GPU["epochs"])
    return {**stats, "wall_s": time.perf_counter() - start}


def run_gpu_unison(storage: Path) -> dict[str, Any]:
    start = time.perf_counter()
    result = unison.run(gpu_train, unison.Search({"epochs": GPU["epochs"]}, trials=1, gpus_per_trial=1),
                        model=make_gpu_model, data=make_gpu_data, backend=unison.Local(workers=1),
                        storage=storage, progress=False)
    (row,) = result.rows
    if row["status"] != "completed":
        raise RuntimeError(f"the unison GPU trial failed: see {result.path}/trials/0000/stderr.log")
    return {**row["metrics"], "wall_s": time.perf_counter() - start}


def run_gpu_search(share: float, storage: Path) -> dict[str, Any]:
    """A search of ``GPU["search_trials"]`` short trials, ``share`` GPUs each: its wall time."""
    start = time.perf_counter()
    space = {"epochs": GPU["search_epochs"], "lr": unison.loguniform(1e-3, 1e-1)}
    search = unison.Search(space, metric="loss", mode="min", trials=GPU["search_trials"], seed=0,
                           gpus_per_trial=share)
    result = unison.run(gpu_train, search, model=make_gpu_model, data=make_gpu_data,
                        backend=unison.Local(workers=4), storage=storage, progress=False)
    wall = time.perf_counter() - start
    done = sum(row["status"] == "completed" for row in result.rows)
    if done < GPU["search_trials"]:
        raise RuntimeError(f"{GPU['search_trials'] - done} trial(s) of the gpus_per_trial={share} search "
                           f"failed: see {result.path}")
    workers = json.loads((result.path / "experiment.json").read_text()).get("workers")
    return {"wall_s": wall, "trials": done, "workers": workers, "trials_per_min": 60 * done / wall}


def gpu_main(repeats: int, out: Path | None) -> None:
    try:
        import torch
    except ImportError:
        sys.exit("no CUDA GPU here: ddp_overhead.py --gpu needs PyTorch with CUDA; torch is not installed")
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA GPU here: ddp_overhead.py --gpu needs torch.cuda.is_available() (torch "
                 f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    storage = Path(tempfile.mkdtemp(prefix="unison-bench-gpu-"))
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        print(f"(c) one GPU: {torch.cuda.get_device_name(0)}")
        for _ in range(repeats):
            runs.setdefault("hand-written", []).append(run_gpu_hand())
            runs.setdefault("unison Local", []).append(run_gpu_unison(storage))
            for name in ("hand-written", "unison Local"):
                print(f"  {name:32s} {runs[name][-1]['step_ms']:7.3f} ms/step", flush=True)
        for share in (1, 0.25):
            name = f"search gpus_per_trial={share:g}"
            runs[name] = [run_gpu_search(share, storage)]
            print(f"  {name:32s} {runs[name][0]}", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    write_gpu_report(runs, repeats, out or HERE / "results" / "ddp_overhead-gpu.json")


def write_gpu_report(runs: dict[str, list[dict[str, Any]]], repeats: int, out: Path) -> None:
    import torch

    step_ratio = _median(runs["unison Local"], "step_ms") / _median(runs["hand-written"], "step_ms")
    shared, whole = runs["search gpus_per_trial=0.25"][0], runs["search gpus_per_trial=1"][0]
    report = {
        "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(0),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "workload": {**GPU, "features": FEATURES, "classes": CLASSES}, "repeats": repeats, "runs": runs,
        "per_step_ratio": step_ratio, "search_speedup_quarter_vs_whole": shared["trials_per_min"]
        / whole["trials_per_min"], "targets": {"per_step_ratio_max": TARGETS["per_step_ratio_max"]},
        "met": {"per_step_ratio": step_ratio <= TARGETS["per_step_ratio_max"]},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    met = "met" if step_ratio <= TARGETS["per_step_ratio_max"] else "NOT met"
    print(f"\nper-step unison / hand-written = {step_ratio:.3f} (target <= {TARGETS['per_step_ratio_max']}: "
          f"{met}); search throughput gpus_per_trial=0.25 / 1 = "
          f"{report['search_speedup_quarter_vs_whole']:.2f}x\nwritten to {out}")


# ---------------------------------------------------------------------------------------- main
def start_spark() -> Any:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{WORLD}]").appName("unison-ddp-overhead")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "1g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    spark.sparkContext.parallelize(range(WORLD), WORLD).count()  # the JVM and Python workers are up
    return spark


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 2 epochs")
    parser.add_argument("--skip-spark", action="store_true", help="only the local comparison")
    parser.add_argument("--gpu", action="store_true", help="(c) only: one GPU (needs CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes")
    args = parser.parse_args()
    if args.gpu:
        gpu_main(1 if args.quick else args.repeats, args.out)
        return
    if args.quick:
        args.repeats, CONFIG["epochs"] = 1, 2
    out = args.out or HERE / "results" / ("ddp_overhead-quick.json" if args.quick else "ddp_overhead.json")
    storage = Path(tempfile.mkdtemp(prefix="unison-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, stats: dict[str, Any]) -> None:
        runs.setdefault(name, []).append(stats)
        print(f"  {name:32s} {stats['wall_s']:6.2f} s   {stats['step_ms']:6.2f} ms/step", flush=True)

    try:
        print("(a) local, 2 processes")
        for _ in range(args.repeats):
            record("torch.multiprocessing.spawn", run_spawn())
            record("unison Local", run_unison(unison.Local(workers=WORLD), storage))
        session_s = None
        if not args.skip_spark:
            print("(b) Spark local[2]")
            started = time.perf_counter()
            spark = start_spark()
            session_s = time.perf_counter() - started
            try:
                record("unison Spark (cold)", run_unison(unison.Spark(spark), storage))
                for _ in range(args.repeats):
                    record("TorchDistributor local_mode=False", run_distributor(local_mode=False))
                    record("unison Spark", run_unison(unison.Spark(spark), storage))
                    record("TorchDistributor local_mode=True", run_distributor(local_mode=True))
            finally:
                spark.stop()
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    table = {name: {"wall_s": _median(r, "wall_s"), "step_ms": _median(r, "step_ms"), "runs": len(r),
                    "all_wall_s": [x["wall_s"] for x in r], "all_step_ms": [x["step_ms"] for x in r]}
             for name, r in runs.items()}
    step_ratio = table["unison Local"]["step_ms"] / table["torch.multiprocessing.spawn"]["step_ms"]
    wall_ratio = table["unison Local"]["wall_s"] / table["torch.multiprocessing.spawn"]["wall_s"]
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(), "versions": _versions(),
        "workload": {"features": FEATURES, "hidden": HIDDEN, "classes": CLASSES, "rows": ROWS, "batch": BATCH,
                     "epochs": CONFIG["epochs"], "ranks": WORLD,
                     "steps_measured_per_rank": runs["unison Local"][0]["steps"]},
        "repeats": args.repeats, "results": table, "targets": TARGETS,
        "local_per_step_ratio": step_ratio, "local_wall_ratio": wall_ratio,
        "spark_session_start_s": session_s,
    }
    met = {"per_step_ratio": step_ratio <= TARGETS["per_step_ratio_max"]}
    if "unison Spark" in table:
        spark_ratio = table["unison Spark"]["wall_s"] / table["TorchDistributor local_mode=False"]["wall_s"]
        report["spark_wall_ratio"] = spark_ratio
        report["spark_wall_ratio_local_mode"] = (table["unison Spark"]["wall_s"]
                                                 / table["TorchDistributor local_mode=True"]["wall_s"])
        met["spark_wall_ratio"] = spark_ratio <= TARGETS["spark_wall_ratio_max"]
    report["met"] = met
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'':34s} {'wall (median)':>14s} {'ms/step (median)':>17s}")
    for name, row in table.items():
        print(f"{name:34s} {row['wall_s']:12.2f} s {row['step_ms']:14.2f} ms")
    print(f"\nlocal: per-step unison / spawn = {step_ratio:.3f} (target <= {TARGETS['per_step_ratio_max']}: "
          f"{'met' if met['per_step_ratio'] else 'NOT met'}); wall time unison / spawn = {wall_ratio:.2f}")
    if "spark_wall_ratio" in report:
        print(f"Spark: wall time unison / TorchDistributor(local_mode=False) = "
              f"{report['spark_wall_ratio']:.2f} "
              f"(target <= 1: {'met' if met['spark_wall_ratio'] else 'NOT met'}); / local_mode=True = "
              f"{report['spark_wall_ratio_local_mode']:.2f}")
    print(f"written to {out}")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("unison", "torch", "pyspark")}


if __name__ == "__main__":
    main()
