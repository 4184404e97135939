"""Calibration of emolens' change tests: false-positive rate under no change, power at a
planted paired shift of 0.25 SD, per measure family, at the demo's sample sizes (issue 13).

Every simulated series goes through the project's own code paths: geometry through
``geometry_tables.geometry_frame`` + ``change_summary``, probes through ``probes_frame`` +
``change_summary``, sensitivity through the final-layer readout math of
``emolens.measure.attribution.Readout`` (``sensitivity_change_summary`` for the sign-flip test over
prompts with ``v`` fixed, ``figure2_frame`` for Figure 2's first-vs-last test, and the two-level
bootstrap's own tests beside it for comparison).

Data (demo sizes: 13 labels x 32 samples = 416, 10 neutral steered prompts): residuals
``h0_i = c_y + a_i + b_i`` at step 0 and ``ht_i = c_y + a_i + b'_i`` at step t, with ``a`` the
part of a sample's residual that persists across steps (variance ``rho`` per dimension) and
``b, b'`` independent (variance ``1 - rho``): per-sample SD 1 per dimension, correlation
``rho`` between steps, and (h0, ht) exchangeable, so under "no change" every measure has the
same population value at both steps. Class centres ``c ~ N(0, centre_sd^2)``.

Planted shift ("0.25 SD"): at step t every sample of each emotion class (neutral fixed) moves
by 0.25 per-sample SDs, along its class's direction ``c_e - c_neutral`` (geometry, probes) or
along its label's readout row (sensitivity, so the steered logit rises).

Reported per family and test: ``FPR`` (share of null tests with p < 0.05), ``FWER`` (share of
simulated families with any q < 0.05 after BH within the family: under the complete null this
is the FDR), power at each planted shift (``q|p``: share of the shifted measure's tests with
q < 0.05, and with p < 0.05; geometry counts ``vector_norm``, probes the own probe's
``accuracy``, sensitivity every emotion) and the shift at which each reaches 80% (linear
interpolation on the grid). ``omnibus`` rows: :func:`change_omnibus`, one joint test per
group of series (geometry: every emotion's ``vector_norm`` at the layer; probes: the own
probe's recalls), BH over the family's groups. ``normal p``: the Wald p from the bootstrap
SE (``change_summary(p_method="normal")``), which has no ``1 / (1 + B)`` floor. ``FPR``
carries its Monte-Carlo SE (the SE of the mean of per-simulation shares: one simulation's tests
share samples, so simulations are the independent units) since the sensitivity run below.

Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/calibration.py --quick`` (40
simulations, 100 resamples, shifts 0.25, 0.5, 1; 734 s wall on the shared 2-core box, 130 s
CPU); the defaults (100 simulations, 200 resamples, shifts 0.1 to 1) take about 4x longer.

Measured (``--quick``)::

    family / test (tests, targets)   FPR   FWER        q|p@.25   q|p@.5    q|p@1   80%: q  p
    geometry bootstrap (105, 12)     .039  .000±.034   .03|.44   .89|.95   1|1     0.47 0.43
    geometry omnibus (8, 1)          .031  .025±.034   .88|.88   1|1       1|1    <.25 <.25
    geometry normal p (105, 12)      .050  .025±.034   .23|.47   .94|.96   1|1     0.45 0.42
    probes bootstrap (15, 1)         .025  .000±.034   .00|.25   .00|.72   .07|1    >1  0.64
    probes omnibus (3, 1)            .075  .025±.034   .07|.17   .33|.50   .93|.93 0.90 0.85
    probes normal p (15, 1)          .062  .025±.034   .07|.30   .33|.80   .97|1   0.87 0.50
    sensitivity v fixed (12, 12)     .537  .775±.066   .90|.90   1|1       1|1    <.25 <.25
    sensitivity two-level (12, 12)   .081  .000±.034   .30|.52   .97|.97   1|1     0.44 0.41
    sensitivity two-level omnibus    .275  .275±.071   (not valid)

(the last two rows are the two-level bootstrap's tests, which ``figure2_frame`` no longer uses:
see "Figure 2's change tests" below.)

Figure 2's change tests (issue 13), ``PYTHONPATH=src OMP_NUM_THREADS=1 python
benchmarks/calibration.py --families sensitivity --n-sim 400`` (400 simulations, 200 resamples,
shifts 0.1 to 1; 457 s wall, 7m20s CPU, on the shared 2-core box beside another job)::

    test (12 per family)        FPR p<.05  FWER q<.05  q|p@.1   q|p@.25  q|p@.5   q|p@1 80%: q  p
    figure2_frame jackknife t   .045±.003  .062±.012   .02|.11  .30|.46  .96|.96  1|1   0.44 0.42
    jackknife omnibus           .048±.011  .048±.011   .28      .99      1        1     0.21
    bootstrap (count p)         .071±.004  .015±.011   .01|.14  .35|.52  .97|.97  1|1   0.43 0.40
    bootstrap omnibus           .120±.016  .120±.016   (not valid)
    bootstrap SE*sqrt(P/P-1),t9 .031±.003  .010±.011   .00|.09  .14|.39  .94|.94  1|1   0.46 0.44
    jackknife SE, normal p      .051±.003  .077±.013   .03|.12  .33|.48  .96|.97  1|1   0.43 0.41
    sign-flip, v fixed          .547±.007  .910±.014   (not a test of this claim, see below)

(the bootstrap rows at 200 simulations, same command with ``--n-sim 200``, 234 s: .081±.005 and
omnibus .145±.025; the jackknife t .052±.005, omnibus .055±.016.) ``figure2_frame`` reports the
jackknife t (``figure2_trends.csv``'s ``method`` column says so), for first-vs-last and for the
slope over steps alike (``tests/test_calibration.py``: on four steps at smaller sizes, .046 and
.044, against .088 and .093 for the bootstrap's tests).

Cause, measured (``benchmarks/figure2_se.py`` on this simulation, alpha = 4 unless said; "MC" =
across simulated null series; "fixed" = the persistent parts c, a and the readout held fixed, b
redrawn, 200 series): the bootstrap variance of the first-last change was 0.82 of its MC
variance (0.84 and 0.86 fixed; z = d / SE_boot had SD 1.14, hence 8% rejections). Not the 10
prompts: the per-prompt spread carries 7-8% of the bootstrap variance (``s_D^2 / P``; the
(n-1)/n bias of 10 prompts would cost under 1%), and the bootstrap with the prompts' weights
held at 1 (v alone resampled) has 70% of the full bootstrap variance. Not the coupling of
prompts that are samples (resampled with their multiplicity since the last fix). Not the
pairing (the paired SE is what the jackknife, also paired, recovers). The readout: the steered
logit goes through the final norm, which flattens as ``|h + alpha v|`` grows, and a bootstrap
replicate's ``v*`` carries the estimation noise of v twice (v_hat's and the resample's), so the
bootstrap reads the change's sensitivity to the samples' noise where the readout is flatter.
The ratio fell with alpha (0.90 at alpha = 1, 0.82 at 4, 0.78 at 8), and with the norm taken
out (a linear readout, ``Readout.at_read_point("final-norm")``) it was 0.99 (fixed). The
delete-one jackknife moves one sample at a time from v_hat (a linearisation where the estimate
is): its variance was 1.03 and 1.01 of the MC variance (fixed), 0.95-0.97 across simulations
(alpha 1-8). Its Satterthwaite df (median 59 here, 20 at 12 samples per label) give the t
reference. At smaller sizes (``--families sensitivity --n-per 12 --d 16 --n-prompts 8 --n-sim
400 --shifts 0.25,0.6``, 212 s): jackknife t .049 ± .004 (q|p power at 0.6 SD .57|.67), its
omnibus .045 ± .010; bootstrap .102 ± .005, its omnibus .212 ± .020; bootstrap SE with t7 .044
± .003 (.49|.65); jackknife SE with a normal p .065 ± .004, so the t reference is needed.
Picked: the jackknife t, calibrated at both sizes with the most power among the calibrated
tests (the t(P-1)-corrected bootstrap is calibrated only by overcorrecting where the prompts
carry little of the variance: .031 here, at half the power at 0.25 SD, .14 against .30). The
joint test (``omnibus_jackknife_test``: the same ``T``, null from the jackknife correlation
with one chi-square per series for its SE's noise) is valid now: .048 ± .011 here, .045 ± .010
at the smaller sizes (scratch runs of the null alone: without the chi-squares 6.2-6.3%, with
one chi-square shared by all series 1.3-3.7% and less power).

Why power at 0.25 SD was low: (1) per series it is at the information limit: a vector norm's
paired change has SD 0.117 against a planted 0.222 (z = 1.9; Monte-Carlo SD and bootstrap SD
agreed to 0.1%), so no per-series test reaches 80% below about 0.43 SD; (2) BH over the
family's 105 series of which 12 carry the shift, and (3) the count p's floor
``1 / (1 + B)``: BH can flag nothing until ``m / ((1 + B) * 0.05)`` series are flagged (4212
geometry series in the demo at B = 200: about 420). The joint test per layer reaches 80% at
0.25 SD for geometry; the Wald p lifts BH power at 0.25 SD from 0.03 to 0.23 at the nominal
rate. Cross-step measures (``cosine_to_first``, principal angles) are tested by step swaps
(``cross_step_tests``): their bootstrap rejected 11% and 100% of true nulls. The sign-flip
test with v fixed is not a test of "sensitivity changed" (v is re-estimated at each step).
The two-level bootstrap's per-test rate (0.081 here, 0.071 ± 0.004 at 400 simulations) was
above nominal and its joint test not valid (0.275 here, 0.120 at 400 simulations): its SE of a
change is too small through the normalising readout (not because of the 10 prompts), see
"Cause, measured" above; ``figure2_frame`` tests with the jackknife instead.
"""

import argparse
import math
import time

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from emolens.analysis import change_tests
from emolens.analysis.change_summary import (
    change_omnibus,
    change_summary,
    sensitivity_change_summary,
)
from emolens.analysis.figure2 import figure2_frame
from emolens.analysis.geometry_tables import cross_step_tests, geometry_frame
from emolens.analysis.probe_tables import probes_frame
from emolens.analysis.seed_tests import t_two_sided_p
from emolens.analysis.steps import StepData
from emolens.measure.activations import Activations
from emolens.measure.attribution import Readout
from emolens.measure.vectors import ConceptVectors

LABELS = tuple(f"l{i}" for i in range(12)) + ("no-emotion",)
NEUTRAL = "no-emotion"
EMOTIONS = LABELS[:-1]


def readout_of(gen: torch.Generator, d: int) -> Readout:
    """A synthetic RMSNorm + linear readout of the 13 labels (as a final layer has)."""
    rows = torch.randn(len(LABELS), d, generator=gen, dtype=torch.float64)
    return Readout(
        "rms",
        torch.ones(d),
        torch.zeros(d),
        1e-6,
        rows.float(),
        torch.zeros(len(LABELS)),
        torch.zeros(d),
        0.0,
        tuple(range(len(LABELS))),
    )


def step_data(step: int, h: torch.Tensor, gold: torch.Tensor, readout: Readout) -> StepData:
    """One step with one layer (the final one), vectors from all samples (eq. 2)."""
    n, d = h.shape
    means = torch.stack([h[gold == j].mean(0) for j in range(len(LABELS))])
    v = (means[:-1] - means[-1:])[None]  # [layer, emotion, d]
    counts = torch.bincount(gold, minlength=len(LABELS))
    acts = Activations(
        h[:, None, :].float(),
        torch.zeros(n, len(LABELS)),
        torch.zeros(n),
        torch.zeros(n),
        (0,),
        tuple(f"s{i}" for i in range(n)),
        gold,
    )
    vecs = ConceptVectors(v.float(), counts[:-1], EMOTIONS, (0,), NEUTRAL, int(counts[-1]))
    return StepData(step, acts, vecs, readout, n_layers=1)


def simulate(
    gen: torch.Generator, n_per: int, d: int, rho: float, centre_sd: float, shift: float,
    direction: str, readout: Readout,
) -> tuple[StepData, StepData]:  # fmt: skip
    """Steps 0 and 1 on the same samples (see the module docstring)."""
    gold = torch.arange(len(LABELS)).repeat_interleave(n_per)
    n = len(gold)
    centres = centre_sd * torch.randn(len(LABELS), d, generator=gen, dtype=torch.float64)
    a = math.sqrt(rho) * torch.randn(n, d, generator=gen, dtype=torch.float64)
    b0 = math.sqrt(1 - rho) * torch.randn(n, d, generator=gen, dtype=torch.float64)
    b1 = math.sqrt(1 - rho) * torch.randn(n, d, generator=gen, dtype=torch.float64)
    h0 = centres[gold] + a + b0
    h1 = centres[gold] + a + b1
    if shift:
        if direction == "class":
            dirs = centres[:-1] - centres[-1:]
        else:  # the label's readout row (effective row of an RMSNorm with unit gain)
            dirs = readout.effective_rows.double()[:-1]
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        emo = gold < len(EMOTIONS)
        h1[emo] += shift * dirs[gold[emo]]
    return step_data(0, h0, gold, readout), step_data(1, h1, gold, readout)


def run(args: argparse.Namespace) -> pd.DataFrame:
    """One record per simulated family, test and shift (0 = no change); every shift of one
    simulation ``k`` reuses its data (common random numbers), so the power curve is smooth."""
    records = []
    prompt_ids = [f"s{i}" for i in range(len(EMOTIONS) * args.n_per, len(LABELS) * args.n_per)]
    prompt_ids = prompt_ids[: args.n_prompts]
    families = [f for f in ("geometry", "probes", "sensitivity") if f in args.families]
    shifts = [0.0] + [x for x in args.shifts if x > 0]
    with tqdm(total=args.n_sim * len(shifts) * len(families), desc="simulated families") as bar:
        for k in range(args.n_sim):
            for shift in shifts:
                if "geometry" in families or "probes" in families:
                    gen = torch.Generator().manual_seed(k)
                    readout = readout_of(gen, args.d)
                    steps = simulate(
                        gen, args.n_per, args.d, args.rho, args.centre_sd, shift, "class", readout
                    )
                if "geometry" in families:
                    frame, reps = geometry_frame(
                        steps, LABELS, NEUTRAL, n_boot=args.n_boot, seed=k, return_replicates=True
                    )
                    cross = cross_step_tests(steps, LABELS, NEUTRAL, n_perm=args.n_boot, seed=k)
                    records += _records(
                        "geometry", shift, change_summary(frame, reps, cross_step=cross),
                        change_omnibus(frame, reps), measure="vector_norm",
                    )  # fmt: skip
                    normal = change_summary(frame, reps, cross_step=cross, p_method="normal")
                    records += _records("geometry", shift, normal, None, measure="vector_norm",
                                        test="paired bootstrap, normal p")  # fmt: skip
                    bar.update()
                if "probes" in families:
                    frame, reps = probes_frame(
                        steps, LABELS, n_boot=args.n_boot, seed=k, return_replicates=True,
                        max_iter=args.probe_iter, n_perm=1, n_refit=0,
                    )  # fmt: skip
                    summary = change_summary(frame, reps)
                    summary = summary[summary.probe == "own"]
                    omni = change_omnibus(frame, reps)
                    omni = omni[omni.probe == "own"]
                    records += _records(
                        "probes", shift, summary, omni, measure="accuracy", omni_measure="recall"
                    )
                    normal = change_summary(frame, reps, p_method="normal")
                    records += _records(
                        "probes", shift, normal[normal.probe == "own"], None,
                        measure="accuracy", test="paired bootstrap, normal p",
                    )  # fmt: skip
                    bar.update()
                if "sensitivity" in families:
                    gen = torch.Generator().manual_seed(k)
                    readout = readout_of(gen, args.d)
                    steps = simulate(
                        gen, args.n_per, args.d, args.rho, args.centre_sd, shift, "readout",
                        readout,
                    )  # fmt: skip
                    records += _sensitivity(steps, prompt_ids, args, shift, k)
                    bar.update()
    return pd.DataFrame(records)


def _sensitivity(steps, prompt_ids, args, shift, k) -> list[dict]:
    """The v-fixed sign-flip test (``sensitivity_change_summary``); Figure 2's first-vs-last
    test as ``figure2_frame`` gives it (``figure2_trends``' ``first_last_p`` / ``_q``: the
    delete-one jackknife t test); and, for comparison, the two-level bootstrap's own tests
    (``figure2_bootstrap``: the samples that build v and the prompts resampled, the same
    resamples at both steps): the centred count p, the same bootstrap SE with the small-n
    correction (SE * sqrt(P / (P - 1)), Student t on P - 1 df for P prompts) and the
    jackknife SE with a normal reference; jointly over emotions: the bootstrap omnibus and
    ``omnibus_jackknife_test``."""
    rows = []
    own = torch.arange(len(EMOTIONS))
    boots = []
    for s in steps:
        h = s.prompt_resid(prompt_ids)
        v = s.vectors.layer(0).double()
        steered = s.readout.logits(h.double()[None] + args.alpha * v[:, None, :])
        change = steered[own, :, own] - s.readout.logits(h.double())[:, own].T  # [E, P]
        for e, emotion in enumerate(EMOTIONS):
            for p, pid in enumerate(prompt_ids):
                rows.append(
                    dict(step=s.step, layer=0, steered_emotion=emotion, observed_label=emotion,
                         alpha=args.alpha, prompt_id=pid, logit_change=float(change[e, p]))
                )  # fmt: skip
        positions = [s.acts.sample_ids.index(pid) for pid in prompt_ids]
        boots.append(
            change_tests.figure2_bootstrap(
                s.acts.layer(0).double(), s.acts.gold, list(range(len(EMOTIONS))),
                len(EMOTIONS), h.double(), lambda x, s=s: s.readout.logits(x),
                list(range(len(EMOTIONS))), args.alpha, n_boot=args.n_boot, seed=k,
                prompt_positions=positions,
            )
        )  # fmt: skip
    flip = sensitivity_change_summary(pd.DataFrame(rows), n_perm=args.n_boot, seed=k)
    out = _records("sensitivity", shift, flip, None, measure="logit_change",
                   test="sign-flip, v fixed")  # fmt: skip
    # what figure2_frame reports (its own bootstrap for the bands, the jackknife for the tests)
    _, trends = figure2_frame(
        steps, prompt_ids, (args.alpha,), LABELS, NEUTRAL, n_boot=args.n_boot, seed=k
    )
    b0, b1 = boots
    jt = pd.DataFrame(
        dict(measure="logit_change", p=trends.first_last_p.to_numpy(),
             q=trends.first_last_q.to_numpy(), effect=trends.first_last_effect.to_numpy(),
             first_value=b0.estimate.numpy())
    )  # fmt: skip
    jack = b1.jackknife - b0.jackknife
    omni = change_tests.omnibus_jackknife_test(b1.estimate - b0.estimate, jack,
                                               b0.jackknife_strata, seed=k)  # fmt: skip
    omni_frame = pd.DataFrame(dict(measure=["logit_change"], p=[omni.p], q=[omni.p]))
    out += _records("sensitivity", shift, jt, omni_frame, measure="logit_change",
                    test="figure2_frame jackknife t")  # fmt: skip
    test = change_tests.paired_bootstrap_test(b1.estimate, b0.estimate, b1.samples, b0.samples)
    effect, n_p = test.effect, len(prompt_ids)
    se_boot = (b1.samples - b0.samples).std(-1) * math.sqrt(n_p / (n_p - 1))
    small_n = torch.tensor([t_two_sided_p(float(e / s), n_p - 1) for e, s in zip(effect, se_boot)])
    var, _ = change_tests.jackknife_variance(jack, b0.jackknife_strata)
    jack_z = torch.special.erfc(effect.abs() / var.sqrt() / math.sqrt(2.0))
    omni = change_tests.omnibus_bootstrap_test(test.effect, b1.samples - b0.samples)
    omni_frame = pd.DataFrame(dict(measure=["logit_change"], p=[omni.p], q=[omni.p]))
    for name, p, o in (("two-level bootstrap", test.p, omni_frame),
                       (f"two-level bootstrap SE, t{n_p - 1}", small_n, None),
                       ("jackknife SE, normal p", jack_z, None)):  # fmt: skip
        two = pd.DataFrame(
            dict(measure="logit_change", p=p.numpy(), effect=effect.numpy(),
                 first_value=b0.estimate.numpy())
        )  # fmt: skip
        two["q"] = change_tests.benjamini_hochberg(two.p.to_numpy())
        out += _records("sensitivity", shift, two, o, measure="logit_change", test=name)
    return out


def _records(
    family: str, shift: float, summary: pd.DataFrame, omni: pd.DataFrame | None, *,
    measure: str, omni_measure: str | None = None, test: str = "paired bootstrap",
) -> list[dict]:  # fmt: skip
    """Per-series test counts (all tested series; the target is ``measure``) and, with
    ``omni``, the joint tests' counts (target: the group of ``omni_measure``)."""
    s = summary[summary.p.notna()]
    target = (s.measure == measure).to_numpy()
    rows = [
        {
            "family": family, "test": test, "shift": shift, "n_tests": len(s),
            "n_p05": int((s.p < 0.05).sum()), "any_q05": bool((s.q < 0.05).any()),
            "n_target": int(target.sum()), "n_target_q05": int((s.q[target] < 0.05).sum()),
            "n_target_p05": int((s.p[target] < 0.05).sum()),
            "target_effect": float(np.nanmean(s.effect[target])) if target.any() else np.nan,
            "target_first": float(np.nanmean(s.first_value[target])) if target.any() else np.nan,
        }
    ]  # fmt: skip
    if omni is not None:
        o = omni[omni.p.notna()]
        t = (o.measure == (omni_measure or measure)).to_numpy()
        rows.append(
            {
                "family": family, "test": f"{test}, omnibus", "shift": shift,
                "n_tests": len(o), "n_p05": int((o.p < 0.05).sum()),
                "any_q05": bool((o.q < 0.05).any()), "n_target": int(t.sum()),
                "n_target_q05": int((o.q[t] < 0.05).sum()),
                "n_target_p05": int((o.p[t] < 0.05).sum()),
                "target_effect": np.nan, "target_first": np.nan,
            }
        )  # fmt: skip
    return rows


def _mde(shifts: list[float], power: list[float], target: float = 0.8) -> str:
    """The smallest shift at which ``power`` reaches ``target``, interpolated linearly between
    the grid's shifts; ``"> max"`` where the grid's largest shift falls short."""
    for i, (x, pw) in enumerate(zip(shifts, power, strict=True)):
        if pw >= target:
            if i == 0:
                return f"<= {x:g}"
            x0, p0 = shifts[i - 1], power[i - 1]
            return f"{x0 + (target - p0) * (x - x0) / (pw - p0):.2f}"
    return f"> {shifts[-1]:g}"


def table(records: pd.DataFrame) -> pd.DataFrame:
    """Per family and test: the null's per-test rate and family-wise rate (with MC errors),
    power at each planted shift (q < .05 after BH in the family, and p < .05 per test), and
    the shift (in per-sample SD) at which each reaches 80%."""
    rows = []
    for (family, test), g in records.groupby(["family", "test"], sort=False):
        null, alts = g[g["shift"] == 0], g[g["shift"] > 0]
        n = len(null)
        fpr = null.n_p05.sum() / max(null.n_tests.sum(), 1)
        # MC error of the FPR: the tests of one simulation are dependent (shared samples and
        # prompts), so the simulations are the independent units: SE of their mean share
        share = null.n_p05 / null.n_tests.clip(lower=1)
        fpr_se = float(share.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        fwer = null.any_q05.mean()
        se = math.sqrt(max(fwer * (1 - fwer), 0.05 * 0.95) / n)
        row = {
            "family": family, "test": test, "tests/family": int(null.n_tests.mean()),
            "targets": int(null.n_target.mean()), "FPR p<.05": f"{fpr:.3f} ± {fpr_se:.3f}",
            "FWER q<.05": f"{fwer:.3f} ± {se:.3f}",
        }  # fmt: skip
        shifts, pq, pp = [], [], []
        for shift, a in alts.groupby("shift"):
            shifts.append(float(shift))
            pq.append(a.n_target_q05.sum() / max(a.n_target.sum(), 1))
            pp.append(a.n_target_p05.sum() / max(a.n_target.sum(), 1))
            row[f"power q|p @{shift:g}"] = f"{pq[-1]:.2f}|{pp[-1]:.2f}"
        row["80% at (q)"] = _mde(shifts, pq)
        row["80% at (p)"] = _mde(shifts, pp)
        row["n_sim"] = n
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-sim", type=int, default=100, help="simulated families per condition")
    ap.add_argument("--n-boot", type=int, default=200, help="resamples per test (the default)")
    ap.add_argument("--n-per", type=int, default=32, help="samples per label (demo: 32)")
    ap.add_argument("--n-prompts", type=int, default=10, help="steered neutral prompts")
    ap.add_argument("--d", type=int, default=64, help="residual dimension")
    ap.add_argument("--rho", type=float, default=0.9, help="per-sample correlation of steps")
    ap.add_argument("--centre-sd", type=float, default=0.3, help="SD of class centres")
    ap.add_argument(
        "--shifts",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[0.1, 0.25, 0.5, 1.0],
        help="planted shifts in per-sample SD, comma-separated (the power curve)",
    )
    ap.add_argument("--alpha", type=float, default=4.0, help="steering strength")
    ap.add_argument("--probe-iter", type=int, default=100, help="L-BFGS iterations per probe")
    ap.add_argument("--families", default="geometry,probes,sensitivity")
    ap.add_argument("--quick", action="store_true",
                    help="40 simulations, 100 resamples, shifts 0.25,0.5,1 (minutes)")  # fmt: skip
    ap.add_argument("--out", default=None, help="also write the per-simulation records (CSV)")
    args = ap.parse_args()
    if args.quick:
        args.n_sim, args.n_boot, args.shifts = 40, 100, [0.25, 0.5, 1.0]
    torch.set_num_threads(1)
    started = time.time()
    records = run(args)
    if args.out:
        records.to_csv(args.out, index=False)
    print(
        f"\n{args.n_per} samples x {len(LABELS)} labels, {args.n_prompts} prompts, d={args.d}, "
        f"rho={args.rho}, centre_sd={args.centre_sd}, shifts={args.shifts} SD, "
        f"n_boot={args.n_boot}, {time.time() - started:.0f} s"
    )
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table(records).to_string(index=False))


if __name__ == "__main__":
    main()
