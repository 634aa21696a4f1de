"""SFCN's later pooling blocks in eval mode (conv 3x3x3, C_in > 1 -> BatchNorm with running statistics -> 2x2x2
max-pool -> ReLU) as one Pallas (Triton) GPU kernel: an implicit GEMM over the channels-last input that writes only
the pooled output.

Why: with the fused first block (`jaxtl.first_block`) blocks 1-5 on cuDNN are the whole 1mm embed step on an H200
(2026-11-27, benchmarks/README.md): block 1 (32 -> 64 channels at 80x96x80) runs at 17% of the bfloat16 peak, and
cuDNN transposes NCDHW <-> NDHWC around each of its channels-last kernels. The 40% target needs those blocks near
their roofline bound.

How: each program takes `tile` pooled voxels and `block_n` output channels. For each of the 8 positions of the
pooling window it accumulates, over the 27 taps and the input channels in chunks of `block_k`, the dot of the
gathered (tile, block_k) input rows (each a contiguous run of channels) with the kernel's (block_k, block_n) slice
on the tensor cores (float32 accumulation), maps it by BatchNorm's affine map and keeps the running maximum; only
the pooled, ReLU'd output is written.

STATUS: EXPERIMENTAL, written without a GPU: values and gradient checked in Pallas' interpreter on CPU and the
Triton lowering by exporting for CUDA (`tests/test_fused_block.py`); the speed is NOT measured. Off by default
(`ENABLED`); `benchmarks/gpu_fused_block.py` measures it. Eval mode only (fine-tuning's gradient is XLA's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxtl.conv import max_pool2
from jaxtl.first_block import _Grid, _on_devices

ENABLED = False  # ConvBlock(conv_impl="pallas") uses the kernel for eligible eval blocks only when True
# Chosen by compiling for sm_90 without a GPU (benchmarks/triton_ptx.py --kernel fused_block, Triton 3.9, 264
# builds of Peng's blocks 1-3 at 1mm): no register spills in any block or dtype, at most 128 registers, wgmma.
TUNING = dict(tile=64, block_n=64, block_k=32, num_warps=8, num_stages=2)
DEBUG = False  # pallas_call(debug=...): print the kernel's jaxpr and Triton IR when lowering (benchmarks/triton_ptx.py)


def _channels(c: int) -> int:
    return max(16, pl.next_power_of_2(c))  # Triton tiles are powers of two (Peng's sex model has 58 channels)


def supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], pool: bool) -> bool:
    """Whether `conv_block` computes this block: C_in > 1 input channels, a 3x3x3 kernel, pooling, sizes >= 2, and
    offsets within Triton's 32 bits (the padded input at channels padded to a power of two)."""
    if len(x_shape) != 5 or x_shape[-1] < 2 or tuple(kernel_shape[:3]) != (3, 3, 3) or not pool:
        return False
    b, d, h, w, c = x_shape
    pooled = b * (d // 2) * (h // 2) * (w // 2)
    return (min(d, h, w) >= 2 and b * (d + 2) * (h + 2) * (w + 2) * _channels(c) < 2**31
            and (pooled + 256) * _channels(kernel_shape[-1]) < 2**31)


def _kernel(x_ref, w_ref, mul_ref, add_ref, o_ref, *, grid: _Grid, cin: int, block_k: int):
    base, _ = grid.windows()  # (tile,) padded-voxel offsets of the windows' first taps
    _, sd, sh = grid.strides
    mul, add = mul_ref[...], add_ref[...]
    ks = jnp.arange(block_k, dtype=jnp.int32)
    acc_shape = (base.shape[0], o_ref.shape[1])

    def conv_at(p):
        # lax.div / lax.rem: p, t >= 0, and Pallas' Triton lowering of jnp's floor division fails on a scalar
        at = lax.div(p, 4) * sd + lax.rem(lax.div(p, 2), 2) * sh + lax.rem(p, 2)

        def tap(t, acc):
            rows = (base + at + lax.div(t, 9) * sd + lax.rem(lax.div(t, 3), 3) * sh + lax.rem(t, 3)) * cin
            for k0 in range(0, cin, block_k):
                patch = plgpu.load(x_ref.at[rows[:, None] + (k0 + ks)[None, :]])  # (tile, block_k)
                acc += jnp.dot(patch, w_ref[t, pl.ds(k0, block_k), :], preferred_element_type=jnp.float32)
            return acc

        return lax.fori_loop(0, 27, tap, jnp.zeros(acc_shape, jnp.float32))

    best = lax.fori_loop(1, 8, lambda p, best: jnp.maximum(best, conv_at(p) * mul + add), conv_at(0) * mul + add)
    o_ref[...] = jnp.maximum(best, 0).astype(o_ref.dtype)


def _pallas_block(x, w, mul, add, *, tile, block_n, block_k, num_warps, num_stages, interpret):
    """x (B, D, H, W, C_in) in the compute dtype; w (3, 3, 3, C_in, C_out); mul, add (C_out,) float32."""
    cin, cout = w.shape[-2:]
    cip, cop = _channels(cin), _channels(cout)
    block_k, block_n = min(block_k, cip), min(block_n, cop)
    grid = _Grid(x.shape, tile)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, cip - cin))).reshape(-1)
    wk = jnp.pad(w.reshape(27, cin, cout), ((0, 0), (0, cip - cin), (0, cop - cout))).astype(x.dtype)
    vec = [jnp.pad(v.astype(jnp.float32), (0, cop - cout)).reshape(1, cop) for v in (mul, add)]
    out = pl.pallas_call(
        functools.partial(_kernel, grid=grid, cin=cip, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((grid.steps * tile, cop), x.dtype),
        grid=(grid.steps, cop // block_n),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec((27, cip, block_n), lambda s, n: (0, 0, n))]
        + [pl.BlockSpec((1, block_n), lambda s, n: (0, n))] * 2,
        out_specs=pl.BlockSpec((tile, block_n), lambda s, n: (s, n)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        debug=DEBUG,
        name="sfcn_conv_block",
    )(xp, wk, *vec)
    return out[:grid.count, :cout].reshape(*grid.pooled, cout)


def reference(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array) -> jax.Array:
    """The same block unfused, on XLA's convolution (what `conv_block` computes; its gradient)."""
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1, 1), [(1, 1)] * 3,
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=jnp.float32)
    return jnp.maximum(max_pool2((y + bias) * mul + add), 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _block(x, kernel, bias, mul, add, options, axis):
    return _pallas_block(x, kernel, mul, bias * mul + add, **dict(options))


def _block_fwd(x, kernel, bias, mul, add, options, axis):
    return _block(x, kernel, bias, mul, add, options, axis), (x, kernel, bias, mul, add)


def _block_bwd(options, axis, res, ct):
    return jax.vjp(reference, *res)[1](ct)


_block.defvjp(_block_fwd, _block_bwd)


def conv_block(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array, *, dtype=None,
               interpret: bool | None = None, **tuning) -> jax.Array:
    """relu(maxpool2((conv3d(x, kernel) + bias) * mul + add)) in one kernel (`mul`, `add`: BatchNorm's running
    statistics map). x: (B, D, H, W, C_in); kernel (3, 3, 3, C_in, C_out); computed in `dtype` (default x's) with
    float32 accumulation; odd sizes floored by the pool. `interpret` (default: off a GPU) runs Pallas' interpreter.
    `tuning` overrides `TUNING`: `tile` pooled voxels and `block_n` output channels per program, `block_k` input
    channels per dot (powers of two), `num_warps`, `num_stages` (Triton's)."""
    if not supported(x.shape, kernel.shape, True):
        raise ValueError(f"conv_block needs a (B, D, H, W, C) input with C >= 2, D, H, W >= 2 and a (3, 3, 3, C, O) "
                         f"kernel, got {x.shape} and {kernel.shape}")
    unknown = set(tuning) - set(TUNING)
    if unknown:
        raise TypeError(f"unknown tuning arguments {sorted(unknown)}; known: {sorted(TUNING)}")
    options = TUNING | tuning
    for name in ("tile", "block_n", "block_k"):
        v = options[name]
        if v < 16 or v > 256 or v & (v - 1):  # `supported`'s int32 bound allows for 256 rows of padding
            raise ValueError(f"{name} must be a power of two from 16 to 256, got {v}")
    options["interpret"] = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    f32 = jnp.float32
    options = tuple(sorted(options.items()))  # hashable: a static argument
    call = _on_devices(lambda *a, axis: _block(*a, options, axis), 5, P("data"))
    return call(x.astype(dtype or x.dtype), kernel.astype(f32), bias.astype(f32), mul.astype(f32), add.astype(f32))
