"""The paper's IXI experiment (paper-spec sections 6-8) on a SIMULATED IXI-like cohort.

Target: `jaxtl.simulate` preset "ixi" (538 subjects, 3 sites, ages 20-86) at 4mm; pretrained models:
demo-size SFCNs (configs/sfcn_demo.py) pretrained for age and for sex on 800 simulated UK Biobank-like
subjects, created on the first run. Fine-tuning uses the paper's IXI hyper-parameters (section 6.1).

Full scale (5 repeats, the paper's epochs) wants a GPU. The CPU run reported in the README (about 23 min on
2 cores after pretraining) was
  jaxtl experiment --config configs/experiment_ixi.py --set target.n=200 --set repeats=3 --set epoch_scale=0.2
To run on real data, set `target` to a prepared cache directory (or BIDS / CSV cohort) and the models to
model directories, e.g. `age_model="~/.cache/jaxtl/peng2021-age"` (then use matching input resolution).
"""

from jaxtl.experiment import (
    SIMULATED_AGE_MODEL,
    SIMULATED_SEX_MODEL,
    ExperimentConfig,
    ManifoldConfig,
    ScarcityConfig,
    SimulatedCohort,
)


def get_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="ixi",
        out_dir="runs/experiment_ixi",
        data_dir="runs/data",
        target=SimulatedCohort("ixi", n=538, seed=1, resolution=4),
        # simulated UK Biobank-like source models, shared by the experiment configs (jaxtl.experiment)
        age_model=SIMULATED_AGE_MODEL,
        sex_model=SIMULATED_SEX_MODEL,
        paper_dataset="ixi",
        tasks=("age", "sex"),
        repeats=5,
        split=(0.4, 0.2, 0.4),
        epoch_scale=1.0,
        scarcity=ScarcityConfig(shares=(0.1, 0.25, 0.5, 1.0), methods=("features", "ft_step", "scratch"),
                                tasks=("age",), repeats=1),
        manifold=ManifoldConfig(n=300),
    )
