"""Which samples the cross-step geometry compares, and how much the kept set alone moves it.

With ``filter_mode="self"`` each step builds its vectors from the samples it classifies
correctly, so the kept set changes along the series (a quarter of the samples at a base model,
most of them after fine-tuning is typical), and that change alone moves vector norms, cosines
and within-concept similarities even where the residuals do not move at all. Cross-step claims
are therefore made on one fixed sample set (:data:`COMPARE_SETS`):

- ``"first"`` (the default of ``analyze``): the first step's kept samples (in a run folder the
  base model's) at every step;
- ``"all"``: every sample with a known gold label but the steered prompts, at every step;
- ``"own"``: each step's own kept samples (the samples that built its vectors; the study's
  procedure, and the only choice before this option existed).

:func:`kept_set_effect_frame` is ``value(own kept set) - value(fixed set)`` per geometry row:
what the choice of samples alone contributes (``kept_set_effect.csv``).
"""

from collections.abc import Mapping, Sequence
from dataclasses import replace

import pandas as pd
import torch
from torch import Tensor

from emolens.analysis.steps import StepData
from emolens.measure.vectors import ConceptVectors, count_kept

#: The sample sets cross-step geometry can be computed on (see the module docstring).
COMPARE_SETS: tuple[str, ...] = ("first", "all", "own")
#: Columns identifying a geometry row (``geometry.csv``).
GEOMETRY_KEYS = ("step", "layer", "measure", "emotion", "inner")


def own_masks(steps: Sequence[StepData]) -> dict[int, Tensor]:
    """``{step: [sample] bool}``: the samples that built each step's vectors (every sample with
    a known gold label where a step recorded none)."""
    return {s.step: (s.keep.bool() if s.keep is not None else s.acts.gold >= 0) for s in steps}


def comparison_masks(
    steps: Sequence[StepData], compare_set: str, prompt_ids: Sequence[str] = ()
) -> dict[int, Tensor]:
    """``{step: [sample] bool}``: the samples the cross-step geometry uses at each step.

    ``"first"``: the first step's kept samples at every step; ``"all"``: every sample with a
    known gold label except ``prompt_ids`` (the steered prompts, which never feed a vector);
    ``"own"``: :func:`own_masks`. The fixed sets need every step to hold the same samples in
    the same order (they do in one ``analyze`` run)."""
    if compare_set not in COMPARE_SETS:
        raise ValueError(f"compare set {compare_set!r} unknown; use one of {COMPARE_SETS}")
    if not steps or compare_set == "own":
        return own_masks(steps)
    first = steps[0]
    for s in steps[1:]:
        if s.acts.sample_ids != first.acts.sample_ids:
            raise ValueError(
                f"step {s.step} holds other samples (or another order) than step "
                f"{first.step}, so no fixed sample set spans them; use --compare-set own"
            )
    if compare_set == "first":
        mask = own_masks([first])[first.step]
    else:
        prompts = set(prompt_ids)
        mask = (first.acts.gold >= 0) & torch.tensor(
            [sid not in prompts for sid in first.acts.sample_ids], dtype=torch.bool
        )
    return {s.step: mask.clone() for s in steps}


def _subset(vectors: ConceptVectors, emotions: list[str], counts: Tensor) -> ConceptVectors:
    idx = [vectors.emotions.index(e) for e in emotions]
    return replace(
        vectors,
        vectors=vectors.vectors[:, idx],
        counts=counts,
        emotions=tuple(emotions),
        dropped=tuple(e for e in vectors.emotions if e not in emotions) + vectors.dropped,
    )


def restrict_to_set(
    steps: Sequence[StepData],
    masks: Mapping[int, Tensor],
    labels: Sequence[str],
    neutral: str,
    min_count: int,
) -> tuple[list[StepData], dict[int, tuple[str, ...]]]:
    """The steps with only the emotions that have at least ``min_count`` samples in their
    comparison set (``masks``), and per step the emotions left out for having fewer.

    Raises where the neutral label has fewer than ``min_count`` samples in a set: no vector
    ``mean(h | e) - mean(h | neutral)`` can be formed on it."""
    labels = list(labels)
    u = labels.index(neutral)
    out, dropped = [], {}
    for s in steps:
        counts = count_kept(s.acts.gold.long(), masks[s.step].bool(), len(labels))
        if int(counts[u]) < min_count:
            raise ValueError(
                f"the comparison set of step {s.step} holds {int(counts[u])} {neutral} "
                f"samples, fewer than --min-count {min_count}, so no concept vector can be "
                "compared on it; use --compare-set all (every sample) or own (each step's "
                "kept samples), or lower --min-count"
            )
        keep = [e for e in s.vectors.emotions if int(counts[labels.index(e)]) >= min_count]
        gone = tuple(e for e in s.vectors.emotions if e not in keep)
        if gone:
            dropped[s.step] = gone
        kept_counts = torch.tensor([int(counts[labels.index(e)]) for e in keep], dtype=torch.long)
        out.append(replace(s, vectors=_subset(s.vectors, keep, kept_counts)))
    return out, dropped


def kept_set_effect_frame(
    own: pd.DataFrame,
    fixed: pd.DataFrame,
    *,
    fixed_set: str,
    own_sizes: Mapping[int, int],
    fixed_sizes: Mapping[int, int],
) -> pd.DataFrame:
    """``kept_set_effect.csv``: per geometry row (:data:`GEOMETRY_KEYS`) the value on each
    step's own kept set, on the fixed set (``fixed_set`` names it), and ``kept_set_effect`` =
    own - fixed (how much the kept set alone moves the measure). ``n_own`` / ``n_fixed``: the
    samples in each set at that step. Rows present in only one table (an emotion with too few
    samples in one set) get NaN on the other side."""
    keys = list(GEOMETRY_KEYS)
    a = own[keys + ["value"]].rename(columns={"value": "value_own"})
    b = fixed[keys + ["value"]].rename(columns={"value": "value_fixed"})
    df = a.merge(b, on=keys, how="outer", sort=False)
    df["kept_set_effect"] = df["value_own"] - df["value_fixed"]
    df["fixed_set"] = fixed_set
    df["n_own"] = df["step"].map(own_sizes)
    df["n_fixed"] = df["step"].map(fixed_sizes)
    return df.sort_values(["inner", "layer", "measure", "emotion", "step"], kind="stable")[
        keys + ["value_own", "value_fixed", "kept_set_effect", "fixed_set", "n_own", "n_fixed"]
    ].reset_index(drop=True)


__all__ = [
    "COMPARE_SETS",
    "comparison_masks",
    "kept_set_effect_frame",
    "own_masks",
    "restrict_to_set",
]
