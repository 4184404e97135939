"""What a results folder holds results of: a re-run into it must agree (or ``--overwrite``)."""

import json
import logging
from pathlib import Path

from emolens.data.corpus import Corpus
from emolens.data.labels import (
    PromptSpec,
)
from emolens.model.loading import (
    CheckpointSeries,
)
from emolens.run.config import AnalysisConfig
from emolens.store import layout
from emolens.store.files import (
    read_json,
    stable_hash,
)

log = logging.getLogger(__name__)


def resolved_spec(spec: str) -> str:
    """A local path made absolute (so ``./run`` and ``/abs/run`` are one cache key)."""
    path = Path(str(spec)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def weights_fingerprint(spec: str) -> str:
    """Cheap identity of a checkpoint's weights: names, sizes and mtimes of its files."""
    path = Path(spec)
    if not path.is_dir():
        return spec
    items = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")
    )
    return stable_hash([str(path.resolve()), items])


class IdentityMismatch(ValueError):
    """A results folder holds an analysis of another model, data or settings."""


def analysis_identity(
    series: CheckpointSeries,
    corpus: Corpus,
    prompt: PromptSpec,
    config: AnalysisConfig,
    dtype,
    shard,
    steps,
) -> dict:
    """What a results folder holds results of: a re-run into it must agree on all of it."""
    return {
        "model": {
            "run_dir": resolved_spec(series.run_dir) if series.run_dir else None,
            "base": resolved_spec(series.base),
            "checkpoints": [[c.step, resolved_spec(c.spec), c.kind] for c in series.checkpoints],
        },
        "data": corpus.sha256,
        "labels": prompt.labels.to_dict(),
        "template": prompt.template.to_dict(),
        "prompt": prompt.to_dict(),
        "settings": json.loads(json.dumps(config.to_dict())),
        "dtype": str(dtype),
        "shard": list(shard) if shard else None,
        "steps": sorted(steps) if steps is not None else None,
    }


def _short(value, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def identity_differences(old: dict, new: dict) -> list[str]:
    """Readable differences between two identities, e.g. ``settings.alphas [0, 2] -> [0, 1]``."""
    out = []
    for key in new:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key in ("settings", "model"):
            out += [
                f"{key}.{k} {_short(a.get(k))} -> {_short(b.get(k))}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif key == "data":
            out.append(f"data sha256 {str(a)[:12]} -> {str(b)[:12]}")
        else:
            out.append(f"{key} {_short(a)} -> {_short(b)}")
    return out


def check_identity(out: Path, identity: dict, overwrite: bool) -> dict:
    """The folder's earlier manifest ({} if none); refuse a different analysis unless
    ``overwrite``."""
    manifest_path = layout.ResultsLayout(out).manifest
    if not manifest_path.exists():
        return {}
    try:
        previous = read_json(manifest_path)
    except (ValueError, OSError) as exc:
        if not overwrite:
            raise IdentityMismatch(
                f"{manifest_path} is unreadable ({exc}), so what {out} "
                "holds is unknown; use another --out, or --overwrite to "
                "replace it"
            ) from None
        return {}
    old = _with_default_settings(previous.get("identity"))
    if old == identity or overwrite:
        return previous
    differences = (
        identity_differences(old, identity)
        if isinstance(old, dict)
        else ["it records no identity (an older emolens wrote it)"]
    )
    shown = "; ".join(differences[:4]) + (
        f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
    )
    raise IdentityMismatch(
        f"{out} holds results of another analysis ({shown}); use another "
        "--out, or --overwrite to replace those results"
    )


def _with_default_settings(identity):
    """An earlier identity with the settings it predates filled in at their defaults: a
    folder written before a setting existed holds results of that setting's default."""
    if not isinstance(identity, dict) or not isinstance(identity.get("settings"), dict):
        return identity
    defaults = json.loads(json.dumps(AnalysisConfig().to_dict()))
    return {**identity, "settings": {**defaults, **identity["settings"]}}
