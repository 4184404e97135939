from functools import partial

import pytest
import torch

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode, last_token_index, pad
from emolens.measure.activations import collect_activations
from emolens.measure.localisation import (
    ablate_direction,
    answer_residuals,
    intervened_label_logits,
    patch_mean,
    sweep_windows,
    unit_directions,
    window_sweep,
)
from emolens.measure.vectors import ConceptVectors, concept_vectors
from emolens.model import hooks


def attached_hooks(bridge) -> tuple[int, int]:
    """Hook functions on the bridge's hook points, and torch hooks on all its modules."""
    lens = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in bridge.hook_dict.values())
    torch_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bridge.modules())
    return lens, torch_hooks


@pytest.fixture(scope="module")
def setup(tiny_model):
    """Two samples of each of four labels (neutral included), their tokens, label token ids,
    answer residuals at every layer, and concept vectors from all of them."""
    corpus = load_corpus(None)
    names = ["joy", "sadness", "fear", "no-emotion"]
    picked = [i for name in names for i in [j for j, s in enumerate(corpus.samples)
              if s.label == name][:2]]  # fmt: skip
    texts = [corpus.samples[i].text for i in picked]
    gold = torch.tensor([STUDY_LABELS.index(corpus.samples[i].label) for i in picked])
    prompts = encode(tiny_model.tokenizer, render_prompts(texts))
    label_ids = resolve_label_tokens(tiny_model.tokenizer).ids
    acts = collect_activations(tiny_model, prompts, label_ids, "all", gold=gold, progress=False)
    with pytest.warns(UserWarning):  # labels without samples drop out
        vectors = concept_vectors(acts, torch.ones(len(picked), dtype=torch.bool), STUDY_LABELS, 1)
    return prompts, gold, label_ids, acts, vectors


def with_vectors(vectors: ConceptVectors, values: torch.Tensor) -> ConceptVectors:
    return ConceptVectors(values, vectors.counts, vectors.emotions, vectors.layers,
                          vectors.neutral, vectors.neutral_count, vectors.dropped,
                          vectors.min_count, vectors.meta)  # fmt: skip


def orthogonal_to(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """A random unit vector orthogonal to every row of ``rows`` (fewer rows than dims)."""
    basis, _ = torch.linalg.qr(rows.double().T)  # [d, k], orthonormal columns
    v = torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(seed)).double()
    v = v - basis @ (basis.T @ v)
    return (v / v.norm()).float()


def slow_label_logits(model, ids: list[int], label_ids, edits: dict[int, callable]):
    """The obvious way: one unbatched full forward pass with a hand-written hook per layer."""
    fwd = [(hooks.resid_post(layer), fn) for layer, fn in edits.items()]
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=fwd):
        logits = model.bridge(torch.tensor([ids]))[0, -1]
    return logits[torch.tensor(label_ids)]


def project_out(tensor, *, hook, u, answer_only: bool):
    """h - (h.u)u at the last position of a single-row batch, or everywhere."""
    if not answer_only:
        return tensor - (tensor @ u)[..., None] * u
    tensor = tensor.clone()
    h = tensor[0, -1]
    tensor[0, -1] = h - (h @ u) * u
    return tensor


def patch_along(tensor, *, hook, u, m):
    """h + ((m - h).u)u at the last position of a single-row batch."""
    tensor = tensor.clone()
    h = tensor[0, -1]
    tensor[0, -1] = h + ((m - h) @ u) * u
    return tensor


# --------------------------------------------------------------------------- interventions


def test_ablating_directions_orthogonal_to_the_answer_residuals_changes_nothing(tiny_model, setup):
    prompts, gold, label_ids, acts, vectors = setup
    n_layers = tiny_model.n_layers
    # per-row directions orthogonal to each row's own clean answer residual at every layer
    dirs = torch.stack([
        torch.stack([orthogonal_to(acts.layer(layer)[i : i + 1], seed=10 * layer + i)
                     for i in range(len(prompts))])
        for layer in range(n_layers)
    ])  # fmt: skip
    after = intervened_label_logits(
        tiny_model, prompts, list(range(n_layers)), label_ids, dirs, batch_size=3
    )
    torch.testing.assert_close(after, acts.label_logits, atol=1e-5, rtol=0)
    # the same through the sweep: each emotion's vector orthogonal to its samples' residuals
    values = torch.stack([
        torch.stack([orthogonal_to(acts.layer(layer)[gold == STUDY_LABELS.index(e)], seed=e_i)
                     for e_i, e in enumerate(vectors.emotions)])
        for layer in range(n_layers)
    ])  # fmt: skip
    frame = window_sweep(
        tiny_model, prompts, gold, label_ids, with_vectors(vectors, values), 2, mode="ablate",
        progress=False,
    )  # fmt: skip
    assert frame.gold_logit_drop.abs().max() <= 1e-5
    assert frame.margin_drop.abs().max() <= 1e-5
    assert (frame.accuracy_after == frame.accuracy_before).all()
    assert (frame.n_samples == 6).all() and (frame.n_skipped == 2).all()  # neutral skipped


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_sweep_ablation_equals_the_slow_per_sample_hooked_run(tiny_model, setup, positions):
    prompts, gold, label_ids, acts, vectors = setup
    frame = window_sweep(
        tiny_model, prompts, gold, label_ids, vectors, window=2, mode="ablate", batch_size=4,
        positions=positions, progress=False,
    )  # fmt: skip
    assert list(zip(frame.start_layer, frame.end_layer)) == [(0, 1), (1, 2), (2, 3)]
    names = STUDY_LABELS.names()
    used = [i for i in range(len(prompts)) if names[int(gold[i])] in vectors.emotions]
    for row in frame.itertuples():
        drops, margins, correct = [], [], []
        for i in used:
            g = int(gold[i])
            e = vectors.emotions.index(names[g])

            edits = {
                layer: partial(project_out, u=unit_directions(vectors.layer(layer)[e]),
                               answer_only=positions == "answer")
                for layer in range(row.start_layer, row.end_layer + 1)
            }  # fmt: skip
            after = slow_label_logits(tiny_model, prompts[i], label_ids, edits)
            before = acts.label_logits[i]
            others = [j for j in range(len(label_ids)) if j != g]
            drops.append(float(before[g] - after[g]))
            margins.append(
                float((before[g] - before[others].max()) - (after[g] - after[others].max()))
            )
            correct.append(int(after.argmax()) == g)
        assert row.gold_logit_drop == pytest.approx(sum(drops) / len(drops), abs=1e-4)
        assert row.margin_drop == pytest.approx(sum(margins) / len(margins), abs=1e-4)
        assert row.accuracy_after == pytest.approx(sum(correct) / len(correct))
    assert frame.gold_logit_drop.abs().max() > 1e-4  # the ablation does something


def test_sweep_patch_equals_the_slow_per_sample_hooked_run(tiny_model, setup):
    prompts, gold, label_ids, acts, vectors = setup
    frame = window_sweep(
        tiny_model, prompts, gold, label_ids, vectors, 3, mode="patch", source="fear",
        progress=False,
    )  # fmt: skip
    assert (frame.source == "fear").all() and (frame.n_samples == 4).all()
    fear = gold == STUDY_LABELS.index("fear")
    for row in frame.itertuples():
        drops = []
        for i in range(len(prompts)):
            name = STUDY_LABELS.names()[int(gold[i])]
            if name not in ("joy", "sadness"):
                continue  # neutral has no vector; fear is the source
            g = int(gold[i])

            edits = {}
            for layer in range(row.start_layer, row.end_layer + 1):
                v = vectors.layer(layer)
                u = unit_directions(
                    v[vectors.emotions.index("fear")] - v[vectors.emotions.index(name)]
                )
                m = acts.layer(layer)[fear].mean(0)
                edits[layer] = partial(patch_along, u=u, m=m)
            after = slow_label_logits(tiny_model, prompts[i], label_ids, edits)
            drops.append(float(acts.label_logits[i, g] - after[g]))
        assert row.gold_logit_drop == pytest.approx(sum(drops) / len(drops), abs=1e-4)


def test_ablating_the_readout_direction_of_a_label_at_the_last_layer_zeroes_its_logit(
    tiny_model, setup
):
    """Planted: the final RMSNorm and the unembedding read label j along w * W_U[j]; with that
    as every emotion's vector, ablating it at the last block output makes the gold logit 0."""
    prompts, _, label_ids, acts, vectors = setup
    w = tiny_model.bridge.ln_final.get_parameter("_original_component.weight").detach()
    w_u = tiny_model.hf_model.lm_head.weight.detach()
    emotion_labels = [STUDY_LABELS.index(e) for e in vectors.emotions]
    readout = torch.stack([w * w_u[label_ids[j]] for j in emotion_labels])  # [emotion, d]
    planted = with_vectors(vectors, readout.expand(tiny_model.n_layers, -1, -1).clone())
    # gold: each sample's best label among the emotions with a vector
    logits = acts.label_logits[:, emotion_labels]
    gold = torch.tensor(emotion_labels)[logits.argmax(-1)]
    frame = window_sweep(
        tiny_model, prompts, gold, label_ids, planted, 1, mode="ablate", progress=False
    )
    last = frame.iloc[-1]
    assert (last.start_layer, last.end_layer) == (3, 3)
    assert last.gold_logit_before > 0
    assert last.gold_logit_drop == pytest.approx(last.gold_logit_before, abs=1e-5)
    assert frame.gold_logit_drop.idxmax() == len(frame) - 1  # the last layer matters most
    own = readout[[emotion_labels.index(int(g)) for g in gold]][None]  # [layer, sample, d]
    after = intervened_label_logits(tiny_model, prompts, [3], label_ids, own)
    assert after[torch.arange(len(gold)), gold].abs().max() <= 1e-5


#: ``window_sweep(..., 2, mode="ablate", batch_size=4)`` on the tiny model and ``setup``, from
#: the implementation before mean patching and the random control (ablate must not change).
PINNED_ABLATE = {
    "answer": {
        "gold_logit_drop": [-0.0307955, 0.0158015, 0.009534],
        "margin_drop": [-0.0710143, -0.0310796, 0.0737163],
        "accuracy_after": [0.1666667, 0.1666667, 0.1666667],
    },
    "all": {
        "gold_logit_drop": [0.0277575, 0.1095448, 0.0608287],
        "margin_drop": [0.0270191, 0.0028373, 0.0665757],
        "accuracy_after": [0.1666667, 0.1666667, 0.1666667],
    },
}


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_ablate_is_unchanged_by_mean_patching_and_the_control(tiny_model, setup, positions):
    prompts, gold, label_ids, _, vectors = setup
    frame = window_sweep(
        tiny_model, prompts, gold, label_ids, vectors, 2, mode="ablate", batch_size=4,
        positions=positions, progress=False,
    )  # fmt: skip
    for column, values in PINNED_ABLATE[positions].items():
        assert frame[column].tolist() == pytest.approx(values, abs=2e-6), column
    assert (frame.gold_logit_before.round(6) == -0.060518).all()
    assert (frame.n_control == 3).all() and frame.control_gold_logit_drop_mean.notna().all()


def _mean_sweep(tiny_model, setup, values, window=2, **kw):
    prompts, gold, label_ids, _, vectors = setup
    return window_sweep(
        tiny_model, prompts, gold, label_ids, with_vectors(vectors, values), window,
        progress=False, **kw,
    )  # fmt: skip


def test_mean_patching_a_direction_all_samples_share_changes_nothing(tiny_model, setup):
    """Along a direction u with the same component for every sample (u orthogonal to every
    deviation from the mean residual, not to the mean), mean patching is a no-op: no drop,
    none beyond the random control, while zero ablation of the same u does change the logits."""
    _, _, _, acts, vectors = setup
    n_layers = tiny_model.n_layers
    shared = []
    for layer in range(n_layers):
        h = acts.layer(layer).double()
        basis, _ = torch.linalg.qr((h - h.mean(0)).T)  # deviations' span, [d, n]
        m = h.mean(0)
        u = m - basis @ (basis.T @ m)  # the mean's part outside the deviations' span
        assert u.norm() > 1e-3 * m.norm()
        shared.append((u / u.norm()).float())
    values = torch.stack(shared)[:, None].expand(-1, len(vectors.emotions), -1).clone()
    frame = _mean_sweep(tiny_model, setup, values, n_control=4)
    assert (frame["mode"] == "mean").all()  # the default
    assert frame.gold_logit_drop.abs().max() <= 1e-5 and frame.margin_drop.abs().max() <= 1e-5
    assert (frame.accuracy_after == frame.accuracy_before).all()
    control = frame.control_gold_logit_drop_mean.abs()
    assert (frame.gold_logit_drop.abs() <= control + 1e-5).all() and (control > 1e-4).all()
    ablated = _mean_sweep(tiny_model, setup, values, mode="ablate", n_control=0)
    assert ablated.gold_logit_drop.abs().max() > 100 * frame.gold_logit_drop.abs().max()
    assert ablated.control_gold_logit_drop_mean.isna().all() and (ablated.n_control == 0).all()


def test_mean_patching_the_gold_readout_direction_drops_far_more_than_random(tiny_model, setup):
    """Planted: every emotion's vector is its label's readout row w * W_U[j], and each sample's
    gold is the emotion whose logit it raises most above the mean over samples, so along the
    gold's own row the residual carries the label; mean patching it at the last layer drops the
    gold logit far more than random directions do."""
    prompts, _, label_ids, acts, vectors = setup
    w = tiny_model.bridge.ln_final.get_parameter("_original_component.weight").detach()
    w_u = tiny_model.hf_model.lm_head.weight.detach()
    emotion_labels = [STUDY_LABELS.index(e) for e in vectors.emotions]
    readout = torch.stack([w * w_u[label_ids[j]] for j in emotion_labels])
    planted = readout.expand(tiny_model.n_layers, -1, -1).clone()
    logits = acts.label_logits[:, emotion_labels]
    gold = torch.tensor(emotion_labels)[(logits - logits.mean(0)).argmax(-1)]
    frame = window_sweep(
        tiny_model, prompts, gold, label_ids, with_vectors(vectors, planted), 1, n_control=5,
        progress=False,
    )  # fmt: skip
    last = frame.iloc[-1]
    assert last.n_samples == len(prompts) and last.gold_logit_drop > 0
    assert last.gold_logit_drop > 10 * abs(last.control_gold_logit_drop_max)  # same window
    assert frame.gold_logit_drop.idxmax() == len(frame) - 1  # read at the last layer


def test_patch_sets_the_component_along_the_direction_and_keeps_the_rest(tiny_model, setup):
    prompts, _, _, acts, _ = setup
    bridge = tiny_model.bridge
    ids, mask = pad(prompts[:3], 0, "right")
    answer = last_token_index(mask)
    name = hooks.resid_post(1)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1, acts.resid.shape[-1], generator=gen) * 3
    direction = torch.randn(1, 3, acts.resid.shape[-1], generator=gen)
    u = unit_directions(direction[0])
    clean = acts.layer(1)[:3]
    with torch.no_grad():
        with patch_mean(bridge, [1], mean, answer_index=answer, directions=direction):
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=[name])
        patched = cache[name][torch.arange(3), answer]
        torch.testing.assert_close((patched * u).sum(-1), (mean * u).sum(-1), atol=1e-4, rtol=0)
        rest = lambda h: h - (h * u).sum(-1, keepdim=True) * u  # noqa: E731
        torch.testing.assert_close(rest(patched), rest(clean), atol=1e-4, rtol=0)
        with patch_mean(bridge, [1], mean, answer_index=answer):  # whole residual replaced
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=[name])
        torch.testing.assert_close(cache[name][torch.arange(3), answer], mean.expand(3, -1))
        before_answer = cache[name][0, : int(answer[0])]
        _, clean_cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=[name])
        assert torch.equal(before_answer, clean_cache[name][0, : int(answer[0])])


def test_answer_residuals_equal_collected_activations(tiny_model, setup):
    prompts, _, _, acts, _ = setup
    rows = answer_residuals(tiny_model, prompts, [0, -1], batch_size=3)
    torch.testing.assert_close(rows[0], acts.layer(0), atol=1e-5, rtol=0)
    last = tiny_model.n_layers - 1
    torch.testing.assert_close(rows[last], acts.layer(last), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- scoping, errors


def test_no_hooks_remain_after_sweeps_and_errors(tiny_model, setup):
    prompts, gold, label_ids, _, vectors = setup
    bridge = tiny_model.bridge
    before = attached_hooks(bridge)
    window_sweep(tiny_model, prompts, gold, label_ids, vectors, 4, progress=False)
    window_sweep(tiny_model, prompts, gold, label_ids, vectors, 4, mode="patch", progress=False)
    assert attached_hooks(bridge) == before
    d = torch.ones(2, 64)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_direction(bridge, [1, 2], d):
            assert attached_hooks(bridge) != before
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with patch_mean(bridge, [1, 2], d, answer_index=torch.tensor([0])):
            raise RuntimeError("boom")
    with pytest.raises(ValueError, match="rows of directions"):  # raised inside the hook
        with torch.no_grad(), ablate_direction(bridge, [1, 2], torch.ones(2, 3, 64)):
            bridge(torch.tensor([prompts[0]]))
    assert attached_hooks(bridge) == before


def test_windows_cover_the_depth_and_bad_arguments_are_named(tiny_model, setup):
    prompts, gold, label_ids, acts, vectors = setup
    assert sweep_windows(18, 4, 3) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (14, 17)]
    assert sweep_windows(4, 4) == [(0, 3)]
    with pytest.raises(ValueError, match="window"):
        sweep_windows(4, 5)
    with pytest.raises(ValueError, match="answer_index"):
        with ablate_direction(tiny_model, [1], torch.ones(1, 64), positions="answer"):
            pass
    with pytest.raises(ValueError, match="directions for 3 layers"):
        with ablate_direction(tiny_model, [0, 1, 2], torch.ones(2, 64)):
            pass
    partial = ConceptVectors(
        vectors.vectors[:2], vectors.counts, vectors.emotions, (0, 1), vectors.neutral
    )
    with pytest.raises(ValueError, match=r"lack layers \[2, 3\]"):
        window_sweep(tiny_model, prompts, gold, label_ids, partial, 2, progress=False)
    with pytest.raises(ValueError, match="no concept vector"):
        window_sweep(
            tiny_model, prompts, gold, label_ids, vectors, 2, mode="patch", source="anger",
            progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="no sample has the source label"):
        no_neutral = gold.clone()
        no_neutral[gold == STUDY_LABELS.neutral_index] = STUDY_LABELS.index("joy")
        window_sweep(
            tiny_model, prompts, no_neutral, label_ids, vectors, 2, mode="patch", progress=False
        )
