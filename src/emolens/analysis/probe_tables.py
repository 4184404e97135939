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
from emolens.analysis.probes import fit_layer, per_label_recall, stratified_split
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
)


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
             ci_low=float(lo[0]), ci_high=float(hi[0]), n=n_test)
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
             ci_high=floats(hi), n=[int(held.present[c]) for c in held.label_ids])
    )  # fmt: skip
    return blocks


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
) -> list[dict]:
    """The rows of :func:`probes_frame` as :meth:`Columns.add` blocks, layer by layer."""
    positions, y = _aligned_samples(steps, len(labels))
    layer_list = common_layers(steps, layers, with_vectors=False)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    ids = [steps[0].acts.sample_ids[int(i)] for i in positions[0][test_idx]]
    held = _held_out(y[test_idx], n_labels=len(labels), n_boot=n_boot, seed=seed, ids=ids)
    y_train = y[train_idx]
    first = steps[0].step
    out = []

    def add(blocks, step, layer, train_step):
        out.extend({**b, "step": step, "layer": layer, "train_step": train_step,
                    "sample_set": held.sample_set} for b in blocks)  # fmt: skip

    def fixed(measure, value, n, nan_interval):
        lo_hi = float("nan") if nan_interval else value
        return [dict(measure=measure, label="all", value=value, ci_low=lo_hi, ci_high=lo_hi, n=n)]

    for layer in layer_list:
        probe0 = None
        for s, pos in zip(steps, positions):
            x = s.acts.layer(layer)[pos]
            x_train, x_test = x[train_idx], x[test_idx]
            fitted = fit_layer(x_train, y_train, len(labels), l2=l2, seed=seed, max_iter=max_iter)
            score: dict[str, Any] = dict(held=held, labels=labels, ci=ci)
            add(_score_blocks(fitted.probe.predict(x_test), measure="accuracy", **score),
                s.step, layer, s.step)  # fmt: skip
            train_acc = fitted.probe.accuracy(x_train, y_train)
            add(fixed("train_accuracy", train_acc, len(train_idx), True), s.step, layer, s.step)
            add(_score_blocks(fitted.shuffled.predict(x_test), measure="shuffled_accuracy",
                              **score), s.step, layer, s.step)  # fmt: skip
            add(fixed("chance", held.chance, len(test_idx), False), s.step, layer, s.step)
            if probe0 is None:
                probe0 = fitted.probe
            else:
                add(_score_blocks(probe0.predict(x_test), measure="accuracy", **score),
                    s.step, layer, first)  # fmt: skip
    return out


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
) -> pd.DataFrame | tuple[pd.DataFrame, Replicates]:
    """Linear probes per step and layer, long, with bootstrap intervals.

    Samples: those of the first step with a known gold label that every step has (no
    filtering: the probe reads the label from the residual whatever the model answered); one
    stratified split of them (:func:`emolens.analysis.probes.stratified_split`, ``seed``) for all
    steps
    and layers. ``layers``: default every layer collected at every step.

    Columns ``step, layer, measure, label, value, ci_low, ci_high, train_step, n``; measures:

    - ``accuracy`` (label ``"all"``) and ``recall`` (per label) on the held-out samples, of the
      step's own probe (``train_step == step``) and of the first step's probe evaluated on this
      step's residuals of the same held-out samples (``train_step`` = the first step; at the
      first step the two are the same probe and appear once);
    - ``train_accuracy``; ``shuffled_accuracy`` (a probe trained on permuted training labels,
      seed ``seed + 1``, scored on the true held-out labels); ``chance`` (the majority label's
      share of the held-out set, no interval).

    Intervals: percentile bootstrap of the held-out samples resampled within labels (the same
    resamples at every step and layer, so steps are paired); none for ``train_accuracy`` and
    ``chance``. ``n`` is the number of samples scored (per label for ``recall``). ``l2``,
    ``max_iter``: of :func:`emolens.analysis.probes.train_probe`; ``num_threads`` as in
    :func:`emolens.analysis.geometry_tables.geometry_frame` (also ``return_replicates``).
    """
    out = Columns(PROBE_COLUMNS)
    if not steps:
        return table_result(out, return_replicates)
    with threads(num_threads):
        blocks = _probe_blocks(
            steps, labels=list(labels), layers=layers, test_fraction=test_fraction, seed=seed,
            n_boot=n_boot, ci=ci, l2=l2, max_iter=max_iter,
        )  # fmt: skip
        out.add_all(blocks)
    return table_result(out, return_replicates)


__all__ = ["PROBE_COLUMNS", "probes_frame"]
