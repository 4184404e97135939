"""Shared fixtures: a tiny random Llama (GQA, untied unembedding, Japanese-capable byte-level
tokenizer) saved to disk and loaded through the same path as a real checkpoint, and a small
fake fine-tuning run for series discovery. Nothing is downloaded."""

import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep converted models in a per-session cache unless EMOLENS_CACHE is set (CI sets it
    so the gemma-3-270m conversion is shared between runs)."""
    if "EMOLENS_CACHE" not in os.environ:
        os.environ["EMOLENS_CACHE"] = str(tmp_path_factory.mktemp("emolens-cache"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture
def one_thread():
    """One torch thread for a test of many tiny tensor ops (thread hand-offs cost more than
    the work on a busy 2-core machine); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from emolens.testing.tiny import tiny_random_model

    return tiny_random_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from emolens.model.loading import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def fake_run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A run folder with checkpoint-2/ and checkpoint-4/ (different weights), a broken
    checkpoint-6/ (no weights), trainer_state.json with eval losses, and emolens_run.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("run")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = []
    for step in (4, 2):  # written out of order on purpose
        torch.manual_seed(step)
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ckpt = run / f"checkpoint-{step}"
        base.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        history.append({"step": step, "eval_loss": 3.0 - 0.1 * step, "epoch": step / 4})
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / "config.json").write_text("{}")
    state = {"log_history": sorted(history, key=lambda e: e["step"]), "global_step": 4}
    (run / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(state))
    (run / "emolens_run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    return run


@pytest.fixture(scope="session")
def gemma_model():
    """The real Gemma 3 270M from its registry package (converted once into EMOLENS_CACHE)."""
    from emolens.model.loading import load_model

    return load_model("gemma-3-270m", device="cpu")
