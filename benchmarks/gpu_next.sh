#!/usr/bin/env bash
# What issue #7 still needs measured on a GPU, prepared without one, most important first. Stages:
#   first_block  gpu_first_block.py blocks: the fused Pallas first block (jaxtl.first_block, eval and train mode) in
#                each tuning beside the XLA path's block and PyTorch's (records -> $OUT/first_block.jsonl)     <= 4 min
#   first_block_network  gpu_first_block.py network: Peng's embed and train step at 1mm with `conv_impl="pallas"` and
#                the fastest tunings of those records, beside PyTorch (-> $OUT/first_block_network.jsonl)     <= 5 min
#   blocks       gpu_blocks.py: each conv block alone (conv / eval / train), XLA path beside PyTorch, with its roofline
#                bound (records -> $OUT/blocks.jsonl)                                                      <= 2 min
#   profile      `jaxtl bench --profile`, Peng 1mm bfloat16 batch 8, embed and train: the kernels that take the time
#                ($OUT/profile.jsonl `profile_top`, Perfetto traces $OUT/profile-<case>.json.gz)             <= 2 min
#   variants     gpu_variants.py, train step bfloat16: reshape max-pool, space-to-depth and 27-FMA first layers
#                (`pool`, `pool+s2d`, `pool+direct`; records -> $OUT/variants.jsonl)                       <= 2.5 min
#   train        the train step of the transfer and demo configs (timed out compiling in the first GPU run)  <= 1.5 min
#   demo         `jaxtl demo` end to end in /tmp, own empty JAXTL_HOME, if >= 200 s left ($OUT/demo_REPORT.md)
# One device call runs at most 10 minutes and a session has about 15 minutes of device time, machine start
# included: the default stages (first_block first_block_network, <= 9 min) are the one call to make. Only if
# `status` still shows time on a warm machine: STAGES="blocks profile", then "variants train demo".
# What comes back: at most 8 files, no deeper than $OUT/a/b/ (the device tool's limits); every stage writes 1-3.
# Setup: benchmarks/gpu_env.sh (the machine's JAX/flax/optax/orbax/PyTorch, the other wheels from .whl/, which
# benchmarks/gpu_wheels.sh fetches). Usage, from a clean commit (the device copy has no .git):
#   run(command="JAXTL_GIT_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_next.sh", carry=[".whl"], timeout_s=590)
#   [STAGES="..."]; inspect $OUT/log; commit the .jsonl records (first_block_network.jsonl holds `jaxtl bench`
#   records: append them to benchmarks/results/<hardware id>.jsonl; the block records stay beside the scripts)
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
first_block_network() {  # reads $OUT/first_block.jsonl, writes $OUT/first_block_network.jsonl
  timeout 300 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" network eval,train bfloat16,float32 8 \
    20 2>&1 | tee -a "$OUT/log"
}
blocks() {
  timeout 120 python3 benchmarks/gpu_blocks.py "$OUT/blocks.jsonl" bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
}
profile() {
  timeout 110 python3 -m jaxtl.cli bench --out "$OUT/profile.jsonl" --warmup 2 --repeats 3 --suite embed,train \
    --configs peng --resolution 1 --dtype bfloat16 --batch 8 --profile /tmp/jaxtl-profile 2>&1 | tee -a "$OUT/log"
  for d in /tmp/jaxtl-profile/*/; do  # the Perfetto trace of each case, at the top of $OUT (nested ones stay there)
    f=$(find "$d" -name "perfetto_trace.json.gz" | head -1)
    [ -n "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ] && cp "$f" "$OUT/profile-$(basename "$d").json.gz"
  done
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
    JAXTL_HOME=/tmp/jaxtl-demo-home timeout "$left" python3 -m jaxtl.cli demo --out /tmp/jaxtl-demo 2>&1 \
      | tail -60 | tee -a "$OUT/log"
    cp /tmp/jaxtl-demo/REPORT.md "$OUT/demo_REPORT.md" 2>/dev/null
  else
    echo "skipped: only $left s left" | tee -a "$OUT/log"
  fi
}

for s in $STAGES; do
  stage "$s"
  "$s"
done
stage done
