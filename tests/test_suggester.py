"""A learning optimizer's suggestions computed ahead, on a thread, while workers are busy
(``unison.driver.suggester``); the inline backend keeps its synchronous, reproducible sequence."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import pytest

import unison
from unison.driver.suggester import Suggester
from unison.optimizers.optuna import TPESearch

SPACE = {"x": unison.uniform(-2, 2), "y": unison.uniform(-2, 2)}


def objective(x: float, y: float) -> float:
    return (x - 0.5) ** 2 + (y + 0.3) ** 2


def fresh_tpe(seed: int) -> TPESearch:
    tpe = TPESearch(n_startup_trials=3)
    tpe.setup(SPACE, "min", seed)
    return tpe


def test_inline_with_max_concurrent_is_the_synchronous_sequence(tmp_path: Any) -> None:
    search = unison.Search(SPACE, metric="loss", mode="min", trials=10, seed=11, max_concurrent=3,
                           optimizer=TPESearch(n_startup_trials=3))
    r = unison.run(lambda x, y: {"loss": objective(x, y)}, search, backend="inline", storage=tmp_path,
                   progress=False)
    got = [row["hparams"] for row in sorted(r.rows, key=lambda row: row["trial_id"])]
    seed = r.path.joinpath("experiment.json").read_text()
    import json

    tpe = fresh_tpe(json.loads(seed)["seed"])  # the window run_inline keeps, by hand: 3 in flight
    want: list[dict[str, Any]] = []
    window: deque[int] = deque()
    for number in range(10):
        while len(window) == 3:
            done = window.popleft()
            tpe.observe(done, want[done], objective(**want[done]), "completed")
        want.append(tpe.suggest(number))
        window.append(number)
    assert got == want


def test_suggestions_ahead_are_those_of_the_same_calls_made_in_order() -> None:
    ahead, plain = Suggester(fresh_tpe(5)), fresh_tpe(5)
    got, want = [ahead.suggest(0), ahead.suggest(1)], [plain.suggest(0), plain.suggest(1)]
    for number in range(2, 8):
        ahead.prefetch(number)  # computed before the ending trial's result is told, as on workers
        done = number - 2
        ahead.observe(done, got[done], objective(**got[done]), "completed")
        plain_next = plain.suggest(number)
        plain.observe(done, want[done], objective(**want[done]), "completed")
        got.append(ahead.suggest(number))
        want.append(plain_next)
    ahead.close()
    assert got == want
    assert not ahead.thread.is_alive()


class Failing(unison.Optimizer):
    """Fails at its third suggestion; records the thread each call ran on."""

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def suggest(self, trial_number: int) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        if trial_number == 2:
            raise RuntimeError("the optimizer broke at trial 2")
        return {"x": 0.1 * trial_number}


def test_an_error_in_suggest_is_raised_where_the_driver_takes_the_suggestion() -> None:
    ahead = Suggester(Failing())
    assert ahead.suggest(0) == {"x": 0.0}
    ahead.prefetch(1)
    assert ahead.suggest(1) == {"x": 0.1}
    ahead.prefetch(2)
    with pytest.raises(RuntimeError, match="broke at trial 2"):
        ahead.suggest(2)
    ahead.prefetch(3)
    ahead.close()  # the suggestion ahead is no longer needed: never computed
    assert ahead.optimizer.threads == {"unison-suggester"}


def test_a_search_on_workers_suggests_ahead_and_ends_its_thread(tmp_path: Any) -> None:
    def train(x: float, y: float) -> float:
        return objective(x, y)

    search = unison.Search(SPACE, metric="loss", mode="min", trials=8, seed=2, optimizer="tpe")
    r = unison.run(train, search, backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert r.status == "completed"
    assert sorted(r.trials["trial_id"]) == list(range(8))
    assert set(r.trials["status"]) == {"completed"}
    assert not [t for t in threading.enumerate() if t.name == "unison-suggester"]


def test_one_worker_suggests_knowing_every_result_as_inline_does(tmp_path: Any) -> None:
    """A sequential search computes nothing ahead (a suggestion would miss the result of the trial
    ending): one worker gives exactly the inline backend's trials for the seed."""
    def train(x: float, y: float) -> float:
        return objective(x, y)

    search = unison.Search(SPACE, metric="loss", mode="min", trials=14, seed=5, optimizer="tpe")
    inline = unison.run(train, search, backend="inline", storage=tmp_path / "a", progress=False)
    one = unison.run(train, search, backend=unison.Local(workers=1), storage=tmp_path / "b", progress=False)
    assert [r["hparams"] for r in one.rows] == [r["hparams"] for r in inline.rows]


def test_a_failing_optimizer_on_workers_fails_the_search_as_inline(tmp_path: Any) -> None:
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=6, optimizer=Failing())
    with pytest.raises(RuntimeError, match="broke at trial 2"):
        unison.run(lambda x: x, search, backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert not [t for t in threading.enumerate() if t.name == "unison-suggester"]


class FailsOnTheLastResult(unison.Optimizer):
    """Suggests 0.1 n; its ``observe`` fails when told how the last of ``trials`` trials ended."""

    def __init__(self, trials: int) -> None:
        self.trials, self.seen = trials, 0

    def suggest(self, trial_number: int) -> dict[str, Any]:
        return {"x": 0.1 * trial_number}

    def observe(self, trial_number: int, hparams: dict[str, Any], value: Any, status: str) -> None:
        self.seen += 1
        if self.seen == self.trials:
            raise RuntimeError("the optimizer broke on the last result")


@pytest.mark.parametrize("backend", ["inline", "local"])
def test_an_error_in_the_last_observe_fails_the_search_on_every_backend(tmp_path: Any, backend: str) -> None:
    """No later call raises it on the suggester's thread: closing the suggester does."""
    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=4,
                           optimizer=FailsOnTheLastResult(4))
    with pytest.raises(RuntimeError, match="broke on the last result"):
        unison.run(lambda x: x, search, backend=unison.Local(workers=2) if backend == "local" else "inline",
                   storage=tmp_path, progress=False)
    assert unison.load(next(tmp_path.iterdir())).status == "failed"


# ------------------------------------------------- reports that no scheduler judges do not wait
def _worker_and_driver() -> tuple[Any, Any, Any]:
    from unison.driver.server import Server
    from unison.protocol import new_secret
    from unison.worker.serve import _Session

    server = Server(new_secret())
    session = _Session.open(server.address, server.secret, "w0", heartbeat_interval=60.0,
                            exit_when_driver_gone=False, shared_filesystem=True, ship_limit=1 << 20)
    hello = server.events.get(timeout=10)
    assert hello.message["t"] == "hello"
    return server, session, hello.peer


def _report(server: Any) -> dict[str, Any]:
    event = server.events.get(timeout=10)
    assert event.message["t"] == "report", event
    return event.message


def test_without_a_scheduler_reports_go_on_without_waiting_and_a_stop_still_arrives() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from unison.worker.serve import UNWAITED_REPORTS

    server, session, peer = _worker_and_driver()
    pool = ThreadPoolExecutor(1)
    try:
        first = pool.submit(session._decide, 5, 0, {"v": 0.0})  # the first waits for the decision
        assert "wait" not in _report(server)
        assert not first.done()
        peer.conn.send({"t": "decision", "stop": None, "judged": False})
        assert first.result(timeout=10) is None
        for step in range(1, UNWAITED_REPORTS + 1):  # the next ones do not wait (no answer is sent)
            assert session._decide(5, step, {"v": float(step)}) is None
            message = _report(server)
            assert (message["step"], message["wait"]) == (step, False)
        bounded = pool.submit(session._decide, 5, UNWAITED_REPORTS + 1, {"v": 1.0})
        assert "wait" not in _report(server)  # the window is full: this one waits
        peer.conn.send({"t": "decision", "stop": None, "judged": False})
        assert bounded.result(timeout=10) is None
        assert session._decide(5, 40, {"v": 1.0}) is None
        assert _report(server)["wait"] is False
        # the driver stops the trial for a reason of its own: another trial's stop is not this one's
        peer.conn.send({"t": "decision", "stop": "not yours", "trial_id": 4})
        peer.conn.send({"t": "decision", "stop": "the trial already ended", "trial_id": 5})
        for _ in range(200):
            if len(session.current["late"]) == 2:
                break
            threading.Event().wait(0.01)
        assert session._decide(5, 41, {"v": 1.0}) == "the trial already ended"
        assert server.events.empty()  # the stopped report was not sent
    finally:
        pool.shutdown()
        session.conn.close()
        server.close()


def test_reports_without_a_scheduler_are_all_journaled_in_order(tmp_path: Any) -> None:
    def train(x: float, reporter: Any) -> float:
        for step in range(50):
            reporter.report(step=step, value=x + step)
        return x

    search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=4, seed=1, optimizer="random")
    r = unison.run(train, search, backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert r.status == "completed"
    import json

    events = [json.loads(line) for line in (r.path / "journal.jsonl").read_text().splitlines()]
    hparams = {ev["id"]: ev["hparams"]["x"] for ev in events if ev["e"] == "start"}
    for tid, x in hparams.items():
        steps = [(ev["step"], ev["metrics"]["value"]) for ev in events
                 if ev["e"] == "report" and ev["id"] == tid]
        assert steps == [(step, x + step) for step in range(50)]
    ends = [i for i, ev in enumerate(events) if ev["e"] == "end"]
    last_report = {ev["id"]: i for i, ev in enumerate(events) if ev["e"] == "report"}
    for i in ends:  # every report of a trial is journaled before its end
        assert last_report[events[i]["id"]] < i
