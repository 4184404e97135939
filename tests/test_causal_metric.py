"""Park et al.'s causal inner product where it is defined (issue 13 item 5): at the final layer
by default (``--causal-layers final``), each step's own metric or the first step's at every step
(``--causal-metric own|base``), in the dual form; at the final-norm read point the metric is the
unembedding's alone (the norm's gain already acts on h)."""

import pandas as pd
import pytest
import torch

from emolens.analysis.geometry import CausalInnerProduct
from emolens.analysis.steps import load_steps
from emolens.data.corpus import load_corpus
from emolens.model.loading import load_model
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig

CONFIG = AnalysisConfig(
    layers="1,-1",
    steer_layers="-1",
    alphas=(0.0, 4.0),
    n_prompts=2,
    min_count=1,
    batch_size=16,
    filter_mode="none",  # every sample builds every step's vectors: a direct check is exact
    n_boot=5,
    n_perm=9,
    dla_per_label=0,
)
FINAL = 3  # the tiny model has 4 layers


def _with(**settings) -> AnalysisConfig:
    return AnalysisConfig(**{**CONFIG.to_dict(), **settings})


@pytest.fixture(scope="module")
def series(tmp_path_factory, fake_run_dir):
    """One results folder over the fake run (steps 0, 2, 4; the later ones with final-norm
    gains away from 1), re-merged with each causal setting (offline settings: the step files
    are kept, only the cross-step tables are rebuilt)."""
    corpus = load_corpus(None).head_per_label(3)
    out = tmp_path_factory.mktemp("causal") / "out"
    tables = {}
    for name, settings in {
        "default": {},
        "all-own": {"causal_layers": "all"},
        "all-base": {"causal_layers": "all", "causal_metric": "base"},
    }.items():
        analyze(fake_run_dir, corpus, out, _with(**settings), device="cpu", overwrite=bool(tables))
        tables[name] = pd.read_csv(out / "geometry.csv")
    return out, tables


def _vectors_and_metrics(out):
    steps = load_steps(sorted((out / "steps").glob("step-*")))
    return {s.step: s for s in steps}


def test_causal_geometry_is_at_the_final_layer_by_default(series):
    _, tables = series
    causal = tables["default"][tables["default"].inner == "causal"]
    assert set(causal.layer) == {FINAL}
    assert set(tables["default"][tables["default"].inner == "plain"].layer) == {1, FINAL}
    assert set(tables["all-own"][tables["all-own"].inner == "causal"].layer) == {1, FINAL}


@pytest.mark.parametrize("which", ["all-own", "all-base"])
def test_cosine_to_first_uses_each_steps_own_metric_or_the_first_steps(series, which):
    """``cosine_to_first`` at step t equals cos(W_t v_t, W_0 v_0) (own) or cos(W_0 v_t,
    W_0 v_0) (base), computed directly from the saved vectors and metrics."""
    out, tables = series
    steps = _vectors_and_metrics(out)
    frame = tables[which]
    rows = frame[(frame.inner == "causal") & (frame.measure == "cosine_to_first")]
    first = steps[0]
    assert first.metric is not None and first.metric.dual
    checked = 0
    for step in (2, 4):
        s = steps[step]
        metric = s.metric if which == "all-own" else first.metric
        for layer in (1, FINAL):
            v0, vt = first.vectors.layer(layer).double(), s.vectors.layer(layer).double()
            direct = torch.nn.functional.cosine_similarity(
                metric.whiten(vt), first.metric.whiten(v0), dim=-1
            )
            for j, emotion in enumerate(s.vectors.emotions):
                got = rows[(rows.step == step) & (rows.layer == layer) & (rows.emotion == emotion)]
                if got.empty or not torch.isfinite(direct[j]):
                    continue
                assert float(got.value.iloc[0]) == pytest.approx(float(direct[j]), abs=1e-5)
                checked += 1
    assert checked >= 20


def test_the_two_metrics_differ_where_the_readout_moved(series):
    """The later steps' own metrics are not the first step's (their gains moved), so the base
    option changes the later steps' causal cosines and not the first step's."""
    out, tables = series
    steps = _vectors_and_metrics(out)
    assert not torch.allclose(steps[4].metric.whitener, steps[0].metric.whitener)
    keys = ["step", "layer", "measure", "emotion"]
    own, base = (
        tables[k][tables[k].inner == "causal"].set_index(keys).value.sort_index()
        for k in ("all-own", "all-base")
    )
    diff = (own - base).abs()
    assert diff.xs(0, level="step").max() < 1e-9
    assert diff.xs(4, level="step").max() > 1e-6


@pytest.mark.parametrize("read_point", ["block-out", "final-norm"])
def test_the_metric_is_that_of_what_reads_h(tmp_path, fake_run_dir, read_point):
    """At block-out the residual is read through the final norm's gain: metric of W_U * gain;
    at final-norm h is the norm's output: metric of W_U alone. Dual form either way."""
    corpus = load_corpus(None).head_per_label(3)
    out = tmp_path / "out"
    analyze(fake_run_dir, corpus, out, _with(read_point=read_point), device="cpu")
    saved = {s.step: s.metric for s in load_steps(sorted((out / "steps").glob("step-*")))}
    model = load_model(fake_run_dir / "checkpoint-4", device="cpu")
    w_u = model.hf_model.get_output_embeddings().weight.detach().float()
    gain = model.hf_model.model.norm.weight.detach().float()
    assert (gain - 1).abs().max() > 1e-3  # the test can tell the two apart
    rows = w_u * gain if read_point == "block-out" else w_u
    expected = CausalInnerProduct.from_unembedding(rows, dual=True)
    torch.testing.assert_close(saved[4].whitener, expected.whitener, rtol=1e-5, atol=1e-6)


def test_causal_options_are_checked():
    with pytest.raises(ValueError, match="--causal-layers 'middle' unknown"):
        _with(causal_layers="middle")
    with pytest.raises(ValueError, match="--causal-metric 'last' unknown"):
        _with(causal_metric="last")
