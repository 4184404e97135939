"""Why steering sensitivity changes: logit attribution of final-layer steering (issue 5).

From a results folder of ``emolens analyze``, writes to ``DIR/figures/``: ``attribution.html``
(the measured logit change split into direct push + norm-scale change, per emotion over steps),
``push_change.html`` (the change of the per-unit push split into vector, readout and residual
scale) and, where ``dla.csv`` exists, ``dla.html`` / ``dla_margin.html`` (direct logit
attribution of the unsteered answer over components and steps)::

    python experiments/attribution.py results/ --alpha 8
"""

import _args  # experiments/_args.py: the shared argument shape
import pandas as pd

from emolens.report import figures
from emolens.report.page import write_figure


def main(argv=None) -> None:
    parser = _args.results_parser(__doc__)
    parser.add_argument("--alpha", type=float, help="alpha shown (default: the largest)")
    args = parser.parse_args(argv)
    if not (args.results / "attribution.csv").is_file():
        parser.error(f"{args.results / 'attribution.csv'} not found: run emolens analyze first")
    attr = pd.read_csv(args.results / "attribution.csv")
    figs = {
        "attribution": figures.attribution_figure(attr, alpha=args.alpha),
        "push_change": figures.push_change_figure(attr),
    }
    if (args.results / "dla.csv").is_file():
        dla = pd.read_csv(args.results / "dla.csv")
        figs["dla"] = figures.dla_figure(dla)
        figures["dla_margin"] = figures.dla_figure(dla, value="margin")
    for name, fig in figs.items():
        print(write_figure(fig, args.results / "figures" / f"{name}.html"))


if __name__ == "__main__":
    main()
