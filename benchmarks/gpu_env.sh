# Sourced by run_gpu.sh and gpu_next.sh: the environment of a lent NVIDIA machine with JAX, flax, optax, orbax and
# PyTorch installed but no network; the missing wheels (nibabel, grain, array_record, portpicker, nilearn; cp312)
# travel in .whl/ (benchmarks/gpu_wheels.sh fetches them; name `.whl` in the device call's carry). The copy of the
# tree there has no .git: pass the commit measured as JAXTL_GIT_COMMIT (`git rev-parse HEAD` of a clean tree here).
# Sets OUT (default /tmp/jaxtl-gpu), PYTHONPATH and JAXTL_GIT_COMMIT; exits when something is missing.
OUT=${OUT:-/tmp/jaxtl-gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
export JAXTL_GIT_COMMIT=${JAXTL_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null)}
if [ -z "$JAXTL_GIT_COMMIT" ]; then
  echo "gpu_env.sh: no git here: pass JAXTL_GIT_COMMIT=<git rev-parse HEAD of the tree sent> (records need it)" >&2
  exit 1
fi
python3 -c "import grain, nibabel; from nilearn.datasets import load_mni152_template" || {
  echo "gpu_env.sh: grain/nibabel/nilearn missing: run benchmarks/gpu_wheels.sh here and carry .whl" >&2
  exit 1
}
