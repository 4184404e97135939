"""Geometry of the emotion concept space per step and layer, long, with bootstrap intervals.

Built from finished steps (:class:`emolens.analysis.steps.StepData`) with no model in memory, for
the pipeline to write as ``geometry.csv``. :func:`geometry_frame`, :func:`causal_geometry_frame`:
one row per ``step, layer, measure, emotion, inner``:


- ``within_own`` / ``within_other`` / ``within_gap``: mean cosine of a label's kept samples with
  their own (leave-one-out) class mean, with the other classes' means, and the difference
  (:func:`emolens.analysis.geometry.within_concept_similarity`, raw residuals, as the study did),
  and the
  same three with ``_centred`` appended (the mean of the kept samples subtracted first, which
  removes the offset shared by every residual and makes raw cosines all large). Rows for every
  emotion with a vector and for the neutral label.
- ``vector_norm``: ``|v_e|``; ``vector_norm_debiased``: the split-half estimate
  ``sqrt(max(0, v^(1) . v^(2)))`` of ``|v_e|`` (halves of each class, seeded; the plain norm is
  biased upward by estimation noise; interval only, not tested); ``orthogonality`` (emotion
  ``"all"``): mean ``|cos|`` over distinct pairs of concept vectors.
- ``cosine_to_first`` / ``cosine_to_previous``: cosine of ``v_e(t)`` with ``v_e`` of the first
  step / of the previous step; ``principal_angle_to_first_max`` / ``_mean`` (radians, emotion
  ``"all"``): principal angles between the span of step t's vectors and the span of the first
  step's (emotions that have a vector at both steps).

Bootstrap: at each step the kept samples (``keep_masks``; the samples that built the vectors)
are resampled within each gold label (:func:`emolens.analysis.stats.bootstrap_indices` with
``strata=gold``, so class sizes never change), the class means and hence the vectors
``v_e = mean(h | e) - mean(h | neutral)`` are recomputed for every replicate, and every measure
is recomputed from them. The same seed at every step and layer: steps that keep the same
samples get the same resamples. ``value`` is the measure on the full sample; ``ci_low`` /
``ci_high`` the percentile interval. Everything is computed from the kept samples' Gram matrix
(float64), so one ``(step, layer)`` costs about ``n^2 d + n_boot n^2`` operations and every
layer gets intervals (416 samples, 18 layers, d 640, 5 steps, 200 replicates, 2 cores: about
7 s plain, 17 s with the causal inner product including its covariance of a 262144-token
unembedding). A sample drawn twice counts twice, also in its own leave-one-out mean.

Cross-step measures compare replicate vectors of step t with the *full-sample* vectors of the
reference step. At the first step the value is exact (cosine 1, angle 0, and NaN for
``cosine_to_previous``, which has no previous step) and the interval is the resampling noise
ceiling: how far a resampled vector lies from the full-sample one. That interval therefore
does not contain its value. :func:`change_summary` pairs replicate ``b`` of step t
(``cos(v_t*, v_first)``) with replicate ``b`` of the first step (``cos(v_first*, v_first)``),
so the noise ceiling is subtracted from both sides of the test.

Inner products: ``inner == "plain"`` is the Euclidean one; ``"causal"`` whitens residuals with
:class:`emolens.analysis.geometry.CausalInnerProduct` first (Park et al.; ``Cov^{-1/2}`` of the
unembedding rows, or ``Cov^{+1/2}`` with ``dual=True``, the default here: Park et al.'s form
for residual-space vectors such as concept vectors, as ``analyze`` uses). :func:`geometry_frame`
takes one unembedding for every step (e.g. the last step's ``W_U * gain``);
:func:`causal_geometry_frame` one per step, each step's vectors being whitened with its own
step's metric (cross-step cosines compare each model's own canonical coordinates).

Probes (:func:`probes_frame`): multinomial logistic probes (:mod:`emolens.analysis.probes`) per
step and

The bootstrap here is computed from Gram matrices; :mod:`emolens.analysis.geometry` holds the
direct computations on plain tensors (:func:`~emolens.analysis.geometry.within_concept_similarity`,
:func:`~emolens.analysis.geometry.principal_angles`, ...) that ``tests/test_concept_space.py``
checks every full-sample value of these tables against.
"""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from emolens.analysis import stats
from emolens.analysis._common import (
    Columns,
    Replicates,
    common_layers,
    floats,
    interval,
    keep_mask,
    sample_key,
    table_result,
    threads,
)
from emolens.analysis.geometry import CausalInnerProduct, principal_angles
from emolens.analysis.steps import StepData

GEOMETRY_COLUMNS = ("step", "layer", "measure", "emotion", "inner", "value", "ci_low", "ci_high")
WITHIN_MEASURES = ("within_own", "within_other", "within_gap")


class _Replicates:
    """Multiplicities of the kept samples of one step: row 0 is the full sample (all ones),
    rows 1.. the bootstrap replicates (resampled within each gold label)."""

    def __init__(self, y: Tensor, n_classes: int, n_boot: int, seed: int):
        n = len(y)
        self.y = y
        self.n_classes = n_classes
        mult = torch.ones(1 + n_boot, n, dtype=torch.float64)
        if n_boot > 0 and n > 0:
            idx = stats.bootstrap_indices(n, n_boot, seed, strata=y)
            mult[1:] = 0.0
            mult[1:].scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
        self.mult = mult
        self.members = [torch.nonzero(y == c).flatten() for c in range(n_classes)]
        onehot = torch.nn.functional.one_hot(y, n_classes).to(torch.float64).T  # [C, n]
        self.weights = mult[:, None, :] * onehot[None]  # [R, C, n]
        self.count = self.weights.sum(-1)  # [R, C]

    def class_sums(self, z: Tensor) -> Tensor:
        """``[R, C, k]`` sums of the rows of ``z`` ([n, k]) per class, per replicate."""
        if z.shape[1] <= 4 * self.n_classes:
            return self.weights @ z
        out = z.new_zeros(self.mult.shape[0], self.n_classes, z.shape[1])
        for c, m in enumerate(self.members):  # n_classes times fewer operations than above
            if len(m):
                out[:, c] = self.mult[:, m] @ z[m]
        return out

    def class_means(self, z: Tensor) -> Tensor:
        """``[R, C, k]`` class means (NaN for empty classes)."""
        n = self.count[..., None]
        return self.class_sums(z) / torch.where(n > 0, n, torch.nan)

    def per_sample_mean(self, values: Tensor) -> Tensor:
        """``[R, C]`` class means of per-sample ``values`` ([R, n]), weighted by multiplicity,
        skipping NaN samples (NaN where a class has no finite sample)."""
        ok = torch.isfinite(values)
        v = torch.where(ok, values, 0.0)
        num = torch.bmm(self.weights, v[..., None])[..., 0]
        den = torch.bmm(self.weights, ok.to(torch.float64)[..., None])[..., 0]
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.nan)


def _within(
    rep: _Replicates, wg: Tensor, ss: Tensor, hh: Tensor, hm: Tensor, ms: Tensor, mm: Tensor
) -> tuple[Tensor, Tensor]:
    """Within-concept similarity of every replicate around an origin ``m``, from dot products.

    ``wg[r, c, i] = h_i . S_c`` (class sums ``S``), ``ss[r, c, c'] = S_c . S_c'``,
    ``hh[i] = |h_i|^2``, ``hm[r, i] = h_i . m``, ``ms[r, c] = m . S_c``, ``mm[r] = |m|^2``.
    Returns ``own``, ``other`` as ``[R, C]``; matches
    :func:`emolens.analysis.geometry.within_concept_similarity` (row 0, full sample).
    """
    y, n = rep.y, rep.count  # [n], [R, C]
    rows = torch.arange(len(y))
    # a_i = h_i - m, A_c = S_c - N_c m; a_dot[r, c, i] = a_i . A_c
    a_a = hh[None] - 2 * hm + mm[:, None]  # [R, n]
    a_dot = wg - (n[..., None] * hm[:, None, :] + (ms - n * mm[:, None])[..., None])
    big_a = torch.diagonal(ss, dim1=1, dim2=2) - 2 * n * ms + n * n * mm[:, None]  # [R, C]
    norm_a = a_a.clamp_min(0).sqrt()
    sample_ok = a_a > 0
    # own: cos(a_i, A_y - a_i)
    s_own = a_dot[:, y, rows]  # [R, n]
    loo_sq = (big_a[:, y] - 2 * s_own + a_a).clamp_min(0)
    own_ok = (n[:, y] >= 2) & (loo_sq > 0) & sample_ok
    own_cos = torch.where(
        own_ok, (s_own - a_a) / (norm_a * loo_sq.sqrt()).clamp_min(1e-300), torch.nan
    ).clamp(-1.0, 1.0)
    # other: mean over the other non-empty classes c != y_i of cos(a_i, A_c)
    norm_big = big_a.clamp_min(0).sqrt()  # [R, C]
    class_ok = (n > 0) & (norm_big > 0)
    inv_big = torch.where(class_ok, 1.0 / torch.where(class_ok, norm_big, 1.0), 0.0)
    cos_all = a_dot * inv_big[..., None]  # [R, C, n]: cosines times |a_i|
    total = cos_all.sum(1) - cos_all[:, y, rows]
    cnt = class_ok.sum(1, keepdim=True) - class_ok[:, y].to(torch.long)
    other_cos = torch.where(
        (cnt > 0) & sample_ok, total / (norm_a * cnt.clamp_min(1)).clamp_min(1e-300), torch.nan
    )
    other_cos = other_cos.clamp(-1.0, 1.0)
    return rep.per_sample_mean(own_cos), rep.per_sample_mean(other_cos)


def _cholesky_angles(gram: Tensor, proj: Tensor) -> Tensor:
    """Principal angles (ascending, radians) between span(X) and an orthonormal basis ``Q``,
    given ``gram = X X^T`` ([R, k, k]) and ``proj = X Q`` ([R, k, r]); NaN for replicates whose
    vectors are linearly dependent."""
    chol, info = torch.linalg.cholesky_ex(gram)
    ok = info == 0
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype)
    chol = torch.where(ok[:, None, None], chol, eye)
    m = torch.linalg.solve_triangular(chol, proj, upper=False)
    cos = torch.linalg.svdvals(m).clamp(0.0, 1.0)  # descending
    angles = torch.arccos(cos)
    return torch.where(ok[:, None], angles, torch.nan)


def _basis(rows: Tensor) -> Tensor:
    """Orthonormal basis ``[d, r]`` of the row span of ``rows`` (null directions dropped)."""
    if rows.shape[0] == 0:
        return rows.new_zeros(rows.shape[1], 0)
    u, s, _ = torch.linalg.svd(rows.T, full_matrices=False)
    tol = s.max() * max(rows.shape) * torch.finfo(rows.dtype).eps
    return u[:, s > tol]


# --------------------------------------------------------------------------- geometry


def _inner_of(x: Tensor | CausalInnerProduct, dual: bool) -> CausalInnerProduct:
    if isinstance(x, CausalInnerProduct):
        return x
    return CausalInnerProduct.from_unembedding(x, dual=dual)


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class _KeptStep:
    """A step with its kept samples: ``keep`` ([sample] bool), their multiplicities ``rep``
    and ``sample_set``, the :func:`sample_key` of their ids."""

    step: StepData
    keep: Tensor
    rep: _Replicates
    sample_set: str


@dataclass(frozen=True)
class _Gram:
    """Kept residuals of one step and layer about their mean ``origin`` ([d]): ``hc`` [n, d]
    centred residuals, ``wg`` [R, C, n] ``h_i . S_c`` (class sums ``S``), ``ss`` [R, C, C]
    ``S_c . S_c'``, ``hh`` [n] ``|h_i|^2``, ``tot`` [R] replicate sizes."""

    hc: Tensor
    origin: Tensor
    wg: Tensor
    ss: Tensor
    hh: Tensor
    tot: Tensor


def _kept_steps(
    steps: Sequence[StepData],
    *,
    labels: list[str],
    neutral: str,
    keep_masks: Mapping[int, Tensor] | None,
    n_boot: int,
    seed: int,
) -> list[_KeptStep]:
    """Every step's kept samples and bootstrap multiplicities; warns about labels without a
    kept sample (their measures are NaN)."""
    kept = []
    for s in steps:
        for e in s.vectors.emotions:
            if e not in labels:
                raise ValueError(f"step {s.step}: emotion {e!r} is not among the labels")
        keep = keep_mask(s, keep_masks, len(labels))
        rep = _Replicates(s.acts.gold[keep].long(), len(labels), n_boot, seed)
        empty = [
            e for e in s.vectors.emotions + (neutral,) if int(rep.count[0, labels.index(e)]) == 0
        ]
        if empty:
            warnings.warn(
                f"step {s.step}: no kept sample for {empty}; their measures are NaN "
                "(does keep_masks match the samples that built the vectors?)",
                stacklevel=4,
            )
        ids = [sid for sid, k in zip(s.acts.sample_ids, keep.tolist()) if k]
        kept.append(_KeptStep(s, keep, rep, sample_key(ids)))
    return kept


def _gram(h: Tensor, rep: _Replicates) -> _Gram:
    """:class:`_Gram` of the kept residuals ``h`` ([n, d], float64)."""
    origin = h.mean(0) if len(h) else h.new_zeros(h.shape[1])
    hc = h - origin  # translation: vectors and centred cosines are invariant to it
    gram = hc @ hc.T
    wg = rep.class_sums(gram)  # [R, C, n]
    ss = torch.bmm(wg, rep.weights.transpose(1, 2))  # [R, C, C]
    return _Gram(hc, origin, wg, ss, torch.diagonal(gram), rep.count.sum(1))


def _block(
    measure: str,
    emotion: list[str] | str,
    stat: Tensor,
    ci: float,
    *,
    value: list[float] | None = None,
    boot: Tensor | None = None,
) -> dict:
    """Rows of one measure: ``stat`` [R, k] (or [R] for one row), row 0 the full sample and
    rows 1.. the replicates, gives the value (unless ``value``), the interval and the
    replicates (unless ``boot``)."""
    stat = stat if stat.dim() == 2 else stat[:, None]
    lo, hi = interval(stat[1:], ci)
    return dict(
        boot=stat[1:] if boot is None else boot,
        measure=measure,
        emotion=emotion,
        value=floats(stat[0]) if value is None else value,
        ci_low=floats(lo),
        ci_high=floats(hi),
    )


def _within_blocks(
    g: _Gram, rep: _Replicates, *, idx: Tensor, names: list[str], ci: float
) -> list[dict]:
    """Within-concept similarity of the labels ``names`` (label indices ``idx``), about the
    origin 0 (raw residuals) and about the mean of the kept samples (``_centred``)."""
    ho = g.hc @ g.origin  # h'_i . o
    so = rep.class_sums(ho[:, None])[..., 0]  # [R, C]
    raw = _within(rep, g.wg, g.ss, g.hh, -ho[None], -so, (g.origin @ g.origin).expand(len(g.tot)))
    safe_tot = torch.where(g.tot > 0, g.tot, 1.0)
    hm = g.wg.sum(1) / safe_tot[:, None]  # h'_i . mu'
    ms = g.ss.sum(1) / safe_tot[:, None]  # mu' . S'_c
    mm_c = g.ss.sum((1, 2)) / safe_tot**2
    cen = _within(rep, g.wg, g.ss, g.hh, hm, ms, mm_c)
    return [
        _block(name + suffix, names, val[:, idx], ci)
        for suffix, (own, other) in (("", raw), ("_centred", cen))
        for name, val in zip(WITHIN_MEASURES, (own, other, own - other))
    ]


def _vector_gram(g: _Gram, rep: _Replicates, *, e_idx: Tensor, u: int) -> Tensor:
    """``[R, E, E]`` Gram matrix of every replicate's concept vectors (from the class means')."""
    denom = torch.where(rep.count > 0, rep.count, torch.nan)
    means_gram = g.ss / (denom[:, :, None] * denom[:, None, :])
    mg_e = means_gram[:, e_idx][:, :, e_idx]
    mg_eu = means_gram[:, e_idx, u]
    return mg_e - mg_eu[:, :, None] - mg_eu[:, None, :] + means_gram[:, u, u][:, None, None]


def _vector_blocks(k_v: Tensor, *, emotions: list[str], ci: float) -> list[dict]:
    """``vector_norm`` per emotion and ``orthogonality`` (mean ``|cos|`` of distinct pairs)."""
    norms = torch.diagonal(k_v, dim1=1, dim2=2).clamp_min(0).sqrt()  # [R, E]
    unit = torch.where(norms > 0, norms, torch.nan)
    cos = (k_v / (unit[:, :, None] * unit[:, None, :])).clamp(-1.0, 1.0)
    off = ~torch.eye(len(emotions), dtype=torch.bool)
    orth = (
        cos[:, off].abs().nanmean(1)
        if len(emotions) > 1
        else torch.full((cos.shape[0],), torch.nan, dtype=torch.float64)
    )
    return [_block("vector_norm", emotions, norms, ci), _block("orthogonality", "all", orth, ci)]


def _halves(y: Tensor, seed: int) -> Tensor:
    """``[n]`` 0/1: a seeded split of each class's samples into two halves (sizes differ by at
    most one)."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.zeros(len(y), dtype=torch.long)
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        order = members[torch.randperm(len(members), generator=gen)]
        half[order[len(order) // 2 :]] = 1
    return half


def _debiased_norm_block(
    g: _Gram, rep: _Replicates, *, e_idx: Tensor, u: int, emotions: list[str], seed: int, ci: float
) -> dict:
    """``vector_norm_debiased``: ``sqrt(max(0, v^(1) . v^(2)))`` with ``v^(h)`` the concept
    vector from half ``h`` of each class's kept samples (:func:`_halves`). The halves' noise is
    independent, so ``v^(1) . v^(2)`` is unbiased for ``|v|^2`` where ``|v|^2`` itself is biased
    upward by the noise (``E|v_hat|^2 = |v|^2 + tr Cov(v_hat)``). Replicates keep the halves and
    resample within them; they give the interval but are not tested (NaN in the replicates, so
    the family's tests are those of the plain norm)."""
    n_classes = rep.n_classes
    y2 = 2 * rep.y + _halves(rep.y, seed)
    onehot = torch.nn.functional.one_hot(y2, 2 * n_classes).to(torch.float64).T  # [2C, n]
    w = rep.mult[:, None, :] * onehot[None]  # [R, 2C, n]
    count = w.sum(-1)  # [R, 2C]
    gram = g.hc @ g.hc.T
    wg = gram.new_zeros(w.shape)  # [R, 2C, n]: h_i . (half-class sums), one class at a time
    for m in range(2 * n_classes):
        members = torch.nonzero(y2 == m).flatten()
        if len(members):
            wg[:, m] = rep.mult[:, members] @ gram[members]
    ss = torch.bmm(wg, w.transpose(1, 2))  # [R, 2C, 2C]
    denom = torch.where(count > 0, count, torch.nan)
    mg = ss / (denom[:, :, None] * denom[:, None, :])  # half-class means' Gram
    e1, e2, u1, u2 = 2 * e_idx, 2 * e_idx + 1, 2 * u, 2 * u + 1
    dot = mg[:, e1, e2] - mg[:, e1, u2] - mg[:, u1, e2] + mg[:, u1, u2][:, None]  # [R, E]
    norm = dot.clamp_min(0).sqrt()
    return _block(
        "vector_norm_debiased", emotions, norm, ci, boot=torch.full_like(norm[1:], torch.nan)
    )


def _full_vectors(
    g: _Gram, rep: _Replicates, *, emotions: list[str], labels: list[str], u: int
) -> dict[str, Tensor]:
    """Full-sample concept vectors ([d] each, centred whitened coordinates), the references of
    the later steps' cross-step measures."""
    if not len(g.hc):
        return {}
    means0 = rep.class_means(g.hc)[0]
    return {e: (means0[labels.index(e)] - means0[u]) for e in emotions}


def _stability_blocks(
    g: _Gram,
    rep: _Replicates,
    *,
    k_v: Tensor,
    emotions: list[str],
    e_idx: Tensor,
    u: int,
    refs: dict[str, dict[str, Tensor]],
    is_first: bool,
    ci: float,
) -> list[dict]:
    """``cosine_to_first`` / ``cosine_to_previous`` of the replicates' vectors with the
    reference steps' full-sample vectors (``refs[measure]``)."""
    norms = torch.diagonal(k_v, dim1=1, dim2=2).clamp_min(0).sqrt()  # [R, E]
    unit = torch.where(norms > 0, norms, torch.nan)
    blocks = []
    for measure, ref in refs.items():
        names = [e for e in emotions if e in ref]
        if not names:
            continue
        sel = torch.tensor([emotions.index(e) for e in names])
        r = torch.stack([ref[e] for e in names])  # [k, d]
        proj = rep.class_means(g.hc @ r.T)  # [R, C, k]
        dots = proj[:, e_idx[sel], torch.arange(len(names))] - proj[:, u, :]  # [R, k]
        cosv = (dots / (unit[:, sel] * r.norm(dim=-1)[None])).clamp(-1.0, 1.0)
        boot = cosv[1:]
        if measure == "cosine_to_previous" and is_first:
            boot = torch.full_like(boot, torch.nan)  # no previous step: nothing to test
        value = None
        if is_first:
            value = [1.0 if measure == "cosine_to_first" else float("nan")] * len(names)
        blocks.append(_block(measure, names, cosv, ci, value=value, boot=boot))
    return blocks


def _angle_blocks(
    g: _Gram,
    rep: _Replicates,
    *,
    k_v: Tensor,
    emotions: list[str],
    e_idx: Tensor,
    u: int,
    full: dict[str, Tensor],
    ref_first: dict[str, Tensor],
    is_first: bool,
    ci: float,
) -> list[dict]:
    """Principal angles (max and mean) between the span of this step's vectors and the first
    step's (``ref_first``), over the emotions with finite vectors at both."""
    names = [
        e
        for e in emotions
        if e in full
        and e in ref_first
        and bool(torch.isfinite(ref_first[e]).all())
        and bool(torch.isfinite(full[e]).all())
    ]
    if not names:
        return []
    sel = torch.tensor([emotions.index(e) for e in names])
    a = torch.stack([ref_first[e] for e in names])
    basis = _basis(a)
    proj = rep.class_means(g.hc @ basis)  # [R, C, r]
    x_proj = proj[:, e_idx[sel]] - proj[:, u][:, None]  # [R, k, r]
    angles = _cholesky_angles(k_v[:, sel][:, :, sel], x_proj)
    exact = (
        principal_angles(a, torch.stack([full[e] for e in names]))
        if not is_first
        else torch.zeros(min(len(names), basis.shape[1]))
    )
    nan = torch.tensor(float("nan"))
    est_max = exact.max() if len(exact) else nan
    est_mean = exact.mean() if len(exact) else nan
    return [
        _block("principal_angle_to_first_max", "all", angles.amax(-1), ci, value=[float(est_max)]),
        _block(
            "principal_angle_to_first_mean", "all", angles.mean(-1), ci, value=[float(est_mean)]
        ),
    ]


def _step_blocks(
    kept: _KeptStep,
    *,
    layer: int,
    labels: list[str],
    neutral: str,
    inner: CausalInnerProduct | None,
    first: dict[str, Tensor] | None,
    previous: dict[str, Tensor] | None,
    ci: float,
    seed: int = 0,
) -> tuple[list[dict], dict[str, Tensor]]:
    """Every geometry measure of one step at one layer (without ``step, layer, inner,
    sample_set``), and the step's full-sample vectors. ``first`` / ``previous``: the first and
    the previous step's full-sample vectors (None at the first step)."""
    s, rep = kept.step, kept.rep
    u = labels.index(neutral)
    h = s.acts.layer(layer)[kept.keep].to(torch.float64)
    if inner is not None:
        h = inner.whiten(h)
    emotions = list(s.vectors.emotions)
    e_idx = torch.tensor([labels.index(e) for e in emotions], dtype=torch.long)
    g = _gram(h, rep)
    w_idx = torch.cat([e_idx, torch.tensor([u])])
    blocks = _within_blocks(g, rep, idx=w_idx, names=emotions + [neutral], ci=ci)
    k_v = _vector_gram(g, rep, e_idx=e_idx, u=u)
    blocks += _vector_blocks(k_v, emotions=emotions, ci=ci)
    blocks.append(
        _debiased_norm_block(g, rep, e_idx=e_idx, u=u, emotions=emotions, seed=seed, ci=ci)
    )
    full = _full_vectors(g, rep, emotions=emotions, labels=labels, u=u)
    is_first = first is None
    ref_first = full if first is None else first
    ref_prev = full if previous is None else previous
    refs = {"cosine_to_first": ref_first, "cosine_to_previous": ref_prev}
    shared: dict[str, Any] = dict(
        k_v=k_v, emotions=emotions, e_idx=e_idx, u=u, is_first=is_first, ci=ci
    )
    blocks += _stability_blocks(g, rep, refs=refs, **shared)
    blocks += _angle_blocks(g, rep, full=full, ref_first=ref_first, **shared)
    return blocks, full


def _geometry_blocks(
    steps: Sequence[StepData],
    *,
    labels: Sequence[str],
    neutral: str,
    layers: Sequence[int] | None,
    keep_masks: Mapping[int, Tensor] | None,
    n_boot: int,
    seed: int,
    ci: float,
    inners: Mapping[int, CausalInnerProduct | None],
    inner_name: str,
) -> list[dict]:
    """The rows of :func:`geometry_frame` for one inner product (``inners[step]``, None for
    the plain one; ``inner_name`` its ``inner`` column), as :meth:`Columns.add` blocks in
    layer, step, measure order."""
    labels = list(labels)
    if neutral not in labels:
        raise ValueError(f"neutral label {neutral!r} is not among the labels {labels}")
    layer_list = common_layers(steps, layers, with_vectors=True)
    kept_steps = _kept_steps(
        steps, labels=labels, neutral=neutral, keep_masks=keep_masks, n_boot=n_boot, seed=seed
    )
    out = []
    for layer in layer_list:
        first = previous = None
        for kept in kept_steps:
            blocks, full = _step_blocks(
                kept,
                layer=layer,
                labels=labels,
                neutral=neutral,
                inner=inners[kept.step.step],
                first=first,
                previous=previous,
                ci=ci,
                seed=seed,
            )
            common = dict(step=kept.step.step, layer=layer, inner=inner_name)
            out += [{**b, **common, "sample_set": kept.sample_set} for b in blocks]
            first = full if first is None else first
            previous = full
    return out


def geometry_frame(
    steps: Sequence[StepData],
    labels: Sequence[str],
    neutral: str,
    layers: Sequence[int] | None = None,
    keep_masks: Mapping[int, Tensor] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    unembedding: Tensor | CausalInnerProduct | None = None,
    ci: float = 0.95,
    dual: bool = True,
    num_threads: int | None = 1,
    return_replicates: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Replicates]:
    """Geometry of the concept space per step and layer, long, with bootstrap intervals.

    ``steps`` in series order (the first is the reference); ``labels`` are the English label
    names in label-set order (``acts.gold`` indexes them), ``neutral`` one of them. ``layers``:
    default every layer with vectors and activations at every step. ``keep_masks[step]``: the
    samples that built that step's vectors (default: every sample with a known gold label),
    used for the vectors and the within-concept similarity. ``unembedding``: ``[vocab,
    d_model]`` effective unembedding (``W_U * gain``) or a ready
    :class:`~emolens.analysis.geometry.CausalInnerProduct`; with one, every measure is also
    computed in
    the causal inner product (``inner == "causal"``, the same metric at every step).

    Columns: ``step, layer, measure, emotion, inner, value, ci_low, ci_high``; the measures
    and the bootstrap are described in the module docstring. ``num_threads``: torch threads
    while computing (restored after; ``None`` leaves them alone). ``return_replicates``: also
    return the rows' bootstrap :class:`Replicates` (for
    :func:`emolens.analysis.change_summary.change_summary`).
    """
    out = Columns(GEOMETRY_COLUMNS)
    if not steps:
        return table_result(out, return_replicates)
    shared: dict[str, Any] = dict(
        labels=labels, neutral=neutral, layers=layers, keep_masks=keep_masks, n_boot=n_boot,
        seed=seed, ci=ci,
    )  # fmt: skip
    with threads(num_threads):
        out.add_all(_geometry_blocks(steps, inners={s.step: None for s in steps},
                                     inner_name="plain", **shared))  # fmt: skip
        if unembedding is not None:
            inner = _inner_of(unembedding, dual)
            out.add_all(_geometry_blocks(steps, inners={s.step: inner for s in steps},
                                         inner_name="causal", **shared))  # fmt: skip
    return table_result(out, return_replicates)


def causal_geometry_frame(
    steps: Sequence[StepData],
    W_U_effective_by_step: Mapping[int, Tensor | CausalInnerProduct],
    labels: Sequence[str],
    neutral: str,
    layers: Sequence[int] | None = None,
    keep_masks: Mapping[int, Tensor] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    dual: bool = True,
    num_threads: int | None = 1,
    return_replicates: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Replicates]:
    """:func:`geometry_frame` in the causal inner product only, with each step's own metric.

    ``W_U_effective_by_step[step]``: that step's ``[vocab, d_model]`` unembedding times its
    final-norm gain, or a ready :class:`~emolens.analysis.geometry.CausalInnerProduct` (building one
    from a full vocabulary costs ``vocab * d_model^2``; reuse it where steps share a readout).
    Every step needs one. Rows have ``inner == "causal"``.
    """
    out = Columns(GEOMETRY_COLUMNS)
    if not steps:
        return table_result(out, return_replicates)
    missing = [s.step for s in steps if s.step not in W_U_effective_by_step]
    if missing:
        raise ValueError(f"no unembedding for steps {missing}")
    with threads(num_threads):
        inners = {s.step: _inner_of(W_U_effective_by_step[s.step], dual) for s in steps}
        out.add_all(
            _geometry_blocks(
                steps, labels=labels, neutral=neutral, layers=layers, keep_masks=keep_masks,
                n_boot=n_boot, seed=seed, ci=ci, inners=inners, inner_name="causal",
            )
        )  # fmt: skip
    return table_result(out, return_replicates)


# --------------------------------------------------------------------------- cross-step tests

#: Measures that compare two steps' vectors; their bootstrap test against the first step's
#: noise ceiling is not valid (see :func:`cross_step_tests`).
CROSS_STEP_MEASURES = (
    "cosine_to_first",
    "principal_angle_to_first_max",
    "principal_angle_to_first_mean",
)
CROSS_STEP_COLUMNS = ("step", "layer", "measure", "emotion", "inner", "value", "p", "n_perm")


def _swap_statistics(
    h0: Tensor, ht: Tensor, y: Tensor, *, e_idx: Tensor, u: int, swaps: Tensor
) -> tuple[Tensor, Tensor]:
    """Cosines ``[P, E]`` of each emotion's vectors and principal angles ``[P, E']`` between
    the spans of the two steps' vectors, with each sample's two residuals exchanged where
    ``swaps[p, i]`` is 1 (row 0 of ``swaps`` all zeros: the observed data)."""
    n_classes = int(y.max()) + 1
    onehot = torch.nn.functional.one_hot(y, n_classes).to(torch.float64).T  # [C, n]
    mean_op = onehot / onehot.sum(1, keepdim=True).clamp_min(1)
    diff_op = mean_op[e_idx] - mean_op[u]  # [E, n]: v = diff_op @ h
    v0, vt = diff_op @ h0, diff_op @ ht  # [E, d]
    moved = torch.einsum("en,pn,nd->ped", diff_op, swaps, ht - h0)  # [P, E, d]
    a, b = v0[None] + moved, vt[None] - moved
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    qa, _ = torch.linalg.qr(a.transpose(1, 2))  # [P, d, E]
    qb, _ = torch.linalg.qr(b.transpose(1, 2))
    angles = torch.arccos(torch.linalg.svdvals(qa.transpose(1, 2) @ qb).clamp(0.0, 1.0))
    return cos, angles


def cross_step_tests(
    steps: Sequence[StepData],
    labels: Sequence[str],
    neutral: str,
    layers: Sequence[int] | None = None,
    keep_masks: Mapping[int, Tensor] | None = None,
    unembedding: Tensor | CausalInnerProduct | None = None,
    dual: bool = True,
    n_perm: int = 999,
    seed: int = 0,
    metrics: Mapping[int, CausalInnerProduct] | None = None,
    causal_layers: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Step-swap permutation tests of :data:`CROSS_STEP_MEASURES` against the first step.

    Why: ``cosine_to_first`` at step t is ``cos(v_t, v_0)`` of two *estimates*; wherever the
    samples' residuals change at all between steps (a per-sample part that averages out, the
    concept vectors unchanged), it falls below 1 by estimation noise alone, and its paired
    bootstrap against the first step's noise ceiling ``cos(v_0*, v_0)`` does not remove that:
    measured in ``benchmarks/calibration.py`` under no change of any concept vector, that test
    rejected 11% of ``cosine_to_first`` series and every ``principal_angle_to_first_mean`` at
    the 5% level. Here the null is that each sample's two residuals are exchangeable (no
    change): swapping them for a random subset of samples (the same subset for every emotion,
    ``n_perm`` draws, ``seed``) gives the exact null of the statistic, recomputed from the
    swapped class means. ``p = (1 + #{stat* at least as far from "no change"}) / (1 + n_perm)``,
    one-sided (a lower cosine, a larger angle). Needs the same kept samples at both steps
    (matched by sample id); a step whose kept set differs from the first's gets no row.

    Returns :data:`CROSS_STEP_COLUMNS` (``value``: the observed statistic, as in
    :func:`geometry_frame`; ``inner`` ``"plain"``, and ``"causal"`` with ``unembedding``, the
    same metric at every step, or with ``metrics[step]``, each step's own metric as in
    :func:`causal_geometry_frame`; give one or the other; ``causal_layers``: the layers that
    get ``"causal"`` rows, default all); pass it to
    :func:`emolens.analysis.change_summary.change_summary` (``cross_step=``).
    """
    labels = list(labels)
    out: list[dict] = []
    if len(steps) < 2:
        return pd.DataFrame(columns=list(CROSS_STEP_COLUMNS))
    u = labels.index(neutral)
    layer_list = common_layers(steps, layers, with_vectors=True)
    if unembedding is not None and metrics is not None:
        raise ValueError("give unembedding (one metric) or metrics (one per step), not both")
    if metrics is not None:
        missing = [s.step for s in steps if s.step not in metrics]
        if missing:
            raise ValueError(f"no metric for steps {missing}")
    inners: list[tuple[str, CausalInnerProduct | None]] = [("plain", None)]
    if unembedding is not None:
        inners.append(("causal", _inner_of(unembedding, dual)))
    first = steps[0]
    keep0 = keep_mask(first, keep_masks, len(labels))
    ids0 = [sid for sid, k in zip(first.acts.sample_ids, keep0.tolist(), strict=True) if k]
    pos0 = torch.nonzero(keep0).flatten()
    y = first.acts.gold[pos0].long()
    gen = torch.Generator().manual_seed(seed)
    swaps = torch.cat(
        [
            torch.zeros(1, len(ids0), dtype=torch.float64),
            torch.randint(0, 2, (n_perm, len(ids0)), generator=gen).to(torch.float64),
        ]
    )
    for s in steps[1:]:
        keep = keep_mask(s, keep_masks, len(labels))
        ids = [sid for sid, k in zip(s.acts.sample_ids, keep.tolist(), strict=True) if k]
        if sorted(ids) != sorted(ids0):
            continue
        where = {sid: i for i, sid in enumerate(s.acts.sample_ids)}
        pos_t = torch.tensor([where[sid] for sid in ids0], dtype=torch.long)
        if not torch.equal(s.acts.gold[pos_t].long(), y):
            continue
        emotions = [e for e in s.vectors.emotions if e in first.vectors.emotions]
        present = [e for e in emotions if int((y == labels.index(e)).sum()) > 0]
        if not present or int((y == u).sum()) == 0:
            continue
        e_idx = torch.tensor([labels.index(e) for e in present], dtype=torch.long)
        for layer in layer_list:
            own = [("causal", metrics[first.step], metrics[s.step])] if metrics else []
            tried = [(n, i, i) for n, i in inners] + own
            if causal_layers is not None and layer not in causal_layers:
                tried = [t for t in tried if t[0] != "causal"]
            for name, inner_0, inner_t in tried:
                h0 = first.acts.layer(layer)[pos0].to(torch.float64)
                ht = s.acts.layer(layer)[pos_t].to(torch.float64)
                if inner_0 is not None and inner_t is not None:
                    h0, ht = inner_0.whiten(h0), inner_t.whiten(ht)
                cos, angles = _swap_statistics(h0, ht, y, e_idx=e_idx, u=u, swaps=swaps)
                a_max, a_mean = angles.amax(-1), angles.mean(-1)
                stats_rows = [
                    ("cosine_to_first", present, cos, cos[1:] <= cos[:1] + 1e-12),
                    ("principal_angle_to_first_max", ["all"], a_max[:, None],
                     (a_max[1:] >= a_max[0] - 1e-12)[:, None]),
                    ("principal_angle_to_first_mean", ["all"], a_mean[:, None],
                     (a_mean[1:] >= a_mean[0] - 1e-12)[:, None]),
                ]  # fmt: skip
                for measure, names, stat, extreme in stats_rows:
                    p = (1.0 + extreme.to(torch.float64).sum(0)) / (1.0 + n_perm)
                    for j, e in enumerate(names):
                        out.append(
                            dict(step=s.step, layer=layer, measure=measure, emotion=e, inner=name,
                                 value=float(stat[0, j]), p=float(p[j]), n_perm=n_perm)
                        )  # fmt: skip
    return pd.DataFrame(out, columns=list(CROSS_STEP_COLUMNS))


__all__ = [
    "CROSS_STEP_COLUMNS",
    "CROSS_STEP_MEASURES",
    "GEOMETRY_COLUMNS",
    "WITHIN_MEASURES",
    "causal_geometry_frame",
    "cross_step_tests",
    "geometry_frame",
]
