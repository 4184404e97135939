"""The loop over checkpoints: activations, filtering, concept vectors, steering sensitivity.

One checkpoint is in memory at a time. Each step writes its results to
``OUT/steps/step-NNNNNN/`` and a ``done.json`` holding the key of what produced them; a re-run
skips steps whose key matches and recomputes the rest, so an interrupted run resumes. The
top-level tables (``sensitivity.csv``, ``filtering.csv``, ``steps.csv``) are rebuilt from the
step folders at the end of every run.
"""

import argparse
import gc
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

import emolens
from emolens.analysis._common import Replicates
from emolens.analysis.baselines import random_baseline_frame
from emolens.analysis.change_summary import change_summary
from emolens.analysis.figure2 import figure2_frame
from emolens.analysis.geometry_tables import causal_geometry_frame, geometry_frame
from emolens.analysis.probe_tables import probes_frame
from emolens.analysis.steps import (
    attribution_frame,
    causal_metric,
    dla_frame,
    load_steps,
    save_metric,
    transfer_frame,
    with_readout,
)
from emolens.data.corpus import Corpus
from emolens.data.labels import (
    LabelSet,
    LabelTokens,
    PromptMismatchError,
    PromptSpec,
    PromptTemplate,
)
from emolens.measure.activations import Activations, collect_activations
from emolens.measure.attribution import Readout, ReadoutCheckFailed, UnsupportedReadout
from emolens.measure.heads import HeadsUnavailable, head_attribution, heads_frame
from emolens.measure.lens import lens_frame, logit_lens
from emolens.measure.steering import (
    SteeringEffect,
    final_layer_sensitivity,
    layer_sensitivity,
    layer_sensitivity_cached,
    steering_vectors,
)
from emolens.measure.vectors import FILTER_MODES, concept_vectors, count_kept, keep_mask
from emolens.model import hooks
from emolens.model.loading import (
    Checkpoint,
    CheckpointSeries,
    LoadedModel,
    check_model_source,
    discover_series,
    is_run_dir,
    resolve_device,
    resolve_dtype,
)
from emolens.store import layout, provenance
from emolens.store.files import (
    NUMERICS_MODE,
    NUMERICS_NOTE,
    folder_lock,
    read_json,
    save_tensors,
    stable_hash,
    versions,
    write_csv,
    write_json,
    write_text,
)
from emolens.store.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnalysisConfig:
    """What ``analyze`` computes. Layers may be negative (from the end) or ``"all"``."""

    layers: str = "all"  # layers whose residuals (and concept vectors) are kept, + the final
    steer_layers: str = "-1"  # layers steered for sensitivity; -1 is the final block output
    alphas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)
    alpha_unit: str = "absolute"  # or "norm": alpha * mean residual norm along the unit vector
    positions: str = "all"  # steer at every position, or "answer" only
    n_prompts: int = 10  # neutral prompts steered, sampled once with prompt_seed
    prompt_seed: int = 0
    filter_mode: str = "self"  # who decides a sample is correct: self, base, all (or none)
    min_count: int = 3  # a label with fewer kept samples drops out (with a warning)
    batch_size: int = 8
    language: str | None = None  # prompt language; None: the run's recorded prompt, else ja
    chat: bool | None = None  # chat template; None: the run's recorded prompt, else off
    allow_shared_tokens: bool = False
    dla_per_label: int = 8  # samples per label for the direct logit attribution (0: none)
    transfer_alpha: float | None = None  # alpha of the transfer table (default: the largest)
    causal_geometry: bool = True  # also measure geometry in Park et al.'s causal inner product
    n_boot: int = 200  # bootstrap replicates for the confidence intervals
    seed: int = 0  # seed of the bootstraps, probe splits and random directions

    def __post_init__(self) -> None:
        if self.filter_mode not in FILTER_MODES:
            raise ValueError(f"filter mode {self.filter_mode!r} unknown; use {FILTER_MODES}")
        if self.alpha_unit not in ("absolute", "norm"):
            raise ValueError("alpha_unit must be 'absolute' or 'norm'")
        if self.positions not in ("all", "answer"):
            raise ValueError("positions must be 'all' or 'answer'")
        if not self.alphas or not all(np.isfinite(a) for a in self.alphas):
            raise ValueError(
                f"the alpha grid {self.alphas} must be a non-empty list of finite numbers"
            )
        if self.n_prompts < 1 or self.batch_size < 1 or self.min_count < 1:
            raise ValueError("n_prompts, batch_size and min_count must be at least 1")
        if self.n_boot < 1:
            raise ValueError(
                f"--n-boot {self.n_boot} would leave every confidence interval "
                "empty; give at least 1 (200 is the default)"
            )
        if self.dla_per_label < 0:
            raise ValueError("--dla-per-label must be 0 (no attribution) or more")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "AnalysisConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if isinstance(values.get("alphas"), str):
            try:
                values["alphas"] = tuple(float(a) for a in values["alphas"].split(","))
            except ValueError:
                raise ValueError(
                    f"cannot read --alphas {values['alphas']!r}: give numbers "
                    "separated by commas, e.g. 0,1,2,4"
                ) from None
        return cls(**values)


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    d = AnalysisConfig()
    p.add_argument(
        "--layers",
        default=d.layers,
        help="layers whose residuals and vectors are kept: 'all' or e.g. 6,12,-1 "
        "(the final layer is always kept too: the final-layer tables read it)",
    )
    p.add_argument(
        "--steer-layers",
        default=d.steer_layers,
        help="layers to steer at (comma-separated; -1 = final block output)",
    )
    p.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in d.alphas),
        help="steering strengths, comma-separated",
    )
    p.add_argument(
        "--alpha-unit",
        default=d.alpha_unit,
        choices=["absolute", "norm"],
        help="absolute: h + alpha*v; norm: h + alpha*|h|mean*v/|v|",
    )
    p.add_argument(
        "--positions",
        default=d.positions,
        choices=["all", "answer"],
        help="steer every position or only the answer position",
    )
    p.add_argument(
        "--n-prompts", type=int, default=d.n_prompts, help="neutral prompts to steer (sampled once)"
    )
    p.add_argument("--prompt-seed", type=int, default=d.prompt_seed, help="seed of that sample")
    p.add_argument(
        "--filter-mode",
        default=d.filter_mode,
        choices=list(FILTER_MODES),
        help="which model decides that a sample is correctly classified",
    )
    p.add_argument(
        "--min-count", type=int, default=d.min_count, help="labels with fewer kept samples drop out"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="forward batch size")
    p.add_argument(
        "--dla-per-label",
        type=int,
        default=d.dla_per_label,
        help="samples per label for the direct logit attribution (0: skip it)",
    )
    p.add_argument(
        "--n-boot", type=int, default=d.n_boot, help="bootstrap replicates for confidence intervals"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of bootstraps, probe splits and random baseline directions",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (when not given: as the run was "
        "fine-tuned, recorded in RUN/prompt.json; off for a plain model)",
    )
    p.add_argument(
        "--allow-shared-tokens", action="store_true", help="accept labels that share a first token"
    )
    p.add_argument(
        "--override-prompt",
        action="store_true",
        help="analyse with the --language/--chat prompt even where it differs from "
        "the one the run was fine-tuned with (recorded in the manifest)",
    )


# --------------------------------------------------------------------------- the prompt


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
    record = {
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


# --------------------------------------------------------------------------- helpers


def step_dir(out: Path, step: int) -> Path:
    return layout.ResultsLayout(out).step(step).folder


def _staging_dir(out: Path, step: int) -> Path:
    """Where a step's new files are written; swapped onto :func:`step_dir` only on success."""
    return layout.ResultsLayout(out).staging(step).folder


def failed_dir(out: Path, step: int) -> Path:
    """What a failed step left: its error, filtering counts and activations (reused later)."""
    return layout.ResultsLayout(out).failed(step).folder


ACTIVATION_FILES = layout.ACTIVATION_FILES
LAST_RUN_FILE = layout.LAST_RUN


def _recover_steps(out: Path) -> None:
    """Undo what an interrupted run left (called with the folder's lock held): staging folders
    are dropped, a swap cut between its two renames is completed or rolled back."""
    steps = layout.ResultsLayout(out).steps_dir
    if not steps.is_dir():
        return
    for stage in steps.glob(".step-*.staging"):
        shutil.rmtree(stage, ignore_errors=True)
    for old in steps.glob(".step-*.old"):
        final = steps / old.name[1 : -len(".old")]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


def _commit_step(stage: Path, final: Path) -> None:
    """Swap a finished staging folder onto the step folder (two renames, then clean up)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    stage.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # files are replaced by rename, never written in place
    except OSError:
        shutil.copy2(source, target)


def _resolved(spec: str) -> str:
    """A local path made absolute (so ``./run`` and ``/abs/run`` are one cache key)."""
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def _step_problem(folder: Path, key: str) -> str | None:
    """Why the step in ``folder`` cannot be reused (None: finished with ``key`` and intact).

    A problem that means damage (an unreadable ``done.json``, a missing or resized file) is
    logged as a warning naming the file; the step is then recomputed."""
    marker = layout.StepFiles(folder).done
    if not marker.exists():
        return "not finished"
    try:
        info = read_json(marker)
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        log.warning(
            "%s is unreadable (%s); recomputing step %s", marker, exc, folder.name.split("-")[-1]
        )
        return f"unreadable {marker}"
    if info.get("key") != key:
        return "made with other inputs"
    for name, size in (info.get("files") or {}).items():
        path = folder / name
        actual = path.stat().st_size if path.exists() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes, not {size}"
            log.warning(
                "%s %s (damaged after it was written); recomputing step %s",
                path,
                found,
                info.get("step"),
            )
            return f"{path} {found}"
    return None


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


def _fingerprint(spec: str) -> str:
    """Cheap identity of a checkpoint's weights: names, sizes and mtimes of its files."""
    path = Path(spec)
    if not path.is_dir():
        return spec
    items = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")
    )
    return stable_hash([str(path.resolve()), items])


def effect_frame(effect: SteeringEffect, *, step: int, alpha_unit: str) -> pd.DataFrame:
    """Long table of a steering effect: one row per emotion, alpha, prompt and label."""
    frame = effect.to_frame(step=step).rename(
        columns={"emotion": "steered_emotion", "label": "observed_label", "prompt": "prompt_id"}
    )
    frame.insert(5, "alpha_unit", alpha_unit)
    frame.insert(6, "positions", effect.positions)
    return frame


# --------------------------------------------------------------------------- the run


@dataclass
class _Context:
    out: Path
    corpus: Corpus
    prompt: PromptSpec
    config: AnalysisConfig
    prompt_index: list[int]
    load_kwargs: dict
    base_key: dict

    @property
    def labels(self) -> LabelSet:
        return self.prompt.labels


def _series_of(model_spec, base: str | None) -> CheckpointSeries:
    if isinstance(model_spec, CheckpointSeries):
        return model_spec
    if is_run_dir(model_spec):
        return discover_series(model_spec, base=base)
    if (Path(str(model_spec)).expanduser() / "adapter_config.json").exists() and not (
        Path(str(model_spec)).expanduser() / "config.json"
    ).exists():
        # one LoRA adapter: loaded over --base (or the base its adapter_config records)
        return CheckpointSeries(
            run_dir="", base=base or "", checkpoints=(Checkpoint(0, str(model_spec), "lora"),)
        )
    return CheckpointSeries(
        run_dir="", base=str(model_spec), checkpoints=(Checkpoint(0, str(model_spec), "base"),)
    )


def _activation_key(ctx: _Context, ckpt: Checkpoint) -> str:
    """What the activations depend on: weights, data, prompt, labels, layers, code version."""
    c = ctx.config
    return stable_hash(
        {
            **ctx.base_key,
            "checkpoint": [ckpt.step, _resolved(ckpt.spec), ckpt.kind],
            "weights": _fingerprint(ckpt.spec),
            "layers": c.layers,
            "chat": c.chat,
            "allow_shared": c.allow_shared_tokens,
            "language": c.language,
        }
    )


#: Settings used only by the cross-step tables, rebuilt from disk on every run.
OFFLINE_SETTINGS = ("n_boot", "seed", "transfer_alpha")


def _step_key(ctx: _Context, ckpt: Checkpoint) -> str:
    """What a finished step depends on: its activations and every per-step setting."""
    settings = {k: v for k, v in ctx.config.to_dict().items() if k not in OFFLINE_SETTINGS}
    return stable_hash(
        {"activations": _activation_key(ctx, ckpt), "config": settings, "eval_loss": ckpt.eval_loss}
    )


def collected_layers(layers: str, n_layers: int) -> list[int]:
    """The layers ``analyze`` collects: those asked for and always the final one, which the
    final-layer tables (attribution, transfer, random baseline) read."""
    return sorted(set(hooks.check_layers(layers, n_layers)) | {n_layers - 1})


def _cached_activations(ctx: _Context, ckpt: Checkpoint, key: str, stage: Path):
    """Activations with ``key`` from the step folder or a failed attempt's folder, linked into
    ``stage``; None if there are none or they do not load (then with a warning)."""
    for folder in (step_dir(ctx.out, ckpt.step), failed_dir(ctx.out, ckpt.step)):
        marker = layout.StepFiles(folder).activations_key
        try:
            if not marker.exists() or marker.read_text() != key:
                continue
            acts = Activations.load(folder)
            audit = LabelTokens.from_dict(read_json(layout.StepFiles(folder).label_audit))
        except Exception as exc:  # any damage: recompute
            log.warning(
                "cached activations in %s do not load (%s: %s); recomputing them",
                folder,
                type(exc).__name__,
                exc,
            )
            continue
        stage.mkdir(parents=True, exist_ok=True)
        for name in ACTIVATION_FILES:
            if not (stage / name).exists():
                _link_or_copy(folder / name, stage / name)
        return acts, audit
    return None


def _check_context(model: LoadedModel, ids: list[list[int]], sample_ids) -> None:
    """Refuse prompts longer than the model's context (positions past it are meaningless)."""
    config = model.hf_model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(
        getattr(config, "text_config", None), "max_position_embeddings", None
    )
    if not limit:
        return
    long = [i for i, row in enumerate(ids) if len(row) > limit]
    if long:
        longest = max(len(ids[i]) for i in long)
        shown = ", ".join(str(sample_ids[i]) for i in long[:10]) + (
            f" and {len(long) - 10} more" if len(long) > 10 else ""
        )
        raise ValueError(
            f"{len(long)} prompt(s) are longer than the model's context of {limit} "
            f"tokens (longest {longest}): samples {shown}; shorten or remove "
            "those texts from the corpus"
        )


def _collect(
    ctx: _Context, model: LoadedModel, ckpt: Checkpoint, stage: Path
) -> tuple[Activations, LabelTokens]:
    """Activations of every corpus sample at the configured layers, written into ``stage``
    (reused from an earlier run when their key matches)."""
    key = _activation_key(ctx, ckpt)
    cached = _cached_activations(ctx, ckpt, key, stage)
    if cached is not None:
        return cached
    audit = ctx.prompt.label_tokens(model.tokenizer, allow_shared=ctx.config.allow_shared_tokens)
    layers = collected_layers(ctx.config.layers, model.n_layers)
    ids = ctx.prompt.encode(model.tokenizer, ctx.corpus.texts())
    _check_context(model, ids, ctx.corpus.ids())
    acts = collect_activations(
        model,
        ids,
        audit.ids,
        layers,
        gold=ctx.corpus.label_indices(ctx.labels),
        sample_ids=ctx.corpus.ids(),
        label_names=tuple(ctx.labels.names("en")),
        batch_size=ctx.config.batch_size,
        meta={"step": ckpt.step},
    )
    acts.save(stage)
    write_json(layout.StepFiles(stage).label_audit, audit.to_dict())
    write_text(layout.StepFiles(stage).activations_key, key)
    return acts, audit


def _filtering_frame(
    ctx: _Context, ckpt: Checkpoint, acts: Activations, vec_keep, dropped
) -> pd.DataFrame:
    """Samples, correct answers and kept samples per label: written first, so that a step
    that fails (e.g. no neutral sample kept) still says why."""
    counts = count_kept(acts.gold, vec_keep, len(ctx.labels))
    n_per_label = torch.bincount(acts.gold[acts.gold >= 0], minlength=len(ctx.labels))
    correct = count_kept(acts.gold, acts.correct, len(ctx.labels))
    return pd.DataFrame(
        {
            "step": ckpt.step,
            "label": ctx.labels.names("en"),
            "label_ja": ctx.labels.names("ja"),
            "n_samples": n_per_label.numpy(),
            "n_correct": correct.numpy(),
            "n_kept": counts.numpy(),
            "dropped": [n in dropped for n in ctx.labels.names("en")],
            "filter_mode": ctx.config.filter_mode,
        }
    )


def _vectors_and_sensitivity(
    ctx: _Context,
    model: LoadedModel,
    ckpt: Checkpoint,
    acts: Activations,
    keep: torch.Tensor,
    audit: LabelTokens,
    key: str,
    folder: Path,
) -> None:
    """Filter, build vectors, steer the neutral prompts at each steer layer, write the step
    into ``folder`` (its staging folder), ``done.json`` last."""
    cfg = ctx.config
    is_prompt = torch.zeros(acts.n_samples, dtype=torch.bool)
    is_prompt[ctx.prompt_index] = True
    vec_keep = keep & ~is_prompt  # the steered prompts never feed the vectors
    counts = count_kept(acts.gold, vec_keep, len(ctx.labels))
    too_few = [e.en for j, e in enumerate(ctx.labels) if int(counts[j]) < cfg.min_count]
    files = layout.StepFiles(folder)
    write_csv(files.filtering, _filtering_frame(ctx, ckpt, acts, vec_keep, too_few))
    vectors = concept_vectors(acts, vec_keep, ctx.labels, cfg.min_count)
    vectors.save(folder)
    save_tensors(files.keep, {"keep": vec_keep.to(torch.uint8)})
    label_ids = audit.ids
    prompt_ids = [acts.sample_ids[i] for i in ctx.prompt_index]
    prompt_texts = [ctx.corpus.samples[i].text for i in ctx.prompt_index]
    prompt_tokens = ctx.prompt.encode(model.tokenizer, prompt_texts)
    alphas = torch.tensor(cfg.alphas, dtype=torch.float32)
    frames = []
    last = model.n_layers - 1
    for layer in hooks.check_layers(cfg.steer_layers, model.n_layers):
        if layer not in acts.layers:
            raise ValueError(
                f"steer layer {layer} is not among the collected layers "
                f"{acts.layers}; add it to --layers"
            )
        v = steering_vectors(vectors.layer(layer), cfg.alpha_unit, acts.mean_norm(layer))
        names = {
            "emotions": vectors.emotions,
            "labels": ctx.labels.names("en"),
            "prompt_ids": prompt_ids,
        }
        if layer == last:
            # the final block output feeds only the readout: steering every position or only
            # the answer position changes the answer logits identically, no forward needed
            effect = final_layer_sensitivity(
                model, acts.layer(layer)[ctx.prompt_index], v, alphas, label_ids, **names
            )
            effect = replace(effect, positions=cfg.positions)
        elif cfg.positions == "answer":  # one token a configuration, on the prompt's KV cache
            effect = layer_sensitivity_cached(
                model, prompt_tokens, layer, v, alphas, label_ids, progress=False, **names
            )
        else:
            effect = layer_sensitivity(
                model,
                prompt_tokens,
                layer,
                v,
                alphas,
                label_ids,
                positions=cfg.positions,
                batch_size=cfg.batch_size,
                progress=False,
                **names,
            )
        frames.append(effect_frame(effect, step=ckpt.step, alpha_unit=cfg.alpha_unit))
    write_csv(files.sensitivity, pd.concat(frames, ignore_index=True))
    lens = logit_lens(model, acts, label_ids)
    names = tuple(ctx.labels.names("en"))
    write_csv(
        folder / "logit_lens.csv", lens_frame(lens, ckpt.step, acts.gold, names, model.n_layers)
    )
    readout_problem = _explain_step(ctx, model, ckpt, acts, label_ids, folder)
    write_csv(files.filtering, _filtering_frame(ctx, ckpt, acts, vec_keep, vectors.dropped))
    sizes = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != layout.DONE
    }
    write_json(
        files.done,
        {
            "key": key,
            "step": ckpt.step,
            "checkpoint": asdict(ckpt),
            "weights_hash": model.weights_hash,
            "model": model.describe(),
            "accuracy": float(acts.correct.float().mean()),
            "n_samples": acts.n_samples,
            "dropped": list(vectors.dropped),
            "numerics": acts.meta.get("numerics"),
            "readout_dtype": acts.meta.get("readout_dtype"),
            "files": sizes,
            **readout_problem,
        },
    )


def _base_activations(ctx: _Context, checkpoints: list[Checkpoint]) -> Activations | None:
    """The first step's activations (for filter mode 'base'), from disk."""
    if ctx.config.filter_mode != "base":
        return None
    folder = step_dir(ctx.out, checkpoints[0].step)
    if not layout.StepFiles(folder).activations_key.exists():
        raise ValueError(
            f"filter mode 'base' needs the activations of step "
            f"{checkpoints[0].step} (the base model), which failed or were not "
            "computed; fix the base model or use --filter-mode self"
        )
    return Activations.load(folder)


def _keep(ctx: _Context, acts: Activations, checkpoints: list[Checkpoint], is_base: bool):
    mode = ctx.config.filter_mode
    base_acts = acts if is_base else _base_activations(ctx, checkpoints)
    return keep_mask(mode, acts, base_acts)


def _explain_step(
    ctx: _Context,
    model: LoadedModel,
    ckpt: Checkpoint,
    acts: Activations,
    label_ids: list[int],
    folder: Path,
) -> dict:
    """The readout (for offline attribution and transfer) and the DLA of the unsteered answer
    on up to ``dla_per_label`` samples of each label.

    Returns what ``done.json`` records of a step without a readout: ``readout_error`` where
    the readout check failed (a failure of the run: :func:`readout_failures`), or
    ``readout_unavailable`` where the model's readout is not linear (soft-capping), by design.
    The step's other results stand either way."""
    files = layout.StepFiles(folder)
    for stale in (files.readout, files.causal_metric, files.dla, folder / "heads.csv"):
        stale.unlink(missing_ok=True)
    try:
        readout = Readout.from_model(model, label_ids)
    except ReadoutCheckFailed as exc:
        log.error(
            "step %s: readout check failed, no attribution, transfer or random baseline: %s",
            ckpt.step,
            exc,
        )
        return {"readout_error": f"{type(exc).__name__}: {exc}"}
    except UnsupportedReadout as exc:
        log.warning("step %s: no attribution: %s", ckpt.step, exc)
        return {"readout_unavailable": str(exc)}
    readout.save(files.readout)
    if ctx.config.causal_geometry:
        save_metric(causal_metric(model, readout.gain), files.causal_metric)
    if ctx.config.dla_per_label <= 0:
        return {}
    chosen: list[int] = []
    for j in range(len(ctx.labels)):
        chosen += (acts.gold == j).nonzero().flatten().tolist()[: ctx.config.dla_per_label]
    tokens = ctx.prompt.encode(model.tokenizer, [ctx.corpus.samples[i].text for i in chosen])
    frame = dla_frame(
        model,
        ckpt.step,
        tokens,
        acts.gold[chosen].tolist(),
        readout,
        tuple(ctx.labels.names("en")),
        ctx.config.batch_size,
    )
    write_csv(files.dla, frame)
    try:
        heads = head_attribution(model, tokens, readout, ctx.config.batch_size)
    except HeadsUnavailable as exc:
        log.warning("step %s: no per-head attribution: %s", ckpt.step, exc)
        return {}
    names = tuple(ctx.labels.names("en"))
    write_csv(
        folder / "heads.csv", heads_frame(heads, ckpt.step, acts.gold[chosen].tolist(), names)
    )
    return {}


def readout_failures(out: Path) -> list[dict]:
    """One ``failures`` entry per finished step whose readout check failed (from its
    ``done.json``, so a resumed run reports it again)."""
    found = []
    for marker in (s.done for s in layout.ResultsLayout(out).finished_steps()):
        info = read_json(marker)
        if info.get("readout_error"):
            found.append(
                {
                    "step": info["step"],
                    "spec": info["checkpoint"]["spec"],
                    "stage": "readout",
                    "error": info["readout_error"],
                }
            )
    return found


def final_layer_record(out: Path) -> dict | None:
    """Which layer the final-layer tables read (and which were collected), for the manifest."""
    first = next(iter(layout.ResultsLayout(out).finished_steps()), None)
    if first is None:
        return None
    acts_meta = read_json(first.activations_meta)
    n_layers = read_json(first.done)["model"]["n_layers"]
    return {
        "final_layer": n_layers - 1,
        "hook": hooks.resid_post(n_layers - 1),
        "collected_layers": acts_meta["layers"],
        "tables": ["attribution", "transfer", "random_baseline", "dla"],
    }


@contextmanager
def _loaded(series: CheckpointSeries, ckpt: Checkpoint, load_kwargs: dict):
    """One checkpoint in memory, released on exit."""
    model = series.load(ckpt, **load_kwargs)
    try:
        yield model
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class IdentityMismatch(ValueError):
    """A results folder holds an analysis of another model, data or settings."""


def _identity(
    series: CheckpointSeries,
    corpus: Corpus,
    prompt: PromptSpec,
    config: AnalysisConfig,
    dtype,
    shard,
    steps,
) -> dict:
    """What a results folder holds results of: a re-run into it must agree on all of it."""
    return {
        "model": {
            "run_dir": _resolved(series.run_dir) if series.run_dir else None,
            "base": _resolved(series.base),
            "checkpoints": [[c.step, _resolved(c.spec), c.kind] for c in series.checkpoints],
        },
        "data": corpus.sha256,
        "labels": prompt.labels.to_dict(),
        "template": prompt.template.to_dict(),
        "prompt": prompt.to_dict(),
        "settings": json.loads(json.dumps(config.to_dict())),
        "dtype": str(dtype),
        "shard": list(shard) if shard else None,
        "steps": sorted(steps) if steps is not None else None,
    }


def _short(value, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def identity_differences(old: dict, new: dict) -> list[str]:
    """Readable differences between two identities, e.g. ``settings.alphas [0, 2] -> [0, 1]``."""
    out = []
    for key in new:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key in ("settings", "model"):
            out += [
                f"{key}.{k} {_short(a.get(k))} -> {_short(b.get(k))}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif key == "data":
            out.append(f"data sha256 {str(a)[:12]} -> {str(b)[:12]}")
        else:
            out.append(f"{key} {_short(a)} -> {_short(b)}")
    return out


def _check_identity(out: Path, identity: dict, overwrite: bool) -> dict:
    """The folder's earlier manifest ({} if none); refuse a different analysis unless
    ``overwrite``."""
    manifest_path = layout.ResultsLayout(out).manifest
    if not manifest_path.exists():
        return {}
    try:
        previous = read_json(manifest_path)
    except (ValueError, OSError) as exc:
        if not overwrite:
            raise IdentityMismatch(
                f"{manifest_path} is unreadable ({exc}), so what {out} "
                "holds is unknown; use another --out, or --overwrite to "
                "replace it"
            ) from None
        return {}
    old = previous.get("identity")
    if old == identity or overwrite:
        return previous
    differences = (
        identity_differences(old, identity)
        if isinstance(old, dict)
        else ["it records no identity (an older emolens wrote it)"]
    )
    shown = "; ".join(differences[:4]) + (
        f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
    )
    raise IdentityMismatch(
        f"{out} holds results of another analysis ({shown}); use another "
        "--out, or --overwrite to replace those results"
    )


def validate_inputs(
    series: CheckpointSeries,
    corpus: Corpus,
    labels: LabelSet,
    config: AnalysisConfig,
    *,
    device: str,
    dtype,
    device_map,
    base: str | None,
) -> tuple[str, "torch.dtype"]:
    """Check everything that can be checked before a step runs; return the resolved device
    and dtype. Raises with one line naming the problem and the fix."""
    dev = "cpu" if device_map is not None else resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, "cuda" if device_map is not None else dev)
    first = series.checkpoints[0]
    if series.run_dir and series.problems and not any(c.step > 0 for c in series.checkpoints):
        problems = "; ".join(series.problems)
        raise ValueError(
            f"no checkpoint of {series.run_dir} is usable ({problems}); only the "
            "base model would be analysed: finish or re-save them"
        )
    if base is not None and not series.run_dir and first.kind != "lora":
        raise ValueError(
            f"--base applies to a run folder or a LoRA adapter, but "
            f"{first.spec} is a full model; drop --base"
        )
    depth = check_model_source(first.spec, base=series.base if first.kind == "lora" else base)
    for flag, value in (("--layers", config.layers), ("--steer-layers", config.steer_layers)):
        if not str(value).replace(",", "").strip():
            raise ValueError(f"{flag} {value!r} names no layer; give 'all' or e.g. 6,12,-1")
    if depth is not None:
        layers = collected_layers(config.layers, depth)  # the final layer always
        steer = hooks.check_layers(config.steer_layers, depth)
        missing = [s for s in steer if s not in layers]
        if missing:
            raise ValueError(
                f"--steer-layers {config.steer_layers} names layer(s) {missing} "
                f"that --layers {config.layers} does not collect; add them to "
                "--layers"
            )
    gold = corpus.label_indices(labels)
    counts = np.bincount([g for g in gold if g >= 0], minlength=len(labels))
    n_neutral = int(counts[labels.neutral_index])
    if n_neutral < config.n_prompts:
        raise ValueError(
            f"the corpus has {n_neutral} neutral ({labels.neutral.en}) samples, "
            f"fewer than the --n-prompts {config.n_prompts} prompts to steer; "
            "lower --n-prompts or use a corpus with more neutral samples"
        )
    counts[labels.neutral_index] -= config.n_prompts  # the steered prompts feed no vector
    if counts[labels.neutral_index] < config.min_count:
        raise ValueError(
            f"the corpus has {counts[labels.neutral_index]} neutral samples besides "
            f"the {config.n_prompts} steered prompts, fewer than --min-count "
            f"{config.min_count}: no concept vector can be formed; lower "
            "--min-count or --n-prompts, or use a corpus with more neutral samples"
        )
    emotions = [j for j in range(len(labels)) if j != labels.neutral_index]
    if not any(counts[j] >= config.min_count for j in emotions):
        raise ValueError(
            f"no emotion label has --min-count {config.min_count} samples in the "
            f"corpus (largest {max(counts[j] for j in emotions)}): every label "
            "would drop out; lower --min-count"
        )
    return dev, resolved_dtype


def failure_summary(out: str | Path) -> str | None:
    """One line on the steps that failed in the latest run on ``out`` (None if none)."""
    path = Path(out) / LAST_RUN_FILE
    if not path.exists():
        return None
    failures = read_json(path).get("failures") or []
    if not failures:
        return None
    first = failures[0]
    error = " ".join(str(first["error"]).split())
    if len(error) > 200:
        error = error[:197] + "..."
    steps = ", ".join(str(f["step"]) for f in failures)
    return (
        f"{len(failures)} step(s) failed (step {steps}); step {first['step']}: {error}. "
        f"Finished steps are kept; details in {Path(out) / LAST_RUN_FILE} and "
        f"{Path(out) / 'failed'}/"
    )


def analyze(
    model_spec,
    corpus: Corpus,
    out_dir: str | Path,
    config: AnalysisConfig = AnalysisConfig(),
    *,
    labels: LabelSet | None = None,
    base: str | None = None,
    device: str = "auto",
    dtype=None,
    device_map=None,
    steps: list[int] | None = None,
    shard: tuple[int, int] | None = None,
    override_prompt: bool = False,
    overwrite: bool = False,
) -> Path:
    """Run the study over a checkpoint series (a run folder) or one model; returns ``out``.

    The prompt is the one the run was fine-tuned with (``RUN/prompt.json``); ``config.language``,
    ``config.chat`` and ``labels`` left None take it. Options that ask for another prompt stop
    with :class:`emolens.data.labels.PromptMismatchError` unless ``override_prompt`` (the manifest
    records the prompt used and the override).

    Inputs are validated before any step runs (model, layers, dtype, device, label counts).
    Re-running with the same inputs skips finished steps; a results folder that holds another
    analysis (model, data, settings) is refused unless ``overwrite``. A checkpoint that fails
    (to load, or with non-finite activations, ...) is recorded in ``OUT/last_run.json`` (and
    the manifest) with what explains it under ``OUT/failed/step-N/``, and the others still
    run: see :func:`failure_summary`. Each step is written to a staging folder and swapped in
    only when finished, so a failed or killed run never damages a finished step. One process
    at a time holds ``OUT`` (a lock file). ``shard=(i, n)`` analyses every n-th checkpoint
    from the i-th, for splitting a series between processes; :func:`merge` combines them.
    """
    if shard is not None:
        i, n = shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n} is out of range: use i/n with 0 <= i < n")
        if config.filter_mode in ("base", "all"):
            raise ValueError(
                f"filter mode {config.filter_mode!r} needs other checkpoints' "
                "results, so it cannot be sharded; use --filter-mode self"
            )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder")
    series = _series_of(model_spec, base)
    prompt, prompt_record = resolve_prompt(
        recorded_prompt(series),
        config.language,
        config.chat,
        labels,
        override=override_prompt,
        where=series.run_dir or str(model_spec),
    )
    labels = prompt.labels
    config = replace(config, language=prompt.language, chat=prompt.chat)
    checkpoints = [c for c in series.checkpoints if steps is None or c.step in steps]
    if not checkpoints:
        raise ValueError(
            f"no checkpoints to analyse (asked for steps {steps}, found {series.steps})"
        )
    for problem in series.problems:
        log.warning("checkpoint left out: %s", problem)
    device, dtype = validate_inputs(
        series, corpus, labels, config, device=device, dtype=dtype, device_map=device_map, base=base
    )
    prompt_index = choose_prompts(corpus, labels, config.n_prompts, config.prompt_seed)
    identity = _identity(series, corpus, prompt, config, dtype, shard, steps)
    with folder_lock(out, "analyze"):
        previous = _check_identity(out, identity, overwrite)
        _recover_steps(out)
        return _analyze_locked(
            out,
            series,
            checkpoints,
            corpus,
            prompt,
            prompt_record,
            config,
            prompt_index,
            identity,
            previous,
            overwrite=overwrite,
            model_spec=model_spec,
            device=device,
            dtype=dtype,
            device_map=device_map,
            shard=shard,
        )


def _analyze_locked(
    out,
    series,
    checkpoints,
    corpus,
    prompt,
    prompt_record,
    config,
    prompt_index,
    identity,
    previous,
    *,
    overwrite,
    model_spec,
    device,
    dtype,
    device_map,
    shard,
):
    labels = prompt.labels
    base_key = {
        "emolens": emolens.__version__,
        "data": corpus.sha256,
        "labels": labels.to_dict(),
        "template": prompt.template.to_dict(),
        "prompt": prompt.to_dict(),
        "dtype": str(dtype),
        "readout": "float32; final layer always collected",
    }
    ctx = _Context(
        out,
        corpus,
        prompt,
        config,
        prompt_index,
        {"device": device, "dtype": dtype, "device_map": device_map},
        base_key,
    )
    started = time.time()
    mine = checkpoints if shard is None else checkpoints[shard[0] :: shard[1]]
    if overwrite:  # steps of another series must not linger beside this one's
        keep_names = {step_dir(out, c.step).name for c in mine}
        for step_files in layout.ResultsLayout(out).step_folders():
            if step_files.folder.name not in keep_names:
                shutil.rmtree(step_files.folder)
    failures: list[dict] = []
    pending: list[tuple[Checkpoint, str, Path]] = []

    def fail(ckpt: Checkpoint, exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"
        log.warning("step %s (%s) failed: %s", ckpt.step, ckpt.spec, " ".join(error.split()))
        failures.append({"step": ckpt.step, "spec": ckpt.spec, "error": error})
        stage, target = _staging_dir(out, ckpt.step), failed_dir(out, ckpt.step)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if stage.exists():
            stage.rename(target)
        write_json(layout.StepFiles(target).error, failures[-1])

    keys = {c.step: _step_key(ctx, c) for c in mine}
    for ckpt in tqdm(mine, desc="checkpoints", unit="ckpt"):
        key = keys[ckpt.step]
        if _step_problem(step_dir(out, ckpt.step), key) is None:
            continue
        stage = _staging_dir(out, ckpt.step)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        try:
            with _loaded(series, ckpt, ctx.load_kwargs) as model:
                acts, audit = _collect(ctx, model, ckpt, stage)
                if config.filter_mode == "all":
                    pending.append((ckpt, key, stage))
                    continue
                keep = _keep(ctx, acts, checkpoints, is_base=ckpt is checkpoints[0])
                _vectors_and_sensitivity(ctx, model, ckpt, acts, keep, audit, key, stage)
            _commit_step(stage, step_dir(out, ckpt.step))
            shutil.rmtree(failed_dir(out, ckpt.step), ignore_errors=True)
        except Exception as exc:  # one broken checkpoint must not stop the series
            fail(ckpt, exc)
    if pending:  # filter mode "all": correctness of every step is known only now
        staged = {c.step: stage for c, _, stage in pending}
        masks = []
        for c in checkpoints:
            folder = staged.get(c.step, step_dir(out, c.step))
            marker = layout.StepFiles(folder).activations_key
            if marker.exists() and marker.read_text() == _activation_key(ctx, c):
                masks.append(Activations.load(folder).correct)
        for ckpt, key, stage in tqdm(pending, desc="steering (filter: all)", unit="ckpt"):
            try:
                with _loaded(series, ckpt, ctx.load_kwargs) as model:
                    acts, audit = _collect(ctx, model, ckpt, stage)
                    keep = keep_mask("all", acts, all_steps=masks)
                    _vectors_and_sensitivity(ctx, model, ckpt, acts, keep, audit, key, stage)
                _commit_step(stage, step_dir(out, ckpt.step))
                shutil.rmtree(failed_dir(out, ckpt.step), ignore_errors=True)
            except Exception as exc:
                fail(ckpt, exc)
    finished = [
        step_dir(out, c.step)
        for c in mine
        if _step_problem(step_dir(out, c.step), keys[c.step]) is None
    ]
    steps_done = [c.step for c in mine if step_dir(out, c.step) in finished]
    write_json(
        out / LAST_RUN_FILE,
        {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "steps_done": steps_done,
            "failures": failures,
            "series_problems": list(series.problems),
            "identity": identity,
            "seconds": round(time.time() - started, 1),
        },
    )
    if failures and previous and not overwrite:
        # the folder's tables and manifest describe its finished results: a failed re-run
        # leaves them as they are (its failures are in last_run.json)
        return out
    tables = combine_steps(
        out,
        prompt_ids=[corpus.samples[i].id for i in prompt_index],
        labels=tuple(labels.names("en")),
        config=config,
        folders=finished,
    )
    first_audit = next(
        (a for a in (layout.StepFiles(d).label_audit for d in finished) if a.exists()), None
    )
    failed = {f["step"] for f in failures}
    failures += [f for f in readout_failures(out) if f["step"] not in failed]
    if first_audit is not None:
        write_json(layout.ResultsLayout(out).label_audit, read_json(first_audit))
    Manifest(
        emolens=emolens.__version__,
        versions=versions(),
        created=previous.get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
        updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
        model=str(model_spec) if not isinstance(model_spec, CheckpointSeries) else series.run_dir,
        run_dir=series.run_dir or None,
        series=series.to_dict(),
        data={
            "source": corpus.source,
            "sha256": corpus.sha256,
            "n_samples": len(corpus),
            "counts": corpus.counts(),
        },
        labels=labels.to_dict(),
        template=prompt.template.to_dict(),
        prompt=prompt.to_dict(),
        prompt_source=prompt_record["source"],
        prompt_override=prompt_record["override"],
        settings=config.to_dict(),
        load={
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "device_map": device_map,
        },
        identity=identity,
        steered_prompts=[corpus.samples[i].id for i in prompt_index],
        hook_names=hooks.manifest_names(),
        numerics=NUMERICS_MODE,
        numerics_note=NUMERICS_NOTE,
        readout_dtype="float32 (unembed(ln_final(h)) upcast whatever the model dtype)",
        final_layer_tables=final_layer_record(out),
        seeds={"prompt_seed": config.prompt_seed},
        shard=list(shard) if shard else None,
        steps_done=sorted(int(s) for s in tables["steps"]["step"]) if len(tables["steps"]) else [],
        failures=failures,
        series_problems=list(series.problems),
        seconds_this_run=round(time.time() - started, 1),
        provenance=provenance.manifest(),
    ).write(layout.ResultsLayout(out).manifest)
    return out


def combine_steps(
    out: Path,
    prompt_ids: list[str],
    labels: tuple[str, ...],
    config: AnalysisConfig,
    folders: list[Path] | None = None,
) -> dict[str, pd.DataFrame]:
    """Rebuild the top-level tables from the finished step folders (``folders``, default every
    one with a ``done.json``; the cross-step ones, attribution, transfer, geometry, probes,
    random baseline, need only what is on disk)."""
    done = (
        sorted(folders)
        if folders is not None
        else [s.folder for s in layout.ResultsLayout(out).finished_steps()]
    )
    sens = [pd.read_csv(layout.StepFiles(d).sensitivity) for d in done]
    filt = [pd.read_csv(layout.StepFiles(d).filtering) for d in done]
    rows = []
    for d in done:
        info = read_json(layout.StepFiles(d).done)
        ck = info["checkpoint"]
        rows.append(
            {
                "step": info["step"],
                "kind": ck["kind"],
                "spec": ck["spec"],
                "eval_loss": ck.get("eval_loss"),
                "accuracy": info["accuracy"],
                "n_samples": info["n_samples"],
                "weights_hash": info["weights_hash"],
            }
        )
    tables = {
        "sensitivity": pd.concat(sens, ignore_index=True) if sens else pd.DataFrame(),
        "filtering": pd.concat(filt, ignore_index=True) if filt else pd.DataFrame(),
        "steps": pd.DataFrame(
            rows,
            columns=["step", "kind", "spec", "eval_loss", "accuracy", "n_samples", "weights_hash"],
        ),
    }
    dla_files = [layout.StepFiles(d).dla for d in done]
    dla = [pd.read_csv(f) for f in dla_files if f.exists()]
    tables["dla"] = pd.concat(dla, ignore_index=True) if dla else pd.DataFrame()
    for name in ("heads", "logit_lens"):
        found = [pd.read_csv(d / f"{name}.csv") for d in done if (d / f"{name}.csv").exists()]
        tables[name] = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
    steps = load_steps(done)
    if steps:
        alphas, unit = config.alphas, config.alpha_unit
        if with_readout(steps):
            tables["attribution"] = attribution_frame(steps, prompt_ids, alphas, labels, unit)
            alpha = config.transfer_alpha if config.transfer_alpha is not None else max(alphas)
            tables["transfer"] = transfer_frame(steps, prompt_ids, alpha, labels, unit)
            tables["random_baseline"] = random_baseline_frame(
                steps, prompt_ids, alphas, labels, seed=config.seed, alpha_unit=unit
            )
        neutral = labels[-1] if "no-emotion" not in labels else "no-emotion"
        keep = {s.step: s.keep for s in steps if s.keep is not None}
        geometry = [
            geometry_frame(
                steps,
                labels,
                neutral,
                keep_masks=keep,
                n_boot=config.n_boot,
                seed=config.seed,
                return_replicates=True,
            )
        ]
        metrics = {s.step: s.metric for s in steps if s.metric is not None}
        if len(metrics) == len(steps):
            geometry.append(
                causal_geometry_frame(
                    steps,
                    metrics,
                    labels,
                    neutral,
                    keep_masks=keep,
                    n_boot=config.n_boot,
                    seed=config.seed,
                    return_replicates=True,
                )
            )
        tables["geometry"] = pd.concat([g for g, _ in geometry], ignore_index=True)
        geometry_reps = Replicates.concat([r for _, r in geometry])
        tables["probes"], probe_reps = probes_frame(
            steps, labels, seed=config.seed, n_boot=config.n_boot, return_replicates=True
        )
        tables["change_summary"] = pd.concat(
            [
                change_summary(tables["geometry"], geometry_reps, seed=config.seed).assign(
                    table="geometry"
                ),
                change_summary(tables["probes"], probe_reps, seed=config.seed).assign(
                    table="probes"
                ),
            ],
            ignore_index=True,
        )
        # the bands read the final layer through the readout: steps without one are left out
        tables["figure2_bands"], tables["sensitivity_trends"] = figure2_frame(
            with_readout(steps),
            prompt_ids,
            alphas,
            labels,
            neutral,
            keep_masks=keep,
            n_boot=config.n_boot,
            seed=config.seed,
        )
    results = layout.ResultsLayout(out)
    for name, frame in tables.items():
        write_csv(results.table(name), frame)
    for name in CROSS_STEP_TABLES:  # none this time: a stale one would contradict the steps
        if name not in tables:
            results.table(name).unlink(missing_ok=True)
    return tables


#: Tables :func:`combine_steps` writes only when some step can feed them.
CROSS_STEP_TABLES = (
    "attribution",
    "transfer",
    "random_baseline",
    "geometry",
    "probes",
    "change_summary",
)


def merge(shard_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Combine the result folders of ``analyze(..., shard=(i, n))`` runs into ``out_dir``.

    The shards must agree on model, data, labels, prompt, dtype and settings, and ``out_dir``
    must be new or empty; the merged tables equal those of a single run over the whole series.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; merge into a new folder")
    manifests = []
    for d in map(Path, shard_dirs):
        try:
            manifests.append(read_json(layout.ResultsLayout(d).manifest))
        except FileNotFoundError:
            raise ValueError(
                f"{d} holds no {layout.MANIFEST}: is it an emolens analyze folder?"
            ) from None
        except ValueError as exc:
            raise ValueError(f"{layout.ResultsLayout(d).manifest} is unreadable ({exc})") from None
    if len({str(Path(d).resolve()) for d in shard_dirs}) != len(shard_dirs):
        raise ValueError("a shard folder is named twice; give each once")
    for d, m in zip(shard_dirs, manifests):
        if not isinstance(m.get("identity"), dict):
            raise ValueError(
                f"{d}/manifest.json records no identity (an older emolens wrote "
                "it); re-run that shard with this version"
            )
    ref = {k: v for k, v in manifests[0]["identity"].items() if k != "shard"}
    for d, m in zip(shard_dirs[1:], manifests[1:]):
        other = {k: v for k, v in m["identity"].items() if k != "shard"}
        differ = identity_differences(ref, other)
        if m.get("steered_prompts") != manifests[0].get("steered_prompts"):
            differ.append("steered prompts")
        if differ:
            raise ValueError(
                f"{d} is not a shard of the analysis in {shard_dirs[0]} "
                f"({'; '.join(differ[:4])}); only shards of one analysis merge"
            )
    with folder_lock(out, "merge"):
        for d in map(Path, shard_dirs):
            for step_files in layout.ResultsLayout(d).finished_steps():
                step = step_files.folder
                target = layout.ResultsLayout(out).steps_dir / step.name
                if target.exists():
                    raise ValueError(
                        f"step {step.name} is in more than one shard "
                        f"({step.parent.parent} and another); merge shards of "
                        "one --shard i/n split"
                    )
                shutil.copytree(step, target)
        first = manifests[0]
        settings = {**first["settings"], "alphas": tuple(first["settings"]["alphas"])}
        tables = combine_steps(
            out,
            prompt_ids=first["steered_prompts"],
            labels=tuple(e["en"] for e in first["labels"]["emotions"]),
            config=AnalysisConfig(**settings),
        )
        results = layout.ResultsLayout(out)
        audit = next(
            (s.label_audit for s in results.step_folders() if s.label_audit.exists()), None
        )
        if audit is not None:
            write_json(results.label_audit, read_json(audit))
        done = sorted(int(x) for x in tables["steps"]["step"]) if len(tables["steps"]) else []
        replace(
            Manifest.from_dict(first),
            shard=None,
            merged_from=[str(d) for d in shard_dirs],
            identity={**ref, "shard": None},
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            steps_done=done,
            final_layer_tables=final_layer_record(out),
            failures=[f for m in manifests for f in m.get("failures", []) if f["step"] not in done]
            + readout_failures(out),
        ).write(results.manifest)
    return out


def localise(
    results_dir: str | Path,
    corpus: Corpus,
    *,
    window: int = 3,
    stride: int = 1,
    mode: str = "ablate",
    per_label: int = 8,
    device: str = "auto",
    dtype=None,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Localisation by intervention for every finished step of an analysis: remove (or patch)
    each sample's own concept direction over sliding windows of layers and record the drop of
    its label logit and of the accuracy (:func:`emolens.measure.localisation.window_sweep`), on up
    to
    ``per_label`` samples of each label, encoded with the analysis' prompt (from its manifest:
    template, labels, chat, special tokens). Needs vectors at every layer (``--layers all``).
    Writes and returns ``DIR/localisation.csv``."""
    from emolens.measure.localisation import window_sweep
    from emolens.measure.vectors import ConceptVectors

    out = Path(results_dir)
    manifest = read_json(layout.ResultsLayout(out).manifest)
    if manifest["data"]["sha256"] != corpus.sha256:
        raise ValueError(
            f"{out} was analysed on other data (sha256 "
            f"{manifest['data']['sha256'][:12]}); pass the same corpus"
        )
    series = CheckpointSeries(
        manifest["series"]["run_dir"],
        manifest["series"]["base"],
        tuple(Checkpoint(**c) for c in manifest["series"]["checkpoints"]),
    )
    prompt = manifest_prompt(manifest)
    labels = prompt.labels
    chosen = []
    for j in range(len(labels)):
        chosen += [i for i, s in enumerate(corpus.samples) if s.label == labels.emotions[j].en][
            :per_label
        ]
    frames = []
    for ckpt in tqdm(series.checkpoints, desc="localisation", unit="ckpt"):
        folder = step_dir(out, ckpt.step)
        if not layout.StepFiles(folder).is_done:
            continue
        vectors = ConceptVectors.load(folder)
        audit = LabelTokens.from_dict(read_json(layout.StepFiles(folder).label_audit))
        with _loaded(series, ckpt, {"device": device, "dtype": dtype}) as model:
            tokens = prompt.encode(model.tokenizer, [corpus.samples[i].text for i in chosen])
            gold = [labels.index(corpus.samples[i].label) for i in chosen]
            frame = window_sweep(
                model,
                tokens,
                gold,
                audit.ids,
                vectors,
                window,
                stride,
                mode,
                batch_size,
                label_names=labels.names("en"),
                progress=False,
            )
        frames.append(frame.assign(step=ckpt.step))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_csv(layout.ResultsLayout(out).localisation, table)
    return table


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
