"""The paper's ABIDE I+II experiment (paper-spec sections 6-8) on a SIMULATED ABIDE I+II-like cohort.

Target: `jaxtl.simulate` preset "abide" (1341 subjects, 20 sites, ages 5-56,
74% male) at 4mm; pretrained models: demo-size SFCNs
(configs/sfcn_demo.py) pretrained for age and for sex on 800 simulated UK Biobank-like subjects, created
on the first run (shared with the other experiment configs). Fine-tuning uses the paper's ABIDE I+II
hyper-parameters (section 6.1).

Full scale (5 repeats, the paper's epochs) wants a GPU. A CPU-sized run, with the settings of the IXI and OASIS
runs reported in the README (ABIDE has not been run so far):
  jaxtl experiment --config configs/experiment_abide.py --set target.n=200 --set repeats=3 --set epoch_scale=0.2
To run on real data, set `target` to a prepared cache directory (or BIDS / CSV cohort) and the models to
model directories.
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
        name="abide",
        out_dir="runs/experiment_abide",
        data_dir="runs/data",
        target=SimulatedCohort("abide", n=1341, seed=1, resolution=4),
        # simulated UK Biobank-like source models, shared by the experiment configs (jaxtl.experiment)
        age_model=SIMULATED_AGE_MODEL,
        sex_model=SIMULATED_SEX_MODEL,
        paper_dataset="abide",
        tasks=("age", "sex"),
        repeats=5,
        split=(0.4, 0.2, 0.4),
        epoch_scale=1.0,
        scarcity=ScarcityConfig(shares=(0.1, 0.25, 0.5, 1.0), methods=("features", "ft_step", "scratch"),
                                tasks=("age",), repeats=1),
        manifold=ManifoldConfig(n=300),
    )
