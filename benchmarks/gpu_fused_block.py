"""GPU experiment for issue #7: SFCN's later pooling blocks in eval mode as one Pallas kernel each
(`jaxtl.fused_block`, experimental, off by default) against the XLA path's block, then Peng's 1mm embed with them.

1. Stage `blocks`: for Peng's blocks 1-3 at 1mm (32 -> 64 at 80x96x80, 64 -> 128 at 40x48x40, 128 -> 256 at
   20x24x20), batch B, each dtype: the XLA block (`ConvBlock(conv_impl="xla")`, eval) and the kernel in each tuning
   of the grid, each checked against the XLA block in float32 at full precision (largest difference relative to
   the largest value; correct within 3x the XLA block's own difference) and timed interleaved. One record per
   (block, dtype) -> OUT.jsonl ("kind": "fused_block").
2. Stage `network`: `fused_block.ENABLED` with `fused_block.TUNING` set to the fastest correct tuning on block 1
   (the largest; the module's default where there is none): `jaxtl bench`'s embed case for Peng's SFCN at 1mm,
   batch B, `conv_impl="pallas"` (the fused first block too), PyTorch beside it -> OUT_network.jsonl (ordinary
   `jaxtl bench` records, plus "fused_block_tuning"). The model then fuses every eligible block, block 4
   (256 -> 256 at 10x12x10) too, all with that tuning.

On a CPU (no Triton) the blocks stage runs tiny shapes in Pallas' interpreter, two tunings: plumbing only.
Usage: python benchmarks/gpu_fused_block.py OUT.jsonl [blocks|network] [dtype,...] [batch] [repeats]
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl import bench
from jaxtl import fused_block as fb

# the block sweep and the eval block are gpu_first_block.py's (a script beside this one, not a module)
_spec = importlib.util.spec_from_file_location("gpu_first_block", Path(__file__).with_name("gpu_first_block.py"))
gfb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gfb)
_name = gfb._name  # a tuning's key in the records

GRID = dict(tile=(64, 128), block_n=(64, 128), block_k=(32, 64), num_warps=(4, 8))
# and two with fewer registers (56-133 on sm_90): 32 output channels per program, or 32 voxels (mma.sync, no wgmma)
EXTRA = [dict(tile=64, block_n=32, block_k=32, num_warps=8), dict(tile=32, block_n=64, block_k=32, num_warps=8)]
BLOCKS = (1, 2, 3)  # Peng's pooling blocks after the first; block 4 (256 -> 256 at 10x12x10) is launch-sized


def spills(v: dict) -> bool:
    """Builds that spill registers on sm_90 in blocks 2-3 (benchmarks/triton_ptx.py --kernel fused_block, Triton
    3.9, 2026-11-27): block_n 128 with 4 warps, tile 128 with block_n 128 (in float32 on block 3 also past the
    227 KB of shared memory a block may use), tile 128 with 4 warps. Left out."""
    return (v["block_n"] == 128 and v["num_warps"] == 4) or (v["tile"] == 128 and v["block_n"] == 128) or (
        v["tile"] == 128 and v["num_warps"] == 4)


def variants(gpu: bool) -> list[dict]:
    if not gpu:
        return [dict(tile=16, block_n=16, block_k=16), dict(tile=32, block_n=16, block_k=16, num_warps=8)]
    every = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    return [v for v in every if not spills(v)] + EXTRA


def shapes(gpu: bool) -> dict[int, tuple[tuple[int, ...], int, int]]:
    """Block index -> (input D, H, W), C_in, C_out: Peng's blocks at 1mm, or tiny ones on a CPU."""
    channels = bench.CONFIGS["peng"]
    size = np.asarray(bench.input_shape(1)) if gpu else np.asarray((16, 16, 16))
    out = {}
    for b in range(1, len(channels) - 1):
        out[b] = (tuple(int(s) for s in size // 2**b), channels[b - 1] if gpu else 16, channels[b] if gpu else 32)
    return {b: out[b] for b in BLOCKS}


def measure_block(index: int, dtype_name: str, batch: int, gpu: bool, repeats: int) -> dict:
    """The XLA block and the kernel in each tuning, timed interleaved: the record's fields."""
    size, cin, cout = shapes(gpu)[index]
    dtype = jnp.dtype(dtype_name)
    x_np = np.maximum(np.random.default_rng(index).standard_normal((batch, *size, cin)), 0).astype(np.float32)
    x = jnp.asarray(x_np, dtype)
    block = gfb.eval_block(cin, cout, dtype, seed=index)
    gdef, state = nnx.split(block)
    xla = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
    with jax.default_matmul_precision("highest"):  # what both sides are checked against: its own float32 module
        reference = gfb.eval_block(cin, cout, jnp.float32, seed=index)
        want = np.asarray(jax.jit(lambda x: reference(x))(x.astype(jnp.float32)), np.float32)
    bn = block.bn
    mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    args = (x, block.conv.kernel[...], block.conv.bias[...], mul, bn.bias[...] - bn.mean[...] * mul)
    fields = gfb.sweep(variants(gpu), lambda v: jax.jit(lambda *a: fb.conv_block(*a, dtype=dtype, **v)), args, want,
                       lambda: xla(state, x), {}, repeats, f"block {index} {dtype_name} batch {batch}",
                       f"block {index} {dtype_name}")
    return {"block": index, "input_shape": list(size), "channels": [cin, cout], **fields}


def network_output(blocks: Path) -> Path:
    """Where the network stage writes: OUT_network.jsonl beside the block records OUT.jsonl."""
    return blocks.with_name(blocks.stem + "_network.jsonl")


def network(blocks: Path, dtypes: list[str], batch: int, repeats: int, hw, vers, commit, config: str = "peng",
            resolution: int = 1) -> None:
    """Peng's 1mm embed with the kernels (the fastest correct tuning on block 1 of each dtype) beside PyTorch."""
    best = {}
    for line in blocks.read_text().splitlines() if blocks.exists() else []:
        rec = json.loads(line)
        if rec.get("kind") == "fused_block" and rec.get("best") and rec["block"] == 1 and rec["batch"] == batch:
            best[rec["dtype"]] = rec["best"]
    default = dict(fb.TUNING)
    try:
        fb.ENABLED = True
        for dtype_name in dtypes:
            tuning = default | best.get(dtype_name, {})
            fb.TUNING.clear()
            fb.TUNING.update(tuning)
            start = time.perf_counter()
            rec = bench.run_case(bench.Case("embed", config, resolution, batch, dtype_name), warmup=3,
                                 repeats=repeats, conv_impl="pallas")
            rec = bench._base_record(hw, vers, commit, "gpu_fused_block.py: embed, pallas + fused later blocks") | rec
            rec["fused_block_tuning"] = tuning
            with network_output(blocks).open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{dtype_name} {bench.summary_line(rec)} [fused_block {tuning}; "
                  f"{time.perf_counter() - start:.0f} s]", flush=True)
    finally:
        fb.ENABLED = False
        fb.TUNING.clear()
        fb.TUNING.update(default)


def main() -> None:
    out, stage, (dtypes,), gpu, batch, repeats = gfb.parse_argv([["bfloat16", "float32"]])
    hw, vers, commit = bench.hardware_info(), bench.versions(), bench.git_commit()
    if stage == "network":
        network(out, dtypes, batch, repeats, hw, vers, commit)
        return
    for dtype_name in dtypes:  # bfloat16 first: the embed target is in bfloat16
        for index in BLOCKS:
            start = time.perf_counter()
            rec = bench._base_record(hw, vers, commit, "gpu_fused_block.py") | {
                "kind": "fused_block", "config": "peng", "dtype": dtype_name, "batch": batch,
                **measure_block(index, dtype_name, batch, gpu, repeats)}
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"block {index} {dtype_name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
