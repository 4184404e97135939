"""Fine-tuning under torchrun: two CPU processes (gloo) share one Trainer run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


def test_torchrun_with_two_cpu_processes_trains_one_series(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "-m",
            "emolens.cli",
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--preset",
            "tiny",
            "--out",
            str(run),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())
    info = json.loads((run / "emolens_run.json").read_text())
    n_train = len(info["splits"]["train"])
    # 4 steps of batch 4 on each of 2 processes: an epoch has half the steps of one process
    assert abs(state["epoch"] - 4 / math.ceil(n_train / (4 * 2))) < 1e-9
    assert (run / "accuracy.csv").exists()


# --------------------------------------------------------------------------- analyze


ANALYZE = ["--layers", "1,-1", "--steer-layers", "1,-1", "--alphas", "0,2", "--n-prompts", "2"]
ANALYZE += ["--min-count", "1", "--filter-mode", "none", "--n-boot", "20", "--device", "cpu"]


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "emolens.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )


def _jsonl(path: Path, samples) -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": s.id, "text": s.text, "label": s.label}, ensure_ascii=False) + "\n"
            for s in samples
        )
    )
    return path


def test_torchrun_analyze_splits_the_series_over_ranks_and_merges_like_one_process(
    fake_run_dir, tmp_path
):
    """Two gloo ranks each analyse half the checkpoints; rank 0 merges into OUT: every table
    equals a single-process run's, and a re-run resumes (nothing recomputed)."""
    import pandas as pd

    from emolens.cli import main
    from emolens.data.corpus import load_corpus

    data = _jsonl(tmp_path / "corpus.jsonl", load_corpus(None).head_per_label(4).samples)
    common = ["analyze", "--model", str(fake_run_dir), "--data", str(data), *ANALYZE]
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    assert main([*common, "--out", str(single)]) == 0
    proc = _torchrun([*common, "--out", str(ranked)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results in" in proc.stdout and proc.stdout.count("results in") == 1  # rank 0 only
    tables = sorted(p.name for p in single.glob("*.csv"))
    assert tables == sorted(p.name for p in ranked.glob("*.csv")) and "sensitivity.csv" in tables
    for name in tables:
        pd.testing.assert_frame_equal(pd.read_csv(single / name), pd.read_csv(ranked / name))
    shards = sorted(p.name for p in (ranked / "ranks").iterdir())
    assert shards == ["rank-0-of-2", "rank-1-of-2"]
    steps = [
        json.loads((ranked / "ranks" / s / "last_run.json").read_text())["steps_done"]
        for s in shards
    ]
    assert sorted(steps[0] + steps[1]) == [0, 2, 4] and steps[0] and steps[1]  # both worked
    manifest = json.loads((ranked / "manifest.json").read_text())
    assert manifest["steps_done"] == [0, 2, 4] and manifest["failures"] == []
    done = {p: p.stat().st_mtime_ns for p in (ranked / "ranks").glob("*/steps/*/done.json")}
    again = _torchrun([*common, "--out", str(ranked)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (ranked / "ranks").glob("*/steps/*/done.json")} == done
    for name in tables:
        pd.testing.assert_frame_equal(pd.read_csv(single / name), pd.read_csv(ranked / name))


def test_torchrun_analyze_fails_on_every_rank_with_one_line(fake_run_dir, tmp_path):
    """A rank that fails makes every rank exit non-zero with one line naming the rank and the
    problem (the other rank does not wait forever, nor exit 0); nothing is merged."""
    from emolens.data.corpus import load_corpus

    data = _jsonl(tmp_path / "corpus.jsonl", load_corpus(None).head_per_label(4).samples)
    out = tmp_path / "out"
    (out / "ranks").mkdir(parents=True)
    (out / "ranks" / "rank-1-of-2").write_text("in the way")  # only rank 1 cannot write
    args = ["analyze", "--model", str(fake_run_dir), "--data", str(data), *ANALYZE]
    proc = _torchrun([*args, "--out", str(out)], tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("emolens: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert all("rank 1 failed to analyse its shard" in e and "is a file" in e for e in errors)
    assert not (out / "manifest.json").exists()
    # --shard by hand and the ranks' own split do not mix
    proc = _torchrun([*args, "--out", str(tmp_path / "other"), "--shard", "0/2"], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("emolens: error:")]
    assert proc.returncode != 0 and len(errors) == 2 and all("drop --shard" in e for e in errors)
