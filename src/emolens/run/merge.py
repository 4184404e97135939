"""The cross-step tables, rebuilt from the finished step folders, and the merge of shards."""

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from emolens.analysis._common import Replicates
from emolens.analysis.baselines import random_baseline_frame
from emolens.analysis.change_summary import change_omnibus, change_summary
from emolens.analysis.figure2 import figure2_frame
from emolens.analysis.geometry import CausalInnerProduct
from emolens.analysis.geometry_tables import (
    causal_geometry_frame,
    cross_step_tests,
    geometry_frame,
)
from emolens.analysis.probe_tables import probes_frame
from emolens.analysis.sample_sets import (
    comparison_masks,
    kept_set_effect_frame,
    own_masks,
    restrict_to_set,
)
from emolens.analysis.steps import (
    StepData,
    attribution_frame,
    load_steps,
    transfer_frame,
    with_readout,
)
from emolens.model import hooks
from emolens.run.config import AnalysisConfig
from emolens.run.identity import identity_differences
from emolens.store import layout
from emolens.store.files import (
    folder_lock,
    read_json,
    write_csv,
    write_json,
)
from emolens.store.manifest import Manifest

#: p-values of the per-series change tests: the normal (Wald) p from the bootstrap SE, which
#: has no floor (a count p-value's 1/(1+B) floor keeps BH from flagging anything across the
#: thousands of series of a study; calibrated in benchmarks/calibration.py).
CHANGE_P_METHOD = "normal"

log = logging.getLogger(__name__)


def combine_steps(
    out: Path,
    prompt_ids: list[str],
    labels: tuple[str, ...],
    config: AnalysisConfig,
    folders: list[Path] | None = None,
) -> dict[str, pd.DataFrame]:
    """Rebuild the top-level tables from the finished step folders (``folders``, default every
    one with a ``done.json``; the cross-step ones, attribution, transfer, geometry, probes,
    random baseline, need only what is on disk)."""
    done = (
        sorted(folders)
        if folders is not None
        else [s.folder for s in layout.ResultsLayout(out).finished_steps()]
    )
    tables = _per_step_tables(done)
    steps = load_steps(done)
    if steps:
        tables.update(_cross_step_tables(steps, prompt_ids, labels, config))
    write_tables(layout.ResultsLayout(out), tables)
    return tables


def write_tables(results: layout.ResultsLayout, tables: dict[str, pd.DataFrame]) -> None:
    """Write each table as ``{name}.csv``. A table that no step produced (no columns: e.g.
    ``heads`` where the model has no exact per-head split) and a cross-step table not built
    this time get no file, and a stale one is removed: it would contradict the steps."""
    for name, frame in tables.items():
        if len(frame.columns) == 0:
            results.table(name).unlink(missing_ok=True)
        else:
            write_csv(results.table(name), frame)
    for name in CROSS_STEP_TABLES:
        if name not in tables:
            results.table(name).unlink(missing_ok=True)


def _per_step_tables(done: list[Path]) -> dict[str, pd.DataFrame]:
    """The tables that concatenate what each finished step folder in ``done`` wrote."""
    sens = [pd.read_csv(layout.StepFiles(d).sensitivity) for d in done]
    filt = [pd.read_csv(layout.StepFiles(d).filtering) for d in done]
    rows = []
    for d in done:
        info = read_json(layout.StepFiles(d).done)
        ck = info["checkpoint"]
        rows.append(
            {
                "step": info["step"],
                "kind": ck["kind"],
                "spec": ck["spec"],
                "eval_loss": ck.get("eval_loss"),
                "accuracy": info["accuracy"],
                "n_samples": info["n_samples"],
                "weights_hash": info["weights_hash"],
            }
        )
    tables = {
        "sensitivity": pd.concat(sens, ignore_index=True) if sens else pd.DataFrame(),
        "filtering": pd.concat(filt, ignore_index=True) if filt else pd.DataFrame(),
        "steps": pd.DataFrame(
            rows,
            columns=["step", "kind", "spec", "eval_loss", "accuracy", "n_samples", "weights_hash"],
        ),
    }
    dla_files = [layout.StepFiles(d).dla for d in done]
    dla = [pd.read_csv(f) for f in dla_files if f.exists()]
    tables["dla"] = pd.concat(dla, ignore_index=True) if dla else pd.DataFrame()
    for name in ("heads", "logit_lens"):
        found = [pd.read_csv(d / f"{name}.csv") for d in done if (d / f"{name}.csv").exists()]
        tables[name] = pd.concat(found, ignore_index=True) if found else pd.DataFrame()
    return tables


def _cross_step_tables(
    steps: list[StepData], prompt_ids: list[str], labels: tuple[str, ...], config: AnalysisConfig
) -> dict[str, pd.DataFrame]:
    """The tables that compare steps (attribution, transfer, random baseline, geometry,
    probes, change summary, Figure 2 bands), from the loaded step data."""
    tables: dict[str, pd.DataFrame] = {}
    alphas, unit = config.alphas, config.alpha_unit
    if with_readout(steps):
        tables["attribution"] = attribution_frame(steps, prompt_ids, alphas, labels, unit)
        alpha = config.transfer_alpha if config.transfer_alpha is not None else max(alphas)
        tables["transfer"] = transfer_frame(steps, prompt_ids, alpha, labels, unit)
        tables["random_baseline"] = random_baseline_frame(
            steps, prompt_ids, alphas, labels, seed=config.seed, alpha_unit=unit
        )
    neutral = labels[-1] if "no-emotion" not in labels else "no-emotion"
    keep = {s.step: s.keep for s in steps if s.keep is not None}
    compare = comparison_masks(steps, config.compare_set, prompt_ids)
    tables["geometry"], geometry_reps = _geometry_tables(
        steps, compare, labels, neutral, config, n_boot=config.n_boot
    )
    tables["kept_set_effect"] = _kept_set_effect(
        steps, tables["geometry"], prompt_ids, labels, neutral, config
    )
    tables["probes"], probe_reps = probes_frame(
        steps,
        labels,
        seed=config.seed,
        n_boot=config.n_boot,
        return_replicates=True,
        n_perm=config.probe_perms,
        n_refit=config.probe_refits,
    )
    # the cross-step geometry measures (cosine to the first step, principal angles) are
    # tested by swapping each sample's residuals between the steps: exact under no change
    # (on the --compare-set samples: the same samples at every step, unless it is "own")
    metrics, causal_layers = causal_metrics(steps, config)
    cross = cross_step_tests(
        steps,
        labels,
        neutral,
        keep_masks=compare,
        n_perm=config.n_perm,
        seed=config.seed,
        metrics=metrics,
        causal_layers=causal_layers,
    )

    def tested(frame: pd.DataFrame, reps: Replicates, table: str, **cross) -> pd.DataFrame:
        return change_summary(
            frame,
            reps,
            seed=config.seed,
            p_method=CHANGE_P_METHOD,
            equivalence_margin=config.equivalence_margin,
            **cross,
        ).assign(table=table)

    tables["change_summary"] = pd.concat(
        [
            tested(tables["geometry"], geometry_reps, "geometry", cross_step=cross),
            tested(tables["probes"], probe_reps, "probes"),
        ],
        ignore_index=True,
    )
    # one joint test per layer and measure (every emotion's series at once), BH per family
    tables["change_omnibus"] = pd.concat(
        [
            change_omnibus(tables["geometry"], geometry_reps, seed=config.seed).assign(
                table="geometry"
            ),
            change_omnibus(tables["probes"], probe_reps, seed=config.seed).assign(table="probes"),
        ],
        ignore_index=True,
    )
    # the bands read the final layer through the readout: steps without one are left out
    tables["figure2_bands"], tables["sensitivity_trends"] = figure2_frame(
        with_readout(steps),
        prompt_ids,
        alphas,
        labels,
        neutral,
        keep_masks=keep,
        n_boot=config.n_boot,
        seed=config.seed,
    )
    return tables


def causal_metrics(
    steps: Sequence[StepData], config: AnalysisConfig
) -> tuple[dict[int, CausalInnerProduct] | None, list[int] | None]:
    """The causal inner product of each step (``--causal-metric own``: its own unembedding's;
    ``base``: the first step's at every step) and the layers it is applied to
    (``--causal-layers final``: the final layer, which the unembedding reads; ``all``: None,
    every layer). ``(None, None)`` where a step needed has no metric (no readout)."""
    if not steps:
        return None, None
    if config.causal_metric == "base":
        first = steps[0].metric
        metrics = {s.step: first for s in steps} if first is not None else {}
    else:
        metrics = {s.step: s.metric for s in steps if s.metric is not None}
    if len(metrics) != len(steps):
        return None, None
    layers = None if config.causal_layers == "all" else [steps[0].final_layer]
    return metrics, layers


def _geometry_tables(
    steps: list[StepData],
    masks: dict,
    labels: tuple[str, ...],
    neutral: str,
    config: AnalysisConfig,
    *,
    n_boot: int,
    warn: bool = True,
) -> tuple[pd.DataFrame, Replicates]:
    """Plain and (where every step has a metric) causal geometry on the sample sets ``masks``,
    with the emotions that have ``min_count`` samples in them (a warning names the others)."""
    restricted, dropped = restrict_to_set(steps, masks, labels, neutral, config.min_count)
    for step, names in dropped.items() if warn else ():
        log.warning(
            "step %s: %s left out of the geometry: fewer than --min-count %s samples in "
            "the --compare-set %s samples",
            step,
            ", ".join(names),
            config.min_count,
            config.compare_set,
        )
    geometry = [
        geometry_frame(
            restricted, labels, neutral, keep_masks=masks, n_boot=n_boot, seed=config.seed,
            return_replicates=True,
        )
    ]  # fmt: skip
    metrics, causal_layers = causal_metrics(steps, config)
    if metrics is not None:
        geometry.append(
            causal_geometry_frame(
                restricted, metrics, labels, neutral, layers=causal_layers, keep_masks=masks,
                n_boot=n_boot, seed=config.seed, return_replicates=True,
            )
        )  # fmt: skip
    frame = pd.concat([g for g, _ in geometry], ignore_index=True)
    return frame, Replicates.concat([r for _, r in geometry])


def _kept_set_effect(
    steps: list[StepData],
    geometry: pd.DataFrame,
    prompt_ids: list[str],
    labels: tuple[str, ...],
    neutral: str,
    config: AnalysisConfig,
) -> pd.DataFrame:
    """``kept_set_effect.csv``: geometry on each step's own kept set minus geometry on the
    fixed set (``--compare-set``, or the first step's kept set where that is ``own``); the
    values only (one bootstrap replicate, unused)."""
    fixed_set = config.compare_set if config.compare_set != "own" else "first"
    own, fixed = own_masks(steps), comparison_masks(steps, fixed_set, prompt_ids)
    other = fixed if config.compare_set == "own" else own  # the set not computed yet
    try:
        again = _geometry_tables(steps, other, labels, neutral, config, n_boot=1, warn=False)[0]
    except ValueError as exc:  # e.g. the first step keeps too few neutral samples
        log.warning("no kept_set_effect.csv: %s", exc)
        return pd.DataFrame()
    values = (geometry, again) if config.compare_set == "own" else (again, geometry)
    return kept_set_effect_frame(
        *values,
        fixed_set=fixed_set,
        own_sizes={k: int(m.sum()) for k, m in own.items()},
        fixed_sizes={k: int(m.sum()) for k, m in fixed.items()},
    )


#: Tables :func:`combine_steps` writes only when some step can feed them.
CROSS_STEP_TABLES = (
    "attribution",
    "transfer",
    "random_baseline",
    "geometry",
    "probes",
    "change_summary",
    "change_omnibus",
    "kept_set_effect",
)


def merge(shard_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Combine the result folders of ``analyze(..., shard=(i, n))`` runs into ``out_dir``.

    The shards must agree on model, data, labels, prompt, dtype and settings, and ``out_dir``
    must be new or empty; the merged tables equal those of a single run over the whole series.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; merge into a new folder")
    manifests = []
    for d in map(Path, shard_dirs):
        try:
            manifests.append(read_json(layout.ResultsLayout(d).manifest))
        except FileNotFoundError:
            raise ValueError(
                f"{d} holds no {layout.MANIFEST}: is it an emolens analyze folder?"
            ) from None
        except ValueError as exc:
            raise ValueError(f"{layout.ResultsLayout(d).manifest} is unreadable ({exc})") from None
    if len({str(Path(d).resolve()) for d in shard_dirs}) != len(shard_dirs):
        raise ValueError("a shard folder is named twice; give each once")
    for shard_dir, m in zip(shard_dirs, manifests):
        if not isinstance(m.get("identity"), dict):
            raise ValueError(
                f"{shard_dir}/manifest.json records no identity (an older emolens wrote "
                "it); re-run that shard with this version"
            )
    ref = {k: v for k, v in manifests[0]["identity"].items() if k != "shard"}
    for shard_dir, m in zip(shard_dirs[1:], manifests[1:]):
        other = {k: v for k, v in m["identity"].items() if k != "shard"}
        differ = identity_differences(ref, other)
        if m.get("steered_prompts") != manifests[0].get("steered_prompts"):
            differ.append("steered prompts")
        if differ:
            raise ValueError(
                f"{shard_dir} is not a shard of the analysis in {shard_dirs[0]} "
                f"({'; '.join(differ[:4])}); only shards of one analysis merge"
            )
    with folder_lock(out, "merge"):
        for d in map(Path, shard_dirs):
            for step_files in layout.ResultsLayout(d).finished_steps():
                step = step_files.folder
                target = layout.ResultsLayout(out).steps_dir / step.name
                if target.exists():
                    raise ValueError(
                        f"step {step.name} is in more than one shard "
                        f"({step.parent.parent} and another); merge shards of "
                        "one --shard i/n split"
                    )
                shutil.copytree(step, target)
        first = manifests[0]
        settings = {**first["settings"], "alphas": tuple(first["settings"]["alphas"])}
        tables = combine_steps(
            out,
            prompt_ids=first["steered_prompts"],
            labels=tuple(e["en"] for e in first["labels"]["emotions"]),
            config=AnalysisConfig(**settings),
        )
        results = layout.ResultsLayout(out)
        audit = next(
            (s.label_audit for s in results.step_folders() if s.label_audit.exists()), None
        )
        if audit is not None:
            write_json(results.label_audit, read_json(audit))
        done = sorted(int(x) for x in tables["steps"]["step"]) if len(tables["steps"]) else []
        replace(
            Manifest.from_dict(first),
            shard=None,
            merged_from=[str(d) for d in shard_dirs],
            identity={**ref, "shard": None},
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            steps_done=done,
            final_layer_tables=final_layer_record(out),
            failures=[f for m in manifests for f in m.get("failures", []) if f["step"] not in done]
            + readout_failures(out),
        ).write(results.manifest)
    return out


def readout_failures(out: Path) -> list[dict]:
    """One ``failures`` entry per finished step whose readout check failed (from its
    ``done.json``, so a resumed run reports it again)."""
    found = []
    for marker in (s.done for s in layout.ResultsLayout(out).finished_steps()):
        info = read_json(marker)
        if info.get("readout_error"):
            found.append(
                {
                    "step": info["step"],
                    "spec": info["checkpoint"]["spec"],
                    "stage": "readout",
                    "error": info["readout_error"],
                }
            )
    return found


def final_layer_record(out: Path) -> dict | None:
    """Which layer the final-layer tables read (and which were collected), for the manifest."""
    first = next(iter(layout.ResultsLayout(out).finished_steps()), None)
    if first is None:
        return None
    acts_meta = read_json(first.activations_meta)
    n_layers = read_json(first.done)["model"]["n_layers"]
    read_point = acts_meta.get("meta", {}).get("read_point", "block-out")
    return {
        "final_layer": n_layers - 1,
        "hook": hooks.read_hook(n_layers - 1, n_layers, read_point),
        **({} if read_point == "block-out" else {"read_point": read_point}),
        "collected_layers": acts_meta["layers"],
        "tables": ["attribution", "transfer", "random_baseline", "dla"],
    }
