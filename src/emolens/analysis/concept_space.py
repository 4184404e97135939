"""Long tables of the emotion concept space across a checkpoint series, with bootstrap intervals.

Built from finished steps (:class:`emolens.analysis.steps.StepData`) with no model in memory, for
the
pipeline to write as ``geometry.csv`` and ``probes.csv``, plus the tests the report states per
measure (:func:`change_summary`: a paired test of each later step against the first from the
bootstrap replicates, BH within the measure family, TOST against a stated margin; see
:mod:`emolens.analysis.change_tests`), Figure 2's points with two-level bootstrap bands and trend
tests
(:func:`figure2_frame`) and a random-direction steering baseline
(:func:`random_baseline_frame`).

Geometry (:func:`geometry_frame`, :func:`causal_geometry_frame`), one row per ``step, layer,
measure, emotion, inner``:

- ``within_own`` / ``within_other`` / ``within_gap``: mean cosine of a label's kept samples with
  their own (leave-one-out) class mean, with the other classes' means, and the difference
  (:func:`emolens.analysis.geometry.within_concept_similarity`, raw residuals, as the study did),
  and the
  same three with ``_centred`` appended (the mean of the kept samples subtracted first, which
  removes the offset shared by every residual and makes raw cosines all large). Rows for every
  emotion with a vector and for the neutral label.
- ``vector_norm``: ``|v_e|``; ``orthogonality`` (emotion ``"all"``): mean ``|cos|`` over distinct
  pairs of concept vectors.
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
unembedding rows, or ``Cov^{+1/2}`` with ``dual=True``). :func:`geometry_frame` takes one
unembedding for every step (e.g. the last step's ``W_U * gain``);
:func:`causal_geometry_frame` one per step, each step's vectors being whitened with its own
step's metric (cross-step cosines compare each model's own canonical coordinates).

Probes (:func:`probes_frame`): multinomial logistic probes (:mod:`emolens.analysis.probes`) per
step and
layer on every sample with a known gold label present at every step, one stratified split of
sample ids shared by all steps; intervals by bootstrapping the held-out samples within labels
(same resamples at every step).
"""

import hashlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from emolens.analysis import change_tests, stats
from emolens.analysis.geometry import CausalInnerProduct, principal_angles
from emolens.analysis.probes import per_label_recall, stratified_split, train_probe
from emolens.measure.attribution import transfer_effect

#: :class:`emolens.analysis.steps.StepData` (not imported: explain may import this module).
StepData = Any

GEOMETRY_COLUMNS = ("step", "layer", "measure", "emotion", "inner", "value", "ci_low", "ci_high")
PROBE_COLUMNS = (
    "step",
    "layer",
    "measure",
    "label",
    "value",
    "ci_low",
    "ci_high",
    "train_step",
    "n",
)
RANDOM_COLUMNS = (
    "step",
    "layer",
    "emotion",
    "alpha",
    "alpha_unit",
    "logit_change_concept",
    "concept_ci_low",
    "concept_ci_high",
    "logit_change_random_mean",
    "logit_change_random_sd",
    "share_random_at_least_concept",
    "n_random",
)
#: Columns that are not part of a series' identity in :func:`change_summary`.
NON_KEY_COLUMNS = ("step", "value", "ci_low", "ci_high", "train_step", "n")
WITHIN_MEASURES = ("within_own", "within_other", "within_gap")


# --------------------------------------------------------------------------- small helpers


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Torch intra-op threads set to ``n`` inside the block and restored after (``None``: leave
    the setting alone). The tensors here are small; on a busy 2-core machine a second thread
    made the bootstrap several times slower (threads waiting on each other), never faster."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _interval(samples: Tensor, ci: float) -> tuple[Tensor, Tensor]:
    """Percentile interval over the first axis (replicates), ignoring NaN replicates."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")
    if samples.shape[0] == 0:
        nan = torch.full(samples.shape[1:], torch.nan, dtype=torch.float64)
        return nan, nan.clone()
    alpha = (1.0 - ci) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lo_hi = torch.nanquantile(samples.to(torch.float64), q, dim=0)
    return lo_hi[0], lo_hi[1]


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates behind a long table's intervals, row-aligned with the table.

    ``values[row, b]``: the row's statistic on resample ``b`` (NaN where the row has no
    interval); ``sample_set[row]``: a key of the samples that were resampled (a hash of their
    ids). Two rows whose keys agree were resampled with the same indices into the same samples
    (same seed), so their replicates are paired; :func:`change_summary` tests those pairs with
    the paired bootstrap. Concatenate tables and their replicates in the same order
    (:meth:`concat`).
    """

    values: np.ndarray  # [row, n_boot]
    sample_set: np.ndarray  # [row] str

    def __len__(self) -> int:
        return len(self.sample_set)

    @staticmethod
    def concat(parts: Sequence["Replicates"]) -> "Replicates":
        width = max((p.values.shape[1] for p in parts), default=0)
        values = [
            np.pad(p.values, ((0, 0), (0, width - p.values.shape[1])), constant_values=np.nan)
            for p in parts
        ]
        return Replicates(
            np.concatenate(values) if values else np.zeros((0, 0)),
            np.concatenate([p.sample_set for p in parts]) if parts else np.zeros(0, dtype=object),
        )


def _sample_key(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class _Columns:
    """Accumulates a long table column-wise (fast for many rows), with the rows' bootstrap
    replicates where given."""

    def __init__(self, columns: Sequence[str]):
        self.data: dict[str, list] = {c: [] for c in columns}
        self.boot: list[np.ndarray | int] = []  # [rows, n_boot] arrays, or a count of rows
        self.keys: list[str] = []
        self.sample_set = ""

    def add(self, boot: Tensor | None = None, **cols) -> None:
        """Append rows: list-valued entries give one row each, scalars repeat. ``boot``:
        ``[n_boot, rows]`` (or ``[n_boot]`` for one row) replicates of the rows' values."""
        n = max((len(v) for v in cols.values() if isinstance(v, list)), default=1)
        for name in self.data:
            v = cols[name]
            self.data[name].extend(v if isinstance(v, list) else [v] * n)
        if boot is None:
            self.boot.append(n)
        else:
            b = boot.detach().to(torch.float64).reshape(boot.shape[0], -1).T.numpy()
            if b.shape[0] != n:
                raise ValueError(f"{b.shape[0]} replicate rows for {n} table rows")
            self.boot.append(b)
        self.keys.extend([self.sample_set] * n)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.data)

    def replicates(self) -> Replicates:
        width = max((b.shape[1] for b in self.boot if isinstance(b, np.ndarray)), default=0)
        parts = [b if isinstance(b, np.ndarray) else np.full((b, width), np.nan) for b in self.boot]
        values = np.concatenate(parts) if parts else np.zeros((0, width))
        return Replicates(values, np.asarray(self.keys, dtype=object))


def _result(out: "_Columns", with_replicates: bool):
    return (out.frame(), out.replicates()) if with_replicates else out.frame()


def _floats(x: Tensor) -> list[float]:
    return [float(v) for v in x.reshape(-1).tolist()]


def _common_layers(
    steps: Sequence[StepData], layers: Sequence[int] | None, with_vectors: bool
) -> list[int]:
    avail = set(steps[0].acts.layers)
    for s in steps:
        avail &= set(s.acts.layers)
        if with_vectors:
            avail &= set(s.vectors.layers)
    if layers is None:
        return sorted(avail)
    missing = [layer for layer in layers if layer not in avail]
    if missing:
        raise ValueError(
            f"layers {missing} are not available at every step; available: {sorted(avail)}"
        )
    return list(layers)


# --------------------------------------------------------------------------- replicates


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


def _keep_of(step: StepData, keep_masks: Mapping[int, Tensor] | None, n_labels: int) -> Tensor:
    gold = step.acts.gold
    known = (gold >= 0) & (gold < n_labels)
    if keep_masks is None:
        return known
    if step.step not in keep_masks:
        raise ValueError(f"keep_masks has no mask for step {step.step}")
    mask = torch.as_tensor(keep_masks[step.step]).bool().cpu()
    if mask.shape != gold.shape:
        raise ValueError(
            f"keep mask of step {step.step} has shape {tuple(mask.shape)}, expected ({len(gold)},)"
        )
    return mask & known


def _geometry(
    steps: Sequence[StepData],
    labels: Sequence[str],
    neutral: str,
    layers: Sequence[int] | None,
    keep_masks: Mapping[int, Tensor] | None,
    n_boot: int,
    seed: int,
    ci: float,
    inners: Mapping[int, CausalInnerProduct | None],
    inner_name: str,
    out: _Columns,
) -> None:
    labels = list(labels)
    if neutral not in labels:
        raise ValueError(f"neutral label {neutral!r} is not among the labels {labels}")
    n_labels = len(labels)
    u = labels.index(neutral)
    layer_list = _common_layers(steps, layers, with_vectors=True)
    prepared = []
    for s in steps:
        for e in s.vectors.emotions:
            if e not in labels:
                raise ValueError(f"step {s.step}: emotion {e!r} is not among the labels")
        keep = _keep_of(s, keep_masks, n_labels)
        y = s.acts.gold[keep].long()
        rep = _Replicates(y, n_labels, n_boot, seed)
        empty = [
            e for e in s.vectors.emotions + (neutral,) if int(rep.count[0, labels.index(e)]) == 0
        ]
        if empty:
            warnings.warn(
                f"step {s.step}: no kept sample for {empty}; their measures are NaN "
                "(does keep_masks match the samples that built the vectors?)",
                stacklevel=3,
            )
        prepared.append((s, keep, rep))
    for layer in layer_list:
        first_full: dict[str, Tensor] = {}
        prev_full: dict[str, Tensor] = {}
        for t, (s, keep, rep) in enumerate(prepared):
            out.sample_set = _sample_key(
                [sid for sid, k in zip(s.acts.sample_ids, keep.tolist()) if k]
            )
            inner = inners[s.step]
            h = s.acts.layer(layer)[keep].to(torch.float64)
            if inner is not None:
                h = inner.whiten(h)
            emotions = list(s.vectors.emotions)
            e_idx = torch.tensor([labels.index(e) for e in emotions], dtype=torch.long)
            origin = h.mean(0) if len(h) else h.new_zeros(h.shape[1])
            hc = h - origin  # translation: vectors and centred cosines are invariant to it
            gram = hc @ hc.T
            wg = rep.class_sums(gram)  # [R, C, n]
            ss = torch.bmm(wg, rep.weights.transpose(1, 2))  # [R, C, C]
            hh = torch.diagonal(gram)
            tot = rep.count.sum(1)  # [R]
            common = dict(step=s.step, layer=layer, inner=inner_name)

            # within-concept similarity: raw (origin 0 = -origin in hc coordinates) and centred
            ho = hc @ origin  # h'_i . o
            so = rep.class_sums(ho[:, None])[..., 0]  # [R, C]
            raw = _within(rep, wg, ss, hh, -ho[None], -so, (origin @ origin).expand(len(tot)))
            safe_tot = torch.where(tot > 0, tot, 1.0)
            hm = wg.sum(1) / safe_tot[:, None]  # h'_i . mu'
            ms = ss.sum(1) / safe_tot[:, None]  # mu' . S'_c
            mm_c = ss.sum((1, 2)) / safe_tot**2
            cen = _within(rep, wg, ss, hh, hm, ms, mm_c)
            w_names = emotions + [neutral]
            w_idx = torch.cat([e_idx, torch.tensor([u])])
            for suffix, (own, other) in (("", raw), ("_centred", cen)):
                for name, val in zip(WITHIN_MEASURES, (own, other, own - other)):
                    v = val[:, w_idx]
                    lo, hi = _interval(v[1:], ci)
                    out.add(
                        boot=v[1:],
                        **common,
                        measure=name + suffix,
                        emotion=w_names,
                        value=_floats(v[0]),
                        ci_low=_floats(lo),
                        ci_high=_floats(hi),
                    )

            # concept vectors: Gram matrix of the replicates' vectors from the means' Gram
            n = rep.count
            denom = torch.where(n > 0, n, torch.nan)
            means_gram = ss / (denom[:, :, None] * denom[:, None, :])
            mg_e = means_gram[:, e_idx][:, :, e_idx]
            mg_eu = means_gram[:, e_idx, u]
            k_v = mg_e - mg_eu[:, :, None] - mg_eu[:, None, :] + means_gram[:, u, u][:, None, None]
            norms = torch.diagonal(k_v, dim1=1, dim2=2).clamp_min(0).sqrt()  # [R, E]
            lo, hi = _interval(norms[1:], ci)
            out.add(
                boot=norms[1:],
                **common,
                measure="vector_norm",
                emotion=emotions,
                value=_floats(norms[0]),
                ci_low=_floats(lo),
                ci_high=_floats(hi),
            )
            unit = torch.where(norms > 0, norms, torch.nan)
            cos = (k_v / (unit[:, :, None] * unit[:, None, :])).clamp(-1.0, 1.0)
            off = ~torch.eye(len(emotions), dtype=torch.bool)
            orth = (
                cos[:, off].abs().nanmean(1)
                if len(emotions) > 1
                else torch.full((cos.shape[0],), torch.nan, dtype=torch.float64)
            )
            lo, hi = _interval(orth[1:, None], ci)
            out.add(
                boot=orth[1:, None],
                **common,
                measure="orthogonality",
                emotion="all",
                value=float(orth[0]),
                ci_low=float(lo[0]),
                ci_high=float(hi[0]),
            )

            # full-sample vectors in (whitened) residual space, for the next steps' references
            means0 = rep.class_means(hc)[0] if len(hc) else None
            full = (
                {e: (means0[labels.index(e)] - means0[u]) for e in emotions}
                if means0 is not None
                else {}
            )

            # stability: cosine with the first and the previous step's full-sample vectors
            ref_first = full if t == 0 else first_full
            ref_prev = full if t == 0 else prev_full
            for measure, ref in (("cosine_to_first", ref_first), ("cosine_to_previous", ref_prev)):
                names = [e for e in emotions if e in ref]
                if not names:
                    continue
                sel = torch.tensor([emotions.index(e) for e in names])
                r = torch.stack([ref[e] for e in names])  # [k, d]
                proj = rep.class_means(hc @ r.T)  # [R, C, k]
                idx = e_idx[sel]
                dots = proj[:, idx, torch.arange(len(names))] - proj[:, u, :]  # [R, k]
                cosv = (dots / (unit[:, sel] * r.norm(dim=-1)[None])).clamp(-1.0, 1.0)
                lo, hi = _interval(cosv[1:], ci)
                boot = cosv[1:]
                if measure == "cosine_to_previous" and t == 0:
                    boot = torch.full_like(boot, torch.nan)  # no previous step: nothing to test
                if t == 0:
                    value = [1.0 if measure == "cosine_to_first" else float("nan")] * len(names)
                else:
                    value = _floats(cosv[0])
                out.add(
                    boot=boot,
                    **common,
                    measure=measure,
                    emotion=names,
                    value=value,
                    ci_low=_floats(lo),
                    ci_high=_floats(hi),
                )

            # principal angles between the spans at step t and at the first step
            names = [e for e in emotions if e in full and (e in first_full or t == 0)]
            names = [
                e
                for e in names
                if bool(torch.isfinite(ref_first[e]).all()) and bool(torch.isfinite(full[e]).all())
            ]
            if names:
                sel = torch.tensor([emotions.index(e) for e in names])
                a = torch.stack([ref_first[e] for e in names])
                basis = _basis(a)
                proj = rep.class_means(hc @ basis)  # [R, C, r]
                x_proj = proj[:, e_idx[sel]] - proj[:, u][:, None]  # [R, k, r]
                angles = _cholesky_angles(k_v[:, sel][:, :, sel], x_proj)
                b = torch.stack([full[e] for e in names])
                exact = (
                    principal_angles(a, b)
                    if t > 0
                    else torch.zeros(min(len(names), basis.shape[1]))
                )
                for measure, stat, est in (
                    (
                        "principal_angle_to_first_max",
                        angles.amax(-1),
                        exact.max() if len(exact) else torch.tensor(float("nan")),
                    ),
                    (
                        "principal_angle_to_first_mean",
                        angles.mean(-1),
                        exact.mean() if len(exact) else torch.tensor(float("nan")),
                    ),
                ):
                    lo, hi = _interval(stat[1:, None], ci)
                    out.add(
                        boot=stat[1:, None],
                        **common,
                        measure=measure,
                        emotion="all",
                        value=float(est),
                        ci_low=float(lo[0]),
                        ci_high=float(hi[0]),
                    )
            if t == 0:
                first_full = full
            prev_full = full


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
    dual: bool = False,
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
    return the rows' bootstrap :class:`Replicates` (for :func:`change_summary`).
    """
    out = _Columns(GEOMETRY_COLUMNS)
    if not steps:
        return _result(out, return_replicates)
    with _threads(num_threads):
        _geometry(
            steps,
            labels,
            neutral,
            layers,
            keep_masks,
            n_boot,
            seed,
            ci,
            {s.step: None for s in steps},
            "plain",
            out,
        )
        if unembedding is not None:
            inner = _inner_of(unembedding, dual)
            _geometry(
                steps,
                labels,
                neutral,
                layers,
                keep_masks,
                n_boot,
                seed,
                ci,
                {s.step: inner for s in steps},
                "causal",
                out,
            )
    return _result(out, return_replicates)


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
    dual: bool = False,
    num_threads: int | None = 1,
    return_replicates: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Replicates]:
    """:func:`geometry_frame` in the causal inner product only, with each step's own metric.

    ``W_U_effective_by_step[step]``: that step's ``[vocab, d_model]`` unembedding times its
    final-norm gain, or a ready :class:`~emolens.analysis.geometry.CausalInnerProduct` (building one
    from a full vocabulary costs ``vocab * d_model^2``; reuse it where steps share a readout).
    Every step needs one. Rows have ``inner == "causal"``.
    """
    out = _Columns(GEOMETRY_COLUMNS)
    if not steps:
        return _result(out, return_replicates)
    missing = [s.step for s in steps if s.step not in W_U_effective_by_step]
    if missing:
        raise ValueError(f"no unembedding for steps {missing}")
    with _threads(num_threads):
        inners = {s.step: _inner_of(W_U_effective_by_step[s.step], dual) for s in steps}
        _geometry(
            steps, labels, neutral, layers, keep_masks, n_boot, seed, ci, inners, "causal", out
        )
    return _result(out, return_replicates)


# --------------------------------------------------------------------------- probes


def _aligned_samples(steps: Sequence[StepData], n_labels: int) -> tuple[list[Tensor], Tensor]:
    """Positions, at every step, of the first step's samples with a known gold label that
    every step has; and their gold labels (which must agree between steps)."""
    first = steps[0].acts
    maps = [{sid: i for i, sid in enumerate(s.acts.sample_ids)} for s in steps]
    gold0 = first.gold.tolist()
    ids = [
        sid
        for sid, g in zip(first.sample_ids, gold0)
        if 0 <= g < n_labels and all(sid in m for m in maps)
    ]
    if not ids:
        raise ValueError("no sample with a known gold label is present at every step")
    positions = [torch.tensor([m[sid] for sid in ids], dtype=torch.long) for m in maps]
    y = first.gold[positions[0]].long()
    for s, pos in zip(steps, positions):
        if not torch.equal(s.acts.gold[pos].long(), y):
            raise ValueError(
                f"step {s.step} gives some samples another gold label than step {steps[0].step}"
            )
    return positions, y


def probes_frame(
    steps: Sequence[StepData],
    labels: Sequence[str],
    layers: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    n_boot: int = 200,
    ci: float = 0.95,
    l2: float = 1e-3,
    max_iter: int = 300,
    num_threads: int | None = 1,
    return_replicates: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, Replicates]:
    """Linear probes per step and layer, long, with bootstrap intervals.

    Samples: those of the first step with a known gold label that every step has (no
    filtering: the probe reads the label from the residual whatever the model answered); one
    stratified split of them (:func:`emolens.analysis.probes.stratified_split`, ``seed``) for all
    steps
    and layers. ``layers``: default every layer collected at every step.

    Columns ``step, layer, measure, label, value, ci_low, ci_high, train_step, n``; measures:

    - ``accuracy`` (label ``"all"``) and ``recall`` (per label) on the held-out samples, of the
      step's own probe (``train_step == step``) and of the first step's probe evaluated on this
      step's residuals of the same held-out samples (``train_step`` = the first step; at the
      first step the two are the same probe and appear once);
    - ``train_accuracy``; ``shuffled_accuracy`` (a probe trained on permuted training labels,
      seed ``seed + 1``, scored on the true held-out labels); ``chance`` (the majority label's
      share of the held-out set, no interval).

    Intervals: percentile bootstrap of the held-out samples resampled within labels (the same
    resamples at every step and layer, so steps are paired); none for ``train_accuracy`` and
    ``chance``. ``n`` is the number of samples scored (per label for ``recall``). ``l2``,
    ``max_iter``: of :func:`emolens.analysis.probes.train_probe`; ``num_threads`` as in
    :func:`geometry_frame` (also ``return_replicates``).
    """
    out = _Columns(PROBE_COLUMNS)
    if not steps:
        return _result(out, return_replicates)
    with _threads(num_threads):
        _probes(steps, labels, layers, test_fraction, seed, n_boot, ci, l2, max_iter, out)
    return _result(out, return_replicates)


def _probes(
    steps: Sequence[StepData],
    labels: Sequence[str],
    layers: Sequence[int] | None,
    test_fraction: float,
    seed: int,
    n_boot: int,
    ci: float,
    l2: float,
    max_iter: int,
    out: _Columns,
) -> None:
    labels = list(labels)
    n_labels = len(labels)
    positions, y = _aligned_samples(steps, n_labels)
    layer_list = _common_layers(steps, layers, with_vectors=False)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    out.sample_set = _sample_key([steps[0].acts.sample_ids[int(i)] for i in positions[0][test_idx]])
    y_train, y_test = y[train_idx], y[test_idx]
    n_test = len(test_idx)
    counts = torch.zeros(max(n_boot, 0), n_test, dtype=torch.float64)
    if n_boot > 0:
        idx = stats.bootstrap_indices(n_test, n_boot, seed, strata=y_test)
        counts.scatter_add_(1, idx, torch.ones(n_boot, n_test, dtype=torch.float64))
    present = torch.bincount(y_test, minlength=n_labels)
    label_ids = [c for c in range(n_labels) if int(present[c]) > 0]
    members = [torch.nonzero(y_test == c).flatten() for c in label_ids]
    chance = float(present.max()) / max(n_test, 1)
    gen = torch.Generator().manual_seed(seed + 1)
    shuffle = torch.randperm(len(train_idx), generator=gen)
    first = steps[0].step

    def scores(pred: Tensor, step: int, layer: int, measure: str, train_step: int) -> None:
        correct = (pred == y_test).to(torch.float64)
        boot = counts @ correct / max(n_test, 1)
        lo, hi = _interval(boot[:, None], ci)
        out.add(
            boot=boot[:, None],
            step=step,
            layer=layer,
            measure=measure,
            label="all",
            value=float(correct.mean()),
            ci_low=float(lo[0]),
            ci_high=float(hi[0]),
            train_step=train_step,
            n=n_test,
        )
        if measure != "accuracy":
            return
        recall = per_label_recall(pred, y_test, n_labels)
        boot_r = (
            torch.stack([counts[:, m] @ correct[m] / len(m) for m in members], 1)
            if members
            else torch.zeros(counts.shape[0], 0, dtype=torch.float64)
        )
        lo, hi = _interval(boot_r, ci)
        out.add(
            boot=boot_r,
            step=step,
            layer=layer,
            measure="recall",
            label=[labels[c] for c in label_ids],
            value=[float(recall[c]) for c in label_ids],
            ci_low=_floats(lo),
            ci_high=_floats(hi),
            train_step=train_step,
            n=[int(present[c]) for c in label_ids],
        )

    for layer in layer_list:
        probe0 = None
        for s, pos in zip(steps, positions):
            x = s.acts.layer(layer)[pos]
            x_train, x_test = x[train_idx], x[test_idx]
            probe = train_probe(x_train, y_train, n_labels, l2=l2, seed=seed, max_iter=max_iter)
            scores(probe.predict(x_test), s.step, layer, "accuracy", s.step)
            out.add(
                step=s.step,
                layer=layer,
                measure="train_accuracy",
                label="all",
                value=probe.accuracy(x_train, y_train),
                ci_low=float("nan"),
                ci_high=float("nan"),
                train_step=s.step,
                n=len(train_idx),
            )
            shuffled = train_probe(
                x_train, y_train[shuffle], n_labels, l2=l2, seed=seed, max_iter=max_iter
            )
            scores(shuffled.predict(x_test), s.step, layer, "shuffled_accuracy", s.step)
            out.add(
                step=s.step,
                layer=layer,
                measure="chance",
                label="all",
                value=chance,
                ci_low=chance,
                ci_high=chance,
                train_step=s.step,
                n=n_test,
            )
            if probe0 is None:
                probe0 = probe
            else:
                scores(probe0.predict(x_test), s.step, layer, "accuracy", first)


# --------------------------------------------------------------------------- change summary


def _series_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Add a ``probe`` column to a probes frame (``own``, or ``step S`` for a probe trained at
    step S evaluated elsewhere), with the training step's own rows copied into each such
    series as its first point."""
    if "train_step" not in frame.columns:
        return frame
    df = frame.copy()
    own = df.train_step == df.step
    df["probe"] = np.where(own, "own", "step " + df.train_step.astype(str))
    extra = []
    for s in sorted(df.loc[~own, "train_step"].unique()):
        measures = df.loc[~own & (df.train_step == s), "measure"].unique()
        ref = df[own & (df.step == s) & df.measure.isin(measures)].copy()
        ref["probe"] = f"step {s}"
        extra.append(ref)
    return pd.concat([df, *extra], ignore_index=True) if extra else df


#: Columns of :func:`change_summary` after the series keys.
CHANGE_COLUMNS = (
    "family",
    "first_step",
    "step",
    "first_value",
    "value",
    "effect",
    "effect_ci_low",
    "effect_ci_high",
    "p",
    "q",
    "fdr_change",
    "test",
    "paired",
    "n_resamples",
    "equivalence_margin",
    "margin_rule",
    "equivalence_p",
    "equivalent_within_margin",
)


def change_summary(
    frame: pd.DataFrame,
    replicates: Replicates,
    measure_cols: Sequence[str] | None = None,
    family: str | None = None,
    ci: float = 0.95,
    fdr_level: float = 0.05,
    equivalence_margin: float = change_tests.DEFAULT_EQUIVALENCE_MARGIN,
    equivalence_level: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Per measure series and later step: a test of the change from the first step.

    ``frame``: a :func:`geometry_frame` or :func:`probes_frame` table (or both concatenated
    with their ``replicates`` in the same order, ``Replicates.concat``), ``replicates`` the
    :class:`Replicates` they returned (``return_replicates=True``). A series is one combination
    of ``measure_cols`` (default: every column but ``step, value, ci_low, ci_high, train_step,
    n``, i.e. ``layer, measure, emotion, inner`` for geometry and ``layer, measure, label``
    plus a ``probe`` column, ``"own"`` or ``"step S"``, for probes).

    One row per series and step ``t`` after the frame's first step ``first_step``:

    - ``effect = value(t) - value(first)``, its percentile interval
      ``effect_ci_low/high`` (level ``ci``) and two-sided ``p`` from
      :func:`emolens.analysis.change_tests.paired_bootstrap_test`. ``paired`` is True where both
      steps
      resampled the same samples (same sample-set key: the bootstrap resamples the same sample
      indices at both steps). Where the kept samples differ (self-filtering), the replicates
      of step t are re-paired with a random permutation (``seed``), which makes the two
      bootstraps independent: an unpaired test, conservative for overlapping sample sets.
    - ``q``: Benjamini-Hochberg within ``family`` (default ``"probes"`` for a probes table,
      ``"geometry"`` otherwise; a ``family`` column in ``frame`` overrides), over every tested
      row of the family; ``fdr_change``: ``q < fdr_level``.
    - ``equivalence_margin``: :func:`emolens.analysis.change_tests.equivalence_margin` of the
    series'
      measure (``margin_rule`` says ``absolute`` or ``relative to |first value|``);
      ``equivalence_p``: TOST (:func:`emolens.analysis.change_tests.tost_bootstrap`);
      ``equivalent_within_margin``: ``equivalence_p < equivalence_level``.

    Rows with no replicates (``train_accuracy``, ``chance``, ``cosine_to_previous``) or a NaN
    first value get NaN p, q and equivalence p and are not counted in the FDR.
    """
    if len(replicates) != len(frame):
        raise ValueError(
            f"{len(replicates)} replicate rows for {len(frame)} table rows: pass the "
            "replicates returned with this table (return_replicates=True), in the same order"
        )
    if not 0.0 < fdr_level < 1.0 or not 0.0 < equivalence_level < 1.0:
        raise ValueError("fdr_level and equivalence_level must lie strictly between 0 and 1")
    base = frame.reset_index(drop=True).assign(_row=np.arange(len(frame)))
    if family is None and "family" not in base.columns:
        family = "probes" if "train_step" in base.columns else "geometry"
    if family is not None:
        base = base.assign(family=family)
    df = _series_frame(base)
    if measure_cols is None:
        keys = [c for c in df.columns if c not in NON_KEY_COLUMNS + ("_row", "family")]
    else:
        keys = list(measure_cols)
        if "probe" in df.columns and "probe" not in keys:
            keys.append("probe")
    out_cols = keys + list(CHANGE_COLUMNS)
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    missing = [c for c in keys + ["step", "value"] if c not in df.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    if df.duplicated(keys + ["step"]).any():
        raise ValueError(
            f"rows are not unique per series and step with keys {keys}; pass "
            "measure_cols naming every column that tells series apart"
        )
    first_step = df.step.min()
    first = df[df.step == first_step].set_index(keys)
    later = df[df.step != first_step]
    ref = first[["_row", "value"]].rename(columns={"_row": "_row_first", "value": "value_first"})
    later = later.join(ref, on=keys)
    later = later[later["_row_first"].notna()].sort_values(keys + ["step"], kind="stable")
    rows_t = later["_row"].to_numpy(dtype=np.int64)
    rows_0 = later["_row_first"].to_numpy(dtype=np.int64)
    boot = replicates.values
    paired = replicates.sample_set[rows_t] == replicates.sample_set[rows_0]
    boot_t = boot[rows_t].copy()
    if (~paired).any() and boot.shape[1]:
        perm = np.random.default_rng(seed).permutation(boot.shape[1])
        boot_t[~paired] = boot_t[~paired][:, perm]
    value_t = np.array(later["value"], dtype=np.float64)
    value_0 = np.array(later["value_first"], dtype=np.float64)
    test = change_tests.paired_bootstrap_test(
        torch.from_numpy(value_t), torch.from_numpy(value_0),
        torch.from_numpy(boot_t), torch.from_numpy(np.array(boot[rows_0])), ci=ci,
    )  # fmt: skip
    measures = later["measure"].astype(str).tolist() if "measure" in later else [""] * len(later)
    margins = np.array(
        [
            change_tests.equivalence_margin(m, v, equivalence_margin) if np.isfinite(v) else np.nan
            for m, v in zip(measures, value_0, strict=True)
        ]
    )
    d_star = torch.from_numpy(boot_t - boot[rows_0])
    eq = change_tests.tost_bootstrap(
        test.effect, d_star, torch.from_numpy(margins), level=equivalence_level
    )
    fam = later["family"].astype(str).to_numpy()
    p = test.p.numpy()
    q = change_tests.fdr_by_family(p, fam)
    res = later[keys].reset_index(drop=True)
    res["family"] = fam
    res["first_step"] = first_step
    res["step"] = later["step"].to_numpy()
    res["first_value"] = value_0
    res["value"] = value_t
    res["effect"] = test.effect.numpy()
    res["effect_ci_low"] = test.low.numpy()
    res["effect_ci_high"] = test.high.numpy()
    res["p"] = p
    res["q"] = q
    res["fdr_change"] = np.where(np.isfinite(q), q < fdr_level, False)
    res["test"] = np.where(paired, "paired bootstrap", "unpaired bootstrap (kept sets differ)")
    res["paired"] = paired
    res["n_resamples"] = np.isfinite(d_star.numpy()).sum(1)
    res["equivalence_margin"] = margins
    res["margin_rule"] = [
        f"relative: {equivalence_margin:g} x |first value|"
        if m in change_tests.RELATIVE_MEASURES
        else f"absolute: {equivalence_margin:g}"
        for m in measures
    ]
    res["equivalence_p"] = eq.p.numpy()
    res["equivalent_within_margin"] = eq.equivalent.numpy()
    return res[out_cols]


def sensitivity_change_summary(
    sensitivity: pd.DataFrame,
    measure: str = "logit_change",
    ci: float = 0.95,
    fdr_level: float = 0.05,
    equivalence_margin: float = change_tests.DEFAULT_EQUIVALENCE_MARGIN,
    equivalence_level: float = 0.05,
    n_perm: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The :func:`change_summary` rows of steering sensitivity (family ``"sensitivity"``).

    ``sensitivity``: ``sensitivity.csv`` rows; the diagonal (``steered_emotion ==
    observed_label``) is tested. A series is one ``layer, steered_emotion, alpha`` (and
    ``alpha_unit``, ``positions`` where present); each step after the first is compared with
    the first on the prompts both have, by the sign-flip permutation test of the per-prompt
    differences of ``measure`` (:func:`emolens.analysis.change_tests.sign_flip_test`; the prompts
    are
    the same at every step, so the differences are paired) and TOST by sign flips. This holds
    each step's concept vector fixed: it is the prompt noise only, a test of "steering with
    these vectors changed", not of "the model's sensitivity changed" (the two-level bootstrap
    of :func:`figure2_frame` adds the noise of estimating ``v``). Measured in
    ``benchmarks/calibration.py``: where ``v`` is re-estimated from fresh samples at each step
    under no true change, this test rejects most series (false-positive rate about 0.6 at the
    demo's sizes), so use it for the conditional claim only. The margin is relative:
    ``equivalence_margin x |first value|``. Columns: ``layer, measure, emotion, alpha`` and
    :data:`CHANGE_COLUMNS`.
    """
    keys = [c for c in ("layer", "steered_emotion", "alpha", "alpha_unit", "positions")
            if c in sensitivity.columns]  # fmt: skip
    need = ["step", "steered_emotion", "observed_label", "prompt_id", measure]
    missing = [c for c in need if c not in sensitivity.columns]
    if missing:
        raise ValueError(f"the sensitivity table lacks columns {missing}")
    out_keys = ["layer", "measure", "emotion", "alpha"] + [
        k for k in ("alpha_unit", "positions") if k in keys
    ]
    diag = sensitivity[sensitivity.steered_emotion == sensitivity.observed_label]
    rows = []
    if diag.empty:
        return pd.DataFrame(columns=out_keys + list(CHANGE_COLUMNS))
    first_step = diag.step.min()
    for key, g in diag.groupby(keys, sort=True, dropna=False):
        wide = g.pivot_table(index="prompt_id", columns="step", values=measure, aggfunc="mean")
        if first_step not in wide.columns:
            continue
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for step in [s for s in wide.columns if s != first_step]:
            pair = wide[[first_step, step]].dropna()
            d = torch.tensor(pair[step].to_numpy() - pair[first_step].to_numpy())
            first_value = float(pair[first_step].mean()) if len(pair) else float("nan")
            test = change_tests.sign_flip_test(d[None], n_perm=n_perm, ci=ci, seed=seed)
            margin = (
                change_tests.equivalence_margin(measure, first_value, equivalence_margin)
                if np.isfinite(first_value)
                else float("nan")
            )
            eq = change_tests.tost_sign_flip(
                d[None], margin, level=equivalence_level, n_perm=n_perm, seed=seed
            )
            rows.append(
                {
                    "layer": key.get("layer"),
                    "measure": measure,
                    "emotion": key["steered_emotion"],
                    "alpha": key.get("alpha"),
                    **{k: key[k] for k in ("alpha_unit", "positions") if k in key},
                    "family": "sensitivity",
                    "first_step": first_step,
                    "step": step,
                    "first_value": first_value,
                    "value": float(pair[step].mean()) if len(pair) else float("nan"),
                    "effect": float(test.effect[0]),
                    "effect_ci_low": float(test.low[0]),
                    "effect_ci_high": float(test.high[0]),
                    "p": float(test.p[0]),
                    "test": "sign-flip permutation over prompts (v fixed)",
                    "paired": True,
                    "n_resamples": n_perm,
                    "equivalence_margin": margin,
                    "margin_rule": f"relative: {equivalence_margin:g} x |first value|",
                    "equivalence_p": float(eq.p[0]),
                    "equivalent_within_margin": bool(eq.equivalent[0]),
                    "n_prompts": len(pair),
                }
            )
    res = pd.DataFrame(rows)
    if res.empty:
        return pd.DataFrame(columns=out_keys + list(CHANGE_COLUMNS))
    res["q"] = change_tests.benjamini_hochberg(res["p"].to_numpy())
    res["fdr_change"] = np.where(res["q"].notna(), res["q"] < fdr_level, False)
    return res[out_keys + list(CHANGE_COLUMNS)]


# --------------------------------------------------------------------------- Figure 2


FIGURE2_COLUMNS = ("step", "layer", "emotion", "alpha", "value", "ci_low", "ci_high", "n_boot")
TREND_COLUMNS = (
    "emotion",
    "alpha",
    "layer",
    "first_step",
    "last_step",
    "paired",
    "first_last_effect",
    "first_last_ci_low",
    "first_last_ci_high",
    "first_last_p",
    "first_last_q",
    "slope_per_step",
    "slope_ci_low",
    "slope_ci_high",
    "slope_p",
    "slope_q",
)


def figure2_frame(
    steps: Sequence[StepData],
    prompt_ids: Sequence[str],
    alphas: Sequence[float | int],
    labels: Sequence[str],
    neutral: str,
    keep_masks: Mapping[int, Tensor] | None = None,
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    num_threads: int | None = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 2's points with two-level bootstrap bands, and per-emotion trend tests.

    Per step (final layer, where steering needs no forward pass) and alpha:
    :func:`emolens.analysis.change_tests.figure2_bootstrap` with the step's kept samples
    (``keep_masks``, default all with a known gold label), the residuals of ``prompt_ids`` and
    the step's :class:`~emolens.measure.attribution.Readout`; emotions that have a vector at every
    step. A prompt that is one of the kept samples is resampled with them (see
    :func:`emolens.analysis.change_tests.figure2_bootstrap`). Returns ``(bands, trends)``: ``bands``
    has :data:`FIGURE2_COLUMNS` (``value`` the point, ``ci_low/high`` its interval from
    resampling both the samples that build ``v`` and the prompts); ``trends`` has
    :data:`TREND_COLUMNS`, per emotion and alpha
    (:func:`emolens.analysis.change_tests.trend_tests`, BH across emotions within each alpha).
    ``paired`` says whether every step kept the same samples (then the same resamples pair
    the steps); where not, each differing step's replicates are re-paired at random (seed
    ``seed``), which treats the steps as independent samples (conservative when they overlap).
    """
    band = _Columns(FIGURE2_COLUMNS)
    trends = _Columns(TREND_COLUMNS)
    if not steps:
        return band.frame(), trends.frame()
    labels = list(labels)
    n_labels = len(labels)
    emotions = [e for e in steps[0].vectors.emotions if all(e in s.vectors.emotions for s in steps)]
    e_lab = [labels.index(e) for e in emotions]
    u = labels.index(neutral)
    keys = []
    with _threads(num_threads):
        per_alpha: dict[float, list] = {float(a): [] for a in alphas}
        for s in steps:
            keep = _keep_of(s, keep_masks, n_labels)
            keys.append(_sample_key([i for i, k in zip(s.acts.sample_ids, keep.tolist()) if k]))
            layer = s.final_layer
            h = s.acts.layer(layer)[keep]
            y = s.acts.gold[keep].long()
            prompts = s.prompt_resid(list(prompt_ids))
            kept = {sid: i for i, sid in enumerate(np.asarray(s.acts.sample_ids)[keep.numpy()])}
            positions = [kept.get(p, -1) for p in prompt_ids]
            for a in per_alpha:
                boot = change_tests.figure2_bootstrap(
                    h, y, e_lab, u, prompts, s.readout.logits, e_lab, a, n_boot, ci, seed,
                    prompt_positions=positions,
                )  # fmt: skip
                per_alpha[a].append(boot)
                band.add(
                    step=s.step,
                    layer=layer,
                    emotion=list(emotions),
                    alpha=a,
                    value=_floats(boot.estimate),
                    ci_low=_floats(boot.low),
                    ci_high=_floats(boot.high),
                    n_boot=n_boot,
                )
    paired = all(k == keys[0] for k in keys)
    step_numbers = [s.step for s in steps]
    if len(steps) < 2 or n_boot <= 0 or not emotions:
        return band.frame(), trends.frame()
    gen = torch.Generator().manual_seed(seed)
    for a, boots in per_alpha.items():
        est = torch.stack([b.estimate for b in boots])  # [step, emotion]
        reps = []
        for k, b in zip(keys, boots, strict=True):
            r = b.samples
            if k != keys[0]:
                r = r[:, torch.randperm(r.shape[1], generator=gen)]
            reps.append(r)
        res = change_tests.trend_tests(step_numbers, est, torch.stack(reps), ci)
        trends.add(
            emotion=list(emotions),
            alpha=a,
            layer=steps[-1].final_layer,
            first_step=step_numbers[0],
            last_step=step_numbers[-1],
            paired=paired,
            first_last_effect=_floats(res.first_last.effect),
            first_last_ci_low=_floats(res.first_last.low),
            first_last_ci_high=_floats(res.first_last.high),
            first_last_p=_floats(res.first_last.p),
            first_last_q=[float(x) for x in res.q_first_last],
            slope_per_step=_floats(res.slope.effect),
            slope_ci_low=_floats(res.slope.low),
            slope_ci_high=_floats(res.slope.high),
            slope_p=_floats(res.slope.p),
            slope_q=[float(x) for x in res.q_slope],
        )
    return band.frame(), trends.frame()


# --------------------------------------------------------------------------- random baseline


def random_baseline_frame(
    steps: Sequence[StepData],
    prompt_ids: Sequence[str],
    alphas: Sequence[float | int],
    labels: Sequence[str],
    seed: int = 0,
    n_random: int = 8,
    n_boot: int = 1000,
    ci: float = 0.95,
    alpha_unit: str = "absolute",
) -> pd.DataFrame:
    """Final-layer steering with each concept vector against random directions of its norm.

    Per step, emotion and alpha: ``logit_change_concept``, the mean over ``prompt_ids`` of the
    emotion's own label logit change (:func:`emolens.measure.attribution.transfer_effect` with the
    step's readout and prompt residuals), with a bootstrap interval over prompts
    (``concept_ci_low/high``); ``logit_change_random_mean`` / ``_sd`` (ddof 1) of the same
    quantity over ``n_random`` random directions with the vector's norm
    (:func:`emolens.analysis.stats.random_direction_like`, seeds ``seed .. seed + n_random - 1``,
    the
    same directions at every step), and ``share_random_at_least_concept``, the share of random
    directions whose change is at least the concept's.

    The vectors are those ``sensitivity.csv`` steers with for ``alpha_unit``
    (``StepData.steered_vectors``: under ``"norm"`` rescaled to the mean residual norm), and the
    random directions get their norms. Steps without a readout are left out.
    """
    out = _Columns(RANDOM_COLUMNS)
    labels = list(labels)
    for s in steps:
        if s.readout is None:
            continue
        layer = s.final_layer
        h = s.prompt_resid(list(prompt_ids))
        v = s.steered_vectors(alpha_unit)
        emotions = list(s.vectors.emotions)
        diag = torch.tensor([labels.index(e) for e in emotions], dtype=torch.long)
        rows = torch.arange(len(emotions))
        randoms = [stats.random_direction_like(v, seed=seed + k) for k in range(n_random)]
        for alpha in alphas:
            change = transfer_effect(s.readout, h, v, float(alpha))[rows, :, diag]  # [E, P]
            change = change.to(torch.float64)
            if n_boot > 0:
                boot = stats.bootstrap_ci(change, n_boot=n_boot, ci=ci, seed=seed)
                lo, hi = _floats(boot.low), _floats(boot.high)
            else:
                lo = hi = [float("nan")] * len(emotions)
            concept = change.mean(-1)
            if n_random:
                rand = torch.stack(
                    [
                        transfer_effect(s.readout, h, r, float(alpha))[rows, :, diag]
                        .to(torch.float64)
                        .mean(-1)
                        for r in randoms
                    ]
                )  # [K, E]
                mean = rand.mean(0)
                sd = rand.std(0) if n_random > 1 else torch.full_like(mean, torch.nan)
                share = (rand >= concept[None]).to(torch.float64).mean(0)
            else:
                mean = sd = share = torch.full_like(concept, torch.nan)
            out.add(
                step=s.step,
                layer=layer,
                emotion=emotions,
                alpha=float(alpha),
                alpha_unit=alpha_unit,
                logit_change_concept=_floats(concept),
                concept_ci_low=lo,
                concept_ci_high=hi,
                logit_change_random_mean=_floats(mean),
                logit_change_random_sd=_floats(sd),
                share_random_at_least_concept=_floats(share),
                n_random=n_random,
            )
    return out.frame()


__all__ = [
    "CHANGE_COLUMNS",
    "FIGURE2_COLUMNS",
    "GEOMETRY_COLUMNS",
    "PROBE_COLUMNS",
    "RANDOM_COLUMNS",
    "TREND_COLUMNS",
    "Replicates",
    "causal_geometry_frame",
    "change_summary",
    "figure2_frame",
    "geometry_frame",
    "probes_frame",
    "random_baseline_frame",
    "sensitivity_change_summary",
]
