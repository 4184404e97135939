"""The loop over checkpoints: activations, filtering, concept vectors, steering sensitivity.

One checkpoint is in memory at a time. Each step writes its results to
``OUT/steps/step-NNNNNN/`` and a ``done.json`` holding the key of what produced them; a re-run
skips steps whose key matches and recomputes the rest, so an interrupted run resumes. The
top-level tables (``sensitivity.csv``, ``filtering.csv``, ``steps.csv``) are rebuilt from the
step folders at the end of every run.
"""

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import emolens
from emolens.data.corpus import Corpus
from emolens.data.labels import (
    LabelSet,
)
from emolens.measure.activations import Activations
from emolens.measure.vectors import keep_mask
from emolens.model import hooks
from emolens.model.loading import (
    Checkpoint,
    CheckpointSeries,
    SeriesLoader,
    check_model_source,
    discover_series,
    is_run_dir,
    resolve_device,
    resolve_dtype,
)
from emolens.run.config import AnalysisConfig, collected_layers
from emolens.run.identity import analysis_identity, check_identity
from emolens.run.merge import combine_steps, final_layer_record, readout_failures
from emolens.run.prompt import choose_prompts, recorded_prompt, resolve_prompt
from emolens.run.seeds import analyze_seeds, seed_runs
from emolens.run.step import (
    StepContext,
    activation_key,
    analyse_step,
    collect,
    keep_for,
    loaded_model,
    step_key,
)
from emolens.store import layout, provenance
from emolens.store.files import (
    NUMERICS_MODE,
    NUMERICS_NOTE,
    folder_lock,
    read_json,
    versions,
    write_json,
)
from emolens.store.manifest import Manifest
from emolens.store.staging import commit_step, recover_steps, step_problem

log = logging.getLogger(__name__)


def series_of(model_spec, base: str | None) -> CheckpointSeries:
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
    path = Path(out) / layout.LAST_RUN
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
        f"Finished steps are kept; details in {Path(out) / layout.LAST_RUN} and "
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

    A folder of ``seed-K/`` run folders (``finetune --seeds``) is analysed seed by seed into
    ``OUT/seed-K/``, with the tables concatenated over seeds and the across-seed change tests
    at the top of ``OUT`` (:func:`emolens.run.seeds.analyze_seeds`).
    """
    runs = seed_runs(model_spec)
    if runs is not None:
        return analyze_seeds(
            runs, corpus, out_dir, config, labels=labels, base=base, device=device, dtype=dtype,
            device_map=device_map, steps=steps, shard=shard, override_prompt=override_prompt,
            overwrite=overwrite,
        )  # fmt: skip
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
    series = series_of(model_spec, base)
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
    identity = analysis_identity(series, corpus, prompt, config, dtype, shard, steps)
    ctx = StepContext(
        out,
        corpus,
        prompt,
        config,
        prompt_index,
        {"device": device, "dtype": dtype, "device_map": device_map},
        {
            "emolens": emolens.__version__,
            "data": corpus.sha256,
            "labels": labels.to_dict(),
            "template": prompt.template.to_dict(),
            "prompt": prompt.to_dict(),
            "dtype": str(dtype),
            "readout": "float32; final layer always collected",
        },
    )
    with folder_lock(out, "analyze"):
        run = _SeriesRun(
            ctx,
            series,
            checkpoints,
            identity,
            previous=check_identity(out, identity, overwrite),
            overwrite=overwrite,
            shard=shard,
        )
        recover_steps(out)
        run.run_steps()
        if run.failures and run.previous and not overwrite:
            # the folder's tables and manifest describe its finished results: a failed re-run
            # leaves them as they are (its failures are in last_run.json)
            return out
        run.write_tables_and_manifest(prompt_record, model_spec)
    return out


@dataclass
class _SeriesRun:
    """One ``analyze`` call over the checkpoints of a series, with ``OUT``'s lock held."""

    ctx: StepContext
    series: CheckpointSeries
    checkpoints: list[Checkpoint]  # every analysed step (filter modes base/all read others)
    identity: dict
    previous: dict  # the folder's earlier manifest ({} if none)
    overwrite: bool
    shard: tuple[int, int] | None
    failures: list[dict] = field(default_factory=list)
    keys: dict[int, str] = field(default_factory=dict)  # step -> the key it is finished with
    started: float = field(default_factory=time.time)
    loader: SeriesLoader | None = None  # made by the first load; a LoRA series keeps its base

    @property
    def results(self) -> layout.ResultsLayout:
        return layout.ResultsLayout(self.ctx.out)

    @property
    def mine(self) -> list[Checkpoint]:
        """The checkpoints this process analyses (its shard)."""
        if self.shard is None:
            return self.checkpoints
        return self.checkpoints[self.shard[0] :: self.shard[1]]

    def run_steps(self) -> None:
        """Analyse every unfinished step of :attr:`mine`; record failures; write
        ``last_run.json``."""
        mine, results = self.mine, self.results
        if self.overwrite:  # steps of another series must not linger beside this one's
            keep_names = {results.step(c.step).folder.name for c in mine}
            for step_files in results.step_folders():
                if step_files.folder.name not in keep_names:
                    shutil.rmtree(step_files.folder)
        self.keys = {c.step: step_key(self.ctx, c) for c in mine}
        pending: list[tuple[Checkpoint, Path]] = []
        for ckpt in tqdm(mine, desc="checkpoints", unit="ckpt"):
            if step_problem(results.step(ckpt.step).folder, self.keys[ckpt.step]) is None:
                continue
            stage = results.staging(ckpt.step).folder
            if stage.exists():
                shutil.rmtree(stage)
            stage.mkdir(parents=True)
            if self.ctx.config.filter_mode == "all":
                if self._attempt(ckpt, stage, keep=None):  # activations only, for now
                    pending.append((ckpt, stage))
                continue
            self._attempt(ckpt, stage, keep=self._own_keep)
        if pending:  # filter mode "all": correctness of every step is known only now
            masks = self._correct_masks({c.step: stage for c, stage in pending})
            for ckpt, stage in tqdm(pending, desc="steering (filter: all)", unit="ckpt"):
                self._attempt(
                    ckpt, stage, keep=lambda acts, _: keep_mask("all", acts, all_steps=masks)
                )
        if self.loader is not None:
            self.loader.release()
        write_json(
            results.last_run,
            {
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "steps_done": [c.step for c in mine if c.step in self.finished_steps()],
                "failures": self.failures,
                "series_problems": list(self.series.problems),
                "identity": self.identity,
                "seconds": round(time.time() - self.started, 1),
            },
        )

    def _own_keep(self, acts: Activations, ckpt: Checkpoint) -> torch.Tensor:
        return keep_for(self.ctx, acts, self.checkpoints, is_base=ckpt is self.checkpoints[0])

    def _attempt(self, ckpt: Checkpoint, stage: Path, keep) -> bool:
        """Load ``ckpt``, collect its activations into ``stage`` and, with ``keep`` (a function
        of the activations and the checkpoint giving the kept-sample mask), analyse the step
        and swap it in. False (and the failure recorded) if anything raised."""
        try:
            if self.loader is None:
                self.loader = SeriesLoader(self.series, **self.ctx.load_kwargs)
            with loaded_model(self.series, ckpt, self.ctx.load_kwargs, self.loader) as model:
                acts, audit = collect(self.ctx, model, ckpt, stage)
                if keep is None:
                    return True
                mask = keep(acts, ckpt)
                analyse_step(self.ctx, model, ckpt, acts, mask, audit, self.keys[ckpt.step], stage)
            commit_step(stage, self.results.step(ckpt.step).folder)
            shutil.rmtree(self.results.failed(ckpt.step).folder, ignore_errors=True)
            return True
        except Exception as exc:  # one broken checkpoint must not stop the series
            self._fail(ckpt, exc)
            return False

    def _fail(self, ckpt: Checkpoint, exc: Exception) -> None:
        """Record the failure; move what the step left to ``OUT/failed/step-N/``."""
        error = f"{type(exc).__name__}: {exc}"
        log.warning("step %s (%s) failed: %s", ckpt.step, ckpt.spec, " ".join(error.split()))
        self.failures.append({"step": ckpt.step, "spec": ckpt.spec, "error": error})
        stage, target = (
            self.results.staging(ckpt.step).folder,
            self.results.failed(ckpt.step).folder,
        )
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        if stage.exists():
            stage.rename(target)
        write_json(layout.StepFiles(target).error, self.failures[-1])

    def _correct_masks(self, staged: dict[int, Path]) -> list[torch.Tensor]:
        """Which samples each step classifies correctly (filter mode ``all``), for every step
        whose current activations exist, staged or finished."""
        masks = []
        for c in self.checkpoints:
            folder = staged.get(c.step, self.results.step(c.step).folder)
            marker = layout.StepFiles(folder).activations_key
            if marker.exists() and marker.read_text() == activation_key(self.ctx, c):
                masks.append(Activations.load(folder).correct)
        return masks

    def finished_steps(self) -> list[int]:
        """Steps of :attr:`mine` whose folder is finished with the current key."""
        return [
            c.step
            for c in self.mine
            if step_problem(self.results.step(c.step).folder, self.keys[c.step]) is None
        ]

    def write_tables_and_manifest(self, prompt_record: dict, model_spec) -> None:
        """The cross-step tables from the finished steps, the label audit and the manifest."""
        ctx, results = self.ctx, self.results
        finished = [results.step(s).folder for s in self.finished_steps()]
        tables = combine_steps(
            ctx.out,
            prompt_ids=[ctx.corpus.samples[i].id for i in ctx.prompt_index],
            labels=tuple(ctx.labels.names("en")),
            config=ctx.config,
            folders=finished,
        )
        first_audit = next(
            (a for a in (layout.StepFiles(d).label_audit for d in finished) if a.exists()), None
        )
        if first_audit is not None:
            write_json(results.label_audit, read_json(first_audit))
        failed = {f["step"] for f in self.failures}
        self.failures += [f for f in readout_failures(ctx.out) if f["step"] not in failed]
        self._manifest(prompt_record, model_spec, tables).write(results.manifest)

    def _manifest(self, prompt_record: dict, model_spec, tables: dict) -> Manifest:
        ctx, series, load = self.ctx, self.series, self.ctx.load_kwargs
        corpus, prompt, config = ctx.corpus, ctx.prompt, ctx.config
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        return Manifest(
            emolens=emolens.__version__,
            versions=versions(),
            created=self.previous.get("created", now),
            updated=now,
            model=str(model_spec)
            if not isinstance(model_spec, CheckpointSeries)
            else series.run_dir,
            run_dir=series.run_dir or None,
            series=series.to_dict(),
            data={
                "source": corpus.source,
                "sha256": corpus.sha256,
                "n_samples": len(corpus),
                "counts": corpus.counts(),
            },
            labels=ctx.labels.to_dict(),
            template=prompt.template.to_dict(),
            prompt=prompt.to_dict(),
            prompt_source=prompt_record["source"],
            prompt_override=prompt_record["override"],
            settings=config.to_dict(),
            load={
                "device": load["device"],
                "dtype": str(load["dtype"]).removeprefix("torch."),
                "device_map": load["device_map"],
            },
            identity=self.identity,
            steered_prompts=[corpus.samples[i].id for i in ctx.prompt_index],
            hook_names=hooks.manifest_names(config.read_point),
            numerics=NUMERICS_MODE,
            numerics_note=NUMERICS_NOTE,
            readout_dtype="float32 (unembed(ln_final(h)) upcast whatever the model dtype)",
            final_layer_tables=final_layer_record(ctx.out),
            seeds={"prompt_seed": config.prompt_seed},
            shard=list(self.shard) if self.shard else None,
            steps_done=sorted(int(s) for s in tables["steps"]["step"])
            if len(tables["steps"])
            else [],
            failures=self.failures,
            series_problems=list(series.problems),
            seconds_this_run=round(time.time() - self.started, 1),
            provenance=provenance.manifest(),
        )
