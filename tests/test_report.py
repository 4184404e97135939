"""report.html from synthetic results folders: sections, self-containment, notes and errors."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs
from test_plots import (
    make_attribution,
    make_change_summary,
    make_dla,
    make_figure2_bands,
    make_filtering,
    make_geometry,
    make_probes,
    make_random_baseline,
    make_sensitivity,
    make_sensitivity_trends,
    make_steps,
    make_transfer,
)

from emolens.data.labels import STUDY_LABELS
from emolens.report.page import (
    FIGURE_DIGITS,
    FONT_STACK,
    OPTIONAL_TABLES,
    ReportInputError,
    ReportInputs,
    _compact,
    _script_json,
    build_report_html,
    load_report_inputs,
    read_trainer_log,
    unpacked,
    write_report,
)

HEADINGS = (
    "Summary",
    "Figure 2 reproduction",
    "Selectivity",
    "Training curves",
    "Filtering",
    "Label audit",
    "Failures",
    "Run manifest",
)


def _audit() -> dict:
    entries = [
        {
            "ja": e.ja,
            "en": e.en,
            "answer": e.ja,
            "first_token_id": 100 + i,
            "first_token": e.ja[0],
            "n_tokens": len(e.ja),
            "token_ids": [100 + i],
            "shares_first_token_with": [],
        }
        for i, e in enumerate(STUDY_LABELS)
    ]
    return {"labels": STUDY_LABELS.to_dict(), "entries": entries}


def _manifest(**extra) -> dict:
    return {
        "emolens": "0.1.0",
        "model": "tiny-random <b>model</b>",
        "data": {"source": "bundled", "sha256": "abc123", "n_samples": 120},
        "numerics": "raw-hf",
        "numerics_note": "raw HF weights",
        "hook_names": {"steering": "blocks.{layer}.hook_resid_post"},
        "seeds": {"prompt_seed": 0},
        "failures": [{"step": 6, "spec": "run/checkpoint-6", "error": "no weights found"}],
        **extra,
    }


#: Tables of the explanation analyses, in the pipeline's format, with their section headings.
def make_heads() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"step": st, "label": lab, "layer": ly, "head": h, "logit": 0.1 * h + st, "margin": h}
            for st in (0, 4)
            for lab in ("joy", "trust")
            for ly in (0, 1)
            for h in (-1, 0, 1)
        ]
    )


def make_logit_lens() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"step": st, "layer": ly, "label": lab, "accuracy": 0.25 * ly, "rank": 13 - ly}
            for st in (0, 4)
            for ly in (0, 1, 2, 3)
            for lab in ("joy", "trust")
        ]
    )


def make_generations() -> pd.DataFrame:
    rows = [{"emotion": "none", "alpha": 0.0, "text": "unsteered words"}]
    rows += [{"emotion": e, "alpha": 4.0, "text": f"{e} words"} for e in ("joy", "trust")]
    return pd.DataFrame([{"step": st, "prompt_id": "s1", **r} for st in (0, 4) for r in rows])


TABLE_MAKERS = {
    "attribution": make_attribution,
    "transfer": make_transfer,
    "dla": make_dla,
    "heads": make_heads,
    "logit_lens": make_logit_lens,
    "generations": make_generations,
    "random_baseline": make_random_baseline,
    "geometry": make_geometry,
    "probes": make_probes,
    "change_summary": make_change_summary,
    "sensitivity_trends": make_sensitivity_trends,
    "figure2_bands": make_figure2_bands,
}


def make_results(
    folder: Path, optional=(), manifest: dict | None = None, tables=(), layers=(1, 3)
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_sensitivity(steps=(0, 2, 4), layers=layers).to_csv(folder / "sensitivity.csv", index=False)
    for name in tables:
        TABLE_MAKERS[name]().to_csv(folder / f"{name}.csv", index=False)
    make_filtering().to_csv(folder / "filtering.csv", index=False)
    make_steps().to_csv(folder / "steps.csv", index=False)
    (folder / "label_audit.json").write_text(
        json.dumps(_audit(), ensure_ascii=False), encoding="utf-8"
    )
    (folder / "manifest.json").write_text(
        json.dumps(manifest if manifest is not None else _manifest(), ensure_ascii=False),
        encoding="utf-8",
    )
    for name in optional:
        pd.DataFrame(
            {
                "step": [0, 2, 4] * 2,
                "emotion": ["joy"] * 3 + ["trust"] * 3,
                "value": [1.0, 0.8, 0.5, 1.0, 1.1, 1.2],
            }
        ).to_csv(folder / f"{name}.csv", index=False)
    return folder


def make_run(folder: Path) -> Path:
    history = [
        {"step": 2, "loss": 2.5},
        {"step": 2, "eval_loss": 2.2},
        {"step": 4, "loss": 2.0},
        {"step": 4, "eval_loss": 2.3},
    ]
    for step, upto in ((2, 2), (4, 4)):
        ck = folder / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        state = {"log_history": [h for h in history if h["step"] <= upto]}
        (ck / "trainer_state.json").write_text(json.dumps(state))
    pd.DataFrame({"step": [0, 2, 4], "accuracy": [0.2, 0.4, 0.5], "n": [30] * 3}).to_csv(
        folder / "accuracy.csv", index=False
    )
    return folder


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> str:
    folder = make_results(tmp_path_factory.mktemp("results"))
    path = write_report(folder)
    assert path == folder / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_has_every_section_heading(full_report):
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in full_report
    for title in OPTIONAL_TABLES.values():  # no optional table in this folder
        assert f"<h2>{title}</h2>" not in full_report


def test_report_is_self_contained_with_plotly_inline_once(full_report):
    assert "<script src=" not in full_report.replace(" ", "").replace("<script\nsrc", "<scriptsrc")
    assert 'src="http' not in full_report and "src='http" not in full_report
    blobs = re.findall(
        r'<script id="emolens-plotly" type="application/gzip;base64">([^<]*)<', full_report
    )
    assert len(blobs) == 1 and unpacked(blobs[0]) == get_plotlyjs()  # plotly.js once, whole
    assert full_report.count("Plotly.newPlot") == 1  # in the loader only, not per figure
    assert full_report.count('class="plotly-graph-div"') >= 4
    assert '<meta charset="utf-8">' in full_report


def _figure_specs(report: str) -> dict[str, dict]:
    """``{figure id: {"data", "layout", "config"}}`` as the page's loader unpacks them."""
    return {
        figure_id: json.loads(unpacked(blob))
        for figure_id, blob in re.findall(
            r'<script type="application/gzip;base64" data-figure="([^"]+)">([^<]*)</script>', report
        )
    }


def _readable(html: str) -> str:
    """``html`` with each figure's packed JSON unpacked in place (to search its text)."""
    return re.sub(
        r'(<script type="application/gzip;base64" data-figure="[^"]+">)([^<]*)(</script>)',
        lambda m: m[1] + unpacked(m[2]).replace("<", "&lt;") + m[3],
        html,
    )


def test_every_figure_div_has_its_data_without_a_template_and_floats_are_rounded(full_report):
    specs = _figure_specs(full_report)
    divs = re.findall(r'<div id="([^"]+)" class="plotly-graph-div"', full_report)
    assert divs and sorted(divs) == sorted(specs)
    numbers = []

    def walk(value):
        if isinstance(value, dict):
            assert "bdata" not in value  # typed arrays decoded to plain numbers
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, float):
            numbers.append(value)

    for spec in specs.values():
        assert "template" not in spec["layout"]  # sent once, by the loader
        walk(spec["data"])
    assert len(numbers) > 100
    assert all(float(f"{x:.{FIGURE_DIGITS}g}") == x for x in numbers)
    template = json.loads(
        re.search(r'<script id="emolens-template" type="application/json">([^<]*)<', full_report)[1]
    )
    assert template["layout"]["font"]["family"] == FONT_STACK
    assert "colorway" in template["layout"]  # plotly's own template, only the font changed


def test_compact_rounds_decodes_typed_arrays_and_nulls_non_finite_numbers():
    fig = go.Figure(
        go.Scatter(
            x=np.arange(4),
            y=np.array([0.123456789, -2.0, np.nan, 1e-9 / 3]),
            customdata=np.array([[1.23456789e5, np.inf], [3.0, 4.5]]),
        )
    )
    trace = _compact(fig.to_plotly_json())["data"][0]
    assert trace["x"] == [0, 1, 2, 3]
    assert trace["y"] == [0.123457, -2, None, 3.33333e-10]
    assert trace["customdata"] == [[123457, None], [3, 4.5]]
    assert json.loads(_script_json({"s": "</script><!-- x"})) == {"s": "</script><!-- x"}
    assert "</" not in _script_json({"s": "</script>"})


def test_page_and_figures_use_a_japanese_capable_font_stack(full_report):
    css = full_report.split("<style>")[1].split("</style>")[0]
    body_rule = css.split("body {")[1].split("}")[0]
    assert f"font-family: {FONT_STACK};" in body_rule
    for font in ('"Noto Sans CJK JP"', '"Hiragino Sans"', '"Yu Gothic"', "Meiryo"):
        assert font in FONT_STACK
    assert FONT_STACK.endswith("sans-serif")


def test_section_navigation_wraps_and_links_every_section(full_report):
    css = full_report.split("<style>")[1].split("</style>")[0]
    nav_rules = re.findall(r"nav(?: a)? \{([^}]*)\}", css)
    assert any("flex-wrap: wrap" in rule for rule in nav_rules)
    assert not any("nowrap" in rule for rule in nav_rules)  # a long link may wrap too
    nav = full_report.split("<nav>")[1].split("</nav>")[0]
    anchors = re.findall(r'<a href="#([^"]+)">', nav)
    sections = re.findall(r'<section id="([^"]+)">', full_report)
    assert anchors == sections and len(sections) >= len(HEADINGS)


def test_figure2_has_png_and_svg_download_buttons(full_report):
    section = full_report.split('<section id="figure2">')[1].split("</section>")[0]
    figure_id = re.search(r'<div id="([^"]+)" class="plotly-graph-div"', section)[1]
    for fmt in ("png", "svg"):
        assert (
            f'<button type="button" data-download="{fmt}" data-target="{figure_id}" '
            f'data-filename="figure2">{fmt.upper()}</button>'
        ) in section
    assert "Plotly.downloadImage(" in full_report  # what the buttons call


def test_report_shows_japanese_labels_and_escapes_text(full_report):
    for ja in ("喜び", "恥", "信頼"):
        assert ja in full_report
    assert "<b>model</b>" not in full_report
    assert "tiny-random &lt;b&gt;model&lt;/b&gt;" in full_report


def test_report_summary_says_which_emotions_lost_sensitivity(full_report):
    summary = full_report.split('id="summary"')[1].split("</section>")[0]
    assert "raw-hf" in summary and "abc123" in summary
    assert "above the base model's for trust and below it for joy, sadness" in summary
    assert "joy (喜び)" in summary


def test_report_lists_failed_checkpoints_and_the_manifest(full_report):
    failures = full_report.split('id="failures"')[1].split("</section>")[0]
    assert "run/checkpoint-6" in failures and "no weights found" in failures
    assert "<details><summary>manifest.json</summary>" in full_report


def _section_of(text: str, anchor: str) -> str:
    return text.split(f'id="{anchor}"')[1].split("</section>")[0]


def test_optional_sections_appear_only_for_tables_that_exist(tmp_path):
    folder = make_results(tmp_path / "r", tables=("geometry", "probes"))
    text = write_report(folder).read_text(encoding="utf-8")
    assert "<h2>Geometry</h2>" in text and "<h2>Linear probes</h2>" in text
    for name in ("attribution", "transfer", "dla", "random_baseline", "change_summary"):
        assert f"<h2>{OPTIONAL_TABLES[name]}</h2>" not in text
    assert f"geometry.csv ({len(make_geometry())} rows)" in text
    assert "could not be shown as designed" not in text and 'class="problem"' not in text


@pytest.fixture(scope="module")
def explained_report(tmp_path_factory) -> str:
    folder = make_results(tmp_path_factory.mktemp("explained"), tables=tuple(TABLE_MAKERS))
    return write_report(folder).read_text(encoding="utf-8")


def test_every_explanation_table_gets_its_dedicated_section(explained_report):
    for name, title in OPTIONAL_TABLES.items():
        assert f"<h2>{title}</h2>" in explained_report
        section = _section_of(explained_report, name.replace("_", "-"))
        assert f"<details><summary>{name}.csv (" in section
    assert "could not be shown as designed" not in explained_report
    assert 'class="problem"' not in explained_report
    attribution = _section_of(explained_report, "attribution")
    assert "<h3>Why the push changed across the series</h3>" in attribution
    assert "From step 0 to step 4 the per-unit push" in attribution
    assert attribution.count('class="plotly-graph-div"') == 2
    transfer = _section_of(explained_report, "transfer")
    # model 4 with its own vectors: 10*4 + 4 + 50 (mean of joy and trust); with step 0's: 90
    assert "the step-4 model with its own vectors 94 and with the step-0 vectors 90" in transfer
    steered = _section_of(explained_report, "generations")
    assert "joy words" in steered and "unsteered words" in steered and "alpha 4" in steered
    assert _section_of(explained_report, "logit-lens").count('class="plotly-graph-div"') == 2
    assert _section_of(explained_report, "heads").count('class="plotly-graph-div"') == 1
    geometry = _section_of(explained_report, "geometry")
    assert "<h3>cosine_to_first</h3>" in geometry and "<h3>orthogonality</h3>" in geometry
    assert "<h3>within_gap</h3>" not in geometry  # not in this table
    assert geometry.count('class="plotly-graph-div"') == 4  # plain and causal of each
    assert _section_of(explained_report, "dla").count('class="plotly-graph-div"') == 2
    probes = _section_of(explained_report, "probes")
    assert "Layer 3: held-out accuracy 0.800 at step 0 and 0.840 at step 4" in probes
    assert "the step-0 probe scores 0.720 there" in probes
    baseline = _section_of(explained_report, "random-baseline")
    assert "Step 4, α = 4: 1 of 2 raise their label more than 99 covariance-matched" in baseline


def test_change_summary_states_per_family_what_changed_what_is_equivalent_and_what_is_not_known(
    explained_report,
):
    section = _section_of(explained_report, "change-summary")
    assert (
        "3 of 8 geometry series (measure × emotion × layer × inner product) changed from the "
        "first step at some later step (paired test, q &lt; 0.05 after Benjamini-Hochberg "
        "within the geometry family): cosine_to_first (plain) 3 of 4." in section
    )
    assert "3 are equivalent to the first step within their margin at every step (TOST; " \
        "margin absolute: 0.05); 2 are inconclusive" in section  # fmt: skip
    # train_accuracy and chance have no test
    assert "1 of 2 probe series" in section and "recall (step 0) 1 of 1" in section
    assert "The paper found no significant change of the geometry" in section
    assert "agrees with the paper" not in section
    summary = _section_of(explained_report, "summary")
    assert "<h3>Geometry and probes across the series</h3>" in summary
    assert "3 of 8 geometry series" in summary


def test_sensitivity_trends_say_which_emotions_fell_or_rose_from_q(explained_report):
    section = _section_of(explained_report, "sensitivity-trends")
    assert (
        "α = 4: from step 0 to 4, 1 of 3 emotions fell (joy (喜び)) and 1 rose "
        "(trust (信頼)) at q &lt; 0.05; 2 have a slope over steps at q &lt; 0.05; "
        "1 are not shown to have changed. Jointly (the test that no emotion&#x27;s point "
        "changed): p = 0.003, some emotion changed at the 0.05 level." in section
    )
    assert "not evidence that it kept its sensitivity" in section and "jackknife" in section
    figure2 = _section_of(explained_report, "figure2")
    assert "two-level bootstrap band" in figure2


def test_no_flag_is_not_read_as_agreement_with_the_paper(tmp_path):
    folder = make_results(tmp_path / "r")
    quiet = make_change_summary().assign(fdr_change=False)
    quiet.to_csv(folder / "change_summary.csv", index=False)
    section = _section_of(write_report(folder).read_text(encoding="utf-8"), "change-summary")
    assert "0 of 8 geometry series" in section
    assert "agrees with the paper" not in section and "consistent with the paper" not in section
    assert "No significant change is not evidence of no change" in section
    assert "5 of 8 are not shown equivalent" in section


def test_equivalence_everywhere_is_stated_as_consistent_with_the_paper_at_the_margin(tmp_path):
    folder = make_results(tmp_path / "r")
    quiet = make_change_summary().assign(fdr_change=False, equivalent_within_margin=True)
    quiet.to_csv(folder / "change_summary.csv", index=False)
    section = _section_of(write_report(folder).read_text(encoding="utf-8"), "change-summary")
    assert "all 8 are equivalent to the first step within their margin (absolute: 0.05; " \
        "TOST): consistent with the paper" in section  # fmt: skip


def test_layer_summary_appears_only_with_several_steered_layers(explained_report, tmp_path):
    title = "<h2>Where emotions are steerable and decodable</h2>"
    assert title in explained_report
    section = _section_of(explained_report, "layer-summary")
    assert "<h3>From step 0 to step 4</h3>" in section
    assert section.count('class="plotly-graph-div"') == 1
    one = make_results(tmp_path / "one", tables=("probes",), layers=(3,))
    assert title not in write_report(one).read_text(encoding="utf-8")


def test_a_table_of_another_shape_falls_back_to_the_generic_figure(tmp_path):
    folder = make_results(tmp_path / "r", optional=("geometry",))
    text = write_report(folder).read_text(encoding="utf-8")
    section = _section_of(text, "geometry")
    assert "geometry.csv could not be shown as designed" in section
    assert 'class="plotly-graph-div"' in section and "geometry.csv (6 rows)" in section


def test_training_curves_come_from_the_run_folder_recorded_in_the_manifest(tmp_path):
    run = make_run(tmp_path / "run")
    folder = make_results(tmp_path / "r", manifest=_manifest(run_dir=str(run)))
    inputs = load_report_inputs(folder)
    assert inputs.run_dir == str(run)
    assert inputs.trainer_log["step"].tolist() == [2, 4]
    assert inputs.trainer_log["eval_loss"].tolist() == [2.2, 2.3]
    assert inputs.accuracy["accuracy"].tolist() == [0.2, 0.4, 0.5]
    text = write_report(folder).read_text(encoding="utf-8")
    training = _readable(text.split('id="training"')[1].split("</section>")[0])
    assert "train loss" in training and "lowest eval loss" in training
    assert "No loss to show" not in training


def test_read_trainer_log_merges_train_and_eval_entries(tmp_path):
    log = read_trainer_log(make_run(tmp_path / "run"))
    assert log.to_dict("list") == {"step": [2, 4], "loss": [2.5, 2.0], "eval_loss": [2.2, 2.3]}
    assert read_trainer_log(tmp_path) is None


def test_a_given_run_folder_that_is_missing_is_an_error(tmp_path):
    folder = make_results(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="run folder"):
        write_report(folder, run_dir=tmp_path / "nowhere")


def test_missing_optional_inputs_become_notes(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    make_sensitivity(steps=(2, 4)).to_csv(folder / "sensitivity.csv", index=False)
    out = write_report(folder, out=tmp_path / "elsewhere" / "r.html")
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "elsewhere" / "r.html" and not (folder / "report.html").exists()
    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in text
    assert "filtering.csv not found" in text and "label_audit.json not found" in text
    assert "manifest.json not found" in text
    assert "no base model (step 0)" in text
    assert "No loss to show" in text


def test_missing_sensitivity_names_the_file_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sensitivity\.csv.*emolens analyze"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="results folder"):
        write_report(tmp_path / "absent")


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "cannot be read as a CSV"),
        ('step,layer\n0,1,2,3,4\n"unterminated', "cannot be read as a CSV"),
        ("step,layer,steered_emotion,observed_label,alpha,prompt_id,logit_change\n", "has no rows"),
        (
            "step,layer,steered_emotion,observed_label,alpha,logit_change\n0,1,joy,joy,1,0.5\n",
            "lacks the column.*prompt_id",
        ),
        (
            "step,layer,steered_emotion,observed_label,alpha,prompt_id,logit_change\n"
            "zero,1,joy,joy,1,p,0.5\n",
            "'step' is not numeric",
        ),
    ],
)
def test_corrupt_sensitivity_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "sensitivity.csv").write_text(content)
    with pytest.raises(ReportInputError, match=match) as info:
        write_report(tmp_path)
    assert "emolens analyze" in str(info.value)
    assert not (tmp_path / "report.html").exists()


def test_corrupt_optional_inputs_are_reported_not_fatal(tmp_path):
    folder = make_results(tmp_path / "r", optional=("transfer",))
    (folder / "manifest.json").write_text("{not json")
    (folder / "transfer.csv").write_text("")
    with pytest.warns(UserWarning) as record:
        text = write_report(folder).read_text(encoding="utf-8")
    warned = " ".join(str(w.message) for w in record)
    assert "manifest.json" in warned and "transfer.csv" in warned
    assert "manifest.json: is not valid JSON" in text
    assert "<h2>Vector transfer</h2>" in text and "transfer.csv: cannot be read" in text


def test_build_report_html_is_pure_and_survives_odd_tables():
    sens = make_sensitivity(steps=(0, 4), layers=(5,))
    odd = pd.DataFrame({"what": ["a", "b"], "x": [math.nan, 1.0]})
    inputs = ReportInputs(
        sensitivity=sens, extra_tables={"attribution": odd}, label_audit={"entries": "broken"}
    )
    text = build_report_html(inputs)
    assert "<h2>Logit attribution</h2>" in text
    assert "label_audit.json has no list of entries" in text
    assert "Layer sweep" not in text  # one layer only
    assert text.startswith("<!DOCTYPE html>")


def test_layer_sweep_appears_with_several_layers(full_report):
    assert "<h3>Layer sweep</h3>" in full_report


def test_random_baseline_verdicts_come_from_the_permutation_tests(explained_report, tmp_path):
    body = _section_of(explained_report, "random-baseline")
    # the fixture's first emotion has q_random 0.02, the second 0.4; both beat shuffled labels
    assert "1 of 2 raise their label more than 99 covariance-matched random directions" in body
    assert "2 of 2 raise their label more than 99 shuffled-label vectors" in body
    assert "(1 + k) / (1 + n)" in body
    # a table written before the tests existed says so instead of claiming a verdict
    folder = make_results(tmp_path / "old", tables=("random_baseline",))
    old = make_random_baseline().drop(columns=[c for c in make_random_baseline() if "_shuffled"
                                               in c or c in ("p_random", "q_random")])  # fmt: skip
    old.to_csv(folder / "random_baseline.csv", index=False)
    text = _section_of(write_report(folder).read_text(encoding="utf-8"), "random-baseline")
    assert "raise their label more than every random direction" in text
    assert "has no p-values" in text


def test_summary_verdicts_come_from_the_trend_tests_where_they_cover_the_slice(explained_report):
    """With sensitivity_trends.csv at the shown layer and alpha, the summary's above / below
    is the calibrated first-vs-last test's (joy fell at q .01, trust rose at q .02, sadness
    q .4), never a bare difference of point estimates."""
    summary = explained_report.split('id="summary"')[1].split("</section>")[0]
    assert "above the base model's for trust and below it for joy (first-vs-last" in summary
    assert "sadness: not shown to differ" in summary
    assert "not shown to differ from the base model (q = 0.4)" in summary
    assert "point estimates: no change test" not in summary
