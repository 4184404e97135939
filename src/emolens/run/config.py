"""What ``analyze`` is asked to compute: :class:`AnalysisConfig` and its command-line options."""

import argparse
import logging
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np

from emolens.analysis.sample_sets import COMPARE_SETS
from emolens.measure.vectors import FILTER_MODES
from emolens.model import hooks

log = logging.getLogger(__name__)


#: How alpha is measured: absolute (h + alpha*v) or in units of the mean residual norm.
ALPHA_UNITS = ("absolute", "norm")
#: Where the steering vector is added: every position of the prompt, or only the answer's.
POSITIONS = ("all", "answer")
#: Where the final layer's h is read and steered (:data:`emolens.model.hooks.READ_POINTS`).
READ_POINTS = hooks.READ_POINTS
#: Layers whose geometry is also measured in Park et al.'s causal inner product: the final one
#: (the representation the unembedding reads, where the metric is defined) or every layer.
CAUSAL_LAYERS = ("final", "all")
#: Whose unembedding gives that metric: each step's own, or the first step's at every step (so
#: cross-step cosines do not mix in metric drift).
CAUSAL_METRICS = ("own", "base")
if TYPE_CHECKING:  # the type checker sees the choices; at run time __post_init__ checks them
    AlphaUnit = Literal["absolute", "norm"]
    Positions = Literal["all", "answer"]
    FilterMode = Literal["self", "base", "all", "none"]
    ReadPoint = Literal["block-out", "final-norm"]
    CompareSet = Literal["first", "all", "own"]
    CausalLayers = Literal["final", "all"]
    CausalMetric = Literal["own", "base"]
else:  # (a runtime type checker would refuse a bad choice before the clear message)
    AlphaUnit = Positions = FilterMode = ReadPoint = CompareSet = str
    CausalLayers = CausalMetric = str


@dataclass(frozen=True)
class AnalysisConfig:
    """What ``analyze`` computes. Layers may be negative (from the end) or ``"all"``."""

    layers: str = "all"  # layers whose residuals (and concept vectors) are kept, + the final
    steer_layers: str = "-1"  # layers steered for sensitivity; -1 is the final block output
    alphas: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0)
    alpha_unit: AlphaUnit = "absolute"  # or "norm": alpha * mean |h| along v / |v|
    positions: Positions = "all"  # steer at every position, or "answer" only
    # the final layer's h: the last block's output (before the final norm) or the norm's output
    read_point: ReadPoint = "block-out"
    n_prompts: int = 10  # neutral prompts steered, sampled once with prompt_seed
    prompt_seed: int = 0
    filter_mode: FilterMode = "self"  # who decides a sample is correct: self, base, all (or none)
    # samples the cross-step geometry compares: the first step's kept set at every step,
    # every labelled sample ("all"), or each step's own kept set ("own", moves with filtering)
    compare_set: CompareSet = "first"
    min_count: int = 3  # a label with fewer kept samples drops out (with a warning)
    batch_size: int = 8
    language: str | None = None  # prompt language; None: the run's recorded prompt, else ja
    chat: bool | None = None  # chat template; None: the run's recorded prompt, else off
    allow_shared_tokens: bool = False
    dla_per_label: int = 8  # samples per label for the direct logit attribution (0: none)
    transfer_alpha: float | None = None  # alpha of the transfer table (default: the largest)
    causal_geometry: bool = True  # also measure geometry in Park et al.'s causal inner product
    causal_layers: CausalLayers = "final"  # ... at the final layer only, or at every layer
    causal_metric: CausalMetric = "own"  # ... with each step's own metric, or the first step's
    n_boot: int = 200  # bootstrap replicates for the confidence intervals
    n_perm: int = 999  # permutations of the cross-step geometry tests (p >= 1/(1+n_perm))
    equivalence_margin: float = 0.05  # TOST margin of "no change" (relative for norms)
    probe_perms: int = 1  # shuffled-label probes per step and layer (19+: a permutation p)
    probe_refits: int = 0  # probe refits on bootstrap resamples (the refit interval; 0: none)
    seed: int = 0  # seed of the bootstraps, probe splits and random directions

    def __post_init__(self) -> None:
        if self.filter_mode not in FILTER_MODES:
            raise ValueError(f"filter mode {self.filter_mode!r} unknown; use {FILTER_MODES}")
        if self.compare_set not in COMPARE_SETS:
            raise ValueError(
                f"--compare-set {self.compare_set!r} unknown; use one of {', '.join(COMPARE_SETS)}"
            )
        if self.causal_layers not in CAUSAL_LAYERS:
            raise ValueError(
                f"--causal-layers {self.causal_layers!r} unknown; use 'final' or 'all'"
            )
        if self.causal_metric not in CAUSAL_METRICS:
            raise ValueError(f"--causal-metric {self.causal_metric!r} unknown; use 'own' or 'base'")
        if self.alpha_unit not in ALPHA_UNITS:
            raise ValueError("alpha_unit must be 'absolute' or 'norm'")
        if self.positions not in POSITIONS:
            raise ValueError("positions must be 'all' or 'answer'")
        if self.read_point not in READ_POINTS:
            raise ValueError(
                f"--read-point {self.read_point!r} unknown; use 'block-out' or 'final-norm'"
            )
        if not self.alphas or not all(np.isfinite(a) for a in self.alphas):
            raise ValueError(
                f"the alpha grid {self.alphas} must be a non-empty list of finite numbers"
            )
        if self.n_prompts < 1 or self.batch_size < 1 or self.min_count < 1:
            raise ValueError("n_prompts, batch_size and min_count must be at least 1")
        if self.n_boot < 1:
            raise ValueError(
                f"--n-boot {self.n_boot} would leave every confidence interval "
                "empty; give at least 1 (200 is the default)"
            )
        if self.probe_perms < 1 or self.probe_refits < 0:
            raise ValueError(
                f"--probe-perms {self.probe_perms} / --probe-refits {self.probe_refits}: "
                "give at least 1 shuffled probe and 0 or more refits"
            )
        if self.n_perm < 1:
            raise ValueError(f"--n-perm {self.n_perm} leaves no permutation; give at least 1")
        if not (np.isfinite(self.equivalence_margin) and self.equivalence_margin > 0):
            raise ValueError(
                f"--equivalence-margin {self.equivalence_margin} must be a positive number "
                "(0.05 is the default)"
            )
        if self.dla_per_label < 0:
            raise ValueError("--dla-per-label must be 0 (no attribution) or more")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> "AnalysisConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if isinstance(values.get("alphas"), str):
            try:
                values["alphas"] = tuple(float(a) for a in values["alphas"].split(","))
            except ValueError:
                raise ValueError(
                    f"cannot read --alphas {values['alphas']!r}: give numbers "
                    "separated by commas, e.g. 0,1,2,4"
                ) from None
        return cls(**values)


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    d = AnalysisConfig()
    p.add_argument(
        "--layers",
        default=d.layers,
        help="layers whose residuals and vectors are kept: 'all' or e.g. 6,12,-1 "
        "(the final layer is always kept too: the final-layer tables read it)",
    )
    p.add_argument(
        "--steer-layers",
        default=d.steer_layers,
        help="layers to steer at (comma-separated; -1 = final block output)",
    )
    p.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in d.alphas),
        help="steering strengths, comma-separated",
    )
    p.add_argument(
        "--alpha-unit",
        default=d.alpha_unit,
        choices=["absolute", "norm"],
        help="absolute: h + alpha*v; norm: h + alpha*|h|mean*v/|v|",
    )
    p.add_argument(
        "--positions",
        default=d.positions,
        choices=["all", "answer"],
        help="steer every position or only the answer position",
    )
    p.add_argument(
        "--read-point",
        default=d.read_point,
        choices=list(READ_POINTS),
        help="where the final layer's h is read (vectors, geometry, probes) and steered: "
        "block-out, the last block's output before the final norm (blocks.N-1.hook_out, the "
        "default); final-norm, the final norm's output (ln_final.hook_out, HF's "
        "hidden_states[-1]), where steering is linear in alpha with no norm-scale term. "
        "Other layers have no final norm and are read at their block output either way",
    )
    p.add_argument(
        "--n-prompts", type=int, default=d.n_prompts, help="neutral prompts to steer (sampled once)"
    )
    p.add_argument("--prompt-seed", type=int, default=d.prompt_seed, help="seed of that sample")
    p.add_argument(
        "--filter-mode",
        default=d.filter_mode,
        choices=list(FILTER_MODES),
        help="which model decides that a sample is correctly classified",
    )
    p.add_argument(
        "--compare-set",
        default=d.compare_set,
        choices=list(COMPARE_SETS),
        help="samples the cross-step geometry (geometry.csv, change_summary.csv) uses at "
        "every step: first = the first step's kept set (the base model's), all = every "
        "labelled sample, own = each step's kept set (moves with --filter-mode self; "
        "kept_set_effect.csv shows by how much)",
    )
    p.add_argument(
        "--causal-layers",
        default=d.causal_layers,
        choices=list(CAUSAL_LAYERS),
        help="layers whose geometry is also measured in Park et al.'s causal inner product "
        "(from the unembedding): final, the representation the unembedding reads (where the "
        "metric is defined), or all",
    )
    p.add_argument(
        "--causal-metric",
        default=d.causal_metric,
        choices=list(CAUSAL_METRICS),
        help="whose unembedding defines that metric: own, each step's; base, the first "
        "step's at every step, so cross-step cosines do not mix in the metric's drift",
    )
    p.add_argument(
        "--min-count", type=int, default=d.min_count, help="labels with fewer kept samples drop out"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="forward batch size")
    p.add_argument(
        "--dla-per-label",
        type=int,
        default=d.dla_per_label,
        help="samples per label for the direct logit attribution (0: skip it)",
    )
    p.add_argument(
        "--n-boot", type=int, default=d.n_boot, help="bootstrap replicates for confidence intervals"
    )
    p.add_argument(
        "--n-perm",
        type=int,
        default=d.n_perm,
        help="permutations of the cross-step geometry tests (cosine to the first step, "
        "principal angles); their p-values are at least 1/(1+n)",
    )
    p.add_argument(
        "--probe-perms",
        type=int,
        default=d.probe_perms,
        help="shuffled-label probes per step and layer: their mean and, from 19 on, a "
        "permutation p-value (1+k)/(1+n) in probes.csv; each costs one probe fit",
    )
    p.add_argument(
        "--probe-refits",
        type=int,
        default=d.probe_refits,
        help="refit each probe on this many bootstrap resamples of its training split for "
        "an interval with training variability (refit_ci_low/high; 0: none, 20 is usual)",
    )
    p.add_argument(
        "--equivalence-margin",
        type=float,
        default=d.equivalence_margin,
        help="margin of the equivalence tests (TOST) behind 'no change' verdicts: absolute for "
        "bounded measures (cosines, accuracies), relative to the first step for norms and "
        "logit changes; stated in change_summary.csv and the report",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of bootstraps, probe splits and random baseline directions",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap prompts in the chat template (when not given: as the run was "
        "fine-tuned, recorded in RUN/prompt.json; off for a plain model)",
    )
    p.add_argument(
        "--allow-shared-tokens", action="store_true", help="accept labels that share a first token"
    )
    p.add_argument(
        "--override-prompt",
        action="store_true",
        help="analyse with the --language/--chat prompt even where it differs from "
        "the one the run was fine-tuned with (recorded in the manifest)",
    )


#: Settings used only by the cross-step tables, rebuilt from disk on every run.
OFFLINE_SETTINGS = (
    "n_boot",
    "n_perm",
    "seed",
    "transfer_alpha",
    "equivalence_margin",
    "compare_set",
    "probe_perms",
    "probe_refits",
    "causal_layers",
    "causal_metric",
)


def collected_layers(layers: str, n_layers: int) -> list[int]:
    """The layers ``analyze`` collects: those asked for and always the final one, which the
    final-layer tables (attribution, transfer, random baseline) read."""
    return sorted(set(hooks.check_layers(layers, n_layers)) | {n_layers - 1})
