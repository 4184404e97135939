"""Linear probes: multinomial logistic regression on residuals at one layer, in torch.

A probe standardises features with the mean and standard deviation of its training set, then
minimises ``mean cross-entropy + l2 * ||W||^2`` (bias not penalised) with full-batch L-BFGS in
float64 from a seeded initialisation. The objective is strictly convex in ``W``, so the result
is deterministic and nearly independent of the seed; the seed matters for splits and shuffles.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from emolens.analysis import stats


@dataclass(frozen=True)
class Probe:
    """A trained multinomial logistic probe; ``classes`` is the number of labels.

    ``mean``/``std`` standardise inputs and travel with the probe, so a probe trained on step 0
    evaluated on step t sees step t's residuals through step 0's scaling.
    """

    weight: Float[Tensor, "emotion d_model"]
    bias: Float[Tensor, " emotion"]
    mean: Float[Tensor, " d_model"]
    std: Float[Tensor, " d_model"]
    classes: int

    def logits(self, x: Float[Tensor, "sample d_model"]) -> Float[Tensor, "sample emotion"]:
        z = (x.to(torch.float64) - self.mean.to(x.device)) / self.std.to(x.device)
        return z @ self.weight.to(x.device).T + self.bias.to(x.device)

    def predict(self, x: Float[Tensor, "sample d_model"]) -> Int[Tensor, " sample"]:
        return self.logits(x).argmax(-1)

    def accuracy(self, x: Float[Tensor, "sample d_model"], y: Int[Tensor, " sample"]) -> float:
        return accuracy(self.predict(x), y)


@dataclass(frozen=True)
class ProbeScore:
    """Accuracy and per-label recall of a probe on one set of samples."""

    accuracy: float
    recall: Float[Tensor, " emotion"]
    n: int


def accuracy(pred: Int[Tensor, " sample"], y: Int[Tensor, " sample"]) -> float:
    """Share of correct predictions (NaN for no samples)."""
    return float((pred == y).to(torch.float64).mean()) if len(y) else float("nan")


def per_label_recall(
    pred: Int[Tensor, " sample"], y: Int[Tensor, " sample"], n_classes: int
) -> Float[Tensor, " emotion"]:
    """Recall per label (correct / present); NaN for labels with no sample in ``y``."""
    present = torch.bincount(y, minlength=n_classes).to(torch.float64)
    hit = torch.bincount(y[pred == y], minlength=n_classes).to(torch.float64)
    return torch.where(present > 0, hit / present.clamp_min(1), torch.nan)


def score(
    probe: Probe, x: Float[Tensor, "sample d_model"], y: Int[Tensor, " sample"]
) -> ProbeScore:
    pred = probe.predict(x)
    return ProbeScore(accuracy(pred, y), per_label_recall(pred, y, probe.classes), len(y))


def train_probe(
    x: Float[Tensor, "sample d_model"],
    y: Int[Tensor, " sample"],
    n_classes: int,
    l2: float = 1e-3,
    seed: int = 0,
    max_iter: int = 300,
) -> Probe:
    """Fit a multinomial logistic probe (full-batch L-BFGS with strong-Wolfe line search).

    Features with zero variance get ``std = 1``. Labels absent from ``y`` get a weight that
    stays at the initialisation scale and a bias driven down, so they are never predicted.
    """
    if len(y) == 0:
        raise ValueError("cannot train a probe on zero samples")
    if int(y.min()) < 0 or int(y.max()) >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}")
    x64 = x.detach().to(torch.float64)
    y = y.to(x.device)
    mean = x64.mean(0)
    std = x64.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * std.max().clamp_min(1e-300), std, torch.ones_like(std))
    z = (x64 - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n_classes, x.shape[1], generator=gen, dtype=torch.float64) * 1e-3
    weight = w0.to(x.device).requires_grad_()
    bias = torch.zeros(n_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(weight=weight.detach(), bias=bias.detach(), mean=mean, std=std, classes=n_classes)


def evaluate_probe_across(
    probe: Probe,
    xs: dict[int, Float[Tensor, "_sample d_model"]],
    ys: Int[Tensor, " _sample"] | dict[int, Int[Tensor, " _sample"]],
) -> dict[int, ProbeScore]:
    """Score one probe (e.g. trained on step 0) on the residuals of several steps.

    ``ys`` is one label tensor shared by every step (the same prompts) or one per step (steps
    may keep different samples after filtering). Pass held-out samples: the probe's own
    training samples flatter the score at its own step.
    """
    out = {}
    for step, x in xs.items():
        y = ys[step] if isinstance(ys, dict) else ys
        out[step] = score(probe, x, y)
    return out


def stratified_split(
    y: Int[Tensor, " sample"], test_fraction: float = 0.25, seed: int = 0
) -> tuple[Int[Tensor, " train"], Int[Tensor, " test"]]:
    """Seeded split keeping label proportions: each label sends ``round(n * test_fraction)``
    samples to the test set, at least one when it has two or more and never all of them (a
    label with one sample stays in training). Returns sorted index tensors."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    y_cpu = y.cpu()
    train, test = [], []
    for label in torch.unique(y_cpu).tolist():
        idx = torch.nonzero(y_cpu == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = torch.sort(torch.cat(train)).values.to(y.device)
    test_idx = torch.sort(torch.cat(test)).values.to(y.device)
    return train_idx, test_idx


def shuffled_labels(
    y_train: Int[Tensor, " train"], seed: int, draw: int = 0
) -> Int[Tensor, " train"]:
    """The training labels permuted: the ``draw``-th permutation of a generator seeded with
    ``seed + 1`` (draw 0 is the shuffled-label baseline's, the same for every step and layer
    of a table; draws 1, 2, ... are the further permutations of :func:`fit_layer`)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(draw):
        torch.randperm(len(y_train), generator=gen)
    return y_train[torch.randperm(len(y_train), generator=gen).to(y_train.device)]


def permutation_p(real: float, shuffled: Sequence[float]) -> float:
    """One-sided permutation p-value ``(1 + k) / (1 + n)`` of a real accuracy against ``n``
    accuracies of probes trained on permuted labels, ``k`` of them at least as high (ties count
    against the real probe, so discrete accuracies keep the test conservative)."""
    if not shuffled:
        raise ValueError("a permutation p-value needs at least one shuffled accuracy")
    null = torch.tensor(list(shuffled), dtype=torch.float64)
    return float(stats.permutation_p(torch.tensor(float(real), dtype=torch.float64), null))


@dataclass(frozen=True)
class LayerProbes:
    """The probes of one layer on one split: ``probe`` on the true training labels, and
    ``permuted`` on ``n_perm`` permutations of them (:func:`shuffled_labels` draws 0, 1, ...;
    scored against the true held-out labels). ``shuffled`` is ``permuted[0]``, the single
    shuffled-label baseline."""

    probe: Probe
    permuted: tuple[Probe, ...]

    @property
    def shuffled(self) -> Probe:
        return self.permuted[0]


def fit_layer(
    x_train: Float[Tensor, "train d_model"],
    y_train: Int[Tensor, " train"],
    n_classes: int,
    l2: float = 1e-3,
    seed: int = 0,
    max_iter: int = 300,
    n_perm: int = 1,
) -> LayerProbes:
    """Train the probe of one layer and ``n_perm >= 1`` shuffled-label probes
    (:class:`LayerProbes`); used by :func:`probe_layer` and by
    :func:`emolens.analysis.probe_tables.probes_frame`."""
    if n_perm < 1:
        raise ValueError(f"n_perm must be at least 1 (the shuffled-label baseline), not {n_perm}")
    probe = train_probe(x_train, y_train, n_classes, l2=l2, seed=seed, max_iter=max_iter)
    permuted = tuple(
        train_probe(
            x_train,
            shuffled_labels(y_train, seed, draw),
            n_classes,
            l2=l2,
            seed=seed,
            max_iter=max_iter,
        )  # fmt: skip
        for draw in range(n_perm)
    )
    return LayerProbes(probe, permuted)


def shuffled_baseline(
    x: Float[Tensor, "sample d_model"],
    y: Int[Tensor, " sample"],
    n_classes: int,
    test_fraction: float = 0.25,
    l2: float = 1e-3,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a probe trained on permuted labels: the level a probe reaches when
    its training labels carry no information (chance: about ``sum_c p_c^2`` for label shares
    ``p_c``, at most the majority share).

    Uses the same split as :func:`probe_layer` with the same seed; the training labels are
    permuted with seed ``seed + 1`` (:func:`shuffled_labels`) and the test set is scored against
    its true labels.
    """
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    y_train = shuffled_labels(y[train_idx], seed)
    probe = train_probe(x[train_idx], y_train, n_classes, l2=l2, seed=seed)
    return probe.accuracy(x[test_idx], y[test_idx])


def probe_layer(
    x: Float[Tensor, "sample d_model"],
    y: Int[Tensor, " sample"],
    n_classes: int,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-3,
    n_perm: int = 1,
) -> dict:
    """Probe one layer with a stratified held-out split: one step's numbers of
    :func:`emolens.analysis.probe_tables.probes_frame` without its bootstrap (the table's
    tests check it against this).

    Returns a dict: ``accuracy`` (held-out), ``train_accuracy``, ``recall`` (per-label held-out
    recall, NaN for labels absent from the test set), ``shuffled_accuracy``
    (:func:`shuffled_baseline`), ``shuffled_accuracies`` (held-out accuracies of the
    ``n_perm`` shuffled-label probes, the first being ``shuffled_accuracy``),
    ``shuffled_accuracy_mean`` (their mean), ``permutation_p`` (:func:`permutation_p` of
    ``accuracy`` against them), ``chance`` (the majority label's share of the test set),
    ``n_train``, ``n_test``, and ``probe``, ``train_index``, ``test_index`` for evaluating the
    same probe on other steps' held-out samples.
    """
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    fitted = fit_layer(x[train_idx], y[train_idx], n_classes, l2=l2, seed=seed, n_perm=n_perm)
    probe = fitted.probe
    held = score(probe, x[test_idx], y[test_idx])
    shuffled = [p.accuracy(x[test_idx], y[test_idx]) for p in fitted.permuted]
    test_counts = torch.bincount(y[test_idx], minlength=n_classes)
    return {
        "accuracy": held.accuracy,
        "train_accuracy": probe.accuracy(x[train_idx], y[train_idx]),
        "recall": held.recall,
        "shuffled_accuracy": shuffled[0],
        "shuffled_accuracies": shuffled,
        "shuffled_accuracy_mean": sum(shuffled) / len(shuffled),
        "permutation_p": permutation_p(held.accuracy, shuffled),
        "chance": float(test_counts.max()) / max(len(test_idx), 1),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "probe": probe,
        "train_index": train_idx,
        "test_index": test_idx,
    }
