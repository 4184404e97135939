import pytest
import torch

from emolens.data.labels import STUDY_LABELS, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode, last_token_index, pad
from emolens.measure.activations import answer_readout, collect_activations
from emolens.measure.steering import (
    SteeringEffect,
    alphas_from_norm_multiples,
    final_layer_readout,
    final_layer_sensitivity,
    layer_sensitivity,
    layer_sensitivity_cached,
    naive_sensitivity,
    prompt_kv_cache,
    steer,
)
from emolens.model import hooks

TEXTS = [
    "今日は駅まで歩いた。",
    "友達に裏切られて、とても悲しかった。",
    "雨",
    "上司に褒められて誇らしい。",
]
ALPHAS = torch.tensor([0.0, 0.5, 1.0, 2.0])
TOL = 1e-3  # the bound; float32 runs land near 1e-5


def attached_hooks(bridge) -> tuple[int, int]:
    """Hook functions on the bridge's hook points, and torch hooks on all its modules."""
    lens = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in bridge.hook_dict.values())
    torch_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bridge.modules())
    return lens, torch_hooks


def max_diff(a: SteeringEffect, b: SteeringEffect) -> float:
    return max(
        float((getattr(a, q) - getattr(b, q)).abs().max())
        for q in ("logit_change", "logprob_change", "centered_change")
    )


def realistic_vectors(acts, layer: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random directions with the norm of the difference of two prompts' residuals."""
    h = acts.layer(layer)
    scale = float((h[0] - h[1]).norm())
    v = torch.randn(n, h.shape[1], generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True) * scale


@pytest.fixture(scope="module")
def setup(tiny_model):
    prompts = encode(tiny_model.tokenizer, render_prompts(TEXTS))
    label_ids = resolve_label_tokens(tiny_model.tokenizer).ids
    acts = collect_activations(tiny_model, prompts, label_ids, "all", progress=False)
    vectors = realistic_vectors(acts, tiny_model.n_layers - 1, 3)
    return prompts, label_ids, acts, vectors


def test_final_layer_fast_path_matches_the_hooked_forward_pass(tiny_model, setup):
    prompts, label_ids, acts, vectors = setup
    last = tiny_model.n_layers - 1
    fast = final_layer_sensitivity(
        tiny_model, acts.layer(last), vectors, ALPHAS, label_ids, chunk_rows=7
    )
    naive = naive_sensitivity(tiny_model, prompts, last, vectors, ALPHAS, label_ids)
    assert fast.logit_change.shape == (3, len(ALPHAS), len(prompts), len(label_ids))
    assert max_diff(fast, naive) <= TOL
    assert max_diff(fast, naive) <= 1e-4  # float32: in fact ~1e-6
    torch.testing.assert_close(fast.base_label_logits, naive.base_label_logits, atol=1e-5, rtol=0)
    assert fast.hook_name == naive.hook_name == hooks.resid_post(last)


def explicit_rows(h, vectors, alphas):
    """``h[p] + alpha[a] * v[e]`` in (emotion, alpha, prompt) order: the obvious rows."""
    return torch.stack([h[p] + a * v for v in vectors for a in alphas for p in range(h.shape[0])])


def assert_readouts_close(got, want, atol=2e-5):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_factored_final_readout_equals_the_direct_readout_of_every_row(tiny_model, setup, softcap):
    """Every row factored through the norm (RMSNorm), with and without logit soft-capping."""
    _, label_ids, acts, vectors = setup
    h = acts.layer(tiny_model.n_layers - 1)
    config = tiny_model.hf_model.config
    before = getattr(config, "final_logit_softcapping", None)
    config.final_logit_softcapping = softcap
    try:
        *got, info = final_layer_readout(tiny_model, h, vectors, ALPHAS, label_ids, chunk_rows=5)
        want = answer_readout(tiny_model, explicit_rows(h, vectors, ALPHAS), label_ids)
    finally:
        config.final_logit_softcapping = before
    assert info == {"factored_rows": len(want[0]), "direct_rows": 0}
    assert_readouts_close(got, want)
    if softcap is not None:
        assert float(got[0].abs().max()) <= softcap


def test_factored_final_readout_falls_back_where_the_norm_is_of_another_form(
    tiny_model, setup, monkeypatch
):
    """A final norm the two-term fit cannot reproduce: those rows are read out directly."""
    import emolens.measure.activations as activations
    import emolens.measure.steering as steering

    _, label_ids, acts, vectors = setup
    h = acts.layer(tiny_model.n_layers - 1)
    ln, un = activations.readout_modules(tiny_model)

    class Cubed(torch.nn.Module):
        def forward(self, z):
            return ln(z) ** 3

    def patched(model):
        return Cubed(), un

    monkeypatch.setattr(activations, "readout_modules", patched)
    monkeypatch.setattr(steering, "readout_modules", patched)
    *got, info = final_layer_readout(tiny_model, h, vectors, ALPHAS, label_ids, chunk_rows=5)
    want = answer_readout(tiny_model, explicit_rows(h, vectors, ALPHAS), label_ids)
    n_zero_alpha_rows = int((ALPHAS == 0).sum()) * vectors.shape[0] * h.shape[0]
    # alpha 0 rows are ln(h) itself, which the fit reproduces; every other row is not
    assert info == {
        "factored_rows": n_zero_alpha_rows,
        "direct_rows": len(want[0]) - n_zero_alpha_rows,
    }
    assert_readouts_close(got, want)


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_batched_mid_layer_sweep_matches_the_naive_loop(tiny_model, setup, positions):
    prompts, label_ids, acts, _ = setup
    vectors = realistic_vectors(acts, 1, 2, seed=1)
    batched = layer_sensitivity(
        tiny_model,
        prompts,
        1,
        vectors,
        ALPHAS,
        label_ids,
        positions=positions,
        batch_size=5,
        progress=False,
    )
    naive = naive_sensitivity(
        tiny_model, prompts, 1, vectors, ALPHAS, label_ids, positions=positions
    )
    assert max_diff(batched, naive) <= 1e-4
    assert batched.positions == positions and batched.layer == 1
    assert float(batched.logit_change[:, 1:].abs().max()) > 1e-2  # steering does something


def test_batched_final_layer_sweep_matches_the_fast_path(tiny_model, setup):
    prompts, label_ids, acts, vectors = setup
    last = tiny_model.n_layers - 1
    batched = layer_sensitivity(
        tiny_model, prompts, -1, vectors, ALPHAS, label_ids, batch_size=16, progress=False
    )
    fast = final_layer_sensitivity(tiny_model, acts.layer(last), vectors, ALPHAS, label_ids)
    assert max_diff(batched, fast) <= 1e-4


@pytest.mark.parametrize("layer", [0, 2, -1])
def test_kv_cached_answer_steering_matches_the_naive_loop(tiny_model, setup, layer):
    prompts, label_ids, acts, _ = setup
    vectors = realistic_vectors(acts, layer % tiny_model.n_layers, 2, seed=4)
    bridge = tiny_model.bridge
    before = attached_hooks(bridge)
    cached = layer_sensitivity_cached(
        tiny_model, prompts, layer, vectors, ALPHAS, label_ids, batch_size=3, progress=False
    )
    assert attached_hooks(bridge) == before
    naive = naive_sensitivity(
        tiny_model, prompts, layer, vectors, ALPHAS, label_ids, positions="answer"
    )
    assert max_diff(cached, naive) <= 1e-4
    torch.testing.assert_close(cached.base_label_logits, naive.base_label_logits, atol=1e-5, rtol=0)
    assert cached.positions == "answer" and cached.hook_name == naive.hook_name
    assert float(cached.logit_change[:, 1:].abs().max()) > 1e-2  # steering does something


def test_prompt_kv_cache_holds_the_prefix_and_a_one_token_prompt_needs_none(tiny_model, setup):
    prompts, label_ids, acts, _ = setup
    prefix = prompts[1][:-1]
    assert prompt_kv_cache(tiny_model, prefix).get_seq_length() == len(prefix)
    # (reuse of one prompt cache by several chunks is covered by batch_size=3 above)
    one = [prompts[0][-1:]]
    vectors = realistic_vectors(acts, 1, 1)
    cached = layer_sensitivity_cached(
        tiny_model, one, 1, vectors, ALPHAS, label_ids, progress=False
    )
    naive = naive_sensitivity(tiny_model, one, 1, vectors, ALPHAS, label_ids, positions="answer")
    assert max_diff(cached, naive) <= 1e-4


def test_kv_cache_workaround_is_needed_exactly_where_it_applies(tiny_model, setup, monkeypatch):
    """Tells when upstream fixes it: without the workaround, the installed TransformerLens
    leaves a cache passed to the bridge empty exactly when ``needs_kv_cache_workaround()`` says
    so. If this fails because the cache fills by itself, TL reads ``cache=`` now: narrow
    ``KV_CACHE_WORKAROUND_TL`` to the versions before the fix."""
    from transformers import DynamicCache

    import emolens.measure.steering as steering

    prompts, *_ = setup
    bridge = tiny_model.bridge
    prefix = torch.as_tensor([prompts[1][:-1]])
    cache = DynamicCache(config=bridge.original_model.config)
    with torch.no_grad():
        bridge(prefix, past_key_values=cache)
    fills_by_itself = cache.get_seq_length() == prefix.shape[1]
    assert fills_by_itself != steering.needs_kv_cache_workaround(), (
        f"the bridge {'fills' if fills_by_itself else 'does not fill'} the cache without the "
        "workaround; update KV_CACHE_WORKAROUND_TL"
    )
    # with the workaround switched off where it is needed, prompt_kv_cache refuses loudly
    if not fills_by_itself:
        monkeypatch.setattr(steering, "needs_kv_cache_workaround", lambda: False)
        with pytest.raises(RuntimeError, match="KV_CACHE_WORKAROUND_TL"):
            prompt_kv_cache(tiny_model, prompts[1][:-1])


def test_zero_alpha_gives_zero_change(tiny_model, setup):
    prompts, label_ids, acts, vectors = setup
    last = tiny_model.n_layers - 1
    fast = final_layer_sensitivity(tiny_model, acts.layer(last), vectors, ALPHAS, label_ids)
    mid = layer_sensitivity(
        tiny_model, prompts, 1, vectors * 0 + 1, ALPHAS, label_ids, batch_size=7, progress=False
    )
    for effect in (fast, mid):
        for q in ("logit_change", "logprob_change", "centered_change"):
            assert float(getattr(effect, q)[:, 0].abs().max()) <= 1e-5


def test_steering_along_a_labels_unembedding_row_raises_that_label_most(tiny_model, setup):
    prompts, label_ids, acts, _ = setup
    last = tiny_model.n_layers - 1
    target = STUDY_LABELS.index("joy")
    row = tiny_model.hf_model.lm_head.weight[label_ids[target]].detach().float()
    h_norm = float(acts.layer(last).norm(dim=-1).mean())
    alphas = torch.tensor([0.0, 2.0, 10.0]) * h_norm / float(row.norm())
    fast = final_layer_sensitivity(
        tiny_model,
        acts.layer(last),
        row[None],
        alphas,
        label_ids,
        emotions=["joy"],
        labels=STUDY_LABELS.names(),
    )
    hooked = layer_sensitivity(
        tiny_model,
        prompts,
        last,
        row[None],
        alphas,
        label_ids,
        emotions=["joy"],
        labels=STUDY_LABELS.names(),
        progress=False,
    )
    for effect in (fast, hooked):
        for q in ("logit_change", "centered_change", "logprob_change"):
            assert (getattr(effect, q)[0, 1:].argmax(-1) == target).all()
        assert (effect.diagonal()[0, 1:] > 0).all()


def test_answer_only_steering_changes_nothing_before_the_answer(tiny_model, setup):
    prompts, _, acts, _ = setup
    bridge = tiny_model.bridge
    ids, mask = pad(prompts, 0, "right")
    answer = last_token_index(mask)
    last_name = hooks.resid_post(tiny_model.n_layers - 1)
    vector = realistic_vectors(acts, 1, 1)[0] * 3
    with torch.no_grad():
        _, clean = bridge.run_with_cache(ids, attention_mask=mask, names_filter=[last_name])
        with steer(bridge, hooks.resid_post(1), vector, 1.0, "answer", answer):
            _, steered = bridge.run_with_cache(ids, attention_mask=mask, names_filter=[last_name])
    for i, a in enumerate(answer.tolist()):
        before = (steered[last_name][i, :a] - clean[last_name][i, :a]).abs().max()
        at = (steered[last_name][i, a] - clean[last_name][i, a]).abs().max()
        assert float(before) == 0.0 and float(at) > 1e-2


def test_answer_and_all_positions_agree_only_at_the_final_layer(tiny_model, setup):
    prompts, label_ids, acts, vectors = setup
    last = tiny_model.n_layers - 1
    run = {
        pos: {
            layer: naive_sensitivity(
                tiny_model, prompts[:2], layer, vectors[:1], ALPHAS[:2], label_ids, positions=pos
            )
            for layer in (1, last)
        }
        for pos in ("all", "answer")
    }
    assert max_diff(run["all"][last], run["answer"][last]) <= 1e-5
    assert max_diff(run["all"][1], run["answer"][1]) > 1e-3


def test_per_row_vectors_equal_separate_runs(tiny_model, setup):
    prompts, _, acts, _ = setup
    bridge = tiny_model.bridge
    vectors = realistic_vectors(acts, 2, 2, seed=3)
    ids = torch.tensor([prompts[0], prompts[0]])
    alphas = torch.tensor([1.0, 2.5])
    with torch.no_grad(), steer(bridge, hooks.resid_post(2), vectors, alphas):
        both = bridge(ids)[:, -1]
    for i in range(2):
        with torch.no_grad(), steer(bridge, hooks.resid_post(2), vectors[i], float(alphas[i])):
            one = bridge(ids[:1])[0, -1]
        torch.testing.assert_close(both[i], one, atol=1e-5, rtol=0)


def test_no_hooks_remain_after_an_exception_inside_the_context(tiny_model, setup):
    prompts, label_ids, _, vectors = setup
    bridge = tiny_model.bridge
    before = attached_hooks(bridge)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(bridge, hooks.resid_post(1), vectors[0], 2.0):
            assert attached_hooks(bridge) != before  # the hook is really there
            raise RuntimeError("boom")
    assert attached_hooks(bridge) == before
    with pytest.raises(ValueError, match="steering vectors for a batch"):  # raised in the hook
        with torch.no_grad(), steer(bridge, hooks.resid_post(1), vectors, 1.0):
            bridge(torch.tensor([prompts[0]]))
    assert attached_hooks(bridge) == before
    with pytest.raises(KeyError):
        with steer(bridge, "blocks.1.hook_nonexistent", vectors[0], 1.0):
            pass
    with pytest.raises(ValueError, match="answer_index"):
        with steer(bridge, hooks.resid_post(1), vectors[0], 1.0, positions="answer"):
            pass
    layer_sensitivity(
        tiny_model, prompts[:1], 1, vectors[:1], ALPHAS[:2], label_ids, progress=False
    )
    assert attached_hooks(bridge) == before


def test_effect_axes_diagonal_frame_and_round_trip(tiny_model, setup, tmp_path):
    _, label_ids, acts, vectors = setup
    last = tiny_model.n_layers - 1
    names = ["joy", "sadness", "trust"]
    effect = final_layer_sensitivity(
        tiny_model,
        acts.layer(last),
        vectors,
        ALPHAS,
        label_ids,
        emotions=names,
        labels=STUDY_LABELS.names(),
        prompt_ids=[f"p{i}" for i in range(len(TEXTS))],
    )
    diag = effect.diagonal()
    assert diag.shape == (3, len(ALPHAS), len(TEXTS))
    assert torch.equal(diag[1], effect.logit_change[1, :, :, STUDY_LABELS.index("sadness")])
    frame = effect.to_frame(step=300)
    assert len(frame) == 3 * len(ALPHAS) * len(TEXTS) * len(STUDY_LABELS)
    assert list(frame.columns[:3]) == ["step", "layer", "emotion"]
    row = frame[
        (frame.emotion == "trust")
        & (frame.label == "joy")
        & (frame.alpha == 2.0)
        & (frame.prompt == "p3")
    ]
    assert float(row.logit_change.iloc[0]) == pytest.approx(
        float(effect.logit_change[2, 3, 3, STUDY_LABELS.index("joy")])
    )
    effect.save(tmp_path)
    back = SteeringEffect.load(tmp_path)
    assert max_diff(back, effect) == 0.0
    assert (back.emotions, back.labels, back.prompt_ids, back.hook_name) == (
        effect.emotions,
        effect.labels,
        effect.prompt_ids,
        effect.hook_name,
    )
    assert torch.equal(back.alphas, effect.alphas)


def test_alphas_from_norm_multiples():
    alphas = alphas_from_norm_multiples([0, 0.5, 1], 40.0)
    assert alphas.tolist() == [0.0, 20.0, 40.0]
    with pytest.raises(ValueError, match="positive"):
        alphas_from_norm_multiples([1], 0.0)


# --------------------------------------------------------------------------- gemma-3-270m


@pytest.mark.slow
def test_gemma_fast_path_and_batched_mid_layer_match_hooked_passes(gemma_model):
    prompts = encode(gemma_model.tokenizer, render_prompts(TEXTS[:2]))
    label_ids = resolve_label_tokens(gemma_model.tokenizer, allow_shared=True).ids
    last, mid = gemma_model.n_layers - 1, gemma_model.n_layers // 2
    acts = collect_activations(gemma_model, prompts, label_ids, [mid, last], progress=False)
    alphas = torch.tensor([0.0, 1.0, 4.0])
    vectors = realistic_vectors(acts, last, 2)
    fast = final_layer_sensitivity(gemma_model, acts.layer(last), vectors, alphas, label_ids)
    naive = naive_sensitivity(gemma_model, prompts, last, vectors, alphas, label_ids)
    assert float(fast.logit_change[:, 1:].abs().max()) > 0.1
    assert max_diff(fast, naive) <= TOL
    mid_vectors = realistic_vectors(acts, mid, 2, seed=1)
    batched = layer_sensitivity(
        gemma_model, prompts, mid, mid_vectors, alphas[1:], label_ids, batch_size=4, progress=False
    )
    naive_mid = naive_sensitivity(gemma_model, prompts, mid, mid_vectors, alphas[1:], label_ids)
    assert max_diff(batched, naive_mid) <= TOL


@pytest.mark.slow
def test_gemma_kv_cached_answer_steering_matches_the_naive_loop(gemma_model):
    prompts = encode(gemma_model.tokenizer, render_prompts(TEXTS[:2]))
    label_ids = resolve_label_tokens(gemma_model.tokenizer, allow_shared=True).ids
    mid = gemma_model.n_layers // 2
    acts = collect_activations(gemma_model, prompts, label_ids, [mid], progress=False)
    alphas = torch.tensor([0.0, 1.0, 4.0])
    vectors = realistic_vectors(acts, mid, 2, seed=2)
    cached = layer_sensitivity_cached(
        gemma_model, prompts, mid, vectors, alphas, label_ids, batch_size=4, progress=False
    )
    naive = naive_sensitivity(
        gemma_model, prompts, mid, vectors, alphas, label_ids, positions="answer"
    )
    assert float(naive.logit_change[:, 1:].abs().max()) > 0.1
    assert max_diff(cached, naive) <= TOL
