"""Sex pretraining on UK Biobank with Peng's recipe (2 classes, 0 = female, 1 = male, cross-entropy).

Same optimiser and augmentation as `sfcn_age_ukb.py` ([UNVERIFIED] recipe, paper-spec section 4). Peng's
public sex model used channels [28,58,128,256,256,64] and its last epoch; this config keeps the age widths.
"""

from jaxtl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="sex",
        batch_size=8,
        epochs=130,
        model=ModelConfig(channels=(32, 64, 128, 256, 256, 64), dropout=0.5, dtype="float32"),
        optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-3, step_epochs=30, gamma=0.3),
        data=DataConfig(downsample=1, shift=2, mirror=True, wrap=True, val_fraction=0.1, test_fraction=0.1, workers=0),
    )
