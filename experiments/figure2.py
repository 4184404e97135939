"""Reproduce the paper's Figure 2: steering sensitivity of each emotion over fine-tuning steps.

Runs :func:`emolens.run.analyze.analyze` over a fine-tuning run folder (or one model) with the
paper's settings (final block output, 10 neutral prompts, filtering by the model's own
answers; no DLA, no causal geometry), then writes ``OUT/figures/figure2.html``. Every
``emolens analyze`` option can override them::

    python experiments/figure2.py runs/paper --data crowd-enVent_generation_ja.tsv --out res
"""

from dataclasses import replace
from pathlib import Path

import _args  # experiments/_args.py: the shared argument shape
import pandas as pd

from emolens.data.corpus import load_corpus
from emolens.report import figures
from emolens.report.page import write_figure
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig, add_analysis_options
from emolens.run.prompt import prompt_language
from emolens.store.files import read_json


def main(argv=None) -> None:
    parser = _args.parser(__doc__)
    parser.add_argument("run", help="fine-tuning run folder (checkpoint series) or a model spec")
    _args.add_data(parser)
    parser.add_argument(
        "--language",
        choices=["ja", "en"],
        default=None,
        help="prompt language (when not given: the run's recorded prompt, else ja)",
    )
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    _args.add_device(parser)
    parser.add_argument("--alpha", type=float, help="alpha shown (default: the largest)")
    add_analysis_options(parser)
    parser.set_defaults(layers="-1", steer_layers="-1", n_prompts=10, dla_per_label=0)
    args = parser.parse_args(argv)
    config = replace(AnalysisConfig.from_cli(args), causal_geometry=False)
    corpus = load_corpus(args.data, language=prompt_language(args.run, args.language))
    out = analyze(
        args.run, corpus, args.out, config, device=args.device, override_prompt=args.override_prompt
    )
    manifest = read_json(out / "manifest.json")
    if not manifest["steps_done"]:
        raise SystemExit("no checkpoint analysed: " + manifest["failures"][0]["error"])
    steps = pd.read_csv(out / "steps.csv")
    fig = figures.figure2(pd.read_csv(out / "sensitivity.csv"), alpha=args.alpha, steps_table=steps)
    print(write_figure(fig, out / "figures" / "figure2.html"))


if __name__ == "__main__":
    main()
