"""Transfer: splits, network surgery, every method end to end, outputs, bias correction, CLI, predict."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from conftest import TINY_CHANNELS
from flax import nnx

from jaxtl import cache as cache_module
from jaxtl import cli
from jaxtl import transfer as transfer_module
from jaxtl.cache import CacheSource
from jaxtl.cohort import read_cohort
from jaxtl.data import load_volume
from jaxtl.heads import BiasCorrection
from jaxtl.model import SFCN
from jaxtl.transfer import (
    METHODS,
    FinetuneConfig,
    Phase,
    TransferConfig,
    balanced_indices,
    load_head,
    open_target,
    paper_finetune,
    predict_cohort,
    read_predictions,
    reinit_with_scaling,
    run_transfer,
    split_cohort,
    subsample_share,
    transfer,
    with_new_head,
)
from jaxtl.weights import load_model

ONE_EPOCH = Phase(epochs=1, lr=0.01, weight_decay=1e-3, momentum=0.9, step_epochs=1, gamma=0.5, batch_size=4)
FAST = TransferConfig(finetune=FinetuneConfig(ONE_EPOCH, ONE_EPOCH, ONE_EPOCH), cv=3)


# ---- splits -------------------------------------------------------------------------------------------


def test_split_is_per_site_by_participant_and_seeded():
    rng = np.random.default_rng(0)
    people = np.array([f"sub-{i:03d}" for i in range(100) for _ in range(2)])  # 2 sessions each
    sites = np.array(["A" if i < 60 else "B" for i in range(100) for _ in range(2)])
    ages = np.repeat(rng.uniform(20, 80, 100), 2)
    ages[5] = np.nan  # one unlabelled session
    split = split_cohort(people, sites, ages, "age", (0.4, 0.2, 0.4), seed=1)
    for p in np.unique(people):  # all sessions of a participant in one split (the unlabelled one aside)
        assert len(set(split[(people == p) & np.isfinite(ages)])) == 1
    assert split[5] == "unlabelled"
    for site, n in (("A", 60), ("B", 40)):
        m = sites == site
        counts = {k: len(set(people[m & (split == k)])) for k in ("train", "val", "test")}
        assert counts == {"train": round(0.4 * n), "val": round(0.6 * n) - round(0.4 * n),
                          "test": n - round(0.6 * n)}
    np.testing.assert_array_equal(split, split_cohort(people, sites, ages, "age", (0.4, 0.2, 0.4), seed=1))
    assert not np.array_equal(split, split_cohort(people, sites, ages, "age", (0.4, 0.2, 0.4), seed=2))
    sexes = np.repeat((rng.random(100) < 0.3).astype(float), 2)
    s = split_cohort(people, sites, sexes, "sex", (0.5, 0.0, 0.5), seed=0)
    for k in ("train", "test"):  # stratified by sex: both halves keep the male share
        assert abs(sexes[s == k].mean() - sexes.mean()) < 0.06
    half = subsample_share(split, people, 0.5, seed=1)
    assert (half == "train").sum() == (split == "train").sum() // 2 and (half == "unused").sum() > 0
    assert set(people[half == "train"]) < set(people[split == "train"])


def test_balanced_indices_oversample_the_minority():
    y = np.array([0] * 10 + [1] * 4 + [0] * 3)
    idx = np.arange(14)  # the last three are not training scans
    out = balanced_indices(idx, y, seed=0)
    assert (y[out] == 0).sum() == (y[out] == 1).sum() == 10 and set(out) <= set(idx)


# ---- networks -------------------------------------------------------------------------------------------


def _model(seed=0, k=40):
    return SFCN(TINY_CHANNELS, k, rngs=nnx.Rngs(seed))


def test_new_head_keeps_the_features():
    m = _model()
    new = with_new_head(m, 7, seed=3)
    assert new.head.kernel.shape == (8, 7)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 32)).astype(np.float32)
    m.eval()
    new.eval()
    feats = nnx.jit(lambda mdl, v: mdl.features(v))
    np.testing.assert_array_equal(np.asarray(feats(new, x)), np.asarray(feats(m, x)))


def test_reinit_with_scaling_keeps_each_tensors_mean_and_sd():
    m = _model(1)
    # give one tensor a distinctive scale so the per-tensor statistics are visible
    m.blocks[1].conv.kernel[...] = m.blocks[1].conv.kernel[...] * 10 + 3
    r = reinit_with_scaling(m, seed=0)
    old, new = nnx.state(m, nnx.Param), nnx.state(r, nnx.Param)
    for (path, a), (_, b) in zip(nnx.to_flat_state(old), nnx.to_flat_state(new), strict=True):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        if a.size > 100:
            assert not np.allclose(a, b), path
            assert abs(b.mean() - a.mean()) < 0.2 * a.std() + 1e-6, path
            assert abs(b.std() / a.std() - 1) < 0.15, path
        if a.size > 1 and np.all(a == a.flat[0]):  # BN scale = 1 everywhere: sd 0, stays 1
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(r.blocks[0].bn.mean[...]), np.asarray(m.blocks[0].bn.mean[...]))


def test_config_refuses_heads_that_would_fail_late_or_be_ignored():
    """--head is checked before the cohort is embedded, and refused where the method does not use it."""
    with pytest.raises(ValueError, match="head 'nope' is not available for task 'age'"):
        TransferConfig(method="features", head="nope").check()
    with pytest.raises(ValueError, match="head 'svr' applies to method 'features'"):
        TransferConfig(method="ft_step", head="svr").check()
    with pytest.raises(ValueError, match="epoch_scale must be above 0"):
        TransferConfig(epoch_scale=0).check()
    TransferConfig(task="sex", method="features", head="logistic").check()


def test_paper_hyperparameters():
    cfg = paper_finetune("ixi", "age")
    assert (cfg.head.epochs, cfg.head.lr, cfg.head.batch_size) == (25, 0.1, 4)
    assert (cfg.full.epochs, cfg.full.lr, cfg.full.weight_decay, cfg.full.momentum) == (250, 0.01, 5e-4, 0.8)
    assert cfg.scratch.batch_size == 8
    scaled = TransferConfig(paper_hps="ixi", epoch_scale=0.1).finetune_config()
    assert (scaled.full.epochs, scaled.full.step_epochs) == (25, 2)
    with pytest.raises(ValueError, match="no paper hyper-parameters"):
        paper_finetune("ukb", "age")


# ---- every method end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(ixi_tiny):
    return open_target(ixi_tiny[1], downsample=4)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_end_to_end(method, tiny_models, ixi_tiny, tmp_path):
    task = "sex" if method in ("ft_final", "ft_full", "reinit") else "age"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_transfer(tiny_models[task], ixi_tiny[1], tmp_path / "out", task=task, method=method,
                              config=FAST, progress=False)
    out = tmp_path / "out"
    ids = read_cohort(ixi_tiny[0]).participant_ids
    pred = read_predictions(out / "predictions.csv")
    head = ["id", "participant_id", "session", "site", "split", task, "prediction"]
    head += ["prediction_corrected", "gap", "gap_corrected"] if task == "age" else ["predicted_sex"]
    assert list(pred) == [*head, "qc_warnings"]
    assert list(pred["participant_id"]) == list(ids)
    assert np.all(np.isfinite(pred["prediction"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"]["train"] + metrics["n"]["val"] + metrics["n"]["test"] == 36
    assert metrics["n"] == {k: int((pred["split"] == k).sum()) for k in metrics["n"]}
    name = "mae" if task == "age" else "balanced_accuracy"
    assert np.isfinite(metrics["test"][name]) and metrics["method"] == method
    keys = {"mae", "r", "r2"} if task == "age" else {"accuracy", "balanced_accuracy", "auc"}
    assert keys <= set(metrics["test"]), metrics["test"]
    if task == "age":
        np.testing.assert_allclose(pred["gap"], pred["prediction"] - pred["age"], atol=2e-3)
        assert (out / "predicted_vs_age.png").stat().st_size > 1000 and (out / "gap_vs_age.png").exists()
    if method in ("ft_final", "ft_full"):
        _check_trained_parameters(method, load_model(tiny_models[task]).model, result.head.model.model)
    # the saved head reproduces the predictions on new scans (here: the same scans, from their NIfTI files)
    loaded = load_head(out / "head")
    assert loaded.method == method and loaded.task == task
    test = np.flatnonzero(pred["split"] == "test")[:3]  # (training scans have out-of-fold predictions)
    again = loaded.predict(read_cohort(ixi_tiny[0]).paths[test], progress=False)
    tol = 0.5 if task == "age" else 0.02  # NIfTI float32 vs float16 cache
    np.testing.assert_allclose(again, result.predictions["prediction"][test], atol=tol)
    if method in ("features", "ft_final"):
        # No cache needed: the BIDS directory gives the cache's results, up to the cache's float16 rounding, for a
        # scikit-learn head and a network trained on it. (A CSV cohort is read into the same cohort,
        # test_cohort.py; `jaxtl transfer` on a CSV: test_cli_transfer_*.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bids = run_transfer(tiny_models[task], ixi_tiny[0], tmp_path / "bids", task=task, method=method,
                                config=FAST, progress=False)
        np.testing.assert_allclose(bids.predictions["prediction"], result.predictions["prediction"], atol=tol)


def _check_trained_parameters(method, before, after):
    """ft_final changes only the head (BatchNorm statistics aside); ft_full changes the features too. With
    task and bins matching (sex -> sex) the pretrained head is kept and trained, not redrawn (TL)."""
    def params(m):
        return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}

    a, b = params(before), params(after)
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    if method == "ft_final":
        assert changed == {"head/kernel", "head/bias"}
    else:
        assert "blocks/0/conv/kernel" in changed and "blocks/5/bn/scale" in changed
    assert np.abs(b["head/kernel"] - a["head/kernel"]).max() < 0.1  # kept: close to the pretrained head


def test_bias_correction_is_fitted_on_the_training_split_only(tiny_models, target):
    backbone = load_model(tiny_models["age"])
    cfg = dataclasses.replace(FAST, task="age", method="features")
    split = split_cohort(target.participant_ids, target.sites, target.ages, "age", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = transfer(backbone, target, cfg, split=split, progress=False)
        # change the ages of the validation and test scans: nothing fitted may change
        ages = target.ages.copy()
        ages[split != "train"] += 17.0
        moved = dataclasses.replace(target, ages=ages)
        b = transfer(backbone, moved, cfg, split=split, progress=False)
        c = transfer(backbone, target, dataclasses.replace(cfg, bias_split="val"), split=split, progress=False)
    assert a.head.bias == b.head.bias and a.head.bias.split == "train (out-of-fold)"
    np.testing.assert_allclose(a.predictions["prediction"], b.predictions["prediction"])
    assert c.head.bias != a.head.bias and c.head.bias.split == "val"
    # out-of-fold training predictions: they differ from the in-sample fit's
    train = split == "train"
    in_sample = a.head.predict_features(target.features(backbone, progress=False)[train])
    assert not np.allclose(a.predictions["prediction"][train], in_sample)
    assert a.metrics["bias_correction"] == a.head.bias.to_dict()


def test_repeated_sessions_stay_in_one_fold_of_the_inner_cv():
    """Scans of one participant (sessions) never sit on both sides of an inner CV fold: near-duplicate
    scans with no real age signal give out-of-fold predictions no better than the mean, where folds over
    scans would let each scan be predicted from its own participant's other sessions."""
    rng = np.random.default_rng(0)
    people = np.repeat(np.arange(40), 3).astype(str)
    X = rng.normal(size=(40, 60))[np.arange(120) // 3] + 0.01 * rng.normal(size=(120, 60))
    y = rng.uniform(40, 80, 40)[np.arange(120) // 3]
    train = np.arange(120)
    cfg = dataclasses.replace(FAST, task="age", method="features", cv=5)
    groups = transfer_module.training_groups(people)
    assert groups is not None and transfer_module.training_groups(np.arange(5).astype(str)) is None
    pred = transfer_module._fit_sklearn(transfer_module.make_feature_head("age", cv=5, grouped=True), X, y, train,
                                        "age", cfg, groups)
    mean_mae = np.mean(np.abs(y - y.mean()))
    assert np.mean(np.abs(pred - y)) > 0.9 * mean_mae
    leaky = transfer_module._fit_sklearn(transfer_module.make_feature_head("age", cv=5), X, y, train, "age", cfg)
    assert np.mean(np.abs(leaky - y)) < 0.8 * mean_mae  # what the grouping prevents


def test_transfer_groups_the_inner_cv_by_participant(tiny_models, target):
    backbone = load_model(tiny_models["age"])
    twice = np.array([f"p{i // 2}" for i in range(len(target.ids))])  # pairs of scans as sessions of one person
    split = split_cohort(twice, target.sites, target.ages, "age", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = transfer(backbone, dataclasses.replace(target, participant_ids=twice),
                       dataclasses.replace(FAST, task="age", method="features"), split=split, progress=False)
    assert type(res.head.estimator[-1].cv).__name__ == "GroupFolds"
    assert res.head.bias.split == "train (out-of-fold)"


def test_network_bias_correction_is_fitted_on_the_validation_split(monkeypatch, tiny_models, target):
    """Networks fit their training scans closely (slope near 1 in-sample), so by default their age-bias
    correction is fitted on the validation split; scikit-learn heads keep out-of-fold training predictions."""
    from jaxtl import transfer as tl

    for method in ("ft_final", "ft_step", "ft_full", "scratch", "reinit"):
        assert TransferConfig(method=method).bias_fit_split() == "val", method
    assert TransferConfig(method="direct").bias_fit_split() == "train+val"  # nothing trained on the cohort
    for method in ("features", "elastic"):
        assert TransferConfig(method=method).bias_fit_split() == "train", method
    assert TransferConfig(method="ft_step", bias_split="train").bias_fit_split() == "train"
    backbone = load_model(tiny_models["age"])
    split = split_cohort(target.participant_ids, target.sites, target.ages, "age", seed=0)
    train = split == "train"
    # a network that memorised its training scans and regresses to the mean (slope 0.7) on new ones
    pred = np.where(train, target.ages, 0.7 * target.ages + 15.0)
    head = tl.TransferHead("ft_step", "age", "network", backbone)
    monkeypatch.setattr(tl, "fit_method", lambda *a, **k: (head, pred.copy()))
    cfg = dataclasses.replace(FAST, task="age", method="ft_step")
    r = transfer(backbone, target, cfg, split=split, progress=False)
    assert r.head.bias.split == r.metrics["bias_split"] == "val" and r.metrics["bias_usable"] is True
    np.testing.assert_allclose((r.head.bias.slope, r.head.bias.intercept), (0.7, 15.0), atol=1e-9)
    assert abs(r.metrics["test"]["mean_gap_corrected"]) < 1e-9 and r.metrics["test"]["r_corrected"] > 0.99
    # no validation scans: fall back to the training split, say so, and label it in-sample
    with pytest.warns(UserWarning, match="fewer than 3 validation scans"):
        r2 = transfer(backbone, target, cfg, split=np.where(split == "val", "test", split), progress=False)
    assert r2.head.bias.split == r2.metrics["bias_split"] == "train (in-sample)"
    np.testing.assert_allclose(r2.head.bias.slope, 1.0)


def test_direct_bias_correction_uses_every_labelled_scan_but_the_test_split(tiny_models, target):
    """Direct transfer trains nothing on the cohort, so the correction is fitted on train + val (labelled held-out
    predictions); with --split 1 0 0 on every labelled scan, as brainageR users fit it on their controls (the
    method had refused a split without training scans, and fitted on val alone)."""
    backbone = load_model(tiny_models["age"])
    cfg = dataclasses.replace(FAST, task="age", method="direct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = transfer(backbone, target, cfg, progress=False)
        everything = transfer(backbone, target, dataclasses.replace(cfg, split=(0.0, 1.0, 0.0)), progress=False)
    split = r.predictions["split"]
    assert r.head.bias.split == r.metrics["bias_split"] == "train+val (held out: direct transfer trains on no scan)"
    assert r.head.bias.n == int(np.isin(split, ["train", "val"]).sum()) and (split == "test").any()
    assert everything.head.bias.n == len(target) and everything.metrics["n"]["train"] == 0
    # nor does direct sex transfer need a training split (it had failed indexing an empty one)
    sex = dataclasses.replace(cfg, task="sex", split=(0.0, 1.0, 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = transfer(load_model(tiny_models["sex"]), target, sex, progress=False)
    assert r.metrics["n"]["val"] == len(target) and r.predictions["prediction"].shape == (len(target),)


def _fit_without_training(monkeypatch, backbone, target, split, config):
    """fit_method with train_phase replaced by a recorder (the network is returned as it is)."""
    from jaxtl import transfer as tl

    calls = []

    def record(model, source, indices, task, phase, *, seed=0, desc="train", **kw):
        calls.append({"seed": seed, "phase": phase, "desc": desc, "indices": np.asarray(indices)})
        model.eval()
        return model

    monkeypatch.setattr(tl, "train_phase", record)
    head, _ = tl.fit_method(backbone, target, split, config, progress=False)
    return head, calls


def test_age_bins_come_from_the_training_split_only(monkeypatch, tiny_models, target):
    from jaxtl.transfer import default_bin_range, network_bins

    backbone = load_model(tiny_models["age"])  # bins 15-90
    split = split_cohort(target.participant_ids, target.sites, target.ages, "age", seed=0)
    train = split == "train"
    cfg = dataclasses.replace(FAST, task="age", method="ft_step")
    head, _ = _fit_without_training(monkeypatch, backbone, target, split, cfg)
    assert head.model.task.bin_range == default_bin_range(target.ages[train])
    # validation and test ages far outside the training range: the bins do not move
    ages = target.ages.copy()
    ages[~train] += 25.0
    moved, _ = _fit_without_training(monkeypatch, backbone, dataclasses.replace(target, ages=ages), split, cfg)
    assert moved.model.task.bin_range == head.model.task.bin_range
    # ft_final keeps the pretrained head when its bins cover the training ages (test ages do not count)
    ft_final = dataclasses.replace(cfg, method="ft_final")
    assert network_bins(ft_final, backbone, ages[train]) == (15.0, 90.0)
    # the paper's fixed bins with its hyper-parameters (paper-spec section 3)
    for dataset, bins in (("oasis", (37.0, 96.0)), ("ixi", (17.0, 89.0)), ("abide", (2.0, 59.0))):
        young = np.array([40.0, 50.0, 55.0])
        assert network_bins(dataclasses.replace(cfg, paper_hps=dataset), backbone, young) == bins
    with pytest.warns(UserWarning, match="do not cover the training ages"):  # ABIDE bins end at 59
        assert network_bins(dataclasses.replace(cfg, paper_hps="abide"), backbone,
                            np.array([30.0, 70.0])) == default_bin_range(np.array([30.0, 70.0]))
    assert network_bins(dataclasses.replace(cfg, bin_range=(10, 95), paper_hps="ixi"), backbone, young) == (10, 95)


def test_ft_step_phases_draw_distinct_random_streams(monkeypatch, tiny_models, target):
    from jaxtl.transfer import phase_seed

    backbone = load_model(tiny_models["age"])
    split = split_cohort(target.participant_ids, target.sites, target.ages, "age", seed=0)
    cfg = dataclasses.replace(FAST, task="age", method="ft_step", seed=3)
    _, calls = _fit_without_training(monkeypatch, backbone, target, split, cfg)
    assert [c["desc"] for c in calls] == ["ft_step head", "ft_step all layers"]
    assert calls[0]["seed"] == 3 and calls[1]["seed"] != calls[0]["seed"]  # phase 1 = ft_final's stream
    assert calls[1]["seed"] == phase_seed(3, 1) != phase_seed(4, 1) and phase_seed(3, 1) != 4
    _, single = _fit_without_training(monkeypatch, backbone, target, split, dataclasses.replace(cfg, method="ft_full"))
    assert [c["seed"] for c in single] == [3]


def test_device_batch_warns_once_and_rejects_an_empty_batch():
    from jaxtl.transfer import device_batch

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing changes
        assert device_batch(8, 100, 2) == 8 and device_batch(8, 5, 1) == 5  # TL: min(len(dataset), batch)
    with pytest.warns(UserWarning, match=r"batch size 8 is not a multiple of the 3 devices: using 6"):
        assert device_batch(8, 101, 3) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert device_batch(8, 101, 3) == 6
    with pytest.raises(ValueError, match=r"batch size 4 .* smaller than the 8 devices"):
        device_batch(4, 100, 8)


def test_paper_hyperparameters_depend_on_the_source_task(monkeypatch, tiny_models, target):
    """paper-spec 6.1: OASIS sex ft_final from the age-pretrained SFCN used wd 5e-3, momentum 0.8, StepLR 20."""
    same = paper_finetune("oasis", "sex")
    other = paper_finetune("oasis", "sex", source_task="age")
    assert (same.head.weight_decay, same.head.momentum, same.head.step_epochs) == (1e-3, 0.9, 10)
    assert other.head == Phase(50, 0.1, 5e-3, 0.8, 20, 0.1, 8) and other.full == same.full
    assert paper_finetune("oasis", "sex", source_task="sex") == same
    assert paper_finetune("ixi", "sex", source_task="age") == paper_finetune("ixi", "sex")  # no other row given
    backbone = load_model(tiny_models["age"])
    split = split_cohort(target.participant_ids, target.sites, target.sexes, "sex", seed=0)
    cfg = TransferConfig(task="sex", method="ft_final", paper_hps="oasis")
    _, calls = _fit_without_training(monkeypatch, backbone, target, split, cfg)
    assert [c["phase"] for c in calls] == [other.head]


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_transfer_then_predict(tiny_models, ixi_tiny, tmp_path, capsys):
    out = tmp_path / "tl"
    argv = ["transfer", "--model", str(tiny_models["age"]), "--cohort", str(ixi_tiny[1]), "--task", "age",
            "--method", "features", "--out", str(out), "--seed", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert capsys.readouterr().out.startswith(f"features age: test mae {metrics['test']['mae']:.4g} (train ")
    no_test = {**metrics, "n": {**metrics["n"], "test": 0}, "test": {"n": 0}}  # --split 1 0 0 had printed "mae nan"
    assert cli.transfer_summary(no_test).startswith("features age: no test split (train ")
    assert cli.main(argv) == 2  # results exist: one-line error, no traceback
    assert "already holds transfer results" in capsys.readouterr().err
    # a new cohort without labels: a CSV of paths (test scans: the training scans' predictions are out-of-fold)
    old = read_predictions(out / "predictions.csv")
    test = np.flatnonzero(old["split"] == "test")[:3]
    paths = read_cohort(ixi_tiny[0]).paths[test]
    table = tmp_path / "new.csv"
    table.write_text("path\n" + "\n".join(paths) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["predict", "--model", str(out / "head"), "--cohort", str(table),
                         "--out", str(tmp_path / "new_pred.csv")]) == 0
    new = read_predictions(tmp_path / "new_pred.csv")
    np.testing.assert_allclose(new["prediction"], old["prediction"][test], atol=0.5)
    bias = BiasCorrection.from_dict(json.loads((out / "head" / "head.json").read_text())["bias_correction"])
    assert bias.split == "train (out-of-fold)" and bias.n == (old["split"] == "train").sum()
    np.testing.assert_allclose(new["prediction_corrected"], bias.apply(new["prediction"]), rtol=1e-4)
    assert np.all(np.isnan(new["gap"]))  # no ages given: no gap
    from jaxtl.embed import predict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(predict(list(paths), out / "head", progress=False), new["prediction"], rtol=1e-4)
    with pytest.raises(ValueError, match="is a transfer head: dtype= applies to models only"):
        predict(list(paths), out / "head", dtype="bfloat16", progress=False)
    # a head's predictions are float64 as a model's; check=False silences the array intensity warning for both
    raw = np.stack([load_volume(p, downsample=4) for p in paths[:2]]) * 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_head = predict(raw, out / "head", check=False, progress=False)
        by_model = predict(raw, tiny_models["age"], check=False, progress=False)
    assert by_head.dtype == by_model.dtype == np.float64
    assert cli.main(["transfer", "--model", str(tmp_path / "nope"), "--cohort", str(ixi_tiny[1]),
                     "--out", str(tmp_path / "x")]) == 2
    assert "no jaxtl model" in capsys.readouterr().err


def test_predict_cohort_with_a_plain_model_is_direct(tiny_models, ixi_tiny):
    from jaxtl.embed import predict

    cols = predict_cohort(tiny_models["age"], ixi_tiny[1], progress=False)
    np.testing.assert_allclose(cols["prediction"], predict(ixi_tiny[1], tiny_models["age"], progress=False),
                               rtol=1e-6)
    assert np.isnan(cols["prediction_corrected"]).all() and np.isnan(cols["gap_corrected"]).all()  # no correction


def _bad_scans(root, good):
    """A corrupt file (not NIfTI) and an image with NaN voxels, made from the good scan `good`."""
    import nibabel as nib

    corrupt = root / "sub-corrupt_T1w.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b truncated gzip")
    img = nib.load(good)
    data = img.get_fdata(dtype=np.float32)
    data[20:25, 20:25, 20:25] = np.nan
    nonfinite = root / "sub-nan_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), nonfinite)
    return str(corrupt), str(nonfinite)


def test_cli_predict_skips_scans_that_fail_and_reports_them(tiny_models, ixi_tiny, tmp_path, capsys):
    good = read_cohort(ixi_tiny[0]).paths[:3]
    corrupt, nonfinite = _bad_scans(tmp_path, good[0])
    table = tmp_path / "new.csv"
    table.write_text("path\n" + "\n".join([good[0], corrupt, good[1], nonfinite, good[2]]) + "\n")
    out = tmp_path / "new_folder" / "pred.csv"  # --out's folder is created
    argv = ["predict", "--model", str(tiny_models["age"]), "--cohort", str(table), "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped scans are reported by the command, not as warnings
        assert cli.main(argv) == 0
    captured = capsys.readouterr()
    failures = out.parent / "pred.failures.tsv"
    # a plain model has no bias correction: the corrected columns are empty, and the command says why
    assert "has no usable age-bias correction" in captured.err
    assert f"2 of 5 scans failed: see {failures}" in captured.err
    assert "wrote 3 predictions" in captured.out
    pred = read_predictions(out)
    assert list(pred["id"]) == ["sub-ixi00001", "sub-ixi00002", "sub-ixi00003"] and "error" not in pred
    assert np.all(np.isfinite(pred["prediction"])) and np.isnan(pred["gap_corrected"]).all()
    rows = [line.split("\t") for line in failures.read_text().splitlines()]
    assert rows[0] == ["id", "path", "reason"]  # the layout of `jaxtl prepare`'s failures.tsv
    assert [(r[0], r[1]) for r in rows[1:]] == [("sub-corrupt", corrupt), ("sub-nan", nonfinite)]
    assert "unreadable" in rows[1][2] and "non-finite" in rows[2][2]
    # the same scans through the Python API: aligned rows, NaN where they failed
    from jaxtl.embed import SkippedScansWarning

    with pytest.warns(SkippedScansWarning):
        cols = predict_cohort(tiny_models["age"], table, progress=False, on_error="skip")
    np.testing.assert_allclose(cols["prediction"][[0, 2, 4]], pred["prediction"], rtol=1e-4)
    assert np.isnan(cols["prediction"][[1, 3]]).all() and list(cols["error"] != "") == [0, 1, 0, 1, 0]
    # every scan fails: exit code 1 (the failures are still written); --on-error raise stops at the first
    table.write_text(f"path\n{corrupt}\n{nonfinite}\n")
    assert cli.main(argv) == 1
    assert "2 of 2 scans failed" in capsys.readouterr().err
    assert read_predictions(out)["id"].size == 0 and len(failures.read_text().splitlines()) == 3
    table.write_text(f"path\n{good[0]}\n")
    assert cli.main(argv) == 0 and not failures.exists()  # no failures: no stale failures file
    table.write_text(f"path\n{good[0]}\n{corrupt}\n")
    assert cli.main([*argv, "--on-error", "raise"]) == 2
    assert "sub-corrupt_T1w.nii.gz: unreadable" in capsys.readouterr().err
    # a row whose file is gone is one more skipped scan, not a stop; with --on-error raise it is named
    missing = str(tmp_path / "sub-gone_T1w.nii.gz")
    table.write_text(f"path\n{good[0]}\n{missing}\n")
    assert cli.main(argv) == 0
    assert "1 of 2 scans failed" in capsys.readouterr().err
    rows = [line.split("\t") for line in failures.read_text().splitlines()[1:]]
    assert rows[0][1] == missing and rows[0][2] == f"{missing}: file not found"
    assert cli.main([*argv, "--on-error", "raise"]) == 2
    assert f"line 3: file not found: {missing}" in capsys.readouterr().err
    # a label the table cannot give (an age that is no number): predict needs none, so the scan is predicted
    # without it, with a warning (it had been dropped, in neither the CSV nor the failures)
    table.write_text(f"path,age\n{good[0]},thirty\n{good[1]},50\n")
    for mode in ("skip", "raise"):
        with pytest.warns(UserWarning, match=r"1 label\(s\) not understood, left missing \(the scans are kept\):"
                                             r"\n  line 2: .*'thirty'"):
            assert cli.main([*argv, "--on-error", mode]) == 0
        pred = read_predictions(out)
        assert list(pred["id"]) == ["sub-ixi00001", "sub-ixi00002"] and np.isnan(pred["age"][0])
    # in BIDS: a subject's row given twice leaves its labels missing, its scans predicted
    bids = tmp_path / "bids"
    for i, path in enumerate(good[:2], 1):
        (bids / f"sub-0{i}" / "anat").mkdir(parents=True)
        (bids / f"sub-0{i}" / "anat" / f"sub-0{i}_T1w.nii.gz").symlink_to(path)
    (bids / "participants.tsv").write_text("participant_id\tage\nsub-01\t40\nsub-01\t41\nsub-02\t50\n")
    with pytest.warns(UserWarning, match=r"line 3: duplicate participant_id 'sub-01'"):
        assert cli.main([*argv[:4], str(bids), *argv[5:]]) == 0
    pred = read_predictions(out)
    assert list(pred["id"]) == ["sub-01", "sub-02"] and np.isnan(pred["age"][0]) and pred["age"][1] == 50


def test_cli_transfer_leaves_out_scans_that_fail_to_load(tiny_models, ixi_tiny, tmp_path, capsys, monkeypatch):
    """`jaxtl transfer` on a NIfTI table: a corrupt file, NaN voxels, a missing file and an unparseable age are
    left out of the split (listed in failures.tsv and metrics.json), not a stop; `--on-error raise` stops."""
    cohort = read_cohort(ixi_tiny[0]).select(range(16))
    corrupt, nonfinite = _bad_scans(tmp_path, cohort.paths[0])
    missing = str(tmp_path / "sub-gone_T1w.nii.gz")
    rows = [(s.participant_id, s.path, s.age) for s in cohort]
    rows += [("sub-corrupt", corrupt, 40), ("sub-nan", nonfinite, 50), ("sub-gone", missing, 60)]
    table = tmp_path / "cohort.csv"
    table.write_text("participant_id,path,age\n" + "".join(f"{i},{p},{a}\n" for i, p, a in rows)
                     + f"sub-old,{cohort.paths[1]},thirty\n")
    out = tmp_path / "tl"
    argv = ["transfer", "--model", str(tiny_models["age"]), "--cohort", str(table), "--method", "features",
            "--out", str(out), "--no-progress"]
    loads = []
    monkeypatch.setattr(cache_module, "load_volume", lambda path, **kw: loads.append(path) or load_volume(path, **kw))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    # each file read once: the scans are kept in memory for the method
    assert sorted(map(str, loads)) == sorted(map(str, (p for _, p, _ in rows)))
    err = capsys.readouterr().err
    assert f"3 scans could not be loaded and were left out of the split: see {out / 'failures.tsv'}" in err
    failed = [line.split("\t") for line in (out / "failures.tsv").read_text().splitlines()]
    assert failed[0] == ["id", "path", "reason"]
    assert [(r[0], r[1]) for r in failed[1:]] == [("sub-corrupt", corrupt), ("sub-nan", nonfinite),
                                                  ("sub-gone", missing)]
    pred = read_predictions(out / "predictions.csv")
    assert sorted(pred["participant_id"]) == sorted(cohort.participant_ids)  # nor the row aged "thirty"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["failed_to_load"] == 3 and sum(metrics["n"].values()) == 16
    # in Python: the warning carries every failure; Target.select takes indices or a mask
    from jaxtl.embed import SkippedScansWarning
    from jaxtl.transfer import ArraySource, drop_unloadable, open_target

    target = open_target(table, 4, check_files=False, on_error="skip")
    with pytest.warns(SkippedScansWarning) as caught:
        kept, failures = drop_unloadable(target, progress=False)
    assert [f.index for f in caught[0].message.failures] == [16, 17, 18] and len(failures) == 3 and len(kept) == 16
    assert isinstance(kept.source, ArraySource) and len(kept.source) == 16
    with pytest.warns(SkippedScansWarning):
        on_disk, _ = drop_unloadable(target, progress=False, keep_gb=0.001)  # more than that: read again later
    assert list(on_disk.ids) == list(kept.ids) and not isinstance(on_disk.source, ArraySource)
    np.testing.assert_array_equal(kept.source[3]["image"], on_disk.source[3]["image"])
    mask = np.arange(len(target)) % 2 == 0
    assert list(target.select(mask).ids) == list(target.ids[mask]) == list(target.select(np.flatnonzero(mask)).ids)
    table.write_text("participant_id,path,age\n" + "".join(f"{i},{p},{a}\n" for i, p, a in rows[:17]))
    assert cli.main([*argv, "--overwrite", "--on-error", "raise"]) == 2
    assert "sub-corrupt_T1w.nii.gz: unreadable" in capsys.readouterr().err


def test_heads_predict_nan_for_skipped_scans(tiny_models, ixi_tiny, tmp_path):
    """Feature and voxel heads predict on the scans that loaded; the others get NaN, rows stay aligned."""
    from sklearn.linear_model import Ridge

    from jaxtl.embed import SkippedScansWarning
    from jaxtl.transfer import TransferHead

    good = read_cohort(ixi_tiny[0]).paths[:2]
    corrupt, _ = _bad_scans(tmp_path, good[0])
    rng = np.random.default_rng(0)
    ages = [20.0, 30.0, 40.0, 50.0]
    heads = [TransferHead("features", "age", "features", load_model(tiny_models["age"]),
                          Ridge().fit(rng.normal(size=(4, TINY_CHANNELS[-1])), ages), downsample=4),
             TransferHead("elastic", "age", "elastic", estimator=Ridge().fit(rng.normal(size=(4, 1200)), ages),
                          voxel_factor=4, downsample=4)]  # 40x48x40 block-averaged by 4: 1200 voxels
    for head in heads:
        with pytest.warns(SkippedScansWarning, match="sub-corrupt_T1w"):
            pred = head.predict([good[0], corrupt, good[1]], on_error="skip", progress=False)
        assert list(np.isnan(pred)) == [False, True, False], head.kind
        np.testing.assert_allclose(pred[[0, 2]], head.predict(list(good), progress=False), rtol=1e-5)


def test_cli_methods_are_the_transfer_methods():
    from jaxtl import cli, transfer

    assert cli.TRANSFER_METHODS == transfer.METHODS


def _suspicious_scans(root, good):
    """Two usable but suspicious scans made from `good`: not skull-stripped (bright background), and one whose
    qform and sform disagree."""
    import nibabel as nib

    img = nib.load(good)
    data = img.get_fdata(dtype=np.float32)
    unstripped = root / "sub-skull_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.where(data > 0, data, 0.5 * data.max()), img.affine), unstripped)
    disagree = nib.Nifti1Image(data, img.affine)
    shifted = img.affine.copy()
    shifted[0, 3] += 20
    disagree.set_sform(img.affine, code=1)
    disagree.set_qform(shifted, code=1)
    qs = root / "sub-qs_T1w.nii.gz"
    nib.save(disagree, qs)
    return str(unstripped), str(qs)


def test_input_warnings_are_columns_of_predictions_and_features(tiny_models, ixi_tiny, tmp_path, capsys):
    """Each scan's input warnings land in its own row's qc_warnings (read on several threads at once), from NIfTI
    files and from a cache that `jaxtl prepare` made of them; the CLI counts them."""
    from jaxtl.cache import prepare_cache
    from jaxtl.data import InputWarning
    from jaxtl.transfer import embed_cohort

    good = read_cohort(ixi_tiny[0]).paths[:3]
    unstripped, qs = _suspicious_scans(tmp_path, good[0])
    table = tmp_path / "new.csv"
    table.write_text("path\n" + "\n".join([good[0], unstripped, good[1], qs, good[2]]) + "\n")
    with pytest.warns(InputWarning):
        cols = predict_cohort(tiny_models["age"], table, progress=False, batch_size=5)
    qc = list(cols["qc_warnings"])
    assert qc[0] == qc[2] == qc[4] == ""
    assert qc[1].startswith(f"{unstripped}: ") and "not skull-stripped" in qc[1] and "qform" not in qc[1]
    assert qc[3].startswith(f"{qs}: qform and sform disagree") and "skull" not in qc[3]
    with pytest.warns(InputWarning):
        assert list(embed_cohort(tiny_models["age"], table, progress=False)["qc_warnings"]) == qc
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prepare records the warnings (warnings.tsv) instead of warning
        assert prepare_cache(table, cache, downsample=4, workers=1).ok
    assert list(predict_cohort(tiny_models["age"], cache, progress=False)["qc_warnings"]) == qc
    out = tmp_path / "pred.csv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        assert cli.main(["predict", "--model", str(tiny_models["age"]), "--cohort", str(table), "--out",
                         str(out), "--no-progress"]) == 0
    assert f"2 of 5 scans have input warnings (their qc_warnings column in {out})" in capsys.readouterr().err
    assert list(read_predictions(out)["qc_warnings"]) == qc
    # `jaxtl transfer`'s predictions.csv too (NIfTI files loaded on grain's and the readers' threads)
    cohort = read_cohort(ixi_tiny[0]).select(range(10))
    labelled = tmp_path / "labelled.csv"
    rows = [(s.participant_id, s.path, s.age) for s in cohort] + [("sub-skull", unstripped, 50), ("sub-qs", qs, 60)]
    labelled.write_text("participant_id,path,age\n" + "".join(f"{i},{p},{a}\n" for i, p, a in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_transfer(tiny_models["age"], labelled, tmp_path / "ft_final", task="age", method="ft_final",
                              config=FAST, progress=False)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["transfer", "--model", str(tiny_models["age"]), "--cohort", str(labelled), "--task", "age",
                         "--method", "features", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    # the command says so too: those scans trained and tested the head
    assert "2 of 12 scans have input warnings (their qc_warnings column in " in capsys.readouterr().err
    for method, found in (("ft_final", result.predictions["qc_warnings"]),
                          ("features", read_predictions(tmp_path / "cli" / "predictions.csv")["qc_warnings"])):
        found = list(found)
        assert found[:10] == [""] * 10 and (found[10], found[11]) == (qc[1], qc[3]), method


def test_cli_embed_writes_features_per_scan(tiny_models, ixi_tiny, tmp_path, capsys, monkeypatch):
    from jaxtl.embed import embed

    out = tmp_path / "features" / "ixi.csv"
    assert cli.main(["embed", "--model", str(tiny_models["age"]), "--cohort", str(ixi_tiny[1]), "--out", str(out),
                     "--no-progress"]) == 0
    width = TINY_CHANNELS[-1]  # the features: the last block's channels (64 in Peng's SFCN)
    assert f"36 scans x {width} features columns" in capsys.readouterr().out
    table = read_predictions(out)
    names = [f"sfcn_features{j}" for j in range(width)]
    assert list(table)[:6] == ["id", "participant_id", "session", "site", "age", "sex"]
    assert list(table)[6:] == [*names, "qc_warnings"]
    src = CacheSource(ixi_tiny[1])
    assert list(table["id"]) == list(src.ids)
    np.testing.assert_allclose(table["age"], src.ages, rtol=1e-6)
    expected = embed(ixi_tiny[1], tiny_models["age"], progress=False)
    np.testing.assert_allclose(np.stack([table[k] for k in names], 1), expected, rtol=1e-5, atol=1e-6)
    # a scan that fails to load: reported and listed beside the CSV, the others embedded
    good = read_cohort(ixi_tiny[0]).paths[:2]
    corrupt, _ = _bad_scans(tmp_path, good[0])
    cohort = tmp_path / "new.csv"
    cohort.write_text("path\n" + "\n".join([good[0], corrupt, good[1]]) + "\n")
    argv = ["embed", "--model", str(tiny_models["age"]), "--cohort", str(cohort), "--out", str(out),
            "--layer", "logits"]
    assert cli.main(argv) == 0
    assert "1 of 3 scans failed" in capsys.readouterr().err
    table = read_predictions(out)
    assert table["id"].size == 2 and "sfcn_logits0" in table and (out.parent / "ixi.failures.tsv").exists()
    # a table read as `jaxtl prepare` would: columns named otherwise and a sex coding, on embed/predict/transfer
    cohort.write_text("T1,Age (years),SEX_ID\n" + f"{good[0]},30,1\n{corrupt},40,2\n{good[1]},50,2\n")
    argv = ["embed", "--model", str(tiny_models["age"]), "--cohort", str(cohort), "--out", str(out), "--no-progress",
            "--path-column", "T1", "--age-column", "Age (years)", "--sex-column", "SEX_ID", "--sex-coding", "1=M,2=F"]
    assert cli.main(argv) == 0
    table = read_predictions(out)
    assert list(table["age"]) == [30, 50] and list(table["sex"]) == [1, 0]
    assert cli.main([*argv[:4], str(ixi_tiny[1]), *argv[5:]]) == 2  # a cache holds the labels it was prepared with
    assert "is a prepared cache: it holds the labels read when it was prepared" in capsys.readouterr().err
    # a .tsv output is tab-separated; an --out that is a directory is refused before any scan is read
    tsv = out.with_suffix(".tsv")
    assert cli.main([*argv[:6], str(tsv), *argv[7:]]) == 0
    assert tsv.read_text().startswith("id\tparticipant_id\t") and list(read_predictions(tsv)["age"]) == [30, 50]
    monkeypatch.setattr(transfer_module, "embed_cohort", lambda *a, **k: pytest.fail("ran before --out was checked"))
    assert cli.main([*argv[:6], str(tmp_path), *argv[7:]]) == 2
    assert f"--out {tmp_path} is a directory; give a file name" in capsys.readouterr().err
