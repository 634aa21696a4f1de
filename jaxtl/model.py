"""SFCN (Peng et al. 2021) in Flax NNX, with PyTorch's initialisation and BatchNorm semantics.

Layout is NDHWC: `(B, D, H, W, 1)` or `(B, D, H, W)`; spatial axes stay in nibabel's order
(x = L-R, y = P-A, z = I-S), so Peng's weights apply after transposing NCDHW -> NDHWC.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtl.conv import (
    compiler_options,
    conv3d,
    conv_bn_pool_relu,
    conv_bn_pool_relu_train,
    fused_train_ok,
    max_pool2,
    resolve_impl,
)

PENG_CHANNELS = (32, 64, 128, 256, 256, 64)  # Peng's UKB age model
TRANSFER_CHANNELS = (32, 64, 64, 64, 64, 64)  # the paper's transfer runs
SEX_CHANNELS = (28, 58, 128, 256, 256, 64)  # Peng's public sex model
# What a trained SFCN consists of (the dropout RNG state is not part of it).
WEIGHTS = (nnx.Param, nnx.BatchStat)


def _torch_uniform(fan_in: int):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nnx.Module):
    """BatchNorm with PyTorch's semantics: biased variance to normalise, unbiased variance for the
    running average, `momentum` in Flax's convention (PyTorch 0.1 = 0.9 here), eps 1e-5.

    Written here instead of `nnx.BatchNorm` because Flax updates the running variance with the
    biased estimate, so running statistics would drift from PyTorch's during training.
    Statistics are computed in float32 whatever the compute dtype; under `jit` with the batch
    sharded over devices the mean is over the global batch (synchronised BN).
    """

    def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
                 dtype=jnp.float32, use_running_average: bool = False):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_running_average = use_running_average

    def set_view(self, use_running_average: bool | None = None):
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def update_statistics(self, mean: jax.Array, var: jax.Array, count: int) -> None:
        """Fold a batch's mean and biased variance over `count` values into the running averages."""
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * mean
        self.var[...] = m * self.var[...] + (1 - m) * var * (count / max(count - 1, 1))

    def __call__(self, x: jax.Array, shift: jax.Array | None = None) -> jax.Array:
        """BatchNorm of `x + shift` (`shift`: per channel, e.g. the conv's bias), with `shift` folded into the
        affine map (eval) or the running mean (train, where the batch mean cancels it) instead of added to `x`."""
        shift = jnp.zeros((), jnp.float32) if shift is None else shift.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...] - shift, self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)
            self.update_statistics(mean + jax.lax.stop_gradient(shift), var, math.prod(x.shape[:-1]))
        mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        add = self.bias[...] - mean * mul
        return (x * mul.astype(self.dtype) + add.astype(self.dtype)).astype(self.dtype)


class ConvBlock(nnx.Module):
    """Conv3d -> BatchNorm -> [MaxPool 2] -> ReLU, in Peng's order.

    `conv_impl`: "xla" (`nnx.Conv`), "fast" (`jaxtl.conv`: tiled im2col matmuls; the whole block is fused,
    in train mode when D, H, W are even), "pallas" (the XLA path, but the 1-channel first block as fused GPU kernels,
    `jaxtl.first_block`, in eval and, for even D, H, W, train mode, on one device or per device under a "data"
    mesh; measured on an H200: embed 2.2x, train step 4.7x the XLA path's; interpreted, slowly, off a GPU) or "auto"
    (fast on a single CPU device, pallas on Hopper GPUs, XLA elsewhere: `jaxtl.conv.default_impl`). Same parameters
    either way.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, pool: bool, *, dtype, rngs: nnx.Rngs,
                 conv_impl: str = "auto"):
        fan_in = in_ch * kernel**3
        self.conv = nnx.Conv(
            in_ch, out_ch, (kernel,) * 3, padding=((kernel // 2, kernel // 2),) * 3,
            dtype=dtype, param_dtype=jnp.float32,
            kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in), rngs=rngs,
        )
        self.bn = BatchNorm(out_ch, dtype=dtype)
        self.pool = pool
        resolve_impl(conv_impl)  # validate the name
        self.conv_impl = conv_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        impl = resolve_impl(self.conv_impl)
        if impl == "fast":
            return self._fast(x)
        if impl == "pallas":
            y = self._pallas(x)
            if y is not None:
                return y
        # the conv's bias goes into BatchNorm's affine map (exact up to rounding, closer to float32 in bfloat16):
        # meant to give XLA a plain cuDNN convolution instead of a conv-bias one, whose unused side input cuDNN
        # transposed to channels-last on Hopper (0.75 ms of the 1mm bfloat16 embed step on an H200 by the
        # 2026-11-27 profile); what XLA now emits on a GPU is not measured yet
        x = self.bn(self._conv_without_bias(x), shift=self.conv.bias[...])
        if self.pool:
            # `max_pool2` = nnx.max_pool's values and gradient without XLA's select-and-scatter: measured on an
            # H200 (benchmarks/README.md) +6% bfloat16 train step, 47 -> 17 s compile, embed within 2%; not
            # measured on TPU
            x = max_pool2(x)
        return nnx.relu(x)

    def _conv_without_bias(self, x: jax.Array) -> jax.Array:
        """`self.conv(x)` without adding its bias (what `nnx.Conv` computes, channels-last)."""
        conv = self.conv
        x, kernel = x.astype(conv.dtype), conv.kernel[...].astype(conv.dtype)
        return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), conv.padding,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=conv.precision)

    def _pallas(self, x: jax.Array) -> jax.Array | None:
        """The first block by `jaxtl.first_block`'s kernels; None where they do not apply (other blocks, odd sizes in
        train mode, several devices without a data mesh)."""
        from jaxtl import first_block  # here: Pallas' Triton backend is deprecated (JAX 0.11)

        kernel, bias, bn = self.conv.kernel[...], self.conv.bias[...], self.bn
        if not first_block.supported(x.shape, kernel.shape, self.pool):
            return None
        if not first_block.runs_here():
            if self.conv_impl == "auto":  # Hopper GPUs' default: XLA's block is the quiet fallback
                return None
            warnings.warn("conv_impl='pallas' runs on one device or under a 1-D 'data' mesh (jax.set_mesh, as "
                          "jaxtl's train and embed steps trace); using XLA's first block", stacklevel=3)
            return None
        if bn.use_running_average:
            mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
            add = bn.bias[...] - bn.mean[...] * mul
            return first_block.first_block(x, kernel, bias, mul, add, dtype=self.conv.dtype)
        if not first_block.train_supported(x.shape, kernel.shape, self.pool):
            return None
        y, mean, var = first_block.first_block_train(x, kernel, bias, bn.scale[...], bn.bias[...],
                                                     epsilon=bn.epsilon, dtype=self.conv.dtype)
        bn.update_statistics(mean, var, math.prod(x.shape[:-1]))
        return y

    def _fast(self, x: jax.Array) -> jax.Array:
        kernel, bias, bn = self.conv.kernel[...], self.conv.bias[...], self.bn
        if bn.use_running_average:
            mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
            add = bn.bias[...] - bn.mean[...] * mul
            return conv_bn_pool_relu(x, kernel, bias, mul, add, pool=self.pool, dtype=self.conv.dtype)
        if self.pool and fused_train_ok(x.shape, kernel.shape):
            y, mean, var = conv_bn_pool_relu_train(x, kernel, bias, bn.scale[...], bn.bias[...],
                                                   epsilon=bn.epsilon, dtype=self.conv.dtype)
            bn.update_statistics(mean, var, math.prod(x.shape[:-1]))
            return y
        x = bn(conv3d(x, kernel, bias, dtype=self.conv.dtype))
        return nnx.relu(max_pool2(x) if self.pool else x)


def min_input_side(n_blocks: int) -> int:
    """The smallest side (voxels) of an SFCN input with `n_blocks` blocks: every block but the last halves D, H, W."""
    return 2 ** (n_blocks - 1)


def check_train_batch(batch_size: int, n_blocks: int, shape: tuple[int, ...]) -> None:
    """Refuse a training batch whose last BatchNorm would normalise over a single value (a batch of 1 where the last
    block is 1x1x1, e.g. 4mm inputs): its output is then constant and no gradient reaches the earlier blocks
    (PyTorch refuses it too: "Expected more than 1 value per channel when training")."""
    side = 2 ** (n_blocks - 1)
    voxels = math.prod(s // side for s in shape)
    if batch_size * voxels < 2:
        raise ValueError(f"a training batch of {batch_size} at input {'x'.join(map(str, shape))} leaves the last "
                         f"block's BatchNorm {batch_size * voxels} value per channel to normalise (no gradient "
                         "passes it): train with a batch of at least 2")


COMPUTE_DTYPES = tuple(map(jnp.dtype, ("float32", "bfloat16", "float16")))


def check_compute_dtype(dtype: Any) -> None:
    """Raise a ValueError unless `dtype` is one the network computes in (an int dtype gave all-zero features)."""
    try:
        ok = jnp.dtype(dtype) in COMPUTE_DTYPES
    except TypeError:  # not a dtype at all, e.g. "bogus"
        ok = False
    if not ok:
        raise ValueError(f"dtype={dtype!r}: the network computes in float32, bfloat16 or float16")


class SFCN(nnx.Module):
    """Simple Fully Convolutional Network (Peng et al. 2021).

    Blocks 0..n-2: Conv k=3 pad 1 -> BN -> MaxPool 2 -> ReLU; last block: Conv k=1 -> BN -> ReLU;
    then global average pool (= Peng's AvgPool3d([5,6,5]) at 160x192x160), dropout, a linear head
    (Peng's 1x1x1 `conv_6`) and log-softmax. `conv_impl` selects the convolution ("auto", "xla",
    "fast", "pallas"; see `ConvBlock`); parameters are the same for all.
    """

    def __init__(self, channels: Sequence[int] = PENG_CHANNELS, num_outputs: int = 40,
                 dropout: float = 0.5, dtype=jnp.float32, *, rngs: nnx.Rngs, conv_impl: str = "auto"):
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"SFCN needs at least 2 blocks, got channels={channels}")
        check_compute_dtype(dtype)
        self.channels = channels
        self.num_outputs = num_outputs
        self.dtype = dtype
        self.conv_impl = conv_impl
        in_chs = (1,) + channels[:-1]
        n = len(channels)
        self.blocks = nnx.List([
            ConvBlock(i, o, 3 if b < n - 1 else 1, pool=b < n - 1, dtype=dtype, rngs=rngs, conv_impl=conv_impl)
            for b, (i, o) in enumerate(zip(in_chs, channels, strict=True))
        ])
        self.dropout = nnx.Dropout(dropout)  # keys are passed per call (`rngs=`), so the state holds no RNG
        self.head = nnx.Linear(
            channels[-1], num_outputs, param_dtype=jnp.float32,
            kernel_init=_torch_uniform(channels[-1]), bias_init=_torch_uniform(channels[-1]), rngs=rngs,
        )

    def _prepare(self, x: jax.Array) -> jax.Array:
        if x.ndim == 4:
            x = x[..., None]
        if x.ndim != 5 or x.shape[-1] != 1:
            raise ValueError(f"SFCN expects (B, D, H, W) or (B, D, H, W, 1) volumes, got shape {x.shape}")
        smallest = min_input_side(len(self.blocks))
        if min(x.shape[1:4]) < smallest:
            raise ValueError(f"volumes of shape {x.shape[1:4]} are too small for {len(self.blocks)} blocks: each "
                             f"side must be at least {smallest} voxels (160x192x160 at 1mm, 40x48x40 at 4mm)")
        return x.astype(self.dtype)

    def block_outputs(self, x: jax.Array) -> list[jax.Array]:
        """Feature maps after each block (compute dtype)."""
        x = self._prepare(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def features(self, x: jax.Array) -> jax.Array:
        """The 64-d average-pooled output of the last block that the paper re-uses (float32)."""
        return self.block_outputs(x)[-1].astype(jnp.float32).mean(axis=(1, 2, 3))

    def head_logits(self, feats: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Log-probabilities from pooled features: dropout -> linear -> log-softmax.

        In train mode dropout needs `rngs` (e.g. `nnx.Rngs(dropout=key)`); eval mode ignores it.
        """
        return jax.nn.log_softmax(self.head(self.dropout(feats, rngs=rngs)), axis=-1)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Log-probabilities `(B, num_outputs)`, float32."""
        return self.head_logits(self.features(x), rngs)


def on_mesh(fn, mesh: jax.sharding.Mesh):
    """`fn` traced under `mesh` (as its abstract mesh): what jaxtl's jitted train, eval and embed steps run, so that
    layers computed per device (`conv_impl="pallas"`'s first block, `jaxtl.first_block.data_mesh`) find the batch's
    "data" mesh."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def jit_on_mesh(fn, mesh: jax.sharding.Mesh, **jit_kwargs):
    """`jax.jit(on_mesh(fn, mesh), **jit_kwargs)` compiled with the XLA options for the mesh's devices
    (`conv.compiler_options`: channels-last convolutions on Hopper GPUs): how jaxtl's steps are jitted."""
    return jax.jit(on_mesh(fn, mesh), compiler_options=compiler_options(list(mesh.devices.flat)) or None,
                   **jit_kwargs)


def conv_flops(channels: Sequence[int], input_shape: Sequence[int]) -> int:
    """Analytic FLOPs (2 x MACs) of SFCN's convolutions for one volume (forward)."""
    d, h, w = input_shape
    flops, cin, n = 0, 1, len(channels)
    for b, cout in enumerate(channels):
        k = 3 if b < n - 1 else 1
        flops += 2 * d * h * w * cin * cout * k**3
        if b < n - 1:
            d, h, w = d // 2, h // 2, w // 2
        cin = cout
    return flops
