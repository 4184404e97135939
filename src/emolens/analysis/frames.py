"""Small helpers on long tables shared by the analysis and the report: column checks, label
order, value formatting, CSV flags, row selection with tolerance and means with standard
errors."""

from collections.abc import Sequence

import numpy as np
import pandas as pd

from emolens.data.labels import STUDY_LABELS


def label_order(names) -> list[str]:
    """Names in the order of the study's prompt, unknown names after them, sorted."""
    known = STUDY_LABELS.names("en")
    present = {str(n) for n in names}
    return [n for n in known if n in present] + sorted(present - set(known))


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise ``ValueError`` naming the missing columns of ``what`` and those it has."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, frame.columns)) or 'no columns'}"
        )


def format_value(value) -> str:
    """A table value as text, floats in their shortest form (``4.0`` is ``"4"``)."""
    if isinstance(value, float | np.floating):
        return f"{float(value):g}"
    return str(value)


def pick_rows(frame: pd.DataFrame, column: str, value, prefer=None, largest: bool = False):
    """Rows where ``column`` equals ``value`` (floats compared with a tolerance), and the value.
    With ``value`` None: ``prefer`` if present, else the largest (with ``largest``) or the
    first value present."""
    if column not in frame.columns:
        return frame, value
    present = frame[column].dropna().unique().tolist()
    if not present:
        raise ValueError(f"no rows with a value in column {column!r}")
    if value is None:
        if prefer is not None and prefer in present:
            value = prefer
        else:
            value = max(present) if largest else sorted(present, key=str)[0]
    if pd.api.types.is_float_dtype(frame[column]):
        mask = np.isclose(frame[column].to_numpy(dtype=float), float(value))
    else:
        mask = (frame[column] == value).to_numpy()
    if not mask.any():
        shown = ", ".join(format_value(v) for v in sorted(present))
        raise ValueError(f"no rows with {column} = {format_value(value)}; present: {shown}")
    if hasattr(value, "item"):
        value = value.item()
    return frame[mask], value


def as_bool(value) -> bool:
    """A flag read from a CSV: ``True``/``"True"``/``"1"`` are true, NaN is false."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) if pd.notna(value) else False


def mean_se(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Columns ``keys``, ``mean``, ``se`` (standard error, NaN for one row) and ``n`` of
    ``value`` per group of ``keys``."""
    out = frame.groupby(keys, sort=True)[value].agg(mean="mean", std="std", n="count")
    out = out.reset_index()
    out["se"] = (out["std"] / np.sqrt(out["n"])).where(out["n"] > 1)
    return out.drop(columns="std")


def mean_se_over_prompts(frame: pd.DataFrame, keys: list[str], measure: str) -> pd.DataFrame:
    """:func:`mean_se` over prompts, the values of one prompt averaged first."""
    per_prompt = frame.groupby([*keys, "prompt_id"], sort=True, dropna=False)[measure].mean()
    return mean_se(per_prompt.reset_index(), keys, measure)


def steps_of(frame: pd.DataFrame) -> list[int]:
    """The distinct steps of a table's ``step`` column, sorted (non-numbers skipped)."""
    return sorted(int(s) for s in pd.to_numeric(frame["step"], errors="coerce").dropna().unique())
