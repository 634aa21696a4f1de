"""Compile `jaxtl.first_block`'s Triton kernel to PTX for an NVIDIA GPU on a machine without one.

Pallas lowers the kernel to Triton IR when the jitted function is exported for CUDA (no GPU needed); this script
captures that IR (pallas_call's debug print) and compiles it with the standalone `triton` package (`pip install
triton`, not a jaxtl dependency) for the given compute capability, then reports per tuning: shared memory, tensor-core
instructions (Ampere-style mma.sync or Hopper wgmma), global loads per thread and whether registers spill. It
catches kernels Triton rejects before a GPU is lent; it says nothing about speed (XLA compiles the IR with its own
Triton build on the GPU).

Usage: python benchmarks/triton_ptx.py [--capability 90] [--dtype bfloat16,float32] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export

from jaxtl import first_block as fb


def triton_ir(dtype, shape=(8, 160, 192, 160), channels=32, **tuning) -> str:
    """The kernel's Triton IR (textual MLIR, locations stripped) for an export to CUDA."""
    x = jax.ShapeDtypeStruct((*shape, 1), dtype)
    k = jax.ShapeDtypeStruct((3, 3, 3, 1, channels), jnp.float32)
    v = jax.ShapeDtypeStruct((channels,), jnp.float32)
    f = jax.jit(lambda *a: fb.first_block(*a, interpret=False, **tuning))
    fb.DEBUG, out = True, io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            export.export(f, platforms=["cuda"], disabled_checks=[
                export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, k, v, v, v)
    finally:
        fb.DEBUG = False
    text = out.getvalue()
    text = text[text.index("\n", text.index("The Triton module")) + 1:]
    text = text[:text.index("\n}") + 2]
    text = re.sub(r"^#loc.*\n", "", text, flags=re.M)
    text = re.sub(r' "[^"\n]*"\(#loc\d*\)| \[unknown\]| loc\([^\n]*\)$| #loc\d*', "", text, flags=re.M)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capability", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--out", default=None, help="keep the .ttir and .ptx files here")
    args = p.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget

    out = Path(args.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, sm_{args.capability}, files in {out}")
    grid = dict(window=(False, True), voxel_major=(True, False), tile=(64, 128, 256))
    for dtype in args.dtype.split(","):
        for values in itertools.product(*grid.values()):
            tuning = dict(zip(grid, values, strict=True))
            name = f"{dtype}-" + "-".join(f"{k}{int(v)}" for k, v in tuning.items())
            path = out / f"{name}.ttir"
            path.write_text(triton_ir(jnp.dtype(dtype), **tuning))
            for warps in (4, 8):
                try:
                    kernel = triton.compile(str(path), target=GPUTarget("cuda", args.capability, 32),
                                            options={"num_warps": warps, "num_stages": 2})
                except Exception as e:  # noqa: BLE001
                    print(f"{name} warps={warps}: FAILED {str(e)[:300]}")
                    continue
                ptx = kernel.asm["ptx"]
                (out / f"{name}-w{warps}.ptx").write_text(ptx)
                print(f"{name} warps={warps}: shared {kernel.metadata.shared} B, "
                      f"mma.sync {ptx.count('mma.sync')}, wgmma {ptx.count('wgmma.mma_async')}, "
                      f"ld.global {len(re.findall(r'ld[.]global', ptx))}, spills {'yes' if '.local' in ptx else 'no'}")


if __name__ == "__main__":
    main()
