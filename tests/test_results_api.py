"""emolens.Results: a results folder as DataFrames, a manifest, tensors per step and figures,
each the same as reading the files directly; and the example notebook runs."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import emolens
from emolens.api import EFFECT_DIMS, TABLES, Results, ResultsError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def results_dir(fake_run_dir, tmp_path_factory) -> Path:
    from emolens.data.corpus import load_corpus
    from emolens.run.analyze import analyze
    from emolens.run.config import AnalysisConfig

    config = AnalysisConfig(
        layers="all",
        steer_layers="1,-1",
        alphas=(0.0, 4.0),
        n_prompts=3,
        filter_mode="none",
        min_count=1,
        batch_size=32,
        n_boot=20,
        dla_per_label=2,
    )
    return analyze(
        fake_run_dir, load_corpus(None), tmp_path_factory.mktemp("res") / "r", config, device="cpu"
    )


def test_tables_are_the_csv_files(results_dir):
    r = emolens.Results(results_dir)
    assert {"sensitivity", "filtering", "steps", "geometry", "probes"} <= set(r.tables)
    for name in r.tables:
        if name in TABLES:
            pd.testing.assert_frame_equal(
                getattr(r, name), pd.read_csv(results_dir / f"{name}.csv")
            )
    assert r.manifest == json.loads((results_dir / "manifest.json").read_text(encoding="utf-8"))
    assert r.steps_done == [0, 2, 4]
    assert r.ja["joy"] == "喜び"


def test_missing_files_are_errors_naming_the_file(results_dir, tmp_path):
    r = Results(results_dir)
    with pytest.raises(ResultsError, match=r"localisation\.csv not found.*sensitivity"):
        _ = r.localisation
    with pytest.raises(ResultsError, match="step 6 has no finished analysis.*0, 2, 4"):
        r.vectors(6)
    with pytest.raises(ResultsError, match="not found"):
        Results(tmp_path / "nowhere")
    with pytest.raises(ResultsError, match="manifest.json not found"):
        _ = Results(tmp_path).manifest


def test_tensors_per_step_are_the_saved_artifacts(results_dir):
    from emolens.measure.activations import Activations
    from emolens.measure.vectors import ConceptVectors

    r = Results(results_dir)
    folder = results_dir / "steps" / "step-000002"
    assert torch.equal(r.vectors(2).vectors, ConceptVectors.load(folder).vectors)
    assert torch.equal(r.activations(2).resid, Activations.load(folder).resid)
    assert not torch.equal(r.vectors(2).vectors, r.vectors(4).vectors)


def test_figures_are_the_plots_functions_on_the_tables(results_dir):
    from emolens.report import figures
    from emolens.report.figures._style import FONT_STACK, with_fonts

    r = Results(results_dir)
    fig = r.figure2()
    expected = with_fonts(figures.figure2(r.sensitivity, steps_table=r.steps, ja=r.ja))
    assert isinstance(fig, go.Figure) and fig.to_json() == expected.to_json()
    assert r.figure2(layer=1).to_json() != fig.to_json()
    for make in (
        r.selectivity,
        r.filtering_figure,
        r.accuracy_figure,
        r.geometry_figure,
        r.probes_figure,
        r.attribution_figure,
        r.transfer_figure,
        r.dla_figure,
        r.random_baseline_figure,
        r.change_summary_figure,
        lambda: r.layer_step("joy"),
    ):
        made = make()  # in the report's fonts: Japanese label names render in a notebook too
        assert isinstance(made, go.Figure) and made.layout.font.family == FONT_STACK


@pytest.mark.skipif(
    importlib.util.find_spec("xarray") is None,
    reason="xarray not installed: pip install 'emolens[xarray]'",
)
def test_effects_array_holds_every_row_of_the_sensitivity_table(results_dir):
    r = Results(results_dir)
    effects = r.effects("logprob_change")
    assert effects.dims == EFFECT_DIMS and effects.name == "logprob_change"
    frame = r.sensitivity
    assert int(effects.notnull().sum()) == len(frame)
    for _, row in frame.sample(25, random_state=0).iterrows():
        value = effects.sel({d: row[d] for d in EFFECT_DIMS}).item()
        assert value == pytest.approx(row["logprob_change"], abs=1e-12)
    with pytest.raises(ValueError, match="no measure 'nope'"):
        r.effects("nope")


def test_effects_without_xarray_is_an_error_naming_the_extra(results_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(ImportError, match=r"emolens\[xarray\]"):
        Results(results_dir).effects()


def test_top_level_names_are_the_library_functions():
    from emolens.model.loading import load_model
    from emolens.run.analyze import analyze
    from emolens.run.finetune import finetune

    assert emolens.analyze is analyze and emolens.load_model is load_model
    # emolens.finetune is the function (its module is emolens.run.finetune, so the names no
    # longer collide and no callable-module trick is needed)
    assert emolens.finetune is finetune
    assert emolens.run.finetune.PRESETS["tiny"].max_steps == 4
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = emolens.nope


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("nbclient", "nbformat", "ipykernel")),
    reason="nbclient, nbformat and ipykernel not installed (the test extra)",
)
def test_example_notebook_runs_the_whole_study_on_the_tiny_model(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / "study.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # the study up to Figure 2 is "a dozen lines"
    assert sum(len(c.source.splitlines()) for c in code[:4]) <= 12
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "emolens-study" / "results" / "report.html").is_file()
    assert (tmp_path / "emolens-study" / "joy.gguf").is_file()
    figure = [o for o in code[3].outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figure, "Figure 2 is shown as a plotly figure"
    steps = Results(tmp_path / "emolens-study" / "results").steps_done
    assert steps == [0, 2, 4]
    assert np.isfinite(
        Results(tmp_path / "emolens-study" / "results").sensitivity["logit_change"]
    ).all()


def test_every_table_property_is_declared_for_type_checkers():
    declared = {n for n, t in Results.__annotations__.items() if t is pd.DataFrame}
    assert declared == set(TABLES)
    assert all(isinstance(getattr(Results, n), property) for n in TABLES)
