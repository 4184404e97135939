"""Fine-tuning a causal LM on the study's classification prompt into a checkpoint series.

The model learns to answer the Figure 1 prompt with the gold label, as next-token prediction:
each training example is ``prompt + answer`` where the prompt is ``template.format(text)``
rendered and encoded by the run's :class:`emolens.data.labels.PromptSpec` (template, labels, chat,
special tokens), and the answer is the label's tokens *as they follow the prompt*
(:meth:`PromptSpec.label_tokens`), so the first answer token is exactly the token whose logit
the analysis observes. The spec is written to ``RUN/prompt.json``; ``analyze`` and
``localise`` read it from there, so they encode exactly as fine-tuning did.

The answer ends with the tokenizer's EOS token when it has one: the model then learns to stop
after the label (as an SFT run would teach it), and the first-token logit the analysis reads is
unaffected by the choice (it comes before the EOS). Set ``append_eos=False`` to train on the
label tokens alone.

Loss is on the answer tokens only, and logits are computed only there: batches are padded on
the left so that every row ends with its answer, the model is called with
``logits_to_keep = longest answer + 1`` and the shifted cross-entropy is taken on those
positions (the unembedding of a 100k-260k vocabulary would otherwise dominate a step). Left
padding gets explicit ``position_ids`` (cumulative attention mask - 1), so a padded row computes
exactly what it computes alone.

Training is the transformers ``Trainer`` (``accelerate launch`` / ``torchrun`` work unchanged),
with SDPA attention where the model has it: seeded, an evaluation at every save (eval loss,
and the first-token cross-entropy and accuracy the analysis observes, in the trainer log and
``RUN/eval_metrics.csv``), ``RUN/checkpoint-N/`` with ``trainer_state.json`` and the tokenizer
(each checkpoint loads on its own), and ``RUN/emolens_run.json`` written before the first step,
so an interrupted run is still a series :func:`emolens.model.loading.discover_series` reads.
LoRA checkpoints hold adapters (``adapter_config.json`` + ``adapter_model.safetensors``).
:func:`finetune_seeds` makes one such run per seed, ``OUT/seed-<k>/``, on one shared split.
"""

import functools
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from emolens import __version__
from emolens.data.corpus import Corpus, Splits, split_corpus
from emolens.data.labels import (
    STUDY_LABELS,
    STUDY_PROMPT,
    TEMPLATES,
    LabelSet,
    PromptSpec,
    PromptTemplate,
)
from emolens.data.tokens import pad, pad_id
from emolens.model.loading import (
    RUN_INFO,
    discover_series,
    load_hf_model,
    load_tokenizer,
    release_memory,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from emolens.store.files import read_json, versions, write_csv, write_json

log = logging.getLogger(__name__)

METHODS = ("full", "full-frozen-embeddings", "lora")
IGNORE_INDEX = -100
ACCURACY_CSV = "accuracy.csv"
PROMPT_FILE = "prompt.json"  # the run's PromptSpec
PRECISIONS = ("float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
EVAL_CSV = "eval_metrics.csv"  # per evaluation: eval loss, first-token cross-entropy, accuracy
SEEDS_FILE = "emolens_seeds.json"  # OUT/ of a several-seed run: seeds, split seed, run folders


class FinetuneError(RuntimeError):
    """A fine-tuning run that cannot start or continue; the message says what to do."""


# --------------------------------------------------------------------------- configuration


def _setting(default, help: str, *, choices: tuple | None = None, identity: bool = True):
    """A :class:`FinetuneConfig` field: ``help`` (and ``choices``) become its ``emolens finetune``
    flag and study-file key; ``identity=False`` marks a setting that does not change what is
    trained (a run folder made with another value can still be continued)."""
    meta = {"help": help, "identity": identity}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Evaluation (validation loss, first-token cross-entropy and accuracy)
    runs at every save: ``eval_steps`` is ``save_steps``. ``warmup`` is a number of steps, or a
    fraction of all steps when below 1. ``max_steps`` (when set) overrides ``epochs``.
    ``save_dtype`` stores checkpoint weights in another dtype than training used
    (``"bfloat16"`` halves the disk of a full fine-tune; the optimizer still works on float32
    weights). ``split`` is (train, validation, test), drawn with ``split_seed`` (None: ``seed``).

    Each field is one ``emolens finetune`` flag (``--lora-r`` for ``lora_r``) and one key of a
    study file's ``[finetune]`` table, built from the field's type, default and ``help``."""

    method: str = _setting(
        "full",
        "what trains: all weights, all but the input embeddings, or LoRA adapters",
        choices=METHODS,
    )
    epochs: float | int = _setting(3.0, "passes over the training split (unless max_steps)")
    batch_size: int = _setting(16, "examples per device per step")
    learning_rate: float = _setting(2e-5, "peak AdamW learning rate (linear decay)")
    warmup: float | int = _setting(0.03, "warmup steps, or a fraction of all steps when below 1")
    weight_decay: float = _setting(0.0, "AdamW weight decay")
    save_steps: int = _setting(30, "checkpoint (and evaluate) every N steps")
    max_steps: int | None = _setting(None, "optimizer steps in all (none: from epochs)")
    seed: int = _setting(0, "training seed (weight init of adapters, data order, dropout)")
    split_seed: int | None = _setting(
        None, "seed of the train/validation/test split (none: the training seed)"
    )
    split: tuple[float | int, ...] = _setting(
        (0.8, 0.1, 0.1), "train,validation,test fractions (or counts)"
    )
    gradient_accumulation: int = _setting(1, "batches accumulated per optimizer step")
    lora_r: int = _setting(16, "LoRA rank")
    lora_alpha: int = _setting(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _setting(0.05, "dropout on the LoRA input")
    lora_target_modules: tuple[str, ...] = _setting(
        ("q_proj", "k_proj", "v_proj", "o_proj"), "modules that get LoRA adapters"
    )
    save_optimizer: bool = _setting(
        False, "save optimizer and schedule state in each checkpoint (exact resume)"
    )
    save_dtype: str | None = _setting(
        None, "dtype of the saved weights (none: the training dtype)", choices=PRECISIONS
    )
    language: str = _setting("ja", "prompt template language", choices=tuple(TEMPLATES))
    chat: bool = _setting(False, "train on the prompt wrapped in the tokenizer's chat template")
    append_eos: bool = _setting(True, "end each answer with the tokenizer's EOS token")
    report_to: str = _setting(
        "none",
        "where the Trainer logs metrics (TensorBoard runs go to RUN/runs/)",
        choices=REPORT_TO,
        identity=False,
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.language not in TEMPLATES:
            raise ValueError(
                f"unknown template language {self.language!r}; use {' or '.join(TEMPLATES)}"
            )
        for name in ("batch_size", "save_steps", "gradient_accumulation", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or None), got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.save_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"save_dtype must be None, 'float32', 'bfloat16' or 'float16', "
                f"not {self.save_dtype!r}"
            )
        if self.report_to not in REPORT_TO:
            raise ValueError(
                f"report_to must be one of {', '.join(REPORT_TO)}, not {self.report_to!r}"
            )
        if len(self.split) != 3:
            raise ValueError(
                f"split needs three fractions (train, validation, test), got {self.split}"
            )
        object.__setattr__(self, "split", tuple(float(f) for f in self.split))
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    @property
    def eval_steps(self) -> int:
        return self.save_steps

    @property
    def data_split_seed(self) -> int:
        """The seed the corpus is split with: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def identity(self) -> dict:
        """The settings that define what is trained (all but ``identity=False`` fields): two
        runs with the same identity are the same run."""
        d = self.to_dict()
        return {f.name: d[f.name] for f in fields(self) if f.metadata.get("identity", True)}

    @property
    def template(self) -> PromptTemplate:
        return TEMPLATES[self.language]

    def prompt(self, labels: LabelSet = STUDY_LABELS) -> PromptSpec:
        """The prompt specification this configuration trains on."""
        return PromptSpec(self.template, labels, self.chat)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["split"] = list(self.split)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown fine-tuning settings {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("split", "lora_target_modules"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


#: The study's schedule: 3 epochs, 80/10/10 split, batch 16 (990 steps on the 6,600
#: crowd-enVENT generation texts), a checkpoint (and a validation loss) every 30 steps. The
#: paper does not give its learning rate, warmup or weight decay: 2e-5 with linear decay after
#: a 3% warmup and no weight decay are our choice (a usual full fine-tune of a 1B model).
PAPER = FinetuneConfig(
    method="full",
    epochs=3.0,
    batch_size=16,
    split=(0.8, 0.1, 0.1),
    save_steps=30,
    learning_rate=2e-5,
    warmup=0.03,
    weight_decay=0.0,
)

#: A short schedule for the demo: gemma-3-270m on the bundled corpus (338 training texts) on
#: two CPU cores. 24 steps of batch 8 (about 0.6 epoch) with a checkpoint every 8 steps, so the
#: series is the base plus 3 checkpoints. LoRA (rank 16 on every attention and MLP projection,
#: learning rate 1e-3) rather than a full fine-tune: a checkpoint is a 15 MB adapter instead of
#: 0.54 GB of weights, training holds no gradients or optimizer state for the 268M base weights
#: (peak RSS of the fine-tune 4.4 GB; the whole full-fine-tune demo peaked at 7.7 GB), and
#: ``analyze`` swaps adapters on one loaded base. Measured against the full fine-tune of the
#: same schedule: validation loss 4.97 -> 0.98 at step 24 (full: 0.96), accuracy on all 416
#: texts 0.10 -> 0.26 (full: 0.25). The unembedding and the final norm
#: stay the base's, so the readout does not drift in the demo; the paper's protocol
#: (``studies/paper.toml``) is a full fine-tune.
DEMO = FinetuneConfig(
    method="lora",
    epochs=1.0,
    max_steps=24,
    batch_size=8,
    learning_rate=1e-3,
    warmup=0.0,
    save_steps=8,
    lora_target_modules=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    ),
)  # fmt: skip

#: For the tiny random model of the tests: a few steps, seconds in all.
TINY = FinetuneConfig(
    epochs=1.0, max_steps=4, batch_size=4, learning_rate=3e-3, warmup=0.0, save_steps=2
)

PRESETS: dict[str, FinetuneConfig] = {"paper": PAPER, "demo": DEMO, "tiny": TINY}


def planned_steps(n_train: int, config: FinetuneConfig, world_size: int = 1) -> int:
    """Optimizer steps the Trainer will take on ``n_train`` examples (as it counts them)."""
    if config.max_steps is not None:
        return config.max_steps
    batches = math.ceil(n_train / (config.batch_size * world_size))
    per_epoch = max(1, math.ceil(batches / config.gradient_accumulation))
    return math.ceil(config.epochs * per_epoch)


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class TrainingExample:
    """One tokenized example: prompt ids then ``n_answer`` answer ids (label tokens [+ EOS])."""

    id: str
    input_ids: tuple[int, ...]
    n_answer: int


def answer_ids(
    tokenizer, prompt: PromptSpec = STUDY_PROMPT, *, append_eos: bool = True
) -> list[list[int]]:
    """The trained continuation of each label: its tokens after the prompt, then EOS (if the
    tokenizer has one and ``append_eos``)."""
    tokens = prompt.label_tokens(tokenizer)
    eos = tokenizer.eos_token_id if append_eos else None
    return [list(ids) + ([int(eos)] if eos is not None else []) for ids in tokens.answer_token_ids]


def build_examples(
    corpus: Corpus, tokenizer, prompt: PromptSpec = STUDY_PROMPT, *, append_eos: bool = True
) -> list[TrainingExample]:
    """``prompt + answer`` token ids of every sample, tokenized as the analysis does."""
    answers = answer_ids(tokenizer, prompt, append_eos=append_eos)
    gold = corpus.label_indices(prompt.labels)
    return [
        TrainingExample(s.id, tuple(p) + tuple(answers[g]), len(answers[g]))
        for s, p, g in zip(
            corpus.samples, prompt.encode(tokenizer, corpus.texts()), gold, strict=True
        )
    ]


class ExampleDataset(torch.utils.data.Dataset):
    """A map-style dataset of :class:`TrainingExample` (as dicts, for the Trainer)."""

    def __init__(self, examples: Sequence[TrainingExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "n_answer": e.n_answer}


def position_ids_from_mask(attention_mask: Int[Tensor, "sample seq"]) -> Int[Tensor, "sample seq"]:
    """Positions counted from each row's first real token (0 on the left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass(frozen=True)
class AnswerCollator:
    """Left-pads examples so each row ends with its answer; labels are -100 except on the
    answer; ``logits_to_keep`` is the longest answer + 1 (the logit before the first answer
    token predicts it); ``use_cache=False`` (no key-value cache is built in training)."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping]) -> dict:
        seqs = [list(f["input_ids"]) for f in features]
        n_answer = [int(f["n_answer"]) for f in features]
        if any(not 0 < n < len(s) for n, s in zip(n_answer, seqs, strict=True)):
            raise ValueError("every example needs a non-empty prompt and answer")
        input_ids, attention_mask = pad(seqs, self.pad_token_id, side="left")
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, n in enumerate(n_answer):
            labels[row, -n:] = input_ids[row, -n:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "labels": labels,
            "logits_to_keep": max(n_answer) + 1,
            "use_cache": False,
        }


# --------------------------------------------------------------------------- loss


def answer_token_losses(
    logits: Float[Tensor, "sample keep vocab"], labels: Int[Tensor, "sample seq"]
) -> Float[Tensor, "sample keep"]:
    """Cross-entropy of each kept position's prediction of the next token (0 where the next
    label is -100); the last kept position predicts nothing and gets 0. ``logits`` are the
    last ``keep`` positions of rows whose labels are ``labels``."""
    keep, seq = logits.shape[1], labels.shape[1]
    if keep > seq:
        raise ValueError(f"{keep} kept logits but only {seq} positions")
    if (labels[:, : seq - keep + 1] != IGNORE_INDEX).any():
        raise ValueError(
            "answer tokens lie before the kept logits; pad on the left and keep "
            "(longest answer + 1) logits"
        )
    targets = labels[:, seq - keep + 1 :]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return F.pad(losses, (0, 1))


def answer_loss(
    outputs, labels: Int[Tensor, "sample seq"], num_items_in_batch: Tensor | int | None = None
) -> Float[Tensor, ""]:
    """Mean cross-entropy over answer tokens from a forward pass with ``logits_to_keep``.

    The Trainer's ``compute_loss_func``: with ``num_items_in_batch`` (answer tokens in the whole
    accumulated batch, counted by the Trainer) the sum is divided by it, so gradient
    accumulation and several devices give the loss of the full batch."""
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits
    total = answer_token_losses(logits, labels).sum()
    if num_items_in_batch is None:
        num_items_in_batch = (labels != IGNORE_INDEX).sum()
    return total / num_items_in_batch


def model_inputs(batch: Mapping) -> dict:
    """The arguments of the model's forward pass in a collated batch (everything but labels)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def example_losses(model, batch: Mapping) -> Float[Tensor, " sample"]:
    """Mean answer-token cross-entropy of each example of a collated batch."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    logits = model(**model_inputs(inputs)).logits
    labels = inputs["labels"]
    per_token = answer_token_losses(logits, labels)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1) / counts


def batch_loss(model, batch: Mapping) -> Float[Tensor, ""]:
    """Mean answer-token cross-entropy over a collated batch (the training loss)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return answer_loss(model(**model_inputs(inputs)), inputs["labels"])


# --------------------------------------------------------------------------- eval metrics


def first_token_scores(
    logits: Float[Tensor, "sample keep vocab"],
    labels: Int[Tensor, "sample seq"],
    label_ids: Int[Tensor, " label"],
) -> Float[Tensor, "sample 2"]:
    """Per example, the cross-entropy (over the whole vocabulary) of the gold label's first
    token at the answer position, and whether it is the argmax of the labels' first-token
    logits there (the study's classification rule): the quantity the analysis observes.

    ``logits`` are the last ``keep = longest answer + 1`` positions of left-padded rows that end
    with their answer (as :class:`AnswerCollator` makes them), so the logits predicting a row's
    first answer token sit at ``keep - n_answer - 1``. Columns that the Trainer appended across
    processes (``-100`` on the right of both tensors) are ignored: positions are counted from
    the answer lengths, not the padded widths."""
    answer = labels != IGNORE_INDEX
    n_answer = answer.sum(1)  # (sample,)
    longest = int(n_answer.max())
    rows = torch.arange(labels.shape[0], device=labels.device)
    first = answer.long().argmax(1)  # column of each row's first answer token
    target = labels[rows, first]
    at = (longest - n_answer).to(logits.device)  # = keep - n_answer - 1
    answer_logits = logits[rows.to(logits.device), at].float()  # (sample, vocab)
    ce = F.cross_entropy(answer_logits, target.to(logits.device), reduction="none")
    ids = label_ids.to(logits.device)
    predicted = ids[answer_logits[:, ids].argmax(-1)]
    correct = (predicted == target.to(logits.device)).float()
    return torch.stack([ce, correct], dim=1)


@dataclass(frozen=True)
class FirstTokenMetrics:
    """The Trainer's ``preprocess_logits_for_metrics`` (:meth:`reduce`: each eval batch's kept
    logits to two numbers per example, so nothing of vocabulary size is gathered or kept) and
    ``compute_metrics`` (:meth:`__call__`: ``first_token_ce`` and ``first_token_accuracy``,
    logged as ``eval_first_token_ce`` / ``eval_first_token_accuracy``)."""

    label_ids: tuple[int, ...]

    def reduce(self, logits, labels: Tensor) -> Tensor:
        if isinstance(logits, tuple):
            logits = logits[0]
        return first_token_scores(logits, labels, torch.tensor(self.label_ids))

    def __call__(self, prediction) -> dict[str, float]:
        import numpy as np

        scores = np.asarray(prediction.predictions, dtype=np.float64).reshape(-1, 2)
        return {
            "first_token_ce": float(scores[:, 0].mean()),
            "first_token_accuracy": float(scores[:, 1].mean()),
        }


def read_eval_metrics(run_dir):
    """``RUN/eval_metrics.csv`` as a DataFrame (step, eval_loss, first_token_ce,
    first_token_accuracy); empty when the run has evaluated nothing yet."""
    import pandas as pd

    path = Path(run_dir) / EVAL_CSV
    if not path.exists():
        return pd.DataFrame(columns=list(EVAL_COLUMNS))
    return pd.read_csv(path)


EVAL_COLUMNS = ("step", "eval_loss", "first_token_ce", "first_token_accuracy")


def _metric_key(column: str) -> str:
    """The Trainer's name of an :data:`EVAL_COLUMNS` column (it prefixes ``eval_``)."""
    return column if column.startswith("eval_") else f"eval_{column}"


# --------------------------------------------------------------------------- model set-up


def prepare_model(model, config: FinetuneConfig):
    """Apply the method: LoRA adapters (peft), frozen input embeddings, or nothing."""
    if config.method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise FinetuneError("method 'lora' needs peft: pip install 'emolens[lora]'") from None
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    if config.method == "full-frozen-embeddings":
        embedding = model.get_input_embeddings().weight
        embedding.requires_grad_(False)
        output = model.get_output_embeddings()
        tied = output is not None and output.weight is embedding
        log.warning(
            "frozen: the input embeddings (%d parameters)%s",
            embedding.numel(),
            "; the unembedding is tied to them, so it is frozen too"
            if tied
            else "; the (untied) unembedding still trains",
        )
    return model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def use_sdpa(model):
    """Switch an HF model to PyTorch's scaled-dot-product attention where it supports it
    (training and evaluation need no attention-pattern hooks, which is why the analysis loads
    eager); a model without SDPA stays as it is, with a log line."""
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError, AttributeError) as exc:
        log.info("%s keeps %s attention: %s", type(model).__name__, attention_of(model), exc)
    return model


def attention_of(model) -> str | None:
    """The attention implementation an HF model runs (``sdpa``, ``eager``, ...)."""
    return getattr(model.config, "_attn_implementation", None)


# --------------------------------------------------------------------------- run folder


def _checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    out = []
    for p in run.iterdir() if run.is_dir() else ():
        name = p.name
        if p.is_dir() and name.startswith("checkpoint-") and name[11:].isdigit():
            out.append((int(name[11:]), p))
    return sorted(out)


def _complete(ckpt: Path) -> bool:
    weights = list(ckpt.glob("*.safetensors")) + list(ckpt.glob("*.bin"))
    return (ckpt / "trainer_state.json").exists() and bool(weights)


def _has_optimizer_state(ckpt: Path) -> bool:
    return (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists()


def _base_spec(model_spec) -> str:
    """The spec to record: aliases and hub ids as given, local paths made absolute."""
    spec = str(model_spec)
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def run_info(
    model_spec,
    config: FinetuneConfig,
    corpus: Corpus,
    splits: Splits,
    prompt: PromptSpec,
    answers: list[list[int]],
    training: Mapping | None = None,
) -> dict:
    """The run's manifest (``emolens_run.json``); ``training`` is the device and precision."""
    labels = prompt.labels
    return {
        "base_model": _base_spec(model_spec),
        "config": config.to_dict(),
        "data_source": corpus.source,
        "data_sha256": corpus.sha256,
        "splits": {name: part.ids() for name, part in splits.as_dict().items()},
        "labels": labels.to_dict(),
        "template": prompt.template.to_dict(),
        "prompt": prompt.to_dict(),
        "training": dict(training or {}),
        "seed": config.seed,
        "split_seed": config.data_split_seed,
        "answer_token_ids": {e.en: ids for e, ids in zip(labels, answers, strict=True)},
        "emolens_version": __version__,
        "versions": versions(),
        "status": "running",
        "resumes": [],
    }


def _same_run(old: Mapping, new: Mapping) -> list[str]:
    keys = ("base_model", "data_sha256", "splits", "labels", "template")
    differ = [k for k in keys if old.get(k) != new.get(k)]
    try:  # settings added since the old run was made take their defaults
        same_config = (
            FinetuneConfig.from_dict(old.get("config", {})).identity()
            == FinetuneConfig.from_dict(new["config"]).identity()
        )
    except (TypeError, ValueError):
        same_config = False
    if not same_config:
        differ.append("config")
    recorded = _recorded_prompt(old)
    if recorded is not None and recorded.to_dict() != new.get("prompt"):
        differ.append("prompt")
    return differ


def _recorded_prompt(info: Mapping) -> PromptSpec | None:
    """The prompt of a run manifest; runs made before the spec was recorded rebuild it from
    their template, labels and chat setting (their encoding always added special tokens)."""
    if "prompt" in info:
        return PromptSpec.from_dict(info["prompt"])
    if "template" not in info:
        return None
    labels = LabelSet.from_dict(info["labels"]) if "labels" in info else STUDY_LABELS
    chat = bool(info.get("config", {}).get("chat", False))
    return PromptSpec(PromptTemplate(**info["template"]), labels, chat, add_special_tokens=True)


def run_prompt(run_dir) -> PromptSpec | None:
    """The prompt a run folder was fine-tuned with (``RUN/prompt.json``, else rebuilt from
    ``emolens_run.json``), or None when the folder records none."""
    run = Path(run_dir)
    if (run / PROMPT_FILE).is_file():
        return PromptSpec.from_dict(read_json(run / PROMPT_FILE))
    if (run / RUN_INFO).is_file():
        return _recorded_prompt(read_json(run / RUN_INFO))
    return None


def _resume_point(run: Path, info: dict, tidy: bool = True) -> Path | None:
    """The checkpoint to continue from, after checking the folder holds the same run; carries
    the old manifest's entries into ``info`` and (with ``tidy``) removes half-written
    checkpoints after it."""
    ckpts = _checkpoint_dirs(run)
    info_path = run / RUN_INFO
    if not info_path.exists():
        if ckpts:
            raise FinetuneError(
                f"{run} already holds checkpoints but no {RUN_INFO}, so it is "
                "not a run this configuration can continue; choose another "
                "output folder"
            )
        return None
    old = read_json(info_path)
    complete = [(step, p) for step, p in ckpts if _complete(p)]
    differ = _same_run(old, info)
    if differ and complete:
        raise FinetuneError(
            f"{run} holds a different run ({', '.join(differ)} differ); "
            "continue it with its own settings, or choose another output folder"
        )
    if not complete:
        if ckpts:
            log.warning("%s: no complete checkpoint to continue from; starting again", run)
        return None
    step, last = complete[-1]
    for later_step, p in ckpts:
        if later_step > step and tidy:  # half-written when the run stopped; it is redone
            log.warning("removing the incomplete %s (it is written again)", p)
            shutil.rmtree(p)
    for key, value in old.items():
        if key not in info or key == "resumes":
            info[key] = value
    return last


@functools.cache
def _callback_types() -> dict[str, type]:
    """The Trainer callbacks of a run (built on first use: importing the Trainer is slow)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class ScheduleFastForward(TrainerCallback):
        """On a resume without optimizer state the Trainer makes a fresh optimizer and
        schedule; this steps the schedule to the resumed step, so the learning rate continues
        where it was."""

        def __init__(self, steps: int):
            self.steps = steps

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            if lr_scheduler is not None:
                with warnings.catch_warnings():
                    # fast-forwarding the schedule steps it before any optimizer step, on purpose
                    warnings.filterwarnings(
                        "ignore",
                        message=r"Detected call of `lr_scheduler.step\(\)` before "
                        r"`optimizer.step\(\)`",
                        category=UserWarning,
                    )
                    for _ in range(self.steps):
                        lr_scheduler.step()
            return control

    class SaveDtype(TrainerCallback):
        """Rewrites each saved checkpoint's safetensors weights in ``dtype``, file by file
        (atomically), and records the dtype in its config.json."""

        def __init__(self, dtype: str):
            self.name = dtype
            self.dtype = getattr(torch, dtype)

        def on_save(self, args, state, control, **kwargs):
            if not args.should_save:
                return control
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for path in ckpt.glob("*.safetensors"):
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata()
                    tensors = {k: f.get_tensor(k) for k in f.keys()}
                if all(
                    not t.is_floating_point() or t.dtype == self.dtype for t in tensors.values()
                ):
                    continue
                tensors = {
                    k: t.to(self.dtype) if t.is_floating_point() else t for k, t in tensors.items()
                }
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                save_file(tensors, str(tmp), meta)
                os.replace(tmp, path)
            config = ckpt / "config.json"
            if config.exists():
                write_json(config, {**read_json(config), "dtype": self.name})
            return control

    class EvalMetricsCsv(TrainerCallback):
        """Writes ``RUN/eval_metrics.csv`` after every evaluation (rank 0): the step, eval
        loss, first-token cross-entropy and accuracy on the validation split. Rows of steps
        evaluated before (an earlier, interrupted run) are kept; a step evaluated again is
        replaced."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if not args.should_save or not metrics:
                return control
            import pandas as pd

            path = Path(args.output_dir) / EVAL_CSV
            rows = {
                int(r["step"]): r for r in read_eval_metrics(args.output_dir).to_dict("records")
            }
            rows[state.global_step] = {
                "step": state.global_step,
                **{c: metrics.get(_metric_key(c), float("nan")) for c in EVAL_COLUMNS[1:]},
            }
            frame = pd.DataFrame([rows[k] for k in sorted(rows)], columns=list(EVAL_COLUMNS))
            write_csv(path, frame)
            return control

    return {
        "ScheduleFastForward": ScheduleFastForward,
        "SaveDtype": SaveDtype,
        "EvalMetricsCsv": EvalMetricsCsv,
    }


def training_device(device: str = "auto") -> str:
    """The device a run trains on: cpu, cuda or mps (``auto`` picks as
    :func:`emolens.model.loading.resolve_device`). One device per process: for several GPUs use
    ``accelerate launch`` or ``torchrun``, for one of them ``CUDA_VISIBLE_DEVICES``."""
    dev = resolve_device(device)
    if dev not in ("cpu", "cuda", "mps"):
        raise FinetuneError(
            f"fine-tuning runs on cpu, cuda or mps, not {device!r}; choose a GPU with "
            "CUDA_VISIBLE_DEVICES, or several with accelerate launch / torchrun"
        )
    return dev


def training_precision(dtype: str | None, device: str) -> str:
    """The training precision: ``float32``, or ``bfloat16`` / ``float16`` mixed precision
    (autocast; weights and optimizer stay float32). None: bfloat16 on a CUDA GPU that supports
    it, else float32."""
    if dtype in (None, "auto"):
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        return "bfloat16" if bf16 else "float32"
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if name not in PRECISIONS:
        raise FinetuneError(f"unknown training dtype {dtype!r}; use {', '.join(PRECISIONS)}")
    if name == "float16" and device != "cuda":
        raise FinetuneError(
            f"float16 mixed precision needs a CUDA GPU (training on {device}); "
            "use --dtype bfloat16 or float32"
        )
    return name


def training_arguments(
    config: FinetuneConfig,
    run: Path,
    *,
    progress: bool = True,
    evaluate: bool = True,
    eval_on_start: bool = True,
    device: str = "auto",
    dtype: str | None = None,
):
    """The ``TrainingArguments`` of a run on ``device`` (see :func:`training_device`) in the
    precision ``dtype`` (see :func:`training_precision`: by default float32 on CPU, bf16
    mixed precision on a GPU)."""
    from transformers import TrainingArguments

    device = training_device(device)
    precision = training_precision(dtype, device)
    check_report_to(config.report_to)
    return TrainingArguments(
        output_dir=str(run),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=float(config.epochs),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps,
        eval_on_start=evaluate and eval_on_start,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_only_model=not config.save_optimizer,
        logging_strategy="steps",
        logging_steps=min(config.save_steps, 10),
        logging_first_step=True,
        seed=config.seed,
        data_seed=config.seed,
        report_to=config.report_to,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        use_cpu=device == "cpu",
        bf16=precision == "bfloat16",
        fp16=precision == "float16",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=not evaluate,  # eval: first-token metrics (FirstTokenMetrics)
        disable_tqdm=not progress,
    )


#: The package each ``report_to`` backend needs (importable name, pip name).
REPORT_BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_report_to(report_to: str) -> None:
    """Raise :class:`FinetuneError` (one line naming the ``pip install``) when the logging
    backend ``report_to`` names is not installed."""
    import importlib.util

    if report_to not in REPORT_BACKENDS:
        return
    module, package = REPORT_BACKENDS[report_to]
    if importlib.util.find_spec(module) is None:
        raise FinetuneError(
            f"--report-to {report_to} needs the {package} package: pip install {package} "
            "(or use --report-to none)"
        )


# --------------------------------------------------------------------------- entry point


def finetune(
    model_spec,
    corpus: Corpus,
    out_dir,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    *,
    labels: LabelSet = STUDY_LABELS,
    accuracy: bool = True,
    device: str = "auto",
    dtype: str | None = None,
) -> Path:
    """Fine-tune ``model_spec`` on ``corpus`` into the run folder ``out_dir``; return it.

    Trains on ``device`` (cpu, cuda, mps or auto) in the precision ``dtype`` (float32, or
    bfloat16 / float16 mixed precision; default bfloat16 on a CUDA GPU, float32 elsewhere),
    on the prompt ``config.prompt(labels)`` (``config.language``, ``config.chat``), which is
    written to ``RUN/prompt.json``. Writes ``emolens_run.json`` before the first step,
    ``checkpoint-N/`` every ``config.save_steps`` steps (and at the last step) with the
    validation loss in ``trainer_state.json``, ``eval_metrics.csv`` (at each evaluation: eval
    loss, first-token cross-entropy and accuracy on the validation split; see
    :func:`first_token_scores`), and, with ``accuracy``, ``accuracy.csv``
    (test-split accuracy of the base model and every checkpoint).

    An existing run folder with complete checkpoints and the same settings is continued. With
    optimizer state (``save_optimizer=True``) the Trainer resumes exactly. Without it (the
    default) training continues from the last checkpoint's weights, at its step, on the same
    data order and learning-rate schedule, with a fresh AdamW state (its moment estimates are
    lost): close to, but not bit-identical with, an uninterrupted run. A log line says which.
    """
    from transformers import PrinterCallback, Trainer, set_seed

    config = config or PAPER
    run = Path(out_dir)
    source = resolve_model_dir(model_spec)
    tokenizer = load_tokenizer(source)
    prompt = config.prompt(labels)
    splits = split_corpus(corpus, config.split, seed=config.data_split_seed)
    if len(splits.train) == 0:
        raise FinetuneError(
            f"the training split of {len(corpus)} samples is empty; give more "
            "data or a larger train fraction"
        )
    answers = answer_ids(tokenizer, prompt, append_eos=config.append_eos)
    dev = training_device(device)
    training = {"device": dev, "dtype": training_precision(dtype, dev)}
    info = run_info(model_spec, config, corpus, splits, prompt, answers, training)
    evaluate = len(splits.validation) > 0
    if not evaluate:
        log.warning("the validation split is empty: no eval loss will be recorded")
    args = training_arguments(
        config, run, progress=progress, evaluate=evaluate, device=dev, dtype=training["dtype"]
    )
    resume = _resume_point(run, info, tidy=args.should_save) if run.exists() else None
    args.eval_on_start = evaluate and resume is None  # the base model's eval loss, once
    callbacks = []
    finished = False
    if resume is not None:
        state = read_json(resume / "trainer_state.json")
        step = int(state["global_step"])
        finished = bool(state.get("max_steps")) and step >= int(state["max_steps"])
        exact = _has_optimizer_state(resume)
        if finished:
            log.warning("%s is already trained to its last step (%d); nothing to train", run, step)
        elif exact:
            log.warning("continuing %s from %s with its optimizer state", run, resume.name)
        else:
            log.warning(
                "continuing %s from the weights of %s (step %d); no optimizer state was "
                "saved (save_optimizer=False), so AdamW restarts with fresh moments while "
                "the data order and learning-rate schedule continue",
                run,
                resume.name,
                step,
            )
            callbacks.append(_callback_types()["ScheduleFastForward"](step))
        if not finished:
            info["resumes"].append(
                {
                    "from_step": step,
                    "optimizer_state": exact,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
    if config.save_dtype is not None:
        callbacks.append(_callback_types()["SaveDtype"](config.save_dtype))
    metrics = FirstTokenMetrics(tuple(prompt.label_tokens(tokenizer).ids))
    if evaluate:
        callbacks.append(_callback_types()["EvalMetricsCsv"]())
    if args.should_save:
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / PROMPT_FILE, prompt.to_dict())
        write_json(run / RUN_INFO, info)

    if not finished:
        set_seed(config.seed)
        model = prepare_model(use_sdpa(load_hf_model(source, dtype=torch.float32)), config)
        info["training"]["attention"] = attention_of(model)
        info["trainable_parameters"] = trainable_parameters(model)
        examples = {
            name: build_examples(part, tokenizer, prompt, append_eos=config.append_eos)
            for name, part in (("train", splits.train), ("validation", splits.validation))
        }
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=ExampleDataset(examples["train"]),
            eval_dataset=ExampleDataset(examples["validation"]) if evaluate else None,
            data_collator=AnswerCollator(pad_id(tokenizer)),
            # a LoRA checkpoint is read with its base's tokenizer (load_model's fallback), so
            # it gets no copy of it: Gemma's is 33 MB against a 14 MB adapter
            processing_class=tokenizer if config.method != "lora" else None,
            compute_loss_func=answer_loss,
            compute_metrics=metrics if evaluate else None,
            preprocess_logits_for_metrics=metrics.reduce if evaluate else None,
            callbacks=callbacks,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        info["global_step"] = trainer.state.global_step
        del trainer, model
    release_memory()  # the accuracy pass (and a demo's analysis) loads the next models
    _leave_process_group()
    if args.should_save:
        info["status"] = "complete"
        write_json(run / RUN_INFO, info)
    if accuracy and args.should_save:
        write_accuracy(run, corpus, progress=progress, device=dev)
    return run


def seed_run_dir(out_dir, seed: int) -> Path:
    """The run folder of ``seed`` in a several-seed fine-tune: ``OUT/seed-<seed>``."""
    return Path(out_dir) / f"seed-{seed}"


def finetune_seeds(
    model_spec,
    corpus: Corpus,
    out_dir,
    config: FinetuneConfig | None = None,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    **kwargs,
) -> list[Path]:
    """One :func:`finetune` run per training seed, ``OUT/seed-<k>/`` each (a normal run
    folder and checkpoint series), all on the same data split: the corpus is split once with
    ``config.split_seed`` (None: the folder's recorded split seed, else the first seed), which
    every run records.
    ``OUT/emolens_seeds.json`` lists the seeds, the split seed and the run folders; running
    again with more seeds adds runs (finished ones are kept, interrupted ones continue).
    Other keyword arguments go to :func:`finetune`. Returns the run folders, as ``seeds``."""
    config = config or PAPER
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds must be distinct and at least one, got {seeds}")
    out = Path(out_dir)
    if (out / RUN_INFO).exists():
        raise FinetuneError(
            f"{out} holds a single-seed run ({RUN_INFO}); give several seeds another folder"
        )
    split_seed = seeds[0] if config.split_seed is None else config.split_seed
    index_path = out / SEEDS_FILE
    known: list[int] = []
    if index_path.exists():
        index = read_json(index_path)
        if config.split_seed is None:  # more seeds for a folder: its split
            split_seed = int(index["split_seed"])
        if index.get("split_seed") != split_seed:
            raise FinetuneError(
                f"{out} holds seed runs split with split_seed {index.get('split_seed')}, not "
                f"{split_seed}; pass --split-seed {index.get('split_seed')} or another folder"
            )
        known = [int(k) for k in index.get("seeds", [])]
    everything = known + [k for k in seeds if k not in known]
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        index_path,
        {
            "seeds": everything,
            "split_seed": split_seed,
            "runs": {str(k): seed_run_dir(out, k).name for k in everything},
        },
    )
    return [
        finetune(
            model_spec,
            corpus,
            seed_run_dir(out, k),
            replace(config, seed=k, split_seed=split_seed),
            progress,
            **kwargs,
        )
        for k in seeds
    ]


def read_seed_runs(out_dir) -> dict[int, Path]:
    """The run folders of a several-seed fine-tune (``OUT/emolens_seeds.json``): seed -> folder;
    empty when ``out_dir`` is not one."""
    path = Path(out_dir) / SEEDS_FILE
    if not path.exists():
        return {}
    index = read_json(path)
    return {int(k): Path(out_dir) / name for k, name in index["runs"].items()}


def _leave_process_group() -> None:
    """Under torchrun: wait for every rank, then close the process group, so that no rank
    exits with the group's threads alive (an abort) while rank 0 still writes the results."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- accuracy


def _as_hf_model(model_or_path, base: str | None, device: str):
    if isinstance(model_or_path, (str, os.PathLike)):
        dev = resolve_device(device)
        model = load_hf_model(
            resolve_model_dir(model_or_path), dtype=resolve_dtype(None, dev), base=base
        )
        return use_sdpa(model).to(dev)
    return getattr(model_or_path, "hf_model", model_or_path)  # a LoadedModel or an HF model


@torch.no_grad()
def evaluate_accuracy(
    model_or_path,
    tokenizer,
    corpus: Corpus,
    prompt: PromptSpec = STUDY_PROMPT,
    *,
    batch_size: int = 16,
    base: str | None = None,
    device: str = "auto",
) -> dict:
    """Classification accuracy: argmax over the labels' first-token logits at the answer
    position (the study's filtering rule), batched with left padding.

    ``model_or_path`` is an HF causal LM, a :class:`emolens.model.loading.LoadedModel`, or a spec /
    checkpoint folder (loaded on ``device``; ``base`` is a LoRA adapter's base model). Returns
    ``accuracy``, ``n``, ``correct``, the predicted label of each sample (``predictions``,
    English names) and ``per_label`` accuracy."""
    model = _as_hf_model(model_or_path, base, device)
    labels = prompt.labels
    label_ids = torch.tensor(prompt.label_tokens(tokenizer).ids)
    gold = torch.tensor(corpus.label_indices(labels), dtype=torch.long)
    ids = prompt.encode(tokenizer, corpus.texts())
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together
    predicted = torch.empty(len(ids), dtype=torch.long)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            x, mask = pad([ids[i] for i in rows], pad_id(tokenizer), side="left")
            logits = model(
                input_ids=x.to(dev),
                attention_mask=mask.to(dev),
                position_ids=position_ids_from_mask(mask).to(dev),
                logits_to_keep=1,
            ).logits[:, -1]
            predicted[rows] = logits[:, label_ids.to(dev)].argmax(-1).cpu()
    finally:
        model.train(was_training)
    correct = predicted == gold
    names = labels.names("en")
    per_label = {}
    for j, name in enumerate(names):
        sel = gold == j
        if sel.any():
            per_label[name] = float(correct[sel].float().mean())
    n = len(ids)
    return {
        "accuracy": float(correct.float().mean()) if n else float("nan"),
        "n": n,
        "correct": int(correct.sum()),
        "predictions": [names[i] for i in predicted.tolist()],
        "per_label": per_label,
    }


def run_test_split(run_dir, corpus: Corpus) -> Corpus:
    """The test split of a run, taken from ``corpus`` by the sample ids the run recorded."""
    return run_split(run_dir, corpus, "test")


def run_split(run_dir, corpus: Corpus, split: str) -> Corpus:
    """A split (train, validation, test) of a run, taken from ``corpus`` by recorded ids."""
    if not (Path(run_dir) / RUN_INFO).exists():
        raise FinetuneError(
            f"{run_dir} holds no {RUN_INFO}: splits are known only for runs "
            "made by emolens finetune; use --split all"
        )
    info = read_json(Path(run_dir) / RUN_INFO)
    if split not in info.get("splits", {}):
        raise FinetuneError(
            f"{run_dir} records no {split!r} split; it has {', '.join(info.get('splits', {}))}"
        )
    if info.get("data_sha256") not in (None, corpus.sha256):
        raise FinetuneError(
            f"{run_dir} was trained on data with sha256 "
            f"{info['data_sha256'][:12]}, not this corpus "
            f"({corpus.sha256[:12]}); pass the corpus the run used"
        )
    index = {s.id: i for i, s in enumerate(corpus.samples)}
    return corpus.subset(index[i] for i in info["splits"][split])


def write_accuracy(
    run_dir, corpus: Corpus, *, batch_size: int = 16, device: str = "auto", progress: bool = True
) -> Path:
    """Write ``RUN/accuracy.csv`` (step, accuracy, n, correct): test-split accuracy of the base
    model (step 0) and of every checkpoint, one model in memory at a time. Steps already in
    the file are kept, so an interrupted or extended run only computes what is missing."""
    import pandas as pd
    from tqdm.auto import tqdm

    run = Path(run_dir)
    info_path = run / RUN_INFO
    if not info_path.exists():
        raise FinetuneError(f"{run} has no {RUN_INFO}; accuracy needs the run's test split")
    prompt = run_prompt(run)
    if prompt is None:
        config = FinetuneConfig.from_dict(read_json(info_path)["config"])
        prompt = config.prompt()
    test = run_test_split(run, corpus)
    series = discover_series(run)
    out = run / ACCURACY_CSV
    rows = {}
    if out.exists():
        rows = {int(r["step"]): r for r in pd.read_csv(out).to_dict("records")}
    tokenizer = load_tokenizer(resolve_model_dir(series.base))
    todo = [c for c in series.checkpoints if c.step not in rows]
    for ckpt in tqdm(todo, desc="test accuracy", disable=not progress or not todo):
        model = _as_hf_model(ckpt.spec, series.base if ckpt.kind == "lora" else None, device)
        result = evaluate_accuracy(model, tokenizer, test, prompt, batch_size=batch_size)
        del model
        release_memory()
        rows[ckpt.step] = {
            "step": ckpt.step,
            "accuracy": result["accuracy"],
            "n": result["n"],
            "correct": result["correct"],
        }
        write_csv(
            out,
            pd.DataFrame(
                [rows[s] for s in sorted(rows)], columns=["step", "accuracy", "n", "correct"]
            ),
        )
    if not out.exists():
        write_csv(out, pd.DataFrame(columns=["step", "accuracy", "n", "correct"]))
    return out


def read_accuracy(run_dir) -> dict[int, float]:
    """Test accuracy per step from ``RUN/accuracy.csv`` (empty when it is not written yet)."""
    import pandas as pd

    path = Path(run_dir) / ACCURACY_CSV
    if not path.exists():
        return {}
    return {int(r["step"]): float(r["accuracy"]) for r in pd.read_csv(path).to_dict("records")}
