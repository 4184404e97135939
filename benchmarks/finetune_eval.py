"""Fine-tuning's evaluation pass (issue 15): what the Trainer computes and keeps at each eval.

Contenders, each a real ``Trainer.evaluate`` on the same validation texts (the run's collator,
loss and batch size), timed back to back in alternating order over several rounds; the figure
per contender is the median over rounds of its time divided by ``after``'s in the same round:

- ``hf-default``: what a Trainer with a ``compute_metrics`` does by default: the model's logits
  at every position (batch x seq x vocab), gathered and kept for the whole split.
- ``before``: emolens before this change: ``logits_to_keep`` (longest answer + 1 positions),
  ``prediction_loss_only`` (eval loss only), eager attention.
- ``after-eager``: the eval of now (first-token cross-entropy and accuracy reduced to two
  numbers per example in ``preprocess_logits_for_metrics``) with eager attention.
- ``after``: the eval of now with SDPA attention (what ``finetune`` runs).

It also prints the bytes of predictions each contender keeps for the split, and checks that
every contender's eval loss agrees and that ``after``'s first-token metrics equal
``after-eager``'s.

Run: ``EMOLENS_CACHE=... python benchmarks/finetune_eval.py --model smollm2-135m --n 32``
(English prompt and bundled corpus by default: SmolLM2's tokenizer gives several Japanese
labels one first token.)
"""

import argparse
import statistics
import tempfile
import time
import warnings
from dataclasses import replace

import torch

from emolens.data.corpus import load_corpus, split_corpus
from emolens.data.tokens import pad_id
from emolens.model.loading import load_hf_model, load_tokenizer, resolve_model_dir
from emolens.run.finetune import (
    DEMO,
    AnswerCollator,
    ExampleDataset,
    FirstTokenMetrics,
    answer_loss,
    build_examples,
    training_arguments,
    use_sdpa,
)


class FullLogitsCollator(AnswerCollator):
    """The run's batches without ``logits_to_keep``: logits at every position."""

    def __call__(self, features):
        batch = super().__call__(features)
        del batch["logits_to_keep"]
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=32, help="validation texts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--language",
        default="en",
        help="prompt and bundled corpus (SmolLM2 tells the ja labels' "
        "first tokens apart only in English)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import PrinterCallback, Trainer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    source = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(source)
    config = replace(DEMO, batch_size=args.batch_size, save_dtype=None, language=args.language)
    corpus = load_corpus("bundled", language=args.language)
    validation = split_corpus(corpus, config.split, seed=0).validation
    examples = build_examples(validation, tokenizer, config.prompt())[: args.n]
    prompt = config.prompt()
    metrics = FirstTokenMetrics(tuple(prompt.label_tokens(tokenizer).ids))
    eager = load_hf_model(source).eval()
    sdpa = use_sdpa(load_hf_model(source)).eval()
    print(
        f"{args.model}: {len(examples)} validation texts, batch {args.batch_size}, "
        f"{args.threads} thread(s), vocabulary {eager.config.vocab_size}, mean length "
        f"{statistics.mean(len(e.input_ids) for e in examples):.0f} tokens; attention "
        f"{eager.config._attn_implementation} / {sdpa.config._attn_implementation}"
    )
    collate = AnswerCollator(pad_id(tokenizer))
    kept: dict[str, int] = {}

    def keep_size(name):
        def compute(prediction):
            kept[name] = sum(getattr(p, "nbytes", 0) for p in _leaves(prediction.predictions))
            return metrics(prediction) if name.startswith("after") else {}

        return compute

    with tempfile.TemporaryDirectory() as tmp:
        base_args = training_arguments(config, tmp, progress=False, device="cpu")

        def trainer(model, name, *, full=False, loss_only=False, first_token=False):
            a = replace_args(base_args, prediction_loss_only=loss_only)
            made = Trainer(
                model=model,
                args=a,
                eval_dataset=ExampleDataset(examples),
                data_collator=FullLogitsCollator(collate.pad_token_id) if full else collate,
                compute_loss_func=answer_loss,
                compute_metrics=None if loss_only else keep_size(name),
                preprocess_logits_for_metrics=metrics.reduce if first_token else None,
            )
            made.remove_callback(PrinterCallback)
            return made

        contenders = {
            "hf-default": trainer(eager, "hf-default", full=True),
            "before": trainer(eager, "before", loss_only=True),
            "after-eager": trainer(eager, "after-eager", first_token=True),
            "after": trainer(sdpa, "after", first_token=True),
        }
        seconds: dict[str, list[float]] = {k: [] for k in contenders}
        results: dict[str, dict] = {}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                t = time.perf_counter()
                results[name] = contenders[name].evaluate()
                seconds[name].append(time.perf_counter() - t)
    ratios = {
        name: statistics.median(s / a for s, a in zip(times, seconds["after"], strict=True))
        for name, times in seconds.items()
    }
    print(f"{'contender':<12} {'median s':>9} {'x after':>8} {'kept bytes':>12}  eval_loss")
    for name in contenders:
        print(
            f"{name:<12} {statistics.median(seconds[name]):9.2f} {ratios[name]:8.2f} "
            f"{kept.get(name, 0):12,d}  {results[name]['eval_loss']:.6f}"
        )
    losses = [results[n]["eval_loss"] for n in contenders]
    assert max(losses) - min(losses) < 1e-3 * max(1.0, abs(losses[0])), losses
    for key in ("eval_first_token_ce", "eval_first_token_accuracy"):
        a, b = results["after"][key], results["after-eager"][key]
        assert abs(a - b) < 1e-3, (key, a, b)
        print(f"{key}: {a:.6f} (sdpa) {b:.6f} (eager)")


def replace_args(training_args, **changes):
    import dataclasses

    return dataclasses.replace(training_args, **changes)


def _leaves(x):
    if isinstance(x, (tuple, list)):
        for item in x:
            yield from _leaves(item)
    else:
        yield x


if __name__ == "__main__":
    main()
