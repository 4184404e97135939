"""Tokenization done once, in emolens, the same way for fine-tuning and analysis.

Plain prompts are encoded with the tokenizer's own special-token convention
(``add_special_tokens`` as the tokenizer defines it: Gemma adds a BOS, Sarashina adds none);
a chat-rendered prompt already holds the special tokens its template writes, so nothing is
added on top (:class:`emolens.data.labels.PromptSpec` decides which). The bridge receives token
ids, so it never prepends a BOS of its own.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode(
    tokenizer: "PreTrainedTokenizerBase", texts: Sequence[str], add_special_tokens: bool = True
) -> list[list[int]]:
    """Token ids of each string, with the tokenizer's default special tokens (or none)."""
    return [
        list(ids)
        for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    ]


def pad_id(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The id used for padding (the EOS id when the tokenizer has no pad token)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pid is None else int(pid)


def pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, side: str = "right"
) -> tuple[Int[Tensor, "sample seq"], Int[Tensor, "sample seq"]]:
    """Pad id lists into ``(input_ids, attention_mask)``, on the ``right`` or ``left``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def last_token_index(attention_mask: Int[Tensor, "sample seq"]) -> Int[Tensor, " sample"]:
    """Position of the last real token of each row, whichever side the padding is on."""
    seq = attention_mask.shape[1]
    positions = torch.arange(seq, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
