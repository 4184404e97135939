"""A multi-seed folder through ``analyze``: each seed's results equal a single-seed analysis,
the top-level tables carry a ``seed`` column, and the across-seed change test has its nominal
error rate under a planted null and finds a planted consistent shift."""

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from emolens.analysis.seed_tests import (
    seed_change_summary,
    seed_change_test,
    t_quantile,
    t_two_sided_p,
)
from emolens.data.corpus import load_corpus
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig
from emolens.run.seeds import seed_runs

CONFIG = AnalysisConfig(
    layers="1,-1", steer_layers="-1", alphas=(0.0, 2.0), n_prompts=3, min_count=1,
    batch_size=16, filter_mode="none", n_boot=20, dla_per_label=0,
)  # fmt: skip


def _perturbed_copy(run, target, seed):
    """A copy of the run folder whose checkpoints' weights are moved by seeded noise."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(run, target)
    torch.manual_seed(seed)
    for ckpt in sorted(target.glob("checkpoint-*")):
        if not (ckpt / "model.safetensors").exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(ckpt)
    return target


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(6)


@pytest.fixture(scope="module")
def seeds_folder(tmp_path_factory, fake_run_dir):
    root = tmp_path_factory.mktemp("multi")
    shutil.copytree(fake_run_dir, root / "seed-0")
    _perturbed_copy(fake_run_dir, root / "seed-1", seed=11)
    return root


@pytest.fixture(scope="module")
def seeds_out(tmp_path_factory, seeds_folder, corpus):
    out = tmp_path_factory.mktemp("seeds-results")
    analyze(seeds_folder, corpus, out, CONFIG, device="cpu")
    return out


def test_each_seed_folder_equals_a_single_seed_analysis(seeds_out, seeds_folder, corpus, tmp_path):
    single = analyze(seeds_folder / "seed-1", corpus, tmp_path / "single", CONFIG, device="cpu")
    names = sorted(p.name for p in single.glob("*.csv"))
    assert {"geometry.csv", "sensitivity.csv", "change_summary.csv"} <= set(names)
    assert names == sorted(p.name for p in (seeds_out / "seed-1").glob("*.csv"))
    for name in names:
        if (single / name).read_text().strip() == "":  # a table no step fed (dla here)
            assert (seeds_out / "seed-1" / name).read_text().strip() == ""
            continue
        a = pd.read_csv(single / name)
        b = pd.read_csv(seeds_out / "seed-1" / name)
        if "spec" in a.columns:  # the same checkpoints
            assert list(a["spec"]) == list(b["spec"])
            a, b = a.drop(columns="spec"), b.drop(columns="spec")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, obj=name)


def test_top_level_tables_concatenate_the_seeds_with_a_seed_column(seeds_out):
    info = json.loads((seeds_out / "seeds.json").read_text())
    assert info["seeds"] == [0, 1]
    for name in ("geometry", "sensitivity", "probes", "figure2_bands", "steps"):
        top = pd.read_csv(seeds_out / f"{name}.csv")
        assert list(top.columns)[0] == "seed"
        for k in (0, 1):
            own = pd.read_csv(seeds_out / f"seed-{k}" / f"{name}.csv")
            part = top[top.seed == k].drop(columns="seed").reset_index(drop=True)
            pd.testing.assert_frame_equal(part, own, obj=name)
    # the two seeds' checkpoints differ, so do their measurements
    sens = pd.read_csv(seeds_out / "sensitivity.csv")
    later = sens[(sens.step > 0) & (sens.alpha > 0)]
    a, b = (later[later.seed == k]["logit_change"].to_numpy() for k in (0, 1))
    assert np.abs(a - b).max() > 1e-4


def test_seed_change_summary_tests_every_family_across_seeds(seeds_out):
    summary = pd.read_csv(seeds_out / "seed_change_summary.csv")
    assert set(summary["family"]) == {"geometry", "probes", "sensitivity"}
    assert set(summary["step"]) == {2, 4} and (summary["first_step"] == 0).all()
    tested = summary[summary.n_seeds == 2]
    assert len(tested) > 0 and (tested["df"] == 1).all()
    assert tested["note"].str.contains("df = 1").all()
    # the mean effect is the mean over seeds of each seed's own change from step 0
    geo = pd.read_csv(seeds_out / "geometry.csv")
    row = tested[tested.family == "geometry"].iloc[0]
    sel = geo[
        (geo.layer == row.layer) & (geo.measure == row.measure) & (geo.emotion == row.emotion)
        & (geo.inner == row.inner)
    ]  # fmt: skip
    wide = sel.pivot_table(index="seed", columns="step", values="value")
    assert row.mean_effect == pytest.approx(float((wide[row.step] - wide[0]).mean()))


def test_a_rerun_of_a_seed_folder_resumes(seeds_out, seeds_folder, corpus):
    before = (seeds_out / "seed-0" / "steps").stat().st_mtime_ns
    done = sorted((seeds_out / "seed-0" / "steps").glob("*/done.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    analyze(seeds_folder, corpus, seeds_out, CONFIG, device="cpu")
    assert [p.stat().st_mtime_ns for p in done] == stamps
    assert before <= (seeds_out / "seed-0" / "steps").stat().st_mtime_ns


def test_a_seed_folder_without_checkpoints_is_refused(tmp_path, fake_run_dir):
    shutil.copytree(fake_run_dir, tmp_path / "seed-0")
    (tmp_path / "seed-1").mkdir()
    with pytest.raises(ValueError, match="seed-1"):
        seed_runs(tmp_path)
    assert seed_runs(fake_run_dir) is None  # an ordinary run folder


def test_sharding_a_multi_seed_folder_is_refused(seeds_folder, corpus, tmp_path):
    with pytest.raises(ValueError, match="--shard"):
        analyze(seeds_folder, corpus, tmp_path / "x", CONFIG, device="cpu", shard=(0, 2))


# ----------------------------------------------------------------- the across-seed test


def _planted(n_series, n_seeds, shift, seed):
    """Values at steps 0 and 10 per seed and series: a seed-and-series offset plus noise of
    SD 1 at each step, and ``shift`` added at step 10."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_series):
        for k in range(n_seeds):
            offset = rng.normal(0, 3)
            for step in (0, 10):
                value = offset + rng.normal() + (shift if step == 10 else 0.0)
                rows.append({"seed": k, "step": step, "series": i, "value": value})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n_seeds", [2, 3, 5])
def test_false_positive_rate_under_a_planted_null_is_nominal(n_seeds):
    n = 3000
    res = seed_change_test(_planted(n, n_seeds, 0.0, seed=n_seeds), ["series"], family="x")
    fpr = float((res["p"] < 0.05).mean())
    mc = 3 * np.sqrt(0.05 * 0.95 / n)
    assert abs(fpr - 0.05) <= mc, fpr
    assert res["fdr_change"].mean() < 0.01  # BH: almost no discovery under the null
    assert (res["df"] == n_seeds - 1).all()


def test_a_planted_consistent_shift_is_detected():
    # d = shift + noise of SD sqrt(2): 2.8 SD; the t-test's power at df 4 is about 0.98
    res = seed_change_test(_planted(300, 5, 4.0, seed=1), ["series"], family="x")
    assert (res["p"] < 0.05).mean() > 0.95
    assert res["fdr_change"].mean() > 0.9
    assert (res["n_positive"] == 5).mean() > 0.95
    assert res["effect_ci_low"].lt(4.0).mean() > 0.9 and res["effect_ci_high"].gt(4.0).mean() > 0.9


def test_interval_coverage_under_the_null():
    res = seed_change_test(_planted(3000, 3, 0.0, seed=5), ["series"], family="x")
    covered = ((res["effect_ci_low"] <= 0) & (res["effect_ci_high"] >= 0)).mean()
    assert abs(covered - 0.95) <= 3 * np.sqrt(0.05 * 0.95 / 3000)


def test_one_seed_gives_no_test_and_identical_changes_are_exact():
    one = seed_change_test(_planted(5, 1, 0.0, seed=0), ["series"], family="x")
    assert one["p"].isna().all() and one["q"].isna().all() and not one["fdr_change"].any()
    same = pd.DataFrame(
        {"seed": [0, 0, 1, 1], "step": [0, 1, 0, 1], "k": "a", "value": [1.0, 2.0, 5.0, 6.0]}
    )
    r = seed_change_test(same, ["k"], family="x").iloc[0]
    assert r.p == 0.0 and r.mean_effect == 1.0 and r.sign_consistent


def test_t_distribution_matches_the_closed_form_values():
    assert t_two_sided_p(12.706204736174694, 1) == pytest.approx(0.05, abs=1e-12)
    assert t_two_sided_p(4.302652729749462, 2) == pytest.approx(0.05, abs=1e-12)
    assert t_two_sided_p(2.2281388519862744, 10) == pytest.approx(0.05, abs=1e-12)
    assert t_quantile(0.975, 3) == pytest.approx(3.182446305284263, abs=1e-9)
    assert t_two_sided_p(0.0, 4) == 1.0


def test_probe_series_are_split_by_probe_across_seeds():
    rows = []
    for seed in (0, 1, 2):
        for step in (0, 5):
            for train in {0, step}:
                rows.append(
                    dict(seed=seed, step=step, layer=1, measure="accuracy", label="all",
                         value=0.5 + 0.1 * seed + (0.2 if step == 5 and train == 5 else 0.0),
                         ci_low=0, ci_high=1, train_step=train, n=10)
                )  # fmt: skip
    summary = seed_change_summary({"probes": pd.DataFrame(rows)})
    by_probe = summary.set_index("probe")
    assert by_probe.loc["own", "mean_effect"] == pytest.approx(0.2)
    assert by_probe.loc["step 0", "mean_effect"] == pytest.approx(0.0)
    assert (summary["family"] == "probes").all()


def test_figure2_seed_spread_draws_the_seed_mean_and_the_min_max_band():
    from emolens.report.figures.seeds import figure2_seed_spread

    bands = pd.DataFrame(
        [
            dict(seed=k, step=s, layer=3, emotion=e, alpha=a, value=v0 + k + s, ci_low=0,
                 ci_high=1, n_boot=5)
            for k in (0, 1, 2) for s in (0, 10) for e, v0 in (("joy", 1.0), ("trust", 5.0))
            for a in (2.0, 4.0)
        ]
    )  # fmt: skip
    fig = figure2_seed_spread(bands)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands_ = [t for t in fig.data if t.fill == "toself"]
    assert len(lines) == 2 and len(bands_) == 2
    joy = next(t for t in lines if t.name.startswith("joy"))
    assert list(joy.y) == [2.0, 12.0]  # mean over seeds 0, 1, 2 of 1 + k + s
    band = bands_[[t.legendgroup for t in bands_].index(joy.legendgroup)]
    assert list(band.y) == [3.0, 13.0, 11.0, 1.0]  # max forward, min back
    assert "3 seeds" in fig.layout.title.text and "alpha 4" in fig.layout.title.text
    with pytest.raises(ValueError, match="seed"):
        figure2_seed_spread(bands.drop(columns="seed"))


def test_the_report_shows_the_seed_spread_only_with_several_seeds():
    from emolens.report.page import ReportInputs, _seed_spread_section, unpacked

    bands = pd.DataFrame(
        dict(seed=[0, 0, 1, 1], step=[0, 5, 0, 5], layer=1, emotion="joy", alpha=2.0,
             value=[1.0, 2.0, 1.5, 2.5], ci_low=0, ci_high=3, n_boot=5)
    )  # fmt: skip
    sens = pd.DataFrame()
    many = _seed_spread_section(ReportInputs(sens, extra_tables={"figure2_bands": bands}))
    one = _seed_spread_section(
        ReportInputs(sens, extra_tables={"figure2_bands": bands[bands.seed == 0]})
    )
    # the figure's data is packed (gzip + base64) in the page: unpack it to read its traces
    packed = re.findall(
        r'<script type="application/gzip;base64" data-figure="[^"]+">([^<]*)</script>', many
    )
    assert 'class="plotly-graph-div"' in many and len(packed) == 1
    assert "seed mean" in unpacked(packed[0])
    assert "One fine-tuning seed" in one and "plotly-graph-div" not in one
