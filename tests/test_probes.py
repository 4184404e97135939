"""Linear probes: planted separable clusters are found, shuffled labels are not, cross-step
evaluation agrees with own evaluation, and everything is deterministic per seed."""

import pytest
import torch

from emolens.analysis.probes import (
    Probe,
    evaluate_probe_across,
    per_label_recall,
    permutation_p,
    probe_layer,
    shuffled_baseline,
    stratified_split,
    train_probe,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensor ops: one thread


def _clusters(n_per=60, n_classes=5, d=32, spread=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=gen) * 2.0
    y = torch.arange(n_classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), d, generator=gen) + 50.0  # offset: scaling
    perm = torch.randperm(len(y), generator=gen)
    return x[perm], y[perm]


def test_planted_clusters_are_probed_and_shuffled_labels_are_not():
    x, y = _clusters()
    res = probe_layer(x, y, n_classes=5, test_fraction=0.25, seed=0)
    assert res["accuracy"] > 0.95
    assert res["train_accuracy"] > 0.95
    assert (res["recall"] > 0.85).all()
    assert res["shuffled_accuracy"] < 0.4  # chance is 0.2
    assert res["chance"] == pytest.approx(0.2)
    assert res["n_train"] + res["n_test"] == len(y) and res["n_test"] == 75
    assert isinstance(res["probe"], Probe)
    assert shuffled_baseline(x, y, 5, seed=0) == res["shuffled_accuracy"]


def test_shuffled_baseline_averages_to_chance_over_seeds():
    x, y = _clusters(n_per=40, n_classes=4, d=16)
    accs = torch.tensor([shuffled_baseline(x, y, 4, seed=s) for s in range(6)])
    assert abs(accs.mean().item() - 0.25) < 0.1


def test_probe_on_identical_data_across_steps_equals_own_accuracy():
    x, y = _clusters()
    train, test = stratified_split(y, 0.25, seed=0)
    probe = train_probe(x[train], y[train], 5)
    scores = evaluate_probe_across(probe, {0: x[test], 300: x[test].clone()}, y[test])
    own = probe.accuracy(x[test], y[test])
    assert scores[0].accuracy == scores[300].accuracy == own
    torch.testing.assert_close(scores[0].recall, scores[300].recall)
    moved = {0: x[test], 990: x[test][:40] + 100.0}  # steps may keep different samples
    scores = evaluate_probe_across(probe, moved, {0: y[test], 990: y[test][:40]})
    assert scores[0].n == len(test) and scores[990].n == 40
    assert scores[990].accuracy < own  # a moved representation is no longer read


def test_training_is_deterministic_per_seed():
    x, y = _clusters(n_per=30, n_classes=3, d=12, spread=3.0)
    a = probe_layer(x, y, 3, seed=4)
    b = probe_layer(x, y, 3, seed=4)
    torch.testing.assert_close(a["probe"].weight, b["probe"].weight, rtol=0, atol=0)
    assert a["accuracy"] == b["accuracy"] and a["shuffled_accuracy"] == b["shuffled_accuracy"]
    assert torch.equal(a["test_index"], b["test_index"])
    c = probe_layer(x, y, 3, seed=5)
    assert not torch.equal(a["test_index"], c["test_index"])


def test_probe_ignores_initialisation_seed_at_the_optimum():
    x, y = _clusters(n_per=30, n_classes=3, d=12, spread=3.0)
    p0 = train_probe(x, y, 3, l2=1e-2, seed=0)
    p1 = train_probe(x, y, 3, l2=1e-2, seed=1)
    assert torch.equal(p0.predict(x), p1.predict(x))
    torch.testing.assert_close(p0.weight, p1.weight, atol=1e-4, rtol=1e-3)


def test_absent_label_is_never_predicted_and_constant_feature_is_harmless():
    x, y = _clusters(n_per=20, n_classes=3, d=6)
    x[:, 2] = 7.0
    probe = train_probe(x, y, n_classes=5)
    assert torch.isfinite(probe.weight).all() and torch.isfinite(probe.bias).all()
    assert set(probe.predict(x).tolist()) <= {0, 1, 2}
    assert probe.accuracy(x, y) > 0.95


def test_per_label_recall_with_absent_labels():
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    recall = per_label_recall(pred, y, 5)
    torch.testing.assert_close(
        recall[[0, 1, 3]], torch.tensor([0.5, 2 / 3, 0.0], dtype=torch.float64)
    )
    assert torch.isnan(recall[2]) and torch.isnan(recall[4])


def test_stratified_split_keeps_proportions_and_small_labels():
    y = torch.tensor([0] * 40 + [1] * 8 + [2] * 2 + [3])
    train, test = stratified_split(y, 0.25, seed=0)
    assert torch.bincount(y[test], minlength=4).tolist() == [10, 2, 1, 0]
    assert sorted(torch.cat([train, test]).tolist()) == list(range(len(y)))
    with pytest.raises(ValueError):
        stratified_split(y, 1.0)


def test_permutation_p_of_planted_clusters_is_small():
    x, y = _clusters(n_per=30, n_classes=4, d=16)
    res = probe_layer(x, y, 4, seed=0, n_perm=20)
    assert res["permutation_p"] == pytest.approx(1 / 21) and res["permutation_p"] < 0.05
    assert len(res["shuffled_accuracies"]) == 20
    assert res["shuffled_accuracies"][0] == probe_layer(x, y, 4, seed=0)["shuffled_accuracy"]
    assert res["shuffled_accuracies"][0] == res["shuffled_accuracy"]
    assert len(set(res["shuffled_accuracies"])) > 3  # distinct permutations, not one repeated
    assert abs(res["shuffled_accuracy_mean"] - 0.25) < 0.1
    assert permutation_p(0.5, [0.5, 0.2, 0.7]) == 3 / 4  # ties count against the real probe


def test_permutation_p_is_calibrated_under_pure_noise():
    """Labels independent of the residuals: the share of p <= level stays within nominal plus
    two Monte-Carlo standard errors, at 0.05 and at 0.25 (n_perm = 19: exact levels)."""
    n_sim, rejected_05, rejected_25 = 60, 0, 0
    for sim in range(n_sim):
        gen = torch.Generator().manual_seed(100 + sim)
        y = torch.arange(3).repeat_interleave(16)
        x = torch.randn(len(y), 6, generator=gen)
        p = probe_layer(x, y, 3, seed=sim, n_perm=19, l2=1e-2)["permutation_p"]
        rejected_05 += p <= 0.05
        rejected_25 += p <= 0.25
    for level, hits in ((0.05, rejected_05), (0.25, rejected_25)):
        mc = 2 * (level * (1 - level) / n_sim) ** 0.5
        assert hits / n_sim <= level + mc, (level, hits)
