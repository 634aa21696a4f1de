"""The fused first block (jaxtl.first_block): values and gradients in Pallas' interpreter against XLA's unfused block,
the model's `conv_impl="pallas"` wiring, and the Triton lowering for CUDA (exported on this CPU-only machine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cuda_mlir
from flax import nnx

from jaxtl import first_block as fb
from jaxtl.model import SFCN

VARIANTS = [dict(window=False, voxel_major=True), dict(window=False, voxel_major=False),
            dict(window=True, voxel_major=True), dict(window=True, voxel_major=False)]


def _args(shape, c, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 1, c)), jnp.float32)
    bias, mul, add = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(3))  # some mul < 0
    return x, kernel, bias, mul, add


@pytest.mark.parametrize("options", VARIANTS)
def test_values_match_unfused_block(options):
    # odd D (floored by the pool), 28 channels (padded to a power of two inside), a last program that is part padding,
    # negative BatchNorm scales (the pool must take the max after the affine map)
    args = _args((2, 7, 6, 10, 1), 28)
    want = fb.reference(*args)
    got = fb.first_block(*args, tile=16, **options)
    assert got.shape == want.shape == (2, 3, 3, 5, 28)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))
    assert float(jnp.abs(want).max()) > 1 and 0 < float((want == 0).mean()) < 0.5  # the ReLU acts, not everywhere


def test_bfloat16_within_rounding():
    x, kernel, bias, mul, add = _args((1, 6, 6, 6, 1), 32, seed=1)
    got = fb.first_block(x, kernel, bias, mul, add, dtype=jnp.bfloat16, tile=32)
    want = fb.reference(x, kernel, bias, mul, add)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05 * float(jnp.abs(want).max()))


def test_gradient_is_the_unfused_blocks():
    args = _args((1, 4, 6, 4, 1), 16, seed=2)
    ct = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 3, 2, 16)), jnp.float32)
    got = jax.grad(lambda *a: jnp.sum(fb.first_block(*a, tile=16) * ct), argnums=(0, 1, 2, 3, 4))(*args)
    want = jax.grad(lambda *a: jnp.sum(fb.reference(*a) * ct), argnums=(0, 1, 2, 3, 4))(*args)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(got[1]).max()) > 0


def test_supported_and_errors():
    assert fb.supported((2, 160, 192, 160, 1), (3, 3, 3, 1, 32), True)
    assert not fb.supported((2, 16, 16, 16, 1), (3, 3, 3, 1, 32), False)  # no pool
    assert not fb.supported((2, 16, 16, 16, 8), (3, 3, 3, 8, 32), True)  # several input channels
    assert not fb.supported((2, 16, 16, 16, 1), (1, 1, 1, 1, 32), True)
    assert not fb.supported((500, 160, 192, 160, 1), (3, 3, 3, 1, 32), True)  # offsets past int32
    args = _args((1, 4, 4, 4, 1), 16)
    with pytest.raises(ValueError, match="power of two"):
        fb.first_block(*args, tile=48)
    with pytest.raises(ValueError, match="first_block needs"):
        fb.first_block(args[0][..., 0], *args[1:])


def _train_args(dtype=jnp.float32, seed=5):
    """60 pooled voxels (the last program of 16 holds 12), 28 channels (padded to 32), some BatchNorm scales
    negative, an input with a large mean and a zero background (every conv output of a window equal: ties)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, 4, 10, 1)) + 3.0
    x[:, :2, :, :4] = 0
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 1, 28)) * 0.3, jnp.float32)
    bias, scale, beta = (jnp.asarray(rng.standard_normal(28), jnp.float32) for _ in range(3))
    return jnp.asarray(x, dtype), kernel, bias, scale, beta


@pytest.mark.parametrize("options", VARIANTS)
def test_train_block_matches_unfused_block(options):
    """Output, batch statistics and the gradients of all inputs (cotangents on the statistics too, as the running
    averages are not differentiated but a caller may) against conv -> BatchNorm -> max-pool -> ReLU on XLA."""
    args = _train_args()
    want = fb.train_reference(*args)
    got = fb.first_block_train(*args, tile=16, **options)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
    rng = np.random.default_rng(6)
    cts = [jnp.asarray(rng.standard_normal(w.shape), jnp.float32) for w in want]

    def loss(f):
        return lambda *a: sum(jnp.sum(o * ct) for o, ct in zip(f(*a), cts, strict=True))

    grads = jax.grad(loss(lambda *a: fb.first_block_train(*a, tile=16, **options)), argnums=range(5))(*args)
    expected = jax.grad(loss(fb.train_reference), argnums=range(5))(*args)
    for g, w in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
        assert float(jnp.abs(w).max()) > 0


def test_train_block_bfloat16_within_rounding():
    args = _train_args(jnp.bfloat16)
    got = fb.first_block_train(*args, tile=16)
    want = fb.train_reference(*args)
    assert got[0].dtype == jnp.bfloat16
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=0.03 * float(jnp.abs(w.astype(jnp.float32)).max()))

    def kernel_grad(f):
        return jax.grad(lambda k: jnp.sum(f(args[0], k, *args[2:])[0].astype(jnp.float32)))(args[1])

    g, w = kernel_grad(lambda *a: fb.first_block_train(*a, tile=16)), kernel_grad(fb.train_reference)
    np.testing.assert_allclose(g, w, atol=0.05 * float(jnp.abs(w).max()))


def test_train_block_needs_even_sizes():
    assert fb.train_supported((2, 6, 4, 8, 1), (3, 3, 3, 1, 8), True)
    assert not fb.train_supported((2, 5, 4, 8, 1), (3, 3, 3, 1, 8), True)
    x, kernel, bias, scale, beta = _args((1, 5, 4, 4, 1), 16)
    with pytest.raises(ValueError, match="even D, H, W"):
        fb.first_block_train(x, kernel, bias, scale, beta)


def _spy(monkeypatch):
    calls = []
    for name in ("first_block", "first_block_train"):
        real = getattr(fb, name)
        monkeypatch.setattr(fb, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    return calls


def test_model_uses_the_kernels_for_the_first_block(monkeypatch):
    """`conv_impl="pallas"`: eval and train mode give what the XLA path gives (features, log-probabilities,
    gradients, BatchNorm running statistics), with the kernels for the first block only."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 12, 12, 12)) + 1.0, jnp.float32)
    models = {impl: SFCN((8, 16, 16), num_outputs=5, rngs=nnx.Rngs(0), conv_impl=impl) for impl in ("xla", "pallas")}
    for m in models.values():  # non-trivial running statistics
        for blk in m.blocks:
            blk.bn.mean[...] = jnp.linspace(-0.2, 0.2, blk.bn.mean.shape[0])
            blk.bn.var[...] = jnp.linspace(0.5, 2.0, blk.bn.var.shape[0])
        m.eval()
    calls = _spy(monkeypatch)
    feats = {impl: m.features(x) for impl, m in models.items()}
    assert calls == ["first_block"]
    np.testing.assert_allclose(feats["pallas"], feats["xla"], rtol=1e-5, atol=1e-5)
    calls.clear()

    def loss(m):
        return jnp.sum(m(x, rngs=nnx.Rngs(dropout=0))[:, 0])

    grads = {}
    for impl, m in models.items():
        m.train()
        grads[impl] = nnx.jit(nnx.grad(loss))(m)  # compiled whole: op by op the XLA path's took ~10 s
    assert calls == ["first_block_train"]
    for impl in ("xla", "pallas"):  # running statistics updated alike
        models[impl].eval()
    np.testing.assert_allclose(models["pallas"].blocks[0].bn.var[...], models["xla"].blocks[0].bn.var[...], rtol=1e-5)
    np.testing.assert_allclose(models["pallas"].blocks[0].bn.mean[...], models["xla"].blocks[0].bn.mean[...],
                               rtol=1e-5, atol=1e-6)
    for g, w in zip(jax.tree.leaves(grads["pallas"]), jax.tree.leaves(grads["xla"]), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    calls.clear()
    models["pallas"].train()
    models["pallas"](x[:, :11], rngs=nnx.Rngs(dropout=0))  # odd depth: XLA's train block
    assert calls == []
    models["xla"].train()
    monkeypatch.setattr(jax, "device_count", lambda: 2)  # several devices and no data mesh: XLA's block
    with pytest.warns(UserWarning, match="runs on one device or under a 1-D 'data' mesh") as caught:
        np.testing.assert_allclose(models["pallas"](x, rngs=nnx.Rngs(dropout=0)),
                                   models["xla"](x, rngs=nnx.Rngs(dropout=0)), rtol=1e-5, atol=1e-5)
    assert calls == [] and len(caught) == 1  # for the first block only


def test_auto_means_the_kernels_on_hopper_gpus_only(monkeypatch):
    """conv_impl="auto": the fused first block on NVIDIA compute capability 9.x (where it was measured), XLA on other
    GPUs and TPUs, the CPU fast path on one CPU device; $JAXTL_CONV_IMPL still decides first."""
    from types import SimpleNamespace

    from jaxtl import conv

    def gpu(cc):
        return SimpleNamespace(platform="gpu", compute_capability=cc, device_kind="GPU")

    assert conv.fused_first_block_gpu([gpu("9.0"), gpu("9.0")])
    for devices in ([gpu("8.0")], [gpu("10.0")], [gpu("9.0"), gpu("8.6")], [gpu("gfx90a")], [],
                    [SimpleNamespace(platform="tpu", device_kind="TPU v5p")], jax.devices()):
        assert not conv.fused_first_block_gpu(devices), devices
    # and the steps compile with channels-last convolutions there, unless $XLA_FLAGS sets the flag
    assert conv.compiler_options([gpu("9.0")]) == {"xla_gpu_force_conv_nhwc": True}
    for devices in ([gpu("8.0")], [gpu("gfx90a")], [], jax.devices()):
        assert conv.compiler_options(devices) == {}, devices
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_force_conv_nhwc=false")
    assert conv.compiler_options([gpu("9.0")]) == {}
    monkeypatch.delenv("JAXTL_CONV_IMPL", raising=False)
    assert conv.default_impl() == "fast"  # this test process: one CPU device
    real_devices = jax.devices
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu("9.0")])
    assert conv.default_impl() == "pallas" and conv.resolve_impl("auto") == "pallas"
    cpu = real_devices("cpu")[0]
    monkeypatch.setattr(jax, "devices", lambda backend=None: [cpu] if backend == "cpu" else [gpu("9.0")])
    for where in (cpu, "cpu"):  # a model run on the host of a Hopper machine: the CPU's path, not Triton kernels
        with jax.default_device(where):
            assert conv.default_impl() == "fast"
    assert conv.default_impl() == "pallas"
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu("8.0")])
    assert conv.default_impl() == "xla"
    monkeypatch.setenv("JAXTL_CONV_IMPL", "pallas")
    assert conv.default_impl() == "pallas"


def test_default_tuning_is_the_compute_dtypes(monkeypatch):
    """float32 blocks take TUNING["float32"], 16-bit ones TUNING["bfloat16"] (and TRAIN_TUNING alike); an argument
    overrides the entry."""
    assert fb.tuning_for(fb.TUNING, jnp.float32) is fb.TUNING["float32"]
    assert fb.tuning_for(fb.TUNING, jnp.float16) is fb.tuning_for(fb.TUNING, jnp.bfloat16) is fb.TUNING["bfloat16"]
    args = _args((1, 4, 4, 4, 1), 16)
    for table, fn in ((fb.TUNING, fb.first_block), (fb.TRAIN_TUNING, fb.first_block_train)):
        monkeypatch.setitem(table, "float32", table["float32"] | {"tile": 48})  # invalid: float32 must fail
        monkeypatch.setitem(table, "bfloat16", table["bfloat16"] | {"tile": 16})
        with pytest.raises(ValueError, match="power of two from 16 to 256, got 48"):
            fn(*args)
        with pytest.raises(ValueError, match="got 48"):
            fn(*args, dtype=jnp.float32)
        assert fn(*args, dtype=jnp.bfloat16) is not None
        assert fn(*args, tile=16) is not None


def test_auto_falls_back_to_xla_quietly(monkeypatch):
    """With "auto" meaning the kernels but several devices and no data mesh, the first block is XLA's without the
    warning an explicit conv_impl="pallas" gives."""
    import warnings

    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 8, 8, 8)), jnp.float32)
    auto = SFCN((4, 8), num_outputs=3, rngs=nnx.Rngs(0), conv_impl="auto")
    xla = SFCN((4, 8), num_outputs=3, rngs=nnx.Rngs(0), conv_impl="xla")
    auto.eval(), xla.eval()
    monkeypatch.setenv("JAXTL_CONV_IMPL", "pallas")
    monkeypatch.setattr(fb, "runs_here", lambda: False)
    calls = _spy(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(auto.features(x), xla.features(x), rtol=1e-5, atol=1e-5)
    assert calls == []


@pytest.mark.parametrize("options", [VARIANTS[0], VARIANTS[2]])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_triton_for_cuda(options, dtype):
    """The kernels lower to Triton IR for a GPU (Pallas' lowering rules run at export, no GPU needed), and no
    full-resolution activation is left in the program; how fast they run is only known on a GPU
    (benchmarks/gpu_first_block.py; benchmarks/triton_ptx.py compiles the IR to PTX)."""
    x = jax.ShapeDtypeStruct((8, 160, 192, 160, 1), dtype)
    k = jax.ShapeDtypeStruct((3, 3, 3, 1, 32), jnp.float32)
    v = jax.ShapeDtypeStruct((32,), jnp.float32)
    f = jax.jit(lambda *a: fb.first_block(*a, interpret=False, **options))
    text = cuda_mlir(f, x, k, v, v, v)
    assert "__gpu$xla.gpu.triton" in text and 'name = "sfcn_first_block"' in text
    assert "tensor<8x80x96x80x32x" in text  # the pooled output, nothing at full resolution
    assert "tensor<8x160x192x160x32x" not in text

    def train_loss(k, b, s, beta, x):
        out, mean, var = fb.first_block_train(x, k, b, s, beta, interpret=False, **options)
        return out.astype(jnp.float32).sum() + mean.sum() + var.sum()

    text = cuda_mlir(jax.jit(jax.grad(train_loss, argnums=(0, 1, 2, 3))), k, v, v, v, x)
    assert 'name = "sfcn_first_block_train"' in text and 'name = "sfcn_first_block_grad"' in text
    assert "tensor<8x160x192x160x32x" not in text  # the input needs no gradient: XLA's dx path is dropped


def test_data_parallel_matches_xla_path():
    """On a 2-device "data" mesh (jaxtl's train and embed steps): the kernels run per device on the batch shard
    (shard_map), BatchNorm's statistics and the parameter gradients summed across devices, so a train step and
    `jaxtl.embed` give what the XLA path gives (a kernel on the whole gathered batch would too, but the kernels
    must see the mesh: the call is recorded)."""
    from conftest import run_python

    code = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import jaxtl
from jaxtl import first_block as fb
from jaxtl.config import load_config
from jaxtl.labels import make_task
from jaxtl.train import Trainer
assert jax.device_count() == 2
seen = []
real = fb._on_devices
fb._on_devices = lambda *a: seen.append(fb.data_mesh() is not None) or real(*a)
cfg = load_config("configs/sfcn_demo.py", ["model.channels=(4,8,8)", "batch_size=4"])
task = make_task(cfg.task, cfg.bin_range, cfg.sigma)
rng = np.random.default_rng(0)
x = (rng.standard_normal((4, 12, 12, 12)) + 1).astype(np.float32)
ages = np.linspace(cfg.bin_range[0] + 5, cfg.bin_range[1] - 5, 4).astype(np.float32)
out = {}
for impl in ("xla", "pallas"):
    model = jaxtl.SFCN((4, 8, 8), task.num_outputs, rngs=nnx.Rngs(0), conv_impl=impl)
    tr = Trainer.create(cfg, 10, model=model)
    losses = [float(tr.step(tr.global_batch(x), tr.global_batch(ages), s)[0]) for s in range(2)]
    m = tr.model()
    out[impl] = (losses, m.blocks[0].conv.kernel[...], m.blocks[0].bn.var[...], jaxtl.embed(x, m, progress=False))
assert seen == [True, True], seen  # train step (traced once), embed: per device
for a, b in zip(out["xla"], out["pallas"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
# the train block itself, per device, with cotangents on the batch statistics too (not reached from the model)
from jaxtl.model import on_mesh
from jaxtl.train import make_mesh
rng = np.random.default_rng(1)
args = [jnp.asarray(rng.standard_normal((4, 6, 4, 10, 1)) + 2, jnp.float32),
        jnp.asarray(rng.standard_normal((3, 3, 3, 1, 12)) * 0.3, jnp.float32)]
args += [jnp.asarray(rng.standard_normal(12), jnp.float32) for _ in range(3)]
want = fb.train_reference(*args)
cts = [jnp.asarray(rng.standard_normal(w.shape), jnp.float32) for w in want]
mesh = make_mesh()  # the inputs on the mesh, as the train step has them
from jax.sharding import NamedSharding, PartitionSpec as P
args = [jax.device_put(a, NamedSharding(mesh, P("data") if i == 0 else P())) for i, a in enumerate(args)]
def loss(f):
    return lambda *a: sum(jnp.sum(o * ct) for o, ct in zip(f(*a), cts))
seen.clear()
got = jax.jit(on_mesh(lambda *a: fb.first_block_train(*a, tile=16), mesh))(*args)
grads = jax.jit(on_mesh(jax.grad(loss(lambda *a: fb.first_block_train(*a, tile=16)), argnums=range(5)), mesh))(*args)
expected = jax.grad(loss(fb.train_reference), argnums=range(5))(*args)
assert seen == [True, True], seen
for g, w in zip([*got, *grads], [*want, *expected]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))
assert jax.jit(on_mesh(lambda: jnp.asarray(fb.runs_here()), make_mesh(jax.devices()[:1])))()  # a 1-device mesh
assert not fb.runs_here()  # 2 devices, no mesh: XLA's block
print("ok")
"""
    assert "ok" in run_python(code, devices=2).stdout
