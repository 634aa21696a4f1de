#!/usr/bin/env bash
# What issue #7 still needs measured on a GPU, prepared without one, most important first. Measured 2026-11-27 on
# an H200 (benchmarks/README.md): first_block, first_block_network, blocks, profile (of the XLA path then) and train.
# The default stages now:
#   nhwc         Peng 1mm bfloat16 embed + train step (conv_impl auto: the fused first block on Hopper), without and
#                with XLA_FLAGS=--xla_gpu_force_conv_nhwc=true: on Hopper XLA lays out every 3-D convolution NCDHW
#                and cuDNN transposes around its channels-last kernels (1.9 of the embed step's 4 ms in blocks 1-5,
#                the 2026-11-27 XLA-path profile) (records -> $OUT/nhwc.jsonl)                               <= 3 min
#   fused        gpu_fused_block.py: Peng's blocks 1-3 in eval mode as one Pallas kernel each (`jaxtl.fused_block`,
#                experimental, off by default) in 10 tunings beside the XLA block, bfloat16, then the 1mm embed with
#                them and the fused first block beside PyTorch (-> $OUT/fused_block.jsonl,
#                $OUT/fused_block_network.jsonl)                                                            <= 4.5 min
#   transfer     gpu_transfer.py: host-to-device copies of a float32 / bfloat16 batch, from threads, and
#                jaxtl.embed() over 64 in-memory volumes (the public API ran at 146 vol/s against the step's 1234),
#                also from float16 volumes (a cache's type, copied as such since 00cb72c) (-> $OUT/transfer.jsonl)
#                                                                                                           <= 2 min
#   profile      `jaxtl bench --profile`, Peng 1mm bfloat16 batch 8, embed and train, the default path: the kernels
#                that take the time ($OUT/profile.jsonl `profile_top`, Perfetto traces $OUT/profile-<case>.json.gz)
#                                                                                                           <= 2 min
#   conv_fusion  (not a default) as nhwc, with --xla_gpu_experimental_enable_conv_fusion=true (cuDNN graph
#                fusions, channels-last) (-> $OUT/nhwc.jsonl)                                  <= 1.5 min
# Kept: first_block, first_block_network (gpu_first_block.py: the fused block's tunings, then the network with the
# fastest), blocks (gpu_blocks.py: each block alone beside PyTorch), variants, train (transfer + demo configs), demo.
# One device call runs at most 10 minutes and a session has about 15 minutes of device time, machine start
# included: the default stages (nhwc fused transfer profile, about 7 min; a stage whose worst case, its timeouts,
# would run past the call's 585 s is skipped, `WORST`) are the one call to make. Only if `status`
# still shows time on a warm machine: STAGES="conv_fusion blocks" or "train demo".
# What comes back: at most 8 files, no deeper than $OUT/a/b/ (the device tool's limits); every stage writes 1-3.
# Setup: benchmarks/gpu_env.sh (the machine's JAX/flax/optax/orbax/PyTorch, the other wheels from .whl/, which
# benchmarks/gpu_wheels.sh fetches). Usage, from a clean commit (the device copy has no .git):
#   run(command="JAXTL_GIT_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_next.sh", carry=[".whl"], timeout_s=590)
#   [STAGES="..."]; inspect $OUT/log; commit the `jaxtl bench` records (nhwc.jsonl, profile.jsonl, gpu.jsonl,
#   first_block_network.jsonl, fused_block_network.jsonl) to benchmarks/results/<hardware id>.jsonl, the others
#   beside the scripts
set -u
start=$SECONDS  # the call's clock: setup (pip install of the wheels) counts too
source benchmarks/gpu_env.sh
STAGES=${STAGES:-nhwc fused transfer profile}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log"
# each stage's worst case (its timeouts), s: a stage that could run past the 590 s call is skipped
declare -A WORST=([nhwc]=180 [fused]=270 [transfer]=120 [profile]=110 [conv_fusion]=90 [first_block]=240
                  [first_block_network]=300 [blocks]=120 [variants]=150 [train]=90 [demo]=200)
stage() { echo "== $1 (t=$((SECONDS - start)) s)" | tee -a "$OUT/log"; }

first_block() {
  timeout 240 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" blocks eval,train bfloat16,float32 8 \
    20 2>&1 | tee -a "$OUT/log"
}
first_block_network() {  # reads $OUT/first_block.jsonl, writes $OUT/first_block_network.jsonl
  timeout 300 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" network eval,train bfloat16,float32 8 \
    20 2>&1 | tee -a "$OUT/log"
}
bench_flags() {  # $1: XLA_FLAGS ("" for none); Peng 1mm bfloat16 embed + train, the default conv_impl, no PyTorch
  XLA_FLAGS="$1" timeout 90 python3 -m jaxtl.cli bench --out "$OUT/nhwc.jsonl" --warmup 3 --repeats 20 \
    --suite embed,train --configs peng --resolution 1 --dtype bfloat16 --batch 8 --no-torch \
    --note "gpu_next.sh: XLA_FLAGS='$1'" 2>&1 | tee -a "$OUT/log"
}
nhwc() {
  bench_flags ""
  bench_flags "--xla_gpu_force_conv_nhwc=true"
}
conv_fusion() {
  bench_flags "--xla_gpu_experimental_enable_conv_fusion=true"
}
fused() {
  timeout 200 python3 benchmarks/gpu_fused_block.py "$OUT/fused_block.jsonl" blocks bfloat16 8 20 2>&1 \
    | tee -a "$OUT/log"
  timeout 70 python3 benchmarks/gpu_fused_block.py "$OUT/fused_block.jsonl" network bfloat16 8 20 2>&1 \
    | tee -a "$OUT/log"
}
transfer() {
  timeout 120 python3 benchmarks/gpu_transfer.py "$OUT/transfer.jsonl" 8 64 10 2>&1 | tee -a "$OUT/log"
}
blocks() {
  timeout 120 python3 benchmarks/gpu_blocks.py "$OUT/blocks.jsonl" bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
}
profile() {
  rm -rf /tmp/jaxtl-profile  # a warm machine may keep an earlier call's traces
  timeout 110 python3 -m jaxtl.cli bench --out "$OUT/profile.jsonl" --warmup 2 --repeats 3 --suite embed,train \
    --configs peng --resolution 1 --dtype bfloat16 --batch 8 --profile /tmp/jaxtl-profile 2>&1 | tee -a "$OUT/log"
  for d in /tmp/jaxtl-profile/*/; do  # the Perfetto trace of each case, at the top of $OUT (nested ones stay there)
    f=$(find "$d" -name "perfetto_trace.json.gz" 2>/dev/null | head -1)
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
  if [ $((SECONDS - start + ${WORST[$s]:-60})) -gt 585 ]; then
    echo "skipped: its worst case (${WORST[$s]:-60} s) would run past the call's limit" | tee -a "$OUT/log"
    continue
  fi
  "$s"
done
stage done
