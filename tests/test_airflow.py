"""examples/airflow/unison_dag.py run for real by Airflow: search >> ablation >> final.

Airflow pins many packages of its own, so it runs from a virtualenv of its own, ``.venv-airflow``
(``make .venv-airflow`` builds it once, about 90 s; the test builds it if it is missing). The DAG runs
with ``airflow dags test`` (SQLite in a temporary AIRFLOW_HOME, no scheduler); each of its tasks runs
the example notebook through this checkout's ``unison notebook``. Then the three experiments must be
there under the tasks' working folder, the final one trained on the search's best hyperparameters.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import unison

ROOT = Path(__file__).resolve().parents[1]
DAG_FILE = ROOT / "examples" / "airflow" / "unison_dag.py"
NOTEBOOK = ROOT / "examples" / "notebook" / "unison_notebook.ipynb"
AIRFLOW_VENV = ROOT / ".venv-airflow"
UNISON_BIN = Path(sys.executable).parent / "unison"
LOGICAL_DATE = "2026-01-02T00:00:00+00:00"
TASKS = ("search", "ablation", "final")
# What pip prints when it cannot reach the package index (or the index lists no Airflow at all): only
# then is a failed build a skip.
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
           "Max retries exceeded", "ConnectTimeoutError", "ProxyError", "(from versions: none)")


def test_the_dag_file_never_imports_unison() -> None:
    """Airflow runs the unison command of the project's virtualenv; its own interpreter has no unison."""
    tree = ast.parse(DAG_FILE.read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert imported and not [name for name in imported if name.split(".")[0] == "unison"], imported


@pytest.fixture(scope="module")
def airflow() -> Path:
    """The ``airflow`` command of ``.venv-airflow``, built by ``make .venv-airflow`` if need be."""
    done = subprocess.run(["make", "-C", str(ROOT), ".venv-airflow"], capture_output=True, text=True,
                          timeout=900)
    output = done.stdout + done.stderr
    if done.returncode != 0 and any(sign in output for sign in OFFLINE):
        pytest.skip(f"`make .venv-airflow` could not reach the package index:\n{output[-2000:]}")
    assert done.returncode == 0, f"`make .venv-airflow` failed:\n{output[-4000:]}"
    return AIRFLOW_VENV / "bin" / "airflow"


def _airflow_env(home: Path, workdir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "UNISON_"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAG_FILE.parent),
               AIRFLOW__CORE__LOAD_EXAMPLES="False",
               UNISON_BIN=str(UNISON_BIN), UNISON_NOTEBOOK=str(NOTEBOOK), UNISON_WORKDIR=str(workdir),
               UNISON_TRIALS="4", PYTHONUNBUFFERED="1")
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(command: list[str], env: dict[str, str], cwd: Path,
         timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _checked(command: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    done = _run(command, env, cwd, timeout)
    assert done.returncode == 0, f"{' '.join(command[1:3])} exited {done.returncode}:\n{done.stderr[-6000:]}"
    return done.stdout


def _task_states(airflow: Path, env: dict[str, str], cwd: Path) -> dict[str, str]:
    """The state of each task of the DAG run, as ``airflow tasks states-for-dag-run`` lists them (none if
    there is no such run)."""
    done = _run([str(airflow), "tasks", "states-for-dag-run", "unison_pipeline", LOGICAL_DATE, "-o", "json"],
                env, cwd, 120)
    listing = [line for line in done.stdout.splitlines() if line.startswith("[{")]
    return {row["task_id"]: row["state"] for row in json.loads(listing[0])} if listing else {}


def _made_by(path: Path, kind: str, context: str) -> dict[str, Any]:
    """``path``'s experiment.json, checked to hold a ``kind`` experiment made by the notebook run with
    ``context``, which wrote the executed notebook there."""
    meta: dict[str, Any] = json.loads((path / "experiment.json").read_text(encoding="utf-8"))
    assert meta["kind"] == kind, meta
    assert meta["notebook"]["parameters"]["context"] == context, meta["notebook"]
    assert (path / NOTEBOOK.name).is_file(), sorted(p.name for p in path.iterdir())
    return meta


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_dag_runs_search_then_ablation_then_final_on_the_best(airflow: Path, tmp_path: Path) -> None:
    assert NOTEBOOK.is_file(), f"the DAG runs {NOTEBOOK}, which does not exist"
    home, workdir = tmp_path / "airflow-home", tmp_path / "work"
    workdir.mkdir()
    env = _airflow_env(home, workdir)
    _checked([str(airflow), "db", "migrate"], env, tmp_path, 300)
    dag_run = _run([str(airflow), "dags", "test", "unison_pipeline", LOGICAL_DATE,
                    "-c", json.dumps({"name": "churn-af"})], env, tmp_path, 1200)
    log = (dag_run.stdout + dag_run.stderr)[-8000:]

    states = _task_states(airflow, env, tmp_path)
    assert states == {task: "success" for task in TASKS}, f"task states {states}; the end of the log:\n{log}"
    assert dag_run.returncode == 0, log
    storage = workdir / "unison-runs"
    search = unison.load("churn-af", storage=storage)
    assert isinstance(search, unison.SearchResult) and len(search.trials) == 4, search
    _made_by(Path(search.path), "search", "search")
    ablation = unison.load("churn-af-ablation", storage=storage)
    final = unison.load("churn-af-final", storage=storage)
    best = search.best.hparams
    assert _made_by(Path(ablation.path), "ablation", "ablation")["ablation"]["base"] == best
    assert _made_by(Path(final.path), "distributed", "distributed")["distributed"]["hparams"] == best
