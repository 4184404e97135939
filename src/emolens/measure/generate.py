"""Steered text: greedy continuations of a prompt with ``h + alpha * v`` added at a block output
(every position, the prompt's and each generated token's), so a reader sees what steering does
to the words.

Each prompt is continued for a batch of configurations (emotion x alpha) at once: the rows of a
batch share the prompt, so no padding is needed and each row's continuation is exactly what it
would be alone. The steering hooks are scoped (:func:`emolens.measure.steering.steer`): removed
when generation ends, also on an error.
"""

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from emolens.measure.activations import bridge_of, input_device
from emolens.measure.steering import steer
from emolens.model import hooks

#: The emotion name of the unsteered continuation (alpha 0) in ``generations.csv``.
UNSTEERED = "none"


@torch.no_grad()
def greedy_continuations(
    model,
    prompt: Sequence[int],
    deltas: Float[Tensor, "row d_model"] | None,
    layer: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> Int[Tensor, "row new"]:
    """Greedy continuation of ``prompt`` for each row of ``deltas`` (the vector added at the
    output of block ``layer``, every position; ``None``: one unsteered row). Finished rows (at
    ``eos_token_id``) are padded with it. Each step recomputes the whole sequence (no KV
    cache), so the steering reaches every position exactly as in one forward pass."""
    bridge = bridge_of(model)
    rows = 1 if deltas is None else deltas.shape[0]
    device = input_device(bridge)
    ids = torch.as_tensor(list(prompt), dtype=torch.long, device=device)[None].repeat(rows, 1)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    new = []
    (layer,) = hooks.check_layers([layer], int(bridge.cfg.n_layers))
    for _ in range(max_new_tokens):
        if deltas is None:
            logits = bridge(ids)
        else:
            with steer(bridge, hooks.resid_post(layer), deltas, 1.0, positions="all"):
                logits = bridge(ids)
        token = logits[:, -1].float().argmax(-1)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        new.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        if bool(done.all()):
            break
    if not new:
        return torch.zeros(rows, 0, dtype=torch.long)
    return torch.stack(new, 1).cpu()


def _decode(tokenizer, tokens: Tensor, eos_token_id: int | None) -> str:
    ids = tokens.tolist()
    if eos_token_id is not None and eos_token_id in ids:
        ids = ids[: ids.index(eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def steered_generations(
    model,
    prompts: Sequence[Sequence[int]],
    vectors: Float[Tensor, "emotion d_model"],
    alphas: Sequence[float],
    layer: int,
    *,
    emotions: Sequence[str],
    prompt_ids: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Greedy continuations of each prompt steered by each emotion's vector at each nonzero
    alpha (``h + alpha * v``), plus the unsteered one (emotion :data:`UNSTEERED`, alpha 0).

    Returns columns ``emotion, alpha, prompt_id, text, n_tokens``. ``seed`` seeds torch before
    generating (greedy decoding draws nothing; the seed fixes any model randomness left)."""
    if len(emotions) != vectors.shape[0]:
        raise ValueError(f"{len(emotions)} emotion names for {vectors.shape[0]} vectors")
    if len(prompt_ids) != len(prompts):
        raise ValueError(f"{len(prompt_ids)} prompt ids for {len(prompts)} prompts")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be at least 1")
    torch.manual_seed(seed)
    tokenizer = getattr(model, "tokenizer", None) or bridge_of(model).tokenizer
    eos = tokenizer.eos_token_id
    configs = [(UNSTEERED, 0.0, None)] + [
        (name, float(a), vectors[e] * float(a))
        for e, name in enumerate(emotions)
        for a in alphas
        if float(a) != 0.0
    ]
    rows = []
    total = len(prompts) * len(configs)
    with tqdm(total=total, desc="generate", disable=not progress, leave=False) as bar:
        for pid, prompt in zip(prompt_ids, prompts, strict=True):
            for start in range(0, len(configs), batch_size):
                chunk = configs[start : start + batch_size]
                deltas = [torch.zeros(vectors.shape[1]) if d is None else d for *_, d in chunk]
                steered = any(d is not None for *_, d in chunk)
                out = greedy_continuations(
                    model,
                    prompt,
                    torch.stack(deltas).float() if steered else None,
                    layer,
                    max_new_tokens,
                    eos,
                )
                if not steered:
                    out = out.repeat(len(chunk), 1)
                for (name, alpha, _), tokens in zip(chunk, out, strict=True):
                    text = _decode(tokenizer, tokens, eos)
                    n_tokens = int((tokens != eos).sum()) if eos is not None else len(tokens)
                    rows.append(
                        {
                            "emotion": name,
                            "alpha": alpha,
                            "prompt_id": str(pid),
                            "text": text,
                            "n_tokens": n_tokens,
                        }
                    )
                bar.update(len(chunk))
    return pd.DataFrame(rows, columns=["emotion", "alpha", "prompt_id", "text", "n_tokens"])
