"""Fast 3-D convolutions for CPUs: tiled im2col + one matrix multiply per tile.

XLA's CPU convolution runs SFCN's 3x3x3 convolutions at a third of the speed of its own matrix
multiply. Here a 'same'-padded, stride-1 convolution (NDHWC input, DHWIO kernel) is computed tile by
tile (a few depth slices and rows, about `TILE_BYTES`, sized by the CPU's L2 cache): one XLA gather builds the
tile's patch matrix (rows, k^3*Cin) from the padded input, small enough to stay in cache, and one matrix multiply
with the reshaped kernel (float32 accumulation) gives the tile's output. Two further gains come from doing more
per tile:

- `conv_bn_pool_relu` (inference): BatchNorm with running statistics, the 2x2x2 max-pool and the
  ReLU are applied to each tile before it is written, so the full-resolution conv output (the
  largest tensor of the network) is never stored.
- The 1-channel first layer (`Cin == 1`) folds `GROUP` neighbouring output positions along W into
  the matrix width: patches of 3x3x(GROUP+2) input voxels times a (9*(GROUP+2), GROUP*Cout) banded
  kernel. More FLOPs, but a matrix multiply of useful shape instead of one with K=27.

- `conv_bn_pool_relu_train` (training): the tile epilogue also computes BatchNorm's batch statistics and
  the pooled max and min of the conv output, and the backward forms BatchNorm's gradient from pooled-size
  sums, tile by tile where the kernel gradient consumes it.

bfloat16 tensors are moved as uint16 bit patterns (XLA's CPU backend otherwise widens every
slice and copy of them to float32). Gradients are defined with `jax.custom_vjp`: the input gradient
is the same fast convolution with the flipped, transposed kernel, and the kernel gradient is
accumulated tile by tile (patches^T @ output-gradient). Results match `lax.conv_general_dilated`
to float32 rounding (see tests/test_conv.py).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _l2_bytes(cache_dir: str | None = None) -> int | None:
    """The level-2 cache of a core this process may run on, in bytes (Linux sysfs), None where unknown."""
    if cache_dir is None:
        cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        cache_dir = f"/sys/devices/system/cpu/cpu{cpu}/cache"
    try:
        indices = sorted(i for i in os.listdir(cache_dir) if i.startswith("index"))
    except OSError:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in indices:
        try:
            fields = {}
            for name in ("level", "type", "size"):
                with open(os.path.join(cache_dir, index, name)) as f:
                    fields[name] = f.read().strip()
            if fields["level"] == "2" and fields["type"] in ("Unified", "Data"):
                size = fields["size"]
                return int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except (OSError, ValueError):
            continue  # an index without these files (some arm64 kernels), or an unreadable size
    return None


def default_tile_bytes() -> int:
    """Patch matrix + output of one tile: $JAXTL_TILE_MB if set, else 4x one core's L2 cache (4 MB where unknown),
    between 2 and 32 MB. Measured fastest (Peng's SFCN embed, float32): 4 MB on AMD Zen 5 with 1 MB of L2 (8 MB
    0.92x, 32 MB 0.85x); 8-32 MB on an Intel Xeon (family 6 model 207) with 2 MB of L2 (4 MB 0.90-0.94x of 8 MB)."""
    if os.environ.get("JAXTL_TILE_MB"):
        value = os.environ["JAXTL_TILE_MB"]
        try:
            mb = float(value)
        except ValueError:
            mb = float("nan")
        if 0 < mb < float("inf"):
            return max(1 << 16, int(mb * (1 << 20)))
        warnings.warn(f"JAXTL_TILE_MB={value!r} ignored: expected a positive number of megabytes (e.g. 8)",
                      stacklevel=2)
    l2 = _l2_bytes()
    return min(max(4 * l2, 2 << 20), 32 << 20) if l2 else 4 << 20


TILE_BYTES = default_tile_bytes()  # read once, when jaxtl.conv is imported
GROUP = 4  # first-layer output positions along W per matrix row (measured best of 2, 4, 8, 16)
IMPLS = ("auto", "xla", "fast", "pallas")


def default_impl() -> str:
    """What "auto" means: $JAXTL_CONV_IMPL ("xla", "fast" or "pallas") if set, else "fast" on a single CPU device,
    "pallas" on NVIDIA Hopper GPUs (`fused_first_block_gpu`) and "xla" elsewhere (other GPUs, TPUs, several CPU
    devices). The platform is the default device's (`jax.default_device`, e.g. a model run on the CPU of a GPU
    machine), else the default backend's; arrays placed elsewhere by hand need an explicit conv_impl."""
    forced = os.environ.get("JAXTL_CONV_IMPL", "").replace("auto", "")
    if forced in IMPLS[1:]:
        return forced
    if forced:
        raise ValueError(f"JAXTL_CONV_IMPL={forced!r}: use one of {', '.join(IMPLS[1:])} (or unset it)")
    platform = default_platform()
    if platform == "cpu":
        return "fast" if len(jax.devices("cpu")) == 1 else "xla"
    return "pallas" if platform == "gpu" and fused_first_block_gpu(jax.devices(platform)) else "xla"


def default_platform() -> str:
    """"cpu", "gpu", "tpu", ...: where computations without placed inputs run."""
    device = jax.config.jax_default_device  # set by `with jax.default_device(...)`: a Device or a platform name
    if device is None:
        return jax.default_backend()
    name = device if isinstance(device, str) else device.platform
    return "gpu" if name in ("cuda", "rocm") else name


def default_devices() -> list:
    """Every process's devices of the default device's platform: what the train mesh holds (`train.make_mesh`)."""
    return jax.devices(default_platform())


def fused_first_block_gpu(devices: list | None = None) -> bool:
    """Whether the fused first block (`jaxtl.first_block`, Pallas on Triton) is the default on these devices: NVIDIA
    GPUs of compute capability 9.x, where it was measured (H200: Peng's 1mm embed 2.2x, train step 4.7x the XLA
    path's, benchmarks/README.md), with Pallas' Triton backend importable. Other NVIDIA GPUs can ask for it with
    conv_impl="pallas" (not measured there)."""
    if not _hopper(jax.devices() if devices is None else devices):
        return False
    try:
        from jax.experimental.pallas import triton  # noqa: F401  (deprecated in JAX 0.11, gone in some later JAX)
    except ImportError:
        return False
    return True


def _hopper(devices) -> bool:
    """Whether `devices` are all NVIDIA GPUs of compute capability 9.x."""
    # CUDA devices carry compute_capability "major.minor" (AMD GPUs an architecture name, e.g. "gfx90a")
    return bool(devices) and all(d.platform == "gpu" and str(getattr(d, "compute_capability", "")).split(".")[0] == "9"
                                 for d in devices)


NHWC_OPTION = "xla_gpu_force_conv_nhwc"


def compiler_options(devices) -> dict[str, bool]:
    """XLA options of jaxtl's jitted steps (embed, train, eval) on `devices`: on NVIDIA GPUs of compute capability
    9.x, channels-last 3-D convolutions (`xla_gpu_force_conv_nhwc`). Without it XLA lays SFCN's convolutions out
    NCDHW and wraps cuDNN's channels-last kernels in transposes: on an H200 (bfloat16, batch 8, set through
    $XLA_FLAGS, 2026-11-27) Peng's 1mm embed ran 1581 -> 2167 vol/s and its train step 339 -> 430 vol/s
    (benchmarks/README.md). Not measured on other GPUs: there `XLA_FLAGS=--xla_gpu_force_conv_nhwc=true` asks for
    it. A setting of the flag in $XLA_FLAGS (true or false) wins over this default."""
    if NHWC_OPTION in os.environ.get("XLA_FLAGS", "") or not _hopper(devices):
        return {}
    return {NHWC_OPTION: True}


def trace_settings() -> tuple:
    """What a traced step reads besides its arguments: what "auto" means (`default_impl`) and the Pallas kernels'
    tunings (`first_block.TUNING` / `TRAIN_TUNING`). Cached jitted steps are keyed on it, so a change between calls
    is traced anew instead of running the old program. The kernel module is not imported here (it imports Pallas'
    Triton backend): not imported, it holds its defaults."""
    def frozen(v):
        return tuple(sorted((k, frozen(x)) for k, x in v.items())) if isinstance(v, dict) else v

    first = sys.modules.get("jaxtl.first_block")
    return default_impl(), first and (frozen(first.TUNING), frozen(first.TRAIN_TUNING))


def resolve_impl(impl: str) -> str:
    """Map "auto" to the implementation for the current backend."""
    if impl not in IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; use one of {', '.join(IMPLS)}")
    return default_impl() if impl == "auto" else impl


# ------------------------------------------------------------------------------------------------
# Tiling


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def _unbits(x: jax.Array, dtype) -> jax.Array:
    return lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _divisors(n: int, unit: int) -> list[int]:
    return [d for d in range(unit, n + 1, unit) if n % d == 0]


def plan_tiles(batch: int, depth: int, height: int, row_bytes: int, unit: int,
               tile_bytes: int = TILE_BYTES) -> tuple[int, int, int]:
    """(batch chunk, depth slices, rows) of one tile, about `tile_bytes` with `row_bytes` per row.

    Depth and rows are multiples of `unit` (2 when the tile is max-pooled) dividing `depth`/`height`.
    Prefers whole slices over split rows, and whole volumes (several per tile) when they are small.
    """
    slice_bytes = height * row_bytes
    if depth * slice_bytes <= tile_bytes:
        return max(b for b in _divisors(batch, 1) if b * depth * slice_bytes <= tile_bytes), depth, height
    depths = [t for t in _divisors(depth, unit) if t * slice_bytes <= tile_bytes]
    if depths:
        return 1, max(depths), height
    rows = [h for h in _divisors(height, unit) if unit * h * row_bytes <= tile_bytes]
    return 1, unit, max(rows) if rows else unit


def _grouped_kernel(w: jax.Array, g: int) -> jax.Array:
    """(3,3,3,1,O) -> (9*(g+2), g*O): output position m of a group of g reads input offsets m..m+2 along W."""
    k = w.shape[0]
    wk = w[:, :, :, 0, :]
    zero = jnp.zeros_like(wk[:, :, 0, :])
    rows = [jnp.stack([wk[:, :, i - m, :] if 0 <= i - m < k else zero for m in range(g)], axis=-2)
            for i in range(g + k - 1)]
    return jnp.stack(rows, axis=2).reshape(k * k * (g + k - 1), g * w.shape[-1])


def _patch_index(bc: int, depth: int, rows: int, nw: int, stride: int, nl: int, k: int,
                 padded: tuple[int, int, int]) -> np.ndarray:
    """Gather indices of a tile's patch matrix into the flattened padded input (B*Dp*Hp*Wp):
    row (b, t, h, w), column (i, j, m) -> voxel (b, t+i, h+j, w*stride+m), relative to the tile's origin."""
    dp, hp, wp = padded
    b, t, h, w, i, j, m = np.ix_(range(bc), range(depth), range(rows), range(nw), range(k), range(k), range(nl))
    idx = ((b * dp + t + i) * hp + h + j) * wp + w * stride + m
    return idx.reshape(bc * depth * rows * nw, k * k * nl).astype(np.int32)


def _check_index_range(voxels: int) -> None:
    if voxels >= 2**31:
        raise ValueError(f"{voxels} padded voxels in one call exceed the fast path's int32 indices; "
                         "split the batch or use conv_impl='xla'")


def _gather(src: jax.Array, idx: np.ndarray, base: jax.Array) -> jax.Array:
    """src[idx + base] along axis 0: one XLA gather (much cheaper to compile than 27 slices and a concat)."""
    return src.at[jnp.asarray(idx) + base].get(mode="promise_in_bounds")


def _conv_tiles(x: jax.Array, w: jax.Array, *, unit: int, tile_bytes: int):
    """Tile plan and per-tile convolution of `x` (B,D,H,W,C) with `w` (k,k,k,C,O), same padding, stride 1.

    Returns `tile(b0, d0, h0)` -> float32 (bc, t, th, W, O), the conv (no bias) of the tile at that origin,
    `(bc, t, th)` and the tile counts `(nb, nd, nh)`; depth and rows are multiples of `unit` and cover
    D and H floored to `unit`.
    """
    dtype = x.dtype
    n, d, h, wd, c = x.shape
    k, o = w.shape[0], w.shape[-1]
    p = k // 2
    depth, height = d // unit * unit, h // unit * unit
    grouped = c == 1 and k == 3 and wd % GROUP == 0 and o > 1
    if grouped:  # columns (i, j, m), m = 0..GROUP+1 along W; GROUP outputs per row
        wm, nw, stride, nl = _grouped_kernel(w, GROUP), wd // GROUP, GROUP, GROUP + 2
    else:  # columns (i, j, m, c)
        wm, nw, stride, nl = w.reshape(k**3 * c, o), wd, 1, k
    row_bytes = nw * (wm.shape[0] * dtype.itemsize + wm.shape[1] * 4)
    wm = wm.astype(dtype)
    bc, t, th = plan_tiles(n, depth, height, row_bytes, unit, tile_bytes)
    xp = _bits(x)
    if p:
        xp = jnp.pad(xp, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    dp, hp, wp = xp.shape[1:4]
    _check_index_range(n * dp * hp * wp)
    idx = _patch_index(bc, t, th, nw, stride, nl, k, (dp, hp, wp))
    src = xp.reshape(-1) if grouped else xp.reshape(-1, c)

    def tile(b0, d0, h0):
        pm = _gather(src, idx, ((b0 * dp + d0) * hp + h0) * wp).reshape(idx.shape[0], -1)
        return jnp.dot(_unbits(pm, dtype), wm, preferred_element_type=jnp.float32).reshape(bc, t, th, wd, o)

    return tile, (bc, t, th), (n // bc, depth // t, height // th)


def _for_tiles(fn: Callable, tiles: tuple[int, int, int], counts: tuple[int, int, int], carry=None):
    """Run `fn(b0, d0, h0, carry) -> (outputs, carry)` over all tiles in a `fori_loop`.

    Each output of a tile, shaped (bc, t', h', ...), is written at (b0, d0 * t'/t, h0 * h'/th) of its
    whole array (so full-resolution and pooled outputs both work). Returns (whole outputs, carry).
    """
    bc, t, th = tiles
    nb, nd, nh = counts
    if nb * nd * nh == 1:
        return fn(0, 0, 0, carry)
    shapes = jax.eval_shape(lambda: fn(0, 0, 0, carry)[0])
    outs = tuple(jnp.zeros((nb * s.shape[0], nd * s.shape[1], nh * s.shape[2], *s.shape[3:]), s.dtype)
                 for s in shapes)

    def body(i, state):
        outs, carry = state
        bi, di, hi = i // (nd * nh), i // nh % nd, i % nh
        ys, carry = fn(bi * bc, di * t, hi * th, carry)
        outs = tuple(lax.dynamic_update_slice(a, y, (bi * y.shape[0], di * y.shape[1], hi * y.shape[2])
                                              + (0,) * (y.ndim - 3)) for a, y in zip(outs, ys, strict=True))
        return outs, carry

    return lax.fori_loop(0, nb * nd * nh, body, (outs, carry))


def _tiled(x: jax.Array, w: jax.Array, epilogue: Callable[[jax.Array], jax.Array], *, pool: bool,
           tile_bytes: int) -> jax.Array:
    """Same-padded stride-1 conv of `x` (B,D,H,W,C) with `w` (k,k,k,C,O) in x.dtype with float32
    accumulation, tile by tile; `epilogue` maps each float32 tile (b,T,h,W,O) to its output tile
    (halved in D, H, W when `pool`: only the voxels the 2x2x2 pool keeps are computed)."""
    tile, tiles, counts = _conv_tiles(x, w, unit=2 if pool else 1, tile_bytes=tile_bytes)
    (y,), _ = _for_tiles(lambda b0, d0, h0, c: ((_bits(epilogue(tile(b0, d0, h0)).astype(x.dtype)),), c),
                         tiles, counts)
    return _unbits(y, x.dtype)


def _patches(x: jax.Array, k: int, tiles: tuple[int, int, int]) -> Callable[[int, int, int], jax.Array]:
    """`patches(b0, d0, h0)` -> the (bc*t*th*W, k^3*C) im2col matrix (x.dtype) of the tile at that origin."""
    n, d, h, wd, c = x.shape
    p = k // 2
    xp = _bits(x)
    if p:
        xp = jnp.pad(xp, ((0, 0), (p, p), (p, p), (p, p), (0, 0)))
    dp, hp, wp = xp.shape[1:4]
    _check_index_range(n * dp * hp * wp)
    idx = _patch_index(*tiles, wd, 1, k, k, (dp, hp, wp))
    src = xp.reshape(-1, c)
    return lambda b0, d0, h0: _unbits(_gather(src, idx, ((b0 * dp + d0) * hp + h0) * wp).reshape(-1, k**3 * c),
                                      x.dtype)


def _kernel_grad(x: jax.Array, dy: jax.Array, k: int, tile_bytes: int) -> jax.Array:
    """dL/dw (k,k,k,C,O) float32 = sum over tiles of patches(x)^T @ dy."""
    n, d, h, wd, c = x.shape
    o = dy.shape[-1]
    tiles = plan_tiles(n, d, h, wd * (k**3 * c + o) * x.dtype.itemsize, 1, tile_bytes)
    patches, dyb = _patches(x, k, tiles), _bits(dy)

    def fn(b0, d0, h0, acc):
        g = _unbits(lax.dynamic_slice(dyb, (b0, d0, h0, 0, 0), (*tiles, wd, o)), dy.dtype).reshape(-1, o)
        return (), acc + _tn_dot(patches(b0, d0, h0), g)

    _, acc = _for_tiles(fn, tiles, (n // tiles[0], d // tiles[1], h // tiles[2]), jnp.zeros((k**3 * c, o), jnp.float32))
    return acc.reshape(k, k, k, c, o)


def _tn_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a^T @ b in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ------------------------------------------------------------------------------------------------
# Public ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, w, b, tile_bytes):
    return _tiled(x, w, lambda y: y + b.astype(jnp.float32), pool=False, tile_bytes=tile_bytes)


def _conv_fwd(x, w, b, tile_bytes):
    return _conv(x, w, b, tile_bytes), (x, w, b)


def _conv_bwd(tile_bytes, res, dy):
    x, w, b = res
    wt = jnp.flip(w, (0, 1, 2)).swapaxes(3, 4)  # the transposed convolution of a same-padded conv
    dx = _tiled(dy.astype(x.dtype), wt.astype(x.dtype), lambda y: y, pool=False, tile_bytes=tile_bytes)
    dw = _kernel_grad(x, dy.astype(x.dtype), w.shape[0], tile_bytes)
    db = dy.astype(jnp.float32).sum(axis=(0, 1, 2, 3))
    return dx, dw.astype(w.dtype), db.astype(b.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)
_conv_jit = jax.jit(_conv, static_argnums=3)  # one compilation per shape also when called eagerly


def conv3d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, dtype=None,
           tile_bytes: int = TILE_BYTES) -> jax.Array:
    """Same-padded, stride-1 3-D convolution: x (B,D,H,W,Cin), kernel (k,k,k,Cin,Cout) with odd k,
    bias (Cout,) -> (B,D,H,W,Cout) in `dtype` (default x.dtype), accumulated in float32.

    Equals `lax.conv_general_dilated(x, kernel, (1,1,1), "SAME", ("NDHWC","DHWIO","NDHWC")) + bias`
    to float32 rounding; differentiable in x, kernel and bias (reverse mode).
    """
    dtype = jnp.dtype(dtype or x.dtype)
    _check(x, kernel)
    bias = jnp.zeros((kernel.shape[-1],), jnp.float32) if bias is None else bias
    return _conv_jit(x.astype(dtype), kernel.astype(dtype), bias, tile_bytes)


def _windows(x: jax.Array) -> jax.Array:
    n, d, h, w, c = x.shape
    return x[:, :d // 2 * 2, :h // 2 * 2, :w // 2 * 2].reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool2(x: jax.Array) -> jax.Array:
    """2x2x2 max-pool, stride 2, odd sizes floored (NDHWC): `nnx.max_pool(x, (2,2,2), (2,2,2), "VALID")` with
    the same gradient (each window's first maximum gets it, also for ties), computed 5x faster on CPU than
    XLA's select-and-scatter."""
    return _windows(x).max(axis=(2, 4, 6))


def _pool_fwd(x):
    y = max_pool2(x)
    return y, (x, y)


def pool_grad(y: jax.Array, sel: jax.Array, g: jax.Array) -> jax.Array:
    """Gradient of a 2x2x2 max-pool that selected `sel` from `y` (b,2t,2h,2w,o): `g` (b,t,h,w,o) goes to each
    window's first voxel equal to `sel` in reduce_window's order (as XLA's select-and-scatter), zero elsewhere."""
    n, d, h, w, c = y.shape
    yw = y.reshape(n, d // 2, 2, h // 2, 2, w // 2, 2, c)
    pos = (4 * lax.broadcasted_iota(jnp.int32, yw.shape, 2) + 2 * lax.broadcasted_iota(jnp.int32, yw.shape, 4)
           + lax.broadcasted_iota(jnp.int32, yw.shape, 6))
    expand = lambda a: a[:, :, None, :, None, :, None, :]
    first = jnp.where(yw == expand(sel), pos, 8).min(axis=(2, 4, 6), keepdims=True)
    return jnp.where(pos == first, expand(g), 0).reshape(y.shape)


def _pool_bwd(res, g):
    x, y = res
    n, d, h, w, c = x.shape
    dx = pool_grad(x[:, :d // 2 * 2, :h // 2 * 2, :w // 2 * 2], y, g)
    return (jnp.pad(dx, ((0, 0), (0, d % 2), (0, h % 2), (0, w % 2), (0, 0))).astype(x.dtype),)


max_pool2.defvjp(_pool_fwd, _pool_bwd)


def _block_reference(x, w, b, mul, add, pool, tile_bytes=TILE_BYTES):
    """The unfused composition (used for gradients of the fused block)."""
    y = _conv(x, w, b, tile_bytes).astype(jnp.float32) * mul + add
    if pool:
        y = max_pool2(y)
    return jnp.maximum(y, 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _block(x, w, b, mul, add, pool, tile_bytes):
    scale = mul.astype(jnp.float32)
    shift = b.astype(jnp.float32) * scale + add.astype(jnp.float32)

    def epilogue(y):
        y = y * scale + shift
        if pool:
            bc, t, th, wd, o = y.shape
            y = y[:, :, :, :wd // 2 * 2].reshape(bc, t // 2, 2, th // 2, 2, wd // 2, 2, o).max(axis=(2, 4, 6))
        return jnp.maximum(y, 0)

    return _tiled(x, w, epilogue, pool=pool, tile_bytes=tile_bytes)


def _block_fwd(x, w, b, mul, add, pool, tile_bytes):
    return _block(x, w, b, mul, add, pool, tile_bytes), (x, w, b, mul, add)


def _block_bwd(pool, tile_bytes, res, ct):
    _, vjp = jax.vjp(functools.partial(_block_reference, pool=pool, tile_bytes=tile_bytes), *res)
    return vjp(ct)


_block.defvjp(_block_fwd, _block_bwd)
_block_jit = jax.jit(_block, static_argnums=(5, 6))


def conv_bn_pool_relu(x: jax.Array, kernel: jax.Array, bias: jax.Array, mul: jax.Array, add: jax.Array, *,
                      pool: bool, dtype=None, tile_bytes: int = TILE_BYTES) -> jax.Array:
    """SFCN's inference block, fused: relu(maxpool2(conv3d(x) * mul + add)) (no pool if `pool` is False).

    `mul`, `add` (Cout,) are BatchNorm's running-statistics affine map. The max-pool floors odd sizes as
    PyTorch's MaxPool3d(2). Computed in `dtype` with a float32 epilogue; only pooled outputs are stored.
    """
    dtype = jnp.dtype(dtype or x.dtype)
    _check(x, kernel)
    f32 = jnp.float32
    return _block_jit(x.astype(dtype), kernel.astype(dtype), bias.astype(f32), mul.astype(f32), add.astype(f32),
                  bool(pool), tile_bytes)


# ------------------------------------------------------------------------------------------------
# Train-mode block: conv -> BatchNorm (batch statistics) -> max-pool 2 -> ReLU, fused


def _bn_train_fwd(x, w, b, scale, beta, eps, tile_bytes):
    """The block's forward; also returns the residuals of its gradient."""
    dtype, f32 = x.dtype, jnp.float32
    n, d, h, wd, _ = x.shape
    o = w.shape[-1]
    tile, tiles, counts = _conv_tiles(x, w, unit=2, tile_bytes=tile_bytes)
    rows = math.prod(tiles) * wd
    keep = _keep_conv_output(x)

    def fn(b0, d0, h0, carry):
        i, mean, m2 = carry
        y = (tile(b0, d0, h0) + b.astype(f32)).astype(dtype)  # as stored: statistics and pooling see the same values
        yf = y.astype(f32).reshape(-1, o)
        tm = yf.mean(0)
        delta = tm - mean  # Chan et al.'s pairwise update: numerically safe, one pass over the tile in cache
        mean = mean + delta / (i + 1)
        m2 = m2 + jnp.square(yf - tm).sum(0) + jnp.square(delta) * (rows * i / (i + 1))
        yw = _windows(y)
        ymax, ymin = yw.max(axis=(2, 4, 6)), yw.min(axis=(2, 4, 6))
        return (_bits(ymax), _bits(ymin)) + ((_bits(y),) if keep else ()), (i + 1, mean, m2)

    zeros = jnp.zeros((o,), f32)
    (ymax, ymin, *y), (_, mean, m2) = _for_tiles(fn, tiles, counts, (jnp.float32(0), zeros, zeros))
    var = m2 / (n * d * h * wd)
    mul = scale * lax.rsqrt(var + eps)
    # max-pool commutes with the per-channel affine map x*mul+add where mul >= 0; where mul < 0 the
    # maximum of the normalised values is at the minimum of y.
    sel = jnp.where(mul >= 0, _unbits(ymax, dtype), _unbits(ymin, dtype))
    out = jnp.maximum(sel.astype(f32) * mul + (beta - mean * mul), 0).astype(dtype)
    return (out, mean, var), (x, w, b, y, sel, mean, var, scale, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _bn_train(x, w, b, scale, beta, eps, tile_bytes):
    return _bn_train_fwd(x, w, b, scale, beta, eps, tile_bytes)[0]


def bn_pool_backward(sel, g_out, mean, var, scale, beta, g_mean, g_var, *, eps, count, total=lambda v: v):
    """BatchNorm's backward through the fused train block, from pooled-size arrays: `sel` (the conv output the pool
    selected), `g_out` (the block output's cotangent), the batch statistics over `count` conv outputs and their
    cotangents `g_mean`, `g_var`. Only each window's selected voxel gets a gradient from the pool, so BatchNorm's
    reductions over the full-resolution gradient are sums over pooled-size arrays.

    Returns (r, c0, c1, dz, dzy): dL/dy = r at each window's selected voxel (0 elsewhere) + c0 + c1 * y; dz and dzy
    are the sums over these arrays (the gradients of BatchNorm's bias and scale); `total` sums them over devices
    where the batch is split (for c0 and c1)."""
    f32 = jnp.float32
    inv = lax.rsqrt(var + eps)
    mul = scale * inv
    sf = sel.astype(f32)
    axes = (0, 1, 2, 3)
    dr = jnp.where(sf * mul + (beta - mean * mul) > 0, g_out.astype(f32), 0)
    dz, dzy = dr.sum(axes), (dr * (sf - mean) * inv).sum(axes)
    s_dz, s_dzy = total(dz), total(dzy)
    # plus the cotangents of mean and var
    c1 = -mul * inv * s_dzy / count + 2 * g_var / count
    c0 = -mul * s_dz / count + mul * inv * mean * s_dzy / count + g_mean / count - 2 * g_var * mean / count
    return dr * mul, c0, c1, dz, dzy


def _bn_train_bwd(eps, tile_bytes, res, cts):
    x, w, b, kept, sel, mean, var, scale, beta = res
    g_out, g_mean, g_var = cts
    dtype, f32 = x.dtype, jnp.float32
    n, d, h, wd, c = x.shape
    k, o = w.shape[0], w.shape[-1]
    r, c0, c1, s_dz, s_dzy = bn_pool_backward(sel, g_out, mean, var, scale, beta, g_mean, g_var, eps=eps,
                                              count=n * d * h * wd)
    tile, tiles, counts = _conv_tiles(x, w, unit=2, tile_bytes=tile_bytes)
    bc, t, th = tiles
    patches = _patches(x, k, tiles)

    def fn(b0, d0, h0, acc):
        if kept:
            y = _unbits(lax.dynamic_slice(kept[0], (b0, d0, h0, 0, 0), (bc, t, th, wd, o)), dtype)
        else:
            y = (tile(b0, d0, h0) + b.astype(f32)).astype(dtype)
        at, size = (b0, d0 // 2, h0 // 2, 0, 0), (bc, t // 2, th // 2, wd // 2, o)
        s, rt = _unbits(lax.dynamic_slice(_bits(sel), at, size), dtype), lax.dynamic_slice(r, at, size)
        dy = (pool_grad(y, s, rt) + c0 + c1 * y.astype(f32)).astype(dtype)
        return (_bits(dy),), acc + _tn_dot(patches(b0, d0, h0), dy.reshape(-1, o))

    (dy,), dw = _for_tiles(fn, tiles, counts, jnp.zeros((k**3 * c, o), f32))
    # XLA drops this (and dy) when x needs no gradient, as for the network's input
    wt = jnp.flip(w, (0, 1, 2)).swapaxes(3, 4).astype(dtype)
    dx = _tiled(_unbits(dy, dtype), wt, lambda y: y, pool=False, tile_bytes=tile_bytes)
    return dx, dw.reshape(w.shape).astype(w.dtype), g_mean.astype(f32), s_dzy, s_dz


def _keep_conv_output(x: jax.Array) -> bool:
    """Whether the train block stores its conv output for the backward or recomputes it there: for the
    1-channel first layer recomputing (a cheap matmul per tile) beats writing and re-reading the
    largest tensor of the network (measured: block 0 at 2mm, batch 4)."""
    return x.shape[-1] > 1


_bn_train.defvjp(lambda *a: _bn_train_fwd(*a), _bn_train_bwd)
_bn_train_jit = jax.jit(_bn_train, static_argnums=(5, 6))


def fused_train_ok(shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
    """Whether `conv_bn_pool_relu_train` takes this block: a pooled block with even D, H, W (BatchNorm
    statistics cover all voxels, so none may fall outside the pooled tiles)."""
    return len(shape) == 5 and all(s % 2 == 0 for s in shape[1:4]) and kernel_shape[0] % 2 == 1


def conv_bn_pool_relu_train(x: jax.Array, kernel: jax.Array, bias: jax.Array, scale: jax.Array, beta: jax.Array,
                            *, epsilon: float = 1e-5, dtype=None, tile_bytes: int = TILE_BYTES
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SFCN's training block, fused: relu(maxpool2(BatchNorm(conv3d(x)))) with batch statistics.

    Returns (output, batch mean, biased batch variance) (the statistics for the running averages).
    The conv output is written once; statistics, pooling and the BatchNorm backward run on tiles in
    cache, and the backward's reductions over the pooled gradient only. x's D, H, W must be even
    (`fused_train_ok`). Differentiable in x, kernel, bias, scale and beta.
    """
    dtype = jnp.dtype(dtype or x.dtype)
    _check(x, kernel)
    if not fused_train_ok(x.shape, kernel.shape):
        raise ValueError(f"conv_bn_pool_relu_train needs even D, H, W, got input {x.shape}")
    f32 = jnp.float32
    return _bn_train_jit(x.astype(dtype), kernel.astype(dtype), bias.astype(f32), scale.astype(f32),
                         beta.astype(f32), float(epsilon), tile_bytes)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 5 or kernel.ndim != 5 or kernel.shape[3] != x.shape[-1] or kernel.shape[0] % 2 != 1 \
            or len(set(kernel.shape[:3])) != 1:
        raise ValueError(f"expected x (B,D,H,W,C) and a cubic odd kernel (k,k,k,C,O), got {x.shape}, {kernel.shape}")
