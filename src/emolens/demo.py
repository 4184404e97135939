"""``emolens demo``: the whole study, end to end, on the embedded default model.

Fine-tune a short schedule with several checkpoints on the bundled Japanese corpus, analyse
every checkpoint (filtering, concept vectors, steering sensitivity at the final layer and a few
middle layers) and write one self-contained ``report.html``.
"""

import logging
import time
from pathlib import Path

from emolens.data.corpus import load_corpus
from emolens.model.loading import DEFAULT_MODEL, cache_dir
from emolens.report.page import write_report
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig
from emolens.run.finetune import PRESETS, finetune
from emolens.store.files import write_json

log = logging.getLogger(__name__)

#: Analysis settings of the demo: vectors at every layer; steering at the final layer (as in
#: the paper; there steering every position or the answer position is the same) and at the
#: middle layer (answer position only, one token a configuration on the prompt's KV cache).
#: The vectors use every sample (filter mode "none"): the 270M base model answers the 13-way
#: prompt correctly for almost no neutral sample (1 of 32 on the bundled corpus), so the
#: paper's filtering to correct answers would leave no neutral mean at step 0. filtering.csv
#: still reports how many samples each step gets right; `emolens analyze` filters by default.
DEMO_ANALYSIS = AnalysisConfig(
    layers="all", steer_layers="mid,-1", positions="answer", n_prompts=10, filter_mode="none"
)


def demo_settings(model: str) -> tuple[str, AnalysisConfig]:
    """The fine-tuning preset and analysis settings for ``model``."""
    if model == "tiny-random":
        return "tiny", AnalysisConfig(
            layers="all",
            steer_layers="1,-1",
            n_prompts=4,
            alphas=(0.0, 2.0, 8.0),
            filter_mode="none",
            min_count=1,
            batch_size=32,
        )
    return "demo", DEMO_ANALYSIS


def run_demo(
    out: str | Path = "emolens-demo", model: str = DEFAULT_MODEL, device: str = "auto"
) -> Path:
    """Fine-tune, analyse every checkpoint, write ``OUT/results/report.html``; returns it."""
    out = Path(out)
    started = time.time()
    preset, config = demo_settings(model)
    corpus = load_corpus(None)
    log.warning(
        "emolens demo: model %s, %d samples, preset %r, output %s (cache %s)",
        model,
        len(corpus),
        preset,
        out,
        cache_dir(),
    )
    run_dir = finetune(model, corpus, out / "run", PRESETS[preset])
    t_finetune = time.time() - started
    results_dir = analyze(run_dir, corpus, out / "results", config, device=device)
    t_analyze = time.time() - started - t_finetune
    write_json(
        out / "results" / "demo_timing.json",
        {"finetune_s": round(t_finetune, 1), "analyze_s": round(t_analyze, 1)},
    )
    return write_report(results_dir, run_dir=run_dir)
