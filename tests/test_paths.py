"""Every option path of ``analyze`` gives the right numbers (issue 10, numerics half).

A pairwise covering design over dtype {float32, bfloat16} x chat {off, on} x language {ja, en}
x alpha unit {absolute, norm} x positions {all, answer} x layers {all, a subset without -1} on a
tiny Llama with random (non-unit) norm gains and a chat template, plus a tiny GPT-2 (LayerNorm).
For each run: every promised table exists and is non-empty, the explanation tables' totals
equal ``sensitivity.csv``'s changes within a float32-readout tolerance, the fast path (and the
batched / key-value-cached mid-layer paths) equal one hooked forward pass per configuration
within the model dtype's rounding, and the manifest records the options. Then one test per
defect: bf16 readout, norm-unit explanations, final-layer tables without -1, readout failures.
"""

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS, TEMPLATES, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure.activations import Activations, answer_readout, collect_activations
from emolens.measure.attribution import ReadoutCheckFailed
from emolens.measure.steering import final_layer_sensitivity, naive_sensitivity
from emolens.measure.vectors import ConceptVectors
from emolens.model.loading import load_model
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig
from emolens.testing.tiny import tiny_random_gpt2, tiny_random_model

N_LAYERS = 4  # the tiny Llama
D_MODEL = 64
ALPHAS = (0.0, 1.0, 3.0)
EPS32 = torch.finfo(torch.float32).eps

# factors: dtype, chat, language, alpha unit, positions, layers (0 = first level, 1 = second)
LEVELS = (
    ("float32", "bfloat16"),
    (False, True),
    ("ja", "en"),
    ("absolute", "norm"),
    ("all", "answer"),
    ("all", "0,1"),
)
DESIGN = ("000000", "111111", "010001", "001000", "100010", "101101", "011110", "110111")


def case_of(row: str) -> dict:
    dtype, chat, language, unit, positions, layers = (lv[int(c)] for lv, c in zip(LEVELS, row))
    return {
        "dtype": dtype,
        "chat": chat,
        "language": language,
        "alpha_unit": unit,
        "positions": positions,
        "layers": layers,
    }


def case_id(row: str) -> str:
    c = case_of(row)
    return "-".join(
        [
            c["dtype"][:4],
            "chat" if c["chat"] else "plain",
            c["language"],
            c["alpha_unit"][:4],
            c["positions"],
            "L" + c["layers"].replace(",", ""),
        ]
    )


def config_of(case: dict, **over) -> AnalysisConfig:
    values = dict(
        layers=case["layers"],
        steer_layers="1,-1",
        alphas=ALPHAS,
        alpha_unit=case["alpha_unit"],
        positions=case["positions"],
        n_prompts=3,
        min_count=1,
        batch_size=16,
        filter_mode="none",
        language=case["language"],
        chat=case["chat"],
        dla_per_label=2,
        n_boot=20,
    )
    values.update(over)
    return AnalysisConfig(**values)


def readout_tol(scale: float) -> float:
    """Two float32 readouts (emolens' float32 modules, the float64 Readout) of one thing."""
    return 16 * EPS32 * D_MODEL**0.5 * max(1.0, scale)


def forward_tol(dtype: str, scale: float) -> float:
    """A hooked forward pass in ``dtype`` (its logits rounded to it) against a float32
    readout of the same residuals: a few units of the dtype's rounding at the logits' size."""
    return 8 * torch.finfo(getattr(torch, dtype)).eps * max(1.0, scale)


@pytest.fixture(scope="module")
def gains_model_dir(tmp_path_factory) -> Path:
    return tiny_random_model(
        tmp_path_factory.mktemp("tiny-gains") / "model", random_norms=True, chat_template=True
    )


@pytest.fixture(scope="module")
def corpora():
    return {lang: load_corpus(None, lang).head_per_label(5) for lang in ("ja", "en")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gains_model_dir, corpora):
    """``analyze`` outputs by design row, computed once on first use."""
    done: dict[str, Path] = {}

    def get(row: str) -> Path:
        if row not in done:
            case = case_of(row)
            out = tmp_path_factory.mktemp(f"run-{row}")
            analyze(
                gains_model_dir,
                corpora[case["language"]],
                out,
                config_of(case),
                device="cpu",
                dtype=case["dtype"],
            )
            done[row] = out
        return done[row]

    return get


def prompt_tokens(model, corpus, manifest: dict, case: dict) -> list[list[int]]:
    ids = manifest["steered_prompts"]
    texts = [next(s.text for s in corpus.samples if s.id == i) for i in ids]
    return encode(
        model.tokenizer,
        render_prompts(
            texts, TEMPLATES[case["language"]], STUDY_LABELS, model.tokenizer, case["chat"]
        ),
    )


def steered(vectors: torch.Tensor, unit: str, resid: torch.Tensor) -> torch.Tensor:
    """The obvious rescaling, written out again (not emolens' helper)."""
    if unit == "absolute":
        return vectors
    return vectors / vectors.norm(dim=-1, keepdim=True) * resid.norm(dim=-1).mean()


def diagonal_mean(sens: pd.DataFrame, layer: int) -> pd.Series:
    diag = sens[(sens.layer == layer) & (sens.steered_emotion == sens.observed_label)]
    return diag.groupby(["step", "steered_emotion", "alpha"]).logit_change.mean()


PROMISED = (
    "sensitivity",
    "filtering",
    "steps",
    "dla",
    "attribution",
    "transfer",
    "random_baseline",
    "geometry",
    "probes",
    "change_summary",
)


def check_run(out: Path, model_dir: Path, corpus, case: dict, n_layers: int) -> None:
    """Everything a run with these options promises, checked against the slow computation."""
    last = n_layers - 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["failures"] == []
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in PROMISED}
    one_step = len(manifest["steps_done"]) == 1
    for name, frame in tables.items():
        if name == "change_summary" and one_step:
            # change tests compare later steps with the first: a one-step series has none,
            # and the table is its header alone
            assert len(frame) == 0 and {"p", "q", "effect"} <= set(frame.columns)
            continue
        assert len(frame) > 0, f"{name}.csv is empty"

    # the manifest and the tables record the options
    s = manifest["settings"]
    assert (s["alpha_unit"], s["positions"], s["language"], s["chat"], s["layers"]) == (
        case["alpha_unit"],
        case["positions"],
        case["language"],
        case["chat"],
        case["layers"],
    )
    assert manifest["load"]["dtype"] == case["dtype"]
    assert manifest["template"] == TEMPLATES[case["language"]].to_dict()
    assert manifest["final_layer_tables"]["final_layer"] == last
    assert last in manifest["final_layer_tables"]["collected_layers"]
    sens = tables["sensitivity"]
    assert set(sens.alpha_unit) == {case["alpha_unit"]}
    assert set(sens.positions) == {case["positions"]}
    assert sorted(sens.layer.unique()) == [1, last]
    for name in ("attribution", "transfer", "random_baseline"):
        assert set(tables[name].layer) == {last}, name
        assert set(tables[name].alpha_unit) == {case["alpha_unit"]}, name
    assert tables["dla"].component.str.startswith(("embed", "attn", "mlp")).all()

    # explanation totals equal sensitivity.csv's final-layer changes
    folder = out / "steps" / "step-000000"
    acts = Activations.load(folder)
    scale = float(acts.label_logits.abs().max()) + float(sens.logit_change.abs().max())
    want = diagonal_mean(sens, last)
    att = tables["attribution"].set_index(["step", "emotion", "alpha"]).logit_change
    assert len(att) == len(want)
    assert (att.values - want.loc[att.index].values).__abs__().max() <= readout_tol(scale)
    att_parts = tables["attribution"].direct + tables["attribution"].scale_change
    assert (att_parts - tables["attribution"].logit_change).abs().max() <= readout_tol(scale)
    rb = tables["random_baseline"].set_index(["step", "emotion", "alpha"]).logit_change_concept
    assert (rb.values - want.loc[rb.index].values).__abs__().max() <= readout_tol(scale)
    tr = tables["transfer"]
    tr = tr[tr.step == tr.vector_step].set_index(["step", "emotion", "alpha"]).logit_change
    assert (tr.values - want.loc[tr.index].values).__abs__().max() <= readout_tol(scale)

    # the fast path (final layer) and the mid-layer path equal one hooked forward each
    model = load_model(model_dir, device="cpu", dtype=case["dtype"])
    tokens = prompt_tokens(model, corpus, manifest, case)
    label_ids = [
        e["first_token_id"]
        for e in json.loads((folder / "label_audit.json").read_text())["entries"]
    ]
    vectors = ConceptVectors.load(folder)
    emotions = list(vectors.emotions[:2])
    for layer in (1, last):
        v = steered(vectors.layer(layer)[:2], case["alpha_unit"], acts.layer(layer))
        naive = naive_sensitivity(
            model,
            tokens,
            layer,
            v,
            torch.tensor(ALPHAS),
            label_ids,
            positions=case["positions"],
            emotions=emotions,
            labels=STUDY_LABELS.names("en"),
            prompt_ids=manifest["steered_prompts"],
        ).to_frame(step=0)
        got = sens[(sens.layer == layer) & sens.steered_emotion.isin(emotions)]
        merged = naive.merge(
            got,
            left_on=["step", "layer", "emotion", "label", "alpha", "prompt"],
            right_on=["step", "layer", "steered_emotion", "observed_label", "alpha", "prompt_id"],
            suffixes=("_naive", ""),
        )
        assert len(merged) == len(naive) == len(got)
        gap = (merged.logit_change - merged.logit_change_naive).abs().max()
        assert gap <= forward_tol(case["dtype"], scale), (layer, gap)


def test_the_design_covers_every_pair_of_option_levels():
    pairs = {
        (i, j, a, b)
        for i, j in itertools.combinations(range(len(LEVELS)), 2)
        for a in "01"
        for b in "01"
    }
    covered = {
        (i, j, r[i], r[j]) for r in DESIGN for i, j in itertools.combinations(range(len(LEVELS)), 2)
    }
    assert covered == pairs and len(set(DESIGN)) == len(DESIGN) == 8


@pytest.mark.parametrize("row", DESIGN, ids=[case_id(r) for r in DESIGN])
def test_every_option_path_gives_the_promised_tables_and_consistent_numbers(
    row, runs, gains_model_dir, corpora
):
    case = case_of(row)
    check_run(runs(row), gains_model_dir, corpora[case["language"]], case, N_LAYERS)


def test_layernorm_model_goes_through_every_table(tmp_path_factory, corpora):
    """A tiny GPT-2 (LayerNorm with random gains and biases, tied embeddings)."""
    model_dir = tiny_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2") / "model")
    case = case_of("000100")  # float32, plain, ja, norm units, all positions, all layers
    out = tmp_path_factory.mktemp("run-gpt2")
    analyze(model_dir, corpora["ja"], out, config_of(case), device="cpu", dtype="float32")
    check_run(out, model_dir, corpora["ja"], case, n_layers=3)


# --------------------------------------------------------------------------- defect 1: bf16


def test_bf16_analysis_keeps_geometry_probes_and_explanations(runs):
    """Before the fix the readout check failed in bf16 and every cross-step table was lost."""
    out = runs("100010")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["load"]["dtype"] == "bfloat16" and manifest["failures"] == []
    assert (out / "steps" / "step-000000" / "readout.safetensors").exists()
    for name in (
        "geometry",
        "probes",
        "attribution",
        "transfer",
        "random_baseline",
    ):
        assert len(pd.read_csv(out / f"{name}.csv")) > 0, name
    # one step: change tests have no later step to compare, so the table is its header
    assert "q" in pd.read_csv(out / "change_summary.csv").columns


def test_bf16_sensitivity_is_a_float32_readout_of_the_bf16_residuals(runs, gains_model_dir):
    """Final-layer sensitivity of a bf16 model equals HF's own final norm and unembedding in
    float32 (weights exactly the bf16 ones) applied to ``h + alpha v``, not that rounded to
    bf16 logits (spacing 2^-7 relative)."""
    from transformers import AutoModelForCausalLM

    out = runs("100010")
    folder = out / "steps" / "step-000000"
    acts, vectors = Activations.load(folder), ConceptVectors.load(folder)
    manifest = json.loads((out / "manifest.json").read_text())
    prompts = [acts.sample_ids.index(p) for p in manifest["steered_prompts"]]
    last = N_LAYERS - 1
    h = acts.layer(last)[prompts]
    assert torch.equal(h, h.bfloat16().float())  # residuals of a bf16 model
    hf = AutoModelForCausalLM.from_pretrained(gains_model_dir, dtype=torch.bfloat16).float()
    label_ids = torch.tensor(
        [
            e["first_token_id"]
            for e in json.loads((folder / "label_audit.json").read_text())["entries"]
        ]
    )
    v = vectors.layer(last)
    sens = pd.read_csv(out / "sensitivity.csv")
    sens = sens[sens.layer == last]
    worst_bf16 = 0.0
    with torch.no_grad():
        base = hf.lm_head(hf.model.norm(h))[:, label_ids]
        for i, emotion in enumerate(vectors.emotions):
            for alpha in ALPHAS[1:]:
                x = h + alpha * v[i]
                ref = hf.lm_head(hf.model.norm(x))[:, label_ids] - base  # [prompt, label]
                rounded = (
                    hf.lm_head(hf.model.norm(x.bfloat16().float()))[:, label_ids].bfloat16().float()
                    - base.bfloat16().float()
                )
                got = sens[(sens.steered_emotion == emotion) & (sens.alpha == alpha)]
                got = torch.tensor(
                    got.pivot(index="prompt_id", columns="observed_label", values="logit_change")
                    .loc[manifest["steered_prompts"], list(STUDY_LABELS.names("en"))]
                    .values
                ).float()
                scale = float(ref.abs().max() + base.abs().max())
                assert (got - ref).abs().max() <= readout_tol(scale), (emotion, alpha)
                worst_bf16 = max(worst_bf16, float((rounded - ref).abs().max()))
    assert worst_bf16 > 100 * readout_tol(1.0)  # bf16 logits would have failed this test


def test_answer_readout_does_not_round_to_the_model_dtype(gains_model_dir):
    model = load_model(gains_model_dir, device="cpu", dtype="bfloat16")
    torch.manual_seed(0)
    h = (torch.randn(4, D_MODEL) * 3).bfloat16().float()
    step = h * 1e-3 * torch.randn(D_MODEL).sign()  # below bf16 resolution (2^-8 relative)
    assert torch.equal((h + step).bfloat16().float(), h)
    ids = list(range(20))
    moved = answer_readout(model, h + step, ids)[0] - answer_readout(model, h, ids)[0]
    assert moved.abs().max() > 0
    assert next(model.bridge.unembed.parameters()).dtype == torch.bfloat16  # left as it was


def test_readout_check_failure_is_a_recorded_failure_and_geometry_survives(
    tmp_path, gains_model_dir, corpora, monkeypatch
):
    from emolens.measure import attribution

    def fail(cls, model, token_ids, check_factor=attribution.CHECK_FACTOR):
        raise ReadoutCheckFailed("planted: the readout differs by 1.0")

    monkeypatch.setattr(attribution.Readout, "from_model", classmethod(fail))
    case = case_of("000000")
    cfg = config_of(case)
    for _ in range(2):  # a resumed run reports it again
        analyze(gains_model_dir, corpora["ja"], tmp_path, cfg, device="cpu")
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert [(f["step"], f["stage"]) for f in manifest["failures"]] == [(0, "readout")]
        assert "planted" in manifest["failures"][0]["error"]
        for name in ("geometry", "probes", "sensitivity"):
            assert len(pd.read_csv(tmp_path / f"{name}.csv")) > 0, name
        assert "q" in pd.read_csv(tmp_path / "change_summary.csv").columns  # one step: header
        for name in ("attribution", "transfer", "random_baseline"):
            assert not (tmp_path / f"{name}.csv").exists(), name


# --------------------------------------------------------------------------- defect 4: units


def test_norm_unit_explanations_equal_sensitivity_not_raw_vectors(runs):
    """Under --alpha-unit norm, attribution steers the rescaled vectors of sensitivity.csv
    (before the fix: the raw vectors, a gap of the size of the effect)."""
    out = runs("011110")  # float32, chat, en, norm units, answer positions, all layers
    assert json.loads((out / "manifest.json").read_text())["settings"]["alpha_unit"] == "norm"
    sens = pd.read_csv(out / "sensitivity.csv")
    att = pd.read_csv(out / "attribution.csv").set_index(["step", "emotion", "alpha"])
    want = diagonal_mean(sens, N_LAYERS - 1).loc[att.index]
    assert (att.logit_change - want.values).abs().max() <= readout_tol(float(want.abs().max()))
    assert want.abs().max() > 0.1
    folder = out / "steps" / "step-000000"
    acts = Activations.load(folder)
    norms = ConceptVectors.load(folder).layer(N_LAYERS - 1).norm(dim=-1)
    mean_norm = float(acts.layer(N_LAYERS - 1).norm(dim=-1).mean())
    assert att.steered_norm.to_numpy() == pytest.approx(mean_norm, rel=1e-4)
    assert sorted(set(att.vector_norm.round(4))) == sorted(set(norms.numpy().round(4)))


# --------------------------------------------------------------------------- defect 5: layers


def test_final_layer_tables_read_the_final_layer_when_it_is_not_requested(
    tmp_path, gains_model_dir, corpora
):
    """--layers 1 --steer-layers 1: before the fix the "final-layer" tables read layer 1."""
    corpus = corpora["ja"]
    cfg = config_of(case_of("000000"), layers="1", steer_layers="1")
    analyze(gains_model_dir, corpus, tmp_path, cfg, device="cpu")
    last = N_LAYERS - 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["final_layer_tables"]["final_layer"] == last
    assert manifest["final_layer_tables"]["collected_layers"] == [1, last]
    assert sorted(pd.read_csv(tmp_path / "sensitivity.csv").layer.unique()) == [1]
    att = pd.read_csv(tmp_path / "attribution.csv")
    assert set(att.layer) == {last}
    assert set(pd.read_csv(tmp_path / "random_baseline.csv").layer) == {last}
    assert set(pd.read_csv(tmp_path / "transfer.csv").layer) == {last}
    # the values are those of the final block, computed afresh with the model
    model = load_model(gains_model_dir, device="cpu")
    folder = tmp_path / "steps" / "step-000000"
    vectors = ConceptVectors.load(folder)
    tokens = prompt_tokens(model, corpus, manifest, case_of("000000"))
    label_ids = resolve_label_tokens(model.tokenizer).ids
    h = collect_activations(model, tokens, label_ids, [last], progress=False).layer(last)
    effect = final_layer_sensitivity(
        model,
        h,
        vectors.layer(last),
        torch.tensor(ALPHAS),
        label_ids,
        emotions=vectors.emotions,
        labels=STUDY_LABELS.names("en"),
    )
    want = effect.diagonal().mean(-1)  # [emotion, alpha]
    got = torch.tensor(
        att.pivot(index="emotion", columns="alpha", values="logit_change")
        .loc[list(vectors.emotions), list(ALPHAS)]
        .values
    ).float()
    assert (got - want).abs().max() <= readout_tol(float(want.abs().max()) + 10)
