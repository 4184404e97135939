"""The final layer's read point: the last block's output (block-out, the default) or the final
norm's output (final-norm, HF's ``hidden_states[-1]``), where steering is linear in alpha."""

import json

import pandas as pd
import pytest
import torch

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode, last_token_index, pad, pad_id
from emolens.measure.activations import answer_readout, collect_activations, final_norm_rows
from emolens.measure.attribution import Readout, decompose_steering
from emolens.measure.steering import final_layer_readout, final_layer_sensitivity, naive_sensitivity
from emolens.measure.vectors import concept_vectors
from emolens.model import hooks
from emolens.model.loading import load_model
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig

TEXTS = [
    "今日は駅まで歩いた。",
    "友達に裏切られて、とても悲しかった。",
    "雨",
    "上司に褒められて誇らしい。",
    "試験に落ちて悔しかった。",
    "猫が膝の上で寝ている。",
]
ALPHAS = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # evenly spaced: second differences


def _with_random_final_norm(model, seed: int):
    """Give the final norm a gain (and, for a LayerNorm, a bias) far from 1 (0), so a read
    point that left out the gain, or read the norm's input, would show."""
    g = torch.Generator().manual_seed(seed)
    norm = model.bridge.ln_final.original_component
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.25)
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return _with_random_final_norm(load_model(tiny_model_dir, device="cpu"), seed=1)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from emolens.testing.tiny import tiny_random_gpt2

    folder = tiny_random_gpt2(tmp_path_factory.mktemp("gpt2") / "model")
    return _with_random_final_norm(load_model(folder, device="cpu"), seed=2)


def _setup(model):
    prompts = encode(model.tokenizer, render_prompts(TEXTS))
    label_ids = resolve_label_tokens(model.tokenizer).ids
    last = model.n_layers - 1
    acts = collect_activations(
        model, prompts, label_ids, "all", progress=False, read_point="final-norm"
    )
    h = acts.layer(last)
    v = torch.randn(3, h.shape[1], generator=torch.Generator().manual_seed(0))
    v = v / v.norm(dim=-1, keepdim=True) * float((h[0] - h[1]).norm())
    return prompts, label_ids, acts, v


def test_final_norm_residuals_are_hf_hidden_states_last_and_build_the_same_vectors(llama):
    """HF applies the final norm to its last hidden state (Llama): the final-norm read point
    is exactly that, and vectors built from HF's hidden_states[-1] equal emolens' own."""
    prompts, label_ids, norm_acts, _ = _setup(llama)
    block_acts = collect_activations(llama, prompts, label_ids, "all", progress=False)
    last = llama.n_layers - 1
    ids, mask = pad(prompts, pad_id(llama.tokenizer), "right")
    with torch.no_grad():
        out = llama.hf_model(ids, attention_mask=mask, output_hidden_states=True)
    rows = torch.arange(len(prompts))
    answer = last_token_index(mask)
    hf_last = out.hidden_states[-1][rows, answer].float()
    hf_block = out.hidden_states[last][rows, answer].float()  # input of the last block
    torch.testing.assert_close(norm_acts.layer(last), hf_last, atol=1e-5, rtol=1e-5)
    assert (block_acts.layer(last) - hf_last).abs().max() > 0.1  # the read points differ
    # every other layer, and every logit, is the same at either read point
    for layer in range(last):
        assert torch.equal(norm_acts.layer(layer), block_acts.layer(layer))
    assert not torch.equal(hf_block, hf_last)
    assert torch.equal(norm_acts.label_logits, block_acts.label_logits)
    assert torch.equal(norm_acts.logsumexp, block_acts.logsumexp)
    assert norm_acts.read_point == "final-norm" and block_acts.read_point == "block-out"
    # equation (2) on HF's hidden_states[-1], by hand, against concept_vectors
    labels = STUDY_LABELS
    gold = torch.tensor([0, 5, 12, 6, 0, 12])
    acts = type(norm_acts)(
        norm_acts.resid,
        norm_acts.label_logits,
        norm_acts.logsumexp,
        norm_acts.mean_logit,
        norm_acts.layers,
        norm_acts.sample_ids,
        gold,
        meta=norm_acts.meta,
    )
    vectors = concept_vectors(acts, torch.ones(len(gold), dtype=torch.bool), labels, 1)
    neutral = hf_last[gold == 12].double().mean(0)
    for emotion, j in (("anger", 0), ("joy", 5), ("pride", 6)):
        by_hand = (hf_last[gold == j].double().mean(0) - neutral).float()
        got = vectors.layer(last)[vectors.emotions.index(emotion)]
        torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_final_norm_fast_path_equals_the_hooked_forward_at_the_final_norm_hook(name, request):
    """Adding alpha v at ``ln_final.hook_out`` in a full forward pass (RMSNorm and LayerNorm
    with a bias) is what the fast path computes with no forward at all."""
    model = request.getfixturevalue(name)
    prompts, label_ids, acts, v = _setup(model)
    last = model.n_layers - 1
    fast = final_layer_sensitivity(
        model, acts.layer(last), v, ALPHAS, label_ids, chunk_rows=7, read_point="final-norm"
    )
    naive = naive_sensitivity(model, prompts, last, v, ALPHAS, label_ids, read_point="final-norm")
    assert fast.hook_name == naive.hook_name == hooks.final_norm() == "ln_final.hook_out"
    for q in ("logit_change", "logprob_change", "centered_change"):
        torch.testing.assert_close(getattr(fast, q), getattr(naive, q), atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.base_label_logits, naive.base_label_logits, atol=1e-5, rtol=0)
    # and it is not the block-out effect (the hook is really after the norm)
    block = naive_sensitivity(model, prompts, last, v, ALPHAS, label_ids)
    assert (block.logit_change - naive.logit_change).abs().max() > 0.1


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_final_norm_readout_equals_the_direct_readout_of_every_row(llama, softcap):
    _, label_ids, acts, v = _setup(llama)
    h = acts.layer(llama.n_layers - 1)
    rows = torch.stack([h[p] + a * e for e in v for a in ALPHAS for p in range(h.shape[0])])
    config = llama.hf_model.config
    before = getattr(config, "final_logit_softcapping", None)
    config.final_logit_softcapping = softcap
    try:
        *got, info = final_layer_readout(
            llama, h, v, ALPHAS, label_ids, chunk_rows=5, read_point="final-norm"
        )
        want = answer_readout(llama, rows, label_ids, read_point="final-norm")
    finally:
        config.final_logit_softcapping = before
    assert info == {"factored_rows": len(rows), "direct_rows": 0}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=0)


def test_sensitivity_is_linear_in_alpha_at_the_final_norm_and_not_at_the_block_output(llama):
    prompts, label_ids, acts, v = _setup(llama)
    last = llama.n_layers - 1
    norm_effect = final_layer_sensitivity(
        llama, acts.layer(last), v, ALPHAS, label_ids, read_point="final-norm"
    )
    second = norm_effect.logit_change.diff(n=2, dim=1)  # [emotion, alpha - 2, prompt, label]
    scale = float(norm_effect.logit_change.abs().max())
    assert scale > 0.1
    assert float(second.abs().max()) <= 1e-5 * scale
    # the slope is u . v per label: alpha * (W_U v) exactly
    w_u = llama.hf_model.get_output_embeddings().weight.detach().float()[list(label_ids)]
    slope = (v @ w_u.T)[:, None, None, :] * ALPHAS[None, :, None, None]
    torch.testing.assert_close(
        norm_effect.logit_change,
        slope.expand_as(norm_effect.logit_change),
        atol=1e-5 * scale,
        rtol=0,
    )
    block_acts = collect_activations(llama, prompts, label_ids, [last], progress=False)
    block_effect = final_layer_sensitivity(llama, block_acts.layer(last), v, ALPHAS, label_ids)
    block_second = block_effect.logit_change.diff(n=2, dim=1)
    assert float(block_second.abs().max()) > 1e-2 * float(block_effect.logit_change.abs().max())


def test_attribution_at_the_final_norm_is_all_direct(llama):
    prompts, label_ids, acts, v = _setup(llama)
    h = acts.layer(llama.n_layers - 1)
    readout = Readout.from_model(llama, label_ids)
    after = readout.at_read_point("final-norm")
    assert after.norm == "none" and readout.at_read_point("block-out") is readout
    torch.testing.assert_close(after.logits(h).float(), acts.label_logits, atol=1e-4, rtol=0)
    parts = decompose_steering(after, h, v, ALPHAS)
    assert torch.equal(parts.scale, torch.zeros_like(parts.scale))
    measured = final_layer_sensitivity(llama, h, v, ALPHAS, label_ids, read_point="final-norm")
    torch.testing.assert_close(parts.direct, measured.logit_change, atol=1e-4, rtol=0)
    torch.testing.assert_close(parts.total, measured.logit_change, atol=1e-4, rtol=0)
    # at the block output the same readout has a scale term
    last = llama.n_layers - 1
    block_h = collect_activations(llama, prompts, label_ids, [last], progress=False).layer(last)
    block = decompose_steering(readout, block_h, v, ALPHAS)
    assert float(block.scale.abs().max()) > 1e-3


def test_final_norm_rows_are_the_norm_of_the_block_output(llama):
    prompts, label_ids, norm_acts, _ = _setup(llama)
    last = llama.n_layers - 1
    block = collect_activations(llama, prompts, label_ids, [last], progress=False)
    torch.testing.assert_close(
        final_norm_rows(llama, block.layer(last)), norm_acts.layer(last), atol=0, rtol=0
    )


# --------------------------------------------------------------------------- the pipeline

CONFIG = AnalysisConfig(
    layers="1,-1",
    steer_layers="1,-1",
    alphas=(0.0, 2.0, 4.0),
    n_prompts=3,
    min_count=1,
    batch_size=16,
    filter_mode="none",
    n_boot=20,
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(4)


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory, tiny_model_dir, corpus):
    """One folder analysed at block-out, then re-analysed at final-norm (overwrite), and a
    reference block-out folder, with the block-out run's step files kept aside."""
    root = tmp_path_factory.mktemp("read_point")
    block, switched = root / "block", root / "switched"
    analyze(tiny_model_dir, corpus, block, CONFIG, device="cpu")
    analyze(tiny_model_dir, corpus, switched, CONFIG, device="cpu")
    before = {
        p.name: p.read_bytes()
        for p in (switched / "steps" / "step-000000").iterdir()
        if p.is_file()
    }
    norm_config = AnalysisConfig(**{**CONFIG.to_dict(), "read_point": "final-norm"})
    analyze(tiny_model_dir, corpus, switched, norm_config, device="cpu", overwrite=True)
    return block, switched, before


def test_the_manifest_and_tables_record_the_read_point(both_runs):
    block, switched, _ = both_runs
    manifest = json.loads((switched / "manifest.json").read_text())
    assert manifest["settings"]["read_point"] == "final-norm"
    assert manifest["final_layer_tables"]["hook"] == "ln_final.hook_out"
    assert manifest["final_layer_tables"]["read_point"] == "final-norm"
    assert "ln_final.hook_out" in manifest["hook_names"]["final_layer"]
    default = json.loads((block / "manifest.json").read_text())
    assert default["settings"]["read_point"] == "block-out"
    assert default["final_layer_tables"]["hook"] == hooks.resid_post(3)
    attribution = pd.read_csv(switched / "attribution.csv")
    assert (attribution.read_point == "final-norm").all()
    assert (attribution.scale_change == 0).all() and (attribution.push_scale.fillna(0) == 0).all()
    assert (attribution.resid_scale == 1).all()
    pd.testing.assert_series_equal(
        attribution.logit_change, attribution.direct, check_names=False, atol=1e-4
    )
    assert "read_point" not in pd.read_csv(block / "attribution.csv").columns
    assert (pd.read_csv(switched / "transfer.csv").read_point == "final-norm").all()
    acts_meta = json.loads((switched / "steps" / "step-000000" / "activations.json").read_text())
    assert acts_meta["hook_names"] == [hooks.resid_post(1), "ln_final.hook_out"]


def test_middle_layers_are_unaffected_and_the_final_layer_is_read_after_the_norm(both_runs):
    block, switched, _ = both_runs
    a, b = pd.read_csv(block / "sensitivity.csv"), pd.read_csv(switched / "sensitivity.csv")
    assert set(b[b.layer == 3].read_point) == {"final-norm"}
    assert set(b[b.layer == 1].read_point) == {"block-out"}
    middle_a, middle_b = a[a.layer == 1], b[b.layer == 1].drop(columns="read_point")
    pd.testing.assert_frame_equal(middle_a.reset_index(drop=True), middle_b.reset_index(drop=True))
    final_a, final_b = a[a.layer == 3], b[b.layer == 3]
    assert (final_a.logit_change.to_numpy() - final_b.logit_change.to_numpy()).std() > 1e-3
    # the final-layer rows at final-norm are exactly linear in alpha
    diag = final_b[final_b.steered_emotion == final_b.observed_label]
    by_alpha = diag.groupby("alpha").logit_change.apply(lambda s: s.to_numpy())
    second = by_alpha[4.0] - 2 * by_alpha[2.0] + by_alpha[0.0]
    assert abs(second).max() <= 1e-4 * max(1.0, abs(by_alpha[4.0]).max())


def test_switching_the_read_point_never_reuses_the_other_ones_results(both_runs):
    """Different activation and step keys: the final-norm run recomputed the activations
    (its final layer is the norm of the block-out run's) and every step file."""
    from safetensors.torch import load

    _, switched, before = both_runs
    step = switched / "steps" / "step-000000"
    assert (step / "activations.key").read_bytes() != before["activations.key"]
    assert (
        json.loads((step / "done.json").read_text())["key"]
        != json.loads(before["done.json"])["key"]
    )
    old = load(before["activations.safetensors"])["resid"]
    new = load((step / "activations.safetensors").read_bytes())["resid"]
    assert torch.equal(old[:, 0], new[:, 0]) and not torch.equal(old[:, 1], new[:, 1])
    for name in ("sensitivity.csv", "vectors.safetensors", "readout.safetensors"):
        assert (step / name).read_bytes() != before[name], name


def test_the_read_point_option_is_checked_and_parsed():
    import argparse

    from emolens.run.config import add_analysis_options

    with pytest.raises(ValueError, match="read-point"):
        AnalysisConfig(read_point="after-norm")
    parser = argparse.ArgumentParser()
    add_analysis_options(parser)
    args = parser.parse_args(["--read-point", "final-norm"])
    assert AnalysisConfig.from_cli(args).read_point == "final-norm"
    assert AnalysisConfig.from_cli(parser.parse_args([])).read_point == "block-out"
    with pytest.raises(SystemExit):
        parser.parse_args(["--read-point", "ln_final"])


def test_final_norm_steps_made_before_the_w_u_metric_are_not_reused(monkeypatch):
    """A final-norm step folder from before the causal metric was built from W_U alone (its
    key had no revision) must not match today's key, so resume recomputes it; block-out keys
    stay as they were."""
    from dataclasses import replace

    from emolens.model.loading import Checkpoint
    from emolens.run import step as step_module
    from emolens.run.config import OFFLINE_SETTINGS
    from emolens.store.files import stable_hash

    monkeypatch.setattr(step_module, "activation_key", lambda ctx, ckpt: "acts")
    ckpt = Checkpoint(8, "run/checkpoint-8", "full", eval_loss=1.5)

    def old_key(config: AnalysisConfig) -> str:  # step_key before STEP_REVISIONS
        settings = {k: v for k, v in config.to_dict().items() if k not in OFFLINE_SETTINGS}
        if settings.get("read_point") == "block-out":
            del settings["read_point"]
        return stable_hash({"activations": "acts", "config": settings, "eval_loss": 1.5})

    def key(config: AnalysisConfig) -> str:
        ctx = object.__new__(step_module.StepContext)  # step_key reads only its config
        ctx.config = config
        return step_module.step_key(ctx, ckpt)

    block, norm = AnalysisConfig(), AnalysisConfig(read_point="final-norm")
    assert key(block) == old_key(block)
    assert key(norm) != old_key(norm) and key(norm) != key(block)
    assert key(norm) == key(replace(norm, n_boot=norm.n_boot + 1))  # offline settings: no
