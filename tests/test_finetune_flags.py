"""``emolens finetune``'s flags come from FinetuneConfig's fields and each reaches the Trainer
(arguments, LoRA config, data, callbacks) it names; --report-to; SDPA training; first-token
eval metrics against the slow computation; several seeds on one split."""

import dataclasses
import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
import transformers.trainer

from emolens.cli import build_parser, main, parse_args
from emolens.data.corpus import load_corpus, split_corpus
from emolens.data.labels import PromptSpec
from emolens.data.tokens import pad_id
from emolens.model.loading import RUN_INFO, discover_series, load_hf_model, load_tokenizer
from emolens.run.finetune import (
    EVAL_CSV,
    SEEDS_FILE,
    TINY,
    AnswerCollator,
    FinetuneConfig,
    FirstTokenMetrics,
    answer_ids,
    answer_loss,
    build_examples,
    first_token_scores,
    read_seed_runs,
    use_sdpa,
)
from emolens.testing.tiny import tiny_random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(4)  # 52 samples


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return tiny_random_model(tmp_path_factory.mktemp("tiny-chat") / "model", chat_template=True)


class _Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Replace the Trainer by one that records itself and stops when asked to train."""
    seen = []

    class Capture(transformers.Trainer):
        def train(self, *args, **kwargs):
            seen.append(self)
            raise _Stop

    # `from transformers import Trainer` finds it in the lazy module's cache or its submodule
    monkeypatch.setattr(transformers, "Trainer", Capture)
    monkeypatch.setattr(transformers.trainer, "Trainer", Capture)
    from transformers import Trainer

    assert Trainer is Capture
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return seen


def test_every_config_field_is_a_flag_and_a_study_key(tmp_path):
    parser = build_parser("finetune", lazy=True)
    dests = {a.dest for a in parser.subcommands["finetune"]._actions}
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} <= dests
    study = tmp_path / "s.toml"
    study.write_text(
        '[finetune]\nlora_r = 3\nsplit = [0.6, 0.2, 0.2]\nchat = true\nreport_to = "wandb"\n'
        'lora_target_modules = ["q_proj"]\nwarmup = 5\nmax_steps = 7\nout = "o"\n'
    )
    args = parse_args(["finetune", "--config", str(study)])
    assert (args.lora_r, args.split, args.chat, args.report_to) == (
        3,
        (0.6, 0.2, 0.2),
        True,
        "wandb",
    )
    assert args.lora_target_modules == ("q_proj",) and args.max_steps == 7
    assert args.warmup == 5 and isinstance(args.warmup, int)  # steps, not a fraction
    args = parse_args(["finetune", "--out", "o", "--warmup", "0.1", "--max-steps", "none"])
    assert args.warmup == 0.1 and args.max_steps is None
    assert not hasattr(parse_args(["finetune", "--out", "o"]), "lora_r")  # the preset's


def test_an_unknown_study_key_names_the_valid_ones(tmp_path, capsys):
    study = tmp_path / "s.toml"
    study.write_text('[finetune]\nlora_rank = 3\nout = "o"\n')
    assert main(["finetune", "--config", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora_rank" in err and "lora_r" in err


#: One non-default value per FinetuneConfig field, as flags, and how to see it in what the
#: Trainer receives. A new field must be added here (the test below checks the keys).
FLAGS = {
    "method": ["--method", "lora"],
    "epochs": ["--epochs", "2"],
    "batch_size": ["--batch-size", "3"],
    "learning_rate": ["--learning-rate", "0.0007"],
    "warmup": ["--warmup", "2"],
    "weight_decay": ["--weight-decay", "0.01"],
    "save_steps": ["--save-steps", "3"],
    "max_steps": ["--max-steps", "5"],
    "seed": ["--seed", "7"],
    "split_seed": ["--split-seed", "11"],
    "split": ["--split", "0.5,0.25,0.25"],
    "gradient_accumulation": ["--gradient-accumulation", "2"],
    "lora_r": ["--lora-r", "3"],
    "lora_alpha": ["--lora-alpha", "5"],
    "lora_dropout": ["--lora-dropout", "0.2"],
    "lora_target_modules": ["--lora-target-modules", "q_proj,v_proj"],
    "save_optimizer": ["--save-optimizer"],
    "save_dtype": ["--save-dtype", "float16"],
    "language": ["--language", "en"],
    "chat": ["--chat"],
    "append_eos": ["--no-append-eos"],
    "report_to": ["--report-to", "wandb"],
}


def test_each_flag_changes_what_the_trainer_gets(tmp_path, chat_model_dir, captured):
    assert set(FLAGS) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(chat_model_dir), "--out", str(out), "--preset", "tiny"]
    argv += [word for flag in FLAGS.values() for word in flag]
    args = parse_args(argv)
    with pytest.raises(_Stop):
        args.func(args)
    (trainer,) = captured
    a, model = trainer.args, trainer.model
    lora = model.peft_config["default"]
    corpus = load_corpus("bundled", language="en")
    splits = split_corpus(corpus, (0.5, 0.25, 0.25), seed=11)
    tokenizer = load_tokenizer(str(chat_model_dir))
    prompt = PromptSpec.for_language("en", chat=True)
    train = trainer.train_dataset.examples
    callbacks = {type(c).__name__: c for c in trainer.callback_handler.callbacks}
    seen = {
        "method": type(model).__name__ == "PeftModelForCausalLM",
        "epochs": a.num_train_epochs == 2,
        "batch_size": a.per_device_train_batch_size == a.per_device_eval_batch_size == 3,
        "learning_rate": a.learning_rate == 0.0007,
        "warmup": a.warmup_steps == 2,
        "weight_decay": a.weight_decay == 0.01,
        "save_steps": a.save_steps == a.eval_steps == 3,
        "max_steps": a.max_steps == 5,
        "seed": a.seed == a.data_seed == 7,
        "split_seed": [e.id for e in train] == splits.train.ids(),
        "split": len(train) == len(splits.train) and len(splits.train) * 2 == len(corpus),
        "gradient_accumulation": a.gradient_accumulation_steps == 2,
        "lora_r": lora.r == 3,
        "lora_alpha": lora.lora_alpha == 5,
        "lora_dropout": lora.lora_dropout == 0.2,
        "lora_target_modules": set(lora.target_modules) == {"q_proj", "v_proj"},
        "save_optimizer": a.save_only_model is False,
        "save_dtype": callbacks["SaveDtype"].name == "float16",
        "language": json.loads((out / "prompt.json").read_text())["template"]["language"] == "en",
        "chat": [list(e.input_ids[: -e.n_answer]) for e in train[:3]]
        == prompt.encode(tokenizer, splits.train.texts()[:3]),
        "append_eos": all(e.input_ids[-1] != tokenizer.eos_token_id for e in train)
        and {tuple(e.input_ids[-e.n_answer :]) for e in train}
        <= {tuple(a) for a in answer_ids(tokenizer, prompt, append_eos=False)},
        "report_to": a.report_to == ["wandb"] and "WandbCallback" in callbacks,
    }
    assert not [name for name, ok in seen.items() if not ok]
    recorded = FinetuneConfig.from_dict(json.loads((out / RUN_INFO).read_text())["config"])
    assert recorded.lora_r == 3 and recorded.chat and recorded.split_seed == 11


def test_the_preset_stays_where_no_flag_is_given(tmp_path, tiny_model_dir, captured):
    args = parse_args(
        ["finetune", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--preset", "tiny"]
    )
    with pytest.raises(_Stop):
        args.func(args)
    (trainer,) = captured
    assert trainer.args.report_to == [] or trainer.args.report_to == "none"
    assert trainer.args.learning_rate == TINY.learning_rate and trainer.args.max_steps == 4
    assert trainer.args.per_device_train_batch_size == TINY.batch_size
    assert type(trainer.model).__name__ == "LlamaForCausalLM"


def test_a_missing_report_backend_is_one_line_naming_the_install(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tiny_model_dir), "--out", str(out), "--preset", "tiny"]
    assert main([*argv, "--report-to", "tensorboard"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install tensorboard" in err
    assert not out.exists()  # refused before anything is written
    with pytest.raises(SystemExit, match="2"):  # not a choice: argparse's usage error
        main([*argv, "--report-to", "mlflow"])


def test_training_runs_sdpa_and_it_computes_what_eager_does(
    tmp_path, tiny_model_dir, corpus, captured
):
    args = parse_args(
        ["finetune", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--preset", "tiny"]
    )
    with pytest.raises(_Stop):
        args.func(args)
    assert captured[0].model.config._attn_implementation == "sdpa"
    eager = load_hf_model(str(tiny_model_dir)).eval()
    assert eager.config._attn_implementation == "eager"  # the analysis' loading is unchanged
    sdpa = use_sdpa(load_hf_model(str(tiny_model_dir))).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = sorted(build_examples(corpus, tokenizer)[:8], key=lambda e: len(e.input_ids))
    batch = AnswerCollator(pad_id(tokenizer))([vars(e) for e in examples])  # left-padded
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        a, b = eager(**inputs).logits, sdpa(**inputs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_first_token_scores_equal_the_slow_computation(tiny_model_dir, corpus):
    model = load_hf_model(str(tiny_model_dir)).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = PromptSpec.for_language("ja")
    label_ids = prompt.label_tokens(tokenizer).ids
    examples = build_examples(corpus, tokenizer, prompt)[:10]
    batch = AnswerCollator(pad_id(tokenizer))([vars(e) for e in examples])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        fast = first_token_scores(logits, batch["labels"], torch.tensor(label_ids))
        # as several processes hand them over: both padded on the right with -100
        padded = first_token_scores(
            torch.nn.functional.pad(logits, (0, 0, 0, 2), value=-100),
            torch.nn.functional.pad(batch["labels"], (0, 3), value=-100),
            torch.tensor(label_ids),
        )
        slow = []
        for e in examples:  # each prompt alone, full logits, the last prompt position
            n_prompt = len(e.input_ids) - e.n_answer
            row = model(torch.tensor([e.input_ids[:n_prompt]])).logits[0, -1]
            gold = e.input_ids[n_prompt]
            ce = -torch.log_softmax(row, -1)[gold]
            predicted = label_ids[int(row[torch.tensor(label_ids)].argmax())]
            slow.append([float(ce), float(predicted == gold)])
    torch.testing.assert_close(fast, torch.tensor(slow), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(padded, fast)
    metrics = FirstTokenMetrics(tuple(label_ids))
    summary = metrics(transformers.EvalPrediction(predictions=fast.numpy(), label_ids=None))
    assert summary["first_token_ce"] == pytest.approx(np.mean([s[0] for s in slow]), rel=1e-4)
    assert summary["first_token_accuracy"] == pytest.approx(np.mean([s[1] for s in slow]))
    # the training loss still comes from the same kept logits
    assert float(answer_loss({"logits": logits}, batch["labels"])) > 0


def test_seeds_make_one_series_each_on_one_split(tmp_path, tiny_model_dir, corpus, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # --report-to wandb below, offline
    out = tmp_path / "seeds"
    argv = ["finetune", "--model", str(tiny_model_dir), "--out", str(out), "--preset", "tiny"]
    assert main([*argv, "--max-steps", "2", "--seeds", "0,1"]) == 0
    runs = read_seed_runs(out)
    assert runs == {0: out / "seed-0", 1: out / "seed-1"}
    assert json.loads((out / SEEDS_FILE).read_text())["split_seed"] == 0
    infos = {k: json.loads((run / RUN_INFO).read_text()) for k, run in runs.items()}
    assert infos[0]["splits"] == infos[1]["splits"]  # one split, by the split seed
    assert infos[1]["splits"]["test"] == split_corpus(corpus_of(infos[1]), seed=0).test.ids()
    assert [infos[k]["seed"] for k in (0, 1)] == [0, 1]
    assert [infos[k]["split_seed"] for k in (0, 1)] == [0, 0]
    for run in runs.values():
        assert discover_series(run).steps == [0, 2] and (run / "accuracy.csv").exists()
    a = load_hf_model(str(runs[0] / "checkpoint-2")).state_dict()
    b = load_hf_model(str(runs[1] / "checkpoint-2")).state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # another data order

    table = pd.read_csv(runs[1] / EVAL_CSV)
    assert list(table.columns) == ["step", "eval_loss", "first_token_ce", "first_token_accuracy"]
    assert table["step"].tolist() == [0, 2]
    assert table["first_token_accuracy"].between(0, 1).all() and table.notna().all().all()
    state = json.loads((runs[1] / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "eval_first_token_ce" in e]
    assert [e["step"] for e in logged] == [0, 2]
    assert logged[-1]["eval_first_token_ce"] == pytest.approx(table["first_token_ce"].iloc[-1])
    assert logged[-1]["eval_loss"] == pytest.approx(table["eval_loss"].iloc[-1])
    # step 0's first-token cross-entropy is the base model's on the validation split
    model = load_hf_model(str(tiny_model_dir)).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    full = corpus_of(infos[1])
    index = {s.id: i for i, s in enumerate(full.samples)}
    validation = full.subset(index[i] for i in infos[1]["splits"]["validation"])
    examples = build_examples(validation, tokenizer)
    batch = AnswerCollator(pad_id(tokenizer))([vars(e) for e in examples])
    label_ids = torch.tensor(PromptSpec.for_language("ja").label_tokens(tokenizer).ids)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    base_ce = float(first_token_scores(logits, batch["labels"], label_ids)[:, 0].mean())
    assert table["first_token_ce"].iloc[0] == pytest.approx(base_ce, rel=1e-4)

    with pytest.raises(SystemExit, match="2"):  # not distinct
        main([*argv, "--max-steps", "2", "--seeds", "0,0"])
    assert main([*argv, "--max-steps", "2", "--seeds", "0", "--seed", "1"]) == 1
    # finished seeds are kept; report_to does not make another run; a new seed is added
    assert main([*argv, "--max-steps", "2", "--seeds", "1,2", "--report-to", "wandb"]) == 0
    assert sorted(read_seed_runs(out)) == [0, 1, 2]
    assert len(json.loads((runs[1] / RUN_INFO).read_text())["resumes"]) == 0
    assert discover_series(out / "seed-2").steps == [0, 2]
    seed2 = json.loads((out / "seed-2" / RUN_INFO).read_text())
    assert seed2["splits"] == infos[0]["splits"] and seed2["split_seed"] == 0


def corpus_of(info):
    corpus = load_corpus("bundled", language="ja")
    assert corpus.sha256 == info["data_sha256"]
    return corpus
