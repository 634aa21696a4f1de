# Sourced by run_gpu.sh and gpu_next.sh: the environment of a lent NVIDIA machine with JAX, flax, optax, orbax and
# PyTorch installed but no network; the missing wheels (nibabel, grain, array_record, portpicker; cp312) travel in
# .whl/. Sets OUT (default /tmp/jaxtl-gpu), PYTHONPATH and JAXTL_GIT_COMMIT.
OUT=${OUT:-/tmp/jaxtl-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
export JAXTL_GIT_COMMIT=${JAXTL_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
