"""Figures of the study, as pure functions from result tables to ``plotly`` figures.

Every function takes the long-format tables the pipeline writes (``sensitivity.csv``,
``filtering.csv``, ``steps.csv``, a trainer log, the optional tables of the explanation
analyses) and returns a :class:`plotly.graph_objects.Figure`; nothing here reads files or calls
``show()``. Emotions are named in English with the Japanese in the hover text, and each emotion
keeps one colour in every figure (:func:`emotion_color`).

The "diagonal" of the sensitivity table (``steered_emotion == observed_label``) is the paper's
Figure 2: how much steering with an emotion's concept vector raises that emotion's own logit.
"""

import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.change_summary import change_summary_counts
from emolens.analysis.frames import (
    as_bool,
    format_value,
    label_order,
    mean_se,
    mean_se_over_prompts,
    pick_rows,
    require_columns,
)
from emolens.analysis.sensitivity import (
    diagonal_summary,
    select_sensitivity,
)
from emolens.data.labels import STUDY_LABELS, UnknownLabelError

#: One colour per study label, used by every figure (qualitative, distinguishable on white).
EMOTION_COLORS: dict[str, str] = {
    "anger": "#d62728",
    "boredom": "#8c564b",
    "disgust": "#bcbd22",
    "fear": "#9467bd",
    "guilt": "#17becf",
    "joy": "#ff7f0e",
    "pride": "#e377c2",
    "relief": "#2ca02c",
    "sadness": "#1f77b4",
    "shame": "#7b4173",
    "surprise": "#e7ba52",
    "trust": "#393b79",
    "no-emotion": "#7f7f7f",
}
_FALLBACK_COLORS = (
    "#637939",
    "#843c39",
    "#3182bd",
    "#e6550d",
    "#31a354",
    "#756bb1",
    "#636363",
    "#a55194",
    "#6baed6",
    "#fd8d3c",
)
_EVAL_LOSS_COLOR = "#555555"
_AXIS_STEP = "training step (0 = base model)"


def emotion_color(name: str) -> str:
    """The colour of an emotion in every figure; an unknown name gets a stable fallback."""
    if name in EMOTION_COLORS:
        return EMOTION_COLORS[name]
    return _FALLBACK_COLORS[zlib.crc32(str(name).encode()) % len(_FALLBACK_COLORS)]


def japanese_name(name: str, ja: Mapping[str, str] | None = None) -> str | None:
    """The Japanese name of an English label, from ``ja`` or the study's label set."""
    if ja and name in ja:
        return ja[name]
    try:
        return STUDY_LABELS.lookup(str(name)).ja
    except UnknownLabelError:
        return None


def display_name(name: str, ja: Mapping[str, str] | None = None) -> str:
    """``"joy (喜び)"``: the English name with the Japanese where it is known."""
    jp = japanese_name(name, ja)
    return f"{name} ({jp})" if jp else str(name)


def _steps_eval_loss(steps_table: pd.DataFrame | None) -> pd.DataFrame | None:
    if steps_table is None or "step" not in steps_table or "eval_loss" not in steps_table:
        return None
    ev = steps_table[["step", "eval_loss"]].copy()
    ev["eval_loss"] = pd.to_numeric(ev["eval_loss"], errors="coerce")
    ev = ev.dropna().groupby("step", sort=True)["eval_loss"].first().reset_index()
    return ev if len(ev) else None


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
    band_rows = None
    if (
        bands is not None
        and measure == "logit_change"
        and (sel.alpha_unit or "absolute") == ("absolute")
    ):
        require_columns(bands, ("step", "layer", "emotion", "alpha", "ci_low", "ci_high"),
                        "the Figure 2 bands table")  # fmt: skip
        band_rows = bands[(bands["alpha"] == sel.alpha)]
        if sel.layer is not None:
            band_rows = band_rows[band_rows["layer"] == sel.layer]
    fig = go.Figure()
    for emotion in label_order(summary["emotion"]):
        rows = summary[summary["emotion"] == emotion].sort_values("step")
        color = emotion_color(emotion)
        if band_rows is not None:
            b = band_rows[band_rows["emotion"] == emotion].sort_values("step")
            band = _band(
                b["step"].tolist(),
                b["ci_low"].to_numpy(dtype=float),
                b["ci_high"].to_numpy(dtype=float),
                color,
                name=f"{emotion} 95% band",
                group=emotion,
                meta=emotion,
            )
            if band is not None:
                fig.add_trace(band)
        fig.add_trace(
            go.Scatter(
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
        )
    fig.add_hline(y=0, line={"color": "#bbbbbb", "width": 1})
    ev = _steps_eval_loss(steps_table)
    layout = {}
    if ev is not None:
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
        layout["yaxis2"] = {
            "title": {"text": "eval loss"},
            "overlaying": "y",
            "side": "right",
            "showgrid": False,
        }
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


def _setting_text(layer, alpha) -> str:
    """``"layer L, α = A"`` for a figure title, leaving out what is None."""
    parts = (
        f"layer {format_value(layer)}" if layer is not None else "",
        f"α = {format_value(alpha)}" if alpha is not None else "",
    )
    return ", ".join(p for p in parts if p)


def _diverging_heatmap(z, x, y, hover, colorbar: str) -> go.Heatmap:
    """Red for a rise, blue for a fall, white at zero (a colour range symmetric about 0)."""
    finite = np.asarray(z, dtype=float)
    finite = finite[np.isfinite(finite)]
    bound = float(np.abs(finite).max()) if finite.size else 0.0
    return go.Heatmap(
        z=z,
        x=x,
        y=y,
        text=hover,
        zmin=-(bound or 1.0),
        zmax=bound or 1.0,
        colorscale="RdBu_r",
        colorbar={"title": {"text": colorbar}},
        hovertemplate="%{text}<extra></extra>",
    )


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


def _step_colors(n: int) -> list[str]:
    """A light-to-dark blue ramp: early steps light, late steps dark."""
    if n <= 1:
        return ["#2171b5"]
    out = []
    for i in range(n):
        t = i / (n - 1)
        r, g, b = (
            int(round(a + (bb - a) * t)) for a, bb in ((0x9E, 0x08), (0xCA, 0x30), (0xE1, 0x6B))
        )
        out.append(f"#{r:02x}{g:02x}{b:02x}")
    return out


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
        fig.add_trace(
            go.Bar(
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
        )
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
_GROUP_HINTS = (
    "emotion",
    "label",
    "steered_emotion",
    "observed_label",
    "measure",
    "emotion_a",
    "emotion_b",
    "component",
    "kind",
)
#: Numeric columns that number samples rather than measure anything: averaged over.
_ID_NAMES = ("id", "sample", "prompt", "seed", "replicate", "boot", "fold")
_MAX_GROUPS = 40
_MAX_TABLE_ROWS = 200


def _is_id_name(name: str) -> bool:
    return name in _ID_NAMES or name.endswith(("_id", "_idx", "index"))


def generic_table_figure(df: pd.DataFrame, title: str) -> go.Figure:
    """A figure for a long-format table whose columns are not fixed: with a ``step`` column
    and numeric columns, one line over steps per group (the non-numeric columns with few
    values, and integer columns named ``*step``/``*layer``), at the largest ``layer`` when
    there is one, with a menu to choose the value column when there are several; otherwise a
    plain table of the first rows. Numeric columns that number samples (``*_id``, ``sample``,
    ``seed``, ...) and text columns with many values are averaged over. It never fails on
    unexpected columns."""
    try:
        fig = _lines_over_steps(df, title)
    except Exception:  # an odd table must still be shown, as a table
        fig = None
    return fig if fig is not None else _table_figure(df, title)


def _table_figure(df: pd.DataFrame, title: str) -> go.Figure:
    head = df.head(_MAX_TABLE_ROWS)
    cells = [[format_value(v) for v in head[c].tolist()] for c in head.columns]
    fig = go.Figure(
        go.Table(header={"values": [str(c) for c in head.columns]}, cells={"values": cells or [[]]})
    )
    more = f" (first {_MAX_TABLE_ROWS} of {len(df)} rows)" if len(df) > _MAX_TABLE_ROWS else ""
    fig.update_layout(title={"text": f"{title}{more}"}, margin={"t": 60})
    return fig


def _is_value_column(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _lines_over_steps(df: pd.DataFrame, title: str) -> go.Figure | None:
    if "step" not in df.columns or df.empty:
        return None
    frame = df.copy()
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    frame = frame.dropna(subset=["step"])
    notes = []
    if "layer" in frame.columns and _is_value_column(frame["layer"]):
        frame, layer = pick_rows(frame, "layer", None, largest=True)
        notes.append(f"layer {format_value(layer)}")
    groups, values = [], []
    for col in frame.columns:
        if col in ("step", "layer"):
            continue
        series = frame[col]
        name = str(col).lower()
        keyish = name.endswith(("step", "layer"))
        if _is_value_column(series) and _is_id_name(name):
            continue  # sample or prompt numbers: averaged over
        if _is_value_column(series) and not keyish:
            if series.notna().any():
                values.append(col)
        elif series.nunique(dropna=True) <= _MAX_GROUPS:
            groups.append(col)
        # other columns (ids with many values) are averaged over
    if not values:
        return None
    hinted = [g for g in _GROUP_HINTS if g in groups]
    groups = hinted + [g for g in groups if g not in hinted]
    if groups:
        frame[groups] = frame[groups].astype(str)
        keys = frame[groups].agg(" · ".join, axis=1)
    else:
        keys = pd.Series("all", index=frame.index)
    frame = frame.assign(_group=keys)
    names = frame["_group"].drop_duplicates().tolist()[:_MAX_GROUPS]
    if len(frame["_group"].unique()) > _MAX_GROUPS:
        notes.append(f"first {_MAX_GROUPS} groups")
    color_of = {}
    first = groups[0] if groups else None
    for name in names:
        lead = frame.loc[frame["_group"] == name, first].iloc[0] if first else name
        color_of[name] = emotion_color(str(lead))
    fig = go.Figure()
    visible_sets = []
    for k, value in enumerate(values):
        agg = mean_se(frame, ["_group", "step"], value)
        start = len(fig.data)
        for name in names:
            rows = agg[agg["_group"] == name]
            if rows.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=rows["step"].tolist(),
                    y=rows["mean"].tolist(),
                    mode="lines+markers",
                    name=name,
                    visible=k == 0,
                    line={"color": color_of[name]},
                    marker={"color": color_of[name], "size": 6},
                    error_y={
                        "type": "data",
                        "array": rows["se"].fillna(0).tolist(),
                        "visible": bool(rows["se"].notna().any()),
                    },
                    hovertemplate=f"<b>{display_name(name)}</b><br>step %{{x}}<br>"
                    f"{value} %{{y:.4g}}<extra></extra>",
                )
            )
        visible_sets.append((value, start, len(fig.data)))
    if not fig.data:
        return None
    suffix = f" ({', '.join(notes)})" if notes else ""
    layout = {}
    if len(values) > 1:
        buttons = []
        for value, start, stop in visible_sets:
            vis = [start <= i < stop for i in range(len(fig.data))]
            buttons.append(
                {
                    "label": str(value),
                    "method": "update",
                    "args": [{"visible": vis}, {"yaxis.title.text": str(value)}],
                }
            )
        layout["updatemenus"] = [
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.15,
                "yanchor": "top",
            }
        ]
    fig.update_layout(
        title={"text": f"{title}{suffix}"},
        xaxis={"title": {"text": _AXIS_STEP}},
        yaxis={"title": {"text": str(values[0])}},
        legend={"title": {"text": " · ".join(map(str, groups)) or None}},
        margin={"t": 90},
        **layout,
    )
    return fig


# --------------------------------------------------------------------------------------------
# figures of the explanation analyses (attribution, transfer, DLA, geometry, probes, baseline)

_GRID_COLS = 4
_MEASURED_COLOR = "#222222"
_CHANCE_COLOR = "#999999"
_RANDOM_COLOR = "#7f7f7f"
_ALL_COLOR = "#333333"
#: Parts of the final-layer logit change (attribution.csv): column, legend name, colour.
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


def _rgba(color: str, alpha: float) -> str:
    """``#rrggbb`` or ``rgb(r, g, b)`` as ``rgba(r, g, b, alpha)`` (for bands)."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    elif color.startswith("rgb"):
        r, g, b = (int(float(x)) for x in color[color.index("(") + 1 : -1].split(",")[:3])
    else:
        return color
    return f"rgba({r}, {g}, {b}, {alpha})"


def _step_ticks(steps) -> dict:
    """Axis settings with a tick at every analysed step when there are few of them."""
    steps = sorted({float(v) for v in steps if pd.notna(v)})
    if not steps or len(steps) > 12:
        return {}
    return {"tickmode": "array", "tickvals": steps, "ticktext": [format_value(v) for v in steps]}


def _series_color(name: str) -> str:
    return _ALL_COLOR if name == "all" else emotion_color(name)


def _layer_colors(n: int) -> list[str]:
    """One colour per layer, shallow to deep along Viridis."""
    from plotly.colors import sample_colorscale

    return sample_colorscale("Viridis", [i / max(n - 1, 1) * 0.9 for i in range(n)])


def _band(x, low, high, color: str, *, name: str, group: str, meta=None) -> go.Scatter | None:
    """A filled interval over ``x`` (points with a missing bound are left out), or None."""
    pts = [
        (a, lo, hi)
        for a, lo, hi in zip(x, low, high, strict=True)
        if np.isfinite(lo) and np.isfinite(hi)
    ]
    if not pts:
        return None
    xs = [p[0] for p in pts]
    return go.Scatter(
        x=xs + xs[::-1],
        y=[p[2] for p in pts] + [p[1] for p in pts][::-1],
        fill="toself",
        fillcolor=_rgba(color, 0.1),
        line={"width": 0},
        mode="lines",
        hoverinfo="skip",
        showlegend=False,
        legendgroup=group,
        name=name,
        meta=meta,
    )


def _add_view_menu(fig: go.Figure, views: list[tuple[str, list[int]]], active: int = 0) -> None:
    """Show one view (a set of trace indices) at a time, chosen from a menu."""
    n = len(fig.data)
    for i, trace in enumerate(fig.data):
        trace.visible = i in views[active][1]
    if len(views) < 2:
        return
    buttons = [
        {
            "label": label,
            "method": "update",
            "args": [{"visible": [i in idx for i in range(n)]}],
        }
        for label, idx in views
    ]
    fig.update_layout(
        updatemenus=[
            {
                "buttons": buttons,
                "active": active,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.12,
                "yanchor": "bottom",
            }
        ]
    )


def _facet_grid(names: list[str], ja: Mapping[str, str] | None, row_height: int = 230):
    """A grid of small panels, one per name, sharing both axes; ``(fig, cell)`` where
    ``cell(k)`` gives the ``(row, col)`` of panel ``k``."""
    from plotly.subplots import make_subplots

    cols = max(1, min(_GRID_COLS, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[display_name(n, ja) for n in names],
        shared_xaxes="all",
        shared_yaxes="all",
        horizontal_spacing=0.03,
        vertical_spacing=min(0.1, 0.5 / rows),
    )
    fig.update_layout(height=140 + row_height * rows, margin={"t": 110})
    return fig, lambda k: (k // cols + 1, k % cols + 1)


def _top_legend(fig: go.Figure) -> dict:
    """A horizontal legend just under the title, above the panels of a facet grid."""
    height = fig.layout.height or 450
    return {
        "orientation": "h",
        "x": 0,
        "xanchor": "left",
        "y": 1 - 58 / height,
        "yanchor": "top",
        "yref": "container",
    }


def _select_one(frame: pd.DataFrame, column: str, value, largest: bool = True):
    """:func:`_pick` for an optional setting column (alpha, layer) that must be one value."""
    if column not in frame.columns:
        return frame, None
    return pick_rows(frame, column, value, largest=largest)


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
        steps = rows["step"].tolist()
        for column, name, color in parts:
            fig.add_trace(
                go.Bar(
                    x=steps,
                    y=rows[column].tolist(),
                    name=name,
                    legendgroup=column,
                    showlegend=k == 0,
                    marker={"color": color},
                    meta=emotion,
                    hovertemplate=f"<b>{display_name(emotion, ja)}</b><br>step %{{x}}<br>"
                    f"{name}: %{{y:.4g}}<extra></extra>",
                ),
                row=row,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=rows[total[0]].tolist(),
                name=total[1],
                legendgroup=total[0],
                showlegend=k == 0,
                mode="lines+markers",
                line={"color": _MEASURED_COLOR, "width": 1.5},
                marker={"color": _MEASURED_COLOR, "size": 5},
                meta=emotion,
                hovertemplate=f"<b>{display_name(emotion, ja)}</b><br>step %{{x}}<br>"
                f"{total[1]}: %{{y:.4g}}<extra></extra>",
            ),
            row=row,
            col=col,
        )
    fig.update_layout(
        barmode="relative",
        title={"text": title},
        legend=_top_legend(fig),
    )
    fig.update_xaxes(title_text=None, **_step_ticks(means["step"]))
    fig.update_yaxes(zeroline=True, zerolinecolor="#bbbbbb")
    fig.update_yaxes(title_text=yaxis, col=1)
    return fig


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
    layer_of = {}
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
        color = _series_color(emotion)
        steps = rows["step"].tolist()
        if has_ci:
            band = _band(
                steps,
                rows["ci_low"].to_numpy(float),
                rows["ci_high"].to_numpy(float),
                color,
                name=f"{emotion} interval",
                group=emotion,
                meta=emotion,
            )
            if band is not None:
                fig.add_trace(band)
        ci = (
            np.column_stack([rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)])
            if has_ci
            else np.full((len(rows), 2), np.nan)
        )
        fig.add_trace(
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
    where = f"layer {format_value(layer)}" + (f", {inner} inner product" if inner else "")
    fig.update_layout(
        title={"text": f"Geometry: {measure} ({where}); bands: bootstrap intervals"},
        xaxis={"title": {"text": _AXIS_STEP}, **_step_ticks(frame["step"])},
        yaxis={"title": {"text": measure}},
        legend={"title": {"text": "emotion"}},
        margin={"t": 70},
    )
    return fig


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

    def line(rows, name, color, dash, *, group, meta, band=True, width=2.0):
        idx = []
        steps = rows["step"].tolist()
        if band and has_ci:
            b = _band(
                steps,
                rows["ci_low"].to_numpy(float),
                rows["ci_high"].to_numpy(float),
                color,
                name=f"{name} interval",
                group=group,
                meta=meta,
            )
            if b is not None:
                fig.add_trace(b)
                idx.append(len(fig.data) - 1)
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=rows["value"].tolist(),
                mode="lines+markers",
                name=name,
                legendgroup=group,
                line={"color": color, "dash": dash, "width": width},
                marker={"color": color, "size": 5},
                meta=meta,
                hovertemplate=f"{name}<br>step %{{x}}<br>accuracy %{{y:.3f}}<extra></extra>",
            )
        )
        idx.append(len(fig.data) - 1)
        return idx

    def chance_line(meta):
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

    views = []
    if len(layers) > 1:
        idx = []
        for lay, color in zip(layers, _layer_colors(len(layers)), strict=True):
            rows = own_all[own_all["layer"] == lay]
            idx += line(
                rows,
                f"layer {lay}",
                color,
                "solid",
                group=f"layer {lay}",
                meta={"view": "all", "layer": lay, "kind": "own"},
                band=False,
            )
        idx += chance_line({"view": "all", "kind": "chance"})
        views.append(("all layers", idx))
    styles = (
        ("accuracy", True, "own probe", "#1f77b4", "solid"),
        ("accuracy", False, f"step-{first} probe", "#ff7f0e", "dashdot"),
        ("shuffled_accuracy", None, "shuffled labels", "#7f7f7f", "dot"),
    )
    for lay in layers:
        idx = []
        for measure, own, name, color, dash in styles:
            rows = probe_rows(probes, measure, own)
            rows = rows[rows["layer"] == lay]
            if rows.empty:
                continue
            idx += line(
                rows, name, color, dash, group=name, meta={"view": lay, "layer": lay, "kind": name}
            )
        idx += chance_line({"view": lay, "kind": "chance"})
        views.append((f"layer {lay}", idx))
    active = 0 if layer is None else [v[0] for v in views].index(f"layer {int(layer)}")
    _add_view_menu(fig, views, active)
    fig.update_layout(
        title={"text": "Linear probes: held-out accuracy (bands: bootstrap intervals)"},
        xaxis={"title": {"text": _AXIS_STEP}, **_step_ticks(probes["step"])},
        yaxis={"title": {"text": "held-out accuracy"}, "range": [0, 1.02]},
        margin={"t": 90},
    )
    return fig


def random_baseline_figure(
    rb: pd.DataFrame,
    alpha: float | int | None = None,
    *,
    ja: Mapping[str, str] | None = None,
) -> go.Figure:
    """Final-layer steering with each concept vector against random directions of the same
    norm, per emotion over steps (one panel each): the concept's own-label logit change with
    its bootstrap interval over prompts, and the random directions' mean ± one standard
    deviation (grey). Default: the largest alpha (and layer)."""
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
        steps = rows["step"].tolist()
        color = emotion_color(emotion)
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
            go.Scatter(
                x=steps,
                y=mean.tolist(),
                mode="lines",
                name="random directions (mean ± sd)",
                legendgroup="random",
                showlegend=k == 0,
                meta=emotion,
                line={"color": _RANDOM_COLOR, "dash": "dash"},
                hovertemplate="random directions<br>step %{x}<br>mean %{y:.4g}<extra></extra>",
            ),
        ]
        if {"concept_ci_low", "concept_ci_high"} <= set(rows.columns):
            traces.append(
                _band(
                    steps,
                    rows["concept_ci_low"].to_numpy(float),
                    rows["concept_ci_high"].to_numpy(float),
                    color,
                    name="concept interval",
                    group="concept",
                    meta=emotion,
                )
            )
        traces.append(
            go.Scatter(
                x=steps,
                y=rows["logit_change_concept"].tolist(),
                mode="lines+markers",
                name="concept vector",
                legendgroup="concept",
                showlegend=k == 0,
                meta=emotion,
                line={"color": color},
                marker={"color": color, "size": 5},
                hovertemplate=f"<b>{display_name(emotion, ja)}</b> concept vector<br>step %{{x}}"
                "<br>logit change %{y:.4g}<extra></extra>",
            )
        )
        for trace in traces:
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


def change_summary_table(change_summary: pd.DataFrame) -> go.Figure:
    """:func:`change_summary_counts` as a table figure, families with a changed series in red."""
    counts = change_summary_counts(change_summary)
    headers = [
        "table",
        "measure",
        "inner / probe",
        "series tested",
        "changed (q < .05)",
        "equivalent (TOST)",
        "inconclusive",
        "largest |effect|",
        "layers changed",
    ]
    values = [
        counts["table"].tolist(),
        counts["measure"].tolist(),
        counts["variant"].tolist(),
        counts["n_tested"].tolist(),
        counts["n_changed"].tolist(),
        counts["n_equivalent"].tolist(),
        counts["n_inconclusive"].tolist(),
        [format_value(round(v, 4)) if np.isfinite(v) else "" for v in counts["max_abs_effect"]],
        counts["changed_layers"].tolist(),
    ]
    fill = ["#fdecea" if n else "#ffffff" for n in counts["n_changed"]]
    fig = go.Figure(
        go.Table(
            columnwidth=[1, 2.4, 0.9, 0.7, 0.9, 0.9, 0.9, 1, 1.2],
            header={"values": headers, "fill": {"color": "#f0f0f0"}, "align": "left"},
            cells={"values": values, "fill": {"color": [fill] * len(headers)}, "align": "left"},
        )
    )
    fig.update_layout(
        title={"text": "Change from the first step: paired tests, FDR within family, TOST"},
        height=min(900, 140 + 28 * max(len(counts), 1)),
        margin={"t": 60},
    )
    return fig


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
        z = summary.pivot_table(index="emotion", columns="step", values=column, aggfunc="first")
        z = z.reindex(index=emotions, columns=steps)
        v = summary.pivot_table(index="emotion", columns="step", values=value, aggfunc="first")
        v = v.reindex(index=emotions, columns=steps) if value in summary else z * np.nan
        zz = z.to_numpy(dtype=float)
        vv = v.to_numpy(dtype=float)
        fig.add_trace(
            go.Heatmap(
                z=[[None if not np.isfinite(a) else a for a in row] for row in zz],
                x=[format_value(s) for s in steps],
                y=emotions,
                text=[["" if not np.isfinite(a) else str(int(a)) for a in row] for row in zz],
                texttemplate="%{text}",
                customdata=vv,
                zmin=lo,
                zmax=hi,
                colorscale="Viridis",
                showscale=k == 0,
                colorbar={"title": {"text": "layer"}, "dtick": 1},
                name=title,
                hovertemplate="%{y}<br>step %{x}<br>layer %{text}<br>"
                + value.replace("_", " ")
                + " %{customdata:.4g}<extra></extra>",
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


def localisation_heatmap(localisation: pd.DataFrame, value: str = "gold_logit_drop") -> go.Figure:
    """Window (first and last layer) x step heatmap of what removing the concept direction over
    that window costs (``localisation.csv`` of :func:`emolens.run.pipeline.localise`)."""
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
