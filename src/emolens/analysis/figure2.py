"""Figure 2's points with two-level bootstrap bands, and per-emotion trend tests.

From finished steps (:class:`emolens.analysis.steps.StepData`): steering at the final layer with
each step's concept vectors, both the samples that build ``v`` and the prompts resampled
(:func:`emolens.analysis.change_tests.figure2_bootstrap`); ``figure2_bands.csv`` and
``figure2_trends.csv``, whose tests use the delete-one jackknife of each step's point (the
bootstrap's own tests reject too often, see :func:`emolens.analysis.change_tests.trend_tests`).
"""

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from emolens.analysis import change_tests
from emolens.analysis._common import Columns, floats, keep_mask, sample_key, threads
from emolens.analysis.steps import StepData

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
    "method",
    "joint_first_last_p",
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
    (:func:`emolens.analysis.change_tests.trend_tests` with the delete-one jackknife of each
    step's point, BH across emotions within each alpha): ``first_last_*`` and ``slope_*`` are
    the effect, its t interval and p of the jackknife t test, ``method`` names the test
    (``"jackknife t"``: Student t on the Satterthwaite degrees of freedom; the two-level
    bootstrap's own test rejected 8% of true nulls, see
    :func:`emolens.analysis.change_tests.trend_tests`). The jackknife leaves each sample (by
    sample id) and each steered prompt out at every step at once, so the steps stay paired
    on the samples they share; ``paired`` says whether every step kept the same samples (where
    not, a sample kept at only some steps moves only those steps' points).
    ``joint_first_last_p`` (one value per alpha): the joint test that no emotion's point
    changed from the first step to the last
    (:func:`emolens.analysis.change_tests.omnibus_jackknife_test`, 4.8% of true nulls rejected
    at the 5% level in ``benchmarks/calibration.py``).
    """
    band = Columns(FIGURE2_COLUMNS)
    if not steps:
        return band.frame(), Columns(TREND_COLUMNS).frame()
    labels = list(labels)
    emotions = [e for e in steps[0].vectors.emotions if all(e in s.vectors.emotions for s in steps)]
    keys: list[str] = []
    units: list[list[str]] = []
    per_alpha: dict[float, list[change_tests.Figure2Bootstrap]] = {float(a): [] for a in alphas}
    with threads(num_threads):
        for s in steps:
            key, unit_ids, boots = _step_bootstraps(
                s, prompt_ids=list(prompt_ids), alphas=list(per_alpha), labels=labels,
                emotions=emotions, neutral=neutral, keep_masks=keep_masks, n_boot=n_boot, ci=ci,
                seed=seed,
            )  # fmt: skip
            keys.append(key)
            units.append(unit_ids)
            for a, boot in boots.items():
                per_alpha[a].append(boot)
                band.add(
                    step=s.step,
                    layer=s.final_layer,
                    emotion=list(emotions),
                    alpha=a,
                    value=floats(boot.estimate),
                    ci_low=floats(boot.low),
                    ci_high=floats(boot.high),
                    n_boot=n_boot,
                )
    trends = Columns(TREND_COLUMNS)
    if len(steps) >= 2 and n_boot > 0 and emotions:
        trends.add_all(
            _trend_blocks(
                per_alpha, keys=keys, units=units, step_numbers=[s.step for s in steps],
                emotions=emotions, layer=steps[-1].final_layer, ci=ci,
            )
        )  # fmt: skip
    return band.frame(), trends.frame()


def _step_bootstraps(
    s: StepData,
    *,
    prompt_ids: list[str],
    alphas: list[float],
    labels: list[str],
    emotions: list[str],
    neutral: str,
    keep_masks: Mapping[int, Tensor] | None,
    n_boot: int,
    ci: float,
    seed: int,
) -> tuple[str, list[str], dict[float, change_tests.Figure2Bootstrap]]:
    """One step's :func:`~emolens.analysis.change_tests.figure2_bootstrap` per alpha at its
    final layer, the :func:`sample_key` of its kept samples and the ids of its jackknife's
    units (the kept samples, then the prompts that are not among them)."""
    keep = keep_mask(s, keep_masks, len(labels))
    key = sample_key([i for i, k in zip(s.acts.sample_ids, keep.tolist()) if k])
    e_lab = [labels.index(e) for e in emotions]
    u = labels.index(neutral)
    h = s.acts.layer(s.final_layer)[keep]
    y = s.acts.gold[keep].long()
    prompts = s.prompt_resid(prompt_ids)
    kept = {sid: i for i, sid in enumerate(np.asarray(s.acts.sample_ids)[keep.numpy()])}
    positions = [kept.get(p, -1) for p in prompt_ids]
    unit_ids = list(kept) + [p for p, i in zip(prompt_ids, positions, strict=True) if i < 0]
    boots = {
        a: change_tests.figure2_bootstrap(
            h,
            y,
            e_lab,
            u,
            prompts,
            s.final_readout.logits,
            e_lab,
            a,
            n_boot,
            ci,
            seed,
            prompt_positions=positions,
        )  # fmt: skip
        for a in alphas
    }
    return key, unit_ids, boots


def _aligned_jackknife(
    boots: list[change_tests.Figure2Bootstrap], units: list[list[str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[step, emotion, unit]`` leave-one-out points over the union of the steps' units (by
    id, in order of first appearance; a unit a step lacks leaves its point unchanged) and
    the units' strata (the gold label where some step kept the unit as a sample, else -1)."""
    index: dict[str, int] = {}
    for ids in units:
        for u in ids:
            index.setdefault(u, len(index))
    strata = torch.full((len(index),), -1, dtype=torch.long)
    out = []
    for b, ids in zip(boots, units, strict=True):
        if b.jackknife is None or b.jackknife_strata is None:
            raise ValueError("figure2_bootstrap gave no jackknife")
        cols = torch.as_tensor([index[u] for u in ids], dtype=torch.long)
        full = b.estimate[:, None].expand(-1, len(index)).clone()
        full[:, cols] = b.jackknife
        out.append(full)
        own = b.jackknife_strata >= 0
        strata[cols[own]] = b.jackknife_strata[own]
    return torch.stack(out), strata


def _trend_blocks(
    per_alpha: dict[float, list[change_tests.Figure2Bootstrap]],
    *,
    keys: list[str],
    units: list[list[str]],
    step_numbers: list[int],
    emotions: list[str],
    layer: int,
    ci: float,
) -> list[dict]:
    """:data:`TREND_COLUMNS` rows per alpha from the steps' bootstraps (``per_alpha[a]``, in
    step order), tested by their jackknife aligned on the units' ids."""
    paired = all(k == keys[0] for k in keys)
    out = []
    for a, boots in per_alpha.items():
        est = torch.stack([b.estimate for b in boots])  # [step, emotion]
        jack, strata = _aligned_jackknife(boots, units)
        reps = torch.stack([b.samples for b in boots])
        res = change_tests.trend_tests(step_numbers, est, reps, ci, jackknife=jack, strata=strata)
        joint = change_tests.omnibus_jackknife_test(est[-1] - est[0], jack[-1] - jack[0], strata)
        out.append(
            dict(
                emotion=list(emotions),
                alpha=a,
                layer=layer,
                first_step=step_numbers[0],
                last_step=step_numbers[-1],
                paired=paired,
                first_last_effect=floats(res.first_last.effect),
                first_last_ci_low=floats(res.first_last.low),
                first_last_ci_high=floats(res.first_last.high),
                first_last_p=floats(res.first_last.p),
                first_last_q=[float(x) for x in res.q_first_last],
                slope_per_step=floats(res.slope.effect),
                slope_ci_low=floats(res.slope.low),
                slope_ci_high=floats(res.slope.high),
                slope_p=floats(res.slope.p),
                slope_q=[float(x) for x in res.q_slope],
                method=res.first_last.method,
                joint_first_last_p=joint.p,
            )
        )
    return out


__all__ = ["FIGURE2_COLUMNS", "TREND_COLUMNS", "figure2_frame"]
