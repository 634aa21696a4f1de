#!/usr/bin/env bash
# What issues #7 and #8 still need measured on a GPU, prepared without one, most important first. Stages:
#   first_block  gpu_first_block.py blocks: the fused Pallas first block (jaxtl.first_block, eval and train mode) in
#                each tuning beside the XLA path's block and PyTorch's (records -> $OUT/first_block.jsonl)     <= 4 min
#   first_block_network  gpu_first_block.py network: Peng's embed and train step at 1mm with `conv_impl="pallas"` and
#                the fastest tunings of the records above, beside PyTorch (-> $OUT/first_block.jsonl)          <= 5 min
#   blocks       gpu_blocks.py: each conv block alone (conv / eval / train), XLA path beside PyTorch, with its roofline
#                bound (records -> $OUT/blocks.jsonl)                                                      <= 2 min
#   profile      `jaxtl bench --profile`, Peng 1mm bfloat16 batch 8, embed and train: the kernels that take the time
#                ($OUT/profile.jsonl `profile_top`, Perfetto traces in $OUT/profile/)                       <= 2 min
#   variants     gpu_variants.py, train step bfloat16: reshape max-pool, space-to-depth and 27-FMA first layers
#                (`pool`, `pool+s2d`, `pool+direct`; records -> $OUT/variants.jsonl)                       <= 2.5 min
#   train        the train step of the transfer and demo configs (timed out compiling in the first GPU run)  <= 1.5 min
#   demo         `jaxtl demo` end to end (#8's "works when a GPU is present"), own empty JAXTL_HOME, if >= 200 s left
# One device call runs at most 10 minutes: STAGES picks (default: first_block first_block_network, <= 9 min; with
# device time left, STAGES="blocks profile" in a second call, then "variants train demo").
# Setup: benchmarks/gpu_env.sh (the machine's JAX/flax/optax/orbax/PyTorch, the other wheels from .whl/).
# Usage: OUT=dir [STAGES="..."] bash benchmarks/gpu_next.sh   (inspect $OUT/log; commit the .jsonl records)
set -u
source benchmarks/gpu_env.sh
STAGES=${STAGES:-first_block first_block_network}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log"
start=$SECONDS
stage() { echo "== $1 (t=$((SECONDS - start)) s)" | tee -a "$OUT/log"; }

first_block() {
  timeout 240 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" blocks eval,train bfloat16,float32 8 \
    20 2>&1 | tee -a "$OUT/log"
}
first_block_network() {
  timeout 300 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" network eval,train bfloat16,float32 8 \
    20 2>&1 | tee -a "$OUT/log"
}
blocks() {
  timeout 120 python3 benchmarks/gpu_blocks.py "$OUT/blocks.jsonl" bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
}
profile() {
  timeout 110 python3 -m jaxtl.cli bench --out "$OUT/profile.jsonl" --warmup 2 --repeats 3 --suite embed,train \
    --configs peng --resolution 1 --dtype bfloat16 --batch 8 --profile "$OUT/profile" 2>&1 | tee -a "$OUT/log"
  find "$OUT/profile" -name "*.xplane.pb" -delete 2>/dev/null  # keep the Perfetto traces only (smaller)
}
variants() {
  timeout 150 python3 benchmarks/gpu_variants.py "$OUT/variants.jsonl" pool,pool+s2d,pool+direct bfloat16 train 8 \
    2>&1 | tee -a "$OUT/log"
}
train() {
  timeout 90 python3 -m jaxtl.cli bench --out "$OUT/gpu.jsonl" --warmup 3 --repeats 20 --suite train \
    --configs transfer,demo --resolution 1 --dtype float32 --batch 8 --note "lent GPU machine, nothing else running" \
    2>&1 | tee -a "$OUT/log"
}
demo() {
  local left=$((570 - (SECONDS - start)))
  if [ "$left" -ge 200 ]; then
    JAXTL_HOME="$OUT/jaxtl_home" timeout "$left" python3 -m jaxtl.cli demo --out "$OUT/demo" 2>&1 | tail -60 \
      | tee -a "$OUT/log"
  else
    echo "skipped: only $left s left" | tee -a "$OUT/log"
  fi
}

for s in $STAGES; do
  stage "$s"
  "$s"
done
stage done
