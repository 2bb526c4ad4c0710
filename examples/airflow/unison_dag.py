"""An Airflow DAG that runs the example notebook three times: search >> ablation >> final.

Each task is one ``unison notebook NOTEBOOK --context X -p name=NAME`` command, the notebook's own
cells guarded by ``%%context`` decide what runs: the search, the ablation of the search's best
configuration, then the final (distributed) training on the search's best hyperparameters. The stages
chain by name: the later cells find the search with ``unison.load(name)``, so no path passes between
tasks. Airflow never imports unison: it runs the ``unison`` command of the project's own virtualenv, and
this file needs nothing but Airflow (3.x) to load.

What the DAG reads, from the environment of the process that parses it (the DAG processor, or
``airflow dags test``):

- ``UNISON_BIN``: the ``unison`` command to run (default: ``.venv/bin/unison`` of the checkout holding
  this file).
- ``UNISON_NOTEBOOK``: the notebook (default: ``examples/notebook/unison_notebook.ipynb`` there).
- ``UNISON_WORKDIR``: the folder the tasks run in (default: the checkout). Experiments go where unison
  puts them by default, ``unison-runs/`` under it, which is where ``unison.load(name)`` looks.
- ``UNISON_BACKEND``: if set, passed on as ``--backend`` (``spark`` on a cluster; otherwise the
  notebook's own default, ``local``).
- ``UNISON_TRIALS``: if set, passed on as ``-p trials=N`` (otherwise the notebook's own default).

The experiment name is the DAG's parameter ``name`` (default ``churn``):
``airflow dags trigger unison_pipeline -c '{"name": "churn-v2"}'``.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param

CHECKOUT = Path(__file__).resolve().parents[2]
UNISON_BIN = os.environ.get("UNISON_BIN", str(CHECKOUT / ".venv" / "bin" / "unison"))
NOTEBOOK = os.environ.get("UNISON_NOTEBOOK", str(CHECKOUT / "examples/notebook/unison_notebook.ipynb"))
WORKDIR = os.environ.get("UNISON_WORKDIR", str(CHECKOUT))
TRIALS = os.environ.get("UNISON_TRIALS", "")
BACKEND = os.environ.get("UNISON_BACKEND", "")

# Values reach bash as environment variables, so no name or path is ever parsed as shell code. The name
# goes in JSON quotes: `unison notebook -p` reads a value that parses as JSON as that value, so a name
# such as 2026 stays a string.
COMMAND = ('"$UNISON_BIN" notebook "$UNISON_NOTEBOOK" --context "$UNISON_CONTEXT"'
           + ' -p "name=\\"$UNISON_NAME\\""'
           + (' --backend "$UNISON_BACKEND"' if BACKEND else "")
           + (' -p trials="$UNISON_TRIALS"' if TRIALS else ""))


def stage(task_id: str, context: str) -> BashOperator:
    """The task ``task_id``: the notebook run with its ``context`` parameter set to ``context``."""
    return BashOperator(
        task_id=task_id,
        bash_command=COMMAND,
        env={"UNISON_BIN": UNISON_BIN, "UNISON_NOTEBOOK": NOTEBOOK, "UNISON_CONTEXT": context,
             "UNISON_NAME": "{{ params.name }}", "UNISON_TRIALS": TRIALS, "UNISON_BACKEND": BACKEND},
        append_env=True,  # keep PATH, HOME, JAVA_HOME... for the notebook's kernel
        cwd=WORKDIR,
        skip_on_exit_code=None,  # any non-zero exit (a failed cell) fails the task
    )


with DAG(
    dag_id="unison_pipeline",
    description="unison: hyperparameter search, ablation of the best, final training on the best",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params={"name": Param("churn", type="string", pattern=r"^[A-Za-z0-9_.-]+$",
                          description="the experiment name the three stages share")},
    tags=["unison"],
):
    stage("search", "search") >> stage("ablation", "ablation") >> stage("final", "distributed")
