"""scikit-learn side: SFCNEmbedder in pipelines, feature heads, the elastic baseline, bias correction."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.feature_selection import SelectKBest
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator

from jaxtl import heads
from jaxtl.cache import CacheSource
from jaxtl.data import InputError, InputWarning
from jaxtl.embed import SkippedScansWarning, embed
from jaxtl.heads import (
    AGE_HEADS,
    BiasCorrection,
    ElasticClassifier,
    ElasticRegressor,
    SFCNEmbedder,
    fit_grouped,
    load_estimator,
    make_elastic,
    make_feature_head,
    predict_head,
    save_estimator,
)
from jaxtl.weights import load_model


@pytest.fixture(scope="module")
def cache_xy(ixi_tiny):
    src = CacheSource(ixi_tiny[1])
    X = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32)
    return X, src.ages.astype(np.float64)


def test_embedder_in_a_pipeline_with_cross_val_score(tiny_models, cache_xy):
    X, y = cache_xy
    model = load_model(tiny_models["age"])
    pipe = make_pipeline(SFCNEmbedder(model), StandardScaler(), RidgeCV())
    scores = cross_val_score(pipe, X, y, cv=KFold(3), scoring="neg_mean_absolute_error")
    assert scores.shape == (3,) and np.all(np.isfinite(scores))
    # the same as embedding once and cross-validating the head (eval-mode features do not depend on the fold)
    feats = embed(X, model, progress=False)
    ref = cross_val_score(make_pipeline(StandardScaler(), RidgeCV()), feats, y, cv=KFold(3),
                          scoring="neg_mean_absolute_error")
    np.testing.assert_allclose(scores, ref, rtol=1e-4)


def test_embedder_params_clone_and_paths(tiny_models, ixi_tiny):
    emb = SFCNEmbedder(str(tiny_models["age"]), layer="block2", batch_size=4)
    assert emb.get_params() == {"model": str(tiny_models["age"]), "layer": "block2", "batch_size": 4,
                                "dtype": None, "downsample": None, "progress": False, "check": True,
                                "workers": None, "on_error": "raise"}
    twin = clone(emb)
    assert twin.get_params() == emb.get_params() and twin is not emb
    pipe = make_pipeline(emb, RidgeCV())
    assert pipe.get_params()["sfcnembedder__layer"] == "block2"
    pipe.set_params(sfcnembedder__layer="features")
    assert emb.layer == "features"
    from jaxtl.cohort import read_cohort

    paths = read_cohort(ixi_tiny[0]).paths[:3]  # scikit-learn indexes a numpy array of paths fine
    out = clone(emb).fit(paths).transform(paths)
    assert out.shape == (3, 8)
    assert list(emb.get_feature_names_out()[:2]) == ["sfcn_features0", "sfcn_features1"]
    # a JaxtlModel parameter survives clone (deep copy) too
    m = load_model(tiny_models["age"])
    np.testing.assert_allclose(clone(SFCNEmbedder(m)).transform(paths), out, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown layer"):
        SFCNEmbedder(m, layer="conv9").fit()
    for bad in ("conv9", "block9"):  # not names of made-up columns, nor an IndexError
        with pytest.raises(ValueError, match="unknown layer"):
            SFCNEmbedder(m, layer=bad).get_feature_names_out()
    # embed's options: a scan that fails to load stops the transform, or (on_error="skip") is a NaN row; zero
    # volumes are warned about (not normalised) only with check=True
    missing = str(Path(paths[0]).parent / "sub-gone_T1w.nii.gz")
    with pytest.raises(InputError, match="sub-gone"):
        clone(emb).transform([*paths, missing])
    with pytest.warns(SkippedScansWarning, match="sub-gone"):
        skipped = SFCNEmbedder(m, on_error="skip", workers=1).fit().transform([*paths, missing])
    assert np.isnan(skipped[3]).all() and np.isfinite(skipped[:3]).all()
    zeros = np.zeros((2, *m.input_shape), np.float32)
    with pytest.warns(InputWarning, match="mean intensity"):
        SFCNEmbedder(m).transform(zeros)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SFCNEmbedder(m, check=False).transform(zeros).shape == (2, 8)
    with pytest.raises(ValueError, match="on_error must be"):
        SFCNEmbedder(m, on_error="ignore").fit()
    for bad in (-1, 0, 2.5):  # -1: joblib's n_jobs habit; the thread pool's own error did not name the parameter
        with pytest.raises(ValueError, match="workers must be None or a whole number >= 1"):
            SFCNEmbedder(m, workers=bad).fit()
        with pytest.raises(ValueError, match="workers must be None"):
            SFCNEmbedder(m, workers=bad).transform(paths)  # transform needs no fit: embed checks it too
    with pytest.raises(ValueError, match="check must be True or False"):
        SFCNEmbedder(m, check="no").fit()
    # fit checks them, as scikit-learn estimators check their parameters (they had passed fit, failed in transform)
    with pytest.raises(ValueError, match="batch_size=0: give a positive number"):
        SFCNEmbedder(m, batch_size=0).fit()
    with pytest.raises(ValueError, match="dtype='int8': the network computes in float32, bfloat16 or float16"):
        SFCNEmbedder(m, dtype="int8").fit()
    # paths in a pandas Series whose index is not 0..n-1 (sorted, filtered): read by position, as scikit-learn's
    # CV splits hand them over
    import pandas as pd

    series = pd.Series(paths, index=[7, 3, 5])
    np.testing.assert_allclose(clone(emb).transform(series), out, rtol=1e-6)
    y = np.arange(9.0)
    nine = pd.Series(list(paths) * 3, index=range(100, 109))
    scores = cross_val_score(make_pipeline(clone(emb), RidgeCV()), nine, y, cv=KFold(3, shuffle=True, random_state=0))
    assert np.all(np.isfinite(scores))


@pytest.mark.parametrize("head", AGE_HEADS)
def test_age_heads_learn_a_linear_signal(head):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 16))
    y = 50 + 8 * X[:, 0] - 5 * X[:, 3] + rng.normal(scale=1.0, size=80)
    est = make_feature_head("age", head, cv=3)
    est.fit(X[:60], y[:60])
    mae = np.mean(np.abs(predict_head(est, X[60:], "age") - y[60:]))
    assert mae < 0.5 * np.mean(np.abs(y[60:] - y[:60].mean())), (head, mae)


def test_sex_head_and_unknown_heads():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(90, 10))
    y = (X[:, 2] + 0.3 * rng.normal(size=90) > 0.4).astype(int)  # imbalanced classes
    est = make_feature_head("sex").fit(X[:60], y[:60])
    p = predict_head(est, X[60:], "sex")
    assert p.shape == (30,) and np.all((p >= 0) & (p <= 1))
    assert np.mean((p > 0.5) == y[60:]) > 0.8
    with pytest.raises(ValueError, match="not available for task 'sex'"):
        make_feature_head("sex", "ridge")
    with pytest.raises(ValueError, match="unknown task"):
        make_feature_head("handedness")


@pytest.mark.parametrize("head", [*AGE_HEADS, "logistic", "elastic"])
def test_grouped_inner_cv_keeps_each_participant_in_one_fold(head, monkeypatch):
    """With groups (participant ids), every inner CV of every head (the elastic baseline's nested ones too)
    splits by group: no participant's scans on both sides of a fold."""
    splits = []

    def recording(base):
        class Recording(base):
            def split(self, X, y=None, groups=None):
                assert groups is not None, "a grouped splitter was called without groups"
                for train, test in super().split(X, y, groups):
                    splits.append(set(np.asarray(groups)[train]) & set(np.asarray(groups)[test]))
                    yield train, test
        return Recording

    monkeypatch.setattr(heads, "GroupFolds", recording(heads.GroupFolds))
    monkeypatch.setattr(heads, "StratifiedGroupFolds", recording(heads.StratifiedGroupFolds))
    rng = np.random.default_rng(4)
    people = np.repeat(np.arange(24), 3)  # 3 sessions each
    task = "age" if head in AGE_HEADS else "sex"
    X = rng.normal(size=(24, 80))[people] + 0.01 * rng.normal(size=(72, 80))
    y = rng.uniform(40, 80, 24)[people] if task == "age" else (np.arange(24) % 2)[people]
    if head == "elastic":
        est = make_elastic(task, cv=3, n_features=(5, 10))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(X, y, groups=people)
    else:
        est = fit_grouped(make_feature_head(task, head, cv=3, grouped=True), X, y, people)
    assert splits and all(not shared for shared in splits), splits
    assert predict_head(est, X[:2], task).shape == (2,)


def test_grouped_cv_with_fewer_participants_than_folds():
    """4 participants x 3 sessions, 5 folds asked for: as many folds as participants (inner CVs of the bias
    correction's out-of-fold fits see 3), for the feature head and the elastic baseline."""
    rng = np.random.default_rng(6)
    people = np.repeat(np.arange(4), 3)
    X, y = rng.normal(size=(12, 60)), rng.uniform(40, 80, 4)[people]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (4, 3):
            est = fit_grouped(make_feature_head("age", cv=5, grouped=True), X[: 3 * n], y[: 3 * n], people[: 3 * n])
            assert est[-1].cv.get_n_splits(groups=people[: 3 * n]) == n
            make_elastic("age", cv=5, n_features=(5,)).fit(X[: 3 * n], y[: 3 * n], groups=people[: 3 * n])


def test_sex_heads_with_a_small_class_use_fewer_folds():
    """A training split with 4 scans of one sex: 5-fold stratified CVs cannot be built, fewer folds can (the
    elastic baseline's nested CV inside its outer folds too)."""
    rng = np.random.default_rng(5)
    y = np.array([0] * 4 + [1] * 20)
    X = rng.normal(size=(24, 6, 5, 4)) + 0.8 * (y[:, None, None, None] - 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = make_elastic("sex", cv=5, n_features=(5, 10)).fit(X, y)
    assert est.predict_proba(X).shape == (24, 2) and list(est.classes_) == [0, 1] and est.n_features_in_ == 120
    assert heads.fold_count(5, y) == 4 and heads.fold_count(3, y) == 3
    with pytest.raises(ValueError, match=r"2 scans of each class; class counts: \[0: 1, 1: 20\] \(sex: 0 = female"):
        heads.fold_count(5, y[3:])


def test_correlation_score_keeps_the_most_correlated_columns():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 6))
    y = -3 * X[:, 4] + X[:, 1] + 0.1 * rng.normal(size=50)  # negative correlation counts as strongly as positive
    sel = SelectKBest(heads.abs_correlation, k=2).fit(X, y)
    assert list(sel.get_support(indices=True)) == [1, 4]
    assert sel.transform(X).shape == (50, 2)


def _sklearn_checks(*estimators):
    """scikit-learn's estimator checks as pytest parameters, less the array-API ones (the baseline is NumPy only;
    scikit-learn skips them unless SCIPY_ARRAY_API is set)."""
    for est in estimators:
        for e, check in estimator_checks_generator(est, mark=None):
            name = getattr(check, "func", check).__name__
            if "array_api" not in name:
                yield pytest.param(e, check, id=f"{type(e).__name__}-{name}")


# scikit-learn's own estimator checks (input validation, cloning, pickling, fitted-state errors, invariances); small
# inner grids keep them quick. SFCNEmbedder takes volumes (N, D, H, W), which these 2-D checks cannot exercise.
@pytest.mark.parametrize("estimator, check", list(_sklearn_checks(ElasticRegressor(cv=2, l1_ratios=(0.5,)),
                                                                   ElasticClassifier(cv=3, l1_ratios=(0.5,)))))
def test_elastic_baseline_follows_scikit_learn_conventions(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


def test_elastic_baseline_with_fewer_voxels_than_scans():
    # PCA can keep at most as many axes as there are voxels (a region of interest, heavy downsampling)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 5))
    age = 50 + 10 * X[:, 2] + rng.normal(size=40)
    est = ElasticRegressor(cv=3).fit(X, age)
    assert est.pipeline_["pca"].n_components_ == 5 and est.best_params_["select__k"] <= 5
    assert np.mean(np.abs(est.predict(X) - age)) < 3
    labels = np.where(X[:, 1] + 0.3 * rng.normal(size=40) > 0, "M", "F")  # any two labels, not only 0/1
    clf = ElasticClassifier(cv=3).fit(X, labels)
    assert list(clf.classes_) == ["F", "M"] and set(clf.predict(X)) <= {"F", "M"}
    assert np.mean(clf.predict(X) == labels) > 0.75 and clf.predict_proba(X).shape == (40, 2)
    assert not hasattr(est, "predict_proba")
    with pytest.raises(ValueError, match="Only binary classification"):
        ElasticClassifier(cv=3).fit(X, np.arange(40) % 3)


def test_elastic_baseline_is_a_regressor_or_classifier_by_task_and_fits_small_cohorts():
    """ElasticBaseline (exported for either task) scores and cross-validates as scikit-learn's regressors /
    classifiers do; on a few scans the age baseline's inner folds fit the smallest outer training fold (they had
    all failed, and the search had picked its first candidate on NaN scores)."""
    from sklearn.base import is_classifier, is_regressor
    from sklearn.model_selection import cross_val_score

    from jaxtl import ElasticBaseline

    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 8))
    age = 50 + 10 * X[:, 0] + rng.normal(size=30)
    sex = (X[:, 1] > 0).astype(int)
    assert is_regressor(ElasticBaseline("age")) and is_classifier(ElasticBaseline("sex"))
    assert cross_val_score(ElasticBaseline("age", cv=3), X, age, cv=3).mean() > 0.5
    assert cross_val_score(ElasticBaseline("sex", cv=3), X, sex, cv=3).mean() > 0.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "test scores are non-finite"
        small = ElasticRegressor(n_features=(1, 2, 3)).fit(X[:6], age[:6])
        ElasticRegressor().fit(X[:5], age[:5])  # had failed: "All the 5 fits failed"
    assert small.best_params_["select__k"] in (1, 2, 3)


def test_elastic_baseline_on_voxels():
    rng = np.random.default_rng(3)
    n, shape = 60, (6, 7, 6)
    pattern = rng.normal(size=shape)
    age = rng.uniform(20, 80, n)
    X = rng.normal(size=(n, *shape)) + (age[:, None, None, None] - 50) / 15 * pattern
    est = make_elastic("age", cv=3).fit(X[:40], age[:40])
    mae = np.mean(np.abs(est.predict(X[40:]) - age[40:]))
    assert mae < 0.5 * np.mean(np.abs(age[40:] - age[:40].mean())), mae
    assert est.best_params_["select__k"] in (10, 30)
    sex = (rng.random(n) < 0.5).astype(int)
    Xs = rng.normal(size=(n, *shape)) + 0.8 * (sex[:, None, None, None] - 0.5) * pattern
    clf = make_elastic("sex", cv=3).fit(Xs[:40], sex[:40])
    assert np.mean((clf.predict_proba(Xs[40:])[:, 1] > 0.5) == sex[40:]) > 0.75
    assert clone(est).get_params()["n_features"] == (10, 30, 60, 150)
    from sklearn.base import is_classifier, is_regressor

    import jaxtl  # the scikit-learn-typed baselines at top level; each for its own task

    assert is_regressor(jaxtl.ElasticRegressor()) and is_classifier(jaxtl.ElasticClassifier())
    with pytest.raises(ValueError, match=r"ElasticRegressor\(task='sex'\): use ElasticRegressor for age and "
                                         r"ElasticClassifier for sex"):
        jaxtl.ElasticRegressor(task="sex").fit(Xs[:40], sex[:40])


def test_bias_correction():
    rng = np.random.default_rng(4)
    age = rng.uniform(20, 80, 200)
    pred = 0.6 * age + 20 + rng.normal(scale=2, size=200)  # regression to the mean
    bc = BiasCorrection.fit(pred, age, split="train")
    assert abs(bc.slope - 0.6) < 0.05 and abs(bc.intercept - 20) < 3 and bc.n == 200
    corrected = bc.apply(pred)
    gap, gap_c = pred - age, corrected - age
    assert abs(np.corrcoef(gap, age)[0, 1]) > 0.9 and abs(np.corrcoef(gap_c, age)[0, 1]) < 0.1
    assert BiasCorrection.from_dict(bc.to_dict()) == bc
    with pytest.warns(UserWarning, match="corrected ages are left empty"):
        flat = BiasCorrection.fit(50 + rng.normal(size=50), rng.uniform(20, 80, 50))
    assert np.all(np.isnan(flat.apply([40.0, 60.0])))
    # a small slope multiplies errors (1/0.15): refused even when it is clearly above 0
    with pytest.warns(UserWarning, match="slope 0.1"):
        small = BiasCorrection.fit(0.15 * age + 40 + rng.normal(scale=0.5, size=200), age)
    assert small.slope / small.slope_se > 10 and not small.usable
    # a slope of 0.5 from 8 very noisy scans: not distinguishable from 0 (the -143..446 years case)
    few = rng.uniform(20, 80, 8)
    with pytest.warns(UserWarning, match="not significantly above 0"):
        noisy = BiasCorrection.fit(0.5 * few + 25 + rng.normal(scale=30, size=8), few)
    assert noisy.slope > noisy.MIN_SLOPE and np.all(np.isnan(noisy.apply([40.0])))
    # 3 scans: t = 9 (2 standard errors would pass) is below the 5% critical value of t with 1 dof, 12.7
    three = BiasCorrection(slope=0.9, intercept=5.0, n=3, split="val", slope_se=0.1)
    assert not three.usable and dataclasses.replace(three, n=30).usable
    assert bc.usable and bc.slope / bc.slope_se > 20
    old = {k: v for k, v in bc.to_dict().items() if k != "slope_se"}  # a head saved before slope_se existed
    assert BiasCorrection.from_dict(old).usable and BiasCorrection.from_dict(old).slope_se is None
    with pytest.warns(UserWarning, match=r"the saved age-bias slope 0.150 is below 0.2.*refit the head"):
        assert not BiasCorrection.from_dict(old | {"slope": 0.15}).usable  # saved when 0.1 was the limit
    with warnings.catch_warnings():  # one fitted now warned when it was fitted, not again when loaded
        warnings.simplefilter("error")
        assert not BiasCorrection.from_dict(small.to_dict()).usable
    with pytest.raises(ValueError, match="at least 3"):
        BiasCorrection.fit([1.0, 2.0], [1.0, 2.0])
    # bc.fit(...) on an object would read as fitting it in place (scikit-learn style) but leave it as it was
    with pytest.raises(AttributeError, match=r"bc = BiasCorrection.fit\(predicted, age\)"):
        BiasCorrection().fit(pred, age)


def test_estimator_save_load(tmp_path):
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(30, 5)), rng.normal(size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = make_feature_head("age", "ridge").fit(X, y)
    path = save_estimator(est, tmp_path / "head.joblib")
    np.testing.assert_array_equal(load_estimator(path).predict(X), est.predict(X))


def test_every_public_name_is_in_the_readme():
    """`import jaxtl` gives what the README's table lists (a name added without docs fails here)."""
    from conftest import REPO

    import jaxtl

    readme = (REPO / "README.md").read_text()
    assert [n for n in jaxtl.__all__ if f"`{n}`" not in readme] == []


def test_import_jaxtl_is_light_and_every_public_name_resolves():
    """`import jaxtl` (and so the `jaxtl` command) loads neither scikit-learn nor grain; the other public names are
    imported when first used; `jaxtl.embed` and `jaxtl.simulate` are the functions."""
    from conftest import run_python

    code = """
import sys, jaxtl
assert not {"sklearn", "grain", "jaxtl.transfer", "jaxtl.cache"} & set(sys.modules), sorted(sys.modules)
assert callable(jaxtl.embed) and callable(jaxtl.simulate)
for name in jaxtl.__all__:
    assert getattr(jaxtl, name).__name__ == name, name
assert set(jaxtl.__all__) <= set(dir(jaxtl)) and "sklearn" in sys.modules
import jaxtl.cohort
assert callable(jaxtl.transfer.embed_cohort) and jaxtl.cache.Failure and jaxtl.cohort.read_cohort  # submodules too
try:
    jaxtl.not_a_name
except AttributeError as e:
    assert "not_a_name" in str(e)
else:
    raise AssertionError("no AttributeError")
print("OK")
"""
    assert "OK" in run_python(code).stdout
