"""GPU experiment for issue #7's embed target: SFCN's first block as one fused Pallas kernel (`jaxtl.first_block`)
against the XLA path's block and PyTorch's, then the whole embed with the fastest kernel settings.

1. Block 0 alone in eval mode (conv 1 -> 32 at 160x192x160, BatchNorm, 2x2x2 max-pool, ReLU), batch B: the XLA path
   (`ConvBlock(conv_impl="xla")`), PyTorch (cuDNN autotuning, channels-last, autocast for bfloat16), and
   `first_block` for every combination of `window`, `voxel_major`, `tile` and `num_warps`; each checked against the
   XLA block (`max_abs_diff` relative to the output's largest value) and timed interleaved. Also the block's fused
   roofline bound (benchmarks/roofline.py). One record per (dtype, variant) -> OUT.jsonl ("kind": "first_block").
2. With `first_block.TUNING` set to the fastest correct variant of each dtype: `jaxtl bench`'s embed case for Peng's
   SFCN at 1mm, batch B, `conv_impl="pallas"`, PyTorch beside it -> OUT.jsonl (ordinary bench records, plus
   "first_block_tuning").

On a CPU (no Triton) it runs a tiny shape in Pallas' interpreter, two variants, no embed: plumbing only.
Usage: python benchmarks/gpu_first_block.py OUT.jsonl [dtype,...] [batch] [repeats]
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl import bench
from jaxtl import first_block as fb
from jaxtl.model import ConvBlock

_spec = importlib.util.spec_from_file_location("roofline", Path(__file__).with_name("roofline.py"))
roofline = importlib.util.module_from_spec(_spec)
sys.modules["roofline"] = roofline
_spec.loader.exec_module(roofline)

GRID = dict(window=(False, True), voxel_major=(True, False), tile=(64, 128, 256), num_warps=(4, 8))


def variants(gpu: bool) -> list[dict]:
    if not gpu:
        return [dict(window=False, tile=16), dict(window=True, tile=16)]
    return [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]


def block0(channels: int, dtype, seed: int = 0) -> ConvBlock:
    """Block 0 in eval mode with non-trivial running statistics (some BatchNorm scales negative)."""
    block = ConvBlock(1, channels, 3, True, dtype=dtype, rngs=nnx.Rngs(seed), conv_impl="xla")
    rng = np.random.default_rng(seed)
    block.bn.mean[...] = jnp.asarray(rng.normal(0, 0.1, channels), jnp.float32)
    block.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2, channels), jnp.float32)
    block.bn.scale[...] = jnp.asarray(rng.normal(1, 0.5, channels), jnp.float32)
    block.bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, channels), jnp.float32)
    block.eval()
    return block


def torch_block(block: ConvBlock, x_np: np.ndarray, dtype):
    """PyTorch's block 0 with the same weights, eval mode; a blocking callable (the module: its `.layers`)."""
    import torch

    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    c = block.conv.out_features
    layers = torch.nn.Sequential(torch.nn.Conv3d(1, c, 3, padding=1), torch.nn.BatchNorm3d(c),
                                 torch.nn.MaxPool3d(2, 2), torch.nn.ReLU())
    with torch.no_grad():
        layers[0].weight.copy_(torch.tensor(np.asarray(block.conv.kernel[...]).transpose(4, 3, 0, 1, 2)))
        layers[0].bias.copy_(torch.tensor(np.asarray(block.conv.bias[...])))
        for name, src in (("weight", block.bn.scale), ("bias", block.bn.bias), ("running_mean", block.bn.mean),
                          ("running_var", block.bn.var)):
            getattr(layers[1], name).copy_(torch.tensor(np.asarray(src[...])))
    layers = layers.to(device).to(memory_format=torch.channels_last_3d).eval()
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1))).to(device)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == jnp.bfloat16):
            layers(x)
        sync()

    run.layers = layers
    return run


def _name(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def measure_block(dtype_name: str, x_np: np.ndarray, gpu: bool, repeats: int) -> dict:
    """Block 0 on the XLA path, each `first_block` variant and PyTorch, timed interleaved: the record's fields."""
    dtype = jnp.dtype(dtype_name)
    block = block0(bench.CONFIGS["peng"][0], dtype)
    gdef, state = nnx.split(block)
    x = jnp.asarray(x_np, dtype)
    xla = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
    want = np.asarray(xla(state, x), np.float32)
    scale = float(np.abs(want).max())
    bn = block.bn
    mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
    args = (x, block.conv.kernel[...], block.conv.bias[...], mul, bn.bias[...] - bn.mean[...] * mul)
    sides = {"xla": lambda: jax.block_until_ready(xla(state, x))}
    compile_s, errors, checks = {}, {}, {}
    for v in variants(gpu):
        fn = jax.jit(lambda *a, v=v: fb.first_block(*a, dtype=dtype, **v))
        start = time.perf_counter()
        try:
            compiled = fn.lower(*args).compile()
            got = np.asarray(compiled(*args), np.float32)
        except Exception as e:  # noqa: BLE001  (a variant Triton rejects is a result too)
            errors[_name(v)] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{dtype_name} first_block {_name(v)}: FAILED {errors[_name(v)]}", flush=True)
            continue
        compile_s[_name(v)] = time.perf_counter() - start
        checks[_name(v)] = float(np.abs(got - want).max()) / scale
        sides[_name(v)] = lambda c=compiled: jax.block_until_ready(c(*args))
    if bench.torch_available():
        sides["torch"] = torch_block(block, x_np, dtype)
    times = bench.time_interleaved(sides, warmup=3, repeats=repeats)
    ms = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
    # within bfloat16 / TF32 rounding of the XLA block (a wrong kernel is off by O(1))
    tol = 3e-2 if dtype_name == "bfloat16" else 1e-2
    correct = [v for v in variants(gpu) if checks.get(_name(v), 1.0) < tol]
    best = min(correct, key=lambda v: ms[_name(v)]) if correct else None
    for name, t in sorted(ms.items(), key=lambda kv: kv[1]):
        diff = f"  max|diff|/max {checks[name]:.1e}" if name in checks else ""
        print(f"{dtype_name} block 0 batch {len(x_np)}: {name:55s} {t:8.3f} ms{diff}", flush=True)
    return {"ms": ms, "max_rel_diff": checks, "compile_s": compile_s, "errors": errors, "best": best}


def main() -> None:
    out = Path(sys.argv[1])
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["bfloat16", "float32"]
    gpu = jax.default_backend() == "gpu"
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else (8 if gpu else 1)
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else (20 if gpu else 2)
    shape = bench.input_shape(1) if gpu else (8, 10, 6)
    hw, vers, commit = bench.hardware_info(), bench.versions(), bench.git_commit()
    device = roofline.device_for(jax.devices()[0].device_kind)
    x_np = np.random.default_rng(1).standard_normal((batch, *shape, 1), np.float32)
    best = {}
    for dtype_name in dtypes:
        rec = bench._base_record(hw, vers, commit, "gpu_first_block.py") | {
            "kind": "first_block", "config": "peng", "dtype": dtype_name, "batch": batch, "input_shape": list(shape),
            **measure_block(dtype_name, x_np, gpu, repeats)}
        if device is not None:
            bf16, tf32, bandwidth = roofline.DEVICES[device]
            peak = bf16 if dtype_name == "bfloat16" else tf32
            rb = roofline.blocks(bench.CONFIGS["peng"], shape, jnp.dtype(dtype_name).itemsize)[0]
            rec["bound_ms"] = {"fused": 1e3 * batch * rb.seconds(peak, bandwidth, True),
                               "unfused": 1e3 * batch * rb.seconds(peak, bandwidth, False), "datasheet": device}
            print(f"{dtype_name} block 0 roofline bound ({device}): fused {rec['bound_ms']['fused']:.3f} ms, "
                  f"unfused {rec['bound_ms']['unfused']:.3f} ms", flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["best"]:
            best[dtype_name] = rec["best"]
    if not gpu:
        return
    for dtype_name, tuning in best.items():
        fb.TUNING.update(tuning)
        rec = bench.run_case(bench.Case("embed", "peng", 1, batch, dtype_name), warmup=3, repeats=repeats,
                             conv_impl="pallas")
        rec = bench._base_record(hw, vers, commit, "gpu_first_block.py: embed with conv_impl=pallas") | rec
        rec["first_block_tuning"] = dict(fb.TUNING)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{dtype_name} {bench.summary_line(rec)} [first_block {fb.TUNING}]", flush=True)


if __name__ == "__main__":
    main()
