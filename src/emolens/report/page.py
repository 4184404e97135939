"""``report.html``: one self-contained page (plotly.js inline, no network) over a results folder.

:func:`load_report_inputs` reads the folder (and the fine-tuning run beside it, if any) into a
:class:`ReportInputs`; :func:`build_report_html` turns that into the page's text without touching
the disk; :func:`write_report` does both and writes the file atomically. A missing
``sensitivity.csv`` is an error that says which command makes it; every other input is optional
and a missing or unreadable one becomes a visible note in its section.
"""

import base64
import gzip
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from emolens.analysis import sweeps
from emolens.analysis.change_summary import change_summary_counts
from emolens.analysis.frames import as_bool, format_value, label_order, require_columns
from emolens.analysis.frames import steps_of as _steps_of
from emolens.analysis.sensitivity import (
    MEASURES,
    SENSITIVITY_KEYS,
    diagonal_summary,
    select_sensitivity,
)
from emolens.report import figures, lens_figures, verdicts
from emolens.report.figures._style import FONT_STACK
from emolens.report.markup import escape as _e
from emolens.report.markup import names as _names
from emolens.report.markup import note as _note
from emolens.store import layout
from emolens.store.files import read_json, write_text
from emolens.store.layout import ResultsLayout

#: The optional tables of the explanation analyses, with their section headings (in order).
OPTIONAL_TABLES: dict[str, str] = {
    "attribution": "Logit attribution",
    "transfer": "Vector transfer",
    "dla": "Direct logit attribution",
    "heads": "Per-head attribution",
    "logit_lens": "Logit lens",
    "generations": "Steered text",
    "random_baseline": "Random-direction and shuffled-label baselines",
    "geometry": "Geometry",
    "probes": "Linear probes",
    "change_summary": "Change across the series",
    "sensitivity_trends": "Sensitivity trends",
}
#: Tables the report reads for a figure, without a section of their own.
FIGURE_TABLES = ("figure2_bands",)
#: Geometry measures the report draws (every measure is in the change summary).
GEOMETRY_KEY_MEASURES = ("cosine_to_first", "orthogonality", "within_gap")
#: The level of the bootstrap intervals the pipeline writes (the analysis tables' default).
CI_LEVEL = 0.95
_MAX_ROWS = 200
_MAX_SWEEP_EMOTIONS = 13
_ANALYZE_HINT = "emolens analyze --model MODEL_OR_RUN_DIR --out {dir}"


class ReportInputError(ValueError):
    """A required input of the report is missing or unreadable."""


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows; only ``sensitivity`` is required.

    ``problems`` maps an input (a file name) to why it could not be used; each appears as a
    note in the report.
    """

    sensitivity: pd.DataFrame
    manifest: dict = field(default_factory=dict)
    steps: pd.DataFrame | None = None
    filtering: pd.DataFrame | None = None
    label_audit: dict | None = None
    trainer_log: pd.DataFrame | None = None
    accuracy: pd.DataFrame | None = None
    extra_tables: dict = field(default_factory=dict)
    problems: dict = field(default_factory=dict)
    results_dir: str = ""
    run_dir: str | None = None
    last_run: dict | None = None  # last_run.json: the latest analyze run's failures


# --------------------------------------------------------------------------------------------
# reading


def read_sensitivity(path: str | Path) -> pd.DataFrame:
    """Read and check ``sensitivity.csv``; errors name the file and the command that makes it."""
    path = Path(path)
    hint = _ANALYZE_HINT.format(dir=path.parent)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the report needs the steering sensitivity table; make it with "
            f"`{hint}` (or run `emolens demo`)"
        )
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ReportInputError(
            f"{path} cannot be read as a CSV table ({exc}); it may be truncated or corrupt: "
            f"rerun `{hint}` to rewrite it"
        ) from exc
    try:
        require_columns(frame, SENSITIVITY_KEYS, str(path))
        if not any(m in frame.columns for m in MEASURES):
            raise ValueError(f"{path} has none of the measure columns {', '.join(MEASURES)}")
        if frame.empty:
            raise ValueError(f"{path} has no rows")
        for col in ("step", "layer", "alpha", *[m for m in MEASURES if m in frame]):
            if not pd.api.types.is_numeric_dtype(frame[col]):
                raise ValueError(f"{path}: column {col!r} is not numeric")
    except ValueError as exc:
        raise ReportInputError(f"{exc}; rerun `{hint}` to rewrite it") from exc
    return frame


def _note_problem(problems: dict, name: str, message: str) -> None:
    problems[name] = message
    warnings.warn(f"report: {name}: {message}", stacklevel=3)


def _optional_csv(path: Path, problems: dict, name: str | None = None) -> pd.DataFrame | None:
    """The table at ``path``; None if it is absent, or unreadable (noted in ``problems``)."""
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        _note_problem(problems, name or path.name, f"cannot be read as a CSV table: {exc}")
        return None


def _optional_json(path: Path, problems: dict, name: str | None = None) -> dict | None:
    """The JSON object at ``path``; None if it is absent, or unreadable (noted)."""
    if not path.is_file():
        return None
    name = name or path.name
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _note_problem(problems, name, f"is not valid JSON: {exc}")
        return None
    if not isinstance(data, dict):
        _note_problem(problems, name, f"holds a {type(data).__name__}, not a JSON object")
        return None
    return data


def read_trainer_log(run_dir: str | Path, problems: dict | None = None) -> pd.DataFrame | None:
    """Train and eval losses per step from every ``trainer_state.json`` of a run folder (the
    latest checkpoint's holds the whole history; all are merged), or None if there is none."""
    run_dir = Path(run_dir)
    problems = {} if problems is None else problems
    entries = []
    for path in [
        run_dir / "trainer_state.json",
        *sorted(run_dir.glob("checkpoint-*/trainer_state.json")),
    ]:
        state = _optional_json(path, problems, str(path.relative_to(run_dir)))
        history = (state or {}).get("log_history")
        if isinstance(history, list):
            entries += [e for e in history if isinstance(e, dict) and "step" in e]
    if not entries:
        return None
    frame = pd.DataFrame(entries)
    columns = [c for c in ("loss", "eval_loss") if c in frame.columns]
    if not columns:
        return None
    frame = frame[["step", *columns]].apply(pd.to_numeric, errors="coerce")
    frame = frame.groupby("step", sort=True)[columns].first().reset_index()
    return frame.dropna(how="all", subset=columns).reset_index(drop=True)


def _resolve_run_dir(results_dir: Path, run_dir, manifest: dict, problems: dict) -> Path | None:
    if run_dir is not None:
        path = Path(run_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {path} not found (given as run_dir)")
        return path
    recorded = manifest.get("run_dir")
    if not recorded:
        return None
    for candidate in (Path(recorded), results_dir / recorded):
        if candidate.is_dir():
            return candidate
    _note_problem(
        problems,
        "run_dir",
        f"the run folder {recorded} recorded in manifest.json "
        "is not there; training curves come from steps.csv only",
    )
    return None


def load_report_inputs(results_dir: str | Path, run_dir: str | Path | None = None) -> ReportInputs:
    """Read a results folder (and the fine-tuning run folder, given or recorded in the
    manifest as ``run_dir``) for :func:`build_report_html`."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(
            f"results folder {results_dir} not found; make it with "
            f"`{_ANALYZE_HINT.format(dir=results_dir)}` (or run `emolens demo`)"
        )
    results = ResultsLayout(results_dir)
    sensitivity = read_sensitivity(results.table("sensitivity"))
    problems: dict[str, str] = {}
    manifest = _optional_json(results.manifest, problems) or {}
    run = _resolve_run_dir(results_dir, run_dir, manifest, problems)
    trainer_log = read_trainer_log(run, problems) if run is not None else None
    accuracy = None
    for folder in ([run] if run is not None else []) + [results_dir]:
        accuracy = _optional_csv(folder / layout.ACCURACY, problems)
        if accuracy is not None:
            break
    extra = {}
    for name in OPTIONAL_TABLES:
        path = results_dir / f"{name}.csv"
        if path.is_file():
            extra[name] = _optional_csv(path, problems)
    for name in FIGURE_TABLES:
        path = results_dir / f"{name}.csv"
        if path.is_file():
            extra[name] = _optional_csv(path, problems)
    return ReportInputs(
        sensitivity=sensitivity,
        manifest=manifest,
        steps=_optional_csv(results.table("steps"), problems),
        filtering=_optional_csv(results.table("filtering"), problems),
        label_audit=_optional_json(results.label_audit, problems),
        trainer_log=trainer_log,
        accuracy=accuracy,
        extra_tables=extra,
        problems=problems,
        results_dir=str(results_dir),
        run_dir=str(run) if run is not None else None,
        last_run=_optional_json(results.last_run, problems),
    )


def write_report(
    results_dir: str | Path, run_dir: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Write ``results_dir/report.html`` (or ``out``) atomically; returns its path."""
    inputs = load_report_inputs(results_dir, run_dir)
    path = Path(out) if out is not None else ResultsLayout(results_dir).report
    return write_text(path, build_report_html(inputs))


def write_figure(fig: go.Figure, path: str | Path) -> Path:
    """One figure as a self-contained HTML page (plotly.js inline, no network), atomically;
    its text in the report's Japanese-capable font stack."""
    fig = go.Figure(fig).update_layout(font_family=FONT_STACK)
    return write_text(path, fig.to_html(full_html=True, include_plotlyjs=True))


# --------------------------------------------------------------------------------------------
# HTML pieces

#: Significant digits of the numbers in a figure's data (the tables keep full precision).
FIGURE_DIGITS = 6

_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #fafafa; color: #222; line-height: 1.5;
  font-family: FONT_STACK; }
.container { max-width: 1100px; margin: 0 auto; padding: 0 16px 48px; }
header { border-bottom: 1px solid #ddd; margin-bottom: 8px; }
h1 { font-size: 1.6rem; margin: 24px 0 4px; }
h2 { font-size: 1.3rem; margin: 36px 0 8px; border-bottom: 1px solid #e4e4e4; }
h3 { font-size: 1.05rem; margin: 20px 0 6px; }
nav { font-size: 0.9rem; margin: 8px 0 16px; display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav a { min-width: 0; overflow-wrap: anywhere; }
.figure { background: #fff; border: 1px solid #e4e4e4; border-radius: 4px; margin: 12px 0;
  width: 100%; }
.grid { display: grid; gap: 12px;
  grid-template-columns: repeat(auto-fit, minmax(min(420px, 100%), 1fr)); }
.tablewrap { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.85rem; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { background: #f3f6fa; border-left: 4px solid #8aa4c8; padding: 6px 12px; margin: 8px 0; }
.problem { background: #fdf1f0; border-left: 4px solid #d62728; padding: 6px 12px;
  margin: 8px 0; }
.above { color: #1a7f37; font-weight: 600; }
.below { color: #b42318; font-weight: 600; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #fff; border: 1px solid #e4e4e4; padding: 8px; overflow-x: auto;
  font-size: 0.8rem; }
details > summary { cursor: pointer; }
.downloads { text-align: right; padding: 0 8px 6px; font-size: 0.8rem; color: #555; }
.downloads button { font: inherit; margin-left: 6px; cursor: pointer; }
.status { background: #fdf1f0; border-left: 4px solid #d62728; padding: 6px 12px;
  margin: 12px 0; }
""".replace("FONT_STACK", FONT_STACK)

_STUDY_TEXT = (
    "The study asks how fine-tuning changes a language model's emotion concepts. For each "
    "emotion e, a concept vector v_e is the mean residual stream at the answer position over "
    "samples of e minus that over neutral samples (eq. 2). Steering adds α·v_e to the block "
    "output (eq. 1), and the steering sensitivity is the resulting change of e's first-token "
    "logit at the answer position, averaged over a fixed set of neutral prompts (Figure 2). "
    "Repeating this at every checkpoint of a fine-tuning run shows whether the model still "
    "reads its emotion concepts as training goes on; the paper found the rise shrinks for most "
    "emotions while trust and boredom keep it."
)


def _decode_typed_array(spec: dict) -> np.ndarray:
    """A plotly typed array (``{"dtype": "f8", "bdata": base64, "shape": "3, 2"}``) as numpy."""
    array = np.frombuffer(base64.b64decode(spec["bdata"]), dtype=np.dtype(spec["dtype"]))
    shape = spec.get("shape")
    if shape:
        array = array.reshape([int(n) for n in str(shape).split(",")])
    return array


def _compact(value, digits: int = FIGURE_DIGITS):
    """``value`` (plotly's JSON tree) as plain JSON: floats to ``digits`` significant digits,
    NaN and infinities as null (plotly's own reading of them), typed arrays as lists."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            return _compact(_decode_typed_array(value).tolist(), digits)
        return {k: _compact(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_compact(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return _compact(value.tolist(), digits)
    if isinstance(value, np.generic):
        return _compact(value.item(), digits)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        rounded = float(f"{value:.{digits}g}")
        return int(rounded) if rounded.is_integer() and abs(rounded) < 1e15 else rounded
    return value


def _script_json(value) -> str:
    """JSON safe inside a ``<script>`` element (no ``</`` can end it early)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


class _FigureIds:
    """Element ids of the figures of one page, in the order drawn."""

    count = 0

    @classmethod
    def next(cls) -> str:
        cls.count += 1
        return f"figure-{cls.count}"


def _figure(fig: go.Figure, height: int = 480, download: str = "figure") -> str:
    """A figure as a ``div`` and its JSON (gzipped, base64, in a ``<script>`` of type
    ``application/gzip;base64``: a tenth of the text), drawn by the page's loader with the
    page's template (plotly's, in the CJK font stack: sent once, not per figure). PNG and SVG
    buttons download it as ``{download}.png`` / ``.svg``."""
    spec = fig.to_plotly_json()
    layout = dict(spec.get("layout") or {})
    layout.pop("template", None)  # the page's template is set on every figure by the loader
    layout["autosize"] = True
    figure_id = _FigureIds.next()
    data = {
        "data": _compact(spec.get("data") or []),
        "layout": _compact(layout),
        "config": {"responsive": True, "displaylogo": False},
    }
    name = _e(download)
    buttons = "".join(
        f'<button type="button" data-download="{fmt}" data-target="{figure_id}" '
        f'data-filename="{name}">{fmt.upper()}</button>'
        for fmt in ("png", "svg")
    )
    return (
        f'<div class="figure"><div id="{figure_id}" class="plotly-graph-div" '
        f'style="height:{height}px; width:100%;"></div>'
        f'<script type="application/gzip;base64" data-figure="{figure_id}">'
        f"{packed(_script_json(data))}</script>"
        f'<div class="downloads">download {buttons}</div></div>'
    )


def _safe_figure(
    make: Callable[[], go.Figure], what: str, height: int = 480, download: str | None = None
) -> str:
    """A figure, or a visible note saying why it could not be drawn."""
    try:
        return _figure(make(), height, download or _slug(what))
    except Exception as exc:  # one bad figure must not cost the whole report
        return _note(f"{what} could not be drawn: {exc}", problem=True)


def _slug(text: str) -> str:
    """A file name from a figure's description (``"the DLA figure"`` -> ``the-DLA-figure``)."""
    return "-".join("".join(c if c.isalnum() else " " for c in text).split()) or "figure"


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td></td>"
    if isinstance(value, bool | np.bool_):
        return f"<td>{_e(value)}</td>"
    if isinstance(value, int | float | np.integer | np.floating):
        return f'<td class="num">{_e(format_value(value))}</td>'
    return f"<td>{_e(value)}</td>"


def _table(headers, rows, max_rows: int = _MAX_ROWS) -> str:
    rows = list(rows)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows[:max_rows])
    more = (
        _note(f"Showing the first {max_rows} of {len(rows)} rows.") if len(rows) > max_rows else ""
    )
    return (
        f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>{more}"
    )


def _frame_table(frame: pd.DataFrame, max_rows: int = _MAX_ROWS) -> str:
    rows = frame.astype(object).where(frame.notna(), None).itertuples(index=False, name=None)
    return _table([str(c) for c in frame.columns], rows, max_rows)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _short(value, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _problem_notes(inputs: ReportInputs, *names: str) -> str:
    return "".join(
        _note(f"{n}: {inputs.problems[n]}", problem=True) for n in names if n in inputs.problems
    )


# --------------------------------------------------------------------------------------------
# sections


def _ja_map(inputs: ReportInputs) -> dict[str, str]:
    out: dict[str, str] = {}
    if inputs.label_audit:
        for entry in inputs.label_audit.get("entries", []) or []:
            if isinstance(entry, dict) and entry.get("en") and entry.get("ja"):
                out[str(entry["en"])] = str(entry["ja"])
    if inputs.filtering is not None and {"label", "label_ja"} <= set(inputs.filtering.columns):
        for en, ja in zip(inputs.filtering["label"], inputs.filtering["label_ja"], strict=True):
            if pd.notna(en) and pd.notna(ja):
                out.setdefault(str(en), str(ja))
    return out


def _eval_table(inputs: ReportInputs) -> pd.DataFrame | None:
    """Eval losses per step: steps.csv if it has any, else the trainer log."""
    for table in (inputs.steps, inputs.trainer_log):
        if table is not None and {"step", "eval_loss"} <= set(table.columns):
            if pd.to_numeric(table["eval_loss"], errors="coerce").notna().any():
                return table
    return None


def _verdicts(inputs: ReportInputs, ja: dict) -> str:
    """:func:`emolens.report.verdicts.sensitivity_verdict` of the run's sensitivity table."""
    try:
        summary, sel = diagonal_summary(inputs.sensitivity)
    except ValueError as exc:
        return _note(f"No steering sensitivity to summarise: {exc}", problem=True)
    trends = inputs.extra_tables.get("sensitivity_trends")
    return verdicts.sensitivity_verdict(summary, sel, ja, trends)


def _summary_section(inputs: ReportInputs, ja: dict) -> str:
    m = inputs.manifest
    meta: list[tuple[str, str]] = [("Results folder", inputs.results_dir or "(in memory)")]
    if inputs.run_dir:
        meta.append(("Fine-tuning run", inputs.run_dir))
    if m.get("model"):
        meta.append(("Model", _short(m["model"])))
    data = m.get("data")
    if isinstance(data, dict):
        parts = [f"{k}: {data[k]}" for k in ("source", "n_samples", "sha256") if k in data]
        meta.append(("Data", "; ".join(parts) or _short(data)))
    elif data:
        meta.append(("Data", _short(data)))
    steps = sorted(int(s) for s in inputs.sensitivity["step"].dropna().unique())
    if inputs.steps is not None and {"step", "kind"} <= set(inputs.steps.columns):
        kinds = dict(zip(inputs.steps["step"], inputs.steps["kind"], strict=True))
        shown = ", ".join(f"{s} ({kinds[s]})" if s in kinds else str(s) for s in steps)
    else:
        shown = ", ".join(map(str, steps))
    meta.append(("Steps analysed", shown))
    layers = sorted(int(v) for v in inputs.sensitivity["layer"].dropna().unique())
    meta.append(("Layers", ", ".join(map(str, layers))))
    numerics = m.get("numerics") or m.get("numerics_mode")
    note = m.get("numerics_note")
    meta.append(
        (
            "Numerics mode",
            f"{numerics}" + (f" ({note})" if note else "")
            if numerics
            else "not recorded in manifest.json",
        )
    )
    if m.get("hook_names"):
        meta.append(("Hooks", _short(m["hook_names"])))
    if m.get("seeds"):
        meta.append(("Seeds", _short(m["seeds"])))
    versions = m.get("versions")
    if isinstance(versions, dict):
        meta.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    for key in ("created", "updated"):
        if m.get(key):
            meta.append((key.capitalize(), str(m[key])))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in meta)
    body = [
        f'<dl class="meta">{dl}</dl>',
        f"<h3>What the study measures</h3><p>{_e(_STUDY_TEXT)}</p>",
        "<h3>Sensitivity at the last step against the base model</h3>",
        _verdicts(inputs, ja),
    ]
    changes = inputs.extra_tables.get("change_summary")
    if changes is not None:
        try:
            counts = change_summary_counts(changes)
            items = "".join(f"<li>{_e(t)}</li>" for t in verdicts.change_sentences(counts, top=3))
            verdict = verdicts.change_verdict(counts)
            body += [
                "<h3>Geometry and probes across the series</h3>",
                f"<ul>{items}</ul>" + (f"<p>{_e(verdict)}</p>" if verdict else ""),
            ]
        except Exception:  # the change summary section says why
            pass
    if inputs.steps is not None and len(inputs.steps):
        body += ["<h3>Checkpoints</h3>", _frame_table(inputs.steps)]
    if not m:
        body.append(_note("manifest.json not found: model, data and settings are unknown."))
    if inputs.problems:
        body.append("<h3>Inputs that could not be used</h3>")
        body += [_note(f"{k}: {v}", problem=True) for k, v in inputs.problems.items()]
    return "\n".join(body)


def _figure2_section(inputs: ReportInputs, ja: dict) -> str:
    sens = inputs.sensitivity
    eval_table = _eval_table(inputs)
    body = [
        "<p>The paper's Figure 2: the mean change (over prompts) of the steered emotion's own "
        "label logit at the answer position, at the final layer and the largest α, against "
        "training step (0 = base model). Error bars: one standard error over prompts."
        + (" Dashed grey: eval loss (right axis)." if eval_table is not None else "")
        + (
            " Shaded: 95% two-level bootstrap band (the samples that build v resampled, v "
            "rebuilt, then the prompts resampled; <code>figure2_bands.csv</code>)."
            if "figure2_bands" in inputs.extra_tables
            else ""
        )
        + "</p>",
        _safe_figure(
            lambda: figures.figure2(
                sens,
                steps_table=eval_table,
                ja=ja,
                bands=inputs.extra_tables.get("figure2_bands"),
            ),
            "Figure 2",
            height=560,
            download="figure2",
        ),
    ]
    try:
        swept, sel = select_sensitivity(sens, all_layers=True)
        layers = sorted(int(v) for v in swept["layer"].unique())
        emotions = label_order(swept["steered_emotion"].unique())
    except ValueError:  # figure2 above already shows why
        layers, emotions = [], []
    if len(layers) > 1:
        body.append(
            "<h3>Layer sweep</h3><p>The same diagonal effect at every analysed layer "
            f"({', '.join(map(str, layers))}), one heatmap per emotion.</p>"
        )
        cells = [
            _safe_figure(
                partial(
                    figures.layer_step_heatmap,
                    sens,
                    e,
                    sel.alpha,
                    alpha_unit=sel.alpha_unit,
                    positions=sel.positions,
                    ja=ja,
                ),
                f"layer sweep of {e}",
                height=360,
            )
            for e in emotions[:_MAX_SWEEP_EMOTIONS]
        ]
        body.append(f'<div class="grid">{"".join(cells)}</div>')
    return "\n".join(body)


def _seed_spread_section(inputs: ReportInputs) -> str:
    """Figure 2 across fine-tuning seeds, where ``figure2_bands`` carries several seeds (the
    top level of a multi-seed results folder); empty otherwise."""
    from emolens.report.figures.seeds import figure2_seed_spread

    bands = inputs.extra_tables.get("figure2_bands")
    if bands is None or "seed" not in bands.columns or bands["seed"].nunique() < 2:
        return "<p>One fine-tuning seed: no across-seed spread (see finetune --seeds).</p>"
    note = (
        "<p>Line: the mean over seeds of each emotion's Figure 2 point; band: the smallest "
        "to the largest seed. The across-seed tests are in seed_change_summary.csv.</p>"
    )
    return note + _safe_figure(lambda: figure2_seed_spread(bands), "the across-seed Figure 2")


def _selectivity_section(inputs: ReportInputs, ja: dict) -> str:
    sens = inputs.sensitivity
    steps = sorted(int(s) for s in sens["step"].dropna().unique())
    body = [
        "<p>Steered emotion (rows) against every observed label (columns) at the final "
        "layer and the largest α: a selective concept vector raises its own label only.</p>"
    ]
    shown = [steps[-1]] + ([0] if 0 in steps and steps[-1] != 0 else [])
    for step in shown:
        label = "last step" if step == steps[-1] else "base model"
        body.append(f"<h3>Step {step} ({label})</h3>")
        body.append(
            _safe_figure(
                partial(figures.selectivity_heatmap, sens, step, ja=ja),
                f"the selectivity heatmap at step {step}",
                height=560,
            )
        )
    return "\n".join(body)


def _training_section(inputs: ReportInputs) -> str:
    body = [_problem_notes(inputs, "run_dir", "accuracy.csv")]
    if inputs.trainer_log is not None and len(inputs.trainer_log):
        body.append(_safe_figure(lambda: figures.loss_curve(inputs.trainer_log), "the loss curve"))
    elif (eval_table := _eval_table(inputs)) is not None:
        body.append(_note("No trainer log found (no run folder); eval losses from steps.csv."))
        body.append(_safe_figure(lambda: figures.loss_curve(eval_table), "the eval-loss curve"))
    else:
        body.append(
            _note(
                "No loss to show: no fine-tuning run folder with trainer_state.json "
                "was given or recorded, and steps.csv has no eval_loss."
            )
        )
    acc = inputs.accuracy
    if acc is None and inputs.steps is not None and "accuracy" in inputs.steps.columns:
        if pd.to_numeric(inputs.steps["accuracy"], errors="coerce").notna().any():
            acc = inputs.steps
    if acc is not None:
        body.append(_safe_figure(lambda: figures.accuracy_curve(acc), "the accuracy curve"))
    else:
        body.append(_note("No classification accuracy per checkpoint was found."))
    return "\n".join(body)


def _filtering_section(inputs: ReportInputs, ja: dict) -> str:
    frame = inputs.filtering
    if frame is None:
        return _problem_notes(inputs, "filtering.csv") or _note("filtering.csv not found.")
    body = [
        "<p>Samples are kept where the model picks the gold label (argmax over the label "
        "first-token logits); a label with too few kept samples drops out of the concept "
        "vectors and steering.</p>",
        _safe_figure(lambda: figures.filtering_bars(frame), "the filtering figure"),
    ]
    try:
        require_columns(frame, ("step", "label", "n_kept"), "filtering.csv")
        steps = sorted(int(s) for s in frame["step"].dropna().unique())
        labels = label_order(frame["label"].dropna())
        cells = {(str(r["label"]), int(r["step"])): r for _, r in frame.iterrows()}
        rows = []
        for lab in labels:
            row = [lab, ja.get(lab) or figures.japanese_name(lab) or ""]
            for s in steps:
                r = cells.get((lab, s))
                if r is None:
                    row.append("")
                    continue
                text = f"{format_value(r['n_kept'])}"
                if "n_samples" in r and pd.notna(r["n_samples"]):
                    text += f" / {format_value(r['n_samples'])}"
                if as_bool(r.get("dropped", False)):
                    text += " (dropped)"
                row.append(text)
            rows.append(row)
        body += [
            "<h3>Kept / samples per label and step</h3>",
            _table(["label", "日本語", *[f"step {s}" for s in steps]], rows),
        ]
    except (ValueError, KeyError, TypeError) as exc:
        body.append(_note(f"filtering.csv could not be tabulated: {exc}", problem=True))
        body.append(_frame_table(frame))
    return "\n".join(body)


def _audit_section(inputs: ReportInputs) -> str:
    audit = inputs.label_audit
    entries = audit.get("entries") if isinstance(audit, dict) else None
    if not isinstance(entries, list):
        body = _problem_notes(inputs, "label_audit.json") or _note(
            "label_audit.json not found."
            if audit is None
            else "label_audit.json has no list of entries."
        )
        return body
    columns = [
        "ja",
        "en",
        "answer",
        "first_token",
        "first_token_id",
        "n_tokens",
        "token_ids",
        "shares_first_token_with",
    ]
    rows = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        row = []
        for c in columns:
            v = e.get(c, "")
            if c == "first_token":
                v = repr(v)
            elif isinstance(v, list):
                v = ", ".join(map(str, v)) or "-"
            row.append(v)
        rows.append(row)
    body = (
        "<p>The observed quantity is each label's FIRST token after the prompt, resolved "
        "from the tokenization of prompt + answer. Labels sharing a first token cannot be "
        "told apart.</p>" + _table(columns, rows)
    )
    return body


def _grid(cells: list[str]) -> str:
    return f'<div class="grid">{"".join(cells)}</div>' if len(cells) > 1 else "".join(cells)


def _attribution_body(frame: pd.DataFrame, ja: dict) -> str:
    body = [
        "<p>At the final layer the steered change of a label's logit splits exactly into the "
        "<b>direct push</b> of α·v along the label's readout row w (its unembedding row times "
        "the final norm's gain), divided by the norm scale of the steered residual, and the "
        "<b>norm-scale change</b>: the unsteered readout w·h divided by the new scale instead "
        "of the old (a larger residual, or a v that grows it, dilutes the same α). Bars: the "
        "two parts (mean over prompts); line: the measured change, their sum.</p>",
        _safe_figure(
            lambda: figures.attribution_figure(frame, ja=ja), "the attribution figure", height=900
        ),
    ]
    if {"push_change", *[p for p, _, _ in figures.PUSH_PARTS]} <= set(frame.columns):
        body += [
            "<h3>Why the push changed across the series</h3>",
            "<p>The per-unit direct push w·v/r of each emotion, against the first step, split "
            "exactly into the part due to the <b>vector</b> moving (v), the <b>readout row</b> "
            "moving (w) and the <b>residual scale</b> moving (r, the norm scale of the neutral "
            "prompts).</p>",
            verdicts.push_verdict(frame),
            _safe_figure(
                lambda: figures.push_change_figure(frame, ja=ja),
                "the push-change figure",
                height=900,
            ),
        ]
    return "\n".join(body)


def _transfer_body(frame: pd.DataFrame, ja: dict) -> str:
    body = [
        "<p>Steering the model of step t (rows) with the concept vectors of step s "
        "(columns), at the final layer. Along a row the model is fixed and only the direction "
        "changes; along a column the direction is fixed and only the model changes. If the "
        "later model steered with the base model's vectors moves its labels as much as with its "
        "own, the concept direction barely changed; if both fall short of the base model, the "
        "model no longer reads the concept as strongly.</p>",
        _safe_figure(
            lambda: figures.transfer_heatmap(frame, ja=ja), "the transfer heatmap", height=520
        ),
    ]
    means = frame.groupby(["step", "vector_step"])["logit_change"].mean()
    steps = _steps_of(frame)
    first, last = steps[0], steps[-1]
    if first != last:
        cells = [(first, first), (last, last), (last, first), (first, last)]
        if all(c in means.index for c in cells):
            a, b, c, d = (float(means[x]) for x in cells)
            body.append(
                f"<p>Mean over emotions: the step-{first} model with its own vectors "
                f"{a:.4g}; the step-{last} model with its own vectors {b:.4g} and with the "
                f"step-{first} vectors {c:.4g}; the step-{first} model with the step-{last} "
                f"vectors {d:.4g}.</p>"
            )
    return "\n".join(body)


def _dla_body(frame: pd.DataFrame, ja: dict) -> str:
    body = [
        "<p>Direct logit attribution of the unsteered answer: each component's output (the "
        "embedding, each layer's attention and MLP) read out through the final norm with the "
        "norm scale frozen at the full residual's, so the components add up to the label "
        "logit (minus its bias). Mean over samples of each gold label, then over labels.</p>",
        _safe_figure(
            lambda: figures.dla_figure(frame, value="logit", ja=ja), "the DLA figure", height=560
        ),
    ]
    if "margin" in frame.columns:
        body.append(
            _safe_figure(
                lambda: figures.dla_figure(frame, value="margin", ja=ja),
                "the DLA margin figure",
                height=560,
            )
        )
        steps = _steps_of(frame)
        last = frame[frame["step"] == steps[-1]]
        top = last.groupby("component")["margin"].mean().sort_values(ascending=False).head(3)
        if len(top):
            shown = ", ".join(f"{c} ({v:+.3g})" for c, v in top.items())
            body.append(
                f"<p>Largest contributions to the gold-vs-rest margin at step "
                f"{steps[-1]} (mean over labels): {_e(shown)}.</p>"
            )
    return "\n".join(body)


def _random_baseline_body(frame: pd.DataFrame, ja: dict) -> str:
    body = [
        "<p>Each concept vector against two nulls, steered at the final layer: random "
        "directions of the vector's norm drawn from the covariance of the step's kept "
        "residuals (grey, mean ± one standard deviation), and vectors rebuilt from the same "
        "samples with their labels shuffled (dotted). The concept's own-label logit change is "
        "shown with its bootstrap interval over prompts. A concept vector beats a null where "
        "its one-sided permutation p-value, (1 + k) / (1 + n) with k of n null draws at least "
        "its change, has a Benjamini-Hochberg q below 0.05 across emotions.</p>",
        _safe_figure(
            lambda: figures.random_baseline_figure(frame, ja=ja),
            "the random baseline figure",
            height=900,
        ),
    ]
    alpha = float(frame["alpha"].max()) if "alpha" in frame else None
    sel = frame if alpha is None else frame[np.isclose(frame["alpha"], alpha)]
    at = "" if alpha is None else ", α = " + format_value(alpha)
    for step in sorted({_steps_of(sel)[0], _steps_of(sel)[-1]}):
        rows = sel[sel["step"] == step]
        n = rows["emotion"].nunique()
        if {"q_random", "q_shuffled"} <= set(rows.columns):
            parts = []
            for column, null in (
                ("q_random", f"{_draws(rows, 'n_random')} covariance-matched random directions"),
                ("q_shuffled", f"{_draws(rows, 'n_shuffled')} shuffled-label vectors"),
            ):
                beat = rows[rows[column] < 0.05]["emotion"]
                parts.append(
                    f"{len(beat)} of {n} raise their label more than {null} "
                    f"(q < 0.05: {_e(_names(label_order(beat)))})"
                )
            body.append(f"<p>Step {step}{at}: {'; '.join(parts)}.</p>")
        elif "share_random_at_least_concept" in rows.columns:  # a table from before the tests
            beat = rows[rows["share_random_at_least_concept"] == 0]["emotion"]
            body.append(
                f"<p>Step {step}{at}: {len(beat)} of {n} concept vectors raise their label more "
                f"than every random direction ({_e(_names(label_order(beat)))}); this table "
                "has no p-values (re-run analyze for them).</p>"
            )
    return "\n".join(body)


def _draws(rows: pd.DataFrame, column: str) -> str:
    values = rows[column].dropna().unique() if column in rows else []
    return str(int(values[0])) if len(values) == 1 else "the"


def _geometry_body(frame: pd.DataFrame, ja: dict) -> str:
    require_columns(frame, ("step", "layer", "measure", "emotion", "value"), "geometry.csv")
    layers = sorted(int(v) for v in frame["layer"].dropna().unique())
    inners: list[str | None] = [
        i for i in ("plain", "causal") if "inner" in frame and (frame["inner"] == i).any()
    ]
    body = [
        "<p>Key measures at the deepest analysed layer "
        f"({layers[-1] if layers else '?'}), in the plain inner product and in Park et al.'s "
        "causal inner product (whitened by the covariance of the unembedding rows; it is defined "
        "on the final layer, which the unembedding reads, and measured there unless "
        "<code>--causal-layers all</code>); bands are "
        f"{CI_LEVEL:.0%} bootstrap intervals over samples. <b>cosine_to_first</b>: cosine of "
        "each concept vector with its first-step self (at the first step the band is the "
        "resampling noise ceiling, so it lies below 1); <b>orthogonality</b>: mean |cos| "
        "between distinct concept vectors; <b>within_gap</b>: mean cosine of a sample with its "
        "own class mean minus that with the other class means. Every measure at every layer "
        "is tested in the change summary.</p>"
    ]
    for measure in GEOMETRY_KEY_MEASURES:
        if not (frame["measure"] == measure).any():
            continue
        body.append(f"<h3>{_e(measure)}</h3>")
        cells = [
            _safe_figure(
                # None: the one inner product there is (geometry_figure reads it so)
                partial(figures.geometry_figure, frame, measure, inner=cast(str, inner), ja=ja),
                f"{measure} ({inner})",
                height=420,
            )
            for inner in (inners or [None])
        ]
        body.append(_grid(cells))
    return "\n".join(body)


def _probes_body(frame: pd.DataFrame, ja: dict) -> str:
    body = [
        "<p>Multinomial logistic probes per layer and step on the residuals at the answer "
        f"position; held-out accuracy with {CI_LEVEL:.0%} bootstrap intervals. The menu shows "
        "one layer at a time with the first step's probe evaluated on later steps (does the "
        "old read-out still work?), a probe trained on shuffled labels, and chance (the "
        "majority label's share).</p>",
        _safe_figure(lambda: figures.probes_figure(frame), "the probes figure", height=480),
    ]
    acc = figures.probe_rows(frame, "accuracy", own=True)
    if not acc.empty:
        layer = int(acc["layer"].max())
        steps = _steps_of(acc)
        at = acc[acc["layer"] == layer].set_index("step")["value"]
        old = figures.probe_rows(frame, "accuracy", own=False)
        old = old[old["layer"] == layer].set_index("step")["value"]
        text = (
            f"<p>Layer {layer}: held-out accuracy {float(at.iloc[0]):.3f} at step "
            f"{steps[0]} and {float(at.iloc[-1]):.3f} at step {steps[-1]}"
        )
        if len(steps) > 1 and steps[-1] in old.index:
            text += f"; the step-{steps[0]} probe scores {float(old[steps[-1]]):.3f} there"
        body.append(text + ".</p>")
    if frame["layer"].nunique() > 1:
        body.append(
            _safe_figure(
                lambda: figures.probes_layer_heatmap(frame), "the probe layer heatmap", height=480
            )
        )
    return "\n".join(body)


def _change_summary_body(frame: pd.DataFrame, ja: dict) -> str:
    counts = change_summary_counts(frame)
    sentences = verdicts.change_sentences(counts)
    tests = sorted(set(frame["test"].dropna().astype(str))) if "test" in frame else []
    body = [
        "<p>Per measure series (one emotion or label, at one layer, in one inner product, for "
        "one probe, or at one alpha), each later step is compared with the first on the same "
        "samples: the effect (value at the step minus the first value), its "
        f"{CI_LEVEL:.0%} paired bootstrap interval and a p-value "
        f"({_e(', '.join(tests)) or 'paired bootstrap'}: a bootstrap test's p is the normal "
        "p of the effect over its bootstrap standard error, a permutation test's p is "
        "(1 + k) / (1 + n)). q is the "
        "Benjamini-Hochberg adjusted p within the family (geometry, probes, sensitivity), "
        f"and a series counts as changed when some step has q &lt; {verdicts.FDR_LEVEL:g} (column "
        "<code>fdr_change</code>). A series counts as equivalent only when the two one-sided "
        "tests (TOST) show every step's effect within the margin stated in "
        "<code>margin_rule</code> (column <code>equivalent_within_margin</code>); a series "
        "with neither is inconclusive. Series with no resamples (train_accuracy, chance, "
        "cosine_to_previous) are not tested.</p>",
        "<ul>" + "".join(f"<li>{_e(s)}</li>" for s in sentences) + "</ul>",
    ]
    if "paired" in frame and not frame["paired"].map(as_bool).all():
        body.append(
            _note(
                "Some steps kept other samples than the first (self-filtering): those tests "
                "are unpaired (independent resamples), which is conservative but tests the "
                "kept set's change along with the model's."
            )
        )
    verdict = verdicts.change_verdict(counts)
    if verdict:
        body.append(f"<p>{_e(verdict)}</p>")
    shown = counts.drop(columns="changed_series").rename(columns={"variant": "inner / probe"})
    body.append(_frame_table(shown))
    changed = counts[counts["n_changed"] > 0]
    if len(changed):
        body.append(
            "<details><summary>Series changed, per family</summary>"
            + _table(
                ["table", "measure", "inner / probe", "series (emotion or label @ layer)"],
                changed[["table", "measure", "variant", "changed_series"]].itertuples(
                    index=False, name=None
                ),
            )
            + "</details>"
        )
    return "\n".join(body)


def _joint_sentence(rows: pd.DataFrame) -> str:
    """The joint first-vs-last test of one alpha's emotions (omnibus jackknife), where the
    table has it."""
    if "joint_first_last_p" not in rows:
        return ""
    p = pd.to_numeric(rows["joint_first_last_p"], errors="coerce").dropna()
    if p.empty:
        return ""
    verdict = "some emotion changed" if p.iloc[0] < verdicts.FDR_LEVEL else "no change is shown"
    return (
        f" Jointly (the test that no emotion's point changed): p = {p.iloc[0]:.3g}, "
        f"{verdict} at the {verdicts.FDR_LEVEL:g} level."
    )


def _trends_body(frame: pd.DataFrame, ja: dict) -> str:
    """Per alpha: which emotions' Figure 2 points fell or rose from the first to the last step
    (q < level, BH across emotions), and which have a slope; the rest are not shown to move."""
    body = [
        "<p>Per emotion, Figure 2's point at the last step against the first and the "
        "least-squares slope over steps, each tested with a delete-one jackknife over the "
        "samples that build v and the steered prompts, paired across steps by sample, with a "
        "Student t reference (column method; the two-level bootstrap's own test rejected 8% "
        "of true nulls in benchmarks/calibration.py, this one 4.5%); q: Benjamini-Hochberg "
        "across emotions at each α. "
        "An emotion with q ≥ 0.05 is not shown to have changed, which is not evidence that it "
        "kept its sensitivity.</p>"
    ]
    sentences = []
    for alpha, g in frame.groupby("alpha", sort=True):
        q = pd.to_numeric(g["first_last_q"], errors="coerce")
        eff = pd.to_numeric(g["first_last_effect"], errors="coerce")
        fell = g[(q < verdicts.FDR_LEVEL) & (eff < 0)]["emotion"].map(
            lambda e: figures.display_name(e, ja)
        )
        rose = g[(q < verdicts.FDR_LEVEL) & (eff > 0)]["emotion"].map(
            lambda e: figures.display_name(e, ja)
        )
        slope_q = pd.to_numeric(g["slope_q"], errors="coerce")
        trend = int((slope_q < verdicts.FDR_LEVEL).sum())
        first, last = int(g["first_step"].iloc[0]), int(g["last_step"].iloc[0])
        sentences.append(
            f"α = {format_value(alpha)}: from step {first} to {last}, "
            f"{len(fell)} of {len(g)} emotions fell ({', '.join(fell) or 'none'}) and "
            f"{len(rose)} rose ({', '.join(rose) or 'none'}) at q < {verdicts.FDR_LEVEL:g}; "
            f"{trend} have a slope over steps at q < {verdicts.FDR_LEVEL:g}; "
            f"{len(g) - len(fell) - len(rose)} are not shown to have changed." + _joint_sentence(g)
        )
    body.append("<ul>" + "".join(f"<li>{_e(s)}</li>" for s in sentences) + "</ul>")
    if "paired" in frame and not frame["paired"].map(as_bool).all():
        body.append(
            _note(
                "The steps kept different samples (self-filtering): the tests pair the steps "
                "only on the samples they share, and a sample kept at some steps moves only "
                "those steps' points."
            )
        )
    body.append(_frame_table(frame))
    return "\n".join(body)


_SECTION_BODIES: dict[str, Callable[[pd.DataFrame, dict], str]] = {
    "attribution": _attribution_body,
    "transfer": _transfer_body,
    "dla": _dla_body,
    "heads": lambda frame, ja: "\n".join(
        [
            "<p>Direct logit attribution per attention head (head outputs through W_O, final "
            "norm scale frozen at the full residual's; heads plus the projection bias add up "
            "to each layer's attention row above). Mean over gold labels.</p>",
            _safe_figure(lambda: lens_figures.heads_figure(frame), "the heads figure", 560),
        ]
    ),
    "generations": lambda frame, ja: "\n".join(
        [
            "<p>Greedy continuations of a neutral prompt steered by each emotion "
            "(<code>emolens generate</code>; alpha 0 is the unsteered text), at the first and "
            "the last step:</p>"
        ]
        + [
            _frame_table(lens_figures.generations_view(frame, step))
            for step in dict.fromkeys([min(frame["step"]), max(frame["step"])])
        ]
    ),
    "logit_lens": lambda frame, ja: "\n".join(
        [
            "<p>Each layer's answer-position residual read through the model's own final norm "
            "and unembedding: where in depth each label becomes readable (accuracy over the "
            "labels), and how fine-tuning moves it.</p>",
            _safe_figure(lambda: lens_figures.lens_depth_figure(frame), "the lens figure"),
            _safe_figure(lambda: lens_figures.lens_figure(frame, ja=ja), "the lens figure", 560),
        ]
    ),
    "random_baseline": _random_baseline_body,
    "geometry": _geometry_body,
    "probes": _probes_body,
    "change_summary": _change_summary_body,
    "sensitivity_trends": _trends_body,
}


def _optional_section(inputs: ReportInputs, name: str, title: str, ja: dict | None = None) -> str:
    frame = inputs.extra_tables.get(name)
    if frame is None:
        body = _problem_notes(inputs, f"{name}.csv") or _note(f"{name}.csv is empty.")
        return body
    make = _SECTION_BODIES.get(name)
    try:
        if make is None:
            raise ValueError("no dedicated figure")
        shown = make(frame, ja or {})
    except Exception as exc:  # an unexpected table is still shown, generically
        shown = "\n".join(
            [
                _note(
                    f"{name}.csv could not be shown as designed ({exc}); shown generically.",
                    problem=True,
                )
                if make is not None
                else "",
                _safe_figure(
                    lambda: figures.generic_table_figure(frame, f"{title} ({name}.csv)"),
                    f"the {name} figure",
                ),
            ]
        )
    return "\n".join(
        [
            shown,
            f"<details><summary>{_e(name)}.csv ({len(frame)} rows)</summary>"
            f"{_frame_table(frame)}</details>",
        ]
    )


def _has_layer_sweep(inputs: ReportInputs) -> bool:
    return inputs.sensitivity["layer"].nunique() > 1


def _layer_text(layer) -> str:
    return "–" if pd.isna(layer) else str(int(layer))


def _layer_summary_section(inputs: ReportInputs, ja: dict) -> str:
    probes = inputs.extra_tables.get("probes")
    try:
        summary = sweeps.layer_summary(inputs.sensitivity, probes)
    except Exception as exc:
        try:  # a probes table of another shape must not hide the steering half
            summary = sweeps.layer_summary(inputs.sensitivity, None)
            probe_note = _note(f"probes.csv not used here: {exc}", problem=True)
        except Exception as exc2:
            return _note(f"The layer summary could not be computed: {exc2}", problem=True)
    else:
        probe_note = (
            ""
            if probes is not None
            else _note("probes.csv not found: the most decodable layer is unknown.")
        )
    layers = sorted(int(v) for v in inputs.sensitivity["layer"].dropna().unique())
    body = [
        "<p>Per step and emotion: the steered layer (of "
        f"{', '.join(map(str, layers))}) where steering with the emotion's concept vector "
        "raises its own label most (largest α, mean over prompts), and the layer whose probe "
        "recalls the label best on held-out samples. Ties go to the shallowest layer; a label "
        "that no layer's probe recalls at all has no decodable layer (–).</p>",
        probe_note,
        _safe_figure(
            lambda: figures.layer_summary_figure(summary, ja=ja), "the layer summary", height=560
        ),
    ]
    moves = sweeps.layer_moves(summary)
    if len(moves):
        rows = [
            [
                r.emotion,
                *(
                    f"{_layer_text(a)} → {_layer_text(b)}"
                    for a, b in (
                        (r.steerable_first, r.steerable_last),
                        (r.decodable_first, r.decodable_last),
                    )
                ),
            ]
            for r in moves.itertuples()
        ]
        first, last = int(moves["first_step"].min()), int(moves["last_step"].max())
        body += [
            f"<h3>From step {first} to step {last}</h3>",
            _table(["emotion", "most steerable layer", "most decodable layer"], rows),
        ]
    body.append(
        f"<details><summary>Layer summary ({len(summary)} rows)</summary>"
        f"{_frame_table(summary)}</details>"
    )
    return "\n".join(body)


def _failures_section(inputs: ReportInputs) -> str:
    failures = inputs.manifest.get("failures") or []
    problems = inputs.manifest.get("series_problems") or []
    body = []
    if not inputs.manifest:
        body.append(_note("manifest.json not found: failed checkpoints are unknown."))
    elif failures:
        rows = [
            [f.get("step", ""), f.get("spec", ""), f.get("error", "")]
            if isinstance(f, dict)
            else ["", "", f]
            for f in failures
        ]
        body += [
            f"<p>{len(rows)} checkpoint(s) failed and are missing from the figures:</p>",
            _table(["step", "spec", "error"], rows),
        ]
    else:
        body.append("<p>No checkpoint failed.</p>")
    latest = (inputs.last_run or {}).get("failures") or []
    if latest and latest != failures:
        finished = (inputs.last_run or {}).get("finished", "?")
        body += [
            f"<p>The latest run ({_e(str(finished))}) failed at "
            f"{len(latest)} step(s); the tables above keep the earlier finished results:</p>",
            _table(
                ["step", "spec", "error"],
                [[f.get("step", ""), f.get("spec", ""), f.get("error", "")] for f in latest],
            ),
        ]
    if problems:
        body.append(
            "<p>Checkpoints left out of the series (half-written or without weights):</p><ul>"
            + "".join(f"<li>{_e(_short(p))}</li>" for p in problems)
            + "</ul>"
        )
    return "\n".join(body)


def _manifest_section(inputs: ReportInputs) -> str:
    if not inputs.manifest:
        body = _problem_notes(inputs, "manifest.json") or _note("manifest.json not found.")
    else:
        text = json.dumps(inputs.manifest, ensure_ascii=False, indent=2, default=str)
        body = f"<details><summary>manifest.json</summary><pre>{_e(text)}</pre></details>"
    return body


def build_report_html(inputs: ReportInputs, title: str = "emolens report") -> str:
    """The report page as text: plotly.js inline once, every figure a ``div``, no network."""
    ja = _ja_map(inputs)
    sections = [
        ("summary", "Summary", lambda: _summary_section(inputs, ja)),
        ("figure2", "Figure 2 reproduction", lambda: _figure2_section(inputs, ja)),
        ("selectivity", "Selectivity", lambda: _selectivity_section(inputs, ja)),
        ("seeds", "Across seeds", lambda: _seed_spread_section(inputs)),
        *(
            [
                (
                    "layer-summary",
                    "Where emotions are steerable and decodable",
                    lambda: _layer_summary_section(inputs, ja),
                )
            ]
            if _has_layer_sweep(inputs)
            else []
        ),
        ("training", "Training curves", lambda: _training_section(inputs)),
        ("filtering", "Filtering", lambda: _filtering_section(inputs, ja)),
        ("label-audit", "Label audit", lambda: _audit_section(inputs)),
        *[
            (n.replace("_", "-"), t, lambda n=n, t=t: _optional_section(inputs, n, t, ja))
            for n, t in OPTIONAL_TABLES.items()
            if n in inputs.extra_tables
        ],
        ("failures", "Failures", lambda: _failures_section(inputs)),
        ("manifest", "Run manifest", lambda: _manifest_section(inputs)),
    ]
    _FigureIds.count = 0
    body = "\n".join(_section(a, t, make()) for a, t, make in sections)
    links = "".join(f'<a href="#{_e(a)}">{_e(t)}</a>' for a, t, _ in sections)
    model = inputs.manifest.get("model")
    subtitle = f"<p>{_e(_short(model, 160))}</p>" if model else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<div class="container">\n<header><h1>{_e(title)}</h1>{subtitle}<nav>{links}</nav>'
        '</header>\n<p id="emolens-status" class="status" hidden></p>\n'
        '<noscript><p class="status">The figures need JavaScript.</p></noscript>\n'
        f"{body}\n</div>\n{_plotly_scripts()}\n</body>\n</html>\n"
    )


def packed(text: str) -> str:
    """``text`` gzipped (deterministically: no timestamp) and base64-encoded, as the page's
    loader unpacks it."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), 9, mtime=0)).decode("ascii")


def unpacked(text: str) -> str:
    """The text :func:`packed` packed."""
    return gzip.decompress(base64.b64decode(text)).decode("utf-8")


def page_template() -> dict:
    """The plotly template every figure of the page is drawn with: plotly's default, in the
    page's font stack."""
    import plotly.io as pio

    template = go.layout.Template(pio.templates["plotly"])
    template.layout.font.family = FONT_STACK
    return _compact(template.to_plotly_json())


#: Unpacks plotly.js (gzip, base64) with the browser's DecompressionStream, draws every
#: figure of the page, and wires the PNG/SVG download buttons.
_LOADER_JS = """
(function () {
  var status = document.getElementById("emolens-status");
  function fail(text) { status.textContent = text; status.hidden = false; }
  function unpack(node) {
    var text = node.textContent.trim();
    var bytes = Uint8Array.from(atob(text), function (c) { return c.charCodeAt(0); });
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text();
  }
  function draw(template, nodes, specs) {
    nodes.forEach(function (node, i) {
      var spec = JSON.parse(specs[i]);
      spec.layout.template = template;
      Plotly.newPlot(document.getElementById(node.dataset.figure), spec.data, spec.layout,
        spec.config);
    });
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-download]");
    if (!button || !window.Plotly) return;
    var div = document.getElementById(button.dataset.target);
    Plotly.downloadImage(div, {format: button.dataset.download,
      filename: button.dataset.filename, width: div.offsetWidth, height: div.offsetHeight});
  });
  if (typeof DecompressionStream === "undefined") {
    fail("This browser cannot unpack the page's figures (it needs DecompressionStream: " +
      "Chrome 80, Firefox 113, Safari 16.4 or newer).");
    return;
  }
  var template = JSON.parse(document.getElementById("emolens-template").textContent);
  var nodes = Array.prototype.slice.call(
    document.querySelectorAll('script[type="application/gzip;base64"][data-figure]'));
  var plotly = window.Plotly ? Promise.resolve(null)
    : unpack(document.getElementById("emolens-plotly"));
  Promise.all([plotly, Promise.all(nodes.map(unpack))]).then(function (parts) {
    if (parts[0] !== null) {
      var script = document.createElement("script");
      script.text = parts[0];
      document.head.appendChild(script);
    }
    draw(template, nodes, parts[1]);
  }).catch(function (error) { fail("The figures could not be drawn: " + error); });
})();
"""


def _plotly_scripts() -> str:
    """plotly.js (compressed), the shared template and the loader, once per page."""
    return (
        '<script id="emolens-plotly" type="application/gzip;base64">'
        f"{packed(get_plotlyjs())}</script>\n"
        f'<script id="emolens-template" type="application/json">{_script_json(page_template())}'
        f'</script>\n<script type="text/javascript">{_LOADER_JS}</script>'
    )
