"""Figures from small synthetic result tables, checked against numbers computed the slow way."""

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from emolens import plots
from emolens.labels import STUDY_LABELS

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
    fig = plots.figure2(sens)
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
    fig = plots.figure2(sens, layer=1, alpha=2, measure="logprob_change")
    joy = next(t for t in fig.data if t.name == "joy")
    mean, _ = slow_diagonal(sens, "joy", 4, layer=1, alpha=2.0, measure="logprob_change")
    assert joy.y[-1] == pytest.approx(mean)
    assert "layer 1" in fig.layout.title.text and "logprob_change" in fig.layout.title.text


def test_figure2_draws_eval_loss_on_a_second_axis_only_when_there_is_some(sens):
    fig = plots.figure2(sens, steps_table=make_steps())
    ev = [t for t in fig.data if t.name == "eval loss"]
    assert len(ev) == 1
    assert ev[0].yaxis == "y2" and ev[0].line.dash == "dash"
    assert list(ev[0].x) == [2, 4] and list(ev[0].y) == [2.0, 1.5]
    assert fig.layout.yaxis2.overlaying == "y"
    none = plots.figure2(sens, steps_table=make_steps(eval_loss=(math.nan,) * 3))
    assert not any(t.name == "eval loss" for t in none.data)


def test_figure2_hover_names_the_emotion_in_japanese_too(sens):
    fig = plots.figure2(sens)
    joy = next(t for t in fig.data if t.name == "joy")
    assert "喜び" in joy.hovertemplate


def test_figure2_prefers_absolute_alpha_when_both_units_are_present():
    mixed = make_sensitivity(units=("absolute", "norm"), steps=(0, 2))
    mixed.loc[mixed["alpha_unit"] == "norm", "logit_change"] += 100.0
    fig = plots.figure2(mixed)
    assert "(absolute)" in fig.layout.title.text
    assert max(max(t.y) for t in _emotion_traces(fig)) < 50
    norm = plots.figure2(mixed, alpha_unit="norm")
    assert min(min(t.y) for t in _emotion_traces(norm)) > 50


def test_figure2_errors_name_what_is_present(sens):
    with pytest.raises(ValueError, match="layer = 7; present: 1, 3"):
        plots.figure2(sens, layer=7)
    with pytest.raises(ValueError, match="no measure 'bogus'"):
        plots.figure2(sens, measure="bogus")
    with pytest.raises(ValueError, match="lacks the column"):
        plots.figure2(sens.drop(columns="prompt_id"))
    off_diagonal = sens[sens["steered_emotion"] != sens["observed_label"]]
    with pytest.raises(ValueError, match="no diagonal rows"):
        plots.figure2(off_diagonal)


def test_emotions_keep_one_colour_across_figures(sens):
    fig2 = plots.figure2(sens)
    long = pd.DataFrame(
        {
            "step": [0, 2, 0, 2],
            "emotion": ["joy", "joy", "trust", "trust"],
            "cosine": [1.0, 0.9, 1.0, 0.8],
        }
    )
    generic = plots.generic_table_figure(long, "geometry")
    for name in ("joy", "trust"):
        a = next(t for t in fig2.data if t.name == name)
        b = next(t for t in generic.data if t.name == name)
        assert a.line.color == b.line.color == plots.emotion_color(name)
    assert len({plots.emotion_color(n) for n in STUDY_LABELS.names("en")}) == 13
    assert plots.emotion_color("unknown") == plots.emotion_color("unknown")


def test_selectivity_heatmap_is_steered_by_observed_at_the_last_step(sens):
    fig = plots.selectivity_heatmap(sens)
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
    assert plots.selectivity_heatmap(sens, step=0, layer=1, alpha=2.0).data[0].z is not None


def test_layer_step_heatmap_is_layer_by_step_of_the_diagonal(sens):
    fig = plots.layer_step_heatmap(sens, "trust")
    (hm,) = fig.data
    assert list(hm.y) == ["1", "3"] and list(hm.x) == ["0", "2", "4"]
    for i, layer in enumerate(LAYERS):
        for j, step in enumerate(STEPS):
            mean, _ = slow_diagonal(sens, "trust", step, layer=layer, alpha=4.0)
            assert hm.z[i][j] == pytest.approx(mean)
    with pytest.raises(ValueError, match="no rows steered with 'fear'"):
        plots.layer_step_heatmap(sens, "fear")


def test_filtering_bars_group_kept_counts_by_step_and_mark_dropped_labels():
    fig = plots.filtering_bars(make_filtering())
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
    fig = plots.filtering_bars(frame)
    assert fig.data[0].text.count("dropped") == 1


def test_loss_curve_shows_train_and_eval_loss_and_marks_the_lowest_eval_loss():
    log = pd.DataFrame(
        {
            "step": [1, 2, 3, 4],
            "loss": [3.0, 2.5, 2.0, 1.8],
            "eval_loss": [math.nan, 2.2, math.nan, 2.4],
        }
    )
    fig = plots.loss_curve(log)
    names = [t.name for t in fig.data]
    assert names == ["train loss", "eval loss", "lowest eval loss"]
    assert list(fig.data[1].x) == [2, 4]
    assert list(fig.data[2].x) == [2]
    with pytest.raises(ValueError, match="no loss"):
        plots.loss_curve(pd.DataFrame({"step": [1], "other": [2]}))


def test_accuracy_curve_from_steps_or_accuracy_table():
    fig = plots.accuracy_curve(make_steps())
    assert list(fig.data[0].y) == [0.3, 0.5, 0.6]
    acc = pd.DataFrame({"step": [4, 2], "accuracy": [0.7, 0.6], "n": [10, 10]})
    assert list(plots.accuracy_curve(acc).data[0].x) == [2, 4]


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
    fig = plots.generic_table_figure(pd.DataFrame(rows), "geometry")
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
    fig = plots.generic_table_figure(frame, "odd")
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1
