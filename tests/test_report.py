"""``unison report``: one self-contained HTML page per experiment, checked as text and in a real headless
Chromium driven over the DevTools protocol (``--remote-debugging-pipe``: no port, no extra package).

The browser tests skip, saying why, where no Chromium is installed (Debian: ``apt-get install chromium``;
``.ci/run`` installs it).
"""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import unison
from unison import cli, plots
from unison.report import REPORT_NAME, load_experiment, plot_html, write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def train(lr, units, reporter):
    accuracy = 0.0
    for epoch in range(6):
        accuracy = 1 - abs(math.log10(lr) + 2) / 4 - abs(units - 64) / 512 + 0.01 * epoch
        reporter.report(step=epoch, accuracy=accuracy, loss=1 - accuracy)
    return {"accuracy": accuracy, "loss": 1 - accuracy}


def ablation_train(dataset, seed):
    return {"accuracy": 0.1 * len(dataset) + 0.001 * seed}


SPACE = {"lr": unison.loguniform(1e-4, 1e-1), "units": unison.integer(16, 256, log=True),
         "act": unison.choice(["relu", "tanh"])}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> dict[str, Any]:
    """Finished inline experiments, one of each kind: an ASHA search (so some trials stop early), a
    multi-objective search, an ablation and a single run."""
    root = tmp_path_factory.mktemp("runs")
    run = {"backend": "inline", "storage": root, "progress": False}
    search = unison.Search(SPACE, metric="accuracy", mode="max", trials=12, optimizer="tpe",
                           scheduler="asha", seed=0)
    two = unison.Search(SPACE, metric=["accuracy", "loss"], mode=["max", "min"], trials=6, seed=1)
    ablation = unison.Ablation(base={"x": 1}, features=["a", "b"], metric="accuracy", mode="max", repeats=2)
    return {
        "search": unison.run(train, search, name="search", **run),
        "pareto": unison.run(train, two, name="pareto", **run),
        "ablation": unison.run(ablation_train, ablation, data={"a": [1], "b": [2], "c": [3]},
                               name="ablation", **run),
        "single": unison.run(train, hparams={"lr": 0.01, "units": 64}, storage=root, name="single"),
    }


@pytest.fixture(scope="module")
def reports(experiments) -> dict[str, Path]:
    """Each experiment's report, written by ``write_report`` from its directory."""
    return {kind: write_report(result.path) for kind, result in experiments.items()}


def _report(experiments: dict[str, Any], reports: dict[str, Path], kind: str) -> tuple[Any, Path, str]:
    return experiments[kind], reports[kind], reports[kind].read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ the page as text
def test_cli_writes_report_html_in_the_experiment_directory(experiments, capsys):
    result = experiments["search"]
    assert cli.main(["report", str(result.path)]) == 0
    target = result.path / REPORT_NAME
    assert capsys.readouterr().out.strip() == f"report written to {target}"
    page = target.read_text(encoding="utf-8")
    meta = json.loads((result.path / "experiment.json").read_text())
    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("completed", "stopped")}
    assert counts["stopped"] > 0  # ASHA stopped some: the table and the curves show them
    tally = f"{counts['completed']} completed, {counts['stopped']} stopped"
    assert f"{len(result.rows)} of 12 planned ({tally})" in page
    for text in ("accuracy (max)", meta["backend"], f"unison {meta['versions']['unison']}", "tpe", "asha"):
        assert text in page
    best = result.best
    assert f"<td class='num' data-v='{float(best.metric)!r}'>" in page
    if meta.get("git"):  # run from a git work tree (a CI clone is one)
        assert f"<th scope='row'>git commit</th><td>{meta['git']['commit']}" in page
    assert page.count("<tr>") >= len(result.rows)


def test_report_is_self_contained_with_plotly_js_inlined_once(experiments, reports):
    from plotly.offline import get_plotlyjs

    _, _, page = _report(experiments, reports, "search")
    kinds = plots.kinds(experiments["search"])
    assert len(kinds) >= 2
    assert page.count(get_plotlyjs()[:300]) == 1
    assert page.count("class=\"plotly-graph-div\"") == len(kinds)
    assert "<script src" not in page and "<link" not in page and "@import" not in page


def test_output_option_and_result_object(experiments, tmp_path, capsys):
    result = experiments["pareto"]
    target = tmp_path / "sub" / "two.html"
    assert cli.main(["report", str(result.path), "-o", str(target)]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {target}"
    page = target.read_text(encoding="utf-8")
    assert f"{len(result.pareto)} trial(s) on the Pareto front" in page
    assert write_report(result, tmp_path / "again.html") == tmp_path / "again.html"
    assert write_report(result, tmp_path) == tmp_path / REPORT_NAME  # a directory: report.html in it


def test_ablation_report_has_its_headline_and_table(experiments, reports):
    result, _, page = _report(experiments, reports, "ablation")
    assert result.headline() in page
    for component in result.ablation["component"]:
        assert f"<td>{component}</td>" in page
    assert "<h2>Ablation</h2>" in page


def test_single_run_report_shows_its_metrics_and_hyperparameters(experiments, reports):
    result, _, page = _report(experiments, reports, "single")
    loaded, meta, _ = load_experiment(result.path)
    assert loaded.metrics == result.metrics and meta["kind"] == "single"
    assert "metric accuracy" in page and "hparam lr" in page and "<h2>Result</h2>" in page


def failing_train(lr):
    raise RuntimeError(f"diverged at lr={lr}")


def test_a_failed_single_run_still_gets_a_report_saying_why(tmp_path):
    with pytest.raises(RuntimeError):
        unison.run(failing_train, hparams={"lr": 10.0}, storage=tmp_path, name="diverged")
    (path,) = tmp_path.iterdir()
    page = write_report(path).read_text(encoding="utf-8")
    assert "did not complete: it ended failed" in page and "RuntimeError: diverged at lr=10.0" in page
    assert "<td class='status-failed'>failed</td>" in page


def test_a_plot_that_cannot_be_drawn_is_a_note(experiments):
    def figure(result, kind):
        raise ValueError("contour needs two numeric hyperparameters")

    block = plot_html(experiments["search"], "contour", figure)
    why = "ValueError: contour needs two numeric hyperparameters"
    assert f"the contour plot could not be drawn: {why}" in block
    assert "plotly-graph-div" not in block


def test_report_errors_say_what_to_give(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 1
    assert "is not a directory: give an experiment directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "holds no experiment.json" in capsys.readouterr().err


def test_open_starts_the_browser_on_the_file(experiments, tmp_path):
    seen = tmp_path / "url.txt"
    recorder = tmp_path / "browser.sh"
    recorder.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {seen}\n")
    recorder.chmod(0o755)
    path = experiments["single"].path
    env = {**os.environ, "BROWSER": f"{recorder} %s"}
    done = subprocess.run([sys.executable, "-m", "unison.cli", "report", str(path), "--open"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 10  # webbrowser may start the command in the background
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen.read_text() == (path / REPORT_NAME).resolve().as_uri()


def test_values_from_the_experiment_are_escaped_in_the_page_and_in_jupyter(tmp_path):
    evil = "<script>window.pwned=1</script>"

    def train(name):
        return {"score": 1.0}

    search = unison.Search({"name": unison.choice([evil, "plain"])}, metric="score", optimizer="grid")
    result = unison.run(train, search, backend="inline", storage=tmp_path, progress=False, name="x<b>y")
    page = write_report(result.path).read_text()
    assert evil not in page and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert "<b>y" not in page.split("<script>")[0]  # the name in the title and header is text
    assert evil not in result._repr_html_()


def test_importing_report_loads_no_heavy_library():
    heavy = ("plotly", "matplotlib", "pandas", "optuna")
    code = f"import sys, unison.report; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# -------------------------------------------------------------------------------- in a real browser
class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe: it reads commands on its fd 3
    and writes answers and events on fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_chromium, self._write = os.pipe()
        self._read, from_chromium = os.pipe()
        # Above 10, so that putting them on 3 and 4 in the child cannot overwrite one with the other.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chromium, from_chromium)]
        os.close(to_chromium)
        os.close(from_chromium)
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--window-size=1280,1000", "about:blank"]
        with open(profile.parent / "chromium.log", "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log, close_fds=False,
                                            preexec_fn=lambda: (os.dup2(ends[0], 3), os.dup2(ends[1], 4)))
        for fd in ends:
            os.close(fd)
        self._buffer, self._id = b"", 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._next(timeout=60)
            if answer.get("id") == self._id:
                assert "error" not in answer, f"{method}: {answer['error']}"
                return answer["result"]
            self.events.append(answer)

    def wait_for(self, event: str, session: str, since: int, timeout: float = 60) -> None:
        """Until ``event`` has come from ``session``, after the first ``since`` events."""

        def arrived() -> bool:
            return any(e.get("method") == event and e.get("sessionId") == session
                       for e in self.events[since:])

        while not arrived():
            self.events.append(self._next(timeout))

    def _next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent nothing for {timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise EOFError(f"Chromium closed the DevTools pipe (exit status {self.process.poll()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(line)

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.process.wait(timeout=20)
        except (OSError, EOFError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=20)
        os.close(self._write)
        os.close(self._read)


class Page:
    """One tab, its console errors, uncaught exceptions and requests recorded from the start."""

    def __init__(self, browser: Chromium, url: str) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.first_event = len(browser.events)
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable")
        self.send("Page.navigate", {"url": url})
        browser.wait_for("Page.loadEventFired", self.session, self.first_event)
        self.evaluate(_DRAWN_JS)

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        answer = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    def _events(self, method: str) -> list[dict[str, Any]]:
        return [e["params"] for e in self.browser.events[self.first_event:]
                if e.get("method") == method and e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error calls and error log entries (a failed load, ...)."""
        thrown = [e["exceptionDetails"].get("exception", {}).get("description")
                  or e["exceptionDetails"]["text"] for e in self._events("Runtime.exceptionThrown")]
        console = [" ".join(str(a.get("value", a.get("description"))) for a in e["args"])
                   for e in self._events("Runtime.consoleAPICalled") if e["type"] in ("error", "assert")]
        logged = [e["entry"]["text"] for e in self._events("Log.entryAdded")
                  if e["entry"]["level"] == "error"]
        return thrown + console + logged

    def requested(self) -> list[str]:
        return [e["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    def click(self, selector: str) -> None:
        """A real mouse click (pressed, released) at the middle of the element."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            f"e.scrollIntoView({{block: 'center', inline: 'center'}}); "
                            f"const r = e.getBoundingClientRect(); "
                            f"return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def screenshot(self, path: Path) -> None:
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Chromium]:
    executable = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if executable is None:
        pytest.skip(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}): install Debian's chromium "
                    f"(apt-get install chromium) to open the reports in a real browser")
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    chromium = Chromium(executable, profile)
    yield chromium
    chromium.close()


# Resolves once every graph div has been drawn by plotly (or after 20 s: the assertions then say which).
_DRAWN_JS = """new Promise(function (done) {
  var start = Date.now();
  (function poll() {
    var all = Array.from(document.querySelectorAll('.plotly-graph-div'));
    if (all.every(function (gd) { return gd._fullLayout; }) || Date.now() - start > 20000) { done(true); }
    else { setTimeout(poll, 50); }
  })();
})"""

# Each plot's graph div: its traces as given, as plotly processed them, and as drawn in the SVG.
_PLOTS_JS = """JSON.stringify(Array.from(document.querySelectorAll('.plot')).map(function (block) {
  var gd = block.querySelector('.plotly-graph-div');
  return {kind: block.dataset.kind, note: block.querySelector('.note') ? block.textContent : null,
          data: gd ? gd.data.length : -1, full: gd && gd._fullData ? gd._fullData.length : -1,
          drawn: gd ? gd.querySelectorAll('g.trace').length : 0,
          marks: gd ? gd.querySelectorAll('g.trace path, g.trace .point').length : 0};
}))"""


def _open_and_check(browser: Chromium, result: Any, path: Path) -> Page:
    """Open the result's report; assert no JavaScript error, no request leaving the file and every plot
    drawn with as many traces as its figure has."""
    page = Page(browser, path.resolve().as_uri())
    assert page.errors() == []
    assert [url for url in page.requested() if not url.startswith(("file:", "data:"))] == []
    drawn = {p["kind"]: p for p in json.loads(page.evaluate(_PLOTS_JS))}
    assert list(drawn) == plots.kinds(result)
    for kind, plot in drawn.items():
        assert plot["note"] is None, plot["note"]
        expected = len(plots.figure(result, kind).data)
        assert plot["data"] == plot["full"] == expected, (kind, plot)
        assert plot["drawn"] >= 1 and plot["marks"] >= 1, (kind, plot)
    return page


def _column(page: Page, name: str) -> list[str]:
    return page.evaluate(f"""(() => {{
      const table = document.querySelector('#trials table');
      const col = Array.from(table.tHead.rows[0].cells)
        .findIndex(c => c.textContent.trim() === {json.dumps(name)});
      return Array.from(table.tBodies[0].rows,
                        r => r.cells[col].getAttribute('data-v') ?? r.cells[col].textContent);
    }})()""")


@pytest.mark.slow
def test_search_report_in_chromium(browser, experiments, reports, tmp_path):
    result = experiments["search"]
    page = _open_and_check(browser, result, reports["search"])
    curves = {p["kind"]: p for p in json.loads(page.evaluate(_PLOTS_JS))}["curves"]
    reported = sorted(r["trial_id"] for r in result.rows if r["steps"])
    assert curves["drawn"] == len(reported)  # a line per trial that reported, the stopped ones included
    drawn_ids = page.evaluate("document.getElementById('plot-curves').data.map(t => t.meta.trial_id)")
    assert sorted(drawn_ids) == reported
    header = "#trials th:nth-child({})".format(list(result.trials.columns).index("accuracy") + 1)
    page.click(header)
    values = [float(v) for v in _column(page, "accuracy")]
    assert values == sorted(result.trials["accuracy"]) and values != list(result.trials["accuracy"])
    page.click(header)
    assert [float(v) for v in _column(page, "accuracy")] == sorted(result.trials["accuracy"], reverse=True)
    page.click("#trials th:nth-child(2)")  # status: text, sorted as text
    assert _column(page, "status") == sorted(result.trials["status"])
    assert page.errors() == []
    page.screenshot(tmp_path / "search-report.png")
    assert (tmp_path / "search-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pareto", "ablation", "single"])
def test_other_reports_in_chromium(browser, experiments, reports, kind, tmp_path):
    page = _open_and_check(browser, experiments[kind], reports[kind])
    assert page.evaluate("document.querySelector('#summary td').textContent") == \
        json.loads((experiments[kind].path / "experiment.json").read_text())["kind"]
    page.screenshot(tmp_path / f"{kind}-report.png")
