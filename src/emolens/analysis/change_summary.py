"""Tests of change from the first step, per measure series, and their counts per family.

:func:`change_summary`: a paired test of each later step against the first from a long
table's bootstrap replicates (:class:`~emolens.analysis._common.Replicates` of
:func:`~emolens.analysis.geometry_tables.geometry_frame` or
:func:`~emolens.analysis.probe_tables.probes_frame`), BH within the measure family, TOST against
a stated margin (see :mod:`emolens.analysis.change_tests`); :func:`sensitivity_change_summary`
the same for steering sensitivity by sign flips over prompts; :func:`change_omnibus` one
joint test per group of series (every emotion of one measure and layer) and step;
:func:`change_summary_counts` counts changed, equivalent and inconclusive series per family
(``change_summary.csv`` rows in, the report's table and verdicts out).
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from emolens.analysis import change_tests
from emolens.analysis._common import Replicates
from emolens.analysis.frames import as_bool, format_value, require_columns
from emolens.analysis.geometry_tables import CROSS_STEP_MEASURES

#: Columns that are not part of a series' identity in :func:`change_summary`.
NON_KEY_COLUMNS = (
    "step",
    "value",
    "ci_low",
    "ci_high",
    "train_step",
    "n",
    "refit_ci_low",
    "refit_ci_high",
)


def _series_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Add a ``probe`` column to a probes frame (``own``, or ``step S`` for a probe trained at
    step S evaluated elsewhere), with the training step's own rows copied into each such
    series as its first point."""
    if "train_step" not in frame.columns:
        return frame
    df = frame.copy()
    own = df.train_step == df.step
    df["probe"] = np.where(own, "own", "step " + df.train_step.astype(str))
    extra = []
    for s in sorted(df.loc[~own, "train_step"].unique()):
        measures = df.loc[~own & (df.train_step == s), "measure"].unique()
        ref = df[own & (df.step == s) & df.measure.isin(measures)].copy()
        ref["probe"] = f"step {s}"
        extra.append(ref)
    return pd.concat([df, *extra], ignore_index=True) if extra else df


#: Columns of :func:`change_summary` after the series keys.
CHANGE_COLUMNS = (
    "family",
    "first_step",
    "step",
    "first_value",
    "value",
    "effect",
    "effect_ci_low",
    "effect_ci_high",
    "p",
    "q",
    "fdr_change",
    "test",
    "paired",
    "n_resamples",
    "equivalence_margin",
    "margin_rule",
    "equivalence_p",
    "equivalent_within_margin",
)


def change_summary(
    frame: pd.DataFrame,
    replicates: Replicates,
    measure_cols: Sequence[str] | None = None,
    family: str | None = None,
    ci: float = 0.95,
    fdr_level: float = 0.05,
    equivalence_margin: float = change_tests.DEFAULT_EQUIVALENCE_MARGIN,
    equivalence_level: float = 0.05,
    seed: int = 0,
    cross_step: pd.DataFrame | None = None,
    p_method: str = "count",
) -> pd.DataFrame:
    """Per measure series and later step: a test of the change from the first step.

    ``frame``: a :func:`geometry_frame` or :func:`probes_frame` table (or both concatenated
    with their ``replicates`` in the same order, ``Replicates.concat``), ``replicates`` the
    :class:`Replicates` they returned (``return_replicates=True``). A series is one combination
    of ``measure_cols`` (default: every column but ``step, value, ci_low, ci_high, train_step,
    n``, i.e. ``layer, measure, emotion, inner`` for geometry and ``layer, measure, label``
    plus a ``probe`` column, ``"own"`` or ``"step S"``, for probes).

    One row per series and step ``t`` after the frame's first step ``first_step``:

    - ``effect = value(t) - value(first)``, its percentile interval
      ``effect_ci_low/high`` (level ``ci``) and two-sided ``p`` from
      :func:`emolens.analysis.change_tests.paired_bootstrap_test`. ``paired`` is True where both
      steps
      resampled the same samples (same sample-set key: the bootstrap resamples the same sample
      indices at both steps). Where the kept samples differ (self-filtering), the replicates
      of step t are re-paired with a random permutation (``seed``), which makes the two
      bootstraps independent: an unpaired test, conservative for overlapping sample sets.
    - ``q``: Benjamini-Hochberg within ``family`` (default ``"probes"`` for a probes table,
      ``"geometry"`` otherwise; a ``family`` column in ``frame`` overrides), over every tested
      row of the family; ``fdr_change``: ``q < fdr_level``.
    - ``equivalence_margin``: :func:`emolens.analysis.change_tests.equivalence_margin` of the
    series'
      measure (``margin_rule`` says ``absolute`` or ``relative to |first value|``);
      ``equivalence_p``: TOST (:func:`emolens.analysis.change_tests.tost_bootstrap`);
      ``equivalent_within_margin``: ``equivalence_p < equivalence_level``.

    - The cross-step measures (:data:`~emolens.analysis.geometry_tables.CROSS_STEP_MEASURES`:
      ``cosine_to_first``, the principal angles) take their ``p`` from the step-swap
      permutation test ``cross_step`` (:func:`~emolens.analysis.geometry_tables.cross_step_tests`
      of the same steps); without it, or where it has no row (kept sets differ), they are not
      tested (NaN p): their bootstrap against the first step's noise ceiling rejected up to
      every true null (see ``cross_step_tests``). Their effect and interval stay the bootstrap's.
    - ``p_method``: ``"count"`` (``(1 + k) / (1 + B)``) or ``"normal"`` (Wald p from the
      bootstrap standard error, no ``1 / (1 + B)`` floor, so BH over many series can flag
      some; see :func:`emolens.analysis.change_tests.paired_bootstrap_test`).

    Rows with no replicates (``train_accuracy``, ``chance``, ``cosine_to_previous``) or a NaN
    first value get NaN p, q and equivalence p and are not counted in the FDR.
    """
    if len(replicates) != len(frame):
        raise ValueError(
            f"{len(replicates)} replicate rows for {len(frame)} table rows: pass the "
            "replicates returned with this table (return_replicates=True), in the same order"
        )
    if not 0.0 < fdr_level < 1.0 or not 0.0 < equivalence_level < 1.0:
        raise ValueError("fdr_level and equivalence_level must lie strictly between 0 and 1")
    df, keys = _series_table(frame, family=family, measure_cols=measure_cols)
    out_cols = keys + list(CHANGE_COLUMNS)
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    first_step, later = _later_rows(df, keys)
    res = _tested_rows(
        later, replicates, keys=keys, first_step=first_step, ci=ci, fdr_level=fdr_level,
        equivalence_margin=equivalence_margin, equivalence_level=equivalence_level, seed=seed,
        cross_step=cross_step, p_method=p_method,
    )  # fmt: skip
    return res[out_cols]


def _series_table(
    frame: pd.DataFrame, *, family: str | None, measure_cols: Sequence[str] | None
) -> tuple[pd.DataFrame, list[str]]:
    """``frame`` with its row numbers (``_row``), its ``family`` and, for probes, the ``probe``
    series (:func:`_series_frame`); and the columns that name a series."""
    base = frame.reset_index(drop=True).assign(_row=np.arange(len(frame)))
    if family is None and "family" not in base.columns:
        family = "probes" if "train_step" in base.columns else "geometry"
    if family is not None:
        base = base.assign(family=family)
    df = _series_frame(base)
    if measure_cols is None:
        keys = [c for c in df.columns if c not in NON_KEY_COLUMNS + ("_row", "family")]
    else:
        keys = list(measure_cols)
        if "probe" in df.columns and "probe" not in keys:
            keys.append("probe")
    return df, keys


def _later_rows(df: pd.DataFrame, keys: list[str]) -> tuple[int | np.integer, pd.DataFrame]:
    """The first step, and the rows of every later step whose series has a first-step row,
    with that row's number and value (``_row_first``, ``value_first``), in series order."""
    missing = [c for c in keys + ["step", "value"] if c not in df.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing}")
    if df.duplicated(keys + ["step"]).any():
        raise ValueError(
            f"rows are not unique per series and step with keys {keys}; pass "
            "measure_cols naming every column that tells series apart"
        )
    first_step = df.step.min()
    first = df[df.step == first_step].set_index(keys)
    later = df[df.step != first_step]
    ref = first[["_row", "value"]].rename(columns={"_row": "_row_first", "value": "value_first"})
    later = later.join(ref, on=keys)
    later = later[later["_row_first"].notna()].sort_values(keys + ["step"], kind="stable")
    return first_step, later


def _tested_rows(
    later: pd.DataFrame,
    replicates: Replicates,
    *,
    keys: list[str],
    first_step: int | np.integer,
    ci: float,
    fdr_level: float,
    equivalence_margin: float,
    equivalence_level: float,
    seed: int,
    cross_step: pd.DataFrame | None = None,
    p_method: str = "count",
) -> pd.DataFrame:
    """The paired bootstrap test, BH q-value and TOST of each row of :func:`_later_rows`
    (the cross-step measures' p from ``cross_step``, see :func:`change_summary`)."""
    rows_t = later["_row"].to_numpy(dtype=np.int64)
    rows_0 = later["_row_first"].to_numpy(dtype=np.int64)
    boot = replicates.values
    paired = replicates.sample_set[rows_t] == replicates.sample_set[rows_0]
    boot_t = boot[rows_t].copy()
    if (~paired).any() and boot.shape[1]:
        perm = np.random.default_rng(seed).permutation(boot.shape[1])
        boot_t[~paired] = boot_t[~paired][:, perm]
    value_t = np.array(later["value"], dtype=np.float64)
    value_0 = np.array(later["value_first"], dtype=np.float64)
    test = change_tests.paired_bootstrap_test(
        torch.from_numpy(value_t), torch.from_numpy(value_0),
        torch.from_numpy(boot_t), torch.from_numpy(np.array(boot[rows_0])), ci=ci,
        p_method=p_method,
    )  # fmt: skip
    measures = later["measure"].astype(str).tolist() if "measure" in later else [""] * len(later)
    margins = np.array(
        [
            change_tests.equivalence_margin(m, v, equivalence_margin) if np.isfinite(v) else np.nan
            for m, v in zip(measures, value_0, strict=True)
        ]
    )
    d_star = torch.from_numpy(boot_t - boot[rows_0])
    eq = change_tests.tost_bootstrap(
        test.effect, d_star, torch.from_numpy(margins), level=equivalence_level
    )
    fam = later["family"].astype(str).to_numpy()
    p = test.p.numpy().copy()
    suffix = " (normal)" if p_method == "normal" else ""
    method = np.where(
        paired, "paired bootstrap" + suffix, "unpaired bootstrap (kept sets differ)" + suffix
    )
    swap_p = _cross_step_p(later, cross_step)
    cross = np.isin(np.asarray(measures, dtype=object), CROSS_STEP_MEASURES)
    p[cross] = swap_p[cross]
    method = np.where(
        cross,
        np.where(np.isfinite(swap_p), "step-swap permutation", "not tested (cross-step measure)"),
        method,
    )
    q = change_tests.fdr_by_family(p, fam)
    res = later[keys].reset_index(drop=True)
    res["family"] = fam
    res["first_step"] = first_step
    res["step"] = later["step"].to_numpy()
    res["first_value"] = value_0
    res["value"] = value_t
    res["effect"] = test.effect.numpy()
    res["effect_ci_low"] = test.low.numpy()
    res["effect_ci_high"] = test.high.numpy()
    res["p"] = p
    res["q"] = q
    res["fdr_change"] = np.where(np.isfinite(q), q < fdr_level, False)
    res["test"] = method
    res["paired"] = paired
    res["n_resamples"] = np.isfinite(d_star.numpy()).sum(1)
    res["equivalence_margin"] = margins
    res["margin_rule"] = [
        f"relative: {equivalence_margin:g} x |first value|"
        if m in change_tests.RELATIVE_MEASURES
        else f"absolute: {equivalence_margin:g}"
        for m in measures
    ]
    res["equivalence_p"] = eq.p.numpy()
    res["equivalent_within_margin"] = eq.equivalent.numpy()
    return res


#: Columns of :func:`change_omnibus` after the group keys.
OMNIBUS_COLUMNS = (
    "family", "first_step", "step", "n_series", "statistic", "p", "q", "fdr_change", "test",
    "paired", "n_resamples",
)  # fmt: skip


def change_omnibus(
    frame: pd.DataFrame,
    replicates: Replicates,
    pooled: Sequence[str] = ("emotion", "label"),
    family: str | None = None,
    fdr_level: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """One joint test per group of series and later step: did any series of the group change?

    The series of :func:`change_summary` (same ``frame``, ``replicates``) are grouped by their
    keys other than ``pooled`` (default the emotion or label: one group is e.g. every
    emotion's ``vector_norm`` at one layer and inner product); each group and step ``t`` gets
    :func:`emolens.analysis.change_tests.omnibus_bootstrap_test` from the same paired draws
    as the per-series tests (re-paired at random where the kept sets differ, ``paired``
    False). ``q``: BH over the family's groups. A group with one series is that series' own
    test (up to the statistic). The cross-step measures, whose bootstrap is not a valid test
    (:func:`change_summary`), are left out. Columns: the group keys and
    :data:`OMNIBUS_COLUMNS`.
    """
    if len(replicates) != len(frame):
        raise ValueError(
            f"{len(replicates)} replicate rows for {len(frame)} table rows: pass the "
            "replicates returned with this table (return_replicates=True), in the same order"
        )
    df, keys = _series_table(frame, family=family, measure_cols=None)
    group_keys = [k for k in keys if k not in pooled]
    out_cols = group_keys + list(OMNIBUS_COLUMNS)
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    first_step, later = _later_rows(df, keys)
    if "measure" in later.columns:
        later = later[~later["measure"].isin(CROSS_STEP_MEASURES)]
    boot = replicates.values
    rows_t = later["_row"].to_numpy(dtype=np.int64)
    rows_0 = later["_row_first"].to_numpy(dtype=np.int64)
    paired = replicates.sample_set[rows_t] == replicates.sample_set[rows_0]
    boot_t = boot[rows_t].copy()
    if (~paired).any() and boot.shape[1]:
        perm = np.random.default_rng(seed).permutation(boot.shape[1])
        boot_t[~paired] = boot_t[~paired][:, perm]
    d_star = boot_t - boot[rows_0]
    effect = np.array(later["value"], dtype=np.float64) - np.array(
        later["value_first"], dtype=np.float64
    )
    later = later.assign(_i=np.arange(len(later)), _paired=paired)
    records = []
    for key, g in later.groupby(group_keys + ["family", "step"], sort=True, dropna=False):
        i = g["_i"].to_numpy()
        test = change_tests.omnibus_bootstrap_test(
            torch.from_numpy(effect[i]), torch.from_numpy(d_star[i])
        )
        all_paired = bool(g["_paired"].all())
        records.append(
            {
                **dict(zip(group_keys + ["family", "step"], key, strict=True)),
                "first_step": first_step,
                "n_series": test.n_series,
                "statistic": test.statistic,
                "p": test.p,
                "test": test.method if all_paired else "omnibus unpaired bootstrap",
                "paired": all_paired,
                "n_resamples": test.n_resamples,
            }
        )
    if not records:
        return pd.DataFrame(columns=out_cols)
    res = pd.DataFrame(records)
    res["q"] = change_tests.fdr_by_family(res["p"].to_numpy(), res["family"].astype(str).to_numpy())
    res["fdr_change"] = np.where(res["q"].notna(), res["q"] < fdr_level, False)
    return res[out_cols]


def _cross_step_p(later: pd.DataFrame, cross_step: pd.DataFrame | None) -> np.ndarray:
    """Per row of ``later``: the step-swap p of ``cross_step`` matched on ``step, layer,
    measure, emotion, inner`` (NaN where there is none)."""
    nan = np.full(len(later), np.nan)
    if cross_step is None or cross_step.empty:
        return nan
    keys = [c for c in ("step", "layer", "measure", "emotion", "inner") if c in later.columns]
    look = cross_step.drop_duplicates(keys).set_index(keys)["p"]
    idx = pd.MultiIndex.from_frame(later[keys]) if len(keys) > 1 else later[keys[0]]
    return look.reindex(idx).to_numpy(dtype=np.float64)


def sensitivity_change_summary(
    sensitivity: pd.DataFrame,
    measure: str = "logit_change",
    ci: float = 0.95,
    fdr_level: float = 0.05,
    equivalence_margin: float = change_tests.DEFAULT_EQUIVALENCE_MARGIN,
    equivalence_level: float = 0.05,
    n_perm: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The :func:`change_summary` rows of steering sensitivity (family ``"sensitivity"``).

    ``sensitivity``: ``sensitivity.csv`` rows; the diagonal (``steered_emotion ==
    observed_label``) is tested. A series is one ``layer, steered_emotion, alpha`` (and
    ``alpha_unit``, ``positions`` where present); each step after the first is compared with
    the first on the prompts both have, by the sign-flip permutation test of the per-prompt
    differences of ``measure`` (:func:`emolens.analysis.change_tests.sign_flip_test`; the prompts
    are
    the same at every step, so the differences are paired) and TOST by sign flips. This holds
    each step's concept vector fixed: it is the prompt noise only, a test of "steering with
    these vectors changed", not of "the model's sensitivity changed" (the trend tests of
    :func:`figure2_frame` add the noise of estimating ``v``). Measured in
    ``benchmarks/calibration.py``: where ``v`` is re-estimated from fresh samples at each step
    under no true change, this test rejects most series (false-positive rate about 0.6 at the
    demo's sizes), so use it for the conditional claim only. The margin is relative:
    ``equivalence_margin x |first value|``. Columns: ``layer, measure, emotion, alpha`` and
    :data:`CHANGE_COLUMNS`.
    """
    keys = [c for c in ("layer", "steered_emotion", "alpha", "alpha_unit", "positions")
            if c in sensitivity.columns]  # fmt: skip
    need = ["step", "steered_emotion", "observed_label", "prompt_id", measure]
    missing = [c for c in need if c not in sensitivity.columns]
    if missing:
        raise ValueError(f"the sensitivity table lacks columns {missing}")
    out_keys = ["layer", "measure", "emotion", "alpha"] + [
        k for k in ("alpha_unit", "positions") if k in keys
    ]
    diag = sensitivity[sensitivity.steered_emotion == sensitivity.observed_label]
    rows = []
    if diag.empty:
        return pd.DataFrame(columns=out_keys + list(CHANGE_COLUMNS))
    first_step = diag.step.min()
    for key, g in diag.groupby(keys, sort=True, dropna=False):
        wide = g.pivot_table(index="prompt_id", columns="step", values=measure, aggfunc="mean")
        if first_step not in wide.columns:
            continue
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for step in [s for s in wide.columns if s != first_step]:
            pair = wide[[first_step, step]].dropna()
            d = torch.tensor(pair[step].to_numpy() - pair[first_step].to_numpy())
            first_value = float(pair[first_step].mean()) if len(pair) else float("nan")
            test = change_tests.sign_flip_test(d[None], n_perm=n_perm, ci=ci, seed=seed)
            margin = (
                change_tests.equivalence_margin(measure, first_value, equivalence_margin)
                if np.isfinite(first_value)
                else float("nan")
            )
            eq = change_tests.tost_sign_flip(
                d[None], margin, level=equivalence_level, n_perm=n_perm, seed=seed
            )
            rows.append(
                {
                    "layer": key.get("layer"),
                    "measure": measure,
                    "emotion": key["steered_emotion"],
                    "alpha": key.get("alpha"),
                    **{k: key[k] for k in ("alpha_unit", "positions") if k in key},
                    "family": "sensitivity",
                    "first_step": first_step,
                    "step": step,
                    "first_value": first_value,
                    "value": float(pair[step].mean()) if len(pair) else float("nan"),
                    "effect": float(test.effect[0]),
                    "effect_ci_low": float(test.low[0]),
                    "effect_ci_high": float(test.high[0]),
                    "p": float(test.p[0]),
                    "test": "sign-flip permutation over prompts (v fixed)",
                    "paired": True,
                    "n_resamples": n_perm,
                    "equivalence_margin": margin,
                    "margin_rule": f"relative: {equivalence_margin:g} x |first value|",
                    "equivalence_p": float(eq.p[0]),
                    "equivalent_within_margin": bool(eq.equivalent[0]),
                    "n_prompts": len(pair),
                }
            )
    res = pd.DataFrame(rows)
    if res.empty:
        return pd.DataFrame(columns=out_keys + list(CHANGE_COLUMNS))
    res["q"] = change_tests.benjamini_hochberg(res["p"].to_numpy())
    res["fdr_change"] = np.where(res["q"].notna(), res["q"] < fdr_level, False)
    return res[out_keys + list(CHANGE_COLUMNS)]


# --------------------------------------------------------------------------- Figure 2


CHANGE_COUNT_COLUMNS = (
    "table",
    "measure",
    "variant",
    "n_series",
    "n_tested",
    "n_changed",
    "n_equivalent",
    "n_inconclusive",
    "max_abs_effect",
    "changed_layers",
    "changed_series",
    "margin_rule",
)

#: Result columns of a change summary row (everything else names the series).
_RESULT_COLUMNS = (
    "family", "first_step", "step", "first_value", "value", "effect", "effect_ci_low",
    "effect_ci_high", "p", "q", "fdr_change", "test", "paired", "n_resamples",
    "equivalence_margin", "margin_rule", "equivalence_p", "equivalent_within_margin",
    "n_prompts", "table",
)  # fmt: skip


def change_summary_counts(change_summary: pd.DataFrame) -> pd.DataFrame:
    """Per measure family (``table``, ``measure`` and the inner product for geometry or the
    probe for probes, as ``variant``), counted over series (one emotion or label at one layer;
    a series has one test per later step): ``n_tested`` series with at least one p-value,
    ``n_changed`` with ``fdr_change`` (q below the level, BH within the family) at some step,
    ``n_equivalent`` shown equivalent to the first step within the margin (TOST) at every
    tested step, ``n_inconclusive`` the rest (neither a change nor equivalence shown), the
    largest ``|effect|``, and which layers and series changed."""
    require_columns(
        change_summary,
        ("measure", "p", "fdr_change", "equivalent_within_margin"),
        "the change summary table",
    )
    frame = change_summary.copy()
    keys = [c for c in frame.columns if c not in _RESULT_COLUMNS]
    if "table" not in frame:
        frame["table"] = frame["family"] if "family" in frame else "geometry"
    variant = pd.Series("", index=frame.index)
    for col in ("inner", "probe", "alpha"):
        if col in frame:
            text = frame[col].astype(str)
            if col == "alpha":
                text = "α = " + frame[col].map(format_value)
            variant = variant.where(frame[col].isna(), text)
    frame["variant"] = variant
    frame["tested"] = pd.to_numeric(frame["p"], errors="coerce").notna()
    frame["chg"] = frame["fdr_change"].map(as_bool) & frame["tested"]
    frame["eqv"] = frame["equivalent_within_margin"].map(as_bool) | ~frame["tested"]
    who = pd.Series("", index=frame.index)
    for col in ("emotion", "label"):
        if col in frame:
            who = who.where(frame[col].isna() | (who != ""), frame[col].astype(str))
    frame["who"] = who
    series_keys = [k for k in keys if k not in ("table", "measure")]
    rows = []
    for (table, measure, var), g in frame.groupby(["table", "measure", "variant"], sort=False):
        per = (
            g.groupby(series_keys, dropna=False, sort=False)
            .agg(tested=("tested", "any"), chg=("chg", "any"), eqv=("eqv", "all"),
                 who=("who", "first"),
                 layer=("layer", "first") if "layer" in g else ("who", "first"))
            .reset_index(drop=True)
        )  # fmt: skip
        per = per[per["tested"]]
        changed = per[per["chg"]]
        has_layer = "layer" in g
        layers = sorted({int(v) for v in changed["layer"].dropna()}) if has_layer else []
        series = [
            f"{w} @ {int(lay)}" if has_layer and pd.notna(lay) else str(w)
            for w, lay in zip(changed["who"], changed["layer"], strict=True)
        ]
        effect = pd.to_numeric(g["effect"], errors="coerce").abs() if "effect" in g else None
        rules = sorted(set(g["margin_rule"].dropna().astype(str))) if "margin_rule" in g else []
        n_eq = int((per["eqv"] & ~per["chg"]).sum())
        rows.append(
            {
                "table": table,
                "measure": measure,
                "variant": var,
                "n_series": int(g.groupby(series_keys, dropna=False).ngroups),
                "n_tested": len(per),
                "n_changed": len(changed),
                "n_equivalent": n_eq,
                "n_inconclusive": len(per) - len(changed) - n_eq,
                "max_abs_effect": float(effect.max())
                if effect is not None and effect.notna().any()
                else float("nan"),
                "changed_layers": ", ".join(map(str, layers)),
                "changed_series": ", ".join(series),
                "margin_rule": "; ".join(rules),
            }
        )
    return pd.DataFrame(rows, columns=list(CHANGE_COUNT_COLUMNS))
