"""GPU experiment: which XLA-path changes speed up SFCN on a GPU (records -> JSONL, one per case and variant).

Variants of `ConvBlock` on the XLA path (the one GPUs run):
  base       nnx.Conv -> BN -> nnx.max_pool (reduce_window; its gradient is XLA's select-and-scatter)
  pool       the reshape max-pool `jaxtl.conv.max_pool2` (gradient: masks, no scatter); jaxtl's XLA path since
             it won here (the model's own block: since 2026-11-27 with the conv bias folded into BatchNorm, the
             other variants still add it to the conv output)
  pool+pad8  also zero-pads the 1-channel input of the first layer to 8 channels (cuDNN's tensor-core
             kernels want channel counts that are multiples of 8); same result, 8x the first layer's FLOPs
  pool+s2d   the first layer by space-to-depth: each 2x2x2 block of the input becomes 8 channels, one 3x3x3
             convolution at half resolution gives the 8 positions x 32 channels of every output block, then
             BatchNorm and the 2x2x2 max-pool (a max over the 8 positions); same result, 8x the first layer's
             FLOPs, but a GEMM with K = 216 and N = 256 instead of K = 27, N = 32 on the full-resolution grid.
             Not measured yet (written without a GPU at hand; numerics checked on CPU by tests/test_bench.py)
  pool+direct the 1-channel first layer as 27 shifted multiply-adds (no convolution kernel): with BatchNorm's
             eval affine map, the reshape max-pool and ReLU all elementwise or reductions over its output, XLA
             can fuse the block into one kernel that reads the input and writes only the pooled tensor (what
             benchmarks/roofline.py says the 40% target needs); 8.5 GFLOP per 1mm volume on CUDA cores instead
             of tensor cores. Not measured yet (written without a GPU; numerics checked by tests/test_bench.py)
Usage: python benchmarks/gpu_variants.py OUT.jsonl [variant,...] [dtype,...] [suite,...] [batch]
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtl import bench, train
from jaxtl.conv import max_pool2
from jaxtl.model import ConvBlock

ORIGINAL = ConvBlock.__call__


def base_call(self: ConvBlock, x: jax.Array) -> jax.Array:
    """The XLA path as first measured: nnx.max_pool (reduce_window; gradient by select-and-scatter)."""
    x = self.bn(self.conv(x))
    if self.pool:
        x = nnx.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    return nnx.relu(x)


def _conv(block: ConvBlock, x: jax.Array, pad8: bool) -> jax.Array:
    w = block.conv.kernel[...].astype(block.conv.dtype)
    if pad8 and x.shape[-1] == 1:
        x = jnp.pad(x, [(0, 0)] * 4 + [(0, 7)])
        w = jnp.pad(w, [(0, 0)] * 3 + [(0, 7), (0, 0)])
    p = w.shape[0] // 2
    y = jax.lax.conv_general_dilated(x.astype(w.dtype), w, (1, 1, 1), [(p, p)] * 3,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return y + block.conv.bias[...].astype(y.dtype)


def variant_call(pad8: bool):
    def call(self: ConvBlock, x: jax.Array) -> jax.Array:
        x = self.bn(_conv(self, x, pad8))
        return nnx.relu(max_pool2(x) if self.pool else x)
    return call


# S[q + 1, r, a, d + 1] = 1 where an output at offset a (0/1) of its 2x2x2 block, read with kernel tap d (-1..1),
# lands on input offset r (0/1) of the block q (-1..1) blocks away: d = 2q + r - a.
S2D = jnp.asarray([[[[float(d == 2 * q + r - a) for d in (-1, 0, 1)] for a in (0, 1)] for r in (0, 1)]
                   for q in (-1, 0, 1)])


def s2d_first_layer(block: ConvBlock, x: jax.Array) -> jax.Array:
    """conv -> BN -> max-pool -> ReLU of a 1-channel, pooling block, computed on 2x2x2 space-to-depth blocks."""
    n, d, h, w, _ = x.shape
    o = block.conv.out_features
    k = block.conv.kernel[...].astype(block.conv.dtype)[:, :, :, 0, :]  # (3, 3, 3, O)
    k2 = jnp.einsum("zrad,ysbe,xtcf,defo->zyxrstabco", S2D, S2D, S2D, k).reshape(3, 3, 3, 8, 8 * o)
    xb = x.reshape(n, d // 2, 2, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4, 6).reshape(n, d // 2, h // 2,
                                                                                               w // 2, 8)
    y = jax.lax.conv_general_dilated(xb.astype(k2.dtype), k2, (1, 1, 1), [(1, 1)] * 3,
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    y = y.reshape(n, d // 2, h // 2, w // 2, 8, o) + block.conv.bias[...].astype(y.dtype)
    return nnx.relu(jnp.max(block.bn(y), axis=-2))


def s2d_call(self: ConvBlock, x: jax.Array) -> jax.Array:
    if x.shape[-1] == 1 and self.pool:
        return s2d_first_layer(self, x)
    return variant_call(False)(self, x)


def direct_first_layer(block: ConvBlock, x: jax.Array) -> jax.Array:
    """conv (1 input channel, 3x3x3, padding 1) as a sum of 27 shifted products, then BN -> max-pool -> ReLU."""
    n, d, h, w, _ = x.shape
    k = block.conv.kernel[...].astype(block.conv.dtype)[:, :, :, 0, :]  # (3, 3, 3, O)
    xp = jnp.pad(x.astype(k.dtype), [(0, 0), (1, 1), (1, 1), (1, 1), (0, 0)])
    y = block.conv.bias[...].astype(k.dtype)
    for a in range(3):
        for b in range(3):
            for c in range(3):
                y = y + xp[:, a:a + d, b:b + h, c:c + w, :] * k[a, b, c]
    x = block.bn(y)
    return nnx.relu(max_pool2(x) if block.pool else x)


def direct_call(self: ConvBlock, x: jax.Array) -> jax.Array:
    if x.shape[-1] == 1:
        return direct_first_layer(self, x)
    return variant_call(False)(self, x)


VARIANTS = {"base": base_call, "pool": variant_call(False), "pool+pad8": variant_call(True), "pool+s2d": s2d_call,
            "pool+direct": direct_call}


def main() -> None:
    out = sys.argv[1]
    variants = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["bfloat16", "float32"]
    suites = sys.argv[4].split(",") if len(sys.argv) > 4 else ["train", "embed"]
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    config, res = ("peng", 1) if jax.default_backend() != "cpu" else ("demo", 4)
    hw, vers, commit = bench.hardware_info(), bench.versions(), bench.git_commit()
    for suite in suites:
        for dtype in dtypes:
            for name in variants:
                ConvBlock.__call__ = VARIANTS[name]
                # the train step is cached per model shape (jaxtl.train._jitted_steps_for) and jit caches its trace:
                # without clearing both, a variant after the first would rerun the first one's program
                train._jitted_steps_for.cache_clear()
                jax.clear_caches()
                start = time.perf_counter()
                try:
                    rec = bench.run_case(bench.Case(suite, config, res, batch, dtype), warmup=2, repeats=10,
                                         conv_impl="xla")
                except Exception as e:  # noqa: BLE001
                    print(f"{suite} {dtype} {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rec = bench._base_record(hw, vers, commit, f"gpu_variants.py variant {name}") | rec
                rec["variant"] = name
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"{suite} {dtype} {name}: {bench.summary_line(rec)} [{time.perf_counter() - start:.0f} s]",
                      flush=True)
    ConvBlock.__call__ = ORIGINAL


if __name__ == "__main__":
    main()
