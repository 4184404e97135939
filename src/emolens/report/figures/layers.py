"""Layer sweeps: measures over layer and step, the layer summary and localisation."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    format_value,
    label_order,
    require_columns,
)
from emolens.report.figures._style import _AXIS_STEP, _diverging_heatmap, _select_one
from emolens.report.figures.explanation import _heatmap_views


def layer_step_views(
    views: list[tuple[str, pd.DataFrame]],
    value: str,
    title: str,
    *,
    diverging: bool = False,
    zrange: tuple[float, float] | None = None,
    active: int = 0,
) -> go.Figure:
    """Layer (rows, deepest on top) x step heatmaps of ``value`` (mean per cell), one per
    named view with a menu to switch: for layer sweeps of any per-layer measure."""

    def hover(name, layer, step, z):
        return (
            f"{name}<br>layer {format_value(layer)}, step {format_value(step)}<br>{value} {z:.4g}"
        )

    # categories run bottom to top: the shallowest layer at the bottom, the deepest on top
    layers = sorted(pd.concat([f["layer"] for _, f in views]).dropna().unique())
    fig = _heatmap_views(
        views,
        "layer",
        "step",
        value,
        row_order=layers,
        hover=hover,
        colorbar=value,
        diverging=diverging,
        zrange=zrange,
        active=active,
    )
    fig.update_layout(
        title={"text": title},
        xaxis={"title": {"text": _AXIS_STEP}, "type": "category"},
        yaxis={"title": {"text": "layer"}, "type": "category"},
        margin={"t": 90},
    )
    return fig


def probes_layer_heatmap(probes: pd.DataFrame, label: str | None = None) -> go.Figure:
    """Layer x step of the own probe's held-out accuracy (default view) and, in a menu, of
    each label's recall: where in depth each emotion is decodable, and when."""
    require_columns(probes, ("step", "layer", "measure", "value"), "the probes table")
    own = probes
    if "train_step" in probes:
        own = probes[probes["train_step"] == probes["step"]]
    acc = own[own["measure"] == "accuracy"]
    recall = own[own["measure"] == "recall"]
    labels = label_order(recall["label"].dropna()) if "label" in recall else []
    views = [("accuracy", acc)] + [
        (f"recall: {lab}", recall[recall["label"] == lab]) for lab in labels
    ]
    views = [(n, f) for n, f in views if not f.empty]
    if not views:
        raise ValueError("the probes table has no held-out accuracy or recall rows")
    names = [n for n, _ in views]
    active = 0 if label is None else names.index(f"recall: {label}")
    return layer_step_views(
        views,
        "value",
        "Linear probes by layer and step (own probe, held out)",
        zrange=(0.0, 1.0),
        active=active,
    )


def geometry_layer_heatmap(
    geometry: pd.DataFrame, measure: str, inner: str = "plain", emotion: str | None = None
) -> go.Figure:
    """Layer x step of one geometry measure, a menu entry per emotion (``emotion``: the one
    shown first; default the first in the study's order)."""
    require_columns(
        geometry, ("step", "layer", "measure", "emotion", "value"), "the geometry table"
    )
    frame = geometry[geometry["measure"] == measure]
    if frame.empty:
        raise ValueError(f"the geometry table has no measure {measure!r}")
    frame, inner = _select_one(frame, "inner", inner, largest=False)
    emotions = label_order(frame["emotion"].dropna())
    views = [(e, frame[frame["emotion"] == e]) for e in emotions]
    active = 0 if emotion is None else emotions.index(emotion)
    return layer_step_views(
        views,
        "value",
        f"Geometry by layer and step: {measure} ({inner} inner product)",
        active=active,
    )


def layer_summary_figure(
    summary: pd.DataFrame, *, ja: Mapping[str, str] | None = None
) -> go.Figure:
    """Emotion (rows) x step: the most steerable layer (left) and the most decodable layer
    (right, highest per-label probe recall), the layer number written in each cell; the hover
    gives the effect or recall there. From :func:`emolens.analysis.sweeps.layer_summary`."""
    from plotly.subplots import make_subplots

    require_columns(summary, ("step", "emotion"), "the layer summary")
    panels = [
        (c, v, t)
        for c, v, t in (
            ("most_steerable_layer", "max_effect", "most steerable layer"),
            ("most_decodable_layer", "recall", "most decodable layer (probe recall)"),
        )
        if c in summary and summary[c].notna().any()
    ]
    if not panels:
        raise ValueError("the layer summary has neither a steerable nor a decodable layer")
    emotions = label_order(summary["emotion"].dropna())
    steps = sorted(summary["step"].dropna().unique())
    layer_values = pd.concat([summary[c] for c, _, _ in panels]).dropna()
    lo, hi = float(layer_values.min()), float(layer_values.max())
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=[t for _, _, t in panels],
        shared_yaxes=True,
        horizontal_spacing=0.06,
    )
    for k, (column, value, title) in enumerate(panels):
        fig.add_trace(
            _layer_panel(
                summary, column, value, title, emotions, steps, (lo, hi), show_scale=k == 0
            ),
            row=1,
            col=k + 1,
        )
        fig.update_xaxes(title_text=_AXIS_STEP, type="category", row=1, col=k + 1)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(
        title={"text": "Where each emotion is most steerable and most decodable"},
        height=max(380, 140 + 26 * len(emotions)),
        margin={"t": 90},
    )
    return fig


def _layer_panel(
    summary: pd.DataFrame,
    column: str,
    value: str,
    title: str,
    emotions: list[str],
    steps: list[Any],
    zrange: tuple[float, float],
    *,
    show_scale: bool,
) -> go.Heatmap:
    """Emotion x step heatmap of the layer in ``column``, its number written in each cell,
    and ``value`` (the effect or recall there) in the hover; colours span ``zrange``."""
    z = summary.pivot_table(index="emotion", columns="step", values=column, aggfunc="first")
    z = z.reindex(index=emotions, columns=steps)
    v = summary.pivot_table(index="emotion", columns="step", values=value, aggfunc="first")
    v = v.reindex(index=emotions, columns=steps) if value in summary else z * np.nan
    zz = z.to_numpy(dtype=float)
    vv = v.to_numpy(dtype=float)
    return go.Heatmap(
        z=[[None if not np.isfinite(a) else a for a in row] for row in zz],
        x=[format_value(s) for s in steps],
        y=emotions,
        text=[["" if not np.isfinite(a) else str(int(a)) for a in row] for row in zz],
        texttemplate="%{text}",
        customdata=vv,
        zmin=zrange[0],
        zmax=zrange[1],
        colorscale="Viridis",
        showscale=show_scale,
        colorbar={"title": {"text": "layer"}, "dtick": 1},
        name=title,
        hovertemplate="%{y}<br>step %{x}<br>layer %{text}<br>"
        + value.replace("_", " ")
        + " %{customdata:.4g}<extra></extra>",
    )


def localisation_heatmap(localisation: pd.DataFrame, value: str = "gold_logit_drop") -> go.Figure:
    """Window (first and last layer) x step heatmap of what removing the concept direction over
    that window costs (``localisation.csv`` of :func:`emolens.run.localise.localise`)."""
    require_columns(localisation, ["step", "start_layer", "end_layer", value], "localisation")
    table = localisation.pivot_table(
        index=["start_layer", "end_layer"], columns="step", values=value, aggfunc="mean"
    ).sort_index()
    y = [f"layers {a}-{b}" for a, b in table.index]
    x = [str(s) for s in table.columns]
    hover = [
        [f"{row}, step {col}: {format_value(v)}" for col, v in zip(x, values)]
        for row, values in zip(y, table.to_numpy())
    ]
    fig = go.Figure(_diverging_heatmap(table.to_numpy(), x, y, hover, value))
    fig.update_layout(
        title=f"Localisation by intervention: {value} per layer window",
        xaxis_title="training step",
        yaxis_title="window",
    )
    return fig
