"""Keras 3: the injected ``callbacks`` (epoch reports, a clean stop at the scheduler's epoch), layer
ablation by name (Sequential and Functional models, clear failures), and the same training function
as a single run, a search on worker processes and an ablation with the torch and tensorflow backends.

Keras picks its backend at its first import: this process tests the one ``KERAS_BACKEND`` names
(torch unless set); the per-backend tests run ``keras_scenarios.py`` in a subprocess for each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported (here or by a helper)
keras = pytest.importorskip("keras")
if keras.backend.backend() != os.environ["KERAS_BACKEND"]:  # pragma: no cover - imported earlier elsewhere
    pytest.skip("Keras was imported with another backend before this module", allow_module_level=True)
pytest.importorskip(os.environ["KERAS_BACKEND"])

import numpy as np  # noqa: E402

import unison  # noqa: E402
from unison.frameworks.keras import remove_layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import keras_scenarios as ks  # noqa: E402

L = keras.layers
TESTS = Path(__file__).parent
# Keras's torch backend calls np.array(tensor) the NumPy 1 way; NumPy 2 warns each time.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_dir(path: Path | str, trial_id: int) -> Path:
    return Path(path) / "trials" / f"{trial_id:04d}"


class StopAt(unison.Scheduler):
    """Stops trial 0 at ``step``; every other trial runs to the end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_report(self, trial_id: int, step: int, value: float) -> bool | unison.Stop:
        if trial_id == 0 and step == self.step:
            return unison.Stop(f"told to stop at step {step}")
        return True


# ------------------------------------------------------------------------------------- callbacks
def test_the_import_of_unison_and_its_keras_module_loads_no_framework():
    code = ("import sys, unison, unison.frameworks.keras, unison.worker.ablate, unison.worker.runtime\n"
            "print([m for m in ('keras', 'tensorflow', 'torch') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_callbacks_report_every_epoch_of_a_single_run(tmp_path):
    result = unison.run(ks.train, hparams={"lr": 0.05, "epochs": 4}, model=ks.sequential_fn,
                        data=ks.make_data, storage=tmp_path, metric="val_accuracy")
    assert result.value == result.metrics["val_accuracy"] > 0.8
    reports = read_jsonl(trial_dir(result.path, 0) / "metrics.jsonl")
    assert [r["step"] for r in reports] == [0, 1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(reports[-1])
    assert reports[-1]["accuracy"] > reports[0]["accuracy"]


def test_callbacks_is_injectable_by_name_and_a_fresh_list_per_call(tmp_path):
    seen: list[Any] = []

    def train(callbacks, reporter):
        seen.append(callbacks)
        assert isinstance(callbacks, list) and len(callbacks) == 1
        assert isinstance(callbacks[0], keras.callbacks.Callback) and callbacks[0].reporter is reporter
        return 1.0

    search = unison.Search({"x": unison.choice([1, 2])}, metric="value", optimizer="grid")
    unison.run(train, search, backend="inline", storage=tmp_path, progress=False)
    assert len(seen) == 2 and seen[0] is not seen[1] and seen[0][0] is not seen[1][0]
    with pytest.raises(ValueError, match=r"\['callbacks'\] clash with unison's injectable names"):
        unison.run(train, unison.Search({"callbacks": unison.choice([1, 2])}, metric="value"),
                   backend="inline", storage=tmp_path)


def test_a_stopped_trial_ends_fit_after_the_epoch_the_scheduler_chose(tmp_path):
    search = unison.Search({"lr": unison.choice([0.05, 0.01]), "epochs": 5}, metric="val_accuracy",
                           mode="max", optimizer="grid", scheduler=StopAt(step=2))
    result = unison.run(ks.train, search, model=ks.sequential_fn, data=ks.make_data, backend="inline",
                        storage=tmp_path, progress=False)
    trials = result.trials.set_index("trial_id")
    stopped, completed = trials.loc[0], trials.loc[1]
    assert stopped["status"] == "stopped" and stopped["stop_reason"] == "told to stop at step 2"
    assert (stopped["steps"], stopped["last_step"]) == (3, 2)
    assert [r["step"] for r in read_jsonl(trial_dir(result.path, 0) / "metrics.jsonl")] == [0, 1, 2]
    # fit returned after epoch 2 (not an exception out of it): the code after fit ran
    after = json.loads((trial_dir(result.path, 0) / "after_fit.json").read_text())
    assert after["epochs_trained"] == 3
    # the recorded metrics are those of the judged epoch, not what the function returned afterwards
    last = read_jsonl(trial_dir(result.path, 0) / "metrics.jsonl")[-1]
    assert stopped["val_accuracy"] == pytest.approx(last["val_accuracy"]) and "accuracy" in trials.columns
    assert completed["status"] == "completed" and completed["steps"] == 5
    assert json.loads((trial_dir(result.path, 1) / "after_fit.json").read_text())["epochs_trained"] == 5
    events = read_jsonl(result.path / "journal.jsonl")
    assert [e["step"] for e in events if e["e"] == "report" and e["id"] == 0] == [0, 1, 2]


def test_a_stop_is_final_another_fit_or_report_raises_and_the_trial_stays_stopped(tmp_path):
    calls: list[str] = []

    def train(model, dataset, callbacks, reporter):
        x, y, _, _ = dataset
        model.fit(x, y, epochs=4, callbacks=callbacks, verbose=0)
        calls.append("first fit returned")
        try:
            model.fit(x, y, epochs=4, callbacks=callbacks, verbose=0)  # the stop holds: no training
        except unison.TrialStopped:
            calls.append("second fit refused")
        try:
            reporter.report(step=99, accuracy=1.0)
        except unison.TrialStopped as stop:
            calls.append(f"report refused: {stop}")
        return {"accuracy": 1.0}  # a stopped trial keeps the judged metrics, not these

    search = unison.Search({"lr": 0.05}, metric="accuracy", mode="max", trials=1, scheduler=StopAt(step=1))
    result = unison.run(train, search, model=ks.sequential_fn, data=ks.make_data, backend="inline",
                        storage=tmp_path, progress=False)
    assert calls == ["first fit returned", "second fit refused", "report refused: told to stop at step 1"]
    row = result.trials.iloc[0]
    assert row["status"] == "stopped" and row["last_step"] == 1 and row["accuracy"] < 1.0
    assert [r["step"] for r in read_jsonl(trial_dir(result.path, 0) / "metrics.jsonl")] == [0, 1]


def test_a_function_that_swallows_the_stop_is_still_recorded_stopped(tmp_path):
    def train(reporter):
        for step in range(5):
            try:
                reporter.report(step=step, value=float(step))
            except BaseException:  # noqa: BLE001 - exactly what a careless user writes
                pass
        return 10.0

    result = unison.run(train, unison.Search({"x": 1}, metric="value", trials=1, scheduler=StopAt(1)),
                        backend="inline", storage=tmp_path, progress=False)
    row = result.trials.iloc[0]
    assert (row["status"], row["value"], row["last_step"], row["steps"]) == ("stopped", 1.0, 1, 2)


# -------------------------------------------------------------------------------- layer removal
def test_removing_a_sequential_layer_keeps_the_others_their_weights_and_the_compile_arguments():
    model = ks.sequential_fn({"lr": 0.03})
    reduced = remove_layers(model, ["dropout", "hidden2"])
    assert isinstance(reduced, keras.Sequential) and reduced is not model
    assert [layer.name for layer in reduced.layers] == ["hidden", "out"]
    for name in ("hidden", "out"):
        assert reduced.get_layer(name) is model.get_layer(name)  # same layer objects, same weights
    assert reduced.compiled and float(reduced.optimizer.learning_rate) == pytest.approx(0.03)
    assert reduced.loss == "sparse_categorical_crossentropy"
    x, y, _, _ = ks.make_data()
    before = model.get_layer("out").get_weights()[0].copy()
    reduced.fit(x, y, epochs=1, verbose=0)
    assert not np.allclose(before, reduced.get_layer("out").get_weights()[0])


def test_sequential_removal_checks_shapes_once_the_model_is_built():
    with pytest.raises(ValueError, match=r"layer 'hidden' \(Dense\) of the Keras model 'seq'.*maps shape "
                                         r"\(None, 8\) float32 to shape \(None, 16\) float32"):
        remove_layers(ks.sequential_fn({}), ["hidden"])
    # an unbuilt Sequential has no shapes yet: the remaining layers build on what arrives
    unbuilt = keras.Sequential([L.Dense(8, name="a"), L.Dense(3, name="narrow"), L.Dense(1, name="b")])
    reduced = remove_layers(unbuilt, ["narrow"])
    assert [layer.name for layer in reduced.layers] == ["a", "b"]
    assert tuple(reduced(np.zeros((2, 5), "float32")).shape) == (2, 1)


def test_removing_a_functional_layer_bypasses_it():
    model = ks.functional_fn({"lr": 0.02})
    for name in ("block", "act"):
        reduced = remove_layers(model, [name])
        assert name not in [layer.name for layer in reduced.layers] and reduced.name == "res"
        assert reduced.get_layer("proj") is model.get_layer("proj") and reduced.compiled
    reduced = remove_layers(model, ["act"])
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    # act bypassed: out(add) instead of out(relu(add)): compare with a model built without it by hand
    by_hand = keras.Model(model.input, model.get_layer("out")(model.get_layer("add").output))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reduced(x)), keras.ops.convert_to_numpy(by_hand(x)),
                               rtol=1e-5, atol=1e-6)
    both = remove_layers(model, ["block", "act"])
    assert [layer.name for layer in both.layers] == ["features", "proj", "add", "out"]
    x_train, y_train, _, _ = ks.make_data()
    both.fit(x_train, y_train, epochs=1, verbose=0)


@pytest.mark.parametrize(("layer", "why"), [
    ("proj", r"it maps shape \(None, 8\) float32 to shape \(None, 16\) float32"),
    ("add", r"it takes 2 input\(s\) and gives 1 output\(s\)"),
    ("features", r"it is an input of the model"),
])
def test_a_functional_layer_that_cannot_be_bypassed_fails_naming_it_and_why(layer, why):
    message = rf"cannot remove layer '{layer}' \(\w+\) of the Keras model 'res': {why}"
    with pytest.raises(ValueError, match=message):
        remove_layers(ks.functional_fn({}), [layer])


def test_shared_layers_subclassed_models_and_unknown_names_fail_clearly():
    inputs = keras.Input(shape=(4,))
    shared = L.Dense(4, name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ValueError, match=r"layer 'shared' .* is called 2 times in the model"):
        remove_layers(model, ["shared"])

    class Sub(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="sub")
            self.dense = L.Dense(2, name="dense")

        def call(self, x: Any) -> Any:
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match=r"cannot remove layer 'dense' from Sub 'sub': it is a subclassed"):
        remove_layers(sub, ["dense"])
    with pytest.raises(KeyError, match=r"no layer\(s\) \['nope'\]; its layers are \['hidden', 'dropout', "
                                       r"'hidden2', 'out'\]"):
        remove_layers(ks.sequential_fn({}), ["nope"])


# ------------------------------------------------------------------------------------- ablation
def test_an_ablation_removes_sequential_and_functional_layers(tmp_path):
    for model_fn, modules, expected in [
        (ks.sequential_fn, ["dropout", "hidden2"], ["hidden", "dropout", "hidden2", "out"]),
        (ks.functional_fn, ["block", "act"], ["features", "proj", "block", "add", "act", "out"]),
    ]:
        result = unison.run(ks.train, ks.ablation(modules), model=model_fn, data=ks.make_data,
                            backend="inline", storage=tmp_path, progress=False)
        trials = result.trials.set_index("component")
        assert set(trials["status"]) == {"completed"}
        assert list(result.ablation["component"]) == ["baseline", *modules]
        for component in ["baseline", *modules]:
            after = json.loads((trial_dir(result.path, int(trials.loc[component, "trial_id"]))
                                / "after_fit.json").read_text())
            assert after["layers"] == [n for n in expected if n != component]


def test_an_ablation_of_a_layer_that_cannot_go_fails_before_any_trial_naming_it(tmp_path):
    calls: list[int] = []

    def train(model):
        calls.append(1)
        return 0.0

    for model_fn, modules, message in [
        (ks.functional_fn, ["act", "proj"], r"cannot remove layer 'proj' \(Dense\) of the Keras model 'res': "
                                            r"it maps shape \(None, 8\)"),
        (ks.functional_fn, ["add"], r"cannot remove layer 'add' \(Add\).*takes 2 input"),
        (ks.sequential_fn, ["hidden"], r"cannot remove layer 'hidden' \(Dense\) of the Keras model 'seq'"),
    ]:
        with pytest.raises(ValueError, match=message):
            unison.run(train, ks.ablation(modules), model=model_fn, backend="inline",
                       storage=tmp_path / "runs", progress=False)
    with pytest.raises(ValueError, match=r"layer\(s\) \['body'\] are not in the Keras model model_fn builds; "
                                         r"its layers are \['hidden', 'dropout', 'hidden2', 'out'\]"):
        unison.run(train, ks.ablation(["dropout", "body"]), model=ks.sequential_fn, backend="inline",
                   storage=tmp_path / "runs", progress=False)
    assert calls == [] and not (tmp_path / "runs").exists()


def test_a_layer_that_cannot_go_in_one_trial_fails_that_trial_naming_it(tmp_path):
    def shape_changes_with_seed(hparams):  # the check (first seed) passes; the second repeat cannot go
        model = ks.sequential_fn(hparams)
        if hparams["seed"] == 1:
            return ks._compile(keras.Sequential([keras.Input((8,)), L.Dense(4, name="dropout"),
                                                 L.Dense(2, activation="softmax", name="out")], name="odd"),
                               hparams)
        return model

    study = unison.Ablation(base={"epochs": 1}, modules=["dropout"], metric="val_accuracy", mode="max",
                            repeats=2, seed=0)
    result = unison.run(ks.train, study, model=shape_changes_with_seed, data=ks.make_data, backend="inline",
                        storage=tmp_path, progress=False)
    trials = result.trials
    failed = trials[trials["status"] == "failed"]
    assert len(failed) == 1 and failed.iloc[0]["component"] == "dropout" and failed.iloc[0]["seed"] == 1
    assert re.search(r"cannot remove layer 'dropout' \(Dense\) of the Keras model 'odd': it maps shape "
                     r"\(None, 8\)", failed.iloc[0]["error"])
    assert (trials["status"] == "completed").sum() == 3


def test_automatic_layer_names_are_the_same_in_every_trial(tmp_path):
    def unnamed_fn(hparams):
        return ks._compile(keras.Sequential([keras.Input((8,)), L.Dense(16), L.Dropout(0.1), L.Dense(2)]),
                           hparams)

    for _ in range(3):  # this process has built models before: its next Dropout would be dropout_N
        unnamed_fn({})
    study = unison.Ablation(base={"epochs": 1}, modules=["dropout"], metric="val_accuracy", mode="max",
                            repeats=2)
    result = unison.run(ks.train, study, model=unnamed_fn, data=ks.make_data, backend="inline",
                        storage=tmp_path, progress=False)
    assert set(result.trials["status"]) == {"completed"}
    layers = {(row["component"], row["seed"]): json.loads(
        (trial_dir(result.path, row["trial_id"]) / "after_fit.json").read_text())["layers"]
        for _, row in result.trials.iterrows()}
    assert layers == {("baseline", 0): ["dense", "dropout", "dense_1"], ("dropout", 0): ["dense", "dense_1"],
                      ("baseline", 1): ["dense", "dropout", "dense_1"], ("dropout", 1): ["dense", "dense_1"]}
    assert L.Dropout(0.1).name not in ("dropout", "dropout_1")  # this process's own count goes on


# --------------------------------------------------------------------------------- worker payload
def test_the_payload_carries_the_keras_backend_to_workers():
    from unison.payload import _apply_env, framework_env

    assert framework_env() == {"KERAS_BACKEND": keras.backend.backend()}
    _apply_env({"KERAS_BACKEND": keras.backend.backend()})  # the same backend: nothing to do
    other = "tensorflow" if keras.backend.backend() != "tensorflow" else "torch"
    with pytest.raises(RuntimeError, match=rf"already loaded Keras with the '{keras.backend.backend()}' "
                                           rf"backend, but the driver runs Keras on '{other}'"):
        _apply_env({"KERAS_BACKEND": other})


# ------------------------------------------------------------------------- every backend, every context
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None,
                                                        reason=f"{module} is not installed"))
            for name, module in (("torch", "torch"), ("tensorflow", "tensorflow"))]


def run_scenarios(backend: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, str(TESTS / "keras_scenarios.py"), str(tmp_path), *args], env=env,
                         capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["backend"] == backend
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_keras_function_as_single_run_search_and_ablation(backend, tmp_path):
    summary = run_scenarios(backend, tmp_path)

    # single run: one report per epoch
    single = Path(summary["single"])
    assert [r["step"] for r in read_jsonl(trial_dir(single, 0) / "metrics.jsonl")] == [0, 1, 2]
    assert summary["single_value"] > 0.8

    # search on two worker processes (one may have run them all while the other was still importing)
    check_asha_search(summary["search"], backend, worker_prefix="worker-")
    check_ablation(summary["sequential"], ["hidden", "dropout", "hidden2", "out"])
    check_ablation(summary["functional"], ["features", "proj", "block", "add", "act", "out"])


@pytest.mark.slow
# On Spark with Keras on torch only (the Keras backend changes nothing in how Spark runs the trials,
# and TensorFlow on Spark is tested in tests/test_tensorflow_distributed.py): CI's 30 minutes
@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_the_same_keras_function_as_search_and_ablation_on_spark(backend, tmp_path):
    pytest.importorskip("pyspark")
    summary = run_scenarios(backend, tmp_path, "--spark")
    # Executors do not share the driver's disk: the trials' files came back in their results.
    check_asha_search(summary["search"], backend, worker_prefix="spark-")
    check_ablation(summary["sequential"], ["hidden", "dropout", "hidden2", "out"])


def check_asha_search(path: str, backend: str, worker_prefix: str) -> None:
    """Every trial ran on a worker with ``backend``; every stopped trial stopped at the epoch ASHA chose."""
    search = unison.SearchResult.load(path)
    trials = search.trials.set_index("trial_id")
    table = trials[["lr", "status", "worker", "last_step", "stop_reason", "error"]].to_string()
    assert all(str(w).startswith(worker_prefix) for w in trials["worker"]), table
    assert set(trials["status"]) == {"completed", "stopped"}, table
    events = read_jsonl(Path(path) / "journal.jsonl")
    for tid, row in trials.iterrows():
        folder = trial_dir(path, tid)
        steps = [r["step"] for r in read_jsonl(folder / "metrics.jsonl")]
        after = json.loads((folder / "after_fit.json").read_text())
        assert after["backend"] == backend  # the workers' environment lacks KERAS_BACKEND: the payload
        assert steps == [e["step"] for e in events if e["e"] == "report" and e["id"] == tid]
        if row["status"] == "stopped":
            chosen = int(re.search(r"\(resource \d+, step (\d+)\)", row["stop_reason"]).group(1))
            assert chosen in (1, 3)  # the rungs
            assert steps == list(range(chosen + 1)) and row["last_step"] == chosen
            assert after["epochs_trained"] == chosen + 1  # fit ended cleanly after that epoch
        else:
            assert steps == list(range(ks.EPOCHS)) and after["epochs_trained"] == ks.EPOCHS
    poor = trials[trials["lr"] == 1e-6]
    assert (poor["status"] == "stopped").sum() >= 1, table


def check_ablation(path: str, expected: list[str]) -> None:
    """Every trial completed, and the layer it removed is gone from the model it trained."""
    result = unison.SearchResult.load(path)
    assert set(result.trials["status"]) == {"completed"}
    for _, row in result.trials.iterrows():
        layers = json.loads((trial_dir(path, row["trial_id"]) / "after_fit.json").read_text())
        assert layers["layers"] == [n for n in expected if n != row["component"]]
