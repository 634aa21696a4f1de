"""GPU experiment for issue #7: SFCN's first block as fused Pallas kernels (`jaxtl.first_block`, eval mode, and
`first_block_train`) against the XLA path's block and PyTorch's, then the whole embed / train step with the fastest.

1. Block 0 alone (conv 1 -> 32 at 160x192x160, BatchNorm, 2x2x2 max-pool, ReLU), batch B, in eval mode (forward)
   and in train mode (forward + backward: the gradients of the block's parameters, as in the train step, where
   the data needs none): the XLA path (`ConvBlock(conv_impl="xla")`), PyTorch (cuDNN autotuning, channels-last,
   autocast for bfloat16) and the kernels in each tuning of the grid; each checked against the same block in float32
   at full precision (largest difference relative to the largest value: eval output, train kernel gradient; a
   tuning is correct within 3x the XLA block's own difference) and timed interleaved. Also the
   block's fused roofline bound (benchmarks/roofline.py, eval). One record per (mode, dtype) -> OUT.jsonl
   ("kind": "first_block").
   Stage `blocks`.
2. Stage `network`: with `first_block.TUNING` / `TRAIN_TUNING`'s entry for the dtype set to the fastest correct
   tuning of each mode and dtype in OUT.jsonl's block records (the module's defaults where there is none): `jaxtl
   bench`'s embed and train cases for Peng's SFCN at 1mm, batch B, `conv_impl="pallas"`, PyTorch beside them, and the
   XLA path's embed -> OUT_network.jsonl beside OUT.jsonl (ordinary `jaxtl bench` records, plus "first_block_tuning").

On a CPU (no Triton) the blocks stage runs a tiny shape in Pallas' interpreter, two tunings: plumbing only.
Usage: python benchmarks/gpu_first_block.py OUT.jsonl [blocks|network] [mode,...] [dtype,...] [batch] [repeats]
(mode: eval, train)
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

GRID = {"eval": dict(window=(False, True), voxel_major=(True, False), tile=(64, 128, 256), num_warps=(4, 8)),
        "train": dict(window=(False, True), voxel_major=(True, False), tile=(64, 128), num_warps=(4, 8))}


def spills(mode: str, v: dict) -> bool:
    """Builds that spill registers on sm_90 in bfloat16 or float32 (benchmarks/triton_ptx.py, Triton 3.9, run
    2026-11-26): eval tile 256 with 4 warps (236-255 registers, up to 160 B spilled); train tile 128 except
    tap-major with 8 warps (the gradient kernel: 12-552 B). Left out to keep the stage inside its time."""
    if mode == "eval":
        return v["tile"] == 256 and v["num_warps"] == 4
    return v["tile"] == 128 and (v["voxel_major"] or v["num_warps"] == 4)


def variants(gpu: bool, mode: str) -> list[dict]:
    if not gpu:
        return [dict(window=False, tile=16), dict(window=True, voxel_major=False, tile=16)]
    grid = GRID[mode]
    every = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    return [v for v in every if not spills(mode, v)]


# Most wanted first, so that a stage cut short by its time limit loses the least: the bfloat16 embed (the 40%-of-
# peak target), then the train step (1.2x PyTorch AMP) in both dtypes.
ORDER = (("eval", "bfloat16"), ("train", "bfloat16"), ("train", "float32"), ("eval", "float32"))


def ordered(modes: list[str], dtypes: list[str]) -> list[tuple[str, str]]:
    wanted = [(m, d) for m in modes for d in dtypes]
    return sorted(wanted, key=lambda md: ORDER.index(md) if md in ORDER else len(ORDER))


def eval_block(cin: int, cout: int, dtype, seed: int = 0) -> ConvBlock:
    """A pooling block on the XLA path in eval mode with non-trivial running statistics (some BatchNorm scales
    negative)."""
    block = ConvBlock(cin, cout, 3, True, dtype=dtype, rngs=nnx.Rngs(seed), conv_impl="xla")
    rng = np.random.default_rng(seed)
    block.bn.mean[...] = jnp.asarray(rng.normal(0, 0.1, cout), jnp.float32)
    block.bn.var[...] = jnp.asarray(rng.uniform(0.5, 2, cout), jnp.float32)
    block.bn.scale[...] = jnp.asarray(rng.normal(1, 0.5, cout), jnp.float32)
    block.bn.bias[...] = jnp.asarray(rng.normal(0, 0.1, cout), jnp.float32)
    block.eval()
    return block


def block0(channels: int, dtype, seed: int = 0) -> ConvBlock:
    """Block 0 (1 input channel) as `eval_block`."""
    return eval_block(1, channels, dtype, seed)


def torch_block(block: ConvBlock, x_np: np.ndarray, dtype, mode: str = "eval"):
    """PyTorch's block 0 with the same weights; a blocking callable running it in `mode` (train: forward and
    backward to the parameters), the module as its `.layers`."""
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
    layers = layers.to(device).to(memory_format=torch.channels_last_3d).train(mode == "train")
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1))).to(device)
    if dtype == jnp.bfloat16:  # the input in bfloat16, as the other sides get it (autocast would cast it per call)
        x = x.to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == jnp.bfloat16)

    def run():
        if mode == "train":
            layers.zero_grad(set_to_none=True)  # fresh gradients each call, not accumulated
            with autocast():
                out = layers(x)
            out.float().sum().backward()
        else:
            with torch.inference_mode(), autocast():
                layers(x)
        sync()

    run.layers = layers
    return run


def _name(variant: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items())


def block_fns(block: ConvBlock, x: jax.Array, dtype, mode: str):
    """(XLA block, kernel function of a tuning) for `mode`, each returning what is compared: the eval output, or the
    train-mode gradient of the conv kernel (of sum(output), parameters only)."""
    bn = block.bn
    if mode == "eval":
        gdef, state = nnx.split(block)
        xla = jax.jit(lambda s, x: nnx.merge(gdef, s)(x))
        mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
        args = (x, block.conv.kernel[...], block.conv.bias[...], mul, bn.bias[...] - bn.mean[...] * mul)
        return (lambda: xla(state, x)), (lambda v: jax.jit(lambda *a: fb.first_block(*a, dtype=dtype, **v)), args)
    block.train()
    gdef, state = nnx.split(block)
    grad = nnx.grad(lambda blk, x: jnp.sum(blk(x).astype(jnp.float32)))
    xla = jax.jit(lambda s, x: grad(nnx.merge(gdef, s), x).conv.kernel[...])

    def kernel_fn(v):
        def loss(k, b, s, beta, x):
            return jnp.sum(fb.first_block_train(x, k, b, s, beta, epsilon=bn.epsilon, dtype=dtype, **v)[0]
                           .astype(jnp.float32))
        return jax.jit(lambda k, b, s, beta, x: jax.grad(loss)(k, b, s, beta, x))

    args = (block.conv.kernel[...], block.conv.bias[...], bn.scale[...], bn.bias[...], x)
    return (lambda: xla(state, x)), (kernel_fn, args)


def measure_block(mode: str, dtype_name: str, x_np: np.ndarray, gpu: bool, repeats: int) -> dict:
    """Block 0 on the XLA path, the kernels in each tuning and PyTorch, timed interleaved: the record's fields."""
    dtype, channels = jnp.dtype(dtype_name), bench.CONFIGS["peng"][0]
    block = block0(channels, dtype)
    x = jnp.asarray(x_np, dtype)
    xla, (kernel_fn, args) = block_fns(block, x, dtype, mode)
    # what both sides are checked against: the XLA block in float32 at full precision (no TF32) on the same input
    with jax.default_matmul_precision("highest"):
        want = np.asarray(block_fns(block0(channels, jnp.float32), x.astype(jnp.float32), jnp.float32, mode)[0](),
                          np.float32)
    extra = {"torch": torch_block(block, x_np, dtype, mode)} if bench.torch_available() else {}
    return sweep(variants(gpu, mode), kernel_fn, args, want, xla, extra, repeats,
                 f"{mode} {dtype_name} block 0 batch {len(x_np)}", f"{mode} {dtype_name}")


def sweep(tunings: list[dict], kernel_fn, args, want: np.ndarray, xla, extra: dict, repeats: int, label: str,
          short: str) -> dict:
    """Compile `kernel_fn(tuning)` on `args` for each tuning, check each and `xla()` against `want` (largest
    difference relative to the largest value), time them with the `extra` sides interleaved, print the times
    (`label`) and return the record's fields; `best`: the fastest tuning within 3x the XLA side's difference."""
    scale = float(np.abs(want).max())
    xla_diff = float(np.abs(np.asarray(xla(), np.float32) - want).max()) / scale
    sides = {"xla": lambda: jax.block_until_ready(xla())}
    compile_s, errors, checks = {}, {}, {}
    for v in tunings:
        start = time.perf_counter()
        try:
            compiled = kernel_fn(v).lower(*args).compile()
            got = np.asarray(compiled(*args), np.float32)
        except Exception as e:  # noqa: BLE001  (a tuning Triton rejects is a result too)
            errors[_name(v)] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{short} {_name(v)}: FAILED {errors[_name(v)]}", flush=True)
            continue
        compile_s[_name(v)] = time.perf_counter() - start
        checks[_name(v)] = float(np.abs(got - want).max()) / scale
        sides[_name(v)] = lambda c=compiled: jax.block_until_ready(c(*args))
    times = bench.time_interleaved(sides | extra, warmup=3, repeats=repeats)
    ms = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
    # as close to the float32 block as XLA's own block in this dtype, give or take (a wrong kernel is off by O(1))
    tol = max(3 * xla_diff, 1e-3)
    correct = [v for v in tunings if checks.get(_name(v), 1.0) <= tol]
    best = min(correct, key=lambda v: ms[_name(v)]) if correct else None
    for name, t in sorted(ms.items(), key=lambda kv: kv[1]):
        diff = f"  max|diff|/max {checks[name]:.1e}" if name in checks else ""
        print(f"{label}: {name:55s} {t:8.3f} ms{diff}", flush=True)
    print(f"{short}: the XLA block's max|diff|/max {xla_diff:.1e} (vs float32, full precision)")
    return {"ms": ms, "max_rel_diff": checks, "xla_max_rel_diff": xla_diff, "compile_s": compile_s, "errors": errors,
            "best": best}


def network_output(blocks: Path) -> Path:
    """Where the network stage writes: OUT_network.jsonl beside the block records OUT.jsonl."""
    return blocks.with_name(blocks.stem + "_network.jsonl")


def network(blocks: Path, modes: list[str], dtypes: list[str], batch: int, repeats: int, hw, vers, commit,
            config: str = "peng", resolution: int = 1, warmup: int = 3) -> None:
    """The embed / train step (Peng's SFCN at 1mm) with `conv_impl="pallas"` beside PyTorch, each with the fastest
    correct tuning of the block records in `blocks` (the defaults where there is none), and the XLA path's embed;
    records -> `network_output(blocks)`."""
    out = network_output(blocks)
    best = {}
    for line in blocks.read_text().splitlines() if blocks.exists() else []:
        rec = json.loads(line)
        if rec.get("kind") == "first_block" and rec.get("best") and rec.get("batch") == batch:
            best[rec["mode"], rec["dtype"]] = rec["best"]  # the latest record of each wins
    for mode, dtype_name in ordered(modes, dtypes):
        table = fb.TUNING if mode == "eval" else fb.TRAIN_TUNING  # what the model's kernels use, per dtype
        tuning = fb.tuning_for(table, dtype_name) | best.get((mode, dtype_name), {})
        suite = "embed" if mode == "eval" else "train"
        start = time.perf_counter()
        table["float32" if jnp.dtype(dtype_name).itemsize >= 4 else "bfloat16"] = tuning
        rec = bench.run_case(bench.Case(suite, config, resolution, batch, dtype_name), warmup=warmup,
                             repeats=repeats, conv_impl="pallas")
        rec = bench._base_record(hw, vers, commit, f"gpu_first_block.py: {suite} with conv_impl=pallas") | rec
        rec["first_block_tuning"] = tuning
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{dtype_name} {bench.summary_line(rec)} [first_block {tuning}; {time.perf_counter() - start:.0f} s]",
              flush=True)
        if mode == "eval":  # the XLA path's embed on the same machine, for the kernel's whole-network gain
            rec = bench.run_case(bench.Case(suite, config, resolution, batch, dtype_name), warmup=warmup,
                                 repeats=repeats, conv_impl="xla", use_torch=False)
            rec = bench._base_record(hw, vers, commit, "gpu_first_block.py: embed with conv_impl=xla") | rec
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{dtype_name} {bench.summary_line(rec)} [XLA path]", flush=True)


def parse_argv(lists: list[list[str]]) -> tuple[Path, str, list[list[str]], bool, int, int]:
    """OUT.jsonl [blocks|network] [comma lists, `lists` their defaults] [batch] [repeats] from sys.argv:
    (out, stage, lists, on a GPU, batch, repeats); the network stage on a GPU only."""
    argv = sys.argv[1:]
    stage = argv[1] if len(argv) > 1 else "blocks"
    if stage not in ("blocks", "network"):
        raise SystemExit(f"stage must be blocks or network, got {stage!r}")
    gpu = jax.default_backend() == "gpu"
    if stage == "network" and not gpu:
        raise SystemExit("the network stage runs Peng's SFCN at 1mm: on a GPU only")
    k = 2 + len(lists)
    lists = [argv[2 + i].split(",") if len(argv) > 2 + i else default for i, default in enumerate(lists)]
    batch = int(argv[k]) if len(argv) > k else (8 if gpu else 1)
    repeats = int(argv[k + 1]) if len(argv) > k + 1 else (20 if gpu else 2)
    return Path(argv[0]), stage, lists, gpu, batch, repeats


def main() -> None:
    out, stage, (modes, dtypes), gpu, batch, repeats = parse_argv([["eval", "train"], ["bfloat16", "float32"]])
    hw, vers, commit = bench.hardware_info(), bench.versions(), bench.git_commit()
    if stage == "network":
        network(out, modes, dtypes, batch, repeats, hw, vers, commit)
        return
    shape = bench.input_shape(1) if gpu else (8, 10, 6)
    device = roofline.device_for(jax.devices()[0].device_kind)
    x_np = np.random.default_rng(1).standard_normal((batch, *shape, 1), np.float32)
    for mode, dtype_name in ordered(modes, dtypes):
        start = time.perf_counter()
        rec = bench._base_record(hw, vers, commit, "gpu_first_block.py") | {
            "kind": "first_block", "mode": mode, "config": "peng", "dtype": dtype_name, "batch": batch,
            "input_shape": list(shape), **measure_block(mode, dtype_name, x_np, gpu, repeats)}
        if device is not None and mode == "eval":
            bf16, tf32, bandwidth = roofline.DEVICES[device]
            peak = bf16 if dtype_name == "bfloat16" else tf32
            rb = roofline.blocks(bench.CONFIGS["peng"], shape, jnp.dtype(dtype_name).itemsize)[0]
            rec["bound_ms"] = {"fused": 1e3 * batch * rb.seconds(peak, bandwidth, True),
                               "unfused": 1e3 * batch * rb.seconds(peak, bandwidth, False), "datasheet": device}
            print(f"eval {dtype_name} block 0 roofline bound ({device}): fused {rec['bound_ms']['fused']:.3f} ms,"
                  f" unfused {rec['bound_ms']['unfused']:.3f} ms", flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{mode} {dtype_name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
