"""A LoRA series on one loaded base: swapping adapters in place gives the same weights, logits,
activations and weights hash as loading the base afresh and merging each adapter with PEFT."""

import json

import pandas as pd
import pytest
import torch

from emolens.data.corpus import load_corpus
from emolens.model import loading
from emolens.model.loading import SeriesLoader, discover_series, plain_lora, weights_hash
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig

pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 7, 9, 11, 13, 17], [1, 2, 3, 4, 5, 6, 7]])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def lora_run_dir(tmp_path_factory, tiny_model_dir):
    """checkpoint-2/4: plain LoRA (random B, so every delta is non-zero); checkpoint-6: rsLoRA
    on other modules; checkpoint-8: LoRA with a saved lm_head (PEFT must merge it itself)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("lora-run")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    variants = {
        2: {"target_modules": TARGETS},
        4: {"target_modules": TARGETS},
        6: {"target_modules": ["gate_proj", "up_proj", "q_proj"], "use_rslora": True},
        8: {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    }
    for step, extra in variants.items():
        torch.manual_seed(step)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **extra))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(run / f"checkpoint-{step}")
        if step == 6:  # a checkpoint whose tokenizer differs (one more special token)
            tok6 = AutoTokenizer.from_pretrained(tiny_model_dir)
            tok6.add_special_tokens({"additional_special_tokens": ["<extra>"]})
            tok6.save_pretrained(run / f"checkpoint-{step}")
        else:
            tok.save_pretrained(run / f"checkpoint-{step}")
    (run / "emolens_run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    return run


def _outputs(model):
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(
            IDS, names_filter=lambda name: name.endswith(("hook_out", "hook_in"))
        )
    return logits, cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_swapped_adapters_equal_a_fresh_load_and_merge(lora_run_dir, dtype):
    series = discover_series(lora_run_dir)
    assert [c.kind for c in series.checkpoints] == ["base", "lora", "lora", "lora", "lora"]
    by_step = {c.step: c for c in series.checkpoints}
    loader = SeriesLoader(series, device="cpu", dtype=dtype)
    hashes = {}
    for step in (0, 2, 4, 6, 0, 8, 4, 2):  # back and forth, through the PEFT fallback and back
        swapped = loader.load(by_step[step])
        logits, cache = _outputs(swapped)
        fresh = series.load(by_step[step], device="cpu", dtype=dtype)
        fresh_logits, fresh_cache = _outputs(fresh)
        assert (logits - fresh_logits).abs().max().item() <= 1e-5, step
        assert cache.keys() == fresh_cache.keys() and len(cache) > 10
        for name in cache:
            assert (cache[name] - fresh_cache[name]).abs().max().item() <= 1e-5, (step, name)
        assert swapped.weights_hash == fresh.weights_hash == weights_hash(fresh.hf_model)
        assert swapped.spec == fresh.spec and swapped.source == fresh.source
        assert swapped.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()
        assert ("<extra>" in swapped.tokenizer.get_vocab()) == (step == 6)
        hashes.setdefault(step, swapped.weights_hash)
        assert hashes[step] == swapped.weights_hash  # the same weights each time
    assert len(set(hashes.values())) == 5
    # 2, 4, 6, then 4 and 2 again over a reloaded base: checkpoint-8 went through PEFT
    assert loader.swaps == 5


def test_only_plain_lora_adapters_are_swapped(lora_run_dir, tiny_model_dir):
    deltas, reason = plain_lora(lora_run_dir / "checkpoint-6")
    assert reason is None and len(deltas) == 3 * loading.model_depth(str(tiny_model_dir))
    a, b, scaling, _ = next(iter(deltas.values()))
    assert a.shape[0] == b.shape[1] == 4 and scaling == pytest.approx(8 / 2)  # rsLoRA: 8/sqrt(4)
    assert plain_lora(lora_run_dir / "checkpoint-2")[0]
    _, reason = plain_lora(lora_run_dir / "checkpoint-8")
    assert reason is not None and "modules_to_save" in reason


def test_weights_hash_sees_one_changed_element_and_reuses_known_digests(tiny_model_dir):
    model = loading.load_hf_model(str(tiny_model_dir))
    digests: dict[str, str] = {}
    before = weights_hash(model, digests)
    assert before == weights_hash(model) and set(digests) == set(model.state_dict())
    weight = model.model.layers[1].self_attn.o_proj.weight
    with torch.no_grad():
        weight[3, 5] += 1e-3
    name = "model.layers.1.self_attn.o_proj.weight"
    after = weights_hash(model)
    assert after != before
    assert weights_hash(model, {k: v for k, v in digests.items() if k != name}) == after
    assert weights_hash(model, dict(digests)) == before  # stale digests are the caller's error


def test_analyze_of_a_lora_series_swaps_and_matches_loading_each_checkpoint(
    lora_run_dir, tmp_path, monkeypatch
):
    config = AnalysisConfig(
        layers="1,-1",
        steer_layers="-1",
        alphas=(0.0, 4.0),
        n_prompts=2,
        min_count=1,
        filter_mode="none",
        n_boot=20,
        dla_per_label=0,
        causal_geometry=False,
    )
    corpus = load_corpus(None).head_per_label(3)
    steps = [0, 2, 4]  # base, then two swaps
    swaps = []
    swap_to = SeriesLoader._swap_to
    monkeypatch.setattr(
        SeriesLoader, "_swap_to", lambda self, c, d: swaps.append(c.step) or swap_to(self, c, d)
    )
    swapped = analyze(lora_run_dir, corpus, tmp_path / "swap", config, device="cpu", steps=steps)
    assert swaps == [2, 4]
    monkeypatch.setattr(loading, "plain_lora", lambda path: ({}, "swapping off"))
    loaded = analyze(lora_run_dir, corpus, tmp_path / "load", config, device="cpu", steps=steps)
    assert swaps == [2, 4]
    for table in ("sensitivity.csv", "steps.csv", "filtering.csv"):
        a, b = pd.read_csv(swapped / table), pd.read_csv(loaded / table)
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
    assert pd.read_csv(swapped / "steps.csv")["weights_hash"].nunique() == 3
