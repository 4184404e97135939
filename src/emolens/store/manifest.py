"""The manifest of a results folder (``DIR/manifest.json``) as a typed record.

``analyze`` builds a :class:`Manifest` from its inputs; ``merge`` reads the shards' manifests
back with :meth:`Manifest.from_dict` and writes the merged one with :func:`dataclasses.replace`.
:meth:`Manifest.to_dict` writes the keys in the order of the fields (``merged_from`` only on a
merged folder), followed by any keys this version does not know (kept from an older or newer
manifest), so a written manifest reads back to an equal record.
"""

from dataclasses import dataclass, field, fields
from typing import Any

from emolens.store.files import read_json, write_json

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """Provenance of one analysis: what was measured, with what, and what came out."""

    emolens: str
    versions: dict[str, str]
    created: str
    updated: str
    model: str
    run_dir: str | None
    series: JsonDict
    data: JsonDict
    labels: JsonDict
    template: JsonDict
    prompt: JsonDict
    prompt_source: str
    prompt_override: JsonDict | None
    settings: JsonDict
    load: JsonDict
    identity: JsonDict
    steered_prompts: list[str]
    hook_names: dict[str, str]
    numerics: str
    numerics_note: str
    readout_dtype: str
    final_layer_tables: JsonDict | None
    seeds: JsonDict
    shard: list[int] | None
    steps_done: list[int]
    failures: list[JsonDict]
    series_problems: list[str]
    seconds_this_run: float
    merged_from: list[str] | None = None
    #: the emolens git commit (when run from a checkout) and the accelerator: provenance.manifest()
    provenance: JsonDict | None = None
    extra: JsonDict = field(default_factory=dict)

    def to_dict(self) -> JsonDict:
        out: JsonDict = {}
        for f in fields(self):
            optional = f.name in ("merged_from", "provenance")
            if f.name == "extra" or (optional and getattr(self, f.name) is None):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: JsonDict) -> "Manifest":
        """The record of a manifest's JSON; a key it lacks raises ``ValueError`` naming it."""
        if not isinstance(data, dict):
            raise ValueError("a manifest is a JSON object")
        names = [f.name for f in fields(cls) if f.name != "extra"]
        required = [n for n in names if n not in ("merged_from", "provenance")]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"the manifest lacks {', '.join(missing)}")
        known = {n: data[n] for n in names if n in data}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, path: Any) -> "Manifest":
        return cls.from_dict(read_json(path))

    def write(self, path: Any) -> None:
        write_json(path, self.to_dict())
