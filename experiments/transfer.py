"""Vector transfer: steer the model of step t with the concept vectors of step s (issue 5).

Separates "the concept direction changed" (along a row) from "the model no longer reads it"
(along a column). From a results folder of ``emolens analyze``, writes
``DIR/figures/transfer.html`` (model step x vector step, mean over emotions, a menu per
emotion)::

    python experiments/transfer.py results/ --emotion joy
"""

import _args  # experiments/_args.py: the shared argument shape
import pandas as pd

from emolens.report import figures
from emolens.report.page import write_figure


def main(argv=None) -> None:
    parser = _args.results_parser(__doc__)
    parser.add_argument("--emotion", help="emotion shown first (default: the mean over emotions)")
    args = parser.parse_args(argv)
    path = args.results / "transfer.csv"
    if not path.is_file():
        parser.error(f"{path} not found: run emolens analyze first")
    fig = figures.transfer_heatmap(pd.read_csv(path), emotion=args.emotion)
    print(write_figure(fig, args.results / "figures" / "transfer.html"))


if __name__ == "__main__":
    main()
