"""GP in a process of its own (``optimizer="auto"``): the same suggestions as in the driver, torch never
imported there, no process left behind, the child's errors raised in the driver, the fall-back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from processes import alive, wait_for

import unison
from unison.optimizers import AutoSearch, Optimizer, OptunaOptimizer
from unison.optimizers.process import ChildTraceback, Offloaded, OptimizerProcess, OptimizerProcessGone

SPACE = {"x": unison.uniform(-2, 2), "y": unison.loguniform(1e-3, 1.0), "n": unison.integer(1, 8)}
TESTS = Path(__file__).resolve().parent


def _value(hparams: dict[str, Any]) -> float:
    return (hparams["x"] - 0.5) ** 2 + hparams["y"] + 0.01 * hparams["n"]


def _drive(optimizer: Optimizer, trials: int, in_flight: int = 3, kill_at: int | None = None) -> list[dict]:
    """Suggest with ``in_flight`` trials running, the oldest ending first (each asked twice: the same
    answer); with ``kill_at``, GP's process is SIGKILLed before that trial's suggestion."""
    suggested: list[dict] = []
    running: dict[int, dict] = {}
    while len(suggested) < trials or running:
        while len(running) < in_flight and len(suggested) < trials:
            number = len(suggested)
            if number == kill_at:
                os.kill(optimizer._gp.process.pid, signal.SIGKILL)  # type: ignore[attr-defined]  # noqa: SLF001
            running[number] = optimizer.suggest(number)  # type: ignore[assignment]
            assert optimizer.suggest(number) == running[number]
            suggested.append(running[number])
        number = min(running)
        hparams = running.pop(number)
        optimizer.observe(number, hparams, _value(hparams), "completed")
    return suggested


def _in_driver(trials: int) -> list[dict]:
    gp = OptunaOptimizer("gp")
    gp.setup(SPACE, "min", 7)
    return _drive(gp, trials)


def test_gp_in_its_process_suggests_what_gp_in_the_driver_does() -> None:
    """18 trials, 3 in flight: 12 random ones drawn in the driver (10 completed by then), then GP's
    models in its process (handed the study with 2 trials in flight); suggestion for suggestion what
    OptunaOptimizer("gp") proposes in this process. close() ends the process."""
    auto = AutoSearch(timing=False)
    auto.setup(SPACE, "min", 7)
    try:
        suggested = _drive(auto, 18)
        gp = auto._gp  # noqa: SLF001
        assert isinstance(gp, Offloaded) and gp.loaded and gp.process is not None
        pid = gp.process.pid
        assert alive(pid)
        assert auto.sampler == "gp" and len(auto._fit_s) == 6  # noqa: SLF001
    finally:
        auto.close()
    wait_for(lambda: not alive(pid), 10, "the optimizer's process to exit")  # (reaped in the background)
    assert suggested == _in_driver(18)


def test_gp_goes_on_in_the_driver_with_the_same_suggestions_when_its_process_dies(
        capfd: pytest.CaptureFixture[str]) -> None:
    """GP's process is killed after two of its suggestions: the driver's copy replays the calls it was
    sent and suggests what the process would have; stderr says so."""
    auto = AutoSearch(timing=False)
    auto.setup(SPACE, "min", 7)
    try:
        suggested = _drive(auto, 18, kill_at=14)
    finally:
        auto.close()
    assert suggested == _in_driver(18)
    err = capfd.readouterr().err
    assert "OptunaOptimizer('gp') goes on in the driver's process" in err and "SIGKILL" in err


def _run_driver(tmp_path: Path, mode: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(TESTS / "gp_process_driver.py"), str(tmp_path), mode],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_search_fits_gp_without_torch_in_the_driver_and_leaves_no_process(tmp_path: Path) -> None:
    """A fresh driver: 15 trials on Local(workers=2) with GP fitting models from trial 10 on: the search
    completes, neither torch nor optuna was imported in the driver (GP's random start is drawn without
    them), and GP's process is gone when run() returns."""
    seen = _run_driver(tmp_path, "local")
    assert seen == {"outcome": "returned", "completed": 15, "sampler": "gp", "handed_over": True,
                    "torch": False, "optuna": False, "children": []}


def test_an_interrupted_search_leaves_no_gp_process(tmp_path: Path) -> None:
    """Trial 13 raises KeyboardInterrupt (inline backend) after GP went to its process: it ends too."""
    seen = _run_driver(tmp_path, "interrupt")
    assert seen["outcome"] == "interrupted" and seen["handed_over"] and seen["children"] == []


def test_the_process_ends_when_its_driver_is_killed() -> None:
    """SIGKILL the driver: the child reads the end of its stdin and exits."""
    code = ("from unison.optimizers.process import OptimizerProcess\n"
            "p = OptimizerProcess()\nprint(p.pid, flush=True)\nimport time\ntime.sleep(60)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        child = int(driver.stdout.readline())
        assert alive(child)
        driver.kill()
        driver.wait()
        wait_for(lambda: not alive(child), 10, "the optimizer's process to exit")
    finally:
        driver.kill()


class Failing(Optimizer):
    """Fails in ``suggest`` at trial 2 and in ``observe`` of trial 5."""

    def suggest(self, trial_number: int) -> dict[str, Any] | None:
        if trial_number == 2:
            raise ValueError(f"no suggestion for trial {trial_number}")
        return {"x": trial_number}

    def observe(self, trial_number: int, hparams: dict[str, Any], value: Any, status: str) -> None:
        if trial_number == 5:
            raise KeyError("cannot learn from trial 5")


def test_an_exception_in_the_process_is_raised_in_the_driver_with_its_traceback() -> None:
    """suggest's exception at once; observe's at the next call that waits (suggest, close); each with
    the child's traceback as its cause."""
    process = OptimizerProcess()
    try:
        process.load(Failing())
        assert process.suggest(1) == {"x": 1}
        with pytest.raises(ValueError, match="no suggestion for trial 2") as raised:
            process.suggest(2)
        cause = raised.value.__cause__
        assert isinstance(cause, ChildTraceback)
        assert f"raised in the optimizer's process (pid {process.pid})" in str(cause)
        assert "test_optimizer_process.py" in str(cause) and "in suggest" in str(cause)
        process.observe(5, {"x": 5}, 1.0, "completed")  # not waited for
        with pytest.raises(KeyError, match="cannot learn from trial 5"):
            process.suggest(6)
        assert process.suggest(6) == {"x": 6}  # raised once
        process.observe(5, {"x": 5}, 1.0, "completed")
        with pytest.raises(KeyError, match="cannot learn from trial 5"):
            process.close()
    finally:
        process.close()
    wait_for(lambda: not alive(process.pid), 10, "the optimizer's process to exit")
    with pytest.raises(OptimizerProcessGone, match=r"optimizer's process \(pid \d+\) is gone: it was closed"):
        process.suggest(7)


def test_an_optimizer_that_cannot_be_pickled_stays_in_the_driver(capfd: pytest.CaptureFixture[str]) -> None:
    class Local(Optimizer):  # a local class holding a lock: cloudpickle takes the class, not the lock
        def __init__(self) -> None:
            import threading

            self.lock = threading.Lock()

        def suggest(self, trial_number: int) -> dict[str, Any] | None:
            return {"x": trial_number}

    offloaded = Offloaded(Local(), OptimizerProcess())
    try:
        assert offloaded.suggest(0) == {"x": 0}
        assert offloaded.process is None and not offloaded.loaded
    finally:
        offloaded.close()
    assert "cannot be pickled for its process" in capfd.readouterr().err
