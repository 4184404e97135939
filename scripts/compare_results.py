"""Compare two emolens results folders file by file: are two runs' outputs the same?

    python scripts/compare_results.py OLD_DIR NEW_DIR [--atol 0]

Every CSV is compared as a table (same columns, same rows in the same order, numbers equal
within ``--atol``; 0 means bit-equal as written), every JSON as data with the keys that record
when, where and with which code a run happened left out (timestamps, seconds, versions, paths),
every safetensors file by its parsed header and data bytes, and every other file by its bytes
(HTML excepted: the report embeds timestamps).
Prints one line per difference and exits 1 if there is any, so it can gate a refactor: run
``emolens demo --model tiny-random`` before and after, then compare the two ``results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

#: JSON keys that describe the run rather than its results.
VOLATILE_KEYS = {
    "created", "updated", "finished", "seconds", "versions", "emolens", "provenance",
    "run_dir", "model", "spec", "source", "base", "series", "merged_from", "identity",
    "weights_hash", "checkpoint", "load", "files", "path", "finetune_s", "analyze_s",
    "seconds_this_run", "key",
}  # fmt: skip
SKIP_SUFFIXES = {".html", ".lock"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed: safetensors writes its metadata keys in no fixed
    order) and its data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def compare_csv(a: Path, b: Path, atol: float) -> list[str]:
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    if list(fa.columns) != list(fb.columns):
        return [f"{a.name}: columns differ: {sorted(set(fa.columns) ^ set(fb.columns))}"]
    if len(fa) != len(fb):
        return [f"{a.name}: {len(fa)} rows against {len(fb)}"]
    out = []
    for col in fa.columns:
        x, y = fa[col], fb[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            xv, yv = x.to_numpy(float), y.to_numpy(float)
            same = np.isclose(xv, yv, rtol=0, atol=atol, equal_nan=True)
        else:
            # missing on both sides is the same (pandas' string dtype keeps NaN != NaN)
            same = ((x.isna() & y.isna()) | (x.astype(str) == y.astype(str))).to_numpy()
        if not same.all():
            out.append(f"{a.name}: column {col} differs in {int((~same).sum())} of {len(x)} rows")
    return out


def compare(old: Path, new: Path, atol: float = 0.0) -> list[str]:
    """Differences between two results folders, one readable line each."""
    names_a = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    names_b = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    out = [f"only in {old}: {n}" for n in sorted(names_a - names_b)]
    out += [f"only in {new}: {n}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        a, b = old / name, new / name
        if a.suffix in SKIP_SUFFIXES or a.name.startswith("."):
            continue
        if a.suffix == ".csv":
            out += [f"{name.parent}/{d}" for d in compare_csv(a, b, atol)]
        elif a.suffix == ".json":
            if _strip(json.loads(a.read_text())) != _strip(json.loads(b.read_text())):
                out.append(f"{name}: JSON content differs")
        elif a.suffix == ".key":
            continue  # cache keys hash the code version and paths
        elif a.suffix == ".safetensors":
            if _safetensors_parts(a) != _safetensors_parts(b):
                out.append(f"{name}: tensors or metadata differ")
        elif a.read_bytes() != b.read_bytes():
            out.append(f"{name}: bytes differ")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--atol", type=float, default=0.0, help="tolerance for numbers")
    args = parser.parse_args(argv)
    diffs = compare(args.old, args.new, args.atol)
    for line in diffs:
        print(line)
    print(f"{len(diffs)} difference(s) between {args.old} and {args.new}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
