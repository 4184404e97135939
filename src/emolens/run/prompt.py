"""Which prompt an analysis uses (the run's recorded one unless overridden) and which neutral
prompts it steers."""

import logging
from typing import Any

import numpy as np

from emolens.data.corpus import Corpus
from emolens.data.labels import (
    LabelSet,
    PromptMismatchError,
    PromptSpec,
    PromptTemplate,
)
from emolens.model.loading import (
    CheckpointSeries,
    is_run_dir,
)

log = logging.getLogger(__name__)


def recorded_prompt(model_spec) -> PromptSpec | None:
    """The prompt a fine-tuning run folder (or series) records, or None (a plain model)."""
    from emolens.run.finetune import run_prompt

    run_dir = model_spec.run_dir if isinstance(model_spec, CheckpointSeries) else model_spec
    if not run_dir or not is_run_dir(run_dir):
        return None
    return run_prompt(run_dir)


def prompt_language(model_spec, language: str | None = None) -> str:
    """``language`` when given, else the language of the run's recorded prompt, else ja (the
    bundled corpus of that language is what ``--data bundled`` loads)."""
    if language is not None:
        return language
    recorded = recorded_prompt(model_spec)
    return recorded.language if recorded is not None else "ja"


def resolve_prompt(
    recorded: PromptSpec | None,
    language: str | None = None,
    chat: bool | None = None,
    labels: LabelSet | None = None,
    *,
    override: bool = False,
    where: str = "the run",
) -> tuple[PromptSpec, dict]:
    """The prompt to analyse with, and how it was chosen (for the manifest).

    Options left None take the ``recorded`` prompt (the default prompt when there is none).
    Options that ask for another prompt than the recorded one raise
    :class:`PromptMismatchError`, unless ``override``."""
    asked = (recorded or PromptSpec()).with_options(language=language, chat=chat, labels=labels)
    explicit = any(o is not None for o in (language, chat, labels))
    record: dict[str, Any] = {
        "source": "run" if recorded is not None else ("options" if explicit else "default"),
        "override": None,
    }
    if recorded is not None and asked != recorded:
        if not override:
            raise PromptMismatchError(
                f"{where} was fine-tuned with the prompt [{recorded.describe()}] but the "
                f"options ask for [{asked.describe()}]; leave out --language/--chat to use the "
                "recorded prompt, or pass --override-prompt to analyse with the options' one"
            )
        log.warning(
            "analysing %s with the prompt [%s], not the recorded [%s] (--override-prompt)",
            where,
            asked.describe(),
            recorded.describe(),
        )
        record = {"source": "options", "override": {"recorded": recorded.to_dict()}}
    return asked, record


def manifest_prompt(manifest: dict) -> PromptSpec:
    """The prompt an analysis used, from its manifest (older manifests, written before the
    spec was recorded, encoded with the tokenizer's special tokens added)."""
    if "prompt" in manifest:
        return PromptSpec.from_dict(manifest["prompt"])
    return PromptSpec(
        PromptTemplate(**manifest["template"]),
        LabelSet.from_dict(manifest["labels"]),
        bool(manifest["settings"].get("chat", False)),
        add_special_tokens=True,
    )


def choose_prompts(corpus: Corpus, labels: LabelSet, n: int, seed: int) -> list[int]:
    """Indices of ``n`` neutral samples drawn once with ``seed`` (the steered prompts)."""
    neutral = [i for i, s in enumerate(corpus.samples) if s.label == labels.neutral.en]
    if len(neutral) < n:
        raise ValueError(
            f"the corpus has {len(neutral)} neutral ({labels.neutral.en}) samples, "
            f"fewer than the {n} prompts to steer; lower --n-prompts"
        )
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(neutral, size=n, replace=False))
