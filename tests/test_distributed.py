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
