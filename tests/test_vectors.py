import warnings

import pytest
import torch

from emolens.data.labels import STUDY_LABELS
from emolens.measure.activations import Activations
from emolens.measure.vectors import (
    ConceptVectors,
    DroppedLabelWarning,
    concept_vectors,
    count_kept,
    filter_correct,
    keep_mask,
)

D = 48
LAYERS = (3, 7)
NEUTRAL = STUDY_LABELS.neutral_index
SHAME = STUDY_LABELS.index("shame")


def synthetic(per_label: dict[int, int], seed: int = 0, noise: float = 0.05, wrong_every: int = 0):
    """Activations where label e's residual is a shared mean plus a planted direction
    ``planted[layer, e]`` (zero for neutral) plus small noise; label logits pick the gold label,
    except every ``wrong_every``-th sample, which picks another."""
    g = torch.Generator().manual_seed(seed)
    n_labels = len(STUDY_LABELS)
    planted = torch.randn(len(LAYERS), n_labels, D, generator=g) * 3
    planted[:, NEUTRAL] = 0
    shared = torch.randn(len(LAYERS), D, generator=g) * 5
    gold = torch.tensor([lab for lab, n in per_label.items() for _ in range(n)])
    n = len(gold)
    resid = (
        shared
        + planted[:, gold].transpose(0, 1)
        + noise * torch.randn(n, len(LAYERS), D, generator=g)
    )
    logits = torch.randn(n, n_labels, generator=g)
    logits[torch.arange(n), gold] = 10.0
    if wrong_every:
        wrong = torch.arange(n) % wrong_every == 0
        logits[wrong, gold[wrong]] = -10.0
    acts = Activations(
        resid,
        logits,
        torch.zeros(n),
        torch.zeros(n),
        LAYERS,
        tuple(f"s{i}" for i in range(n)),
        gold,
    )
    return acts, planted


def all_labels(n: int) -> dict[int, int]:
    return dict.fromkeys(range(len(STUDY_LABELS)), n)


def test_planted_directions_are_recovered():
    acts, planted = synthetic(all_labels(6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cv = concept_vectors(acts, filter_correct(acts), STUDY_LABELS)
    assert cv.emotions == tuple(e.en for e in STUDY_LABELS if e.en != "no-emotion")
    assert cv.vectors.shape == (len(LAYERS), 12, D) and cv.layers == LAYERS
    assert cv.counts.tolist() == [6] * 12 and cv.neutral_count == 6 and cv.dropped == ()
    truth = planted[:, [i for i in range(len(STUDY_LABELS)) if i != NEUTRAL]]
    cos = torch.nn.functional.cosine_similarity(cv.vectors, truth, dim=-1)
    assert cos.min() > 0.99
    assert torch.allclose(cv.norms, cv.vectors.norm(dim=-1))
    assert torch.equal(cv.layer(7), cv.vectors[1])


def test_vectors_equal_a_slow_loop():
    acts, _ = synthetic(all_labels(5), seed=1, wrong_every=4)
    keep = filter_correct(acts)
    cv = concept_vectors(acts, keep, STUDY_LABELS, min_count=2)
    for li in range(len(LAYERS)):
        for k, name in enumerate(cv.emotions):
            e = STUDY_LABELS.index(name)
            rows_e = [
                acts.resid[i, li] for i in range(acts.n_samples) if keep[i] and acts.gold[i] == e
            ]
            rows_n = [
                acts.resid[i, li]
                for i in range(acts.n_samples)
                if keep[i] and acts.gold[i] == NEUTRAL
            ]
            expected = torch.stack(rows_e).mean(0) - torch.stack(rows_n).mean(0)
            torch.testing.assert_close(cv.vectors[li, k], expected, atol=1e-5, rtol=0)
            assert int(cv.counts[k]) == len(rows_e)


def test_a_label_with_too_few_kept_samples_drops_out_with_a_warning():
    counts = all_labels(6)
    counts[SHAME] = 1  # like the paper's 恥: nothing useful is left after filtering
    acts, planted = synthetic(counts)
    with pytest.warns(DroppedLabelWarning, match=r"'shame' \(恥\) has 1 kept samples"):
        cv = concept_vectors(acts, filter_correct(acts), STUDY_LABELS, min_count=3)
    assert "shame" not in cv.emotions and len(cv.emotions) == 11
    assert cv.dropped == ("shame",)
    k = cv.emotions.index("surprise")
    truth = planted[:, STUDY_LABELS.index("surprise")]
    assert torch.nn.functional.cosine_similarity(cv.vectors[:, k], truth, dim=-1).min() > 0.99


def test_a_label_with_no_samples_at_all_drops_out():
    counts = all_labels(4)
    del counts[SHAME]
    acts, _ = synthetic(counts)
    with pytest.warns(DroppedLabelWarning, match="shame"):
        cv = concept_vectors(acts, filter_correct(acts), STUDY_LABELS)
    assert "shame" not in cv.emotions


def test_too_few_neutral_samples_is_a_clear_error():
    counts = all_labels(5)
    counts[NEUTRAL] = 2
    acts, _ = synthetic(counts)
    with pytest.raises(ValueError, match="neutral label 'no-emotion'.*min_count=3"):
        concept_vectors(acts, filter_correct(acts), STUDY_LABELS)


def test_filter_modes():
    own, _ = synthetic(all_labels(4), wrong_every=3)
    base, _ = synthetic(all_labels(4), wrong_every=2)
    other, _ = synthetic(all_labels(4), wrong_every=5)
    assert torch.equal(keep_mask("self", own), own.correct)
    assert torch.equal(keep_mask("base", own, base=base), base.correct)
    every = keep_mask("all", own, all_steps=[own, base, other])
    assert torch.equal(every, own.correct & base.correct & other.correct)
    assert torch.equal(
        keep_mask("all", own, all_steps=[own.correct, base.correct]), own.correct & base.correct
    )
    with pytest.raises(ValueError, match="base model"):
        keep_mask("base", own)
    with pytest.raises(ValueError, match="unknown filter mode"):
        keep_mask("best", own)
    shifted = own.select(torch.arange(own.n_samples) > 0)
    with pytest.raises(ValueError, match="different samples"):
        keep_mask("base", shifted, base=base)


def test_count_kept_ignores_unknown_gold():
    gold = torch.tensor([0, 0, 2, -1, 2])
    keep = torch.tensor([True, False, True, True, True])
    assert count_kept(gold, keep, 4).tolist() == [1, 0, 2, 0]


def test_save_load_round_trip_and_unit(tmp_path):
    counts = all_labels(5)
    counts[SHAME] = 0
    acts, _ = synthetic(counts)
    with pytest.warns(DroppedLabelWarning):
        cv = concept_vectors(acts, filter_correct(acts), STUDY_LABELS)
    cv.save(tmp_path)
    back = ConceptVectors.load(tmp_path)
    assert torch.equal(back.vectors, cv.vectors) and torch.equal(back.counts, cv.counts)
    assert (back.emotions, back.layers, back.dropped, back.neutral_count) == (
        cv.emotions,
        cv.layers,
        cv.dropped,
        cv.neutral_count,
    )
    unit = cv.unit()
    torch.testing.assert_close(unit.norms, torch.ones_like(unit.norms))
