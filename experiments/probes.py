"""Linear probes over fine-tuning: is each emotion still decodable, and by the old read-out?

Multinomial logistic probes per layer and step (held-out accuracy with bootstrap intervals,
the first step's probe on later steps, a shuffled-label baseline and chance). From a results
folder of ``emolens analyze``, writes ``DIR/figures/probes.html`` (accuracy over steps) and
``DIR/figures/probes_layers.html`` (layer x step, accuracy and per-label recall)::

    python experiments/probes.py results/ --layer 12
"""

import _args  # experiments/_args.py: the shared argument shape
import pandas as pd

from emolens.report import figures
from emolens.report.page import write_figure


def main(argv=None) -> None:
    parser = _args.results_parser(__doc__)
    parser.add_argument("--layer", type=int, help="layer shown first (default: all layers)")
    args = parser.parse_args(argv)
    path = args.results / "probes.csv"
    if not path.is_file():
        parser.error(f"{path} not found: run emolens analyze first")
    probes = pd.read_csv(path)
    out = args.results / "figures"
    print(write_figure(figures.probes_figure(probes, layer=args.layer), out / "probes.html"))
    print(write_figure(figures.probes_layer_heatmap(probes), out / "probes_layers.html"))


if __name__ == "__main__":
    main()
