"""Geometry of emotion concepts: plain and causal inner products, cosine matrices,
within-concept similarity, orthogonality, stability across a checkpoint series and principal
angles between concept subspaces.

Every function takes plain tensors (residuals at one layer with integer labels, or concept
vectors) and an optional :class:`CausalInnerProduct`; with one, vectors are whitened first and
every cosine is a causal cosine.

A vector of norm zero has no direction: its cosines are NaN (not 0, which would read as
"orthogonal"), and aggregates such as :func:`orthogonality` skip them. The neutral row of
concept vectors ``v_e = mean(h | e) - mean(h | neutral)`` is such a vector.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

#: Rows of the unembedding processed at once when accumulating its covariance.
DEFAULT_CHUNK = 8192


@dataclass(frozen=True)
class CausalInnerProduct:
    """Park et al. (2023) causal inner product ``<x, y>_C = x^T Cov(gamma)^{-1} y``.

    ``gamma`` are the unembedding rows (one per token). ``whitener`` is the symmetric
    ``Cov^{-1/2}``, so ``whiten(x) @ whiten(y)`` is the causal inner product. All matrices are
    float64 on the CPU; results come back in the input's dtype and device.

    Pass the unembedding the residual is actually read with: for a model with a final norm whose
    gain is not folded in, that is ``W_U * gain`` (rows scaled per coordinate).

    Park et al. pair this inner product on the unembedding space with the dual transform
    ``Cov^{+1/2}`` for embedding (residual) vectors, which keeps ``<gamma, lambda>`` invariant.
    ``from_unembedding(..., dual=True)`` builds that one; the default is ``Cov^{-1/2}``.
    """

    whitener: Float[Tensor, "d_model d_model"]
    cov: Float[Tensor, "d_model d_model"]
    mean: Float[Tensor, " d_model"]
    ridge: float
    n_tokens: int
    dual: bool = False

    @classmethod
    def from_unembedding(
        cls,
        W_U: Float[Tensor, "vocab d_model"],
        token_ids: Int[Tensor, " token"] | list[int] | None = None,
        ridge: float = 1e-6,
        chunk_size: int = DEFAULT_CHUNK,
        dual: bool = False,
        column_scale: Float[Tensor, " d_model"] | None = None,
    ) -> "CausalInnerProduct":
        """Build from unembedding rows (all, or ``token_ids``), optionally with every row
        scaled by ``column_scale`` (``W_U * gain``, the effective unembedding, without a copy
        of ``W_U``: ``Cov(W diag(g)) = diag(g) Cov(W) diag(g)``).

        The covariance is centred and accumulated in float64 in chunks of ``chunk_size`` rows
        (two passes: mean, then centred outer products), so memory stays ``d_model^2`` plus one
        chunk; nothing of size vocab x vocab is formed. ``ridge`` is relative: ``ridge *
        trace(Cov) / d_model`` is added to the diagonal, which keeps the inverse finite when
        fewer tokens than dimensions are given.
        """
        if token_ids is not None:
            ids = torch.as_tensor(token_ids, dtype=torch.long, device=W_U.device)
            W_U = W_U.index_select(0, ids)
        n, d = W_U.shape
        if n < 2:
            raise ValueError(f"need at least 2 unembedding rows for a covariance, got {n}")
        total = torch.zeros(d, dtype=torch.float64, device=W_U.device)
        for start in range(0, n, chunk_size):
            total += W_U[start : start + chunk_size].to(torch.float64).sum(0)
        mean = total / n
        cov = torch.zeros(d, d, dtype=torch.float64, device=W_U.device)
        for start in range(0, n, chunk_size):
            chunk = W_U[start : start + chunk_size].to(torch.float64) - mean
            cov += chunk.T @ chunk
        cov = (cov / (n - 1)).cpu()
        mean = mean.cpu()
        if column_scale is not None:
            g = column_scale.detach().to(torch.float64).cpu()
            cov, mean = cov * g[:, None] * g[None, :], mean * g
        cov = (cov + cov.T) / 2
        shift = ridge * float(torch.diagonal(cov).mean())
        reg = cov + shift * torch.eye(d, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(reg)
        evals = evals.clamp_min(torch.finfo(torch.float64).tiny)
        power = 0.5 if dual else -0.5
        whitener = (evecs * evals.pow(power)) @ evecs.T
        return cls(
            whitener=(whitener + whitener.T) / 2,
            cov=cov,
            mean=mean,
            ridge=ridge,
            n_tokens=n,
            dual=dual,
        )

    def whiten(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        """``x @ Cov^{-1/2}`` (or ``Cov^{1/2}`` when dual); plain inner products of whitened
        vectors are causal inner products."""
        w = self.whitener.to(x.device)
        return (x.to(torch.float64) @ w).to(x.dtype)

    def inner(
        self, x: Float[Tensor, "*batch d_model"], y: Float[Tensor, "*batch d_model"]
    ) -> Float[Tensor, "*batch"]:
        """Row-wise causal inner product (broadcasting over leading dimensions)."""
        return (self.whiten(x) * self.whiten(y)).sum(-1)

    def cosine(
        self, x: Float[Tensor, "*batch d_model"], y: Float[Tensor, "*batch d_model"]
    ) -> Float[Tensor, "*batch"]:
        """Row-wise causal cosine; NaN where either vector is zero."""
        return _rowwise_cosine(self.whiten(x), self.whiten(y))


def _maybe_whiten(
    x: Float[Tensor, "*batch d_model"], inner: CausalInnerProduct | None
) -> Float[Tensor, "*batch d_model"]:
    return x if inner is None else inner.whiten(x)


def _unit(x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
    """Unit vectors; rows of norm zero become NaN."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm > 0, norm, torch.full_like(norm, float("nan")))


def _rowwise_cosine(
    x: Float[Tensor, "*batch d_model"], y: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch"]:
    return (_unit(x) * _unit(y)).sum(-1).clamp(-1.0, 1.0)


def cosine(
    x: Float[Tensor, "*batch d_model"],
    y: Float[Tensor, "*batch d_model"],
    inner: CausalInnerProduct | None = None,
) -> Float[Tensor, "*batch"]:
    """Row-wise cosine, plain or causal; NaN where either vector is zero."""
    return _rowwise_cosine(_maybe_whiten(x, inner), _maybe_whiten(y, inner))


def cosine_matrix(
    vectors: Float[Tensor, "emotion d_model"], inner: CausalInnerProduct | None = None
) -> Float[Tensor, "emotion emotion"]:
    """Pairwise cosines between concept vectors, plain or causal (NaN rows for zero vectors)."""
    u = _unit(_maybe_whiten(vectors, inner))
    return (u @ u.T).clamp(-1.0, 1.0)


def orthogonality(
    vectors: Float[Tensor, "emotion d_model"], inner: CausalInnerProduct | None = None
) -> Float[Tensor, ""]:
    """Mean ``|cos|`` over distinct pairs (off-diagonal); 0 means mutually orthogonal.
    Zero vectors are skipped; NaN when fewer than two non-zero vectors remain."""
    cos = cosine_matrix(vectors, inner)
    off = ~torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)
    return cos[off].abs().nanmean()


@dataclass(frozen=True)
class WithinConceptSimilarity:
    """Per emotion: ``own`` is the mean cosine of its samples with their own class mean
    (leave-one-out), ``other`` the mean cosine of its samples with the other classes' means,
    ``count`` the number of samples. NaN where undefined (``own`` needs 2 samples, ``other``
    needs 1 sample and another non-empty class)."""

    own: Float[Tensor, " emotion"]
    other: Float[Tensor, " emotion"]
    count: Int[Tensor, " emotion"]
    centred: bool

    @property
    def gap(self) -> Float[Tensor, " emotion"]:
        """``own - other``: how much closer samples are to their own concept than to others."""
        return self.own - self.other


def within_concept_similarity(
    resid: Float[Tensor, "sample d_model"],
    labels: Int[Tensor, " sample"],
    n_emotions: int,
    inner: CausalInnerProduct | None = None,
    centred: bool = False,
) -> WithinConceptSimilarity:
    """Within- and between-concept similarity of residuals at one layer.

    For a sample ``i`` of emotion ``e``, its own class mean leaves ``i`` out:
    ``(sum_e - h_i) / (n_e - 1)``, so a class of one sample is not trivially similar to
    itself. ``other[e]`` averages, over the samples of ``e``, the mean cosine with every other
    non-empty class's (full) mean. With ``centred`` the mean of all samples is subtracted first,
    which removes the shared offset that makes every raw residual cosine large.
    """
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_emotions):
        raise ValueError(f"labels must lie in 0..{n_emotions - 1}")
    h = resid
    if centred:
        h = h - h.mean(0, keepdim=True)
    h = _maybe_whiten(h, inner)
    dtype = h.dtype
    count = torch.bincount(labels, minlength=n_emotions)
    sums = torch.zeros(n_emotions, h.shape[1], dtype=dtype, device=h.device)
    sums.index_add_(0, labels, h)
    n_e = count.to(dtype)
    means = sums / n_e.clamp_min(1).unsqueeze(1)

    own_n = (n_e[labels] - 1).unsqueeze(1)
    loo = (sums[labels] - h) / torch.where(own_n > 0, own_n, torch.full_like(own_n, torch.nan))
    own_cos = _rowwise_cosine(h, loo)  # NaN for singleton classes

    cos_to_means = _unit(h) @ _unit(means).T  # [sample, emotion]; NaN columns for empty classes
    valid = (count > 0).unsqueeze(0).expand_as(cos_to_means).clone()
    valid[torch.arange(len(labels), device=h.device), labels] = False
    other_cos = torch.where(valid, cos_to_means, torch.nan).nanmean(1)

    own = _class_nanmean(own_cos, labels, n_emotions)
    other = _class_nanmean(other_cos, labels, n_emotions)
    return WithinConceptSimilarity(own=own, other=other, count=count, centred=centred)


def _class_nanmean(
    values: Float[Tensor, " sample"], labels: Int[Tensor, " sample"], n_emotions: int
) -> Float[Tensor, " emotion"]:
    ok = ~torch.isnan(values)
    sums = torch.zeros(n_emotions, dtype=values.dtype, device=values.device)
    sums.index_add_(0, labels[ok], values[ok])
    n = torch.bincount(labels[ok], minlength=n_emotions).to(values.dtype)
    return torch.where(n > 0, sums / n.clamp_min(1), torch.nan)


@dataclass(frozen=True)
class Stability:
    """Cosine of each concept vector with itself at step 0 (``to_first``) and at the previous
    step (``to_previous``). ``to_previous[0]`` is NaN: step 0 has no previous step, and NaN
    keeps it out of averages over steps instead of counting a free 1.0."""

    to_first: Float[Tensor, "step emotion"]
    to_previous: Float[Tensor, "step emotion"]


def stability(
    vectors_by_step: Float[Tensor, "step emotion d_model"],
    inner: CausalInnerProduct | None = None,
) -> Stability:
    """How far each concept vector moves across a checkpoint series (index 0 is the base)."""
    v = _maybe_whiten(vectors_by_step, inner)
    to_first = _rowwise_cosine(v, v[:1].expand_as(v))
    nan_row = torch.full_like(to_first[:1], torch.nan)
    to_previous = torch.cat([nan_row, _rowwise_cosine(v[1:], v[:-1])], dim=0)
    return Stability(to_first=to_first, to_previous=to_previous)


def _orthonormal_basis(a: Float[Tensor, "k d_model"]) -> Float[Tensor, "d_model r"]:
    """Orthonormal basis of the row span of ``a`` (float64), dropping numerically null
    directions (zero or linearly dependent rows)."""
    a = a.to(torch.float64)
    if a.shape[0] == 0:
        return a.new_zeros(a.shape[1], 0)
    q, r = torch.linalg.qr(a.T)  # q: [d_model, k]
    u, s, _ = torch.linalg.svd(r)  # span(a^T) = span(q @ u[:, s > tol])
    tol = s.max() * max(a.shape) * torch.finfo(torch.float64).eps
    return q @ u[:, s > tol]


def principal_angles(
    A: Float[Tensor, "k d_model"],
    B: Float[Tensor, "m d_model"],
    inner: CausalInnerProduct | None = None,
) -> Float[Tensor, " r"]:
    """Principal angles (radians, ascending) between the row spans of ``A`` and ``B``.

    Orthonormal bases come from QR, refined by an SVD of the triangular factor so that zero or
    dependent rows are dropped; ``r = min(rank A, rank B)``. Cosines are the singular values of
    ``Qa^T Qb`` and sines those of ``Qb - Qa Qa^T Qb``; the angle is ``atan2(sin, cos)``, which
    stays accurate for angles near 0 and near pi/2 (``arccos`` of a clamped cosine does not).
    Returned as float64.
    """
    qa = _orthonormal_basis(_maybe_whiten(A, inner))
    qb = _orthonormal_basis(_maybe_whiten(B, inner))
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa
    if qb.shape[1] == 0:
        return qa.new_zeros(0)
    proj = qa.T @ qb
    cos = torch.linalg.svdvals(proj).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(qb - qa @ proj).clamp(0.0, 1.0).flip(0)  # ascending
    return torch.atan2(sin, cos)


def subspace_angles_by_step(
    vectors_by_step: Float[Tensor, "step emotion d_model"],
    inner: CausalInnerProduct | None = None,
) -> Float[Tensor, "step emotion"]:
    """Principal angles between the span of all concept vectors at each step and at step 0,
    padded with NaN to ``emotion`` columns (zero vectors, e.g. the neutral row, lower the rank)."""
    n_step, n_emotion, _ = vectors_by_step.shape
    out = torch.full((n_step, n_emotion), torch.nan, dtype=torch.float64)
    for t in range(n_step):
        angles = principal_angles(vectors_by_step[0], vectors_by_step[t], inner)
        out[t, : angles.shape[0]] = angles
    return out
