"""Peng et al. (2021) UK Biobank age pretraining recipe at 1mm (160x192x160).

SGD momentum 0.9, lr 0.01 x0.3 every 30 epochs, weight decay 1e-3 (coupled L2, as PyTorch SGD), global
batch 8, 130 epochs, shift +-2 voxels and left-right mirror, bins 42-82 with sigma 1.
The recipe is [UNVERIFIED] against the SFCN paper's text (paper-spec section 4: from recollection,
consistent with the transfer code's scratch defaults). Use with a cache prepared at --downsample 1.
"""

from jaxtl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="age",
        bin_range=(42.0, 82.0),
        sigma=1.0,
        batch_size=8,
        epochs=130,
        model=ModelConfig(channels=(32, 64, 128, 256, 256, 64), dropout=0.5, dtype="float32"),
        optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-3, step_epochs=30, gamma=0.3),
        data=DataConfig(downsample=1, shift=2, mirror=True, wrap=True, val_fraction=0.1, test_fraction=0.1, workers=0),
    )
