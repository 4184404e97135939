"""Figures of the study, as pure functions from result tables to ``plotly`` figures.

Every function takes the long-format tables the pipeline writes (``sensitivity.csv``,
``filtering.csv``, ``steps.csv``, a trainer log, the optional tables of the explanation
analyses) and returns a :class:`plotly.graph_objects.Figure`; nothing here reads files or calls
``show()``. Emotions are named in English with the Japanese in the hover text, and each emotion
keeps one colour in every figure (:func:`emotion_color`).

The "diagonal" of the sensitivity table (``steered_emotion == observed_label``) is the paper's
Figure 2: how much steering with an emotion's concept vector raises that emotion's own logit.
"""

from emolens.report.figures._style import (
    EMOTION_COLORS,
    display_name,
    emotion_color,
    japanese_name,
)
from emolens.report.figures.changes import (
    change_summary_table,
)
from emolens.report.figures.concepts import (
    geometry_figure,
    probe_rows,
    probes_figure,
    random_baseline_figure,
)
from emolens.report.figures.explanation import (
    ATTRIBUTION_PARTS,
    PUSH_PARTS,
    attribution_figure,
    dla_figure,
    push_change_figure,
    transfer_heatmap,
)
from emolens.report.figures.layers import (
    geometry_layer_heatmap,
    layer_step_views,
    layer_summary_figure,
    localisation_heatmap,
    probes_layer_heatmap,
)
from emolens.report.figures.steering import (
    figure2,
    layer_step_heatmap,
    selectivity_heatmap,
)
from emolens.report.figures.tables import (
    generic_table_figure,
)
from emolens.report.figures.training import (
    accuracy_curve,
    filtering_bars,
    loss_curve,
)

__all__ = [
    "ATTRIBUTION_PARTS",
    "EMOTION_COLORS",
    "PUSH_PARTS",
    "accuracy_curve",
    "attribution_figure",
    "change_summary_table",
    "display_name",
    "dla_figure",
    "emotion_color",
    "figure2",
    "filtering_bars",
    "generic_table_figure",
    "geometry_figure",
    "geometry_layer_heatmap",
    "japanese_name",
    "layer_step_heatmap",
    "layer_step_views",
    "layer_summary_figure",
    "localisation_heatmap",
    "loss_curve",
    "probe_rows",
    "probes_figure",
    "probes_layer_heatmap",
    "push_change_figure",
    "random_baseline_figure",
    "selectivity_heatmap",
    "transfer_heatmap",
]
