"""One checkpoint's analysis: activations (cached by key), filtering, concept vectors,
steering sensitivity, readout and attribution, written into a staging folder."""

import gc
import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd
import torch

from emolens.analysis.steps import (
    causal_metric,
    dla_frame,
    save_metric,
)
from emolens.data.corpus import Corpus
from emolens.data.labels import (
    LabelSet,
    LabelTokens,
    PromptSpec,
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
from emolens.measure.vectors import ConceptVectors, concept_vectors, count_kept, keep_mask
from emolens.model import hooks
from emolens.model.loading import (
    Checkpoint,
    CheckpointSeries,
    LoadedModel,
    SeriesLoader,
)
from emolens.run.config import OFFLINE_SETTINGS, AnalysisConfig, collected_layers
from emolens.run.identity import resolved_spec, weights_fingerprint
from emolens.store import layout
from emolens.store.files import (
    read_json,
    save_tensors,
    stable_hash,
    write_csv,
    write_json,
    write_text,
)
from emolens.store.staging import link_or_copy

log = logging.getLogger(__name__)


def effect_frame(
    effect: SteeringEffect, *, step: int, alpha_unit: str, read_point: str | None = None
) -> pd.DataFrame:
    """Long table of a steering effect: one row per emotion, alpha, prompt and label; with a
    ``read_point`` column where the analysis reads the final layer at the final norm
    (``read_point`` is the run's; a row's value is its layer's read point)."""
    frame = effect.to_frame(step=step).rename(
        columns={"emotion": "steered_emotion", "label": "observed_label", "prompt": "prompt_id"}
    )
    frame.insert(5, "alpha_unit", alpha_unit)
    frame.insert(6, "positions", effect.positions)
    if read_point not in (None, "block-out"):
        layer_point = "final-norm" if effect.hook_name == hooks.final_norm() else "block-out"
        frame.insert(7, "read_point", layer_point)
    return frame


@dataclass
class StepContext:
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


def activation_key(ctx: StepContext, ckpt: Checkpoint) -> str:
    """What the activations depend on: weights, data, prompt, labels, layers, code version."""
    c = ctx.config
    return stable_hash(
        {
            **ctx.base_key,
            "checkpoint": [ckpt.step, resolved_spec(ckpt.spec), ckpt.kind],
            "weights": weights_fingerprint(ckpt.spec),
            "layers": c.layers,
            "chat": c.chat,
            "allow_shared": c.allow_shared_tokens,
            "language": c.language,
            # block-out (the default) adds nothing, so earlier results keep their keys
            **({} if c.read_point == "block-out" else {"read_point": c.read_point}),
        }
    )


# A read point's revision, bumped when what a step computes there changes, so that a step
# folder made before is recomputed on resume, not reused (final-norm 2: the causal metric is
# built from W_U alone, no longer from W_U * gain).
STEP_REVISIONS = {"final-norm": 2}


def step_key(ctx: StepContext, ckpt: Checkpoint) -> str:
    """What a finished step depends on: its activations, every per-step setting and the
    read point's :data:`STEP_REVISIONS` entry."""
    settings = {k: v for k, v in ctx.config.to_dict().items() if k not in OFFLINE_SETTINGS}
    if settings.get("read_point") == "block-out":  # the default: keys as before the option
        del settings["read_point"]
    elif settings.get("read_point") in STEP_REVISIONS:
        settings["revision"] = STEP_REVISIONS[settings["read_point"]]
    return stable_hash(
        {"activations": activation_key(ctx, ckpt), "config": settings, "eval_loss": ckpt.eval_loss}
    )


def cached_activations(ctx: StepContext, ckpt: Checkpoint, key: str, stage: Path):
    """Activations with ``key`` from the step folder or a failed attempt's folder, linked into
    ``stage``; None if there are none or they do not load (then with a warning)."""
    for folder in (
        layout.ResultsLayout(ctx.out).step(ckpt.step).folder,
        layout.ResultsLayout(ctx.out).failed(ckpt.step).folder,
    ):
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
        for name in layout.ACTIVATION_FILES:
            if not (stage / name).exists():
                link_or_copy(folder / name, stage / name)
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


def collect(
    ctx: StepContext, model: LoadedModel, ckpt: Checkpoint, stage: Path
) -> tuple[Activations, LabelTokens]:
    """Activations of every corpus sample at the configured layers, written into ``stage``
    (reused from an earlier run when their key matches)."""
    key = activation_key(ctx, ckpt)
    cached = cached_activations(ctx, ckpt, key, stage)
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
        read_point=ctx.config.read_point,
    )
    acts.save(stage)
    write_json(layout.StepFiles(stage).label_audit, audit.to_dict())
    write_text(layout.StepFiles(stage).activations_key, key)
    return acts, audit


def _filtering_frame(
    ctx: StepContext, ckpt: Checkpoint, acts: Activations, vec_keep, dropped
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


def analyse_step(
    ctx: StepContext,
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
    write_csv(files.sensitivity, sensitivity_frame(ctx, model, ckpt, acts, vectors, label_ids))
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


def sensitivity_frame(
    ctx: StepContext,
    model: LoadedModel,
    ckpt: Checkpoint,
    acts: Activations,
    vectors: ConceptVectors,
    label_ids: list[int],
) -> pd.DataFrame:
    """Steer the neutral prompts by each emotion's vector at each steer layer and alpha: the
    long ``sensitivity.csv`` rows of one step (the final layer by the readout fast path, a
    middle layer on the prompts' KV cache (answer only) or batched configurations)."""
    cfg = ctx.config
    prompt_ids = [acts.sample_ids[i] for i in ctx.prompt_index]
    prompt_texts = [ctx.corpus.samples[i].text for i in ctx.prompt_index]
    prompt_tokens = ctx.prompt.encode(model.tokenizer, prompt_texts)
    alphas = torch.tensor(cfg.alphas, dtype=torch.float32)
    frames = []
    last = model.n_layers - 1
    emotions, label_names = vectors.emotions, ctx.labels.names("en")
    for layer in hooks.check_layers(cfg.steer_layers, model.n_layers):
        if layer not in acts.layers:
            raise ValueError(
                f"steer layer {layer} is not among the collected layers "
                f"{acts.layers}; add it to --layers"
            )
        v = steering_vectors(vectors.layer(layer), cfg.alpha_unit, acts.mean_norm(layer))
        if layer == last:
            # the final block output feeds only the readout: steering every position or only
            # the answer position changes the answer logits identically, no forward needed
            # (at the final-norm read point, h and alpha v are after the norm: linear in alpha)
            effect = final_layer_sensitivity(
                model,
                acts.layer(layer)[ctx.prompt_index],
                v,
                alphas,
                label_ids,
                emotions=emotions,
                labels=label_names,
                prompt_ids=prompt_ids,
                read_point=acts.read_point,
            )
            effect = replace(effect, positions=cfg.positions)
        elif cfg.positions == "answer":  # one token a configuration, on the prompt's KV cache
            effect = layer_sensitivity_cached(
                model,
                prompt_tokens,
                layer,
                v,
                alphas,
                label_ids,
                progress=False,
                emotions=emotions,
                labels=label_names,
                prompt_ids=prompt_ids,
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
                emotions=emotions,
                labels=label_names,
                prompt_ids=prompt_ids,
            )
        frames.append(
            effect_frame(
                effect, step=ckpt.step, alpha_unit=cfg.alpha_unit, read_point=acts.read_point
            )
        )
    return pd.concat(frames, ignore_index=True)


def _base_activations(ctx: StepContext, checkpoints: list[Checkpoint]) -> Activations | None:
    """The first step's activations (for filter mode 'base'), from disk."""
    if ctx.config.filter_mode != "base":
        return None
    folder = layout.ResultsLayout(ctx.out).step(checkpoints[0].step).folder
    if not layout.StepFiles(folder).activations_key.exists():
        raise ValueError(
            f"filter mode 'base' needs the activations of step "
            f"{checkpoints[0].step} (the base model), which failed or were not "
            "computed; fix the base model or use --filter-mode self"
        )
    return Activations.load(folder)


def keep_for(ctx: StepContext, acts: Activations, checkpoints: list[Checkpoint], is_base: bool):
    mode = ctx.config.filter_mode
    base_acts = acts if is_base else _base_activations(ctx, checkpoints)
    return keep_mask(mode, acts, base_acts)


def _explain_step(
    ctx: StepContext,
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
    # the offline tables read the final layer as collected: at the final-norm read point its
    # residuals are the norm's output and their readout is the unembedding alone
    read = readout.at_read_point(acts.read_point)
    read.save(files.readout)
    if ctx.config.causal_geometry:  # the metric of what reads h: W_U alone at the final norm
        save_metric(causal_metric(model, read.gain), files.causal_metric)
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


@contextmanager
def loaded_model(
    series: CheckpointSeries,
    ckpt: Checkpoint,
    load_kwargs: dict,
    loader: SeriesLoader | None = None,
):
    """One checkpoint in memory, released on exit; with a ``loader`` (built over ``series``
    with ``load_kwargs``) the LoRA checkpoints of a series share one loaded base."""
    model = series.load(ckpt, **load_kwargs) if loader is None else loader.load(ckpt)
    try:
        yield model
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
