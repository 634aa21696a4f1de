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

import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl import bench, train
from jaxtl import fused_block as fb
from jaxtl.model import ConvBlock

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


def block_at(cin: int, cout: int, dtype, seed: int = 0) -> ConvBlock:
    """A pooling block in eval mode with non-trivial running statistics (some BatchNorm scales negative)."""
    block = ConvBlock(cin, cout, 3, True, dtype=dtype, rngs=nnx.Rngs(seed), conv_impl="xla")
    rng = np.random.default_rng(seed)
    block.bn.mean[...] = jnp.asarray(rng.normal(0, 0.1, cout), jnp.float32)
    block.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2, cout), jnp.float32)
    block.bn.scale[...] = jnp.asarray(rng.normal(1, 0.5, cout), jnp.float32)
    block.bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, cout), jnp.float32)
    block.eval()
    return block


def _name(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def measure_block(index: int, dtype_name: str, batch: int, gpu: bool, repeats: int) -> dict:
    """The XLA block and the kernel in each tuning, timed interleaved: the record's fields."""
    size, cin, cout = shapes(gpu)[index]
    dtype = jnp.dtype(dtype_name)
    x_np = np.maximum(np.random.default_rng(index).standard_normal((batch, *size, cin)), 0).astype(np.float32)
    x = jnp.asarray(x_np, dtype)
    block = block_at(cin, cout, dtype, seed=index)
    gdef, state = nnx.split(block)
    xla = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
    with jax.default_matmul_precision("highest"):  # what both sides are checked against: its own float32 module
        reference = block_at(cin, cout, jnp.float32, seed=index)
        want = np.asarray(jax.jit(lambda x: reference(x))(x.astype(jnp.float32)), np.float32)
    scale = float(np.abs(want).max())
    xla_diff = float(np.abs(np.asarray(xla(state, x), np.float32) - want).max()) / scale
    bn = block.bn
    mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    args = (x, block.conv.kernel[...], block.conv.bias[...], mul, bn.bias[...] - bn.mean[...] * mul)
    sides = {"xla": lambda: jax.block_until_ready(xla(state, x))}
    compile_s, errors, checks = {}, {}, {}
    for v in variants(gpu):
        start = time.perf_counter()
        try:
            compiled = jax.jit(lambda *a, v=v: fb.conv_block(*a, dtype=dtype, **v)).lower(*args).compile()
            got = np.asarray(compiled(*args), np.float32)
        except Exception as e:  # noqa: BLE001  (a tuning Triton rejects is a result too)
            errors[_name(v)] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"block {index} {dtype_name} {_name(v)}: FAILED {errors[_name(v)]}", flush=True)
            continue
        compile_s[_name(v)] = time.perf_counter() - start
        checks[_name(v)] = float(np.abs(got - want).max()) / scale
        sides[_name(v)] = lambda c=compiled: jax.block_until_ready(c(*args))
    times = bench.time_interleaved(sides, warmup=3, repeats=repeats)
    ms = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
    tol = max(3 * xla_diff, 1e-3)
    correct = [v for v in variants(gpu) if checks.get(_name(v), 1.0) <= tol]
    best = min(correct, key=lambda v: ms[_name(v)]) if correct else None
    for name, t in sorted(ms.items(), key=lambda kv: kv[1]):
        diff = f"  max|diff|/max {checks[name]:.1e}" if name in checks else ""
        print(f"block {index} {dtype_name} batch {batch}: {name:55s} {t:8.3f} ms{diff}", flush=True)
    print(f"block {index} {dtype_name}: the XLA block's max|diff|/max {xla_diff:.1e} (vs float32, full precision)")
    return {"block": index, "input_shape": list(size), "channels": [cin, cout], "ms": ms, "max_rel_diff": checks,
            "xla_max_rel_diff": xla_diff, "compile_s": compile_s, "errors": errors, "best": best}


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
            jax.clear_caches()  # the steps read the tuning when traced
            train._jitted_steps.cache_clear()
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
    out = Path(sys.argv[1])
    stage = sys.argv[2] if len(sys.argv) > 2 else "blocks"
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["bfloat16", "float32"]
    gpu = jax.default_backend() == "gpu"
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else (8 if gpu else 1)
    repeats = int(sys.argv[5]) if len(sys.argv) > 5 else (20 if gpu else 2)
    if stage not in ("blocks", "network"):
        raise SystemExit(f"stage must be blocks or network, got {stage!r}")
    hw, vers, commit = bench.hardware_info(), bench.versions(), bench.git_commit()
    if stage == "network":
        if not gpu:
            raise SystemExit("the network stage runs Peng's SFCN at 1mm: on a GPU only")
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
