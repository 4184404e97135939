"""Bootstrap intervals cover what they should, the vectorised path equals the obvious loop,
the change rule does what its docstring says, and random baselines keep the norms."""

import pytest
import torch

from emolens.analysis.stats import (
    bootstrap_ci,
    bootstrap_indices,
    bootstrap_statistic,
    change_exceeds_ci,
    difference_from_first,
    random_direction_like,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensor ops: one thread


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    gen = torch.Generator().manual_seed(123)
    hits = 0
    for rep in range(200):
        values = 2.0 + 3.0 * torch.randn(50, generator=gen, dtype=torch.float64)
        res = bootstrap_ci(values, n_boot=300, ci=0.95, seed=rep)
        assert res.low <= res.estimate <= res.high
        hits += int(res.low <= 2.0 <= res.high)
    assert 0.88 <= hits / 200 <= 0.99


def test_vectorised_interval_equals_the_slow_loop_for_the_same_seed():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4, 25, generator=gen)
    res = bootstrap_ci(values, n_boot=200, ci=0.9, seed=7)
    idx = bootstrap_indices(25, 200, seed=7)
    slow = torch.stack([values[..., row].to(torch.float64).mean(-1) for row in idx], dim=-1)
    torch.testing.assert_close(res.samples, slow)
    torch.testing.assert_close(res.low, torch.quantile(slow, 0.05, dim=-1))
    torch.testing.assert_close(res.high, torch.quantile(slow, 0.95, dim=-1))
    torch.testing.assert_close(res.estimate, values.to(torch.float64).mean(-1))
    assert res.low.shape == (3, 4)


def test_statistic_of_indices_matches_the_mean_interval():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(30, generator=gen, dtype=torch.float64)
    direct = bootstrap_ci(values, n_boot=100, seed=3)
    via_fn = bootstrap_statistic(30, lambda idx: values[idx].mean(), n_boot=100, seed=3)
    torch.testing.assert_close(via_fn.low, direct.low)
    torch.testing.assert_close(via_fn.high, direct.high)
    torch.testing.assert_close(via_fn.estimate, direct.estimate)


def test_stratified_resampling_keeps_every_class_for_concept_vector_cosines():
    gen = torch.Generator().manual_seed(2)
    labels = torch.tensor([0] * 3 + [1] * 20 + [2] * 20)
    idx = bootstrap_indices(len(labels), 500, seed=0, strata=labels)
    assert torch.equal(labels[idx], labels.expand(500, -1))
    direction = torch.randn(8, generator=gen)
    resid = torch.randn(len(labels), 8, generator=gen) + 4 * direction * (labels == 1)[:, None]

    def cos(i):
        means = torch.stack([resid[i][labels[i] == e].mean(0) for e in range(3)])
        v = means[1:] - means[0]
        return torch.cosine_similarity(v[0], direction, dim=0)

    res = bootstrap_statistic(len(labels), cos, n_boot=200, seed=0, strata=labels)
    assert torch.isfinite(res.samples).all()
    assert res.low <= res.estimate <= res.high and res.low > 0.8


def test_change_rule_outside_and_disjoint():
    est = torch.tensor([[1.0, 1.0], [1.05, 2.0], [1.15, 1.0]])
    low = est - 0.1
    high = est + 0.1
    test = change_exceeds_ci(est, low, high)
    # step 1: 1.05 inside [0.9, 1.1]; 2.0 outside and its interval [1.9, 2.1] is disjoint
    # step 2: 1.15 outside [0.9, 1.1] but its interval [1.05, 1.25] overlaps
    assert test.outside.tolist() == [[False, False], [False, True], [True, False]]
    assert test.disjoint.tolist() == [[False, False], [False, True], [False, False]]
    assert test.any_outside.tolist() == [True, True]
    assert test.any_disjoint.tolist() == [False, True]
    nan = change_exceeds_ci(
        torch.tensor([1.0, float("nan")]), torch.tensor([0.9, 0.0]), torch.tensor([1.1, 0.1])
    )
    assert not nan.any_outside


def test_paired_difference_detects_a_small_shift_hidden_by_sample_spread():
    gen = torch.Generator().manual_seed(4)
    base = 5.0 * torch.randn(100, generator=gen, dtype=torch.float64)  # spread across prompts
    series = torch.stack(
        [
            base,
            base + 0.3 + 0.1 * torch.randn(100, generator=gen),
            base + 0.01 * torch.randn(100, generator=gen),
        ]
    )
    res = bootstrap_ci(series, n_boot=400, seed=0)
    unpaired = change_exceeds_ci(res.estimate, res.low, res.high)
    assert not unpaired.any_disjoint and not unpaired.outside[1]
    diff = difference_from_first(res)
    assert diff.excludes(0.0).tolist() == [False, True, False]
    assert diff.estimate[1].item() == pytest.approx(0.3, abs=0.05)


def test_random_direction_like_keeps_norms_and_is_seeded():
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(2, 13, 64, generator=gen) * torch.arange(1, 14)[None, :, None]
    v[0, 3] = 0.0
    r = random_direction_like(v, seed=1)
    torch.testing.assert_close(r.norm(dim=-1), v.norm(dim=-1))
    assert r.dtype == v.dtype
    assert torch.equal(r, random_direction_like(v, seed=1))
    assert not torch.equal(r, random_direction_like(v, seed=2))
    cos = torch.cosine_similarity(r[1], v[1], dim=-1)
    assert cos.abs().max() < 0.6  # random in 64 dimensions: nearly orthogonal to the concept
