import pytest
import torch

from emolens.data.labels import render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure import heads as heads_module
from emolens.measure.activations import collect_activations
from emolens.measure.attribution import Readout, component_attribution
from emolens.measure.heads import HeadsUnavailable, head_attribution, heads_frame

TEXTS = ["駅まで歩いた。", "友達と昼ご飯を食べた。", "雨の中、傘を忘れて帰った。"]


def _setup(model):
    label_ids = resolve_label_tokens(model.tokenizer).ids
    ids = encode(model.tokenizer, render_prompts(TEXTS))
    acts = collect_activations(model, ids, label_ids, [model.n_layers - 1], progress=False)
    return ids, acts, Readout.from_model(model, label_ids)


def _check_exact_sums(model):
    ids, acts, readout = _setup(model)
    heads = head_attribution(model, ids, readout, batch_size=2)
    layer_dla = component_attribution(model, ids, readout).contributions[:, 1::2]  # attn L
    n_heads = int(model.bridge.cfg.n_heads)
    assert heads.heads.shape == (3, model.n_layers, n_heads, 13)
    # heads + the projection's bias = the layer's attention DLA
    assert torch.allclose(heads.heads.sum(2) + heads.attn_bias, layer_dla, atol=1e-5)
    assert torch.allclose(heads.attn, layer_dla, atol=1e-5)
    # every component = the label logit
    assert torch.allclose(heads.logits, acts.label_logits, atol=1e-4)
    # the split is not trivial: heads differ from each other
    assert heads.heads.std(2).min() > 0
    return heads, ids, readout


def test_heads_sum_to_the_layer_attention_and_the_logits(tiny_model):
    _check_exact_sums(tiny_model)


@pytest.fixture(scope="module")
def gpt2_with_bias(tmp_path_factory):
    from emolens.model.loading import load_model
    from emolens.testing.tiny import tiny_random_gpt2

    model = load_model(tiny_random_gpt2(tmp_path_factory.mktemp("gpt2") / "m"), device="cpu")
    with torch.no_grad():
        for block in model.hf_model.transformer.h:
            block.attn.c_proj.bias.normal_(0, 0.5)
    return model


def test_output_projection_bias_is_its_own_component(gpt2_with_bias):
    heads, _, _ = _check_exact_sums(gpt2_with_bias)
    assert heads.attn_bias.abs().max() > 1e-3


def test_a_non_linear_attention_output_is_refused(tiny_model, monkeypatch):
    ids, _, readout = _setup(tiny_model)
    real = heads_module._output_projection

    def scaled(bridge, layer):  # what a norm after W_O would do to the sum
        proj = real(bridge, layer)
        with torch.no_grad():
            proj.weight.mul_(1.1)
        return proj

    monkeypatch.setattr(heads_module, "_output_projection", scaled)
    with pytest.raises(HeadsUnavailable, match="not exact"):
        head_attribution(tiny_model, ids, readout)


def test_heads_frame_means_over_each_gold_label(tiny_model):
    heads, _, _ = _check_exact_sums(tiny_model)
    labels = tuple(f"l{j}" for j in range(13))
    gold = [0, 0, 5]
    frame = heads_frame(heads, 7, gold, labels)
    n_heads = heads.heads.shape[2]
    assert len(frame) == 2 * tiny_model.n_layers * (n_heads + 1)
    row = frame[(frame.label == "l0") & (frame.layer == 1) & (frame["head"] == 2)].iloc[0]
    assert row.logit == pytest.approx(float(heads.heads[:2, 1, 2, 0].mean()), abs=1e-6)
    others = (heads.heads[:2, 1, 2].sum(-1) - heads.heads[:2, 1, 2, 0]) / 12
    assert row.margin == pytest.approx(float((heads.heads[:2, 1, 2, 0] - others).mean()), abs=1e-6)
    bias = frame[(frame.label == "l5") & (frame["head"] == -1) & (frame.layer == 0)].iloc[0]
    assert bias.component == "attn_bias 0" and bias.n_samples == 1
    # per label, heads + bias summed over layers = the attention share of its logit
    total = frame[frame.label == "l5"].logit.sum()
    expected = float(heads.heads[2, :, :, 5].sum() + heads.attn_bias[2, :, 5].sum())
    assert total == pytest.approx(expected, abs=1e-5)


def test_each_head_is_its_slice_of_w_o(tiny_model):
    """Against the obvious computation: head h's z times its d_head columns of o_proj."""
    from emolens.data.tokens import last_token_index, pad, pad_id
    from emolens.model import hooks

    ids, _, readout = _setup(tiny_model)
    heads = head_attribution(tiny_model, ids, readout, batch_size=3)
    layer = 2
    tokens, mask = pad(ids, pad_id(tiny_model.tokenizer), "right")
    last = last_token_index(mask)
    _, cache = tiny_model.bridge.run_with_cache(tokens, attention_mask=mask)
    rows = torch.arange(len(ids))
    z = cache[hooks.attn_z(layer)][rows, last].double()  # [sample, head, d_head]
    final = cache[hooks.resid_post(tiny_model.n_layers - 1)][rows, last].double()
    w_o = tiny_model.hf_model.model.layers[layer].self_attn.o_proj.weight.double()
    d_head = z.shape[-1]
    for h in range(z.shape[1]):
        out = z[:, h] @ w_o[:, h * d_head : (h + 1) * d_head].T  # [sample, d_model]
        expected = (out @ readout.effective_rows.double().T) / readout.scale(final)[:, None]
        assert torch.allclose(heads.heads[:, layer, h].double(), expected, atol=1e-5)


@pytest.mark.slow
def test_gemmas_post_attention_norm_is_split_with_its_scale_frozen(gemma_model):
    """Gemma 3's attention output passes through an RMS norm (``ln1_post``) before the
    residual: with that norm's scale frozen, the heads still sum to the layer's attention DLA
    and everything to the label logits."""
    assert "ln1_post" in dict(gemma_model.bridge.blocks[0].named_children())
    _check_exact_sums(gemma_model)
