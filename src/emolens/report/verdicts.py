"""The report's scientific verdict sentences, from analysis results: steering sensitivity at the
last step against the base model, which part drives the change of the push, and what the change
tests (``change_summary.csv`` counted per family) say about the paper's claim of an unchanged
geometry. Plain text or small HTML fragments; :mod:`emolens.report.page` places them."""

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from emolens.analysis.frames import label_order, steps_of
from emolens.analysis.sensitivity import Selection
from emolens.report import figures
from emolens.report.markup import escape, names, note

#: The false discovery rate level of ``change_summary.csv``'s ``fdr_change``.
FDR_LEVEL = 0.05


def _trend_rows(trends: pd.DataFrame | None, sel: Selection, last: int) -> pd.DataFrame | None:
    """``sensitivity_trends.csv``'s rows (by emotion) for the shown slice: the same layer and
    alpha, the logit change, first step 0 and last step ``last``; None where it has none."""
    need = {"emotion", "alpha", "layer", "first_step", "last_step", "first_last_q"}
    if trends is None or not need <= set(trends.columns) or sel.measure != "logit_change":
        return None
    rows = trends[
        (trends["layer"] == sel.layer)
        & np.isclose(
            trends["alpha"].astype(float), float(sel.alpha if sel.alpha is not None else np.nan)
        )
        & (trends["first_step"] == 0)
        & (trends["last_step"] == last)
    ]
    return rows.set_index("emotion") if len(rows) else None


def sensitivity_verdict(
    summary: pd.DataFrame,
    sel: Selection,
    ja: Mapping[str, str],
    trends: pd.DataFrame | None = None,
) -> str:
    """One line per emotion (HTML): is its sensitivity at the last step above or below the
    base model's? ``summary``, ``sel``: :func:`emolens.analysis.sensitivity.diagonal_summary`.
    Where ``trends`` (``sensitivity_trends.csv``) tests the shown slice, the verdict is its
    calibrated first-vs-last test (rose / fell at q < :data:`FDR_LEVEL`, else not shown to
    have changed); elsewhere the lines only describe the difference, with two prompt-level
    standard errors as a caveat, and say that no test backs them."""
    steps = sorted(int(s) for s in summary["step"].unique())
    last = steps[-1]
    if 0 not in steps:
        return note(
            f"The results have no base model (step 0), so sensitivity at step {last} "
            "cannot be compared with the base model's."
        )
    if last == 0:
        return note(
            "Only the base model (step 0) was analysed; there is no later step to compare with."
        )
    tested = _trend_rows(trends, sel, last)
    if tested is not None:
        return _tested_verdict(summary, sel, ja, tested, last)
    items, above, below = [], [], []
    for emotion in label_order(summary["emotion"]):
        rows = summary[summary["emotion"] == emotion].set_index("step")
        name = escape(figures.display_name(emotion, ja))
        if 0 not in rows.index or last not in rows.index:
            missing = 0 if 0 not in rows.index else last
            items.append(f"<li>{name}: not measured at step {missing}.</li>")
            continue
        base, end = rows.loc[0], rows.loc[last]
        diff = float(end["mean"] - base["mean"])
        se = math.sqrt(np.nansum([base["se"] ** 2, end["se"] ** 2]))
        word = "above" if diff > 0 else "below" if diff < 0 else "equal to"
        if diff > 0:
            above.append(emotion)
        elif diff < 0:
            below.append(emotion)
        caveat = (
            " — within two standard errors, so not clearly different"
            if se > 0 and abs(diff) < 2 * se
            else ""
        )
        items.append(
            f"<li>{name}: {end['mean']:.4g} at step {last} vs {base['mean']:.4g} at the base "
            f'model: <span class="{word.split()[0]}">{word}</span> the base model '
            f"({diff:+.4g}){escape(caveat)}.</li>"
        )
    sentence = (
        f"At the last step ({last}), steering sensitivity ({escape(sel.describe())}) is "
        f"above the base model's for {escape(', '.join(above) or 'no emotion')} and below "
        f"it for {escape(', '.join(below) or 'no emotion')} (point estimates: no change test "
        "covers this layer and alpha; see the sensitivity trends for the tested ones)."
    )
    return f"<p>{sentence}</p><ul>{''.join(items)}</ul>"


def _tested_verdict(
    summary: pd.DataFrame, sel: Selection, ja: Mapping[str, str], tested: pd.DataFrame, last: int
) -> str:
    """The per-emotion lines of :func:`sensitivity_verdict` from the trend tests' q."""
    items: list[str] = []
    rose: list[str] = []
    fell: list[str] = []
    unclear: list[str] = []
    for emotion in label_order(summary["emotion"]):
        rows = summary[summary["emotion"] == emotion].set_index("step")
        name = escape(figures.display_name(emotion, ja))
        if emotion not in tested.index or 0 not in rows.index or last not in rows.index:
            items.append(f"<li>{name}: not tested.</li>")
            continue
        q = float(tested.loc[emotion, "first_last_q"])
        diff = float(rows.loc[last, "mean"] - rows.loc[0, "mean"])
        if q < FDR_LEVEL and diff != 0:
            word = "above" if diff > 0 else "below"
            (rose if diff > 0 else fell).append(emotion)
            said = f'<span class="{word}">{word}</span> the base model (q = {q:.2g})'
        else:
            unclear.append(emotion)
            said = f"not shown to differ from the base model (q = {q:.2g})"
        items.append(
            f"<li>{name}: {rows.loc[last, 'mean']:.4g} at step {last} vs "
            f"{rows.loc[0, 'mean']:.4g} at the base model ({diff:+.4g}): {said}.</li>"
        )
    sentence = (
        f"At the last step ({last}), steering sensitivity ({escape(sel.describe())}) is "
        f"above the base model's for {escape(', '.join(rose) or 'no emotion')} and below it "
        f"for {escape(', '.join(fell) or 'no emotion')} (first-vs-last jackknife t test, q < "
        f"{FDR_LEVEL:g} after Benjamini-Hochberg across emotions); "
        f"{escape(', '.join(unclear) or 'no emotion')}: not shown to differ, which is not "
        "evidence that they kept their sensitivity."
    )
    return f"<p>{sentence}</p><ul>{''.join(items)}</ul>"


def push_verdict(frame: pd.DataFrame) -> str:
    """Which part dominates each emotion's change of the push at the last step (HTML), from
    ``attribution.csv`` rows."""
    parts = [p for p, _, _ in figures.PUSH_PARTS]
    part_names = {p: n for p, n, _ in figures.PUSH_PARTS}
    means = frame.groupby(["emotion", "step"])[["push_change", *parts]].mean().reset_index()
    steps = steps_of(means)
    if len(steps) < 2:
        return note("One step only: nothing to compare the push with.")
    last = means[means["step"] == steps[-1]].dropna(subset=["push_change"])
    fell: list[str] = []
    rose: list[str] = []
    for emotion in label_order(last["emotion"]):
        row = last[last["emotion"] == emotion].iloc[0]
        total = float(row["push_change"])
        if total == 0:
            continue
        # the part that moved the push furthest in the direction it went
        part = max(parts, key=lambda p: float(row[p]) * np.sign(total))
        (fell if total < 0 else rose).append(f"{emotion} ({part_names[part]}, {total:+.3g})")
    return (
        f"<p>From step {steps[0]} to step {steps[-1]} the per-unit push fell for "
        f"{escape(names(fell))}; it rose for {escape(names(rose))} (in brackets: the largest part "
        "in that direction, and the total change).</p>"
    )


def margin_text(rules: pd.Series) -> str:
    """The equivalence margins stated in ``margin_rule`` values, joined."""
    found = sorted({r for text in rules.dropna() for r in str(text).split("; ") if r})
    return "; ".join(found) if found else "not stated"


def change_sentences(counts: pd.DataFrame, top: int | None = None) -> list[str]:
    """One sentence per table (geometry, probes, sensitivity): how many series changed (q
    below the level, BH within the family), how many are equivalent within the margin (TOST)
    and how many neither, with the families that changed (only the ``top`` most changed, by
    share, if given). ``counts``: :func:`emolens.analysis.change_summary.change_summary_counts`."""
    out = []
    what = {
        "geometry": "geometry series (measure × emotion × layer × inner product)",
        "probes": "probe series (measure × label × layer × probe)",
        "sensitivity": "sensitivity series (emotion × layer × alpha)",
    }
    for table, g in counts.groupby("table", sort=False):
        g = g[g["n_tested"] > 0]
        m = int(g["n_tested"].sum())
        if m == 0:
            out.append(f"No {what.get(table, table + ' series')} could be tested.")
            continue
        n, k = int(g["n_changed"].sum()), int(g["n_equivalent"].sum())
        rest = int(g["n_inconclusive"].sum())
        hit = g[g["n_changed"] > 0]
        if top is not None:
            share = hit["n_changed"] / hit["n_tested"]
            hit = hit.assign(_s=share).sort_values("_s", ascending=False, kind="stable")
        changed = [
            f"{r.measure}{' (' + r.variant + ')' if r.variant else ''} {r.n_changed} of "
            f"{r.n_tested}"
            for r in hit.itertuples()
        ]
        if top is not None and len(changed) > top:
            changed = changed[:top] + [f"{len(changed) - top} more families"]
        sentence = (
            f"{n} of {m} {what.get(table, table + ' series')} changed from the first step at "
            f"some later step (paired test, q < {FDR_LEVEL:g} after Benjamini-Hochberg within "
            f"the {table} family)"
        )
        sentence += f": {'; '.join(changed)}." if changed else "."
        sentence += (
            f" {k} are equivalent to the first step within their margin at every step (TOST; "
            f"margin {margin_text(g['margin_rule'])}); {rest} are inconclusive: neither a "
            "change nor equivalence is shown."
        )
        out.append(sentence)
    return out


def change_verdict(counts: pd.DataFrame) -> str:
    """The paper found no significant change of the geometry: what the tests here say about
    that claim. Agreement is stated only from TOST, never from the absence of a flag."""
    geo = counts[(counts["table"] == "geometry") & (counts["n_tested"] > 0)]
    if geo.empty:
        return ""
    m = int(geo["n_tested"].sum())
    n, k = int(geo["n_changed"].sum()), int(geo["n_equivalent"].sum())
    margin = margin_text(geo["margin_rule"])
    if n:
        return (
            f"The paper found no significant change of the geometry after fine-tuning; here "
            f"{n} of {m} geometry series changed (q < {FDR_LEVEL:g}; see the table)."
        )
    if k == m:
        return (
            f"No geometry series changed, and all {m} are equivalent to the first step within "
            f"their margin ({margin}; TOST): consistent with the paper's finding of no "
            "significant change of the geometry, at that margin."
        )
    return (
        f"No geometry series changed significantly, but {m - k} of {m} are not shown "
        f"equivalent within the margin ({margin}) either. No significant change is not "
        "evidence of no change: this neither confirms nor contradicts the paper's finding "
        "(more samples, or a wider margin stated in advance, would be needed)."
    )


__all__ = [
    "FDR_LEVEL",
    "change_sentences",
    "change_verdict",
    "margin_text",
    "push_verdict",
    "sensitivity_verdict",
]
