"""Figure 2 across fine-tuning seeds: the seed mean of each emotion's point, with the band
from the smallest to the largest seed."""

import pandas as pd
import plotly.graph_objects as go

from emolens.report.figures._style import display_name, emotion_color


def figure2_seed_spread(bands: pd.DataFrame, alpha: float | None = None) -> go.Figure:
    """Per emotion, Figure 2's point (``figure2_bands.csv`` ``value``, concatenated over seeds
    with a ``seed`` column) against the step: the mean over seeds as a line and the min-max
    over seeds as a shaded band. ``alpha``: the steering strength shown (default the largest).
    """
    for col in ("seed", "step", "emotion", "alpha", "value"):
        if col not in bands.columns:
            raise ValueError(f"the Figure 2 table has no {col!r} column (one per seed needed)")
    alpha = float(bands["alpha"].max()) if alpha is None else float(alpha)
    sel = bands[bands["alpha"] == alpha]
    if sel.empty:
        raise ValueError(
            f"no Figure 2 point at alpha {alpha:g}; alphas: {sorted(bands.alpha.unique())}"
        )
    stats = (
        sel.groupby(["emotion", "step"])["value"]
        .agg(["mean", "min", "max", "count"])
        .reset_index()
        .sort_values(["emotion", "step"])
    )
    fig = go.Figure()
    for emotion, g in stats.groupby("emotion", sort=False):
        color = emotion_color(str(emotion))
        name = display_name(str(emotion))
        fig.add_trace(
            go.Scatter(
                x=list(g.step) + list(g.step)[::-1],
                y=list(g["max"]) + list(g["min"])[::-1],
                fill="toself",
                fillcolor=color,
                opacity=0.2,
                line={"width": 0},
                hoverinfo="skip",
                legendgroup=name,
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=g.step,
                y=g["mean"],
                mode="lines+markers",
                name=name,
                line={"color": color},
                legendgroup=name,
                customdata=g[["min", "max", "count"]].to_numpy(),
                hovertemplate="step %{x}<br>seed mean %{y:.3f}<br>min %{customdata[0]:.3f}"
                " max %{customdata[1]:.3f}<br>%{customdata[2]} seeds<extra>" + name + "</extra>",
            )
        )
    n_seeds = int(sel["seed"].nunique())
    fig.update_layout(
        title=f"Figure 2 across {n_seeds} seeds (alpha {alpha:g}): seed mean, min-max band",
        xaxis_title="step",
        yaxis_title="logit change of the steered label",
    )
    return fig
