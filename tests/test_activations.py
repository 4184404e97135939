import pytest
import torch

from emolens.data.labels import STUDY_LABELS, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure.activations import (
    Activations,
    answer_readout,
    attention_implementation,
    collect_activations,
    hf_attention,
)
from emolens.model import hooks

TEXTS = [
    "今日は駅まで歩いた。",
    "友達に裏切られて、とても悲しかった。",
    "試験に合格した！",
    "夜中に物音がして怖かった。",
    "特に何もない一日だった。",
    "雨",
    "上司に褒められて誇らしい。",
]


@pytest.fixture(scope="module")
def prompt_ids(tiny_model):
    return encode(tiny_model.tokenizer, render_prompts(TEXTS))


@pytest.fixture(scope="module")
def label_ids(tiny_model):
    return resolve_label_tokens(tiny_model.tokenizer).ids


def attached_hooks(bridge) -> tuple[int, int]:
    """Hook functions on the bridge's hook points, and torch hooks on all its modules."""
    lens = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in bridge.hook_dict.values())
    torch_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bridge.modules())
    return lens, torch_hooks


@pytest.mark.parametrize("side", ["right", "left"])
def test_batching_gives_identical_result_to_one_by_one(tiny_model, prompt_ids, label_ids, side):
    assert len({len(p) for p in prompt_ids}) > 1  # padding really happens
    batched = collect_activations(
        tiny_model,
        prompt_ids,
        label_ids,
        [0, 2, -1],
        batch_size=3,
        padding_side=side,
        progress=False,
    )
    single = [
        collect_activations(tiny_model, [p], label_ids, [0, 2, -1], progress=False)
        for p in prompt_ids
    ]
    for name in ("resid", "label_logits", "logsumexp", "mean_logit"):
        one_by_one = torch.cat([getattr(s, name) for s in single])
        torch.testing.assert_close(getattr(batched, name), one_by_one, atol=1e-5, rtol=0)


def test_answer_logits_equal_the_full_forward_pass(tiny_model, prompt_ids, label_ids):
    last = tiny_model.n_layers - 1
    acts = collect_activations(tiny_model, prompt_ids, label_ids, [last], progress=False)
    bridge = tiny_model.bridge
    with torch.no_grad():
        for i, ids in enumerate(prompt_ids):
            logits, cache = bridge.run_with_cache(
                torch.tensor([ids]), names_filter=[hooks.resid_post(last)]
            )
            full = logits[0, -1]
            torch.testing.assert_close(
                acts.layer(last)[i], cache[hooks.resid_post(last)][0, -1], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(acts.label_logits[i], full[label_ids], atol=1e-5, rtol=0)
            torch.testing.assert_close(acts.logsumexp[i], full.logsumexp(-1), atol=1e-5, rtol=0)
            torch.testing.assert_close(acts.mean_logit[i], full.mean(), atol=1e-5, rtol=0)
            # the last block's output through ln_final + unembed is the full forward's logits
            via = bridge.unembed(bridge.ln_final(acts.layer(last)[i][None, None]))[0, 0]
            assert float((via - full).abs().max()) <= 1e-5


def test_shapes_predictions_and_layer_access(tiny_model, prompt_ids, label_ids):
    gold = torch.tensor([5, 8, 5, 3, 12, -1, 6])
    acts = collect_activations(
        tiny_model,
        prompt_ids,
        label_ids,
        [1, -1],
        gold=gold,
        sample_ids=[f"s{i}" for i in range(7)],
        label_names=STUDY_LABELS.names(),
        progress=False,
    )
    n, d, last = len(prompt_ids), tiny_model.d_model, tiny_model.n_layers - 1
    assert acts.resid.shape == (n, 2, d) and acts.resid.dtype == torch.float32
    assert acts.label_logits.shape == (n, len(STUDY_LABELS))
    assert acts.logsumexp.shape == acts.mean_logit.shape == (n,)
    assert acts.layers == (1, last) and acts.sample_ids[0] == "s0"
    assert torch.equal(acts.layer(last), acts.resid[:, 1])
    assert torch.equal(acts.predictions, acts.label_logits.argmax(-1))
    assert torch.equal(acts.correct, (acts.predictions == gold) & (gold >= 0))
    assert not bool(acts.correct[5])  # unknown gold is never correct
    assert (acts.label_logprobs <= 0).all()
    assert acts.mean_norm(1) > 0
    with pytest.raises(KeyError, match="not collected"):
        acts.layer(0)
    sub = acts.select(acts.gold == 5)
    assert sub.sample_ids == ("s0", "s2") and sub.resid.shape == (2, 2, d)


def test_invalid_arguments_are_reported(tiny_model, prompt_ids, label_ids):
    with pytest.raises(ValueError, match="out of range"):
        collect_activations(tiny_model, prompt_ids, label_ids, [99], progress=False)
    with pytest.raises(ValueError, match="sample ids"):
        collect_activations(
            tiny_model, prompt_ids, label_ids, [0], sample_ids=["a"], progress=False
        )
    with pytest.raises(ValueError, match="no prompts"):
        collect_activations(tiny_model, [], label_ids, [0], progress=False)


def test_save_load_round_trip(tiny_model, prompt_ids, label_ids, tmp_path):
    acts = collect_activations(
        tiny_model,
        prompt_ids,
        label_ids,
        [0, -1],
        gold=[5, 8, 5, 3, 12, -1, 6],
        label_names=STUDY_LABELS.names(),
        progress=False,
    )
    acts.save(tmp_path / "step-0")
    assert sorted(p.name for p in (tmp_path / "step-0").iterdir()) == [
        "activations.json",
        "activations.safetensors",
    ]
    back = Activations.load(tmp_path / "step-0")
    for name in ("resid", "label_logits", "logsumexp", "mean_logit", "gold"):
        assert torch.equal(getattr(back, name), getattr(acts, name))
    assert back.layers == acts.layers and back.sample_ids == acts.sample_ids
    assert back.label_names == acts.label_names
    assert back.meta["weights_hash"] == tiny_model.weights_hash
    assert back.meta["numerics"] == "raw-hf"


def test_memory_does_not_grow_with_sequence_length(tiny_model, prompt_ids, label_ids):
    """Only answer rows are kept and the vocabulary projection never sees a whole sequence."""
    bridge = tiny_model.bridge
    seen = []

    def spy(tensor, *, hook):
        seen.append(tuple(tensor.shape))

    before = attached_hooks(bridge)
    with bridge.hooks(fwd_hooks=[("unembed.hook_out", spy)]):
        collect_activations(tiny_model, prompt_ids, label_ids, [0, 1], batch_size=4, progress=False)
    assert seen and all(shape[1] == 1 for shape in seen)
    assert attached_hooks(bridge) == before


def test_non_finite_activations_raise_naming_the_samples(tiny_model, prompt_ids, label_ids):
    bridge = tiny_model.bridge

    def poison(tensor, *, hook):
        return tensor * float("nan")

    before = attached_hooks(bridge)
    with bridge.hooks(fwd_hooks=[(hooks.resid_post(0), poison)]):
        with pytest.raises(ValueError, match="NaN/inf.*bad-0"):
            collect_activations(
                tiny_model,
                prompt_ids[:2],
                label_ids,
                [0],
                sample_ids=["bad-0", "bad-1"],
                progress=False,
            )
    assert attached_hooks(bridge) == before


def test_answer_readout_chunking_does_not_change_results(tiny_model, label_ids):
    h = torch.randn(11, tiny_model.d_model)
    whole = answer_readout(tiny_model, h, label_ids, chunk_rows=100)
    chunked = answer_readout(tiny_model, h, label_ids, chunk_rows=3)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_collection_runs_sdpa_and_equals_the_eager_bridge(tiny_model, prompt_ids, label_ids):
    """Collection reads block outputs only, so it runs HF's SDPA attention; a hook inside
    attention (here on the pattern) makes it run the bridge's eager attention instead, with the
    same numbers, and everything is restored afterwards."""
    bridge = tiny_model.bridge
    config = bridge.original_model.config
    assert attention_implementation(bridge) == "sdpa"
    fast = collect_activations(tiny_model, prompt_ids, label_ids, "all", progress=False)
    assert fast.meta["attention"] == "sdpa"
    seen = []

    def pattern_hook(tensor, *, hook):
        seen.append(tensor.shape)

    with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", pattern_hook)]):
        assert attention_implementation(bridge) == "eager"
        with hf_attention(bridge) as used:
            assert used == "eager"
            assert config._attn_implementation == "eager"
        eager = collect_activations(tiny_model, prompt_ids, label_ids, "all", progress=False)
    assert seen  # the eager pass ran the bridge's own attention
    for name in ("resid", "label_logits", "logsumexp", "mean_logit"):
        torch.testing.assert_close(getattr(fast, name), getattr(eager, name), atol=1e-5, rtol=0)
    with hf_attention(bridge) as used:
        assert used == "sdpa" and config._attn_implementation == "sdpa"
    assert config._attn_implementation == "eager"
    seen.clear()
    with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", pattern_hook)]), torch.no_grad():
        bridge(torch.tensor([prompt_ids[0]]))
    assert seen  # after the context, patterns fire again
