"""Where the time goes: SFCN's conv blocks timed one at a time, jaxtl's XLA path beside PyTorch, with each block's
roofline bound (benchmarks/roofline.py) in the same record. For the accelerator work of issue #7: the whole-network
numbers say the forward runs at 8% of an H200's bf16 peak; this says which block is far from its bound.

Per block (input shape from the layer shapes, batch B, random input and weights), three timings per side:
  conv   the convolution alone (XLA: lax.conv_general_dilated; PyTorch: Conv3d)
  eval   the block in eval mode: conv -> BN (running statistics) -> 2x2x2 max-pool -> ReLU
  train  forward + backward of the block in train mode (BN batch statistics): gradients of the parameters and
         of the input (none for block 0, whose input is the data), as inside the train step
PyTorch: cuDNN autotuning, channels-last 3D, autocast for bfloat16 (as in `jaxtl bench`). On a CPU the full-size
shapes take long; there it runs the demo config at 4mm (plumbing only).

Usage: python benchmarks/gpu_blocks.py OUT.jsonl [dtype,...] [batch] [repeats]
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtl import bench
from jaxtl.model import ConvBlock

_spec = importlib.util.spec_from_file_location("roofline", Path(__file__).with_name("roofline.py"))
roofline = importlib.util.module_from_spec(_spec)
sys.modules["roofline"] = roofline
_spec.loader.exec_module(roofline)


def block_shapes(channels, shape):
    """(index, in channels, out channels, kernel, pool, input D/H/W) of each conv block."""
    out, cin, (d, h, w) = [], 1, shape
    for b, cout in enumerate(channels):
        pool = b < len(channels) - 1
        out.append((b, cin, cout, 3 if pool else 1, pool, (d, h, w)))
        if pool:
            d, h, w = d // 2, h // 2, w // 2
        cin = cout
    return out


def jax_fns(cin, cout, k, pool, x, dtype, first):
    """Blocking jitted callables (conv, eval, train) of one ConvBlock on the XLA path."""
    block = ConvBlock(cin, cout, k, pool, dtype=dtype, rngs=nnx.Rngs(0), conv_impl="xla")
    kernel = block.conv.kernel[...].astype(dtype)
    pad = [(k // 2, k // 2)] * 3
    conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x.astype(dtype), w, (1, 1, 1), pad,
                                                              dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
    block.eval()
    gdef, state = nnx.split(block)
    evaluate = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
    block.train()
    gdef_t, state_t = nnx.split(block)

    def loss(blk, x):
        return jnp.sum(blk(x).astype(jnp.float32))

    grad = nnx.grad(loss, argnums=0 if first else (0, 1))  # parameters (and the input): as in the train step
    train = jax.jit(lambda s, x: grad(nnx.merge(gdef_t, s), x))
    fns, compile_s = {}, {}
    for name, fn, args in (("conv", conv, (x, kernel)), ("eval", evaluate, (state, x)), ("train", train, (state_t, x))):
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s[name] = time.perf_counter() - start
        fns[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    return fns, compile_s


def torch_fns(cin, cout, k, pool, x_np, dtype, first):
    import torch

    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    layers = [torch.nn.Conv3d(cin, cout, k, padding=k // 2), torch.nn.BatchNorm3d(cout)]
    layers += [torch.nn.MaxPool3d(2, 2)] if pool else []
    block = torch.nn.Sequential(*layers, torch.nn.ReLU()).to(device).to(memory_format=torch.channels_last_3d)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1))).to(device)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    xg = x.clone().requires_grad_(not first)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == jnp.bfloat16)

    def conv():
        with torch.inference_mode(), autocast():
            block[0](x)
        sync()

    def evaluate():
        block.eval()
        with torch.inference_mode(), autocast():
            block(x)
        sync()

    def train():
        block.train()
        block.zero_grad(set_to_none=True)  # fresh gradients each call, as jaxtl's step returns them
        xg.grad = None
        with autocast():
            y = block(xg)
        y.float().sum().backward()
        sync()

    return {"conv": conv, "eval": evaluate, "train": train}


def main() -> None:
    out = Path(sys.argv[1])
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["bfloat16", "float32"]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    gpu = jax.default_backend() != "cpu"
    config, res = ("peng", 1) if gpu else ("demo", 4)
    channels, shape = bench.CONFIGS[config], bench.input_shape(res)
    hw, vers, commit = bench.hardware_info(), bench.versions(), bench.git_commit()
    kind = jax.devices()[0].device_kind
    device = roofline.device_for(kind)
    use_torch = bench.torch_available()
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        blocks = roofline.blocks(channels, shape, dtype.itemsize)
        for (b, cin, cout, k, pool, (d, h, w)), rb in zip(block_shapes(channels, shape), blocks, strict=True):
            x = np.random.default_rng(b).standard_normal((batch, d, h, w, cin), np.float32)
            fns, compile_s = jax_fns(cin, cout, k, pool, jnp.asarray(x), dtype, first=b == 0)
            sides = {f"jaxtl/{n}": f for n, f in fns.items()}
            if use_torch:
                sides |= {f"torch/{n}": f for n, f in torch_fns(cin, cout, k, pool, x, dtype, b == 0).items()}
            times = bench.time_interleaved(sides, warmup=3, repeats=repeats)
            rec = bench._base_record(hw, vers, commit, "gpu_blocks.py") | {
                "config": config, "resolution": res, "dtype": dtype_name, "batch": batch, "block": b,
                "in_channels": cin, "out_channels": cout, "input_shape": [d, h, w], "gflop_per_volume": rb.flops / 1e9,
                "compile_s": compile_s, "ms": {n: 1e3 * float(np.median(t)) for n, t in times.items()}}
            if device is not None:
                bf16, tf32, bandwidth = roofline.DEVICES[device]
                peak = bf16 if dtype_name == "bfloat16" else tf32
                rec["bound_ms"] = {"unfused": 1e3 * batch * rb.seconds(peak, bandwidth, False),
                                   "fused": 1e3 * batch * rb.seconds(peak, bandwidth, True), "datasheet": device}
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            ms = "  ".join(f"{n} {v:.2f}" for n, v in rec["ms"].items())
            bound = rec.get("bound_ms")
            bound = f"  bound {bound['unfused']:.2f} / fused {bound['fused']:.2f}" if bound else ""
            print(f"{dtype_name} block {b} ({cin}->{cout} at {d}x{h}x{w}, batch {batch}) ms: {ms}{bound}", flush=True)


if __name__ == "__main__":
    main()
