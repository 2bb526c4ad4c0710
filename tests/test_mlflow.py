"""``unison.MLflowLogger`` against a real MLflow: a SQLite backend store, and a real ``mlflow server``.

Each test runs a real experiment, reads what MLflow holds back with ``MlflowClient`` and compares it with
the experiment directory: one parent run, one nested child run per trial (``mlflow.parentRunId``), the
trials' hyperparameters as params, their ``metrics.jsonl`` as metric histories, their status as tags,
their files as artifacts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers_quality import quality_search as shared_quality_search
from helpers_quality import quality_train

import unison

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

QUALITIES = [0.9, 0.5, 0.2, -1.0]  # on a grid, in this order: 0.2 is stopped by ASHA, -1 fails


def quality_search() -> unison.Search:
    return shared_quality_search(QUALITIES)


def sqlite_store(tmp_path: Path, experiment: str = "unison-test") -> tuple[str, MlflowClient]:
    """A fresh SQLite tracking store with ``experiment`` created, its artifacts in ``tmp_path``."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client


def run_tree(client: MlflowClient, experiment: str) -> tuple[Any, dict[int, Any]]:
    """The experiment's only parent run and its children by trial id (asserting there is one parent)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    (parent,) = parents
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(runs) - 1
    by_trial = {int(r.data.tags["unison.trial_id"]): r for r in children}
    assert len(by_trial) == len(children)  # one child per trial
    return parent, by_trial


def reports_on_disk(trial_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """A trial's ``metrics.jsonl`` as metric name -> [(step, value), ...]."""
    file = trial_dir / "metrics.jsonl"
    histories: dict[str, list[tuple[int, float]]] = {}
    for line in file.read_text().splitlines() if file.is_file() else []:
        record = json.loads(line)
        step = record.pop("step")
        for key, value in record.items():
            histories.setdefault(key, []).append((step, value))
    return histories


def check_trials(client: MlflowClient, children: dict[int, Any], result: unison.SearchResult) -> None:
    """Each child run holds its trial: params, metric histories, status tags and run status, files."""
    assert set(children) == set(result.trials["trial_id"])
    for row in result.rows:
        run = children[row["trial_id"]]
        expected_params = {k: str(v) for k, v in row["hparams"].items()}
        assert {k: v for k, v in run.data.params.items() if k in expected_params} == expected_params
        trial_dir = result.path / "trials" / f"{row['trial_id']:04d}"
        for key, history in reports_on_disk(trial_dir).items():
            logged = client.get_metric_history(run.info.run_id, key)
            assert [(m.step, m.value) for m in logged] == history
        tags = run.data.tags
        assert tags["unison.status"] == row["status"] and tags["unison.worker"] == "inline"
        assert tags["unison.attempt"] == "0" and tags["unison.host"]
        assert run.info.status == ("FAILED" if row["status"] == "failed" else "FINISHED")
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == (set(os.listdir(trial_dir)) if trial_dir.is_dir() else set())


def check_search(client: MlflowClient, experiment: str, result: unison.SearchResult,
                 tmp_path: Path) -> Any:
    """The whole run tree of the quality search ``result``; returns the parent run."""
    parent, children = run_tree(client, experiment)
    check_trials(client, children, result)
    by_q = {float(run.data.params["q"]): run for run in children.values()}
    assert "ASHA rung 0" in by_q[0.2].data.tags["unison.stop_reason"]
    assert "ValueError: a failing trial" in by_q[-1.0].data.tags["unison.error"]
    assert by_q[0.9].data.metrics == {"acc": 0.9}
    best_run = by_q[0.9]
    stdout = Path(client.download_artifacts(best_run.info.run_id, "stdout.log", str(tmp_path)))
    assert stdout.read_text() == "training q=0.9\n"
    tags = parent.data.tags
    assert (tags["unison.kind"], tags["unison.experiment_dir"]) == ("search", str(result.path))
    assert "Inline" in tags["unison.backend"] and tags["unison.version"] == unison.__version__
    assert tags["unison.best_trial_id"] == best_run.data.tags["unison.trial_id"]
    assert tags["unison.best_run_id"] == best_run.info.run_id and tags["unison.best_metric"] == "acc=0.9"
    assert parent.data.metrics == {"acc": 0.9} and parent.info.status == "FINISHED"
    assert parent.data.params["optimizer"] == "grid" and parent.data.params["scheduler.name"] == "asha"
    assert "result.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    stored = json.loads((result.path / "mlflow.json").read_text())
    assert stored["parent"] == parent.info.run_id
    assert stored["trials"] == {str(t): run.info.run_id for t, run in children.items()}
    return parent


# ----------------------------------------------------------------------------- a SQLite store
def test_a_search_is_logged_as_a_parent_run_with_a_nested_run_per_trial(tmp_path):
    uri, client = sqlite_store(tmp_path)
    logger = unison.MLflowLogger(uri, "unison-test")
    result = unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path / "runs",
                        progress=False, callbacks=[logger])
    assert sorted(result.trials["status"]) == ["completed", "completed", "failed", "stopped"]
    check_search(client, "unison-test", result, tmp_path)


def test_an_ablation_is_logged_with_component_seed_and_its_table(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"A": rng.normal(size=50), "B": rng.normal(size=50)})
    frame["y"] = 2 * frame["A"]

    def train(dataset, hparams):
        return {"score": float(len(dataset.columns)) + hparams["seed"] / 100}

    uri, client = sqlite_store(tmp_path)
    study = unison.Ablation(features=["A", "B"], label="y", metric="score", mode="max", repeats=2, seed=7)
    result = unison.run(train, study, data=frame, backend="inline", storage=tmp_path / "runs",
                        progress=False, callbacks=[unison.MLflowLogger(uri, "unison-test")])
    parent, children = run_tree(client, "unison-test")
    check_trials(client, children, result)
    logged = sorted((r.data.params["component"], r.data.params["seed"], r.data.metrics["score"])
                    for r in children.values())
    assert logged == sorted((row["spec"]["component"]["name"], str(row["hparams"]["seed"]),
                             row["metrics"]["score"]) for row in result.rows)
    assert len(logged) == 6
    assert parent.data.tags["unison.kind"] == "ablation"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.csv", "ablation.png", "result.json"} <= artifacts
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "ablation.csv", str(tmp_path)))
    assert list(table["component"]) == list(result.ablation["component"])
    assert np.allclose(table["mean"], result.ablation["mean"])


def test_a_resumed_search_continues_the_same_runs(tmp_path):
    stop_at = {"q": 0.5}

    def train(q, reporter):
        if q == stop_at["q"]:
            raise KeyboardInterrupt
        return quality_train(q, reporter)

    uri, client = sqlite_store(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        unison.run(train, quality_search(), backend="inline", storage=tmp_path / "runs", progress=False,
                   callbacks=[unison.MLflowLogger(uri, "unison-test")])
    (path,) = (tmp_path / "runs").iterdir()
    parent, children = run_tree(client, "unison-test")
    assert parent.info.status == "KILLED" and parent.data.tags["unison.status"] == "interrupted"
    assert children[1].info.status == "KILLED"  # the trial that was running: it runs again on resume
    stop_at["q"] = None
    result = unison.resume(path, train, backend="inline", progress=False,
                           callbacks=[unison.MLflowLogger(uri, "unison-test")])
    again = check_search(client, "unison-test", result, tmp_path)
    assert again.info.run_id == parent.info.run_id
    _, children_again = run_tree(client, "unison-test")
    assert children_again[1].info.run_id == children[1].info.run_id


# ------------------------------------------------------------------------- names, bad input
def test_the_name_mlflow_and_the_environment_follow_mlflows_tracking_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # where MLflow puts a new experiment's artifacts by default

    def fit(lr, reporter):
        reporter.report(step=0, loss=lr)
        return {"loss": lr / 2}

    single = unison.run(fit, hparams={"lr": 0.5}, storage=tmp_path / "runs", callbacks=["mlflow"])
    client = MlflowClient(uri)
    parent, children = run_tree(client, "fit")
    assert parent.data.tags["unison.kind"] == "single" and parent.info.status == "FINISHED"
    (child,) = children.values()
    seed = json.loads((single.path / "experiment.json").read_text())["seed"]
    assert child.data.params == {"lr": "0.5", "seed": str(seed)} and child.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "loss")] == [
        (0, 0.5), (0, 0.25)]  # the report, then the final value, which differs
    assert parent.data.tags["unison.experiment_dir"] == str(single.path)
    monkeypatch.setenv("UNISON_CALLBACKS", "mlflow")
    result = unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path / "runs",
                        progress=False, name="from-the-environment")
    check_search(client, "from-the-environment", result, tmp_path)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_fails_before_anything_runs(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"tracking server at {uri} does not answer"):
        unison.MLflowLogger(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConnectionError, match=f"tracking server at {uri} does not answer"):
        unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path / "runs",
                   callbacks=["mlflow"])
    assert not (tmp_path / "runs").exists() and time.monotonic() - started < 20


def test_without_mlflow_the_logger_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'unison\[mlflow\]'"):
        unison.MLflowLogger()
    with pytest.raises(ImportError, match=r"pip install 'unison\[mlflow\]'"):
        unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path / "runs",
                   callbacks=["mlflow"])
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------- a real tracking server
def free_port() -> int:
    return closed_port()  # free now; the server binds it right after


def wait_for(url: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mlflow server did not answer {url} within {timeout} s")


def short_train(q, reporter):
    print(f"training q={q}")
    for step in range(3):
        acc = q * (step + 1) / 3
        reporter.report(step=step, acc=acc)
    return {"acc": acc}


@pytest.mark.slow
def test_a_search_is_logged_to_a_real_mlflow_server_over_http(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "served-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(f"{uri}/health", server)
        search = unison.Search({"q": unison.choice([0.9, 0.5, 0.2])}, metric="acc", mode="max",
                               optimizer="grid")
        result = unison.run(short_train, search, backend="inline", storage=tmp_path / "runs",
                            progress=False, callbacks=[unison.MLflowLogger(uri, "over-http")])
        client = MlflowClient(uri)
        parent, children = run_tree(client, "over-http")
        check_trials(client, children, result)
        assert parent.info.status == "FINISHED" and parent.data.metrics == {"acc": 0.9}
        assert children[int(parent.data.tags["unison.best_trial_id"])].data.params == {"q": "0.9"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_long_values_are_cut_to_mlflows_limits(tmp_path):
    long_name = "n" * 2000

    def train(name):
        if name == "fail":
            raise ValueError("y" * 10000 + " the end of the message")
        return {"v": 1.0}

    uri, client = sqlite_store(tmp_path)
    search = unison.Search({"name": unison.choice([long_name, "fail"])}, metric="v", optimizer="grid")
    unison.run(train, search, backend="inline", storage=tmp_path / "runs", progress=False,
               callbacks=[unison.MLflowLogger(uri, "unison-test")])
    parent, children = run_tree(client, "unison-test")
    assert children[0].data.params["name"] == long_name[:497] + "..."
    assert parent.data.params["space.name.values"].endswith("...")
    error = children[1].data.tags["unison.error"]
    assert error.startswith("...") and error.endswith("the end of the message\n") and len(error) == 5000


def test_a_long_trial_shows_up_running_with_its_reports_while_it_runs(tmp_path):
    """A trial's run is made within a few seconds of its start, before it ends, with no other event to
    prompt it (the callbacks' idle flush); its start and end times are the trial's own."""
    uri, client = sqlite_store(tmp_path)
    experiment_id = client.get_experiment_by_name("unison-test").experiment_id

    def watched(lr, reporter):
        reporter.report(step=0, loss=lr)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the trial waits until MLflow shows it running
            runs = client.search_runs([experiment_id], "tags.`unison.trial_id` = '0'")
            if runs and runs[0].info.status == "RUNNING" and runs[0].data.metrics.get("loss") == lr:
                return {"loss": lr, "seen_running_after_s": 20 - (deadline - time.monotonic())}
            time.sleep(0.2)
        raise AssertionError("the trial's run did not appear in MLflow while it ran")

    search = unison.Search({"lr": unison.choice([0.5])}, metric="loss", optimizer="grid", trials=1)
    result = unison.run(watched, search, backend="inline", storage=tmp_path / "runs", progress=False,
                        callbacks=[unison.MLflowLogger(uri, "unison-test")])
    assert result.best is not None and result.best.metrics["seen_running_after_s"] < 10
    _, children = run_tree(client, "unison-test")
    run = children[0]
    start = next(json.loads(line) for line in (result.path / "journal.jsonl").read_text().splitlines()
                 if json.loads(line).get("e") == "start")
    assert run.info.start_time == int(start["t"] * 1000)
    duration = result.rows[0]["duration"]
    assert abs(run.info.end_time - (start["t"] + duration) * 1000) <= 1
    assert run.info.status == "FINISHED"


# ----------------------------------------------------------------------------- unison export mlflow
def test_export_backfills_a_search_run_without_tracking_as_if_logged_live(tmp_path, capsys):
    from unison.cli import main

    result = unison.run(quality_train, quality_search(), backend="inline", storage=tmp_path / "runs",
                        progress=False)
    assert not (result.path / "mlflow.json").exists()
    uri, client = sqlite_store(tmp_path)
    assert main(["export", "mlflow", str(result.path), "--tracking-uri", uri,
                 "--experiment-name", "unison-test"]) == 0
    parent = check_search(client, "unison-test", result, tmp_path)  # what a live logger writes
    said = capsys.readouterr().out
    assert f"the run {parent.info.run_id} and 4 nested trial run(s)" in said

    assert main(["export", "mlflow", str(result.path), "--tracking-uri", uri]) == 1  # not twice
    assert f"already, as the run {parent.info.run_id}" in capsys.readouterr().err
    assert len(client.search_runs([parent.info.experiment_id])) == 5


def test_export_of_a_single_run_logs_its_reports_from_its_trial_folder(tmp_path):
    from unison.cli import main

    def train(lr, reporter):
        for step in range(4):
            reporter.report(step=step, loss=lr / (step + 1))
        return {"loss": lr / 4}

    result = unison.run(train, hparams={"lr": 0.8}, storage=tmp_path / "runs")
    uri, client = sqlite_store(tmp_path)
    assert main(["export", "mlflow", str(result.path), "--tracking-uri", uri, "--experiment-name",
                 "unison-test", "--no-artifacts"]) == 0
    parent, children = run_tree(client, "unison-test")
    assert parent.data.tags["unison.kind"] == "single" and parent.data.params["hparams.lr"] == "0.8"
    history = client.get_metric_history(children[0].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 0.8 / (s + 1)) for s in range(4)]
    seed = json.loads((result.path / "experiment.json").read_text())["seed"]
    assert children[0].data.params == {"lr": "0.8", "seed": str(seed)}
    assert children[0].info.status == "FINISHED"
    assert client.list_artifacts(children[0].info.run_id) == []


def test_export_names_what_is_wrong(tmp_path, capsys):
    from unison.cli import main

    assert main(["export", "mlflow", str(tmp_path)]) == 1
    assert "is not an experiment directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "wandb", str(tmp_path)])
    assert "invalid choice: 'wandb'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_tracking_example_runs_and_reads_mlflow_back(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "tracking.py"
    done = subprocess.run([sys.executable, str(example), "4"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 nested trial runs" in done.stdout
    assert done.stdout.count(" reports, lr=") == 4
    assert "TensorBoard runs: ['0000', '0001', '0002', '0003']" in done.stdout
    assert (tmp_path / "mlflow.db").is_file()


def test_export_of_a_failed_single_run_ends_its_runs_failed(tmp_path):
    from unison.cli import main

    def train(lr):
        raise ZeroDivisionError("lr too small")

    with pytest.raises(ZeroDivisionError):
        unison.run(train, hparams={"lr": 0.1}, storage=tmp_path / "runs")
    (path,) = (tmp_path / "runs").iterdir()
    uri, client = sqlite_store(tmp_path)
    assert main(["export", "mlflow", str(path), "--tracking-uri", uri,
                 "--experiment-name", "unison-test"]) == 0
    parent, children = run_tree(client, "unison-test")
    assert parent.info.status == "FAILED" and parent.data.tags["unison.status"] == "failed"
    assert children[0].info.status == "FAILED"
    assert "ZeroDivisionError: lr too small" in children[0].data.tags["unison.error"]


def test_export_of_a_pipeline_logs_each_stage_as_its_own_run_tree(tmp_path):
    from unison.cli import main

    frame = pd.DataFrame({"A": np.arange(20.0), "B": np.ones(20), "y": np.arange(20.0)})

    def train(lr, dataset):
        return {"score": lr + len(dataset.columns)}

    flow = unison.Pipeline(search=unison.Search({"lr": unison.choice([0.1, 0.2])}, metric="score", mode="max",
                                                optimizer="grid"),
                           ablation=unison.Ablation(features=["A", "B"], label="y"))
    result = unison.run(train, flow, data=frame, backend="inline", storage=tmp_path / "runs", progress=False)
    uri, client = sqlite_store(tmp_path)
    assert main(["export", "mlflow", str(result.path), "--tracking-uri", uri,
                 "--experiment-name", "unison-test"]) == 0
    experiment_id = client.get_experiment_by_name("unison-test").experiment_id
    runs = client.search_runs([experiment_id], max_results=100)
    parents = {r.data.tags["unison.kind"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert set(parents) == {"search", "ablation"}
    assert all(p.info.status == "FINISHED" for p in parents.values())
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 + 3  # the grid's two trials; the ablation's baseline, A and B
    assert "ablation.csv" in {a.path for a in client.list_artifacts(parents["ablation"].info.run_id)}


def test_export_of_an_older_single_run_reads_its_reports_from_metrics_jsonl(tmp_path):
    from unison.cli import main

    def train(reporter):
        for step in range(3):
            reporter.report(step=step, loss=1.0 / (step + 1))
        return {"loss": 1.0 / 3}

    result = unison.run(train, storage=tmp_path / "runs")
    journal_file = result.path / "journal.jsonl"
    lines = journal_file.read_text().splitlines()  # as unison wrote it before reports were journaled
    journal_file.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["e"] != "report"))
    uri, client = sqlite_store(tmp_path)
    assert main(["export", "mlflow", str(result.path), "--tracking-uri", uri,
                 "--experiment-name", "unison-test", "--no-artifacts"]) == 0
    _, children = run_tree(client, "unison-test")
    history = client.get_metric_history(children[0].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(3)]
