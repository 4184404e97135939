"""Localisation by intervention: at which depth does the answer depend on each emotion's concept
direction?

Two interventions on the residual stream (``blocks.{l}.hook_out``) at each layer ``l`` of
a window of consecutive layers, with ``u_l`` the unit vector of ``directions[l]``:

- :func:`ablate_direction` projects the direction out, ``h <- h - (h . u_l) u_l``, at every
  position or only at the answer position.
- :func:`patch_mean` patches another emotion's mean in along the direction, at the answer
  position: ``h <- h + ((m_l - h) . u_l) u_l``, so the component of ``h`` along ``u_l`` becomes
  that of the source mean ``m_l`` and everything orthogonal to ``u_l`` is kept. Without
  directions the whole answer residual is replaced, ``h <- m_l`` (over a window of layers only
  the last one then matters: it overwrites what the earlier ones did at that position).

Both are idempotent (applying one twice is applying it once), so a window of layers does not
compound the edit the way adding a vector at each of them would. Rows whose direction is zero
are left untouched.

:func:`window_sweep` slides windows of ``window`` consecutive layers over the whole depth and
records, per window, how the gold label's first-token logit, the gold-vs-rest margin and the
classification accuracy (argmax over the label first-token logits) change when, along each
sample's own emotion direction (``vectors.layer(l)[gold]``), its residual is set to the mean
over all given samples (``mode="mean"``, the default: mean ablation, which keeps the residual
on the data manifold), removed (``"ablate"``, zero ablation), or set to the mean of a source
emotion (``"patch"``, default the neutral label). The same intervention along a few seeded
random unit directions is the control (``control_*`` columns): a drop well above it is
specific to the concept direction. Samples without a concept vector (neutral, dropped labels,
unknown gold) are skipped and counted.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from emolens.data.labels import STUDY_LABELS, LabelSet
from emolens.data.tokens import last_token_index, pad, pad_id
from emolens.measure.activations import answer_readout, bridge_of, run_to_answer_rows
from emolens.measure.vectors import ConceptVectors
from emolens.model import hooks
from emolens.model.loading import Model

Positions = Literal["all", "answer"]
Mode = Literal["mean", "ablate", "patch"]
MODES: tuple[str, ...] = ("mean", "ablate", "patch")


def unit_directions(directions: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
    """Each vector scaled to unit norm (float32); zero vectors stay zero."""
    d = directions.float()
    norms = d.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, d / norms.clamp_min(1e-30), torch.zeros_like(d))


def _layer_list(bridge, layers: Sequence[int], n_rows: int, what: str) -> list[int]:
    layers = hooks.check_layers(list(layers), int(bridge.cfg.n_layers))
    if len(layers) != n_rows:
        raise ValueError(f"{n_rows} {what} for {len(layers)} layers {layers}")
    return layers


def _rows_for(tensor: Tensor, per_layer: Tensor, hook_name: str) -> Tensor:
    """``per_layer`` ([d_model] or [batch, d_model]) on the hooked tensor's device, checked
    against its batch size."""
    if per_layer.dim() == 2 and per_layer.shape[0] != tensor.shape[0]:
        raise ValueError(
            f"{per_layer.shape[0]} rows of directions for a batch of "
            f"{tensor.shape[0]} rows at {hook_name}"
        )
    return per_layer.to(tensor.device)


@contextmanager
def ablate_direction(
    bridge,
    layers: Sequence[int],
    directions: Float[Tensor, "layer d_model"] | Float[Tensor, "layer sample d_model"],
    positions: Positions = "all",
    answer_index: Int[Tensor, " sample"] | None = None,
) -> Iterator[None]:
    """Project ``directions[i]`` out of ``blocks.{layers[i]}.hook_out`` for the forward
    passes inside the ``with`` block: ``h <- h - (h . u) u`` with ``u`` the unit direction.

    ``directions`` is ``[layer, d_model]`` (the same for every row) or ``[layer, sample,
    d_model]`` (one per batch row, e.g. each sample's own emotion); a zero direction leaves its
    row untouched. ``positions="answer"`` edits only ``answer_index[row]``. The computation
    runs in float32; the hooks are removed on exit, also on errors.
    """
    if positions not in ("all", "answer"):
        raise ValueError(f"positions must be 'all' or 'answer', not {positions!r}")
    if positions == "answer" and answer_index is None:
        raise ValueError("positions='answer' needs answer_index (the answer position per row)")
    bridge = bridge_of(bridge)
    layers = _layer_list(bridge, layers, directions.shape[0], "directions")
    units = unit_directions(directions)

    def make_hook(u_layer: Tensor, name: str):
        def hook_fn(tensor, *, hook):
            u = _rows_for(tensor, u_layer, name)
            if positions == "all":
                u = u[:, None, :] if u.dim() == 2 else u
                h = tensor.float()
                return (h - (h * u).sum(-1, keepdim=True) * u).to(tensor.dtype)
            rows = torch.arange(tensor.shape[0], device=tensor.device)
            index = answer_index.to(tensor.device)
            h = tensor[rows, index].float()
            out = tensor.clone()
            out[rows, index] = (h - (h * u).sum(-1, keepdim=True) * u).to(tensor.dtype)
            return out

        return hook_fn

    names = [hooks.resid_post(layer) for layer in layers]
    with bridge.hooks(
        fwd_hooks=[(name, make_hook(units[i], name)) for i, name in enumerate(names)]
    ):
        yield


@contextmanager
def patch_mean(
    bridge,
    layers: Sequence[int],
    source_means: Float[Tensor, "layer d_model"] | Float[Tensor, "layer sample d_model"],
    *,
    answer_index: Int[Tensor, " sample"],
    directions: Float[Tensor, "layer d_model"]
    | Float[Tensor, "layer sample d_model"]
    | None = None,
) -> Iterator[None]:
    """Patch a source mean into ``blocks.{layers[i]}.hook_out`` at the answer position
    ``answer_index[row]`` for the forward passes inside the ``with`` block.

    With ``directions``: ``h <- h + ((m - h) . u) u``, ``u`` the unit ``directions[i]`` and
    ``m`` = ``source_means[i]``: the component along ``u`` becomes the source mean's, the rest
    of ``h`` is kept (a zero direction leaves its row untouched). Without: ``h <- m``, the
    whole answer residual replaced. Either argument is ``[layer, d_model]`` (every row alike)
    or ``[layer, sample, d_model]`` (one per batch row). Hooks are removed on exit.
    """
    bridge = bridge_of(bridge)
    layers = _layer_list(bridge, layers, source_means.shape[0], "source means")
    means = source_means.float()
    units = None
    if directions is not None:
        if directions.shape[0] != means.shape[0]:
            raise ValueError(
                f"{directions.shape[0]} layers of directions for "
                f"{means.shape[0]} layers of source means"
            )
        units = unit_directions(directions)

    def make_hook(i: int, name: str):
        def hook_fn(tensor, *, hook):
            rows = torch.arange(tensor.shape[0], device=tensor.device)
            index = answer_index.to(tensor.device)
            h = tensor[rows, index].float()
            m = _rows_for(tensor, means[i], name).expand_as(h)
            if units is None:
                new = m
            else:
                u = _rows_for(tensor, units[i], name).expand_as(h)
                new = h + ((m - h) * u).sum(-1, keepdim=True) * u
            out = tensor.clone()
            out[rows, index] = new.to(tensor.dtype)
            return out

        return hook_fn

    names = [hooks.resid_post(layer) for layer in layers]
    with bridge.hooks(fwd_hooks=[(name, make_hook(i, name)) for i, name in enumerate(names)]):
        yield


# --------------------------------------------------------------------------- batched runs


def _batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def answer_residuals(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_size: int = 8,
    padding_side: str = "right",
) -> dict[int, Float[Tensor, "sample d_model"]]:
    """Unedited answer-position residuals after each block in ``layers``, per prompt."""
    bridge = bridge_of(model)
    layers = sorted(set(hooks.check_layers(list(layers), int(bridge.cfg.n_layers))))
    pid = pad_id(getattr(model, "tokenizer", None) or bridge.tokenizer)
    d_model = int(bridge.cfg.d_model)
    out = {layer: torch.zeros(len(token_ids), d_model) for layer in layers}
    for batch in _batches(token_ids, batch_size):
        ids, mask = pad([token_ids[i] for i in batch], pid, padding_side)
        rows = run_to_answer_rows(bridge, ids, mask, layers)
        for layer in layers:
            out[layer][batch] = rows[layer]
    return out


@torch.no_grad()
def intervened_label_logits(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    layers: Sequence[int],
    label_token_ids: Sequence[int],
    directions: Float[Tensor, "layer sample d_model"],
    *,
    mode: Mode = "ablate",
    source_means: Float[Tensor, "layer sample d_model"] | None = None,
    positions: Positions = "answer",
    batch_size: int = 8,
    padding_side: str = "right",
) -> Float[Tensor, "sample label"]:
    """Label first-token logits at the answer position of each prompt with an intervention at
    ``layers``: ``mode="ablate"`` (:func:`ablate_direction` of ``directions[:, sample]`` at
    ``positions``) or ``"mean"``/``"patch"`` (:func:`patch_mean` of ``source_means[:, sample]``
    along ``directions[:, sample]``, answer position only; the two differ only in the means
    :func:`window_sweep` passes).

    Prompts run in batches of similar length, each row with its own directions; every pass
    stops after the last block and the logits come from :func:`answer_readout`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode != "ablate" and source_means is None:
        raise ValueError(f"mode={mode!r} needs source_means")
    if mode != "ablate" and positions != "answer":
        raise ValueError(f"mode={mode!r} edits the answer position only (positions='answer')")
    n = len(token_ids)
    if directions.shape[1] != n:
        raise ValueError(f"directions for {directions.shape[1]} samples, {n} prompts given")
    bridge = bridge_of(model)
    last = int(bridge.cfg.n_layers) - 1
    pid = pad_id(getattr(model, "tokenizer", None) or bridge.tokenizer)
    final = torch.zeros(n, int(bridge.cfg.d_model))
    for batch in _batches(token_ids, batch_size):
        ids, mask = pad([token_ids[i] for i in batch], pid, padding_side)
        answer = last_token_index(mask)
        if mode == "ablate":
            edit = ablate_direction(bridge, layers, directions[:, batch], positions, answer)
        else:
            assert source_means is not None  # mode "mean"/"patch" without them is refused above
            edit = patch_mean(
                bridge,
                layers,
                source_means[:, batch],
                answer_index=answer,
                directions=directions[:, batch],
            )
        with edit:
            final[batch] = run_to_answer_rows(bridge, ids, mask, [last])[last]
    return answer_readout(bridge, final, label_token_ids)[0]


# --------------------------------------------------------------------------- the sweep


def sweep_windows(n_layers: int, window: int, stride: int = 1) -> list[tuple[int, int]]:
    """``(start, end)`` (inclusive) of windows of ``window`` consecutive layers every ``stride``
    layers; the last window always ends at the final layer, so the windows cover the depth."""
    if not 1 <= window <= n_layers:
        raise ValueError(
            f"window must be between 1 and the number of layers ({n_layers}), not {window}"
        )
    if stride < 1:
        raise ValueError("stride must be at least 1")
    starts = list(range(0, n_layers - window + 1, stride))
    if starts[-1] != n_layers - window:
        starts.append(n_layers - window)
    return [(s, s + window - 1) for s in starts]


def _label_names(
    vectors: ConceptVectors, label_names: Sequence[str] | None, n_labels: int
) -> list[str]:
    if label_names is not None:
        names = [str(n) for n in label_names]
    elif "labels" in vectors.meta:
        names = LabelSet.from_dict(vectors.meta["labels"]).names("en")
    else:
        names = STUDY_LABELS.names("en")
    if len(names) != n_labels:
        raise ValueError(
            f"{len(names)} label names for {n_labels} label tokens; pass "
            "label_names in the order of label_token_ids"
        )
    return names


def _margin(
    logits: Float[Tensor, "sample label"], gold: Int[Tensor, " sample"]
) -> Float[Tensor, " sample"]:
    """Gold label logit minus the largest other label logit."""
    rows = torch.arange(len(gold))
    others = logits.clone()
    others[rows, gold] = -torch.inf
    return logits[rows, gold] - others.max(dim=-1).values


@torch.no_grad()
def window_sweep(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    gold: Int[Tensor, " sample"] | Sequence[int],
    label_token_ids: Sequence[int],
    vectors: ConceptVectors,
    window: int,
    stride: int = 1,
    mode: Mode = "mean",
    batch_size: int = 8,
    *,
    positions: Positions = "answer",
    source: str | None = None,
    label_names: Sequence[str] | None = None,
    padding_side: str = "right",
    progress: bool = True,
    n_control: int = 3,
    control_seed: int = 0,
) -> pd.DataFrame:
    """Remove (or patch) each sample's own emotion direction over sliding windows of layers and
    record what happens to its answer, one row per window.

    ``gold`` indexes the labels of ``label_token_ids`` (named by ``label_names``, by default
    the label set stored with ``vectors``, else the study's). A sample whose gold label has a
    concept vector gets, at each layer ``l`` of the window, the direction
    ``vectors.layer(l)[own emotion]``; the others (neutral, dropped labels, unknown gold) are
    skipped and counted in ``n_skipped``. Windows of ``window`` consecutive layers start every
    ``stride`` layers (:func:`sweep_windows`); ``vectors`` must exist at every layer.

    ``mode="mean"`` (default): at the answer position, set the component of the residual along
    the own direction to the mean component over the reference set, every given sample
    (skipped ones included), at that layer: ``h <- h + ((m_l - h) . u) u`` with ``m_l`` the mean
    clean answer residual; a direction along which all samples agree is left as it is.
    ``mode="ablate"``: project the direction out at ``positions`` (default the answer position,
    where the concept vectors were measured; ``"all"`` also removes it from the prompt tokens).
    ``mode="patch"``: at the answer position, set the component along the contrast direction
    ``v_source(l) - v_own(l)`` (``v_neutral = 0``; with the default source, the neutral label,
    it is the own direction) to that of the source label's mean answer residual at ``l``,
    the mean over the given samples of that gold label, correct or not (so the source label
    must be among them); samples of the source label are skipped.

    Control: ``n_control`` random unit directions per layer (isotropic, seeded by
    ``control_seed``, one shared by every sample) take the place of each sample's direction in
    the same intervention (same mode, positions and means).

    Columns: ``start_layer``, ``end_layer`` (inclusive), ``gold_logit_drop`` (mean over samples
    of the gold logit before minus after), ``margin_drop`` (same for the gold-vs-rest margin,
    the gold logit minus the largest other label logit), ``accuracy_before``,
    ``accuracy_after`` (argmax over the label first-token logits is gold), ``gold_logit_before``
    (mean), ``n_samples``, ``n_skipped``, ``mode``, ``positions``, ``source``, and for the
    control ``control_gold_logit_drop_mean`` / ``_max`` (mean and largest over the random
    directions of the mean gold-logit drop), ``control_margin_drop_mean``,
    ``control_accuracy_after_mean`` and ``n_control`` (NaN without control directions).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if n_control < 0:
        raise ValueError(f"n_control must be 0 or more, not {n_control}")
    if mode != "ablate" and positions != "answer":
        raise ValueError(f"mode={mode!r} edits the answer position only (positions='answer')")
    bridge = bridge_of(model)
    n_layers = int(bridge.cfg.n_layers)
    windows = sweep_windows(n_layers, window, stride)
    missing = sorted(set(range(n_layers)) - set(vectors.layers))
    if missing:
        raise ValueError(
            f"the concept vectors lack layers {missing}; the sweep covers the whole "
            "depth: build them from activations at every layer (layers='all')"
        )
    n = len(token_ids)
    gold_t = torch.as_tensor(gold, dtype=torch.long)
    if gold_t.shape != (n,):
        raise ValueError(f"gold has shape {tuple(gold_t.shape)}, expected ({n},)")
    names = _label_names(vectors, label_names, len(label_token_ids))
    if mode == "patch":
        source = vectors.neutral if source is None else source
        if source not in names:
            raise ValueError(f"source label {source!r} is not among the labels {names}")
        if source != vectors.neutral and source not in vectors.emotions:
            raise ValueError(f"source label {source!r} has no concept vector")
    elif source is not None:
        raise ValueError("source is used by mode='patch' only")

    # each sample's own emotion (index into vectors.emotions) or -1 when it is skipped
    own = torch.as_tensor(
        [
            vectors.emotions.index(names[g])
            if 0 <= g < len(names) and names[g] in vectors.emotions and names[g] != source
            else -1
            for g in gold_t.tolist()
        ],
        dtype=torch.long,
    )
    used = (own >= 0).nonzero().flatten()
    if len(used) == 0:
        raise ValueError("no sample has a gold label with a concept vector to intervene on")
    used_ids = [token_ids[i] for i in used.tolist()]
    used_gold, used_own = gold_t[used], own[used]
    all_layers = list(range(n_layers))
    vec = torch.stack([vectors.layer(layer) for layer in all_layers]).float()  # [layer, e, d]
    own_dirs = vec[:, used_own]  # [layer, sample, d]

    every = mode != "ablate"  # the means need every sample's residual at every layer
    clean_rows = answer_residuals(
        model,
        token_ids if every else used_ids,
        all_layers if every else [n_layers - 1],
        batch_size=batch_size,
        padding_side=padding_side,
    )
    if mode == "patch":
        assert source is not None  # the patch mode's source label was set above
        src_rows = (gold_t == names.index(source)).nonzero().flatten()
        if len(src_rows) == 0:
            raise ValueError(
                f"no sample has the source label {source!r}: its mean residual cannot be formed"
            )
        src_mean = torch.stack([clean_rows[layer][src_rows].mean(0) for layer in all_layers])
        v_src = (
            torch.zeros_like(vec[:, 0])
            if source == vectors.neutral
            else vec[:, vectors.emotions.index(source)]
        )
        directions = v_src[:, None] - own_dirs
        means = src_mean[:, None].expand_as(directions)
        final = clean_rows[n_layers - 1][used]
    elif mode == "mean":
        ref_mean = torch.stack([clean_rows[layer].mean(0) for layer in all_layers])
        directions = own_dirs
        means = ref_mean[:, None].expand_as(directions)
        final = clean_rows[n_layers - 1][used]
    else:
        directions, means = own_dirs, None
        final = clean_rows[n_layers - 1]
    gen = torch.Generator().manual_seed(control_seed)
    controls = unit_directions(
        torch.randn(n_control, n_layers, int(bridge.cfg.d_model), generator=gen)
    )
    before = answer_readout(bridge, final, label_token_ids)[0]
    rows_idx = torch.arange(len(used))
    gold_before = before[rows_idx, used_gold]
    margin_before = _margin(before, used_gold)
    acc_before = float((before.argmax(-1) == used_gold).float().mean())

    def run(dirs: Tensor, start: int, end: int) -> Tensor:
        return intervened_label_logits(
            model,
            used_ids,
            list(range(start, end + 1)),
            label_token_ids,
            dirs[start : end + 1],
            mode=mode,
            source_means=None if means is None else means[start : end + 1],
            positions=positions,
            batch_size=batch_size,
            padding_side=padding_side,
        )

    def drops(after: Tensor) -> tuple[float, float, float]:
        """Mean gold-logit drop, mean margin drop and accuracy after an intervention."""
        return (
            float((gold_before - after[rows_idx, used_gold]).mean()),
            float((margin_before - _margin(after, used_gold)).mean()),
            float((after.argmax(-1) == used_gold).float().mean()),
        )

    records = []
    for start, end in tqdm(windows, desc=f"{mode} windows", disable=not progress, leave=False):
        after = run(directions, start, end)
        control = torch.tensor(
            [drops(run(c[:, None].expand_as(directions), start, end)) for c in controls],
            dtype=torch.float64,
        ).reshape(-1, 3)
        nan = float("nan")
        records.append(
            {
                "start_layer": start,
                "end_layer": end,
                "gold_logit_drop": float((gold_before - after[rows_idx, used_gold]).mean()),
                "margin_drop": float((margin_before - _margin(after, used_gold)).mean()),
                "accuracy_before": acc_before,
                "accuracy_after": float((after.argmax(-1) == used_gold).float().mean()),
                "gold_logit_before": float(gold_before.mean()),
                "n_samples": len(used),
                "n_skipped": n - len(used),
                "mode": mode,
                "positions": positions,
                "source": source or "",
                "control_gold_logit_drop_mean": float(control[:, 0].mean()) if n_control else nan,
                "control_gold_logit_drop_max": float(control[:, 0].max()) if n_control else nan,
                "control_margin_drop_mean": float(control[:, 1].mean()) if n_control else nan,
                "control_accuracy_after_mean": float(control[:, 2].mean()) if n_control else nan,
                "n_control": n_control,
            }
        )
    return pd.DataFrame.from_records(records)
