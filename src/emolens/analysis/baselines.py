"""Random-direction steering baseline: each concept vector against random directions of its
norm, at the final layer (``random_baseline.csv``)."""

from collections.abc import Sequence

import pandas as pd
import torch

from emolens.analysis import stats
from emolens.analysis._common import Columns, floats
from emolens.analysis.steps import StepData
from emolens.measure.attribution import transfer_effect

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
    out = Columns(RANDOM_COLUMNS)
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
                lo, hi = floats(boot.low), floats(boot.high)
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
                logit_change_concept=floats(concept),
                concept_ci_low=lo,
                concept_ci_high=hi,
                logit_change_random_mean=floats(mean),
                logit_change_random_sd=floats(sd),
                share_random_at_least_concept=floats(share),
                n_random=n_random,
            )
    return out.frame()


__all__ = ["RANDOM_COLUMNS", "random_baseline_frame"]
