"""unison's own kinds as plotly figures: ``history``, ``curves``, ``pbt``, ``timeline`` and ``ablation``.

Each trace carries ``meta`` (``{"trial_id": ..., "status": ...}`` for a curve, the same with ``member``,
``parent``, ``cloned_step``, ``replaced``, ``best`` and ``part`` (``"line"`` or ``"clone"``) for a ``pbt``
trace, ``{"status": ...}`` or ``{"effect": ...}`` for a group of bars), so what a figure drew can be read
back from its data.
"""

from __future__ import annotations

import html
import math
from typing import Any

from unison.plots import data

_LAYOUT = {"template": "plotly_white", "hovermode": "closest", "legend": {"itemsizing": "constant"}}


def draw(result: Any, kind: str, options: dict[str, Any]) -> Any:
    """``result``'s plot of ``kind`` as a ``plotly.graph_objects.Figure``."""
    drawings = {"history": history, "curves": curves, "pbt": pbt, "timeline": timeline, "ablation": ablation}
    return drawings[kind](result, **options)


def curves(result: Any, metric: str | None = None) -> Any:
    """Each trial's reported ``metric`` by step, one trace per trial; a trial stopped early is grey
    and ends in an x, the best trial is drawn last, on top."""
    import plotly.graph_objects as go

    frame = result.curves
    metric = data.curve_metric(result, frame, metric)
    drawn = data.curves(result, frame, metric)
    order = {"stopped": 0, "failed": 1, "running": 2, "pending": 2, "completed": 3}
    fig = go.Figure()
    legend: set[str] = set()
    for curve in sorted(drawn, key=lambda c: (c.best, order.get(c.status, 2), c.trial_id)):
        group = "best" if curve.best else curve.status
        stopped = curve.status == "stopped"
        sizes = [0] * (len(curve.steps) - 1) + [10 if stopped else 6]
        name = f"best (trial {curve.trial_id})" if curve.best else data.STATUS_LABELS.get(group, group)
        fig.add_trace(go.Scatter(
            x=curve.steps, y=curve.values, mode="lines+markers", name=name, legendgroup=group,
            showlegend=group not in legend, opacity=0.65 if stopped else 1.0,
            line={"color": data.COLORS.get(group, "#8c8c8c"), "width": 3 if curve.best else 1.5},
            marker={"symbol": "x" if stopped else "circle", "size": sizes},
            text=[curve.label] * len(curve.steps), meta={"trial_id": curve.trial_id, "status": curve.status},
            hovertemplate=f"%{{text}}<br>step %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>"))
        legend.add(group)
    fig.update_layout(title=data.curves_title(metric, drawn), xaxis_title="step", yaxis_title=metric,
                      **_LAYOUT)
    return fig


def pbt(result: Any, metric: str | None = None) -> Any:
    """A population-based-training search: per population member (one colour each), the ``metric`` of
    every trial that filled its slot; a clone's line starts with a dashed connector from its parent's
    point at ``cloned_step``, a replaced trial ends in an x, the best trial is thick and drawn last."""
    import plotly.graph_objects as go

    frame = result.curves
    metric = data.curve_metric(result, frame, metric, "pbt")
    segments = data.population(result, frame, metric)
    fig = go.Figure()
    legend: set[int] = set()
    hover = f"%{{text}}<br>step %{{x}}<br>{metric} %{{y:.4g}}<extra></extra>"
    for seg in sorted(segments, key=lambda s: (s.best, s.member, s.trial_id)):
        meta = {"trial_id": seg.trial_id, "member": seg.member, "status": seg.status, "parent": seg.parent,
                "cloned_step": seg.cloned_step, "replaced": seg.replaced, "best": seg.best}
        common = {"legendgroup": f"member {seg.member}", "name": f"member {seg.member}",
                  "legendrank": 1000 + seg.member}
        if seg.start is not None:
            fig.add_trace(go.Scatter(
                x=[seg.start[0], seg.steps[0]], y=[seg.start[1], seg.values[0]], mode="lines",
                line={"color": seg.color, "width": 1.5, "dash": "dash"}, showlegend=False,
                text=[seg.label] * 2, meta={**meta, "part": "clone"}, hovertemplate=hover, **common))
        sizes = [0] * (len(seg.steps) - 1) + [10 if seg.replaced else 6]
        fig.add_trace(go.Scatter(
            x=seg.steps, y=seg.values, mode="lines+markers", showlegend=seg.member not in legend,
            line={"color": seg.color, "width": 3.5 if seg.best else 1.5},
            marker={"symbol": "x" if seg.replaced else "circle", "size": sizes},
            text=[seg.label] * len(seg.steps), meta={**meta, "part": "line"}, hovertemplate=hover, **common))
        legend.add(seg.member)
    note = "dashed: a clone continues from its parent's checkpoint; ×: replaced by a clone; thick: the best"
    fig.update_layout(title=f"{data.population_title(result, metric)}<br><sup>{note}</sup>",
                      xaxis_title="step", yaxis_title=metric, margin={"t": 90}, **_LAYOUT)
    return fig


def history(result: Any, metric: str | None = None) -> Any:
    """The completed trials' ``metric`` with the best so far, by trial (left) and by wall time (right)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metric, mode = data.objective(result, "history", metric)
    h = data.history(result, metric, mode)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("by trial", "by wall time"))
    panels = ((1, h.trial_ids, h.values, h.best_by_trial), (2, h.end_times, h.values_by_time, h.best_by_time))
    for col, xs, values, best in panels:
        fig.add_trace(go.Scatter(x=xs, y=values, mode="markers", name=f"{metric} of a completed trial",
                                 marker={"color": data.COLORS["completed"], "size": 7}, legendgroup="value",
                                 showlegend=col == 1), row=1, col=col)
        fig.add_trace(go.Scatter(x=xs, y=best, mode="lines", line_shape="hv", name="best so far",
                                 line={"color": data.COLORS["best"], "width": 2.5}, legendgroup="best",
                                 showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="trial", row=1, col=1)
    fig.update_xaxes(title_text="seconds since the experiment started", row=1, col=2)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    title = f"{metric} ({mode}): best so far over {len(h.values)} completed trials"
    fig.update_layout(title=title, **_LAYOUT)
    return fig


def timeline(result: Any) -> Any:
    """Every ended attempt as a bar on its worker's row, from its start to its end, coloured by how it
    ended: idle gaps and stragglers show as such."""
    import plotly.graph_objects as go

    bars = data.timeline(result)
    workers = data.workers_in_order(bars)
    fig = go.Figure()
    for status in dict.fromkeys(bar.status for bar in bars):
        group = [bar for bar in bars if bar.status == status]
        fig.add_trace(go.Bar(
            orientation="h", y=[b.worker for b in group], x=[b.duration for b in group],
            base=[b.start for b in group], name=data.STATUS_LABELS.get(status, status).replace(" (×)", ""),
            marker={"color": data.COLORS.get(status, "#8c8c8c")}, meta={"status": status},
            customdata=[[b.trial_id, b.attempt] for b in group],
            hovertemplate="trial %{customdata[0]} (attempt %{customdata[1]})<br>%{y}<br>"
                          "from %{base:.2f}s, %{x:.2f}s<extra></extra>"))
    fig.update_yaxes(categoryorder="array", categoryarray=workers[::-1], title_text="worker")
    fig.update_layout(title=f"timeline: {len({b.trial_id for b in bars})} trials on {len(workers)} workers",
                      xaxis={"title": "seconds since the experiment started", "rangemode": "tozero"},
                      barmode="overlay",
                      height=max(300, 120 + 40 * len(workers)), **_LAYOUT)
    return fig


def ablation(result: Any) -> Any:
    """Each removed component's mean difference to the baseline with its 95% interval, coloured by
    what the interval shows (worse, better, no effect shown)."""
    import plotly.graph_objects as go

    effects = data.ablation_effects(result)
    names = [e.component for e in effects]
    fig = go.Figure()
    for effect, label in data.EFFECT_LABELS.items():
        group = [e for e in effects if e.effect == effect]
        if not group:
            continue
        fig.add_trace(go.Bar(
            orientation="h", y=[e.component for e in group], x=[e.diff for e in group], name=label,
            marker={"color": data.EFFECT_COLORS[effect]}, meta={"effect": effect},
            error_x={"type": "data", "symmetric": False, "color": "#404040",
                     "array": [0.0 if math.isnan(e.high) else e.high - e.diff for e in group],
                     "arrayminus": [0.0 if math.isnan(e.low) else e.diff - e.low for e in group]},
            hovertemplate="%{y}: %{x:+.4g} without it<extra></extra>"))
    fig.add_vline(x=0, line_color="black", line_width=1)
    metric = result.metrics[0]
    fig.update_yaxes(categoryorder="array", categoryarray=names[::-1], automargin=True)
    headline = html.escape(result.headline())  # a second, smaller line (a subtitle needs plotly >= 5.23)
    fig.update_layout(title=f"ablation: change in {metric} without each component<br><sup>{headline}</sup>",
                      xaxis_title=f"{metric} minus baseline (mean, 95% interval)", barmode="overlay",
                      height=max(320, 160 + 45 * len(names)), margin={"t": 100}, **_LAYOUT)
    return fig
