"""Direct logit attribution per attention head.

Each block's attention output at the answer position is ``o(z) = sum_h W_O[:, h] z_h + b_O``:
``z_h`` is head ``h``'s output before the output projection (TL 4's ``blocks.{l}.attn.o.hook_in``,
``[batch, pos, head, d_head]``), ``W_O[:, h]`` its columns of the projection. Each head's share is
computed with the model's own output projection (a float64 copy) on ``z`` with every other head
zeroed, minus the projection of zeros (its bias), so it holds for any linear projection (Linear or
GPT-2's Conv1D). Read through the final norm with its scale frozen at the full residual's (the
convention of :func:`emolens.measure.attribution.component_attribution`), the heads plus the bias
of every block, the embedding and the MLP outputs sum to the label logits exactly.

An architecture whose attention output passes through an RMS norm before it joins the residual
(Gemma's post-attention norm, TL 4's ``ln1_post``) is split the same way with that norm's scale
frozen at its value on the whole attention output: head ``h`` contributes ``g * W_O[:, h] z_h /
r(o(z))`` (``g`` the norm's gain, ``r`` its RMS), which sums exactly to the attention update.
:func:`head_attribution` checks that the split rebuilds the residual's attention update and
raises :class:`HeadsUnavailable` otherwise (another norm after ``W_O``, or a non-linear one).
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from emolens.measure.attribution import Readout, UnsupportedReadout, readout_tolerance
from emolens.model import hooks


class HeadsUnavailable(UnsupportedReadout):
    """The model's attention output is not a linear function of the per-head outputs."""


@dataclass(frozen=True)
class HeadAttribution:
    """Per-head direct logit attribution of the unsteered answer.

    ``heads`` ``[sample, layer, head, label]``, ``attn_bias`` ``[sample, layer, label]`` (the
    output projection's bias; zero for Llama), ``attn`` ``[sample, layer, label]`` (the layer's
    whole attention update ``resid_mid - resid_pre``), ``other`` ``[sample, label]`` (embedding
    and every MLP output) and ``bias`` ``[label]`` (the readout bias): ``heads.sum(2) +
    attn_bias == attn`` and ``attn.sum(1) + other + bias == label logits`` up to rounding.
    """

    heads: Float[Tensor, "sample layer head label"]
    attn_bias: Float[Tensor, "sample layer label"]
    attn: Float[Tensor, "sample layer label"]
    other: Float[Tensor, "sample label"]
    bias: Float[Tensor, " label"]

    @property
    def logits(self) -> Float[Tensor, "sample label"]:
        """The label logits rebuilt from the heads, biases, embedding and MLPs."""
        return (
            self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.other + self.bias[None]
        ).float()


def _output_projection(bridge, layer: int) -> torch.nn.Module:
    """A float64 copy (no hooks) of block ``layer``'s attention output projection."""
    o = bridge.blocks[layer].attn.o
    module = getattr(o, "original_component", o)
    module = copy.deepcopy(module).double()
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    module.requires_grad_(False)
    return module


@dataclass(frozen=True)
class _PostNorm:
    """An RMS norm after the attention output projection: ``g * x / sqrt(mean(x^2) + eps)``."""

    gain: Float[Tensor, " d_model"]
    eps: float

    def scale(self, x: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows"]:
        return torch.sqrt(x.pow(2).mean(-1) + self.eps)


def _post_attention_norm(bridge, layer: int, d_model: int) -> _PostNorm | None:
    """Block ``layer``'s norm after ``W_O`` (None where it has none), with its gain read from
    the module's response to a probe (so Gemma's ``1 + w`` needs no special case)."""
    block = bridge.blocks[layer]
    if "ln1_post" not in dict(block.named_children()):
        return None
    norm = block.ln1_post
    module = getattr(norm, "original_component", norm)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if eps is None:
        raise HeadsUnavailable(f"block {layer}'s post-attention norm has no eps: not an RMS norm")
    param = next(module.parameters())
    probe = torch.randn(4, d_model, generator=torch.Generator().manual_seed(0)) * 3.0
    out = module(probe.to(dtype=param.dtype, device=param.device)).double().cpu()
    x = probe.to(param.dtype).double()
    r = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + float(eps))
    return _PostNorm((out * r / x).median(0).values, float(eps))


@torch.no_grad()
def head_attribution(
    model, token_ids: Sequence[Sequence[int]], readout: Readout, batch_size: int = 8
) -> HeadAttribution:
    """Per-head DLA of each prompt's label logits at its answer position (the last token),
    through the final norm with its scale frozen at the full residual's.

    Raises :class:`HeadsUnavailable` when a layer's projected head outputs differ from its
    attention update of the residual by more than rounding (a norm after ``W_O``)."""
    from emolens.data.tokens import pad, pad_id
    from emolens.measure.activations import hooks_at_answer

    bridge = model.bridge
    n_layers = model.n_layers
    stream_names = [hooks.resid_pre(0)]
    for layer in range(n_layers):
        stream_names += [hooks.resid_mid(layer), hooks.resid_post(layer)]
    z_names = [hooks.attn_z(layer) for layer in range(n_layers)]
    d_model = int(bridge.cfg.d_model)
    post_norms = [_post_attention_norm(bridge, layer, d_model) for layer in range(n_layers)]
    post_names = [hooks.attn_post_norm_in(i) for i, p in enumerate(post_norms) if p is not None]
    wanted = stream_names + z_names + post_names
    projections = [_output_projection(bridge, layer) for layer in range(n_layers)]
    pid = pad_id(model.tokenizer)
    streams, zs, posts = [], [], []
    for start in range(0, len(token_ids), batch_size):
        ids, mask = pad(token_ids[start : start + batch_size], pid, "right")
        at_answer = {n: t.double() for n, t in hooks_at_answer(model, ids, mask, wanted).items()}
        streams.append(torch.stack([at_answer[n] for n in stream_names], 1))  # [b, 2L+1, d]
        zs.append(torch.stack([at_answer[n] for n in z_names], 1))  # [b, L, head, d_head]
        posts.append({n: at_answer[n] for n in post_names})  # [b, d] each
    stream = torch.cat(streams)  # [sample, 2 L + 1, d]
    z = torch.cat(zs)  # [sample, layer, head, d_head]
    n, _, n_heads, d_head = z.shape
    d = stream.shape[-1]
    attn_update = stream[:, 1::2] - stream[:, 0:-1:2]  # resid_mid - resid_pre, [sample, L, d]
    mlp_update = stream[:, 2::2] - stream[:, 1::2]  # resid_post - resid_mid
    eye = torch.eye(n_heads, dtype=torch.float64)
    head_out = torch.zeros(n, n_layers, n_heads, d, dtype=torch.float64)
    bias_out = torch.zeros(n, n_layers, d, dtype=torch.float64)
    for layer, proj in enumerate(projections):
        proj = proj.to("cpu")
        bias = proj(torch.zeros(1, n_heads * d_head, dtype=torch.float64))[0]
        # [sample, head, head, d_head]: row h keeps only head h
        masked = z[:, layer, None, :, :] * eye[None, :, :, None]
        out = proj(masked.reshape(n * n_heads, n_heads * d_head)).reshape(n, n_heads, d)
        head_out[:, layer] = out - bias
        bias_out[:, layer] = bias
        post = post_norms[layer]
        if post is not None and n:  # the norm's scale frozen at the whole attention output's
            name = hooks.attn_post_norm_in(layer)
            o = torch.cat([b[name] for b in posts])  # [sample, d]
            factor = post.gain[None] / post.scale(o)[:, None]  # [sample, d]
            head_out[:, layer] *= factor[:, None]
            bias_out[:, layer] *= factor
    rebuilt = head_out.sum(2) + bias_out
    err = (rebuilt - attn_update).abs().max().item() if n else 0.0
    scale = max(1.0, attn_update.abs().max().item() if n else 1.0)
    dtype = next(bridge.parameters()).dtype
    tol = readout_tolerance(dtype, n_heads * d_head, scale)
    if not err <= tol:
        raise HeadsUnavailable(
            f"the projected head outputs differ from the attention update of the residual by "
            f"{err:.3g} (tolerance {tol:.3g}): the attention output is neither W_O z + b nor an "
            "RMS norm of it, so per-head attribution is not exact for this model"
        )
    final = stream[:, -1]
    r = readout.scale(final)[:, None]  # [sample, 1]
    w = readout.effective_rows.double()  # [label, d]

    def read(x: Tensor) -> Tensor:
        return readout.center(x) @ w.T

    heads = read(head_out) / r[:, :, None, None]
    attn_bias = read(bias_out) / r[:, :, None]
    attn = read(attn_update) / r[:, :, None]
    other = (read(stream[:, 0]) + read(mlp_update).sum(1)) / r
    return HeadAttribution(
        heads.float(), attn_bias.float(), attn.float(), other.float(), readout.effective_bias
    )


def heads_frame(
    attribution: HeadAttribution, step: int, gold: Sequence[int], labels: tuple[str, ...]
) -> pd.DataFrame:
    """``heads.csv`` of one step: for each gold label, layer and head (head ``-1`` is the output
    projection's bias, component ``attn_bias L``), the mean contribution to the gold label's
    logit and to its margin over the mean of the other labels, over that label's samples."""
    gold_t = torch.as_tensor(list(gold), dtype=torch.long)
    n, n_layers, n_heads, n_labels = attribution.heads.shape
    parts = torch.cat([attribution.heads, attribution.attn_bias[:, :, None]], 2).double()
    own = parts[torch.arange(n), :, :, gold_t]  # [sample, layer, head + 1]
    others = (parts.sum(-1) - own) / max(1, n_labels - 1)
    rows = []
    for j, name in enumerate(labels):
        mask = gold_t == j
        if not bool(mask.any()):
            continue
        logit, margin = own[mask].mean(0), (own[mask] - others[mask]).mean(0)
        for layer in range(n_layers):
            for head in range(n_heads + 1):
                is_bias = head == n_heads
                rows.append(
                    {
                        "step": step,
                        "label": name,
                        "layer": layer,
                        "head": -1 if is_bias else head,
                        "component": f"attn_bias {layer}" if is_bias else f"L{layer}H{head}",
                        "n_samples": int(mask.sum()),
                        "logit": float(logit[layer, head]),
                        "margin": float(margin[layer, head]),
                    }
                )
    return pd.DataFrame(
        rows,
        columns=["step", "label", "layer", "head", "component", "n_samples", "logit", "margin"],
    )
