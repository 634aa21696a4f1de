"""jaxtl: transfer learning for neuroimaging via re-use of SFCN features, in JAX/Flax.

Data flow: NIfTI file -> `load_volume` (conform to MNI152 1mm, crop, normalise) -> `SFCN`
-> `embed` (64-d features) / `predict` (age or P(male)).
"""

from jaxtl.embed import embed, predict
from jaxtl.labels import AgeTask, SexTask, make_task
from jaxtl.model import SFCN
from jaxtl.weights import JaxtlModel, convert_torch_checkpoint, load_model, save_model

__all__ = [
    "SFCN",
    "AgeTask",
    "SexTask",
    "make_task",
    "JaxtlModel",
    "convert_torch_checkpoint",
    "load_model",
    "predict",
    "embed",
    "save_model",
]
__version__ = "0.1.0"
