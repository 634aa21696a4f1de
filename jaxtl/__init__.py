"""jaxtl: transfer learning for neuroimaging via re-use of SFCN features, in JAX/Flax.

Data flow: NIfTI file -> `load_volume` (conform to MNI152 1mm, crop, normalise) -> `SFCN`
-> `embed` (64-d features) / `predict` (age or P(male)) -> `run_transfer` (the paper's methods on a
target cohort, brain-age outputs) / `run_experiment` (the paper's table).
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

# `jaxtl.embed` and `jaxtl.simulate` are these functions, not the submodules of the same names: imported here, first
from jaxtl.embed import SkippedScan, SkippedScansWarning, embed, predict
from jaxtl.simulate import simulate

# The rest is imported when first used (`jaxtl.load_model`, `from jaxtl import run_transfer`, the submodules as
# `jaxtl.transfer`): `import jaxtl` and the `jaxtl` command start without scikit-learn or grain where a command does
# not need them.
_LAZY = {
    "jaxtl.cache": ("CacheSource", "NiftiSource", "prepare_cache"),
    "jaxtl.cohort": ("Cohort", "read_cohort"),
    "jaxtl.data": ("InputError", "InputWarning", "load_volume"),
    "jaxtl.experiment": ("ExperimentConfig", "run_experiment"),
    "jaxtl.heads": ("BiasCorrection", "ElasticBaseline", "ElasticClassifier", "ElasticRegressor", "SFCNEmbedder",
                    "make_feature_head"),
    "jaxtl.labels": ("AgeTask", "SexTask", "make_task"),
    "jaxtl.model": ("SFCN",),
    "jaxtl.transfer": ("TransferConfig", "TransferHead", "load_head", "predict_cohort", "run_transfer"),
    "jaxtl.weights": ("JaxtlModel", "convert_torch_checkpoint", "load_model", "save_model"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from jaxtl.cache import CacheSource, NiftiSource, prepare_cache
    from jaxtl.cohort import Cohort, read_cohort
    from jaxtl.data import InputError, InputWarning, load_volume
    from jaxtl.experiment import ExperimentConfig, run_experiment
    from jaxtl.heads import (
        BiasCorrection,
        ElasticBaseline,
        ElasticClassifier,
        ElasticRegressor,
        SFCNEmbedder,
        make_feature_head,
    )
    from jaxtl.labels import AgeTask, SexTask, make_task
    from jaxtl.model import SFCN
    from jaxtl.transfer import TransferConfig, TransferHead, load_head, predict_cohort, run_transfer
    from jaxtl.weights import JaxtlModel, convert_torch_checkpoint, load_model, save_model


def __getattr__(name: str):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"jaxtl.{name}") is not None:
        value = importlib.import_module(f"jaxtl.{name}")  # `import jaxtl; jaxtl.transfer.embed_cohort(...)`
    else:
        raise AttributeError(f"module 'jaxtl' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__all__ = [
    "load_volume",
    "InputError",
    "InputWarning",
    "read_cohort",
    "Cohort",
    "simulate",
    "prepare_cache",
    "CacheSource",
    "NiftiSource",
    "SFCN",
    "AgeTask",
    "SexTask",
    "make_task",
    "JaxtlModel",
    "convert_torch_checkpoint",
    "load_model",
    "predict",
    "embed",
    "SkippedScansWarning",
    "SkippedScan",
    "save_model",
    "SFCNEmbedder",
    "make_feature_head",
    "ElasticBaseline",
    "ElasticRegressor",
    "ElasticClassifier",
    "BiasCorrection",
    "TransferConfig",
    "TransferHead",
    "run_transfer",
    "load_head",
    "predict_cohort",
    "ExperimentConfig",
    "run_experiment",
]
__version__ = "0.1.0"
