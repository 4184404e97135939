"""Activation collection on gemma-3-270m: speed against a bare HF forward, and peak memory
against the sequence length (issue 6).

Speed: ``collect_activations`` (answer-position residuals after every block + label logits)
against a bare HF forward pass of a separately loaded copy of the model (no bridge, no hooks)
over the same batches (sorted by length, right-padded, 8 rows), returning every hidden state
(``output_hidden_states=True``) and the logits of the last position only (``logits_to_keep=1``,
the work the collection does), with eager and with SDPA attention; the floor is against the
faster of the two (collection itself runs SDPA where the model supports it). On a
shared machine whole seconds come and go with other people's jobs, so the unit of timing is one
batch, run by the three contenders back to back (order alternating between rounds), and the
ratio is the median of the per-batch ratios. Floor: at most 1.05.

Peak memory: each measurement runs in a fresh process that loads the model, resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, after a garbage collection and a
``malloc_trim``), runs the collection once and reads the peak (``VmHWM``) minus the resident
size at the reset (``VmRSS``): the extra memory the collection needed, all allocators included
(torch's CPU allocations are invisible to ``tracemalloc``). The process runs with
``MALLOC_MMAP_THRESHOLD_=65536`` so that tensors are mapped and unmapped on their own and the
resident set follows the live allocations. Done for the prompts and for 2x their length (each
prompt followed by itself without its BOS), and, for contrast, for a plain bridge forward
computing the logits at every position, which collection avoids.

Run: ``EMOLENS_CACHE=/tmp/proto/cache .venv/bin/python benchmarks/collection_speed.py``
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_PROMPT
from emolens.data.tokens import pad, pad_id
from emolens.measure.activations import attention_implementation, collect_activations
from emolens.model.loading import load_model


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` entry in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def prompts_of(model, n: int, factor: int) -> list[list[int]]:
    corpus = load_corpus(None)
    ids = STUDY_PROMPT.encode(model.tokenizer, corpus.texts()[:n])
    if factor == 2:
        ids = [t + t[1:] for t in ids]
    return ids


def batches_of(ids: list[list[int]], batch_size: int, pid: int):
    """The batches ``collect_activations`` forms: sorted by length, right-padded."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [
        pad([ids[i] for i in order[s : s + batch_size]], pid, "right")
        for s in range(0, len(ids), batch_size)
    ]


@torch.no_grad()
def hf_forward(hf_model, batches) -> None:
    for input_ids, mask in batches:
        out = hf_model(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
        )
        assert len(out.hidden_states) == hf_model.config.num_hidden_layers + 1


def memory_child(what: str, factor: int, n: int, batch_size: int) -> None:
    """Print the extra peak RSS of one run (see the module docstring) as JSON."""
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    model = load_model("gemma-3-270m", device="cpu")
    label_ids = STUDY_PROMPT.label_tokens(model.tokenizer, allow_shared=True).ids
    ids = prompts_of(model, n, factor)
    batches = batches_of(ids, batch_size, pad_id(model.tokenizer))
    gc.collect()  # load-time garbage freed now, not during the measured run
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    rss = proc_status("VmRSS")
    with torch.no_grad():
        if what == "collect":
            collect_activations(model, ids, label_ids, "all", batch_size=batch_size, progress=False)
        else:  # a forward computing logits at every position
            for input_ids, mask in batches:
                model.bridge(input_ids, attention_mask=mask)
    print(
        json.dumps(
            {
                "extra_peak": proc_status("VmHWM") - rss,
                "rss": rss,
                "mean_len": sum(map(len, ids)) / len(ids),
            }
        )
    )


def measure_memory(what: str, factor: int, n: int, batch_size: int) -> dict:
    # large allocations straight from mmap, so freed memory leaves the resident set at once
    # and the peak RSS follows the peak of live allocations (glibc keeps freed heap memory)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            what,
            str(factor),
            "--n",
            str(n),
            "--batch-size",
            str(batch_size),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="prompts (corpus samples)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--memory-child", nargs=2, metavar=("WHAT", "FACTOR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.n, args.batch_size)
        return
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    from transformers import AutoModelForCausalLM

    model = load_model("gemma-3-270m", device="cpu")
    references = {
        impl: AutoModelForCausalLM.from_pretrained(
            model.source, dtype=torch.float32, attn_implementation=impl
        ).eval()
        for impl in ("eager", "sdpa")
    }
    label_ids = STUDY_PROMPT.label_tokens(model.tokenizer, allow_shared=True).ids
    ids = prompts_of(model, args.n, 1)
    pid = pad_id(model.tokenizer)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    groups = [
        [ids[i] for i in order[s : s + args.batch_size]]
        for s in range(0, len(ids), args.batch_size)
    ]
    # one unit of work = one batch: collect_activations on its prompts (one forward pass) or
    # the bare HF forward on the same padded batch
    runs = {
        "collect": lambda g: collect_activations(
            model, g, label_ids, "all", batch_size=args.batch_size, progress=False
        ),
        "hf-eager": lambda g: hf_forward(references["eager"], batches_of(g, len(g), pid)),
        "hf-sdpa": lambda g: hf_forward(references["sdpa"], batches_of(g, len(g), pid)),
    }
    for run in runs.values():  # warm-up
        run(groups[0])
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for g in groups:  # the three back to back on each batch, order alternating
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                runs[name](g)
                seconds[name].append(time.perf_counter() - start)
    paired = {
        name: statistics.median(a / b for a, b in zip(seconds["collect"], seconds[name]))
        for name in ("hf-eager", "hf-sdpa")
    }
    n_units = len(seconds["collect"])
    print(
        f"setup | gemma-3-270m, {torch.get_num_threads()} threads, {len(ids)} prompts of "
        f"{min(map(len, ids))}-{max(map(len, ids))} tokens in {len(groups)} batches of "
        f"{args.batch_size}, every layer ({model.n_layers}); each batch run by all three "
        f"back to back, {args.repeats} rounds after a warm-up ({n_units} timings each)"
    )
    for name in runs:
        total = sum(seconds[name]) / args.repeats
        print(
            f"collection speed | {name}: {statistics.median(seconds[name]):.2f} s median per "
            f"batch, {total:.2f} s per pass over the {len(ids)} prompts (mean of rounds)"
        )
    fastest = max(paired, key=paired.get)  # the reference collection is slowest against
    ratio = paired[fastest]
    print(
        f"collection speed | collect_activations runs {attention_implementation(model)} "
        f"attention; ratios collect_activations / bare HF forward (output_hidden_states, "
        f"logits_to_keep=1), medians of {n_units} paired per-batch ratios: eager "
        f"{paired['hf-eager']:.3f}, sdpa {paired['hf-sdpa']:.3f}"
    )
    print(
        f"collection speed | against the fastest bare HF forward ({fastest}): {ratio:.3f}; "
        f"floor <= 1.05: {'PASS' if ratio <= 1.05 else 'FAIL'}"
    )
    references.clear()  # free the copies before the memory runs

    mem = {
        (what, f): measure_memory(what, f, args.n, args.batch_size)
        for what in ("collect", "full-logits")
        for f in (1, 2)
    }
    mib = 2**20
    for what in ("collect", "full-logits"):
        one, two = mem[(what, 1)], mem[(what, 2)]
        label = (
            "collect_activations"
            if what == "collect"
            else "bridge forward with logits at every position (contrast)"
        )
        print(
            f"peak memory | {label}: +{one['extra_peak'] / mib:.0f} MiB at "
            f"{one['mean_len']:.0f} tokens, +{two['extra_peak'] / mib:.0f} MiB at "
            f"{two['mean_len']:.0f} tokens (2x): extra ratio "
            f"{two['extra_peak'] / max(one['extra_peak'], 1):.2f}; whole-process peak "
            f"{(one['rss'] + one['extra_peak']) / mib:.0f} -> "
            f"{(two['rss'] + two['extra_peak']) / mib:.0f} MiB, ratio "
            f"{(two['rss'] + two['extra_peak']) / (one['rss'] + one['extra_peak']):.2f}"
        )


if __name__ == "__main__":
    main()
