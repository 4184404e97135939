"""How sure: percentile bootstrap confidence intervals, a rule for "the change exceeds its
confidence interval", and random directions as a steering baseline.

Resampling is over samples (prompts, or residuals of one layer): indices are drawn once as
``[n_boot, sample]`` from a seeded generator on the CPU, so the same seed gives the same
resamples for every measure, and measures computed from one set of resamples are paired.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: torch.quantile refuses inputs above 2**24 elements; percentiles are taken in row chunks.
_QUANTILE_LIMIT = 2**24


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile interval ``[low, high]`` around ``estimate`` (the statistic on the full
    sample), with the bootstrap distribution in ``samples`` (last axis ``n_boot``)."""

    low: Float[Tensor, "*batch"]
    high: Float[Tensor, "*batch"]
    estimate: Float[Tensor, "*batch"]
    samples: Float[Tensor, "*batch n_boot"]
    ci: float

    def excludes(self, value: float = 0.0) -> Bool[Tensor, "*batch"]:
        """Where ``value`` lies outside the interval (False where the interval is NaN)."""
        return (self.low > value) | (self.high < value)


def bootstrap_indices(
    n: int,
    n_boot: int = 1000,
    seed: int = 0,
    strata: Int[Tensor, " sample"] | None = None,
) -> Int[Tensor, "n_boot sample"]:
    """Resampled sample indices, one row per bootstrap replicate.

    With ``strata`` (e.g. emotion labels) each stratum is resampled within itself and its
    positions are kept, so ``strata[idx[b]] == strata`` for every row: class sizes never change
    and no class can vanish from a replicate (needed for per-class means such as concept
    vectors). Without, plain resampling with replacement.
    """
    if n < 1:
        raise ValueError("need at least one sample to bootstrap")
    gen = torch.Generator().manual_seed(seed)
    if strata is None:
        return torch.randint(0, n, (n_boot, n), generator=gen)
    strata = strata.cpu()
    if strata.shape != (n,):
        raise ValueError(f"strata must have shape ({n},), got {tuple(strata.shape)}")
    out = torch.empty(n_boot, n, dtype=torch.long)
    for s in torch.unique(strata).tolist():
        members = torch.nonzero(strata == s).flatten()
        draws = torch.randint(0, len(members), (n_boot, len(members)), generator=gen)
        out[:, members] = members[draws]
    return out


def _percentiles(
    samples: Float[Tensor, "*batch n_boot"], ci: float
) -> tuple[Float[Tensor, "*batch"], Float[Tensor, "*batch"]]:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")
    alpha = (1.0 - ci) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=samples.dtype, device=samples.device)
    flat = samples.reshape(-1, samples.shape[-1])
    rows = max(1, _QUANTILE_LIMIT // max(flat.shape[1], 1))
    parts = [torch.nanquantile(flat[i : i + rows], q, dim=-1) for i in range(0, len(flat), rows)]
    lo_hi = torch.cat(parts, dim=1) if parts else flat.new_zeros(2, 0)
    shape = samples.shape[:-1]
    return lo_hi[0].reshape(shape), lo_hi[1].reshape(shape)


def bootstrap_ci(
    values: Float[Tensor, "*batch sample"],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    strata: Int[Tensor, " sample"] | None = None,
) -> BootstrapCI:
    """Percentile bootstrap interval for the mean along the last axis, for every leading index
    at once with the same resamples (vectorised: ``[n_boot, sample]`` indices drawn once; the
    resampled means are ``values @ counts.T / n`` with ``counts`` the per-replicate multiplicity
    of each sample, which equals gathering and averaging without the ``n_boot x n`` copy per
    row). Computed in float64; a NaN in a row makes that row's interval NaN."""
    n = values.shape[-1]
    idx = bootstrap_indices(n, n_boot, seed, strata).to(values.device)
    counts = torch.zeros(n_boot, n, dtype=torch.float64, device=values.device)
    counts.scatter_add_(1, idx, torch.ones_like(counts))
    v = values.to(torch.float64)
    samples = v @ counts.T / n
    low, high = _percentiles(samples, ci)
    return BootstrapCI(low=low, high=high, estimate=v.mean(-1), samples=samples, ci=ci)


def bootstrap_statistic(
    n: int,
    fn: Callable[[Int[Tensor, " sample"]], Tensor],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    strata: Int[Tensor, " sample"] | None = None,
) -> BootstrapCI:
    """Percentile interval of an arbitrary statistic ``fn(indices)`` of resampled samples
    (e.g. the cosine of two concept vectors recomputed from ``resid[idx]``, ``labels[idx]``).

    ``fn`` gets ``arange(n)`` for the estimate and each row of :func:`bootstrap_indices` (same
    seed, same rows as :func:`bootstrap_ci`); it returns a tensor of any fixed shape, and the
    result has that shape. Pass ``strata=labels`` when ``fn`` needs every class present.
    """
    idx = bootstrap_indices(n, n_boot, seed, strata)
    estimate = torch.as_tensor(fn(torch.arange(n))).to(torch.float64)
    samples = torch.stack([torch.as_tensor(fn(row)).to(torch.float64) for row in idx], dim=-1)
    low, high = _percentiles(samples, ci)
    return BootstrapCI(low=low, high=high, estimate=estimate, samples=samples, ci=ci)


def difference_from_first(result: BootstrapCI) -> BootstrapCI:
    """Paired interval of ``statistic[t] - statistic[0]`` along the first (step) axis.

    Valid when every step's statistic was computed from the same resampled samples (one
    :func:`bootstrap_ci` call over ``[step, ..., sample]`` values of the same prompts, or one
    :func:`bootstrap_statistic` whose ``fn`` returns ``[step, ...]``). This is the sharper test
    of change: the change is significant at level ``1 - ci`` where the interval excludes 0
    (``.excludes(0.0)``). Row 0 is identically 0.
    """
    samples = result.samples - result.samples[:1]
    low, high = _percentiles(samples, result.ci)
    estimate = result.estimate - result.estimate[:1]
    return BootstrapCI(low=low, high=high, estimate=estimate, samples=samples, ci=result.ci)


# "step *batch" parses as the Python expression ``step * batch``, so ruff reads names in it
# (F821); the other shape strings are not expressions and fall under the ignored F722.


@dataclass(frozen=True)
class ChangeTest:
    """Per step and measure, whether the change from step 0 exceeds step 0's interval.

    ``outside[t]``: the estimate at ``t`` lies outside step 0's interval ``[low[0], high[0]]``
    (strictly). ``disjoint[t]``: the intervals of ``t`` and of step 0 do not overlap
    (``low[t] > high[0]`` or ``high[t] < low[0]``), a stricter rule. Both are False at step 0
    and wherever a value is NaN. ``any_outside``/``any_disjoint`` reduce over steps 1.. .
    Neither is a hypothesis test at the nominal level (non-overlap of two 95% intervals is
    much stricter than p < 0.05); for paired samples prefer :func:`difference_from_first`.
    """

    outside: Bool[Tensor, "step *batch"]  # noqa: F821
    disjoint: Bool[Tensor, "step *batch"]  # noqa: F821
    any_outside: Bool[Tensor, "*batch"]
    any_disjoint: Bool[Tensor, "*batch"]


def change_exceeds_ci(
    estimates: Float[Tensor, "step *batch"],  # noqa: F821
    ci_low: Float[Tensor, "step *batch"],  # noqa: F821
    ci_high: Float[Tensor, "step *batch"],  # noqa: F821
) -> ChangeTest:
    """Apply the :class:`ChangeTest` rules to a measure with one interval per step."""
    low0, high0 = ci_low[:1], ci_high[:1]
    outside = (estimates < low0) | (estimates > high0)
    disjoint = (ci_low > high0) | (ci_high < low0)
    outside[0] = False
    disjoint[0] = False
    return ChangeTest(
        outside=outside,
        disjoint=disjoint,
        any_outside=outside[1:].any(0),
        any_disjoint=disjoint[1:].any(0),
    )


def random_direction_like(
    vectors: Float[Tensor, "*batch d_model"], seed: int = 0
) -> Float[Tensor, "*batch d_model"]:
    """Uniformly random directions with the same norms as ``vectors`` (a steering baseline);
    drawn in float64 on the CPU from ``seed``, returned in the input's dtype and device."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(vectors.shape, generator=gen, dtype=torch.float64)
    r = r / r.norm(dim=-1, keepdim=True)
    norms = vectors.detach().to(torch.float64).norm(dim=-1, keepdim=True).cpu()
    return (r * norms).to(dtype=vectors.dtype, device=vectors.device)


def permutation_p(
    observed: Float[Tensor, "*batch"],  # noqa: F821
    null: Float[Tensor, "draw *batch"],  # noqa: F821
) -> Float[Tensor, "*batch"]:  # noqa: F821
    """One-sided Monte-Carlo p-value ``(1 + k) / (1 + n)``, ``k`` of the ``n`` null draws at
    least the observed value (ties count against the observation, which keeps discrete
    statistics conservative); NaN where there are no draws."""
    n = null.shape[0]
    if n == 0:
        return torch.full_like(observed, torch.nan, dtype=torch.float64)
    k = (null >= observed[None]).to(torch.float64).sum(0)
    return (1 + k) / (1 + n)
