"""Shared machinery of the long tables (geometry, probes, Figure 2, random baseline).

Row accumulation (:class:`Columns`), bootstrap replicates behind a table's intervals
(:class:`Replicates`, consumed by :func:`emolens.analysis.change_summary.change_summary`),
percentile intervals, the kept-sample mask of a step and the torch thread setting.
"""

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from emolens.analysis.steps import StepData


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Torch intra-op threads set to ``n`` inside the block and restored after (``None``: leave
    the setting alone). The tensors here are small; on a busy 2-core machine a second thread
    made the bootstrap several times slower (threads waiting on each other), never faster."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interval(samples: Tensor, ci: float) -> tuple[Tensor, Tensor]:
    """Percentile interval over the first axis (replicates), ignoring NaN replicates."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")
    if samples.shape[0] == 0:
        nan = torch.full(samples.shape[1:], torch.nan, dtype=torch.float64)
        return nan, nan.clone()
    alpha = (1.0 - ci) / 2
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    lo_hi = torch.nanquantile(samples.to(torch.float64), q, dim=0)
    return lo_hi[0], lo_hi[1]


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates behind a long table's intervals, row-aligned with the table.

    ``values[row, b]``: the row's statistic on resample ``b`` (NaN where the row has no
    interval); ``sample_set[row]``: a key of the samples that were resampled (a hash of their
    ids). Two rows whose keys agree were resampled with the same indices into the same samples
    (same seed), so their replicates are paired; :func:`change_summary` tests those pairs with
    the paired bootstrap. Concatenate tables and their replicates in the same order
    (:meth:`concat`).
    """

    values: np.ndarray  # [row, n_boot]
    sample_set: np.ndarray  # [row] str

    def __len__(self) -> int:
        return len(self.sample_set)

    @staticmethod
    def concat(parts: Sequence["Replicates"]) -> "Replicates":
        width = max((p.values.shape[1] for p in parts), default=0)
        values = [
            np.pad(p.values, ((0, 0), (0, width - p.values.shape[1])), constant_values=np.nan)
            for p in parts
        ]
        return Replicates(
            np.concatenate(values) if values else np.zeros((0, 0)),
            np.concatenate([p.sample_set for p in parts]) if parts else np.zeros(0, dtype=object),
        )


def sample_key(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class Columns:
    """Accumulates a long table column-wise (fast for many rows), with the rows' bootstrap
    replicates where given."""

    def __init__(self, columns: Sequence[str]):
        self.data: dict[str, list] = {c: [] for c in columns}
        self.boot: list[np.ndarray | int] = []  # [rows, n_boot] arrays, or a count of rows
        self.keys: list[str] = []

    def add(self, boot: Tensor | None = None, sample_set: str = "", **cols) -> None:
        """Append rows: list-valued entries give one row each, scalars repeat. ``boot``:
        ``[n_boot, rows]`` (or ``[n_boot]`` for one row) replicates of the rows' values;
        ``sample_set``: the :func:`sample_key` of the samples they resampled."""
        n = max((len(v) for v in cols.values() if isinstance(v, list)), default=1)
        for name in self.data:
            v = cols[name]
            self.data[name].extend(v if isinstance(v, list) else [v] * n)
        if boot is None:
            self.boot.append(n)
        else:
            b = boot.detach().to(torch.float64).reshape(boot.shape[0], -1).T.numpy()
            if b.shape[0] != n:
                raise ValueError(f"{b.shape[0]} replicate rows for {n} table rows")
            self.boot.append(b)
        self.keys.extend([sample_set] * n)

    def add_all(self, blocks: Iterable[Mapping]) -> "Columns":
        """:meth:`add` each block of rows (a mapping of its keyword arguments); returns self."""
        for block in blocks:
            self.add(**block)
        return self

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.data)

    def replicates(self) -> Replicates:
        width = max((b.shape[1] for b in self.boot if isinstance(b, np.ndarray)), default=0)
        parts = [b if isinstance(b, np.ndarray) else np.full((b, width), np.nan) for b in self.boot]
        values = np.concatenate(parts) if parts else np.zeros((0, width))
        return Replicates(values, np.asarray(self.keys, dtype=object))


def table_result(out: Columns, with_replicates: bool):
    """The table, with its :class:`Replicates` where asked."""
    return (out.frame(), out.replicates()) if with_replicates else out.frame()


def floats(x: Tensor) -> list[float]:
    """The entries of ``x`` as Python floats, flattened."""
    return [float(v) for v in x.reshape(-1).tolist()]


def common_layers(
    steps: Sequence[StepData], layers: Sequence[int] | None, with_vectors: bool
) -> list[int]:
    """``layers`` (default: every layer), checked to be collected at every step (with vectors
    where ``with_vectors``)."""
    avail = set(steps[0].acts.layers)
    for s in steps:
        avail &= set(s.acts.layers)
        if with_vectors:
            avail &= set(s.vectors.layers)
    if layers is None:
        return sorted(avail)
    missing = [layer for layer in layers if layer not in avail]
    if missing:
        raise ValueError(
            f"layers {missing} are not available at every step; available: {sorted(avail)}"
        )
    return list(layers)


def keep_mask(step: StepData, keep_masks: Mapping[int, Tensor] | None, n_labels: int) -> Tensor:
    """``[sample]`` bool: the step's kept samples (``keep_masks[step]``, default all) that have
    a known gold label."""
    gold = step.acts.gold
    known = (gold >= 0) & (gold < n_labels)
    if keep_masks is None:
        return known
    if step.step not in keep_masks:
        raise ValueError(f"keep_masks has no mask for step {step.step}")
    mask = torch.as_tensor(keep_masks[step.step]).bool().cpu()
    if mask.shape != gold.shape:
        raise ValueError(
            f"keep mask of step {step.step} has shape {tuple(mask.shape)}, expected ({len(gold)},)"
        )
    return mask & known
