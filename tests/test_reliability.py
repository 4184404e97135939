"""Failures exit non-zero with one line, and nothing finished is damaged: validation before
any step, failed steps, staged step writes, folder identity, the lock, merge checks, devices."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from emolens.cli import main
from emolens.data.corpus import load_corpus
from emolens.model.loading import ModelLoadError, resolve_device, resolve_dtype
from emolens.run.analyze import analyze
from emolens.run.config import AnalysisConfig
from emolens.run.identity import IdentityMismatch
from emolens.run.merge import merge
from emolens.store.files import FolderInUse, folder_lock

CONFIG = AnalysisConfig(
    layers="1,-1",
    steer_layers="-1",
    alphas=(0.0, 2.0),
    n_prompts=2,
    min_count=1,
    batch_size=16,
    filter_mode="none",
    dla_per_label=1,
    n_boot=20,
)
FAST = [
    "--layers",
    "1,-1",
    "--steer-layers",
    "-1",
    "--alphas",
    "0,2",
    "--n-prompts",
    "2",
    "--min-count",
    "1",
    "--batch-size",
    "16",
    "--filter-mode",
    "none",
    "--dla-per-label",
    "1",
    "--n-boot",
    "20",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(None).head_per_label(4)


def _write_jsonl(path: Path, samples) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(
                json.dumps({"id": s.id, "text": s.text, "label": s.label}, ensure_ascii=False)
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def small_data(corpus, tmp_path_factory) -> Path:
    """The module's corpus as a file, for CLI runs."""
    return _write_jsonl(tmp_path_factory.mktemp("data") / "corpus.jsonl", corpus.samples)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".emolens.lock"
    }


@pytest.fixture(scope="module")
def finished(tiny_model_dir, corpus, tmp_path_factory):
    """A finished single-model analysis (step 0) and its bytes."""
    out = tmp_path_factory.mktemp("finished") / "out"
    analyze(tiny_model_dir, corpus, out, CONFIG, device="cpu")
    return out, _files(out)


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("emolens: error:"), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# ------------------------------------------------------------------ 1. validation up front


def _bad_models(tiny_model_dir: Path, root: Path) -> dict[str, Path]:
    empty = root / "empty"
    empty.mkdir()
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    wrong = root / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text('{"hello": 1}')
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    return {
        "missing": root / "nope",
        "empty": empty,
        "no-weights": no_weights,
        "truncated": truncated,
        "wrong": wrong,
        "adapter": adapter,
    }


BAD_OPTIONS = {
    "layers 99": (["--layers", "99"], "out of range"),
    "steer layer not collected": (["--layers", "-1", "--steer-layers", "1"], "--layers"),
    "dtype": (["--dtype", "bogus"], "unknown dtype"),
    "unknown device": (["--device", "tpu"], "unknown device"),
    "min-count drops every label": (["--min-count", "1000"], "--min-count"),
    "n-boot 0": (["--n-boot", "0"], "--n-boot"),
    "bad alphas": (["--alphas", "a,b"], "--alphas"),
}


def test_bad_inputs_fail_at_once_with_one_line_and_touch_nothing(
    tiny_model_dir, small_data, tmp_path, capsys
):
    cases = {
        name: (["--model", str(path)], name.split("-")[0])
        for name, path in _bad_models(tiny_model_dir, tmp_path).items()
    }
    cases = {
        **cases,
        **{
            name: (["--model", str(tiny_model_dir), *opts], needle)
            for name, (opts, needle) in BAD_OPTIONS.items()
        },
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (["--model", str(tiny_model_dir), "--device", "cuda"], "CUDA")
    messages = {
        "missing": "does not exist",
        "empty": "neither config.json",
        "no-weights": "no model weights",
        "truncated": "truncated",
        "wrong": "not a transformers model config",
        "adapter": "--base",
    }
    for name, (argv, _) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        code = main(["analyze", "--data", str(small_data), "--out", str(out), *FAST, *argv])
        line = _one_error_line(capsys)
        assert code == 1, name
        needle = messages.get(name) or BAD_OPTIONS.get(name, (None, "CUDA"))[1]
        assert needle in line, (name, line)
        assert not (out / "steps").exists(), f"{name}: a step ran before the input was checked"


def test_a_run_whose_step_fails_exits_one_and_keeps_what_explains_it(
    tiny_model_dir, small_data, tmp_path, capsys
):
    out = tmp_path / "out"
    # the random model answers no neutral sample correctly: filtering keeps none
    code = main(
        [
            "analyze",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(small_data),
            "--out",
            str(out),
            *FAST,
            "--filter-mode",
            "self",
        ]
    )
    line = _one_error_line(capsys)
    assert code == 1 and "1 step(s) failed (step 0)" in line and "neutral" in line
    assert str(out / "last_run.json") in line
    filtering = pd.read_csv(out / "failed" / "step-000000" / "filtering.csv")
    neutral = filtering.set_index("label").loc["no-emotion"]
    assert neutral.n_samples == 4 and neutral.n_kept == 0
    assert json.loads((out / "failed" / "step-000000" / "error.json").read_text())["step"] == 0
    assert not (out / "steps" / "step-000000").exists()
    assert json.loads((out / "manifest.json").read_text())["failures"][0]["step"] == 0


# ------------------------------------------------------------------ 2-3. failed re-runs


def test_a_failed_rerun_leaves_the_finished_folder_byte_identical(
    finished, tiny_model_dir, corpus, tmp_path
):
    src, _ = finished
    out, model = tmp_path / "out", tmp_path / "model"
    shutil.copytree(src, out)
    shutil.copytree(tiny_model_dir, model)
    # results of this very model folder, whose weights are then damaged: the step recomputes
    analyze(model, corpus, out, CONFIG, device="cpu", overwrite=True)
    reference = _files(out)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError):
        analyze(model, corpus, out, CONFIG, device="cpu")  # caught before any step
    assert _files(out) == reference


def test_a_failing_step_of_a_series_never_damages_its_finished_folder(
    fake_run_dir, corpus, tmp_path
):
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(fake_run_dir, run)
    analyze(run, corpus, out, CONFIG, device="cpu")
    before = _files(out)
    weights = next((run / "checkpoint-2").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    analyze(run, corpus, out, CONFIG, device="cpu")
    after = _files(out)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == {"last_run.json"} | {k for k in after if k.startswith("failed/")}
    assert json.loads((out / "last_run.json").read_text())["failures"][0]["step"] == 2
    assert json.loads((out / "manifest.json").read_text())["failures"] == []
    from emolens.report.page import write_report

    html = write_report(out).read_text()
    assert "failed at 1 step(s)" in html and "checkpoint-6" in html


@pytest.mark.parametrize("damage", ["done.json", "sensitivity.csv", "activations.safetensors"])
def test_a_damaged_step_file_is_named_and_the_step_recomputed(
    damage, finished, tiny_model_dir, corpus, tmp_path, caplog
):
    src, before = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    path = out / "steps" / "step-000000" / damage
    path.write_bytes(
        path.read_bytes()[: path.stat().st_size // 3] if damage.endswith("safetensors") else b""
    )
    analyze(tiny_model_dir, corpus, out, CONFIG, device="cpu")
    assert str(path) in caplog.text and "recomput" in caplog.text
    after = _files(out)
    for name in ("sensitivity.csv", "filtering.csv", "geometry.csv", "steps.csv"):
        assert after[name] == before[name]
    assert after["steps/step-000000/" + damage] == before["steps/step-000000/" + damage]


def test_a_different_run_is_refused_and_overwrite_replaces_without_mixing(
    finished, tiny_model_dir, corpus, tmp_path
):
    src, before = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    other = AnalysisConfig(**{**CONFIG.to_dict(), "alphas": (0.0, 1.0)})
    with pytest.raises(IdentityMismatch, match=r"settings\.alphas.*--overwrite"):
        analyze(tiny_model_dir, corpus, out, other, device="cpu")
    with pytest.raises(IdentityMismatch, match="data sha256"):
        analyze(tiny_model_dir, load_corpus(None).head_per_label(5), out, CONFIG, device="cpu")
    with pytest.raises(ModelLoadError):
        analyze(tmp_path / "nope", corpus, out, CONFIG, device="cpu")
    assert _files(out) == before
    analyze(tiny_model_dir, corpus, out, other, device="cpu", overwrite=True)
    assert sorted(pd.read_csv(out / "sensitivity.csv").alpha.unique()) == [0.0, 1.0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["alphas"] == [0.0, 1.0]


def test_a_folder_from_before_a_setting_existed_resumes_at_its_default(
    finished, tiny_model_dir, corpus, tmp_path
):
    """An older manifest without a setting (here read_point) holds results of its default:
    re-running with the default resumes (nothing recomputed); another value is refused."""
    src, _ = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["identity"]["settings"]["read_point"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    tables = {p.name: p.read_bytes() for p in out.glob("*.csv")}
    analyze(tiny_model_dir, corpus, out, CONFIG, device="cpu")
    assert {p.name: p.read_bytes() for p in out.glob("*.csv")} == tables
    other = AnalysisConfig(**{**CONFIG.to_dict(), "read_point": "final-norm"})
    with pytest.raises(IdentityMismatch, match=r"settings\.read_point"):
        analyze(tiny_model_dir, corpus, out, other, device="cpu")


def test_a_relative_model_path_reuses_the_cache_of_the_absolute_one(
    finished, tiny_model_dir, corpus, tmp_path, monkeypatch
):
    src, before = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    monkeypatch.chdir(tiny_model_dir.parent)
    analyze(Path(tiny_model_dir.name), corpus, out, CONFIG, device="cpu")
    after = _files(out)
    assert after["steps/step-000000/sensitivity.csv"] == before["steps/step-000000/sensitivity.csv"]
    assert (out / "steps/step-000000/done.json").stat().st_mtime_ns == (
        src / "steps/step-000000/done.json"
    ).stat().st_mtime_ns  # not recomputed
    assert json.loads(after["steps/step-000000/done.json"]) == json.loads(
        before["steps/step-000000/done.json"]
    )


# ------------------------------------------------------------------ 4. the lock


def test_a_second_process_on_a_folder_in_use_gets_a_clear_error(
    tiny_model_dir, small_data, tmp_path
):
    out, data = tmp_path / "out", small_data
    cmd = [
        sys.executable,
        "-m",
        "emolens.cli",
        "analyze",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        *FAST,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = out / ".emolens.lock"
    start = time.time()
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.time() - start < 300
        time.sleep(0.02)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, lines
    assert f"in use by another emolens process (pid {first.pid}" in lines[0]
    assert not lock.read_text().strip()  # released


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".emolens.lock").write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename})
    )
    with folder_lock(tmp_path):
        assert str(dead.pid) in caplog.text and "stale" in caplog.text
        with pytest.raises(FolderInUse):  # a second holder (another open file) is refused
            with folder_lock(tmp_path):
                pass


# ------------------------------------------------------------------ 5. merge


def test_merge_refuses_other_analyses_and_a_non_empty_out(finished, tmp_path):
    src, _ = finished
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["identity"]["model"]["base"] = "/somewhere/else"
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"not a shard.*model\.base"):
        merge([a, b], tmp_path / "merged")
    manifest["identity"]["model"] = json.loads((a / "manifest.json").read_text())["identity"][
        "model"
    ]
    manifest["identity"]["settings"]["n_boot"] = 7
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"settings\.n_boot"):
        merge([a, b], tmp_path / "merged")
    with pytest.raises(ValueError, match="not empty"):
        merge([a], b)
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


# ------------------------------------------------------------------ 6. devices


def test_device_spellings_normalise_or_fail_and_dtype_follows_the_resolved_device():
    assert resolve_device("CPU") == "cpu" and resolve_device(" Cpu ") == "cpu"
    assert resolve_dtype(None, resolve_device("CPU")) == torch.float32
    assert resolve_dtype("BF16", "cpu") == torch.bfloat16
    for bad in ("tpu", "gpu", "cuda:x", "cpu0"):
        with pytest.raises(ModelLoadError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("CUDA")


# ------------------------------------------------------------------ 7. smaller


def test_bundled_data_with_a_text_column_says_so(capsys):
    assert main(["data", "inspect", "bundled", "--text-column", "text"]) == 1
    line = _one_error_line(capsys)
    assert "--text-column" in line and "bundled" in line and "--data FILE" in line


def test_texts_longer_than_the_context_are_refused_naming_them(tiny_model_dir, tmp_path, capsys):
    from emolens.data.corpus import Corpus, Sample

    base = load_corpus(None).head_per_label(3)
    long = Sample(id="very-long", text="あ" * 2000, label="joy")
    corpus = Corpus((*base.samples, long), "test", "sha-long")
    analyze(tiny_model_dir, corpus, tmp_path / "out", CONFIG, device="cpu")
    from emolens.run.analyze import failure_summary

    summary = failure_summary(tmp_path / "out")
    assert "longer than the model's context" in summary and "very-long" in summary


def test_a_dropped_label_is_one_emolens_line(tiny_model_dir, tmp_path, capsys):
    samples = load_corpus(None).head_per_label(4).samples
    anger = [s for s in samples if s.label == "anger"][1:]  # one anger sample is left
    data = _write_jsonl(tmp_path / "corpus.jsonl", [s for s in samples if s not in anger])
    at = FAST.index("--min-count") + 1
    args = [*FAST[:at], "2", *FAST[at + 1 :]]
    main(
        [
            "analyze",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            *args,
        ]
    )
    err = capsys.readouterr().err
    dropped = [line for line in err.splitlines() if "drops out" in line]
    assert dropped and all(
        line.split("\x1b[A")[-1].strip().startswith("emolens: warning: label 'anger'")
        for line in dropped
    )
    assert "warnings.warn" not in err and "DroppedLabelWarning" not in err
