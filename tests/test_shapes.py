"""The Sarashina 2.2 size family (0.5b / 1b / 3b shapes, scaled down) through the same code."""

import pytest
import torch

from emolens.data.labels import render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure.activations import collect_activations
from emolens.measure.steering import final_layer_sensitivity, layer_sensitivity, naive_sensitivity
from emolens.model.loading import load_model
from emolens.testing.tiny import TINY_SHAPES, tiny_random_model


@pytest.mark.parametrize("shape", ["sarashina-0.5b", "sarashina-1b", "sarashina-3b"])
def test_each_size_family_loads_collects_and_steers(shape, tmp_path):
    folder = tiny_random_model(tmp_path / shape, shape=shape)
    model = load_model(folder, device="cpu")
    expected = TINY_SHAPES[shape]
    # shapes are read from the saved config.json, as for the real checkpoints
    assert model.n_layers == expected["num_hidden_layers"]
    assert model.d_model == expected["hidden_size"]
    cfg = model.hf_model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and not cfg.tie_word_embeddings
    label_ids = resolve_label_tokens(model.tokenizer).ids
    prompts = encode(model.tokenizer, render_prompts(["駅まで歩いた。", "傘を買った。"]))
    last, mid = model.n_layers - 1, model.n_layers // 2
    acts = collect_activations(model, prompts, label_ids, [mid, last], progress=False)
    vectors = torch.randn(2, model.d_model)
    alphas = torch.tensor([0.0, 3.0])
    fast = final_layer_sensitivity(model, acts.layer(last), vectors, alphas, label_ids)
    naive = naive_sensitivity(model, prompts, last, vectors, alphas, label_ids)
    assert (fast.logit_change - naive.logit_change).abs().max() < 1e-4
    batched = layer_sensitivity(model, prompts, mid, vectors, alphas, label_ids, progress=False)
    naive_mid = naive_sensitivity(model, prompts, mid, vectors, alphas, label_ids)
    assert (batched.logit_change - naive_mid.logit_change).abs().max() < 1e-4
