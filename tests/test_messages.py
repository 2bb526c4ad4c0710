"""What a user sees when a name is wrong: "did you mean" for optimizer, scheduler and backend names, a
misspelled metric caught at the experiment's first report, hyperparameters named like an injectable
rejected at construction, and resume hints that work as printed."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

import unison
from unison._validate import did_you_mean
from unison.errors import MetricNotReported, SearchAborted

SPACE = {"x": unison.uniform(0.0, 1.0)}


# ------------------------------------------------------------------------------------ did you mean
def test_did_you_mean_offers_the_closest_name_only_when_one_is_close():
    assert did_you_mean("tpee", ["tpe", "random", "grid"]) == " did you mean 'tpe'?"
    assert did_you_mean("ASHA", ["asha", "median"]) == " did you mean 'asha'?"
    assert did_you_mean("zzzzzz", ["tpe", "random", "grid"]) == ""


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "tpee"}, r"unknown optimizer 'tpee': did you mean 'tpe'\? Use one of \[.*'random'.*\]"),
    ({"optimizer": "radnom"}, r"unknown optimizer 'radnom': did you mean 'random'\?"),
    ({"scheduler": "asah"}, r"unknown scheduler 'asah': did you mean 'asha'\? Use one of \[.*'median'.*\]"),
    ({"scheduler": "medain"}, r"unknown scheduler 'medain': did you mean 'median'\?"),
])
def test_unknown_optimizer_and_scheduler_names_get_a_did_you_mean(kwargs, message):
    with pytest.raises(ValueError, match=message):
        unison.Search(SPACE, **kwargs)


def test_an_unknown_name_far_from_any_gets_the_list_without_a_guess():
    with pytest.raises(ValueError, match=r"unknown optimizer 'bayesian': use one of \[") as info:
        unison.Search(SPACE, optimizer="bayesian")
    assert "did you mean" not in str(info.value)


def test_unknown_backend_name_gets_a_did_you_mean(tmp_path):
    with pytest.raises(ValueError, match=r"unknown backend 'locl': did you mean 'local'\? Use one of "
                                         r"\['inline', 'local', 'ray', 'spark'\]"):
        unison.run(lambda x: x, unison.Search(SPACE, trials=1), backend="locl", storage=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing was written


# ----------------------------------------------------------------- hyperparameters named like injectables
@pytest.mark.parametrize("name", ["reporter", "ctx", "model", "dataset", "hparams", "callbacks"])
def test_a_hyperparameter_named_like_an_injectable_fails_at_construction(name):
    with pytest.raises(ValueError, match=rf"\['{name}'\] clash with unison's injectable names.*"
                                         rf"Rename the hyperparameter \(e\.g\. '{name}' -> '{name}_name'\)"):
        unison.Search({name: unison.choice([1, 2]), "x": 1.0})


def test_ablation_and_distributed_hyperparameters_named_like_injectables_fail_at_construction():
    with pytest.raises(ValueError, match=r"Ablation\(base\).*\['reporter'\] clash"):
        unison.Ablation(base={"reporter": 1, "lr": 0.1}, features=["a"], metric="acc")
    with pytest.raises(ValueError, match=r"Distributed\(hparams\).*\['ctx'\] clash"):
        unison.Distributed(workers=2, hparams={"ctx": 1})


# ----------------------------------------------------------------------------- misspelled metric
def reports_accuracy(x, reporter, ctx):
    for step in range(5):
        reporter.report(step=step, accuracy=x, loss=1 - x)
        (ctx.trial_dir / f"after-{step}").parent.mkdir(parents=True, exist_ok=True)
        (ctx.trial_dir / f"after-{step}").touch()
    return {"accuracy": x}


def _trial_files(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "trials").rglob("after-*"))


def test_a_misspelled_metric_fails_the_first_report_and_aborts_the_search(tmp_path):
    search = unison.Search(SPACE, metric="acuracy", trials=5, optimizer="random", seed=0)
    with pytest.raises(SearchAborted) as info:
        unison.run(reports_accuracy, search, backend="inline", storage=tmp_path, progress=False)
    message = str(info.value)
    assert "first report (trial 0, step 0)" in message
    assert "['accuracy', 'loss']" in message and "did you mean 'accuracy'?" in message
    (path,) = tmp_path.iterdir()
    assert _trial_files(path) == []  # the function did not go on past that report
    rows = unison.SearchResult.load(path).rows
    assert [r["status"] for r in rows] == ["failed"] and rows[0]["steps"] == 1
    assert "did you mean 'accuracy'?" in rows[0]["error"]


def test_a_function_swallowing_metric_not_reported_still_fails_its_trial(tmp_path):
    seen: list[str] = []

    def stubborn(x, reporter):
        for step in range(3):
            try:
                reporter.report(step=step, acc=x)
            except MetricNotReported as exc:  # a ValueError: except Exception catches it
                seen.append(type(exc).__name__)
        return {"acc": x, "accuracy": x}

    with pytest.raises(SearchAborted, match=r"has the metrics \['acc'\] but the search optimizes 'accuracy'"):
        unison.run(stubborn, unison.Search(SPACE, metric="accuracy", trials=3), backend="inline",
                   storage=tmp_path, progress=False)
    assert seen == ["MetricNotReported"] * 3  # every later report raises at once too
    (path,) = tmp_path.iterdir()
    assert [r["status"] for r in unison.SearchResult.load(path).rows] == ["failed"]


def test_only_the_first_report_must_hold_the_metric(tmp_path):
    def later_without(x, reporter):
        reporter.report(step=0, accuracy=x)
        reporter.report(step=1, loss=1 - x)  # Ray Tune's rule: only the first report is checked
        return {"accuracy": x}

    r = unison.run(later_without, unison.Search(SPACE, metric="accuracy", trials=2), backend="inline",
                   storage=tmp_path, progress=False)
    assert (r.trials["status"] == "completed").all()


def test_a_returned_dict_without_the_metric_says_did_you_mean(tmp_path):
    with pytest.raises(SearchAborted, match=r"the function returned the metrics \['accuracy'\] but the "
                                            r"search optimizes 'acuracy': did you mean 'accuracy'\?"):
        unison.run(lambda x: {"accuracy": x}, unison.Search(SPACE, metric="acuracy", trials=2),
                   backend="inline", storage=tmp_path, progress=False)


def slow_reports(x, reporter):
    for step in range(8):
        reporter.report(step=step, accuracy=x)
        time.sleep(0.5)
    return {"accuracy": x}


@pytest.mark.slow
def test_a_misspelled_metric_fails_at_the_first_report_on_worker_processes(tmp_path):
    search = unison.Search(SPACE, metric="acuracy", trials=4, optimizer="random", seed=0)
    start = time.monotonic()
    with pytest.raises(SearchAborted, match="did you mean 'accuracy'"):
        unison.run(slow_reports, search, backend=unison.Local(workers=2), storage=tmp_path, progress=False)
    assert time.monotonic() - start < 3.5 + 10  # a whole trial takes 4 s; start-up takes some
    (path,) = tmp_path.iterdir()
    rows = unison.SearchResult.load(path).rows
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all(r["steps"] == 1 and r["duration"] < 1.5 for r in failed)
    assert all("did you mean 'accuracy'?" in r["error"] for r in failed)


# ------------------------------------------------------------------------- resume hints as printed
CALLS: Counter[int] = Counter()
INTERRUPT_AT = {"trial": 2}


def load_points() -> dict[str, float]:
    return {"offset": 0.5}


def interrupted_train(x, dataset, ctx):
    CALLS[ctx.trial_id] += 1
    if ctx.trial_id == INTERRUPT_AT["trial"]:
        INTERRUPT_AT["trial"] = -1
        raise KeyboardInterrupt  # on the inline backend the function runs in the driver: Ctrl-C
    return {"score": x + dataset["offset"]}


def _hint(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("interrupted:")]
    return line


def _ends(path: Path) -> Counter[int]:
    events = [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]
    return Counter(e["id"] for e in events if e.get("e") == "end")


def test_the_resume_hint_after_an_interrupted_search_works_as_printed(tmp_path, capsys):
    CALLS.clear()
    INTERRUPT_AT["trial"] = 2
    search = unison.Search(SPACE, metric="score", trials=5, optimizer="random", seed=3)
    with pytest.raises(KeyboardInterrupt):
        unison.run(interrupted_train, search, data=load_points, backend="inline", storage=tmp_path,
                   progress=True)
    line = _hint(capsys.readouterr().out)
    (path,) = tmp_path.iterdir()
    call = re.search(r"(unison\.resume\(.*?\)) or, from a shell, `unison resume (\S+) --backend inline`",
                     line)
    assert call is not None, line
    assert "data=load_points" in call.group(1) and Path(call.group(2)) == path
    result = eval(call.group(1), {"unison": unison, "interrupted_train": interrupted_train,  # noqa: S307
                                  "load_points": load_points})
    assert result.status == "completed" and len(result.rows) == 5
    assert _ends(path) == Counter(range(5))  # every trial ended once
    assert CALLS[2] == 2 and all(CALLS[n] == 1 for n in (0, 1, 3, 4))


class _Keep(unison.Optimizer):
    """A user-written optimizer: the stored search cannot be rebuilt from experiment.json."""

    def suggest(self, trial_number):
        return {"x": trial_number / 10} if trial_number < 4 else None

    def observe(self, trial_number, hparams, value, status):
        pass


def test_the_hint_for_a_custom_optimizer_passes_the_search_again(tmp_path, capsys):
    CALLS.clear()
    INTERRUPT_AT["trial"] = 1
    my_search = unison.Search({"x": unison.uniform(0, 1)}, metric="score", optimizer=_Keep())
    with pytest.raises(KeyboardInterrupt):
        unison.run(interrupted_train, my_search, data=load_points, backend="inline", storage=tmp_path,
                   progress=True)
    line = _hint(capsys.readouterr().out)
    call = re.search(r"(unison\.run\(interrupted_train, \w+, data=load_points, backend='inline', "
                     r"resume='[^']+'\))", line)
    assert call is not None, line
    # The search's name in the user's namespace is not known here (not __main__): the hint says "search".
    result = eval(call.group(1), {"unison": unison, "interrupted_train": interrupted_train,  # noqa: S307
                                  "load_points": load_points, "search": my_search})
    assert result.status == "completed" and sorted(_ends(result.path).values()) == [1, 1, 1, 1]


def reports_loss_on_every_rank(reporter, ctx):
    for step in range(2):
        reporter.report(step=step, loss=1.0 / (step + 1))
    return {"loss": 0.5, "rank": float(ctx.rank)}


@pytest.mark.slow
def test_a_distributed_run_without_metric_needs_no_metric_in_its_reports(tmp_path):
    pytest.importorskip("torch")
    r = unison.run(reports_loss_on_every_rank, unison.Distributed(workers=2), storage=tmp_path,
                   progress=False)
    assert r.metrics == {"loss": 0.5, "rank": 0.0}
