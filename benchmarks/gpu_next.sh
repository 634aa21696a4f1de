#!/usr/bin/env bash
# What issues #7 and #8 still need measured on a GPU, prepared without one, sized for one ~9-minute device call:
#   0. gpu_blocks.py: each conv block alone (conv / eval / train), jaxtl's XLA path beside PyTorch, with its roofline
#      bound: which block is far from its bound (records -> $OUT/blocks.jsonl)
#   1. a profile of Peng's SFCN at 1mm, bfloat16, batch 8, embed and train (`jaxtl bench --profile`): the kernels
#      that take the time, in $OUT/profile.jsonl (profile_top) and Perfetto traces in $OUT/profile/
#   2. gpu_variants.py: the reshape max-pool, the space-to-depth first layer and the first layer as 27 fused
#      multiply-adds (`pool`, `pool+s2d`, `pool+direct`), Peng 1mm, embed then train, bfloat16 and float32,
#      batch 8 (records -> $OUT/variants.jsonl)
#   3. the train step for the transfer and demo configs (timed out while compiling in the first GPU run)
#   4. `jaxtl demo` end to end on the GPU (#8's "works when a GPU is present"), with its own empty JAXTL_HOME,
#      when at least 200 s of the ~9.5 minutes are left
# Setup: benchmarks/gpu_env.sh (the machine's JAX/flax/optax/orbax/PyTorch, the other wheels from .whl/).
# Usage: OUT=dir bash benchmarks/gpu_next.sh   (inspect $OUT/log; commit the .jsonl records and the demo report)
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log"
start=$SECONDS
stage() { echo "== $1 (t=$((SECONDS - start)) s)" | tee -a "$OUT/log"; }
stage blocks
timeout 120 python3 benchmarks/gpu_blocks.py "$OUT/blocks.jsonl" bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
stage profile
timeout 110 python3 -m jaxtl.cli bench --out "$OUT/profile.jsonl" --warmup 2 --repeats 3 --suite embed,train \
  --configs peng --resolution 1 --dtype bfloat16 --batch 8 --profile "$OUT/profile" 2>&1 | tee -a "$OUT/log"
find "$OUT/profile" -name "*.xplane.pb" -delete 2>/dev/null  # keep the Perfetto traces only (smaller)
stage variants
timeout 200 python3 benchmarks/gpu_variants.py "$OUT/variants.jsonl" pool,pool+s2d,pool+direct bfloat16,float32 \
  embed,train 8 2>&1 | tee -a "$OUT/log"
stage "train transfer,demo"
timeout 80 python3 -m jaxtl.cli bench --out "$OUT/gpu.jsonl" --warmup 3 --repeats 20 --suite train \
  --configs transfer,demo --resolution 1 --dtype float32 --batch 8 --note "lent GPU machine, nothing else running" \
  2>&1 | tee -a "$OUT/log"
stage demo
left=$((570 - (SECONDS - start)))
if [ "$left" -ge 200 ]; then
  JAXTL_HOME="$OUT/jaxtl_home" timeout "$left" python3 -m jaxtl.cli demo --out "$OUT/demo" 2>&1 | tail -60 \
    | tee -a "$OUT/log"
else
  echo "skipped: only $left s left" | tee -a "$OUT/log"
fi
stage done
