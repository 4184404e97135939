"""Steering baselines at the final layer (``random_baseline.csv``): each concept vector against
random directions of its norm matched to the residual covariance, and against vectors built the
same way from shuffled labels, with permutation p-values and FDR across emotions."""

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from emolens.analysis import stats
from emolens.analysis._common import Columns, floats, keep_mask
from emolens.analysis.change_tests import benjamini_hochberg
from emolens.analysis.steps import StepData
from emolens.measure.attribution import Readout, transfer_effect
from emolens.measure.steering import steering_vectors

DIRECTIONS = ("covariance", "isotropic")
RANDOM_COLUMNS = (
    "step",
    "layer",
    "emotion",
    "alpha",
    "alpha_unit",
    "logit_change_concept",
    "concept_ci_low",
    "concept_ci_high",
    "directions",
    "logit_change_random_mean",
    "logit_change_random_sd",
    "share_random_at_least_concept",
    "n_random",
    "p_random",
    "q_random",
    "logit_change_shuffled_mean",
    "logit_change_shuffled_sd",
    "n_shuffled",
    "p_shuffled",
    "q_shuffled",
)


def covariance_directions(
    resid: Float[Tensor, "sample d_model"],
    vectors: Float[Tensor, "emotion d_model"],
    n_draws: int,
    seed: int = 0,
) -> Float[Tensor, "draw emotion d_model"]:
    """Random directions drawn from ``N(0, Cov(resid))``, each scaled to its vector's norm.

    ``r = z @ (resid - mean) / sqrt(n - 1)`` with ``z ~ N(0, I_n)`` has exactly the sample
    covariance of ``resid`` (no ``d x d`` matrix is formed), so a direction is as likely as the
    residual stream's own spread makes it: the null for a vector whose direction carries no
    label information (a mean difference of unlabelled groups has this distribution). Drawn in
    float64 on the CPU from ``seed``; returned in ``vectors``' dtype and device.
    """
    h = resid.detach().to(torch.float64).cpu()
    n = h.shape[0]
    if n < 2:
        raise ValueError(f"covariance-matched directions need at least 2 residuals, not {n}")
    centred = (h - h.mean(0)) / (n - 1) ** 0.5
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_draws, vectors.shape[0], n, generator=gen, dtype=torch.float64)
    r = z @ centred  # [draw, emotion, d]
    norms = vectors.detach().to(torch.float64).norm(dim=-1).cpu()
    r = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-300) * norms[None, :, None]
    return r.to(dtype=vectors.dtype, device=vectors.device)


def shuffled_label_vectors(
    resid: Float[Tensor, "sample d_model"],
    gold: Tensor,
    emotion_labels: Sequence[int],
    neutral_label: int,
    n_draws: int,
    seed: int = 0,
) -> Float[Tensor, "draw emotion d_model"]:
    """Equation (2) with the kept samples' labels permuted: ``mean(h | perm = e) -
    mean(h | perm = neutral)`` for each of ``n_draws`` permutations (seeds ``seed``,
    ``seed + 1``, ...; the label counts are those of ``gold``). In float64."""
    h = resid.detach().to(torch.float64).cpu()
    y = gold.long().cpu()
    n_labels = int(y.max()) + 1
    counts = torch.bincount(y, minlength=n_labels).to(torch.float64).clamp_min(1)
    e_idx = torch.as_tensor(list(emotion_labels), dtype=torch.long)
    out = torch.empty(n_draws, len(e_idx), h.shape[1], dtype=torch.float64)
    for k in range(n_draws):
        gen = torch.Generator().manual_seed(seed + k)
        perm = y[torch.randperm(len(y), generator=gen)]
        onehot = torch.nn.functional.one_hot(perm, n_labels).to(torch.float64).T
        means = (onehot @ h) / counts[:, None]
        out[k] = means[e_idx] - means[neutral_label]
    return out


def _own_label_change(
    readout: Readout,
    h: Float[Tensor, "prompt d_model"],
    vectors: Float[Tensor, "*draw emotion d_model"],
    alpha: float,
    own: Tensor,
) -> Float[Tensor, "*draw emotion"]:
    """Mean over prompts of each vector's own-label logit change at the final layer, ``[...,
    e]`` = mean_p ``readout(h_p + alpha v_e)[own_e] - readout(h_p)[own_e]``, in float64."""
    h64 = h.double()
    base = readout.logits(h64)[:, own].T  # [emotion, prompt]
    flat = vectors.double().reshape(-1, *vectors.shape[-2:])  # [draw, E, d]
    out = []
    for chunk in flat.split(16):  # bounded memory: [16, E, P, d] at a time
        steered = readout.logits(h64 + alpha * chunk[..., None, :])  # [c, E, P, label]
        index = own.view(1, -1, 1, 1).expand(*steered.shape[:-1], 1)
        out.append((steered.gather(-1, index)[..., 0] - base).mean(-1))
    picked = torch.cat(out) if out else flat.new_zeros(0, vectors.shape[-2])
    return picked.reshape(*vectors.shape[:-1])


def random_baseline_frame(
    steps: Sequence[StepData],
    prompt_ids: Sequence[str],
    alphas: Sequence[float | int],
    labels: Sequence[str],
    seed: int = 0,
    n_random: int = 99,
    n_boot: int = 1000,
    ci: float = 0.95,
    alpha_unit: str = "absolute",
    directions: str = "covariance",
    n_shuffled: int = 99,
    keep_masks: Mapping[int, Tensor] | None = None,
) -> pd.DataFrame:
    """Final-layer steering with each concept vector against two nulls, per step, emotion and
    alpha (:data:`RANDOM_COLUMNS`).

    ``logit_change_concept``: the mean over ``prompt_ids`` of the emotion's own label logit
    change (as :func:`emolens.measure.attribution.transfer_effect` with the step's readout and
    prompt residuals), with a bootstrap interval over prompts (``concept_ci_low/high``).

    Random directions (``n_random``, seed ``seed``): ``"covariance"`` (default) draws them from
    the covariance of the step's kept final-layer residuals (:func:`covariance_directions`),
    ``"isotropic"`` uniformly (:func:`emolens.analysis.stats.random_direction_like`, seeds
    ``seed ..``; a weak null in an anisotropic residual stream); each has its vector's norm.
    ``logit_change_random_mean`` / ``_sd`` (ddof 1) over them, ``share_random_at_least_concept``
    the share at least the concept's, ``p_random = (1 + k) / (1 + n_random)`` (one-sided) and
    ``q_random`` its Benjamini-Hochberg adjustment across emotions (per step and alpha).

    Shuffled labels (``n_shuffled``, seeds ``seed ..``): vectors rebuilt by eq. (2) from the
    same kept samples with their labels permuted (:func:`shuffled_label_vectors`), steered as
    built (their norms are not matched: the null asks whether the labels, not the averaging,
    give the vector its effect); ``logit_change_shuffled_mean`` / ``_sd``, ``p_shuffled``,
    ``q_shuffled`` likewise.

    The vectors are those ``sensitivity.csv`` steers with for ``alpha_unit``
    (``StepData.steered_vectors``: under ``"norm"`` rescaled to the mean residual norm, and so
    are the shuffled-label vectors). The kept samples are ``keep_masks[step]`` (default the
    step's own ``keep``, else all with a known label). Steps without a readout are left out.
    """
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, not {directions!r}")
    out = Columns(RANDOM_COLUMNS)
    labels = list(labels)
    neutral = labels.index("no-emotion") if "no-emotion" in labels else len(labels) - 1
    for s in steps:
        if s.readout is None:
            continue
        layer = s.final_layer
        h = s.prompt_resid(list(prompt_ids))
        v = s.steered_vectors(alpha_unit).to(torch.float64)
        emotions = list(s.vectors.emotions)
        own = torch.tensor([labels.index(e) for e in emotions], dtype=torch.long)
        masks = keep_masks if keep_masks is not None else _own_keep(s)
        keep = keep_mask(s, masks, len(labels))
        kept = s.acts.layer(layer)[keep]
        randoms = _random_directions(kept, v, n_random, seed, directions)
        shuffled = _shuffled(s, kept, s.acts.gold[keep], own, neutral, n_shuffled, seed, alpha_unit)
        for alpha in alphas:
            a = float(alpha)
            rows = torch.arange(len(own))
            change = transfer_effect(s.readout, h, v, a)[rows, :, own].double()  # [E, P]
            concept = change.mean(-1)
            if n_boot > 0:
                boot = stats.bootstrap_ci(change, n_boot=n_boot, ci=ci, seed=seed)
                lo, hi = floats(boot.low), floats(boot.high)
            else:
                lo = hi = [float("nan")] * len(emotions)
            rand = _own_label_change(s.readout, h, randoms, a, own)  # [K, E]
            shuf = _own_label_change(s.readout, h, shuffled, a, own)  # [S, E]
            p_rand, p_shuf = stats.permutation_p(concept, rand), stats.permutation_p(concept, shuf)
            out.add(
                step=s.step,
                layer=layer,
                emotion=emotions,
                alpha=a,
                alpha_unit=alpha_unit,
                logit_change_concept=floats(concept),
                concept_ci_low=lo,
                concept_ci_high=hi,
                directions=directions,
                **_null_columns("random", rand, concept),
                n_random=n_random,
                p_random=floats(p_rand),
                q_random=[float(q) for q in benjamini_hochberg(p_rand)],
                **_null_columns("shuffled", shuf, concept, share=False),
                n_shuffled=n_shuffled,
                p_shuffled=floats(p_shuf),
                q_shuffled=[float(q) for q in benjamini_hochberg(p_shuf)],
            )
    return out.frame()


def _own_keep(s: StepData) -> dict[int, Tensor] | None:
    return {s.step: s.keep} if s.keep is not None else None


def _random_directions(
    kept: Tensor, v: Tensor, n_random: int, seed: int, directions: str
) -> Float[Tensor, "draw emotion d_model"]:
    if n_random == 0:
        return v.new_zeros(0, *v.shape)
    if directions == "covariance":
        return covariance_directions(kept, v, n_random, seed)
    return torch.stack([stats.random_direction_like(v, seed=seed + k) for k in range(n_random)])


def _shuffled(
    s: StepData, kept: Tensor, gold: Tensor, own: Tensor, neutral: int, n: int, seed: int,
    alpha_unit: str,
) -> Float[Tensor, "draw emotion d_model"]:  # fmt: skip
    """The step's shuffled-label vectors, rescaled for ``alpha_unit`` as its own are."""
    if n == 0:
        return kept.new_zeros(0, len(own), kept.shape[1], dtype=torch.float64)
    raw = shuffled_label_vectors(kept, gold, own.tolist(), neutral, n, seed)
    norm = s.acts.mean_norm(s.final_layer)
    return torch.stack([steering_vectors(r, alpha_unit, norm) for r in raw])


def _null_columns(name: str, null: Tensor, concept: Tensor, share: bool = True) -> dict:
    """``logit_change_{name}_mean`` / ``_sd`` (ddof 1; NaN with fewer than 2 draws) and, for
    ``share``, ``share_random_at_least_concept``."""
    nan = [float("nan")] * len(concept)
    k = null.shape[0]
    cols = {
        f"logit_change_{name}_mean": floats(null.mean(0)) if k else nan,
        f"logit_change_{name}_sd": floats(null.std(0)) if k > 1 else nan,
    }
    if share:
        at_least = (null >= concept[None]).to(torch.float64).mean(0)
        cols["share_random_at_least_concept"] = floats(at_least) if k else nan
    return cols


__all__ = [
    "DIRECTIONS",
    "RANDOM_COLUMNS",
    "covariance_directions",
    "random_baseline_frame",
    "shuffled_label_vectors",
]
