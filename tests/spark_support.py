"""Starting and stopping real SparkSessions for the Spark test modules.

The modules on ``local-cluster[2,1,1024]`` share one session (:func:`cluster_session`): its start, two
executor JVMs included, costs tens of seconds of CI time each. A module on another master
(``local[2]``, a standalone cluster) gets its own from :func:`start_session`, which stops the shared one
first (a JVM holds one SparkContext), and the next module to ask for the cluster starts it again.

All Spark test modules of a pytest run share one JVM (PySpark starts it with the first session), so
what must be set before it starts is set here, the same way for every module: executors run this
interpreter (PYSPARK_PYTHON) and ``local-cluster`` executor folders go to a temporary SPARK_HOME
instead of site-packages.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pyspark = pytest.importorskip("pyspark")

from pyspark.sql import SparkSession  # noqa: E402

from unison.spark_standalone import isolated_spark_home  # noqa: E402

CLUSTER = "local-cluster[2,1,1024]"
_shared: list[Any] = []  # the cluster session the modules share, while it runs


def cluster_session(basetemp: Path) -> Any:
    """The shared ``local-cluster[2,1,1024]`` session, both executors registered; started on first use
    (or again, if a module stopped it or lost an executor). Modules must not stop it."""
    if _shared:
        session = _shared[0]
        if session.sparkContext._jsc is not None and registered_executors(session) >= 2:
            return session
        _stop_shared()
    session = start_session(CLUSTER, basetemp, executors=2)
    _shared.append(session)
    return session


def _stop_shared() -> None:
    while _shared:
        session = _shared.pop()
        if session.sparkContext._jsc is not None:
            session.stop()


atexit.register(_stop_shared)


def start_session(master: str, basetemp: Path, executors: int = 0, **conf: str) -> Any:
    """A new SparkSession on ``master``; with ``executors``, once that many executors registered.
    The shared cluster session (:func:`cluster_session`) is stopped first."""
    from pyspark import SparkContext

    _stop_shared()

    os.environ["PYSPARK_PYTHON"] = sys.executable
    if SparkContext._gateway is None and "SPARK_HOME" not in os.environ:
        os.environ["SPARK_HOME"] = str(isolated_spark_home(basetemp / "spark-home"))
    builder = (
        SparkSession.builder.master(master)
        .appName("unison-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "512m")
        .config("spark.executor.memory", "512m")
        .config("spark.local.dir", str(basetemp / "spark-local"))
        .config("spark.pyspark.python", sys.executable)
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    deadline = time.monotonic() + 90
    while executors and registered_executors(spark) < executors:
        if time.monotonic() > deadline:
            spark.stop()
            raise AssertionError(f"{executors} executors did not register with {master} within 90 s")
        time.sleep(0.1)
    return spark


def registered_executors(spark: Any) -> int:
    """Executors registered with the driver (the driver's own block manager not counted)."""
    return spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1


def active_jobs(spark: Any) -> list[int]:
    """The ids of the Spark jobs running now."""
    return list(spark.sparkContext.statusTracker().getActiveJobsIds())
