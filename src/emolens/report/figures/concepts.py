"""The concept space: geometry, probes and the random-direction baseline over steps."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    format_value,
    label_order,
    pick_rows,
    require_columns,
)
from emolens.report.figures._style import (
    _AXIS_STEP,
    _CHANCE_COLOR,
    _RANDOM_COLOR,
    _add_view_menu,
    _band,
    _facet_grid,
    _layer_colors,
    _select_one,
    _series_color,
    _setting_text,
    _step_ticks,
    _top_legend,
    display_name,
    emotion_color,
)


def geometry_figure(
    geometry: pd.DataFrame,
    measure: str,
    inner: str = "plain",
    layer: int | None = None,
    *,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """One geometry measure over steps, a line per emotion (or one line ``all`` for measures
    of the whole set, such as ``orthogonality``) with its bootstrap interval as a band, in the
    ``inner`` product (``plain`` or ``causal``), at ``layer`` (default the largest)."""
    require_columns(
        geometry, ("step", "layer", "measure", "emotion", "value"), "the geometry table"
    )
    frame = geometry[geometry["measure"] == measure]
    if frame.empty:
        present = ", ".join(sorted(map(str, geometry["measure"].dropna().unique())))
        raise ValueError(f"the geometry table has no measure {measure!r}; it has {present}")
    frame, inner = _select_one(frame, "inner", inner, largest=False)
    frame, layer = pick_rows(frame, "layer", layer, largest=True)
    has_ci = {"ci_low", "ci_high"} <= set(frame.columns)
    fig = go.Figure()
    for emotion in label_order(frame["emotion"].dropna()):
        rows = frame[frame["emotion"] == emotion].sort_values("step")
        for trace in _geometry_traces(rows, emotion, measure, has_ci, ja):
            fig.add_trace(trace)
    where = f"layer {format_value(layer)}" + (f", {inner} inner product" if inner else "")
    fig.update_layout(
        title={"text": f"Geometry: {measure} ({where}); bands: bootstrap intervals"},
        xaxis={"title": {"text": _AXIS_STEP}, **_step_ticks(frame["step"])},
        yaxis={"title": {"text": measure}},
        legend={"title": {"text": "emotion"}},
        margin={"t": 70},
    )
    return fig


def _rows_band(
    rows: pd.DataFrame, color: str, *, name: str, group: str, meta: Any, prefix: str = ""
) -> go.Scatter | None:
    """The interval band of a line over steps from ``rows``' ``{prefix}ci_low`` and
    ``{prefix}ci_high`` (None where the table has no such columns or no finite point)."""
    low, high = f"{prefix}ci_low", f"{prefix}ci_high"
    if not {low, high} <= set(rows.columns):
        return None
    return _band(
        rows["step"].tolist(),
        rows[low].to_numpy(float),
        rows[high].to_numpy(float),
        color,
        name=name,
        group=group,
        meta=meta,
    )


def _geometry_traces(
    rows: pd.DataFrame,
    emotion: str,
    measure: str,
    has_ci: bool,
    ja: Mapping[str, str] | None,
) -> list[go.Scatter]:
    """One emotion's geometry line over steps (``rows``: ``step, value`` and, where
    ``has_ci``, ``ci_low, ci_high``), after its interval band where it has one."""
    color = _series_color(emotion)
    steps = rows["step"].tolist()
    traces = []
    band = _rows_band(rows, color, name=f"{emotion} interval", group=emotion, meta=emotion)
    if has_ci and band is not None:
        traces.append(band)
    ci = (
        np.column_stack([rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)])
        if has_ci
        else np.full((len(rows), 2), np.nan)
    )
    traces.append(
        go.Scatter(
            x=steps,
            y=rows["value"].tolist(),
            mode="lines+markers",
            name=emotion,
            legendgroup=emotion,
            line={"color": color},
            marker={"color": color, "size": 6},
            meta=emotion,
            customdata=ci,
            hovertemplate=f"<b>{display_name(emotion, ja)}</b><br>step %{{x}}<br>"
            f"{measure} %{{y:.4g}} [%{{customdata[0]:.3g}}, %{{customdata[1]:.3g}}]"
            "<extra></extra>",
        )
    )
    return traces


def probe_rows(probes: pd.DataFrame, measure: str, own: bool | None = True) -> pd.DataFrame:
    """Held-out rows of one probes.csv measure for label ``all``, by step; ``own``: the step's
    own probe (True), the first step's probe (False, which at the first step is its own), or
    every row (None)."""
    rows = probes[probes["measure"] == measure]
    if "label" in rows.columns:
        rows = rows[rows["label"].astype(str) == "all"]
    if own is not None and "train_step" in rows.columns:
        first = probes["step"].min()
        rows = (
            rows[rows["train_step"] == rows["step"]] if own else rows[rows["train_step"] == first]
        )
    return rows.sort_values("step")


def probes_figure(probes: pd.DataFrame, layer: int | None = None) -> go.Figure:
    """Held-out accuracy of the linear probes over steps, with bootstrap intervals.

    Views (a menu): "all layers", each layer's own-probe accuracy as one line, shallow to deep,
    with chance (dashed grey); and one view per layer with the layer's own probe, the first
    step's probe evaluated on this step's residuals (dash-dot: does the old read-out still
    work?), the shuffled-label baseline (dotted) and chance, each with its interval. ``layer``
    chooses the view shown first (default "all layers"; a single layer has only its view)."""
    require_columns(probes, ("step", "layer", "measure", "value"), "the probes table")
    own_all = probe_rows(probes, "accuracy", own=True)
    if own_all.empty:
        raise ValueError("the probes table has no held-out accuracy rows")
    layers = sorted(int(v) for v in own_all["layer"].dropna().unique())
    if layer is not None and int(layer) not in layers:
        raise ValueError(f"no probe at layer {layer}; layers: {', '.join(map(str, layers))}")
    first = int(probes["step"].min())
    has_ci = {"ci_low", "ci_high"} <= set(probes.columns)
    chance = probes[probes["measure"] == "chance"].groupby("step", sort=True)["value"].mean()
    fig = go.Figure()
    views = []
    if len(layers) > 1:
        views.append(_probe_all_layers_view(fig, own_all, layers, chance))
    for lay in layers:
        views.append(_probe_layer_view(fig, probes, lay, first, has_ci, chance))
    active = 0 if layer is None else [v[0] for v in views].index(f"layer {int(layer)}")
    _add_view_menu(fig, views, active)
    fig.update_layout(
        title={"text": "Linear probes: held-out accuracy (bands: bootstrap intervals)"},
        xaxis={"title": {"text": _AXIS_STEP}, **_step_ticks(probes["step"])},
        yaxis={"title": {"text": "held-out accuracy"}, "range": [0, 1.02]},
        margin={"t": 90},
    )
    return fig


def _probe_all_layers_view(
    fig: go.Figure, own_all: pd.DataFrame, layers: list[int], chance: pd.Series
) -> tuple[str, list[int]]:
    """The "all layers" view: each layer's own-probe accuracy as one line (no bands), shallow
    to deep, and chance; returns the view's name and trace indices."""
    idx = []
    for lay, color in zip(layers, _layer_colors(len(layers)), strict=True):
        rows = own_all[own_all["layer"] == lay]
        idx += _add_probe_line(
            fig,
            rows,
            f"layer {lay}",
            color,
            "solid",
            has_ci=False,
            group=f"layer {lay}",
            meta={"view": "all", "layer": lay, "kind": "own"},
        )
    idx += _add_chance_line(fig, chance, {"view": "all", "kind": "chance"})
    return "all layers", idx


def _probe_layer_view(
    fig: go.Figure,
    probes: pd.DataFrame,
    lay: int,
    first: int,
    has_ci: bool,
    chance: pd.Series,
) -> tuple[str, list[int]]:
    """One layer's view: its own probe, the first step's probe, the shuffled-label baseline
    (each with its interval where ``has_ci``) and chance; returns its name and trace indices."""
    styles = (
        ("accuracy", True, "own probe", "#1f77b4", "solid"),
        ("accuracy", False, f"step-{first} probe", "#ff7f0e", "dashdot"),
        ("shuffled_accuracy", None, "shuffled labels", "#7f7f7f", "dot"),
    )
    idx = []
    for measure, own, name, color, dash in styles:
        rows = probe_rows(probes, measure, own)
        rows = rows[rows["layer"] == lay]
        if rows.empty:
            continue
        idx += _add_probe_line(
            fig,
            rows,
            name,
            color,
            dash,
            has_ci=has_ci,
            group=name,
            meta={"view": lay, "layer": lay, "kind": name},
        )
    idx += _add_chance_line(fig, chance, {"view": lay, "kind": "chance"})
    return f"layer {lay}", idx


def _add_probe_line(
    fig: go.Figure,
    rows: pd.DataFrame,
    name: str,
    color: str,
    dash: str,
    *,
    has_ci: bool,
    group: str,
    meta: dict[str, Any],
) -> list[int]:
    """Add one accuracy line over steps (``rows``: ``step, value`` and, where ``has_ci``,
    ``ci_low, ci_high``), after its interval band; returns the indices of the added traces."""
    idx = []
    steps = rows["step"].tolist()
    band = _rows_band(rows, color, name=f"{name} interval", group=group, meta=meta)
    if has_ci and band is not None:
        fig.add_trace(band)
        idx.append(len(fig.data) - 1)
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=rows["value"].tolist(),
            mode="lines+markers",
            name=name,
            legendgroup=group,
            line={"color": color, "dash": dash, "width": 2.0},
            marker={"color": color, "size": 5},
            meta=meta,
            hovertemplate=f"{name}<br>step %{{x}}<br>accuracy %{{y:.3f}}<extra></extra>",
        )
    )
    idx.append(len(fig.data) - 1)
    return idx


def _add_chance_line(fig: go.Figure, chance: pd.Series, meta: dict[str, Any]) -> list[int]:
    """Add the chance accuracy (majority label) per step as a dashed grey line, if known;
    returns the indices of the added traces."""
    if chance.empty:
        return []
    fig.add_trace(
        go.Scatter(
            x=chance.index.tolist(),
            y=chance.tolist(),
            mode="lines",
            name="chance",
            line={"color": _CHANCE_COLOR, "dash": "dash", "width": 1.5},
            meta=meta,
            hovertemplate="chance (majority label) %{y:.3f}<extra></extra>",
        )
    )
    return [len(fig.data) - 1]


def random_baseline_figure(
    rb: pd.DataFrame,
    alpha: float | int | None = None,
    *,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Final-layer steering with each concept vector against random directions of the same
    norm, per emotion over steps (one panel each): the concept's own-label logit change with
    its bootstrap interval over prompts, the random directions' mean ± one standard deviation
    (grey) and, where the table has them, the shuffled-label vectors' mean (dotted). Default:
    the largest alpha (and layer)."""
    require_columns(
        rb,
        ("step", "emotion", "logit_change_concept", "logit_change_random_mean"),
        "the random baseline table",
    )
    frame, alpha = _select_one(rb, "alpha", alpha)
    frame, layer = _select_one(frame, "layer", None)
    emotions = label_order(frame["emotion"].dropna())
    if not emotions:
        raise ValueError("the random baseline table has no emotion rows")
    fig, cell = _facet_grid(emotions, ja, row_height=210)
    for k, emotion in enumerate(emotions):
        rows = frame[frame["emotion"] == emotion].sort_values("step")
        row, col = cell(k)
        for trace in _random_baseline_traces(rows, emotion, first_panel=k == 0, ja=ja):
            if trace is not None:
                fig.add_trace(trace, row=row, col=col)
    setting = _setting_text(layer, alpha)
    fig.update_layout(
        title={
            "text": "Concept vectors against random directions of the same norm"
            f"{' (' + setting + ')' if setting else ''}"
        },
        legend=_top_legend(fig),
    )
    fig.update_yaxes(title_text="own-label logit change", col=1)
    fig.update_xaxes(**_step_ticks(frame["step"]))
    return fig


def _random_baseline_traces(
    rows: pd.DataFrame, emotion: str, *, first_panel: bool, ja: Mapping[str, str] | None
) -> list[go.Scatter | None]:
    """One emotion's panel of the random baseline over steps: the random directions' mean ±
    one standard deviation, the shuffled-label vectors' mean, then the concept vector's logit
    change after its interval (a band is None where it has no finite point); the legend
    entries come from the first panel."""
    steps = rows["step"].tolist()
    mean = rows["logit_change_random_mean"].to_numpy(float)
    sd = (
        rows["logit_change_random_sd"].to_numpy(float)
        if "logit_change_random_sd" in rows
        else np.full(len(rows), np.nan)
    )
    traces = [
        _band(
            steps,
            mean - sd,
            mean + sd,
            _RANDOM_COLOR,
            name="random ± sd",
            group="random",
            meta=emotion,
        ),
        _null_line(steps, mean, "random directions (mean ± sd)", "random", "dash",
                   first_panel=first_panel, meta=emotion),
    ]  # fmt: skip
    if "logit_change_shuffled_mean" in rows:
        shuffled = rows["logit_change_shuffled_mean"].to_numpy(float)
        traces.append(
            _null_line(steps, shuffled, "shuffled-label vectors (mean)", "shuffled", "dot",
                       first_panel=first_panel, meta=emotion)
        )  # fmt: skip
    return traces + _concept_traces(rows, emotion, first_panel=first_panel, ja=ja)


def _null_line(
    steps: list,
    values: np.ndarray,
    name: str,
    group: str,
    dash: str,
    *,
    first_panel: bool,
    meta: str,
) -> go.Scatter:
    """A null's mean over steps (grey, ``dash``ed); its hover names the null, ``name`` up to
    its parenthesis."""
    what = name.split(" (")[0]
    return go.Scatter(
        x=steps,
        y=values.tolist(),
        mode="lines",
        name=name,
        legendgroup=group,
        showlegend=first_panel,
        meta=meta,
        line={"color": _RANDOM_COLOR, "dash": dash},
        hovertemplate=f"{what}<br>step %{{x}}<br>mean %{{y:.4g}}<extra></extra>",
    )  # fmt: skip


def _concept_traces(
    rows: pd.DataFrame, emotion: str, *, first_panel: bool, ja: Mapping[str, str] | None
) -> list[go.Scatter | None]:
    """The concept vector's own-label logit change over steps, after its bootstrap interval
    where the table has one (None where that band has no finite point)."""
    steps = rows["step"].tolist()
    color = emotion_color(emotion)
    traces: list[go.Scatter | None] = []
    if {"concept_ci_low", "concept_ci_high"} <= set(rows.columns):
        traces.append(
            _rows_band(
                rows, color, name="concept interval", group="concept", meta=emotion,
                prefix="concept_",
            )
        )  # fmt: skip
    traces.append(
        go.Scatter(
            x=steps,
            y=rows["logit_change_concept"].tolist(),
            mode="lines+markers",
            name="concept vector",
            legendgroup="concept",
            showlegend=first_panel,
            meta=emotion,
            line={"color": color},
            marker={"color": color, "size": 5},
            hovertemplate=f"<b>{display_name(emotion, ja)}</b> concept vector<br>step %{{x}}"
            "<br>logit change %{y:.4g}<extra></extra>",
        )
    )
    return traces
