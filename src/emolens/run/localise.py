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
    mode: Mode = "ablate",
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
            )
        frames.append(frame.assign(step=ckpt.step))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_csv(layout.ResultsLayout(out).localisation, table)
    return table
