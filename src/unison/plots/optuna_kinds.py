"""The kinds Optuna draws (``parallel``, ``importance``, ``slice``, ``contour``, ``pareto``): its
``optuna.visualization`` functions (plotly) or ``optuna.visualization.matplotlib`` (PNGs), on the
result as an Optuna study (:func:`unison.optuna_study.build_study`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from unison._validate import did_you_mean
from unison.optuna_study import build_study, make_evaluator
from unison.plots.data import objective

_FUNCTIONS = {"parallel": "plot_parallel_coordinate", "importance": "plot_param_importances",
              "slice": "plot_slice", "contour": "plot_contour", "pareto": "plot_pareto_front"}


def _pareto_objectives(result: Any, metrics: Any) -> list[str]:
    chosen = list(result.metrics) if metrics is None else list(metrics)
    unknown = [m for m in chosen if m not in result.metrics]
    if unknown or not 2 <= len(chosen) <= 3:
        raise ValueError(f"plot('pareto', metrics={chosen!r}): name 2 or 3 of the optimized metrics "
                         f"{result.metrics}" + (f" ({unknown} are not among them)" if unknown else ""))
    return chosen


def _params(study: Any, kind: str, params: Any) -> list[str] | None:
    """The params to show, checked against the study's (contour: the first two, by default)."""
    names = list(dict.fromkeys(p for t in study.get_trials(deepcopy=False) for p in t.params))
    if params is None:
        return names[:2] if kind == "contour" else None
    chosen = [params] if isinstance(params, str) else list(params)
    for name in chosen:
        if name not in names:
            hint = did_you_mean(name, names)
            raise ValueError(f"plot({kind!r}, params=...): {name!r} is not a hyperparameter that varies in "
                             f"this search; those are {names}.{hint}".rstrip("."))
    if kind == "contour" and len(chosen) < 2:
        raise ValueError(f"plot('contour', params={chosen!r}) needs two hyperparameters, e.g. {names[:2]}")
    return chosen


def _call(result: Any, kind: str, options: dict[str, Any], module: Any) -> Any:
    import optuna

    function = getattr(module, _FUNCTIONS[kind])
    if kind == "pareto":
        objectives = _pareto_objectives(result, options.get("metrics"))
        modes = [result.modes[result.metrics.index(m)] for m in objectives]
        study = build_study(result, objectives, modes)
        arguments: dict[str, Any] = {"target_names": objectives}
    else:
        metric, mode = objective(result, kind, options.get("metric"))
        study = build_study(result, [metric], [mode])
        arguments = {"params": _params(study, kind, options.get("params")), "target_name": metric}
        if kind == "importance":
            arguments["evaluator"] = make_evaluator(options.get("evaluator", "ped-anova"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return function(study, **arguments)


def draw(result: Any, kind: str, options: dict[str, Any]) -> Any:
    """``kind`` as a plotly figure, drawn by ``optuna.visualization``."""
    import optuna.visualization

    fig = _call(result, kind, options, optuna.visualization)
    fig.update_layout(title=f"{fig.layout.title.text or kind} ({result.path.name})")
    return fig


def save_png(result: Any, kind: str, options: dict[str, Any], path: Path) -> None:
    """``kind`` drawn by ``optuna.visualization.matplotlib``, saved as a PNG at ``path``; the pyplot
    figure it opened is closed again and pyplot's style restored."""
    import matplotlib
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna.visualization.matplotlib as optuna_mpl

    with matplotlib.rc_context():  # Optuna sets pyplot's style ("ggplot"): it is restored after
        axes = _call(result, kind, options, optuna_mpl)
        fig = np.asarray(axes).flat[0].figure
        try:
            fig.savefig(path, dpi=120, bbox_inches="tight")
        finally:
            plt.close(fig)
