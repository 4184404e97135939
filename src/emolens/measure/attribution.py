"""Why steering moves (or stops moving) a label's logit: exact decompositions at the final layer.

The label logit at the answer position is ``l(h) = w . (h / r(h)) + b`` for an RMS final norm,
with ``w = u * g`` the label's unembedding row times the norm gain and ``r(h)`` the RMS scale
(for a LayerNorm, ``h`` is centred first and the norm bias folds into ``b``). Steering
``h -> h + alpha v`` changes it by, exactly,

    alpha * (w . v) / r(h + alpha v)        direct push of v along the label's readout row
  + (w . h) * (1 / r(h + alpha v) - 1 / r(h))   change of the normalisation scale

and across checkpoints the direct push of step t against step 0 splits, exactly, into what the
vector changed, what the readout row changed and what the scale changed (see
:func:`direct_push_change`). :class:`Readout` extracts ``w``, ``b`` and the norm from a model and
checks itself against the model's own ``ln_final`` and ``unembed`` before it is used.

At the ``"final-norm"`` read point, ``h`` is the final norm's output and steering adds
``alpha v`` after the norm: the logit is ``u . (h + alpha v) + b``, the scale term is exactly
zero and the whole change is the direct push ``alpha * (u . v)``
(:meth:`Readout.at_read_point`, whose norm is ``"none"``).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from emolens.measure.activations import readout_modules
from emolens.model import hooks
from emolens.model.loading import Model
from emolens.store.files import load_tensors, save_tensors


class UnsupportedReadout(ValueError):
    """The model's final readout is not a plain norm + linear unembedding."""


class ReadoutCheckFailed(UnsupportedReadout):
    """The extracted readout does not reproduce the model's logits within rounding."""


#: Rounding allowance of the readout checks, in units of ``eps * sqrt(d_model) * |logit|``:
#: the extracted readout against the float32 modules (measured: below 0.02 of it on the tiny
#: Llama), and the float32 modules against a bfloat16 model's own (measured: 0.04 of it).
CHECK_FACTOR = 16.0
NATIVE_CHECK_FACTOR = 1.0


def readout_tolerance(
    dtype: torch.dtype, d_model: int, scale: float, factor: float = CHECK_FACTOR
) -> float:
    """How far two computations of logits of size ``scale`` over ``d_model`` terms may differ
    by rounding in ``dtype``: ``factor * eps * sqrt(d_model) * max(1, scale)``."""
    return factor * torch.finfo(dtype).eps * d_model**0.5 * max(1.0, scale)


@dataclass(frozen=True)
class Readout:
    """A model's final norm and the unembedding rows of the label tokens (plus the mean row).

    ``gain`` includes any offset the architecture adds (Gemma's ``1 + w``); ``rows`` are
    ``[label, d_model]``; ``mean_row`` is the mean over the whole vocabulary, so
    ``mean_logit(h) = mean_row . ln(h) + mean_bias`` exactly (the readout is linear).
    """

    norm: str  # "rms" or "layer"; "none" for residuals already normalised (final-norm)
    gain: Float[Tensor, " d_model"]
    norm_bias: Float[Tensor, " d_model"]
    eps: float
    rows: Float[Tensor, "label d_model"]
    bias: Float[Tensor, " label"]
    mean_row: Float[Tensor, " d_model"]
    mean_bias: float
    token_ids: tuple[int, ...]

    @property
    def effective_rows(self) -> Float[Tensor, "label d_model"]:
        """``w = u * g``: what a normalised residual is read out along."""
        return self.rows * self.gain

    @property
    def effective_bias(self) -> Float[Tensor, " label"]:
        return self.bias + self.rows @ self.norm_bias

    def center(self, h: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        return h - h.mean(-1, keepdim=True) if self.norm == "layer" else h

    def scale(self, h: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows"]:
        """``r(h)``: the RMS of the (centred, for LayerNorm) residual, with eps; exactly 1 for
        norm ``"none"`` (residuals read after the final norm)."""
        if self.norm == "none":
            return torch.ones(h.shape[:-1], dtype=torch.float64, device=h.device)
        x = self.center(h.double())
        return torch.sqrt((x * x).mean(-1) + self.eps)

    def at_read_point(self, read_point: str) -> "Readout":
        """The readout of final-layer residuals read at ``read_point``: this one at
        ``"block-out"``; at ``"final-norm"`` the unembedding alone (norm ``"none"``: gain 1, no
        norm bias, scale 1), since those residuals are the norm's output already."""
        if hooks.check_read_point(read_point) == "block-out" or self.norm == "none":
            return self
        return Readout(
            "none",
            torch.ones_like(self.gain),
            torch.zeros_like(self.norm_bias),
            0.0,
            self.rows,
            self.bias,
            self.mean_row,
            self.mean_bias,
            self.token_ids,
        )

    def logits(self, h: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows label"]:
        """Label logits of final-block outputs ``h`` (float64)."""
        x = self.center(h.double()) / self.scale(h)[..., None]
        return x @ self.effective_rows.double().T + self.effective_bias.double()

    def mean_logit(self, h: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows"]:
        x = self.center(h.double()) / self.scale(h)[..., None]
        w = (self.mean_row * self.gain).double()
        return x @ w + float(self.mean_bias + self.mean_row @ self.norm_bias)

    def save(self, path: str | Path) -> Path:
        return save_tensors(
            path,
            {
                "gain": self.gain,
                "norm_bias": self.norm_bias,
                "rows": self.rows,
                "bias": self.bias,
                "mean_row": self.mean_row,
            },
            {
                "norm": self.norm,
                "eps": self.eps,
                "mean_bias": self.mean_bias,
                "token_ids": list(self.token_ids),
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> "Readout":
        t, m = load_tensors(path)
        return cls(
            m["norm"],
            t["gain"],
            t["norm_bias"],
            float(m["eps"]),
            t["rows"],
            t["bias"],
            t["mean_row"],
            float(m["mean_bias"]),
            tuple(m["token_ids"]),
        )

    @classmethod
    @torch.no_grad()
    def from_model(
        cls, model: Model, token_ids: Sequence[int], check_factor: float = CHECK_FACTOR
    ) -> "Readout":
        """Extract the readout and verify it against the model's ``ln_final`` and ``unembed``
        on random residuals of realistic scale.

        The readout is that of :func:`emolens.measure.activations.answer_readout`: the model's own
        modules in float32 whatever the model's dtype (:func:`readout_modules`). Two checks, with
        tolerances ``factor * eps * sqrt(d_model) * max(1, |logit|)``, ``eps`` that of the dtype
        compared (``torch.finfo(dtype).eps``): the extracted readout against the float32 modules
        (``factor = check_factor``), and, for a bfloat16 or float16 model, those against the
        model's own modules, which round to its dtype (``factor = NATIVE_CHECK_FACTOR``).
        Raises :class:`UnsupportedReadout` for final-logit soft-capping (whose effect is not
        linear) and :class:`ReadoutCheckFailed` when a check fails.
        """
        bridge = model.bridge
        config = model.hf_model.config
        if getattr(config, "final_logit_softcapping", None):
            raise UnsupportedReadout(
                "final-logit soft-capping makes the readout non-linear; "
                "exact attribution is not available for this model"
            )
        head = model.hf_model.get_output_embeddings()
        w_u = head.weight.detach().float().cpu()
        b_u = (
            head.bias.detach().float().cpu()
            if getattr(head, "bias", None) is not None
            else torch.zeros(w_u.shape[0])
        )
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        d = w_u.shape[1]
        norm_module, unembed = readout_modules(bridge)
        eps = getattr(config, "rms_norm_eps", None)
        kind = "rms" if eps is not None else "layer"
        eps = float(
            eps
            if eps is not None
            else getattr(config, "layer_norm_eps", getattr(config, "layer_norm_epsilon", 1e-5))
        )
        dtype = next(unembed.parameters()).dtype
        device = next(unembed.parameters()).device
        # gain and bias from the norm's response: ln(x) = g * c(x) / r(x) + beta
        zero = torch.zeros(1, 1, d, dtype=dtype, device=device)
        beta = norm_module(zero + 0.0)[0, 0].float().cpu() if kind == "layer" else torch.zeros(d)
        probe = torch.randn(1, 8, d, generator=torch.Generator().manual_seed(0)) * 10.0
        native_dtype = next(bridge.unembed.parameters()).dtype
        probe = probe.to(native_dtype).to(dtype=dtype, device=device)  # exact in both dtypes
        out = norm_module(probe)[0].float().cpu() - beta
        x = probe[0].float().cpu()
        x = x - x.mean(-1, keepdim=True) if kind == "layer" else x
        r = torch.sqrt((x.double() * x.double()).mean(-1) + eps).float()
        gain = (out * r[:, None] / x).median(dim=0).values
        readout = cls(
            kind,
            gain,
            beta,
            eps,
            w_u[ids].clone(),
            b_u[ids].clone(),
            w_u.mean(0),
            float(b_u.mean()),
            tuple(int(i) for i in ids),
        )
        logits = unembed(norm_module(probe)).float().cpu()[0]
        mine = readout.logits(probe[0].float().cpu()).float()
        err = max(
            (logits[:, ids] - mine).abs().max().item(),
            (logits.mean(-1) - readout.mean_logit(probe[0].float().cpu())).abs().max().item(),
        )
        scale = max(1.0, logits.abs().max().item())
        tol = readout_tolerance(dtype, d, scale, check_factor)
        if not err <= tol:
            raise ReadoutCheckFailed(
                f"the extracted readout differs from the model's ln_final + unembed by {err:.3g}"
                f" (tolerance {tol:.3g} in {str(dtype).split('.')[-1]}; not a plain "
                "RMSNorm/LayerNorm + linear unembedding?); exact attribution is not available "
                "for this model"
            )
        if native_dtype != dtype:
            native = bridge.unembed(bridge.ln_final(probe.to(native_dtype))).float().cpu()[0]
            err = (native - logits).abs().max().item()
            tol = readout_tolerance(native_dtype, d, scale, NATIVE_CHECK_FACTOR)
            if not err <= tol:
                raise ReadoutCheckFailed(
                    f"the float32 copy of ln_final + unembed differs from the model's own "
                    f"{str(native_dtype).split('.')[-1]} modules by {err:.3g} (tolerance "
                    f"{tol:.3g}); the readout cannot be upcast for this model"
                )
        return readout


@dataclass(frozen=True)
class SteeringDecomposition:
    """Exact parts of the final-layer steering effect, ``[emotion, alpha, prompt, label]``.

    ``direct + scale == total``; ``total`` equals the measured logit change. For a readout of
    norm ``"none"`` (the final-norm read point) ``scale`` is exactly zero.
    """

    total: Float[Tensor, "emotion alpha prompt label"]
    direct: Float[Tensor, "emotion alpha prompt label"]
    scale: Float[Tensor, "emotion alpha prompt label"]
    cosine: Float[Tensor, "emotion label"]  # cos(v_e, w_label)
    vector_norm: Float[Tensor, " emotion"]
    row_norm: Float[Tensor, " label"]  # |w_label| = |u * g|
    resid_scale: Float[Tensor, " prompt"]  # r(h), unsteered
    steered_scale: Float[Tensor, "emotion alpha prompt"]  # r(h + alpha v)


def decompose_steering(
    readout: Readout,
    h: Float[Tensor, "prompt d_model"],
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Float[Tensor, " alpha"],
) -> SteeringDecomposition:
    """Split each label's final-layer logit change into direct push and scale change."""
    h64, v64, a64 = h.double(), vectors.double(), alphas.double()
    w = readout.effective_rows.double()  # [label, d]
    hc, vc = readout.center(h64), readout.center(v64)
    steered = h64[None, None] + a64[None, :, None, None] * v64[:, None, None, :]  # [e, a, p, d]
    r0 = readout.scale(h64)  # [p]
    r1 = readout.scale(steered)  # [e, a, p]
    wv = vc @ w.T  # [e, label]
    wh = hc @ w.T  # [p, label]
    direct = a64[None, :, None, None] * wv[:, None, None, :] / r1[..., None]
    scale = wh[None, None] * (1.0 / r1[..., None] - 1.0 / r0[None, None, :, None])
    total = readout.logits(steered) - readout.logits(h64)[None, None]
    cosine = (vc @ w.T) / (vc.norm(dim=-1)[:, None] * w.norm(dim=-1)[None]).clamp_min(1e-30)
    return SteeringDecomposition(
        total.float(),
        direct.float(),
        scale.float(),
        cosine.float(),
        vc.norm(dim=-1).float(),
        w.norm(dim=-1).float(),
        r0.float(),
        r1.float(),
    )


@dataclass(frozen=True)
class PushChange:
    """Change of the per-unit direct push ``w . v / r`` from a reference step to step t,
    split exactly into ``vector + readout + scale``, ``[emotion]`` for the diagonal labels."""

    total: Float[Tensor, " emotion"]
    vector: Float[Tensor, " emotion"]
    readout: Float[Tensor, " emotion"]
    scale: Float[Tensor, " emotion"]


def direct_push_change(
    w_ref: Float[Tensor, "emotion d_model"],
    v_ref: Float[Tensor, "emotion d_model"],
    r_ref: float,
    w_t: Float[Tensor, "emotion d_model"],
    v_t: Float[Tensor, "emotion d_model"],
    r_t: float,
) -> PushChange:
    """``w_t.v_t/r_t - w_0.v_0/r_0 = (w_0.(v_t-v_0))/r_0 + ((w_t-w_0).v_t)/r_0
    + (w_t.v_t)(1/r_t - 1/r_0)``: the vector moved, the readout row moved, the scale moved.

    Rows ``w`` are the diagonal labels' effective rows (``u * g``), ``r`` a typical residual
    scale (e.g. the mean ``r(h)`` of the steered prompts).
    """
    w0, v0, wt, vt = (x.double() for x in (w_ref, v_ref, w_t, v_t))
    vector = (w0 * (vt - v0)).sum(-1) / r_ref
    readout = ((wt - w0) * vt).sum(-1) / r_ref
    scale = (wt * vt).sum(-1) * (1.0 / r_t - 1.0 / r_ref)
    total = (wt * vt).sum(-1) / r_t - (w0 * v0).sum(-1) / r_ref
    return PushChange(total.float(), vector.float(), readout.float(), scale.float())


@dataclass(frozen=True)
class LogPushChange:
    """Order-free split of the change of the log per-unit push ``log(w . v / r)`` from a
    reference step to step t, ``[emotion]`` float64: ``push = log_w + log_v + log_cos -
    log_scale`` exactly (each term the change of ``log|w|``, ``log|v|``, ``log cos(w, v)`` and
    ``log r``; ``log_scale`` enters with a minus sign). NaN where ``cos(w, v) <= 0`` at either
    step (the log of a non-positive push has no meaning)."""

    push: Float[Tensor, " emotion"]
    w: Float[Tensor, " emotion"]
    v: Float[Tensor, " emotion"]
    cos: Float[Tensor, " emotion"]
    scale: Float[Tensor, " emotion"]


def _log_terms(w: Tensor, v: Tensor, r: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``log|w|``, ``log|v|``, ``log cos(w, v)`` (NaN for cos <= 0), ``log r`` and the log
    push ``log(w . v / r)`` computed from the dot product itself (NaN for a push <= 0)."""
    w_norm, v_norm = w.norm(dim=-1), v.norm(dim=-1)
    dot = (w * v).sum(-1)
    cos = dot / (w_norm * v_norm)
    nan = torch.full_like(dot, torch.nan)
    log_cos = torch.where(cos > 0, cos.clamp_min(1e-300).log(), nan)
    log_push = torch.where(dot > 0, (dot.clamp_min(1e-300) / r).log(), nan)
    log_r = torch.full_like(dot, float(torch.tensor(r, dtype=torch.float64).log()))
    return w_norm.log(), v_norm.log(), log_cos, log_r, log_push


def log_push_change(
    w_ref: Float[Tensor, "emotion d_model"],
    v_ref: Float[Tensor, "emotion d_model"],
    r_ref: float,
    w_t: Float[Tensor, "emotion d_model"],
    v_t: Float[Tensor, "emotion d_model"],
    r_t: float,
) -> LogPushChange:
    """``log(w_t.v_t/r_t) - log(w_0.v_0/r_0) = d log|w| + d log|v| + d log cos(w, v) - d log r``:
    the additive (order-free) split of the push's relative change, no interaction term.

    Arguments as in :func:`direct_push_change` (the same effective rows ``w = u * g``, vectors
    and typical scale ``r``); computed in float64. Each term depends on its own factor only, so
    no order of "change the vector first, then the readout" enters (unlike
    :func:`direct_push_change`, which gives the interaction to the readout). Rows with
    ``cos(w, v) <= 0`` at either step are NaN in every column.
    """
    ref = _log_terms(w_ref.double(), v_ref.double(), r_ref)
    cur = _log_terms(w_t.double(), v_t.double(), r_t)
    d_w, d_v, d_cos, d_r, d_push = (c - p for c, p in zip(cur, ref, strict=True))
    defined = ~torch.isnan(d_cos)
    nan = torch.full_like(d_push, torch.nan)
    keep = [torch.where(defined, x, nan) for x in (d_push, d_w, d_v, d_cos, d_r)]
    return LogPushChange(*keep)


def transfer_effect(
    readout: Readout,
    h: Float[Tensor, "prompt d_model"],
    vectors: Float[Tensor, "emotion d_model"],
    alpha: float,
) -> Float[Tensor, "emotion prompt label"]:
    """Final-layer logit change when a model (``readout``, its own prompt residuals ``h``) is
    steered with vectors from another checkpoint: the transfer experiment."""
    h64 = h.double()
    steered = h64[None] + alpha * vectors.double()[:, None, :]
    return (readout.logits(steered) - readout.logits(h64)[None]).float()


@dataclass(frozen=True)
class ComponentAttribution:
    """Direct logit attribution of the unsteered answer, ``[sample, component, label]``.

    Components: ``embed`` (what enters block 0), then ``attn L`` and ``mlp L`` for every block
    (``resid_mid - resid_pre`` and ``resid_post - resid_mid``), which sum to the final block
    output exactly. The final norm's scale is frozen at its value on the full residual (the
    usual DLA convention), so the components plus the label's bias sum to the label logit.
    """

    contributions: Float[Tensor, "sample component label"]
    bias: Float[Tensor, " label"]
    components: tuple[str, ...]

    @property
    def logits(self) -> Float[Tensor, "sample label"]:
        return self.contributions.sum(1) + self.bias


@torch.no_grad()
def component_attribution(
    model, token_ids: Sequence[Sequence[int]], readout: Readout, batch_size: int = 8
) -> ComponentAttribution:
    """Decompose each prompt's label logits over the embedding and every attention and MLP
    output, through the final norm with its scale frozen (see :class:`ComponentAttribution`)."""
    from emolens.data.tokens import pad, pad_id
    from emolens.measure.activations import hooks_at_answer

    n_layers = model.n_layers
    names = [hooks.resid_pre(0)]
    for layer in range(n_layers):
        names += [hooks.resid_mid(layer), hooks.resid_post(layer)]
    parts = []
    pid = pad_id(model.tokenizer)
    for start in range(0, len(token_ids), batch_size):
        ids, mask = pad(token_ids[start : start + batch_size], pid, "right")
        at_answer = hooks_at_answer(model, ids, mask, names)
        stream = [at_answer[n] for n in names]
        pieces = [stream[0]] + [b - a for a, b in zip(stream[:-1], stream[1:])]
        parts.append(torch.stack(pieces, 1))  # [batch, component, d]
    comps = torch.cat(parts).double()  # [sample, component, d]
    final = comps.sum(1)
    r = readout.scale(final)  # [sample]
    centered = readout.center(comps)
    w = readout.effective_rows.double()
    contributions = (centered @ w.T) / r[:, None, None]
    labels = ["embed"] + [
        f"{kind} {layer}" for layer in range(n_layers) for kind in ("attn", "mlp")
    ]
    return ComponentAttribution(
        contributions.float(), readout.effective_bias.float(), tuple(labels)
    )
