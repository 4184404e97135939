"""The logit lens at the answer position: each collected layer's residual read through the
model's own final norm and unembedding (float32,
:func:`emolens.measure.activations.answer_readout`).

It reads the residuals :func:`emolens.measure.activations.collect_activations` stored
(``blocks.{l}.hook_resid_post`` at the answer position), so it needs no further forward pass;
at the final layer it is the model's answer readout itself.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from emolens.measure.activations import Activations, answer_readout


@dataclass(frozen=True)
class LogitLens:
    """Label logits of every collected layer, ``label_logits`` ``[sample, layer, label]``, and
    the log-sum-exp over the vocabulary ``[sample, layer]``, for ``layers``."""

    label_logits: Float[Tensor, "sample layer label"]
    logsumexp: Float[Tensor, "sample layer"]
    layers: tuple[int, ...]

    def ranks(self, gold: Tensor) -> Tensor:
        """Rank of the gold label among the labels, ``[sample, layer]`` (1 = the top; ties
        count against it)."""
        own = self.label_logits[torch.arange(len(gold)), :, gold]  # [sample, layer]
        return (self.label_logits >= own[..., None]).sum(-1)


@torch.no_grad()
def logit_lens(model, acts: Activations, label_token_ids: Sequence[int]) -> LogitLens:
    """Read each of ``acts``' layers through ``model``'s ``ln_final`` and ``unembed`` (a final
    layer read at the final norm, through ``unembed`` alone)."""
    logits, lse = [], []
    for layer in acts.layers:
        label_logits, layer_lse, _ = answer_readout(
            model, acts.layer(layer), label_token_ids, read_point=acts.layer_read_point(layer)
        )
        logits.append(label_logits)
        lse.append(layer_lse)
    return LogitLens(torch.stack(logits, 1), torch.stack(lse, 1), tuple(acts.layers))


def lens_frame(
    lens: LogitLens, step: int, gold: Tensor, labels: tuple[str, ...], n_layers: int
) -> pd.DataFrame:
    """``logit_lens.csv`` of one step: per collected layer and gold label, over that label's
    samples, the mean gold-label logit, its margin over the mean of the other labels, its mean
    log-probability over the whole vocabulary, its mean rank among the labels and the accuracy
    (argmax over the labels is gold). Samples with an unknown gold label are left out."""
    gold = torch.as_tensor(gold, dtype=torch.long)
    known = gold >= 0
    logits, lse, gold = (
        lens.label_logits[known].double(),
        lens.logsumexp[known].double(),
        gold[known],
    )
    n = len(gold)
    own = logits[torch.arange(n), :, gold]  # [sample, layer]
    others = (logits.sum(-1) - own) / max(1, logits.shape[-1] - 1)
    ranks = LogitLens(logits, lse, lens.layers).ranks(gold).double()
    correct = (logits.argmax(-1) == gold[:, None]).double()
    rows = []
    for j, name in enumerate(labels):
        mask = gold == j
        if not bool(mask.any()):
            continue
        for k, layer in enumerate(lens.layers):
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "depth": layer / max(1, n_layers - 1),
                    "label": name,
                    "n_samples": int(mask.sum()),
                    "logit": float(own[mask, k].mean()),
                    "margin": float((own[mask, k] - others[mask, k]).mean()),
                    "logprob": float((own[mask, k] - lse[mask, k]).mean()),
                    "rank": float(ranks[mask, k].mean()),
                    "accuracy": float(correct[mask, k].mean()),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "step",
            "layer",
            "depth",
            "label",
            "n_samples",
            "logit",
            "margin",
            "logprob",
            "rank",
            "accuracy",
        ],
    )
