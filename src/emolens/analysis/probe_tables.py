"""Linear probes per step and layer, long, with bootstrap intervals (``probes.csv``).

Multinomial logistic probes (:mod:`emolens.analysis.probes`) per step and layer on every sample
with a known gold label present at every step, one stratified split of sample ids shared by all
steps; intervals by bootstrapping the held-out samples within labels (same resamples at every
step). Built from finished steps (:class:`emolens.analysis.steps.StepData`), no model needed.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from emolens.analysis import stats
from emolens.analysis._common import (
    Columns,
    Replicates,
    common_layers,
    floats,
    interval,
    sample_key,
    table_result,
    threads,
)
from emolens.analysis.probes import (
    Probe,
    fit_layer,
    per_label_recall,
    permutation_p,
    stratified_split,
    train_probe,
)
from emolens.analysis.steps import StepData

PROBE_COLUMNS = (
    "step",
    "layer",
    "measure",
    "label",
    "value",
    "ci_low",
    "ci_high",
    "train_step",
    "n",
    "refit_ci_low",
    "refit_ci_high",
)

#: The probe-refit interval's columns of :data:`PROBE_COLUMNS` (NaN where a row has none).
REFIT_COLUMNS = ("refit_ci_low", "refit_ci_high")


MIN_PERMUTATIONS_FOR_P = 19  # the smallest n with (1 + 0) / (1 + n) <= 0.05


def _aligned_samples(steps: Sequence[StepData], n_labels: int) -> tuple[list[Tensor], Tensor]:
    """Positions, at every step, of the first step's samples with a known gold label that
    every step has; and their gold labels (which must agree between steps)."""
    first = steps[0].acts
    maps = [{sid: i for i, sid in enumerate(s.acts.sample_ids)} for s in steps]
    gold0 = first.gold.tolist()
    ids = [
        sid
        for sid, g in zip(first.sample_ids, gold0)
        if 0 <= g < n_labels and all(sid in m for m in maps)
    ]
    if not ids:
        raise ValueError("no sample with a known gold label is present at every step")
    positions = [torch.tensor([m[sid] for sid in ids], dtype=torch.long) for m in maps]
    y = first.gold[positions[0]].long()
    for s, pos in zip(steps, positions):
        if not torch.equal(s.acts.gold[pos].long(), y):
            raise ValueError(
                f"step {s.step} gives some samples another gold label than step {steps[0].step}"
            )
    return positions, y


@dataclass(frozen=True)
class _HeldOut:
    """The held-out samples of the shared split: labels ``y`` [n], bootstrap ``counts``
    [n_boot, n] (multiplicities, resampled within labels), the labels present (``label_ids``,
    their ``members`` and counts ``present``), the majority share ``chance`` and the
    ``sample_set`` key of their ids."""

    y: Tensor
    counts: Tensor
    present: Tensor
    label_ids: list[int]
    members: list[Tensor]
    chance: float
    sample_set: str


def _held_out(y_test: Tensor, *, n_labels: int, n_boot: int, seed: int, ids: list[str]) -> _HeldOut:
    n_test = len(y_test)
    counts = torch.zeros(max(n_boot, 0), n_test, dtype=torch.float64)
    if n_boot > 0:
        idx = stats.bootstrap_indices(n_test, n_boot, seed, strata=y_test)
        counts.scatter_add_(1, idx, torch.ones(n_boot, n_test, dtype=torch.float64))
    present = torch.bincount(y_test, minlength=n_labels)
    label_ids = [c for c in range(n_labels) if int(present[c]) > 0]
    members = [torch.nonzero(y_test == c).flatten() for c in label_ids]
    chance = float(present.max()) / max(n_test, 1)
    return _HeldOut(y_test, counts, present, label_ids, members, chance, sample_key(ids))


def _score_blocks(pred: Tensor, held: _HeldOut, *, measure: str, labels: list[str], ci: float):
    """Accuracy of ``pred`` on the held-out samples (label ``"all"``) with its bootstrap, and
    for ``measure == "accuracy"`` the recall per label present."""
    n_test = len(held.y)
    correct = (pred == held.y).to(torch.float64)
    boot = held.counts @ correct / max(n_test, 1)
    lo, hi = interval(boot[:, None], ci)
    blocks = [
        dict(boot=boot[:, None], measure=measure, label="all", value=float(correct.mean()),
             ci_low=float(lo[0]), ci_high=float(hi[0]), n=n_test, **_no_refit())
    ]  # fmt: skip
    if measure != "accuracy":
        return blocks
    recall = per_label_recall(pred, held.y, len(labels))
    boot_r = (
        torch.stack([held.counts[:, m] @ correct[m] / len(m) for m in held.members], 1)
        if held.members
        else torch.zeros(held.counts.shape[0], 0, dtype=torch.float64)
    )
    lo, hi = interval(boot_r, ci)
    blocks.append(
        dict(boot=boot_r, measure="recall", label=[labels[c] for c in held.label_ids],
             value=[float(recall[c]) for c in held.label_ids], ci_low=floats(lo),
             ci_high=floats(hi), n=[int(held.present[c]) for c in held.label_ids],
             **_no_refit())
    )  # fmt: skip
    return blocks


def _no_refit() -> dict[str, float]:
    return dict.fromkeys(REFIT_COLUMNS, float("nan"))


def _train_resamples(y_train: Tensor, n_refit: int, seed: int) -> Tensor:
    """``[n_refit, n_train]`` bootstrap indices of the training split, within labels (the same
    at every step and layer, so refits are paired across steps)."""
    if n_refit <= 0:
        return torch.zeros(0, len(y_train), dtype=torch.long)
    return stats.bootstrap_indices(len(y_train), n_refit, seed + 7919, strata=y_train)


def _refit_interval(
    refits: Sequence[Probe], x_test: Tensor, held: _HeldOut, value: float, ci: float
) -> dict[str, float]:
    """The interval of held-out accuracy that includes probe-training variability: refit
    ``r`` (trained on the ``r``-th bootstrap resample of the training split) is scored on the
    ``r``-th held-out resample (cycling when there are fewer; the plain held-out set without
    any), and the percentile interval of these accuracies is shifted by ``value - their
    mean``: a bootstrap training set holds about 63% distinct samples, so refits are biased
    low; the interval keeps their spread, not that bias. NaN without refits."""
    if not refits:
        return _no_refit()
    n_test = len(held.y)
    accs = []
    for r, probe in enumerate(refits):
        correct = (probe.predict(x_test) == held.y).to(torch.float64)
        weights = held.counts[r % held.counts.shape[0]] if held.counts.shape[0] else None
        accs.append(
            float(weights @ correct) / n_test if weights is not None else float(correct.mean())
        )
    boot = torch.tensor(accs, dtype=torch.float64)
    lo, hi = interval(boot[:, None], ci)
    shift = value - float(boot.mean())
    return {"refit_ci_low": float(lo[0]) + shift, "refit_ci_high": float(hi[0]) + shift}


def _probe_blocks(
    steps: Sequence[StepData],
    *,
    labels: list[str],
    layers: Sequence[int] | None,
    test_fraction: float,
    seed: int,
    n_boot: int,
    ci: float,
    l2: float,
    max_iter: int,
    n_perm: int,
    n_refit: int,
) -> list[dict]:
    """The rows of :func:`probes_frame` as :meth:`Columns.add` blocks, layer by layer."""
    positions, y = _aligned_samples(steps, len(labels))
    layer_list = common_layers(steps, layers, with_vectors=False)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    ids = [steps[0].acts.sample_ids[int(i)] for i in positions[0][test_idx]]
    held = _held_out(y[test_idx], n_labels=len(labels), n_boot=n_boot, seed=seed, ids=ids)
    y_train = y[train_idx]
    resamples = _train_resamples(y_train, n_refit, seed)
    first = steps[0].step
    out = []

    def add(blocks, step, layer, train_step):
        out.extend({**b, "step": step, "layer": layer, "train_step": train_step,
                    "sample_set": held.sample_set} for b in blocks)  # fmt: skip

    def fixed(measure, value, n, nan_interval):
        lo_hi = float("nan") if nan_interval else value
        return [dict(measure=measure, label="all", value=value, ci_low=lo_hi, ci_high=lo_hi, n=n,
                     **_no_refit())]  # fmt: skip

    def with_refit(blocks, refits, x_test):
        first_block = blocks[0]
        first_block.update(_refit_interval(refits, x_test, held, first_block["value"], ci))
        return blocks

    for layer in layer_list:
        probe0, refits0 = None, []
        for s, pos in zip(steps, positions):
            x = s.acts.layer(layer)[pos]
            x_train, x_test = x[train_idx], x[test_idx]
            fitted = fit_layer(x_train, y_train, len(labels), l2=l2, seed=seed,
                               max_iter=max_iter, n_perm=n_perm)  # fmt: skip
            refits = [
                train_probe(
                    x_train[r], y_train[r], len(labels), l2=l2, seed=seed, max_iter=max_iter
                )  # fmt: skip
                for r in resamples
            ]
            score: dict[str, Any] = dict(held=held, labels=labels, ci=ci)
            own = _score_blocks(fitted.probe.predict(x_test), measure="accuracy", **score)
            add(with_refit(own, refits, x_test), s.step, layer, s.step)
            train_acc = fitted.probe.accuracy(x_train, y_train)
            add(fixed("train_accuracy", train_acc, len(train_idx), True), s.step, layer, s.step)
            add(_score_blocks(fitted.shuffled.predict(x_test), measure="shuffled_accuracy",
                              **score), s.step, layer, s.step)  # fmt: skip
            add(_permutation_blocks(fitted.permuted, x_test, held, own[0]["value"], ci),
                s.step, layer, s.step)  # fmt: skip
            add(fixed("chance", held.chance, len(test_idx), False), s.step, layer, s.step)
            if probe0 is None:
                probe0, refits0 = fitted.probe, refits
            else:
                cross = _score_blocks(probe0.predict(x_test), measure="accuracy", **score)
                add(with_refit(cross, refits0, x_test), s.step, layer, first)
    return out


def _permutation_blocks(
    permuted: Sequence[Probe], x_test: Tensor, held: _HeldOut, real: float, ci: float
) -> list[dict]:
    """``shuffled_accuracy_mean`` (mean held-out accuracy of the ``n_perm`` shuffled-label
    probes, percentile interval over the held-out resamples, no replicates so the change tests
    leave it out) and, with at least :data:`MIN_PERMUTATIONS_FOR_P` of them, ``permutation_p``
    (:func:`emolens.analysis.probes.permutation_p` of the real accuracy ``real`` against them,
    no interval; ``n`` is ``n_perm``)."""
    n_test = len(held.y)
    correct = torch.stack([(p.predict(x_test) == held.y).to(torch.float64) for p in permuted])
    accs = correct.mean(1)  # [n_perm]
    boot = held.counts @ correct.mean(0) / max(n_test, 1)
    lo, hi = interval(boot[:, None], ci)
    nan = float("nan")
    rows = [
        dict(measure="shuffled_accuracy_mean", label="all", value=float(accs.mean()),
             ci_low=float(lo[0]), ci_high=float(hi[0]), n=n_test, **_no_refit()),
    ]  # fmt: skip
    if len(permuted) >= MIN_PERMUTATIONS_FOR_P:
        rows.append(
            dict(measure="permutation_p", label="all", value=permutation_p(real, floats(accs)),
                 ci_low=nan, ci_high=nan, n=len(permuted), **_no_refit())
        )  # fmt: skip
    return rows


def probes_frame(
    steps: Sequence[StepData],
    labels: Sequence[str],
    layers: Sequence[int] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    n_boot: int = 200,
    ci: float = 0.95,
    l2: float = 1e-3,
    max_iter: int = 300,
    num_threads: int | None = 1,
    return_replicates: bool = False,
    n_perm: int = 20,
    n_refit: int = 20,
) -> pd.DataFrame | tuple[pd.DataFrame, Replicates]:
    """Linear probes per step and layer, long, with bootstrap intervals.

    Samples: those of the first step with a known gold label that every step has (no
    filtering: the probe reads the label from the residual whatever the model answered); one
    stratified split of them (:func:`emolens.analysis.probes.stratified_split`, ``seed``) for all
    steps
    and layers. ``layers``: default every layer collected at every step.

    Columns ``step, layer, measure, label, value, ci_low, ci_high, train_step, n,
    refit_ci_low, refit_ci_high``; measures:

    - ``accuracy`` (label ``"all"``) and ``recall`` (per label) on the held-out samples, of the
      step's own probe (``train_step == step``) and of the first step's probe evaluated on this
      step's residuals of the same held-out samples (``train_step`` = the first step; at the
      first step the two are the same probe and appear once);
    - ``train_accuracy``; ``shuffled_accuracy`` (a probe trained on permuted training labels,
      seed ``seed + 1``, scored on the true held-out labels); ``chance`` (the majority label's
      share of the held-out set, no interval);
    - ``shuffled_accuracy_mean``: the mean held-out accuracy of ``n_perm`` probes trained on
      ``n_perm`` permutations of the training labels (the first is ``shuffled_accuracy``'s),
      and ``permutation_p``: the one-sided permutation p-value ``(1 + k) / (1 + n_perm)`` of
      the own probe's held-out accuracy against them (``k`` shuffled accuracies at least as
      high; no interval, ``n = n_perm``), only with ``n_perm >=`` :data:`MIN_PERMUTATIONS_FOR_P`
      (fewer cannot give a p below 0.05, and a row that can never reject would read as "no
      evidence"). Valid where the labels are exchangeable given the training split (the
      permutation keeps the training set's label counts).

    Intervals: percentile bootstrap of the held-out samples resampled within labels (the same
    resamples at every step and layer, so steps are paired); none for ``train_accuracy`` and
    ``chance``. These intervals hold the probe fixed (only the scored samples vary).
    ``refit_ci_low``/``refit_ci_high`` (``accuracy``, label ``"all"``; NaN elsewhere or with
    ``n_refit = 0``) also include probe-training variability: the probe is refit on
    ``n_refit`` bootstrap resamples of the training split (within labels, the same at every
    step), each scored on one held-out resample; the interval has their spread, centred on
    the value (see ``_refit_interval``). For the first step's probe on a later step, the first
    step's refits are scored. ``n`` is the number of samples scored (per label for
    ``recall``). ``l2``, ``max_iter``: of :func:`emolens.analysis.probes.train_probe`;
    ``num_threads`` as in :func:`emolens.analysis.geometry_tables.geometry_frame` (also
    ``return_replicates``).
    """
    out = Columns(PROBE_COLUMNS)
    if not steps:
        return table_result(out, return_replicates)
    with threads(num_threads):
        blocks = _probe_blocks(
            steps, labels=list(labels), layers=layers, test_fraction=test_fraction, seed=seed,
            n_boot=n_boot, ci=ci, l2=l2, max_iter=max_iter, n_perm=n_perm, n_refit=n_refit,
        )  # fmt: skip
        out.add_all(blocks)
    return table_result(out, return_replicates)


__all__ = ["MIN_PERMUTATIONS_FOR_P", "PROBE_COLUMNS", "probes_frame"]
