"""The explanation analyses: attribution of the logit change, the push, vector transfer and
direct logit attribution."""

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    format_value,
    label_order,
    require_columns,
)
from emolens.report.figures._style import (
    _AXIS_STEP,
    _MEASURED_COLOR,
    _add_view_menu,
    _diverging_heatmap,
    _facet_grid,
    _select_one,
    _setting_text,
    _step_ticks,
    _top_legend,
    display_name,
)

ATTRIBUTION_PARTS = (
    ("direct", "direct push α·(w·v)/r(h+αv)", "#1f77b4"),
    ("scale_change", "norm-scale change", "#ff7f0e"),
)
#: Parts of the change of the per-unit direct push w·v/r against the first step.
PUSH_PARTS = (
    ("push_vector", "vector moved", "#2ca02c"),
    ("push_readout", "readout row moved", "#9467bd"),
    ("push_scale", "residual scale moved", "#d62728"),
)


def _stacked_parts_figure(
    frame: pd.DataFrame,
    parts: Sequence[tuple[str, str, str]],
    total: tuple[str, str],
    title: str,
    yaxis: str,
    ja: Mapping[str, str] | None,
) -> go.Figure:
    """Per emotion (one panel each): the parts as stacked bars over steps and the total they
    add up to as a black line."""
    columns = [p[0] for p in parts] + [total[0]]
    means = frame.groupby(["emotion", "step"], sort=True)[columns].mean().reset_index()
    emotions = label_order(means["emotion"].dropna())
    if not emotions:
        raise ValueError("the table has no emotion rows")
    fig, cell = _facet_grid(emotions, ja)
    for k, emotion in enumerate(emotions):
        rows = means[means["emotion"] == emotion].sort_values("step")
        row, col = cell(k)
        for trace in _stacked_parts_traces(rows, emotion, parts, total, first_panel=k == 0, ja=ja):
            fig.add_trace(trace, row=row, col=col)
    fig.update_layout(
        barmode="relative",
        title={"text": title},
        legend=_top_legend(fig),
    )
    fig.update_xaxes(title_text=None, **_step_ticks(means["step"]))
    fig.update_yaxes(zeroline=True, zerolinecolor="#bbbbbb")
    fig.update_yaxes(title_text=yaxis, col=1)
    return fig


def _stacked_parts_traces(
    rows: pd.DataFrame,
    emotion: str,
    parts: Sequence[tuple[str, str, str]],
    total: tuple[str, str],
    *,
    first_panel: bool,
    ja: Mapping[str, str] | None,
) -> list[go.Bar | go.Scatter]:
    """One emotion's panel: a bar over steps per ``(column, name, colour)`` part, then the
    total ``(column, name)`` as a black line; the legend entries come from the first panel."""
    steps = rows["step"].tolist()
    traces: list[go.Bar | go.Scatter] = [
        go.Bar(
            x=steps,
            y=rows[column].tolist(),
            name=name,
            legendgroup=column,
            showlegend=first_panel,
            marker={"color": color},
            meta=emotion,
            hovertemplate=f"<b>{display_name(emotion, ja)}</b><br>step %{{x}}<br>"
            f"{name}: %{{y:.4g}}<extra></extra>",
        )
        for column, name, color in parts
    ]
    traces.append(
        go.Scatter(
            x=steps,
            y=rows[total[0]].tolist(),
            name=total[1],
            legendgroup=total[0],
            showlegend=first_panel,
            mode="lines+markers",
            line={"color": _MEASURED_COLOR, "width": 1.5},
            marker={"color": _MEASURED_COLOR, "size": 5},
            meta=emotion,
            hovertemplate=f"<b>{display_name(emotion, ja)}</b><br>step %{{x}}<br>"
            f"{total[1]}: %{{y:.4g}}<extra></extra>",
        )
    )
    return traces


def attribution_figure(
    attribution: pd.DataFrame,
    alpha: float | int | None = None,
    *,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Why final-layer steering moves each label's logit, per emotion over steps: the exact
    parts ``direct`` (the push of α·v along the label's readout row, at the steered norm
    scale) and ``scale_change`` (the same unsteered readout divided by a changed norm scale)
    as stacked bars, and the measured change (their sum) as a line. Default: the largest
    alpha (and layer) present; one panel per emotion, all on one scale."""
    require_columns(
        attribution,
        ("step", "emotion", "logit_change", *[p[0] for p in ATTRIBUTION_PARTS]),
        "the attribution table",
    )
    frame, alpha = _select_one(attribution, "alpha", alpha)
    frame, layer = _select_one(frame, "layer", None)
    setting = _setting_text(layer, alpha)
    return _stacked_parts_figure(
        frame,
        ATTRIBUTION_PARTS,
        ("logit_change", "measured logit change"),
        f"Logit attribution of steering: direct push + norm-scale change = measured change"
        f"{' (' + setting + ')' if setting else ''}",
        "logit change",
        ja,
    )


def push_change_figure(
    attribution: pd.DataFrame, *, ja: Mapping[str, str] | None = None
) -> go.Figure:
    """Why the per-unit direct push ``w·v/r`` of each emotion changed against the first step:
    the exact parts "vector moved" (``push_vector``), "readout row moved" (``push_readout``)
    and "residual scale moved" (``push_scale``) as stacked bars over steps, their sum
    ``push_change`` as a line; one panel per emotion. The push does not depend on alpha (the
    table repeats it for every alpha; the rows are averaged)."""
    require_columns(
        attribution,
        ("step", "emotion", "push_change", *[p[0] for p in PUSH_PARTS]),
        "the attribution table",
    )
    frame, layer = _select_one(attribution, "layer", None)
    where = f" (layer {format_value(layer)})" if layer is not None else ""
    return _stacked_parts_figure(
        frame,
        PUSH_PARTS,
        ("push_change", "change of the per-unit push"),
        f"Change of the direct push per unit α against the first step{where}: "
        "vector + readout + scale",
        "change of w·v / r",
        ja,
    )


def _heatmap_views(
    views: list[tuple[str, pd.DataFrame]],
    index: str,
    columns: str,
    value: str,
    *,
    row_order: list | None = None,
    hover: Callable,
    colorbar: str,
    diverging: bool = True,
    zrange: tuple[float, float] | None = None,
    active: int = 0,
) -> go.Figure:
    """One heatmap per view (mean of ``value`` per ``index`` x ``columns``), one shown at a
    time with a menu to switch."""
    fig = go.Figure()
    menu = []
    cols = sorted(pd.concat([f[columns] for _, f in views]).dropna().unique())
    for name, frame in views:
        table = frame.pivot_table(index=index, columns=columns, values=value, aggfunc="mean")
        rows = row_order if row_order is not None else sorted(table.index)
        table = table.reindex(index=rows, columns=cols)
        z = table.to_numpy(dtype=float)
        text = [
            [hover(name, r, c, z[i, j]) for j, c in enumerate(cols)] for i, r in enumerate(rows)
        ]
        x = [format_value(c) for c in cols]
        y = [format_value(r) for r in rows]
        z_list = [[None if not np.isfinite(v) else float(v) for v in row] for row in z]
        if diverging:
            trace = _diverging_heatmap(z_list, x, y, text, colorbar)
        else:
            lo, hi = zrange if zrange is not None else (None, None)
            trace = go.Heatmap(
                z=z_list,
                x=x,
                y=y,
                text=text,
                zmin=lo,
                zmax=hi,
                colorscale="Viridis",
                colorbar={"title": {"text": colorbar}},
                hovertemplate="%{text}<extra></extra>",
            )
        trace.name = name
        fig.add_trace(trace)
        menu.append((name, [len(fig.data) - 1]))
    _add_view_menu(fig, menu, active)
    return fig


def transfer_heatmap(
    transfer: pd.DataFrame,
    emotion: str | None = None,
    *,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Model step (rows) x vector step (columns): the final-layer logit change of steering the
    model of one step with the concept vectors of another. The diagonal is the model's own
    vectors; along a row the model is fixed and only the direction changes ("did the concept
    direction move?"), along a column the direction is fixed and only the model changes ("does
    the model still read it?"). Default view: the mean over emotions; a menu shows each
    emotion (``emotion`` chooses the one shown first)."""
    require_columns(
        transfer, ("step", "vector_step", "emotion", "logit_change"), "the transfer table"
    )
    frame, alpha = _select_one(transfer, "alpha", None)
    frame, layer = _select_one(frame, "layer", None)
    emotions = label_order(frame["emotion"].dropna())
    views = [("mean over emotions", frame)] + [(e, frame[frame["emotion"] == e]) for e in emotions]
    if emotion is not None and emotion not in emotions:
        raise ValueError(f"no transfer rows for {emotion!r}; emotions: {', '.join(emotions)}")
    active = 0 if emotion is None else 1 + emotions.index(emotion)

    def hover(name, model_step, vector_step, z):
        who = "mean over emotions" if name == "mean over emotions" else display_name(name, ja)
        return (
            f"{who}<br>model of step {format_value(model_step)}, vectors of step "
            f"{format_value(vector_step)}<br>logit change {z:.4g}"
        )

    fig = _heatmap_views(
        views,
        "step",
        "vector_step",
        "logit_change",
        hover=hover,
        colorbar="logit change",
        active=active,
    )
    setting = _setting_text(layer, alpha)
    fig.update_layout(
        title={
            "text": "Vector transfer: steer the model of one step with the vectors of "
            f"another{' (' + setting + ')' if setting else ''}"
        },
        xaxis={"title": {"text": "step of the concept vectors"}, "type": "category"},
        yaxis={"title": {"text": "step of the model"}, "type": "category", "autorange": "reversed"},
        margin={"t": 90},
    )
    return fig


_KIND_ORDER = {"embed": 0, "attn": 1, "mlp": 2}


def _component_key(component: str, layer) -> tuple:
    kind, _, rest = str(component).partition(" ")
    if layer is None or not np.isfinite(layer):
        layer = int(rest) if rest.lstrip("-").isdigit() else -1
    return (int(layer), _KIND_ORDER.get(kind, 3), str(component))


def dla_figure(
    dla: pd.DataFrame,
    label: str | None = None,
    value: str = "logit",
    *,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Component (embedding, then attention and MLP of each layer, in depth order) x step:
    the mean direct contribution to the gold label's logit at the answer position (``value``
    ``"logit"``) or to its margin over the mean of the other labels (``"margin"``). Default
    view: the mean over gold labels (each label weighs the same); a menu shows each label."""
    if value not in ("logit", "margin"):
        raise ValueError(f"value must be 'logit' or 'margin', got {value!r}")
    require_columns(dla, ("step", "label", "component", value), "the DLA table")
    layer_of: dict[str, float | None] = {}
    for comp, lay in zip(
        dla["component"], dla["layer"] if "layer" in dla else [None] * len(dla), strict=True
    ):
        layer_of.setdefault(comp, None if lay is None or pd.isna(lay) else float(lay))
    components = sorted(layer_of, key=lambda c: _component_key(c, layer_of[c]))
    labels = label_order(dla["label"].dropna())
    per_label = dla.groupby(["label", "component", "step"], sort=True)[value].mean().reset_index()
    mean = per_label.groupby(["component", "step"], sort=True)[value].mean().reset_index()
    views = [("mean over labels", mean)] + [
        (lab, per_label[per_label["label"] == lab]) for lab in labels
    ]
    if label is not None and label not in labels:
        raise ValueError(f"no DLA rows for gold label {label!r}; labels: {', '.join(labels)}")
    active = 0 if label is None else 1 + labels.index(label)
    what = "gold label logit" if value == "logit" else "gold-vs-rest margin"

    def hover(name, comp, step, z):
        who = "mean over labels" if name == "mean over labels" else display_name(name, ja)
        return f"{who}<br>{comp}, step {format_value(step)}<br>{what} {z:.4g}"

    fig = _heatmap_views(
        views,
        "component",
        "step",
        value,
        row_order=components,
        hover=hover,
        colorbar=value,
        active=active,
    )
    fig.update_layout(
        title={"text": f"Direct logit attribution of the unsteered answer: {what}"},
        xaxis={"title": {"text": _AXIS_STEP}, "type": "category"},
        yaxis={"title": {"text": "component"}, "type": "category", "autorange": "reversed"},
        height=max(420, 160 + 16 * len(components)),
        margin={"t": 90},
    )
    return fig
