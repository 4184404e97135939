"""Checkpoint switch time of a LoRA series: swapping adapters on one loaded base
(:class:`emolens.model.loading.SeriesLoader`) against loading the base and merging each adapter
afresh, with the largest logit and activation difference between the two. Issue 15.

    python benchmarks/adapter_swap.py [--model gemma-3-270m] [--adapters 3] [--rank 16]

The adapters are random (non-zero B) LoRA adapters over the fine-tuning defaults' target
modules (q, k, v, o projections), written to a temporary run folder.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from emolens.model.loading import SeriesLoader, discover_series, load_hf_model, resolve_model_dir


def make_run(model: str, n_adapters: int, rank: int, folder: Path) -> Path:
    """A run folder of ``n_adapters`` random LoRA checkpoints over ``model``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    source = resolve_model_dir(model)
    tok = AutoTokenizer.from_pretrained(source)
    base = load_hf_model(source)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    peft_model = get_peft_model(base, config)
    for i in range(n_adapters):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        ckpt = folder / f"checkpoint-{10 * (i + 1)}"
        peft_model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
    (folder / "emolens_run.json").write_text(json.dumps({"base_model": model}))
    return folder


def outputs(model, ids):
    """Logits [batch, pos, vocab] and every block output."""
    with torch.no_grad():
        logits, cache = model.bridge.run_with_cache(
            ids, names_filter=lambda name: name.endswith(".hook_out") and "blocks." in name
        )
    return logits, cache


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="base model spec")
    parser.add_argument("--adapters", type=int, default=3, help="LoRA checkpoints in the series")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    folder = Path(tempfile.mkdtemp(prefix="emolens-swap-"))
    try:
        series = discover_series(make_run(args.model, args.adapters, args.rank, folder))
        ids = torch.tensor([[2, 651, 2134, 603, 476, 2121, 1744, 235265] * 4])
        loader = SeriesLoader(series, device="cpu", dtype="float32")
        start = time.perf_counter()
        loader.load(series.checkpoints[0])
        print(f"{args.model}: base loaded for the series in {time.perf_counter() - start:.2f} s")
        switches, fresh_times, logit_diff, act_diff = [], [], 0.0, 0.0
        for ckpt in series.checkpoints[1:]:
            start = time.perf_counter()
            swapped = loader.load(ckpt)
            switches.append(time.perf_counter() - start)
            logits, cache = outputs(swapped, ids)
            start = time.perf_counter()
            fresh = series.load(ckpt, device="cpu", dtype="float32")
            fresh_times.append(time.perf_counter() - start)
            fresh_logits, fresh_cache = outputs(fresh, ids)
            assert swapped.weights_hash == fresh.weights_hash, ckpt.spec
            logit_diff = max(logit_diff, (logits - fresh_logits).abs().max().item())
            act_diff = max(
                act_diff, max((cache[k] - fresh_cache[k]).abs().max().item() for k in cache)
            )
            del fresh, fresh_logits, fresh_cache
        start = time.perf_counter()
        loader.load(series.checkpoints[0])
        back = time.perf_counter() - start
        print(
            f"  adapter switch (rank {args.rank}, q/k/v/o, weights hash included): "
            + ", ".join(f"{t:.2f}" for t in switches)
            + f" s; back to the base {back:.2f} s"
        )
        print(
            "  fresh load + PEFT merge of the same checkpoints: "
            + ", ".join(f"{t:.2f}" for t in fresh_times)
            + f" s ({sum(fresh_times) / sum(switches):.0f}x the switch)"
        )
        print(
            f"  max |difference| swapped vs fresh: logits {logit_diff:.2e}, block outputs "
            f"{act_diff:.2e} (float32; weights hashes equal)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
