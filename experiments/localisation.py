"""Localisation by intervention (issue 6; Tak et al. 2025 found emotion in the middle layers).

For every step of an analysis made with ``--layers all``, set each sample's residual along its
own concept direction to the mean over the samples (``--mode mean``, default; ``ablate``
removes it, ``patch`` patches in the neutral mean) over sliding windows of consecutive layers
and record how its label logit and the classification accuracy drop, beside the same
intervention along ``--n-control`` random directions; writes
``DIR/localisation.csv`` and ``DIR/figures/localisation.html`` (window x step heatmap)::

    python experiments/localisation.py results/ --data bundled --window 3
"""

from pathlib import Path

import _args  # experiments/_args.py: the shared argument shape

from emolens.data.corpus import load_corpus
from emolens.report import figures
from emolens.report.page import write_figure
from emolens.run.localise import localise
from emolens.run.prompt import manifest_prompt
from emolens.store.files import read_json


def main(argv=None) -> None:
    parser = _args.parser(__doc__)
    parser.add_argument("results", type=Path, help="results folder of emolens analyze")
    parser.add_argument("--data", default="bundled", help="the corpus the analysis used")
    parser.add_argument("--window", type=int, default=3, help="layers per window")
    parser.add_argument("--stride", type=int, default=1, help="layers between window starts")
    parser.add_argument(
        "--mode",
        choices=["mean", "ablate", "patch"],
        default="mean",
        help="mean: set the component along the direction to the samples' mean (default); "
        "ablate: remove it; patch: set it to the neutral label's mean",
    )
    parser.add_argument(
        "--n-control", type=int, default=3, help="random control directions per window"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the control directions")
    parser.add_argument("--per-label", type=int, default=8, help="samples per label")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    manifest = args.results / "manifest.json"
    if not manifest.is_file():
        parser.error(f"{manifest} not found: run emolens analyze first")
    language = manifest_prompt(read_json(manifest)).language  # 'bundled' in the prompt's language
    table = localise(
        args.results,
        load_corpus(args.data, language=language),
        window=args.window,
        stride=args.stride,
        mode=args.mode,
        per_label=args.per_label,
        device=args.device,
        n_control=args.n_control,
        seed=args.seed,
    )
    fig = figures.localisation_heatmap(table)
    print(write_figure(fig, args.results / "figures" / "localisation.html"))


if __name__ == "__main__":
    main()
