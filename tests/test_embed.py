"""jaxtl.embed: inputs (arrays, paths, images, cohorts, caches), layers, padding, sharding, bf16, predict."""

from __future__ import annotations

import importlib
import re
import warnings

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_CHANNELS, run_python

from jaxtl.cache import CacheSource
from jaxtl.cohort import read_cohort
from jaxtl.data import InputError, load_volume
from jaxtl.embed import SkippedScansWarning, VolumeReader, embed, layer_names, predict
from jaxtl.weights import load_model


@pytest.fixture(scope="module")
def age_model(tiny_models):
    return load_model(tiny_models["age"])


@pytest.fixture(scope="module")
def paths(ixi_tiny):
    return read_cohort(ixi_tiny[0]).paths[:6]


@pytest.fixture(scope="module")
def volumes(paths):
    return np.stack([load_volume(p, downsample=4) for p in paths])


def test_paths_images_and_arrays_agree(age_model, paths, volumes):
    ref = embed(volumes, age_model, progress=False)
    assert ref.shape == (6, TINY_CHANNELS[-1]) and ref.dtype == np.float32
    # paths are loaded and conformed with the model's downsampling (4), in batches of 4 (two batches)
    np.testing.assert_allclose(embed(list(paths), age_model, batch_size=4, progress=False), ref, rtol=1e-6, atol=1e-7)
    images = [nib.load(p) for p in paths]
    np.testing.assert_allclose(embed(images, age_model, progress=False), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(embed(list(volumes), age_model, progress=False), ref, rtol=1e-6, atol=1e-7)
    single = embed(paths[0], age_model, progress=False)  # one file
    np.testing.assert_allclose(single, ref[:1], rtol=1e-6, atol=1e-7)
    assert not np.allclose(ref[0], ref[1])  # different scans, different features


def test_singleton_channel_axis_ncdhw_is_squeezed(age_model, volumes):
    assert VolumeReader(np.zeros((2, 1, 4, 5, 6), np.float32), check=False).read(0, 2).shape == (2, 4, 5, 6)
    assert VolumeReader([np.zeros((1, 4, 5, 6), np.float32)], check=False).read(0, 1).shape == (1, 4, 5, 6)
    ref = embed(volumes[:2], age_model, progress=False)
    np.testing.assert_array_equal(embed(volumes[:2, None], age_model, progress=False), ref)  # Peng's NCDHW
    np.testing.assert_array_equal(embed(volumes[:2, ..., None], age_model, progress=False), ref)  # NDHWC
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        VolumeReader(np.zeros((2, 2, 4, 5, 6), np.float32))


def test_txt_list_of_paths_without_header(age_model, paths, volumes, tmp_path):
    listing = tmp_path / "scans.txt"
    listing.write_text("".join(f"{p}\n" for p in paths[:3]))
    ref = embed(volumes[:3], age_model, progress=False)
    np.testing.assert_allclose(embed(listing, age_model, progress=False), ref, rtol=1e-6, atol=1e-7)


def test_cohorts_and_caches(age_model, ixi_tiny, tmp_path):
    bids, cache = ixi_tiny
    cohort = read_cohort(bids).select(range(5))
    table = tmp_path / "cohort.csv"
    table.write_text("participant_id,path\n" + "".join(f"{s.participant_id},{s.path}\n" for s in cohort))
    from_cohort = embed(cohort, age_model, progress=False)
    np.testing.assert_array_equal(embed(table, age_model, progress=False), from_cohort)  # CSV/TSV cohort file
    # a filtered list of the cohort's scans reads as their paths
    # (2 scans run in a batch of 2, another compiled program: rounding may differ in the last bit, as on AMD EPYC)
    np.testing.assert_allclose(embed([s for s in cohort][1:3], age_model, progress=False), from_cohort[1:3],
                               rtol=1e-6, atol=1e-7)
    # pandas: rows in the frame's order (a sorted frame keeps its old index labels), a frame by its path column
    import pandas as pd

    frame = pd.DataFrame({"path": [str(s.path) for s in cohort], "age": [5, 1, 4, 2, 3]}).sort_values("age")
    order = frame.index.to_numpy()
    np.testing.assert_array_equal(embed(frame["path"], age_model, progress=False), from_cohort[order])
    np.testing.assert_array_equal(embed(frame, age_model, progress=False), from_cohort[order])
    with pytest.raises(ValueError, match=r"pass its column of image paths"):
        embed(frame.rename(columns={"path": "file"}), age_model, progress=False)
    source = CacheSource(cache)
    assert list(source.ids[:5]) == list(cohort.ids)
    from_cache = embed(cache, age_model, progress=False)  # cache directory; float16: close, not identical
    assert from_cache.shape == (36, TINY_CHANNELS[-1])
    np.testing.assert_allclose(from_cache[:5], from_cohort, rtol=0.02, atol=1e-3)
    np.testing.assert_allclose(embed(source, age_model, progress=False), from_cache, rtol=1e-6)


def test_padding_the_last_batch_changes_nothing(age_model, volumes):
    full = embed(volumes, age_model, batch_size=6, progress=False)
    padded = embed(volumes[:5], age_model, batch_size=6, progress=False)  # one padded row
    np.testing.assert_array_equal(padded, full[:5])
    # one volume runs in a batch of 1: another compiled program, whose float rounding may differ in the last bit
    one_by_one = np.concatenate([embed(v[None], age_model, batch_size=6, progress=False) for v in volumes[:2]])
    np.testing.assert_allclose(one_by_one, full[:2], rtol=1e-6, atol=1e-7)


def test_one_batch_of_files_shows_progress(age_model, paths, volumes, capsys):
    """Files take seconds to load and embed even in one batch (minutes at 1mm on a CPU): a bar; arrays: none."""
    embed(list(paths[:2]), age_model)
    assert "embed (features): 100%" in capsys.readouterr().err
    embed(volumes[:2], age_model)
    assert "embed (features)" not in capsys.readouterr().err


def test_batch_size_is_an_upper_bound():
    """`batch_size` bounds the volumes per step (it may be what fits in memory): batches are about equal and never
    larger (17 volumes at 9 had run as 2 x 10), a multiple of the device count below it (5 on 2 devices: 4)."""
    E = importlib.import_module("jaxtl.embed")
    assert E._batch_size(17, 9, 1) == 9 and E._batch_size(10, 8, 1) == 6 and E._batch_size(100, None, 1) == 8
    assert E._batch_size(17, 5, 2) == 4 and E._batch_size(3, 1, 2) == 2  # at least one volume per device
    assert E._batch_size(3, None, 1) == 4 and E._batch_size(1, None, 1) == 1  # few: a power of two
    for n in range(1, 40):
        for cap in range(1, 12):
            assert 1 <= E._batch_size(n, cap, 1) <= cap


def test_few_volumes_run_in_a_small_batch_and_bad_arrays_are_refused(age_model, paths, volumes, monkeypatch):
    """One volume is not padded to a batch of 8 (a power of two per device instead); NaN volumes and a single
    (D, H, W, 1) volume without its batch axis are refused, naming what is wrong."""
    import importlib

    E = importlib.import_module("jaxtl.embed")  # the module (jaxtl.embed is also the function)
    shapes, jitted = [], E._jitted

    def spy(layer, mesh):
        fn = jitted(layer, mesh)
        return lambda graphdef, state, x: shapes.append(x.shape) or fn(graphdef, state, x)

    monkeypatch.setattr(E, "_jitted", spy)
    for n, batch in ((1, 1), (3, 4), (6, 8)):
        assert embed(volumes[:n], age_model, progress=False).shape == (n, TINY_CHANNELS[-1])
        assert shapes.pop()[0] == batch
    embed(volumes[:5], age_model, batch_size=4, progress=False)  # equal batches: 3 + 3, not 4 + 4 (3 rows padding)
    assert [s[0] for s in shapes] == [3, 3]
    bad = volumes[:3].copy()
    bad[1, 5, 5, 5] = np.nan
    with pytest.raises(InputError, match="volume 1 has NaN or infinite voxels"):
        embed(bad, age_model, progress=False)
    with pytest.raises(ValueError, match=r"reads as 40 volumes .* add the batch axis"):
        embed(volumes[0][..., None], age_model, progress=False)
    for size in (0, -3, 2.5):  # -3 had failed with an IndexError, 0 silently meant the default
        with pytest.raises(ValueError, match=f"batch_size={size}: give a positive number"):
            embed(volumes[:2], age_model, batch_size=size, progress=False)
    # volumes not at the model's resolution: the error says how to prepare them (it had named the caller's
    # downsample= as the model's)
    with pytest.raises(ValueError, match=r"expects \(40, 48, 40\) \(its preprocessing: downsample 4\); arrays must "
                                         r"be .*jaxtl.load_volume\(path, downsample=4\), or pass the image paths"):
        embed(np.ones((1, 80, 96, 80), np.float32), age_model, progress=False)
    with pytest.raises(ValueError, match=r"\(its preprocessing: downsample 4\); the scans were loaded with "
                                         r"downsample=2: leave downsample= out"):
        embed(paths[:1], age_model, downsample=2, progress=False)
    for dtype in ("int32", "float64"):  # int32 ran (features far off), float64 ran in float32
        with pytest.raises(ValueError, match=f"dtype='{dtype}': the network computes in float32, bfloat16 or"):
            embed(volumes[:2], age_model, dtype=dtype, progress=False)


def test_embeds_on_the_default_devices_platform(monkeypatch):
    """`with jax.default_device("cpu")` on a GPU machine: the mesh holds the host's devices, not the GPUs."""
    from types import SimpleNamespace

    from jaxtl.embed import _data_mesh

    real = jax.local_devices
    fake_gpus = [SimpleNamespace(platform="gpu", id=i) for i in range(2)]
    monkeypatch.setattr(jax, "local_devices", lambda *a, backend=None, **k: real(backend="cpu")
                        if backend == "cpu" else fake_gpus)
    with jax.default_device("cpu"):
        mesh = _data_mesh()
    assert [d.platform for d in mesh.devices.flat] == ["cpu"] * len(real(backend="cpu"))


def test_16_bit_volumes_are_copied_as_they_are_with_the_same_result(age_model, volumes, monkeypatch):
    """float16 / bfloat16 volumes (a prepared cache is float16) reach the device in their own type, half the bytes
    of float32, and embed to exactly what the same values as float32 give."""
    sent, put = [], jax.device_put
    monkeypatch.setattr(jax, "device_put",
                        lambda x, *a, **k: (isinstance(x, np.ndarray) and sent.append(x.dtype)) or put(x, *a, **k))
    ref = embed(volumes[:2].astype(np.float16).astype(np.float32), age_model, progress=False)
    assert np.dtype(np.float32) in sent
    for dtype in (np.float16, jnp.bfloat16):
        sent.clear()
        x = volumes[:2].astype(dtype)
        out = embed(x, age_model, progress=False)
        assert np.dtype(dtype) in sent and np.dtype(np.float32) not in sent
        np.testing.assert_array_equal(out, embed(x.astype(np.float32), age_model, progress=False))
    np.testing.assert_array_equal(embed(volumes[:2].astype(np.float16), age_model, progress=False), ref)
    sent.clear()
    embed(volumes[:2].astype(np.float64), age_model, progress=False)  # anything else: float32, as before
    assert np.dtype(np.float64) not in sent and np.dtype(np.float32) in sent
    sent.clear()
    on_device = jnp.asarray(volumes[:3], jnp.bfloat16)  # a jax.Array: sliced on its device, not via the host
    np.testing.assert_array_equal(embed(on_device, age_model, progress=False, batch_size=2),
                                  embed(np.asarray(on_device), age_model, progress=False, batch_size=2))
    assert sent == [np.dtype(jnp.bfloat16)] * 2  # only the numpy call's two batches went through the host


def test_conv_impl_from_the_environment_is_read_at_each_call(age_model, volumes, monkeypatch):
    from jaxtl.embed import _data_mesh, _jitted

    monkeypatch.setenv("JAXTL_CONV_IMPL", "fast")
    fast = _jitted("features", _data_mesh())
    monkeypatch.setenv("JAXTL_CONV_IMPL", "xla")
    assert _jitted("features", _data_mesh()) is not fast  # a new trace: "auto" now means XLA's convolution
    np.testing.assert_allclose(embed(volumes[:2], age_model, progress=False),
                               embed(volumes[:2], load_model(age_model.path), progress=False), rtol=1e-5)
    monkeypatch.setenv("JAXTL_CONV_IMPL", "auto")  # the default, said explicitly
    assert _jitted("features", _data_mesh()) is fast
    monkeypatch.setenv("JAXTL_CONV_IMPL", "XLA")
    with pytest.raises(ValueError, match="JAXTL_CONV_IMPL='XLA': use one of xla, fast, pallas"):
        embed(volumes[:2], age_model, progress=False)


def test_a_bare_sfcn_refuses_volumes_smaller_than_its_pooling():
    from flax import nnx

    from jaxtl.model import SFCN

    model = SFCN(TINY_CHANNELS, 40, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"too small for 6 blocks: each side must be at least 32 voxels"):
        model.features(jnp.ones((1, 16, 40, 40)))


def test_layers(age_model, volumes):
    x = volumes[:3]
    names = layer_names(age_model)
    assert names[:3] == ("features", "logits", "probs") and names[-1] == "block5"
    logits = embed(x, age_model, layer="logits", progress=False)
    assert logits.shape == (3, 75)
    np.testing.assert_allclose(np.exp(logits).sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(embed(x, age_model, layer="probs", progress=False), np.exp(logits), rtol=1e-5)
    for i, c in enumerate(TINY_CHANNELS):
        assert embed(x, age_model, layer=f"block{i}", progress=False).shape == (3, c)
    np.testing.assert_allclose(embed(x, age_model, layer="block5", progress=False),
                               embed(x, age_model, progress=False), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown layer 'block6'"):
        embed(x, age_model, layer="block6")
    with pytest.raises(ValueError, match="model expects"):
        embed(np.zeros((2, 20, 24, 20), np.float32), age_model, check=False)


def test_bfloat16_compute_is_close(age_model, volumes):
    import jax.numpy as jnp

    ref = embed(volumes, age_model, progress=False)
    bf16 = embed(volumes, age_model, dtype=jnp.bfloat16, progress=False)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, ref, rtol=0.1, atol=0.05 * np.abs(ref).max())
    assert not np.array_equal(bf16, ref)


def test_bfloat16_copy_keeps_conv_impl_and_callers_mode(volumes):
    from flax import nnx

    from jaxtl.embed import _with_dtype
    from jaxtl.model import SFCN

    model = SFCN((4, 8, 8, 8, 8, 8), conv_impl="xla", rngs=nnx.Rngs(0))
    assert all(b.conv_impl == "xla" for b in _with_dtype(model, jnp.bfloat16).blocks)
    model.train()
    embed(volumes[:2], model, progress=False)
    assert not model.blocks[0].bn.use_running_average  # embed ran in eval mode on its own view


def test_bfloat16_view_is_built_once_and_follows_the_weights(volumes, monkeypatch):
    from flax import nnx

    E = importlib.import_module("jaxtl.embed")  # the module: `jaxtl.embed` is also the function
    from jaxtl.model import SFCN

    model = SFCN((4, 8, 8, 8, 8, 8), conv_impl="xla", rngs=nnx.Rngs(0))
    built, original = [], E._with_dtype
    monkeypatch.setattr(E, "_with_dtype", lambda m, d: built.append(d) or original(m, d))
    first = embed(volumes[:2], model, dtype=jnp.bfloat16, progress=False)
    again = embed(volumes[:2], model, dtype=jnp.bfloat16, progress=False)
    assert len(built) == 1  # the second call reuses the bfloat16 graph (a new SFCN per call cost 25-50 ms)
    np.testing.assert_array_equal(again, first)
    state = nnx.state(model, nnx.Param)  # new weights, same graph: the cached view must not keep the old ones
    nnx.update(model, jax.tree.map(lambda p: p * 1.5, state))
    changed = embed(volumes[:2], model, dtype=jnp.bfloat16, progress=False)
    assert len(built) == 1 and not np.allclose(changed, first)
    ref = embed(volumes[:2], model, progress=False)  # float32, same weights
    np.testing.assert_allclose(changed, ref, rtol=0.1, atol=0.05 * np.abs(ref).max())


def test_predict_decodes_expected_age(age_model, paths, volumes, tiny_models):
    ages = predict(list(paths), tiny_models["age"], progress=False)  # model directory, paths
    centres = 15.5 + np.arange(75)
    np.testing.assert_allclose(ages, np.exp(embed(volumes, age_model, layer="logits", progress=False)) @ centres,
                               rtol=1e-5)
    p_male = predict(volumes, tiny_models["sex"], progress=False)
    assert p_male.shape == (6,) and np.all((p_male >= 0) & (p_male <= 1))


def test_steps_compile_with_the_devices_compiler_options(age_model, volumes, monkeypatch):
    """Embed's (and the Trainer's) steps are jitted with `conv.compiler_options` of their mesh: the option name
    XLA is given on Hopper GPUs is one it knows (checked on CPU, where it changes nothing), and a bad one reaches
    the compiler."""
    from jaxtl import conv, model

    E = importlib.import_module("jaxtl.embed")  # the module, not the function jaxtl.embed

    ref = embed(volumes[:2], age_model, progress=False)
    monkeypatch.setattr(model, "compiler_options", lambda devices: {conv.NHWC_OPTION: True})
    monkeypatch.setattr(E, "trace_settings", lambda: ("nhwc",))  # a program of its own, not the cached one
    np.testing.assert_array_equal(embed(volumes[:2], age_model, progress=False), ref)
    monkeypatch.setattr(model, "compiler_options", lambda devices: {"xla_no_such_option": True})
    monkeypatch.setattr(E, "trace_settings", lambda: ("bad",))
    with pytest.raises(Exception, match="xla_no_such_option"):
        embed(volumes[:2], age_model, progress=False)


def test_arrays_far_from_the_intensity_normalisation_warn(age_model, volumes):
    """Arrays are taken as preprocessed; one far from Peng's normalisation (each volume divided by its mean) warns
    once, naming the volume, instead of giving other ages without a word; check=False silences it."""
    from jaxtl.data import InputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embed(volumes, age_model, progress=False)  # loaded with load_volume: normalised
        embed(volumes * 1000, age_model, progress=False, check=False)
    raw = volumes.copy()
    raw[1] *= 1000  # e.g. one scan's raw scanner intensities (in the first batch, the one checked)
    with pytest.warns(InputWarning, match=r"volume 1 has mean intensity .*jaxtl.load_volume") as caught:
        embed(raw, age_model, progress=False, batch_size=2)
    assert len([w for w in caught if issubclass(w.category, InputWarning)]) == 1  # the first batch is checked
    for given in (jnp.asarray(raw), list(raw)):  # a jax array (checked on its device) and a list of arrays too
        with pytest.warns(InputWarning, match=r"volume 1 has mean intensity"):
            embed(given, age_model, progress=False, batch_size=2)


def test_the_intensity_check_of_large_host_arrays_reads_every_4th_slice():
    """1mm and 2mm host arrays (64 slices or more) are checked on every 4th slice: a mean 100x off is named, a
    normalised volume is not, and the estimate stays within a percent of the whole volume's mean."""
    from jaxtl.data import InputWarning

    E = importlib.import_module("jaxtl.embed")
    rng = np.random.default_rng(0)
    batch = (rng.random((3, 80, 24, 20), dtype=np.float32) * 2).astype(np.float32)  # means about 1
    batch[2] *= 100
    with pytest.warns(InputWarning, match=r"volume 7 has mean intensity [\d.]+ \(1 of the first 3") as caught:
        E._warn_if_unnormalised(batch, 5)
    estimate = float(re.search(r"mean intensity ([\d.]+)", str(caught[0].message))[1])
    assert estimate == pytest.approx(batch[2].mean(dtype=np.float64), rel=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        E._warn_if_unnormalised(batch[:2], 0)
        E._warn_if_unnormalised(batch[:2, :40], 0)  # under 64 slices: all of them


def test_host_batches_copied_from_threads_equal_one_copy(age_model, volumes, monkeypatch):
    """On GPUs a host batch goes to the devices one volume per thread (`to_devices`): the same features."""
    E = importlib.import_module("jaxtl.embed")

    ref = embed(volumes, age_model, batch_size=4, progress=False)
    pools, real = [], E.to_devices
    monkeypatch.setattr(E, "to_devices", lambda batch, sharding, pool=None: pools.append(pool) or real(
        batch, sharding, pool))
    monkeypatch.setattr(E, "_put_threads", lambda mesh, batch_size: 3)
    np.testing.assert_array_equal(embed(volumes, age_model, batch_size=4, progress=False), ref)
    assert len(pools) == 2 and all(p is not None for p in pools)


def test_sharded_embed_equals_single_device(tiny_models, volumes, tmp_path):
    """4 virtual CPU devices: the batch is sharded over them; the result equals one device's."""
    np.save(tmp_path / "x.npy", volumes)
    code = f"""
import jax, numpy as np
from flax import nnx
from jaxtl.embed import embed
from jaxtl.weights import load_model
assert jax.local_device_count() == 4
import importlib; E = importlib.import_module("jaxtl.embed")
m = load_model({str(tiny_models["age"])!r})
x = np.load({str(tmp_path / "x.npy")!r})
shards, jitted = [], E._jitted
def spy(layer, mesh):
    def apply(graphdef, state, batch):
        shards.append(len({{s.device for s in batch.addressable_shards}}))
        return jitted(layer, mesh)(graphdef, state, batch)
    return apply
E._jitted = spy
sharded = embed(x, m, batch_size=4, progress=False)   # 2 batches of 4 (last padded), one row per device
assert shards == [4, 4], shards
E._put_threads = lambda mesh, batch_size: 2  # as on GPUs: one copy per volume, joined on each device
np.testing.assert_array_equal(embed(x, m, batch_size=4, progress=False), sharded)
assert shards == [4, 4, 4, 4], shards
single = np.asarray(nnx.jit(lambda mdl, v: mdl.features(v))(m.model, jax.device_put(x, jax.devices()[0])))
np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
print("OK", sharded.shape)
"""
    proc = run_python(code, devices=4)
    assert "OK (6, 8)" in proc.stdout


# ---- scans that fail to load: on_error ------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_scans(paths, tmp_path_factory):
    """(corrupt: not a NIfTI file, wrong shape: a 4D image) beside the good scans."""
    root = tmp_path_factory.mktemp("bad")
    corrupt = root / "sub-corrupt_T1w.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file\n" * 20)
    img = nib.load(paths[0])
    wrong = root / "sub-4d_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([img.get_fdata()] * 2, axis=-1), img.affine), wrong)
    return str(corrupt), str(wrong)


def test_on_error_skip_gives_nan_rows_and_warns(age_model, paths, volumes, bad_scans, tmp_path):
    corrupt, wrong = bad_scans
    scans = [paths[0], paths[1], corrupt, wrong, paths[2]]  # batch_size 2: the second batch fails entirely
    ref = embed(volumes[:3], age_model, progress=False)
    with pytest.warns(SkippedScansWarning, match="2 of 5 scans") as caught:
        out = embed(scans, age_model, batch_size=2, on_error="skip", progress=False)
    assert out.shape == (5, TINY_CHANNELS[-1])
    np.testing.assert_array_equal(np.isnan(out).all(axis=1), [False, False, True, True, False])
    np.testing.assert_allclose(out[[0, 1, 4]], ref, rtol=1e-6, atol=1e-7)  # good rows: unchanged
    message = str(caught[0].message)
    assert corrupt in message and "unreadable" in message and wrong in message and "4D image" in message
    failures = caught[0].message.failures
    assert [(f.index, f.path) for f in failures] == [(2, corrupt), (3, wrong)]
    # a .txt list of paths (a cohort file) and predict skip the same way
    listing = tmp_path / "scans.txt"
    listing.write_text("".join(f"{p}\n" for p in scans))
    with pytest.warns(SkippedScansWarning):
        # another batch size (another compiled program): float rounding may differ in the last bit (AMD EPYC)
        np.testing.assert_allclose(embed(listing, age_model, on_error="skip", progress=False), out, rtol=1e-6,
                                   atol=1e-7, equal_nan=True)
    with pytest.warns(SkippedScansWarning):
        ages = predict(scans, age_model, on_error="skip", progress=False)
    np.testing.assert_array_equal(np.isnan(ages), [False, False, True, True, False])
    # a CSV cohort: a missing image is a skipped scan too (it had stopped the read), and an age that cannot be
    # read is no error (embed reads no labels); one path that does not exist: one NaN row, as in a list
    missing = str(tmp_path / "sub-gone_T1w.nii.gz")
    table = tmp_path / "cohort.csv"
    listed = [(paths[0], 40), (missing, 41), (paths[1], "abc")]
    table.write_text("path,age\n" + "".join(f"{p},{a}\n" for p, a in listed))
    with pytest.warns(SkippedScansWarning, match="1 of 3 scans"):
        rows = embed(table, age_model, on_error="skip", progress=False)
    np.testing.assert_array_equal(np.isnan(rows).all(axis=1), [False, True, False])
    np.testing.assert_allclose(rows[[0, 2]], ref[:2], rtol=1e-6, atol=1e-7)
    with pytest.warns(SkippedScansWarning, match="sub-gone_T1w.nii.gz"):
        assert np.isnan(embed(missing, age_model, on_error="skip", progress=False)).all()


def test_on_error_raise_is_the_default_and_names_the_file(age_model, paths, bad_scans):
    corrupt, wrong = bad_scans
    with pytest.raises(InputError, match="sub-corrupt_T1w.nii.gz: unreadable"):
        embed([paths[0], corrupt], age_model, progress=False)
    with pytest.raises(InputError, match="sub-4d_T1w.nii.gz: 4D image"):
        embed([wrong, paths[0]], age_model, on_error="raise", progress=False)
    with pytest.raises(ValueError, match="on_error must be"):
        embed([paths[0]], age_model, on_error="ignore")
    # arrays and caches have no load errors: nothing to skip, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not np.isnan(embed(np.zeros((1, 40, 48, 40), np.float32) + 1, age_model, on_error="skip",
                                  progress=False)).any()


def test_eval_graph_cache_is_safe_on_threads(monkeypatch):
    """Many models embedded from several threads at once, past the cache's cap: no KeyError (two threads had
    evicted the same entry, or one the entry another was returning). Graphs stand in for models (cheap keys)."""
    import concurrent.futures
    import sys
    import types

    E = importlib.import_module("jaxtl.embed")
    monkeypatch.setattr(E, "_EVAL_GRAPHDEFS", {})

    class Model:
        def __init__(self, graph):
            self.graph = graph

        def eval(self):
            pass

    monkeypatch.setattr(E, "nnx", types.SimpleNamespace(merge=lambda graph, state: Model(graph),
                                                        graphdef=lambda model: ("eval", model.graph)))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race showed within a few thousand calls
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            graphs = list(pool.map(lambda i: E._eval_graphdef(i % 80, None, None), range(20000)))
    finally:
        sys.setswitchinterval(interval)
    assert graphs == [("eval", i % 80) for i in range(20000)] and len(E._EVAL_GRAPHDEFS) <= 64
