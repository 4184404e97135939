"""Fine-tuning on the tiny random Llama: the answer-only loss, left padding, the run folder as a
checkpoint series, LoRA and full checkpoints loading back, resuming, and test accuracy."""

import json
import shutil
from dataclasses import replace

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from emolens.data.corpus import load_corpus, split_corpus
from emolens.data.labels import JA_TEMPLATE, STUDY_LABELS, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode, pad_id
from emolens.model.loading import RUN_INFO, discover_series, load_hf_model, load_tokenizer
from emolens.run.finetune import (
    PAPER,
    PRESETS,
    TINY,
    AnswerCollator,
    FinetuneConfig,
    FinetuneError,
    batch_loss,
    build_examples,
    evaluate_accuracy,
    example_losses,
    finetune,
    planned_steps,
    prepare_model,
    read_accuracy,
    run_test_split,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from a second thread, and on shared cores two threads made
    these tests several times slower (threads waiting on each other); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(4)  # 52 samples: 26 train, 13 validation, 13 test


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_hf_model(str(tiny_model_dir)).eval()


@pytest.fixture(scope="module")
def examples(corpus, tokenizer):
    return build_examples(corpus, tokenizer)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, corpus):
    return finetune(
        tiny_model_dir, corpus, tmp_path_factory.mktemp("ft") / "full", TINY, progress=False
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, corpus):
    config = replace(TINY, method="lora", lora_r=4, lora_alpha=8, learning_rate=1e-2)
    return finetune(
        tiny_model_dir, corpus, tmp_path_factory.mktemp("ft") / "lora", config, progress=False
    )


def test_config_round_trips_and_paper_preset_gives_990_steps():
    for config in PRESETS.values():
        assert FinetuneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PAPER.epochs == 3 and PAPER.batch_size == 16 and PAPER.split == (0.8, 0.1, 0.1)
    assert PAPER.eval_steps == PAPER.save_steps == 30
    assert planned_steps(int(6600 * 0.8), PAPER) == 990
    with pytest.raises(ValueError, match="unknown method"):
        FinetuneConfig(method="qlora")
    with pytest.raises(ValueError, match="unknown fine-tuning settings"):
        FinetuneConfig.from_dict({"learning_rat": 1e-4})


def test_examples_are_prompt_then_observed_label_tokens_then_eos(corpus, tokenizer, examples):
    tokens = resolve_label_tokens(tokenizer)
    for sample, example in list(zip(corpus.samples, examples, strict=True))[::9]:
        emotion = STUDY_LABELS.lookup(sample.label)
        (prompt,) = render_prompts([sample.text])
        (full,) = encode(tokenizer, [prompt + JA_TEMPLATE.answer(emotion)])
        assert list(example.input_ids) == full + [tokenizer.eos_token_id]
        n_prompt = len(example.input_ids) - example.n_answer
        assert example.input_ids[n_prompt] == tokens.ids[STUDY_LABELS.index(sample.label)]
        assert list(example.input_ids[:n_prompt]) == encode(tokenizer, [prompt])[0]


def test_collator_left_pads_and_labels_only_the_answer(tokenizer, examples):
    batch = AnswerCollator(pad_id(tokenizer))([vars(e) for e in examples[:4]])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["logits_to_keep"] == max(e.n_answer for e in examples[:4]) + 1
    for row, e in enumerate(examples[:4]):
        n = len(e.input_ids)
        assert ids[row, -n:].tolist() == list(e.input_ids) and mask[row, -n:].all()
        assert not mask[row, :-n].any()
        assert (labels[row, -e.n_answer :] == ids[row, -e.n_answer :]).all()
        assert (labels[row, : -e.n_answer] == -100).all()
        assert batch["position_ids"][row, -n:].tolist() == list(range(n))


def test_logits_to_keep_loss_equals_loss_from_full_logits(base_model, tokenizer, examples):
    batch = AnswerCollator(pad_id(tokenizer))([vars(e) for e in examples[:6]])
    with torch.no_grad():
        fast = batch_loss(base_model, batch)
        full = base_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            labels=batch["labels"],
        )
    assert full.logits.shape[1] == batch["input_ids"].shape[1] > batch["logits_to_keep"]
    torch.testing.assert_close(fast, full.loss, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_gives_identical_losses_to_single_examples(
    base_model, tokenizer, examples
):
    chosen = sorted(examples[:8], key=lambda e: len(e.input_ids))[::2]  # lengths differ
    assert len({len(e.input_ids) for e in chosen}) > 1
    collate = AnswerCollator(pad_id(tokenizer))
    with torch.no_grad():
        batched = example_losses(base_model, collate([vars(e) for e in chosen]))
        single = torch.cat([example_losses(base_model, collate([vars(e)])) for e in chosen])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_a_few_steps_lower_the_training_loss(
    full_run, tiny_model_dir, base_model, tokenizer, corpus
):
    train = split_corpus(corpus, TINY.split, seed=TINY.seed).train
    batch = AnswerCollator(pad_id(tokenizer))([vars(e) for e in build_examples(train, tokenizer)])
    tuned = load_hf_model(str(full_run / "checkpoint-4")).eval()
    with torch.no_grad():
        before, after = batch_loss(base_model, batch), batch_loss(tuned, batch)
    assert after < before - 0.1, (before, after)


def test_run_folder_is_a_series_with_eval_losses_and_a_manifest(full_run, tiny_model_dir, corpus):
    for step in (2, 4):
        ckpt = full_run / f"checkpoint-{step}"
        assert (ckpt / "trainer_state.json").exists() and (ckpt / "config.json").exists()
        assert (ckpt / "tokenizer_config.json").exists()  # each checkpoint loads on its own
        assert not (ckpt / "optimizer.pt").exists()  # weights only unless asked
    series = discover_series(full_run)
    assert series.steps == [0, 2, 4] and not series.problems
    assert [c.kind for c in series.checkpoints] == ["base", "full", "full"]
    assert all(c.eval_loss is not None for c in series.checkpoints)  # base: eval on start
    info = json.loads((full_run / RUN_INFO).read_text())
    assert info["base_model"] == str(tiny_model_dir.resolve())
    assert FinetuneConfig.from_dict(info["config"]) == TINY
    assert info["data_sha256"] == corpus.sha256 and info["status"] == "complete"
    assert [len(info["splits"][k]) for k in ("train", "validation", "test")] == [26, 13, 13]
    assert info["emolens_version"]


def _logits(model, tokenizer, text="今日は駅まで歩いた。"):
    (ids,) = encode(tokenizer, render_prompts([text]))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def test_full_and_lora_checkpoints_load_back_and_differ_from_base(full_run, lora_run, tokenizer):
    lora_ckpt = lora_run / "checkpoint-4"
    assert (lora_ckpt / "adapter_config.json").exists()
    assert (lora_ckpt / "adapter_model.safetensors").exists()
    assert not list(lora_ckpt.glob("tokenizer*"))  # read with the base's: no copy per checkpoint
    for run, kind in ((full_run, "full"), (lora_run, "lora")):
        series = discover_series(run)
        assert [c.kind for c in series.checkpoints] == ["base", kind, kind]
        base = series.load(series.checkpoints[0], device="cpu")
        tuned = series.load(series.checkpoints[-1], device="cpu")
        delta = (_logits(tuned.hf_model, tokenizer) - _logits(base.hf_model, tokenizer)).abs()
        assert delta.max() > 1e-3, kind
        assert tuned.weights_hash != base.weights_hash


def test_accuracy_csv_covers_base_and_every_checkpoint(
    full_run, lora_run, corpus, base_model, tokenizer
):
    for run in (full_run, lora_run):
        table = pd.read_csv(run / "accuracy.csv")
        assert table["step"].tolist() == [0, 2, 4]
        assert (table["n"] == 13).all() and table["accuracy"].between(0, 1).all()
        assert read_accuracy(run) == dict(zip(table["step"], table["accuracy"], strict=True))
    base = evaluate_accuracy(base_model, tokenizer, run_test_split(full_run, corpus))
    assert read_accuracy(full_run)[0] == pytest.approx(base["accuracy"])


def test_accuracy_batched_equals_unbatched(base_model, tokenizer, corpus):
    test = corpus.head_per_label(1)
    one = evaluate_accuracy(base_model, tokenizer, test, batch_size=1)
    many = evaluate_accuracy(base_model, tokenizer, test, batch_size=16)
    assert one["predictions"] == many["predictions"] and one["n"] == len(test) == 13
    assert many["accuracy"] == pytest.approx(many["correct"] / 13)


def _interrupted_copy(run, tmp_path, step):
    """A run folder as a run stopped after checkpoint-``step`` leaves it (the next checkpoint
    half-written)."""
    copy = tmp_path / f"{run.name}-interrupted"
    copy.mkdir()
    (copy / RUN_INFO).write_text((run / RUN_INFO).read_text())
    shutil.copytree(run / f"checkpoint-{step}", copy / f"checkpoint-{step}")
    (copy / f"checkpoint-{step + 2}").mkdir()
    return copy


def _log(run, step, key):
    state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [e[key] for e in state["log_history"] if e.get("step") == step and key in e]


def test_interrupted_run_continues_from_its_last_checkpoint(
    full_run, tmp_path, tiny_model_dir, corpus
):
    run = _interrupted_copy(full_run, tmp_path, 2)
    finetune(tiny_model_dir, corpus, run, TINY, progress=False, accuracy=False)
    info = json.loads((run / RUN_INFO).read_text())
    assert info["resumes"][0]["from_step"] == 2 and not info["resumes"][0]["optimizer_state"]
    assert info["status"] == "complete" and info["global_step"] == 4
    assert discover_series(run).steps == [0, 2, 4]
    # without optimizer state AdamW restarts, but the learning-rate schedule continues
    assert _log(run, 4, "learning_rate") == _log(full_run, 4, "learning_rate")

    finetune(tiny_model_dir, corpus, run, TINY, progress=False, accuracy=False)  # complete
    assert len(json.loads((run / RUN_INFO).read_text())["resumes"]) == 1
    with pytest.raises(FinetuneError, match="different run"):
        finetune(tiny_model_dir, corpus, run, replace(TINY, learning_rate=1e-4), progress=False)


def test_resuming_with_optimizer_state_reproduces_the_uninterrupted_run(
    tmp_path, tiny_model_dir, corpus
):
    config = replace(TINY, save_optimizer=True)
    whole = finetune(
        tiny_model_dir, corpus, tmp_path / "whole", config, progress=False, accuracy=False
    )
    assert (whole / "checkpoint-2" / "optimizer.pt").exists()
    resumed = _interrupted_copy(whole, tmp_path, 2)
    finetune(tiny_model_dir, corpus, resumed, config, progress=False, accuracy=False)
    assert json.loads((resumed / RUN_INFO).read_text())["resumes"][0]["optimizer_state"]
    a = load_hf_model(str(whole / "checkpoint-4")).state_dict()
    b = load_hf_model(str(resumed / "checkpoint-4")).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)
    assert _log(resumed, 4, "eval_loss") == pytest.approx(_log(whole, 4, "eval_loss"))


def test_frozen_embeddings_and_bfloat16_checkpoints(tmp_path, tiny_model_dir, corpus):
    config = replace(TINY, method="full-frozen-embeddings", max_steps=2, save_dtype="bfloat16")
    model = prepare_model(load_hf_model(str(tiny_model_dir)), config)
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad  # untied in the tiny Llama

    run = finetune(
        tiny_model_dir, corpus, tmp_path / "frozen", config, progress=False, accuracy=False
    )
    with safe_open(str(run / "checkpoint-2" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        embedding = f.get_tensor("model.embed_tokens.weight")
    base = load_hf_model(str(tiny_model_dir)).get_input_embeddings().weight
    torch.testing.assert_close(embedding, base.detach().to(torch.bfloat16))
    assert discover_series(run).steps == [0, 2]
