import json

import pandas as pd
import pytest

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig
from emolens.run.prompt import choose_prompts

CONFIG = AnalysisConfig(
    layers="1,-1",
    steer_layers="1,-1",
    alphas=(0.0, 2.0, 4.0),
    n_prompts=3,
    min_count=1,
    batch_size=16,
    filter_mode="none",
)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(6)


@pytest.fixture(scope="module")
def series_out(tmp_path_factory, fake_run_dir, corpus):
    out = tmp_path_factory.mktemp("analysis")
    analyze(fake_run_dir, corpus, out, CONFIG, device="cpu")
    return out


def test_analysis_writes_long_tables_for_every_step(series_out):
    sens = pd.read_csv(series_out / "sensitivity.csv")
    assert sorted(sens.step.unique()) == [0, 2, 4]
    assert sorted(sens.layer.unique()) == [1, 3]
    n_emotions, n_labels = 12, 13
    assert len(sens) == 3 * 2 * n_emotions * 3 * 3 * n_labels
    assert set(sens.columns) >= {
        "step",
        "layer",
        "steered_emotion",
        "observed_label",
        "alpha",
        "prompt_id",
        "logit_change",
        "logprob_change",
        "centered_change",
    }
    assert (sens[sens.alpha == 0][["logit_change", "logprob_change"]].abs() < 1e-4).all().all()
    filtering = pd.read_csv(series_out / "filtering.csv")
    assert len(filtering) == 3 * 13
    steps = pd.read_csv(series_out / "steps.csv")
    assert steps.step.tolist() == [0, 2, 4]
    assert steps.eval_loss.isna().tolist() == [True, False, False]
    manifest = json.loads((series_out / "manifest.json").read_text())
    assert manifest["numerics"] == "raw-hf"
    assert manifest["failures"] == [] and manifest["series_problems"]
    # provenance: the git commit of this checkout and the accelerator (none here: cpu)
    assert (
        manifest["provenance"]["git"]["commit"] and "gpus" in manifest["provenance"]["accelerator"]
    )
    assert manifest["data"]["sha256"]
    assert len(manifest["steered_prompts"]) == 3


def test_rerun_skips_finished_steps(series_out, fake_run_dir, corpus):
    before = {p: p.stat().st_mtime_ns for p in series_out.glob("steps/*/sensitivity.csv")}
    analyze(fake_run_dir, corpus, series_out, CONFIG, device="cpu")
    after = {p: p.stat().st_mtime_ns for p in series_out.glob("steps/*/sensitivity.csv")}
    assert before == after


def test_changed_settings_recompute(series_out, fake_run_dir, corpus, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(series_out, out)
    analyze(
        fake_run_dir,
        corpus,
        out,
        AnalysisConfig(**{**CONFIG.to_dict(), "alphas": (0.0, 1.0)}),
        device="cpu",
        overwrite=True,
    )
    sens = pd.read_csv(out / "sensitivity.csv")
    assert sorted(sens.alpha.unique()) == [0.0, 1.0]


def test_final_layer_fast_path_matches_hooked_steering_in_the_pipeline(series_out):
    """Layer 3 (final) uses the fast path, layer 1 the hooked batched pass; both give zero
    effect at alpha 0 and grow with alpha on the diagonal."""
    sens = pd.read_csv(series_out / "sensitivity.csv")
    diag = sens[sens.steered_emotion == sens.observed_label]
    grow = diag.groupby(["layer", "alpha"]).logit_change.mean().unstack()
    assert (grow[4.0] != grow[0.0]).all()


def test_prompts_are_neutral_and_fixed_by_seed(corpus):
    a = choose_prompts(corpus, STUDY_LABELS, 3, 0)
    assert a == choose_prompts(corpus, STUDY_LABELS, 3, 0)
    assert all(corpus.samples[i].label == "no-emotion" for i in a)
    with pytest.raises(ValueError, match="fewer than"):
        choose_prompts(corpus, STUDY_LABELS, 100, 0)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="alpha grid"):
        AnalysisConfig(alphas=(float("nan"),))
    with pytest.raises(ValueError, match="filter mode"):
        AnalysisConfig(filter_mode="some")


def test_explanation_tables_are_written_for_the_series(series_out):
    attribution = pd.read_csv(series_out / "attribution.csv")
    assert sorted(attribution.step.unique()) == [0, 2, 4]
    assert (
        (attribution.direct + attribution.scale_change - attribution.logit_change).abs() < 1e-4
    ).all()
    sens = pd.read_csv(series_out / "sensitivity.csv")
    diag = sens[(sens.steered_emotion == sens.observed_label) & (sens.layer == 3)]
    measured = diag.groupby(["step", "steered_emotion", "alpha"]).logit_change.mean()
    merged = attribution.set_index(["step", "emotion", "alpha"]).logit_change
    assert ((merged - measured.reindex(merged.index)).abs() < 1e-4).all()
    first = attribution[attribution.step == 0]
    assert (first.push_change.abs() < 1e-5).all()
    logs = attribution[["log_w_change", "log_v_change", "log_cos_change", "log_scale_change"]]
    split = logs.log_w_change + logs.log_v_change + logs.log_cos_change - logs.log_scale_change
    defined = attribution.log_push_change.notna()
    assert defined.any() and (split.notna() == defined).all()
    # exact in float64 (test_attribution); here within the CSV's 7 significant digits
    assert ((split - attribution.log_push_change)[defined].abs() < 1e-5).all()
    assert (first.log_push_change.dropna().abs() < 1e-6).all()  # r_0 in float32 twice
    transfer = pd.read_csv(series_out / "transfer.csv")
    assert len(transfer) == 3 * 3 * 12
    own = transfer[transfer.step == transfer.vector_step].set_index(["step", "emotion"])
    top = attribution[attribution.alpha == 4.0].set_index(["step", "emotion"]).logit_change
    assert ((own.logit_change - top.reindex(own.index)).abs() < 1e-4).all()
    dla = pd.read_csv(series_out / "dla.csv")
    assert set(dla.kind) == {"embed", "attn", "mlp"} and sorted(dla.step.unique()) == [0, 2, 4]
    heads = pd.read_csv(series_out / "heads.csv")
    per_layer = heads.groupby(["step", "label", "layer"]).logit.sum()
    attn = dla[dla.kind == "attn"].set_index(["step", "label", "layer"]).logit
    assert len(per_layer) == len(attn) > 0
    assert ((per_layer - attn.reindex(per_layer.index)).abs() < 1e-4).all()
    lens = pd.read_csv(series_out / "logit_lens.csv")
    assert sorted(lens.step.unique()) == [0, 2, 4] and lens.layer.max() == 3


def test_shards_merge_into_the_single_run(series_out, fake_run_dir, corpus, tmp_path):
    from emolens.run.merge import merge

    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        analyze(fake_run_dir, corpus, shards[-1], CONFIG, device="cpu", shard=(i, 2))
    assert sorted(pd.read_csv(shards[0] / "steps.csv").step) == [0, 4]
    merged = merge(shards, tmp_path / "merged")
    for name in (
        "sensitivity",
        "filtering",
        "steps",
        "attribution",
        "transfer",
        "dla",
        "heads",
        "logit_lens",
        "geometry",
        "probes",
        "random_baseline",
        "change_summary",
    ):
        assert (merged / f"{name}.csv").read_bytes() == (series_out / f"{name}.csv").read_bytes()


def test_a_corrupt_checkpoint_fails_alone_and_is_reported(fake_run_dir, corpus, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fake_run_dir, run)
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    analyze(run, corpus, out, CONFIG, device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["step"] for f in manifest["failures"]] == [2]
    assert sorted(pd.read_csv(out / "steps.csv").step) == [0, 4]


def test_same_command_gives_identical_csv_files(series_out, fake_run_dir, corpus, tmp_path):
    again = analyze(fake_run_dir, corpus, tmp_path / "again", CONFIG, device="cpu")
    for name in (
        "sensitivity",
        "filtering",
        "steps",
        "attribution",
        "transfer",
        "geometry",
        "probes",
        "random_baseline",
        "change_summary",
    ):
        assert (again / f"{name}.csv").read_bytes() == (series_out / f"{name}.csv").read_bytes()


def test_geometry_probes_and_baselines_cover_every_step_with_intervals(series_out):
    geometry = pd.read_csv(series_out / "geometry.csv")
    assert set(geometry.inner) == {"plain", "causal"}
    assert sorted(geometry.step.unique()) == [0, 2, 4]
    first = geometry[(geometry.measure == "cosine_to_first") & (geometry.step == 0)]
    assert (first.value.dropna() > 0.999).all()
    rows = geometry.dropna(subset=["ci_low", "ci_high"])
    assert len(rows) and (rows.ci_low <= rows.ci_high + 1e-9).all()
    probes = pd.read_csv(series_out / "probes.csv")
    assert {"accuracy", "shuffled_accuracy", "recall"} <= set(probes.measure)
    summary = pd.read_csv(series_out / "change_summary.csv")
    assert {"geometry", "probes"} == set(summary.table) and summary.fdr_change.dtype == bool
    assert {"p", "q", "effect", "equivalent_within_margin", "family"} <= set(summary.columns)
    assert summary.p.notna().any() and (summary.q.dropna() >= summary.p.dropna() - 1e-12).all()
    bands = pd.read_csv(series_out / "figure2_bands.csv")
    assert len(bands) and (bands.ci_low <= bands.value + 1e-6).all()
    assert {"first_last_p", "slope_q"} <= set(pd.read_csv(series_out / "sensitivity_trends.csv"))
    baseline = pd.read_csv(series_out / "random_baseline.csv")
    assert {"logit_change_concept", "logit_change_random_mean"} <= set(baseline.columns)
    assert (baseline.directions == "covariance").all() and (baseline.n_random == 99).all()
    assert baseline.p_random.between(0.01, 1).all() and baseline.q_shuffled.notna().all()


def test_answer_only_steering_uses_the_kv_cache_and_matches_the_plain_pass(
    series_out, fake_run_dir, corpus, tmp_path
):
    """positions="answer" at a middle layer runs one token a configuration on the prompt's
    cache; the hooked pass over whole prompts must give the same numbers."""
    import torch

    from emolens.data.labels import render_prompts, resolve_label_tokens
    from emolens.data.tokens import encode
    from emolens.measure.steering import naive_sensitivity
    from emolens.measure.vectors import ConceptVectors
    from emolens.model.loading import discover_series

    config = AnalysisConfig(**{**CONFIG.to_dict(), "positions": "answer", "steer_layers": "1"})
    out = analyze(fake_run_dir, corpus, tmp_path / "answer", config, device="cpu", steps=[4])
    sens = pd.read_csv(out / "sensitivity.csv")
    assert set(sens.positions) == {"answer"} and set(sens.layer) == {1}
    series = discover_series(fake_run_dir)
    model = series.load(series.checkpoints[-1], device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    index = {s.id: s for s in corpus.samples}
    prompts = encode(
        model.tokenizer, render_prompts([index[i].text for i in manifest["steered_prompts"]])
    )
    vectors = ConceptVectors.load(out / "steps" / "step-000004")
    label_ids = resolve_label_tokens(model.tokenizer).ids
    naive = naive_sensitivity(
        model,
        prompts,
        1,
        vectors.layer(1)[:2],
        torch.tensor([2.0]),
        label_ids,
        positions="answer",
        emotions=vectors.emotions[:2],
        labels=STUDY_LABELS.names("en"),
        prompt_ids=manifest["steered_prompts"],
    )
    got = sens[(sens.alpha == 2.0) & sens.steered_emotion.isin(vectors.emotions[:2])]
    got = got.sort_values(["steered_emotion", "prompt_id", "observed_label"])
    expected = naive.to_frame().sort_values(["emotion", "prompt", "label"])
    assert abs(got.logit_change.to_numpy() - expected.logit_change.to_numpy()).max() < 1e-4


def test_localisation_sweeps_windows_for_every_step(series_out, corpus, tmp_path):
    import shutil

    from emolens.run.localise import localise

    config = AnalysisConfig(**{**CONFIG.to_dict(), "layers": "all"})
    out = tmp_path / "all-layers"
    shutil.copytree(series_out, out)
    analyze(
        json.loads((series_out / "manifest.json").read_text())["run_dir"],
        corpus,
        out,
        config,
        device="cpu",
        overwrite=True,
    )
    table = localise(out, corpus, window=2, per_label=2, device="cpu")
    assert sorted(table.step.unique()) == [0, 2, 4]
    assert sorted(table.start_layer.unique()) == [0, 1, 2]
    assert (table.end_layer - table.start_layer == 1).all()
    assert (out / "localisation.csv").exists()
    assert table.accuracy_after.between(0, 1).all()
    assert (table["mode"] == "mean").all() and (table.n_control == 3).all()  # the defaults
    assert table.control_gold_logit_drop_mean.notna().all()
    assert (table.control_gold_logit_drop_max >= table.control_gold_logit_drop_mean).all()


def test_a_table_no_step_produced_gets_no_file_and_a_stale_one_goes(tmp_path):
    """Where no step wrote heads.csv (a model without an exact per-head split), the merge
    must not leave an empty heads.csv that the report cannot read, nor an old one."""
    from emolens.run.merge import write_tables
    from emolens.store import layout

    results = layout.ResultsLayout(tmp_path)
    (tmp_path / "heads.csv").write_text("step,label\n0,joy\n")  # from an earlier run
    write_tables(results, {"heads": pd.DataFrame(), "dla": pd.DataFrame({"step": [0]})})
    assert not (tmp_path / "heads.csv").exists()
    assert pd.read_csv(tmp_path / "dla.csv").step.tolist() == [0]
