"""Compile `jaxtl.first_block`'s Triton kernels to PTX and SASS for an NVIDIA GPU on a
machine without one.

Pallas lowers the kernels to Triton IR when the jitted function is exported for CUDA (no GPU needed); this script
captures that IR (pallas_call's debug print), compiles it with the standalone `triton` package (`pip install
triton`, not a jaxtl dependency) for the given compute capability and reports per kernel and tuning: shared memory,
tensor-core instructions (Ampere-style mma.sync or Hopper wgmma), global loads per thread, and registers and
spill bytes (Triton's ptxas, `-v`). It catches kernels Triton rejects, and register spills, before a GPU is lent;
it says nothing about speed (XLA compiles the IR with its own Triton build on the GPU).

Usage: python benchmarks/triton_ptx.py [--capability 90] [--dtype bfloat16,float32] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export

from jaxtl import first_block as fb


def _capture(module, fns) -> dict[str, str]:
    """Export each (jitted function, arguments) for CUDA with `module.DEBUG` on and return the Triton IR that
    pallas_call prints (locations stripped), by kernel name."""
    module.DEBUG, out = True, io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            for f, args in fns:
                export.export(f, platforms=["cuda"], disabled_checks=[
                    export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        module.DEBUG = False
    modules = {}
    for part in out.getvalue().split("The Triton module")[1:]:
        text = part[part.index("\n") + 1:]
        text = text[:text.index("\n}") + 2]
        text = re.sub(r"^#loc.*\n", "", text, flags=re.M)
        text = re.sub(r' "[^"\n]*"\(#loc\d*\)| \[unknown\]| loc\([^\n]*\)$| #loc\d*', "", text, flags=re.M)
        modules[re.search(r"module @(\w+)", text).group(1)] = text
    return modules


def triton_modules(dtype, shape=(8, 160, 192, 160), channels=32, **tuning) -> dict[str, str]:
    """The Triton IR (textual MLIR, locations stripped) of the kernels an export to CUDA lowers, by kernel name:
    `first_block` (eval) and `first_block_train`'s forward and gradient kernels."""
    x = jax.ShapeDtypeStruct((*shape, 1), dtype)
    k = jax.ShapeDtypeStruct((3, 3, 3, 1, channels), jnp.float32)
    v = jax.ShapeDtypeStruct((channels,), jnp.float32)

    def train_loss(k, b, s, beta, x):
        out, mean, var = fb.first_block_train(x, k, b, s, beta, interpret=False, **tuning)
        return out.astype(jnp.float32).sum() + mean.sum() + var.sum()

    fns = [(jax.jit(lambda *a: fb.first_block(*a, interpret=False, **tuning)), (x, k, v, v, v)),
           (jax.jit(jax.grad(train_loss, argnums=(0, 1, 2, 3))), (k, v, v, v, x))]
    return _capture(fb, fns)


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
            for kernel_name, ir in triton_modules(jnp.dtype(dtype), **tuning).items():
                name = f"{kernel_name}-{dtype}-" + "-".join(f"{k}{int(v)}" for k, v in tuning.items())
                path = out / f"{name}.ttir"
                path.write_text(ir)
                for warps in (4, 8):
                    compile_one(triton, GPUTarget, path, warps, args.capability)


def _usage(ptx_path: Path, capability: int) -> tuple[int | None, int | None, str]:
    """(registers per thread, spill-store bytes, ptxas' message) from the ptxas Triton itself uses (`ptxas -v`):
    spills are decided there, after the PTX is written."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    info = subprocess.run([get_ptxas(capability).path, f"-arch={arch}", "-v", str(ptx_path), "-o", os.devnull],
                          capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None, info


def compile_one(triton, target, path: Path, warps: int, capability: int, stages: int = 2) -> dict:
    """Compile one .ttir, print its line and return its numbers (`status` "ok", or why not)."""
    name = f"{path.stem} warps={warps}" + (f" stages={stages}" if stages != 2 else "")
    try:
        kernel = triton.compile(str(path), target=target("cuda", capability, 32),
                                options={"num_warps": warps, "num_stages": stages})
    except Exception as e:  # noqa: BLE001
        print(f"{name}: FAILED {str(e)[:300]}")
        return dict(status="FAILED " + " ".join(str(e).split())[:80])
    ptx = kernel.asm["ptx"]
    ptx_path = path.with_name(f"{path.stem}-w{warps}" + (f"-s{stages}" if stages != 2 else "") + ".ptx")
    ptx_path.write_text(ptx)
    regs, spills, info = _usage(ptx_path, capability)
    usage = (f"ptxas: {info.strip()[-200:]}" if regs is None
             else f"{regs} registers, {'?' if spills is None else spills} B spilled")
    print(f"{name}: shared {kernel.metadata.shared} B, "
          f"mma.sync {ptx.count('mma.sync')}, wgmma {ptx.count('wgmma.mma_async')}, "
          f"ld.global {len(re.findall(r'ld[.]global', ptx))}, {usage}", flush=True)
    result = dict(shared=kernel.metadata.shared, mma=ptx.count("mma.sync"), wgmma=ptx.count("wgmma.mma_async"),
                  status="ok" if regs is not None else "ptxas failed")
    if regs is not None:
        result.update(regs=regs, spill=-1 if spills is None else spills)
    return result


if __name__ == "__main__":
    main()
