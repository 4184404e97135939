"""Which slice of a steering sensitivity table a figure or a test uses: the setting
(:class:`Selection`, :func:`select_sensitivity`) and Figure 2's per-step means over prompts
(:func:`diagonal_summary`)."""

from dataclasses import dataclass

import pandas as pd

from emolens.analysis.frames import format_value, mean_se_over_prompts, pick_rows, require_columns

#: The columns ``sensitivity.csv`` must have (the measure columns are checked separately).
SENSITIVITY_KEYS = ("step", "layer", "steered_emotion", "observed_label", "alpha", "prompt_id")
#: Measures of a steering effect in ``sensitivity.csv``.
MEASURES = ("logit_change", "logprob_change", "centered_change")


def check_measure(sensitivity: pd.DataFrame, measure: str) -> None:
    if measure not in sensitivity.columns:
        present = [m for m in MEASURES if m in sensitivity.columns]
        raise ValueError(
            f"the sensitivity table has no measure {measure!r}; it has "
            f"{', '.join(present) or 'none of ' + ', '.join(MEASURES)}"
        )


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
    check_measure(sensitivity, measure)
    frame = sensitivity
    if diagonal:
        frame = frame[frame["steered_emotion"] == frame["observed_label"]]
        if frame.empty:
            raise ValueError(
                "the sensitivity table has no diagonal rows (steered_emotion == "
                "observed_label), so the steering effect on a label cannot be shown"
            )
    frame, alpha_unit = pick_rows(frame, "alpha_unit", alpha_unit, prefer="absolute")
    frame, positions = pick_rows(frame, "positions", positions, prefer="all")
    if not all_layers:
        frame, layer = pick_rows(frame, "layer", layer, largest=True)
        layer = int(layer)
    frame, alpha = pick_rows(frame, "alpha", alpha, largest=True)
    return frame, Selection(layer, float(alpha), alpha_unit, positions, measure)


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
    out = mean_se_over_prompts(frame, ["steered_emotion", "step"], measure)
    return out.rename(columns={"steered_emotion": "emotion"}), sel
