"""unison's own kinds drawn with matplotlib, for PNGs: the same data and colours as the plotly figures
(:mod:`unison.plots.interactive`). A ``matplotlib.figure.Figure`` is used directly, so pyplot's
state and backend are left alone and no display is needed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from unison.plots import data


def save_png(result: Any, kind: str, options: dict[str, Any], path: Path) -> None:
    """Draw ``kind`` and save it as a PNG at ``path``."""
    drawings = {"history": history, "curves": curves, "pbt": pbt, "timeline": timeline, "ablation": ablation}
    fig = drawings[kind](result, **options)
    fig.savefig(path, dpi=120)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def curves(result: Any, metric: str | None = None) -> Any:
    """Each trial's reported ``metric`` by step; stopped trials grey, ending in an x."""
    from matplotlib.lines import Line2D

    frame = result.curves
    metric = data.curve_metric(result, frame, metric)
    drawn = data.curves(result, frame, metric)
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    order = {"stopped": 0, "failed": 1, "completed": 3}
    for curve in sorted(drawn, key=lambda c: (c.best, order.get(c.status, 2), c.trial_id)):
        group = "best" if curve.best else curve.status
        color = data.COLORS.get(group, "#8c8c8c")
        stopped = curve.status == "stopped"
        z = 3 if curve.best else 2
        ax.plot(curve.steps, curve.values, color=color, linewidth=2.5 if curve.best else 1.2,
                alpha=0.7 if stopped else 1.0, zorder=z)
        ax.plot(curve.steps[-1:], curve.values[-1:], linestyle="none", color=color,
                marker="x" if stopped else "o", markersize=7 if stopped else 3.5, zorder=z)
    groups = list(dict.fromkeys("best" if c.best else c.status for c in drawn))
    handles = [Line2D([], [], color=data.COLORS.get(g, "#8c8c8c"), marker="x" if g == "stopped" else "o",
                      label="best" if g == "best" else data.STATUS_LABELS.get(g, g)) for g in groups]
    if handles:
        ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(data.curves_title(metric, drawn))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return fig


def pbt(result: Any, metric: str | None = None) -> Any:
    """A population-based-training search's members (one colour each) by step: a clone starts with a
    dashed connector from its parent's point at ``cloned_step``, a replaced trial ends in an x, the best
    trial is thick."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    frame = result.curves
    metric = data.curve_metric(result, frame, metric, "pbt")
    segments = data.population(result, frame, metric)
    fig = _figure(7.5, 4.5)
    ax = fig.subplots()
    for seg in sorted(segments, key=lambda s: (s.best, s.member, s.trial_id)):
        z = 3 if seg.best else 2
        if seg.start is not None:
            ax.plot([seg.start[0], seg.steps[0]], [seg.start[1], seg.values[0]], color=seg.color,
                    linestyle="--", linewidth=1.0, zorder=z)
        ax.plot(seg.steps, seg.values, color=seg.color, linewidth=3.0 if seg.best else 1.2, zorder=z)
        ax.plot(seg.steps[-1:], seg.values[-1:], linestyle="none", color=seg.color,
                marker="x" if seg.replaced else "o", markersize=7 if seg.replaced else 3.5, zorder=z)
    members = sorted({seg.member: seg.color for seg in segments}.items())
    handles = [Line2D([], [], color=color, label=f"member {member}") for member, color in members]
    handles += [Line2D([], [], color="#404040", linestyle="--", label="clone of a checkpoint"),
                Line2D([], [], color="#404040", linestyle="none", marker="x", label="replaced by a clone")]
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(data.population_title(result, metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    return fig


def history(result: Any, metric: str | None = None) -> Any:
    """The completed trials' ``metric`` and the best so far, by trial and by wall time."""
    metric, mode = data.objective(result, "history", metric)
    h = data.history(result, metric, mode)
    fig = _figure(9.0, 4.0)
    by_trial, by_time = fig.subplots(1, 2, sharey=True)
    since = "seconds since the experiment started"
    panels = ((by_trial, h.trial_ids, h.values, h.best_by_trial, "trial"),
              (by_time, h.end_times, h.values_by_time, h.best_by_time, since))
    for ax, xs, values, best, label in panels:
        ax.scatter(xs, values, s=16, color=data.COLORS["completed"], label=f"{metric} of a completed trial")
        ax.step(xs, best, where="post", color=data.COLORS["best"], linewidth=2, label="best so far")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    by_trial.set_ylabel(metric)
    by_trial.legend(fontsize=8)
    fig.suptitle(f"{metric} ({mode}): best so far over {len(h.values)} completed trials")
    return fig


def timeline(result: Any) -> Any:
    """Every ended attempt as a bar on its worker's row, coloured by how it ended."""
    from matplotlib.patches import Patch

    bars = data.timeline(result)
    workers = data.workers_in_order(bars)
    row = {worker: index for index, worker in enumerate(workers)}
    fig = _figure(8.0, max(2.5, 1.2 + 0.4 * len(workers)))
    ax = fig.subplots()
    ax.barh([row[b.worker] for b in bars], [b.duration for b in bars], left=[b.start for b in bars],
            color=[data.COLORS.get(b.status, "#8c8c8c") for b in bars], edgecolor="white", linewidth=0.5)
    ax.set_yticks(range(len(workers)), workers)
    ax.invert_yaxis()
    statuses = list(dict.fromkeys(b.status for b in bars))
    ax.legend(handles=[Patch(color=data.COLORS.get(s, "#8c8c8c"),
                             label=data.STATUS_LABELS.get(s, s).replace(" (×)", "")) for s in statuses],
              fontsize=8, loc="upper right")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the experiment started")
    ax.set_title(f"timeline: {len({b.trial_id for b in bars})} trials on {len(workers)} workers")
    return fig


def ablation(result: Any) -> Any:
    """Each removed component's difference to the baseline with its 95% interval, coloured by what the
    interval shows; the title wraps instead of being cut off."""
    from matplotlib.patches import Patch

    effects = data.ablation_effects(result)
    names = [e.component for e in effects]
    fig = _figure(7.5, max(2.8, 1.6 + 0.45 * len(names)))
    ax = fig.subplots()
    errors = [[math.nan if math.isnan(e.low) else e.diff - e.low for e in effects],
              [math.nan if math.isnan(e.high) else e.high - e.diff for e in effects]]
    ax.barh(range(len(names)), [e.diff for e in effects], xerr=errors, capsize=4,
            color=[data.EFFECT_COLORS[e.effect] for e in effects])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    metric = result.metrics[0]
    ax.set_xlabel(f"{metric} minus baseline (mean, 95% interval)")
    shown = list(dict.fromkeys(e.effect for e in effects))
    if shown:
        ax.legend(handles=[Patch(color=data.EFFECT_COLORS[s], label=data.EFFECT_LABELS[s]) for s in shown],
                  fontsize=8, loc="best")
    fig.suptitle(f"ablation: change in {metric} without each component", fontsize=11)
    ax.set_title(result.headline(), fontsize=9, wrap=True)
    return fig
