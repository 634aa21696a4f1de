"""Compile `jaxtl.first_block`'s (or `jaxtl.fused_block`'s) Triton kernels to PTX and SASS for an NVIDIA GPU on a
machine without one.

Pallas lowers the kernels to Triton IR when the jitted function is exported for CUDA (no GPU needed); this script
captures that IR (pallas_call's debug print), compiles it with the standalone `triton` package (`pip install
triton`, not a jaxtl dependency) for the given compute capability and reports per kernel and tuning: shared memory,
tensor-core instructions (Ampere-style mma.sync or Hopper wgmma), global loads per thread, and registers and
spill bytes (Triton's ptxas, `-v`). It catches kernels Triton rejects, and register spills, before a GPU is lent;
it says nothing about speed (XLA compiles the IR with its own Triton build on the GPU).

Usage: python benchmarks/triton_ptx.py [--kernel first_block|fused_block] [--capability 90] [--dtype bfloat16,float32]
[--out DIR]

`--kernel fused_block` compiles `sfcn_conv_block` (the later blocks' eval kernel; its gradient is XLA's) for Peng's
blocks 1-3 at 1mm (`--blocks`) over tile x block_n x block_k (capped by the padded channels, duplicates dropped) x
4/8 warps, `--stages` (default 2) Triton stages, and ends with a table per build and the spill-free builds.
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
from jaxtl import fused_block as cb

# Peng's SFCN at 1mm, batch 8: the later blocks' (input shape, output channels), by block number
FUSED_BLOCKS = {1: ((8, 80, 96, 80, 32), 64), 2: ((8, 40, 48, 40, 64), 128), 3: ((8, 20, 24, 20, 128), 256)}
FUSED_GRID = dict(tile=(32, 64, 128), block_n=(32, 64, 128), block_k=(16, 32, 64))


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


def fused_modules(dtype, shape=FUSED_BLOCKS[1][0], channels=FUSED_BLOCKS[1][1], **tuning) -> dict[str, str]:
    """The Triton IR of `jaxtl.fused_block.conv_block`'s kernel (`sfcn_conv_block`, eval) for an input `shape`
    (B, D, H, W, C_in) -> `channels` outputs; `tuning`: tile, block_n, block_k (num_warps and num_stages are
    compile options, not in the IR)."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    k = jax.ShapeDtypeStruct((3, 3, 3, shape[-1], channels), jnp.float32)
    v = jax.ShapeDtypeStruct((channels,), jnp.float32)
    return _capture(cb, [(jax.jit(lambda *a: cb.conv_block(*a, interpret=False, **tuning)), (x, k, v, v, v))])


def fused_tunings(cin: int, cout: int) -> list[dict]:
    """FUSED_GRID's tunings as the kernel runs them (block_n, block_k capped by the padded channels), no
    duplicates."""
    cap = dict(tile=1 << 30, block_n=cb._channels(cout), block_k=cb._channels(cin))
    seen = {tuple(min(v, cap[k]) for k, v in zip(FUSED_GRID, values, strict=True))
            for values in itertools.product(*FUSED_GRID.values())}
    return [dict(zip(FUSED_GRID, values, strict=True)) for values in sorted(seen)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capability", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--out", default=None, help="keep the .ttir and .ptx files here")
    p.add_argument("--kernel", choices=("first_block", "fused_block"), default="first_block",
                   help="jaxtl.first_block's kernels (default) or jaxtl.fused_block's sfcn_conv_block")
    p.add_argument("--blocks", default="1,2,3", help="fused_block: Peng's blocks (1mm, batch 8) to compile")
    p.add_argument("--stages", type=int, default=2, help="fused_block: Triton's num_stages (default 2)")
    args = p.parse_args()
    import triton
    from triton.backends.compiler import GPUTarget

    out = Path(args.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__}, sm_{args.capability}, files in {out}")
    if args.kernel == "fused_block":
        fused_main(triton, GPUTarget, args, out)
        return
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


def fused_main(triton, target, args, out: Path) -> None:
    """Compile sfcn_conv_block for the chosen blocks, dtypes and FUSED_GRID x 4/8 warps; print a line per build,
    then the table (`summarize`)."""
    rows = []
    for block in (int(b) for b in args.blocks.split(",")):
        shape, cout = FUSED_BLOCKS[block]
        for dtype in args.dtype.split(","):
            for tuning in fused_tunings(shape[-1], cout):
                ir = fused_modules(jnp.dtype(dtype), shape, cout, **tuning)
                for kernel_name, text in ir.items():
                    name = (f"{kernel_name}-b{block}-{dtype}-"
                            + "-".join(f"{k}{v}" for k, v in tuning.items()))
                    path = out / f"{name}.ttir"
                    path.write_text(text)
                    for warps in (4, 8):
                        r = compile_one(triton, target, path, warps, args.capability, args.stages)
                        rows.append(dict(block=block, dtype=dtype, **tuning, warps=warps, **r))
    summarize(rows, args.capability, args.stages)


# shared memory a block may opt into, by compute capability (CUDA's tables): a build over it compiles but its
# launch fails ("out of resources")
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def summarize(rows: list[dict], capability: int, stages: int) -> None:
    """A table with a row per tuning and a column per block and dtype, then the tunings clean in every column."""
    limit = MAX_SHARED.get(capability)
    for r in rows:
        if r["status"] == "ok" and limit and r["shared"] > limit:
            r["status"] = "shared memory over the limit"
    cols = list(dict.fromkeys((r["block"], r["dtype"]) for r in rows))
    keys = sorted({(r["tile"], r["block_n"], r["block_k"], r["warps"]) for r in rows})
    built = {(r["block"], r["dtype"], r["tile"], r["block_n"], r["block_k"], r["warps"]): r for r in rows}

    def at(col, key):  # the build a tuning runs as: block_n, block_k capped by the block's padded channels
        (cin, cout), (tile, bn, bk, warps) = (FUSED_BLOCKS[col[0]][0][-1], FUSED_BLOCKS[col[0]][1]), key
        return built.get((*col, tile, min(bn, cb._channels(cout)), min(bk, cb._channels(cin)), warps))


    def cell(r):
        if r is None:
            return "."
        if r["status"] not in ("ok", "shared memory over the limit"):
            return "FAIL"
        tc = "w" if r["wgmma"] else "m" if r["mma"] else "-"
        text = f"{r['regs']}{tc}" + (f"+{r['spill']}" if r["spill"] else "")
        return text + (f"/{r['shared'] // 1024}K" if r["shared"] > 96 * 1024 else "") + (
            "!" if r["status"] != "ok" else "")

    print(f"\nsfcn_conv_block, sm_{capability}, num_stages {stages}: registers per thread, tensor-core instruction "
          "(w wgmma, m mma.sync, - none), +spill-store bytes, /shared memory when over 96 KB, ! over the "
          f"{limit and limit // 1024} KB a block may use (compiles, launch fails), FAIL: no build, . not built")
    short = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}
    head = "tile  bn  bk  w " + "".join(f"{f'block {b} {short.get(d, d)}':>16}" for b, d in cols)
    print(head)
    for key in keys:
        print("{:>4} {:>3} {:>3} {:>2} ".format(*key) + "".join(f"{cell(at(c, key)):>16}" for c in cols))
    clean = [r for r in rows if r["status"] == "ok" and r["spill"] == 0]
    print(f"{len(rows)} builds: {len(clean)} clean (spill-free, within shared memory), "
          f"{sum(1 for r in rows if r.get('spill'))} spill, "
          f"{sum(1 for r in rows if r['status'] == 'shared memory over the limit')} over the shared memory limit, "
          f"{sum(1 for r in rows if r['status'] not in ('ok', 'shared memory over the limit'))} fail to build")
    ok = {key: max(at(c, key)["regs"] for c in cols) for key in keys
          if all((r := at(c, key)) is not None and r["status"] == "ok" and r["spill"] == 0 for c in cols)}
    print("clean in every column, fewest registers first (tile, block_n, block_k, warps: most registers):")
    for key in sorted(ok, key=lambda k: (ok[k], -k[0] * k[1])):
        print(f"  {key}: {ok[key]}")


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
