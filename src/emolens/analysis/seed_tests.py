"""Change from the first step tested against fine-tuning-seed variability.

One fine-tuning run cannot tell a real change from run-to-run noise: the bootstrap tests of
``change_summary.csv`` resample samples and prompts within one run. Here each seed's change
``d_k = value_k(t) - value_k(first step)`` of a measure series is one observation, and the
claim "the measure changed" is tested across seeds: a one-sample t-test of the mean of the
``d_k`` (``df = n_seeds - 1``), its t interval, and how many seeds agree in sign.
Benjamini-Hochberg within each family (``geometry``, ``probes``, ``sensitivity``).

With 2 or 3 seeds the t-test has 1 or 2 degrees of freedom: valid under normal seed effects,
but with little power and wide intervals; the sign count (``n_positive``/``n_negative``) is
the plainer summary (with 3 seeds all agreeing in sign happens by chance with probability
1/4 under a symmetric null, so it is no test on its own).
"""

import functools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from emolens.analysis import change_tests
from emolens.analysis.change_summary import _series_frame

#: Columns of :func:`seed_change_test` after the series keys.
SEED_CHANGE_COLUMNS = (
    "family",
    "first_step",
    "step",
    "n_seeds",
    "seeds",
    "mean_first_value",
    "mean_effect",
    "sd_effect",
    "effect_ci_low",
    "effect_ci_high",
    "t",
    "df",
    "p",
    "q",
    "fdr_change",
    "n_positive",
    "n_negative",
    "sign_consistent",
    "note",
)


def seed_change_test(
    frame: pd.DataFrame,
    keys: Sequence[str],
    *,
    family: str,
    seed_col: str = "seed",
    ci: float = 0.95,
    fdr_level: float = 0.05,
) -> pd.DataFrame:
    """Per series (``keys``) and later step: the across-seed test of the change from the
    first step.

    ``frame``: long, with ``seed_col``, ``step``, ``value`` and ``keys`` (one row per seed,
    series and step). The first step is the smallest step of the whole frame; a seed enters
    the row of step t where it has a finite value at both steps. ``p``: two-sided one-sample
    t-test of the per-seed changes (``df = n_seeds - 1``; NaN with fewer than 2 seeds, not
    counted in the FDR); where every seed changed by the same amount the t statistic is
    infinite (p = 0) or, with no change at all, 0 (p = 1). ``q``: BH over every tested row
    (one ``family`` per call; :func:`seed_change_summary` pools the families' rows and
    applies BH within each). ``effect_ci_low/high``: the t interval of the mean change.
    """
    keys = list(keys)
    missing = [c for c in [seed_col, "step", "value", *keys] if c not in frame.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing} for the seed-level test")
    out_cols = keys + list(SEED_CHANGE_COLUMNS)
    if frame.empty:
        return pd.DataFrame(columns=out_cols)
    df = frame[[seed_col, "step", "value", *keys]].copy()
    df["value"] = pd.to_numeric(df["value"], errors="coerce")
    first_step = df["step"].min()
    wide = df.pivot_table(
        index=keys + [seed_col], columns="step", values="value", aggfunc="first", dropna=False
    )
    first = wide[first_step]
    parts = []
    for step in [s for s in wide.columns if s != first_step]:
        change = pd.DataFrame({"d": wide[step] - first, "first": first})
        change = change[np.isfinite(change["d"])].reset_index()
        change["seed_name"] = change[seed_col].astype(str)
        change["pos"], change["neg"] = change["d"] > 0, change["d"] < 0
        grouped = change.groupby(keys, sort=True)
        agg = grouped.agg(
            n_seeds=("d", "size"),
            mean_effect=("d", "mean"),
            sd_effect=("d", "std"),
            mean_first_value=("first", "mean"),
            n_positive=("pos", "sum"),
            n_negative=("neg", "sum"),
            seeds=("seed_name", ",".join),
        ).reset_index()
        agg["first_step"], agg["step"] = first_step, step
        parts.append(agg)
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(rows):
        tests = [
            _t_test(n, m, sd, ci)
            for n, m, sd in zip(rows.n_seeds, rows.mean_effect, rows.sd_effect)
        ]
        rows = pd.concat([rows, pd.DataFrame(tests, index=rows.index)], axis=1)
        n = rows["n_seeds"]
        rows["sign_consistent"] = (n >= 2) & ((rows.n_positive == n) | (rows.n_negative == n))
    res = rows.reindex(columns=[c for c in out_cols if c not in ("family", "q")])
    res.insert(len(keys), "family", family)
    p = res["p"].to_numpy(dtype=np.float64) if len(res) else np.zeros(0)
    tested = np.isfinite(p)
    q = np.full(p.shape, np.nan)
    if tested.any():
        q[tested] = change_tests.fdr_by_family(p[tested], res["family"].to_numpy()[tested])
    res["q"] = q
    res["fdr_change"] = np.where(np.isfinite(q), q < fdr_level, False)
    return res[out_cols].sort_values(keys + ["step"], kind="stable").reset_index(drop=True)


def t_two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|)`` for Student's t with integer ``df >= 1`` (the closed forms of
    Abramowitz & Stegun 26.7.3-4, exact for integer degrees of freedom)."""
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    t = abs(float(t))
    if np.isinf(t):
        return 0.0
    theta = np.arctan(t / np.sqrt(df))
    c2, s = np.cos(theta) ** 2, np.sin(theta)
    if df % 2:  # odd
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= (2 * k) / (2 * k + 1) * c2
            total += term
        inside = theta + (s * np.cos(theta) * total if df > 1 else 0.0)
        inside_p = 2.0 / np.pi * inside
    else:
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside_p = s * total
    return float(min(1.0, max(0.0, 1.0 - inside_p)))


def t_quantile(level: float, df: int) -> float:
    """The ``level`` quantile (``0.5 < level < 1``) of Student's t with integer ``df``, by
    bisection on :func:`t_two_sided_p`."""
    target = 2.0 * (1.0 - level)  # two-sided tail
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
    return 0.5 * (lo + hi)


def _t_test(n: int, mean: float, sd: float, ci: float) -> dict:
    """One-sample t-test against 0 of ``n`` per-seed changes with this mean and SD."""
    if n < 2:
        nan = dict(effect_ci_low=np.nan, effect_ci_high=np.nan, t=np.nan, p=np.nan)
        return {**nan, "df": n - 1, "note": "fewer than 2 seeds: no test"}
    se = sd / np.sqrt(n)
    if se > 0:
        t = mean / se
    else:
        t = 0.0 if mean == 0 else float(np.sign(mean) * np.inf)
    half = _t_quantile_cached(0.5 + ci / 2, n - 1) * se
    return {
        "effect_ci_low": mean - half,
        "effect_ci_high": mean + half,
        "t": t,
        "df": n - 1,
        "p": t_two_sided_p(t, n - 1),
        "note": f"df = {n - 1}: few seeds, little power" if n <= 3 else "",
    }


@functools.lru_cache(maxsize=256)
def _t_quantile_cached(level: float, df: int) -> float:
    return t_quantile(level, df)


#: The tables tested across seeds, their family and the columns naming a series in them.
SEED_TESTED_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "geometry": ("geometry", ("layer", "measure", "emotion", "inner")),
    "probes": ("probes", ("layer", "measure", "label", "probe")),
    "figure2_bands": ("sensitivity", ("layer", "emotion", "alpha")),
}


def seed_change_summary(
    tables: dict[str, pd.DataFrame], *, ci: float = 0.95, fdr_level: float = 0.05
) -> pd.DataFrame:
    """``seed_change_summary.csv``: :func:`seed_change_test` of every series of the tables in
    :data:`SEED_TESTED_TABLES` present in ``tables`` (each with a ``seed`` column), with a
    ``table`` column, BH within each family. Probes are split into series by the probe
    (``own``, or ``step S`` for the probe trained at step S, as in ``change_summary.csv``)."""
    parts = []
    for name, (family, keys) in SEED_TESTED_TABLES.items():
        frame = tables.get(name)
        if frame is None or frame.empty or "seed" not in frame.columns:
            continue
        if name == "probes":
            frame = _series_frame(frame)
        parts.append(
            seed_change_test(frame, keys, family=family, ci=ci, fdr_level=fdr_level).assign(
                table=name
            )
        )
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True)


__all__ = ["SEED_CHANGE_COLUMNS", "seed_change_summary", "seed_change_test"]
