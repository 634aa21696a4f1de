"""Probe for issue 6 (run from the repository root after the IXI and OASIS runs of the README): does a stronger
sex source model make same-task sex features beat the elastic net on simulated OASIS? Source: 2000 simulated
UK Biobank-like subjects instead of 800, same recipe (30 epochs, lr 0.001); targets, splits and seeds as before."""

import dataclasses

from jaxtl.experiment import SIMULATED_SEX_MODEL, MethodSpec, SimulatedCohort, load_experiment_config, run_experiment
from jaxtl.train import enable_compilation_cache

enable_compilation_cache()
sex = dataclasses.replace(SIMULATED_SEX_MODEL, workdir="runs/pretrain_ukb2000_sex",
                          cohort=SimulatedCohort("ukb", 2000, 0, 4))
for name in ("oasis", "ixi"):
    cfg = load_experiment_config(f"configs/experiment_{name}.py", ["target.n=200", "repeats=3", "epoch_scale=0.2"])
    cfg = dataclasses.replace(cfg, name=f"{name}_sex2000", out_dir=f"runs/experiment_{name}_sex2000", sex_model=sex,
                              tasks=("sex",), methods=(MethodSpec("features"), MethodSpec("elastic"),
                                                       MethodSpec("features", pretrained="other")),
                              scarcity=None, manifold=None)
    print(run_experiment(cfg))
