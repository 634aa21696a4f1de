"""Small low-resolution SFCN for CPUs, the demo and tests: a cache prepared with --downsample 4 (40x48x40).

Same topology as Peng's and the same recipe as `sfcn_age_ukb.py` (itself [UNVERIFIED] against the SFCN
paper's text, paper-spec section 4), narrower channels and fewer epochs; the learning-rate step is scaled
to the shorter run. Bins 42-82 as Peng (the `ukb` preset is 45-80);
change `bin_range` for other cohorts.
"""

from jaxtl.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="age",
        bin_range=(42.0, 82.0),
        sigma=1.0,
        batch_size=8,
        epochs=20,
        log_every_steps=5,
        model=ModelConfig(channels=(16, 32, 64, 64, 64, 64), dropout=0.5, dtype="float32"),
        optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-3, step_epochs=8, gamma=0.3),
        data=DataConfig(shift=1, mirror=True, wrap=True, val_fraction=0.1, test_fraction=0.1, workers=0),
    )
