"""Concept vectors exported to steering-vectors, repeng and GGUF control vectors steer the
model exactly as emolens does, and come back unchanged."""

import importlib.util

import numpy as np
import pytest
import torch

from emolens import interop
from emolens.measure.steering import steer
from emolens.measure.vectors import ConceptVectors
from emolens.model import hooks

EMOTIONS = ("joy", "fear", "trust")
ALPHA = 3.0


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


needs_sv = pytest.mark.skipif(
    _missing("steering_vectors") or _missing("sklearn"),
    reason=f"steering-vectors (and scikit-learn) not installed: {interop.INSTALL}",
)
needs_repeng = pytest.mark.skipif(
    _missing("repeng") or _missing("sklearn"),
    reason=f"repeng (and scikit-learn) not installed: {interop.INSTALL}",
)


@pytest.fixture
def planted(tiny_model) -> ConceptVectors:
    torch.manual_seed(1)
    n, d = tiny_model.n_layers, tiny_model.d_model
    return ConceptVectors(
        torch.randn(n, len(EMOTIONS), d), torch.tensor([5, 6, 7]), EMOTIONS, tuple(range(n))
    )


@pytest.fixture
def ids(tiny_model) -> torch.Tensor:
    return torch.tensor([tiny_model.tokenizer("今日は駅まで歩いた。答え：")["input_ids"]])


def _emolens_steered(tiny_model, vectors, emotion, layer, ids) -> torch.Tensor:
    v = vectors.layer(layer)[vectors.emotions.index(emotion)]
    with torch.no_grad(), steer(tiny_model, hooks.resid_post(layer), v, ALPHA):
        return tiny_model.bridge(ids)


def test_directions_are_the_vectors_of_the_emotion_scaled(planted):
    d = interop.directions(planted, "fear", layers=[1, 3], scale=2.0)
    assert sorted(d) == [1, 3]
    assert torch.equal(d[3], 2.0 * planted.vectors[3, 1])
    with pytest.raises(KeyError, match="emotions"):
        interop.directions(planted, "anger")
    with pytest.raises(KeyError, match="layers"):
        interop.directions(planted, "joy", layers=[7])


@needs_sv
def test_steering_vector_applied_to_hf_model_equals_emolens_steering(tiny_model, planted, ids):
    layer = 1
    sv = interop.to_steering_vector(planted, "joy", layers=[layer])
    with torch.no_grad(), sv.apply(tiny_model.hf_model, multiplier=ALPHA):
        theirs = tiny_model.hf_model(ids).logits
    ours = _emolens_steered(tiny_model, planted, "joy", layer, ids)
    plain = tiny_model.bridge(ids)
    assert (ours - plain).abs().max() > 0.1  # the steering does something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@needs_sv
def test_steering_vectors_round_trip_is_exact(planted):
    svs = {e: interop.to_steering_vector(planted, e) for e in EMOTIONS}
    back = interop.from_steering_vectors(svs)
    assert back.emotions == EMOTIONS and back.layers == planted.layers
    assert torch.equal(back.vectors, planted.vectors)
    assert back.meta["imported_from"] == "steering-vectors"


@needs_sv
def test_steering_vector_of_another_layer_type_is_refused(planted):
    sv = interop.to_steering_vector(planted, "joy")
    sv.layer_type = "mlp"
    with pytest.raises(ValueError, match="decoder_block"):
        interop.from_steering_vectors({"joy": sv})


@needs_repeng
def test_control_vector_in_repeng_control_model_equals_emolens_steering(
    tiny_model, tiny_model_dir, planted, ids
):
    from transformers import AutoModelForCausalLM

    layer = 2
    cv = interop.to_control_vector(planted, "trust", "llama")  # imports repeng (NumPy 2 shim)
    from repeng import ControlModel

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    controlled = ControlModel(hf.eval(), [layer])
    controlled.set_control(cv, coeff=ALPHA)
    with torch.no_grad():
        theirs = controlled(input_ids=ids).logits
    controlled.reset()
    ours = _emolens_steered(tiny_model, planted, "trust", layer, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@needs_repeng
def test_control_vectors_round_trip_through_repeng_and_gguf(planted, tmp_path):
    cv = interop.to_control_vector(planted, "joy", "llama")
    assert isinstance(cv.directions[0], np.ndarray)
    back = interop.from_control_vectors({"joy": cv})
    assert torch.equal(back.vectors[:, 0], planted.vectors[:, 0])
    # our GGUF file reads in repeng, and repeng's reads in ours
    ours = interop.write_control_vector_gguf(planted, "fear", tmp_path / "fear.gguf", "llama")
    read = type(cv).import_gguf(str(ours))
    assert read.model_type == "llama" and sorted(read.directions) == [1, 2, 3]
    for layer in (1, 2, 3):
        assert np.array_equal(read.directions[layer], planted.vectors[layer, 1].numpy())
    cv.export_gguf(str(tmp_path / "joy.gguf"))
    hint, dirs = interop.read_control_vector_gguf(tmp_path / "joy.gguf")
    assert hint == "llama" and sorted(dirs) == [0, 1, 2, 3]
    both = interop.from_control_vector_gguf({"joy": tmp_path / "joy.gguf"})
    assert torch.equal(both.vectors[:, 0], planted.vectors[:, 0])


def test_gguf_export_leaves_out_layer_zero_which_llama_cpp_never_applies(planted, tmp_path):
    path = interop.write_control_vector_gguf(
        planted, "joy", tmp_path / "j.gguf", "llama", scale=0.5
    )
    hint, dirs = interop.read_control_vector_gguf(path)
    assert hint == "llama" and sorted(dirs) == [1, 2, 3]
    np.testing.assert_array_equal(dirs[2], 0.5 * planted.vectors[2, 0].numpy())
    with pytest.raises(ValueError, match="layer 0"):
        interop.write_control_vector_gguf(
            planted, "joy", tmp_path / "k.gguf", "llama", layers=[0, 1]
        )
    assert not (tmp_path / "k.gguf").exists()


def test_reading_a_model_gguf_as_control_vector_is_refused(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="not a control vector"):
        interop.read_control_vector_gguf(path)
