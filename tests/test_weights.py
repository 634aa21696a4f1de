"""Conversion of Peng's PyTorch weights, model directories, and parity with PyTorch."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peng_sfcn import PengSFCN, calibrated_model, save_dataparallel

import jaxtl
from jaxtl import cli
from jaxtl.model import SEX_CHANNELS, TRANSFER_CHANNELS

torch.set_num_threads(2)


def _volume(shape, seed=0):
    """A positive, smooth-ish volume with mean ~1 (like Peng's mean-normalised input)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g)
    x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1) * 2.0
    return x


def _convert(tmp_path, channels, k, x, task="age", bins=(42, 82), legacy=False):
    model = calibrated_model(channels, k, x)
    path = tmp_path / "weights.p"
    save_dataparallel(model, path, legacy=legacy)
    out = jaxtl.convert_torch_checkpoint(path, tmp_path / "model", task=task, bin_range=bins)
    jmodel = jaxtl.load_model(out)
    # the converted model declares Peng's 160x192x160 input; these tests also feed smaller volumes
    return model, dataclasses.replace(jmodel, input_shape=tuple(x.shape[2:]))


def _compare(torch_model, jmodel, x):
    # each side's network runs once: its features, then the head on them (what its forward does after them)
    with torch.no_grad():
        fmap = torch_model.feature_extractor(x)
        ref_feat = torch_model.classifier.average_pool(fmap).flatten(1).numpy()
        ref_logp = torch.log_softmax(torch_model.classifier(fmap).flatten(1), dim=1).numpy()
    xj = jnp.asarray(x.numpy()[:, 0])  # NCDHW -> NDHW, same spatial axis order
    feat = jmodel.model.features(xj)
    logp, feat = np.asarray(jmodel.model.head_logits(feat)), np.asarray(feat)
    assert ref_feat.std() > 0.1 and ref_logp.std() > 0.5, "reference outputs are degenerate; the test would be weak"
    np.testing.assert_allclose(feat, ref_feat, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels,k,task,bins", [(TRANSFER_CHANNELS, 40, "age", (42, 82)),
                                                  (SEX_CHANNELS, 2, "sex", None)])
def test_parity_small(tmp_path, channels, k, task, bins):
    x = _volume((64, 64, 64))
    tmodel, jmodel = _convert(tmp_path, channels, k, x, task=task, bins=bins)
    assert jmodel.channels == channels and jmodel.task.name == task
    _compare(tmodel, jmodel, _volume((64, 64, 64), seed=1))


def test_parity_full_size(tmp_path):
    """One 160x192x160 volume through Peng's public sex model: the size Peng's weights are used at
    (AvgPool3d([5,6,5]) = global mean). The age-model heads and other channel widths: `test_parity_small`."""
    x = _volume((160, 192, 160))
    tmodel, jmodel = _convert(tmp_path, SEX_CHANNELS, 2, x, task="sex", bins=None)
    _compare(tmodel, jmodel, x)


def test_parity_bfloat16_close(tmp_path):
    x = _volume((64, 64, 64))
    tmodel, jmodel = _convert(tmp_path, TRANSFER_CHANNELS, 40, x)
    xj = jnp.asarray(x.numpy()[:, 0])
    f32 = jaxtl.embed(xj, jmodel, progress=False)
    bf16 = jaxtl.embed(xj, jmodel, dtype=jnp.bfloat16, progress=False)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, f32, atol=0.1 * np.abs(f32).max())
    assert not np.array_equal(bf16, f32)


def test_legacy_torch_format_and_predict(tmp_path):
    """Peng's 2019 files predate PyTorch's zip format; weights_only loading must read both."""
    x = _volume((64, 64, 64))
    tmodel, jmodel = _convert(tmp_path, TRANSFER_CHANNELS, 40, x, legacy=True)
    with torch.no_grad():
        ref = (torch.exp(tmodel(x)) * (42.5 + torch.arange(40))).sum(1).numpy()
    pred = jaxtl.predict(x.numpy()[:, 0], jmodel, progress=False)
    np.testing.assert_allclose(pred, ref, atol=1e-3)
    meta = json.loads((jmodel.path / "model.json").read_text())
    assert meta["channels"] == list(TRANSFER_CHANNELS) and meta["bin_range"] == [42, 82]
    assert meta["input_shape"] == [160, 192, 160] and "crop" in meta["preprocessing"]


def test_predict_sex_is_probability(tmp_path):
    x = _volume((64, 64, 64))
    tmodel, jmodel = _convert(tmp_path, SEX_CHANNELS, 2, x, task="sex", bins=None)
    p = jaxtl.predict(np.concatenate([x.numpy()[:, 0]] * 3), jmodel, batch_size=2, progress=False)
    with torch.no_grad():
        ref = torch.exp(tmodel(x))[0, 1].item()
    assert p.shape == (3,)
    np.testing.assert_allclose(p, ref, atol=1e-5)


# ---- conversion errors: one clear line each ------------------------------------------------------------


def _save_sd(path, sd):
    torch.save(sd, path)
    return path


def _run_cli(args, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_error_not_a_torch_file(tmp_path, capsys):
    bad = tmp_path / "notes.p"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    code, err = _run_cli(["convert", str(bad), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "notes.p" in err and "not a PyTorch state_dict" in err and "weights_only=False" not in err


def test_error_pickle_with_code_is_refused(tmp_path, capsys):
    """weights_only=True: a pickle that would run code is rejected, not executed."""
    bad = tmp_path / "evil.p"
    torch.save({"x": torch.zeros(1), "f": print}, bad)
    with pytest.raises(ValueError, match="evil.p: not a PyTorch state_dict"):
        jaxtl.convert_torch_checkpoint(bad, tmp_path / "out")


def test_error_missing_keys(tmp_path, capsys):
    sd = {f"module.{k}": v for k, v in PengSFCN(TRANSFER_CHANNELS, 40).state_dict().items()}
    del sd["module.feature_extractor.conv_3.1.running_var"]
    path = _save_sd(tmp_path / "partial.p", sd)
    code, err = _run_cli(["convert", str(path), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "partial.p" in err and "conv_3.1.running_var" in err and "missing" in err


def test_error_not_sfcn(tmp_path, capsys):
    path = _save_sd(tmp_path / "resnet.p", {"module.conv1.weight": torch.zeros(3, 3)})
    code, err = _run_cli(["convert", str(path), str(tmp_path / "out")], capsys)
    assert code == 2 and "not an SFCN state_dict" in err and "resnet.p" in err


def test_error_mismatched_shapes(tmp_path):
    sd = dict(PengSFCN(TRANSFER_CHANNELS, 40).state_dict())
    sd["feature_extractor.conv_2.1.weight"] = torch.ones(63)
    path = _save_sd(tmp_path / "bad_shape.p", sd)
    with pytest.raises(ValueError, match=r"bad_shape.p: 'feature_extractor.conv_2.1.weight' has shape \(63,\)"):
        jaxtl.convert_torch_checkpoint(path, tmp_path / "out")


def test_error_head_does_not_match_task(tmp_path, capsys):
    path = _save_sd(tmp_path / "age.p", PengSFCN(TRANSFER_CHANNELS, 40).state_dict())
    code, err = _run_cli(["convert", str(path), str(tmp_path / "out"), "--task", "sex"], capsys)
    assert code == 2 and "40 outputs" in err and "age.p" in err
    code, err = _run_cli(["convert", str(path), str(tmp_path / "out"), "--bins", "37", "96"], capsys)
    assert code == 2 and "MAX - MIN = 40" in err
    sex = _save_sd(tmp_path / "sex.p", PengSFCN(TRANSFER_CHANNELS, 2).state_dict())
    code, err = _run_cli(["convert", str(sex), str(tmp_path / "out")], capsys)  # --task sex forgotten
    assert code == 2 and "use --task sex" in err


def test_error_missing_file(tmp_path, capsys):
    code, err = _run_cli(["convert", str(tmp_path / "nope.p"), str(tmp_path / "out")], capsys)
    assert code == 2 and "nope.p" in err and "no such file" in err


def test_cli_convert_then_load(tmp_path, capsys):
    path = _save_sd(tmp_path / "w.p", PengSFCN(TRANSFER_CHANNELS, 59).state_dict())
    assert cli.main(["convert", str(path), str(tmp_path / "m"), "--bins", "37", "96"]) == 0
    m = jaxtl.load_model(tmp_path / "m")
    assert m.task.bin_range == (37.0, 96.0) and m.task.num_outputs == 59
    assert cli.main(["convert", str(path), str(tmp_path / "m"), "--bins", "37", "96"]) == 2  # no silent overwrite
    assert "jaxtl convert --overwrite" in capsys.readouterr().err
    assert cli.main(["convert", str(path), str(tmp_path / "m"), "--bins", "40", "99", "--overwrite"]) == 0
    assert jaxtl.load_model(tmp_path / "m").task.bin_range == (40.0, 99.0)


def test_relative_model_paths(tmp_path, monkeypatch):
    """orbax refuses relative paths; jaxtl takes them (`make demo` writes to demo_out/)."""
    monkeypatch.chdir(tmp_path)
    path = _save_sd(tmp_path / "w.p", PengSFCN(TRANSFER_CHANNELS, 59).state_dict())
    jaxtl.convert_torch_checkpoint(path, "rel/m", task="age", bin_range=(37, 96))
    m = jaxtl.load_model("rel/m")
    jaxtl.save_model(m.model, "rel/copy", m.task)
    assert jaxtl.load_model("rel/copy").task.num_outputs == 59


# ---- named published weights ---------------------------------------------------------------------------


def test_published_name_missing_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        jaxtl.load_model("peng2021-age")
    msg = str(e.value)
    assert "run_20190719_00_epoch_best_mae.p" in msg and "UKBiobank_deep_pretrain" in msg
    assert f"jaxtl convert run_20190719_00_epoch_best_mae.p {tmp_path / 'peng2021-age'} --task age --bins 42 82" in msg
    with pytest.raises(FileNotFoundError, match="run_20191008_00_epoch_last.p"):
        jaxtl.load_model("peng2021-sex")


def test_published_name_found_in_jaxtl_home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_HOME", str(tmp_path))
    path = _save_sd(tmp_path / "w.p", PengSFCN(SEX_CHANNELS, 2).state_dict())
    jaxtl.convert_torch_checkpoint(path, tmp_path / "peng2021-sex", task="sex")
    m = jaxtl.load_model("peng2021-sex")
    assert m.channels == SEX_CHANNELS and m.task.name == "sex"


def test_load_model_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not a jaxtl model directory \(no model.json\)$"):
        jaxtl.load_model(tmp_path)
    # a pretraining run's folder or a transfer output: the error points at the model inside
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"did you mean {tmp_path / 'model'}\\?"):
        jaxtl.load_model(tmp_path)
    # Peng's PyTorch file given as the model: the conversion named
    (tmp_path / "run_20190719_00_epoch_best_mae.p").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="a PyTorch weights file .* is converted once: `jaxtl convert"):
        jaxtl.load_model(tmp_path / "run_20190719_00_epoch_best_mae.p")


def test_saved_sigma_zero_survives_loading(tmp_path):
    from flax import nnx

    from jaxtl.labels import make_task
    from jaxtl.model import SFCN

    model = SFCN((4, 8, 8, 8, 8, 8), 40, rngs=nnx.Rngs(0))
    for sigma in (0.0, 2.5):
        path = jaxtl.save_model(model, tmp_path / f"sigma{sigma}", make_task("age", (42, 82), sigma),
                                input_shape=(40, 48, 40))
        assert jaxtl.load_model(path).task.sigma == sigma  # 0 (one-hot labels) is not replaced by 1
    assert jaxtl.load_model(path / "model.json").path == path  # the directory's file names the directory
    assert repr(jaxtl.load_model(path)) == (f"JaxtlModel(task=AgeTask(bin_range=(42.0, 82.0), sigma=2.5, name='age'), "
                                            f"channels=(4, 8, 8, 8, 8, 8), input_shape=(40, 48, 40), downsample=1, "
                                            f"path='{path}')")  # one line, not every layer's arrays
    with pytest.raises(ValueError, match="the model has 40 outputs, but the sex task decodes 2; save it"):
        jaxtl.save_model(model, tmp_path / "as_sex", make_task("sex"), input_shape=(40, 48, 40))
    assert not (tmp_path / "as_sex").exists()
    assert jaxtl.load_model(path, dtype="bfloat16").model.dtype == "bfloat16"
    for dtype in ("int8", "bogus", jnp.float64):  # int8 loaded and gave all-zero features; "bogus" a bare TypeError
        with pytest.raises(ValueError, match=r"dtype=.*: the network computes in float32, bfloat16 or float16"):
            jaxtl.load_model(path, dtype=dtype)


def test_an_interrupted_overwrite_leaves_no_model(tmp_path, monkeypatch):
    """Overwriting a model directory (e.g. best/ at each better epoch): if writing the new weights fails, the
    directory must not read as the old model with partly replaced weights."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxtl.labels import make_task
    from jaxtl.model import SFCN

    model, task = SFCN((4, 8, 8, 8, 8, 8), 40, rngs=nnx.Rngs(0)), make_task("age", (42, 82))
    path = jaxtl.save_model(model, tmp_path / "best", task, input_shape=(40, 48, 40))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        jaxtl.save_model(model, path, task, input_shape=(40, 48, 40), overwrite=True)
    with pytest.raises(FileNotFoundError, match="not a jaxtl model directory"):
        jaxtl.load_model(path)
