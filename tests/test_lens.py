import pytest
import torch

from emolens.data.labels import render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure.activations import answer_readout, collect_activations
from emolens.measure.lens import LogitLens, lens_frame, logit_lens

TEXTS = ["駅まで歩いた。", "友達と昼ご飯を食べた。", "雨の中、傘を忘れて帰った。", "猫が鳴いた。"]


@pytest.fixture(scope="module")
def lens_setup(tiny_model):
    label_ids = resolve_label_tokens(tiny_model.tokenizer).ids
    ids = encode(tiny_model.tokenizer, render_prompts(TEXTS))
    acts = collect_activations(
        tiny_model, ids, label_ids, "all", gold=[0, 0, 3, -1], progress=False
    )
    return label_ids, acts, logit_lens(tiny_model, acts, label_ids)


def test_last_layer_lens_is_the_models_answer_readout(tiny_model, lens_setup):
    _, acts, lens = lens_setup
    assert lens.layers == tuple(range(tiny_model.n_layers))
    assert torch.equal(lens.label_logits[:, -1], acts.label_logits)
    assert torch.equal(lens.logsumexp[:, -1], acts.logsumexp)


def test_middle_layers_read_through_ln_final_and_unembed(tiny_model, lens_setup):
    label_ids, acts, lens = lens_setup
    ln, un = tiny_model.bridge.ln_final, tiny_model.bridge.unembed
    with torch.no_grad():
        full = un(ln(acts.layer(1)[:, None]))[:, 0]  # [sample, vocab]
    assert torch.allclose(lens.label_logits[:, 1], full[:, label_ids], atol=1e-5)
    assert not torch.allclose(lens.label_logits[:, 1], lens.label_logits[:, -1], atol=1e-2)
    logits, _, _ = answer_readout(tiny_model, acts.layer(2), label_ids)
    assert torch.equal(lens.label_logits[:, 2], logits)


def test_ranks_and_accuracy_on_planted_logits():
    logits = torch.tensor([[[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]], [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]])
    lens = LogitLens(logits, torch.zeros(2, 2), (0, 3))
    gold = torch.tensor([0, 2])
    assert lens.ranks(gold).tolist() == [[3, 1], [1, 1]]
    frame = lens_frame(lens, 5, gold, ("a", "b", "c"), n_layers=4)
    a = frame[frame.label == "a"].set_index("layer")
    assert a.loc[0, "rank"] == 3 and a.loc[3, "rank"] == 1
    assert a.loc[0, "accuracy"] == 0 and a.loc[3, "accuracy"] == 1
    assert a.loc[0, "margin"] == pytest.approx(1.0 - 2.5)
    assert a.loc[3, "depth"] == 1.0 and set(frame.label) == {"a", "c"}


def test_lens_frame_leaves_out_unknown_gold(tiny_model, lens_setup):
    _, acts, lens = lens_setup
    labels = tuple(f"l{j}" for j in range(13))
    frame = lens_frame(lens, 0, acts.gold, labels, tiny_model.n_layers)
    assert set(frame.label) == {"l0", "l3"}
    assert frame.n_samples.sum() == 3 * tiny_model.n_layers
    last = frame[(frame.layer == tiny_model.n_layers - 1) & (frame.label == "l0")].iloc[0]
    assert last.logit == pytest.approx(float(acts.label_logits[:2, 0].mean()), abs=1e-6)
    assert last.accuracy == pytest.approx(float(acts.correct[:2].double().mean()))


def test_lens_and_heads_figures_show_the_table_means():
    import numpy as np
    import pandas as pd

    from emolens.report.lens_figures import heads_figure, lens_depth_figure, lens_figure

    lens = pd.DataFrame(
        [
            {"step": s, "layer": k, "label": lab, "accuracy": acc}
            for s in (0, 9)
            for k in (0, 1)
            for lab, acc in (("joy", 0.2 * k + s / 10), ("fear", 0.5))
        ]
    )
    fig = lens_figure(lens, ja={"joy": "喜び"})
    assert len(fig.data) == 3 and fig.data[0].visible and not fig.data[2].visible
    first = fig.data[0]
    assert list(first.y) == ["mean over labels", "fear", "喜び joy"]
    assert np.allclose(first.z[0], [0.25, 0.35]) and np.allclose(first.z[2], [0.0, 0.2])
    assert np.allclose(fig.data[2].z[2], [0.9, 0.9])  # step 9 - step 0
    depth = lens_depth_figure(lens)
    assert np.allclose(depth.data[0].z, [[0.25, 0.35], [0.7, 0.8]])
    heads = pd.DataFrame(
        [
            {"step": 0, "label": lab, "layer": 1, "head": h, "margin": m}
            for lab, m in (("joy", 1.0), ("fear", 3.0))
            for h in (-1, 0, 1)
        ]
    )
    hf = heads_figure(heads)
    assert len(hf.data) == 1 and list(hf.data[0].x) == ["0", "1"]
    assert np.allclose(hf.data[0].z, [[2.0, 2.0]])
    with pytest.raises(ValueError, match="value"):
        heads_figure(heads, value="nope")
