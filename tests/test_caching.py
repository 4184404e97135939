"""Cached results are keyed by everything that produced them: change one input, recompute."""

import shutil

import pytest

import emolens
from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig

CONFIG = AnalysisConfig(
    layers="1,-1",
    steer_layers="-1",
    alphas=(0.0, 2.0),
    n_prompts=2,
    min_count=1,
    batch_size=16,
    filter_mode="none",
    dla_per_label=1,
)


@pytest.fixture(scope="module")
def model_copy(tiny_model_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(tiny_model_dir, target)
    return target


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(4)


def _stamps(out):
    step = out / "steps" / "step-000000"
    return (
        (step / "activations.safetensors").stat().st_mtime_ns,
        (step / "sensitivity.csv").stat().st_mtime_ns,
    )


@pytest.fixture
def first_run(model_copy, corpus, tmp_path):
    out = tmp_path / "out"
    analyze(model_copy, corpus, out, CONFIG, device="cpu")
    return out, _stamps(out)


def _recomputed(out, before):
    after = _stamps(out)
    return after[0] != before[0], after[1] != before[1]


def test_changing_nothing_reuses_everything(first_run, model_copy, corpus):
    out, before = first_run
    analyze(model_copy, corpus, out, CONFIG, device="cpu")
    assert _recomputed(out, before) == (False, False)


@pytest.mark.parametrize("change", ["data", "template", "labels", "layers", "version"])
def test_changing_an_input_of_the_activations_recomputes_them(
    change, first_run, model_copy, corpus, monkeypatch
):
    out, before = first_run
    kwargs, config, data = {}, CONFIG, corpus
    if change == "data":
        data = load_corpus(None).head_per_label(5)
    elif change == "template":
        config = AnalysisConfig(**{**CONFIG.to_dict(), "language": "en"})
    elif change == "labels":
        kwargs["labels"] = STUDY_LABELS.subset([e.en for e in STUDY_LABELS][:-2])
        data = corpus.restrict(kwargs["labels"])
    elif change == "layers":
        config = AnalysisConfig(**{**CONFIG.to_dict(), "layers": "0,1,-1"})
    elif change == "version":
        monkeypatch.setattr(emolens, "__version__", emolens.__version__ + ".post1")
    analyze(model_copy, data, out, config, device="cpu", overwrite=True, **kwargs)
    assert _recomputed(out, before) == (True, True)


def test_changed_weights_recompute(first_run, model_copy, corpus):
    from safetensors.torch import load_file, save_file

    out, before = first_run
    path = next(model_copy.glob("*.safetensors"))
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith("lm_head.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    analyze(model_copy, corpus, out, CONFIG, device="cpu")
    assert _recomputed(out, before) == (True, True)


@pytest.mark.parametrize(
    "setting", [("alphas", (0.0, 3.0)), ("n_prompts", 1), ("alpha_unit", "norm"), ("min_count", 2)]
)
def test_changing_an_analysis_setting_reuses_activations_and_recomputes_the_step(
    setting, first_run, model_copy, corpus
):
    out, before = first_run
    config = AnalysisConfig(**{**CONFIG.to_dict(), setting[0]: setting[1]})
    analyze(model_copy, corpus, out, config, device="cpu", overwrite=True)
    assert _recomputed(out, before) == (False, True)


def test_changing_a_cross_step_setting_reuses_every_step(first_run, model_copy, corpus):
    out, before = first_run
    config = AnalysisConfig(**{**CONFIG.to_dict(), "n_boot": 50, "seed": 3})
    analyze(model_copy, corpus, out, config, device="cpu", overwrite=True)
    assert _recomputed(out, before) == (False, False)
