"""SFCN's first block as fused GPU kernels (Pallas, Triton backend): conv 3x3x3 (1 -> C channels) -> BatchNorm ->
2x2x2 max-pool -> ReLU without storing the full-resolution conv output.

Why: the first block's convolution output is the largest tensor of the network (C x the input, 315 MB per 1mm
volume in bfloat16 for C = 32). With the convolution and the pooling as separate kernels (XLA's and cuDNN's way)
it is written and read back, which alone bounds the forward at 46% of an H200's bf16 peak
(`benchmarks/roofline.py`); fused, the block moves only its input and pooled output.

How: each program takes `tile` consecutive pooled voxels. For each of the 8 positions of the 2x2x2 pooling window
it gathers the patch matrix of those voxels' conv inputs straight from the padded input (27 taps padded to 32, or
once per window its 4x4x4 neighbourhood) and multiplies it with the kernel on the tensor cores (float32
accumulation; TF32 for float32 inputs, as XLA's GPU convolutions).
- `first_block` (eval, BatchNorm's running statistics): the affine map and a running max in registers; only the
  pooled output is written. Its gradient (fine-tuning with frozen BatchNorm) is the unfused XLA block's.
- `first_block_train` (batch statistics): one kernel writes, per window, the conv output the pool selects (the
  maximum, or the minimum where the BatchNorm scale is negative) and its position, and each program's statistics;
  the pooled output follows at pooled size. The backward kernel recomputes the conv output
  and accumulates the kernel gradient; BatchNorm's reductions are over pooled-size arrays.

STATUS: measured on one NVIDIA H200 (2026-11-27, benchmarks/README.md): block 0 alone 9x faster than XLA's block in eval
and 19x in train in bfloat16 (4.3x, 3.3x in float32), Peng's 1mm embed 2.2x the XLA path's (1230 vs 555 vol/s, bfloat16)
and the train step 4.7x (318 vs 67 vol/s); `conv_impl="auto"` uses these kernels on Hopper GPUs (`jaxtl.conv`). Values
and gradients are also tested in Pallas' interpreter on CPU and the Triton lowering by exporting for CUDA
(`tests/test_first_block.py`). JAX 0.11 deprecates Pallas' Triton backend (Mosaic GPU is its successor): the kernels
still lower there, with a DeprecationWarning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from jaxtl.conv import bn_pool_backward, max_pool2

TAPS = 32  # 27 kernel taps padded to a tensor-core friendly K
POSITIONS = [(pd, ph, pw) for pd in (0, 1) for ph in (0, 1) for pw in (0, 1)]  # in the 2x2x2 pooling window
# The defaults of `first_block`'s and `first_block_train`'s tuning arguments (what the model uses), per compute dtype
# (16-bit dtypes take bfloat16's): the fastest correct tuning of block 0 alone, Peng's 1mm input, batch 8, on an
# H200 (benchmarks/gpu_first_block_h200.jsonl, 2026-11-27; eval bfloat16 1.05 ms vs XLA's block 9.6 ms and PyTorch's
# 18.6 ms; train forward + backward bfloat16 5.04 ms vs 97.7 and 46.0 ms). For bfloat16 training the tap-major
# build without `window` (5.04 ms) is kept over the fastest (`window`, 4.87 ms): its kernel gradient is 2.5x
# closer to float32's (8.4e-3 vs 2.1e-2 of the largest value; XLA's block: 4.0e-2).
TUNING = {"bfloat16": dict(tile=128, window=True, voxel_major=True, num_warps=4, num_stages=2),
          "float32": dict(tile=128, window=False, voxel_major=True, num_warps=4, num_stages=2)}
TRAIN_TUNING = {"bfloat16": dict(tile=64, window=False, voxel_major=False, num_warps=4, num_stages=2),
                "float32": dict(tile=64, window=False, voxel_major=True, num_warps=4, num_stages=2)}
DEBUG = False  # pallas_call(debug=...): print the kernel's jaxpr and Triton IR when lowering (benchmarks/triton_ptx.py)


def tuning_for(table: dict[str, dict], dtype) -> dict:
    """The entry of `TUNING` / `TRAIN_TUNING` for a compute dtype: float32's for 32-bit ones, else bfloat16's."""
    return table["float32" if jnp.dtype(dtype).itemsize >= 4 else "bfloat16"]


def supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], pool: bool) -> bool:
    """Whether `first_block` computes this block: 1 input channel, 3x3x3 kernel, pooling, sizes >= 2 (odd ones
    floored by the pool), and arrays small enough for Triton's 32-bit offsets (the padded input, and the
    pooled-size outputs at channels padded to a power of two)."""
    if len(x_shape) != 5 or x_shape[-1] != 1 or tuple(kernel_shape[:4]) != (3, 3, 3, 1) or not pool:
        return False
    b, d, h, w, _ = x_shape
    pooled = b * (d // 2) * (h // 2) * (w // 2)
    return min(d, h, w) >= 2 and b * (d + 2) * (h + 2) * (w + 2) < 2**31 and (pooled + 256) * _channels(
        kernel_shape[-1]) < 2**31


class _Grid:
    """Static geometry of one launch: the padded input flattened, `tile` pooled voxels per program."""

    def __init__(self, shape: tuple[int, ...], tile: int):
        b, d, h, w = shape[:4]
        self.tile, self.pooled = tile, (b, d // 2, h // 2, w // 2)
        self.count = b * (d // 2) * (h // 2) * (w // 2)  # pooled voxels
        self.steps = pl.cdiv(self.count, tile)
        self.strides = ((d + 2) * (h + 2) * (w + 2), (h + 2) * (w + 2), w + 2)  # batch, depth, height

    def windows(self):
        """In a kernel: the padded-input offset of each of this program's pooling windows' first tap, and whether
        the pooled voxel exists (the last program's tail repeats the last voxel)."""
        _, dp, hp, wp = self.pooled
        sb, sd, sh = self.strides
        q = pl.program_id(0) * self.tile + jnp.arange(self.tile, dtype=jnp.int32)
        exists = q < self.count
        q = jnp.minimum(q, self.count - 1)
        col, row = q % wp, q // wp
        j, row = row % hp, row // hp
        i, n = row % dp, row // dp
        return n * sb + 2 * i * sd + 2 * j * sh + 2 * col, exists


class _Conv:
    """In a kernel: the conv outputs (float32, no bias) of this program's pooling windows at one position at a
    time, (C, tile) if voxel_major else (tile, C). The kernels loop over the 8 positions with `lax.fori_loop`
    rather than unrolled: unrolled, Triton hoists all 8 gathers and runs out of registers (spills in most tunings,
    benchmarks/triton_ptx.py)."""

    def __init__(self, x_ref, w_ref, grid: _Grid, base, *, window: bool, voxel_major: bool):
        self.x_ref, self.w_ref, self.base, self.window, self.voxel_major = x_ref, w_ref, base, window, voxel_major
        _, self.sd, self.sh = grid.strides
        if window:  # the 4x4x4 input neighbourhood of the pooling window, gathered once
            k = jnp.arange(64, dtype=jnp.int32)
            self.patches = self.gather((k // 16) * self.sd + (k // 4 % 4) * self.sh + k % 4, k >= 0)

    def gather(self, offsets, valid):
        """x[base + offsets] as (K, tile) or (tile, K), 0 where not `valid`."""
        if self.voxel_major:  # a warp's lanes run along neighbouring voxels: addresses 2 apart, 1-2 cache lines
            idx, valid = self.base[None, :] + offsets[:, None], valid[:, None]
        else:
            idx, valid = self.base[:, None] + offsets[None, :], valid[None, :]
        return plgpu.load(self.x_ref.at[idx], mask=jnp.broadcast_to(valid, idx.shape), other=0)

    def taps(self, p):
        """The 27 taps (padded to 32) of each window's conv output at position p (POSITIONS order)."""
        k = jnp.arange(TAPS, dtype=jnp.int32)
        # lax.div / lax.rem: p >= 0, and Pallas' Triton lowering of jnp's floor division fails on a scalar
        at = lax.div(p, 4) * self.sd + lax.rem(lax.div(p, 2), 2) * self.sh + lax.rem(p, 2)
        return self.gather((k // 9) * self.sd + (k // 3 % 3) * self.sh + k % 3 + at, k < 27)

    def __call__(self, p):
        """The conv output at position p, and the patches it was computed from."""
        patches, w = (self.patches, self.w_ref[p]) if self.window else (self.taps(p), self.w_ref[0])
        if self.voxel_major:  # w: (C, K) if voxel_major else (K, C); float32 accumulation
            return jnp.dot(w, patches, preferred_element_type=jnp.float32), patches
        return jnp.dot(patches, w, preferred_element_type=jnp.float32), patches


def _eval_kernel(x_ref, w_ref, mul_ref, add_ref, o_ref, *, grid, window, voxel_major):
    base, _ = grid.windows()
    conv = _Conv(x_ref, w_ref, grid, base, window=window, voxel_major=voxel_major)
    mul, add = mul_ref[...], add_ref[...]

    def position(p, best):
        return jnp.maximum(best, conv(p)[0] * mul + add)

    best = lax.fori_loop(1, 8, position, conv(0)[0] * mul + add)
    best = jnp.maximum(best, 0).astype(o_ref.dtype)
    o_ref[...] = best.T if voxel_major else best


def _train_kernel(x_ref, w_ref, b_ref, sign_ref, sel_ref, pos_ref, mean_ref, m2_ref, *, grid, window, voxel_major):
    """Train forward: per pooled voxel the conv output the pool selects and its window position, per program the
    mean and sum of squared deviations of the conv output over its windows (BatchNorm's batch statistics, combined
    across programs outside). BatchNorm's per-channel affine map is monotone, so the pool selects the maximum of
    the conv output, or the minimum where the scale is negative (`sign` -1); ties go to the first position, as
    XLA's max-pool gradient."""
    base, exists = grid.windows()
    conv = _Conv(x_ref, w_ref, grid, base, window=window, voxel_major=voxel_major)
    axis = 1 if voxel_major else 0
    exists = exists[None, :] if voxel_major else exists[:, None]
    n = 8 * jnp.minimum(grid.tile, grid.count - pl.program_id(0) * grid.tile).astype(jnp.float32)
    dtype, b, sign = sel_ref.dtype, b_ref[...], sign_ref[...]

    def output(p):  # as stored: statistics and pooling see the same values
        return (conv(p)[0] + b).astype(dtype).astype(jnp.float32)

    def position(p, carry):
        s1, s2, best, at = carry
        y = output(p)
        dev = jnp.where(exists, y - shift, 0)
        return s1 + dev, s2 + dev * dev, jnp.maximum(best, sign * y), jnp.where(sign * y > best, p, at)

    y = output(0)
    # shift by the first position's mean: the sums lose nothing to cancellation
    shift = 8 * jnp.sum(jnp.where(exists, y, 0), axis=axis, keepdims=True) / n
    dev = jnp.where(exists, y - shift, 0)
    s1, s2, best, at = lax.fori_loop(1, 8, position, (dev, dev * dev, sign * y, jnp.zeros(y.shape, jnp.int32)))
    s1, s2 = jnp.sum(s1, axis=axis, keepdims=True), jnp.sum(s2, axis=axis, keepdims=True)
    sel, mean, m2 = sign * best, shift + s1 / n, s2 - s1 * s1 / n
    if voxel_major:
        sel, at, mean, m2 = sel.T, at.T, mean.T, m2.T
    sel_ref[...], pos_ref[...] = sel.astype(dtype), at.astype(jnp.int8)
    mean_ref[...], m2_ref[...] = mean, m2


def _grad_kernel(x_ref, w_ref, b_ref, c0_ref, c1_ref, pos_ref, r_ref, dw_ref, *, grid, voxel_major):
    """Train backward: the kernel gradient of this program's windows, sum over voxels of patch x dL/dy, with
    dL/dy = r at the window position the pool selected (`pos`) + c0 + c1 y (BatchNorm's); the conv output is
    recomputed, never stored."""
    base, exists = grid.windows()
    conv = _Conv(x_ref, w_ref, grid, base, window=False, voxel_major=voxel_major)
    dtype, b, c0, c1 = x_ref.dtype, b_ref[...], c0_ref[...], c1_ref[...]
    pos, r = pos_ref[...].astype(jnp.int32), r_ref[...].astype(jnp.float32)
    if voxel_major:
        pos, r, exists = pos.T, r.T, exists[None, :]
    else:
        exists = exists[:, None]

    def position(p, dw):
        y, patches = conv(p)
        y = (y + b).astype(dtype).astype(jnp.float32)
        dy = jnp.where(exists, jnp.where(pos == p, r, 0) + c0 + c1 * y, 0).astype(dtype)
        if voxel_major:  # (C, tile) x (tile, K)
            return dw + jnp.dot(dy, patches.T, preferred_element_type=jnp.float32)
        return dw + jnp.dot(patches.T, dy, preferred_element_type=jnp.float32)  # (K, tile) x (tile, C)

    dw_ref[...] = lax.fori_loop(0, 8, position, jnp.zeros(dw_ref.shape[1:], jnp.float32))[None]


def _launch(kernel, grid: _Grid, x, whole, blocked, outputs, *, name, num_warps, num_stages, interpret, **params):
    """pallas_call over `grid.steps` programs. Kernel arguments in order: `x` (the flattened padded input, read by
    address), the `whole` arrays, the `blocked` ones ((array, block): each program gets block number s), the
    `outputs` ((shape, dtype, block))."""
    def rows(block):
        zeros = (0,) * (len(block) - 1)
        return pl.BlockSpec(block, lambda s: (s, *zeros))

    def full(a):
        zeros = (0,) * a.ndim
        return pl.BlockSpec(a.shape, lambda s: zeros)

    return pl.pallas_call(
        functools.partial(kernel, grid=grid, **params),
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for shape, dtype, _ in outputs],
        grid=(grid.steps,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] + [full(a) for a in whole] + [rows(b) for _, b in blocked],
        out_specs=[rows(block) for _, _, block in outputs],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        debug=DEBUG,
        name=name,
    )(x, *whole, *(a for a, _ in blocked))


def _padded_input(x):
    return jnp.pad(x[..., 0], ((0, 0), (1, 1), (1, 1), (1, 1))).reshape(-1)


def _kernel_matrix(w, cp, window, voxel_major, dtype):
    """(3, 3, 3, C) -> (P, K, Cp) (or (P, Cp, K) voxel-major): the taps padded to 32 (P = 1), or each pooling
    position's kernel in the 4x4x4 window neighbourhood (P = 8)."""
    c = w.shape[-1]
    wk = window_kernel(w) if window else jnp.pad(w.reshape(1, 27, c), ((0, 0), (0, TAPS - 27), (0, 0)))
    wk = jnp.pad(wk, ((0, 0), (0, 0), (0, cp - c))).astype(dtype)
    return wk.transpose(0, 2, 1) if voxel_major else wk


def _channel_vector(v, cp, voxel_major):
    v = jnp.pad(v.astype(jnp.float32), (0, cp - v.shape[0])).reshape(1, cp)
    return v.T if voxel_major else v


def _channels(c):
    return max(16, pl.next_power_of_2(c))  # Triton tiles are powers of two (Peng's sex model has 28 channels)


def window_kernel(w: jax.Array) -> jax.Array:
    """(3, 3, 3, C) -> (8, 64, C): for each pooling position (pd, ph, pw), the kernel placed in the 4x4x4
    neighbourhood of the pooling window (tap (a, b, c) reads neighbour (pd + a, ph + b, pw + c))."""
    place = jnp.asarray([[[float(n == p + a) for n in range(4)] for a in range(3)] for p in range(2)])  # (2, 3, 4)
    w64 = jnp.einsum("pai,qbj,rck,abco->pqrijko", place, place, place, w.astype(jnp.float32))
    return w64.reshape(8, 64, w.shape[-1])


def _pallas_block(x, w, mul, add, *, tile, window, voxel_major, num_warps, num_stages, interpret):
    """x (B, D, H, W, 1) in the compute dtype; w (3, 3, 3, C); mul, add (C,) float32 (conv bias folded into add)."""
    c = w.shape[-1]
    cp, grid = _channels(c), _Grid(x.shape, tile)
    vec = functools.partial(_channel_vector, cp=cp, voxel_major=voxel_major)
    [out] = _launch(_eval_kernel, grid, _padded_input(x),
                    [_kernel_matrix(w, cp, window, voxel_major, x.dtype), vec(mul), vec(add)], [],
                    [((grid.steps * tile, cp), x.dtype, (tile, cp))],
                    name="sfcn_first_block", window=window, voxel_major=voxel_major, num_warps=num_warps,
                    num_stages=num_stages, interpret=interpret)
    return out[:grid.count, :c].reshape(*grid.pooled, c)


def _conv(x, kernel):
    """XLA's convolution, float32 output."""
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1, 1), [(1, 1)] * 3,
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), preferred_element_type=jnp.float32)


def reference(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array) -> jax.Array:
    """The same block unfused, on XLA's convolution (what `first_block` computes; its gradient)."""
    return jnp.maximum(max_pool2((_conv(x, kernel) + bias) * mul + add), 0).astype(x.dtype)


def train_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array, beta: jax.Array, *,
                    epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The train-mode block unfused (what `first_block_train` computes): conv -> BatchNorm with batch statistics
    (as `jaxtl.model.BatchNorm`) -> max-pool -> ReLU; returns (output, batch mean, biased batch variance)."""
    y = (_conv(x, kernel) + bias).astype(x.dtype).astype(jnp.float32)
    mean = y.mean(axis=(0, 1, 2, 3))
    var = jnp.square(y - mean).mean(axis=(0, 1, 2, 3))
    mul = scale * lax.rsqrt(var + epsilon)
    return jnp.maximum(max_pool2(y * mul + (beta - mean * mul)), 0).astype(x.dtype), mean, var


def _options(tuning: dict, interpret: bool | None, defaults: dict) -> tuple:
    unknown = set(tuning) - set(defaults)
    if unknown:
        raise TypeError(f"unknown tuning arguments {sorted(unknown)}; known: {sorted(defaults)}")
    tuning = defaults | tuning
    tile = tuning["tile"]
    if tile < 16 or tile > 256 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two from 16 to 256, got {tile}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return (int(tile), bool(tuning["window"]), bool(tuning["voxel_major"]), int(tuning["num_warps"]),
            int(tuning["num_stages"]), bool(interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _block(x, kernel, bias, mul, add, options, axis):
    tile, window, voxel_major, num_warps, num_stages, interpret = options
    return _pallas_block(x, kernel[:, :, :, 0], mul, bias * mul + add, tile=tile, window=window,
                         voxel_major=voxel_major, num_warps=num_warps, num_stages=num_stages, interpret=interpret)


def _block_fwd(x, kernel, bias, mul, add, options, axis):
    return _block(x, kernel, bias, mul, add, options, axis), (x, kernel, bias, mul, add)


def _block_bwd(options, axis, res, ct):
    # per device under a data mesh: shard_map sums the parameters' cotangents over the devices afterwards
    return jax.vjp(reference, *res)[1](ct)


_block.defvjp(_block_fwd, _block_bwd)


def _psum(v, axis):
    """Sum over the devices of the data mesh (inside `shard_map`); `axis` None: one device, nothing to sum. The
    train block's forward sums BatchNorm's statistics, its backward the sums its coefficients need."""
    return v if axis is None else lax.psum(v, axis)


def data_mesh():
    """The mesh the caller traces under (`jax.set_mesh`, `jax.sharding.use_abstract_mesh`) if it is a 1-D "data"
    mesh over several devices, as jaxtl's train and embed steps use: the kernels then run per device on the
    batch shard (`shard_map`), BatchNorm's statistics and the parameter gradients summed across devices."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != ("data",) or mesh.shape["data"] == 1:
        return None
    return mesh


def runs_here() -> bool:
    """Whether the kernels can run where the caller is: under a mesh of one device or a data mesh (`data_mesh`), or
    with no mesh on a one-device machine. A Triton kernel has no sharding rule, so on several devices without the
    mesh XLA would gather the batch onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.device_count() == 1
    return mesh.size == 1 or data_mesh() is not None


def _on_devices(fn, n_args: int, out_specs):
    """`fn(x, *params)` per device on the batch shard when tracing under a data mesh, else as it is."""
    mesh = data_mesh()
    if mesh is None:
        return functools.partial(fn, axis=None)
    # check_vma=False: pallas_call's outputs carry no varying-axes type
    return jax.shard_map(functools.partial(fn, axis="data"), mesh=mesh, in_specs=(P("data"),) + (P(),) * (n_args - 1),
                         out_specs=out_specs, check_vma=False)


def first_block(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array, *, dtype=None,
                interpret: bool | None = None, **tuning) -> jax.Array:
    """relu(maxpool2(conv3d(x, kernel) + bias) * mul + add)) for a 1-channel input, in one kernel.

    x: (B, D, H, W, 1); kernel: (3, 3, 3, 1, C); bias, mul, add: (C,) (`mul`, `add`: BatchNorm's running-statistics
    affine map). Computed in `dtype` (default x's) with float32 accumulation and epilogue; odd sizes are floored
    by the pool as PyTorch's MaxPool3d(2). `interpret` (default: on any backend but a GPU) runs Pallas'
    interpreter instead of Triton, for tests on CPU.

    `tuning` overrides the dtype's `TUNING` entry (`tuning_for`): `tile` (pooled voxels per program, a power of two);
    `window`: gather the 4x4x4 input neighbourhood of each pooling window once (64 loads per pooled voxel, 8 dots with K
    = 64, 2.4x the FLOPs) instead of the 27 taps of each of its 8 conv outputs (216 loads, K = 32); `voxel_major`: a
    warp's lanes run along voxels (else along taps) in the gathered matrix; `num_warps`, `num_stages`: Triton's.
    """
    if not supported(x.shape, kernel.shape, True):
        raise ValueError(f"first_block needs a (B, D, H, W, 1) input with D, H, W >= 2 and a (3, 3, 3, 1, C) kernel, "
                         f"got {x.shape} and {kernel.shape}")
    options = _options(tuning, interpret, tuning_for(TUNING, dtype or x.dtype))
    f32 = jnp.float32
    call = _on_devices(lambda *a, axis: _block(*a, options, axis), 5, P("data"))
    return call(x.astype(dtype or x.dtype), kernel.astype(f32), bias.astype(f32), mul.astype(f32), add.astype(f32))


# ------------------------------------------------------------------------------------------------
# Train mode: BatchNorm with batch statistics. Forward: BatchNorm's per-channel affine map is monotone, so one kernel
# gives each window's maximum of the conv output (the minimum where the scale is negative), its position and
# per-program statistics, and the pooled output is that value mapped, at pooled size. Backward: only each window's
# selected voxel gets the pool's gradient, so BatchNorm's reductions over the full-resolution gradient are sums
# over pooled-size arrays, and a second kernel recomputes the conv output and accumulates the kernel gradient
# (the math of jaxtl.conv.conv_bn_pool_relu_train, the CPU version).


def _train_forward(x, kernel, bias, scale, beta, epsilon, options, axis):
    tile, window, voxel_major, num_warps, num_stages, interpret = options
    c = kernel.shape[-1]
    cp, grid = _channels(c), _Grid(x.shape, tile)
    vec = functools.partial(_channel_vector, cp=cp, voxel_major=voxel_major)
    rows = grid.steps * tile
    # sel_rows, pos_rows: (rows, cp), the layout the backward kernel reads back
    sel_rows, pos_rows, means, m2s = _launch(
        _train_kernel, grid, _padded_input(x),
        [_kernel_matrix(kernel[:, :, :, 0], cp, window, voxel_major, x.dtype), vec(bias),
         vec(jnp.where(scale < 0, -1.0, 1.0))], [],
        [((rows, cp), x.dtype, (tile, cp)), ((rows, cp), jnp.int8, (tile, cp)),
         ((grid.steps, cp), jnp.float32, (1, cp)), ((grid.steps, cp), jnp.float32, (1, cp))],
        name="sfcn_first_block_train", window=window, voxel_major=voxel_major, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    # Chan et al.'s parallel combination of the programs' (count, mean, M2)
    counts = 8 * np.clip(grid.count - tile * np.arange(grid.steps), 0, tile).astype(np.float32)[:, None]
    total = _psum(jnp.float32(8 * grid.count), axis)
    means, m2s = means[:, :c], m2s[:, :c]
    mean = _psum(jnp.sum(counts * means, axis=0), axis) / total
    var = _psum(jnp.sum(m2s, axis=0) + jnp.sum(counts * jnp.square(means - mean), axis=0), axis) / total
    mul = scale * lax.rsqrt(var + epsilon)
    sel = sel_rows[:grid.count, :c].reshape(*grid.pooled, c)
    out = jnp.maximum(sel.astype(jnp.float32) * mul + (beta - mean * mul), 0).astype(x.dtype)
    return (out, mean, var), (x, kernel, bias, sel, pos_rows, mean, var, scale, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _train_block(x, kernel, bias, scale, beta, epsilon, options, axis):
    return _train_forward(x, kernel, bias, scale, beta, epsilon, options, axis)[0]


def _train_backward(epsilon, options, axis, res, cts):
    x, kernel, bias, sel, pos_rows, mean, var, scale, beta = res
    # Per device under a data mesh (shard_map with check_vma=False): the cotangents of the replicated outputs (mean,
    # var) arrive divided by the device count, and the parameters' cotangents returned here are summed over the
    # devices afterwards. So BatchNorm's coefficients use sums over all devices; the gradients returned are this
    # device's share.
    g_out, g_mean_share, g_var_share = cts
    g_mean, g_var = _psum(g_mean_share, axis), _psum(g_var_share, axis)
    tile, _, voxel_major, num_warps, num_stages, interpret = options
    f32, dtype = jnp.float32, x.dtype
    c = kernel.shape[-1]
    cp, grid = _channels(c), _Grid(x.shape, tile)
    r, c0, c1, dz_share, dzy_share = bn_pool_backward(
        sel, g_out, mean, var, scale, beta, g_mean, g_var, eps=epsilon,
        count=_psum(jnp.float32(8 * grid.count), axis), total=functools.partial(_psum, axis=axis))  # D, H, W even
    r = r.astype(dtype)  # the kernel rounds dL/dy to dtype anyway
    vec = functools.partial(_channel_vector, cp=cp, voxel_major=voxel_major)
    pad = ((0, grid.steps * tile - grid.count), (0, cp - c))
    [dw] = _launch(
        _grad_kernel, grid, _padded_input(x),
        [_kernel_matrix(kernel[:, :, :, 0], cp, False, voxel_major, dtype), vec(bias), vec(c0), vec(c1)],
        [(pos_rows, (tile, cp)), (jnp.pad(r.reshape(-1, c), pad), (tile, cp))],
        [((grid.steps, cp, TAPS) if voxel_major else (grid.steps, TAPS, cp), f32,
          (1, cp, TAPS) if voxel_major else (1, TAPS, cp))],
        name="sfcn_first_block_grad", voxel_major=voxel_major, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret)
    dw = dw.sum(0)
    dw = (dw.T if voxel_major else dw)[:27, :c].reshape(kernel.shape)
    # The input's gradient, on XLA (XLA drops it when the input needs none, as for the network's input)
    def windows(a):  # (B, D/2, H/2, W/2, C) -> broadcastable against the windows of the conv output
        return a[:, :, None, :, None, :, None, :]

    y = (_conv(x, kernel) + bias).astype(dtype).astype(f32)
    pos = pos_rows[:grid.count, :c].reshape(*grid.pooled, c).astype(jnp.int32)
    at = np.arange(8).reshape(2, 2, 2)[None, None, :, None, :, None, :, None]  # POSITIONS order
    dz = jnp.where(at == windows(pos), windows(r.astype(f32)), 0).reshape(y.shape)
    dy = (dz + c0 + c1 * y).astype(dtype)
    dx = jax.vjp(lambda x: _conv(x, kernel.astype(dtype)), x)[1](dy.astype(f32))[0]
    return dx.astype(x.dtype), dw, g_mean_share.astype(f32), dzy_share, dz_share


_train_block.defvjp(_train_forward, _train_backward)


def train_supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], pool: bool) -> bool:
    """Whether `first_block_train` computes this block: as `supported`, with even D, H, W (the batch statistics
    cover every voxel, so none may fall outside the pooling windows)."""
    return supported(x_shape, kernel_shape, pool) and all(s % 2 == 0 for s in x_shape[1:4])


def first_block_train(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array, beta: jax.Array, *,
                      epsilon: float = 1e-5, dtype=None, interpret: bool | None = None, **tuning
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The train-mode first block, fused: relu(maxpool2(BatchNorm(conv3d(x) + bias))) with batch statistics.

    Returns (output, batch mean, biased batch variance), the statistics for the running averages, as `train_reference`.
    The full-resolution conv output is never stored: the forward kernel writes each window's selected value, its
    position and per-program statistics; the backward kernel recomputes the conv output to accumulate the kernel
    gradient. D, H, W must be even (`train_supported`). Differentiable in all array arguments (the input's gradient is
    XLA's, and dropped when not needed). `tuning` overrides the dtype's `TRAIN_TUNING` entry, as for `first_block` (the
    backward kernel always gathers taps).
    """
    if not train_supported(x.shape, kernel.shape, True):
        raise ValueError(f"first_block_train needs a (B, D, H, W, 1) input with even D, H, W and a (3, 3, 3, 1, C) "
                         f"kernel, got {x.shape} and {kernel.shape}")
    options = _options(tuning, interpret, tuning_for(TRAIN_TUNING, dtype or x.dtype))
    f32 = jnp.float32
    call = _on_devices(lambda *a, axis: _train_block(*a, float(epsilon), options, axis), 5, (P("data"), P(), P()))
    return call(x.astype(dtype or x.dtype), kernel.astype(f32), bias.astype(f32), scale.astype(f32),
                beta.astype(f32))
