"""Why Figure 2's two-level bootstrap test of a change rejected too often (issue 13): its
standard error of a first-vs-last change against the change's Monte-Carlo SD under no change,
beside the delete-one jackknife's, on ``benchmarks/calibration.py``'s simulation.

Per simulated null series (two exchangeable steps on the same samples): the change ``d`` of
each emotion's point, its two-level bootstrap variance (``figure2_bootstrap``: the samples that
build v and the prompts, prompts that are samples with their multiplicity), the bootstrap with
the prompts' weights held at 1 (``v`` alone resampled), the per-prompt part ``s_D^2 / P`` (the
sample variance over prompts of the per-prompt changes, with v from all samples) and the
stratified jackknife variance (``jackknife_variance`` of ``Figure2Bootstrap.jackknife``).
Printed: each mean variance over the Monte-Carlo variance ``mean d^2`` (E d = 0 under the
null), the SD of ``d / SE`` and its share beyond 1.96.

``--fixed K``: the persistent parts (class centres, each sample's persistent residual, the
readout) of simulation ``K`` held fixed and only the step noise redrawn, so the Monte-Carlo
variance is one configuration's; ``--linear``: the readout without its final norm
(``Readout.at_read_point("final-norm")``), where the steered logit is linear in v.

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/figure2_se.py --n-sim 200``
(27 s wall). Measured (200 series, 200 resamples; ``--n-boot 100`` for the fixed ones, 14 s
each)::

    setting                    boot/MC  v-only/boot  s_D^2/P/boot  jack/MC  SD z_boot  SD z_jack
    alpha 4                     0.82     0.69         0.08          0.97     1.14       1.04
    alpha 4, --fixed 0          0.86     0.70         0.08          1.03     1.11       1.01
    alpha 4, --fixed 1          0.84     0.71         0.07          1.01     1.13       1.02
    alpha 1 (100 series)        0.90     0.92         0.02          0.95     1.08       1.04
    alpha 8 (100 series)        0.78     0.62         0.14          0.96     1.17       1.05
    alpha 4, --fixed 0 --linear 0.99     1.00         0.00          1.02     1.03       1.01

The bootstrap's variance falls short as alpha grows and not at all without the norm: a
replicate's v* carries v's estimation noise twice (v_hat's and the resample's), so the
bootstrap reads the change's sensitivity to the samples' noise where ``|h + alpha v|`` is
larger and the normalised readout flatter. The prompts' own part is small (a tenth of the
variance), so their small number (10) is not the cause.
"""

import argparse
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from emolens.analysis import change_tests as ct
from emolens.analysis import stats

_spec = importlib.util.spec_from_file_location(
    "calibration", Path(__file__).with_name("calibration.py")
)
cal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cal)  # type: ignore[union-attr]


def _steps(k: int, args: argparse.Namespace):
    """Two null steps: simulation ``k``'s, or (``--fixed``) simulation ``args.fixed``'s
    persistent parts with step noise from seed ``10000 + k``."""
    if args.fixed < 0:
        gen = torch.Generator().manual_seed(k)
        readout = cal.readout_of(gen, args.d)
        if args.linear:
            readout = readout.at_read_point("final-norm")
        return cal.simulate(gen, args.n_per, args.d, 0.9, 0.3, 0.0, "readout", readout)
    gen = torch.Generator().manual_seed(args.fixed)
    readout = cal.readout_of(gen, args.d)
    if args.linear:
        readout = readout.at_read_point("final-norm")
    gold = torch.arange(len(cal.LABELS)).repeat_interleave(args.n_per)
    centres = 0.3 * torch.randn(len(cal.LABELS), args.d, generator=gen, dtype=torch.float64)
    a = math.sqrt(0.9) * torch.randn(len(gold), args.d, generator=gen, dtype=torch.float64)
    noise = torch.Generator().manual_seed(10_000 + k)
    hs = [
        centres[gold] + a + math.sqrt(0.1) * torch.randn(a.shape, generator=noise, dtype=a.dtype)
        for _ in range(2)
    ]
    return [cal.step_data(s, h, gold, readout) for s, h in enumerate(hs)]


def _one_step(st, k: int, args: argparse.Namespace, prompt_ids: list[str]):
    """The step's Figure2Bootstrap, its per-prompt changes ``[E, P]`` (v from all samples)
    and its bootstrap with the prompts' weights held at 1 ``[E, n_boot]``."""
    n_e = len(cal.EMOTIONS)
    h, y = st.acts.layer(0).double(), st.acts.gold
    prompts = st.prompt_resid(prompt_ids).double()
    pos = [st.acts.sample_ids.index(p) for p in prompt_ids]
    own = list(range(n_e))
    boot = ct.figure2_bootstrap(h, y, own, n_e, prompts, st.readout.logits, own, args.alpha,
                                n_boot=args.n_boot, seed=k, prompt_positions=pos)  # fmt: skip
    base = st.readout.logits(prompts)[:, :n_e]
    onehot = torch.nn.functional.one_hot(y, len(cal.LABELS)).double().T
    rows = torch.arange(n_e)

    def changes(mult: torch.Tensor) -> torch.Tensor:
        w = onehot * mult[None]
        means = (w @ h) / w.sum(1, keepdim=True)
        v = means[:n_e] - means[n_e]
        steered = st.readout.logits(prompts[None] + args.alpha * v[:, None, :])
        return steered[rows, :, rows] - base.T  # [E, P]

    per_prompt = changes(torch.ones(len(y), dtype=torch.float64))
    idx = stats.bootstrap_indices(len(y), args.n_boot, k, strata=y)  # figure2_bootstrap's
    v_only = torch.stack(
        [changes(torch.bincount(idx[b], minlength=len(y)).double()).mean(-1)
         for b in range(args.n_boot)], -1
    )  # fmt: skip
    return boot, per_prompt, v_only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-sim", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--n-per", type=int, default=32)
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--fixed", type=int, default=-1, help="hold simulation K's persistent parts")
    ap.add_argument("--linear", action="store_true", help="the readout without its final norm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_e = len(cal.EMOTIONS)
    prompt_ids = [f"s{i}" for i in range(n_e * args.n_per, (n_e + 1) * args.n_per)]
    prompt_ids = prompt_ids[: args.n_prompts]
    started = time.time()
    d, boot_var, v_var, prompt_var, jack_var = [], [], [], [], []
    for k in range(args.n_sim):
        (b0, pp0, v0), (b1, pp1, v1) = (
            _one_step(st, k, args, prompt_ids) for st in _steps(k, args)
        )
        d.append((b1.estimate - b0.estimate).numpy())
        boot_var.append((b1.samples - b0.samples).var(-1).numpy())
        v_var.append((v1 - v0).var(-1).numpy())
        prompt_var.append(((pp1 - pp0).var(-1) / len(prompt_ids)).numpy())
        jv, _ = ct.jackknife_variance(b1.jackknife - b0.jackknife, b0.jackknife_strata)
        jack_var.append(jv.numpy())
    d, bv, vv, pv, jv = (np.stack(x) for x in (d, boot_var, v_var, prompt_var, jack_var))
    mc = float((d**2).mean())
    z_boot, z_jack = d / np.sqrt(bv), d / np.sqrt(jv)
    print(f"{args.n_sim} null series, alpha {args.alpha}, fixed {args.fixed}, linear "
          f"{args.linear}, n_boot {args.n_boot}: {time.time() - started:.0f} s")  # fmt: skip
    print(f"boot/MC {bv.mean() / mc:.2f}  v-only/boot {vv.mean() / bv.mean():.2f}  "
          f"s_D^2/P/boot {pv.mean() / bv.mean():.2f}  jack/MC {jv.mean() / mc:.2f}  "
          f"SD z_boot {z_boot.std():.2f}  SD z_jack {z_jack.std():.2f}  "
          f"|z_boot|>1.96 {(np.abs(z_boot) > 1.96).mean():.3f}  "
          f"|z_jack|>1.96 {(np.abs(z_jack) > 1.96).mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
