"""Hook names, from one place: never hand-write a module path elsewhere."""


def resid_post(layer: int) -> str:
    """Output of block ``layer`` (the residual stream after it)."""
    return f"blocks.{layer}.hook_resid_post"


def resid_pre(layer: int) -> str:
    """Input of block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_mid(layer: int) -> str:
    """Residual stream of block ``layer`` after its attention, before its MLP."""
    return f"blocks.{layer}.hook_resid_mid"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def embed_out() -> str:
    return "hook_embed"


FINAL_NORM = "ln_final.hook_normalized"


def check_layers(layers, n_layers: int) -> list[int]:
    """Validate a layer list: negative counts from the end, ``"all"`` is every layer, ``"mid"``
    the middle layer (``n_layers // 2``); a string is comma-separated (``"mid,-1"``)."""
    if layers in (None, "all"):
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
