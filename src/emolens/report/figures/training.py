"""Training and filtering: loss and accuracy over steps, kept samples per label."""

from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    as_bool,
    format_value,
    label_order,
    require_columns,
)
from emolens.report.figures._style import _AXIS_STEP, _EVAL_LOSS_COLOR, _step_colors, display_name


def filtering_bars(filtering: pd.DataFrame) -> go.Figure:
    """Kept samples per label (x) and step (bars of one colour per step, early light, late
    dark). Labels dropped for too few kept samples are hatched and marked "dropped"."""
    require_columns(filtering, ("step", "label", "n_kept"), "the filtering table")
    frame = filtering.copy()
    dropped = frame["dropped"] if "dropped" in frame else pd.Series(False, index=frame.index)
    frame["dropped"] = dropped.map(as_bool)
    ja = {}
    if "label_ja" in frame:
        ja = {
            str(k): str(v)
            for k, v in zip(frame["label"], frame["label_ja"], strict=True)
            if pd.notna(v)
        }
    labels = label_order(frame["label"].dropna())
    steps = sorted(int(s) for s in frame["step"].dropna().unique())
    fig = go.Figure()
    for step, color in zip(steps, _step_colors(len(steps)), strict=True):
        rows = frame[frame["step"] == step].drop_duplicates("label").set_index("label")
        rows = rows.reindex([lab for lab in labels if lab in rows.index])
        fig.add_trace(_kept_bars(rows, step, color, ja))
    fig.update_layout(
        barmode="group",
        title={
            "text": "Samples kept by filtering (model picks the gold label); "
            "hatched = label dropped"
        },
        xaxis={
            "title": {"text": "label"},
            "type": "category",
            "tickangle": -45,
            "categoryorder": "array",
            "categoryarray": labels,
        },
        yaxis={"title": {"text": "kept samples"}},
        legend={"title": {"text": "checkpoint"}},
        margin={"t": 70},
    )
    return fig


def _kept_bars(rows: pd.DataFrame, step: int, color: str, ja: Mapping[str, str]) -> go.Bar:
    """One step's bars of kept samples per label (``rows`` indexed by label, in plot order);
    a dropped label's bar is hatched and marked "dropped"."""
    drop = rows["dropped"].tolist()
    extra = [
        f"{display_name(lab, ja)}<br>step {step}<br>kept {format_value(r.n_kept)}"
        + (
            f" of {format_value(r.n_samples)}"
            if "n_samples" in rows and pd.notna(r.n_samples)
            else ""
        )
        + (f", correct {format_value(r.n_correct)}" if "n_correct" in rows else "")
        + ("<br><b>dropped</b>" if d else "")
        for lab, r, d in zip(rows.index, rows.itertuples(), drop, strict=True)
    ]
    return go.Bar(
        x=rows.index.tolist(),
        y=rows["n_kept"].tolist(),
        name=f"step {step}",
        marker={"color": color, "pattern": {"shape": ["x" if d else "" for d in drop]}},
        text=["dropped" if d else "" for d in drop],
        textposition="outside",
        textangle=-90,
        customdata=extra,
        hovertemplate="%{customdata}<extra></extra>",
    )


def loss_curve(trainer_log: pd.DataFrame) -> go.Figure:
    """Train and eval loss over steps (columns ``step`` and ``loss`` and/or ``eval_loss``),
    with the step of the lowest eval loss marked."""
    require_columns(trainer_log, ("step",), "the trainer log")
    fig = go.Figure()
    styles = {
        "loss": ("train loss", "#1f77b4", "solid"),
        "eval_loss": ("eval loss", _EVAL_LOSS_COLOR, "dash"),
    }
    for column, (name, color, dash) in styles.items():
        if column not in trainer_log:
            continue
        rows = trainer_log[["step", column]].copy()
        rows[column] = pd.to_numeric(rows[column], errors="coerce")
        rows = rows.dropna().sort_values("step")
        if rows.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=rows["step"].tolist(),
                y=rows[column].tolist(),
                name=name,
                mode="lines+markers" if len(rows) < 60 else "lines",
                line={"color": color, "dash": dash},
                marker={"color": color, "size": 5},
                hovertemplate=f"step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>",
            )
        )
        if column == "eval_loss":
            best = rows.loc[rows[column].idxmin()]
            fig.add_trace(
                go.Scatter(
                    x=[best["step"]],
                    y=[best[column]],
                    mode="markers",
                    name="lowest eval loss",
                    marker={"color": "#d62728", "size": 12, "symbol": "star"},
                    hovertemplate="lowest eval loss %{y:.4g} at step %{x}<extra></extra>",
                )
            )
    if not fig.data:
        raise ValueError("the trainer log has no loss or eval_loss values")
    fig.update_layout(
        title={"text": "Fine-tuning loss"},
        xaxis={"title": {"text": "step"}},
        yaxis={"title": {"text": "loss"}},
        margin={"t": 60},
    )
    return fig


def accuracy_curve(steps_or_accuracy: pd.DataFrame) -> go.Figure:
    """Classification accuracy per checkpoint, from ``steps.csv`` or a run's
    ``accuracy.csv`` (columns ``step``, ``accuracy``, and ``n`` or ``n_samples``)."""
    require_columns(steps_or_accuracy, ("step", "accuracy"), "the accuracy table")
    rows = steps_or_accuracy.copy()
    rows["accuracy"] = pd.to_numeric(rows["accuracy"], errors="coerce")
    rows = rows.dropna(subset=["accuracy"]).sort_values("step")
    if rows.empty:
        raise ValueError("the accuracy table has no accuracy values")
    n_col = next((c for c in ("n", "n_samples") if c in rows), None)
    n = rows[n_col].tolist() if n_col else [""] * len(rows)
    fig = go.Figure(
        go.Scatter(
            x=rows["step"].tolist(),
            y=rows["accuracy"].tolist(),
            mode="lines+markers",
            name="accuracy",
            line={"color": "#2ca02c"},
            customdata=n,
            hovertemplate="step %{x}<br>accuracy %{y:.3f}<br>n = %{customdata}<extra></extra>",
        )
    )
    top = 1.0 if rows["accuracy"].max() <= 1.0 else None
    fig.update_layout(
        title={"text": "Classification accuracy per checkpoint"},
        xaxis={"title": {"text": _AXIS_STEP}},
        yaxis={"title": {"text": "accuracy"}, "range": [0, top * 1.02] if top else None},
        margin={"t": 60},
    )
    return fig


#: Columns that name a group in a generic table, in order of preference for the colour.
