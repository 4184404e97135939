"""Tiny random models for tests and quick runs: Llama-family shapes with GQA and an untied
unembedding (like Sarashina), a GPT-2 (LayerNorm), and a byte-level BPE tokenizer trained on
the bundled corpus so that Japanese text, the prompt and every label tokenize offline."""

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

#: Shapes of the Sarashina 2.2 family, scaled down; the real sizes are read from config.json.
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "sarashina-0.5b": dict(
        hidden_size=40,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "sarashina-1b": dict(
        hidden_size=56,
        intermediate_size=112,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "sarashina-3b": dict(
        hidden_size=80,
        intermediate_size=160,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (no BOS, like Sarashina's) trained on the bundled corpus,
    the prompt templates and the label names; any text still tokenizes, byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from emolens.data.corpus import bundled_corpus_path
    from emolens.data.labels import EN_TEMPLATE, JA_TEMPLATE, STUDY_LABELS

    lines = bundled_corpus_path().read_text(encoding="utf-8").splitlines()
    texts = [field for line in lines for field in line.split("\t")]
    for emotion in STUDY_LABELS:
        texts += [JA_TEMPLATE.format("") + emotion.ja, EN_TEMPLATE.format("") + " " + emotion.en]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(texts)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


#: A minimal chat template (user turn, then the assistant's generation prompt), no BOS.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_random_model(
    out_dir: str | Path,
    shape: str = "llama",
    seed: int = 0,
    vocab_size: int = 1024,
    *,
    random_norms: bool = False,
    chat_template: bool = False,
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` and its tokenizer to ``out_dir`` (once).

    ``random_norms`` draws every RMSNorm gain from ``U(0.5, 1.5)`` instead of leaving it at 1,
    so that code handling norm gains (readout extraction, attribution) is exercised;
    ``chat_template`` gives the tokenizer :data:`TINY_CHAT_TEMPLATE`.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    tokenizer = train_tokenizer(vocab_size)
    # rope_theta is a legacy keyword LlamaConfig still accepts (it becomes rope_parameters)
    # but no longer declares in its typed signature
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        head_dim=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **TINY_SHAPES[shape],
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so logits differ visibly
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif random_norms and "norm" in name:
                p.uniform_(0.5, 1.5)
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "emolens_source.json").write_text(
        json.dumps(
            {
                "tiny_random": shape,
                "seed": seed,
                "random_norms": random_norms,
                "chat_template": chat_template,
            }
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def tiny_random_gpt2(out_dir: str | Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Save a tiny random ``GPT2LMHeadModel`` (LayerNorm with random gains and biases, tied
    embeddings, learned positions) with the same tokenizer to ``out_dir`` (once): the
    LayerNorm path next to the Llama models' RMSNorm."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    tokenizer = train_tokenizer(vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=64,
        n_layer=3,
        n_head=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "ln" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif "ln" in name and name.endswith("bias"):
                p.normal_(0, 0.1)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "emolens_source.json").write_text(json.dumps({"tiny_random": "gpt2", "seed": seed}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
