"""Colours, names and small plotly helpers shared by the figures."""

import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.frames import (
    format_value,
    pick_rows,
)
from emolens.data.labels import STUDY_LABELS, UnknownLabelError

#: The page's and the figures' fonts: Japanese label names need a CJK font (Noto on Linux,
#: Hiragino on macOS, Yu Gothic or Meiryo on Windows) before the generic family.
FONT_STACK = (
    'system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans CJK JP", "Noto Sans JP", '
    '"Hiragino Sans", "Hiragino Kaku Gothic ProN", "Yu Gothic", Meiryo, sans-serif'
)


def with_fonts(fig: go.Figure) -> go.Figure:
    """``fig`` with its text in :data:`FONT_STACK` (Japanese label names render)."""
    return fig.update_layout(font_family=FONT_STACK)


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


_GRID_COLS = 4
_MEASURED_COLOR = "#222222"
_CHANCE_COLOR = "#999999"
_RANDOM_COLOR = "#7f7f7f"
_ALL_COLOR = "#333333"


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
