"""The final-layer steering baselines: covariance-matched random directions, shuffled-label
vectors, their permutation p-values, checked against slow loops and calibrated on planted
data (a null with no label information, and a planted concept)."""

import pytest
import torch

from emolens.analysis.baselines import (
    RANDOM_COLUMNS,
    covariance_directions,
    random_baseline_frame,
    shuffled_label_vectors,
)
from emolens.analysis.stats import permutation_p
from emolens.analysis.steps import StepData
from emolens.measure.activations import Activations
from emolens.measure.attribution import Readout, transfer_effect
from emolens.measure.vectors import ConceptVectors

LABELS = tuple(f"l{i}" for i in range(12)) + ("no-emotion",)
EMOTIONS = LABELS[:-1]
D, N_PER, TOP = 24, 20, 4  # the readout reads the TOP high-variance dimensions
PROMPTS = [f"s{k}" for k in range(12 * N_PER, 12 * N_PER + 10)]  # neutral samples


def _readout(gen: torch.Generator) -> Readout:
    rows = torch.zeros(len(LABELS), D, dtype=torch.float64)
    rows[:, :TOP] = torch.randn(len(LABELS), TOP, generator=gen, dtype=torch.float64)
    return Readout(
        "rms", torch.ones(D), torch.zeros(D), 1e-6, rows.float(), torch.zeros(len(LABELS)),
        torch.zeros(D), 0.0, tuple(range(len(LABELS))),
    )  # fmt: skip


def _step(gen: torch.Generator, readout: Readout, signal: float = 0.0) -> StepData:
    """One final-layer step: anisotropic residuals (SD 5 in the readout's dimensions, 1
    elsewhere), labels that carry nothing unless ``signal`` moves each emotion's samples along
    its readout row; vectors by eq. (2) from all samples."""
    gold = torch.arange(len(LABELS)).repeat_interleave(N_PER)
    sd = torch.ones(D, dtype=torch.float64)
    sd[:TOP] = 5.0
    h = torch.randn(len(gold), D, generator=gen, dtype=torch.float64) * sd + 3.0
    if signal:
        rows = readout.effective_rows.double()[gold[gold < 12]]
        h[gold < 12] += signal * rows / rows.norm(dim=-1, keepdim=True)
    means = torch.stack([h[gold == j].mean(0) for j in range(len(LABELS))])
    v = (means[:-1] - means[-1:])[None]
    n = len(gold)
    acts = Activations(
        h[:, None].float(), torch.zeros(n, len(LABELS)), torch.zeros(n), torch.zeros(n), (0,),
        tuple(f"s{i}" for i in range(n)), gold,
    )  # fmt: skip
    vectors = ConceptVectors(v.float(), torch.full((12,), N_PER), EMOTIONS, (0,), LABELS[-1], N_PER)
    return StepData(0, acts, vectors, readout, n_layers=1)


def test_covariance_directions_live_in_the_residuals_span_with_the_vectors_norms():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, 3, generator=gen, dtype=torch.float64))[0]  # [D, 3]
    resid = 7.0 + torch.randn(50, 3, generator=gen, dtype=torch.float64) @ basis.T
    vectors = torch.randn(5, D, generator=gen, dtype=torch.float64)
    r = covariance_directions(resid, vectors, 40, seed=3)
    assert r.shape == (40, 5, D)
    assert torch.allclose(r.norm(dim=-1), vectors.norm(dim=-1).expand(40, 5))
    outside = r - (r @ basis) @ basis.T  # the centred residuals span basis: nothing outside it
    assert outside.abs().max() < 1e-10
    assert torch.equal(r, covariance_directions(resid, vectors, 40, seed=3))
    assert not torch.equal(r, covariance_directions(resid, vectors, 40, seed=4))
    # their spread is the residuals': the same as directions of N(0, sample covariance) drawn
    # the obvious way (a d x d covariance and a multivariate normal)
    wide = torch.randn(400, D, generator=gen, dtype=torch.float64)
    wide[:, 0] *= 10.0
    ours = covariance_directions(wide, vectors[:1], 4000, seed=0)[:, 0]
    cov = torch.cov(wide.T) + 1e-9 * torch.eye(D, dtype=torch.float64)
    torch.manual_seed(0)
    slow = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov)
    slow = slow.sample((4000,))
    share = [(x[:, 0] ** 2 / (x**2).sum(-1)).mean() for x in (ours, slow)]
    assert abs(share[0] - share[1]) < 0.03, share  # Monte-Carlo SD about 0.006 each
    assert share[0] > 0.4  # isotropic directions put 1/24 of the squared norm there


def test_shuffled_label_vectors_equal_eq2_with_the_permuted_labels():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    y = torch.arange(3).repeat(10)
    got = shuffled_label_vectors(h, y, [0, 1], 2, n_draws=4, seed=9)
    for k in range(4):
        perm = y[torch.randperm(30, generator=torch.Generator().manual_seed(9 + k))]
        neutral = h[perm == 2].mean(0)
        slow = torch.stack([h[perm == e].mean(0) - neutral for e in (0, 1)])
        assert torch.allclose(got[k], slow, atol=1e-12)


def test_permutation_p_counts_the_observation_itself():
    null = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0]])
    p = permutation_p(torch.tensor([2.5, 0.0]), null)
    assert p.tolist() == [(1 + 1) / 4, (1 + 3) / 4]
    assert torch.isnan(permutation_p(torch.tensor([1.0]), null[:0, :1])).all()


def test_random_baseline_frame_equals_the_slow_loop_over_draws():
    gen = torch.Generator().manual_seed(2)
    s = _step(gen, _readout(gen), signal=3.0)
    frame = random_baseline_frame([s], PROMPTS, (0.0, 2.0), LABELS, seed=5, n_random=7,
                                  n_shuffled=6, n_boot=50)  # fmt: skip
    assert tuple(frame.columns) == RANDOM_COLUMNS and len(frame) == 2 * len(EMOTIONS)
    h = s.prompt_resid(PROMPTS)
    v = s.vectors.layer(0)
    kept = s.acts.layer(0)
    own = torch.arange(len(EMOTIONS))
    randoms = covariance_directions(kept, v, 7, seed=5)
    shuffled = shuffled_label_vectors(kept, s.acts.gold, own.tolist(), 12, 6, seed=5)

    def own_change(vectors: torch.Tensor, alpha: float) -> torch.Tensor:
        return transfer_effect(s.readout, h, vectors, alpha)[own, :, own].double().mean(-1)

    two = frame[frame.alpha == 2.0].set_index("emotion").loc[list(EMOTIONS)]
    concept = own_change(v, 2.0)
    rand = torch.stack([own_change(r, 2.0) for r in randoms])
    shuf = torch.stack([own_change(r, 2.0) for r in shuffled])
    got = torch.tensor(two.logit_change_concept.to_numpy())
    assert torch.allclose(got, concept, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.tensor(two.logit_change_random_mean.to_numpy()), rand.mean(0),
                          rtol=1e-5, atol=1e-6)  # fmt: skip
    assert torch.allclose(torch.tensor(two.logit_change_shuffled_sd.to_numpy()), shuf.std(0),
                          rtol=1e-4, atol=1e-6)  # fmt: skip
    k_rand = (rand >= concept[None]).sum(0).double()
    assert two.p_random.tolist() == pytest.approx(((1 + k_rand) / 8).tolist())
    k_shuf = (shuf >= concept[None]).sum(0).double()
    assert two.p_shuffled.tolist() == pytest.approx(((1 + k_shuf) / 7).tolist())
    assert (two.q_random >= two.p_random - 1e-12).all() and (two.directions == "covariance").all()
    zero = frame[frame.alpha == 0.0]
    assert (zero.logit_change_concept.abs() < 1e-6).all() and (zero.p_random == 1.0).all()


def _rejections(n_sim: int, signal: float, directions: str) -> tuple[float, float]:
    """Shares of (emotion, simulation) tests with p <= 0.05 against random directions and
    against shuffled labels (39 draws each, so p <= 0.05 has probability 0.05 under a null)."""
    gen = torch.Generator().manual_seed(11)
    p_rand, p_shuf = [], []
    for i in range(n_sim):
        s = _step(gen, _readout(gen), signal)
        frame = random_baseline_frame([s], PROMPTS, (2.0,), LABELS, seed=1000 * i, n_random=39,
                                      n_shuffled=39, n_boot=0, directions=directions)  # fmt: skip
        p_rand += frame.p_random.tolist()
        p_shuf += frame.p_shuffled.tolist()
    return (
        float((torch.tensor(p_rand) <= 0.05).double().mean()),
        float((torch.tensor(p_shuf) <= 0.05).double().mean()),
    )


def test_covariance_matched_and_shuffled_nulls_are_calibrated_where_isotropic_is_not():
    # labels carry nothing: every concept vector is a mean difference of unlabelled groups
    n_sim = 200  # 2400 tests: Monte-Carlo SE of a 5% rate 0.0044
    cov_rate, shuf_rate = _rejections(n_sim, 0.0, "covariance")
    iso_rate, _ = _rejections(n_sim, 0.0, "isotropic")
    assert 0.03 <= cov_rate <= 0.065, cov_rate
    assert 0.03 <= shuf_rate <= 0.065, shuf_rate
    # isotropic directions barely touch the high-variance dimensions the readout reads, so a
    # vector with no label information "beats" them about a quarter of the time
    assert iso_rate > 0.15, iso_rate


def test_both_nulls_have_power_at_a_planted_concept():
    cov_rate, shuf_rate = _rejections(40, 8.0, "covariance")
    assert cov_rate > 0.9 and shuf_rate > 0.9, (cov_rate, shuf_rate)


def test_random_baseline_rejects_an_unknown_direction_kind():
    gen = torch.Generator().manual_seed(0)
    s = _step(gen, _readout(gen))
    with pytest.raises(ValueError, match="directions must be one of"):
        random_baseline_frame([s], PROMPTS, (1.0,), LABELS, directions="uniform")
