"""The scikit-learn side of transfer: `SFCNEmbedder`, read-out heads on frozen features, the paper's
elastic-net baseline on voxels, and brain-age bias correction.

`make_pipeline(SFCNEmbedder(model), StandardScaler(), RidgeCV())` works like any scikit-learn pipeline
(`clone`, `get_params`, `cross_val_score`). Heads choose their hyper-parameters by inner cross-validation
on the data they are fitted on (the training split only); where a participant has several scans, the folds
keep each participant's scans together (`grouped=True` / `groups=`, `fit_grouped`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import scipy.sparse
import sklearn
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin
from sklearn.compose import TransformedTargetRegressor
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest, r_regression
from sklearn.kernel_ridge import KernelRidge
from sklearn.linear_model import ElasticNetCV, LogisticRegressionCV, RidgeCV
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import GridSearchCV, GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR
from sklearn.utils import ClassifierTags, RegressorTags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

AGE_HEADS = ("ridge", "elasticnet", "svr", "kernelridge")
SEX_HEADS = ("logistic",)


# ------------------------------------------------------------------------------------------------
# SFCN as a scikit-learn transformer


class SFCNEmbedder(TransformerMixin, BaseEstimator):
    """scikit-learn transformer: volumes -> SFCN features (`jaxtl.embed`); `fit` does nothing.

    `model` is a `JaxtlModel`, an `SFCN`, a model directory or a published name (loaded once, lazily).
    `X` is anything `jaxtl.embed` accepts that scikit-learn can index: an `(N, D, H, W)` array or a
    list/array of NIfTI paths. Like nilearn's maskers, `fit(X, y)` takes `y` only for compatibility.
    The other parameters are `jaxtl.embed`'s: with `on_error="skip"` a scan that fails to load gives a row of NaN
    (and one warning naming it), which scikit-learn's estimators refuse: drop those rows (`np.isnan(F).all(axis=1)`)
    before fitting, and mask their predictions (an imputer would predict them from mean features, silently).
    """

    def __init__(self, model=None, *, layer: str = "features", batch_size: int | None = None,
                 dtype: str | None = None, downsample: int | None = None, progress: bool = False,
                 check: bool = True, workers: int | None = None, on_error: str = "raise"):
        self.model = model
        self.layer = layer
        self.batch_size = batch_size
        self.dtype = dtype
        self.downsample = downsample
        self.progress = progress
        self.check = check
        self.workers = workers
        self.on_error = on_error

    def _loaded(self):
        from jaxtl.embed import resolve_model

        if self.model is None:
            raise ValueError("SFCNEmbedder needs a model: SFCNEmbedder(jaxtl.load_model(...)) or a model directory")
        cached = getattr(self, "_model_cache", None)
        if cached is None or cached[0] is not self.model:
            cached = (self.model, resolve_model(self.model))
            self._model_cache = cached
        return cached[1]

    def fit(self, X=None, y=None):
        from jaxtl.embed import check_batch_options, check_reader_options, layer_names

        check_reader_options(self.on_error, self.workers)
        check_batch_options(self.batch_size, self.dtype)
        if not isinstance(self.check, bool | np.bool_):
            raise ValueError(f"check must be True or False, got {self.check!r}")
        model = self._loaded()
        if self.layer not in layer_names(model):
            raise ValueError(f"unknown layer {self.layer!r}; use one of {', '.join(layer_names(model))}")
        return self

    def transform(self, X) -> np.ndarray:
        from jaxtl.embed import embed

        return embed(X, self._loaded(), layer=self.layer, batch_size=self.batch_size, dtype=self.dtype,
                     downsample=self.downsample, progress=self.progress, check=self.check, workers=self.workers,
                     on_error=self.on_error)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        from jaxtl.embed import _check_layer, _unwrap

        net = _unwrap(self._loaded())
        _check_layer(net, self.layer)
        if self.layer.startswith("block"):
            n = net.channels[int(self.layer[5:])]
        else:
            n = net.channels[-1] if self.layer == "features" else net.num_outputs
        return np.array([f"sfcn_{self.layer}{i}" for i in range(n)], dtype=object)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_model_cache"}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True  # volumes: (N, D, H, W)
        tags.non_deterministic = False
        return tags


# ------------------------------------------------------------------------------------------------
# Read-out heads on frozen features (the paper's ft_final idea with scikit-learn)


class _FewerFoldsForSmallData:
    """For K-fold splitters: as many folds as the data allow when it is smaller than the folds asked for (an inner
    CV inside a small training fold): at most one fold per group for group splitters, per member of the smallest
    class for stratified ones (`fold_count`)."""

    def get_n_splits(self, X=None, y=None, groups=None):
        n = self.n_splits
        if groups is not None and isinstance(self, GroupKFold | StratifiedGroupKFold):
            n = max(2, min(n, len(np.unique(groups))))
        if y is not None and isinstance(self, StratifiedKFold | StratifiedGroupKFold):
            n = fold_count(n, y)
        return n

    def split(self, X, y=None, groups=None):
        fewer = copy.copy(self)
        fewer.n_splits = self.get_n_splits(X, y, groups)
        return super(_FewerFoldsForSmallData, fewer).split(X, y, groups)


class GroupFolds(_FewerFoldsForSmallData, GroupKFold):
    """`GroupKFold`, at most one fold per group."""


class StratifiedFolds(_FewerFoldsForSmallData, StratifiedKFold):
    """`StratifiedKFold`, at most one fold per member of the smallest class."""


class StratifiedGroupFolds(_FewerFoldsForSmallData, StratifiedGroupKFold):
    """`StratifiedGroupKFold`, at most one fold per group and per member of the smallest class."""


def inner_cv(task: str, cv: int, seed: int, grouped: bool = False):
    """The shuffled K-fold splitter of an inner CV: stratified by class for sex; with `grouped`, each group
    (participant) wholly in one fold, so repeated sessions of a person cannot sit on both sides."""
    if grouped:
        return (StratifiedGroupFolds if task == "sex" else GroupFolds)(cv, shuffle=True, random_state=seed)
    return (StratifiedFolds if task == "sex" else KFold)(cv, shuffle=True, random_state=seed)


def fold_count(cv: int, y) -> int:
    """Folds for a stratified CV over class labels `y`: `cv`, or fewer when a class has fewer members (a
    stratified split needs one of each class per fold); at least 2."""
    classes, counts = np.unique(np.asarray(y), return_counts=True)
    if len(counts) < 2 or counts.min() < 2:
        named = ", ".join(f"{c}: {n}" for c, n in zip(classes.tolist(), counts.tolist(), strict=True))
        coding = " (sex: 0 = female, 1 = male)" if set(classes.tolist()) <= {0, 1} else ""
        raise ValueError(f"a stratified CV needs at least 2 scans of each class; class counts: [{named}]{coding}; "
                         "use more scans or a larger training split")
    return int(min(cv, counts.min()))


def balanced_accuracy(estimator, X, y) -> float:
    """Scorer with the value of scikit-learn's "balanced_accuracy" (the mean recall of the classes in `y`), without
    its input validation: LogisticRegressionCV scores each C (and l1_ratio) in each fold, and that validation had been
    most of a sex head's fit on a small cohort."""
    y, pred = np.asarray(y), np.asarray(estimator.predict(X))
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def fit_grouped(estimator: BaseEstimator, X, y, groups=None) -> BaseEstimator:
    """`estimator.fit(X, y)`, passing `groups` (e.g. participant ids) to every grouped inner CV splitter by
    scikit-learn's metadata routing (enabled for this call only)."""
    if groups is None:
        return estimator.fit(X, y)
    with sklearn.config_context(enable_metadata_routing=True):
        return estimator.fit(X, y, groups=np.asarray(groups))


def check_head(task: str, head: str | None) -> str:
    """The feature head's name (`head`, or the task's default); a ValueError for a task or head not offered."""
    head = head or ("ridge" if task == "age" else "logistic")
    valid = AGE_HEADS if task == "age" else SEX_HEADS if task == "sex" else None
    if valid is None:
        raise ValueError(f"unknown task {task!r}: use 'age' or 'sex'")
    if head not in valid:
        raise ValueError(f"head {head!r} is not available for task {task!r}; choose from {', '.join(valid)}")
    return head


def make_feature_head(task: str, head: str | None = None, *, cv: int = 5, seed: int = 0,
                      grouped: bool = False) -> BaseEstimator:
    """A standardise -> linear/kernel model pipeline whose hyper-parameters are set by inner CV.

    Age: "ridge" (default; RidgeCV, leave-one-out over alphas), "elasticnet" (ElasticNetCV over alpha
    and l1_ratio), "svr" and "kernelridge" (RBF kernels, GridSearchCV; targets centred and scaled).
    Sex: "logistic" (LogisticRegressionCV over C, L2, balanced class weights).
    `grouped=True`: every inner CV (ridge's too, instead of leave-one-out) keeps each group's rows in one
    fold; fit it with `fit_grouped(head, X, y, groups)`.
    """
    head = check_head(task, head)
    kfold = inner_cv(task, cv, seed, grouped)
    if head == "ridge":
        model = RidgeCV(alphas=np.logspace(-3, 5, 17), cv=kfold if grouped else None)
    elif head == "elasticnet":
        model = ElasticNetCV(l1_ratio=[0.1, 0.5, 0.7, 0.9, 0.95, 1.0], alphas=40, cv=kfold, max_iter=20000,
                             random_state=seed)
    elif head == "svr":
        model = _scaled_target(GridSearchCV(SVR(kernel="rbf", gamma="scale"),
                                            {"C": [0.3, 1.0, 3.0, 10.0, 30.0], "epsilon": [0.05, 0.2]}, cv=kfold))
    elif head == "kernelridge":
        model = _scaled_target(GridSearchCV(KernelRidge(kernel="rbf"),
                                            {"alpha": np.logspace(-3, 1, 5), "gamma": [1e-3, 3e-3, 1e-2, 3e-2]},
                                            cv=kfold))
    else:
        model = LogisticRegressionCV(Cs=np.logspace(-3, 3, 7), l1_ratios=(0.0,), cv=kfold,
                                     scoring=balanced_accuracy, class_weight="balanced", max_iter=5000,
                                     use_legacy_attributes=False)
    return make_pipeline(StandardScaler(), model)


def _scaled_target(model: BaseEstimator) -> TransformedTargetRegressor:
    # RBF models have no intercept and scale-dependent penalties: fit on standardised ages.
    return TransformedTargetRegressor(regressor=model, transformer=StandardScaler())


def predict_head(estimator: BaseEstimator, X: np.ndarray, task: str) -> np.ndarray:
    """Age in years, or P(male) for sex heads."""
    if task == "sex":
        return estimator.predict_proba(X)[:, list(estimator.classes_).index(1)]
    return estimator.predict(X)


# ------------------------------------------------------------------------------------------------
# The paper's classical baseline: PCA on voxels + elastic net


def abs_correlation(X, y) -> np.ndarray:
    """|Pearson r| of each column with the label (`SelectKBest`'s score: strong negative correlation counts too)."""
    return np.abs(r_regression(X, y))


class ElasticBaseline(BaseEstimator):
    """Holderrieth et al.'s baseline (TL `methods/elastic.py`): voxels -> PCA -> the components most
    correlated with the label -> ElasticNet (age) / elastic-net logistic regression (sex).

    Differences from TL, on purpose: components are ranked by |r| (TL ranked by signed r, which depends
    on the arbitrary sign of each PCA axis); kept scores are standardised; the number of components,
    alpha / C and l1_ratio are chosen by inner cross-validation on the training data (TL: grid search on
    the validation split); PCA keeps min(n - 1, n_components) axes, fitted on all training voxels at once
    (TL: IncrementalPCA over loader batches); the training volumes are used as they are (TL's loader shifted and
    mirrored them, its 'full' augmentation). Pass voxel arrays `(N, ...)`; they are flattened. `jaxtl transfer`
    passes 4mm volumes (`TransferConfig.elastic_mm`; TL used the 1mm crop).
    """

    def __init__(self, task: str = "age", *, n_components: int | None = None,
                 n_features: tuple[int, ...] = (10, 30, 60, 150), l1_ratios: tuple[float, ...] = (0.1, 0.5, 0.9, 1.0),
                 cv: int = 5, seed: int = 0, n_jobs: int | None = None):
        self.task = task
        self.n_jobs = n_jobs
        self.n_components = n_components
        self.n_features = n_features
        self.l1_ratios = l1_ratios
        self.cv = cv
        self.seed = seed

    def _pipeline(self, n: int, n_voxels: int, memory: str | None = None, grouped: bool = False,
                  folds: int | None = None) -> Pipeline:
        inner = inner_cv(self.task, folds or self.cv, self.seed, grouped)
        if self.task == "age":
            model = ElasticNetCV(l1_ratio=list(self.l1_ratios), alphas=30, cv=inner, max_iter=20000,
                                 random_state=self.seed)
        elif self.task == "sex":
            model = LogisticRegressionCV(
                Cs=np.logspace(-3, 3, 7), l1_ratios=tuple(self.l1_ratios), solver="saga", max_iter=5000,
                cv=inner, scoring=balanced_accuracy, class_weight="balanced", random_state=self.seed,
                use_legacy_attributes=False)
        else:
            raise ValueError(f"unknown task {self.task!r}: use 'age' or 'sex'")
        return Pipeline([("pca", PCA(self._components(n, n_voxels), random_state=self.seed)),
                         ("select", SelectKBest(abs_correlation)), ("scale", StandardScaler()), ("model", model)],
                        memory=memory)

    def _components(self, n: int, n_voxels: int) -> int:
        """PCA axes fitted on `n` scans of `n_voxels` voxels: at most n - 1 (centred data) and the voxel count."""
        return min(n - 1, n_voxels, self.n_components or n_voxels)

    def fit(self, X, y, groups=None):
        """`groups` (e.g. participant ids): every CV level keeps each group's scans in one fold."""
        fixed = {ElasticRegressor: "age", ElasticClassifier: "sex"}.get(type(self))
        if self.task not in ("age", "sex") or (fixed and self.task != fixed):
            raise ValueError(f"{type(self).__name__}(task={self.task!r}): use ElasticRegressor for age and "
                             "ElasticClassifier for sex (task 'age' / 'sex')")
        sex = self.task == "sex"
        X, y = validate_data(self, _flat(X), y, dtype=np.float32, ensure_min_samples=2, y_numeric=not sex)
        if sex:
            check_classification_targets(y)
            if type_of_target(y, input_name="y") != "binary":
                raise ValueError("Only binary classification is supported: the sex baseline needs 2 classes in y, "
                                 f"got {np.unique(y).tolist()[:10]}")
            self.classes_, y = np.unique(y, return_inverse=True)
            if len(self.classes_) != 2:
                raise ValueError(f"the sex baseline needs 2 classes in y, got 1 class: {self.classes_.tolist()}")
        else:
            y = y.astype(np.float64)
        grouped = groups is not None
        folds = list(inner_cv(self.task, self.cv, self.seed, grouped).split(X, y, groups))
        outer_train = min(len(train) for train, _ in folds)  # the smallest training size inside the folds
        # a small class: as many inner folds as the smallest training fold has members of it
        # age: no more inner folds than the smallest training fold has scans (groups); ElasticNetCV's had failed in
        # every fold of a small cohort, leaving the grid search to pick its first candidate on NaN scores
        inner = min(inner_cv(self.task, self.cv, self.seed).get_n_splits(y=y[train]) for train, _ in folds) \
            if sex else min(self.cv, *(len(np.unique(np.asarray(groups)[train])) if grouped else len(train)
                                       for train, _ in folds))
        most = self._components(outer_train, X.shape[1])  # components kept inside every fold
        grid = {"select__k": [k for k in self.n_features if k <= most] or [min(min(self.n_features), most)]}
        with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="jaxtl-pca-") as cache:
            warnings.filterwarnings("ignore", message=".*(converge|did not converge).*")
            # each fold's PCA is fitted once and reused for every k (the SVD is most of the search)
            pipeline = self._pipeline(outer_train, X.shape[1], memory=cache, grouped=grouped, folds=inner)
            search = GridSearchCV(pipeline, grid, cv=folds, refit=False, n_jobs=self.n_jobs,
                                  scoring=balanced_accuracy if sex else "neg_mean_absolute_error")
            fit_grouped(search, X, y, groups)
            self.best_params_ = search.best_params_
            final = self._pipeline(len(X), X.shape[1], grouped=grouped)
            final = final.set_params(**search.best_params_)
            self.pipeline_ = fit_grouped(final, X, y, groups)
        return self

    def _voxels(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, _flat(X), dtype=np.float32, reset=False)

    def predict(self, X) -> np.ndarray:
        X = self._voxels(X)
        pred = self.pipeline_.predict(X)
        return self.classes_[pred] if self.task == "sex" else pred

    @available_if(lambda self: self.task == "sex")
    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in the order of `classes_` (sex baseline only)."""
        X = self._voxels(X)
        return self.pipeline_.predict_proba(X)

    def score(self, X, y, sample_weight=None) -> float:
        """R^2 (age) or accuracy (sex), as scikit-learn's regressors and classifiers score."""
        metric = accuracy_score if self.task == "sex" else r2_score
        return float(metric(y, self.predict(X), sample_weight=sample_weight))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        if self.task == "sex":  # a classifier for scikit-learn (stratified folds in cross_val_score)
            tags.estimator_type, tags.classifier_tags = "classifier", ClassifierTags(multi_class=False)
        elif self.task == "age":
            tags.estimator_type, tags.regressor_tags = "regressor", RegressorTags()
        return tags


def _flat(X):
    """Voxel arrays (N, ...) as (N, voxels); 2-D, sparse and table inputs are left to `validate_data`."""
    if scipy.sparse.issparse(X) or hasattr(X, "columns"):
        return X
    X = np.asarray(X)
    return X.reshape(len(X), -1) if X.ndim > 2 else X


class ElasticRegressor(RegressorMixin, ElasticBaseline):
    """`ElasticBaseline(task="age")` as a scikit-learn regressor."""

    def __init__(self, task: str = "age", *, n_components: int | None = None,
                 n_features: tuple[int, ...] = (10, 30, 60, 150), l1_ratios: tuple[float, ...] = (0.1, 0.5, 0.9, 1.0),
                 cv: int = 5, seed: int = 0, n_jobs: int | None = None):
        super().__init__(task, n_components=n_components, n_features=n_features, l1_ratios=l1_ratios, cv=cv,
                         seed=seed, n_jobs=n_jobs)


class ElasticClassifier(ClassifierMixin, ElasticBaseline):
    """`ElasticBaseline(task="sex")` as a scikit-learn classifier."""

    def __init__(self, task: str = "sex", *, n_components: int | None = None,
                 n_features: tuple[int, ...] = (10, 30, 60, 150), l1_ratios: tuple[float, ...] = (0.1, 0.5, 0.9, 1.0),
                 cv: int = 5, seed: int = 0, n_jobs: int | None = None):
        super().__init__(task, n_components=n_components, n_features=n_features, l1_ratios=l1_ratios, cv=cv,
                         seed=seed, n_jobs=n_jobs)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # male / female: a binary baseline
        return tags


def make_elastic(task: str, **kwargs) -> ElasticBaseline:
    return (ElasticRegressor if task == "age" else ElasticClassifier)(task, **kwargs)


# ------------------------------------------------------------------------------------------------
# Brain-age bias correction


class _on_class_only(classmethod):  # noqa: N801 (used as a decorator, like classmethod)
    """A classmethod that refuses to be called on an instance, where `obj.fit(...)` would read as fitting `obj`
    in place (scikit-learn style) but would leave it unchanged."""

    def __get__(self, obj, cls=None):
        if obj is not None:
            name = type(obj).__name__
            raise AttributeError(f"{name}.{self.__func__.__name__} is called on the class and returns the fitted "
                                 f"object: bc = {name}.{self.__func__.__name__}(predicted, age); {name} objects "
                                 "are immutable")
        return super().__get__(obj, cls)


@dataclasses.dataclass(frozen=True)
class BiasCorrection:
    """Linear age-bias correction (Peng et al. 2021 [UNVERIFIED: recollection; no code in TL or UKB]).

    Fit `predicted = slope * age + intercept` on held-out predictions (`jaxtl.transfer`: the validation
    split for networks, out-of-fold training predictions for scikit-learn heads); correct any prediction,
    also of scans without a known age, as `(predicted - intercept) / slope`; the corrected brain-age gap is
    `corrected - age` (= the residual of the fit divided by the slope). `split` records which
    predictions the fit used. The correction divides every prediction error by the slope, so it is usable only
    where the predictions clearly follow age: a slope of at least `MIN_SLOPE` (errors at most 5x larger) that is
    significantly above 0 (two-sided 5% t-test on the fit's residuals, `slope_se`; a correction saved before
    `slope_se` was recorded is judged by its slope alone). Otherwise it gives NaN (with a warning) instead of
    inflated ages (a slope of 0.105 from a dozen scans had turned predictions into ages from -143 to 446).
    """

    slope: float = 1.0
    intercept: float = 0.0
    n: int = 0
    split: str = "none"
    slope_se: float | None = None  # None: not known (corrections saved before it was recorded)

    MIN_SLOPE = 0.2
    _MIN_SLOPE_BEFORE = 0.1  # the limit before slope_se was recorded

    @_on_class_only
    def fit(cls, predicted, age, split: str = "train") -> BiasCorrection:
        """`bc = BiasCorrection.fit(predicted, age)`: the fitted correction (a new, immutable object)."""
        predicted, age = np.asarray(predicted, np.float64), np.asarray(age, np.float64)
        ok = np.isfinite(predicted) & np.isfinite(age)
        if ok.sum() < 3 or np.ptp(age[ok]) == 0:
            raise ValueError(f"bias correction needs at least 3 scans with different ages, got {int(ok.sum())}")
        a, p = age[ok], predicted[ok]
        slope, intercept = np.polyfit(a, p, 1)
        n = len(a)  # >= 3
        resid = p - (slope * a + intercept)
        se = np.sqrt(resid @ resid / (n - 2) / np.sum((a - a.mean()) ** 2))
        bc = cls(float(slope), float(intercept), n, split, float(se))
        if not bc.usable:
            warnings.warn(f"{bc.why_unusable()}; corrected ages are left empty (NaN). Fit it on more scans, or on "
                          "scans covering a wider age range (jaxtl transfer --bias-split)", stacklevel=2)
        return bc

    @property
    def usable(self) -> bool:
        return self.why_unusable() is None

    def why_unusable(self) -> str | None:
        """Why the correction is refused (None: it is usable)."""
        said = f"age-bias slope {self.slope:.3f}" + (
            "" if self.slope_se is None else f" (standard error {self.slope_se:.3f}, {self.n} scans)")
        if not self.slope >= self.MIN_SLOPE:
            return (f"{said} is below {self.MIN_SLOPE}: (pred - intercept) / slope would multiply the prediction "
                    f"errors by more than {1 / self.MIN_SLOPE:g}")
        if self.slope_se is not None and not self.slope >= t_critical(self.n - 2) * self.slope_se:
            return f"{said} is not significantly above 0 (t-test, 5%): the predictions do not clearly follow age"
        return None

    def apply(self, predicted) -> np.ndarray:
        predicted = np.asarray(predicted, np.float64)
        if not self.usable:
            return np.full(predicted.shape, np.nan)
        return (predicted - self.intercept) / self.slope

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> BiasCorrection | None:
        """A saved correction; one saved by an earlier version (no `slope_se`) that was usable then but is refused
        now warns why."""
        if d is None:
            return None
        bc = cls(**d)
        if "slope_se" not in d and not bc.usable and bc.slope >= cls._MIN_SLOPE_BEFORE:
            warnings.warn(f"the saved {bc.why_unusable()}; its corrected ages, given by earlier jaxtl versions, are "
                          "now left empty (NaN) (refit the head with jaxtl transfer)", stacklevel=2)
        return bc


def t_critical(dof: int) -> float:
    """The two-sided 5% critical value of Student's t with `dof` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


# ------------------------------------------------------------------------------------------------
# Saving fitted estimators


def save_estimator(estimator: Any, path: str | os.PathLike) -> Path:
    """joblib (pickle). Load only files you trust: unpickling can run code."""
    path = Path(path)
    joblib.dump(estimator, path)
    return path


def load_estimator(path: str | os.PathLike) -> Any:
    return joblib.load(path)

