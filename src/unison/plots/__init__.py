"""Figures of a result: ``kinds(result)``, ``figure(result, kind)`` and ``plot`` (what ``result.plot`` does).

Interactive figures are plotly's (``pip install 'unison[plot]'``), shown inline in Jupyter; where
``optuna.visualization`` draws a kind (parallel coordinates, importance, slice, contour, Pareto front)
it draws it, from ``result.to_optuna()``. PNGs are drawn by matplotlib (``optuna.visualization.matplotlib``
for Optuna's kinds), so saving one needs no browser. Importing this module loads neither library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from unison._validate import did_you_mean, unknown_name_error
from unison.plots import data

if TYPE_CHECKING:
    import plotly.graph_objects as go

# Every kind, in the order ``kinds`` lists them (after the default), with the options each takes.
OPTIONS: dict[str, tuple[str, ...]] = {
    "ablation": (),
    "history": ("metric",),
    "curves": ("metric",),
    "pbt": ("metric",),
    "parallel": ("metric", "params"),
    "importance": ("metric", "params", "evaluator"),
    "slice": ("metric", "params"),
    "contour": ("metric", "params"),
    "pareto": ("metrics",),
    "timeline": (),
}
OPTUNA_KINDS = frozenset({"parallel", "importance", "slice", "contour", "pareto"})
_NEEDS = {
    "ablation": "an ablation study (unison.Ablation)",
    "history": "a search with a completed trial",
    "curves": "reports: reporter.report(step=..., name=value) in the training function",
    "pbt": "a population-based-training search (Search(scheduler=unison.PBT(...))) whose trials reported",
    "parallel": "a search with a completed trial and a hyperparameter that varies",
    "importance": "a search with two completed trials and a hyperparameter that varies",
    "slice": "a search with a completed trial and a hyperparameter that varies",
    "contour": "a search with a completed trial and two hyperparameters that vary",
    "pareto": "a multi-objective search (Search(metric=[...], mode=[...])) with a completed trial",
    "timeline": "a search or an ablation",
}
INSTALL = "pip install 'unison[plot]'"


def kinds(result: Any) -> list[str]:
    """The plot kinds that apply to ``result``, its default first.

    A search: ``history``, ``curves`` (when trials reported steps), ``pbt`` (a population-based-training
    search that reported), ``parallel``, ``importance``, ``slice``, ``contour`` (two varying
    hyperparameters), ``pareto`` (several objectives) and ``timeline``, those that show final values only
    once a trial completed (``importance``: two); its default is ``pbt`` where it applies, else ``pareto``
    for several objectives, else ``curves`` if trials reported, else ``history`` (``timeline`` while no
    trial completed). An ablation: ``ablation``, ``curves``,
    ``timeline``. A single run: ``curves``, if it reported.
    """
    if not hasattr(result, "rows"):  # a single run
        return ["curves"] if data.reported_metrics(result.curves) else []
    rows = data.trial_rows(result)
    # (a report may carry no metric: reporter.report(step=3))
    reported = any((row.get("steps") or 0) > 0 for row in rows) and bool(data.reported_metrics(result.curves))
    if hasattr(type(result), "ablation"):
        return ["ablation", *(["curves"] if reported else []), "timeline"]
    varying = varying_params(rows)
    multi = len(data.objective_metrics(result)) > 1
    done = sum(row["status"] == "completed" for row in rows)
    applies = {"history": done > 0, "curves": reported, "pbt": reported and data.is_population(rows),
               "parallel": done > 0 and bool(varying),
               "importance": done > 1 and bool(varying), "slice": done > 0 and bool(varying),
               "contour": done > 0 and len(varying) >= 2, "pareto": multi and done > 0, "timeline": True}
    preferred = ["pbt", "pareto" if multi else "curves", "curves", "history", "timeline"]
    default = next(k for k in preferred if applies[k])
    return [default, *(k for k, ok in applies.items() if ok and k != default)]


def varying_params(rows: list[dict[str, Any]]) -> list[str]:
    """The hyperparameters that take more than one value over the trials, in their first order."""
    seen: dict[str, set[str]] = {}
    for row in rows:
        for name, value in (row.get("hparams") or {}).items():
            seen.setdefault(name, set()).add(repr(value))
    return [name for name, values in seen.items() if len(values) > 1]


def resolve(result: Any, kind: str | None) -> str:
    """``kind`` checked against the kinds that apply to ``result`` (``None``: the default kind)."""
    available = kinds(result)
    if kind is None:
        if not available:
            raise ValueError(f"nothing to plot for this {type(result).__name__}: a plot needs "
                             f"{_NEEDS['curves']}")
        return available[0]
    if isinstance(kind, Path) or (isinstance(kind, str) and kind.endswith((".png", ".html"))):
        raise TypeError(f"plot's first argument is the kind of plot; to save one, pass path={str(kind)!r} "
                        f"(kinds of this {type(result).__name__}: {available})")
    if kind in available:
        return kind
    if kind in OPTIONS:
        raise ValueError(f"plot kind {kind!r} does not apply to this {type(result).__name__}: it needs "
                         f"{_NEEDS[kind]}; its kinds are {available}")
    raise unknown_name_error("plot kind", kind, available)


def check_options(kind: str, options: dict[str, Any]) -> None:
    """A ``TypeError`` naming the options ``kind`` takes, for any other option."""
    unknown = [name for name in options if name not in OPTIONS[kind]]
    if unknown:
        hint = did_you_mean(unknown[0], OPTIONS[kind])
        takes = f"the options {list(OPTIONS[kind])}" if OPTIONS[kind] else "no options"
        raise TypeError(f"plot kind {kind!r} takes {takes}, not {unknown}.{hint}".rstrip("."))


def figure(result: Any, kind: str | None = None, **options: Any) -> go.Figure:
    """``result``'s plot of ``kind`` (``None``: its default; see :func:`kinds`) as a plotly figure."""
    kind = resolve(result, kind)
    check_options(kind, options)
    require_plotly()
    if kind in OPTUNA_KINDS:
        from unison.plots import optuna_kinds

        return optuna_kinds.draw(result, kind, options)
    from unison.plots import interactive

    return interactive.draw(result, kind, options)


def save_png(result: Any, path: str | Path, kind: str | None = None, **options: Any) -> Path:
    """Draw ``result``'s plot of ``kind`` with matplotlib (no browser, no plotly needed) into ``path``."""
    kind = resolve(result, kind)
    check_options(kind, options)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"a PNG plot needs matplotlib: {INSTALL}") from None
    if kind in OPTUNA_KINDS:
        from unison.plots import optuna_kinds

        optuna_kinds.save_png(result, kind, options, Path(path))
    else:
        from unison.plots import static

        static.save_png(result, kind, options, Path(path))
    return Path(path)


def plot(result: Any, kind: str | None = None, path: str | Path | None = None, **options: Any) -> go.Figure:
    """What ``result.plot`` does: the figure of ``kind``, saved first when ``path`` ends in ``.png``
    (matplotlib) or ``.html`` (plotly, with plotly.js inlined: it opens with no network).

    A PNG is written before the figure is built, so without plotly it is there when the
    ``ImportError`` for the figure is raised.
    """
    kind = resolve(result, kind)
    suffix = Path(path).suffix.lower() if path is not None else None
    if suffix not in (None, ".png", ".html"):
        raise ValueError(f"plot(path={str(path)!r}): a plot is saved as .png (matplotlib) or .html "
                         f"(plotly), not {suffix or 'a name without a suffix'}")
    if suffix == ".png":
        assert path is not None
        save_png(result, path, kind, **options)
    try:
        fig = figure(result, kind, **options)
    except ImportError as exc:
        if suffix == ".png":
            raise ImportError(f"{exc} (the PNG at {path} was written with matplotlib)") from None
        raise
    if suffix == ".html":
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return fig


def require_plotly() -> None:
    """An ``ImportError`` saying how to install plotly, if it is missing."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ImportError(f"interactive plots need plotly: {INSTALL} (a PNG needs only matplotlib: "
                          f"result.plot(path='plot.png'))") from None


def png_data_uri(result: Any, kind: str | None = None) -> str:
    """The plot of ``kind`` as a ``data:image/png;base64,...`` URI (for the Jupyter summary)."""
    import base64
    import tempfile

    with tempfile.TemporaryDirectory(prefix="unison-plot-") as folder:
        target = save_png(result, Path(folder) / "plot.png", kind)
        return "data:image/png;base64," + base64.b64encode(target.read_bytes()).decode("ascii")
