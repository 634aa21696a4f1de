"""jaxtl: transfer learning for neuroimaging via re-use of SFCN features, in JAX/Flax.

Data flow: NIfTI file -> `load_volume` (conform to MNI152 1mm, crop, normalise) -> `SFCN`
-> `embed` (64-d features) / `predict` (age or P(male)) -> `run_transfer` (the paper's methods on a
target cohort, brain-age outputs) / `run_experiment` (the paper's table).
"""

from jaxtl.cache import CacheSource, NiftiSource, prepare_cache
from jaxtl.cohort import Cohort, read_cohort
from jaxtl.data import InputError, InputWarning, load_volume
from jaxtl.embed import SkippedScan, SkippedScansWarning, embed, predict
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
from jaxtl.simulate import simulate
from jaxtl.transfer import TransferConfig, TransferHead, load_head, predict_cohort, run_transfer
from jaxtl.weights import JaxtlModel, convert_torch_checkpoint, load_model, save_model

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
