"""Geometry: causal inner product, cosine matrices, within-concept similarity, orthogonality,
stability and principal angles, each checked against a planted structure."""

import math

import pytest
import torch

from emolens.analysis.geometry import (
    CausalInnerProduct,
    cosine,
    cosine_matrix,
    orthogonality,
    principal_angles,
    stability,
    subspace_angles_by_step,
    within_concept_similarity,
)


def _anisotropic_unembedding(vocab=400, d=8, seed=0):
    """Unembedding rows with variance 100 along axis 0 and 1 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.ones(d, dtype=torch.float64)
    scale[0] = 10.0
    return torch.randn(vocab, d, generator=gen, dtype=torch.float64) * scale + 3.0


def test_whitened_plain_inner_product_equals_inverse_covariance_form():
    W_U = _anisotropic_unembedding()
    cip = CausalInnerProduct.from_unembedding(W_U, ridge=1e-6)
    cov = torch.cov(W_U.T)
    cov = cov + 1e-6 * torch.diagonal(cov).mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    slow = torch.einsum("bi,ij,bj->b", x, torch.linalg.inv(cov), y)
    torch.testing.assert_close(cip.inner(x, y), slow, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((cip.whiten(x) * cip.whiten(y)).sum(-1), slow)
    torch.testing.assert_close(cip.cov, torch.cov(W_U.T))
    torch.testing.assert_close(cip.mean, W_U.mean(0))


def test_chunked_covariance_matches_single_chunk_and_token_subset():
    W_U = _anisotropic_unembedding(vocab=301).to(torch.float32)
    whole = CausalInnerProduct.from_unembedding(W_U, chunk_size=10_000)
    chunked = CausalInnerProduct.from_unembedding(W_U, chunk_size=7)
    torch.testing.assert_close(chunked.whitener, whole.whitener, rtol=1e-10, atol=1e-12)
    ids = [3, 5, 8, 13, 21, 34, 55, 89, 144, 233]
    sub = CausalInnerProduct.from_unembedding(W_U, token_ids=ids, chunk_size=3)
    torch.testing.assert_close(sub.cov, torch.cov(W_U[ids].T.to(torch.float64)))
    assert sub.n_tokens == len(ids)


def test_causal_cosine_discounts_the_high_variance_unembedding_direction():
    cip = CausalInnerProduct.from_unembedding(_anisotropic_unembedding(vocab=20_000))
    e0 = torch.zeros(8, dtype=torch.float64)
    e0[0] = 1.0
    e1 = torch.zeros(8, dtype=torch.float64)
    e1[1] = 1.0
    x, y = e0 + e1, e0
    # plain: 1/sqrt(2); causal: axis 0 weighs 1/100, so x is nearly e1: cos ~ 0.1/sqrt(1.01)
    assert cosine(x, y).item() == pytest.approx(1 / math.sqrt(2))
    assert cip.cosine(x, y).item() == pytest.approx(0.1 / math.sqrt(1.01), abs=0.01)
    # the other way round: directions differing only along the high-variance axis look alike
    a, b = e1 + 0.5 * e0, e1 - 0.5 * e0
    assert cosine(a, b).item() == pytest.approx(0.6)
    assert cip.cosine(a, b).item() > 0.99


def test_dual_transform_preserves_pairing_with_unembedding_vectors():
    W_U = _anisotropic_unembedding()
    primal = CausalInnerProduct.from_unembedding(W_U)
    dual = CausalInnerProduct.from_unembedding(W_U, dual=True)
    gen = torch.Generator().manual_seed(2)
    gamma, lam = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(primal.whiten(gamma) @ dual.whiten(lam), gamma @ lam)


def test_cosine_matrix_plain_and_causal():
    v = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    cos = cosine_matrix(v)
    torch.testing.assert_close(torch.diagonal(cos), torch.ones(3))
    assert cos[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[0, 2].item() == pytest.approx(0.0)
    torch.testing.assert_close(cos, cos.T)
    cip = CausalInnerProduct.from_unembedding(_anisotropic_unembedding(d=3).to(torch.float32))
    causal = cosine_matrix(v, cip)
    manual = cip.cosine(v[:, None, :].expand(3, 3, 3), v[None, :, :].expand(3, 3, 3))
    torch.testing.assert_close(causal, manual)


def test_zero_vectors_give_nan_and_are_skipped_by_orthogonality():
    v = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])
    cos = cosine_matrix(v)
    assert torch.isnan(cos[2]).all() and torch.isnan(cos[:, 2]).all()
    assert orthogonality(v).item() == pytest.approx(0.0)


def test_orthogonality_of_planted_angles():
    assert orthogonality(torch.eye(5)).item() == pytest.approx(0.0)
    v = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])  # 60, 180, 120 deg
    assert orthogonality(v).item() == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def _clusters(n_per=20, n_classes=4, d=16, spread=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=gen) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per)
    resid = centres[labels] + spread * torch.randn(len(labels), d, generator=gen)
    return resid, labels, centres


def test_within_concept_similarity_matches_slow_leave_one_out():
    resid, labels, _ = _clusters(n_per=5, n_classes=3, d=6, spread=1.0)
    resid, labels = resid[:-2], labels[:-2]  # unequal class sizes
    got = within_concept_similarity(resid, labels, n_emotions=4)
    for e in range(3):
        members = torch.nonzero(labels == e).flatten()
        own, other = [], []
        for i in members:
            rest = members[members != i]
            own.append(torch.cosine_similarity(resid[i], resid[rest].mean(0), dim=0))
            other.append(
                torch.stack(
                    [
                        torch.cosine_similarity(resid[i], resid[labels == f].mean(0), dim=0)
                        for f in range(3)
                        if f != e
                    ]
                ).mean()
            )
        assert got.own[e].item() == pytest.approx(torch.stack(own).mean().item(), abs=1e-5)
        assert got.other[e].item() == pytest.approx(torch.stack(other).mean().item(), abs=1e-5)
    assert got.count.tolist() == [5, 5, 3, 0]
    assert torch.isnan(got.own[3]) and torch.isnan(got.other[3])


def test_within_concept_similarity_finds_tight_clusters_and_centring_sharpens():
    resid, labels, _ = _clusters()
    offset = torch.full((16,), 20.0)  # a shared offset makes every raw cosine large
    res = within_concept_similarity(resid + offset, labels, 4)
    cen = within_concept_similarity(resid + offset, labels, 4, centred=True)
    assert (res.own > 0.99).all()
    assert (cen.own > 0.95).all() and (cen.gap > 0.8).all()
    assert (cen.other < res.other).all()
    single = within_concept_similarity(resid[:21], labels[:21], 4)
    assert torch.isnan(single.own[1]) and not torch.isnan(single.other[1])


def test_within_concept_similarity_causal_equals_plain_on_whitened_residuals():
    resid, labels, _ = _clusters(d=8)
    cip = CausalInnerProduct.from_unembedding(_anisotropic_unembedding().to(torch.float32))
    causal = within_concept_similarity(resid, labels, 4, inner=cip, centred=True)
    plain = within_concept_similarity(resid - resid.mean(0), labels, 4)
    manual = within_concept_similarity(cip.whiten(resid - resid.mean(0)), labels, 4)
    torch.testing.assert_close(causal.own, manual.own)
    assert not torch.allclose(causal.other, plain.other, atol=1e-3)


def test_stability_of_a_planted_drift():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 10, generator=gen)
    base[:, 1] = 0.0
    drift = torch.zeros(10)
    drift[1] = 1.0
    steps = torch.stack([base + t * base.norm(dim=1, keepdim=True) * drift for t in range(3)])
    s = stability(steps)
    torch.testing.assert_close(s.to_first[0], torch.ones(3))
    # base is orthogonal to drift: cos(v_t, v_0) = 1 / sqrt(1 + t^2)
    for t in range(3):
        torch.testing.assert_close(s.to_first[t], torch.full((3,), 1 / math.sqrt(1 + t * t)))
    assert torch.isnan(s.to_previous[0]).all()
    expected = (1 + 2) / (math.sqrt(2) * math.sqrt(5))  # cos(b + d, b + 2d), |b| = |d|
    torch.testing.assert_close(s.to_previous[2], torch.full((3,), expected))


def test_principal_angles_identical_orthogonal_and_planted_rotation():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64)).Q.T
    A = basis[:3]
    mix = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(principal_angles(A, mix @ A), zeros, atol=1e-7, rtol=0)
    torch.testing.assert_close(
        principal_angles(A, basis[3:6]), torch.full((3,), math.pi / 2, dtype=torch.float64)
    )
    theta = 0.3
    B = torch.stack([math.cos(theta) * basis[0] + math.sin(theta) * basis[5], basis[1], basis[2]])
    got = principal_angles(A, mix @ B)
    torch.testing.assert_close(
        got, torch.tensor([0.0, 0.0, theta], dtype=torch.float64), atol=1e-7, rtol=0
    )
    tiny = 1e-6
    B = torch.stack([math.cos(tiny) * basis[0] + math.sin(tiny) * basis[5]])
    assert principal_angles(A, B).item() == pytest.approx(tiny, rel=1e-6)


def test_principal_angles_drop_zero_and_dependent_rows():
    A = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, 0]])
    B = torch.tensor([[0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    torch.testing.assert_close(
        principal_angles(A, B), torch.tensor([0.0, math.pi / 2], dtype=torch.float64)
    )
    assert principal_angles(A, torch.zeros(2, 4)).numel() == 0


def test_subspace_angles_by_step_pads_with_nan():
    v0 = torch.eye(4)[:3].clone()
    v0[2] = 0.0  # a neutral row
    v1 = v0.clone()
    v1[1] = torch.tensor([0.0, math.cos(0.2), math.sin(0.2), 0.0])
    out = subspace_angles_by_step(torch.stack([v0, v1]))
    torch.testing.assert_close(out[0, :2], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(out[1, :2], torch.tensor([0.0, 0.2], dtype=torch.float64))
    assert torch.isnan(out[:, 2]).all()


def test_column_scale_equals_building_from_the_scaled_rows():
    """``column_scale=g`` is ``W_U * g`` without its copy (the effective unembedding)."""
    gen = torch.Generator().manual_seed(3)
    w_u = torch.randn(300, 8, generator=gen)
    g = torch.rand(8, generator=gen) + 0.5
    copy = CausalInnerProduct.from_unembedding(w_u.double() * g.double(), dual=True)
    scaled = CausalInnerProduct.from_unembedding(w_u, dual=True, column_scale=g, chunk_size=64)
    for name in ("cov", "mean", "whitener"):
        assert torch.allclose(getattr(scaled, name), getattr(copy, name), rtol=1e-10, atol=1e-12)
