"""Hook names, from one place: never hand-write a module path elsewhere."""

from collections.abc import Sequence

#: TransformerLens 4's own name of a block's output; ``blocks.{layer}.hook_resid_post`` is the
#: HookedTransformer alias TL 4.3 marks deprecated (``BlockBridge.hook_aliases``).
RESID_POST = "blocks.{layer}.hook_out"
RESID_PRE = "blocks.{layer}.hook_in"
RESID_MID = "blocks.{layer}.ln2.hook_in"
ATTN_OUT = "blocks.{layer}.attn.hook_out"
MLP_OUT = "blocks.{layer}.mlp.hook_out"
EMBED_OUT = "embed.hook_out"
#: The final norm's output, gain (and bias) included: what the unembedding reads, and HF's
#: ``hidden_states[-1]`` for Llama and Gemma. (``ln_final.hook_normalized`` is before the gain.)
FINAL_NORM = "ln_final.hook_out"

#: Where the final layer's residual h is read (and steered): ``"block-out"`` is the last
#: block's output, before the final norm (``blocks.{n-1}.hook_out``, the paper's equation 2 as
#: TransformerLens names it); ``"final-norm"`` is the final norm's output (:data:`FINAL_NORM`).
#: Other layers have no final norm and are always read at their block output.
READ_POINTS: tuple[str, ...] = ("block-out", "final-norm")

#: Each name above and the HookedTransformer alias it replaces (same hook point on the bridge).
ALIASES = {
    RESID_POST: "blocks.{layer}.hook_resid_post",
    RESID_PRE: "blocks.{layer}.hook_resid_pre",
    RESID_MID: "blocks.{layer}.hook_resid_mid",
    ATTN_OUT: "blocks.{layer}.hook_attn_out",
    MLP_OUT: "blocks.{layer}.hook_mlp_out",
    EMBED_OUT: "hook_embed",
}


def resid_post(layer: int) -> str:
    """Output of block ``layer`` (the residual stream after it): ``blocks.{layer}.hook_out``."""
    return RESID_POST.format(layer=layer)


def resid_pre(layer: int) -> str:
    """Input of block ``layer``."""
    return RESID_PRE.format(layer=layer)


def resid_mid(layer: int) -> str:
    """Residual stream of block ``layer`` after its attention, before its MLP (the second
    norm's input)."""
    return RESID_MID.format(layer=layer)


def attn_out(layer: int) -> str:
    return ATTN_OUT.format(layer=layer)


def mlp_out(layer: int) -> str:
    return MLP_OUT.format(layer=layer)


def embed_out() -> str:
    return EMBED_OUT


def final_norm() -> str:
    """Output of the final norm (gain included): ``ln_final.hook_out``."""
    return FINAL_NORM


def check_read_point(read_point: str) -> str:
    if read_point not in READ_POINTS:
        raise ValueError(f"read point must be one of {READ_POINTS}, not {read_point!r}")
    return read_point


def layer_read_point(layer: int, n_layers: int, read_point: str) -> str:
    """The read point of ``layer``'s residual: ``read_point`` for the final layer, always
    ``"block-out"`` for the others (they have no final norm)."""
    check_read_point(read_point)
    return read_point if layer == n_layers - 1 else "block-out"


def read_hook(layer: int, n_layers: int, read_point: str = "block-out") -> str:
    """The hook where ``layer``'s residual is read and steered: :data:`FINAL_NORM` for the
    final layer at the ``"final-norm"`` read point, else ``blocks.{layer}.hook_out``."""
    if layer_read_point(layer, n_layers, read_point) == "final-norm":
        return FINAL_NORM
    return resid_post(layer)


def manifest_names(read_point: str = "block-out") -> dict[str, str]:
    """The hook names the analysis reads and steers at, as the manifest records them."""
    names = {"vectors": f"{RESID_POST} (answer position)", "steering": RESID_POST}
    if check_read_point(read_point) == "final-norm":
        names["final_layer"] = f"{FINAL_NORM} (read point final-norm: the last layer)"
    return names


def check_layers(layers: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """Validate a layer list: negative counts from the end, ``"all"`` (or None) is every layer,
    ``"mid"`` the middle layer (``n_layers // 2``); a string is comma-separated (``"mid,-1"``)."""
    if layers is None or layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        try:
            layers = [
                n_layers // 2 if x.strip() == "mid" else int(x)
                for x in layers.split(",")
                if x.strip()
            ]
        except ValueError:
            raise ValueError(
                f"cannot read the layer list {layers!r}: give 'all' or "
                "comma-separated integers (or 'mid'), e.g. 6,12,-1"
            ) from None
    out = []
    for layer in layers:
        idx = layer + n_layers if layer < 0 else layer
        if not 0 <= idx < n_layers:
            raise ValueError(
                f"layer {layer} is out of range: this model has {n_layers} layers "
                f"(0..{n_layers - 1}, or -1 for the last)"
            )
        out.append(idx)
    if len(set(out)) != len(out):
        raise ValueError(f"layer list {list(layers)} names a layer twice")
    return out


def attn_z(layer: int) -> str:
    """Per-head attention outputs of block ``layer`` before ``W_O``, ``[batch, pos, head,
    d_head]``: the input of the bridge's output projection (TL 4's name; ``attn.hook_z`` is
    its HookedTransformer alias)."""
    return f"blocks.{layer}.attn.o.hook_in"


def attn_post_norm_in(layer: int) -> str:
    """Input of block ``layer``'s norm after the attention output projection, where the
    architecture has one (Gemma's ``post_attention_layernorm``, TL 4's ``ln1_post``)."""
    return f"blocks.{layer}.ln1_post.hook_in"
