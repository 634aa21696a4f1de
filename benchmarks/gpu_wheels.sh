#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels a lent GPU machine lacks (its image has JAX, flax, optax,
# orbax, PyTorch, scikit-learn, pandas, ... but no nibabel, grain, array_record, portpicker or nilearn; it reaches no
# index) into .whl/ (ignored by git: add `/.whl/` to .git/info/exclude), for CPython 3.12 on x86-64 Linux.
# Pass `.whl` in the device call's carry; benchmarks/gpu_env.sh installs them there.
set -eu
for spec in nibabel==5.4.2 grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 nilearn==0.14.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls .whl
