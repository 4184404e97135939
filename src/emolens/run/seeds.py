"""``analyze`` over a multi-seed folder: one run folder per fine-tuning seed (``RUN/seed-K/``,
as ``finetune --seeds`` writes them, the same data splits in each).

Each seed is analysed by the ordinary single-series :func:`emolens.run.analyze.analyze` into
``OUT/seed-K/`` (a complete results folder: resumable, reportable on its own). The top level of
``OUT`` then holds every table of the seed folders concatenated with a ``seed`` column,
``seed_change_summary.csv`` (the change from the first step tested across seeds,
:func:`emolens.analysis.seed_tests.seed_change_summary`) and ``seeds.json`` (which seeds, from
which run folders).
"""

import logging
import re
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from emolens.analysis.seed_tests import seed_change_summary
from emolens.model.loading import is_run_dir
from emolens.store import layout
from emolens.store.files import folder_lock, read_json, write_csv, write_json

log = logging.getLogger(__name__)

_SEED_DIR = re.compile(r"^seed-(\d+)$")
#: What ``OUT/seeds.json`` is called; its presence marks a multi-seed results folder.
SEEDS_FILE = "seeds.json"
SEED_SUMMARY = "seed_change_summary"


def seed_runs(model_spec) -> dict[int, Path] | None:
    """``{seed: run folder}`` where ``model_spec`` is a folder of ``seed-K/`` run folders (and
    not itself a run folder); None otherwise. Raises where a ``seed-K/`` folder holds no
    checkpoint (a seed whose fine-tuning did not start or finish)."""
    if not isinstance(model_spec, (str, Path)):
        return None
    root = Path(str(model_spec)).expanduser()
    if not root.is_dir() or is_run_dir(root):
        return None
    found = {
        int(m.group(1)): p
        for p in root.iterdir()
        if p.is_dir() and (m := _SEED_DIR.match(p.name)) is not None
    }
    if not found:
        return None
    empty = [p.name for p in found.values() if not is_run_dir(p)]
    if empty:
        raise ValueError(
            f"{root} holds seed folders without checkpoints ({', '.join(sorted(empty))}); "
            "finish their fine-tuning or move them out"
        )
    return dict(sorted(found.items()))


def analyze_seeds(runs: dict[int, Path], corpus, out_dir: str | Path, config, **kwargs) -> Path:
    """Analyse each seed's run folder into ``OUT/seed-K/`` with
    :func:`emolens.run.analyze.analyze` (``config`` and ``kwargs`` passed on to each), then
    write the top-level seed tables (:func:`write_seed_tables`). ``shard`` is refused (shard
    one seed folder at a time and merge it)."""
    from emolens.run.analyze import analyze

    if kwargs.get("shard") is not None:
        raise ValueError(
            "--shard splits one series; analyse a multi-seed folder whole, or analyse and "
            "merge one seed-K/ folder at a time"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give a folder")
    if layout.ResultsLayout(out).manifest.exists():
        raise ValueError(
            f"{out} holds the results of a single series; give a new --out for the "
            "multi-seed analysis"
        )
    with folder_lock(out, "analyze (seeds)"):
        for seed, run in tqdm(runs.items(), desc="seeds", unit="seed"):
            log.info("seed %s: analysing %s into %s", seed, run, out / f"seed-{seed}")
            analyze(run, corpus, out / f"seed-{seed}", config, **kwargs)
        write_seed_tables(out, {seed: str(run) for seed, run in runs.items()})
    return out


def write_seed_tables(out: Path, runs: dict[int, str]) -> dict[str, pd.DataFrame]:
    """The top-level tables of a multi-seed results folder from its ``seed-K/`` folders: every
    ``NAME.csv`` of a seed folder, concatenated over seeds with a ``seed`` column first;
    ``seed_change_summary.csv``; ``seeds.json``. Returns the tables."""
    folders = {seed: out / f"seed-{seed}" for seed in runs}
    names: dict[str, None] = {}
    for folder in folders.values():
        for csv in sorted(folder.glob("*.csv")):
            names.setdefault(csv.stem)
    tables = {}
    for name in names:
        parts = []
        for seed, folder in folders.items():
            path = folder / f"{name}.csv"
            if path.exists() and path.stat().st_size > 1:
                frame = pd.read_csv(path)
                frame.insert(0, "seed", seed)
                parts.append(frame)
        tables[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        write_csv(out / f"{name}.csv", tables[name])
    summary = seed_change_summary(tables)
    write_csv(out / f"{SEED_SUMMARY}.csv", summary)
    tables[SEED_SUMMARY] = summary
    manifests = {
        seed: read_json(layout.ResultsLayout(f).manifest)
        for seed, f in folders.items()
        if layout.ResultsLayout(f).manifest.exists()
    }
    write_json(
        out / SEEDS_FILE,
        {
            "seeds": list(runs),
            "runs": {str(k): v for k, v in runs.items()},
            "folders": {str(k): f"seed-{k}" for k in runs},
            "steps_done": {str(k): m.get("steps_done", []) for k, m in manifests.items()},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "test": "per-seed change from the first step, one-sample t-test across seeds "
            "(df = seeds - 1), BH within family; seed_change_summary.csv",
        },
    )
    return tables


__all__ = ["SEEDS_FILE", "analyze_seeds", "seed_runs", "write_seed_tables"]
