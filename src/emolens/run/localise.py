"""Localisation by intervention over every finished step of an analysis."""

import logging
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from emolens.data.corpus import Corpus
from emolens.data.labels import (
    LabelTokens,
)
from emolens.measure.localisation import Mode
from emolens.model.loading import (
    Checkpoint,
    CheckpointSeries,
)
from emolens.run.prompt import manifest_prompt
from emolens.run.step import loaded_model
from emolens.store import layout
from emolens.store.files import (
    read_json,
    write_csv,
)

log = logging.getLogger(__name__)


def localise(
    results_dir: str | Path,
    corpus: Corpus,
    *,
    window: int = 3,
    stride: int = 1,
    mode: Mode = "mean",
    per_label: int = 8,
    device: str = "auto",
    dtype=None,
    batch_size: int = 8,
    n_control: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Localisation by intervention for every finished step of an analysis: along each sample's
    own concept direction, set its residual to the mean over the step's chosen samples
    (``mode="mean"``, default), remove it (``"ablate"``) or patch in the neutral mean
    (``"patch"``), over sliding windows of layers, and record the drop of its label logit and
    of the accuracy beside the same intervention along ``n_control`` random directions
    (seeded by ``seed``; :func:`emolens.measure.localisation.window_sweep`), on up to
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
        folder = layout.ResultsLayout(out).step(ckpt.step).folder
        if not layout.StepFiles(folder).is_done:
            continue
        vectors = ConceptVectors.load(folder)
        audit = LabelTokens.from_dict(read_json(layout.StepFiles(folder).label_audit))
        with loaded_model(series, ckpt, {"device": device, "dtype": dtype}) as model:
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
                n_control=n_control,
                control_seed=seed,
            )
        frames.append(frame.assign(step=ckpt.step))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_csv(layout.ResultsLayout(out).localisation, table)
    return table
