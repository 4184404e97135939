"""Concept vectors that travel: to and from steering-vectors' ``SteeringVector``, repeng's
``ControlVector``, and the GGUF control-vector files that llama.cpp reads (``--control-vector``).

One layer convention throughout: emolens layer ``L`` is the output of block ``L`` (TransformerLens
``blocks.{L}.hook_out``), which is what all three add to at index ``L``:
steering-vectors' ``"decoder_block"`` layer ``L`` (a forward hook on ``model.layers[L]``),
repeng's ``directions[L]`` (``ControlModel`` wraps ``model.layers[L]``; repeng reads
``hidden_states[L + 1]``) and llama.cpp's ``direction.L`` (added after block ``L``; llama.cpp
never applies ``direction.0``, so a GGUF file cannot steer the first block's output).
All three add the vector at every position, as emolens' ``positions="all"`` does.

The libraries are optional: ``pip install 'emolens[export]'`` and then
``pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0`` (both declare transformers<5 or
numpy<2, which transformer-lens 4 rules out; both work here, as the tests check). The GGUF
writer and reader need only the ``gguf`` package and write the format of repeng's
``export_gguf``.
"""

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emolens.measure.vectors import ConceptVectors

GGUF_ARCH = "controlvector"
INSTALL = (
    "pip install 'emolens[export]' && pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0"
)


def _layers_of(vectors: ConceptVectors, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(vectors.layers)
    chosen = [int(layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in vectors.layers]
    if missing:
        raise KeyError(f"no concept vectors at layers {missing}; layers: {list(vectors.layers)}")
    return chosen


def _emotion_index(vectors: ConceptVectors, emotion: str) -> int:
    if emotion not in vectors.emotions:
        raise KeyError(
            f"no concept vector for {emotion!r}; emotions: {list(vectors.emotions)}"
            + (
                f" ({emotion!r} was dropped: too few kept samples)"
                if emotion in vectors.dropped
                else ""
            )
        )
    return vectors.emotions.index(emotion)


def directions(
    vectors: ConceptVectors, emotion: str, layers: Iterable[int] | None = None, scale: float = 1.0
) -> dict[int, torch.Tensor]:
    """``{layer: scale * v_emotion[layer]}`` (float32, ``[d_model]`` each)."""
    e = _emotion_index(vectors, emotion)
    return {
        layer: (scale * vectors.layer(layer)[e]).float().clone()
        for layer in _layers_of(vectors, layers)
    }


def from_directions(
    per_emotion: Mapping[str, Mapping[int, torch.Tensor | np.ndarray]],
    source: str,
    neutral: str = "no-emotion",
) -> ConceptVectors:
    """A :class:`ConceptVectors` from ``{emotion: {layer: [d_model]}}``; every emotion must
    have the same layers. Counts are unknown (0); ``meta["imported_from"]`` names ``source``."""
    if not per_emotion:
        raise ValueError("no vectors to import")
    emotions = tuple(per_emotion)
    layer_sets = {e: sorted(int(k) for k in d) for e, d in per_emotion.items()}
    layers = layer_sets[emotions[0]]
    for e, ls in layer_sets.items():
        if ls != layers:
            raise ValueError(
                f"{e!r} has vectors at layers {ls}, {emotions[0]!r} at {layers}: "
                "import emotions with the same layers together"
            )
    stacked = torch.stack(
        [
            torch.stack(
                [
                    torch.as_tensor(
                        np.asarray(per_emotion[e][layer]), dtype=torch.float32
                    ).flatten()
                    for e in emotions
                ]
            )
            for layer in layers
        ]
    )
    return ConceptVectors(
        stacked,
        torch.zeros(len(emotions), dtype=torch.int64),
        emotions,
        tuple(layers),
        neutral,
        meta={"imported_from": source},
    )


# --------------------------------------------------------------------------- steering-vectors


def _steering_vectors():
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        raise ImportError(f"exporting to steering-vectors needs it: {INSTALL}") from None
    return SteeringVector


def to_steering_vector(
    vectors: ConceptVectors, emotion: str, layers: Iterable[int] | None = None, scale: float = 1.0
):
    """steering-vectors' ``SteeringVector`` of one emotion: ``layer_activations[L] = scale *
    v[L]`` at ``"decoder_block"`` layers, so ``sv.apply(hf_model, multiplier=alpha)`` adds
    ``alpha * scale * v`` to block ``L``'s output at every position."""
    return _steering_vectors()(directions(vectors, emotion, layers, scale), "decoder_block")


def from_steering_vectors(
    per_emotion: Mapping[str, Any], neutral: str = "no-emotion"
) -> ConceptVectors:
    """:class:`ConceptVectors` from ``{emotion: SteeringVector}`` (``"decoder_block"`` only:
    other layer types are not block outputs)."""
    for e, sv in per_emotion.items():
        if sv.layer_type != "decoder_block":
            raise ValueError(
                f"{e!r}: a SteeringVector of layer_type {sv.layer_type!r} is not a "
                "block output; only 'decoder_block' vectors map to emolens layers"
            )
    return from_directions(
        {e: sv.layer_activations for e, sv in per_emotion.items()}, "steering-vectors", neutral
    )


# --------------------------------------------------------------------------- repeng


def _repeng_control_vector():
    """repeng's ``ControlVector``. repeng 0.4.0 names ``np.float_`` in three annotations,
    which NumPy 2 removed; it is defined as ``np.float64`` only while repeng is imported."""
    try:
        import sklearn  # noqa: F401  (repeng imports it; a clear message if it is missing)
    except ImportError:
        raise ImportError(f"repeng needs scikit-learn: {INSTALL}") from None
    shim = not hasattr(np, "float_")
    try:
        if shim:
            np.float_ = np.float64
        from repeng import ControlVector
    except ImportError:
        raise ImportError(f"exporting to repeng needs it: {INSTALL}") from None
    finally:
        if shim:
            del np.float_
    return ControlVector


def to_control_vector(
    vectors: ConceptVectors,
    emotion: str,
    model_type: str,
    layers: Iterable[int] | None = None,
    scale: float = 1.0,
):
    """repeng's ``ControlVector(model_type, directions={L: scale * v[L]})`` (float32 numpy);
    ``ControlModel(model, layer_ids).set_control(cv, coeff=alpha)`` adds ``alpha * scale * v``
    to block ``L``'s output. ``model_type`` is the HF ``config.model_type`` (e.g. ``llama``)."""
    dirs = {layer: t.numpy() for layer, t in directions(vectors, emotion, layers, scale).items()}
    return _repeng_control_vector()(model_type=model_type, directions=dirs)


def from_control_vectors(
    per_emotion: Mapping[str, Any], neutral: str = "no-emotion"
) -> ConceptVectors:
    """:class:`ConceptVectors` from ``{emotion: repeng ControlVector}``."""
    return from_directions({e: cv.directions for e, cv in per_emotion.items()}, "repeng", neutral)


# --------------------------------------------------------------------------- GGUF (llama.cpp)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "GGUF control vectors are written with the gguf package: pip install 'emolens[export]'"
        ) from None
    return gguf


def write_control_vector_gguf(
    vectors: ConceptVectors,
    emotion: str,
    path: str | Path,
    model_type: str,
    layers: Iterable[int] | None = None,
    scale: float = 1.0,
) -> Path:
    """Write one emotion's vectors as a llama.cpp control vector (``direction.L`` float32
    tensors, ``controlvector.model_hint``), the format of repeng's ``export_gguf``.

    llama.cpp never applies ``direction.0``: by default layer 0 is left out; asking for it is an
    error. Use with ``llama-cli --control-vector-scaled FILE alpha``.
    """
    gguf = _gguf()

    from emolens.store.files import atomic_path

    chosen = _layers_of(vectors, layers)
    if layers is None:
        chosen = [layer for layer in chosen if layer != 0]
    elif 0 in chosen:
        raise ValueError(
            "llama.cpp never applies a control vector at layer 0 (the first "
            "block's output); export layers >= 1"
        )
    if not chosen:
        raise ValueError(
            f"no layers to export (vectors at {list(vectors.layers)}; llama.cpp skips layer 0)"
        )
    dirs = directions(vectors, emotion, chosen, scale)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_type)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(dirs))
        for layer, v in dirs.items():
            writer.add_tensor(f"direction.{layer}", v.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_control_vector_gguf(path: str | Path) -> tuple[str, dict[int, np.ndarray]]:
    """``(model_hint, {layer: direction [d_model]})`` of a GGUF control vector file."""
    gguf = _gguf()

    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    if arch is not None and bytes(arch.parts[-1]).decode("utf-8", "replace") != GGUF_ARCH:
        raise ValueError(
            f"{path} is not a control vector (architecture "
            f"{bytes(arch.parts[-1]).decode('utf-8', 'replace')!r})"
        )
    hint = reader.get_field(f"{GGUF_ARCH}.model_hint")
    if hint is None:
        raise ValueError(f"{path} has no {GGUF_ARCH}.model_hint field: not a control vector")
    out: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        if not tensor.name.startswith("direction."):
            continue
        try:
            layer = int(tensor.name.split(".", 1)[1])
        except ValueError:
            warnings.warn(f"{path}: ignoring tensor {tensor.name!r}", stacklevel=2)
            continue
        out[layer] = np.array(tensor.data, dtype=np.float32)
    return bytes(hint.parts[-1]).decode("utf-8"), dict(sorted(out.items()))


def from_control_vector_gguf(
    per_emotion: Mapping[str, str | Path], neutral: str = "no-emotion"
) -> ConceptVectors:
    """:class:`ConceptVectors` from ``{emotion: GGUF control vector file}``."""
    return from_directions(
        {e: read_control_vector_gguf(p)[1] for e, p in per_emotion.items()},
        "gguf control vector",
        neutral,
    )


# --------------------------------------------------------------------------- files and export

#: ``emolens export`` formats: name -> file suffix.
EXPORT_FORMATS = {"steering-vectors": ".pt", "repeng-gguf": ".gguf"}
EXPORT_INFO = "export.json"


def save_steering_vector(sv, path: str | Path) -> Path:
    """A ``SteeringVector`` as a torch file of plain tensors (``torch.load`` reads it with
    ``weights_only=True``): ``SteeringVector(**torch.load(path))`` rebuilds it."""
    from emolens.store.files import atomic_path

    data = {
        "layer_activations": {int(k): v.detach().cpu() for k, v in sv.layer_activations.items()},
        "layer_type": sv.layer_type,
    }
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return Path(path)


def load_steering_vector(path: str | Path):
    """The ``SteeringVector`` of a file :func:`save_steering_vector` wrote."""
    return _steering_vectors()(**torch.load(path, weights_only=True))


def model_type_of(architecture: str) -> str | None:
    """HF ``config.model_type`` of an architecture class name (``LlamaForCausalLM`` ->
    ``llama``), or None if transformers does not know it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = [t for t, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name == architecture]
    # several types share a class (exaone uses LlamaForCausalLM): the one it is named after
    named = [t for t in types if architecture.lower().startswith(t.replace("_", ""))]
    return max(named, key=len) if named else (types[0] if types else None)


def _file_stem(emotion: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in emotion)
    return stem or "emotion"


def export_results(
    results: str | Path,
    fmt: str,
    out: str | Path,
    *,
    step: int | None = None,
    layers: Iterable[int] | None = None,
    emotions: Iterable[str] | None = None,
    scale: float = 1.0,
    model_type: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one step's concept vectors as one file per emotion in ``out``: ``fmt``
    ``"steering-vectors"`` (``EMOTION.pt``, :func:`save_steering_vector`) or ``"repeng-gguf"``
    (``EMOTION.gguf``, a llama.cpp control vector that repeng's ``ControlVector.import_gguf``
    reads), plus ``export.json`` saying what was exported. ``step`` defaults to the last
    finished one; ``layers`` (negative: from the model's last block) to every analysed layer
    (GGUF: without layer 0, which llama.cpp never applies). Files already there are kept and
    the export refused unless ``overwrite``."""
    from emolens.api import Results
    from emolens.store.files import read_json, write_json

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    res = Results(results)
    done = res.steps_done
    if not done:
        raise FileNotFoundError(f"{res.path} holds no finished step: run `emolens analyze` first")
    step = done[-1] if step is None else int(step)
    vectors = res.vectors(step)  # an unknown step: an error listing the finished ones
    model = read_json(res.step_dir(step) / "done.json").get("model") or {}
    if layers is not None:
        layers = [int(layer) for layer in layers]
        if any(layer < 0 for layer in layers):
            depth = model.get("n_layers")
            if not depth:
                raise ValueError(
                    f"step {step} records no model depth to read negative --layers by; "
                    f"give layers from {list(vectors.layers)}"
                )
            layers = [layer + int(depth) if layer < 0 else layer for layer in layers]
        _layers_of(vectors, layers)
    chosen = list(vectors.emotions) if emotions is None else list(emotions)
    for emotion in chosen:
        _emotion_index(vectors, emotion)
    if fmt == "steering-vectors":
        _steering_vectors()  # the missing extra is named before anything is written
    else:
        _gguf()
        if model_type is None:
            architecture = str(model.get("architecture") or "")
            model_type = model_type_of(architecture)
            if model_type is None:
                raise ValueError(
                    f"cannot tell the HF model_type of architecture {architecture or '?'!r} "
                    "for the GGUF model hint: pass --model-type (e.g. llama, gemma3)"
                )
    out = Path(out)
    files = {e: out / f"{_file_stem(e)}{EXPORT_FORMATS[fmt]}" for e in chosen}
    if len(set(files.values())) < len(files):
        raise ValueError(f"emotion names {chosen} map to the same file names in {out}")
    existing = [p for p in [*files.values(), out / EXPORT_INFO] if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} exists: export to another --out, or pass --overwrite to replace it"
        )
    written: dict[str, list[int]] = {}
    for emotion, path in files.items():
        if fmt == "steering-vectors":
            sv = to_steering_vector(vectors, emotion, layers, scale)
            save_steering_vector(sv, path)
            written[emotion] = sorted(int(k) for k in sv.layer_activations)
        else:
            assert model_type is not None
            write_control_vector_gguf(vectors, emotion, path, model_type, layers, scale)
            written[emotion] = sorted(read_control_vector_gguf(path)[1])
    write_json(
        out / EXPORT_INFO,
        {
            "results": str(res.path.resolve()),
            "step": step,
            "format": fmt,
            "scale": scale,
            "model_type": model_type,
            "model": model,
            "layer_convention": "layer L is the output of block L (blocks.L.hook_out)",
            "files": {e: {"file": files[e].name, "layers": written[e]} for e in chosen},
        },
    )
    return list(files.values())
