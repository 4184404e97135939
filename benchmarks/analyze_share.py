"""Wall time of ``emolens analyze --layers all`` over a three-checkpoint series, and the share of
it spent in model forward passes and the answer readout (near 100% means nothing else is in
the way). Issue 6.

    python benchmarks/analyze_share.py RUN_DIR [--steps 0,8,16]

RUN_DIR is a fine-tuning run folder (e.g. ``emolens-demo/run`` after ``emolens demo``).
"""

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from emolens.data.corpus import load_corpus
from emolens.measure import activations, steering
from emolens.model import loading
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig

SPENT: dict[str, float] = defaultdict(float)


DEPTH: dict[str, int] = defaultdict(int)


def timed(name, fn):
    """Count the time of the outermost calls of ``fn`` only (forward calls can nest)."""

    def wrapper(*args, **kwargs):
        DEPTH[name] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            DEPTH[name] -= 1
            if DEPTH[name] == 0:
                SPENT[name] += time.perf_counter() - start

    return wrapper


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="fine-tuning run folder")
    parser.add_argument("--steps", default="0,8,16", help="three steps of the series")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    from transformer_lens.model_bridge import TransformerBridge

    TransformerBridge.forward = timed("forward", TransformerBridge.forward)
    for module in (activations, steering):
        module.answer_readout = timed("readout", module.answer_readout)
    loading.load_model = timed("load", loading.load_model)
    out = tempfile.mkdtemp(prefix="emolens-share-")
    # the demo's settings (vectors from every sample: the 270M base model answers too few
    # neutral samples correctly for the paper's filter), steering at the final layer
    config = AnalysisConfig(layers="all", steer_layers="-1", filter_mode="none", n_boot=200)
    from emolens.run import analyze as analyze_module

    analyze_module.combine_steps = timed("tables", analyze_module.combine_steps)
    start = time.perf_counter()
    analyze(
        args.run,
        load_corpus(None),
        out,
        config,
        device="cpu",
        steps=[int(s) for s in args.steps.split(",")],
    )
    total = time.perf_counter() - start
    failures = json.loads((Path(out) / "manifest.json").read_text())["failures"]
    shutil.rmtree(out)
    if failures:
        raise SystemExit(f"steps failed, the timing is not of a full analysis: {failures}")
    inner = SPENT["forward"] + SPENT["readout"]
    print(f"analyze --layers all, steps {args.steps}: {total:.1f} s wall")
    print(
        f"  forward passes {SPENT['forward']:.1f} s, answer readout {SPENT['readout']:.1f} s: "
        f"{100 * inner / total:.0f}% of the wall time"
    )
    rest = total - inner - SPENT["load"] - SPENT["tables"]
    print(
        f"  model loading {SPENT['load']:.1f} s ({100 * SPENT['load'] / total:.0f}%); "
        f"cross-step tables with bootstraps {SPENT['tables']:.1f} s "
        f"({100 * SPENT['tables'] / total:.0f}%); everything else (vectors, DLA bookkeeping, "
        f"causal metric, I/O) {rest:.1f} s ({100 * rest / total:.0f}%)"
    )


if __name__ == "__main__":
    main()
