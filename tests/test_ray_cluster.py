"""The Ray backend on a two-node Ray cluster on this machine (``ray start --head`` on 127.0.0.1 and a
second ``ray start --address``, one CPU each), reached with ``unison.Ray(address=...)``: the slots'
actors run on both nodes, and a 2-rank run spreads over them with ``STRICT_SPREAD``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import unison

ray = pytest.importorskip("ray")
state = pytest.importorskip("ray.util.state")

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.5x+ turns on token authentication, and a driver here fails with InvalidAuthToken against a
# cluster started by `ray start` (both sides on this machine): the test cluster goes without
NO_TOKEN = {"RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node(*args: str, log: Path) -> subprocess.Popen[bytes]:
    # --block: the node's processes live while this one does; a session of its own, so that ending its
    # group ends exactly this node's processes
    with open(log, "ab") as out:
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                                 "--disable-usage-stats", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ, **NO_TOKEN))


def wait_started(log: Path) -> None:
    """Until the node says it runs (the driver reads the cluster's auth token once, when it connects:
    connecting before the head wrote it fails with InvalidAuthToken)."""
    deadline = time.monotonic() + 60
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    """End the node: every process of its session (``ray start`` shuts down gracefully on SIGTERM,
    but takes ~15 s; a test cluster needs no grace)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if ray.is_initialized():
        ray.shutdown()
    saved = {key: os.environ.get(key) for key in NO_TOKEN}
    os.environ.update(NO_TOKEN)
    logs = tmp_path_factory.mktemp("ray-nodes")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node("--head", "--port", str(port), "--dashboard-port", str(free_port()),
                      "--include-dashboard", "true", log=logs / "head.log")
    nodes = [head]
    try:
        wait_started(logs / "head.log")
        ray.init(address=address, log_to_driver=False)
        nodes.append(start_node("--address", address, log=logs / "worker.log"))
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        ray.shutdown()  # the tests connect through unison.Ray(address=...)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            stop_node(proc)
        # `ray start` wrote where its cluster is (ray.init() without an address joins it); it is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def node_ids(log: str) -> set[str]:
    return set(re.findall(r"'node': '([0-9a-f]+)'", log))


def test_a_search_runs_on_both_nodes(cluster: str, tmp_path: Path) -> None:
    def train(x: float, ctx: Any) -> float:
        (ctx.trial_dir / "out.txt").write_text(str(x))
        time.sleep(0.3)
        return x

    search = unison.Search({"x": unison.uniform(0.0, 1.0)}, metric="x", mode="max", trials=4, seed=0)
    r = unison.run(train, search, backend=unison.Ray(address=cluster), storage=tmp_path, progress=False)
    assert list(r.trials["status"]) == ["completed"] * 4
    assert set(r.trials["worker"]) == {"ray-0", "ray-1"}
    for row in r.rows:
        folder = r.path / "trials" / f"{row['trial_id']:04d}"
        assert (folder / "out.txt").read_text() == str(row["hparams"]["x"])
    log = (r.path / "workers" / "ray.log").read_text()
    assert "connect to 127.0.0.1:" in log and len(node_ids(log)) == 2, log
    assert not [a for a in state.list_actors(filters=[("class_name", "=", "UnisonRayWorker")], limit=1000)
                if a.state != "DEAD"]


def test_a_two_rank_run_spreads_over_the_nodes(cluster: str, tmp_path: Path) -> None:
    def train(ctx: Any) -> float:
        time.sleep(0.2)
        return float(ctx.rank)

    backend = unison.Ray(address=cluster, placement_strategy="STRICT_SPREAD")
    run = unison.run(train, unison.Distributed(workers=2), backend=backend, storage=tmp_path, progress=False)
    assert run.value == 0.0  # rank 0's
    log = (run.path / "workers" / "ray.log").read_text()
    assert "STRICT_SPREAD" in log and len(node_ids(log)) == 2, log
    assert {g.state for g in state.list_placement_groups(limit=1000)} <= {"REMOVED"}
