import pytest
import torch

from emolens.data.labels import render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure.activations import collect_activations
from emolens.measure.attribution import (
    Readout,
    component_attribution,
    decompose_steering,
    direct_push_change,
    log_push_change,
    transfer_effect,
)
from emolens.measure.steering import final_layer_sensitivity

TEXTS = ["駅まで歩いた。", "友達と昼ご飯を食べた。", "雨の中、傘を忘れて帰った。"]


@pytest.fixture(scope="module")
def setup(tiny_model):
    label_ids = resolve_label_tokens(tiny_model.tokenizer).ids
    ids = encode(tiny_model.tokenizer, render_prompts(TEXTS))
    last = tiny_model.n_layers - 1
    acts = collect_activations(tiny_model, ids, label_ids, [last], progress=False)
    return label_ids, ids, acts.layer(last), acts


def test_readout_reproduces_the_models_label_logits(tiny_model, setup):
    label_ids, _, h, acts = setup
    readout = Readout.from_model(tiny_model, label_ids)
    assert torch.allclose(readout.logits(h).float(), acts.label_logits, atol=1e-4)
    assert torch.allclose(readout.mean_logit(h).float(), acts.mean_logit, atol=1e-4)


def test_readout_round_trips_through_disk(tiny_model, setup, tmp_path):
    readout = Readout.from_model(tiny_model, setup[0])
    again = Readout.load(readout.save(tmp_path / "readout.safetensors"))
    assert torch.equal(again.rows, readout.rows) and again.token_ids == readout.token_ids


def test_steering_decomposition_sums_to_the_measured_change(tiny_model, setup):
    label_ids, _, h, _ = setup
    torch.manual_seed(0)
    vectors = torch.randn(4, tiny_model.d_model) * h.norm(dim=-1).mean() / 3
    alphas = torch.tensor([0.0, 1.0, 3.0])
    measured = final_layer_sensitivity(tiny_model, h, vectors, alphas, label_ids).logit_change
    parts = decompose_steering(Readout.from_model(tiny_model, label_ids), h, vectors, alphas)
    assert torch.allclose(parts.total, measured, atol=1e-4)
    assert torch.allclose(parts.direct + parts.scale, measured, atol=1e-4)
    assert (parts.direct[:, 0] == 0).all() and (parts.scale[:, 0].abs() < 1e-6).all()


def test_a_vector_planted_along_a_readout_row_is_found(tiny_model, setup):
    label_ids, _, h, _ = setup
    readout = Readout.from_model(tiny_model, label_ids)
    joy = 5
    vectors = torch.stack([readout.effective_rows[joy], torch.randn(tiny_model.d_model)])
    parts = decompose_steering(readout, h, vectors, torch.tensor([1.0]))
    assert parts.cosine[0, joy] == pytest.approx(1.0, abs=1e-5)
    assert parts.direct[0, 0, :, joy].min() > 0
    assert parts.direct[0, 0].mean(0).argmax() == joy


def test_push_change_parts_sum_and_isolate_what_moved():
    torch.manual_seed(1)
    w0, v0 = torch.randn(3, 8), torch.randn(3, 8)
    same = direct_push_change(w0, v0, 2.0, w0, v0, 2.0)
    assert same.total.abs().max() < 1e-6
    moved = direct_push_change(w0, v0, 2.0, w0, v0 * 0.5, 2.0)  # only the vector shrank
    assert torch.allclose(moved.total, moved.vector, atol=1e-6)
    assert moved.readout.abs().max() < 1e-6 and moved.scale.abs().max() < 1e-6
    w1, v1 = torch.randn(3, 8), torch.randn(3, 8)
    change = direct_push_change(w0, v0, 2.0, w1, v1, 3.5)
    assert torch.allclose(change.vector + change.readout + change.scale, change.total, atol=1e-5)
    grown = direct_push_change(w0, v0, 2.0, w0, v0, 4.0)  # residual scale doubled
    assert torch.allclose(grown.total, grown.scale) and torch.allclose(
        grown.total, -0.5 * (w0 * v0).sum(-1) / 2.0, atol=1e-6
    )


def _aligned(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows w and vectors v with cos(w, v) > 0 (v leans on w), float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = w * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    return w, v


def test_log_push_split_is_exact_and_order_free():
    w0, v0 = _aligned(6, 16, 0)
    w1, v1 = _aligned(6, 16, 1)
    w2, v2 = _aligned(6, 16, 2)
    change = log_push_change(w0, v0, 2.0, w1, v1, 3.5)
    assert not torch.isnan(change.push).any()
    # exact: the terms sum to the change of the log push, which is the log of the push ratio
    total = change.w + change.v + change.cos - change.scale
    assert (total - change.push).abs().max() < 1e-10
    ratio = ((w1 * v1).sum(-1) / 3.5) / ((w0 * v0).sum(-1) / 2.0)
    assert (change.push - ratio.log()).abs().max() < 1e-10
    # each term moves with its own factor only: no order of the factors enters
    only_v = log_push_change(w0, v0, 2.0, w0, 0.5 * v0, 2.0)
    assert (only_v.v - torch.log(torch.tensor(0.5, dtype=torch.float64))).abs().max() < 1e-12
    for part in (only_v.w, only_v.cos, only_v.scale):
        assert part.abs().max() < 1e-12
    only_r = log_push_change(w0, v0, 2.0, w0, v0, 4.0)
    assert (only_r.scale - torch.log(torch.tensor(2.0, dtype=torch.float64))).abs().max() < 1e-12
    assert (only_r.push + only_r.scale).abs().max() < 1e-12
    # path-independent: 0 -> 1 -> 2 adds up to 0 -> 2 term by term, and reversing negates
    a, b = log_push_change(w0, v0, 2.0, w1, v1, 3.5), log_push_change(w1, v1, 3.5, w2, v2, 1.5)
    direct = log_push_change(w0, v0, 2.0, w2, v2, 1.5)
    assert not any(torch.isnan(x.push).any() for x in (a, b, direct))
    back = log_push_change(w1, v1, 3.5, w0, v0, 2.0)
    for name in ("push", "w", "v", "cos", "scale"):
        assert (getattr(a, name) + getattr(b, name) - getattr(direct, name)).abs().max() < 1e-12
        assert (getattr(back, name) + getattr(a, name)).abs().max() < 1e-12


def test_log_push_split_is_nan_where_the_push_is_not_positive():
    w0, v0 = _aligned(3, 8, 3)
    v_t = v0.clone()
    v_t[1] = -v_t[1]  # cos(w, v) < 0 at step t for emotion 1
    v_ref = v0.clone()
    w0[2], v_ref[2] = torch.eye(8, dtype=torch.float64)[:2]  # cos = 0 exactly at the reference
    change = log_push_change(w0, v_ref, 2.0, w0, v_t, 2.0)
    for name in ("push", "w", "v", "cos", "scale"):
        part = getattr(change, name)
        assert torch.isnan(part[1]) and torch.isnan(part[2]) and not torch.isnan(part[0])


def test_transfer_with_own_vectors_equals_the_steering_effect(tiny_model, setup):
    label_ids, _, h, _ = setup
    vectors = torch.randn(2, tiny_model.d_model)
    readout = Readout.from_model(tiny_model, label_ids)
    measured = final_layer_sensitivity(tiny_model, h, vectors, torch.tensor([2.0]), label_ids)
    assert torch.allclose(
        transfer_effect(readout, h, vectors, 2.0), measured.logit_change[:, 0], atol=1e-4
    )


def test_component_attribution_sums_to_the_label_logits(tiny_model, setup):
    label_ids, ids, _, acts = setup
    readout = Readout.from_model(tiny_model, label_ids)
    dla = component_attribution(tiny_model, ids, readout)
    assert dla.components[0] == "embed" and dla.components[-1] == f"mlp {tiny_model.n_layers - 1}"
    assert dla.contributions.shape == (3, 1 + 2 * tiny_model.n_layers, 13)
    assert torch.allclose(dla.logits, acts.label_logits, atol=1e-4)


@pytest.mark.slow
def test_readout_and_decomposition_are_exact_on_gemma(gemma_model):
    """Gemma's norm gain is 1 + w and its unembedding is tied: the extraction must see both."""
    label_ids = resolve_label_tokens(gemma_model.tokenizer).ids
    ids = encode(gemma_model.tokenizer, render_prompts(TEXTS))
    last = gemma_model.n_layers - 1
    acts = collect_activations(gemma_model, ids, label_ids, [last], progress=False)
    h = acts.layer(last)
    readout = Readout.from_model(gemma_model, label_ids)
    assert torch.allclose(readout.logits(h).float(), acts.label_logits, atol=1e-3)
    vectors = (h[1:] - h[:1]) * 0.5
    alphas = torch.tensor([1.0, 4.0])
    measured = final_layer_sensitivity(gemma_model, h, vectors, alphas, label_ids).logit_change
    parts = decompose_steering(readout, h, vectors, alphas)
    assert (parts.direct + parts.scale - measured).abs().max() < 1e-3
    dla = component_attribution(gemma_model, ids, readout)
    assert (dla.logits - acts.label_logits).abs().max() < 1e-3
