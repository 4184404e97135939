"""Any table as a figure: lines over steps where the table has them, else a table."""

from typing import Any

import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    format_value,
    mean_se,
    pick_rows,
)
from emolens.report.figures._style import _AXIS_STEP, display_name, emotion_color

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
    """One line over steps per group and a menu of value columns (see
    :func:`generic_table_figure`); None where the table has no steps or no values."""
    if "step" not in df.columns or df.empty:
        return None
    frame, notes = _step_rows(df)
    groups, values = _groups_and_values(frame)
    if not values:
        return None
    frame, names, color_of = _group_lines(frame, groups, notes)
    fig = go.Figure()
    visible_sets = [
        _add_value_lines(fig, frame, value, names, color_of, visible=k == 0)
        for k, value in enumerate(values)
    ]
    if not fig.data:
        return None
    suffix = f" ({', '.join(notes)})" if notes else ""
    layout = _value_menu(visible_sets, len(fig.data)) if len(values) > 1 else {}
    fig.update_layout(
        title={"text": f"{title}{suffix}"},
        xaxis={"title": {"text": _AXIS_STEP}},
        yaxis={"title": {"text": str(values[0])}},
        legend={"title": {"text": " · ".join(map(str, groups)) or None}},
        margin={"t": 90},
        **layout,
    )
    return fig


def _step_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The rows with a numeric step, at the largest layer where there is a layer column; and
    the notes on what was chosen."""
    frame = df.copy()
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    frame = frame.dropna(subset=["step"])
    notes = []
    if "layer" in frame.columns and _is_value_column(frame["layer"]):
        frame, layer = pick_rows(frame, "layer", None, largest=True)
        notes.append(f"layer {format_value(layer)}")
    return frame, notes


def _groups_and_values(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The columns that name a line (few values; integer ``*step``/``*layer`` columns), those
    of :data:`_GROUP_HINTS` first, and the numeric value columns with any value. Sample
    numbers and text columns with many values are neither (they are averaged over)."""
    groups: list[str] = []
    values: list[str] = []
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
    hinted: list[str] = [g for g in _GROUP_HINTS if g in groups]
    return hinted + [g for g in groups if g not in hinted], values


def _group_lines(
    frame: pd.DataFrame, groups: list[str], notes: list[str]
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """``frame`` with a ``_group`` column (the group values joined, or ``all``), the first
    :data:`_MAX_GROUPS` group names (a note is added where there are more) and each group's
    colour (that of its first group column's value)."""
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
    return frame, names, color_of


def _add_value_lines(
    fig: go.Figure,
    frame: pd.DataFrame,
    value: str,
    names: list[str],
    color_of: dict[str, str],
    *,
    visible: bool,
) -> tuple[str, int, int]:
    """Add one line per group of the mean (error bars: one standard error) of ``value`` over
    steps; returns ``(value, first trace index, end trace index)``."""
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
                visible=visible,
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
    return value, start, len(fig.data)


def _value_menu(visible_sets: list[tuple[str, int, int]], n_traces: int) -> dict[str, Any]:
    """The layout entry of a menu that shows one value column's lines at a time."""
    buttons = []
    for value, start, stop in visible_sets:
        vis = [start <= i < stop for i in range(n_traces)]
        buttons.append(
            {
                "label": str(value),
                "method": "update",
                "args": [{"visible": vis}, {"yaxis.title.text": str(value)}],
            }
        )
    return {
        "updatemenus": [
            {
                "buttons": buttons,
                "direction": "down",
                "x": 1.0,
                "xanchor": "right",
                "y": 1.15,
                "yanchor": "top",
            }
        ]
    }


# --------------------------------------------------------------------------------------------
# figures of the explanation analyses (attribution, transfer, DLA, geometry, probes, baseline)
