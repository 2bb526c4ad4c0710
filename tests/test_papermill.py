"""``unison notebook``: real papermill executing notebooks in a real Jupyter kernel (ipykernel).

The example notebook runs as a single run, as a search on local worker processes and, chained by
name, as the distributed final training on the search's best; as a search on Spark ``local[2]``;
and a notebook whose cell fails exits non-zero naming the cell and its error. The command runs as a
user runs it, in a process of its own; the kernel is this interpreter's (a kernelspec ``python3`` in a
temporary ``JUPYTER_PATH``, whatever kernels the machine has installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("papermill")
pytest.importorskip("ipykernel")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "notebook" / "unison_notebook.ipynb"
SMALL = ["-p", "trials=3", "-p", "epochs=2"]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This interpreter's kernel as ``python3``, found first; no context or backend in the environment."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (unison tests)", "language": "python"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNISON_")}
    return {**env, "JUPYTER_PATH": str(tmp_path / "jupyter"), **extra}


def unison_notebook(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                    timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unison.cli", "notebook", *args], cwd=tmp_path,
                          env=env or environment(tmp_path), capture_output=True, text=True, timeout=timeout)


def experiments(tmp_path: Path) -> dict[str, Path]:
    """The experiment directories under ./unison-runs, by the name their experiment.json gives."""
    root = tmp_path / "unison-runs"
    found = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        found[json.loads((path / "experiment.json").read_text())["name"]] = path
    return found


def cell_outputs(path: Path) -> dict[str, str]:
    """Each guarded cell's text output in an executed notebook, by its ``%%context`` line."""
    notebook = nbformat.read(path, as_version=4)
    found = {}
    for cell in notebook.cells:
        if cell.cell_type == "code" and cell.source.startswith("%%context"):
            texts = [o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs]
            found[cell.source.splitlines()[0]] = "".join(texts)
    return found


def test_the_example_notebook_is_what_its_generator_writes_and_has_no_outputs() -> None:
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import make_notebook
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    assert EXAMPLE.read_text(encoding="utf-8") == make_notebook.text(), (
        "examples/notebook/unison_notebook.ipynb differs from what make_notebook.py writes: run "
        "python examples/notebook/make_notebook.py")
    notebook = nbformat.read(EXAMPLE, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert [c for c in code if "parameters" in c.metadata.get("tags", [])] == [code[0]]
    guarded = [c.source.splitlines()[0] for c in code if c.source.startswith("%%context")]
    assert guarded == [f"%%context {name}" for name in
                       ("single", "search", "ablation", "distributed", "pipeline")]


# ------------------------------------------------------------------------------------ the example
@pytest.mark.slow
def test_single_context_runs_only_the_single_cell(tmp_path: Path) -> None:
    done = unison_notebook(tmp_path, str(EXAMPLE), "--context", "single", "-o", "out/executed.ipynb", *SMALL)
    assert done.returncode == 0, done.stderr
    made = experiments(tmp_path)
    assert list(made) == ["churn-single"]
    meta = json.loads((made["churn-single"] / "experiment.json").read_text())
    assert meta["status"] == "completed"
    assert meta["notebook"]["name"] == "unison_notebook.ipynb"
    assert meta["notebook"]["path"] == str(EXAMPLE)
    # The parameters as the run had them: injected (JSON-parsed) over the notebook's defaults.
    assert meta["notebook"]["parameters"] == {"context": "single", "backend": "local", "trials": 3,
                                              "epochs": 2, "name": "churn", "storage": None}
    assert meta["hparams"]["epochs"] == 2
    executed = made["churn-single"] / "unison_notebook.ipynb"
    assert f"executed notebook written to {executed}" in done.stdout
    outputs = cell_outputs(executed)
    assert outputs["%%context single"].startswith("{'accuracy': ")
    for name in ("search", "ablation", "distributed", "pipeline"):
        assert outputs[f"%%context {name}"] == "skipped: context is 'single'\n"
    assert (tmp_path / "out" / "executed.ipynb").read_bytes() == executed.read_bytes()


@pytest.mark.slow
def test_search_then_distributed_chained_by_name_on_local_workers(tmp_path: Path) -> None:
    done = unison_notebook(tmp_path, str(EXAMPLE), "--context", "search", *SMALL)
    assert done.returncode == 0, done.stderr
    search_dir = experiments(tmp_path)["churn"]
    meta = json.loads((search_dir / "experiment.json").read_text())
    assert meta["kind"] == "search" and meta["status"] == "completed"
    assert meta["backend"].startswith("Local(")
    assert meta["notebook"]["parameters"]["context"] == "search"
    assert meta["notebook"]["parameters"]["trials"] == 3
    result = json.loads((search_dir / "result.json").read_text())
    assert result["counts"]["completed"] == 3
    events = [json.loads(line) for line in (search_dir / "journal.jsonl").read_text().splitlines()]
    workers = {e.get("worker") for e in events if e["e"] == "start"}
    assert "inline" not in workers  # worker processes, not the kernel
    assert "skipped: context is 'search'" in cell_outputs(search_dir / "unison_notebook.ipynb")[
        "%%context single"]

    done = unison_notebook(tmp_path, str(EXAMPLE), "--context", "distributed", "-p", "epochs=2")
    assert done.returncode == 0, done.stderr
    final_dir = experiments(tmp_path)["churn-final"]
    final = json.loads((final_dir / "experiment.json").read_text())
    assert final["kind"] == "distributed" and final["status"] == "completed"
    assert final["distributed"]["hparams"] == result["best"]["hparams"]  # found by the name "churn"
    assert final["distributed"]["workers"] == 2
    assert (final_dir / "unison_notebook.ipynb").is_file()


@pytest.mark.slow
def test_pipeline_context_runs_the_stages_and_keeps_the_notebook_in_the_pipelines_directory(
        tmp_path: Path) -> None:
    done = unison_notebook(tmp_path, str(EXAMPLE), "--context", "pipeline", *SMALL)
    assert done.returncode == 0, done.stderr
    made = experiments(tmp_path)
    assert list(made) == ["churn-pipeline"]  # one experiment: the stages are inside it
    top = made["churn-pipeline"]
    assert json.loads((top / "experiment.json").read_text())["kind"] == "pipeline"
    stages = sorted(p for p in (top / "stages").iterdir() if (p / "experiment.json").is_file())
    kinds = [json.loads((p / "experiment.json").read_text()) for p in stages]
    assert [m["kind"] for m in kinds] == ["search", "ablation", "distributed"]
    assert all(m["notebook"]["parameters"]["context"] == "pipeline" for m in kinds)
    best = json.loads((stages[0] / "result.json").read_text())["best"]["hparams"]
    assert kinds[2]["distributed"]["hparams"] == best
    # The executed notebook once, in the pipeline's directory, not in each stage's.
    assert done.stdout.count("executed notebook written to") == 1
    assert (top / "unison_notebook.ipynb").is_file()
    assert not any((p / "unison_notebook.ipynb").exists() for p in stages)
    assert "skipped" not in cell_outputs(top / "unison_notebook.ipynb")["%%context pipeline"]


@pytest.mark.slow
def test_search_on_spark_local_2(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    from unison.spark_standalone import isolated_spark_home

    env = environment(tmp_path, PYSPARK_PYTHON=sys.executable,
                      PYSPARK_SUBMIT_ARGS="--master local[2] --conf spark.ui.enabled=false "
                                          "--conf spark.ui.showConsoleProgress=false pyspark-shell")
    env.setdefault("SPARK_HOME", str(isolated_spark_home(tmp_path / "spark-home")))
    done = unison_notebook(tmp_path, str(EXAMPLE), "--context", "search", "--backend", "spark", *SMALL,
                           env=env)
    assert done.returncode == 0, done.stderr
    search_dir = experiments(tmp_path)["churn"]
    meta = json.loads((search_dir / "experiment.json").read_text())
    assert meta["backend"].startswith("Spark(") and "local[2]" in meta["backend"], meta["backend"]
    assert meta["notebook"]["parameters"]["backend"] == "spark"
    assert json.loads((search_dir / "result.json").read_text())["counts"]["completed"] == 3
    assert (search_dir / "unison_notebook.ipynb").is_file()


# ------------------------------------------------------------------------------------ failures
def write_notebook(path: Path, *cells: str) -> Path:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    notebook.cells[0].metadata["tags"] = ["parameters"]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


@pytest.mark.slow
def test_a_failing_cell_exits_non_zero_naming_the_cell_and_its_error(tmp_path: Path) -> None:
    notebook = write_notebook(
        tmp_path / "failing.ipynb",
        'context = "single"',
        "%load_ext unison\nimport unison",
        "first = unison.run(lambda: {'value': 1.0}, name='first')",
        "%%context search\nrate = 1\nrate / 0",
        "print('NEVER REACHED')",
    )
    done = unison_notebook(tmp_path, str(notebook), "--context", "search", "-o", "failed.ipynb")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "error: cell 4 (In [" in done.stderr  # as numbered in failing.ipynb: papermill's cell not counted
    assert "of failing.ipynb failed: ZeroDivisionError: division by zero" in done.stderr
    assert "    %%context search\n    rate = 1\n    rate / 0" in done.stderr
    assert "NEVER REACHED" not in done.stdout
    # The executed notebook, error and all, went to -o and into the experiment made before the failure.
    first = experiments(tmp_path)["first"]
    meta = json.loads((first / "experiment.json").read_text())
    assert meta["notebook"]["parameters"]["context"] == "search"
    assert f"with the traceback: {first / 'failing.ipynb'}, failed.ipynb" in done.stderr
    for executed in (tmp_path / "failed.ipynb", first / "failing.ipynb"):
        errors = [o for c in nbformat.read(executed, as_version=4).cells for o in c.get("outputs", [])
                  if o.output_type == "error"]
        assert [e.ename for e in errors] == ["ZeroDivisionError"]


@pytest.mark.slow
def test_an_unknown_context_fails_with_the_known_ones(tmp_path: Path) -> None:
    notebook = write_notebook(tmp_path / "typo.ipynb", 'context = "single"',
                              "%load_ext unison\nimport unison",
                              "%%context single\nunison.run(lambda: {'value': 1.0})")
    done = unison_notebook(tmp_path, str(notebook), "--context", "serach")
    assert done.returncode == 1
    assert "ValueError: unknown context 'serach': did you mean 'search'?" in done.stderr
    assert "'ablation', 'distributed', 'pipeline', 'search', 'single'" in done.stderr
    assert experiments(tmp_path) == {}


def test_bad_arguments_and_a_missing_notebook_or_kernel(tmp_path: Path) -> None:
    done = unison_notebook(tmp_path, str(EXAMPLE), "-p", "trials")
    assert done.returncode == 2 and "-p takes KEY=VALUE" in done.stderr and "'trials'" in done.stderr
    done = unison_notebook(tmp_path, "nowhere.ipynb")
    assert done.returncode == 1 and "error: no notebook 'nowhere.ipynb'" in done.stderr
    done = unison_notebook(tmp_path, str(EXAMPLE), "--kernel", "no-such-kernel")
    assert done.returncode == 1
    assert "no Jupyter kernel named 'no-such-kernel'" in done.stderr and "--kernel NAME" in done.stderr


def test_without_papermill_the_command_says_what_to_install(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['papermill'] = None\n"  # as if it were not installed
              "from unison.cli import main\n"
              f"sys.exit(main(['notebook', {str(EXAMPLE)!r}]))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "papermill, which is not installed: pip install 'unison[notebook]'" in done.stderr


def test_parameters_parse_as_json_when_they_can() -> None:
    from unison.notebook.execute import parse_parameters

    assert parse_parameters(["trials=4", "lr=1e-3", "name=churn", "storage=null", "flag=true",
                             "sizes=[1, 2]", "text=a=b", "empty="]) == {
        "trials": 4, "lr": 0.001, "name": "churn", "storage": None, "flag": True, "sizes": [1, 2],
        "text": "a=b", "empty": ""}
    for bad in ("trials", "=4", "two words=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_parameters([bad])
