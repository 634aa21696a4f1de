"""SFCN topology, shapes, dtypes and PyTorch BatchNorm semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peng_sfcn import PengSFCN

from jaxtl import SFCN
from jaxtl.model import PENG_CHANNELS, SEX_CHANNELS, TRANSFER_CHANNELS, WEIGHTS, conv_flops
from jaxtl.weights import state_from_torch


def _n_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("channels,k,expected", [(PENG_CHANNELS, 40, 2_952_936), (TRANSFER_CHANNELS, 40, 395_688),
                                                 (SEX_CHANNELS, 2, 2_918_144)])
def test_parameter_counts_match_peng(channels, k, expected):
    assert _n_params(SFCN(channels, k, rngs=nnx.Rngs(0))) == expected


def test_shapes_and_log_probs():
    model = SFCN((4, 8, 8, 8, 8, 6), num_outputs=5, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.uniform(jax.random.key(0), (3, 64, 64, 64))
    logp = model(x)
    assert logp.shape == (3, 5) and logp.dtype == jnp.float32
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model(x[..., None]), logp, rtol=1e-6)
    feats = model.features(x)
    assert feats.shape == (3, 6) and bool((feats >= 0).all())  # after ReLU
    shapes = [o.shape for o in model.block_outputs(x)]
    assert shapes == [(3, 32, 32, 32, 4), (3, 16, 16, 16, 8), (3, 8, 8, 8, 8), (3, 4, 4, 4, 8), (3, 2, 2, 2, 8),
                      (3, 2, 2, 2, 6)]
    with pytest.raises(ValueError, match=r"expects \(B, D, H, W\)"):
        model(jnp.ones((2, 8, 8)))


def test_non_cubic_input_and_global_pool():
    model = SFCN((4, 4, 4, 4, 4, 4), 3, rngs=nnx.Rngs(0))
    model.eval()
    x = jax.random.uniform(jax.random.key(1), (1, 80, 96, 80))
    last = model.block_outputs(x)[-1]
    assert last.shape[1:4] == (2, 3, 2)
    np.testing.assert_allclose(model.features(x), last.mean(axis=(1, 2, 3)), rtol=1e-6)


def test_bfloat16_compute_float32_params():
    model = SFCN((4, 8, 8, 8, 8, 8), 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, WEIGHTS)))
    model.eval()
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 32))
    assert model.block_outputs(x)[0].dtype == jnp.bfloat16
    assert model(x).dtype == jnp.float32 and model.features(x).dtype == jnp.float32


def test_torch_style_init():
    model = SFCN((8, 8, 8, 8, 8, 8), 40, rngs=nnx.Rngs(0))
    k = np.asarray(model.blocks[1].conv.kernel[...])
    bound = 1 / np.sqrt(8 * 27)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound  # U(+-1/sqrt(fan_in)), PyTorch default
    bn = model.blocks[0].bn
    assert np.all(np.asarray(bn.scale[...]) == 1) and np.all(np.asarray(bn.bias[...]) == 0)


def test_dropout_active_only_in_train_mode():
    model = SFCN((4, 4, 4, 4, 4, 8), 10, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 32))
    model.eval()
    a, b = model(x), model(x)
    np.testing.assert_array_equal(a, b)
    model.train()
    f = model.features(x)
    h1, h2 = model.head_logits(f, nnx.Rngs(dropout=1)), model.head_logits(f, nnx.Rngs(dropout=2))
    assert not np.allclose(h1, h2)
    np.testing.assert_array_equal(h1, model.head_logits(f, nnx.Rngs(dropout=1)))


def test_train_mode_matches_pytorch_batchnorm():
    """Train-mode forward and running-statistics update equal PyTorch's (momentum 0.1, unbiased running var)."""
    channels = (4, 8, 8, 8, 8, 6)
    torch.manual_seed(0)
    tmodel = PengSFCN(channels, 5, dropout=False)
    model = SFCN(channels, 5, dropout=0.0, rngs=nnx.Rngs(0))
    sd = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    state = nnx.state(model, WEIGHTS)
    nnx.replace_by_pure_dict(state, state_from_torch(sd, channels))
    nnx.update(model, state)
    x = torch.rand(3, 1, 32, 32, 32) * 2
    tmodel.train()
    model.train()
    for _ in range(2):
        with torch.no_grad():
            ref = tmodel(x).numpy()
        out = np.asarray(model(jnp.asarray(x.numpy()[:, 0])))
        np.testing.assert_allclose(out, ref, atol=2e-4)
    for b in range(len(channels)):
        bn_t = tmodel.feature_extractor[b][1]
        bn_j = model.blocks[b].bn
        np.testing.assert_allclose(np.asarray(bn_j.mean[...]), bn_t.running_mean.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(bn_j.var[...]), bn_t.running_var.numpy(), rtol=1e-4)


def test_a_batch_of_one_with_a_one_voxel_last_block_is_refused_for_training():
    """BatchNorm over one value per channel (batch 1, last block 1x1x1) gives a constant: no gradient reaches the
    earlier blocks, so training that way is refused (check_train_batch); a batch of 2 trains them."""
    from jaxtl.model import check_train_batch

    model = SFCN((4, 4, 4, 4), 3, dropout=0.0, rngs=nnx.Rngs(0))
    model.train()
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8))

    @nnx.jit  # one compiled program per batch shape (op by op, the backward pass took ~10 s to dispatch)
    def first_kernel_grad(model, batch):
        grads = nnx.grad(lambda m: m(batch)[:, 0].sum())(model)
        return jnp.abs(grads.blocks[0].conv.kernel[...]).max()

    assert first_kernel_grad(model, x[:1]) == 0 and first_kernel_grad(model, x) > 0
    with pytest.raises(ValueError, match="a training batch of 1 at input 8x8x8 .* 1 value per channel"):
        check_train_batch(1, 4, (8, 8, 8))
    check_train_batch(2, 4, (8, 8, 8))
    check_train_batch(1, 4, (16, 8, 8))  # 2x1x1: two values


def test_conv_flops_full_size():
    assert conv_flops(PENG_CHANNELS, (160, 192, 160)) == pytest.approx(131.65e9, rel=1e-3)


def test_xla_block_folds_the_conv_bias_into_batchnorm():
    """conv_impl="xla": the conv's bias enters BatchNorm's affine map (eval) or running mean (train) instead of being
    added to the full-size conv output (so XLA emits a plain cuDNN convolution); outputs, running statistics and
    gradients are those of BatchNorm(conv(x) + bias)."""
    from jaxtl.conv import max_pool2
    from jaxtl.model import ConvBlock

    x = jax.random.normal(jax.random.key(1), (2, 6, 8, 6, 3)) + 0.5
    blocks = [ConvBlock(3, 8, 3, pool=True, dtype=jnp.float32, rngs=nnx.Rngs(0), conv_impl="xla") for _ in range(2)]
    for b in blocks:
        b.conv.bias[...] = jnp.linspace(-1.0, 2.0, 8)
        b.bn.mean[...], b.bn.var[...] = jnp.linspace(-0.5, 1.5, 8), jnp.linspace(0.5, 2.0, 8)

    def reference(b, x):
        return nnx.relu(max_pool2(b.bn(b.conv(x))))  # the bias added to the conv output first

    ct = jax.random.normal(jax.random.key(2), (2, 3, 4, 3, 8))
    for mode in ("eval", "train"):
        for b in blocks:
            getattr(b, mode)()
        grads = [nnx.jit(nnx.grad(lambda b, f=f: jnp.sum(f(b, x) * ct)))(b)  # compiled whole: op by op is slow
                 for b, f in zip(blocks, (ConvBlock.__call__, reference), strict=True)]
        np.testing.assert_allclose(blocks[0](x), reference(blocks[1], x), rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(nnx.state(blocks[0])), jax.tree.leaves(nnx.state(blocks[1])),
                             strict=True):  # running statistics after the same updates
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        if mode == "eval":
            assert float(jnp.abs(grads[0].conv.bias[...]).min()) > 1e-3  # the bias matters with frozen statistics
        # one full-size add (BatchNorm's shift), not two (the bias first)
        graph, state = nnx.split(blocks[0])
        jaxpr = jax.make_jaxpr(lambda state, x, graph=graph: nnx.merge(graph, state)(x))(state, x)
        full = [e for e in jaxpr.eqns if e.primitive.name == "add" and e.outvars[0].aval.shape == (2, 6, 8, 6, 8)]
        assert len(full) == 1, [str(e) for e in full]
