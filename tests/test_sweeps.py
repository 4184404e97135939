"""Layer summaries from planted sensitivity and probe tables: the planted layers come back."""

import numpy as np
import pandas as pd
import pytest

from emolens.analysis import sweeps

LAYERS = (0, 1, 2, 3)
STEPS = (0, 4)
PROMPTS = ("p0", "p1", "p2")
#: (step, emotion) -> the layer where steering peaks, at the largest alpha (4).
PEAK = {(0, "joy"): 2, (4, "joy"): 1, (0, "trust"): 3, (4, "trust"): 3}
#: At alpha 2 the peaks are elsewhere, to check that alpha chooses the rows.
PEAK_ALPHA2 = {(0, "joy"): 0, (4, "joy"): 0, (0, "trust"): 1, (4, "trust"): 1}


def make_sensitivity(seed: int = 0) -> pd.DataFrame:
    """Diagonal effect 5 at the planted layer, 1 elsewhere, with prompt noise; off-diagonal
    rows are larger still (10) at layer 0, so a summary that read them would fail."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in STEPS:
        for layer in LAYERS:
            for emotion in ("joy", "trust"):
                for observed in ("joy", "trust", "fear"):
                    for alpha, peaks in ((2.0, PEAK_ALPHA2), (4.0, PEAK)):
                        for prompt in PROMPTS:
                            if observed == emotion:
                                base = 5.0 if peaks[(step, emotion)] == layer else 1.0
                                value = base + rng.normal(0, 0.1)
                            else:
                                value = 10.0 if layer == 0 else 0.0
                            rows.append(
                                {
                                    "step": step,
                                    "layer": layer,
                                    "steered_emotion": emotion,
                                    "observed_label": observed,
                                    "alpha": alpha,
                                    "alpha_unit": "absolute",
                                    "positions": "all",
                                    "prompt_id": prompt,
                                    "logit_change": value,
                                }
                            )
    return pd.DataFrame(rows)


#: (step, label) -> layer of the best own-probe recall; no-emotion ties at layers 1 and 2.
RECALL_PEAK = {(0, "joy"): 1, (4, "joy"): 3, (0, "trust"): 0, (4, "trust"): 2}


def make_probes() -> pd.DataFrame:
    """Own-probe recall 0.9 at the planted layer, 0.3 elsewhere; the first step's probe on
    later steps scores 1.0 at layer 0 (must be ignored); no-emotion ties at 0.8 on layers 1
    and 2; shame is never recalled."""
    rows = []

    def add(step, layer, label, value, train_step):
        rows.append(
            {
                "step": step,
                "layer": layer,
                "measure": "recall",
                "label": label,
                "value": value,
                "ci_low": value - 0.1,
                "ci_high": value + 0.1,
                "train_step": train_step,
                "n": 10,
            }
        )

    for step in STEPS:
        for layer in LAYERS:
            for label in ("joy", "trust"):
                add(step, layer, label, 0.9 if RECALL_PEAK[(step, label)] == layer else 0.3, step)
            add(step, layer, "no-emotion", 0.8 if layer in (1, 2) else 0.2, step)
            add(step, layer, "shame", 0.0, step)
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "measure": "accuracy",
                    "label": "all",
                    "value": 0.99,
                    "ci_low": 0.9,
                    "ci_high": 1.0,
                    "train_step": step,
                    "n": 40,
                }
            )
            if step != STEPS[0]:
                for label in ("joy", "trust"):
                    add(step, layer, label, 1.0 if layer == 0 else 0.0, STEPS[0])
    return pd.DataFrame(rows)


def _row(frame: pd.DataFrame, step: int, emotion: str) -> pd.Series:
    (row,) = [r for _, r in frame.iterrows() if r.step == step and r.emotion == emotion]
    return row


def test_steerability_finds_the_planted_layer_on_the_diagonal_at_the_largest_alpha():
    sens = make_sensitivity()
    out = sweeps.steerability(sens)
    for (step, emotion), layer in PEAK.items():
        row = _row(out, step, emotion)
        assert row.most_steerable_layer == layer
        diag = sens[
            (sens.step == step)
            & (sens.layer == layer)
            & (sens.steered_emotion == emotion)
            & (sens.observed_label == emotion)
            & (sens.alpha == 4.0)
        ]
        assert row.max_effect == pytest.approx(sum(diag.logit_change) / len(diag))
        assert row.n_steer_layers == 4
    small = sweeps.steerability(sens, alpha=2)
    for (step, emotion), layer in PEAK_ALPHA2.items():
        assert _row(small, step, emotion).most_steerable_layer == layer


def test_decodability_reads_the_own_probe_and_breaks_ties_toward_the_shallowest_layer():
    out = sweeps.decodability(make_probes())
    for (step, label), layer in RECALL_PEAK.items():
        row = _row(out, step, label)
        assert row.most_decodable_layer == layer
        assert row.recall == pytest.approx(0.9)
        assert (row.recall_ci_low, row.recall_ci_high) == pytest.approx((0.8, 1.0))
    assert _row(out, 0, "no-emotion").most_decodable_layer == 1
    assert pd.isna(_row(out, 4, "shame").most_decodable_layer)  # never recalled anywhere


def test_layer_summary_puts_both_side_by_side_in_label_order():
    summary = sweeps.layer_summary(make_sensitivity(), make_probes())
    assert list(summary.columns) == list(sweeps.SUMMARY_COLUMNS)
    assert summary[summary.step == 0].emotion.tolist() == ["joy", "shame", "trust", "no-emotion"]
    joy = _row(summary, 4, "joy")
    assert (joy.most_steerable_layer, joy.most_decodable_layer) == (1, 3)
    neutral = _row(summary, 0, "no-emotion")  # probed, never steered
    assert pd.isna(neutral.most_steerable_layer) and neutral.most_decodable_layer == 1
    assert str(summary["most_steerable_layer"].dtype) == "Int64"


def test_layer_summary_takes_one_table_alone_and_needs_one():
    only_steer = sweeps.layer_summary(make_sensitivity(), None)
    assert only_steer["most_decodable_layer"].isna().all()
    assert _row(only_steer, 0, "trust").most_steerable_layer == 3
    only_probes = sweeps.layer_summary(None, make_probes())
    assert only_probes["most_steerable_layer"].isna().all()
    with pytest.raises(ValueError, match="needs a sensitivity table, a probes table or both"):
        sweeps.layer_summary(None, None)


def test_layer_moves_compares_the_first_and_last_step():
    moves = sweeps.layer_moves(sweeps.layer_summary(make_sensitivity(), make_probes()))
    joy = moves[moves.emotion == "joy"].iloc[0]
    assert (joy.first_step, joy.last_step) == (0, 4)
    assert (joy.steerable_first, joy.steerable_last) == (2, 1)
    assert (joy.decodable_first, joy.decodable_last) == (1, 3)
    trust = moves[moves.emotion == "trust"].iloc[0]
    assert (trust.steerable_first, trust.steerable_last) == (3, 3)
    shame = moves[moves.emotion == "shame"].iloc[0]
    assert pd.isna(shame.steerable_first) and pd.isna(shame.decodable_last)
