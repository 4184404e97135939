"""Figures of the per-head attribution (``heads.csv``) and the logit lens (``logit_lens.csv``):
plotly heatmaps with a menu of views (one per checkpoint step, and the change from the first)."""

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}")


def _menu_heatmaps(
    views: list[tuple[str, pd.DataFrame]],
    *,
    x_title: str,
    y_title: str,
    colorbar: str,
    title: str,
    hover: str,
) -> go.Figure:
    """One heatmap per view (a wide frame: rows y, columns x), a dropdown to switch; the
    colour scale is symmetric about 0 for signed values."""
    fig = go.Figure()
    for k, (_, wide) in enumerate(views):
        z = wide.to_numpy(dtype=float)
        finite = z[np.isfinite(z)]
        signed = finite.size and finite.min() < 0 < finite.max()
        bound = float(np.abs(finite).max()) if finite.size else 1.0
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[str(c) for c in wide.columns],
                y=[str(i) for i in wide.index],
                colorscale="RdBu" if signed else "Viridis",
                reversescale=bool(signed),
                zmin=-bound if signed else None,
                zmax=bound if signed else None,
                colorbar={"title": colorbar},
                hovertemplate=hover,
                visible=k == 0,
            )
        )
    buttons = [
        {
            "label": name,
            "method": "update",
            "args": [{"visible": [j == k for j in range(len(views))]}],
        }
        for k, (name, _) in enumerate(views)
    ]
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.15}]
        if len(views) > 1
        else [],
    )
    return fig


def heads_figure(heads: pd.DataFrame, value: str = "margin") -> go.Figure:
    """Layer x head: each attention head's mean direct contribution to the gold label's logit
    (``value="logit"``) or to its margin over the other labels (``"margin"``), averaged over
    gold labels (each label weighs the same); one view per step and the change from the first
    step to the last."""
    if value not in ("logit", "margin"):
        raise ValueError(f"value must be 'logit' or 'margin', got {value!r}")
    _require(heads, ("step", "label", "layer", "head", value), "the heads table")
    per_head = heads[heads["head"] >= 0]
    if per_head.empty:
        raise ValueError("the heads table has no head rows")
    mean = per_head.groupby(["step", "layer", "head"])[value].mean()
    steps = sorted(per_head["step"].unique())

    def wide(step) -> pd.DataFrame:
        return mean.loc[step].unstack("head").sort_index()

    views = [(f"step {s}", wide(s)) for s in steps]
    if len(steps) > 1:
        views.append((f"step {steps[-1]} - step {steps[0]}", wide(steps[-1]) - wide(steps[0])))
    what = "gold label logit" if value == "logit" else "gold-vs-rest margin"
    return _menu_heatmaps(
        views,
        x_title="head",
        y_title="layer",
        colorbar=value,
        title=f"Per-head direct logit attribution ({what}, mean over labels)",
        hover="layer %{y}, head %{x}<br>" + what + " %{z:.4g}<extra></extra>",
    )


def lens_figure(
    lens: pd.DataFrame, value: str = "accuracy", *, ja: Mapping[str, str] | None = None
) -> go.Figure:
    """Gold label x layer: what the logit lens reads at each layer (``accuracy`` over the
    labels, mean ``rank``, ``logit``, ``margin`` or ``logprob``), one view per step and the
    change from the first step to the last; the top row is the mean over labels."""
    if value not in ("accuracy", "rank", "logit", "margin", "logprob"):
        raise ValueError(f"unknown logit-lens value {value!r}")
    _require(lens, ("step", "layer", "label", value), "the logit-lens table")
    ja = ja or {}
    labels = list(dict.fromkeys(lens["label"]))
    steps = sorted(lens["step"].unique())

    def wide(step) -> pd.DataFrame:
        part = lens[lens["step"] == step].pivot_table(index="label", columns="layer", values=value)
        part = part.reindex([lab for lab in labels if lab in part.index])
        part.loc["mean over labels"] = part.mean(axis=0)
        part = part.iloc[::-1]  # the mean on top
        part.index = [f"{ja[i]} {i}" if i in ja else i for i in part.index]
        return part

    views = [(f"step {s}", wide(s)) for s in steps]
    if len(steps) > 1:
        views.append((f"step {steps[-1]} - step {steps[0]}", wide(steps[-1]) - wide(steps[0])))
    return _menu_heatmaps(
        views,
        x_title="layer (residual after the block)",
        y_title="gold label",
        colorbar=value,
        title=f"Logit lens at the answer position: {value} of the gold label",
        hover="%{y}, layer %{x}<br>" + value + " %{z:.4g}<extra></extra>",
    )


def lens_depth_figure(lens: pd.DataFrame, value: str = "accuracy") -> go.Figure:
    """Step x layer, mean over gold labels: how fine-tuning moves where labels become
    readable."""
    _require(lens, ("step", "layer", "label", value), "the logit-lens table")
    per_label = lens.groupby(["step", "layer", "label"])[value].mean()
    wide = per_label.groupby(["step", "layer"]).mean().unstack("layer").sort_index()
    return _menu_heatmaps(
        [("mean over labels", wide)],
        x_title="layer",
        y_title="step",
        colorbar=value,
        title=f"Logit lens across the series: {value}, mean over gold labels",
        hover="step %{y}, layer %{x}<br>" + value + " %{z:.4g}<extra></extra>",
    )


def generations_view(generations: pd.DataFrame, step, prompt_id=None) -> pd.DataFrame:
    """One step's continuations of one prompt (default: the first) as a table: a row per
    steered emotion (the unsteered one first), a column per alpha, the text in the cells."""
    _require(generations, ("step", "emotion", "alpha", "prompt_id", "text"), "generations.csv")
    part = generations[generations["step"] == step]
    if part.empty:
        raise ValueError(f"generations.csv has no rows for step {step}")
    prompt_id = part["prompt_id"].iloc[0] if prompt_id is None else prompt_id
    part = part[part["prompt_id"] == prompt_id]
    emotions = list(dict.fromkeys(part["emotion"]))
    wide = part.pivot_table(
        index="emotion", columns="alpha", values="text", aggfunc="first"
    ).reindex(emotions)
    wide.columns = [f"alpha {a:g}" for a in wide.columns]
    wide = wide.fillna("").reset_index()
    wide.insert(0, "prompt", str(prompt_id))
    return wide
