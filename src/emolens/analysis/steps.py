"""Tables that explain sensitivity across the series, built from finished step folders.

Each step folder holds ``activations``, ``vectors`` and ``readout.safetensors`` (the final norm
and the label rows of the unembedding); from those alone, with no model in memory, this module
computes the exact attribution of final-layer steering, the transfer of vectors between steps,
and the cross-step change of the direct push. The direct logit attribution of the unsteered
answer needs the model and is computed in the step loop (:func:`dla_frame`).
"""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from emolens.analysis.geometry import CausalInnerProduct
from emolens.measure.activations import Activations
from emolens.measure.attribution import (
    LogPushChange,
    PushChange,
    Readout,
    component_attribution,
    decompose_steering,
    direct_push_change,
    log_push_change,
    transfer_effect,
)
from emolens.measure.steering import steering_vectors
from emolens.measure.vectors import ConceptVectors
from emolens.model.loading import LoadedModel, Model
from emolens.store import layout
from emolens.store.files import load_tensors, read_json, save_tensors

READOUT_FILE = layout.READOUT
KEEP_FILE = layout.KEEP
METRIC_FILE = layout.CAUSAL_METRIC


def save_metric(inner: CausalInnerProduct, path: Path) -> Path:
    return save_tensors(
        path,
        {"whitener": inner.whitener, "cov": inner.cov, "mean": inner.mean},
        {"ridge": inner.ridge, "n_tokens": inner.n_tokens, "dual": inner.dual},
    )


def load_metric(path: Path) -> CausalInnerProduct:
    t, m = load_tensors(path)
    return CausalInnerProduct(
        whitener=t["whitener"],
        cov=t["cov"],
        mean=t["mean"],
        ridge=float(m["ridge"]),
        n_tokens=int(m["n_tokens"]),
        dual=bool(m["dual"]),
    )


def causal_metric(model: LoadedModel, gain: torch.Tensor) -> CausalInnerProduct:
    """Park et al.'s causal inner product from the model's effective unembedding
    (``W_U * gain``), in the dual form (``Cov^{1/2}``) that applies to residual-space vectors
    such as concept vectors."""
    w_u = model.hf_model.get_output_embeddings().weight.detach()
    return CausalInnerProduct.from_unembedding(w_u, dual=True, column_scale=gain)


@dataclass(frozen=True)
class StepData:
    """What the offline tables need of one finished step.

    ``readout`` is None where the step has none (its check failed, or the model's readout is
    not linear): geometry and probes still use the step, the final-layer tables do not.
    ``n_layers`` is the model's depth; the final-layer tables read layer ``n_layers - 1`` and
    nothing else (it is always collected by ``analyze``).
    """

    step: int
    acts: Activations
    vectors: ConceptVectors
    readout: Readout | None = None
    keep: torch.Tensor | None = None  # samples that built the vectors
    metric: CausalInnerProduct | None = None
    n_layers: int | None = None

    def __post_init__(self) -> None:
        # the readout of the final layer's residuals as read: the unembedding alone at the
        # final-norm read point (a step folder stores it so already; this keeps any other
        # StepData consistent)
        if self.readout is not None:
            object.__setattr__(self, "readout", self.readout.at_read_point(self.read_point))

    @property
    def read_point(self) -> str:
        """Where the final layer's residual was read (``Activations.read_point``)."""
        return self.acts.read_point

    @property
    def final_layer(self) -> int:
        """The final block's index; raises if unknown or not collected (never a stand-in)."""
        n = self.n_layers if self.n_layers is not None else self.acts.meta.get("n_layers")
        if n is None:
            raise ValueError(
                f"step {self.step}: the model's depth is unknown, so its final "
                "layer is too; give StepData(n_layers=...)"
            )
        final = int(n) - 1
        if final not in self.acts.layers or final not in self.vectors.layers:
            raise ValueError(
                f"step {self.step}: the final layer {final} was not collected "
                f"(layers {self.acts.layers}); re-run analyze, which always "
                "collects it"
            )
        return final

    @property
    def final_readout(self) -> Readout:
        """The readout of a step that has one (see :func:`with_readout`); raises otherwise."""
        if self.readout is None:
            raise ValueError(
                f"step {self.step} has no {READOUT_FILE}: the final-layer tables leave it out "
                "(filter the steps with with_readout)"
            )
        return self.readout

    def prompt_resid(self, prompt_ids: list[str]) -> torch.Tensor:
        """``[prompt, d_model]`` final-layer residuals of the steered prompts."""
        index = [self.acts.sample_ids.index(p) for p in prompt_ids]
        return self.acts.layer(self.final_layer)[index]

    def steered_vectors(self, alpha_unit: str, norm_of: "StepData | None" = None) -> torch.Tensor:
        """``[emotion, d_model]`` final-layer vectors as ``analyze`` steers them for
        ``alpha_unit`` (:func:`emolens.measure.steering.steering_vectors`), rescaled to the mean
        residual norm of ``norm_of`` (the steered model; default this step)."""
        layer = self.final_layer
        target = norm_of if norm_of is not None else self
        return steering_vectors(
            self.vectors.layer(layer), alpha_unit, target.acts.mean_norm(target.final_layer)
        )


def load_steps(step_dirs: list[Path]) -> list[StepData]:
    """Every finished step folder, with its readout where it has one."""
    out = []
    for d in step_dirs:
        readout = Readout.load(d / READOUT_FILE) if (d / READOUT_FILE).exists() else None
        keep = load_tensors(d / KEEP_FILE)[0]["keep"].bool() if (d / KEEP_FILE).exists() else None
        metric = load_metric(d / METRIC_FILE) if (d / METRIC_FILE).exists() else None
        acts = Activations.load(d)
        n_layers = acts.meta.get("n_layers")
        done = layout.StepFiles(d).done
        if n_layers is None and done.exists():
            n_layers = read_json(done).get("model", {}).get("n_layers")
        out.append(
            StepData(
                int(d.name.split("-")[-1]),
                acts,
                ConceptVectors.load(d),
                readout,
                keep,
                metric,
                n_layers,
            )
        )
    return sorted(out, key=lambda s: s.step)


def with_readout(steps: list[StepData]) -> list[StepData]:
    """The steps the final-layer tables (attribution, transfer, random baseline) can use."""
    return [s for s in steps if s.readout is not None]


def _diag_rows(
    readout: Readout, labels: tuple[str, ...], emotions: tuple[str, ...]
) -> tuple[torch.Tensor, list[int]]:
    """``[emotion, d_model]`` effective readout rows of ``emotions`` and their label indices."""
    idx = [labels.index(e) for e in emotions]
    return readout.effective_rows[idx], idx


_PUSH_COLUMNS = ("push_change", "push_vector", "push_readout", "push_scale")


def _push_columns(push: PushChange | None, k: int | None) -> dict[str, float]:
    """The direct-push change columns of emotion ``k`` of ``push``; NaN where there is none."""
    if push is None or k is None:
        return dict.fromkeys(_PUSH_COLUMNS, float("nan"))
    parts = (push.total, push.vector, push.readout, push.scale)
    return {name: float(part[k]) for name, part in zip(_PUSH_COLUMNS, parts, strict=True)}


_LOG_PUSH_COLUMNS = (
    "log_push_change",
    "log_w_change",
    "log_v_change",
    "log_cos_change",
    "log_scale_change",
)


def _log_push_columns(log_push: LogPushChange | None, k: int | None) -> dict[str, float]:
    """The order-free log split of the push change of emotion ``k``; NaN where there is none
    (or where ``cos(w, v) <= 0`` at this step or the first)."""
    if log_push is None or k is None:
        return dict.fromkeys(_LOG_PUSH_COLUMNS, float("nan"))
    parts = (log_push.push, log_push.w, log_push.v, log_push.cos, log_push.scale)
    return {name: float(part[k]) for name, part in zip(_LOG_PUSH_COLUMNS, parts, strict=True)}


def _read_point_column(step: StepData) -> dict[str, str]:
    """``{"read_point": ...}`` for a table row at a non-default read point, else nothing (so
    default tables stay as they were)."""
    return {} if step.read_point == "block-out" else {"read_point": step.read_point}


def attribution_frame(
    steps: list[StepData],
    prompt_ids: list[str],
    alphas: tuple[float, ...],
    labels: tuple[str, ...],
    alpha_unit: str = "absolute",
) -> pd.DataFrame:
    """Per step, emotion and alpha: the final-layer diagonal logit change (mean over prompts)
    split into ``direct`` + ``scale_change``, the cosine of v with the label's readout row, the
    norms, and the change of the per-unit direct push against the first step split into
    ``push_vector`` + ``push_readout`` + ``push_scale`` (exact; see attribution.py), and
    the order-free split of the change of the log push, ``log_push_change = log_w_change +
    log_v_change + log_cos_change - log_scale_change`` (exact; NaN where ``cos(w, v) <= 0`` at
    the step or the first step; :func:`emolens.measure.attribution.log_push_change`).

    The steered vectors are those of ``sensitivity.csv`` for ``alpha_unit``
    (:meth:`StepData.steered_vectors`), so ``logit_change`` equals its final-layer diagonal;
    ``vector_norm`` is the concept vector's own norm, ``steered_norm`` that of the vector alpha
    multiplies. Steps without a readout are left out.

    At the ``"final-norm"`` read point (``h`` and v after the final norm) the logit change is
    linear in alpha: ``scale_change`` and ``push_scale`` are exactly zero, ``resid_scale`` is
    1, and the push is all ``direct``; the table then has a ``read_point`` column (none means
    ``"block-out"``, the default)."""
    steps = with_readout(steps)
    if not steps:
        return pd.DataFrame()
    ref = steps[0]
    rows = []
    a = torch.tensor(alphas, dtype=torch.float32)
    for s in steps:
        layer = s.final_layer
        h = s.prompt_resid(prompt_ids)
        v = s.steered_vectors(alpha_unit)
        raw_norm = s.vectors.layer(layer).norm(dim=-1)
        parts = decompose_steering(s.final_readout, h, v, a)
        common = [e for e in s.vectors.emotions if e in ref.vectors.emotions]
        w_t, _ = _diag_rows(s.final_readout, labels, tuple(common))
        w_0, _ = _diag_rows(ref.final_readout, labels, tuple(common))
        v_ref = ref.steered_vectors(alpha_unit)
        r_t = float(parts.resid_scale.mean())
        r_0 = float(ref.final_readout.scale(ref.prompt_resid(prompt_ids)).mean())
        push = log_push = None
        if common:
            v_t = torch.stack([v[s.vectors.emotions.index(e)] for e in common])
            v_0 = torch.stack([v_ref[ref.vectors.emotions.index(e)] for e in common])
            push = direct_push_change(w_0, v_0, r_0, w_t, v_t, r_t)
            log_push = log_push_change(w_0, v_0, r_0, w_t, v_t, r_t)
        for i, emotion in enumerate(s.vectors.emotions):
            j = labels.index(emotion)
            k = common.index(emotion) if emotion in common else None
            for ai, alpha in enumerate(alphas):
                rows.append(
                    {
                        "step": s.step,
                        "layer": layer,
                        "emotion": emotion,
                        "alpha": alpha,
                        "alpha_unit": alpha_unit,
                        **_read_point_column(s),
                        "logit_change": float(parts.total[i, ai, :, j].mean()),
                        "direct": float(parts.direct[i, ai, :, j].mean()),
                        "scale_change": float(parts.scale[i, ai, :, j].mean()),
                        "cosine_v_readout": float(parts.cosine[i, j]),
                        "vector_norm": float(raw_norm[i]),
                        "steered_norm": float(parts.vector_norm[i]),
                        "readout_norm": float(parts.row_norm[j]),
                        "resid_scale": r_t,
                        **_push_columns(push, k),
                        **_log_push_columns(log_push, k),
                    }
                )
    return pd.DataFrame(rows)


def transfer_frame(
    steps: list[StepData],
    prompt_ids: list[str],
    alpha: float,
    labels: tuple[str, ...],
    alpha_unit: str = "absolute",
) -> pd.DataFrame:
    """Steer the model of step t (its readout and its own prompt residuals) with the vectors
    of step s, for every pair: mean diagonal logit change over prompts at the final layer
    (with a ``read_point`` column at the ``"final-norm"`` read point).

    Under ``alpha_unit="norm"`` the vectors of s are rescaled to t's mean residual norm (the
    steered model's, as in ``sensitivity.csv``), so the pairs s = t equal its diagonal."""
    rows = []
    steps = with_readout(steps)
    for t in steps:
        h = t.prompt_resid(prompt_ids)
        for s in steps:
            v = s.steered_vectors(alpha_unit, norm_of=t)
            change = transfer_effect(t.final_readout, h, v, alpha)  # [emotion, prompt, label]
            for i, emotion in enumerate(s.vectors.emotions):
                rows.append(
                    {
                        "step": t.step,
                        "vector_step": s.step,
                        "emotion": emotion,
                        "alpha": alpha,
                        "alpha_unit": alpha_unit,
                        **_read_point_column(t),
                        "layer": t.final_layer,
                        "logit_change": float(change[i, :, labels.index(emotion)].mean()),
                    }
                )
    return pd.DataFrame(rows)


def dla_frame(
    model: Model,
    step: int,
    token_ids: list[list[int]],
    gold: list[int],
    readout: Readout,
    labels: tuple[str, ...],
    batch_size: int = 8,
) -> pd.DataFrame:
    """Direct logit attribution of the unsteered answer: for each gold label, the mean
    contribution of the embedding and each attention / MLP output to the gold label's logit
    and to its margin over the mean of the other labels (norm scale frozen at the full
    residual's)."""
    dla = component_attribution(model, token_ids, readout, batch_size)
    c = dla.contributions  # [sample, component, label]
    gold_t = torch.as_tensor(gold)
    own = c[torch.arange(len(gold)), :, gold_t]  # [sample, component]
    others = (c.sum(-1) - own) / (c.shape[-1] - 1)
    rows = []
    for j, name in enumerate(labels):
        mask = gold_t == j
        if not bool(mask.any()):
            continue
        for k, comp in enumerate(dla.components):
            kind, _, layer = comp.partition(" ")
            rows.append(
                {
                    "step": step,
                    "label": name,
                    "component": comp,
                    "kind": kind,
                    "layer": int(layer) if layer else -1,
                    "n_samples": int(mask.sum()),
                    "logit": float(own[mask, k].mean()),
                    "margin": float((own[mask, k] - others[mask, k]).mean()),
                }
            )
    return pd.DataFrame(rows)
