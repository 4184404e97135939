"""One prompt specification for fine-tuning, analysis and localisation (issue 10, items 2, 3,
6, 8): the run folder records it, the analysis reads it, chat prompts carry one BOS, every
finetune flag has an effect, and the two accuracy paths agree sample by sample."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emolens.cli import build_parser, main
from emolens.data.corpus import load_corpus
from emolens.data.labels import (
    EN_TEMPLATE,
    STUDY_LABELS,
    PromptMismatchError,
    PromptSpec,
    render_prompts,
)
from emolens.data.tokens import encode
from emolens.model.loading import ModelLoadError, load_model, load_tokenizer
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig
from emolens.run.finetune import (
    TINY,
    FinetuneError,
    build_examples,
    evaluate_accuracy,
    run_prompt,
    training_arguments,
)
from emolens.store.layout import ResultsLayout

FAST = AnalysisConfig(
    layers="-1",
    steer_layers="-1",
    alphas=(0.0, 2.0),
    n_prompts=2,
    min_count=1,
    batch_size=16,
    filter_mode="none",
    dla_per_label=0,
    causal_geometry=False,
    n_boot=10,
)
FAST_ARGS = [
    "--layers",
    "-1",
    "--steer-layers",
    "-1",
    "--alphas",
    "0,2",
    "--n-prompts",
    "2",
    "--min-count",
    "1",
    "--filter-mode",
    "none",
    "--dla-per-label",
    "0",
    "--n-boot",
    "10",
    "--batch-size",
    "16",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with a tokenizer that adds a BOS (as Gemma's does) and a chat template
    that writes one too (as Gemma's and Llama 3's do)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bos") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)]
    )
    tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bos_tokenizer(bos_model_dir):
    tok = load_tokenizer(str(bos_model_dir))
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the fixture adds a BOS
    return tok


@pytest.fixture(scope="module")
def small_corpus():
    return load_corpus(None).head_per_label(3)


@pytest.fixture(scope="module")
def en_corpus_file(tmp_path_factory):
    """The bundled English corpus, 4 samples a label, as a CSV file the CLI reads."""
    corpus = load_corpus(None, language="en").head_per_label(4)
    path = tmp_path_factory.mktemp("data") / "en.csv"
    import pandas as pd

    pd.DataFrame({"text": corpus.texts(), "label": [s.label for s in corpus.samples]}).to_csv(
        path, index=False
    )
    return path


def _finetune_cli(model_dir, data, out, *extra):
    args = [
        "finetune",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def en_run(tmp_path_factory, tiny_model_dir, en_corpus_file):
    return _finetune_cli(
        tiny_model_dir,
        en_corpus_file,
        tmp_path_factory.mktemp("ft") / "en",
        "--language",
        "en",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    )


# --------------------------------------------------------------------------- the spec


def test_spec_round_trips_and_chooses_special_tokens_by_chat():
    plain, chat = PromptSpec(), PromptSpec(chat=True)
    assert plain.add_special_tokens is True and chat.add_special_tokens is False
    en = PromptSpec.for_language("en", STUDY_LABELS.subset(["joy", "fear"]), chat=True)
    assert en.template == EN_TEMPLATE and len(en.labels) == 3
    for spec in (plain, chat, en, PromptSpec(chat=True, add_special_tokens=True)):
        assert PromptSpec.from_dict(json.loads(spec.to_json())) == spec
    assert plain.with_options() == plain
    assert plain.with_options(chat=True) == chat
    legacy = PromptSpec(chat=True, add_special_tokens=True)
    assert legacy.with_options(chat=True) == legacy  # an unchanged chat keeps the policy
    assert plain.with_options(language="en").template == EN_TEMPLATE
    with pytest.raises(ValueError, match="unknown prompt language"):
        plain.with_options(language="de")


def test_spec_encode_is_render_then_tokenize(tiny_model):
    tok = tiny_model.tokenizer
    texts = ["駅まで歩いた。", "傘を買った。"]
    assert PromptSpec().encode(tok, texts) == encode(tok, render_prompts(texts))


# --------------------------------------------------------------------------- item 3: chat


def test_chat_prompt_carries_one_bos_as_hf_apply_chat_template(bos_tokenizer):
    tok, bos = bos_tokenizer, bos_tokenizer.bos_token_id
    text = "駅まで歩いた。"
    naive = encode(tok, render_prompts([text], tokenizer=tok, chat=True))[0]
    assert naive[:2] == [bos, bos]  # the defect: template BOS + tokenizer BOS
    (ids,) = PromptSpec(chat=True).encode(tok, [text])
    assert ids[0] == bos and ids.count(bos) == 1
    messages = [{"role": "user", "content": PromptSpec().render(tok, [text])[0]}]
    reference = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert ids == list(reference)
    (plain,) = PromptSpec().encode(tok, [text])
    assert plain[0] == bos and plain.count(bos) == 1


def test_training_examples_and_label_tokens_of_a_chat_prompt_have_one_bos(
    bos_tokenizer, small_corpus
):
    spec = PromptSpec(chat=True)
    prompts = spec.encode(bos_tokenizer, small_corpus.texts())
    audit = spec.label_tokens(bos_tokenizer)
    for example, prompt, gold in zip(
        build_examples(small_corpus, bos_tokenizer, spec),
        prompts,
        small_corpus.label_indices(STUDY_LABELS),
        strict=True,
    ):
        assert list(example.input_ids[: len(prompt)]) == prompt
        assert example.input_ids.count(bos_tokenizer.bos_token_id) == 1
        assert example.input_ids[len(prompt)] == audit.ids[gold]


def test_analyze_with_chat_reads_the_single_bos_prompt(
    bos_model_dir, bos_tokenizer, small_corpus, tmp_path
):
    from transformers import AutoModelForCausalLM

    from emolens.measure.activations import Activations

    out = analyze(
        bos_model_dir, small_corpus, tmp_path / "a", replace(FAST, chat=True), device="cpu"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"]["chat"] is True and manifest["prompt"]["add_special_tokens"] is False
    acts = Activations.load(ResultsLayout(out).step(0).folder)
    spec = PromptSpec(chat=True)
    ids = spec.encode(bos_tokenizer, small_corpus.texts()[:3])
    label_ids = spec.label_tokens(bos_tokenizer).ids
    hf = AutoModelForCausalLM.from_pretrained(bos_model_dir).eval()
    with torch.no_grad():
        for i, row in enumerate(ids):
            logits = hf(torch.tensor([row])).logits[0, -1, label_ids]
            torch.testing.assert_close(acts.label_logits[i], logits, atol=1e-4, rtol=1e-4)


def test_localise_encodes_with_the_analysis_chat_prompt(bos_model_dir, small_corpus, tmp_path):
    from emolens.measure.localisation import window_sweep
    from emolens.measure.vectors import ConceptVectors
    from emolens.run.localise import localise

    out = analyze(
        bos_model_dir,
        small_corpus,
        tmp_path / "a",
        replace(FAST, layers="all", chat=True),
        device="cpu",
    )
    table = localise(out, small_corpus, window=2, per_label=1, device="cpu")
    folder = ResultsLayout(out).step(0).folder
    audit = json.loads((folder / "label_audit.json").read_text())
    label_ids = [e["first_token_id"] for e in audit["entries"]]
    model = load_model(bos_model_dir, device="cpu")
    chosen = [
        next(i for i, s in enumerate(small_corpus.samples) if s.label == e.en) for e in STUDY_LABELS
    ]
    texts = [small_corpus.samples[i].text for i in chosen]
    gold = list(range(len(STUDY_LABELS)))

    def sweep(spec):
        return window_sweep(
            model,
            spec.encode(model.tokenizer, texts),
            gold,
            label_ids,
            ConceptVectors.load(folder),
            2,
            1,
            "ablate",
            8,
            label_names=STUDY_LABELS.names("en"),
            progress=False,
        )

    expected = sweep(PromptSpec(chat=True))
    assert table["gold_logit_before"].tolist() == pytest.approx(
        expected["gold_logit_before"].tolist(), abs=1e-5
    )
    plain = sweep(PromptSpec())
    assert not plain["gold_logit_before"].tolist() == pytest.approx(
        expected["gold_logit_before"].tolist(), abs=1e-5
    )  # the test can tell chat apart


# --------------------------------------------------------------------------- item 2 + record


def test_finetune_language_en_trains_and_records_the_english_prompt(en_run, tiny_model_dir):
    info = json.loads((en_run / "emolens_run.json").read_text())
    assert info["config"]["language"] == "en"
    spec = run_prompt(en_run)
    assert spec == PromptSpec.for_language("en")
    assert json.loads((en_run / "prompt.json").read_text()) == spec.to_dict()
    tok = load_tokenizer(str(tiny_model_dir))
    english = spec.label_tokens(tok)
    assert (
        info["answer_token_ids"]["joy"][: english.entries[5].n_tokens]
        == english.entries[5].token_ids
    )  # " joy", not 喜び


def _analyze_cli(run: Path, corpus_file: Path, out: Path, *options: str) -> int:
    """``emolens analyze`` of ``run`` on ``corpus_file`` into ``out`` on the CPU with the fast
    settings and ``options``; returns the exit status."""
    args = ["--model", str(run), "--data", str(corpus_file), "--out", str(out)]
    return main(["analyze", *args, "--device", "cpu", *options, *FAST_ARGS])


def test_analyze_uses_the_recorded_prompt_and_refuses_another(
    en_run, en_corpus_file, tmp_path, capsys
):
    out = tmp_path / "res"
    assert _analyze_cli(en_run, en_corpus_file, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["language"] == "en" and manifest["prompt_source"] == "run"
    assert manifest["prompt"] == run_prompt(en_run).to_dict()
    assert manifest["prompt_override"] is None
    capsys.readouterr()
    other = tmp_path / "res-ja"
    assert _analyze_cli(en_run, en_corpus_file, other, "--language", "ja") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "language=en" in err and "language=ja" in err and "--override-prompt" in err
    assert not (other / "manifest.json").exists()
    assert _analyze_cli(en_run, en_corpus_file, other, "--language", "ja", "--override-prompt") == 0
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["settings"]["language"] == "ja" and manifest["prompt_source"] == "options"
    assert manifest["prompt"]["template"]["language"] == "ja"
    assert manifest["prompt_override"]["recorded"] == run_prompt(en_run).to_dict()


def test_analyze_api_refuses_a_chat_prompt_the_run_was_not_trained_on(en_run, tmp_path):
    corpus = load_corpus(None, language="en").head_per_label(4)
    with pytest.raises(PromptMismatchError, match="chat=off.*chat=on"):
        analyze(en_run, corpus, tmp_path / "x", replace(FAST, chat=True), device="cpu")


def test_finetune_chat_flag_trains_on_the_chat_prompt(
    bos_model_dir, bos_tokenizer, en_corpus_file, tmp_path
):
    run = _finetune_cli(
        bos_model_dir,
        en_corpus_file,
        tmp_path / "chat",
        "--chat",
        "--language",
        "en",
        "--max-steps",
        "1",
        "--save-steps",
        "1",
    )
    spec = run_prompt(run)
    assert spec.chat and spec.add_special_tokens is False and spec.language == "en"
    info = json.loads((run / "emolens_run.json").read_text())
    assert info["config"]["chat"] is True
    assert (
        info["answer_token_ids"]["joy"][:-1]
        == spec.label_tokens(bos_tokenizer).entries[5].token_ids
    )


# --------------------------------------------------------------------------- item 6: flags


def test_finetune_refuses_flags_it_cannot_honour():
    parser = build_parser()
    for flag in (["--base", "x"], ["--device-map", "auto"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["finetune", "--out", "r", *flag])


def test_finetune_device_and_dtype_set_the_training_arguments(tmp_path):
    bf16 = training_arguments(TINY, tmp_path, device="cpu", dtype="bfloat16")
    assert bf16.bf16 and not bf16.fp16 and bf16.use_cpu
    fp32 = training_arguments(TINY, tmp_path, device="cpu", dtype="float32")
    assert not fp32.bf16 and not fp32.fp16
    with pytest.raises(FinetuneError, match="float16 mixed precision needs a CUDA GPU"):
        training_arguments(TINY, tmp_path, device="cpu", dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            training_arguments(TINY, tmp_path, device="cuda")
    # an unknown device is refused where devices are resolved (one line naming the choices)
    with pytest.raises(ModelLoadError, match="unknown device 'xpu'; use auto, cpu, cuda"):
        training_arguments(TINY, tmp_path, device="xpu")


def test_finetune_dtype_bfloat16_trains_in_bf16(en_run, tiny_model_dir, en_corpus_file, tmp_path):
    bf16 = _finetune_cli(
        tiny_model_dir,
        en_corpus_file,
        tmp_path / "bf16",
        "--language",
        "en",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
    )
    infos = [json.loads((r / "emolens_run.json").read_text()) for r in (en_run, bf16)]
    assert [i["training"] for i in infos] == [  # training runs SDPA attention (issue 14)
        {"device": "cpu", "dtype": "float32", "attention": "sdpa"},
        {"device": "cpu", "dtype": "bfloat16", "attention": "sdpa"},
    ]

    def losses(run):
        state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
        return [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]

    fp32_loss, bf16_loss = losses(en_run), losses(bf16)
    assert len(fp32_loss) == len(bf16_loss) == 3
    assert fp32_loss[0] != bf16_loss[0]  # the base model's eval loss, under bf16 autocast
    assert fp32_loss[0] == pytest.approx(bf16_loss[0], rel=0.05)


# --------------------------------------------------------------------------- item 8


def test_one_definition_of_the_filter_modes():
    from emolens.measure import vectors
    from emolens.run import config

    assert config.FILTER_MODES is vectors.FILTER_MODES
    assert set(vectors.FILTER_MODES) == {"self", "base", "all", "none"}
    from emolens.measure.activations import Activations

    acts = Activations(
        torch.zeros(3, 1, 2),
        torch.tensor([[1.0, 0.0]] * 3),
        torch.zeros(3),
        torch.zeros(3),
        (0,),
        ("a", "b", "c"),
        torch.tensor([0, 1, -1]),
    )
    assert vectors.keep_mask("none", acts).tolist() == [True, True, True]
    assert vectors.keep_mask("self", acts).tolist() == [True, False, False]


@pytest.mark.parametrize("chat", [False, True])
def test_finetune_accuracy_and_analysis_predict_the_same_label_per_sample(
    bos_model_dir, small_corpus, tmp_path, chat
):
    """``evaluate_accuracy`` (HF, left padding) and ``Activations`` (bridge, right padding) are
    two paths to the per-checkpoint accuracy: they must pick the same label for every sample."""
    from emolens.measure.activations import Activations

    out = analyze(
        bos_model_dir, small_corpus, tmp_path / "a", replace(FAST, chat=chat), device="cpu"
    )
    acts = Activations.load(ResultsLayout(out).step(0).folder)
    model = load_model(bos_model_dir, device="cpu")
    result = evaluate_accuracy(
        model, model.tokenizer, small_corpus, PromptSpec(chat=chat), batch_size=5
    )
    names = STUDY_LABELS.names("en")
    assert result["predictions"] == [names[i] for i in acts.predictions.tolist()]
    assert result["accuracy"] == pytest.approx(float(acts.correct.float().mean()))


def test_accuracy_paths_agree_on_a_fine_tuned_english_checkpoint(en_run, en_corpus_file, tmp_path):
    from emolens.data.corpus import read_corpus
    from emolens.measure.activations import Activations

    test = read_corpus(en_corpus_file)
    out = analyze(en_run, test, tmp_path / "a", FAST, device="cpu", steps=[4])
    acts = Activations.load(ResultsLayout(out).step(4).folder)
    model = load_model(en_run / "checkpoint-4", device="cpu")
    result = evaluate_accuracy(model, model.tokenizer, test, run_prompt(en_run), batch_size=4)
    names = STUDY_LABELS.names("en")
    assert result["predictions"] == [names[i] for i in acts.predictions.tolist()]
    assert json.loads((out / "manifest.json").read_text())["steps_done"] == [4]
