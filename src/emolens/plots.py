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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.labels import STUDY_LABELS, UnknownLabelError

#: The columns ``sensitivity.csv`` must have (the measure columns are checked separately).
SENSITIVITY_KEYS = ("step", "layer", "steered_emotion", "observed_label", "alpha", "prompt_id")
#: Measures of a steering effect in ``sensitivity.csv``.
MEASURES = ("logit_change", "logprob_change", "centered_change")

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


def label_order(names) -> list[str]:
    """Names in the order of the study's prompt, unknown names after them, sorted."""
    known = STUDY_LABELS.names("en")
    present = {str(n) for n in names}
    return [n for n in known if n in present] + sorted(present - set(known))


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the missing columns of ``what`` and those it has."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, frame.columns)) or 'no columns'}"
        )


def _check_measure(sensitivity: pd.DataFrame, measure: str) -> None:
    if measure not in sensitivity.columns:
        present = [m for m in MEASURES if m in sensitivity.columns]
        raise ValueError(
            f"the sensitivity table has no measure {measure!r}; it has "
            f"{', '.join(present) or 'none of ' + ', '.join(MEASURES)}"
        )


def format_value(value) -> str:
    """A table value as text, floats in their shortest form (``4.0`` is ``"4"``)."""
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return str(value)


def _pick(frame: pd.DataFrame, column: str, value, prefer=None, largest: bool = False):
    """Rows where ``column`` equals ``value`` (floats compared with a tolerance), and the value.
    With ``value`` None: ``prefer`` if present, else the largest (with ``largest``) or the
    first value present."""
    if column not in frame.columns:
        return frame, value
    present = frame[column].dropna().unique().tolist()
    if not present:
        raise ValueError(f"no rows with a value in column {column!r}")
    if value is None:
        if prefer is not None and prefer in present:
            value = prefer
        else:
            value = max(present) if largest else sorted(present, key=str)[0]
    if pd.api.types.is_float_dtype(frame[column]):
        mask = np.isclose(frame[column].to_numpy(dtype=float), float(value))
    else:
        mask = (frame[column] == value).to_numpy()
    if not mask.any():
        shown = ", ".join(format_value(v) for v in sorted(present))
        raise ValueError(f"no rows with {column} = {format_value(value)}; present: {shown}")
    if hasattr(value, "item"):
        value = value.item()
    return frame[mask], value


@dataclass(frozen=True)
class Selection:
    """Which slice of a sensitivity table a figure shows."""

    layer: int | None
    alpha: float | None
    alpha_unit: str | None
    positions: str | None
    measure: str

    def describe(self) -> str:
        parts = []
        if self.layer is not None:
            parts.append(f"layer {self.layer}")
        if self.alpha is not None:
            unit = f" ({self.alpha_unit})" if self.alpha_unit else ""
            parts.append(f"α = {format_value(self.alpha)}{unit}")
        if self.positions is not None:
            parts.append(f"positions: {self.positions}")
        parts.append(self.measure)
        return ", ".join(parts)


def select_sensitivity(
    sensitivity: pd.DataFrame,
    layer: int | None = None,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
    diagonal: bool = True,
    all_layers: bool = False,
) -> tuple[pd.DataFrame, Selection]:
    """The rows of one setting: by default the diagonal (steered emotion observed), the largest
    layer present, the absolute alpha unit and all positions where there is a choice, and the
    largest alpha at that layer. Raises ``ValueError`` naming what is present when nothing
    matches."""
    require_columns(sensitivity, SENSITIVITY_KEYS, "the sensitivity table")
    _check_measure(sensitivity, measure)
    frame = sensitivity
    if diagonal:
        frame = frame[frame["steered_emotion"] == frame["observed_label"]]
        if frame.empty:
            raise ValueError(
                "the sensitivity table has no diagonal rows (steered_emotion == "
                "observed_label), so the steering effect on a label cannot be shown"
            )
    frame, alpha_unit = _pick(frame, "alpha_unit", alpha_unit, prefer="absolute")
    frame, positions = _pick(frame, "positions", positions, prefer="all")
    if not all_layers:
        frame, layer = _pick(frame, "layer", layer, largest=True)
        layer = int(layer)
    frame, alpha = _pick(frame, "alpha", alpha, largest=True)
    return frame, Selection(layer, float(alpha), alpha_unit, positions, measure)


def _mean_se(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Columns ``keys``, ``mean``, ``se`` (standard error, NaN for one row) and ``n`` of
    ``value`` per group of ``keys``."""
    out = frame.groupby(keys, sort=True)[value].agg(mean="mean", std="std", n="count")
    out = out.reset_index()
    out["se"] = (out["std"] / np.sqrt(out["n"])).where(out["n"] > 1)
    return out.drop(columns="std")


def _mean_se_over_prompts(frame: pd.DataFrame, keys: list[str], measure: str) -> pd.DataFrame:
    """:func:`_mean_se` over prompts, the values of one prompt averaged first."""
    per_prompt = frame.groupby([*keys, "prompt_id"], sort=True, dropna=False)[measure].mean()
    return _mean_se(per_prompt.reset_index(), keys, measure)


def diagonal_summary(
    sensitivity: pd.DataFrame,
    layer: int | None = None,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
) -> tuple[pd.DataFrame, Selection]:
    """Figure 2's numbers: columns ``emotion, step, mean, se, n`` (over prompts), and the
    setting they come from (see :func:`select_sensitivity` for the defaults)."""
    frame, sel = select_sensitivity(
        sensitivity, layer, alpha, measure, alpha_unit=alpha_unit, positions=positions
    )
    out = _mean_se_over_prompts(frame, ["steered_emotion", "step"], measure)
    return out.rename(columns={"steered_emotion": "emotion"}), sel


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
) -> go.Figure:
    """The paper's Figure 2: the mean (over prompts) change of the steered emotion's own label
    measure against training step, one line per emotion, with error bars of one standard error
    over prompts. Defaults: the final (largest) layer present and the largest alpha. When
    ``steps_table`` (``step``, ``eval_loss``) has eval losses they are drawn on a second y axis
    (dashed, grey)."""
    summary, sel = diagonal_summary(
        sensitivity, layer, alpha, measure, alpha_unit=alpha_unit, positions=positions
    )
    fig = go.Figure()
    for emotion in label_order(summary["emotion"]):
        rows = summary[summary["emotion"] == emotion].sort_values("step")
        color = emotion_color(emotion)
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
    frame, step = _pick(frame, "step", None if step is None else int(step), largest=True)
    means = _mean_se_over_prompts(frame, ["steered_emotion", "observed_label"], measure)
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
    means = _mean_se_over_prompts(frame, ["layer", "step"], measure)
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


def as_bool(value) -> bool:
    """A flag read from a CSV: ``True``/``"True"``/``"1"`` are true, NaN is false."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if pd.notna(value) else False


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
        frame, layer = _pick(frame, "layer", None, largest=True)
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
        agg = _mean_se(frame, ["_group", "step"], value)
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
