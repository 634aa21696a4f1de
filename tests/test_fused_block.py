"""The experimental fused later blocks (jaxtl.fused_block): values and gradient in Pallas' interpreter against XLA's
unfused block, the model's wiring behind `fused_block.ENABLED`, and the Triton lowering for CUDA (exported on this
CPU-only machine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuda_mlir
from flax import nnx

from jaxtl import fused_block as fb
from jaxtl.model import SFCN


def _args(shape, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*shape, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, cin, cout)) * 0.2, jnp.float32)
    bias, mul, add = (jnp.asarray(rng.standard_normal(cout), jnp.float32) for _ in range(3))  # some mul < 0
    return x, kernel, bias, mul, add


@pytest.mark.parametrize("shape,cin,cout,tuning", [
    # odd D and W (floored by the pool), channels padded to powers of two, a last program that is part padding,
    # several input-channel chunks and output-channel programs
    ((2, 7, 4, 5), 20, 24, dict(tile=16, block_n=16, block_k=16)),
    ((1, 4, 6, 4), 32, 64, dict(tile=16, block_n=32, block_k=16)),
])
def test_values_match_unfused_block(shape, cin, cout, tuning):
    args = _args(shape, cin, cout)
    want = fb.reference(*args)
    got = fb.conv_block(*args, **tuning)
    assert got.shape == want.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3] // 2, cout)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    assert float(jnp.abs(want).max()) > 1 and 0 < float((want == 0).mean()) < 0.9  # the ReLU acts, not everywhere


def test_bfloat16_and_gradient():
    x, kernel, bias, mul, add = _args((1, 4, 4, 4), 16, 16, seed=1)
    got = fb.conv_block(x, kernel, bias, mul, add, dtype=jnp.bfloat16, tile=16, block_n=16, block_k=16)
    want = fb.reference(x, kernel, bias, mul, add)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05 * float(jnp.abs(want).max()))
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(want.shape), jnp.float32)
    args = (x, kernel, bias, mul, add)
    g = jax.grad(lambda *a: jnp.sum(fb.conv_block(*a, tile=16, block_n=16, block_k=16) * ct), argnums=range(5))(*args)
    w = jax.grad(lambda *a: jnp.sum(fb.reference(*a) * ct), argnums=range(5))(*args)
    for a, b in zip(g, w, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_supported_and_errors():
    assert fb.supported((8, 80, 96, 80, 32), (3, 3, 3, 32, 64), True)
    assert not fb.supported((8, 80, 96, 80, 32), (3, 3, 3, 32, 64), False)  # no pool
    assert not fb.supported((8, 160, 192, 160, 1), (3, 3, 3, 1, 32), True)  # the first block's: jaxtl.first_block
    assert not fb.supported((2, 5, 6, 5, 256), (1, 1, 1, 256, 64), True)  # Peng's last block: 1x1x1, no pool
    assert not fb.supported((64, 160, 192, 160, 32), (3, 3, 3, 32, 64), True)  # offsets past int32
    args = _args((1, 4, 4, 4), 16, 16)
    with pytest.raises(ValueError, match="block_k must be a power of two from 16 to 256, got 24"):
        fb.conv_block(*args, block_k=24)
    with pytest.raises(TypeError, match="unknown tuning arguments"):
        fb.conv_block(*args, window=True)


def test_model_uses_the_kernel_only_when_enabled(monkeypatch):
    """conv_impl="pallas" in eval mode: with `ENABLED` the pooling blocks after the first run the kernel and the
    features equal the XLA path's; without it (the default) they stay on XLA; train mode never uses it."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16, 16)) + 1.0, jnp.float32)
    models = {impl: SFCN((4, 16, 16, 8), num_outputs=5, rngs=nnx.Rngs(0), conv_impl=impl) for impl in ("xla", "pallas")}
    for m in models.values():
        for blk in m.blocks:
            blk.bn.mean[...] = jnp.linspace(-0.2, 0.2, blk.bn.mean.shape[0])
            blk.bn.var[...] = jnp.linspace(0.5, 2.0, blk.bn.var.shape[0])
        m.eval()
    calls = []
    real = fb.conv_block
    monkeypatch.setattr(fb, "conv_block", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setitem(fb.TUNING, "tile", 16)
    monkeypatch.setitem(fb.TUNING, "block_n", 16)
    monkeypatch.setitem(fb.TUNING, "block_k", 16)
    want = models["xla"].features(x)
    np.testing.assert_allclose(models["pallas"].features(x), want, rtol=1e-5, atol=1e-5)
    assert calls == []  # off by default
    monkeypatch.setattr(fb, "ENABLED", True)
    np.testing.assert_allclose(models["pallas"].features(x), want, rtol=1e-4, atol=1e-4)
    assert calls == [(2, 8, 8, 8, 4), (2, 4, 4, 4, 16)]  # blocks 1 and 2 (block 3 is the 1x1x1 one)
    calls.clear()
    models["pallas"].train()
    models["pallas"](x, rngs=nnx.Rngs(dropout=0))
    assert calls == []


def test_embed_traces_anew_when_the_switches_change(monkeypatch):
    """`jaxtl.embed` caches its jitted step; turning `ENABLED` on or changing `TUNING` between calls takes effect
    (the step reads them when traced), and turning it off again reuses the first program."""
    import jaxtl

    model = SFCN((4, 16, 16, 8), num_outputs=5, rngs=nnx.Rngs(0), conv_impl="pallas")
    model.eval()
    x = np.random.default_rng(5).standard_normal((2, 16, 16, 16)).astype(np.float32)
    calls = []
    real = fb.conv_block
    monkeypatch.setattr(fb, "conv_block", lambda *a, **kw: calls.append(fb.TUNING["tile"]) or real(*a, **kw))
    monkeypatch.setitem(fb.TUNING, "tile", 16)
    monkeypatch.setitem(fb.TUNING, "block_n", 16)
    monkeypatch.setitem(fb.TUNING, "block_k", 16)
    want = jaxtl.embed(x, model, progress=False)
    assert calls == []
    monkeypatch.setattr(fb, "ENABLED", True)
    np.testing.assert_allclose(jaxtl.embed(x, model, progress=False), want, rtol=1e-4, atol=1e-4)
    assert calls == [16, 16]  # traced anew: blocks 1 and 2 ran the kernel
    monkeypatch.setitem(fb.TUNING, "tile", 32)
    np.testing.assert_allclose(jaxtl.embed(x, model, progress=False), want, rtol=1e-4, atol=1e-4)
    assert calls == [16, 16, 32, 32]
    monkeypatch.setattr(fb, "ENABLED", False)
    jaxtl.embed(x, model, progress=False)
    assert calls == [16, 16, 32, 32]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_triton_for_cuda(dtype):
    """The kernel lowers to Triton IR for a GPU (Pallas' lowering rules run at export, no GPU needed) for Peng's
    block 1 at 1mm, and no full-resolution activation is left in the program."""
    x = jax.ShapeDtypeStruct((8, 80, 96, 80, 32), dtype)
    k = jax.ShapeDtypeStruct((3, 3, 3, 32, 64), jnp.float32)
    v = jax.ShapeDtypeStruct((64,), jnp.float32)
    f = jax.jit(lambda *a: fb.conv_block(*a, interpret=False))
    text = cuda_mlir(f, x, k, v, v, v)
    assert "__gpu$xla.gpu.triton" in text and 'name = "sfcn_conv_block"' in text
    assert "tensor<8x40x48x40x64x" in text  # the pooled output, nothing at full resolution
    assert "tensor<8x80x96x80x64x" not in text
