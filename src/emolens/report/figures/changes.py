"""The change tests across the series as a table (``change_summary.csv``)."""

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from emolens.analysis.change_summary import change_summary_counts
from emolens.analysis.frames import (
    format_value,
)


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
