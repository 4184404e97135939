"""The calibration of the change tests on a small case, through the project's own code paths
(``benchmarks/calibration.py``'s simulation): per family, the false-positive rate under no
change is at most nominal plus Monte-Carlo error and the power at a large planted paired shift
is above a floor that the same test misses once its pairing is dropped."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from emolens.analysis import change_tests as ct
from emolens.analysis._common import Replicates
from emolens.analysis.change_summary import change_omnibus, change_summary
from emolens.analysis.figure2 import figure2_frame
from emolens.analysis.geometry_tables import cross_step_tests, geometry_frame
from emolens.analysis.probe_tables import probes_frame

LEVEL = 0.05
_spec = importlib.util.spec_from_file_location(
    "calibration", Path(__file__).parents[1] / "benchmarks" / "calibration.py"
)
cal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cal)


def _bound(n: int) -> float:
    """Nominal rate plus three Monte-Carlo standard errors over ``n`` simulations (tests within
    one simulation are dependent, so ``n`` counts simulations)."""
    return LEVEL + 3 * math.sqrt(LEVEL * (1 - LEVEL) / n)


def _unpaired(frame: pd.DataFrame, reps: Replicates, seed: int) -> Replicates:
    """The replicates with the pairing dropped: the later step's resamples shuffled, as if
    its bootstrap had drawn other sample indices than the first step's."""
    values = reps.values.copy()
    later = (frame.step != frame.step.min()).to_numpy()
    perm = np.random.default_rng(seed).permutation(values.shape[1])
    values[later] = values[later][:, perm]
    return Replicates(values, reps.sample_set)


def _steps(k, shift, n_per, d, direction="class"):
    gen = torch.Generator().manual_seed(k)
    readout = cal.readout_of(gen, d)
    return cal.simulate(gen, n_per, d, 0.9, 0.3, shift, direction, readout)


@pytest.mark.parametrize("family", ["geometry", "probes"])
def test_fpr_at_most_nominal_and_power_at_a_large_shift_lost_without_pairing(family):
    """Per-series tests with both p-values (the count p's FPR; power with the Wald p, which has
    no 1 / (1 + B) floor under BH) and the omnibus test per group of series. Geometry's power
    vanishes once the pairing is dropped (correlation 0.9 between steps); probes are retrained
    at each step, which decorrelates them, so there the check is that the rows are paired."""
    n_boot = 99
    n_sim, n_per, d, shift = (16, 12, 16, 1.0) if family == "geometry" else (12, 24, 16, 1.5)
    null_p, fam_any, alt_q, alt_q_unpaired, omni_null, omni_alt = [], [], [], [], [], []
    for k in range(n_sim):
        for s in (0.0, shift):
            steps = _steps(k, s, n_per, d)
            if family == "geometry":
                frame, reps = geometry_frame(
                    steps, cal.LABELS, cal.NEUTRAL, n_boot=n_boot, seed=k, return_replicates=True
                )
                cross = cross_step_tests(steps, cal.LABELS, cal.NEUTRAL, n_perm=n_boot, seed=k)
                target, omni_measure = "vector_norm", "vector_norm"
            else:
                frame, reps = probes_frame(
                    steps, cal.LABELS, n_boot=n_boot, seed=k, return_replicates=True, max_iter=60,
                    n_perm=1, n_refit=0,  # the change tests do not read permutations or refits
                )  # fmt: skip
                cross, target, omni_measure = None, "accuracy", "recall"
            omni = change_omnibus(frame, reps)
            o = omni[omni.measure == omni_measure]
            for p_method in ("count", "normal"):
                summ = change_summary(frame, reps, cross_step=cross, p_method=p_method)
                if family == "probes":
                    summ, o = summ[summ.probe == "own"], o[o.probe == "own"]
                tested = summ[summ.p.notna()]
                assert tested.paired.all()
                if s == 0.0:
                    null_p += tested.p.tolist()
                    fam_any.append(bool((tested.q < LEVEL).any()))
                elif p_method == "normal":
                    alt_q += tested[tested.measure == target].q.tolist()
            if s == 0.0:
                omni_null += omni.p.dropna().tolist()
            else:
                omni_alt += o.q.tolist()
                broken = change_summary(
                    frame, _unpaired(frame, reps, k), cross_step=cross, p_method="normal"
                )
                if family == "probes":
                    broken = broken[broken.probe == "own"]
                alt_q_unpaired += broken[broken.measure == target].q.tolist()
    assert (np.array(null_p) < LEVEL).mean() <= _bound(n_sim)
    assert np.mean(fam_any) <= _bound(n_sim)
    assert (np.array(omni_null) < LEVEL).mean() <= _bound(n_sim)
    power = (np.array(alt_q) < LEVEL).mean()
    power_unpaired = (np.array(alt_q_unpaired) < LEVEL).mean()
    floor = 0.6
    assert power > floor, power
    if family == "geometry":  # the floor catches a test that lost its pairing
        assert power_unpaired < floor, power_unpaired
    assert (np.array(omni_alt) < LEVEL).mean() > 0.8


def _series(k: int, shift: float, n_per: int, d: int, n_steps: int) -> list:
    """``n_steps`` steps on the same samples, each ``h_s = c_y + a + b_s`` (persistent part
    ``a``, correlation 0.9 between steps: steps exchangeable, so under no change every point
    has the same population value), the emotion samples moved along their label's readout row
    by ``shift * s / (n_steps - 1)`` per-sample SDs at step ``s`` (a ramp)."""
    gen = torch.Generator().manual_seed(k)
    readout = cal.readout_of(gen, d)
    gold = torch.arange(len(cal.LABELS)).repeat_interleave(n_per)
    centres = 0.3 * torch.randn(len(cal.LABELS), d, generator=gen, dtype=torch.float64)
    a = math.sqrt(0.9) * torch.randn(len(gold), d, generator=gen, dtype=torch.float64)
    rows = readout.effective_rows.double()[:-1]
    rows = rows / rows.norm(dim=-1, keepdim=True)
    emo = gold < len(cal.EMOTIONS)
    out = []
    for s in range(n_steps):
        h = centres[gold] + a + math.sqrt(0.1) * torch.randn(a.shape, generator=gen, dtype=a.dtype)
        h[emo] += shift * s / (n_steps - 1) * rows[gold[emo]]
        out.append(cal.step_data(10 * s, h, gold, readout))
    return out


def _share_bound(shares: list[float]) -> float:
    """Nominal rate plus three Monte-Carlo SEs of the mean of per-simulation rejection shares
    (the 12 emotions of one simulation share samples and prompts, so simulations are the
    independent units)."""
    return LEVEL + 3 * float(np.std(shares, ddof=1)) / math.sqrt(len(shares))


def test_figure2_trend_tests_hold_the_nominal_rate_and_find_a_planted_ramp(one_thread):
    """figure2_frame's first-vs-last and slope tests (jackknife t) on four steps of the
    calibration simulation (steered prompts are neutral samples, as in the study). Under no
    change they reject at most the nominal rate plus three Monte-Carlo SEs (measured: 0.046
    and 0.044 against a bound of 0.062); the two-level bootstrap's own tests (trend_tests
    without the jackknife, 199 resamples) rejected 0.088 and 0.093 of the same nulls (bound
    0.067), so this test fails on them. A planted 0.8 SD ramp is found (q < 0.05 after BH
    across emotions: 0.86 and 0.89). The joint test over emotions (omnibus_jackknife_test)
    holds its rate (0.025 of 120; the bootstrap omnibus rejected 0.20 at these sizes), and the
    pairing across steps gives the power: the same jackknife with the steps' units kept apart
    (as for independent steps) finds none of what the paired one finds (0.85)."""
    n_sim, n_per, d, n_boot, shift = 240, 12, 16, 20, 0.8
    neutral0 = len(cal.EMOTIONS) * n_per
    prompts = [f"s{i}" for i in range(neutral0, neutral0 + 8)]
    null_fl, null_slope, alt_fl, alt_slope, omni_null = [], [], [], [], []
    alt_paired, alt_apart = [], []
    for k in range(n_sim):
        for s in (0.0, shift):
            steps = _series(k, s, n_per, d, 4)
            _, trends = figure2_frame(
                steps, prompts, (4.0,), cal.LABELS, cal.NEUTRAL, n_boot=n_boot, seed=k
            )
            assert len(trends) == len(cal.EMOTIONS) and trends.paired.all()
            assert (trends.method == "jackknife t").all()
            if s == 0.0:
                null_fl.append(float((trends.first_last_p < LEVEL).mean()))
                null_slope.append(float((trends.slope_p < LEVEL).mean()))
            else:
                alt_fl.append(float((trends.first_last_q < LEVEL).mean()))
                alt_slope.append(float((trends.slope_q < LEVEL).mean()))
            if k % 2:
                continue  # the joint test and the unpaired contrast on every other simulation
            boots = []
            for st in (steps[0], steps[-1]):
                boots.append(
                    ct.figure2_bootstrap(
                        st.acts.layer(0).double(), st.acts.gold, list(range(12)), 12,
                        st.prompt_resid(prompts).double(), st.readout.logits, list(range(12)),
                        4.0, n_boot=0,
                        prompt_positions=[st.acts.sample_ids.index(p) for p in prompts],
                    )
                )  # fmt: skip
            b0, b1 = boots
            effect = b1.estimate - b0.estimate
            if s == 0.0:
                jack = b1.jackknife - b0.jackknife
                omni_null.append(ct.omnibus_jackknife_test(effect, jack, b0.jackknife_strata).p)
            else:  # each step's units apart: V = V_0 + V_1, as for independent steps
                paired = ct.jackknife_test(effect, b1.jackknife - b0.jackknife, b0.jackknife_strata)
                alt_paired.append(float((ct.benjamini_hochberg(paired.p) < LEVEL).mean()))
                apart = torch.cat(
                    [b1.jackknife - b0.estimate[:, None], b1.estimate[:, None] - b0.jackknife], -1
                )
                strata = torch.cat([b0.jackknife_strata, b0.jackknife_strata + 100])
                q = ct.benjamini_hochberg(ct.jackknife_test(effect, apart, strata).p)
                alt_apart.append(float((q < LEVEL).mean()))
    for shares in (null_fl, null_slope):
        assert np.mean(shares) <= _share_bound(shares), (np.mean(shares), _share_bound(shares))
    assert (np.array(omni_null) < LEVEL).mean() <= _bound(len(omni_null))
    assert np.mean(alt_fl) > 0.75 and np.mean(alt_slope) > 0.75, (
        np.mean(alt_fl),
        np.mean(alt_slope),
    )
    assert np.mean(alt_apart) < 0.5 * np.mean(alt_paired), (np.mean(alt_apart), np.mean(alt_paired))


def test_cross_step_tests_are_valid_where_the_noise_ceiling_bootstrap_is_not():
    """Under no change of any concept vector (fresh per-sample noise at step t), the step-swap
    permutation keeps cosine_to_first and the principal angles at the nominal rate and finds a
    planted rotation (every emotion vector moved along one direction: its cosine with its
    first-step vector falls); change_summary does not test them without it."""
    n_sim, n_per, d = 16, 12, 16
    null_p, alt_p = [], []
    for k in range(n_sim):
        steps = _steps(k, 0.0, n_per, d)
        frame, reps = geometry_frame(
            steps, cal.LABELS, cal.NEUTRAL, n_boot=49, seed=k, return_replicates=True
        )
        cross = cross_step_tests(steps, cal.LABELS, cal.NEUTRAL, n_perm=199, seed=k)
        full = frame[(frame.step == 1) & frame.measure.isin(cross.measure.unique())]
        merged = full.merge(cross, on=["step", "layer", "measure", "emotion", "inner"])
        assert len(merged) == len(cross) > 0
        np.testing.assert_allclose(merged.value_x, merged.value_y, atol=1e-9)
        plain = change_summary(frame, reps)
        assert plain[plain.measure == "cosine_to_first"].p.isna().all()
        null_p += cross[cross.measure != "principal_angle_to_first_max"].p.tolist()
        # a planted rotation: every emotion sample at step t moves 1 SD along a fixed direction
        s0, s1 = steps
        h1 = s1.acts.layer(0).double().clone()
        gen = torch.Generator().manual_seed(1000 + k)
        direction = torch.randn(d, generator=gen, dtype=torch.float64)
        emo = s1.acts.gold < 12
        h1[emo] += 1.5 * direction / direction.norm()
        rotated = cal.step_data(1, h1, s1.acts.gold, s1.readout)
        alt = cross_step_tests([s0, rotated], cal.LABELS, cal.NEUTRAL, n_perm=199, seed=k)
        alt_p += alt[alt.measure == "cosine_to_first"].p.tolist()
    assert (np.array(null_p) < LEVEL).mean() <= _bound(n_sim)
    assert (np.array(alt_p) < LEVEL).mean() > 0.8


def test_omnibus_test_is_calibrated_and_adds_up_a_shared_shift():
    n_sim, k, n, n_boot = 200, 12, 32, 199
    gen = torch.Generator().manual_seed(7)
    for shift, check in ((0.0, "null"), (0.25, "power")):
        d = torch.randn(n_sim, k, n, generator=gen, dtype=torch.float64) + shift
        idx = torch.randint(0, n, (n_sim, 1, n_boot, n), generator=gen).expand(-1, k, -1, -1)
        draws = torch.gather(d[:, :, None, :].expand(-1, -1, n_boot, -1), 3, idx).mean(-1)
        p = np.array([ct.omnibus_bootstrap_test(d[s].mean(-1), draws[s]).p for s in range(n_sim)])
        single = ct.paired_bootstrap_test(
            d[:, 0].mean(-1), torch.zeros(n_sim), draws[:, 0], torch.zeros(n_sim, n_boot)
        ).p.numpy()
        if check == "null":
            assert (p < LEVEL).mean() <= LEVEL + 3 * math.sqrt(LEVEL * (1 - LEVEL) / n_sim)
        else:
            assert (p < LEVEL).mean() > 0.8
            assert (p < LEVEL).mean() > (single < LEVEL).mean() + 0.3


def test_cross_step_values_match_the_geometry_table_in_each_steps_own_metric():
    from emolens.analysis.geometry import CausalInnerProduct
    from emolens.analysis.geometry_tables import causal_geometry_frame

    steps = _steps(3, 0.3, 8, 6)
    gen = torch.Generator().manual_seed(5)
    metrics = {
        s.step: CausalInnerProduct.from_unembedding(torch.randn(40, 6, generator=gen))
        for s in steps
    }
    frame = causal_geometry_frame(steps, metrics, cal.LABELS, cal.NEUTRAL, n_boot=5)
    cross = cross_step_tests(steps, cal.LABELS, cal.NEUTRAL, n_perm=19, metrics=metrics)
    assert set(cross.inner) == {"plain", "causal"}
    merged = frame.merge(cross, on=["step", "layer", "measure", "emotion", "inner"])
    assert len(merged) == (cross.inner == "causal").sum() > 0
    np.testing.assert_allclose(merged.value_x, merged.value_y, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        cross_step_tests(steps, cal.LABELS, cal.NEUTRAL, unembedding=metrics[0], metrics=metrics)


def test_debiased_vector_norm_is_unbiased_where_the_plain_norm_is_biased_upward():
    """Planted class centres with a known |v| = 2 and much noise (32 samples per label in 64
    dimensions, so E|v_hat|^2 = |v|^2 + 64 * 2 / 32): the plain norm's mean overshoots, the
    split-half estimate's does not; its value also matches the direct computation."""
    n_per, d, true = 32, 64, 2.0
    labels = cal.LABELS
    gold = torch.arange(len(labels)).repeat_interleave(n_per)
    plain, debiased = [], []
    for k in range(40):
        gen = torch.Generator().manual_seed(k)
        centres = torch.zeros(len(labels), d, dtype=torch.float64)
        dirs = torch.randn(len(labels) - 1, d, generator=gen, dtype=torch.float64)
        centres[:-1] = true * dirs / dirs.norm(dim=-1, keepdim=True)
        h = centres[gold] + torch.randn(len(gold), d, generator=gen, dtype=torch.float64)
        step = cal.step_data(0, h, gold, None)
        frame = geometry_frame([step], labels, cal.NEUTRAL, n_boot=5, seed=k)
        plain += frame[frame.measure == "vector_norm"].value.tolist()
        got = frame[frame.measure == "vector_norm_debiased"].value.to_numpy()
        debiased += got.tolist()
        if k == 0:  # the direct computation from the same halves
            from emolens.analysis.geometry_tables import _halves

            half = _halves(gold, k)
            means = torch.stack(
                [
                    torch.stack([h[(gold == c) & (half == s)].mean(0) for c in range(13)])
                    for s in (0, 1)
                ]
            )  # [half, class, d]
            v = means[:, :-1] - means[:, -1:]
            direct = (v[0] * v[1]).sum(-1).clamp_min(0).sqrt().numpy()
            np.testing.assert_allclose(got, direct, atol=1e-9)
    assert np.mean(plain) > true + 0.5
    assert abs(np.mean(debiased) - true) < 0.1
