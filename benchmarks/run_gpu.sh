#!/usr/bin/env bash
# The GPU benchmark run as made on a lent NVIDIA machine with JAX, flax, optax, orbax and PyTorch installed but
# no network: the missing wheels (nibabel, grain, array_record, portpicker; cp312) travel in .whl/.
# Usage: OUT=dir bash benchmarks/run_gpu.sh   -> $OUT/gpu.jsonl, $OUT/log
set -u
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import jax, flax, optax, orbax.checkpoint, grain, nibabel, torch, jaxtl
print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())" || exit 1
bench() { timeout "$1" python3 -m jaxtl.cli bench --out "$OUT/gpu.jsonl" --warmup 3 --repeats 20 \
  --note "lent GPU machine, nothing else running" "${@:2}"; }
bench 180 --suite embed,train --configs peng --resolution 1 --dtype bfloat16,float32 --batch 8
bench 60 --suite embed --configs peng --resolution 1 --dtype bfloat16 --batch 32
bench 100 --suite embed,train --configs transfer,demo --resolution 1 --dtype bfloat16,float32 --batch 8
bench 50 --suite train --configs peng --resolution 1 --dtype bfloat16 --batch 16
