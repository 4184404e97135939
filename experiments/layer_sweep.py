"""Mid-layer localisation (the paper's future work, issue 6): steer and probe at every layer.

With ``--model`` runs :func:`emolens.run.analyze.analyze` with ``--layers all --steer-layers all``
(other ``emolens analyze`` options apply) into OUT first; then, from OUT, writes
``OUT/layer_summary.csv`` (per step and emotion, the most steerable and the most decodable
layer) and to ``OUT/figures/``: ``layer_summary.html`` and one layer x step heatmap of the
steering effect per emotion (``layer_sweep_EMOTION.html``)::

    python experiments/layer_sweep.py results/ --model runs/paper --data crowd-enVent_ja.tsv
"""

from pathlib import Path

import _args  # experiments/_args.py: the shared argument shape
import pandas as pd

from emolens.analysis import sweeps
from emolens.analysis.frames import label_order
from emolens.data.corpus import load_corpus
from emolens.report import figures
from emolens.report.page import write_figure
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig, add_analysis_options
from emolens.run.prompt import prompt_language
from emolens.store.files import write_csv


def main(argv=None) -> None:
    parser = _args.parser(__doc__)
    parser.add_argument("out", type=Path, help="results folder (read, or written with --model)")
    parser.add_argument("--model", help="run folder or model spec to analyse first")
    _args.add_data(parser)
    parser.add_argument(
        "--language",
        choices=["ja", "en"],
        default=None,
        help="prompt language (when not given: the run's recorded prompt, else ja)",
    )
    _args.add_device(parser)
    parser.add_argument("--alpha", type=float, help="alpha summarised (default: the largest)")
    add_analysis_options(parser)
    parser.set_defaults(layers="all", steer_layers="all")
    args = parser.parse_args(argv)
    if args.model:
        config = AnalysisConfig.from_cli(args)
        corpus = load_corpus(args.data, language=prompt_language(args.model, args.language))
        analyze(
            args.model,
            corpus,
            args.out,
            config,
            device=args.device,
            override_prompt=args.override_prompt,
        )
    sens = pd.read_csv(args.out / "sensitivity.csv")
    probes_csv = args.out / "probes.csv"
    probes = pd.read_csv(probes_csv) if probes_csv.is_file() else None
    summary = sweeps.layer_summary(sens, probes, alpha=args.alpha)
    print(write_csv(args.out / "layer_summary.csv", summary))
    fig_dir = args.out / "figures"
    print(write_figure(figures.layer_summary_figure(summary), fig_dir / "layer_summary.html"))
    for emotion in label_order(sens["steered_emotion"].unique()):
        fig = figures.layer_step_heatmap(sens, emotion, alpha=args.alpha)
        print(write_figure(fig, fig_dir / f"layer_sweep_{emotion}.html"))


if __name__ == "__main__":
    main()
