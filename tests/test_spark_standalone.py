"""``unison spark-standalone``: a standalone master and worker on 127.0.0.1 from pip's pyspark, used
by a real search, then stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from processes import alive  # noqa: E402
from spark_support import active_jobs, start_session  # also skips this module without pyspark

import unison

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unison.cli", "spark-standalone", *args],
                          capture_output=True, text=True, timeout=120, check=False)




def train(x: float, ctx: Any) -> dict[str, float]:
    print(f"trial {ctx.trial_id} on {os.getpid()}")
    time.sleep(0.3)
    return {"value": x}


def test_standalone_cluster_starts_runs_a_search_and_stops(tmp_path: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path / "standalone"
    started = cli("start", "--dir", str(state), "--port", "0", "--webui-port", "0", "--cores", "2",
                  "--memory", "1g")
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url.startswith("spark://127.0.0.1:"), started.stdout
    assert "registered" in started.stderr
    info = json.loads((state / "cluster.json").read_text())
    pids = [int((state / f"{role}.pid").read_text()) for role in ("master", "worker")]
    try:
        assert all(alive(pid) for pid in pids)
        status = cli("status", "--dir", str(state))
        assert status.returncode == 0 and url in status.stdout
        again = cli("start", "--dir", str(state))  # already running: the same cluster, nothing new
        assert again.returncode == 0 and again.stdout.strip() == url

        spark = start_session(url, tmp_path_factory.getbasetemp(), executors=1)
        try:
            backend = unison.Spark(spark)
            search = unison.Search({"x": unison.uniform(0, 1)}, metric="value", trials=6, seed=0)
            r = unison.run(train, search, backend=backend, storage=tmp_path / "runs", progress=False)
            assert backend.slots() == 2  # one executor with the worker's 2 cores
            # Not a local master: the driver listens where Spark's driver does, not on loopback only.
            assert backend.listen_host == spark.sparkContext.getConf().get("spark.driver.host")
            assert r.status == "completed" and list(r.trials["status"]) == ["completed"] * 6
            assert len(set(r.trials["pid"])) == 2 and os.getpid() not in set(r.trials["pid"])
            for row in r.rows:
                log = (r.path / "trials" / f"{row['trial_id']:04d}" / "stdout.log").read_text()
                assert log == f"trial {row['trial_id']} on {row['pid']}\n"
            assert active_jobs(spark) == []
            app = spark.sparkContext.applicationId
        finally:
            spark.stop()
        assert (state / "work" / app).is_dir()  # executor folders live in the state folder
        assert info["master_url"] == url and info["web_ui"].startswith("http://")
    finally:
        stopped = cli("stop", "--dir", str(state))
    assert stopped.returncode == 0, stopped.stderr
    assert not [pid for pid in pids if alive(pid)]
    assert cli("status", "--dir", str(state)).returncode == 3
    assert "no Spark standalone cluster" in cli("stop", "--dir", str(state)).stdout
