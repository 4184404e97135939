"""The results-folder layout and the typed manifest."""

import json

import pytest

from emolens.data.labels import STUDY_LABELS, LabelTokens
from emolens.measure.activations import Activations
from emolens.measure.vectors import ConceptVectors
from emolens.store import layout
from emolens.store.layout import ResultsLayout, StepFiles
from emolens.store.manifest import Manifest


def test_layout_names_the_files(tmp_path):
    results = ResultsLayout(tmp_path)
    step = results.step(100)
    assert step.folder == tmp_path / "steps" / "step-000100"
    assert step.done == step.folder / "done.json"
    assert step.sensitivity.name == "sensitivity.csv"
    assert step.activations.name == f"{Activations.FILE_STEM}.safetensors"
    assert step.activations_meta.name == f"{Activations.FILE_STEM}.json"
    assert layout.VECTORS == f"{ConceptVectors.FILE_STEM}.safetensors"
    assert results.staging(100).folder == tmp_path / "steps" / ".step-000100.staging"
    assert results.failed(100).folder == tmp_path / "failed" / "step-000100"
    assert results.table("steps") == tmp_path / "steps.csv"
    assert layout.step_number(step.folder) == 100
    with pytest.raises(ValueError, match="not a results table"):
        results.table("nonsense")


def test_finished_steps_are_those_with_done(tmp_path):
    results = ResultsLayout(tmp_path)
    for s in (4, 0, 2):
        results.step(s).folder.mkdir(parents=True)
    results.step(4).done.write_text("{}")
    results.step(0).done.write_text("{}")
    results.staging(2).folder.mkdir()
    assert [f.folder.name for f in results.finished_steps()] == ["step-000000", "step-000004"]
    assert len(results.step_folders()) == 3  # the staging folder is not a step folder
    assert StepFiles(results.step(4).folder).is_done


def _manifest_dict() -> dict:
    return {
        "emolens": "0.1.0",
        "versions": {"python": "3.12"},
        "created": "2026-01-01T00:00:00",
        "updated": "2026-01-01T00:00:01",
        "model": "tiny-random",
        "run_dir": None,
        "series": {"run_dir": "", "base": "tiny-random", "checkpoints": []},
        "data": {"source": "bundled", "sha256": "ab", "n_samples": 3, "counts": {}},
        "labels": {"emotions": []},
        "template": {},
        "prompt": {},
        "prompt_source": "options",
        "prompt_override": None,
        "settings": {"alphas": [1.0]},
        "load": {"device": "cpu", "dtype": "None", "device_map": None},
        "identity": {"shard": None},
        "steered_prompts": ["s1"],
        "hook_names": {"vectors": "v", "steering": "s"},
        "numerics": "raw-hf",
        "numerics_note": "n",
        "readout_dtype": "float32",
        "final_layer_tables": None,
        "seeds": {"prompt_seed": 0},
        "shard": [0, 2],
        "steps_done": [0, 2],
        "failures": [],
        "series_problems": [],
        "seconds_this_run": 1.5,
    }


def test_manifest_round_trip_keeps_keys_and_order(tmp_path):
    data = _manifest_dict()
    manifest = Manifest.from_dict(data)
    assert list(manifest.to_dict()) == list(data)  # same keys, same order
    assert manifest.to_dict() == data
    path = tmp_path / "manifest.json"
    manifest.write(path)
    assert json.loads(path.read_text()) == data
    assert Manifest.read(path) == manifest


def test_manifest_keeps_unknown_keys_and_merged_from_last():
    data = {**_manifest_dict(), "future_key": 1}
    manifest = Manifest.from_dict(data)
    assert manifest.extra == {"future_key": 1}
    assert manifest.to_dict() == data
    from dataclasses import replace

    merged = replace(manifest, shard=None, merged_from=["a", "b"]).to_dict()
    assert list(merged)[-2:] == ["merged_from", "future_key"]
    assert merged["shard"] is None


def test_manifest_names_a_missing_key():
    data = _manifest_dict()
    del data["identity"]
    with pytest.raises(ValueError, match="identity"):
        Manifest.from_dict(data)


def test_label_tokens_round_trip():
    from emolens.data.labels import LabelToken

    entries = tuple(
        LabelToken(e.ja, e.en, " " + e.en, 10 + i, e.en[:2], 2, [10 + i, 99])
        for i, e in enumerate(STUDY_LABELS)
    )
    audit = LabelTokens(STUDY_LABELS, entries)
    back = LabelTokens.from_dict(json.loads(audit.to_json()))
    assert back == audit
    assert back.ids == audit.ids
