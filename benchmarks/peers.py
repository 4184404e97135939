"""Figure 2's work with emolens and with its peers, side by side (issue 15).

The work: steering sensitivity of 12 emotions x 6 alphas x 10 neutral prompts (720
configurations) at the final block output, and at one middle layer steering the answer
position only; and, before it, the concept vectors (equation 2: mean residual of each emotion's
samples minus that of the neutral samples, over the bundled corpus, 32 samples a label). Each
peer is used the way its documentation shows:

- steering-vectors 0.12.2: ``with SteeringVector({layer: v}, "decoder_block").apply(model,
  multiplier=alpha): model(**inputs)`` per configuration (``token_indices=[-1]`` for the answer
  position), and ``train_steering_vector`` with (emotion text, neutral text) pairs and its
  default mean aggregator for the vectors (the mean of pair differences equals the difference of
  means because every label has 32 samples);
- nnsight 0.8.1: one ``model.trace(prompt)`` per configuration, adding ``alpha * v`` to
  ``model.model.layers[L].output`` (``[:, -1]`` for the answer position);
- repeng 0.4.0: ``ControlModel(model, [L])`` and ``set_control(ControlVector(...), alpha)``
  per (emotion, alpha); it steers every position, so only the final layer (where steering every
  position and the answer position are the same) is compared.

Every peer runs the plain HF model (transformers' default attention) in float32 and reads the
answer-position logits of the 13 labels' first tokens; its numbers are compared with emolens'
(max abs difference of the logit, log-probability and centred-logit changes over every measured
configuration and label): a peer that computes something else is not a comparison. A full peer
run is 730 forward passes per layer; on a shared 2-core machine that is many minutes, so each
peer runs ``--peer-configs`` random configurations (plus the unsteered passes of their prompts)
and its time is SCALED to the full grid (per-pass median x 730), said so in the output.

Install (a separate environment: steering-vectors declares ``transformers<5``, emolens needs 5)::

    python3 -m venv /work/venv-bench
    /work/venv-bench/bin/pip install torch==2.13.0
    /work/venv-bench/bin/pip install -e '.[demo]'
    /work/venv-bench/bin/pip install --no-deps 'emolens[bench]' # or the three pins by hand:
    /work/venv-bench/bin/pip install --no-deps steering-vectors==0.12.2 nnsight==0.8.1 repeng==0.4.0
    /work/venv-bench/bin/pip install scikit-learn cloudpickle greenlet websocket-client zstandard

``--no-deps`` keeps transformers 5 (steering-vectors and repeng declare transformers<5 and
numpy<2); the numbers agreeing below is the check that they work with it.

Run: ``EMOLENS_CACHE=... /work/venv-bench/bin/python benchmarks/peers.py`` (``--model
smollm2-135m`` or ``tiny-random`` for other models, ``--help`` for the sample sizes).
"""

import argparse
import random
import statistics
import time
import warnings

import torch

from emolens.data.corpus import load_corpus
from emolens.data.labels import STUDY_LABELS, render_prompts, resolve_label_tokens
from emolens.data.tokens import encode
from emolens.measure.activations import collect_activations
from emolens.measure.steering import (
    DEFAULT_ALPHAS,
    SteeringEffect,
    final_layer_sensitivity,
    layer_sensitivity_cached,
)
from emolens.measure.vectors import concept_vectors
from emolens.model.loading import load_model
from emolens.run.prompt import choose_prompts

QUANTITIES = ("logit_change", "logprob_change", "centered_change")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def readout(logits: torch.Tensor, label_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Label logits, logsumexp and mean logit of one answer-position logit row ``[vocab]``."""
    logits = logits.float()
    return logits[label_ids], logits.logsumexp(-1), logits.mean(-1)


def worst_difference(ref: SteeringEffect, configs, steered: dict, base: dict) -> float:
    """Max abs difference between emolens' ``ref`` and a peer's readouts at ``configs``:
    ``steered[(e, a, p)]`` and ``base[p]`` are :func:`readout` triples."""
    worst = 0.0
    for e, a, p in configs:
        (s_ll, s_lse, s_mean), (b_ll, b_lse, b_mean) = steered[(e, a, p)], base[p]
        peer = {
            "logit_change": s_ll - b_ll,
            "logprob_change": (s_ll - s_lse) - (b_ll - b_lse),
            "centered_change": (s_ll - s_mean) - (b_ll - b_mean),
        }
        for q in QUANTITIES:
            worst = max(worst, float((getattr(ref, q)[e, a, p] - peer[q]).abs().max()))
    return worst


def run_peer(name, configs, prompts_used, base_fn, steered_fn, ref, n_passes_full):
    """Time ``base_fn(p)`` for the prompts and ``steered_fn(e, a, p)`` for ``configs``; return
    (scaled full-grid seconds, measured seconds, worst difference, note)."""
    base, steered, per_pass = {}, {}, []
    start = time.perf_counter()
    for p in prompts_used:
        t = time.perf_counter()
        base[p] = base_fn(p)
        per_pass.append(time.perf_counter() - t)
    for e, a, p in configs:
        t = time.perf_counter()
        steered[(e, a, p)] = steered_fn(e, a, p)
        per_pass.append(time.perf_counter() - t)
    measured = time.perf_counter() - start
    full = statistics.median(per_pass) * n_passes_full
    note = (
        f"MEASURED {len(per_pass)} of {n_passes_full} passes in {measured:.1f} s, SCALED to "
        f"the full grid: median {statistics.median(per_pass):.3f} s/pass x {n_passes_full}"
    )
    return full, measured, worst_difference(ref, configs, steered, base), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m", help="emolens model spec or alias")
    parser.add_argument(
        "--peer-configs",
        type=int,
        default=30,
        help="random (emotion, alpha, prompt) configurations each peer runs per "
        "layer; its time is scaled to the full grid",
    )
    parser.add_argument(
        "--vector-emotions",
        type=int,
        default=2,
        help="emotions whose vectors steering-vectors trains (time scaled to 12)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="batch size of emolens' collection and steering-vectors' training",
    )
    parser.add_argument(
        "--peers", default="steering-vectors,nnsight,repeng", help="comma-separated peers to run"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    rng = random.Random(0)
    peers = set(args.peers.split(","))

    from transformers import AutoModelForCausalLM

    model = load_model(args.model, device="cpu")
    tok = model.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    last, mid = model.n_layers - 1, model.n_layers // 2
    corpus = load_corpus(None)
    label_ids = resolve_label_tokens(tok, allow_shared=True).ids
    label_idx = torch.as_tensor(list(label_ids))
    prompt_texts = render_prompts(
        [corpus.samples[i].text for i in choose_prompts(corpus, STUDY_LABELS, 10, seed=0)]
    )
    prompts = encode(tok, prompt_texts)
    alphas = torch.tensor(DEFAULT_ALPHAS)
    print(
        f"setup | {args.model}, {torch.get_num_threads()} threads; peer model: HF "
        f"{type(hf).__name__}, attention {hf.config._attn_implementation}; emolens: "
        f"TransformerBridge (eager); final layer {last}, mid layer {mid}"
    )

    # ------------------------------------------------------------------ concept vectors
    texts = render_prompts(corpus.texts())
    gold = torch.as_tensor(corpus.label_indices())

    def emolens_vectors():
        acts = collect_activations(
            model,
            encode(tok, texts),
            label_ids,
            [mid, last],
            gold=gold,
            batch_size=args.batch_size,
            progress=False,
        )
        return concept_vectors(acts, torch.ones(acts.n_samples, dtype=torch.bool), STUDY_LABELS, 1)

    vectors, t_vec = timed(emolens_vectors)
    n_e = len(vectors.emotions)
    print(
        f"vectors | emolens collect_activations + concept_vectors: {t_vec:.1f} s for "
        f"{len(texts)} samples, {n_e} emotions, layers {mid} and {last}"
    )
    if "steering-vectors" in peers:
        from steering_vectors import train_steering_vector

        neutral = [
            t
            for t, s in zip(texts, corpus.samples, strict=True)
            if s.label == STUDY_LABELS.neutral.en
        ]
        chosen = rng.sample(range(n_e), min(args.vector_emotions, n_e))
        worst, spent = 0.0, 0.0
        for e in chosen:
            own = [
                t
                for t, s in zip(texts, corpus.samples, strict=True)
                if s.label == vectors.emotions[e]
            ]
            assert len(own) == len(neutral), "pairs need equal counts"
            sv, dt = timed(
                lambda own=own: train_steering_vector(
                    hf,
                    tok,
                    list(zip(own, neutral, strict=True)),
                    layers=[mid, last],
                    batch_size=args.batch_size,
                )
            )
            spent += dt
            for layer in (mid, last):
                ref = vectors.vectors[vectors.layers.index(layer), e]
                worst = max(worst, float((sv.layer_activations[layer].float() - ref).abs().max()))
        full = spent * n_e / len(chosen)
        print(
            f"vectors | steering-vectors train_steering_vector: {full:.1f} s (MEASURED "
            f"{len(chosen)} of {n_e} emotions in {spent:.1f} s, SCALED x{n_e / len(chosen):g});"
            f" ratio to emolens {full / t_vec:.1f}x; max abs diff of the vectors "
            f"{worst:.2e} (mean vector norm {float(vectors.norms.mean()):.3g})"
        )

    # ------------------------------------------------------------------ steering
    n_a, n_p = len(alphas), len(prompts)
    grid = [(e, a, p) for e in range(n_e) for a in range(n_a) for p in range(n_p)]
    passes = n_p + len(grid)

    def inputs(p):
        return tok(prompt_texts[p], return_tensors="pt")

    for layer, positions in ((last, "all"), (mid, "answer")):
        v = vectors.layer(layer)
        if layer == last:

            def run_emolens(v=v):
                h = collect_activations(model, prompts, label_ids, [last], progress=False).layer(
                    last
                )
                return final_layer_sensitivity(model, h, v, alphas, label_ids)

            what = "collect_activations + final_layer_sensitivity"
        else:

            def run_emolens(v=v, layer=layer):
                return layer_sensitivity_cached(
                    model, prompts, layer, v, alphas, label_ids, progress=False
                )

            what = "layer_sensitivity_cached"
        ref, t_ref = timed(run_emolens)
        tag = f"layer {layer} ({'final' if layer == last else 'mid'}, positions={positions})"
        print(
            f"{tag} | emolens {what}: {t_ref:.2f} s for all {len(grid)} configurations (measured)"
        )
        configs = rng.sample(grid, min(args.peer_configs, len(grid)))
        used = sorted({p for _, _, p in configs})

        @torch.no_grad()
        def plain(p):
            return readout(hf(**inputs(p)).logits[0, -1], label_idx)

        results = {}
        if "steering-vectors" in peers:
            from steering_vectors import SteeringVector

            index = None if positions == "all" else [-1]

            @torch.no_grad()
            def sv_steered(e, a, p, v=v, layer=layer, index=index):
                vec = SteeringVector({layer: v[e]}, "decoder_block")
                where = (
                    {"min_token_index": 0}
                    if index is None
                    else {"min_token_index": None, "token_indices": index}
                )
                with vec.apply(hf, multiplier=float(alphas[a]), **where):
                    return readout(hf(**inputs(p)).logits[0, -1], label_idx)

            results["steering-vectors"] = run_peer(
                "steering-vectors", configs, used, plain, sv_steered, ref, passes
            )
        if "nnsight" in peers:
            from nnsight import TransformersModel

            nn_model = TransformersModel(hf, tokenizer=tok)

            def nn_base(p, nn_model=nn_model):
                with torch.no_grad(), nn_model.trace(prompt_texts[p]):
                    logits = nn_model.output.logits[0, -1].save()
                return readout(logits, label_idx)

            def nn_steered(e, a, p, v=v, layer=layer, positions=positions, nn_model=nn_model):
                delta = float(alphas[a]) * v[e]
                with torch.no_grad(), nn_model.trace(prompt_texts[p]):
                    out = nn_model.model.layers[layer].output
                    hidden = out[0] if isinstance(out, tuple) else out
                    if positions == "all":
                        hidden[:] += delta
                    else:
                        hidden[:, -1, :] += delta
                    logits = nn_model.output.logits[0, -1].save()
                return readout(logits, label_idx)

            results["nnsight"] = run_peer(
                "nnsight", configs, used, nn_base, nn_steered, ref, passes
            )
        if "repeng" in peers and positions == "all":
            import numpy as np

            if not hasattr(np, "float_"):  # repeng 0.4.0 annotates with np.float_ (numpy < 2)
                np.float_ = np.float64
                print(
                    f"{tag} | repeng: numpy {np.__version__} has no np.float_; aliased to "
                    "np.float64 so that repeng 0.4.0 imports (an annotation only)"
                )
            from repeng import ControlModel, ControlVector

            control = ControlModel(hf, [layer])

            @torch.no_grad()
            def rp_steered(e, a, p, v=v, layer=layer, control=control):
                vec = ControlVector(hf.config.model_type, {layer: v[e].numpy()})
                control.set_control(vec, float(alphas[a]))
                try:
                    return readout(control(**inputs(p)).logits[0, -1], label_idx)
                finally:
                    control.reset()

            try:
                results["repeng"] = run_peer(
                    "repeng", configs, used, plain, rp_steered, ref, passes
                )
            finally:
                control.unwrap()
        elif "repeng" in peers:
            print(f"{tag} | repeng: skipped, it steers every position (no answer-only option)")
        for name, (full, _measured, worst, note) in results.items():
            verdict = "agree" if worst < 1e-2 else "DISAGREE (not a comparison)"
            print(
                f"{tag} | {name}: {full:.1f} s ({note}); emolens {full / t_ref:.1f}x faster; "
                f"max abs diff to emolens {worst:.2e} over {len(configs)} configurations "
                f"x {len(label_ids)} labels x 3 quantities: {verdict}"
            )


if __name__ == "__main__":
    main()
