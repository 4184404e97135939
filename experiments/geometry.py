"""The pre-experiments' geometry, and beyond: concept-space measures over fine-tuning (issue 5).

Within-concept similarity, orthogonality of the concept vectors and their stability against
the first step, in the plain and the causal inner product, with bootstrap intervals. From a
results folder of ``emolens analyze``, writes ``DIR/figures/geometry_MEASURE_INNER.html``
(lines over steps at one layer), ``geometry_MEASURE_INNER_layers.html`` (layer x step) and,
where ``change_summary.csv`` exists, ``change_summary.html`` (which series change beyond
their interval: the paper reported no significant change)::

    python experiments/geometry.py results/ --measures cosine_to_first,orthogonality
"""

import _args  # experiments/_args.py: the shared argument shape
import pandas as pd

from emolens.report import figures
from emolens.report.page import GEOMETRY_KEY_MEASURES, write_figure


def main(argv=None) -> None:
    parser = _args.results_parser(__doc__)
    parser.add_argument(
        "--measures",
        default=",".join(GEOMETRY_KEY_MEASURES),
        help="comma-separated measures of geometry.csv",
    )
    parser.add_argument("--layer", type=int, help="layer of the line figures (default: last)")
    args = parser.parse_args(argv)
    if not (args.results / "geometry.csv").is_file():
        parser.error(f"{args.results / 'geometry.csv'} not found: run emolens analyze first")
    geo = pd.read_csv(args.results / "geometry.csv")
    out = args.results / "figures"
    for measure in args.measures.split(","):
        for inner in sorted(geo.loc[geo["measure"] == measure, "inner"].unique()):
            fig = figures.geometry_figure(geo, measure, inner=inner, layer=args.layer)
            print(write_figure(fig, out / f"geometry_{measure}_{inner}.html"))
            fig = figures.geometry_layer_heatmap(geo, measure, inner=inner)
            print(write_figure(fig, out / f"geometry_{measure}_{inner}_layers.html"))
    if (args.results / "change_summary.csv").is_file():
        fig = figures.change_summary_table(pd.read_csv(args.results / "change_summary.csv"))
        print(write_figure(fig, out / "change_summary.html"))


if __name__ == "__main__":
    main()
