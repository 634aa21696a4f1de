"""Transfer to a target cohort: the paper's methods by name, splits, fine-tuning, brain-age outputs.

`run_transfer(model, cohort, out_dir, task="age", method="features")` splits the cohort (per site
40/20/40 by participant, as the paper's IXI and ABIDE splits; its OASIS-3 split was 32/9/59), fits the
method on the training split, predicts every scan and writes `predictions.csv`, `metrics.json`, plots and
`head/` (a fitted head `jaxtl predict` and `load_head` apply to new scans).

Methods (paper-spec section 6):
  direct    the pretrained network's own head, decoded (age: expected value over its bins).
  features  frozen 64-d features -> scikit-learn head (ridge / elasticnet / svr / kernelridge; sex:
            logistic), hyper-parameters by inner CV on the training split.
  ft_final  the paper's ft_final: only the network's head is trained (SGD); BatchNorm stays in train
            mode, so its running statistics adapt to the target data, as in TL's code.
  ft_step   head first (ft_final hyper-parameters), then all layers with a new SGD + StepLR.
  ft_full   all layers from the start (head kept when task and bins match, as TL).
  scratch   the same architecture from random (PyTorch-default) initialisation. TL's `give_fresh_sfcn`
            ignored the channel list and always built [32,64,128,256,256,64]; jaxtl uses the
            pretrained model's channels, so scratch and transfer compare the same network.
  reinit    TL's control `reinit_with_scaling`: every parameter tensor redrawn from N(mean, sd) of
            that tensor (BatchNorm running statistics untouched), then trained like ft_step (age) or
            ft_full (sex), as the paper's final runs.
  elastic   PCA on voxels -> components most correlated with the label -> elastic net (`heads.ElasticBaseline`).

Sex: 0 = female, 1 = male; training data are class-balanced (oversampling for networks, balanced class
weights for scikit-learn heads) and balanced accuracy is reported, which is what the paper's oversampled
("balanced") test sets measure.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score
from tqdm.auto import tqdm

from jaxtl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxtl.conv import default_devices
from jaxtl.embed import (
    SkippedScansWarning,
    VolumeReader,
    apply_batched,
    embed,
    model_downsample,
    resolve_model,
    warn_skipped,
)
from jaxtl.heads import (
    BiasCorrection,
    check_head,
    fit_grouped,
    inner_cv,
    load_estimator,
    make_elastic,
    make_feature_head,
    predict_head,
    save_estimator,
)
from jaxtl.labels import AgeTask, SexTask, check_in_range, make_task
from jaxtl.model import SFCN, WEIGHTS, check_train_batch
from jaxtl.weights import JaxtlModel, load_model, save_model

METHODS = ("direct", "features", "ft_final", "ft_step", "ft_full", "scratch", "reinit", "elastic")
NETWORK_METHODS = ("ft_final", "ft_step", "ft_full", "scratch", "reinit")
HEAD_FORMAT = "jaxtl-head"
HEAD_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Hyper-parameters (paper-spec section 6.1)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One SGD phase: PyTorch SGD(lr, momentum, weight_decay) + StepLR(step_epochs, gamma) per epoch."""

    epochs: int
    lr: float
    weight_decay: float
    momentum: float
    step_epochs: int
    gamma: float
    batch_size: int = 8

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                           step_epochs=self.step_epochs, gamma=self.gamma)

    def scaled(self, factor: float) -> Phase:
        """Fewer (or more) epochs with the learning-rate steps at the same relative positions."""
        if factor == 1:
            return self
        return dataclasses.replace(self, epochs=max(1, round(self.epochs * factor)),
                                   step_epochs=max(1, round(self.step_epochs * factor)))


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """SGD phases of the network methods.

    head: ft_final, and phase 1 of ft_step (only the head trains). full: ft_full, phase 2 of ft_step,
    reinit. scratch: scratch. Augmentation as TL: random integer shift per axis (circular when `wrap`)
    and left-right mirroring; `shift=None` means 2 voxels at 1mm and 1 voxel at 2 or 4mm.
    """

    head: Phase
    full: Phase
    scratch: Phase
    shift: int | None = None
    mirror: bool = True
    wrap: bool = True

    def scaled(self, factor: float) -> FinetuneConfig:
        return dataclasses.replace(self, head=self.head.scaled(factor), full=self.full.scaled(factor),
                                   scratch=self.scratch.scaled(factor))


# The paper's final-run hyper-parameters (TL experiments/*/final JSONs):
# Phase(epochs, lr, weight decay, momentum, StepLR step, gamma, batch).
# head = ft_final / ft_step "_ll" phase; full = ft_step phase 2 (age) or ft_full (sex); scratch = scratch.
PAPER_HPS: dict[tuple[str, str], FinetuneConfig] = {
    ("oasis", "age"): FinetuneConfig(Phase(50, 0.1, 1e-3, 0.9, 10, 0.1, 8), Phase(40, 1e-3, 1e-5, 0.8, 20, 0.2, 8),
                                     Phase(200, 0.01, 1e-3, 0.9, 30, 0.3, 8)),
    ("oasis", "sex"): FinetuneConfig(Phase(50, 0.1, 1e-3, 0.9, 10, 0.1, 8), Phase(60, 5e-3, 5e-3, 0.8, 10, 0.3, 8),
                                     Phase(300, 0.1, 1e-3, 0.9, 30, 0.5, 8)),
    ("ixi", "age"): FinetuneConfig(Phase(25, 0.1, 1e-3, 0.9, 8, 1.0, 4), Phase(250, 0.01, 5e-4, 0.8, 20, 0.8, 4),
                                   Phase(180, 0.01, 1e-3, 0.9, 30, 0.3, 8)),
    ("ixi", "sex"): FinetuneConfig(Phase(50, 0.1, 1e-3, 0.9, 10, 0.1, 8), Phase(80, 5e-3, 1e-2, 0.8, 10, 0.2, 8),
                                   Phase(250, 0.1, 1e-3, 0.9, 30, 0.5, 8)),
    ("abide", "age"): FinetuneConfig(Phase(25, 0.1, 1e-3, 0.9, 8, 0.5, 4), Phase(200, 0.01, 5e-4, 0.8, 60, 0.5, 4),
                                     Phase(300, 0.01, 1e-3, 0.9, 30, 0.3, 8)),
    ("abide", "sex"): FinetuneConfig(Phase(50, 0.1, 1e-3, 0.9, 10, 0.1, 8), Phase(60, 5e-3, 5e-3, 0.8, 20, 0.5, 8),
                                     Phase(150, 0.01, 1e-3, 0.9, 30, 0.3, 8)),
}
# Rows where the paper used other hyper-parameters when the source network was pretrained on the other task
# (paper-spec 6.1), keyed (dataset, task): only OASIS sex ft_final from the age-pretrained SFCN (weight decay
# 5e-3, momentum 0.8, StepLR 20 instead of 1e-3, 0.9, 10). The spec gives no other cross-task rows (OASIS age
# ft_final from the sex model: result only, no hyper-parameters), so those fall back to the same-task row.
PAPER_HPS_OTHER_SOURCE: dict[tuple[str, str], FinetuneConfig] = {
    ("oasis", "sex"): dataclasses.replace(PAPER_HPS[("oasis", "sex")], head=Phase(50, 0.1, 5e-3, 0.8, 20, 0.1, 8)),
}
# The paper's age bins [min, max) per target dataset (paper-spec section 3: TL hps/sota_hps.json and every
# final-run JSON; verified there, not recollection).
PAPER_BINS: dict[str, tuple[float, float]] = {"oasis": (37.0, 96.0), "ixi": (17.0, 89.0), "abide": (2.0, 59.0)}
# The paper's elastic-net settings (alpha or 1/C, l1_ratio, kept components), for reference; jaxtl chooses
# them by inner cross-validation instead.
PAPER_ELASTIC = {("oasis", "age"): (0.1, 0.7, 60), ("oasis", "sex"): (0.1, 0.5, 60), ("ixi", "age"): (20, 0.9, 140),
                 ("ixi", "sex"): (1.0, 1.0, 160), ("abide", "age"): (10, 0.8, 120), ("abide", "sex"): (0.5, 0.55, 150)}


def paper_finetune(dataset: str = "oasis", task: str = "age", source_task: str | None = None) -> FinetuneConfig:
    """The paper's fine-tuning hyper-parameters for a target dataset ("oasis", "ixi", "abide") and task;
    `source_task`: the task the source network was pretrained on (None = the same task)."""
    try:
        cfg = PAPER_HPS[(dataset, task)]
    except KeyError:
        raise ValueError(f"no paper hyper-parameters for {dataset!r}/{task!r}; datasets: oasis, ixi, abide") from None
    if source_task is not None and source_task != task:
        cfg = PAPER_HPS_OTHER_SOURCE.get((dataset, task), cfg)
    return cfg


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Everything `run_transfer` needs besides the model and the cohort."""

    task: str = "age"
    method: str = "features"
    head: str | None = None  # features: ridge (default), elasticnet, svr, kernelridge; sex: logistic
    layer: str = "features"  # features: which embedding the head reads (see jaxtl.embed)
    bin_range: tuple[float, float] | None = None  # age networks: None = paper bins (paper_hps) or train ages -3/+3
    split: tuple[float, float, float] = (0.4, 0.2, 0.4)  # train/val/test per site, by participant
    seed: int = 0
    share: float = 1.0  # use this share of the training split (data-scarcity curves)
    paper_hps: str | None = None  # whose section 6.1 hyper-parameters (and age bins) the networks use; None:
    # OASIS hyper-parameters with bins from the training ages
    finetune: FinetuneConfig | None = None  # overrides paper_hps
    epoch_scale: float = 1.0  # multiply all epochs (and lr-step lengths), e.g. 0.1 for CPU demos
    cv: int = 5  # inner cross-validation folds of the scikit-learn heads
    bias_split: str = "auto"  # age-bias fit: "train" (out-of-fold for scikit-learn heads), "val", or "auto":
    # val for trained networks (they fit their training scans closely), out-of-fold train for scikit-learn heads,
    # train + val for direct (nothing is trained on the cohort: every labelled scan but the test split's)
    reinit_as: str | None = None  # reinit trains like: None = ft_step for age, ft_full for sex (paper)
    elastic_mm: int = 4  # elastic baseline on voxels block-averaged to this size (TL: 1mm + IncrementalPCA)
    elastic_features: tuple[int, ...] = (10, 30, 60, 150)
    batch_size: int | None = None  # inference batch

    def finetune_config(self, source_task: str | None = None) -> FinetuneConfig:
        """SGD phases; `source_task`: what the source network was pretrained on (the paper's rows differ)."""
        cfg = self.finetune or paper_finetune(self.paper_hps or "oasis", self.task, source_task)
        return cfg.scaled(self.epoch_scale)

    def bias_fit_split(self) -> str:
        """The split the age-bias correction is fitted on ("auto" resolved by method)."""
        if self.bias_split != "auto":
            return self.bias_split
        return {"features": "train", "elastic": "train", "direct": "train+val"}.get(self.method, "val")

    def check(self) -> None:
        if self.task not in ("age", "sex"):
            raise ValueError(f"unknown task {self.task!r}: use 'age' or 'sex'")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if len(self.split) != 3 or min(self.split) < 0 or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6):
            raise ValueError(f"split {self.split} must be three non-negative fractions summing to 1")
        if not 0 < self.share <= 1:
            raise ValueError(f"share must be in (0, 1], got {self.share}")
        if self.bias_split not in ("auto", "train", "val"):
            raise ValueError(f"bias_split must be 'auto', 'train' or 'val', got {self.bias_split!r}")
        if self.paper_hps is not None and self.paper_hps not in PAPER_BINS:
            raise ValueError(f"no paper hyper-parameters for {self.paper_hps!r}; datasets: oasis, ixi, abide")
        if self.head is not None:
            if self.method != "features":
                raise ValueError(f"head {self.head!r} applies to method 'features' (scikit-learn heads), not "
                                 f"{self.method!r}")
            check_head(self.task, self.head)
        if not self.epoch_scale > 0:
            raise ValueError(f"epoch_scale must be above 0, got {self.epoch_scale}")


# ------------------------------------------------------------------------------------------------
# The target cohort


class ArraySource:
    """In-memory random-access source with the items of `CacheSource`."""

    def __init__(self, images: np.ndarray, ages: np.ndarray, sexes: np.ndarray, ids: np.ndarray,
                 qc: np.ndarray | None = None):
        self.images, self.ages, self.sexes, self.ids = images, ages, sexes, ids
        self.qc = np.full(len(images), "", object) if qc is None else qc  # the input warnings of loading each
        self.shape = tuple(images.shape[1:])

    def qc_warnings(self) -> np.ndarray:
        return self.qc

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {"image": self.images[i], "age": self.ages[i], "sex": self.sexes[i], "id": self.ids[i]}


@dataclasses.dataclass
class Target:
    """A labelled target cohort: a random-access image source plus per-scan metadata.

    Features and voxel matrices are computed once and kept (`features`, `voxels`).
    """

    source: Any
    ids: np.ndarray
    participant_ids: np.ndarray
    sessions: np.ndarray
    sites: np.ndarray
    ages: np.ndarray
    sexes: np.ndarray
    downsample: int
    name: str = ""
    _memo: dict = dataclasses.field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    def labels(self, task: str) -> np.ndarray:
        return (self.ages if task == "age" else self.sexes).astype(np.float64)

    def features(self, model: JaxtlModel, layer: str = "features", batch_size: int | None = None,
                 progress: bool = True) -> np.ndarray:
        key = ("features", id(model), layer)
        if key not in self._memo:
            self._memo[key] = (model, embed(self.source, model, layer=layer, batch_size=batch_size, progress=progress))
        return self._memo[key][1]

    def voxels(self, factor: int, progress: bool = True) -> np.ndarray:
        key = ("voxels", factor)
        if key not in self._memo:
            self._memo[key] = _voxels(self.source, factor, progress)
        return self._memo[key]

    def in_memory(self, limit_gb: float = 4.0) -> Target:
        """Load a NIfTI-backed cohort into memory once (network training reads every scan each epoch)."""
        from jaxtl.cache import CacheSource

        if isinstance(self.source, CacheSource | ArraySource):
            return self
        reader = VolumeReader(self.source, downsample=self.downsample)
        first = reader.read(0, 1)
        gb = first.nbytes * len(reader) / 1e9
        if gb > limit_gb:
            raise ValueError(f"{self.name}: {gb:.1f} GB of volumes; prepare a cache first "
                             f"(`jaxtl prepare {self.name} CACHE_DIR --downsample {self.downsample}`) and pass it")
        images = np.concatenate([first, reader.read(1, len(reader))]) if len(reader) > 1 else first
        return self._with_images(images, reader.qc_warnings())

    def _with_images(self, images: np.ndarray, qc: np.ndarray) -> Target:
        src = ArraySource(images, self.ages.astype(np.float32), self.sexes.astype(np.float32), self.ids, qc)
        return dataclasses.replace(self, source=src, _memo=self._memo)

    def select(self, indices: np.ndarray) -> Target:
        """The scans at `indices` (integers or a boolean mask) of a NIfTI or in-memory target; features and voxels
        are recomputed."""
        from jaxtl.cache import NiftiSource

        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(int)
        if isinstance(self.source, NiftiSource):
            source = NiftiSource(self.source.cohort.select(idx), downsample=self.source.downsample,
                                 check=self.source.check)
        elif isinstance(self.source, ArraySource):
            s = self.source
            source = ArraySource(s.images[idx], s.ages[idx], s.sexes[idx], s.ids[idx], s.qc[idx])
        else:
            raise ValueError(f"cannot select scans of a {type(self.source).__name__} target")
        return dataclasses.replace(self, source=source, ids=self.ids[idx], participant_ids=self.participant_ids[idx],
                                   sessions=self.sessions[idx], sites=self.sites[idx], ages=self.ages[idx],
                                   sexes=self.sexes[idx], _memo={})


def drop_unloadable(target: Target, *, progress: bool = True, keep_gb: float = 4.0) -> tuple[Target, tuple]:
    """Read every scan of a NIfTI-backed target once; return the target without the scans that failed to load
    and their `jaxtl.cache.Failure`s (id, path, reason). Caches and in-memory targets are returned as they are.

    When the cohort's volumes take at most `keep_gb` GB (float32), the returned target holds them in memory,
    so the transfer method does not read the files again."""
    from jaxtl.cache import Failure, NiftiSource

    if not isinstance(target.source, NiftiSource):
        return target, ()
    reader = VolumeReader(target.source, downsample=target.downsample, on_error="skip")
    step, chunks = 2 * reader.workers, []
    with concurrent.futures.ThreadPoolExecutor(reader.workers) as pool, \
            tqdm(total=len(reader), desc="reading scans", unit="scan", disable=not progress) as bar:
        for start in range(0, len(reader), step):
            stop = min(start + step, len(reader))
            batch = reader.read(start, stop, pool)
            if start == 0 and batch.nbytes / len(batch) * len(reader) <= keep_gb * 1e9:
                chunks = [batch]
            elif chunks:
                chunks.append(batch)
            bar.update(stop - start)
    failures = tuple(Failure(str(target.ids[f.index]), f.path, f.reason) for f in reader.failures)
    if len(failures) == len(target):
        raise ValueError(f"{target.name}: none of its {len(target)} scans could be loaded, e.g. {failures[0].reason}")
    if chunks:
        target = target._with_images(np.concatenate(chunks).astype(np.float32, copy=False), reader.qc_warnings())
    if not failures:
        return target, ()
    keep = np.setdiff1d(np.arange(len(target)), [f.index for f in reader.failures])
    warnings.warn(SkippedScansWarning(f"{target.name}: {len(failures)} of {len(target)} scans could not be loaded "
                                      f"and are left out, e.g. {failures[0].reason}", reader.failures), stacklevel=2)
    return target.select(keep), failures


def _write_failures(path: Path, failures: Sequence) -> None:
    """`failures.tsv` (id, path, reason, as `jaxtl prepare`'s) when scans failed; a stale one is removed."""
    from jaxtl.cache import _tsv

    if failures:
        path.write_text(_tsv(failures))
    else:
        path.unlink(missing_ok=True)


def _voxels(source, factor: int, progress: bool) -> np.ndarray:
    from jaxtl.data import block_average

    reader = source if isinstance(source, VolumeReader) else VolumeReader(source)
    rows = []
    for start in tqdm(range(0, len(reader), 16), desc="voxels", disable=not progress, unit="batch"):
        batch = reader.read(start, min(start + 16, len(reader)))
        rows += [block_average(v, factor).reshape(-1) for v in batch]
    return np.stack(rows).astype(np.float32)


def open_target(cohort: Any, downsample: int = 1, *, sex_required: bool = False, check_files: bool = True,
                on_error: str = "raise", labels_required: bool = True) -> Target:
    """A prepared cache directory, a cohort (BIDS directory / CSV / TSV / `Cohort`) or a `Target`;
    `check_files`, `on_error` (rows with problems, e.g. an unparseable age) and `labels_required` as in
    `read_cohort`."""
    from jaxtl.cache import CacheSource, NiftiSource, read_index
    from jaxtl.cohort import Cohort, read_cohort

    if isinstance(cohort, Target):
        return cohort
    name = cohort.source if isinstance(cohort, Cohort) else str(cohort)
    if isinstance(cohort, str | os.PathLike) and (Path(cohort) / "index.json").exists():
        index = read_index(cohort)
        if int(index.get("downsample", 1)) != downsample:
            raise ValueError(f"{cohort}: cache prepared with downsample {index.get('downsample', 1)}, the model "
                             f"expects {downsample}; prepare it with --downsample {downsample}")
        src = CacheSource(cohort)
        scans = index["scans"]
        col = lambda k: np.array([s.get(k) or "" for s in scans], dtype=str)
        return Target(src, src.ids, src.participant_ids, col("session"), col("site"),
                      src.ages.astype(np.float64), src.sexes.astype(np.float64), downsample, name)
    if isinstance(cohort, str | os.PathLike):
        if not Path(cohort).exists():
            raise FileNotFoundError(f"{cohort}: no such cohort (BIDS directory, CSV/TSV table or cache directory)")
        cohort = read_cohort(cohort, sex_required=sex_required, check_files=check_files, on_error=on_error,
                             labels_required=labels_required)
    if not isinstance(cohort, Cohort):
        raise ValueError(f"expected a cohort path, a cache directory or a Cohort, got {type(cohort).__name__}")
    src = NiftiSource(cohort, downsample=downsample)
    return Target(src, cohort.ids, cohort.participant_ids, cohort.sessions, cohort.sites, cohort.ages,
                  cohort.sexes, downsample, name)


# ------------------------------------------------------------------------------------------------
# Splits


def split_cohort(participant_ids: np.ndarray, sites: np.ndarray, labels: np.ndarray, task: str,
                 fractions: Sequence[float] = (0.4, 0.2, 0.4), seed: int = 0) -> np.ndarray:
    """Assign every scan to "train", "val", "test" or "unlabelled".

    Participants (all their sessions together) are shuffled within strata and cut by `fractions`;
    strata are sites (the paper's per-site 40/20/40), and sites x sex for the sex task. Scans without
    a label are "unlabelled" (still predicted).
    """
    participant_ids = np.asarray(participant_ids, dtype=str)
    labelled = np.isfinite(np.asarray(labels, np.float64))
    out = np.full(len(participant_ids), "unlabelled", dtype=object)
    people = sorted(set(participant_ids[labelled]))
    first = {p: i for i, p in reversed(list(enumerate(participant_ids))) if labelled[i]}
    strata: dict[tuple, list[str]] = {}
    for p in people:
        i = first[p]
        key = (str(sites[i]), int(labels[i])) if task == "sex" else (str(sites[i]),)
        strata.setdefault(key, []).append(p)
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(fractions)[:2]
    assignment = {}
    for key in sorted(strata):
        members = strata[key]
        order = rng.permutation(len(members))
        n = len(members)
        a, b = (int(round(c * n)) for c in cuts)
        for rank, j in enumerate(order):
            assignment[members[j]] = "train" if rank < a else "val" if rank < b else "test"
    for i, p in enumerate(participant_ids):
        if labelled[i]:
            out[i] = assignment[p]
    return out.astype(str)


def subsample_share(split: np.ndarray, participant_ids: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Keep a random `share` of the training participants; the rest become "unused"."""
    if share >= 1:
        return split
    split = split.copy()
    people = np.array(sorted(set(np.asarray(participant_ids)[split == "train"])))
    keep = set(np.random.default_rng(seed + 7919).permutation(people)[: max(2, round(share * len(people)))])
    drop = (split == "train") & ~np.isin(participant_ids, list(keep))
    split[drop] = "unused"
    return split


def balanced_indices(idx: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """TL's `oversample`: repeat the minority class floor(ratio) times plus a random remainder."""
    y = np.asarray(y)[idx]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return idx
    rng = np.random.default_rng(seed + 104729)
    big = counts.max()
    parts = []
    for c, n in zip(classes, counts, strict=True):
        members = idx[y == c]
        reps, rest = divmod(big, n)
        parts += [np.tile(members, reps), rng.choice(members, rest, replace=False)]
    return np.sort(np.concatenate(parts))


# ------------------------------------------------------------------------------------------------
# Networks: heads, re-initialisation, fine-tuning


def _copy(model: SFCN) -> SFCN:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def with_new_head(model: SFCN, num_outputs: int, seed: int) -> SFCN:
    """The same feature extractor (copied) with a fresh head of `num_outputs` (PyTorch-default init)."""
    new = SFCN(model.channels, num_outputs, model.dropout.rate, dtype=model.dtype, rngs=nnx.Rngs(seed),
               conv_impl=model.conv_impl)
    nnx.update(new.blocks, jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(model.blocks, WEIGHTS)))
    return new


def reinit_with_scaling(model: SFCN, seed: int) -> SFCN:
    """TL `reinit_final_layers_pres_scale` over the whole network: each parameter tensor (conv kernels and
    biases, BatchNorm scale and shift, head) redrawn elementwise from N(mean, sd) of that tensor (sd with
    ddof=1 as torch.std); BatchNorm running statistics are left as they are, as in TL."""
    model = _copy(model)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)  # numpy: one-off, and compiling a jax.random draw per shape is slow

    def redraw(x):
        x = np.asarray(x, np.float64)
        sd = x.std(ddof=1) if x.size > 1 else 0.0
        return jnp.asarray(x.mean() + sd * rng.standard_normal(x.shape), jnp.float32)

    nnx.update(model, jax.tree.unflatten(treedef, [redraw(x) for x in leaves]))
    return model


HEAD_ONLY = nnx.All(nnx.Param, nnx.PathContains("head"))


class NonFiniteError(ValueError):
    pass


_BATCH_WARNED: set[tuple[int, int, int]] = set()


def device_batch(batch_size: int, n_scans: int, n_devices: int) -> int:
    """The global batch `train_phase` uses: TL's min(len(dataset), batch), rounded down to a multiple of
    the device count (each device gets an equal share). Warns once per (batch, scans, devices) when the
    rounding changes it; raises when it would leave no batch."""
    wanted = min(batch_size, n_scans)  # TL: batch = min(len(dataset), batch)
    batch = wanted // n_devices * n_devices
    if batch < 1:
        raise ValueError(f"fine-tuning batch size {wanted} (requested {batch_size}, {n_scans} training scans) is "
                         f"smaller than the {n_devices} devices: each device needs at least one scan; use a batch "
                         f"of at least {n_devices} or fewer devices (e.g. CUDA_VISIBLE_DEVICES)")
    if batch != wanted and (batch_size, n_scans, n_devices) not in _BATCH_WARNED:
        _BATCH_WARNED.add((batch_size, n_scans, n_devices))
        warnings.warn(f"fine-tuning batch size {wanted} is not a multiple of the {n_devices} devices: using "
                      f"{batch} instead (requested {batch_size}, {n_scans} training scans)", stacklevel=3)
    return batch


def train_phase(model: SFCN, source: Any, indices: np.ndarray, task: AgeTask | SexTask, phase: Phase, *,
                trainable: Any = nnx.Param, seed: int = 0, shift: int = 1, mirror: bool = True, wrap: bool = True,
                progress: bool = True, desc: str = "train") -> SFCN:
    """SGD over `indices` of `source` for `phase.epochs` epochs (drop_last batches, augmented, shuffled,
    BatchNorm in train mode); returns the trained network in eval mode (`model` is left as it was)."""
    from jaxtl.train import Trainer, train_dataset

    batch = device_batch(phase.batch_size, len(indices), len(default_devices()))
    check_train_batch(batch, len(model.channels), tuple(source.shape))
    steps_per_epoch = len(indices) // batch
    config = TrainConfig(
        task=task.name, bin_range=task.bin_range if isinstance(task, AgeTask) else (42.0, 82.0),
        sigma=task.sigma if isinstance(task, AgeTask) else 1.0, batch_size=batch, epochs=phase.epochs, seed=seed,
        model=ModelConfig(channels=model.channels, dropout=float(model.dropout.rate)), optim=phase.optim(),
        data=DataConfig(shift=shift, mirror=mirror, wrap=wrap, val_fraction=0.0, test_fraction=0.0, workers=0))
    trainer = Trainer.create(config, steps_per_epoch, model=model, trainable=trainable)
    it = iter(train_dataset(source, np.asarray(indices), config))
    total = phase.epochs * steps_per_epoch
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    pending = []
    for step in range(total):
        b = next(it)
        labels = np.asarray(b[task.name], np.float32)
        pending.append(trainer.step(trainer.global_batch(b["image"]), trainer.global_batch(labels), step))
        bar.update()
        if (step + 1) % steps_per_epoch == 0:
            losses = [float(loss) for loss, _ in pending]
            if not all(bool(f) for _, f in pending) or not np.all(np.isfinite(losses)):
                bar.close()
                raise NonFiniteError(f"{desc}: loss became non-finite in epoch {(step + 1) // steps_per_epoch}; "
                                     f"lower the learning rate (now {phase.lr})")
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", epoch=(step + 1) // steps_per_epoch)
            pending = []
    bar.close()
    return trainer.model()


# ------------------------------------------------------------------------------------------------
# Fitted heads


@dataclasses.dataclass
class TransferHead:
    """A fitted transfer method: predicts age (years) or P(male) for new scans; applies the bias correction.

    kind "network": `model` is the network used end to end (direct / fine-tuned / scratch);
    "features": `model` is the frozen backbone and `estimator` the scikit-learn head on its `layer`;
    "elastic": `estimator` is an `ElasticBaseline` on voxels block-averaged by `voxel_factor`.
    """

    method: str
    task: str
    kind: str
    model: JaxtlModel | None = None
    estimator: Any = None
    layer: str = "features"
    voxel_factor: int = 1
    downsample: int = 1
    input_shape: tuple[int, ...] = ()
    bias: BiasCorrection | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    def predict(self, volumes: Any, *, progress: bool = True, batch_size: int | None = None,
                on_error: Literal["raise", "skip"] = "raise", check: bool = True) -> np.ndarray:
        """Raw predictions (age in years, or P(male)), float64, for anything `jaxtl.embed` accepts.

        `on_error="skip"`: NaN for scans that cannot be loaded, with a warning (see `jaxtl.embed`); `check=False`
        silences the intensity-normalisation warning for arrays, as `jaxtl.embed`'s.
        """
        if self.kind in ("network", "features"):
            reader = _reader_for(volumes, model_downsample(self.model), on_error, check)
            out = embed(reader, self.model, layer="logits" if self.kind == "network" else self.layer,
                        progress=progress, batch_size=batch_size)
            if self.kind == "network":
                return np.asarray(self.model.task.decode(jnp.asarray(out)), np.float64)
            return _predict_loaded(out, reader, self.predict_features)
        reader = _reader_for(volumes, self.downsample, on_error, check)
        voxels = _voxels(reader, self.voxel_factor, progress)
        warn_skipped(reader)
        return _predict_loaded(voxels, reader, self.predict_voxels)

    def predict_features(self, feats: np.ndarray) -> np.ndarray:
        return np.asarray(predict_head(self.estimator, feats, self.task), np.float64)

    def predict_voxels(self, voxels: np.ndarray) -> np.ndarray:
        return np.asarray(predict_head(self.estimator, voxels, self.task), np.float64)

    def corrected(self, predicted: np.ndarray) -> np.ndarray:
        """Bias-corrected ages (age heads); NaN when the head has no correction (a plain model: `jaxtl transfer
        --method direct` fits one), so uncorrected ages are never reported as corrected."""
        predicted = np.asarray(predicted, np.float64)
        return self.bias.apply(predicted) if self.bias is not None else np.full(predicted.shape, np.nan)

    def save(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.model is not None:
            save_model(self.model.model, out / "model", self.model.task, input_shape=self.model.input_shape,
                       preprocessing=self.model.preprocessing, meta=self.model.meta, overwrite=True)
        if self.estimator is not None:
            save_estimator(self.estimator, out / "estimator.joblib")
        info = {
            "format": HEAD_FORMAT, "version": HEAD_VERSION, "method": self.method, "task": self.task,
            "kind": self.kind, "layer": self.layer, "voxel_factor": self.voxel_factor,
            "downsample": self.downsample, "input_shape": list(self.input_shape),
            "bias_correction": self.bias.to_dict() if self.bias is not None else None, "meta": self.meta,
        }
        (out / "head.json").write_text(json.dumps(_jsonable(info), indent=2) + "\n")
        self.path = out
        return out


def _reader_for(volumes: Any, downsample: int, on_error: str = "raise", check: bool = True) -> VolumeReader:
    return volumes if isinstance(volumes, VolumeReader) else VolumeReader(volumes, downsample=downsample,
                                                                          on_error=on_error, check=check)


def _predict_loaded(x: np.ndarray, reader: VolumeReader, predict) -> np.ndarray:
    """`predict(x)` on the rows of scans `reader` loaded; NaN for the scans it skipped."""
    skipped = [f.index for f in reader.failures]
    if not skipped:
        return predict(x)
    loaded = np.ones(len(x), bool)
    loaded[skipped] = False
    out = np.full(len(x), np.nan)
    if loaded.any():
        out[loaded] = predict(x[loaded])
    return out


def load_head(path: str | os.PathLike) -> TransferHead:
    """Load a head written by `run_transfer` (`OUT/head`); a plain jaxtl model directory or published
    name gives a "direct" head (the network's own predictions, no bias correction).

    The scikit-learn estimator is a joblib pickle: load only heads you trust.
    """
    path = Path(path)
    if not (path / "head.json").exists():
        model = load_model(path)
        return TransferHead("direct", model.task.name, "network", model, downsample=model_downsample(model),
                            input_shape=model.input_shape, path=model.path)
    info = json.loads((path / "head.json").read_text())
    if info.get("format") != HEAD_FORMAT or info.get("version", 0) > HEAD_VERSION:
        raise ValueError(f"{path}: not a jaxtl head of version <= {HEAD_VERSION}")
    model = load_model(path / "model") if (path / "model" / "model.json").exists() else None
    estimator = load_estimator(path / "estimator.joblib") if (path / "estimator.joblib").exists() else None
    return TransferHead(info["method"], info["task"], info["kind"], model, estimator, info["layer"],
                        int(info["voxel_factor"]), int(info["downsample"]), tuple(info["input_shape"]),
                        BiasCorrection.from_dict(info["bias_correction"]), info.get("meta", {}), path)


# ------------------------------------------------------------------------------------------------
# Fitting a method


def default_bin_range(ages: np.ndarray, margin: float = 3.0) -> tuple[float, float]:
    """1-year bins covering the cohort with a margin (the paper: IXI 17-89 for ages 20-86)."""
    a = np.asarray(ages, np.float64)
    a = a[np.isfinite(a)]
    if not len(a):
        raise ValueError("no ages to choose bins from")
    return float(max(0.0, math.floor(a.min() - margin))), float(math.ceil(a.max() + margin))


def _network(jm: JaxtlModel, net: SFCN, task: AgeTask | SexTask, meta: dict) -> JaxtlModel:
    return JaxtlModel(net, task, tuple(jm.input_shape), dict(jm.preprocessing), {**jm.meta, **meta})


def _same_head(backbone: JaxtlModel, task: AgeTask | SexTask) -> bool:
    return backbone.task == task and backbone.model.num_outputs == task.num_outputs


# The elastic baseline's grid search runs its folds in worker processes from this many training voxel values (scans x
# voxels) on. The workers take ~5 s to start (scikit-learn's imports), then each search is 1.5-2x faster on 2 cores.
# ElasticRegressor(cv=5).fit on 4mm volumes (76800 voxels), 2-core AMD EPYC VM, first / second fit in a process:
# 24 scans 2.1 / 2.3 s in one process, 7.0 / 1.3 s with 2 workers; 80 scans 9.6 / 11.2 s vs 13.2 / 6.9 s.
# A transfer run fits it once (sex) or cv + 1 times (age: the head, then out-of-fold training predictions).
ELASTIC_PARALLEL_VALUES = 2_500_000


def fit_method(backbone: JaxtlModel, target: Target, split: np.ndarray, config: TransferConfig, *,
               progress: bool = True) -> tuple[TransferHead, np.ndarray]:
    """Fit `config.method` on the "train" scans of `target`; returns the head and its raw predictions
    for every scan (for the training split, honest ones where cheap: out-of-fold for scikit-learn heads)."""
    config.check()
    method, task_name, seed = config.method, config.task, config.seed
    y = target.labels(task_name)
    train = np.flatnonzero(split == "train")
    if not np.isfinite(y).any():
        from jaxtl.cohort import label_columns_hint

        raise ValueError(f"no scan of {target.name or 'the cohort'} has a label for {task_name} (all missing); "
                         f"{label_columns_hint(target.name, task_name)}")
    if method != "direct":  # direct transfer trains on nothing: any split will do
        if len(train) < 2:
            raise ValueError(f"only {len(train)} labelled training scans; need more data or a larger split[0]")
        if task_name == "sex" and len(np.unique(y[train])) < 2:
            raise ValueError(f"{target.name or 'the cohort'}: every training scan has sex {int(y[train][0])} "
                             "(0 = female, 1 = male); a sex classifier needs both (check the cohort's sex column "
                             "and the warnings read_cohort gave)")
    common = dict(downsample=target.downsample, input_shape=target.shape)
    meta = {"seed": seed, "cohort": target.name}
    groups = training_groups(target.participant_ids[train])

    if method == "direct":
        if backbone.task.name != task_name:
            raise ValueError(f"direct transfer needs a model pretrained for {task_name}; this one predicts "
                             f"{backbone.task.name} (use features or a fine-tuning method)")
        if task_name == "age":
            lo, hi = backbone.task.bin_range
            outside = np.mean((y[np.isfinite(y)] < lo) | (y[np.isfinite(y)] >= hi))
            if outside > 0:
                warnings.warn(f"{outside:.0%} of the cohort's ages lie outside the model's bins [{lo:g}, {hi:g}); "
                              "direct predictions cannot reach them (the paper did not report such cases)",
                              stacklevel=2)
        head = TransferHead(method, task_name, "network", backbone, meta=meta, **common)
        log_probs = target.features(backbone, "logits", config.batch_size, progress)
        return head, np.asarray(backbone.task.decode(jnp.asarray(log_probs)), np.float64)

    if method == "features":
        F = target.features(backbone, config.layer, config.batch_size, progress)
        est = make_feature_head(task_name, config.head, cv=config.cv, seed=seed, grouped=groups is not None)
        head = TransferHead(method, task_name, "features", backbone, est, config.layer,
                            meta={**meta, "head": config.head or ("ridge" if task_name == "age" else "logistic")},
                            **common)
        pred = _fit_sklearn(est, F, y, train, task_name, config, groups)
        return head, pred

    if method == "elastic":
        factor = max(1, config.elastic_mm // target.downsample)
        X = target.voxels(factor, progress)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        parallel = len(train) * X[0].size >= ELASTIC_PARALLEL_VALUES
        est = make_elastic(task_name, n_features=config.elastic_features, cv=config.cv, seed=seed,
                           n_jobs=min(config.cv, cores) if parallel else 1)
        head = TransferHead(method, task_name, "elastic", None, est, voxel_factor=factor, meta=meta, **common)
        pred = _fit_sklearn(est, X, y, train, task_name, config, groups)
        return head, pred

    # network methods
    target = target.in_memory()
    if task_name == "age":
        task = make_task("age", network_bins(config, backbone, y[train]))
        check_in_range(y[train], task.bin_range, fix="--bins {low} {high} (bin_range=({low}, {high}) in Python)")
    else:
        task = SexTask()
    ft = config.finetune_config(backbone.task.name)
    shift = ft.shift if ft.shift is not None else (2 if target.downsample == 1 else 1)
    idx = balanced_indices(train, y, seed) if task_name == "sex" else train
    kw = dict(shift=shift, mirror=ft.mirror, wrap=ft.wrap, progress=progress)
    procedure = method
    if method == "scratch":  # TL built Peng's channels here whatever the JSON said; we match the backbone
        b = backbone.model
        net = SFCN(b.channels, task.num_outputs, b.dropout.rate, dtype=b.dtype, rngs=nnx.Rngs(seed),
                   conv_impl=b.conv_impl)
    else:
        net = _copy(backbone.model)
    if method == "reinit":
        procedure = config.reinit_as or ("ft_step" if task_name == "age" else "ft_full")
        if procedure not in ("ft_step", "ft_full", "ft_final"):
            raise ValueError(f"reinit_as must be ft_step, ft_full or ft_final, got {procedure!r}")
    if method != "scratch" and (procedure == "ft_step" or not _same_head(backbone, task)):
        net = with_new_head(net, task.num_outputs, seed)
    if method == "reinit":
        net = reinit_with_scaling(net, seed)
    if procedure in ("ft_step", "ft_final"):
        net = train_phase(net, target.source, idx, task, ft.head, trainable=HEAD_ONLY, seed=phase_seed(seed, 0),
                          desc=f"{method} head", **kw)
    if procedure in ("ft_step", "ft_full"):  # ft_step's second phase: its own shuffle, augmentation, dropout
        net = train_phase(net, target.source, idx, task, ft.full, seed=phase_seed(seed, int(procedure == "ft_step")),
                          desc=f"{method} all layers", **kw)
    if procedure == "scratch":
        net = train_phase(net, target.source, idx, task, ft.scratch, seed=phase_seed(seed, 0), desc="scratch", **kw)
    jm = _network(backbone, net, task, {"fine_tuned": method, "from": str(backbone.path or "")})
    head = TransferHead(method, task_name, "network", jm, meta={**meta, "procedure": procedure}, **common)
    log_probs = apply_batched(net, target.source, "logits", batch_size=config.batch_size, progress=progress)
    return head, np.asarray(task.decode(jnp.asarray(log_probs)), np.float64)


def _covers(bins: tuple[float, float], y: np.ndarray) -> bool:
    a = y[np.isfinite(y)]
    return bool(len(a)) and bins[0] <= a.min() and a.max() < bins[1]


def network_bins(config: TransferConfig, backbone: JaxtlModel, train_ages: np.ndarray) -> tuple[float, float]:
    """Age bins of a network method, from the training split's ages only (never validation or test labels):
    `config.bin_range`; else the paper's bins of `config.paper_hps` when they cover the training ages; else
    the pretrained bins for ft_full / ft_final when they cover them (head kept, as TL); else training ages +-3."""
    if config.bin_range:
        return tuple(config.bin_range)
    if config.paper_hps is not None:
        bins = PAPER_BINS[config.paper_hps]
        if _covers(bins, train_ages):
            return bins
        a = train_ages[np.isfinite(train_ages)]
        warnings.warn(f"the paper's {config.paper_hps} age bins [{bins[0]:g}, {bins[1]:g}) do not cover the training "
                      f"ages ({a.min():.1f}-{a.max():.1f}); using bins from the training ages instead", stacklevel=3)
    if (config.method in ("ft_full", "ft_final") and backbone.task.name == "age"
            and _covers(backbone.task.bin_range, train_ages)):
        return tuple(backbone.task.bin_range)
    return default_bin_range(train_ages)


def phase_seed(seed: int, phase: int) -> int:
    """Seed of SGD phase `phase` (0, 1, ...) of a run: the run's seed for the first, a derived one after, so
    ft_step's phases draw distinct shuffles, augmentations and dropout masks."""
    if phase == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(phase)]).generate_state(1)[0] >> 1)


def training_groups(participant_ids: np.ndarray) -> np.ndarray | None:
    """The training scans' participant ids when some participant has several scans (sessions), else None:
    the inner CV of scikit-learn heads then keeps each participant's scans in one fold."""
    ids = np.asarray(participant_ids, dtype=str)
    return ids if len(np.unique(ids)) < len(ids) else None


def _fit_sklearn(est, X: np.ndarray, y: np.ndarray, train: np.ndarray, task: str, config: TransferConfig,
                 groups: np.ndarray | None = None) -> np.ndarray:
    """Fit on the training split and predict every scan; when the age-bias correction is fitted on the
    training split, its scans get out-of-fold predictions (in-sample ones would hide the bias). `groups`:
    participant ids of the training scans, kept within one fold by every CV."""
    with warnings.catch_warnings():
        # tiny CV folds: ill-defined scores and unconverged solvers on some grid points are expected
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        fit_grouped(est, X[train], y[train] if task == "age" else y[train].astype(int), groups)
        pred = np.asarray(predict_head(est, X, task), np.float64)
        if task == "age" and config.bias_fit_split() == "train":
            cv = inner_cv(task, min(config.cv, len(train)), config.seed + 1, groups is not None)
            for fit_rows, held_out in cv.split(train, groups=groups):
                fold = fit_grouped(clone(est), X[train[fit_rows]], y[train[fit_rows]],
                                   None if groups is None else groups[fit_rows])
                pred[train[held_out]] = predict_head(fold, X[train[held_out]], task)
    return pred


# ------------------------------------------------------------------------------------------------
# Metrics


def age_metrics(pred: np.ndarray, age: np.ndarray) -> dict:
    pred, age = np.asarray(pred, np.float64), np.asarray(age, np.float64)
    if len(age) == 0:
        return {"n": 0}
    if not np.isfinite(pred).all():  # e.g. an unusable bias correction
        return {"n": int(len(age)), "mae": float("nan"), "r": float("nan"), "r2": float("nan"),
                "mean_gap": float("nan")}
    r = float(np.corrcoef(pred, age)[0, 1]) if len(age) > 2 and np.std(pred) > 0 else float("nan")
    return {"n": int(len(age)), "mae": float(np.mean(np.abs(pred - age))), "r": r,
            "r2": float(r2_score(age, pred)) if len(age) > 1 else float("nan"),
            "mean_gap": float(np.mean(pred - age))}


def sex_metrics(prob: np.ndarray, sex: np.ndarray) -> dict:
    prob, sex = np.asarray(prob, np.float64), np.asarray(sex).astype(int)
    if len(sex) == 0:
        return {"n": 0}
    hard = (prob > 0.5).astype(int)
    both = len(np.unique(sex)) == 2
    return {"n": int(len(sex)), "accuracy": float(np.mean(hard == sex)),
            "balanced_accuracy": float(balanced_accuracy_score(sex, hard)) if both else float("nan"),
            "auc": float(roc_auc_score(sex, prob)) if both else float("nan")}


def metric_name(task: str) -> str:
    """The headline metric of the paper's table: MAE (years) or balanced accuracy."""
    return "mae" if task == "age" else "balanced_accuracy"


def evaluate(pred: np.ndarray, y: np.ndarray, split: np.ndarray, task: str,
             corrected: np.ndarray | None = None) -> dict:
    out = {}
    for name in ("train", "val", "test"):
        m = split == name
        out[name] = age_metrics(pred[m], y[m]) if task == "age" else sex_metrics(pred[m], y[m])
        if corrected is not None and m.any():
            c = age_metrics(corrected[m], y[m])
            out[name] |= {"mae_corrected": c["mae"], "r_corrected": c["r"], "mean_gap_corrected": c["mean_gap"]}
    return out


# ------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class TransferResult:
    metrics: dict
    predictions: dict[str, np.ndarray]
    head: TransferHead
    out_dir: Path | None = None
    failures: tuple = ()  # `run_transfer(on_error="skip")`: the scans left out, as `jaxtl.cache.Failure`s


def transfer(backbone: JaxtlModel, target: Target, config: TransferConfig, *, split: np.ndarray | None = None,
             progress: bool = True) -> TransferResult:
    """Split (unless given), fit, predict and evaluate, without writing files (`run_transfer` writes them)."""
    config.check()
    t0 = time.perf_counter()
    y = target.labels(config.task)
    if split is None:
        split = split_cohort(target.participant_ids, target.sites, y, config.task, config.split, config.seed)
        split = subsample_share(split, target.participant_ids, config.share, config.seed)
    head, pred = fit_method(backbone, target, split, config, progress=progress)
    head.meta |= {"n_train": int((split == "train").sum()), "split": list(config.split), "share": config.share}
    corrected = None
    if config.task == "age":
        bias_split = config.bias_fit_split()
        if config.bias_split == "auto" and bias_split == "val" and not _bias_fittable(pred[split == "val"],
                                                                                     y[split == "val"]):
            warnings.warn("fewer than 3 validation scans with different ages: the age-bias correction is fitted on "
                          "the training split's in-sample predictions instead (it under-corrects there)",
                          stacklevel=2)
            bias_split = "train"
        fit_on = np.isin(split, bias_split.split("+"))
        # trained networks' training predictions are in-sample; scikit-learn ones out-of-fold (_fit_sklearn);
        # direct transfer trains nothing on the cohort
        label = bias_split
        if config.method == "direct":
            label += " (held out: direct transfer trains on no scan)"
        elif bias_split == "train":
            label += " (in-sample)" if head.kind == "network" else " (out-of-fold)"
        head.bias = BiasCorrection.fit(pred[fit_on], y[fit_on], label)
        corrected = head.corrected(pred)
    metrics = {
        "task": config.task, "method": config.method, "metric": metric_name(config.task),
        "model": str(backbone.path or ""), "cohort": target.name, "seed": config.seed,
        "n": {k: int((split == k).sum()) for k in ("train", "val", "test", "unlabelled", "unused")},
        **evaluate(pred, y, split, config.task, corrected),
        "baseline": _baseline(y, split, config.task),
        "bias_correction": head.bias.to_dict() if head.bias is not None else None,
        "bias_split": head.bias.split if head.bias is not None else None,  # predictions the correction was fitted on
        "bias_usable": head.bias.usable if head.bias is not None else None,  # False: corrected columns left empty
        "config": _jsonable(dataclasses.asdict(config)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    preds = {"id": target.ids, "participant_id": target.participant_ids, "session": target.sessions,
             "site": target.sites, "split": split, config.task: y, "prediction": pred}
    if config.task == "age":
        preds |= {"prediction_corrected": corrected, "gap": pred - y, "gap_corrected": corrected - y}
    else:
        preds |= {"predicted_sex": (pred > 0.5).astype(float)}
    if hasattr(target.source, "qc_warnings"):  # a cache or NIfTI files (each scan was loaded to predict it)
        preds["qc_warnings"] = target.source.qc_warnings()
    return TransferResult(metrics, preds, head)


def _bias_fittable(pred: np.ndarray, age: np.ndarray) -> bool:
    ok = np.isfinite(pred) & np.isfinite(age)
    return bool(ok.sum() >= 3 and np.ptp(age[ok]) > 0)


def _baseline(y: np.ndarray, split: np.ndarray, task: str) -> dict:
    """Test metric of predicting the training mean (age) / majority class (sex)."""
    tr, te = y[split == "train"], y[split == "test"]
    if not len(tr) or not len(te):
        return {}
    if task == "age":
        return {"mae": float(np.mean(np.abs(te - tr.mean())))}
    return {"balanced_accuracy": 0.5, "accuracy": float(np.mean(te == float(tr.mean() > 0.5)))}


def run_transfer(model: JaxtlModel | str | os.PathLike, cohort: Any, out_dir: str | os.PathLike, *,
                 task: str = "age", method: str = "features", config: TransferConfig | None = None,
                 progress: bool = True, overwrite: bool = False, plots: bool = True, on_error: str = "raise",
                 **overrides) -> TransferResult:
    """Fit a transfer method on a target cohort and write its outputs to `out_dir`.

    `model`: pretrained jaxtl model (directory, published name or `JaxtlModel`). `cohort`: a prepared cache
    directory (fastest), a BIDS directory, a CSV/TSV cohort table or a `Cohort`. Other `TransferConfig`
    fields can be passed as keywords (e.g. `head="svr"`, `seed=3`, `epoch_scale=0.2`).

    Writes predictions.csv (participant_id, session, site, split, age|sex, prediction, and for age
    prediction_corrected, gap = predicted - chronological, gap_corrected), metrics.json, head/ and PNG plots.

    `on_error="skip"` (NIfTI cohorts; a prepared cache never skips): table rows with problems are dropped with a
    warning, and every scan is read once first (`drop_unloadable`, which keeps them in memory up to 4 GB); those
    that cannot be loaded are left out of the split and listed in `out_dir/failures.tsv` (`result.failures`,
    "failed_to_load" in metrics.json).
    """
    out = Path(out_dir)
    if (out / "metrics.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds transfer results; choose another --out or pass --overwrite "
                         "(overwrite=True)")
    config = dataclasses.replace(config or TransferConfig(), task=task, method=method, **overrides)
    config.check()
    backbone = resolve_model(model)
    if not isinstance(backbone, JaxtlModel):
        raise ValueError("run_transfer needs a JaxtlModel or a model directory (it must know its preprocessing)")
    target = open_target(cohort, model_downsample(backbone), sex_required=task == "sex",
                         check_files=on_error != "skip", on_error=on_error)
    if target.shape != tuple(backbone.input_shape):
        raise ValueError(f"{target.name}: volumes of shape {target.shape}, the model expects {backbone.input_shape}")
    failures: tuple = ()
    if on_error == "skip":
        target, failures = drop_unloadable(target, progress=progress)
    result = transfer(backbone, target, config, progress=progress)
    result.failures = failures
    result.metrics["failed_to_load"] = len(failures)
    out.mkdir(parents=True, exist_ok=True)
    _write_failures(out / "failures.tsv", failures)
    result.head.save(out / "head")
    write_predictions(out / "predictions.csv", result.predictions)
    (out / "metrics.json").write_text(json.dumps(_jsonable(result.metrics), indent=2) + "\n")
    if plots and task == "age":
        plot_brain_age(result.predictions, out, title=f"{method} on {Path(str(target.name)).name}")
    result.out_dir = out
    return result


# ------------------------------------------------------------------------------------------------
# Prediction with a fitted head


def predict_cohort(head: TransferHead | str | os.PathLike, cohort: Any, *, progress: bool = True,
                   batch_size: int | None = None, on_error: str = "raise") -> dict[str, np.ndarray]:
    """Apply a fitted head (or a plain model: direct) to a cohort; columns as in predictions.csv, and
    "qc_warnings": each scan's input warnings (e.g. not skull-stripped; from a cache, those `jaxtl prepare`
    recorded), joined by " | ", "" for none.

    `on_error="skip"` (NIfTI cohorts; a prepared cache never skips): a scan that cannot be loaded keeps its
    row with NaN predictions, and two more columns say which: "path" and "error" (the reason, "" for scans
    predicted). `write_cohort_predictions` writes them apart, as `jaxtl predict` does.
    """
    head = head if isinstance(head, TransferHead) else load_head(head)
    # skip: rows with problems (dropped with a warning) and missing files (failed scans) too
    target = open_target(cohort, head.downsample, check_files=on_error != "skip", on_error=on_error,
                         labels_required=False)
    reader = VolumeReader(target.source, downsample=head.downsample, on_error=on_error)
    pred = head.predict(reader, progress=progress, batch_size=batch_size)
    y = target.labels(head.task)
    cols = {"id": target.ids, "participant_id": target.participant_ids, "session": target.sessions,
            "site": target.sites, head.task: y, "prediction": pred}
    if head.task == "age":
        corrected = head.corrected(pred)
        cols |= {"prediction_corrected": corrected, "gap": pred - y, "gap_corrected": corrected - y}
    else:
        cols |= {"predicted_sex": np.where(np.isnan(pred), np.nan, (pred > 0.5).astype(float))}
    if on_error == "skip":
        cols |= _failure_columns(target, reader)
    return cols | {"qc_warnings": reader.qc_warnings()}


def embed_cohort(model: JaxtlModel | str | os.PathLike, cohort: Any, *, layer: str = "features",
                 progress: bool = True, batch_size: int | None = None, on_error: str = "raise"
                 ) -> dict[str, np.ndarray]:
    """A cohort's SFCN features, one row per scan: id, participant_id, session, site, age, sex (NaN where
    unknown), then one column per feature (`sfcn_features0`..`sfcn_features63` for `layer="features"`), then
    "qc_warnings" as `predict_cohort`'s.

    `on_error="skip"` as `predict_cohort` (NaN features and "path"/"error" columns for the scans that failed);
    `write_cohort_predictions` writes these columns too, as `jaxtl embed` does.
    """
    from jaxtl.heads import SFCNEmbedder

    model = resolve_model(model)
    downsample = model_downsample(model)
    target = open_target(cohort, downsample, check_files=on_error != "skip", on_error=on_error, labels_required=False)
    reader = VolumeReader(target.source, downsample=downsample, on_error=on_error)
    feats = embed(reader, model, layer=layer, progress=progress, batch_size=batch_size)
    cols = {"id": target.ids, "participant_id": target.participant_ids, "session": target.sessions,
            "site": target.sites, "age": target.ages, "sex": target.sexes}
    names = SFCNEmbedder(model, layer=layer).get_feature_names_out()
    cols |= {str(name): feats[:, j] for j, name in enumerate(names)}
    if on_error == "skip":
        cols |= _failure_columns(target, reader)
    return cols | {"qc_warnings": reader.qc_warnings()}


def _failure_columns(target: Target, reader: VolumeReader) -> dict[str, np.ndarray]:
    """The "path" and "error" columns: each scan's file and why it failed to load ("" for the others)."""
    paths = getattr(target.source, "paths", None)
    path = np.array([str(p) for p in paths] if paths is not None else [""] * len(target), dtype=object)
    error = np.full(len(target), "", dtype=object)
    for f in reader.failures:
        path[f.index], error[f.index] = f.path, f.reason
    return {"path": path, "error": error}


def write_cohort_predictions(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> tuple[Path, Path, int]:
    """Write `predict_cohort` columns: the scans predicted to the CSV `path`; with `on_error="skip"` columns,
    the scans that failed to `<path stem>.failures.tsv` beside it (id, path, reason, as `jaxtl prepare`'s
    failures.tsv; a stale one is removed when none failed). Returns (CSV, failures file, number failed).
    """
    from jaxtl.cache import Failure

    path = Path(path)
    failures_path = path.with_name(f"{path.stem}.failures.tsv")
    error = columns.get("error")
    failed = np.array([bool(e) for e in error], bool) if error is not None else np.zeros(0, bool)
    kept = {k: v for k, v in columns.items() if k not in ("path", "error")}
    if error is not None:
        kept = {k: np.asarray(v)[~failed] for k, v in kept.items()}
    write_predictions(path, kept)
    _write_failures(failures_path, [Failure(str(columns["id"][i]), str(columns["path"][i]), str(error[i]))
                                    for i in np.flatnonzero(failed)])
    return path, failures_path, int(failed.sum())


def _delimiter(path: Path) -> str:
    """Tab for a .tsv file (BIDS' tables), comma otherwise."""
    return "\t" if path.suffix.lower() == ".tsv" else ","


def write_predictions(path: str | os.PathLike, columns: dict[str, np.ndarray]) -> Path:
    """CSV (TSV for a .tsv `path`), one row per scan; missing values empty (read as NaN by pandas and NA by R)."""
    path = Path(path)
    names = list(columns)
    n = len(next(iter(columns.values())))
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=_delimiter(path))
        w.writerow(names)
        for i in range(n):
            w.writerow([_cell(columns[k][i]) for k in names])
    return path


def read_predictions(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=_delimiter(Path(path))))
    cols = {name: [r[j] for r in rows[1:]] for j, name in enumerate(rows[0])}
    out = {}
    for name, values in cols.items():
        try:
            out[name] = np.array([float(v) if v != "" else np.nan for v in values])
        except ValueError:
            out[name] = np.array(values, dtype=str)
    return out


def _cell(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{float(v):.6g}" if np.isfinite(v) else ""
    return str(v)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


# ------------------------------------------------------------------------------------------------
# Plots


def plot_brain_age(pred: dict[str, np.ndarray], out_dir: str | os.PathLike, title: str = "") -> list[Path]:
    """predicted_vs_age.png (identity line; colour = split) and gap_vs_age.png (before / after correction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    age, p = np.asarray(pred["age"], float), np.asarray(pred["prediction"], float)
    split = np.asarray(pred.get("split", np.full(len(age), "all")))
    ok = np.isfinite(age) & np.isfinite(p)
    colours = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
    fig, ax = plt.subplots(figsize=(5, 5))
    for name in sorted(set(split[ok])):
        m = ok & (split == name)
        ax.scatter(age[m], p[m], s=10, alpha=0.7, color=colours.get(name, "grey"), label=f"{name} (n={m.sum()})")
    if ok.any():
        lo, hi = float(min(age[ok].min(), p[ok].min())), float(max(age[ok].max(), p[ok].max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    ax.set_xlabel("chronological age (years)")
    ax.set_ylabel("predicted age (years)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "predicted_vs_age.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, name in zip(axes, ("gap", "gap_corrected"), ("before correction", "after correction"), strict=True):
        g = np.asarray(pred[key], float)
        for s in sorted(set(split[ok])):
            m = ok & (split == s)
            ax.scatter(age[m], g[m], s=10, alpha=0.7, color=colours.get(s, "grey"), label=s)
        ax.axhline(0, color="k", lw=1)
        ax.set_xlabel("chronological age (years)")
        ax.set_title(f"brain-age gap {name}")
    axes[0].set_ylabel("predicted - chronological (years)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "gap_vs_age.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


__all__ = [
    "METHODS", "Phase", "FinetuneConfig", "PAPER_HPS", "paper_finetune", "TransferConfig", "Target", "open_target",
    "split_cohort", "subsample_share", "balanced_indices", "with_new_head", "reinit_with_scaling", "train_phase",
    "TransferHead", "load_head", "fit_method", "transfer", "run_transfer", "predict_cohort", "write_predictions",
    "write_cohort_predictions",
    "read_predictions", "age_metrics", "sex_metrics", "metric_name", "plot_brain_age", "TransferResult",
    "default_bin_range", "ArraySource", "PAPER_BINS", "PAPER_HPS_OTHER_SOURCE", "network_bins", "phase_seed",
    "device_batch",
]
