"""The fast CPU convolution (jaxtl.conv) equals lax.conv_general_dilated: values and gradients."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtl import SFCN
from jaxtl.conv import conv3d, conv_bn_pool_relu, conv_bn_pool_relu_train, max_pool2, plan_tiles, resolve_impl

TOL = 1e-4  # relative to the largest value, float32


def _ref_conv(x, w, b):
    p = w.shape[0] // 2
    y = jax.lax.conv_general_dilated(x, w, (1, 1, 1), [(p, p)] * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                     precision="highest")
    return y + b


def _ref_block(x, w, b, mul, add, pool):
    y = _ref_conv(x, w, b) * mul + add
    if pool:
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 2, 1), (1, 2, 2, 2, 1), "VALID")
    return jnp.maximum(y, 0)


def _inputs(shape, cin, cout, k, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (*shape, cin))
    w = jax.random.normal(keys[1], (k, k, k, cin, cout)) / np.sqrt(k**3 * cin)
    b = 0.1 * jax.random.normal(keys[2], (cout,))
    mul = jax.random.uniform(keys[3], (cout,), minval=-1.5, maxval=1.5)
    add = 0.1 * jax.random.normal(keys[4], (cout,))
    return x, w, b, mul, add


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert err < tol, err


# (batch, D, H, W), Cin, Cout, k, tile bytes (small values force many tiles and split rows)
CASES = [
    ((2, 4, 6, 8), 1, 5, 3, 1 << 20),  # first layer, W folded in groups of 4, one tile
    ((2, 4, 6, 8), 1, 5, 3, 2000),  # first layer, many tiles
    ((1, 3, 4, 5), 1, 3, 3, 1 << 20),  # first layer, W not a multiple of the group: plain im2col
    ((2, 5, 6, 3), 3, 4, 3, 2000),  # odd depth and width, tiles of rows
    ((3, 2, 3, 2), 6, 7, 1, 300),  # k = 1 (SFCN's last block), several tiles
]


def _value_and_grads(f, args, ct):
    """f(*args) and the gradient of sum(f * ct) in every argument, in one compilation."""
    return jax.jit(lambda *a: (f(*a), jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=tuple(range(len(a))))(*a)))(
        *args)


def _check_same(f, ref, args, seed=9):
    ct = jax.random.normal(jax.random.key(seed), jax.eval_shape(ref, *args).shape)
    (y, grads), (y_ref, grads_ref) = _value_and_grads(f, args, ct), _value_and_grads(ref, args, ct)
    _close(y, y_ref)
    for g, r in zip(grads, grads_ref, strict=True):
        _close(g, r)


@pytest.mark.parametrize("shape,cin,cout,k,tile", CASES)
def test_conv3d_values_and_gradients(shape, cin, cout, k, tile):
    x, w, b, *_ = _inputs(shape, cin, cout, k)
    _check_same(lambda x, w, b: conv3d(x, w, b, tile_bytes=tile), _ref_conv, (x, w, b))


@pytest.mark.parametrize("shape,cin,cout,k,tile", CASES[1:])
def test_fused_block_values_and_gradients(shape, cin, cout, k, tile):
    pool = k == 3
    args = _inputs(shape, cin, cout, k, seed=1)
    _check_same(lambda *a: conv_bn_pool_relu(*a, pool=pool, tile_bytes=tile), lambda *a: _ref_block(*a, pool), args)


def _ref_train_block(x, w, b, scale, beta, eps=1e-5):
    """conv -> BatchNorm with batch statistics (biased variance) -> reduce_window max-pool -> ReLU."""
    y = _ref_conv(x, w, b)
    mean = y.mean((0, 1, 2, 3))
    var = jnp.mean(jnp.square(y - mean), (0, 1, 2, 3))
    z = (y - mean) * jax.lax.rsqrt(var + eps) * scale + beta
    z = jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2, 2, 2, 1), (1, 2, 2, 2, 1), "VALID")
    return jnp.maximum(z, 0), mean, var


@pytest.mark.parametrize("shape,cin,cout,tile", [
    ((2, 4, 6, 8), 1, 5, 1 << 20),  # first layer (conv recomputed in the backward), one tile
    ((2, 4, 6, 8), 1, 5, 2000),  # first layer, many tiles
    ((2, 4, 6, 4), 3, 4, 2000),  # conv output kept for the backward, tiles of rows
    ((1, 6, 4, 6), 3, 4, 1 << 20),
])
def test_fused_train_block_values_and_gradients(shape, cin, cout, tile):
    """Output, batch statistics and the gradients of all three in x, kernel, bias, BN scale and shift, with
    ties in the max-pool windows (a constant region, as the zero background of a brain scan gives)."""
    x, w, b, scale, beta = _inputs(shape, cin, cout, 3, seed=2)
    x = x.at[:, :2].set(0.0)
    args = (x, w, b, scale, beta)
    f = lambda *a: conv_bn_pool_relu_train(*a, tile_bytes=tile)
    cts = [jax.random.normal(jax.random.key(i), s.shape) for i, s in enumerate(jax.eval_shape(_ref_train_block, *args))]
    loss = lambda fn: lambda *a: sum(jnp.sum(o * c) for o, c in zip(fn(*a), cts, strict=True))
    got, want = jax.jit(f)(*args), jax.jit(_ref_train_block)(*args)
    for a, r in zip(got, want, strict=True):
        _close(a, r)
    grads = jax.jit(jax.grad(loss(f), argnums=range(5)))(*args)
    grads_ref = jax.jit(jax.grad(loss(_ref_train_block), argnums=range(5)))(*args)
    for g, r in zip(grads, grads_ref, strict=True):
        _close(g, r)


def test_fused_train_block_needs_even_sizes():
    x, w, b, scale, beta = _inputs((1, 4, 5, 4), 2, 3, 3)
    with pytest.raises(ValueError, match="even"):
        conv_bn_pool_relu_train(x, w, b, scale, beta)
    out, mean, var = conv_bn_pool_relu_train(x.astype(jnp.bfloat16)[:, :, :4], w, b, scale, beta)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 2, 2, 3) and mean.dtype == var.dtype == jnp.float32


@pytest.mark.parametrize("cin", [1, 8])
def test_fused_train_block_bfloat16_is_as_accurate_as_the_unfused_block(cin):
    """bfloat16 rounds the conv output and its gradient either way; against a float32 computation on the same
    bfloat16 inputs, the fused block's output and gradients are no further off than the unfused composition's."""
    x, w, b, scale, beta = _inputs((2, 8, 8, 8), cin, 16, 3, seed=3)
    x, w = (x + 1).at[:, :2].set(0).astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    def unfused(x, w, b, scale, beta):
        y = conv3d(x, w, b)
        yf = y.astype(jnp.float32)
        mean = yf.mean((0, 1, 2, 3))
        var = jnp.mean(jnp.square(yf - mean), (0, 1, 2, 3))
        mul = scale * jax.lax.rsqrt(var + 1e-5)
        return jnp.maximum(max_pool2(y * mul.astype(y.dtype) + (beta - mean * mul).astype(y.dtype)), 0), mean, var

    exact = lambda x, w, *a: _ref_train_block(x.astype(jnp.float32), w.astype(jnp.float32), *a)
    ct = jax.random.normal(jax.random.key(4), (2, 4, 4, 4, 16))
    loss = lambda fn: lambda *a: jnp.sum(fn(*a)[0].astype(jnp.float32) * ct)
    run = lambda fn: jax.jit(lambda *a: (fn(*a)[0], jax.grad(loss(fn), argnums=(0, 1, 3, 4))(*a)))(x, w, b, scale,
                                                                                                      beta)
    err = lambda a, r: float(np.abs(np.asarray(a, np.float64) - np.asarray(r, np.float64)).max()
                             / np.abs(np.asarray(r, np.float64)).max())
    (out, grads), (out_u, grads_u), (out_x, grads_x) = run(conv_bn_pool_relu_train), run(unfused), run(exact)
    assert out.dtype == jnp.bfloat16
    assert err(out, out_x) <= 1.25 * err(out_u, out_x) + 1e-3
    for g, u, r in zip(grads, grads_u, grads_x, strict=True):
        assert err(g, r) <= 1.25 * err(u, r) + 1e-3


def test_max_pool2_equals_reduce_window_gradient_with_ties():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 5, 6, 7, 3)), jnp.float32)  # odd sizes, many ties
    ref = lambda x: nnx.max_pool(x, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
    ct = jax.random.normal(jax.random.key(0), jax.eval_shape(ref, x).shape)
    both = jax.jit(lambda x: [(f(x), jax.vjp(f, x)[1](ct)[0]) for f in (max_pool2, ref)])
    (y, g), (y_ref, g_ref) = both(x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(g, g_ref)


def test_bfloat16_accumulates_in_float32():
    x, w, b, mul, add = _inputs((2, 4, 4, 4), 4, 8, 3)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    want = _ref_conv(xb.astype(jnp.float32), wb.astype(jnp.float32), b)  # exact products of the bf16 inputs
    got = conv3d(xb, wb, b, tile_bytes=1000)
    assert got.dtype == jnp.bfloat16
    _close(got.astype(jnp.float32), want, tol=1e-2)  # output rounding to bf16 only
    blk = conv_bn_pool_relu(xb, wb, b, mul, add, pool=True, tile_bytes=1000)
    assert blk.dtype == jnp.bfloat16 and blk.shape == (2, 2, 2, 2, 8)


def test_jit_and_tile_plan():
    x, w, b, *_ = _inputs((2, 4, 4, 4), 2, 3, 3)
    _close(jax.jit(lambda x: conv3d(x, w, b))(x), _ref_conv(x, w, b))
    assert plan_tiles(4, 40, 48, 10, unit=2, tile_bytes=10**9) == (4, 40, 48)  # small: whole volumes
    bc, t, h = plan_tiles(1, 80, 96, 100_000, unit=2, tile_bytes=4 << 20)
    assert (bc, t) == (1, 2) and h % 2 == 0 and 96 % h == 0 and 2 * h * 100_000 <= 4 << 20
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_impl("cudnn")


def test_sfcn_fast_equals_xla_eval_and_train():
    """Same parameters, both implementations: eval outputs, and train-mode loss, gradients and BN statistics.

    Eval outputs agree to 1e-4. Train-mode gradients through BatchNorms: both implementations are
    1e-4..3e-4 (relative) away from a float64 computation, so they are compared at 1e-3; conv biases are
    skipped (BatchNorm cancels them, their gradients are rounding noise of size 1e-10).
    """
    channels, shape = (4, 8, 8, 6), (2, 24, 24, 24)  # last block: BatchNorm over 2 x 3^3 voxels
    x = jax.random.uniform(jax.random.key(0), shape)
    ref = SFCN(channels, 5, dropout=0.0, conv_impl="xla", rngs=nnx.Rngs(0))
    stats = nnx.state(ref, nnx.BatchStat)  # non-trivial running statistics
    keys = iter(jax.random.split(jax.random.key(1), 100))
    nnx.update(ref, jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(next(keys), v.shape), stats))
    results = {}
    for impl in ("xla", "fast"):
        model = SFCN(channels, 5, dropout=0.0, conv_impl=impl, rngs=nnx.Rngs(0))
        nnx.update(model, nnx.state(ref))

        @nnx.jit
        def run(model):
            model.eval()
            out = model(x)
            model.train()
            grads = nnx.grad(lambda m: m(x)[:, 0].sum())(model)
            return out, grads

        out, grads = run(model)
        results[impl] = out, nnx.to_flat_state(grads), nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    _close(results["fast"][0], results["xla"][0])
    for i in (1, 2):
        for (path, a), (_, b) in zip(results["fast"][i], results["xla"][i], strict=True):
            if path[-2:] != ("conv", "bias"):
                _close(a[...], b[...], tol=1e-3 if i == 1 else 1e-4)


def test_tile_size_follows_the_l2_cache(tmp_path, monkeypatch):
    """4x one core's L2 cache (sysfs), between 2 and 32 MB; 4 MB where unknown; $JAXTL_TILE_MB wins."""
    from jaxtl import conv

    def sysfs(*levels):
        root = tmp_path / "-".join(f"{lv}{t}{s}" for lv, t, s in levels)
        for i, (level, kind, size) in enumerate(levels):
            d = root / f"index{i}"
            d.mkdir(parents=True)
            (d / "level").write_text(f"{level}\n")
            (d / "type").write_text(f"{kind}\n")
            (d / "size").write_text(f"{size}\n")
        return str(root)

    intel = sysfs((1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"), (3, "Unified", "266240K"))
    assert conv._l2_bytes(intel) == 2 << 20
    assert conv._l2_bytes(sysfs((1, "Data", "32K"), (2, "Unified", "1M"))) == 1 << 20
    assert conv._l2_bytes(sysfs((1, "Data", "32K"))) is None and conv._l2_bytes(str(tmp_path / "none")) is None
    broken = sysfs((1, "Data", "48K"), (2, "Unified", "2048K"))
    (Path(broken) / "index0" / "type").unlink()  # an index without its files does not hide the others
    assert conv._l2_bytes(broken) == 2 << 20
    (Path(broken) / "index1" / "size").write_text("\n")
    assert conv._l2_bytes(broken) is None
    assert conv._l2_bytes() == conv._l2_bytes()  # this machine's, from a CPU the process may run on
    monkeypatch.delenv("JAXTL_TILE_MB", raising=False)
    mb = 1 << 20
    for l2, want in ((2 * mb, 8 * mb), (mb, 4 * mb), (256 << 10, 2 * mb), (32 * mb, 32 * mb), (None, 4 * mb)):
        monkeypatch.setattr(conv, "_l2_bytes", lambda l2=l2: l2)
        assert conv.default_tile_bytes() == want, l2
    monkeypatch.setenv("JAXTL_TILE_MB", "1.5")
    assert conv.default_tile_bytes() == 3 << 19
    monkeypatch.setattr(conv, "_l2_bytes", lambda: 2 << 20)
    for bad in ("8MB", "0", "-2", "nan"):  # said and ignored (raising would stop every command at import)
        monkeypatch.setenv("JAXTL_TILE_MB", bad)
        with pytest.warns(UserWarning, match=f"JAXTL_TILE_MB='{bad}' ignored: expected a positive number"):
            assert conv.default_tile_bytes() == 8 << 20
