#!/usr/bin/env bash
# What issue #7 still needs measured on a GPU, prepared without one, most important first. Measured
# (benchmarks/README.md): H200 2026-11-27 first_block, first_block_network, blocks, profile (of the XLA path then),
# train; H200 2026-11-27 (second lease) nhwc, fused (lost: the kernel is gone), transfer, profile, conv_fusion, batch
# sweeps; H100 2026-11-28 batches_bf16, default, batches_f32, profile, transfer (35.5% of the bf16 peak at batch 64;
# the per-jit channels-last option gives what the flag gave). The default stages now:
#   transfer     gpu_transfer.py: host-to-device copies, jaxtl.embed() over 64 in-memory volumes, and a sequence of
#                jaxtl.embed() calls timed apart (`embed_calls`: on the H100 the first call on a new volume count
#                ran at 84-94 vol/s, the same call repeated at 569-874; where the time goes: copies, waits for
#                features, and a profiler trace of that first call, $OUT/embed-first-call.trace.json.gz)
#                (-> $OUT/transfer.jsonl)                                                                  <= 2 min
#   batches_bf16 embed at batch 16, 32, 64 in bfloat16, the default path: on an H200 (39.1% of the bf16 peak at
#                batch 64 with the XLA flag, not yet with the per-jit option) the 40% target is closest
#                (-> $OUT/nhwc.jsonl)                                       <= 3 min; runs past the call's limit skipped
#   default      Peng 1mm bfloat16 embed + train step, batch 8, beside PyTorch, then with
#                XLA_FLAGS=--xla_gpu_force_conv_nhwc=false (the per-jit option off) (-> $OUT/nhwc.jsonl)  <= 3.5 min
#   profile      `jaxtl bench --profile`, Peng 1mm bfloat16 batch 8, embed and train, the default path: the kernels
#                that take the time ($OUT/profile.jsonl `profile_top`, Perfetto traces $OUT/profile-<case>.json.gz)
#                                                                                                           <= 2 min
#   batches_f32  embed at batch 8, 32, 64 in float32: last, each run only while it fits in the call       <= 3 min
#   (`batches`: both dtypes' sweeps in one stage)
#   conv_fusion  (not a default) --xla_gpu_experimental_enable_conv_fusion=true: 1613 vs 1581 vol/s, no gain
#   compiled     (not a default; first after `default` when there is time) Peng 1mm embed bfloat16 and float32,
#                batch 8, beside PyTorch through torch.compile (channels-last): on the Zen 4 CPU compiled PyTorch's
#                float32 embed was 1.33x its eager speed (jaxtl 0.86x of it); on the H200 eager PyTorch's first
#                block was most of its step, so the ratios may move most there (-> $OUT/nhwc.jsonl)   <= 3 min
# Kept: first_block, first_block_network (gpu_first_block.py: the fused block's tunings, then the network with the
# fastest), blocks (gpu_blocks.py: each block alone beside PyTorch), variants, train (transfer + demo configs), demo.
# One device call runs at most 10 minutes and a session has about 15 minutes of device time, machine start
# included: the default stages (about 9 min on the H100 by its stage times, float32 batch 64 likely skipped; a
# stage whose worst case, its timeouts, would run past the call's 575 s ($LIMIT) is skipped, `WORST`; batches checks
# each run) are the one call to make. Only if `status` still shows time on a warm machine: STAGES="blocks" or "train demo".
# What comes back: at most 8 files, no deeper than $OUT/a/b/ (the device tool's limits); every stage writes 1-3.
# Setup: benchmarks/gpu_env.sh (the machine's JAX/flax/optax/orbax/PyTorch, the other wheels from .whl/, which
# benchmarks/gpu_wheels.sh fetches). Usage, from a clean commit (the device copy may carry an older .git, 2026-11-28:
# JAXTL_GIT_COMMIT, the commit sent, wins over it in the records):
#   run(command="JAXTL_GIT_COMMIT=<sha> OUT=$OUT bash benchmarks/gpu_next.sh", carry=[".whl"], timeout_s=590)
#   [STAGES="..."]; inspect $OUT/log; commit the `jaxtl bench` records (nhwc.jsonl, profile.jsonl, gpu.jsonl,
#   first_block_network.jsonl) to benchmarks/results/<hardware id>.jsonl, the others beside the scripts
set -u
start=$SECONDS  # the call's clock: setup (pip install of the wheels) counts too
LIMIT=${LIMIT:-575}  # s of the call the stages may use (the device call's 590 less time for a killed run to exit)
source benchmarks/gpu_env.sh
STAGES=${STAGES:-transfer batches_bf16 default profile batches_f32}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/log"
# each stage's worst case (its timeouts), s: a stage that could run past $LIMIT is skipped
declare -A WORST=([default]=210 [compiled]=170 [batches]=70 [batches_bf16]=70 [batches_f32]=70 [transfer]=120 [profile]=110 [conv_fusion]=90 [first_block]=240
                  [first_block_network]=300 [blocks]=120 [variants]=150 [train]=90 [demo]=200)
stage() { echo "== $1 (t=$((SECONDS - start)) s)" | tee -a "$OUT/log"; }
rc() {  # $1: a run's exit status (call right after its pipeline, with "${PIPESTATUS[0]}"): logged unless 0
  [ "$1" = 0 ] || echo "  exit status $1$([ "$1" = 124 ] && echo ': killed at its time limit')" | tee -a "$OUT/log"
}

first_block() {
  timeout -k 5 240 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" blocks eval,train \
    bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
  rc "${PIPESTATUS[0]}"
}
first_block_network() {  # reads $OUT/first_block.jsonl, writes $OUT/first_block_network.jsonl
  timeout -k 5 300 python3 benchmarks/gpu_first_block.py "$OUT/first_block.jsonl" network eval,train \
    bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
  rc "${PIPESTATUS[0]}"
}
bench_flags() {  # $1: XLA_FLAGS ("" for none), $2: timeout; the rest: more `jaxtl bench` arguments; Peng 1mm
  local flags=$1 limit=$2
  shift 2
  XLA_FLAGS="$flags" timeout -k 5 "$limit" python3 -m jaxtl.cli bench --out "$OUT/nhwc.jsonl" --warmup 3 \
    --repeats 20 --configs peng --resolution 1 --note "gpu_next.sh: XLA_FLAGS='$flags'" "$@" 2>&1 \
    | grep --line-buffered -v "Delay kernel" | tee -a "$OUT/log"
  rc "${PIPESTATUS[0]}"
}
default() {  # an embed + train run without PyTorch took about 60 s in the last lease
  bench_flags "" 120 --suite embed,train --dtype bfloat16 --batch 8
  bench_flags "--xla_gpu_force_conv_nhwc=false" 90 --suite embed,train --dtype bfloat16 --batch 8 --no-torch
}
batches() {  # $@: dtypes (default both); each run only if its limit fits in the call; bf16 batch 64 took 68 s
  local dtype b limit
  for dtype in ${@:-bfloat16 float32}; do
    for b in $([ $dtype = bfloat16 ] && echo 16 || echo 8) 32 64; do
      limit=$((b == 64 ? 120 : 70))
      if [ $((SECONDS - start + limit)) -gt "$LIMIT" ]; then
        echo "batch $b $dtype skipped: its limit ($limit s) would run past the call's" | tee -a "$OUT/log"
        continue
      fi
      bench_flags "" $limit --suite embed --dtype $dtype --batch $b --no-torch
    done
  done
}
batches_bf16() { batches bfloat16; }  # the embed target's case first, float32 later in the call
batches_f32() { batches float32; }
compiled() {  # inductor compiles at the first call (timed apart); one memory format, so once per dtype
  bench_flags "" 170 --suite embed --dtype bfloat16,float32 --batch 8 --torch-compile --torch-format channels_last
}
conv_fusion() {
  bench_flags "--xla_gpu_experimental_enable_conv_fusion=true" 90 --suite embed,train --dtype bfloat16 --batch 8 \
    --no-torch
}
transfer() {  # + embed_calls: why the first jaxtl.embed() call on a new volume count was slow (H100, 2026-11-28)
  rm -rf /tmp/jaxtl-embed-trace
  timeout -k 5 120 python3 benchmarks/gpu_transfer.py "$OUT/transfer.jsonl" 8 64 10 /tmp/jaxtl-embed-trace 2>&1 \
    | grep --line-buffered -v "Delay kernel" | tee -a "$OUT/log"
  rc "${PIPESTATUS[0]}"
  f=$(find /tmp/jaxtl-embed-trace -name "*.trace.json.gz" 2>/dev/null | head -1)
  [ -n "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ] && cp "$f" "$OUT/embed-first-call.trace.json.gz"
}
blocks() {
  timeout -k 5 120 python3 benchmarks/gpu_blocks.py "$OUT/blocks.jsonl" bfloat16,float32 8 20 2>&1 | tee -a "$OUT/log"
  rc "${PIPESTATUS[0]}"
}
profile() {
  rm -rf /tmp/jaxtl-profile  # a warm machine may keep an earlier call's traces
  timeout -k 5 110 python3 -m jaxtl.cli bench --out "$OUT/profile.jsonl" --warmup 2 --repeats 3 --suite embed,train \
    --configs peng --resolution 1 --dtype bfloat16 --batch 8 --no-torch --stream 0 --profile /tmp/jaxtl-profile 2>&1 \
    | tee -a "$OUT/log"
  rc "${PIPESTATUS[0]}"
  for d in /tmp/jaxtl-profile/*/; do  # the Perfetto trace of each case, at the top of $OUT (nested ones stay there)
    f=$(find "$d" -name "perfetto_trace.json.gz" 2>/dev/null | head -1)
    [ -n "$f" ] && [ "$(stat -c %s "$f")" -lt 16000000 ] && cp "$f" "$OUT/profile-$(basename "$d").json.gz"
  done
}
variants() {
  timeout -k 5 150 python3 benchmarks/gpu_variants.py "$OUT/variants.jsonl" pool,pool+s2d,pool+direct bfloat16 train 8 \
    2>&1 | tee -a "$OUT/log"
}
train() {
  timeout -k 5 90 python3 -m jaxtl.cli bench --out "$OUT/gpu.jsonl" --warmup 3 --repeats 20 --suite train \
    --configs transfer,demo --resolution 1 --dtype float32 --batch 8 --note "lent GPU machine, nothing else running" \
    2>&1 | tee -a "$OUT/log"
}
demo() {
  local left=$((LIMIT - 5 - (SECONDS - start)))
  if [ "$left" -ge 200 ]; then
    JAXTL_HOME=/tmp/jaxtl-demo-home timeout -k 5 "$left" python3 -m jaxtl.cli demo --out /tmp/jaxtl-demo 2>&1 \
      | tail -60 | tee -a "$OUT/log"
    cp /tmp/jaxtl-demo/REPORT.md "$OUT/demo_REPORT.md" 2>/dev/null
  else
    echo "skipped: only $left s left" | tee -a "$OUT/log"
  fi
}

for s in $STAGES; do
  stage "$s"
  if [ $((SECONDS - start + ${WORST[$s]:-60})) -gt "$LIMIT" ]; then
    echo "skipped: its worst case (${WORST[$s]:-60} s) would run past the call's limit" | tee -a "$OUT/log"
    continue
  fi
  "$s"
done
stage done
