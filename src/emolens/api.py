"""The notebook API: one results folder of ``emolens analyze`` (or ``demo``) as Python objects.

    >>> r = emolens.Results("emolens-demo/results")
    >>> r.sensitivity.head()          # every table as a pandas DataFrame
    >>> r.vectors(r.steps_done[-1])   # ConceptVectors of one step
    >>> r.figure2()                   # the paper's Figure 2, a plotly Figure
    >>> r.effects().sel(alpha=8.0)    # steering effects as an xarray DataArray

Nothing is computed here: tables, tensors and figures come from the files ``analyze`` wrote,
read with the same loaders and drawn with the same :mod:`emolens.report.figures` functions as the
report. A missing file is an error naming the file and the command that makes it.
"""

from functools import cached_property, wraps
from pathlib import Path

import pandas as pd

#: Tables an analysis may write (``NAME.csv`` in the results folder); each is an attribute.
TABLES = (
    "sensitivity",
    "filtering",
    "steps",
    "geometry",
    "probes",
    "attribution",
    "transfer",
    "dla",
    "heads",
    "logit_lens",
    "generations",
    "random_baseline",
    "change_summary",
    "change_omnibus",
    "kept_set_effect",
    "seed_change_summary",
    "localisation",
    "accuracy",
)

#: The key columns of ``sensitivity.csv``: the dimensions of :meth:`Results.effects`.
EFFECT_DIMS = (
    "step",
    "layer",
    "alpha_unit",
    "positions",
    "steered_emotion",
    "observed_label",
    "alpha",
    "prompt_id",
)


def _in_report_fonts(method):
    """A figure method whose figure's text is in the report's CJK-capable font stack."""

    @wraps(method)
    def styled(self, *args, **kwargs):
        from emolens.report.figures._style import with_fonts

        return with_fonts(method(self, *args, **kwargs))

    return styled


class ResultsError(FileNotFoundError):
    """A results folder lacks what was asked for; the message names the file and the fix."""


def _table_property(name: str) -> property:
    def get(self: "Results") -> pd.DataFrame:
        return self.table(name)

    get.__doc__ = f"``{name}.csv`` as a DataFrame (see the README's output files)."
    return property(get)


class Results:
    """A results folder: tables, manifest, per-step tensors and figures."""

    # one read-only DataFrame property per name in TABLES, set on the class below; declared
    # here for type checkers (tests check the two lists agree)
    sensitivity: pd.DataFrame
    filtering: pd.DataFrame
    steps: pd.DataFrame
    geometry: pd.DataFrame
    probes: pd.DataFrame
    attribution: pd.DataFrame
    transfer: pd.DataFrame
    dla: pd.DataFrame
    heads: pd.DataFrame
    logit_lens: pd.DataFrame
    generations: pd.DataFrame
    random_baseline: pd.DataFrame
    change_summary: pd.DataFrame
    change_omnibus: pd.DataFrame
    kept_set_effect: pd.DataFrame
    seed_change_summary: pd.DataFrame  # a multi-seed analysis only
    localisation: pd.DataFrame
    accuracy: pd.DataFrame

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ResultsError(
                f"results folder {self.path} not found; make it with `emolens "
                f"analyze --out {self.path} ...` or `emolens demo`"
            )
        self._tables: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return (
            f"Results({str(self.path)!r}: steps {self.steps_done}, tables {', '.join(self.tables)})"
        )

    # ---------------------------------------------------------------- tables and metadata

    @property
    def tables(self) -> list[str]:
        """Names of the tables present (``NAME.csv`` files), in :data:`TABLES` order first."""
        present = {p.stem for p in self.path.glob("*.csv")}
        return [t for t in TABLES if t in present] + sorted(present - set(TABLES))

    def table(self, name: str) -> pd.DataFrame:
        """``NAME.csv`` as a DataFrame (read once, then cached; a copy is not made)."""
        if name not in self._tables:
            file = self.path / f"{name}.csv"
            if not file.is_file():
                raise ResultsError(
                    f"{file} not found; this folder has the tables {', '.join(self.tables)}"
                    + ("" if name in TABLES else f" ({name!r} is not an emolens table)")
                )
            if name == "sensitivity":
                from emolens.report.page import read_sensitivity

                self._tables[name] = read_sensitivity(file)
            else:
                self._tables[name] = pd.read_csv(file)
        return self._tables[name]

    def _json(self, name: str) -> dict:
        from emolens.store.files import read_json

        file = self.path / name
        if not file.is_file():
            raise ResultsError(
                f"{file} not found: is {self.path} a folder written by `emolens analyze`?"
            )
        return read_json(file)

    @cached_property
    def manifest(self) -> dict:
        """``manifest.json``: versions, model, data, settings, hook names, failures."""
        return self._json("manifest.json")

    @cached_property
    def label_audit(self) -> dict:
        """``label_audit.json``: each label's first token and id."""
        return self._json("label_audit.json")

    @property
    def steps_done(self) -> list[int]:
        """The training steps whose analysis finished (``steps/step-N/done.json``)."""
        return sorted(
            int(p.parent.name.split("-")[1]) for p in self.path.glob("steps/step-*/done.json")
        )

    @cached_property
    def ja(self) -> dict[str, str]:
        """English label name -> Japanese name, as recorded by the analysis."""
        out: dict[str, str] = {}
        for emotion in self.manifest.get("labels", {}).get("emotions", []):
            if emotion.get("en") and emotion.get("ja"):
                out[emotion["en"]] = emotion["ja"]
        return out

    # ---------------------------------------------------------------- tensors per step

    def step_dir(self, step: int) -> Path:
        """The folder of one finished step; an error lists the finished steps."""
        folder = self.path / "steps" / f"step-{int(step):06d}"
        if not (folder / "done.json").is_file():
            raise ResultsError(
                f"step {step} has no finished analysis in {folder}; finished "
                f"steps: {self.steps_done}"
            )
        return folder

    def vectors(self, step: int):
        """The step's :class:`~emolens.measure.vectors.ConceptVectors` (``vectors [layer, emotion,
        d_model]``)."""
        from emolens.measure.vectors import ConceptVectors

        return ConceptVectors.load(self.step_dir(step))

    def activations(self, step: int):
        """The step's :class:`~emolens.measure.activations.Activations` (``resid [sample, layer,
        d_model]``, label logits)."""
        from emolens.measure.activations import Activations

        return Activations.load(self.step_dir(step))

    # ---------------------------------------------------------------- figures

    def _steps_or_none(self) -> pd.DataFrame | None:
        return self.steps if "steps" in self.tables else None

    @_in_report_fonts
    def figure2(
        self,
        layer: int | None = None,
        alpha: float | None = None,
        measure: str = "logit_change",
        **kwargs,
    ):
        """The paper's Figure 2 (see :func:`emolens.report.figures.figure2`; defaults: final layer,
        largest alpha), with the eval loss when ``steps.csv`` has it."""
        from emolens.report import figures

        return figures.figure2(
            self.sensitivity,
            layer,
            alpha,
            measure,
            steps_table=self._steps_or_none(),
            ja=self.ja,
            **kwargs,
        )

    @_in_report_fonts
    def selectivity(self, step: int | None = None, **kwargs):
        """Steered emotion x observed label heatmap at one step (``selectivity_heatmap``)."""
        from emolens.report import figures

        return figures.selectivity_heatmap(self.sensitivity, step, ja=self.ja, **kwargs)

    @_in_report_fonts
    def layer_step(self, emotion: str, **kwargs):
        """Layer x step heatmap of one emotion's sensitivity
        (:func:`figures.layer_step_heatmap`)."""
        from emolens.report import figures

        return figures.layer_step_heatmap(self.sensitivity, emotion, ja=self.ja, **kwargs)

    @_in_report_fonts
    def filtering_figure(self):
        from emolens.report import figures

        return figures.filtering_bars(self.filtering)

    @_in_report_fonts
    def accuracy_figure(self):
        from emolens.report import figures

        return figures.accuracy_curve(self.steps)

    @_in_report_fonts
    def geometry_figure(self, measure: str = "cosine_to_first", inner: str = "plain", **kwargs):
        from emolens.report import figures

        return figures.geometry_figure(self.geometry, measure, inner=inner, ja=self.ja, **kwargs)

    @_in_report_fonts
    def probes_figure(self, layer: int | None = None):
        from emolens.report import figures

        return figures.probes_figure(self.probes, layer)

    @_in_report_fonts
    def attribution_figure(self, alpha: float | None = None):
        from emolens.report import figures

        return figures.attribution_figure(self.attribution, alpha, ja=self.ja)

    @_in_report_fonts
    def transfer_figure(self, emotion: str | None = None):
        from emolens.report import figures

        return figures.transfer_heatmap(self.transfer, emotion, ja=self.ja)

    @_in_report_fonts
    def dla_figure(self, label: str | None = None, value: str = "logit"):
        from emolens.report import figures

        return figures.dla_figure(self.dla, label, value, ja=self.ja)

    @_in_report_fonts
    def heads_figure(self, value: str = "margin"):
        from emolens.report import lens_figures

        return lens_figures.heads_figure(self.heads, value)

    @_in_report_fonts
    def lens_figure(self, value: str = "accuracy"):
        from emolens.report import lens_figures

        return lens_figures.lens_figure(self.logit_lens, value, ja=self.ja)

    @_in_report_fonts
    def random_baseline_figure(self, alpha: float | None = None):
        from emolens.report import figures

        return figures.random_baseline_figure(self.random_baseline, alpha, ja=self.ja)

    @_in_report_fonts
    def change_summary_figure(self):
        from emolens.report import figures

        return figures.change_summary_table(self.change_summary)

    def report(self, out: str | Path | None = None) -> Path:
        """Write (or rewrite) ``report.html``; returns its path."""
        from emolens.report.page import write_report

        return write_report(self.path, out=out)

    # ---------------------------------------------------------------- xarray

    def effects(self, measure: str = "logit_change"):
        """Steering effects as an ``xarray.DataArray`` with dims :data:`EFFECT_DIMS`
        (``step, layer, alpha_unit, positions, steered_emotion, observed_label, alpha,
        prompt_id``); combinations not measured are NaN. Needs the ``xarray`` extra."""
        try:
            import xarray
        except ImportError:
            raise ImportError(
                "Results.effects needs xarray: pip install 'emolens[xarray]'"
            ) from None
        frame = self.sensitivity
        if measure not in frame.columns:
            measures = [c for c in frame.columns if c not in EFFECT_DIMS]
            raise ValueError(f"sensitivity.csv has no measure {measure!r}; it has {measures}")
        series = frame.set_index(list(EFFECT_DIMS))[measure]
        if series.index.has_duplicates:
            raise ValueError(
                "sensitivity.csv has duplicate rows for one setting; rerun "
                f"`emolens report {self.path}` after `emolens analyze` rewrites it"
            )
        array = xarray.DataArray.from_series(series)
        array.name = measure
        array.attrs.update(
            {
                "source": str(self.path / "sensitivity.csv"),
                "numerics": self.manifest.get("numerics", "unknown")
                if (self.path / "manifest.json").is_file()
                else "unknown",
            }
        )
        return array


for _name in TABLES:
    setattr(Results, _name, _table_property(_name))
del _name
