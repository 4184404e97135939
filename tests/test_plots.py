"""Figures from small synthetic result tables, checked against numbers computed the slow way."""

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from emolens.analysis.change_summary import change_summary_counts
from emolens.data.labels import STUDY_LABELS
from emolens.report import figures

STEERED = ("joy", "sadness", "trust")
STEPS = (0, 2, 4)
LAYERS = (1, 3)
ALPHAS = (2.0, 4.0)
PROMPTS = ("p0", "p1", "p2")


def make_sensitivity(
    steps=STEPS, layers=LAYERS, alphas=ALPHAS, steered=STEERED, units=("absolute",), seed=0
) -> pd.DataFrame:
    """A sensitivity table in the pipeline's long format. The diagonal is planted: joy and
    sadness fall with training, trust rises; off-diagonal cells are small noise."""
    rng = np.random.default_rng(seed)
    trend = {"joy": -0.5, "sadness": -0.3, "trust": 0.4}
    rows = []
    for unit in units:
        for step in steps:
            for layer in layers:
                for emotion in steered:
                    for observed in STUDY_LABELS.names("en"):
                        for alpha in alphas:
                            for prompt in PROMPTS:
                                if observed == emotion:
                                    value = alpha * (
                                        1 + trend.get(emotion, 0) * step / 4 + 0.1 * layer
                                    ) + rng.normal(0, 0.2)
                                else:
                                    value = rng.normal(0, 0.1)
                                rows.append(
                                    {
                                        "step": step,
                                        "layer": layer,
                                        "steered_emotion": emotion,
                                        "observed_label": observed,
                                        "alpha": alpha,
                                        "alpha_unit": unit,
                                        "positions": "all",
                                        "prompt_id": prompt,
                                        "logit_change": value,
                                        "logprob_change": value - 0.5,
                                        "centered_change": value - 0.1,
                                    }
                                )
    return pd.DataFrame(rows)


def make_filtering(steps=STEPS) -> pd.DataFrame:
    rows = []
    for step in steps:
        for e in STUDY_LABELS:
            kept = 0 if e.en == "shame" else 5 + step
            rows.append(
                {
                    "step": step,
                    "label": e.en,
                    "label_ja": e.ja,
                    "n_samples": 20,
                    "n_correct": kept,
                    "n_kept": kept,
                    "dropped": e.en == "shame",
                    "filter_mode": "each",
                }
            )
    return pd.DataFrame(rows)


def make_steps(eval_loss=(math.nan, 2.0, 1.5)) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "step": list(STEPS),
            "kind": ["base", "full", "full"],
            "spec": ["base", "run/checkpoint-2", "run/checkpoint-4"],
            "eval_loss": list(eval_loss),
            "accuracy": [0.3, 0.5, 0.6],
            "n_samples": [40, 40, 40],
            "weights_hash": ["a", "b", "c"],
        }
    )


def slow_diagonal(sens, emotion, step, layer, alpha, measure="logit_change"):
    values = [
        r[measure]
        for _, r in sens.iterrows()
        if r["steered_emotion"] == emotion
        and r["observed_label"] == emotion
        and r["step"] == step
        and r["layer"] == layer
        and r["alpha"] == alpha
    ]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd / math.sqrt(n)


@pytest.fixture(scope="module")
def sens() -> pd.DataFrame:
    return make_sensitivity()


def _emotion_traces(fig):
    return [t for t in fig.data if t.name in STEERED]


def test_figure2_has_one_line_per_emotion_with_means_and_standard_errors_over_prompts(sens):
    fig = figures.figure2(sens)
    assert isinstance(fig, go.Figure)
    traces = _emotion_traces(fig)
    assert [t.name for t in traces] == list(STEERED)  # the study's label order
    for t in traces:
        assert list(t.x) == list(STEPS)
        for step, y, err in zip(t.x, t.y, t.error_y.array, strict=True):
            mean, se = slow_diagonal(sens, t.name, step, layer=3, alpha=4.0)
            assert y == pytest.approx(mean, abs=1e-9)
            assert err == pytest.approx(se, abs=1e-9)
    title = fig.layout.title.text
    assert "layer 3" in title and "α = 4" in title and "absolute" in title
    assert "logit_change" in title
    assert not any(t.name == "eval loss" for t in fig.data)


def test_figure2_takes_a_chosen_layer_alpha_and_measure(sens):
    fig = figures.figure2(sens, layer=1, alpha=2, measure="logprob_change")
    joy = next(t for t in fig.data if t.name == "joy")
    mean, _ = slow_diagonal(sens, "joy", 4, layer=1, alpha=2.0, measure="logprob_change")
    assert joy.y[-1] == pytest.approx(mean)
    assert "layer 1" in fig.layout.title.text and "logprob_change" in fig.layout.title.text


def test_figure2_draws_eval_loss_on_a_second_axis_only_when_there_is_some(sens):
    fig = figures.figure2(sens, steps_table=make_steps())
    ev = [t for t in fig.data if t.name == "eval loss"]
    assert len(ev) == 1
    assert ev[0].yaxis == "y2" and ev[0].line.dash == "dash"
    assert list(ev[0].x) == [2, 4] and list(ev[0].y) == [2.0, 1.5]
    assert fig.layout.yaxis2.overlaying == "y"
    none = figures.figure2(sens, steps_table=make_steps(eval_loss=(math.nan,) * 3))
    assert not any(t.name == "eval loss" for t in none.data)


def test_figure2_hover_names_the_emotion_in_japanese_too(sens):
    fig = figures.figure2(sens)
    joy = next(t for t in fig.data if t.name == "joy")
    assert "喜び" in joy.hovertemplate


def test_figure2_prefers_absolute_alpha_when_both_units_are_present():
    mixed = make_sensitivity(units=("absolute", "norm"), steps=(0, 2))
    mixed.loc[mixed["alpha_unit"] == "norm", "logit_change"] += 100.0
    fig = figures.figure2(mixed)
    assert "(absolute)" in fig.layout.title.text
    assert max(max(t.y) for t in _emotion_traces(fig)) < 50
    norm = figures.figure2(mixed, alpha_unit="norm")
    assert min(min(t.y) for t in _emotion_traces(norm)) > 50


def test_figure2_errors_name_what_is_present(sens):
    with pytest.raises(ValueError, match="layer = 7; present: 1, 3"):
        figures.figure2(sens, layer=7)
    with pytest.raises(ValueError, match="no measure 'bogus'"):
        figures.figure2(sens, measure="bogus")
    with pytest.raises(ValueError, match="lacks the column"):
        figures.figure2(sens.drop(columns="prompt_id"))
    off_diagonal = sens[sens["steered_emotion"] != sens["observed_label"]]
    with pytest.raises(ValueError, match="no diagonal rows"):
        figures.figure2(off_diagonal)


def test_emotions_keep_one_colour_across_figures(sens):
    fig2 = figures.figure2(sens)
    long = pd.DataFrame(
        {
            "step": [0, 2, 0, 2],
            "emotion": ["joy", "joy", "trust", "trust"],
            "cosine": [1.0, 0.9, 1.0, 0.8],
        }
    )
    generic = figures.generic_table_figure(long, "geometry")
    for name in ("joy", "trust"):
        a = next(t for t in fig2.data if t.name == name)
        b = next(t for t in generic.data if t.name == name)
        assert a.line.color == b.line.color == figures.emotion_color(name)
    assert len({figures.emotion_color(n) for n in STUDY_LABELS.names("en")}) == 13
    assert figures.emotion_color("unknown") == figures.emotion_color("unknown")


def test_selectivity_heatmap_is_steered_by_observed_at_the_last_step(sens):
    fig = figures.selectivity_heatmap(sens)
    (hm,) = fig.data
    assert list(hm.y) == list(STEERED)
    assert list(hm.x) == STUDY_LABELS.names("en")
    z = np.array(hm.z, dtype=float)
    assert z.shape == (3, 13)
    mean, _ = slow_diagonal(sens, "sadness", 4, layer=3, alpha=4.0)
    assert z[1, list(hm.x).index("sadness")] == pytest.approx(mean)
    rows = sens[
        (sens.step == 4)
        & (sens.layer == 3)
        & (sens.alpha == 4.0)
        & (sens.steered_emotion == "joy")
        & (sens.observed_label == "fear")
    ]
    assert z[0, list(hm.x).index("fear")] == pytest.approx(rows["logit_change"].mean())
    assert "step 4" in fig.layout.title.text
    assert figures.selectivity_heatmap(sens, step=0, layer=1, alpha=2.0).data[0].z is not None


def test_layer_step_heatmap_is_layer_by_step_of_the_diagonal(sens):
    fig = figures.layer_step_heatmap(sens, "trust")
    (hm,) = fig.data
    assert list(hm.y) == ["1", "3"] and list(hm.x) == ["0", "2", "4"]
    for i, layer in enumerate(LAYERS):
        for j, step in enumerate(STEPS):
            mean, _ = slow_diagonal(sens, "trust", step, layer=layer, alpha=4.0)
            assert hm.z[i][j] == pytest.approx(mean)
    with pytest.raises(ValueError, match="no rows steered with 'fear'"):
        figures.layer_step_heatmap(sens, "fear")


def test_filtering_bars_group_kept_counts_by_step_and_mark_dropped_labels():
    fig = figures.filtering_bars(make_filtering())
    assert [t.name for t in fig.data] == ["step 0", "step 2", "step 4"]
    assert fig.layout.barmode == "group"
    last = fig.data[-1]
    assert list(last.x) == STUDY_LABELS.names("en")
    assert last.y[list(last.x).index("joy")] == 9
    shame = list(last.x).index("shame")
    assert last.text[shame] == "dropped" and last.marker.pattern.shape[shame] == "x"
    assert last.text[list(last.x).index("joy")] == ""
    assert "恥" in last.customdata[shame]


def test_filtering_bars_read_dropped_written_as_text():
    frame = make_filtering()
    frame["dropped"] = frame["dropped"].map({True: "True", False: "False"})
    fig = figures.filtering_bars(frame)
    assert fig.data[0].text.count("dropped") == 1


def test_loss_curve_shows_train_and_eval_loss_and_marks_the_lowest_eval_loss():
    log = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "loss": [3.0, 2.5, 2.0, 1.8],
            "eval_loss": [math.nan, 2.2, math.nan, 2.4],
        }
    )
    fig = figures.loss_curve(log)
    names = [t.name for t in fig.data]
    assert names == ["train loss", "eval loss", "lowest eval loss"]
    assert list(fig.data[1].x) == [2, 4]
    assert list(fig.data[2].x) == [2]
    with pytest.raises(ValueError, match="no loss"):
        figures.loss_curve(pd.DataFrame({"step": [1], "other": [2]}))


def test_accuracy_curve_from_steps_or_accuracy_table():
    fig = figures.accuracy_curve(make_steps())
    assert list(fig.data[0].y) == [0.3, 0.5, 0.6]
    acc = pd.DataFrame({"step": [4, 2], "accuracy": [0.7, 0.6], "n": [10, 10]})
    assert list(figures.accuracy_curve(acc).data[0].x) == [2, 4]


def test_generic_table_figure_draws_a_line_per_group_at_the_final_layer():
    rows = [
        {
            "step": s,
            "layer": layer,
            "emotion": e,
            "prompt": p,
            "cosine": s + layer + (e == "joy") + 0.1 * p,
            "norm": 1.0,
        }
        for s in (0, 2)
        for layer in (1, 3)
        for e in ("joy", "fear")
        for p in range(30)
    ]
    fig = figures.generic_table_figure(pd.DataFrame(rows), "geometry")
    cos = [t for t in fig.data if t.visible is not False]
    assert sorted(t.name for t in cos) == ["fear", "joy"]
    joy = next(t for t in cos if t.name == "joy")
    assert list(joy.x) == [0, 2]
    assert joy.y[1] == pytest.approx(2 + 3 + 1 + 0.1 * 14.5)
    assert "layer 3" in fig.layout.title.text
    (menu,) = fig.layout.updatemenus  # one entry per value column
    assert [b.label for b in menu.buttons] == ["cosine", "norm"]


@pytest.mark.parametrize(
    "frame",
    [
        pd.DataFrame(),
        pd.DataFrame({"a": ["x", "y"], "b": ["1", "2"]}),
        pd.DataFrame({"step": ["zero", "one"], "value": [1.0, 2.0]}),
        pd.DataFrame({"step": [0, 1], "note": ["a", "b"]}),
        pd.DataFrame({"step": [0, 1], "layer": [math.nan, math.nan], "v": [1.0, 2.0]}),
        pd.DataFrame({"step": [0, 0, 1], "flag": [True, False, True], "v": [1.0, math.inf, 3]}),
    ],
)
def test_generic_table_figure_never_fails_on_unexpected_columns(frame):
    fig = figures.generic_table_figure(frame, "odd")
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1


# --------------------------------------------------------------------------------------------
# figures of the explanation analyses, from small planted tables

EMOTIONS = ("joy", "trust")


def make_attribution(steps=STEPS, alphas=ALPHAS, emotions=EMOTIONS, seed=1) -> pd.DataFrame:
    """attribution.csv: direct + scale_change == logit_change; the push parts add up to
    push_change and do not depend on alpha (as the pipeline writes them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in steps:
        for emotion in emotions:
            push = rng.normal(0, 0.1, 3) if step else np.zeros(3)
            for alpha in alphas:
                direct, scale = rng.normal(alpha, 0.5), rng.normal(0, 0.2)
                rows.append(
                    {
                        "step": step,
                        "layer": 3,
                        "emotion": emotion,
                        "alpha": alpha,
                        "logit_change": direct + scale,
                        "direct": direct,
                        "scale_change": scale,
                        "cosine_v_readout": 0.1,
                        "vector_norm": 1.0,
                        "readout_norm": 1.0,
                        "resid_scale": 1.0,
                        "push_change": float(push.sum()),
                        "push_vector": push[0],
                        "push_readout": push[1],
                        "push_scale": push[2],
                    }
                )
    return pd.DataFrame(rows)


def make_transfer(steps=STEPS, emotions=EMOTIONS) -> pd.DataFrame:
    """transfer.csv: the change is 10 * model step + vector step (+ 100 for trust)."""
    return pd.DataFrame(
        [
            {
                "step": t,
                "vector_step": s,
                "emotion": e,
                "alpha": 4.0,
                "layer": 3,
                "logit_change": 10 * t + s + 100 * (e == "trust"),
            }
            for t in steps
            for s in steps
            for e in emotions
        ]
    )


DLA_COMPONENTS = (("mlp 1", 1), ("attn 0", 0), ("embed", -1), ("attn 1", 1), ("mlp 0", 0))


def make_dla(steps=STEPS, labels=EMOTIONS) -> pd.DataFrame:
    """dla.csv with components out of order: logit = step + layer (+ 1 for trust)."""
    return pd.DataFrame(
        [
            {
                "step": step,
                "label": lab,
                "component": comp,
                "kind": comp.split(" ")[0],
                "layer": layer,
                "n_samples": 4,
                "logit": step + layer + (lab == "trust"),
                "margin": -(step + layer),
            }
            for step in steps
            for lab in labels
            for comp, layer in DLA_COMPONENTS
        ]
    )


def make_geometry(steps=STEPS, layers=LAYERS, emotions=EMOTIONS) -> pd.DataFrame:
    rows = []
    for step in steps:
        for layer in layers:
            for inner in ("plain", "causal"):
                off = 0.5 if inner == "causal" else 0.0
                for k, emotion in enumerate(emotions):
                    value = 1.0 - 0.05 * step * (k + 1) - 0.01 * layer + off
                    rows.append(
                        {
                            "step": step,
                            "layer": layer,
                            "measure": "cosine_to_first",
                            "emotion": emotion,
                            "inner": inner,
                            "value": value,
                            "ci_low": value - 0.1,
                            "ci_high": value + 0.05,
                        }
                    )
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "measure": "orthogonality",
                        "emotion": "all",
                        "inner": inner,
                        "value": 0.2 + 0.01 * step + off,
                        "ci_low": math.nan if step == 0 else 0.1,
                        "ci_high": math.nan if step == 0 else 0.4,
                    }
                )
    return pd.DataFrame(rows)


def make_probes(steps=STEPS, layers=LAYERS, labels=("joy", "trust", "no-emotion")) -> pd.DataFrame:
    """probes.csv: own accuracy = 0.5 + 0.1 layer + 0.01 step; the first step's probe loses
    0.02 per step; shuffled 0.1; chance 0.34; per-label recall planted."""
    rows = []

    def add(step, layer, measure, label, value, train_step, lo=-0.05, hi=0.05):
        rows.append(
            {
                "step": step,
                "layer": layer,
                "measure": measure,
                "label": label,
                "value": value,
                "ci_low": value + lo if lo is not None else math.nan,
                "ci_high": value + hi if hi is not None else math.nan,
                "train_step": train_step,
                "n": 30,
            }
        )

    first = steps[0]
    for step in steps:
        for layer in layers:
            add(step, layer, "accuracy", "all", 0.5 + 0.1 * layer + 0.01 * step, step)
            for k, lab in enumerate(labels):
                add(step, layer, "recall", lab, 0.1 * k + 0.1 * layer, step)
            add(step, layer, "train_accuracy", "all", 0.99, step, None, None)
            add(step, layer, "shuffled_accuracy", "all", 0.1, step)
            add(step, layer, "chance", "all", 0.34, step, 0.0, 0.0)
            if step != first:
                add(step, layer, "accuracy", "all", 0.5 + 0.1 * layer - 0.02 * step, first)
                for lab in labels:
                    add(step, layer, "recall", lab, 0.05, first)
    return pd.DataFrame(rows)


def make_random_baseline(steps=STEPS, emotions=EMOTIONS, alphas=ALPHAS) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "step": step,
                "layer": 3,
                "emotion": e,
                "alpha": a,
                "logit_change_concept": a * (2 - 0.1 * step),
                "concept_ci_low": a * (2 - 0.1 * step) - 0.3,
                "concept_ci_high": a * (2 - 0.1 * step) + 0.3,
                "logit_change_random_mean": 0.01 * a,
                "logit_change_random_sd": 0.2,
                "share_random_at_least_concept": 0.0,
                "n_random": 99,
                "p_random": 0.01 if k == 0 else 0.4,
                "q_random": 0.02 if k == 0 else 0.4,
                "logit_change_shuffled_mean": 0.001 * a,
                "logit_change_shuffled_sd": 0.05,
                "n_shuffled": 99,
                "p_shuffled": 0.01,
                "q_shuffled": 0.01,
            }
            for step in steps
            for k, e in enumerate(emotions)
            for a in alphas
        ]
    )


def _test_row(flag: bool, equivalent: bool, tested: bool = True, step: int = 8) -> dict:
    p = (0.001 if flag else 0.6) if tested else math.nan
    return {
        "family": "",
        "first_step": 0,
        "step": step,
        "first_value": 0.9,
        "value": 0.6 if flag else 0.89,
        "effect": -0.3 if flag else -0.01,
        "effect_ci_low": -0.35 if flag else -0.03,
        "effect_ci_high": -0.25 if flag else 0.01,
        "p": p,
        "q": p * 2 if tested else math.nan,
        "fdr_change": flag,
        "test": "paired bootstrap",
        "paired": True,
        "n_resamples": 200,
        "equivalence_margin": 0.05,
        "margin_rule": "absolute: 0.05",
        "equivalence_p": 0.01 if equivalent else 0.4,
        "equivalent_within_margin": equivalent,
    }


def make_change_summary() -> pd.DataFrame:
    """change_summary.csv, two later steps per series: 3 of 4 cosine_to_first (plain) series
    changed (q < .05) at step 16, the fourth equivalent; causal: 2 equivalent, 2 inconclusive;
    probes: one recall series of the step-0 probe changed, one own recall inconclusive;
    train_accuracy and chance have no test."""
    rows = []
    geometry = (
        ("plain", (True, True, True, False), (False, False, False, True)),
        ("causal", (False,) * 4, (True, True, False, False)),
    )
    for inner, flags, equivalents in geometry:
        for (layer, emotion), flag, eq in zip(
            [(1, "joy"), (1, "trust"), (3, "joy"), (3, "trust")], flags, equivalents, strict=True
        ):
            for step in (8, 16):
                rows.append(
                    {
                        "table": "geometry",
                        "layer": layer,
                        "measure": "cosine_to_first",
                        "emotion": emotion,
                        "inner": inner,
                        **_test_row(flag and step == 16, eq, step=step),
                        "family": "geometry",
                    }
                )
    for measure, probe, flag, tested in (
        ("recall", "step 0", True, True),
        ("recall", "own", False, True),
        ("train_accuracy", "own", False, False),
        ("chance", "own", False, False),
    ):
        rows.append(
            {
                "table": "probes",
                "layer": 3,
                "measure": measure,
                "label": "joy" if measure == "recall" else "all",
                "probe": probe,
                **_test_row(flag, False, tested),
                "family": "probes",
            }
        )
    return pd.DataFrame(rows)


def make_figure2_bands(steps=STEPS, layer=3, alpha=4.0) -> pd.DataFrame:
    """figure2_bands.csv at the final layer and largest alpha: a band of +-0.5 around a value."""
    rows = []
    for step in steps:
        for k, emotion in enumerate(STEERED):
            value = 2.0 + k - 0.1 * step
            rows.append(
                {"step": step, "layer": layer, "emotion": emotion, "alpha": alpha,
                 "value": value, "ci_low": value - 0.5, "ci_high": value + 0.5, "n_boot": 200}
            )  # fmt: skip
    return pd.DataFrame(rows)


def make_sensitivity_trends(alpha=4.0) -> pd.DataFrame:
    """sensitivity_trends.csv: joy fell (q .01), trust rose (q .02), sadness not shown."""
    rows = []
    for emotion, effect, q in (("joy", -1.0, 0.01), ("sadness", -0.1, 0.4), ("trust", 0.8, 0.02)):
        rows.append(
            {"emotion": emotion, "alpha": alpha, "layer": 3, "first_step": 0, "last_step": 4,
             "paired": True, "first_last_effect": effect, "first_last_ci_low": effect - 0.3,
             "first_last_ci_high": effect + 0.3, "first_last_p": q / 2, "first_last_q": q,
             "slope_per_step": effect / 4, "slope_ci_low": effect / 4 - 0.1,
             "slope_ci_high": effect / 4 + 0.1, "slope_p": q / 2, "slope_q": q,
             "method": "jackknife t", "joint_first_last_p": 0.003}
        )  # fmt: skip
    return pd.DataFrame(rows)


def test_figure2_draws_the_two_level_bands_of_the_plotted_layer_and_alpha(sens):
    bands = make_figure2_bands()
    fig = figures.figure2(sens, bands=bands)
    filled = [t for t in fig.data if t.fill == "toself"]
    assert sorted(t.meta for t in filled) == sorted(STEERED)
    joy = next(t for t in filled if t.meta == "joy")
    rows = bands[bands.emotion == "joy"].sort_values("step")
    assert list(joy.x) == rows.step.tolist() + rows.step.tolist()[::-1]
    assert list(joy.y) == rows.ci_high.tolist() + rows.ci_low.tolist()[::-1]
    # another layer or alpha has no band here
    assert not [t for t in figures.figure2(sens, layer=1, bands=bands).data if t.fill == "toself"]
    assert not [t for t in figures.figure2(sens, alpha=2.0, bands=bands).data if t.fill]


def _of(fig, emotion, name=None):
    return [t for t in fig.data if t.meta == emotion and (name is None or t.name == name)]


def test_attribution_figure_stacks_direct_and_scale_parts_under_the_measured_change():
    attr = make_attribution()
    fig = figures.attribution_figure(attr)
    assert fig.layout.barmode == "relative"
    assert "α = 4" in fig.layout.title.text and "layer 3" in fig.layout.title.text
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["joy (喜び)", "trust (信頼)"]
    for emotion in EMOTIONS:
        direct = next(t for t in _of(fig, emotion) if t.legendgroup == "direct")
        scale = next(t for t in _of(fig, emotion) if t.legendgroup == "scale_change")
        (line,) = _of(fig, emotion, "measured logit change")
        assert list(direct.x) == list(STEPS) and direct.type == "bar"
        for i, step in enumerate(STEPS):
            rows = [
                r
                for _, r in attr.iterrows()
                if r.emotion == emotion and r.step == step and r.alpha == 4.0
            ]
            assert direct.y[i] == pytest.approx(rows[0]["direct"])
            assert scale.y[i] == pytest.approx(rows[0]["scale_change"])
            assert line.y[i] == pytest.approx(direct.y[i] + scale.y[i])
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert len(legend) == 3  # one legend entry per part, not per panel
    two = figures.attribution_figure(attr, alpha=2)
    joy = next(t for t in _of(two, "joy") if t.legendgroup == "direct")
    expect = attr[(attr.emotion == "joy") & (attr.alpha == 2.0)].sort_values("step")
    assert list(joy.y) == pytest.approx(expect["direct"].tolist())


def test_push_change_figure_splits_the_push_into_vector_readout_and_scale():
    attr = make_attribution()
    fig = figures.push_change_figure(attr)
    for emotion in EMOTIONS:
        traces = {t.legendgroup: t for t in _of(fig, emotion)}
        assert set(traces) == {"push_vector", "push_readout", "push_scale", "push_change"}
        for i, step in enumerate(STEPS):
            rows = attr[(attr.emotion == emotion) & (attr.step == step)]
            for part in ("push_vector", "push_readout", "push_scale", "push_change"):
                assert traces[part].y[i] == pytest.approx(sum(rows[part]) / len(rows))
        total = sum(traces[p].y[-1] for p in ("push_vector", "push_readout", "push_scale"))
        assert total == pytest.approx(traces["push_change"].y[-1])
    with pytest.raises(ValueError, match="push_vector"):
        figures.push_change_figure(attr.drop(columns="push_vector"))


def test_transfer_heatmap_is_model_step_by_vector_step_mean_over_emotions_by_default():
    tr = make_transfer()
    fig = figures.transfer_heatmap(tr)
    names = [t.name for t in fig.data]
    assert names == ["mean over emotions", "joy", "trust"]
    assert [t.visible for t in fig.data] == [True, False, False]
    mean = fig.data[0]
    assert list(mean.y) == ["0", "2", "4"] and list(mean.x) == ["0", "2", "4"]
    for i, t in enumerate(STEPS):
        for j, s in enumerate(STEPS):
            assert mean.z[i][j] == pytest.approx(10 * t + s + 50)  # (joy + trust) / 2
            assert fig.data[2].z[i][j] == pytest.approx(10 * t + s + 100)
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == names
    assert menu.buttons[2].args[0]["visible"] == [False, False, True]
    chosen = figures.transfer_heatmap(tr, emotion="trust")
    assert [t.visible for t in chosen.data] == [False, False, True]
    with pytest.raises(ValueError, match="no transfer rows for 'fear'"):
        figures.transfer_heatmap(tr, emotion="fear")


def test_dla_figure_orders_components_by_depth_and_averages_labels():
    dla = make_dla()
    fig = figures.dla_figure(dla)
    mean = fig.data[0]
    assert mean.name == "mean over labels" and mean.visible
    assert list(mean.y) == ["embed", "attn 0", "mlp 0", "attn 1", "mlp 1"]
    layer = {c: lay for c, lay in DLA_COMPONENTS}
    for i, comp in enumerate(mean.y):
        for j, step in enumerate(STEPS):
            assert mean.z[i][j] == pytest.approx(step + layer[comp] + 0.5)
    trust = figures.dla_figure(dla, label="trust")
    shown = [t for t in trust.data if t.visible]
    assert [t.name for t in shown] == ["trust"]
    assert shown[0].z[0][0] == pytest.approx(0 - 1 + 1)
    margin = figures.dla_figure(dla, value="margin")
    assert margin.data[0].z[4][2] == pytest.approx(-(4 + 1))
    assert "margin" in margin.layout.title.text
    with pytest.raises(ValueError, match="'logit' or 'margin'"):
        figures.dla_figure(dla, value="bogus")


def test_geometry_figure_draws_a_line_and_an_interval_band_per_emotion():
    geo = make_geometry()
    fig = figures.geometry_figure(geo, "cosine_to_first")
    assert "layer 3" in fig.layout.title.text and "plain" in fig.layout.title.text
    for k, emotion in enumerate(EMOTIONS):
        band, line = _of(fig, emotion)
        assert band.fill == "toself" and band.showlegend is False
        values = [1.0 - 0.05 * s * (k + 1) - 0.03 for s in STEPS]
        assert list(line.x) == list(STEPS)
        assert list(line.y) == pytest.approx(values)
        hi = [v + 0.05 for v in values]
        lo = [v - 0.1 for v in values]
        assert list(band.x) == list(STEPS) + list(STEPS)[::-1]
        assert list(band.y) == pytest.approx(hi + lo[::-1])
        assert line.line.color == figures.emotion_color(emotion)
    causal = figures.geometry_figure(geo, "cosine_to_first", inner="causal", layer=1)
    joy = _of(causal, "joy")[-1]
    assert joy.y[0] == pytest.approx(1.0 - 0.01 + 0.5)
    ortho = figures.geometry_figure(geo, "orthogonality")
    band, line = _of(ortho, "all")
    assert list(band.x) == [2, 4, 4, 2]  # the first step has no interval
    with pytest.raises(ValueError, match="no measure 'bogus'.*cosine_to_first, orthogonality"):
        figures.geometry_figure(geo, "bogus")


def test_probes_figure_has_an_all_layers_view_and_a_detailed_view_per_layer():
    pr = make_probes()
    fig = figures.probes_figure(pr)
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == ["all layers", "layer 1", "layer 3"]
    shown = [t for t in fig.data if t.visible]
    assert [t.name for t in shown] == ["layer 1", "layer 3", "chance"]
    assert list(shown[1].y) == pytest.approx([0.5 + 0.3 + 0.01 * s for s in STEPS])
    assert list(shown[2].y) == pytest.approx([0.34] * 3) and shown[2].line.dash == "dash"
    detail = figures.probes_figure(pr, layer=1)
    lines = {t.name: t for t in detail.data if t.visible and t.fill != "toself"}
    assert set(lines) == {"own probe", "step-0 probe", "shuffled labels", "chance"}
    assert list(lines["own probe"].y) == pytest.approx([0.6 + 0.01 * s for s in STEPS])
    # the first step's probe: its own score at the first step, then the planted decline
    assert list(lines["step-0 probe"].y) == pytest.approx([0.6, 0.6 - 0.04, 0.6 - 0.08])
    assert lines["step-0 probe"].line.dash == "dashdot"
    assert list(lines["shuffled labels"].y) == pytest.approx([0.1] * 3)
    bands = [t for t in detail.data if t.visible and t.fill == "toself"]
    assert len(bands) == 3  # own, step-0 and shuffled have intervals; chance has none drawn
    single = figures.probes_figure(pr[pr.layer == 3])
    assert not single.layout.updatemenus
    with pytest.raises(ValueError, match="no probe at layer 7"):
        figures.probes_figure(pr, layer=7)


def test_random_baseline_figure_shows_concept_against_random_mean_and_sd():
    rb = make_random_baseline()
    fig = figures.random_baseline_figure(rb)
    assert "α = 4" in fig.layout.title.text
    for emotion in EMOTIONS:
        traces = {t.name: t for t in _of(fig, emotion)}
        concept = traces["concept vector"]
        assert list(concept.y) == pytest.approx([4 * (2 - 0.1 * s) for s in STEPS])
        rand = traces["random directions (mean ± sd)"]
        assert list(rand.y) == pytest.approx([0.04] * 3)
        band = traces["random ± sd"]
        assert list(band.y) == pytest.approx([0.24] * 3 + [-0.16] * 3)
        assert list(traces["shuffled-label vectors (mean)"].y) == pytest.approx([0.004] * 3)
        assert concept.line.color == figures.emotion_color(emotion)


def test_change_summary_counts_per_family_and_table():
    counts = change_summary_counts(make_change_summary())
    by = {(r.table, r.measure, r.variant): r for r in counts.itertuples()}
    plain = by[("geometry", "cosine_to_first", "plain")]
    assert (plain.n_series, plain.n_tested, plain.n_changed) == (4, 4, 3)
    assert (plain.n_equivalent, plain.n_inconclusive) == (1, 0)
    assert plain.changed_layers == "1, 3"
    assert plain.changed_series == "joy @ 1, trust @ 1, joy @ 3"
    assert plain.max_abs_effect == pytest.approx(0.3)
    causal = by[("geometry", "cosine_to_first", "causal")]
    assert (causal.n_changed, causal.n_equivalent, causal.n_inconclusive) == (0, 2, 2)
    assert by[("probes", "recall", "step 0")].n_changed == 1
    assert by[("probes", "recall", "own")].n_inconclusive == 1
    assert by[("probes", "train_accuracy", "own")].n_tested == 0
    assert by[("probes", "chance", "own")].n_tested == 0
    assert plain.margin_rule == "absolute: 0.05"
    fig = figures.change_summary_table(make_change_summary())
    (table,) = fig.data
    assert list(table.cells.values[1]) == counts["measure"].tolist()
    assert list(table.cells.values[4]) == [3, 0, 1, 0, 0, 0]


def test_layer_summary_figure_writes_the_layer_in_each_cell():
    summary = pd.DataFrame(
        {
            "step": [0, 0, 4, 4],
            "emotion": ["trust", "joy", "trust", "joy"],
            "most_steerable_layer": [3, 2, 3, 1],
            "max_effect": [1.0, 2.0, 3.0, 4.0],
            "most_decodable_layer": [1, pd.NA, 2, 2],
            "recall": [0.5, 0.0, 0.6, 0.7],
        }
    )
    fig = figures.layer_summary_figure(summary)
    steer, decode = fig.data
    assert list(steer.y) == ["joy", "trust"] and list(steer.x) == ["0", "4"]
    assert [list(r) for r in steer.z] == [[2, 1], [3, 3]]
    assert [list(r) for r in decode.text] == [["", "2"], ["1", "2"]]
    assert decode.zmin == 1 and decode.zmax == 3
    only = figures.layer_summary_figure(summary.drop(columns=["most_decodable_layer", "recall"]))
    assert len(only.data) == 1


def test_layer_step_heatmaps_of_probes_and_geometry():
    pr = make_probes()
    fig = figures.probes_layer_heatmap(pr)
    acc = fig.data[0]
    assert acc.name == "accuracy" and list(acc.y) == ["1", "3"]  # the first row is drawn lowest
    assert acc.z[1][2] == pytest.approx(0.5 + 0.3 + 0.04)
    assert [t.name for t in fig.data] == [
        "accuracy",
        "recall: joy",
        "recall: trust",
        "recall: no-emotion",
    ]
    trust = figures.probes_layer_heatmap(pr, label="trust")
    shown = next(t for t in trust.data if t.visible)
    assert shown.z[0][0] == pytest.approx(0.1 + 0.1)
    geo = figures.geometry_layer_heatmap(make_geometry(), "cosine_to_first", emotion="trust")
    shown = next(t for t in geo.data if t.visible)
    assert shown.name == "trust" and shown.z[1][1] == pytest.approx(1.0 - 0.2 - 0.03)


def test_localisation_heatmap_has_one_cell_per_window_and_step():
    from emolens.report.figures import localisation_heatmap

    table = pd.DataFrame(
        {
            "step": [0, 0, 8, 8],
            "start_layer": [0, 1, 0, 1],
            "end_layer": [1, 2, 1, 2],
            "gold_logit_drop": [0.5, 1.5, 0.25, 2.0],
        }
    )
    fig = localisation_heatmap(table)
    z = fig.data[0].z
    assert list(fig.data[0].y) == ["layers 0-1", "layers 1-2"]
    assert z[1][1] == 2.0 and z[0][1] == 0.25
