"""Layer sweeps summarised: where in depth each emotion is most steerable and most decodable,
and how that moves with fine-tuning (issue 6).

Pure functions over the long tables the pipeline writes: ``sensitivity.csv`` from an analysis
with several steer layers (``--steer-layers all``) and ``probes.csv`` (probes at every
collected layer, ``--layers all``). Nothing here loads a model.

- :func:`steerability`: per step and emotion, the steer layer with the largest diagonal effect
  (the steered emotion's own label measure, mean over prompts) at one alpha.
- :func:`decodability`: per step and label, the layer whose own probe (trained at that step)
  has the highest held-out recall for the label.
- :func:`layer_summary`: both side by side; :func:`layer_moves`: the first and last step of
  each emotion's series, to say whether the layer moved.

Ties go to the shallowest layer (a layer sweep of a small model often has several layers
with recall 1.0); a label that no layer's probe recalls at all (recall 0 everywhere) has no
most decodable layer (missing, not layer 0).
"""

import numpy as np
import pandas as pd

from emolens.analysis.frames import label_order, require_columns
from emolens.analysis.sensitivity import select_sensitivity

#: Columns of :func:`layer_summary`.
SUMMARY_COLUMNS = (
    "step",
    "emotion",
    "most_steerable_layer",
    "max_effect",
    "n_steer_layers",
    "most_decodable_layer",
    "recall",
    "recall_ci_low",
    "recall_ci_high",
    "n_probe_layers",
)


def _argmax_layer(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Per group of ``keys``: the row of the largest finite ``value`` (shallowest layer on a
    tie), plus ``n_layers`` (layers with a finite value in the group)."""
    finite = frame[np.isfinite(frame[value].to_numpy(dtype=float))]
    if finite.empty:
        return pd.DataFrame(columns=[*keys, "layer", value, "n_layers"])
    ordered = finite.sort_values([*keys, "layer"], kind="stable")
    best = ordered.loc[ordered.groupby(keys, sort=True)[value].idxmax()]
    counts = finite.groupby(keys, sort=True)["layer"].nunique().rename("n_layers")
    return best.merge(counts.reset_index(), on=keys)


def steerability(
    sensitivity: pd.DataFrame,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
) -> pd.DataFrame:
    """Per ``step, emotion``: ``most_steerable_layer`` (the steer layer with the largest mean
    diagonal ``measure`` over prompts), ``max_effect`` (that mean) and ``n_steer_layers``.
    Alpha: the largest present by default (absolute units and all positions preferred, as in
    :func:`emolens.analysis.sensitivity.select_sensitivity`)."""
    frame, _ = select_sensitivity(
        sensitivity,
        None,
        alpha,
        measure,
        alpha_unit=alpha_unit,
        positions=positions,
        all_layers=True,
    )
    per_prompt = frame.groupby(["step", "layer", "steered_emotion", "prompt_id"], sort=True)[
        measure
    ].mean()
    means = per_prompt.groupby(level=["step", "layer", "steered_emotion"]).mean().reset_index()
    means = means.rename(columns={"steered_emotion": "emotion"})
    best = _argmax_layer(means, ["step", "emotion"], measure)
    return best.rename(
        columns={
            "layer": "most_steerable_layer",
            measure: "max_effect",
            "n_layers": "n_steer_layers",
        }
    )[["step", "emotion", "most_steerable_layer", "max_effect", "n_steer_layers"]]


def decodability(probes: pd.DataFrame) -> pd.DataFrame:
    """Per ``step, emotion`` (a probe label): ``most_decodable_layer`` (the layer whose probe,
    trained at that step, has the highest held-out recall of the label), ``recall`` there with
    its interval (``recall_ci_low/high`` where the table has them) and ``n_probe_layers``."""
    require_columns(probes, ("step", "layer", "measure", "label", "value"), "the probes table")
    rows = probes[probes["measure"] == "recall"]
    if "train_step" in rows.columns:
        rows = rows[rows["train_step"] == rows["step"]]
    rows = rows.rename(columns={"label": "emotion", "value": "recall"})
    if "ci_low" not in rows:
        rows = rows.assign(ci_low=np.nan, ci_high=np.nan)
    best = _argmax_layer(
        rows[["step", "layer", "emotion", "recall", "ci_low", "ci_high"]],
        ["step", "emotion"],
        "recall",
    )
    # a label no layer's probe ever recalls has no most decodable layer
    best["layer"] = best["layer"].where(best["recall"] > 0)
    best = best.rename(
        columns={
            "layer": "most_decodable_layer",
            "ci_low": "recall_ci_low",
            "ci_high": "recall_ci_high",
            "n_layers": "n_probe_layers",
        }
    )
    return best[
        [
            "step",
            "emotion",
            "most_decodable_layer",
            "recall",
            "recall_ci_low",
            "recall_ci_high",
            "n_probe_layers",
        ]
    ]


def layer_summary(
    sensitivity: pd.DataFrame | None,
    probes: pd.DataFrame | None,
    alpha: float | int | None = None,
    measure: str = "logit_change",
    *,
    alpha_unit: str | None = None,
    positions: str | None = None,
) -> pd.DataFrame:
    """Per ``step, emotion``: the most steerable layer and its effect (:func:`steerability`)
    beside the most decodable layer and its recall (:func:`decodability`); either table may be
    None (its columns are then NaN). Emotions appear if either table has them (the neutral
    label is probed but never steered); rows in step order, then the study's label order."""
    if sensitivity is None and probes is None:
        raise ValueError("layer_summary needs a sensitivity table, a probes table or both")
    parts = []
    if sensitivity is not None:
        parts.append(
            steerability(sensitivity, alpha, measure, alpha_unit=alpha_unit, positions=positions)
        )
    if probes is not None:
        parts.append(decodability(probes))
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part, on=["step", "emotion"], how="outer")
    for col in SUMMARY_COLUMNS:
        if col not in out:
            out[col] = np.nan
    for col in ("most_steerable_layer", "n_steer_layers", "most_decodable_layer", "n_probe_layers"):
        out[col] = pd.to_numeric(out[col]).astype("Int64")
    order = {e: i for i, e in enumerate(label_order(out["emotion"].dropna()))}
    out = out.assign(_o=out["emotion"].map(order)).sort_values(["step", "_o"], kind="stable")
    return out[list(SUMMARY_COLUMNS)].reset_index(drop=True)


def layer_moves(summary: pd.DataFrame) -> pd.DataFrame:
    """Per emotion: the most steerable and most decodable layer at the emotion's first and last
    step (``steerable_first``, ``steerable_last``, ``decodable_first``, ``decodable_last``, with
    ``first_step`` and ``last_step``); missing where the layer is unknown at that step."""
    require_columns(summary, ("step", "emotion"), "the layer summary")
    rows = []
    for emotion in label_order(summary["emotion"].dropna()):
        g = summary[summary["emotion"] == emotion].sort_values("step")
        row = {"emotion": emotion, "first_step": g["step"].min(), "last_step": g["step"].max()}
        for column, name in (
            ("most_steerable_layer", "steerable"),
            ("most_decodable_layer", "decodable"),
        ):
            for end, step in (("first", row["first_step"]), ("last", row["last_step"])):
                at = g.loc[g["step"] == step, column] if column in g else pd.Series(dtype=float)
                row[f"{name}_{end}"] = at.iloc[0] if len(at) else np.nan
        rows.append(row)
    out = pd.DataFrame(
        rows,
        columns=[
            "emotion",
            "first_step",
            "last_step",
            "steerable_first",
            "steerable_last",
            "decodable_first",
            "decodable_last",
        ],
    )
    for col in out.columns[3:]:
        out[col] = pd.to_numeric(out[col]).astype("Int64")
    return out


__all__ = ["SUMMARY_COLUMNS", "decodability", "layer_moves", "layer_summary", "steerability"]
