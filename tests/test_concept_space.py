"""Concept-space tables: geometry with bootstrap intervals, probes, the change summary and the
random-direction steering baseline, each on synthetic steps where the answer is planted."""

import math

import pandas as pd
import pytest
import torch

from emolens.analysis.baselines import random_baseline_frame
from emolens.analysis.change_summary import change_summary
from emolens.analysis.geometry import (
    CausalInnerProduct,
    orthogonality,
    principal_angles,
    within_concept_similarity,
)
from emolens.analysis.geometry_tables import (
    GEOMETRY_COLUMNS,
    causal_geometry_frame,
    cross_step_tests,
    geometry_frame,
)
from emolens.analysis.probe_tables import PROBE_COLUMNS, probes_frame
from emolens.analysis.probes import probe_layer
from emolens.analysis.steps import StepData
from emolens.measure.activations import Activations
from emolens.measure.attribution import Readout, transfer_effect
from emolens.measure.vectors import ConceptVectors

LABELS = ("anger", "joy", "sadness", "trust", "no-emotion")
NEUTRAL = "no-emotion"
EMOTIONS = LABELS[:-1]
D = 24
LAYERS = (1, 3)
N_PER = 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors: one thread avoids hand-off costs on a busy 2-core box (module scope, so
    it is in force before the module-scoped fixtures compute)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _centres(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), D, generator=gen, dtype=torch.float64) * 3.0


def _resid(centres, seed=1, spread=1.0):
    """Residuals [sample, layer, d]: a shared offset, the label's centre (scaled per layer) and
    noise; labels in blocks of N_PER."""
    gen = torch.Generator().manual_seed(seed)
    gold = torch.arange(len(LABELS)).repeat_interleave(N_PER)
    offset = torch.full((D,), 5.0, dtype=torch.float64)
    layers = [offset + (1 + j) * centres[gold] for j in range(len(LAYERS))]
    noise = spread * torch.randn(len(gold), len(LAYERS), D, generator=gen, dtype=torch.float64)
    resid = torch.stack(layers, 1) + noise
    return resid.float(), gold


def _vectors(resid, gold, keep=None):
    keep = torch.ones(len(gold), dtype=torch.bool) if keep is None else keep
    means = torch.stack(
        [resid[keep & (gold == j)].double().mean(0) for j in range(len(LABELS))], 1
    )  # [layer, label, d]
    v = means[:, :-1] - means[:, -1:]
    counts = torch.tensor([int((keep & (gold == j)).sum()) for j in range(len(EMOTIONS))])
    return ConceptVectors(
        v.float(), counts, EMOTIONS, LAYERS, NEUTRAL, int((keep & (gold == len(LABELS) - 1)).sum())
    )


def _readout(rows=None, seed=7):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(LABELS), D, generator=gen) if rows is None else rows
    return Readout(
        "rms",
        torch.ones(D),
        torch.zeros(D),
        1e-6,
        rows,
        torch.zeros(len(LABELS)),
        torch.zeros(D),
        0.0,
        tuple(range(len(LABELS))),
    )


def _step(step, resid, gold, keep=None, readout=None, vectors=None):
    n = len(gold)
    acts = Activations(
        resid,
        torch.zeros(n, len(LABELS)),
        torch.zeros(n),
        torch.zeros(n),
        LAYERS,
        tuple(f"s{i}" for i in range(n)),
        gold.long(),
    )
    return StepData(
        step,
        acts,
        vectors or _vectors(resid, gold, keep),
        readout or _readout(),
        n_layers=max(LAYERS) + 1,
    )


def _rotated(centres, emotion="joy"):
    """Centres where one emotion's vector (centre - neutral centre) is turned by 90 degrees
    at the same norm."""
    j = LABELS.index(emotion)
    v = centres[j] - centres[-1]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(D, generator=gen, dtype=torch.float64)
    w = w - (w @ v) / (v @ v) * v
    out = centres.clone()
    out[j] = centres[-1] + w / w.norm() * v.norm()
    return out


@pytest.fixture(scope="module")
def series():
    """Steps 0 and 10 identical; at step 20 joy's direction is rotated, nothing else moves
    (same noise, so every other sample is unchanged)."""
    centres = _centres()
    resid, gold = _resid(centres)
    moved, _ = _resid(_rotated(centres))
    joy = gold == LABELS.index("joy")
    resid20 = torch.where(joy[:, None, None], moved, resid)
    return [_step(0, resid, gold), _step(10, resid.clone(), gold), _step(20, resid20, gold)]


@pytest.fixture(scope="module")
def geometry(series):
    return geometry_frame(series, LABELS, NEUTRAL, n_boot=100, seed=0)


def _pick(frame, **where):
    for k, v in where.items():
        frame = frame[frame[k] == v]
    return frame


def test_geometry_frame_shape_and_columns(geometry):
    assert tuple(geometry.columns) == GEOMETRY_COLUMNS
    assert set(geometry.inner) == {"plain"}
    assert sorted(geometry.step.unique()) == [0, 10, 20]
    assert sorted(geometry.layer.unique()) == list(LAYERS)
    expected = {
        "within_own",
        "within_other",
        "within_gap",
        "within_own_centred",
        "within_other_centred",
        "within_gap_centred",
        "vector_norm",
        "vector_norm_debiased",
        "orthogonality",
        "cosine_to_first",
        "cosine_to_previous",
        "principal_angle_to_first_max",
        "principal_angle_to_first_mean",
    }
    assert set(geometry.measure) == expected
    assert not geometry.duplicated(["step", "layer", "measure", "emotion", "inner"]).any()
    assert set(_pick(geometry, measure="within_own").emotion) == set(LABELS)
    assert set(_pick(geometry, measure="vector_norm").emotion) == set(EMOTIONS)


def test_point_estimates_match_the_geometry_module(series, geometry):
    s = series[2]
    for layer in LAYERS:
        h = s.acts.layer(layer).double()
        for centred, suffix in ((False, ""), (True, "_centred")):
            ref = within_concept_similarity(h, s.acts.gold, len(LABELS), centred=centred)
            for name, want in (("own", ref.own), ("other", ref.other), ("gap", ref.gap)):
                got = _pick(geometry, step=20, layer=layer, measure=f"within_{name}{suffix}")
                got = got.set_index("emotion").value.reindex(LABELS)
                torch.testing.assert_close(torch.tensor(got.to_numpy()), want, rtol=1e-7, atol=1e-9)
        v = s.vectors.layer(layer).double()
        norms = _pick(geometry, step=20, layer=layer, measure="vector_norm")
        norms = torch.tensor(norms.set_index("emotion").value.reindex(EMOTIONS).to_numpy())
        torch.testing.assert_close(norms, v.norm(dim=-1), rtol=1e-5, atol=1e-6)
        orth = _pick(geometry, step=20, layer=layer, measure="orthogonality").value.item()
        assert orth == pytest.approx(float(orthogonality(v)), abs=1e-5)
        angles = principal_angles(series[0].vectors.layer(layer).double(), v)
        got = _pick(geometry, step=20, layer=layer, measure="principal_angle_to_first_max")
        assert got.value.item() == pytest.approx(float(angles.max()), abs=1e-5)


def test_identical_steps_have_unit_cosine_and_no_significant_change(series):
    frame, reps = geometry_frame(series[:2], LABELS, NEUTRAL, n_boot=100, return_replicates=True)
    cos = _pick(frame, measure="cosine_to_first")
    assert (cos.value - 1.0).abs().max() < 1e-9
    # the first step's interval is the resampling noise ceiling: below 1, above chance
    first = _pick(cos, step=0)
    assert (first.ci_high <= 1.0).all() and (first.ci_low > 0.5).all()
    later = _pick(frame, step=10).set_index(["layer", "measure", "emotion"])
    same = _pick(frame, step=0).set_index(["layer", "measure", "emotion"])
    both = later.merge(same, left_index=True, right_index=True, suffixes=("", "_0"))
    assert ((both.ci_low - both.ci_low_0).abs() < 1e-9).all()  # same resamples, same data
    summary = change_summary(frame, reps)
    tested = summary[summary.p.notna()]
    assert len(tested) and not summary.fdr_change.any() and summary.paired.all()
    assert (tested.p == 1.0).all() and (tested.effect.abs() < 1e-9).all()
    assert set(summary.family) == {"geometry"}
    # identical steps: every tested series is equivalent within its margin (TOST)
    assert tested.equivalent_within_margin.all()
    assert summary[summary.measure == "cosine_to_previous"].p.isna().all()


def test_a_rotated_emotion_is_found_and_flagged_alone(series):
    geometry, reps = geometry_frame(series, LABELS, NEUTRAL, n_boot=100, return_replicates=True)
    cos = _pick(geometry, measure="cosine_to_first", step=20).set_index(["layer", "emotion"])
    for layer in LAYERS:
        assert abs(cos.loc[(layer, "joy"), "value"]) < 0.2
        for e in ("anger", "sadness", "trust"):
            assert cos.loc[(layer, e), "value"] == pytest.approx(1.0, abs=1e-9)
    prev = _pick(geometry, measure="cosine_to_previous", step=20).set_index(["layer", "emotion"])
    assert (prev.xs("joy", level="emotion").value < 0.2).all()
    # the cross-step measures are tested by swapping steps per sample, not by the bootstrap
    assert change_summary(geometry, reps).query("measure == 'cosine_to_first'").p.isna().all()
    cross = cross_step_tests(series, LABELS, NEUTRAL, n_perm=199)
    summary = change_summary(geometry, reps, cross_step=cross)
    assert (summary[summary.measure == "cosine_to_first"].test == "step-swap permutation").all()
    flagged = summary[summary.fdr_change]
    cos_flags = flagged[flagged.measure == "cosine_to_first"]
    assert set(cos_flags.emotion) == {"joy"} and set(cos_flags.layer) == set(LAYERS)
    assert (cos_flags.step == 20).all()
    angle = summary[(summary.measure == "principal_angle_to_first_max") & (summary.step == 20)]
    assert angle.fdr_change.all() and (angle.effect > 0.5).all()
    assert not angle.equivalent_within_margin.any()
    # only joy's own measures (and the shared ones) can change
    per_emotion = flagged[~flagged.emotion.isin(["all", "joy"])]
    assert not per_emotion.measure.isin(["cosine_to_first", "vector_norm"]).any()


def test_intervals_contain_the_estimates_of_sample_statistics(geometry):
    rows = geometry[
        geometry.measure.isin(["within_gap", "within_own_centred", "vector_norm", "orthogonality"])
    ]
    inside = (rows.ci_low <= rows.value + 1e-9) & (rows.value <= rows.ci_high + 1e-9)
    assert inside.mean() > 0.95
    assert (rows.ci_high > rows.ci_low).all()


def test_keep_masks_select_the_samples_behind_the_vectors():
    centres = _centres()
    resid, gold = _resid(centres)
    keep = torch.ones(len(gold), dtype=torch.bool)
    keep[::3] = False
    step = _step(0, resid, gold, keep=keep)
    frame = geometry_frame([step], LABELS, NEUTRAL, n_boot=20, keep_masks={0: keep})
    norms = _pick(frame, measure="vector_norm", layer=3).set_index("emotion").value
    want = step.vectors.layer(3).double().norm(dim=-1)
    torch.testing.assert_close(
        torch.tensor(norms.reindex(EMOTIONS).to_numpy()), want, rtol=1e-5, atol=1e-6
    )
    h = resid[keep, 1].double()
    ref = within_concept_similarity(h, gold[keep], len(LABELS))
    own = _pick(frame, measure="within_own", layer=3).set_index("emotion").value
    torch.testing.assert_close(torch.tensor(own.reindex(LABELS).to_numpy()), ref.own)
    with pytest.raises(ValueError, match="no mask for step"):
        geometry_frame([step], LABELS, NEUTRAL, n_boot=5, keep_masks={1: keep})


def test_a_dropped_emotion_leaves_the_others_and_warns_when_its_samples_vanish(series):
    s0 = series[0]
    v = s0.vectors
    keep = [i for i, e in enumerate(v.emotions) if e != "trust"]
    fewer = ConceptVectors(
        v.vectors[:, keep],
        v.counts[keep],
        tuple(v.emotions[i] for i in keep),
        v.layers,
        v.neutral,
        v.neutral_count,
        ("trust",),
    )
    later = StepData(10, s0.acts, fewer, s0.readout)
    frame = geometry_frame([s0, later], LABELS, NEUTRAL, n_boot=20)
    cos = _pick(frame, measure="cosine_to_first", step=10)
    assert set(cos.emotion) == {"anger", "joy", "sadness"}
    assert (cos.value - 1.0).abs().max() < 1e-9
    angle = _pick(frame, measure="principal_angle_to_first_max", step=10)
    assert angle.value.abs().max() < 1e-6  # the span of the common emotions did not move
    mask = s0.acts.gold != LABELS.index("joy")
    torch.set_num_threads(2)
    try:
        with pytest.warns(UserWarning, match="no kept sample"):
            frame = geometry_frame([s0], LABELS, NEUTRAL, n_boot=5, keep_masks={0: mask})
        assert torch.get_num_threads() == 2  # one thread inside, the setting restored after
    finally:
        torch.set_num_threads(1)
    assert _pick(frame, measure="vector_norm", emotion="joy").value.isna().all()
    assert _pick(frame, measure="vector_norm", emotion="anger").value.notna().all()
    assert _pick(frame, measure="orthogonality").value.notna().all()


def test_causal_inner_product_with_isotropic_unembedding_equals_plain(series):
    q, _ = torch.linalg.qr(
        torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    )
    w_u = torch.cat([q, -q]) * 2.0  # centred, covariance proportional to the identity
    frame = geometry_frame(series, LABELS, NEUTRAL, n_boot=30, unembedding=w_u)
    assert set(frame.inner) == {"plain", "causal"}
    keys = ["step", "layer", "measure", "emotion"]
    cosine_like = frame[~frame.measure.isin(["vector_norm", "vector_norm_debiased"])]
    plain = _pick(cosine_like, inner="plain").set_index(keys).sort_index()
    causal = _pick(cosine_like, inner="causal").set_index(keys).sort_index()
    for col in ("value", "ci_low", "ci_high"):
        diff = (plain[col] - causal[col]).abs()
        assert diff.fillna(0).max() < 1e-6
    inner = CausalInnerProduct.from_unembedding(w_u, dual=True)  # geometry_frame's default
    by_step = causal_geometry_frame(
        series, {s.step: inner for s in series}, LABELS, NEUTRAL, n_boot=30
    )
    again = by_step.set_index(keys).sort_index()
    assert ((again.value - causal.reindex(again.index).value).abs().fillna(0) < 1e-9).all()
    with pytest.raises(ValueError, match="no unembedding"):
        causal_geometry_frame(series, {0: inner}, LABELS, NEUTRAL)


def test_change_summary_tests_each_later_step_with_fdr_and_tost():
    import numpy as np
    import pandas as pd

    from emolens.analysis._common import Replicates

    gen = np.random.default_rng(0)
    base = gen.normal(1.0, 0.05, 400)  # resample b of the statistic, at step 0
    frame = pd.DataFrame(
        {
            "step": [0, 1, 2, 0, 1, 2],
            "layer": 0,
            "measure": "m",
            "emotion": ["a"] * 3 + ["b"] * 3,
            "inner": "plain",
            "value": [1.0, 1.0, 1.3, 1.0, 1.0, 1.0],
            "ci_low": 0.9,
            "ci_high": 1.1,
        }
    )
    # paired: later steps' replicates move with step 0's (same resamples), plus a shift
    noise = gen.normal(0.0, 0.01, (6, 400))
    values = np.stack([base, base, base + 0.3, base, base, base]) + noise
    reps = Replicates(values, np.array(["s"] * 6, dtype=object))
    out = change_summary(frame, reps).set_index(["emotion", "step"])
    assert len(out) == 4 and (out.first_step == 0).all()
    assert bool(out.loc[("a", 2), "fdr_change"]) and out.loc[("a", 2), "p"] < 0.01
    assert out.loc[("a", 2), "effect"] == pytest.approx(0.3)
    assert out.loc[("a", 2), "effect_ci_low"] > 0.25
    assert not out.loc[("a", 2), "equivalent_within_margin"]
    for key in (("a", 1), ("b", 1), ("b", 2)):
        assert not out.loc[key, "fdr_change"] and out.loc[key, "equivalent_within_margin"]
    assert (out.q >= out.p - 1e-12).all() and (out.equivalence_margin == 0.05).all()
    # the same values with the kept sets differing: unpaired, and the spread of two steps
    unpaired = Replicates(values, np.array(["s", "t", "t", "s", "t", "t"], dtype=object))
    loose = change_summary(frame, unpaired).set_index(["emotion", "step"])
    assert not loose.paired.any() and loose.test.str.startswith("unpaired").all()
    width = loose.effect_ci_high - loose.effect_ci_low
    assert (width > 0.1).all()  # about 2 x 1.96 x sqrt(2) x 0.05
    with pytest.raises(ValueError, match="replicate rows"):
        change_summary(frame, Replicates(values[:3], reps.sample_set[:3]))


def _clusters(n_per=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(LABELS), D, generator=gen) * 2.0
    gold = torch.arange(len(LABELS)).repeat_interleave(n_per)
    noise = torch.randn(len(gold), len(LAYERS), D, generator=gen) * 0.6
    scale = torch.tensor([0.0, 1.0])[None, :, None]  # layer 1 carries no label information
    return centres[gold][:, None, :] * scale + noise + 10.0, gold


def test_probes_on_planted_clusters():
    resid, gold = _clusters()
    steps = [_step(0, resid, gold), _step(5, resid.clone(), gold)]
    frame, reps = probes_frame(steps, LABELS, n_boot=100, seed=0, return_replicates=True)
    assert tuple(frame.columns) == PROBE_COLUMNS
    acc = _pick(frame, measure="accuracy")
    own = acc[acc.train_step == acc.step].set_index(["step", "layer"]).value
    assert own[(0, 3)] > 0.95 and own[(5, 3)] > 0.95
    assert own[(0, 1)] < 0.6  # no information at layer 1
    shuffled = _pick(frame, measure="shuffled_accuracy", layer=3)
    assert (shuffled.value < 0.5).all()
    chance = _pick(frame, measure="chance")
    assert ((chance.value - 0.2).abs() < 1e-12).all()
    transferred = acc[(acc.train_step == 0) & (acc.step == 5)].set_index("layer").value
    for layer in LAYERS:
        assert transferred[layer] == own[(5, layer)]  # identical step: same probe, same answer
    assert len(acc[acc.step == 0]) == len(LAYERS)  # the first step's probe appears once
    recall = _pick(frame, measure="recall", layer=3, step=0)
    assert set(recall.label) == set(LABELS) and (recall.value > 0.8).all()
    assert (recall.n == 8).all()
    scored = frame[frame.measure.isin(["accuracy", "recall", "shuffled_accuracy"])]
    inside = (scored.ci_low <= scored.value + 1e-12) & (scored.value <= scored.ci_high + 1e-12)
    assert inside.all()
    summary = change_summary(frame, reps)
    assert set(summary.probe) == {"own", "step 0"} and set(summary.family) == {"probes"}
    assert not summary.fdr_change.any() and summary.paired.all()
    step0 = summary[summary.probe == "step 0"]
    assert set(step0.measure) == {"accuracy", "recall"} and (step0.step == 5).all()


def test_probes_frame_values_equal_the_plain_probe_layer():
    """Every full-sample number of the table (own accuracy and recall, train accuracy, shuffled
    accuracy, chance, and the first step's probe on a later step) is the plain one-layer
    computation of :func:`emolens.analysis.probes.probe_layer` on the same split."""
    resid, gold = _clusters()
    moved = resid.clone()
    moved[:, 2:] += 0.7 * torch.randn(
        moved[:, 2:].shape, generator=torch.Generator().manual_seed(3)
    )
    steps = [_step(0, resid, gold), _step(5, moved, gold)]
    frame = probes_frame(steps, LABELS, n_boot=10, seed=3, l2=1e-2)
    for s in steps:
        for layer in LAYERS:
            x = s.acts.layer(layer)
            ref = probe_layer(x, gold, len(LABELS), seed=3, l2=1e-2)
            rows = frame[(frame.step == s.step) & (frame.layer == layer)]
            own = rows[rows.train_step == s.step].set_index("measure")
            assert own.loc["train_accuracy", "value"] == ref["train_accuracy"]
            assert own.loc["shuffled_accuracy", "value"] == ref["shuffled_accuracy"]
            assert own.loc["chance", "value"] == ref["chance"]
            acc = own.loc["accuracy"]
            assert acc["value"] == ref["accuracy"] and acc["n"] == ref["n_test"]
            recall = own[own.index == "recall"].set_index("label").value
            for j, name in enumerate(LABELS):
                assert recall[name] == float(ref["recall"][j])
            if s.step == 5:
                first = probe_layer(steps[0].acts.layer(layer), gold, len(LABELS), seed=3, l2=1e-2)
                test = ref["test_index"]
                cross = rows[(rows.train_step == 0) & (rows.measure == "accuracy")].value
                assert float(cross.iloc[0]) == first["probe"].accuracy(x[test], gold[test])


def test_probes_follow_sample_ids_across_steps():
    resid, gold = _clusters()
    a = _step(0, resid, gold)
    perm = torch.randperm(len(gold), generator=torch.Generator().manual_seed(2))
    acts = a.acts
    shuffled = Activations(
        acts.resid[perm],
        acts.label_logits[perm],
        acts.logsumexp[perm],
        acts.mean_logit[perm],
        acts.layers,
        tuple(acts.sample_ids[i] for i in perm),
        acts.gold[perm],
    )
    b = StepData(1, shuffled, a.vectors, a.readout)
    frame = probes_frame([a, b], LABELS, layers=[3], n_boot=20)
    acc = _pick(frame, measure="accuracy").set_index(["step", "train_step"]).value
    assert acc[(1, 0)] == acc[(0, 0)] == acc[(1, 1)]


def test_random_baseline_concept_along_readout_beats_random_directions():
    resid, gold = _clusters()
    readout = _readout()
    joy = LABELS.index("joy")
    v = torch.randn(len(LAYERS), len(EMOTIONS), D, generator=torch.Generator().manual_seed(4))
    v[:, joy] = readout.effective_rows[joy] / readout.effective_rows[joy].norm() * 8.0
    vectors = ConceptVectors(
        v, torch.ones(len(EMOTIONS), dtype=torch.long), EMOTIONS, LAYERS, NEUTRAL
    )
    steps = [_step(0, resid, gold, readout=readout, vectors=vectors)]
    prompts = [f"s{i}" for i in range(0, len(gold), 11)]
    frame = random_baseline_frame(steps, prompts, (0.0, 1.0, 4.0), LABELS, n_random=16, n_boot=200)
    assert len(frame) == len(EMOTIONS) * 3
    zero = frame[frame.alpha == 0.0]
    assert (zero[["logit_change_concept", "logit_change_random_mean"]].abs() < 1e-6).all().all()
    row = frame[(frame.emotion == "joy") & (frame.alpha == 4.0)].iloc[0]
    assert row.logit_change_concept > row.logit_change_random_mean + 3 * row.logit_change_random_sd
    assert row.share_random_at_least_concept == 0.0
    assert row.concept_ci_low <= row.logit_change_concept <= row.concept_ci_high
    h = steps[0].prompt_resid(prompts)
    direct = transfer_effect(readout, h, v[-1], 4.0)[joy, :, joy].double().mean()
    assert row.logit_change_concept == pytest.approx(float(direct), rel=1e-6)
    inside = (frame.concept_ci_low <= frame.logit_change_concept + 1e-9) & (
        frame.logit_change_concept <= frame.concept_ci_high + 1e-9
    )
    assert inside.all()
    assert math.isfinite(row.logit_change_random_sd) and row.logit_change_random_sd > 0


def test_figure2_frame_points_match_the_fast_path_and_bands_see_the_vector_noise(series):
    from emolens.analysis.figure2 import FIGURE2_COLUMNS, TREND_COLUMNS, figure2_frame

    neutral0 = N_PER * (len(LABELS) - 1)  # steered prompts are neutral samples, as in the study
    prompts = [f"s{i}" for i in range(neutral0, neutral0 + N_PER, 3)]
    bands, trends = figure2_frame(series, prompts, (4.0,), LABELS, NEUTRAL, n_boot=200)
    assert tuple(bands.columns) == FIGURE2_COLUMNS and tuple(trends.columns) == TREND_COLUMNS
    layer = series[0].final_layer
    for s in series:
        h = s.prompt_resid(prompts)
        own = [LABELS.index(e) for e in EMOTIONS]
        slow = transfer_effect(s.readout, h, s.vectors.layer(layer), 4.0)
        slow = slow[torch.arange(len(EMOTIONS)), :, own].double().mean(-1)
        got = _pick(bands, step=s.step).set_index("emotion").loc[list(EMOTIONS), "value"]
        assert torch.allclose(torch.tensor(got.to_numpy()), slow, rtol=1e-5, atol=1e-5)
    assert ((bands.ci_low <= bands.value + 1e-9) & (bands.value <= bands.ci_high + 1e-9)).all()
    # with one prompt there is no prompt noise: the band is the noise of estimating v alone
    one, _ = figure2_frame(series[:1], prompts[:1], (4.0,), LABELS, NEUTRAL, n_boot=60)
    assert ((one.ci_high - one.ci_low) > 0.05).all()
    fixed = random_baseline_frame(series[:1], prompts[:1], (4.0,), LABELS, n_random=0, n_boot=60)
    assert ((fixed.concept_ci_high - fixed.concept_ci_low).abs() < 1e-9).all()
    t = trends.set_index("emotion")
    assert t.paired.all() and (t.first_step == 0).all() and (t.last_step == 20).all()
    # steps 0 and 10 are identical and only joy moves at step 20
    for e in ("anger", "sadness", "trust"):
        assert abs(t.loc[e, "first_last_effect"]) < 1e-9 and t.loc[e, "first_last_p"] == 1.0
    assert t.loc["joy", "first_last_q"] < 0.05
    # the joint test over emotions: one p per alpha, and the planted joy change shows in it
    assert t.joint_first_last_p.nunique() == 1 and t.joint_first_last_p.iloc[0] < 0.05


def test_sensitivity_change_summary_pairs_prompts_and_flags_a_planted_fall():
    import numpy as np
    import pandas as pd

    from emolens.analysis.change_summary import sensitivity_change_summary

    gen = np.random.default_rng(1)
    rows = []
    prompt_effect = gen.normal(2.0, 1.0, 40)  # prompts differ a lot, steps pair them
    for step in (0, 8, 16):
        for e, fall in (("joy", 0.5), ("trust", 0.0)):
            noise = gen.normal(0.0, 0.1, 40)
            for i in range(40):
                rows.append(
                    dict(step=step, layer=17, steered_emotion=e, observed_label=e, alpha=4.0,
                         prompt_id=f"p{i}", logit_change=prompt_effect[i] - fall * (step > 0)
                         + noise[i])
                )  # fmt: skip
    sens = pd.DataFrame(rows)
    out = sensitivity_change_summary(sens, n_perm=999).set_index(["emotion", "step"])
    assert set(out.family) == {"sensitivity"} and len(out) == 4
    assert out.loc[("joy", 16), "fdr_change"] and out.loc[("joy", 16), "effect"] < -0.4
    assert not out.loc[("trust", 16), "fdr_change"]
    assert out.loc[("trust", 16), "equivalent_within_margin"]  # 5% of ~2 = 0.1 > noise SE
    assert not out.loc[("joy", 16), "equivalent_within_margin"]


def test_probes_frame_permutations_and_refit_intervals():
    """``permutation_p`` and ``shuffled_accuracy_mean`` equal the plain :func:`probe_layer`
    with the same ``n_perm``; the new rows and columns leave every old value unchanged; the
    refit interval (training resamples) is wider than the held-out-only interval."""
    resid, gold = _clusters()
    steps = [_step(0, resid, gold), _step(5, resid + 0.3, gold)]
    frame = probes_frame(steps, LABELS, n_boot=40, seed=2, n_perm=19, n_refit=40)
    plain = probes_frame(steps, LABELS, n_boot=40, seed=2, n_perm=1, n_refit=0)
    new = ["permutation_p", "shuffled_accuracy_mean"]
    cols = [c for c in PROBE_COLUMNS if not c.startswith("refit_")]
    pd.testing.assert_frame_equal(
        frame[~frame.measure.isin(new)][cols].reset_index(drop=True),
        plain[~plain.measure.isin(new)][cols].reset_index(drop=True),
    )
    assert plain.refit_ci_low.isna().all()
    assert "permutation_p" not in set(plain.measure)  # 1 permutation: p >= 0.5, no row
    assert "permutation_p" not in set(probes_frame(steps[:1], LABELS, n_boot=10, n_perm=18).measure)
    for s in steps:
        for layer in LAYERS:
            ref = probe_layer(s.acts.layer(layer), gold, len(LABELS), seed=2, n_perm=19)
            rows = frame[(frame.step == s.step) & (frame.layer == layer)].set_index("measure")
            assert rows.loc["permutation_p", "value"] == ref["permutation_p"]
            assert rows.loc["permutation_p", "n"] == 19
            assert rows.loc["shuffled_accuracy_mean", "value"] == pytest.approx(
                ref["shuffled_accuracy_mean"], abs=1e-12
            )
    p = _pick(frame, measure="permutation_p").set_index(["step", "layer"]).value
    assert p[(0, 3)] == p[(5, 3)] == 1 / 20  # planted clusters at layer 3
    acc = _pick(frame, measure="accuracy")
    assert acc.refit_ci_low.notna().all() and acc.refit_ci_high.notna().all()
    others = frame[frame.measure != "accuracy"]
    assert others.refit_ci_low.isna().all() and others.refit_ci_high.isna().all()
    assert (acc.refit_ci_low <= acc.value + 1e-12).all() and (
        acc.value <= acc.refit_ci_high + 1e-12
    ).all()
    noise = acc[acc.layer == 1]  # no label information: refits vary most
    assert ((noise.refit_ci_high - noise.refit_ci_low) > (noise.ci_high - noise.ci_low)).all()
