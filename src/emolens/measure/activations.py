"""Residual-stream activations and label logits at the answer position.

For each prompt, :func:`collect_activations` keeps the output of the requested blocks
(``blocks.{l}.hook_out``) at the answer position (the last real token) and the logits of
each label's first token there. Hooks keep only the answer row of each batch and the forward pass
stops after the last block, so memory grows with samples x layers x d_model, never with the
sequence length, and the full ``[batch, seq, vocab]`` logits are never computed: the answer
logits are ``unembed(ln_final(h))`` of the final block output ``h`` at the answer position,
computed with the model's own modules (:func:`answer_readout`), which reproduces the full
forward pass (raw HF numerics unless the bridge is in compatibility mode).
"""

import copy
import types
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from emolens.data.tokens import last_token_index, pad, pad_id
from emolens.model import hooks
from emolens.store.files import atomic_path, read_json, versions, write_json

# --------------------------------------------------------------------------- on-disk helpers


def save_artifact(
    directory: str | Path, stem: str, tensors: Mapping[str, Tensor], meta: Mapping
) -> Path:
    """Write ``stem.safetensors`` and the ``stem.json`` sidecar (with versions) into
    ``directory``, each atomically, so a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_path(directory / f"{stem}.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    write_json(directory / f"{stem}.json", {**meta, "versions": versions()})
    return directory


def load_artifact(directory: str | Path, stem: str) -> tuple[dict[str, Tensor], dict]:
    """Read what :func:`save_artifact` wrote."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensor_path, meta_path = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    if not tensor_path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"{directory} holds no {stem}.safetensors + {stem}.json")
    return load_file(str(tensor_path)), read_json(meta_path)


# --------------------------------------------------------------------------- model helpers


def bridge_of(model):
    """The ``TransformerBridge`` of a ``LoadedModel`` (or the bridge itself)."""
    return getattr(model, "bridge", model)


def numerics_mode(model) -> str:
    """``"compatibility"`` (HookedTransformer numerics) or ``"raw-hf"`` (the bridge default)."""
    return "compatibility" if getattr(bridge_of(model), "compatibility_mode", False) else "raw-hf"


def input_device(model) -> torch.device:
    """Where token ids go: the device of the bridge's first parameter."""
    return next(bridge_of(model).parameters()).device


#: The dtype of every readout (``unembed(ln_final(h))`` on answer rows), whatever the model's.
READOUT_DTYPE = torch.float32

_READOUT_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _strip_hooks(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return module


def readout_modules(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The bridge's ``ln_final`` and ``unembed`` in float32 (:data:`READOUT_DTYPE`).

    For a float32 (or float64) model these are the bridge's own modules. For a bfloat16 or
    float16 model they are float32 copies of them, made once (hooks left behind) and remade
    only when those modules' parameters change (in place or replaced): the readout is a
    ``[rows, d_model] x [d_model, vocab]`` product, cheap in float32, while reading out in
    bfloat16 would round every logit to its spacing (0.06-0.125 at logits of 10-30) and
    quantise steering effects with it.
    """
    bridge = bridge_of(model)
    ln, un = bridge.ln_final, bridge.unembed
    params = list(ln.parameters()) + list(un.parameters())
    if all(p.dtype in (torch.float32, torch.float64) for p in params):
        return ln, un
    key = tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = _READOUT_COPIES.get(bridge)
    if cached is None or cached[0] != key:
        copies = tuple(_strip_hooks(copy.deepcopy(m)).to(READOUT_DTYPE) for m in (ln, un))
        for m in copies:
            m.requires_grad_(False)
        cached = (key, *copies)
        _READOUT_COPIES[bridge] = cached
    return cached[1], cached[2]


def readout_dtype(model) -> torch.dtype:
    """The dtype :func:`answer_readout` computes logits in (float32, or float64 for a float64
    model)."""
    return next(readout_modules(model)[1].parameters()).dtype


def _readout_device(bridge) -> torch.device:
    return next(bridge.unembed.parameters()).device


def logit_softcap(bridge) -> float | None:
    """The HF config's ``final_logit_softcapping`` (None where the model has none)."""
    config = getattr(getattr(bridge, "original_model", None), "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def default_chunk_rows(model, budget_bytes: int = 256 * 2**20) -> int:
    """How many rows of full-vocabulary float32 logits fit in ``budget_bytes`` (at least 1)."""
    vocab = int(bridge_of(model).cfg.d_vocab)
    return max(1, budget_bytes // (vocab * 4 * 2))


@torch.no_grad()
def answer_readout(
    model,
    h: Float[Tensor, "sample d_model"],
    label_token_ids: Sequence[int],
    *,
    chunk_rows: int | None = None,
    read_point: str = "block-out",
) -> tuple[Float[Tensor, "sample label"], Float[Tensor, " sample"], Float[Tensor, " sample"]]:
    """Label logits, logsumexp and mean logit over the vocabulary of final-layer residuals ``h``.

    The logits are ``unembed(ln_final(h))`` with the model's own modules in float32 whatever
    the model's dtype (:func:`readout_modules`; ``h`` is never cast down to a bfloat16 model's
    dtype), plus the final logit soft-capping of the HF config, if any, computed in chunks of
    ``chunk_rows`` rows so the ``[rows, vocab]`` block stays small. With ``read_point=
    "final-norm"`` ``h`` is already the final norm's output and the logits are ``unembed(h)``.
    Results are float32 on the CPU.
    """
    bridge = bridge_of(model)
    ln_final, unembed = readout_modules(bridge)
    if hooks.check_read_point(read_point) == "final-norm":
        ln_final = torch.nn.Identity()
    device = _readout_device(bridge)
    dtype = next(unembed.parameters()).dtype
    chunk = chunk_rows or default_chunk_rows(bridge)
    cap = logit_softcap(bridge)
    label_idx = torch.as_tensor(list(label_token_ids), dtype=torch.long, device=device)
    outs: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for start in range(0, h.shape[0], chunk):
        x = h[start : start + chunk].to(device=device, dtype=dtype)[:, None, :]
        logits = unembed(ln_final(x))[:, 0, :].float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        outs[0].append(logits[:, label_idx].cpu())
        outs[1].append(torch.logsumexp(logits, dim=-1).cpu())
        outs[2].append(logits.mean(dim=-1).cpu())
    if not outs[0]:
        n_labels = len(label_idx)
        return torch.zeros(0, n_labels), torch.zeros(0), torch.zeros(0)
    return torch.cat(outs[0]), torch.cat(outs[1]), torch.cat(outs[2])


@torch.no_grad()
def final_norm_rows(model, h: Float[Tensor, "sample d_model"]) -> Float[Tensor, "sample d_model"]:
    """``ln_final(h)`` of final-block outputs ``h`` with the model's own final norm in float32
    (:func:`readout_modules`, as every readout): the residual at the ``"final-norm"`` read point,
    so ``answer_readout(n, read_point="final-norm")`` equals ``answer_readout(h)``. HF's
    ``hidden_states[-1]`` is the same (for a bfloat16 model, rounded to bfloat16). Float32, CPU.
    """
    ln_final, unembed = readout_modules(bridge_of(model))
    param = next(unembed.parameters())
    x = h.to(device=param.device, dtype=param.dtype)[:, None, :]
    return ln_final(x)[:, 0, :].float().cpu()


#: What :func:`hf_attention` asks of HF, where the model supports it.
FAST_ATTENTION = "sdpa"


def _attention_components(bridge) -> list:
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return [m for m in bridge.modules() if isinstance(m, AttentionBridge)]


def _attention_internals_hooked(bridge) -> bool:
    """Whether a hook is attached inside an attention component (patterns, scores, rotated
    queries, ...): only its ``hook_in`` / ``hook_out`` fire under :func:`hf_attention`."""
    for name, point in bridge.hook_dict.items():
        if ".attn" not in name or name.endswith(("attn.hook_in", "attn.hook_out")):
            continue
        if point.fwd_hooks or point.bwd_hooks:
            return True
    return False


def attention_implementation(bridge) -> str:
    """What :func:`hf_attention` would run for ``bridge`` now: ``"sdpa"`` or ``"eager"``."""
    hf = getattr(bridge_of(bridge), "original_model", None)
    if hf is None or not getattr(hf, "_supports_sdpa", False):
        return "eager"
    if not getattr(hf, "_can_set_attn_implementation", lambda: False)():
        return "eager"
    if not _attention_components(bridge_of(bridge)):
        return "eager"
    return "eager" if _attention_internals_hooked(bridge_of(bridge)) else FAST_ATTENTION


@contextmanager
def hf_attention(model) -> Iterator[str]:
    """Run the bridge's attention components as HF's own attention with SDPA, where the model
    supports it and no hook inside attention is attached; yields ``"sdpa"`` or ``"eager"``.

    TransformerLens 4.3 forces eager attention and reimplements it step by step
    (``PositionEmbeddingsAttentionBridge.forward``) so that ``hook_pattern`` and
    ``hook_attn_scores`` fire. Passes that read only block inputs and outputs (collection,
    steering at the residual stream) need neither: inside the ``with`` block each attention
    component delegates to the HF module it wraps (``AttentionBridge.forward``: ``hook_in`` ->
    HF -> ``hook_out``) and the HF config asks for SDPA (masks included). Numerics are HF's
    SDPA ones (float32: within ~1e-6 relative of eager). Everything is restored on exit.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    bridge = bridge_of(model)
    if attention_implementation(bridge) == "eager":
        yield "eager"
        return
    hf = bridge.original_model
    configs = {}
    for module in (hf, *hf.modules()):
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = (config, config._attn_implementation)
    components = _attention_components(bridge)
    try:
        hf.set_attn_implementation(FAST_ATTENTION)
        for config, _ in configs.values():
            config._attn_implementation = FAST_ATTENTION
        for component in components:  # bridge components pass setattr through to HF's module
            component.__dict__["forward"] = types.MethodType(AttentionBridge.forward, component)
        yield FAST_ATTENTION
    finally:
        for component in components:
            component.__dict__.pop("forward", None)
        for config, before in configs.values():
            config._attn_implementation = before


class _StopForward(Exception):
    """Raised by a hook once everything needed from a forward pass is stored."""


def answer_rows_hook(store: dict, key, answer_index: Int[Tensor, " sample"], *, stop: bool = False):
    """A hook storing ``tensor[row, answer_index[row]]`` (float32, CPU) in ``store[key]``;
    with ``stop`` it then ends the forward pass (see :func:`run_to_answer_rows`)."""

    def hook_fn(tensor, *, hook):
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        store[key] = tensor[rows, answer_index.to(tensor.device)].detach().float().cpu()
        if stop:
            raise _StopForward
        return None

    return hook_fn


@torch.no_grad()
def hooks_at_answer(
    model,
    input_ids: Int[Tensor, "sample seq"],
    attention_mask: Int[Tensor, "sample seq"],
    names: Sequence[str],
    stop_after: str | None = None,
) -> dict[str, Tensor]:
    """One forward pass keeping ``activation[row, answer[row]]`` of each hook in ``names``
    (float32, CPU; ``[sample, ...]``), stopped once ``stop_after`` fired (default the last
    block's output): neither the final norm nor the unembedding runs (``run_with_cache`` keeps
    every position and computes the logits at all of them, 0.75 GB for a batch of 8 Gemma
    prompts). Every hook in ``names`` must fire before ``stop_after`` does. Hooks already on
    the bridge (e.g. steering) stay active."""
    bridge = bridge_of(model)
    answer = last_token_index(attention_mask)
    last = stop_after or hooks.resid_post(int(bridge.cfg.n_layers) - 1)
    store: dict[str, Tensor] = {}
    fwd = [(n, answer_rows_hook(store, n, answer)) for n in dict.fromkeys(names) if n != last]
    fwd.append((last, answer_rows_hook(store, last, answer, stop=True)))
    device = input_device(bridge)
    with bridge.hooks(fwd_hooks=fwd):
        try:
            bridge(input_ids.to(device), attention_mask=attention_mask.to(device))
        except _StopForward:
            pass
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire before {last} stopped the pass")
    return {n: store[n] for n in names}


def run_to_answer_rows(
    model,
    input_ids: Int[Tensor, "sample seq"],
    attention_mask: Int[Tensor, "sample seq"],
    layers: Sequence[int],
) -> dict[int, Float[Tensor, "sample d_model"]]:
    """:func:`hooks_at_answer` of ``blocks.{l}.hook_out`` for each layer in ``layers``
    (float32, CPU), stopped after the last of them, so neither later blocks nor the unembedding
    run. Attention runs as HF's SDPA where it can (:func:`hf_attention`)."""
    wanted = sorted(set(layers))
    names = [hooks.resid_post(layer) for layer in wanted]
    with hf_attention(bridge_of(model)):
        rows = hooks_at_answer(model, input_ids, attention_mask, names, stop_after=names[-1])
    return {layer: rows[name] for layer, name in zip(wanted, names, strict=True)}


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activations:
    """Answer-position residuals and label logits of a set of prompts, for one model.

    ``label_logits[:, j]`` is the logit of label ``j``'s first token (labels in label-set order);
    ``logsumexp`` and ``mean_logit`` are over the whole vocabulary at the same position, so
    ``label_logits - logsumexp[:, None]`` are log-probabilities. ``gold`` is -1 where unknown.
    """

    resid: Float[Tensor, "sample layer d_model"]
    label_logits: Float[Tensor, "sample label"]
    logsumexp: Float[Tensor, " sample"]
    mean_logit: Float[Tensor, " sample"]
    layers: tuple[int, ...]
    sample_ids: tuple[str, ...]
    gold: Int[Tensor, " sample"]
    label_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    FILE_STEM = "activations"

    def __post_init__(self) -> None:
        n = self.resid.shape[0]
        if self.resid.shape[1] != len(self.layers):
            raise ValueError(f"resid has {self.resid.shape[1]} layers but layers={self.layers}")
        if len(self.sample_ids) != n:
            raise ValueError(f"{len(self.sample_ids)} sample ids for {n} samples")
        if len(set(self.sample_ids)) != n:
            raise ValueError("sample ids must be unique")
        if self.label_names and len(self.label_names) != self.label_logits.shape[1]:
            raise ValueError(
                f"{len(self.label_names)} label names for "
                f"{self.label_logits.shape[1]} label logit columns"
            )

    @property
    def n_samples(self) -> int:
        return self.resid.shape[0]

    @property
    def read_point(self) -> str:
        """Where the final layer's residual was read: ``"block-out"`` (before the final norm)
        or ``"final-norm"`` (its output); see :data:`emolens.model.hooks.READ_POINTS`."""
        return str(self.meta.get("read_point", "block-out"))

    def layer_read_point(self, layer: int) -> str:
        """The read point of ``layer``'s residuals (``"block-out"`` but for the final layer)."""
        if self.read_point == "block-out":
            return "block-out"
        n_layers = self.meta.get("n_layers")
        if n_layers is None:
            raise ValueError(
                "activations read at the final norm must record the model's depth (n_layers)"
            )
        return hooks.layer_read_point(layer, int(n_layers), self.read_point)

    @property
    def predictions(self) -> Int[Tensor, " sample"]:
        """Argmax over the label first-token logits."""
        return self.label_logits.argmax(dim=-1)

    @property
    def correct(self) -> Bool[Tensor, " sample"]:
        """Whether the prediction is the gold label (False where the gold label is unknown)."""
        return (self.predictions == self.gold) & (self.gold >= 0)

    @property
    def label_logprobs(self) -> Float[Tensor, "sample label"]:
        return self.label_logits - self.logsumexp[:, None]

    def layer_position(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not collected; collected layers: {self.layers}")
        return self.layers.index(layer)

    def layer(self, layer: int) -> Float[Tensor, "sample d_model"]:
        """The answer-position residuals after block ``layer``."""
        return self.resid[:, self.layer_position(layer)]

    def mean_norm(self, layer: int) -> float:
        """Mean L2 norm of the residuals at ``layer`` (a scale for steering strengths)."""
        return float(self.layer(layer).norm(dim=-1).mean())

    def select(self, mask: Bool[Tensor, " sample"]) -> "Activations":
        """The samples where ``mask`` is True."""
        keep = mask.nonzero().flatten().tolist()
        return Activations(
            self.resid[mask],
            self.label_logits[mask],
            self.logsumexp[mask],
            self.mean_logit[mask],
            self.layers,
            tuple(self.sample_ids[i] for i in keep),
            self.gold[mask],
            self.label_names,
            dict(self.meta),
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``activations.safetensors`` and ``activations.json`` into ``directory``."""
        tensors = {
            "resid": self.resid,
            "label_logits": self.label_logits,
            "logsumexp": self.logsumexp,
            "mean_logit": self.mean_logit,
            "gold": self.gold,
            "predictions": self.predictions,
        }
        meta = {
            "layers": list(self.layers),
            "sample_ids": list(self.sample_ids),
            "label_names": list(self.label_names),
            "hook_names": [self._hook_name(layer) for layer in self.layers],
            "meta": self.meta,
        }
        return save_artifact(directory, self.FILE_STEM, tensors, meta)

    def _hook_name(self, layer: int) -> str:
        if self.layer_read_point(layer) == "final-norm":
            return hooks.final_norm()
        return hooks.resid_post(layer)

    @classmethod
    def load(cls, directory: str | Path) -> "Activations":
        t, m = load_artifact(directory, cls.FILE_STEM)
        return cls(
            t["resid"],
            t["label_logits"],
            t["logsumexp"],
            t["mean_logit"],
            tuple(m["layers"]),
            tuple(m["sample_ids"]),
            t["gold"],
            tuple(m["label_names"]),
            m.get("meta", {}),
        )


def _check_finite(resid: Tensor, logits: Tensor, sample_ids: Sequence[str]) -> None:
    bad = ~(torch.isfinite(resid).flatten(1).all(1) & torch.isfinite(logits).all(1))
    if bool(bad.any()):
        names = [sample_ids[i] for i in bad.nonzero().flatten().tolist()]
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        raise ValueError(
            f"non-finite activations or logits (NaN/inf) for samples {shown}; "
            "check the model's dtype (float16 overflows) and its weights"
        )


def collect_activations(
    model,
    token_ids: Sequence[Sequence[int]],
    label_token_ids: Sequence[int],
    layers: Sequence[int] | str,
    *,
    gold: Int[Tensor, " sample"] | Sequence[int] | None = None,
    sample_ids: Sequence[str] | None = None,
    label_names: Sequence[str] = (),
    batch_size: int = 8,
    padding_side: str = "right",
    progress: bool = True,
    meta: Mapping | None = None,
    read_point: str = "block-out",
) -> Activations:
    """Answer-position residuals at ``layers`` and label first-token logits for each prompt.

    ``token_ids`` are tokenized prompts (:func:`emolens.data.tokens.encode`), batched by similar
    length and padded on ``padding_side`` (the answer position comes from the attention mask,
    so both sides work). Negative layers count from the end; ``"all"`` is every layer. Label
    logits come from :func:`answer_readout` on the final block output, not from a
    full-vocabulary forward. With ``read_point="final-norm"`` the final layer's residuals are
    those after the final norm (:func:`final_norm_rows`; other layers are unchanged, and so
    are the logits).
    Raises ``ValueError`` naming the samples whose activations are not finite.
    """
    hooks.check_read_point(read_point)
    bridge = bridge_of(model)
    n_layers = int(bridge.cfg.n_layers)
    layers = hooks.check_layers(layers if isinstance(layers, str) else list(layers), n_layers)
    n = len(token_ids)
    if n == 0:
        raise ValueError("no prompts to collect activations for")
    sample_ids = tuple(str(s) for s in (sample_ids if sample_ids is not None else range(n)))
    if len(sample_ids) != n:
        raise ValueError(f"{len(sample_ids)} sample ids for {n} prompts")
    gold_t = (
        torch.full((n,), -1, dtype=torch.long)
        if gold is None
        else torch.as_tensor(gold, dtype=torch.long).clone()
    )
    if gold_t.shape != (n,):
        raise ValueError(f"gold has shape {tuple(gold_t.shape)}, expected ({n},)")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")

    last = n_layers - 1
    wanted = sorted(set(layers) | {last})
    order = sorted(range(n), key=lambda i: len(token_ids[i]))
    resid = torch.zeros(n, len(layers), int(bridge.cfg.d_model))
    final = torch.zeros(n, int(bridge.cfg.d_model))
    pid = pad_id(getattr(model, "tokenizer", None) or bridge.tokenizer)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for batch in tqdm(batches, desc="activations", disable=not progress, leave=False):
        ids, mask = pad([token_ids[i] for i in batch], pid, padding_side)
        rows = run_to_answer_rows(bridge, ids, mask, wanted)
        index = torch.as_tensor(batch)
        for j, layer in enumerate(layers):
            resid[index, j] = rows[layer]
        final[index] = rows[last]
    label_logits, lse, mean = answer_readout(bridge, final, label_token_ids)
    if read_point == "final-norm" and last in layers:
        resid[:, layers.index(last)] = final_norm_rows(bridge, final)
    _check_finite(resid, torch.cat([label_logits, lse[:, None], mean[:, None]], 1), sample_ids)
    info = {
        "numerics": numerics_mode(bridge),
        "label_token_ids": [int(i) for i in label_token_ids],
        "padding_side": padding_side,
        "readout": "unembed(ln_final(resid_post[-1]))",
        "readout_dtype": str(readout_dtype(bridge)).split(".")[-1],
        "attention": attention_implementation(bridge),
        "n_layers": n_layers,
    }
    if read_point != "block-out":  # (block-out, the default, is what no entry means)
        info["read_point"] = read_point
    for key in ("spec", "weights_hash", "dtype", "device"):
        if hasattr(model, key):
            info[key] = getattr(model, key)
    info.update(meta or {})
    return Activations(
        resid, label_logits, lse, mean, tuple(layers), sample_ids, gold_t, tuple(label_names), info
    )
