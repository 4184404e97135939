"""Steering sensitivity on gemma-3-270m: fast paths against the naive loop (issues 3 and 6).

The study's sweep is 12 emotions x 6 alphas x 10 neutral prompts = 720 configurations. The
naive way is one hooked forward pass per configuration (``naive_sensitivity``: full logits at
every position, plus one unsteered pass per prompt). This script times, in one run:

- final layer: ``final_layer_sensitivity`` (no forward pass: ``unembed(ln_final(h + alpha v))``)
  against the naive loop; the floor is a 100x speed-up, including the unsteered forward;
- a middle layer, steering the answer position only: ``layer_sensitivity`` (configurations in
  the batch dimension) and ``layer_sensitivity_cached`` (the prompt's key/value cache, one token
  per configuration) against the naive loop and each other.

The full naive loop (730 passes) takes several minutes to an hour here depending on the load,
so it is timed on random configurations and extrapolated (said so in the output); with
``--batched-prompts`` below 10 the batched mid-layer sweep is timed on a subset of the prompts
and extrapolated linearly in the number of rows. Every shortcut is also checked for the
same numbers (max abs difference of the logit, log-prob and centred changes).

Run: ``EMOLENS_CACHE=/tmp/proto/cache .venv/bin/python benchmarks/steering_speed.py``
(``--help`` for the sample sizes). Concept vectors come from a few corpus samples per label,
unfiltered: the numbers here are about speed, not about the study's findings.
"""

import argparse
import random
import statistics
import time
import warnings

import torch

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS, STUDY_PROMPT
from emolens.measure.activations import collect_activations
from emolens.measure.steering import (
    DEFAULT_ALPHAS,
    SteeringEffect,
    final_layer_sensitivity,
    layer_sensitivity,
    layer_sensitivity_cached,
    naive_sensitivity,
)
from emolens.measure.vectors import concept_vectors
from emolens.model.loading import load_model
from emolens.run.prompt import choose_prompts

QUANTITIES = ("logit_change", "logprob_change", "centered_change")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def diff_at(a: SteeringEffect, b: SteeringEffect, index=(slice(None),)) -> float:
    """Max abs difference of the three quantities (``a`` indexed by ``index``)."""
    return max(float((getattr(a, q)[index] - getattr(b, q)).abs().max()) for q in QUANTITIES)


def naive_configs(model, prompts, layer, vectors, alphas, label_ids, configs, reference, positions):
    """Run ``naive_sensitivity`` once per (emotion, alpha, prompt) in ``configs`` (each call
    is one unsteered and one steered pass); return per-call seconds and the largest difference
    from ``reference`` at those configurations."""
    seconds, worst = [], 0.0
    for e, a, p in configs:
        effect, dt = timed(
            lambda e=e, a=a, p=p: naive_sensitivity(
                model,
                [prompts[p]],
                layer,
                vectors[e : e + 1],
                alphas[a : a + 1],
                label_ids,
                positions=positions,
            )
        )
        seconds.append(dt)
        worst = max(
            worst, diff_at(reference, effect, (slice(e, e + 1), slice(a, a + 1), slice(p, p + 1)))
        )
    return seconds, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--naive-configs",
        type=int,
        default=24,
        help="random configurations timed with the naive loop, per layer",
    )
    parser.add_argument(
        "--batched-prompts",
        type=int,
        default=10,
        help="prompts of the mid-layer batched sweep actually run (fewer on a "
        "busy machine: the time is then extrapolated)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the cheap paths")
    parser.add_argument(
        "--per-label", type=int, default=3, help="corpus samples per label for the concept vectors"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="rows per pass of the batched mid-layer sweep"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    rng = random.Random(0)

    model = load_model("gemma-3-270m", device="cpu")
    last, mid = model.n_layers - 1, model.n_layers // 2
    corpus = load_corpus(None)
    label_ids = STUDY_PROMPT.label_tokens(model.tokenizer, allow_shared=True).ids
    prompt_index = choose_prompts(corpus, STUDY_LABELS, 10, seed=0)
    prompts = STUDY_PROMPT.encode(model.tokenizer, [corpus.samples[i].text for i in prompt_index])
    vec_index = [
        i
        for name in STUDY_LABELS.names()
        for i in [
            j for j, s in enumerate(corpus.samples) if s.label == name and j not in prompt_index
        ][: args.per_label]
    ]
    vec_corpus = corpus.subset(vec_index)
    acts = collect_activations(
        model,
        STUDY_PROMPT.encode(model.tokenizer, vec_corpus.texts()),
        label_ids,
        [mid, last],
        gold=vec_corpus.label_indices(),
        progress=False,
    )
    vectors = concept_vectors(acts, torch.ones(acts.n_samples, dtype=torch.bool), STUDY_LABELS, 1)
    alphas = torch.tensor(DEFAULT_ALPHAS)
    n_e, n_a, n_p = len(vectors.emotions), len(alphas), len(prompts)
    grid = [(e, a, p) for e in range(n_e) for a in range(n_a) for p in range(n_p)]
    passes = n_p + n_e * n_a * n_p  # naive: one unsteered pass per prompt + one per config
    print(
        f"setup | gemma-3-270m, {torch.get_num_threads()} threads, {n_e} emotions x {n_a} "
        f"alphas {list(DEFAULT_ALPHAS)} x {n_p} prompts = {len(grid)} configurations; prompt "
        f"lengths {min(map(len, prompts))}-{max(map(len, prompts))} tokens; vectors from "
        f"{acts.n_samples} samples (unfiltered); final layer {last}, mid layer {mid}"
    )

    # ------------------------------------------------------------------ final layer
    v_last = vectors.layer(last)
    fast_read, fast_total, naive_s, worst = [], [], [], 0.0
    chosen = rng.sample(grid, args.naive_configs)
    share = [chosen[r :: args.repeats] for r in range(args.repeats)]
    for r in range(args.repeats):  # interleaved: fast path, then a share of the naive configs
        start = time.perf_counter()
        h = collect_activations(model, prompts, label_ids, [last], progress=False).layer(last)
        fast, dt = timed(lambda h=h: final_layer_sensitivity(model, h, v_last, alphas, label_ids))
        fast_read.append(dt)
        fast_total.append(time.perf_counter() - start)
        seconds, w = naive_configs(
            model, prompts, last, v_last, alphas, label_ids, share[r], fast, "all"
        )
        naive_s += seconds
        worst = max(worst, w)
    per_pass = statistics.median(naive_s) / 2
    naive_total = per_pass * passes
    print(
        f"final layer | fast path: {statistics.median(fast_read):.2f} s readout of "
        f"{len(grid)} configurations, {statistics.median(fast_total):.2f} s including the "
        f"unsteered forward of the {n_p} prompts (medians of {args.repeats})"
    )
    print(
        f"final layer | naive: {per_pass:.2f} s per hooked pass (median over "
        f"{len(naive_s)} random configurations, each a naive_sensitivity call = 1 unsteered + "
        f"1 steered pass); the full loop is {passes} passes = {naive_total:.0f} s "
        "(EXTRAPOLATED, not run)"
    )
    print(
        f"final layer | max abs diff fast vs naive at those configurations (logit, log-prob, "
        f"centred changes): {worst:.2e}"
    )
    speedup = naive_total / statistics.median(fast_total)
    print(
        f"final layer | speed-up fast path vs naive: {speedup:.0f}x including the unsteered "
        f"forward ({naive_total / statistics.median(fast_read):.0f}x readout only); floor 100x: "
        f"{'PASS' if speedup >= 100 else 'FAIL'}"
    )

    # ------------------------------------------------------------------ middle layer
    v_mid = vectors.layer(mid)
    cached_s, naive_s, worst_naive = [], [], 0.0
    chosen = rng.sample(grid, args.naive_configs)
    share = [chosen[r :: args.repeats] for r in range(args.repeats)]
    for r in range(args.repeats):  # interleaved: KV-cache path, then a share of the naive configs
        cached, dt = timed(
            lambda: layer_sensitivity_cached(
                model, prompts, mid, v_mid, alphas, label_ids, progress=False
            )
        )
        cached_s.append(dt)
        seconds, w = naive_configs(
            model, prompts, mid, v_mid, alphas, label_ids, share[r], cached, "answer"
        )
        naive_s += seconds
        worst_naive = max(worst_naive, w)
    t_cached = statistics.median(cached_s)
    per_pass = statistics.median(naive_s) / 2
    naive_total = per_pass * passes
    sub = sorted(rng.sample(range(n_p), min(args.batched_prompts, n_p)))
    sub_prompts = [prompts[p] for p in sub]
    batched, t_batched = timed(
        lambda: layer_sensitivity(
            model,
            sub_prompts,
            mid,
            v_mid,
            alphas,
            label_ids,
            positions="answer",
            batch_size=args.batch_size,
            progress=False,
        )
    )
    if len(sub) < n_p:
        _, t_cached_sub = timed(
            lambda: layer_sensitivity_cached(
                model, sub_prompts, mid, v_mid, alphas, label_ids, progress=False
            )
        )
        batched_note = (
            f"{t_batched:.1f} s for {len(sub)} of {n_p} prompts (measured) -> "
            f"{t_batched * n_p / len(sub):.0f} s for the full grid (EXTRAPOLATED "
            f"x{n_p / len(sub):g}, linear in rows)"
        )
    else:
        t_cached_sub = t_cached
        batched_note = (
            f"{t_batched:.1f} s for the full {len(grid)} configurations (measured, 1 run)"
        )
    batched_total = t_batched * n_p / len(sub)
    worst_bc = diff_at(cached, batched, (slice(None), slice(None), sub))
    print(f"mid layer {mid} | all paths steer the answer position only (positions='answer')")
    print(
        f"mid layer {mid} | KV-cache path (layer_sensitivity_cached): {t_cached:.1f} s for the "
        f"full {len(grid)} configurations (median of {args.repeats})"
    )
    print(
        f"mid layer {mid} | batched path (layer_sensitivity, batch {args.batch_size}): "
        f"{batched_note}"
    )
    print(
        f"mid layer {mid} | naive: {per_pass:.2f} s per hooked pass (median over "
        f"{len(naive_s)} random configurations) -> {naive_total:.0f} s for the full loop "
        "(EXTRAPOLATED, not run)"
    )
    print(
        f"mid layer {mid} | max abs diff: KV-cache vs naive {worst_naive:.2e} (at those "
        f"configurations), KV-cache vs batched {worst_bc:.2e} ({len(sub)} prompts x "
        f"{n_e * n_a} configurations)"
    )
    print(
        f"mid layer {mid} | speed-ups: batched vs naive {naive_total / batched_total:.1f}x; "
        f"KV-cache vs naive {naive_total / t_cached:.0f}x; KV-cache vs batched "
        f"{t_batched / t_cached_sub:.1f}x ({len(sub)} prompts, both measured)"
    )


if __name__ == "__main__":
    main()
