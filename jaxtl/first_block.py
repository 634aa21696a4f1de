"""SFCN's first block in one GPU kernel (Pallas, Triton backend): conv 3x3x3 (1 -> C channels) -> BatchNorm
(running statistics) -> 2x2x2 max-pool -> ReLU, writing only the pooled output.

Why: the first block's convolution output is the largest tensor of the network (C x the input, 315 MB per 1mm
volume in bfloat16 for C = 32). With the convolution and the pooling as separate kernels (XLA's and cuDNN's way)
it is written and read back, which alone bounds the forward at 46% of an H200's bf16 peak
(`benchmarks/roofline.py`); fused, the block moves only its input and pooled output.

How: each program takes `tile` consecutive pooled voxels. For each of the 8 positions of the 2x2x2 pooling window
it gathers the (tile, 32) patch matrix of those voxels' conv inputs straight from the padded input (27 taps,
padded to 32 with zeros), multiplies it with the (32, C) kernel on the tensor cores (float32 accumulation;
TF32 for float32 inputs, as XLA's GPU convolutions), applies BatchNorm's affine map and keeps the running
maximum; the ReLU'd maximum is the output. The gradient (for fine-tuning with frozen BatchNorm) is the unfused
XLA composition's.

STATUS: written and checked without a GPU at hand. Values are tested in Pallas' interpreter on CPU and the
Triton lowering is tested by exporting for CUDA (`tests/test_first_block.py`); its speed has NOT been measured
yet (`conv_impl="pallas"`, `benchmarks/gpu_next.sh`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TAPS = 32  # 27 kernel taps padded to a tensor-core friendly K
POSITIONS = [(pd, ph, pw) for pd in (0, 1) for ph in (0, 1) for pw in (0, 1)]  # in the 2x2x2 pooling window
# The defaults of `first_block`'s tuning arguments (what the model uses). Not tuned yet: no GPU measurement exists;
# benchmarks/gpu_first_block.py measures the alternatives.
TUNING = dict(tile=128, window=False, voxel_major=True, num_warps=4, num_stages=2)
DEBUG = False  # pallas_call(debug=...): print the kernel's jaxpr and Triton IR when lowering (benchmarks/triton_ptx.py)


def supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], pool: bool) -> bool:
    """Whether `first_block` computes this block: 1 input channel, 3x3x3 kernel, pooling, even-or-odd sizes >= 2,
    and a padded input small enough for 32-bit offsets."""
    if len(x_shape) != 5 or x_shape[-1] != 1 or tuple(kernel_shape[:4]) != (3, 3, 3, 1) or not pool:
        return False
    b, d, h, w, _ = x_shape
    return min(d, h, w) >= 2 and b * (d + 2) * (h + 2) * (w + 2) < 2**31


def _kernel(x_ref, w_ref, mul_ref, add_ref, o_ref, *, dims, count, tile, window, voxel_major):
    dp, hp, wp, sb, sd, sh = dims
    q = jnp.minimum(pl.program_id(0) * tile + jnp.arange(tile, dtype=jnp.int32), count - 1)  # pooled voxels
    col, row = q % wp, q // wp
    j, row = row % hp, row // hp
    i, n = row % dp, row // dp
    base = n * sb + 2 * i * sd + 2 * j * sh + 2 * col  # padded-input offset of the pooling window's first tap

    def gather(offsets, valid):
        """The (K, tile) or (tile, K) matrix x[base + offsets] (0 where not `valid`)."""
        if voxel_major:  # a warp's lanes run along neighbouring voxels: addresses 2 apart, 1-2 cache lines
            idx, valid = base[None, :] + offsets[:, None], valid[:, None]
        else:
            idx, valid = base[:, None] + offsets[None, :], valid[None, :]
        return plgpu.load(x_ref.at[idx], mask=jnp.broadcast_to(valid, idx.shape), other=0)

    def conv(patches, w):  # w: (C, K) if voxel_major else (K, C); float32 accumulation
        if voxel_major:
            return jnp.dot(w, patches, preferred_element_type=jnp.float32)
        return jnp.dot(patches, w, preferred_element_type=jnp.float32)

    mul, add = mul_ref[...], add_ref[...]
    if window:  # the 4x4x4 input neighbourhood of the pooling window, gathered once
        k = jnp.arange(64, dtype=jnp.int32)
        patches = gather((k // 16) * sd + (k // 4 % 4) * sh + k % 4, k >= 0)
    else:  # the 27 taps of one conv output, padded to 32
        k = jnp.arange(TAPS, dtype=jnp.int32)
        taps = (k // 9) * sd + (k // 3 % 3) * sh + k % 3
    best = None
    for p, (pd, ph, pw) in enumerate(POSITIONS):
        if not window:
            patches = gather(taps + (pd * sd + ph * sh + pw), k < 27)
        y = conv(patches, w_ref[p if window else 0]) * mul + add
        best = y if best is None else jnp.maximum(best, y)
    best = jnp.maximum(best, 0).astype(o_ref.dtype)
    o_ref[...] = best.T if voxel_major else best


def window_kernel(w: jax.Array) -> jax.Array:
    """(3, 3, 3, C) -> (8, 64, C): for each pooling position (pd, ph, pw), the kernel placed in the 4x4x4
    neighbourhood of the pooling window (tap (a, b, c) reads neighbour (pd + a, ph + b, pw + c))."""
    place = jnp.asarray([[[float(n == p + a) for n in range(4)] for a in range(3)] for p in range(2)])  # (2, 3, 4)
    w64 = jnp.einsum("pai,qbj,rck,abco->pqrijko", place, place, place, w.astype(jnp.float32))
    return w64.reshape(8, 64, w.shape[-1])


def _pallas_block(x, w, mul, add, *, tile, window, voxel_major, num_warps, num_stages, interpret):
    """x (B, D, H, W, 1) in the compute dtype; w (3, 3, 3, C); mul, add (C,) float32 (conv bias folded into add)."""
    b, d, h, wd, _ = x.shape
    c = w.shape[-1]
    cp = max(16, pl.next_power_of_2(c))  # Triton tiles are powers of two (Peng's sex model has 28 channels)
    dp, hp, wp = d // 2, h // 2, wd // 2
    count = b * dp * hp * wp
    steps = pl.cdiv(count, tile)
    xp = jnp.pad(x[..., 0], ((0, 0), (1, 1), (1, 1), (1, 1))).reshape(-1)
    wk = window_kernel(w) if window else jnp.pad(w.reshape(1, 27, c), ((0, 0), (0, TAPS - 27), (0, 0)))
    wk = jnp.pad(wk, ((0, 0), (0, 0), (0, cp - c))).astype(x.dtype)
    mul, add = (jnp.pad(v, (0, cp - c)).reshape(1, cp) for v in (mul, add))
    if voxel_major:
        wk, mul, add = wk.transpose(0, 2, 1), mul.T, add.T
    dims = (dp, hp, wp, (d + 2) * (h + 2) * (wd + 2), (h + 2) * (wd + 2), wd + 2)
    out = pl.pallas_call(
        functools.partial(_kernel, dims=dims, count=count, tile=tile, window=window, voxel_major=voxel_major),
        out_shape=jax.ShapeDtypeStruct((steps * tile, cp), x.dtype),
        grid=(steps,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY),
                  pl.BlockSpec(wk.shape, lambda s: (0, 0, 0)),
                  pl.BlockSpec(mul.shape, lambda s: (0, 0)),
                  pl.BlockSpec(add.shape, lambda s: (0, 0))],
        out_specs=pl.BlockSpec((tile, cp), lambda s: (s, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        debug=DEBUG,
        name="sfcn_first_block",
    )(xp, wk, mul, add)
    if steps * tile != count or cp != c:
        out = out[:count, :c]
    return out.reshape(b, dp, hp, wp, c)


def reference(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array) -> jax.Array:
    """The same block unfused, on XLA's convolution (what `first_block` computes; its gradient)."""
    y = lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1, 1), [(1, 1)] * 3,
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=jnp.float32)
    y = (y + bias) * mul + add
    b, d, h, w, c = y.shape
    y = y[:, :d // 2 * 2, :h // 2 * 2, :w // 2 * 2].reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).max(axis=(2, 4, 6))
    return jnp.maximum(y, 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _block(x, kernel, bias, mul, add, options):
    tile, window, voxel_major, num_warps, num_stages, interpret = options
    return _pallas_block(x, kernel[:, :, :, 0], mul, bias * mul + add, tile=tile, window=window,
                         voxel_major=voxel_major, num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def _block_fwd(x, kernel, bias, mul, add, options):
    return _block(x, kernel, bias, mul, add, options), (x, kernel, bias, mul, add)


def _block_bwd(options, res, ct):
    return jax.vjp(reference, *res)[1](ct)


_block.defvjp(_block_fwd, _block_bwd)


def first_block(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array, *, dtype=None,
                interpret: bool | None = None, **tuning) -> jax.Array:
    """relu(maxpool2(conv3d(x, kernel) + bias) * mul + add)) for a 1-channel input, in one kernel.

    x: (B, D, H, W, 1); kernel: (3, 3, 3, 1, C); bias, mul, add: (C,) (`mul`, `add`: BatchNorm's running-statistics
    affine map). Computed in `dtype` (default x's) with float32 accumulation and epilogue; odd sizes are floored
    by the pool as PyTorch's MaxPool3d(2). `interpret` (default: on any backend but a GPU) runs Pallas'
    interpreter instead of Triton, for tests on CPU.

    `tuning` overrides `TUNING`: `tile` (pooled voxels per program, a power of two); `window`: gather the 4x4x4
    input neighbourhood of each pooling window once (64 loads per pooled voxel, 8 dots with K = 64, 2.4x the FLOPs)
    instead of the 27 taps of each of its 8 conv outputs (216 loads, K = 32); `voxel_major`: a warp's lanes run
    along voxels (else along taps) in the gathered matrix; `num_warps`, `num_stages`: Triton's.
    """
    if not supported(x.shape, kernel.shape, True):
        raise ValueError(f"first_block needs a (B, D, H, W, 1) input with D, H, W >= 2 and a (3, 3, 3, 1, C) kernel, "
                         f"got {x.shape} and {kernel.shape}")
    unknown = set(tuning) - set(TUNING)
    if unknown:
        raise TypeError(f"first_block got unknown tuning arguments {sorted(unknown)}; known: {sorted(TUNING)}")
    tuning = TUNING | tuning
    tile = tuning["tile"]
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    dtype = jnp.dtype(dtype or x.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    f32 = jnp.float32
    return _block(x.astype(dtype), kernel.astype(f32), bias.astype(f32), mul.astype(f32), add.astype(f32),
                  (int(tile), bool(tuning["window"]), bool(tuning["voxel_major"]), int(tuning["num_warps"]),
                   int(tuning["num_stages"]), bool(interpret)))
