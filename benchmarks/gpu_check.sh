#!/usr/bin/env bash
# GPU check (issue 15), under 5 minutes on one GPU: a bf16 fine-tune of gemma-3-270m for 200
# steps, `emolens analyze --dtype bfloat16` on its series, the same series in float32, and the
# max difference of Figure 2 (final-layer diagonal of sensitivity.csv, mean over prompts)
# between the two. Prints wall times and peak GPU memory of each part.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_MODEL=tiny-random GPU_CHECK_STEPS=4 DEVICE=cpu bash benchmarks/gpu_check.sh
#                                                      # dry run of every part on the CPU
# Environment: GPU_CHECK_MODEL (gemma-3-270m), GPU_CHECK_STEPS (200), DEVICE (cuda),
# GPU_CHECK_OUT (a fresh temp folder), PYTHON (python), EMOLENS_CACHE (emolens' default).
set -euo pipefail

MODEL=${GPU_CHECK_MODEL:-gemma-3-270m}
STEPS=${GPU_CHECK_STEPS:-200}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t emolens-gpu-check-XXXX)}
SAVE=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
if [ "$DEVICE" = cpu ]; then export CUDA_VISIBLE_DEVICES=""; fi  # the Trainer picks the GPU
mkdir -p "$OUT"
echo "gpu_check | model $MODEL, $STEPS steps (checkpoint every $SAVE), device $DEVICE, out $OUT"

# One part in-process, so that torch.cuda.max_memory_allocated covers it.
part() {  # part NAME -- emolens CLI arguments...
  local name=$1; shift 2
  "$PYTHON" - "$name" "$DEVICE" "$@" <<'EOF'
import sys, time
import torch
from emolens.cli import main

name, device, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
code = main(argv)
wall = time.perf_counter() - start
peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak GPU memory allocated"
        if device == "cuda" and torch.cuda.is_available() else "no GPU memory (CPU run)")
print(f"gpu_check | {name}: {wall:.1f} s wall, {peak}, exit {code}", flush=True)
sys.exit(code)
EOF
}

ANALYZE=(--layers -1 --steer-layers -1 --filter-mode none --n-boot 50 --dla-per-label 0
         --device "$DEVICE")
part "finetune (bf16 mixed precision on a GPU)" -- finetune --model "$MODEL" --out "$OUT/run" \
  --max-steps "$STEPS" --save-steps "$SAVE"
part "analyze --dtype bfloat16" -- analyze --model "$OUT/run" --out "$OUT/bf16" \
  --dtype bfloat16 "${ANALYZE[@]}"
part "analyze --dtype float32" -- analyze --model "$OUT/run" --out "$OUT/f32" \
  --dtype float32 "${ANALYZE[@]}"

"$PYTHON" - "$OUT/bf16" "$OUT/f32" <<'EOF'
import sys
import pandas as pd

def figure2(folder):
    """Figure 2: final-layer own-label logit change, mean over prompts, per (step, emotion,
    alpha)."""
    t = pd.read_csv(f"{folder}/sensitivity.csv")
    t = t[(t.steered_emotion == t.observed_label) & (t.layer == t.layer.max())]
    return t.groupby(["step", "steered_emotion", "alpha"])["logit_change"].mean()

bf16, f32 = figure2(sys.argv[1]), figure2(sys.argv[2])
if not bf16.index.equals(f32.index) or bf16.empty:
    sys.exit("gpu_check | the bf16 and float32 Figure 2 tables do not cover the same cells")
diff = (bf16 - f32).abs()
worst = diff.idxmax()
step, emotion, alpha = worst
print(f"gpu_check | Figure 2 bf16 vs float32: max abs diff {diff.max():.4f} at step {step}, "
      f"{emotion}, alpha {alpha:g} "
      f"(float32 value {f32[worst]:.4f}); mean abs diff {diff.mean():.4f}; "
      f"float32 values span {f32.min():.3f}..{f32.max():.3f}; {len(diff)} cells, "
      f"steps {sorted(set(bf16.index.get_level_values('step')))}")
EOF
