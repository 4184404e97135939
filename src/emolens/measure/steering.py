"""Steering with concept vectors (equation 1) and steering sensitivity (Figure 2).

``h_new = h + alpha * v`` at a hook (by default the final block output), at every position or
only at the answer position. Sensitivity is the change, steered minus unsteered, of each
label's first-token logit at the answer position, for every (steered emotion, alpha, prompt,
observed label), with the log-probability change and the shift-invariant change of the logit
minus the mean logit over the vocabulary (:class:`SteeringEffect`).

Three ways to compute it, all with the same result:

- :func:`final_layer_sensitivity`: at the final block, no forward pass at all; the model's own
  ``ln_final`` and ``unembed`` are applied to ``h + alpha * v`` for every configuration. At the
  ``"final-norm"`` read point (``h`` the final norm's output, ``alpha * v`` added after it) the
  logits are ``unembed(h + alpha * v)``, exactly linear in alpha (but for soft-capping).
- :func:`layer_sensitivity`: at any layer, with many (emotion, alpha) configurations riding in
  the batch dimension of each hooked forward pass (one steering vector per batch row).
- :func:`layer_sensitivity_cached`: at any layer, steering the answer position only: each
  prompt but its last token runs once, and every configuration then costs one token, run on
  copies of the prompt's key/value cache.
- :func:`naive_sensitivity`: the obvious reference, one hooked forward pass per (emotion,
  alpha, prompt); for tests and benchmarks.
"""

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from emolens.data.tokens import last_token_index, pad, pad_id
from emolens.measure.activations import (
    answer_readout,
    bridge_of,
    default_chunk_rows,
    input_device,
    load_artifact,
    logit_softcap,
    numerics_mode,
    readout_modules,
    run_to_answer_rows,
    save_artifact,
)
from emolens.model import hooks
from emolens.model.loading import Model

if TYPE_CHECKING:
    from transformers import DynamicCache

Positions = Literal["all", "answer"]
POSITIONS: tuple[str, ...] = ("all", "answer")

#: The default steering strengths: a handful from 0 to 8.
DEFAULT_ALPHAS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)


def alphas_from_norm_multiples(
    multiples: Float[Tensor, " alpha"] | Sequence[float | int], resid_norm_mean: float
) -> Float[Tensor, " alpha"]:
    """Steering strengths as multiples of the mean residual norm at the steered layer.

    Use them with unit-norm vectors (:meth:`emolens.measure.vectors.ConceptVectors.unit`): the added
    vector ``alpha * v`` then has norm ``multiple * resid_norm_mean`` (e.g. from
    :meth:`emolens.measure.activations.Activations.mean_norm`).
    """
    if resid_norm_mean <= 0:
        raise ValueError(f"the mean residual norm must be positive, not {resid_norm_mean}")
    return torch.as_tensor(multiples, dtype=torch.float32) * float(resid_norm_mean)


ALPHA_UNITS: tuple[str, ...] = ("absolute", "norm")


def steering_vectors(
    vectors: Float[Tensor, "emotion d_model"], alpha_unit: str, resid_norm_mean: float
) -> Float[Tensor, "emotion d_model"]:
    """The vectors that ``alpha`` multiplies in ``h + alpha * vector``, for an alpha unit.

    ``"absolute"``: the concept vectors themselves. ``"norm"``: each rescaled to the mean
    residual norm at the steered layer (``v / |v| * resid_norm_mean``, e.g. from
    :meth:`emolens.measure.activations.Activations.mean_norm` of the steered model), so ``alpha``
    is a
    multiple of the typical residual norm. Every table that steers (sensitivity, attribution,
    transfer, random baseline) takes its vectors from here.
    """
    if alpha_unit not in ALPHA_UNITS:
        raise ValueError(f"alpha_unit must be one of {ALPHA_UNITS}, not {alpha_unit!r}")
    if alpha_unit == "absolute":
        return vectors
    if not resid_norm_mean > 0:
        raise ValueError(f"the mean residual norm must be positive, not {resid_norm_mean}")
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12) * resid_norm_mean


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, not {positions!r}")


@contextmanager
def steer(
    bridge,
    hook_name: str,
    vector: Float[Tensor, "*rows d_model"],
    alpha: float | Float[Tensor, "*alpha_rows"] = 1.0,
    positions: Positions = "all",
    answer_index: Int[Tensor, " batch"] | None = None,
) -> Iterator[None]:
    """Add ``alpha * vector`` at ``hook_name`` of ``bridge`` (a bridge or a ``LoadedModel``)
    for the forward passes inside the ``with`` block.

    ``vector`` is ``[d_model]`` (the same for every row) or ``[batch, d_model]`` (one per batch
    row, so many configurations ride in one batch); ``alpha`` a number or one per row.
    ``positions="answer"`` steers only at ``answer_index[row]`` (e.g. from
    :func:`emolens.data.tokens.last_token_index`). The hook is removed on exit, also on errors.
    """
    _check_positions(positions)
    bridge = bridge_of(bridge)
    alpha_t = torch.as_tensor(alpha, dtype=torch.float32, device=vector.device)
    delta = vector.float() * (alpha_t[..., None] if alpha_t.dim() else alpha_t)
    if positions == "answer" and answer_index is None:
        raise ValueError("positions='answer' needs answer_index (the answer position per row)")

    def hook_fn(tensor, *, hook):
        d = delta.to(device=tensor.device, dtype=tensor.dtype)
        if d.dim() == 2 and d.shape[0] != tensor.shape[0]:
            raise ValueError(
                f"{d.shape[0]} steering vectors for a batch of {tensor.shape[0]} "
                f"rows at {hook_name}"
            )
        if positions == "all":
            return tensor + (d[:, None, :] if d.dim() == 2 else d)
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        index = answer_index.to(tensor.device)
        out = tensor.clone()
        out[rows, index] = out[rows, index] + d
        return out

    with bridge.hooks(fwd_hooks=[(hook_name, hook_fn)]):
        yield


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SteeringEffect:
    """Steered minus unsteered answer-position quantities, ``[emotion, alpha, prompt, label]``.

    ``emotion`` is the steered concept, ``label`` the observed label's first token.
    ``logit_change`` is the change of the label logit; ``logprob_change`` of its
    log-probability; ``centered_change`` of the logit minus the mean logit over the vocabulary
    (invariant to a shift of all logits, so the numerics mode cannot fake a trend).
    """

    logit_change: Float[Tensor, "emotion alpha prompt label"]
    logprob_change: Float[Tensor, "emotion alpha prompt label"]
    centered_change: Float[Tensor, "emotion alpha prompt label"]
    base_label_logits: Float[Tensor, "prompt label"]
    alphas: Float[Tensor, " alpha"]
    emotions: tuple[str, ...]
    labels: tuple[str, ...]
    prompt_ids: tuple[str, ...]
    layer: int
    hook_name: str
    positions: str = "all"
    method: str = ""
    meta: dict = field(default_factory=dict)

    FILE_STEM = "steering"

    def __post_init__(self) -> None:
        e, a, p, k = self.logit_change.shape
        if (len(self.emotions), len(self.prompt_ids), len(self.labels)) != (e, p, k):
            raise ValueError(
                f"axes names ({len(self.emotions)} emotions, {len(self.prompt_ids)}"
                f" prompts, {len(self.labels)} labels) do not match the tensors "
                f"{tuple(self.logit_change.shape)}"
            )

    def diagonal(self, quantity: str = "logit_change") -> Float[Tensor, "emotion alpha prompt"]:
        """The change of each steered emotion's own label (Figure 2's quantity)."""
        missing = [e for e in self.emotions if e not in self.labels]
        if missing:
            raise KeyError(f"steered emotions {missing} are not among the observed labels")
        idx = torch.as_tensor([self.labels.index(e) for e in self.emotions])
        values = getattr(self, quantity)
        return values[torch.arange(len(self.emotions)), :, :, idx]

    def to_frame(self, **constants):
        """Long format, one row per (emotion, label, alpha, prompt); ``constants`` (e.g.
        ``step=300``) become leading columns."""
        import pandas as pd

        e, a, p, k = self.logit_change.shape
        grid = torch.cartesian_prod(*(torch.arange(n) for n in (e, a, p, k)))
        frame = pd.DataFrame(
            {
                "layer": self.layer,
                "emotion": [self.emotions[i] for i in grid[:, 0].tolist()],
                "label": [self.labels[i] for i in grid[:, 3].tolist()],
                "alpha": self.alphas[grid[:, 1]].numpy(),
                "prompt": [self.prompt_ids[i] for i in grid[:, 2].tolist()],
                "logit_change": self.logit_change.flatten().numpy(),
                "logprob_change": self.logprob_change.flatten().numpy(),
                "centered_change": self.centered_change.flatten().numpy(),
            }
        )
        for i, (key, value) in enumerate(constants.items()):
            frame.insert(i, key, value)
        return frame

    def save(self, directory: str | Path) -> Path:
        """Write ``steering.safetensors`` and ``steering.json`` into ``directory``."""
        tensors = {
            "logit_change": self.logit_change,
            "logprob_change": self.logprob_change,
            "centered_change": self.centered_change,
            "base_label_logits": self.base_label_logits,
            "alphas": self.alphas,
        }
        meta = {
            "emotions": list(self.emotions),
            "labels": list(self.labels),
            "prompt_ids": list(self.prompt_ids),
            "layer": self.layer,
            "hook_name": self.hook_name,
            "positions": self.positions,
            "method": self.method,
            "meta": self.meta,
            "axes": ["emotion", "alpha", "prompt", "label"],
        }
        return save_artifact(directory, self.FILE_STEM, tensors, meta)

    @classmethod
    def load(cls, directory: str | Path) -> "SteeringEffect":
        t, m = load_artifact(directory, cls.FILE_STEM)
        return cls(
            t["logit_change"],
            t["logprob_change"],
            t["centered_change"],
            t["base_label_logits"],
            t["alphas"],
            tuple(m["emotions"]),
            tuple(m["labels"]),
            tuple(m["prompt_ids"]),
            int(m["layer"]),
            m["hook_name"],
            m["positions"],
            m["method"],
            m.get("meta", {}),
        )


def _names(given: Sequence[str] | None, n: int, prefix: str) -> tuple[str, ...]:
    if given is None:
        return tuple(f"{prefix}{i}" for i in range(n))
    if len(given) != n:
        raise ValueError(f"{len(given)} {prefix} names for {n} entries")
    return tuple(str(g) for g in given)


def _stack_readouts(
    parts: Sequence[tuple[Tensor, Tensor, Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-row ``(label logits [label], logsumexp [], mean logit [])`` readouts into
    ``([row, label], [row], [row])``."""
    label_logits, logsumexp, mean_logit = zip(*parts, strict=True)
    return torch.stack(label_logits), torch.stack(logsumexp), torch.stack(mean_logit)


def _effect(
    steered: tuple[Tensor, Tensor, Tensor],
    base: tuple[Tensor, Tensor, Tensor],
    n_emotions: int,
    n_alphas: int,
    n_prompts: int,
    *,
    alphas: Tensor,
    emotions,
    labels,
    prompt_ids,
    layer: int,
    positions: str,
    method: str,
    model: Model,
    hook_name: str | None = None,
) -> SteeringEffect:
    """Assemble a :class:`SteeringEffect` from steered readouts (rows in (emotion, alpha,
    prompt) order) and unsteered readouts (one row per prompt)."""
    shape = (n_emotions, n_alphas, n_prompts, -1)
    s_ll, s_lse, s_mean = steered
    b_ll, b_lse, b_mean = base
    s_ll = s_ll.reshape(shape)
    s_lse = s_lse.reshape(shape[:3])[..., None]
    s_mean = s_mean.reshape(shape[:3])[..., None]
    logit = s_ll - b_ll
    logprob = (s_ll - s_lse) - (b_ll - b_lse[:, None])
    centered = (s_ll - s_mean) - (b_ll - b_mean[:, None])
    meta = {"numerics": numerics_mode(model)}
    for key in ("spec", "weights_hash", "dtype"):
        if hasattr(model, key):
            meta[key] = getattr(model, key)
    return SteeringEffect(
        logit,
        logprob,
        centered,
        b_ll,
        alphas.float().cpu(),
        _names(emotions, n_emotions, "emotion"),
        _names(labels, b_ll.shape[1], "label"),
        _names(prompt_ids, n_prompts, "prompt"),
        layer,
        hook_name or hooks.resid_post(layer),
        positions,
        method,
        meta,
    )


def _config_index(flat: Tensor, n_alphas: int, n_prompts: int) -> tuple[Tensor, Tensor, Tensor]:
    return flat // (n_alphas * n_prompts), (flat // n_prompts) % n_alphas, flat % n_prompts


# --------------------------------------------------------------------------- final layer


#: A steered row whose ``ln_final`` output departs from the two-term fit by more than this
#: (relative L2) is read out directly (see :func:`final_layer_readout`).
FACTOR_TOL = 1e-5


def _fit_two_terms(
    x: Float[Tensor, "row d_model"],
    y: Float[Tensor, "row d_model"],
    u: Float[Tensor, "row d_model"],
) -> tuple[Float[Tensor, " row"], Float[Tensor, " row"], Float[Tensor, " row"]]:
    """Least-squares ``x ~ s1 * y + s2 * u`` per row (float64); also the relative residual."""
    x, y, u = x.double(), y.double(), u.double()
    yy, uu, yu = (y * y).sum(-1), (u * u).sum(-1), (y * u).sum(-1)
    xy, xu = (x * y).sum(-1), (x * u).sum(-1)
    det = yy * uu - yu * yu
    regular = det > 1e-12 * yy * uu
    safe = torch.where(regular, det, torch.ones_like(det))
    s1 = torch.where(regular, (xy * uu - xu * yu) / safe, xy / yy.clamp_min(1e-300))
    s2 = torch.where(regular, (xu * yy - xy * yu) / safe, torch.zeros_like(det))
    fit = s1[:, None] * y + s2[:, None] * u
    resid = (x - fit).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)
    return s1.float(), s2.float(), resid.float()


@torch.no_grad()
def final_layer_readout(
    model: Model,
    h: Float[Tensor, "prompt d_model"],
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Float[Tensor, " alpha"],
    label_token_ids: Sequence[int],
    *,
    chunk_rows: int | None = None,
    progress: bool = False,
    read_point: str = "block-out",
) -> tuple[Float[Tensor, "row label"], Float[Tensor, " row"], Float[Tensor, " row"], dict]:
    """:func:`emolens.measure.activations.answer_readout` of ``h[p] + alpha[a] * v[e]`` for every
    (emotion, alpha, prompt) row, in that order, without a ``[rows, d_model] x [d_model, vocab]``
    product per row.

    The final norm (RMSNorm or LayerNorm, the model's own ``ln_final``) maps ``z`` to
    ``beta + g * P z / r(z)`` (``P`` centring or identity, ``r`` a scalar, ``beta`` its output at
    zero), so ``ln_final(h + a v) - beta = s1 * (ln_final(h) - beta) + s2 * (ln_final(v) - beta)``
    with two numbers per row, fitted by least squares on the rows' actual ``ln_final`` outputs
    (cheap: ``[rows, d_model]``). The unembedding (``W x + b``) is linear, so the logits are
    ``unembed(beta) + s1 * W(ln_final(h) - beta) + s2 * W(ln_final(v) - beta)``: one product for
    the ``prompt + emotion`` rows, then elementwise work per configuration (soft-capping, if the
    model has it, applied after). The mean logit is then ``O(1)`` per row without soft-capping;
    label logits read the label columns; only the logsumexp touches the whole vocabulary, in
    chunks of ``chunk_rows`` rows. A row whose ``ln_final`` output the fit does not reproduce to
    :data:`FACTOR_TOL` (a final norm of another form) is read out directly with
    ``answer_readout``. Returns label logits, logsumexp, mean logit (float32, CPU) and
    ``{"factored_rows": n, "direct_rows": m}``.

    With ``read_point="final-norm"``, ``h`` is the final norm's output and ``alpha * v`` is
    added after the norm: the logits are ``unembed(h + alpha v) = W h + b + alpha W v``, so
    ``s1 = 1`` and ``s2 = alpha`` exactly, with no norm, no fit and no direct rows.
    """
    hooks.check_read_point(read_point)
    bridge = bridge_of(model)
    ln_final, unembed = readout_modules(bridge)
    device = next(unembed.parameters()).device
    dtype = next(unembed.parameters()).dtype
    chunk = chunk_rows or default_chunk_rows(bridge)
    cap = logit_softcap(bridge)
    n_e, n_a, n_p = vectors.shape[0], alphas.shape[0], h.shape[0]
    d = h.shape[-1]
    h, v, al = (t.to(device=device, dtype=dtype) for t in (h, vectors, alphas))

    def norm(z: Tensor) -> Tensor:
        return ln_final(z[:, None, :])[:, 0, :]

    def unembed_rows(z: Tensor) -> Tensor:
        return unembed(z[:, None, :])[:, 0, :].float()

    zero = torch.zeros(1, d, device=device, dtype=dtype)
    flat = torch.arange(n_e * n_a * n_p, device=device)
    e, a, p = _config_index(flat, n_a, n_p)
    if read_point == "final-norm":  # no norm after the read point: linear in alpha, exactly
        beta, y, u = zero, h, v
        s1, s2 = torch.ones(len(flat), device=device), al[a].float()
        direct = torch.zeros(len(flat), dtype=torch.bool, device=device)
    else:
        beta = norm(zero)  # [1, d_model]
        y = norm(h) - beta  # [prompt, d_model]
        u = norm(v) - beta  # [emotion, d_model]
        x = norm(h[p] + al[a, None] * v[e]) - beta  # [row, d_model], cheap
        s1, s2, resid = _fit_two_terms(x, y[p], u[e])
        direct = resid > FACTOR_TOL
    bias = unembed_rows(zero)  # [1, vocab]
    offset = unembed_rows(beta)[0]  # [vocab]: W beta + b
    wy = unembed_rows(y) - bias  # [prompt, vocab]
    wu = unembed_rows(u) - bias  # [emotion, vocab]
    label_idx = torch.as_tensor(list(label_token_ids), dtype=torch.long, device=device)
    labels = torch.empty(len(flat), len(label_idx), device=device)
    lse = torch.empty(len(flat), device=device)
    mean = torch.empty(len(flat), device=device)
    starts = range(0, len(flat), chunk)
    for start in tqdm(starts, desc="final-layer steering", disable=not progress, leave=False):
        rows = slice(start, start + chunk)
        logits = torch.addcmul(offset, s1[rows, None], wy[p[rows]])
        logits.addcmul_(s2[rows, None], wu[e[rows]])
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
            mean[rows] = logits.mean(-1)
        labels[rows] = logits[:, label_idx]
        lse[rows] = torch.logsumexp(logits, dim=-1)
    if cap is None:  # the mean of a linear function of the logits: O(1) per row
        mean = offset.mean() + s1 * wy.mean(-1)[p] + s2 * wu.mean(-1)[e]
    if bool(direct.any()):
        idx = direct.nonzero().flatten()
        rows_h = (h[p[idx]] + al[a[idx], None] * v[e[idx]]).float().cpu()
        out = answer_readout(bridge, rows_h, label_token_ids, chunk_rows=chunk)
        labels[idx], lse[idx], mean[idx] = (t.to(device) for t in out)
    info = {"factored_rows": int((~direct).sum()), "direct_rows": int(direct.sum())}
    return labels.cpu(), lse.cpu(), mean.cpu(), info


@torch.no_grad()
def final_layer_sensitivity(
    model: Model,
    h_final: Float[Tensor, "prompt d_model"],
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Float[Tensor, " alpha"],
    label_token_ids: Sequence[int],
    *,
    emotions: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    prompt_ids: Sequence[str] | None = None,
    chunk_rows: int | None = None,
    progress: bool = False,
    read_point: str = "block-out",
) -> SteeringEffect:
    """Sensitivity to steering at the final block output, without a forward pass.

    ``h_final`` are the unsteered final-block outputs at the answer position (e.g.
    ``acts.layer(n_layers - 1)``). Steering there changes the answer logits only through
    ``unembed(ln_final(h + alpha * v))``, computed with the model's own modules for every
    (emotion, alpha, prompt) by :func:`final_layer_readout` (one vocabulary product per prompt
    and per emotion, not per configuration; ``chunk_rows`` rows of full-vocabulary work at a
    time, by default as many as fit in 256 MiB). Equals the hooked forward pass with positions
    "all" or "answer" alike (steering other positions cannot reach the answer after the last
    block).

    With ``read_point="final-norm"``, ``h_final`` are the final norm's outputs
    (:func:`emolens.measure.activations.final_norm_rows`) and the vectors are added after the
    norm, at ``ln_final.hook_out``: the logits are ``unembed(h + alpha v)``, linear in alpha
    with no norm-scale term (the hooked reference is :func:`naive_sensitivity` with the same
    ``read_point``).
    """
    bridge = bridge_of(model)
    last = int(bridge.cfg.n_layers) - 1
    n_e, n_a, n_p = vectors.shape[0], alphas.shape[0], h_final.shape[0]
    chunk = chunk_rows or default_chunk_rows(bridge)
    h, v, al = h_final.float().cpu(), vectors.float().cpu(), alphas.float().cpu()
    base = answer_readout(bridge, h, label_token_ids, chunk_rows=chunk, read_point=read_point)
    label_logits, logsumexp, mean_logit, _ = final_layer_readout(
        bridge,
        h,
        v,
        al,
        label_token_ids,
        chunk_rows=chunk,
        progress=progress,
        read_point=read_point,
    )
    method = (
        "final-layer readout: unembed(h + alpha v) after the final norm, linear in alpha"
        if read_point == "final-norm"
        else "final-layer readout: unembed(ln_final(h + alpha v)), factored through the norm"
    )
    return _effect(
        (label_logits, logsumexp, mean_logit),
        base,
        n_e,
        n_a,
        n_p,
        alphas=al,
        emotions=emotions,
        labels=labels,
        prompt_ids=prompt_ids,
        layer=last,
        positions="all",
        method=method,
        model=model,
        hook_name=hooks.read_hook(last, last + 1, read_point),
    )


# --------------------------------------------------------------------------- any layer


def _final_rows(
    bridge, token_ids: Sequence[Sequence[int]], pid: int, padding_side: str, steering=None
) -> Float[Tensor, "sample d_model"]:
    """Final-block outputs at the answer position of a batch, optionally steered by
    ``steering(answer_index)``, a context manager factory."""
    ids, mask = pad(token_ids, pid, padding_side)
    last = int(bridge.cfg.n_layers) - 1
    if steering is None:
        return run_to_answer_rows(bridge, ids, mask, [last])[last]
    with steering(last_token_index(mask)):
        return run_to_answer_rows(bridge, ids, mask, [last])[last]


@torch.no_grad()
def layer_sensitivity(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    layer: int,
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Float[Tensor, " alpha"],
    label_token_ids: Sequence[int],
    *,
    positions: Positions = "all",
    batch_size: int = 32,
    emotions: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    prompt_ids: Sequence[str] | None = None,
    padding_side: str = "right",
    progress: bool = True,
) -> SteeringEffect:
    """Sensitivity to steering at ``blocks.{layer}.hook_out`` of the prompts
    ``token_ids``, by hooked forward passes.

    Every (emotion, alpha, prompt) configuration is one batch row with its own steering vector,
    up to ``batch_size`` rows per pass (rows of similar prompt length together). Each pass stops
    after the last block and reads the answer logits out with ``ln_final`` and ``unembed`` at
    the answer position only. The unsteered baseline comes from plain passes of the prompts.
    """
    _check_positions(positions)
    bridge = bridge_of(model)
    (layer,) = hooks.check_layers([layer], int(bridge.cfg.n_layers))
    hook_name = hooks.resid_post(layer)
    n_e, n_a, n_p = vectors.shape[0], alphas.shape[0], len(token_ids)
    if n_p == 0:
        raise ValueError("no prompts to steer")
    pid = pad_id(getattr(model, "tokenizer", None) or bridge.tokenizer)
    v, al = vectors.float().cpu(), alphas.float().cpu()
    lengths = torch.as_tensor([len(t) for t in token_ids])

    base_rows = torch.zeros(n_p, int(bridge.cfg.d_model))
    by_length = sorted(range(n_p), key=lambda i: len(token_ids[i]))
    for start in range(0, n_p, batch_size):
        batch = by_length[start : start + batch_size]
        base_rows[batch] = _final_rows(bridge, [token_ids[i] for i in batch], pid, padding_side)
    base = answer_readout(bridge, base_rows, label_token_ids)

    total = n_e * n_a * n_p
    flat_all = torch.arange(total)
    order = flat_all[torch.argsort(lengths[flat_all % n_p], stable=True)]
    steered_rows = torch.zeros(total, int(bridge.cfg.d_model))
    device = input_device(bridge)
    starts = range(0, total, batch_size)
    for start in tqdm(starts, desc=f"steering at layer {layer}", disable=not progress, leave=False):
        flat = order[start : start + batch_size]
        e, a, p = _config_index(flat, n_a, n_p)
        deltas = (al[a, None] * v[e]).to(device)

        def steering(answer_index, deltas=deltas):
            return steer(bridge, hook_name, deltas, 1.0, positions, answer_index)

        steered_rows[flat] = _final_rows(
            bridge, [token_ids[i] for i in p.tolist()], pid, padding_side, steering
        )
    steered = answer_readout(bridge, steered_rows, label_token_ids)
    return _effect(
        steered,
        base,
        n_e,
        n_a,
        n_p,
        alphas=al,
        emotions=emotions,
        labels=labels,
        prompt_ids=prompt_ids,
        layer=layer,
        positions=positions,
        method=f"batched hooked forward (batch {batch_size})",
        model=model,
    )


# --------------------------------------------------------------------------- key/value cache


class _StopAfterLastBlock(Exception):
    """Raised by a hook once the rows needed from a forward pass are stored."""


#: The TransformerLens versions whose attention bridges read only ``past_key_values=``, while
#: transformers 5 hands attention modules the cache as ``cache=`` (checked up to TL 4.3.0;
#: ``tests/test_steering.py`` fails once an installed TL in this range reads ``cache=`` itself).
KV_CACHE_WORKAROUND_TL = (">=4.0", "<4.4")


def needs_kv_cache_workaround() -> bool:
    """Whether the installed TransformerLens and transformers are a pairing whose attention
    ignores transformers 5's ``cache=`` argument (see :func:`attention_reads_kv_cache`)."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    tl, hf = Version(version("transformer-lens")), Version(version("transformers"))
    return tl in SpecifierSet(",".join(KV_CACHE_WORKAROUND_TL)) and hf.major >= 5


@contextmanager
def attention_reads_kv_cache(bridge) -> Iterator[None]:
    """Make the bridge's attention components fill and read a key/value cache.

    transformers 5.x hands each attention module the cache as ``cache=...``, while the
    attention that TransformerLens 4.3 reimplements (``AttentionBridge._update_kv_cache``)
    looks only for ``past_key_values=...``: without this, a cache passed to the bridge is never
    filled nor read, and a cached step silently attends to itself alone. Where the installed
    versions are such a pairing (:func:`needs_kv_cache_workaround`), inside the ``with`` block
    a forward pre-hook on every attention component copies ``cache`` to ``past_key_values``;
    the pre-hooks are removed on exit. Elsewhere it does nothing, and
    :func:`prompt_kv_cache` still checks that the cache fills.
    """
    if not needs_kv_cache_workaround():
        yield
        return

    def pre_hook(module, args, kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return args, kwargs

    handles = [
        m.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for m in bridge_of(bridge).modules()
        if hasattr(m, "_update_kv_cache")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cached_forward_rows(
    bridge, input_ids: Int[Tensor, "sample seq"], cache
) -> Float[Tensor, "sample d_model"]:
    """Run ``input_ids`` after the positions held in ``cache`` (which grows by them) and
    return the final block output at the last position; the unembedding never runs."""
    last = int(bridge.cfg.n_layers) - 1
    store: dict[str, Tensor] = {}

    def keep_last_row(tensor, *, hook):
        store["h"] = tensor[:, -1].detach().float().cpu()
        raise _StopAfterLastBlock

    with (
        warnings.catch_warnings(),
        attention_reads_kv_cache(bridge),
        bridge.hooks(fwd_hooks=[(hooks.resid_post(last), keep_last_row)]),
    ):
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        try:
            bridge(input_ids.to(input_device(bridge)), past_key_values=cache)
        except _StopAfterLastBlock:
            pass
    if "h" not in store:
        raise RuntimeError(f"the hook at {hooks.resid_post(last)} did not fire")
    return store["h"]


def prompt_kv_cache(model: Model, prefix: Sequence[int]) -> "DynamicCache":
    """The key/value cache (a transformers ``DynamicCache``, batch 1) of the token ids
    ``prefix``, from one forward pass that stops after the last block.

    Raises ``RuntimeError`` if the pass left the cache unfilled (a TransformerLens /
    transformers pairing whose attention ignores the cache), rather than let later steps
    silently attend to themselves alone.
    """
    from transformers import DynamicCache

    bridge = bridge_of(model)
    cache = DynamicCache(config=bridge.original_model.config)
    if len(prefix) == 0:
        return cache
    _cached_forward_rows(bridge, torch.as_tensor([list(prefix)]), cache)
    if cache.get_seq_length() != len(prefix):
        raise RuntimeError(
            f"the key/value cache holds {cache.get_seq_length()} positions after "
            f"a pass over {len(prefix)} tokens: this model's attention does not "
            "fill it (if TransformerLens was upgraded, KV_CACHE_WORKAROUND_TL in "
            "emolens.measure.steering may need widening); use layer_sensitivity instead"
        )
    return cache


def _expanded(cache, rows: int):
    """A copy of a batch-1 cache repeated ``rows`` times along the batch dimension (the
    original is left as it was, so it serves the next chunk)."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


@torch.no_grad()
def layer_sensitivity_cached(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    layer: int,
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Float[Tensor, " alpha"],
    label_token_ids: Sequence[int],
    *,
    batch_size: int = 128,
    emotions: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    prompt_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> SteeringEffect:
    """Sensitivity to steering the answer position only at ``blocks.{layer}.hook_out``,
    reusing each prompt's key/value cache: equal to ``layer_sensitivity(...,
    positions="answer")`` and to the naive loop, for a fraction of the compute.

    Steering only the answer (last) position leaves every earlier position, and so their keys
    and values, as they were. Each prompt but its last token therefore runs once
    (:func:`prompt_kv_cache`, stopping after the last block); then its (emotion, alpha)
    configurations, plus one unsteered row for the baseline, run as a batch of single tokens
    (up to ``batch_size`` rows a pass) on a copy of that cache repeated along the batch
    dimension, with ``alpha * v`` added at the one position. A configuration costs one token
    instead of the whole prompt. Memory: the repeated cache holds ``batch_size x prompt length
    x n_layers x 2 x n_kv_heads x d_head`` numbers.
    """
    bridge = bridge_of(model)
    (layer,) = hooks.check_layers([layer], int(bridge.cfg.n_layers))
    hook_name = hooks.resid_post(layer)
    n_e, n_a, n_p = vectors.shape[0], alphas.shape[0], len(token_ids)
    if n_p == 0:
        raise ValueError("no prompts to steer")
    if any(len(t) == 0 for t in token_ids):
        raise ValueError("cannot steer an empty prompt")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    v, al = vectors.float().cpu(), alphas.float().cpu()
    # row 0 of each prompt is the unsteered baseline, rows 1.. its configurations (e, a)
    deltas = torch.cat(
        [torch.zeros(1, v.shape[1]), (al[None, :, None] * v[:, None, :]).reshape(n_e * n_a, -1)]
    )
    d_model = int(bridge.cfg.d_model)
    base_rows = torch.zeros(n_p, d_model)
    steered_rows = torch.zeros(n_e, n_a, n_p, d_model)
    for p in tqdm(
        range(n_p), desc=f"cached steering at layer {layer}", disable=not progress, leave=False
    ):
        ids = list(token_ids[p])
        cache = prompt_kv_cache(bridge, ids[:-1])
        rows = torch.zeros(len(deltas), d_model)
        for start in range(0, len(deltas), batch_size):
            chunk = deltas[start : start + batch_size]
            answer = torch.full((len(chunk), 1), ids[-1], dtype=torch.long)
            with steer(bridge, hook_name, chunk.to(input_device(bridge)), 1.0, "all"):
                rows[start : start + len(chunk)] = _cached_forward_rows(
                    bridge, answer, _expanded(cache, len(chunk))
                )
        base_rows[p] = rows[0]
        steered_rows[:, :, p] = rows[1:].reshape(n_e, n_a, d_model)
    base = answer_readout(bridge, base_rows, label_token_ids)
    steered = answer_readout(bridge, steered_rows.reshape(-1, d_model), label_token_ids)
    return _effect(
        steered,
        base,
        n_e,
        n_a,
        n_p,
        alphas=al,
        emotions=emotions,
        labels=labels,
        prompt_ids=prompt_ids,
        layer=layer,
        positions="answer",
        method=f"answer-only steering on the prompt's key/value cache (batch {batch_size})",
        model=model,
    )


@torch.no_grad()
def naive_sensitivity(
    model: Model,
    token_ids: Sequence[Sequence[int]],
    layer: int,
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Float[Tensor, " alpha"],
    label_token_ids: Sequence[int],
    *,
    positions: Positions = "all",
    emotions: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    prompt_ids: Sequence[str] | None = None,
    progress: bool = False,
    read_point: str = "block-out",
) -> SteeringEffect:
    """The slow, obvious reference: one full hooked forward pass (logits at every position)
    per (emotion, alpha, prompt), reading the last position's logits. ``read_point=
    "final-norm"`` steers the final layer at the final norm's output (``ln_final.hook_out``)."""
    _check_positions(positions)
    bridge = bridge_of(model)
    n_layers = int(bridge.cfg.n_layers)
    (layer,) = hooks.check_layers([layer], n_layers)
    hook_name = hooks.read_hook(layer, n_layers, read_point)
    device = input_device(bridge)
    label_idx = torch.as_tensor(list(label_token_ids))
    n_e, n_a, n_p = vectors.shape[0], alphas.shape[0], len(token_ids)

    def readout(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = logits.float().cpu()
        return logits[label_idx], logits.logsumexp(-1), logits.mean(-1)

    base_parts: list[tuple[Tensor, Tensor, Tensor]] = []
    steered_parts: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(n_p)]
    for p in tqdm(range(n_p), desc="naive steering", disable=not progress, leave=False):
        ids = torch.as_tensor([list(token_ids[p])], device=device)
        answer = torch.as_tensor([ids.shape[1] - 1])
        base_parts.append(readout(bridge(ids)[0, -1]))
        for e in range(n_e):
            for a in range(n_a):
                with steer(bridge, hook_name, vectors[e], float(alphas[a]), positions, answer):
                    steered_parts[p].append(readout(bridge(ids)[0, -1]))
    # steered_parts[p][e * n_a + a] -> rows in (emotion, alpha, prompt) order
    rows = [
        steered_parts[p][e * n_a + a] for e in range(n_e) for a in range(n_a) for p in range(n_p)
    ]
    steered = _stack_readouts(rows)
    base = _stack_readouts(base_parts)
    return _effect(
        steered,
        base,
        n_e,
        n_a,
        n_p,
        alphas=alphas,
        emotions=emotions,
        labels=labels,
        prompt_ids=prompt_ids,
        layer=layer,
        positions=positions,
        method="naive: one hooked forward per (emotion, alpha, prompt)",
        model=model,
        hook_name=hook_name,
    )
