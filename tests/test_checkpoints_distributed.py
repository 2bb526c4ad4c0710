"""Checkpoints of distributed runs and ablations (issue 16): a 2-rank run's checkpoint is rank 0's, and
a run whose rank 1 is SIGKILLed mid-run is started again (``Distributed(max_retries=1)``) from it.
DDP checkpoints a ``state_dict``; FSDP writes every rank's shard with ``torch.distributed.checkpoint``
into one directory, which rank 0 passes. A rank whose collective fails on a peer's broken connection,
reported before that peer's death reaches the driver, makes the run lost (retried), not failed; without a
death it fails after the grace. Real worker processes and gloo process groups on the CPU."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import unison  # noqa: E402

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # this module must be importable by name, here and in workers
    sys.path.insert(0, str(TESTS))

from processes import journal  # noqa: E402

STEPS, KILL_AT, LR, MOMENTUM = 6, 3, 0.1, 0.9


def _data() -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=generator)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def model_fn(hparams: dict[str, Any]) -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _dcp_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _resume(model: Any, optimizer: Any, ctx: Any, fsdp: bool) -> None:
    if fsdp:  # ctx.checkpoint: the restored directory every rank's shard was saved into
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _dcp_state(model, optimizer)
        dcp.load(state, checkpoint_id=ctx.checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        model.module.load_state_dict(ctx.checkpoint["model"])
        optimizer.load_state_dict(ctx.checkpoint["optim"])


def _checkpoint(model: Any, optimizer: Any, ctx: Any, fsdp: bool, step: int) -> Any:
    if fsdp:
        import torch.distributed.checkpoint as dcp

        folder = ctx.trial_dir / "dcp" / str(step)  # a new directory all ranks see: each writes its shard
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=folder)
        return folder
    return {"model": model.module.state_dict(), "optim": optimizer.state_dict(), "rank": ctx.rank}


def train(strategy: str, model: Any, reporter: Any, ctx: Any) -> dict[str, float]:
    """Full-batch SGD with momentum on this rank's half; rank 1 of attempt 0 dies at step KILL_AT.
    ``computed-<rank>.txt`` gets ``attempt step`` for every step computed."""
    fsdp = strategy == "fsdp"
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
    if ctx.checkpoint is not None:
        _resume(model, optimizer, ctx, fsdp)
    x, y = ctx.shard(_data())
    for step in range(start, STEPS):
        if step == KILL_AT and ctx.attempt == 0 and ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 0 fails in its next collective: "connection closed"
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checkpoint = _checkpoint(model, optimizer, ctx, fsdp, step)
        reporter.report(step=step, checkpoint=checkpoint, loss=loss.item())
        if fsdp and ctx.is_chief:  # reported: the trial's checkpoint is a copy of it
            shutil.rmtree(checkpoint)
        with open(ctx.trial_dir / f"computed-{ctx.rank}.txt", "a", encoding="utf-8") as log:
            log.write(f"{ctx.attempt} {step}\n")
    weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if ctx.is_chief:
        torch.save({k.removeprefix("module."): v for k, v in weights.items()}, ctx.trial_dir / "final.pt")
    return {"loss": loss.item()}


def _reference() -> dict[str, Any]:
    """The uninterrupted run's weights: full-batch SGD in this process (DDP and FSDP average the
    gradients of the two equal halves, which is the full batch's)."""
    model = model_fn({})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    x, y = _data()
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_rank_restarts_the_run_from_rank_0s_checkpoint(tmp_path: Path, strategy: str) -> None:
    run = unison.Distributed(workers=2, hparams={"strategy": strategy}, strategy=strategy, metric="loss",
                             mode="min", max_retries=1, keep_checkpoints=1)
    r = unison.run(train, run, model=model_fn, backend=unison.Local(workers=2), storage=tmp_path,
                   progress=False)
    trial = r.path / "trials" / "0000"
    assert r.checkpoint == trial / "checkpoints" / f"step-{STEPS - 1:06d}"
    events = journal(r.path)
    assert [ev["attempt"] for ev in events if ev["e"] == "start"] == [0, 1]
    assert [ev["e"] for ev in events].count("lost") == 1
    # every step reported once: the retry started after the checkpoint of step KILL_AT - 1
    assert [ev["step"] for ev in events if ev["e"] == "report"] == list(range(STEPS))
    for rank in (0, 1):
        lines = (trial / f"computed-{rank}.txt").read_text().splitlines()
        computed = [tuple(map(int, line.split())) for line in lines]
        assert computed == [(0, s) for s in range(KILL_AT)] + [(1, s) for s in range(KILL_AT, STEPS)]
    assert not (trial / "rank-1" / "checkpoints").exists()
    losses = {ev["step"]: ev["metrics"]["loss"] for ev in events if ev["e"] == "report"}
    best = min(losses, key=losses.__getitem__)  # mode="min"
    kept = sorted(int(p.name.split("-")[1]) for p in (trial / "checkpoints").iterdir())
    assert kept == sorted({STEPS - 1, best})  # keep_checkpoints=1: the last one, and the best

    saved = unison.load_checkpoint(r.checkpoint)
    fresh = model_fn({})
    if strategy == "fsdp":  # a directory of every rank's shard, read back whole in one process
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        assert saved == r.checkpoint / "data" and (saved / ".metadata").is_file()
        dcp_to_torch_save(saved, tmp_path / "whole.pt")
        fresh.load_state_dict(torch.load(tmp_path / "whole.pt")["model"])
    else:
        assert saved["rank"] == 0 and set(saved) == {"model", "optim", "rank"}
        fresh.load_state_dict(saved["model"])
    final = torch.load(trial / "final.pt")
    reference = _reference()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, final[name]), name  # the checkpoint holds rank 0's last weights
        assert torch.allclose(tensor, reference[name], atol=1e-5), name  # as if never interrupted


# What gloo raises in a collective whose peer's process died (the test raises it itself, first).
GLOO_RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer "
              "[127.0.0.1]:4242 (raised by the test)")


def _wait_for(path: Path, text: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not (path.is_file() and text in path.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} did not appear in {path} within {limit_s} s")
        time.sleep(0.02)


def peer_dies_after_the_reset(ctx: Any, reporter: Any) -> float:
    """Attempt 0: rank 0 raises gloo's connection error; rank 1 kills itself once rank 0's traceback is in
    rank 0's stderr.log, which is written after its ``rank_failed`` notice was sent: the driver has the
    survivor's failure before the death, the order that used to fail the run."""
    if ctx.attempt == 0:
        if ctx.rank == 0:
            raise RuntimeError(GLOO_RESET)
        _wait_for(ctx.trial_dir / "stderr.log", "Connection reset by peer")
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    for step in range(2):
        reporter.report(step=step, value=float(step))
    return 1.0


def reset_without_a_death(ctx: Any) -> float:
    """Rank 0 raises gloo's connection error, but no rank dies: rank 1 waits until it is aborted."""
    if ctx.rank == 0:
        (ctx.trial_dir / "raised-at").write_text(repr(time.monotonic()))
        raise RuntimeError(GLOO_RESET)
    time.sleep(60)
    return 0.0


@pytest.mark.slow
def test_a_rank_failing_on_a_dead_peers_connection_is_retried_not_failed(tmp_path: Path) -> None:
    run = unison.Distributed(workers=2, max_retries=1, metric="value")
    r = unison.run(peer_dies_after_the_reset, run, backend=unison.Local(workers=2), storage=tmp_path,
                   progress=False)
    assert r.value == 1.0
    events = journal(r.path)
    assert [ev["attempt"] for ev in events if ev["e"] == "start"] == [0, 1]
    [lost] = [ev for ev in events if ev["e"] == "lost"]
    assert "rank 1 of 2" in lost["reason"]
    assert "rank 0 had reported: RuntimeError: [../third_party/gloo" in lost["reason"]


@pytest.mark.slow
def test_a_connection_error_without_a_death_fails_after_the_grace(tmp_path: Path) -> None:
    from unison.driver.gangs import PEER_LOST_GRACE_S

    with pytest.raises(unison.RunFailed) as failure:
        unison.run(reset_without_a_death, unison.Distributed(workers=2, max_retries=1),
                   backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    failed_at = time.monotonic()
    message = str(failure.value)
    assert "rank 0 of 2" in message and "Connection reset by peer" in message and "Traceback" in message
    path = next(tmp_path.iterdir())
    raised = float((path / "trials" / "0000" / "raised-at").read_text())
    assert PEER_LOST_GRACE_S <= failed_at - raised < PEER_LOST_GRACE_S + 20  # held for the grace, bounded
    events = journal(path)
    assert [ev["e"] for ev in events].count("lost") == 0 and [ev["attempt"] for ev in events
                                                               if ev["e"] == "start"] == [0]


def test_an_ablations_trials_checkpoint_inline(tmp_path: Path) -> None:
    def fit(model: float, reporter: Any, ctx: Any) -> dict[str, float]:
        start = ctx.checkpoint_step + 1 if ctx.checkpoint is not None else 0
        for step in range(start, 3):
            reporter.report(step=step, checkpoint={"step": step, "model": model}, value=model * step)
        return {"value": model * 2}

    r = unison.run(fit, unison.Ablation(variants={"half": lambda: 0.5}), model=lambda: 1.0, backend="inline",
                   storage=tmp_path, progress=False)
    checkpoints = list(r.trials.sort_values("trial_id")["checkpoint"])
    assert [Path(p).name for p in checkpoints] == ["step-000002"] * 2
    assert [unison.load_checkpoint(p) for p in checkpoints] == [{"step": 2, "model": 1.0},
                                                                 {"step": 2, "model": 0.5}]


def test_distributed_checkpoint_options_are_checked_and_stored() -> None:
    with pytest.raises(ValueError, match=r"Distributed\(keep_checkpoints=0\) must be an int of at least 1"):
        unison.Distributed(workers=2, keep_checkpoints=0)
    with pytest.raises(ValueError, match=r"Distributed\(mode=...\) must be 'max' or 'min'"):
        unison.Distributed(workers=2, mode="lowest")
    with pytest.raises(ValueError, match="max_retries"):
        unison.Distributed(workers=2, max_retries=-1)
    # unset, they are not stored: runs recorded before they existed resume unchanged
    assert not {"max_retries", "keep_checkpoints", "mode"} & set(unison.Distributed(workers=2).to_dict())
    run = unison.Distributed(workers=2, metric="loss", mode="min", max_retries=1, keep_checkpoints=3)
    assert run.to_dict() | {"max_retries": 1, "keep_checkpoints": 3, "mode": "min"} == run.to_dict()
    search = run.to_search()
    assert (search.modes, search.max_retries, search.keep_checkpoints) == (["min"], 1, 3)


def test_a_single_runs_latest_checkpoint_is_its_results(tmp_path: Path) -> None:
    def fit(reporter: Any) -> float:
        for step in range(3):
            reporter.report(step=step, checkpoint={"step": step}, value=float(step))
        return 2.0

    r = unison.run(fit, hparams={}, storage=tmp_path)
    assert r.checkpoint == r.path / "trials" / "0000" / "checkpoints" / "step-000002"
    assert unison.load_checkpoint(r.checkpoint) == {"step": 2}
    assert unison.run(lambda: 1.0, hparams={}, storage=tmp_path).checkpoint is None
