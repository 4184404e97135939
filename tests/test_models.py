import json
import time

import pytest
import torch

from emolens.data.labels import resolve_label_tokens
from emolens.data.tokens import encode
from emolens.model.loading import (
    ModelLoadError,
    discover_series,
    gguf_to_hf,
    load_model,
    resolve_dtype,
    resolve_model_dir,
    weights_hash,
)


def _ids(model, text="今日は駅まで歩いた。"):
    return torch.tensor(encode(model.tokenizer, [text]))


def test_tiny_model_has_sarashina_like_shape(tiny_model):
    cfg = tiny_model.hf_model.config
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert not cfg.tie_word_embeddings
    assert tiny_model.n_layers == cfg.num_hidden_layers and tiny_model.d_model == cfg.hidden_size
    assert tiny_model.tokenizer.bos_token_id is None  # like Sarashina: no BOS is added


def test_bridge_forward_equals_hf_logits_on_the_same_tokens(tiny_model):
    ids = _ids(tiny_model)
    with torch.no_grad():
        bridge_logits = tiny_model.bridge(ids)
        hf_logits = tiny_model.hf_model(ids).logits
    assert torch.allclose(bridge_logits, hf_logits, atol=1e-5)


def test_japanese_text_tokenizes_and_round_trips(tiny_model):
    text = "次の文脈から推測される感情は何ですか？"
    assert tiny_model.tokenizer.decode(encode(tiny_model.tokenizer, [text])[0]) == text


def test_weights_hash_is_stable_and_sees_changes(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3
    assert weights_hash(a) != weights_hash(b)


def test_dtype_defaults():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int3", "cpu")


def test_series_discovery_orders_steps_reads_losses_and_reports_broken(
    fake_run_dir, tiny_model_dir
):
    series = discover_series(fake_run_dir)
    assert series.steps == [0, 2, 4]
    assert [c.kind for c in series.checkpoints] == ["base", "full", "full"]
    assert series.checkpoints[0].spec == str(tiny_model_dir)
    assert series.checkpoints[1].eval_loss == pytest.approx(2.8)
    assert series.checkpoints[2].eval_loss == pytest.approx(2.6)
    assert len(series.problems) == 1 and "checkpoint-6" in series.problems[0]
    assert json.loads(json.dumps(series.to_dict()))["base"] == str(tiny_model_dir)


def test_series_checkpoints_load_one_at_a_time_with_different_weights(fake_run_dir):
    series = discover_series(fake_run_dir)
    hashes, logits = [], []
    for ckpt in series.checkpoints:
        model = series.load(ckpt, device="cpu")
        hashes.append(model.weights_hash)
        with torch.no_grad():
            logits.append(model.bridge(_ids(model))[0, -1])
        del model
    assert len(set(hashes)) == 3
    assert not torch.allclose(logits[0], logits[2])


def test_series_without_a_known_base_asks_for_one(fake_run_dir, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="--base"):
        discover_series(run)
    assert discover_series(run, base="x/y").problems  # no weights in checkpoint-3


def test_series_skips_non_checkpoint_folders_and_rejects_a_non_string_base(tmp_path):
    """A ``checkpoint-final/`` folder (not ``checkpoint-N``) is no checkpoint, even with a
    trainer_state.json; a base model recorded as a non-string is a clear error."""
    run = tmp_path / "run"
    for name in ("checkpoint-3", "checkpoint-final"):
        (run / name).mkdir(parents=True)
        state = {"log_history": [{"step": 3, "eval_loss": 1.5}]}
        (run / name / "trainer_state.json").write_text(json.dumps(state))
    series = discover_series(run, base="x/y")
    assert series.steps == [0] and series.checkpoints[0].eval_loss is None
    assert series.problems == ("checkpoint-3: no model weights or config.json (half-written?)",)
    (run / "emolens_run.json").write_text(json.dumps({"base_model": 7}))
    with pytest.raises(ModelLoadError, match="not a model spec string"):
        discover_series(run)


def test_missing_and_half_written_models_are_clear_errors(tmp_path, fake_run_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelLoadError, match="half-written"):
        resolve_model_dir(str(tmp_path / "half"))
    with pytest.raises(ModelLoadError, match="checkpoint series"):
        resolve_model_dir(str(fake_run_dir))
    with pytest.raises(ModelLoadError, match="does not exist"):
        discover_series(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="GGUF file"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))


def test_hub_ids_pass_through_unchanged():
    assert resolve_model_dir("sbintuitions/sarashina2.2-1b-instruct-v0.1") == (
        "sbintuitions/sarashina2.2-1b-instruct-v0.1"
    )


@pytest.mark.slow
def test_gemma_from_registry_package_through_the_gguf_path(tmp_path, monkeypatch):
    """Real pretrained weights: converted once, cached, labels audited, bridge == HF."""
    monkeypatch.setenv("EMOLENS_CACHE", str(tmp_path / "fresh-cache"))  # really convert once
    t0 = time.perf_counter()
    model = load_model("gemma-3-270m", device="cpu")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = load_model("gemma-3-270m", device="cpu")
    second = time.perf_counter() - t0
    print(f"gemma-3-270m load: first {first:.1f} s, cached {second:.1f} s")
    assert second < 0.5 * first  # the conversion is not repeated
    assert again.weights_hash == model.weights_hash
    assert model.n_layers == 18 and model.d_model == 640
    audit = resolve_label_tokens(model.tokenizer)
    assert len(set(audit.ids)) == 13
    assert audit.entries[5].first_token == "喜び"
    ids = _ids(model)
    assert ids[0, 0].item() == model.tokenizer.bos_token_id and (ids == 2).sum() == 1
    with torch.no_grad():
        assert torch.allclose(model.bridge(ids), model.hf_model(ids).logits, atol=1e-4)


def test_a_model_too_large_for_the_device_is_a_clear_error(tiny_model_dir, monkeypatch):
    import emolens.model.loading as models

    need = models.estimated_model_bytes(str(tiny_model_dir), torch.float32)
    n_params = sum(
        p.numel() for p in load_model(tiny_model_dir, device="cpu").hf_model.parameters()
    )
    assert need == 4 * n_params
    monkeypatch.setattr(models, "available_memory", lambda device: need // 2)
    with pytest.raises(ModelLoadError, match=r"needs about .* GiB .*--device-map auto"):
        load_model(tiny_model_dir, device="cpu")


@pytest.mark.slow
def test_smollm2_llama_from_its_registry_package():
    """A Llama-architecture model like Sarashina, from the package's .gguf; an English model,
    so the Japanese labels share byte-level first tokens and the audit must say so."""
    from emolens.data.labels import EN_TEMPLATE, LabelTokenError

    model = load_model("smollm2-135m", device="cpu")
    assert model.hf_model.config.architectures == ["LlamaForCausalLM"]
    english = resolve_label_tokens(model.tokenizer, EN_TEMPLATE)
    assert len(set(english.ids)) == 13 and english.entries[5].first_token == " joy"
    with pytest.raises(LabelTokenError, match=r"disgust \(嫌悪\) shares first token"):
        resolve_label_tokens(model.tokenizer)
    ids = _ids(model, "Consider the following list of emotions.")
    with torch.no_grad():
        assert torch.allclose(model.bridge(ids), model.hf_model(ids).logits, atol=1e-4)


def test_a_warning_raised_while_booting_the_bridge_reaches_the_user(tiny_model_dir, monkeypatch):
    """No blanket filter around booting: a deprecation from TransformerLens is seen."""
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    boot = TransformerBridge.boot_transformers

    def warning_boot(*args, **kwargs):
        warnings.warn("hook_resid_post is deprecated", DeprecationWarning, stacklevel=2)
        return boot(*args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", warning_boot)
    with pytest.warns(DeprecationWarning, match="hook_resid_post is deprecated"):
        load_model(tiny_model_dir, device="cpu")


def test_converting_a_gguf_file_without_the_gguf_package_says_how_to_install_it(
    tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"emolens\[gguf\]"):
        gguf_to_hf(gguf_file, tmp_path / "out")


def test_a_series_reads_identical_tokenizer_files_once(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import transformers

    from emolens.model import loading

    copies = []
    for name in ("a", "b", "c"):
        shutil.copytree(tiny_model_dir, tmp_path / name)
        copies.append(str(tmp_path / name))
    config = tmp_path / "c" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("}", ', "emolens_test": 1}', 1))
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def counting(source, *args, **kwargs):
        calls.append(str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", counting)
    monkeypatch.setattr(loading, "_TOKENIZERS", {})
    first, second, third = (loading.load_tokenizer(c) for c in copies)
    assert calls == [copies[0], copies[2]]  # b is a cache hit, c's files differ
    assert first is not second
    assert first("今日は雨")["input_ids"] == second("今日は雨")["input_ids"]
    second.pad_token = second.unk_token or "x"  # a caller's change does not leak
    assert loading.load_tokenizer(copies[1]).pad_token == first.pad_token


def test_release_memory_trims_the_c_heap_where_glibc_has_malloc_trim(monkeypatch):
    """After a model is dropped, glibc keeps freed tensors in its heap (2.1 GB after the
    demo's fine-tune) unless malloc_trim is called; elsewhere the call is skipped."""
    import ctypes
    import ctypes.util

    from emolens.model import loading

    calls = []

    class FakeLibc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    loading.release_memory()
    assert calls == [0]

    class NotGlibc:  # musl or macOS: no malloc_trim
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda name: NotGlibc())
    loading.release_memory()
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    loading.release_memory()
    assert calls == [0]
