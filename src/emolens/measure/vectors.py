"""Filtering by correctness and emotion concept vectors (equation 2 of the study).

``v_e = mean(h | label e, kept) - mean(h | neutral, kept)`` per layer, from the answer-position
residuals of :class:`~emolens.measure.activations.Activations`. Which samples are kept is decided by
:func:`keep_mask`: each checkpoint itself (``"self"``, the default), the base model (``"base"``)
or only the samples every step gets right (``"all"``).
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from emolens.data.labels import LabelSet
from emolens.measure.activations import Activations, load_artifact, save_artifact
from emolens.model import hooks

FilterMode = Literal["self", "base", "all", "none"]
#: Who decides that a sample feeds the vectors; ``none`` keeps every sample (no filtering).
FILTER_MODES: tuple[str, ...] = ("self", "base", "all", "none")


class DroppedLabelWarning(UserWarning):
    """A label kept too few samples to get a concept vector and was left out."""


def filter_correct(acts: Activations) -> Bool[Tensor, " sample"]:
    """Samples whose argmax over the label first-token logits is the gold label."""
    return acts.correct


def _aligned(reference: Activations, other: Activations, what: str) -> None:
    if other.sample_ids != reference.sample_ids:
        raise ValueError(
            f"the {what} activations hold different samples (or another order) "
            "than this checkpoint's; collect them on the same prompts"
        )


def keep_mask(
    mode: FilterMode | str,
    own: Activations,
    base: Activations | None = None,
    all_steps: Sequence[Activations | Bool[Tensor, " sample"]] | None = None,
) -> Bool[Tensor, " sample"]:
    """Which samples of ``own`` feed its concept vectors.

    ``"self"``: those ``own`` classifies correctly; ``"base"``: those the base model classifies
    correctly (``base`` needed); ``"all"``: those correct at every step (``all_steps``: each
    step's :class:`Activations` or correctness mask, same samples in the same order);
    ``"none"``: every sample.
    """
    if mode == "none":
        return torch.ones(own.n_samples, dtype=torch.bool)
    if mode == "self":
        return filter_correct(own)
    if mode == "base":
        if base is None:
            raise ValueError("filter mode 'base' needs the base model's activations")
        _aligned(own, base, "base model's")
        return filter_correct(base)
    if mode == "all":
        if not all_steps:
            raise ValueError("filter mode 'all' needs the correctness of every step")
        keep = torch.ones(own.n_samples, dtype=torch.bool)
        for step in all_steps:
            if isinstance(step, Activations):
                _aligned(own, step, "other step's")
                step = filter_correct(step)
            if step.shape != keep.shape:
                raise ValueError(
                    f"a step's mask has shape {tuple(step.shape)}, expected ({own.n_samples},)"
                )
            keep &= step.bool()
        return keep
    raise ValueError(f"unknown filter mode {mode!r}; choose one of {', '.join(FILTER_MODES)}")


def count_kept(
    gold: Int[Tensor, " sample"], keep: Bool[Tensor, " sample"], n_labels: int
) -> Int[Tensor, " label"]:
    """Kept samples per gold label (samples with unknown gold, -1, are not counted)."""
    known = keep & (gold >= 0)
    return torch.bincount(gold[known], minlength=n_labels)[:n_labels]


@dataclass(frozen=True)
class ConceptVectors:
    """Concept vectors ``vectors[layer, emotion]`` = emotion mean - neutral mean.

    ``emotions`` are the English names of the labels that have a vector (neutral excluded,
    dropped labels excluded, label-set order); ``counts`` their kept samples; ``dropped`` the
    labels left out for having fewer than ``min_count`` kept samples.
    """

    vectors: Float[Tensor, "layer emotion d_model"]
    counts: Int[Tensor, " emotion"]
    emotions: tuple[str, ...]
    layers: tuple[int, ...]
    neutral: str = "no-emotion"
    neutral_count: int = 0
    dropped: tuple[str, ...] = ()
    min_count: int = 3
    meta: dict = field(default_factory=dict)

    FILE_STEM = "vectors"

    def __post_init__(self) -> None:
        if len(self.emotions) != self.vectors.shape[1]:
            raise ValueError(
                f"{len(self.emotions)} emotion names for {self.vectors.shape[1]} vectors"
            )
        if len(self.layers) != self.vectors.shape[0]:
            raise ValueError(f"{len(self.layers)} layers for {self.vectors.shape[0]} rows")

    @property
    def norms(self) -> Float[Tensor, "layer emotion"]:
        return self.vectors.norm(dim=-1)

    def layer(self, layer: int) -> Float[Tensor, "emotion d_model"]:
        if layer not in self.layers:
            raise KeyError(f"no vectors at layer {layer}; layers: {self.layers}")
        return self.vectors[self.layers.index(layer)]

    def unit(self) -> "ConceptVectors":
        """The same vectors scaled to unit norm (zero vectors stay zero)."""
        norms = self.norms[..., None]
        scaled = torch.where(norms > 0, self.vectors / norms.clamp_min(1e-30), self.vectors)
        return ConceptVectors(
            scaled,
            self.counts,
            self.emotions,
            self.layers,
            self.neutral,
            self.neutral_count,
            self.dropped,
            self.min_count,
            {**self.meta, "unit_norm": True},
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``vectors.safetensors`` (vectors, counts, norms) and ``vectors.json``."""
        meta = {
            "emotions": list(self.emotions),
            "layers": list(self.layers),
            "hook_names": [
                hooks.read_hook(layer, self.meta["n_layers"], self.meta["read_point"])
                if "read_point" in self.meta
                else hooks.resid_post(layer)
                for layer in self.layers
            ],
            "neutral": self.neutral,
            "neutral_count": self.neutral_count,
            "dropped": list(self.dropped),
            "min_count": self.min_count,
            "meta": self.meta,
            "definition": "mean(resid_post | label e, kept) - mean(resid_post | neutral, "
            "kept) at the answer position",
        }
        return save_artifact(
            directory,
            self.FILE_STEM,
            {"vectors": self.vectors, "counts": self.counts, "norms": self.norms},
            meta,
        )

    @classmethod
    def load(cls, directory: str | Path) -> "ConceptVectors":
        t, m = load_artifact(directory, cls.FILE_STEM)
        return cls(
            t["vectors"],
            t["counts"],
            tuple(m["emotions"]),
            tuple(m["layers"]),
            m["neutral"],
            int(m["neutral_count"]),
            tuple(m["dropped"]),
            int(m["min_count"]),
            m.get("meta", {}),
        )


def concept_vectors(
    acts: Activations, keep: Bool[Tensor, " sample"], labels: LabelSet, min_count: int = 3
) -> ConceptVectors:
    """Equation (2) at every collected layer, from the kept samples of ``acts``.

    ``acts.gold`` indexes ``labels``. A non-neutral label with fewer than ``min_count`` kept
    samples gets no vector and a :class:`DroppedLabelWarning` naming it; too few neutral
    samples raise ``ValueError`` (no vector can be formed at all).
    """
    if keep.shape != (acts.n_samples,):
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected ({acts.n_samples},)")
    if min_count < 1:
        raise ValueError("min_count must be at least 1")
    if acts.gold.numel() and int(acts.gold.max()) >= len(labels):
        raise ValueError(
            f"gold label index {int(acts.gold.max())} is outside the label set "
            f"of {len(labels)} labels"
        )
    counts = count_kept(acts.gold, keep, len(labels))
    neutral = labels.neutral_index
    if int(counts[neutral]) < min_count:
        raise ValueError(
            f"only {int(counts[neutral])} kept samples have the neutral label "
            f"{labels.neutral.en!r} ({labels.neutral.ja}), fewer than min_count={min_count}: "
            "no concept vector can be formed. Use more neutral samples, another filter mode "
            "(e.g. 'base'), or a lower min_count."
        )
    chosen, dropped = [], []
    for j, emotion in enumerate(labels):
        if j == neutral:
            continue
        if int(counts[j]) >= min_count:
            chosen.append(j)
        else:
            dropped.append(emotion.en)
            warnings.warn(
                f"label {emotion.en!r} ({emotion.ja}) has {int(counts[j])} kept samples, fewer "
                f"than min_count={min_count}: it gets no concept vector and drops out",
                DroppedLabelWarning,
                stacklevel=2,
            )
    known = keep & (acts.gold >= 0)
    onehot = torch.zeros(acts.n_samples, len(labels), dtype=torch.float64)
    onehot[known.nonzero().flatten(), acts.gold[known]] = 1.0
    sums = torch.einsum("sk,sld->lkd", onehot, acts.resid.double())
    means = sums / counts.clamp_min(1).double()[None, :, None]
    idx = torch.as_tensor(chosen, dtype=torch.long)
    vectors = (means[:, idx] - means[:, neutral : neutral + 1]).float()
    names = tuple(labels.emotions[j].en for j in chosen)
    return ConceptVectors(
        vectors,
        counts[idx].clone(),
        names,
        acts.layers,
        labels.neutral.en,
        int(counts[neutral]),
        tuple(dropped),
        min_count,
        {"labels": labels.to_dict(), **_read_point_meta(acts)},
    )


def _read_point_meta(acts: Activations) -> dict:
    """The activations' read point (and depth) where it is not the default ``"block-out"``."""
    if acts.read_point == "block-out":
        return {}
    return {"read_point": acts.read_point, "n_layers": acts.meta.get("n_layers")}
