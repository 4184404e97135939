"""``emolens generate``: steered greedy continuations of an analysis' neutral prompts, for each
finished step, with that step's concept vectors, in the analysis' alpha unit.

Writes ``DIR/generations.csv`` (``step, emotion, alpha, prompt_id, text, n_tokens``); each step's
rows are kept in ``DIR/generations/step-N.csv`` as they finish, so an interrupted run resumes,
and a run with other settings is refused unless ``overwrite``.
"""

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from emolens.data.corpus import Corpus
from emolens.measure.activations import Activations
from emolens.measure.generate import steered_generations
from emolens.measure.steering import steering_vectors
from emolens.measure.vectors import ConceptVectors
from emolens.model import hooks
from emolens.model.loading import Checkpoint, CheckpointSeries
from emolens.run.prompt import manifest_prompt
from emolens.run.step import loaded_model
from emolens.store.files import read_json, write_csv, write_json
from emolens.store.layout import ResultsLayout

GENERATIONS_DIR = "generations"
COLUMNS = ["step", "emotion", "alpha", "prompt_id", "text", "n_tokens"]


def generate(
    results_dir: str | Path,
    corpus: Corpus,
    *,
    alphas: Sequence[float] | None = None,
    layer: int = -1,
    max_new_tokens: int = 32,
    steps: Sequence[int] | None = None,
    device: str = "auto",
    dtype=None,
    batch_size: int = 8,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Greedy continuations of the analysis' steered (neutral) prompts, encoded with its
    prompt, steered at block ``layer``'s output by each emotion at each alpha (default: the
    analysis' alpha grid, in its alpha unit), for every finished step (or ``steps``)."""
    out = Path(results_dir)
    manifest = read_json(out / "manifest.json")
    if manifest["data"]["sha256"] != corpus.sha256:
        raise ValueError(
            f"{out} was analysed on other data (sha256 {manifest['data']['sha256'][:12]}); "
            "pass the same corpus with --data"
        )
    settings = manifest["settings"]
    alphas = [float(a) for a in (alphas if alphas is not None else settings["alphas"])]
    unit = settings.get("alpha_unit", "absolute")
    series = CheckpointSeries(
        manifest["series"]["run_dir"],
        manifest["series"]["base"],
        tuple(Checkpoint(**c) for c in manifest["series"]["checkpoints"]),
    )
    prompt = manifest_prompt(manifest)
    by_id = {s.id: s for s in corpus.samples}
    prompt_ids = list(manifest["steered_prompts"])
    texts = [by_id[i].text for i in prompt_ids]
    key = {
        "alphas": alphas,
        "alpha_unit": unit,
        "layer": layer,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "prompt_ids": prompt_ids,
    }
    folder = out / GENERATIONS_DIR
    settings_file = folder / "settings.json"
    if settings_file.exists() and read_json(settings_file) != key:
        if not overwrite:
            raise ValueError(
                f"{folder} holds generations made with other settings "
                f"({read_json(settings_file)}); pass --overwrite to replace them"
            )
        for old in folder.glob("step-*.csv"):
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(settings_file, key)
    wanted = set(steps) if steps is not None else None
    frames = []
    checkpoints = [
        c
        for c in series.checkpoints
        if (ResultsLayout(out).step(c.step).folder / "done.json").exists()
        and (wanted is None or c.step in wanted)
    ]
    if wanted is not None and len(checkpoints) != len(wanted):
        found = {c.step for c in checkpoints}
        raise ValueError(
            f"steps {sorted(wanted - found)} have no finished analysis in {out}; "
            f"finished: {sorted(c.step for c in series.checkpoints)}"
        )
    for ckpt in tqdm(checkpoints, desc="generate", unit="ckpt", disable=not progress):
        part = folder / f"step-{ckpt.step}.csv"
        if part.exists():
            frames.append(pd.read_csv(part, keep_default_na=False))
            continue
        step_folder = ResultsLayout(out).step(ckpt.step).folder
        vectors = ConceptVectors.load(step_folder)
        acts = Activations.load(step_folder)
        with loaded_model(series, ckpt, {"device": device, "dtype": dtype}) as model:
            (index,) = hooks.check_layers([layer], model.n_layers)
            if index not in acts.layers:
                raise ValueError(
                    f"layer {layer} was not collected by the analysis (layers {acts.layers}); "
                    "re-run analyze with it in --layers"
                )
            if acts.layer_read_point(index) != "block-out":
                raise ValueError(
                    f"layer {layer} of {out} was read at the final norm (analyze "
                    "--read-point final-norm), and generate steers block outputs only; "
                    "steer a middle layer or analyse with --read-point block-out"
                )
            v = steering_vectors(vectors.layer(index), unit, acts.mean_norm(index))
            frame = steered_generations(
                model,
                prompt.encode(model.tokenizer, texts),
                v,
                alphas,
                index,
                emotions=vectors.emotions,
                prompt_ids=prompt_ids,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
        frame.insert(0, "step", ckpt.step)
        write_csv(part, frame)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    write_csv(out / "generations.csv", table)
    return table
