"""Change tests on planted data: false-positive rates under no change at most nominal plus
Monte-Carlo error, power well above them at a planted paired shift, BH's false discovery rate
on a planted mix, and TOST verdicts on both sides of the margin."""

import math

import numpy as np
import pytest
import torch
from test_concept_space import LABELS, NEUTRAL, _step

from emolens.analysis import change_tests as ct
from emolens.analysis.change_summary import change_summary
from emolens.analysis.geometry_tables import geometry_frame

LEVEL = 0.05


def _mc_bound(n: int, rate: float = LEVEL) -> float:
    """Nominal rate plus three Monte-Carlo standard errors over ``n`` simulations."""
    return rate + 3 * math.sqrt(rate * (1 - rate) / n)


def _paired_means(n_sim, n, rho, shift, n_boot, seed):
    """Per simulation: per-sample values at two steps with correlation ``rho`` (SD 1), a shift
    of ``shift`` SD at step t, and bootstrap means on the same resampled indices."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n_sim, n, generator=gen, dtype=torch.float64) * math.sqrt(rho)
    x0 = a + torch.randn(n_sim, n, generator=gen, dtype=torch.float64) * math.sqrt(1 - rho)
    xt = a + torch.randn(n_sim, n, generator=gen, dtype=torch.float64) * math.sqrt(1 - rho)
    xt = xt + shift
    idx = torch.randint(0, n, (n_sim, n_boot, n), generator=gen)
    boot0 = torch.gather(x0[:, None].expand(-1, n_boot, -1), 2, idx).mean(-1)
    boott = torch.gather(xt[:, None].expand(-1, n_boot, -1), 2, idx).mean(-1)
    return x0, xt, boot0, boott


def test_benjamini_hochberg_matches_a_hand_computed_case_and_the_step_up_rule():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan, 0.2])
    # m = 5 finite: sorted 0.005, 0.01, 0.03, 0.04, 0.2 -> 5p/rank = .025 .025 .05 .05 .2
    q = ct.benjamini_hochberg(p)
    np.testing.assert_allclose(q, [0.025, 0.05, 0.05, 0.025, np.nan, 0.2])
    rng = np.random.default_rng(0)
    for _ in range(50):
        pv = rng.uniform(size=30) ** 3
        order = np.sort(pv)
        passed = np.nonzero(order <= np.arange(1, 31) * LEVEL / 30)[0]
        k = passed.max() + 1 if len(passed) else 0  # step-up: reject the k smallest
        assert (ct.benjamini_hochberg(pv) <= LEVEL).sum() == k
    fam = np.array(["geometry"] * 3 + ["probes"] * 3)
    q = ct.fdr_by_family(np.array([0.01, 0.02, 0.03, 0.01, 0.5, 0.9]), fam)
    np.testing.assert_allclose(q, [0.03, 0.03, 0.03, 0.03, 0.75, 0.9])


def test_paired_bootstrap_fpr_at_most_nominal_and_power_at_a_quarter_sd_shift():
    n_sim, n, n_boot = 400, 32, 199
    for shift, check in ((0.0, "null"), (0.25, "power")):
        x0, xt, b0, bt = _paired_means(n_sim, n, 0.9, shift, n_boot, seed=1)
        res = ct.paired_bootstrap_test(xt.mean(-1), x0.mean(-1), bt, b0)
        rate = float((res.p < LEVEL).double().mean())
        if check == "null":
            assert rate <= _mc_bound(n_sim)
            null_rate = rate
            # the interval covers the true effect (0) about as often as it says
            covered = float(((res.low <= 0) & (res.high >= 0)).double().mean())
            assert covered >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / n_sim)
        else:
            assert rate > 0.8 and rate > null_rate + 0.5
    assert (res.p >= 1 / (1 + n_boot)).all()  # (1 + k) / (1 + n): never 0


def test_sign_flip_fpr_at_most_nominal_and_power_at_a_quarter_sd_shift():
    n_sim, n = 400, 32
    x0, xt, _, _ = _paired_means(n_sim, n, 0.9, 0.0, 1, seed=2)
    null = ct.sign_flip_test(xt - x0, n_perm=499, n_boot=50)
    null_rate = float((null.p < LEVEL).double().mean())
    assert null_rate <= _mc_bound(n_sim)
    x0, xt, _, _ = _paired_means(n_sim, n, 0.9, 0.25, 1, seed=3)
    alt = ct.sign_flip_test(xt - x0, n_perm=499, n_boot=50)
    power = float((alt.p < LEVEL).double().mean())
    assert power > 0.8 and power > null_rate + 0.5
    torch.testing.assert_close(alt.effect, (xt - x0).mean(-1))


def test_geometry_change_summary_fpr_under_no_change_and_power_at_a_planted_norm_shift():
    """The project's own path (geometry_frame + change_summary) on exchangeable steps: the same
    samples, a persistent part and a fresh part of each residual (correlation 0.9)."""
    n_sim, n_per, d = 24, 12, 8
    gold = torch.arange(len(LABELS)).repeat_interleave(n_per)
    null_p, power_q, fam_any = [], [], []
    for k in range(n_sim):
        gen = torch.Generator().manual_seed(100 + k)
        centres = torch.randn(len(LABELS), d, generator=gen, dtype=torch.float64)
        a = 0.9**0.5 * torch.randn(len(gold), d, generator=gen, dtype=torch.float64)
        fresh = [0.1**0.5 * torch.randn(len(gold), d, generator=gen, dtype=torch.float64)
                 for _ in range(2)]  # fmt: skip
        h0, h1 = (centres[gold] + a + f for f in fresh)
        for shift in (0.0, 1.0):
            ht = h1.clone()
            if shift:  # emotion classes move along their vectors by 1 per-sample SD
                dirs = centres[:-1] - centres[-1:]
                dirs = dirs / dirs.norm(dim=-1, keepdim=True)
                emo = gold < len(LABELS) - 1
                ht[emo] += shift * dirs[gold[emo]]
            steps = [_step(0, h0[:, None].repeat(1, 2, 1).float(), gold),
                     _step(1, ht[:, None].repeat(1, 2, 1).float(), gold)]  # fmt: skip
            frame, reps = geometry_frame(
                steps, LABELS, NEUTRAL, layers=[3], n_boot=49, seed=k, return_replicates=True
            )
            s = change_summary(frame, reps)
            s = s[s.p.notna()]
            if shift:
                power_q += s[s.measure == "vector_norm"].q.tolist()
            else:
                null_p += s.p.tolist()
                fam_any.append(bool((s.q < LEVEL).any()))
    null_p = np.array(null_p)
    # tests within a simulation are dependent: bound with the number of simulations
    assert (null_p < LEVEL).mean() <= _mc_bound(n_sim)
    assert np.mean(fam_any) <= _mc_bound(n_sim, LEVEL)
    assert (np.array(power_q) < LEVEL).mean() > 0.6


def test_bh_controls_the_fdr_on_a_planted_mix_of_nulls_and_shifts():
    n_fam, m, m_alt, n = 150, 20, 5, 32
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(n_fam, m, n, generator=gen, dtype=torch.float64)
    d[:, :m_alt] += 0.7  # per-sample paired differences: 5 alternatives per family
    res = ct.sign_flip_test(d.reshape(-1, n), n_perm=999, n_boot=10)
    p = res.p.reshape(n_fam, m).numpy()
    fdp, power, naive = [], [], []
    for row in p:
        q = ct.benjamini_hochberg(row)
        rejected = q < LEVEL
        false = rejected[m_alt:].sum()
        fdp.append(false / max(rejected.sum(), 1))
        power.append(rejected[:m_alt].mean())
        naive.append((row[m_alt:] < LEVEL).any())
    assert np.mean(fdp) <= _mc_bound(n_fam)
    assert np.mean(power) > 0.8
    assert np.mean(naive) > 0.3  # without the correction, most families have a false positive


@pytest.mark.parametrize("kind", ["bootstrap", "sign_flip"])
def test_tost_rejects_beyond_the_margin_and_accepts_zero_with_enough_samples(kind):
    n_sim, margin = 200, 0.2

    def verdicts(n, shift, seed):
        x0, xt, b0, bt = _paired_means(n_sim, n, 0.8, shift, 199, seed)
        if kind == "bootstrap":
            eff = xt.mean(-1) - x0.mean(-1)
            return ct.tost_bootstrap(eff, bt - b0, margin).equivalent
        return ct.tost_sign_flip(xt - x0, margin, n_perm=499).equivalent

    # true effect beyond the margin: equivalence (wrongly) declared at most 5% + MC error
    beyond = float(verdicts(40, 0.3, 5).double().mean())
    assert beyond <= _mc_bound(n_sim)
    # on the margin itself the test's size is at most nominal
    edge = float(verdicts(40, margin, 6).double().mean())
    assert edge <= _mc_bound(n_sim)
    # no change and enough samples: equivalence is found nearly always
    zero = float(verdicts(200, 0.0, 7).double().mean())
    assert zero > 0.9
    # too few samples to tell: TOST must not declare equivalence just because p is large
    few = float(verdicts(6, 0.0, 8).double().mean())
    assert few < zero - 0.5


def test_equivalence_margin_rule():
    assert ct.equivalence_margin("vector_norm", -20.0, 0.05) == pytest.approx(1.0)
    assert ct.equivalence_margin("cosine_to_first", 0.9, 0.05) == 0.05
    with pytest.raises(ValueError, match="positive"):
        ct.equivalence_margin("accuracy", 0.5, 0.0)


def test_trend_tests_find_a_planted_slope_and_stay_quiet_without_one():
    """Per-sample values at four steps (paired: a persistent part per sample), the mean as the
    point and bootstrap means on the same indices at every step as its replicates."""
    n_e, n, n_boot = 300, 32, 199  # emotions are independent rows here
    steps = torch.tensor([0.0, 10.0, 20.0, 30.0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(9)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    rates = {}
    for slope in (0.0, 0.01):
        a = torch.randn(n_e, n, generator=gen, dtype=torch.float64) * 0.9**0.5
        x = torch.stack([a + 0.1**0.5 * torch.randn(n_e, n, generator=gen, dtype=torch.float64)
                         + slope * t for t in steps])  # fmt: skip
        est = x.mean(-1)  # [step, emotion]
        rep = x[..., idx].mean(-1)  # [step, emotion, n_boot]
        res = ct.trend_tests([int(t) for t in steps], est, rep)
        rates[slope] = (
            float((res.slope.p < LEVEL).double().mean()),
            float((res.first_last.p < LEVEL).double().mean()),
            float((res.q_slope < LEVEL).mean()),
        )
    assert rates[0.0][0] <= _mc_bound(n_e) and rates[0.0][1] <= _mc_bound(n_e)
    assert rates[0.0][2] <= _mc_bound(n_e)  # BH across emotions: no discovery under the null
    assert rates[0.01][0] > 0.8 and rates[0.01][1] > 0.5 and rates[0.01][2] > 0.7
    with pytest.raises(ValueError, match="two steps"):
        ct.trend_tests([0], est[:1], rep[:1])


def test_figure2_jackknife_matches_leaving_each_unit_out():
    """The vectorised jackknife of figure2_bootstrap against recomputing the point with each
    unit left out: prompts that are neutral samples (out of the neutral mean and the prompt
    mean at once), one that is an emotion's sample, one that is no sample, a label that
    builds no vector; and the jackknife variance of a plain mean is s^2 / n on n - 1 df."""
    gen = torch.Generator().manual_seed(4)
    n_lab, d, n_per = 5, 6, 5  # labels 0, 1, 3 are steered; 2 builds nothing; 4 is neutral
    y = torch.arange(n_lab).repeat_interleave(n_per)
    h = (
        torch.randn(len(y), d, generator=gen, dtype=torch.float64)
        + 2 * torch.randn(n_lab, d, generator=gen, dtype=torch.float64)[y]
    )
    rows = torch.randn(7, d, generator=gen, dtype=torch.float64)

    def readout(x):  # RMSNorm with unit gain, then label rows: saturates in |x|
        return (x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) @ rows.T

    emotions, neutral, obs = [0, 1, 3], 4, [0, 1, 3]
    pos = [20, 22, 6, -1]  # two neutral samples, a sample of label 1, a prompt of its own
    extra = torch.randn(1, d, generator=gen, dtype=torch.float64)
    prompts = torch.cat([h[pos[:3]], extra])
    got = ct.figure2_bootstrap(h, y, emotions, neutral, prompts, readout, obs, 4.0, n_boot=3,
                               prompt_positions=pos)  # fmt: skip

    def point(drop_row: int | None, drop_prompt: int | None) -> torch.Tensor:
        keep = torch.ones(len(y), dtype=torch.bool)
        if drop_row is not None:
            keep[drop_row] = False
        means = torch.stack([h[keep & (y == c)].mean(0) for c in range(n_lab)])
        use = [p for p in range(4) if pos[p] != drop_row and p != drop_prompt]
        out = []
        for j, e in enumerate(emotions):
            v = means[e] - means[neutral]
            steered = readout(prompts[use] + 4.0 * v)[:, obs[j]]
            out.append((steered - readout(prompts[use])[:, obs[j]]).mean())
        return torch.stack(out)

    slow = torch.stack([point(i, None) for i in range(len(y))] + [point(None, 3)], -1)
    assert got.jackknife.shape == (3, len(y) + 1)
    torch.testing.assert_close(got.jackknife, slow, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.estimate, point(None, None), rtol=1e-10, atol=1e-10)
    assert got.jackknife_strata.tolist() == y.tolist() + [-1]
    # label 2's rows change nothing; a jackknife of a mean is its textbook SE
    unchanged = got.jackknife[:, : len(y)][:, y == 2]
    torch.testing.assert_close(unchanged, got.estimate[:, None].expand(-1, n_per))
    x = torch.randn(9, generator=gen, dtype=torch.float64)
    loo = (x.sum() - x) / 8
    var, df = ct.jackknife_variance(loo, torch.zeros(9, dtype=torch.long))
    assert float(var) == pytest.approx(float(x.var() / 9)) and float(df) == pytest.approx(8.0)
    test = ct.jackknife_test(x.mean(), loo, torch.zeros(9, dtype=torch.long))
    t = float(x.mean() / (x.std() / 3))
    from emolens.analysis.seed_tests import t_quantile, t_two_sided_p

    assert float(test.p) == pytest.approx(t_two_sided_p(t, 8))
    half = t_quantile(0.975, 8) * float(x.std() / 3)
    assert float(test.high - test.low) == pytest.approx(2 * half)
