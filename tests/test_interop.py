"""Concept vectors exported to steering-vectors, repeng and GGUF control vectors steer the
model exactly as emolens does, and come back unchanged."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

from emolens import interop
from emolens.cli import main
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


# --------------------------------------------------------------------------- emolens export


@pytest.fixture
def results_dir(tmp_path) -> tuple:
    """A results folder with two finished steps of planted vectors (layers 0, 1, 3 of a
    four-block Llama), as ``analyze`` leaves it."""
    torch.manual_seed(2)
    folder = tmp_path / "results"
    per_step = {}
    for step in (0, 4):
        vectors = ConceptVectors(
            torch.randn(3, len(EMOTIONS), 8), torch.tensor([5, 6, 7]), EMOTIONS, (0, 1, 3)
        )
        step_dir = folder / "steps" / f"step-{step:06d}"
        vectors.save(step_dir)
        model = {"n_layers": 4, "d_model": 8, "architecture": "LlamaForCausalLM"}
        (step_dir / "done.json").write_text(json.dumps({"step": step, "model": model}))
        per_step[step] = vectors
    return folder, per_step


@needs_sv
def test_export_steering_vectors_round_trips_to_the_steps_vectors(results_dir, tmp_path, capsys):
    folder, per_step = results_dir
    out = tmp_path / "sv"
    assert main(["export", str(folder), "--format", "steering-vectors", "--out", str(out)]) == 0
    assert "3 steering-vectors files" in capsys.readouterr().out
    svs = {e: interop.load_steering_vector(out / f"{e}.pt") for e in EMOTIONS}
    back = interop.from_steering_vectors(svs)
    last = per_step[4]  # the default step: the last finished one
    assert back.emotions == EMOTIONS and back.layers == (0, 1, 3)
    assert torch.equal(back.vectors, last.vectors)
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 4 and info["files"]["fear"] == {"file": "fear.pt", "layers": [0, 1, 3]}
    # a plain torch file: loads with weights_only
    assert torch.load(out / "joy.pt", weights_only=True)["layer_type"] == "decoder_block"


@needs_sv
def test_export_step_layers_emotions_and_scale_are_what_is_written(results_dir, tmp_path):
    folder, per_step = results_dir
    out = tmp_path / "sv"
    argv = ["export", str(folder), "--format", "steering-vectors", "--out", str(out)]
    argv += ["--step", "0", "--layers", "1", "-1", "--emotions", "trust", "--scale", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "trust.pt"]
    sv = interop.load_steering_vector(out / "trust.pt")
    assert sorted(sv.layer_activations) == [1, 3]  # -1: the last of the model's 4 blocks
    for layer in (1, 3):
        expected = 2.0 * per_step[0].layer(layer)[EMOTIONS.index("trust")]
        assert torch.equal(sv.layer_activations[layer], expected)


@needs_repeng
def test_export_repeng_gguf_reads_back_in_repeng_and_emolens(results_dir, tmp_path):
    folder, per_step = results_dir
    out = tmp_path / "gguf"
    argv = ["export", str(folder), "--format", "repeng-gguf", "--out", str(out), "--step", "0"]
    assert main(argv) == 0
    control_vector = interop._repeng_control_vector()
    for e in EMOTIONS:
        cv = control_vector.import_gguf(str(out / f"{e}.gguf"))
        assert cv.model_type == "llama"  # from the analysed LlamaForCausalLM
        assert sorted(cv.directions) == [1, 3]  # llama.cpp never applies layer 0
        for layer in (1, 3):
            expected = per_step[0].layer(layer)[EMOTIONS.index(e)].numpy()
            np.testing.assert_array_equal(cv.directions[layer], expected)
    back = interop.from_control_vector_gguf({e: out / f"{e}.gguf" for e in EMOTIONS})
    assert torch.equal(back.vectors, per_step[0].vectors[1:])


def test_export_errors_are_one_line_naming_the_fix(results_dir, tmp_path, capsys, monkeypatch):
    folder, _ = results_dir
    base = ["export", str(folder), "--out", str(tmp_path / "o"), "--format"]

    def error(argv) -> str:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code != 0 and len(err.splitlines()) >= 1
        return err.splitlines()[-1]

    assert "finished steps: [0, 4]" in error([*base, "repeng-gguf", "--step", "2"])
    assert "layers" in error([*base, "repeng-gguf", "--layers", "2"])
    assert "layer 0" in error([*base, "repeng-gguf", "--layers", "0", "1"])
    assert "'anger'" in error([*base, "repeng-gguf", "--emotions", "anger"])
    with pytest.raises(SystemExit):
        main([*base, "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "steering_vectors", None)  # not installed
    assert "pip install 'emolens[export]'" in error([*base, "steering-vectors"])
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert "pip install 'emolens[export]'" in error([*base, "repeng-gguf"])
    assert not (tmp_path / "o").exists()  # nothing written by a refused export


def test_export_keeps_files_already_there(results_dir, tmp_path, capsys):
    folder, _ = results_dir
    out = tmp_path / "g"
    argv = ["export", str(folder), "--format", "repeng-gguf", "--out", str(out)]
    assert main(argv) == 0
    before = (out / "joy.gguf").read_bytes()
    assert main([*argv, "--step", "0"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "joy.gguf").read_bytes() == before
    assert main([*argv, "--step", "0", "--overwrite"]) == 0
    assert (out / "joy.gguf").read_bytes() != before


def test_model_type_of_an_architecture_is_the_type_it_is_named_after():
    assert interop.model_type_of("LlamaForCausalLM") == "llama"  # not exaone, which shares it
    assert interop.model_type_of("Qwen2ForCausalLM") == "qwen2"
    assert interop.model_type_of("NoSuchForCausalLM") is None
