"""The sample set behind cross-step geometry: a fixed set removes the change that a moving
self-filtered kept set makes by itself, and ``kept_set_effect.csv`` measures that change."""

import numpy as np
import pandas as pd
import pytest
import torch

from emolens.analysis.sample_sets import comparison_masks, restrict_to_set
from emolens.analysis.steps import StepData
from emolens.measure.activations import Activations
from emolens.measure.vectors import ConceptVectors
from emolens.run.config import AnalysisConfig
from emolens.run.merge import _cross_step_tables

LABELS = ("anger", "joy", "sadness", "no-emotion")
EMOTIONS = LABELS[:-1]
LAYERS = (0, 1)
D, N_PER = 16, 30


def _residuals(seed=0):
    gen = torch.Generator().manual_seed(seed)
    gold = torch.arange(len(LABELS)).repeat_interleave(N_PER)
    centres = 2.0 * torch.randn(len(LABELS), D, generator=gen)
    resid = centres[gold][:, None, :] + torch.randn(len(gold), len(LAYERS), D, generator=gen)
    return resid, gold


def _step(step, resid, gold, keep):
    n = len(gold)
    acts = Activations(
        resid, torch.zeros(n, len(LABELS)), torch.zeros(n), torch.zeros(n), LAYERS,
        tuple(f"s{i}" for i in range(n)), gold, LABELS,
    )  # fmt: skip
    means = torch.stack([resid[keep & (gold == j)].mean(0) for j in range(len(LABELS))], 1)
    counts = torch.tensor([int((keep & (gold == j)).sum()) for j in range(len(EMOTIONS))])
    vectors = ConceptVectors(
        means[:, :-1] - means[:, -1:], counts, EMOTIONS, LAYERS, "no-emotion",
        int((keep & (gold == len(LABELS) - 1)).sum()),
    )  # fmt: skip
    return StepData(step, acts, vectors, None, keep, None, max(LAYERS) + 1)


@pytest.fixture(scope="module")
def two_steps():
    """Identical residuals at steps 0 and 100; step 0 keeps a quarter of each label (as a base
    model that gets few right), step 100 nine in ten (after fine-tuning)."""
    resid, gold = _residuals()
    within = torch.arange(len(gold)) % N_PER
    return [
        _step(0, resid, gold, within < N_PER // 4),
        _step(100, resid.clone(), gold, within < (9 * N_PER) // 10),
    ]


def _tables(steps, compare_set):
    config = AnalysisConfig(n_boot=50, compare_set=compare_set, min_count=3)
    return _cross_step_tables(steps, [], LABELS, config)


def _change(geometry, measure="vector_norm"):
    g = geometry[(geometry.measure == measure) & (geometry.inner == "plain")]
    wide = g.pivot_table(index=["layer", "emotion"], columns="step", values="value")
    return (wide[100] - wide[0]).to_numpy()


@pytest.mark.parametrize("measure", ["vector_norm", "within_own", "orthogonality"])
def test_fixed_set_leaves_identical_residuals_unchanged_while_self_filtering_moves_them(
    two_steps, measure
):
    fixed = _tables(two_steps, "first")
    own = _tables(two_steps, "own")
    assert np.abs(_change(fixed["geometry"], measure)).max() == 0.0
    assert np.abs(_change(own["geometry"], measure)).max() > 1e-3
    cos = fixed["geometry"].query("measure == 'cosine_to_first' and step == 100")["value"]
    assert np.allclose(cos, 1.0, atol=1e-12)
    assert (
        own["geometry"].query("measure == 'cosine_to_first' and step == 100")["value"].min() < 0.999
    )


def test_kept_set_effect_reports_the_difference_of_the_two_sets(two_steps):
    fixed = _tables(two_steps, "first")
    own = _tables(two_steps, "own")
    keys = ["step", "layer", "measure", "emotion", "inner"]
    for tables in (fixed, own):  # the same table whichever set the geometry uses
        effect = tables["kept_set_effect"].set_index(keys)
        expected = (
            own["geometry"].set_index(keys)["value"] - fixed["geometry"].set_index(keys)["value"]
        )
        both = pd.concat([effect["kept_set_effect"], expected.rename("expected")], axis=1)
        both = both.dropna()
        assert len(both) > 20
        np.testing.assert_allclose(both["kept_set_effect"], both["expected"], atol=1e-12)
        assert (effect.xs(0, level="step")["kept_set_effect"].abs().max()) == 0.0
        assert (effect.xs(100, level="step")["kept_set_effect"].abs().max()) > 1e-3
        assert set(effect["n_own"].groupby("step").first()) == {4 * 7, 4 * 27}
        assert set(effect["fixed_set"]) == {"first"}


def test_fixed_set_pairs_the_change_test(two_steps):
    summary = _tables(two_steps, "first")["change_summary"]
    geo = summary[summary.table == "geometry"]
    assert geo["paired"].all()
    assert (
        not _tables(two_steps, "own")["change_summary"].query("table == 'geometry'")["paired"].any()
    )


def test_the_all_set_excludes_the_steered_prompts_and_keeps_every_label(two_steps):
    masks = comparison_masks(two_steps, "all", prompt_ids=["s0", "s1"])
    for m in masks.values():
        assert int(m.sum()) == len(m) - 2 and not m[:2].any()


def test_too_few_neutral_samples_in_the_fixed_set_is_a_clear_error(two_steps):
    masks = {s.step: torch.zeros_like(s.keep) for s in two_steps}
    with pytest.raises(ValueError, match="--compare-set all"):
        restrict_to_set(two_steps, masks, LABELS, "no-emotion", 3)


def test_an_emotion_with_too_few_fixed_samples_drops_out_of_the_geometry():
    resid, gold = _residuals(1)
    within = torch.arange(len(gold)) % N_PER
    base_keep = (within < 8) & ~((gold == 1) & (within >= 2))  # joy: 2 at the base model
    steps = [_step(0, resid, gold, base_keep), _step(5, resid, gold, within < 25)]
    steps[0] = StepData(
        0, steps[0].acts, steps[1].vectors, None, base_keep, None, 2
    )  # joy has a vector here only in this synthetic case
    restricted, dropped = restrict_to_set(
        steps, comparison_masks(steps, "first"), LABELS, "no-emotion", 3
    )
    assert dropped == {0: ("joy",), 5: ("joy",)}
    assert all("joy" not in s.vectors.emotions for s in restricted)


def test_unknown_compare_set_is_refused():
    with pytest.raises(ValueError, match="--compare-set"):
        AnalysisConfig(compare_set="base")
