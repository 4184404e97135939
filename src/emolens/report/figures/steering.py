"""Figure 2 and the steering sensitivity heatmaps (``sensitivity.csv``)."""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    label_order,
    mean_se_over_prompts,
    pick_rows,
    require_columns,
)
from emolens.analysis.sensitivity import (
    Selection,
    diagonal_summary,
    select_sensitivity,
)
from emolens.report.figures._style import (
    _AXIS_STEP,
    _EVAL_LOSS_COLOR,
    _band,
    _diverging_heatmap,
    _steps_eval_loss,
    display_name,
    emotion_color,
)


def figure2(
    sensitivity: pd.DataFrame,
    layer: int | None = None,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    steps_table: pd.DataFrame | None = None,
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
    ja: Mapping[str, str] | None = None,
    bands: pd.DataFrame | None = None,
) -> go.Figure:
    """The paper's Figure 2: the mean (over prompts) change of the steered emotion's own label
    measure against training step, one line per emotion, with error bars of one standard error
    over prompts. Defaults: the final (largest) layer present and the largest alpha. When
    ``steps_table`` (``step``, ``eval_loss``) has eval losses they are drawn on a second y axis
    (dashed, grey). ``bands``: ``figure2_bands.csv``
    (:func:`emolens.analysis.figure2.figure2_frame`: ``step, layer, emotion, alpha, ci_low,
    ci_high``), drawn as a shaded interval per emotion where its layer and alpha match the
    plotted ones (the two-level bootstrap: the samples that build v, then the prompts)."""
    summary, sel = diagonal_summary(
        sensitivity, layer, alpha, measure, alpha_unit=alpha_unit, positions=positions
    )
    band_rows = _figure2_band_rows(bands, sel, measure)
    fig = go.Figure()
    for emotion in label_order(summary["emotion"]):
        rows = summary[summary["emotion"] == emotion].sort_values("step")
        color = emotion_color(emotion)
        if band_rows is not None:
            band = _emotion_band(band_rows, emotion, color)
            if band is not None:
                fig.add_trace(band)
        fig.add_trace(_emotion_line(rows, emotion, color, measure, ja))
    fig.add_hline(y=0, line={"color": "#bbbbbb", "width": 1})
    layout = _add_eval_loss_axis(fig, steps_table)
    fig.update_layout(
        title={"text": f"Steering sensitivity (Figure 2): {sel.describe()}"},
        xaxis={"title": {"text": _AXIS_STEP}},
        yaxis={"title": {"text": f"{measure} of the steered label (mean over prompts)"}},
        legend={"title": {"text": "steered emotion"}},
        hovermode="closest",
        margin={"t": 70},
        **layout,
    )
    return fig


def _figure2_band_rows(
    bands: pd.DataFrame | None, sel: Selection, measure: str
) -> pd.DataFrame | None:
    """The rows of ``figure2_bands.csv`` at the plotted alpha and layer; None where there are
    no bands or they do not apply (bands are of the absolute logit change only)."""
    if bands is None or measure != "logit_change" or (sel.alpha_unit or "absolute") != "absolute":
        return None
    require_columns(bands, ("step", "layer", "emotion", "alpha", "ci_low", "ci_high"),
                    "the Figure 2 bands table")  # fmt: skip
    band_rows = bands[(bands["alpha"] == sel.alpha)]
    if sel.layer is not None:
        band_rows = band_rows[band_rows["layer"] == sel.layer]
    return band_rows


def _emotion_band(band_rows: pd.DataFrame, emotion: str, color: str) -> go.Scatter | None:
    """The shaded bootstrap interval of one emotion over steps, or None where it has none."""
    b = band_rows[band_rows["emotion"] == emotion].sort_values("step")
    return _band(
        b["step"].tolist(),
        b["ci_low"].to_numpy(dtype=float),
        b["ci_high"].to_numpy(dtype=float),
        color,
        name=f"{emotion} 95% band",
        group=emotion,
        meta=emotion,
    )


def _emotion_line(
    rows: pd.DataFrame,
    emotion: str,
    color: str,
    measure: str,
    ja: Mapping[str, str] | None,
) -> go.Scatter:
    """One emotion's mean over prompts against step (``rows``: ``step, mean, se, n``), with
    error bars of one standard error."""
    return go.Scatter(
        x=rows["step"].tolist(),
        y=rows["mean"].tolist(),
        mode="lines+markers",
        name=emotion,
        legendgroup=emotion,
        line={"color": color},
        marker={"color": color, "size": 7},
        error_y={
            "type": "data",
            "array": rows["se"].fillna(0).tolist(),
            "visible": True,
            "thickness": 1.2,
            "width": 3,
        },
        customdata=np.column_stack([rows["se"].to_numpy(), rows["n"].to_numpy()]),
        hovertemplate=(
            f"<b>{display_name(emotion, ja)}</b><br>step %{{x}}<br>"
            f"{measure} %{{y:.4g}} ± %{{customdata[0]:.3g}} (SE)<br>"
            "%{customdata[1]} prompts<extra></extra>"
        ),
    )


def _add_eval_loss_axis(fig: go.Figure, steps_table: pd.DataFrame | None) -> dict[str, Any]:
    """Draw the eval losses of ``steps_table`` (if it has any) as a dashed grey line on a
    second y axis; returns the layout entries of that axis (empty without eval losses)."""
    ev = _steps_eval_loss(steps_table)
    if ev is None:
        return {}
    fig.add_trace(
        go.Scatter(
            x=ev["step"].tolist(),
            y=ev["eval_loss"].tolist(),
            mode="lines+markers",
            name="eval loss",
            yaxis="y2",
            line={"color": _EVAL_LOSS_COLOR, "dash": "dash", "width": 1.5},
            marker={"color": _EVAL_LOSS_COLOR, "size": 5, "symbol": "diamond"},
            hovertemplate="step %{x}<br>eval loss %{y:.4g}<extra></extra>",
        )
    )
    return {
        "yaxis2": {
            "title": {"text": "eval loss"},
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
        }
    }


def selectivity_heatmap(
    sensitivity: pd.DataFrame,
    step: int | None = None,
    layer: int | None = None,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Steered emotion (rows) x observed label (columns): the mean change over prompts at one
    step (default the last), layer (default the final) and alpha (default the largest). A
    selective vector lights up its own diagonal cell only."""
    frame, sel = select_sensitivity(
        sensitivity,
        layer,
        alpha,
        measure,
        alpha_unit=alpha_unit,
        positions=positions,
        diagonal=False,
    )
    frame, step = pick_rows(frame, "step", None if step is None else int(step), largest=True)
    means = mean_se_over_prompts(frame, ["steered_emotion", "observed_label"], measure)
    rows = label_order(means["steered_emotion"])
    cols = label_order(means["observed_label"])
    table = means.pivot(index="steered_emotion", columns="observed_label", values="mean")
    table = table.reindex(index=rows, columns=cols)
    z = table.to_numpy(dtype=float)
    hover = [
        [
            f"steered: {display_name(r, ja)}<br>observed: {display_name(c, ja)}<br>"
            f"{measure} {z[i, j]:.4g}"
            for j, c in enumerate(cols)
        ]
        for i, r in enumerate(rows)
    ]
    fig = go.Figure(_diverging_heatmap(z.tolist(), cols, rows, hover, measure))
    fig.update_layout(
        title={"text": f"Selectivity at step {int(step)}: {sel.describe()}"},
        xaxis={"title": {"text": "observed label"}, "type": "category", "tickangle": -45},
        yaxis={"title": {"text": "steered emotion"}, "type": "category", "autorange": "reversed"},
        margin={"t": 70},
    )
    return fig


def layer_step_heatmap(
    sensitivity: pd.DataFrame,
    emotion: str,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Layer (rows) x training step (columns): the mean diagonal effect of steering with
    ``emotion``, for layer sweeps (where in depth is the concept read, and when)."""
    diag = sensitivity
    if "steered_emotion" in sensitivity.columns:
        diag = sensitivity[sensitivity["steered_emotion"] == emotion]
        if diag.empty:
            present = ", ".join(label_order(sensitivity["steered_emotion"].dropna()))
            raise ValueError(f"no rows steered with {emotion!r}; steered emotions: {present}")
    frame, sel = select_sensitivity(
        diag, None, alpha, measure, alpha_unit=alpha_unit, positions=positions, all_layers=True
    )
    means = mean_se_over_prompts(frame, ["layer", "step"], measure)
    table = means.pivot(index="layer", columns="step", values="mean").sort_index()
    table = table.reindex(columns=sorted(table.columns))
    z = table.to_numpy(dtype=float)
    layers = [int(v) for v in table.index]
    steps = [int(v) for v in table.columns]
    hover = [
        [
            f"{display_name(emotion, ja)}<br>layer {lay}, step {st}<br>{measure} {z[i, j]:.4g}"
            for j, st in enumerate(steps)
        ]
        for i, lay in enumerate(layers)
    ]
    fig = go.Figure(
        _diverging_heatmap(
            z.tolist(), [str(s) for s in steps], [str(v) for v in layers], hover, measure
        )
    )
    fig.update_layout(
        title={
            "text": f"{display_name(emotion, ja)}: diagonal effect by layer and step, "
            f"{sel.describe()}"
        },
        xaxis={"title": {"text": _AXIS_STEP}, "type": "category"},
        yaxis={"title": {"text": "layer"}, "type": "category"},
        margin={"t": 70},
    )
    return fig
