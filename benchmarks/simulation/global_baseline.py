"""How much of the simulated age signal a 7-number summary of each scan carries: a ridge regression on global
intensity statistics (brain voxel count, intensity spread, rough CSF / grey / white matter fractions, 10th and
90th percentiles) plus site, on the demo's target cohorts and the demo's own splits (`jaxtl demo`: 120 subjects,
seed 1, 4mm; per-site 40/20/40, split seeds 0-2), beside the mean predictor of the same splits. Run from the
repository root:

    python benchmarks/simulation/global_baseline.py [n] [presets...]

Prints one line per preset; the README's demo table is the comparison (its mean-predictor column must match the
one printed here, which shows that the splits are the same).
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from jaxtl.simulate import participant_id, simulate_subject
from jaxtl.transfer import split_cohort


def summary(volume: np.ndarray) -> list[float]:
    """7 global statistics of the brain voxels (> 0), relative to the median intensity where a scale matters."""
    brain = volume[volume > 0].astype(np.float64)
    med = np.median(brain)
    return [brain.size, brain.std() / brain.mean(), (brain < 0.5 * med).mean(),
            ((brain >= 0.5 * med) & (brain < 0.85 * med)).mean(), (brain >= 0.85 * med).mean(),
            np.percentile(brain, 10) / med, np.percentile(brain, 90) / med]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    presets = sys.argv[2:] or ["ixi", "oasis"]
    for preset in presets:
        subjects = [simulate_subject(preset, i, seed=1, resolution=4) for i in range(n)]
        ages = np.array([s.subject.age for s in subjects])
        sites = np.array([s.subject.site for s in subjects])
        ids = np.array([participant_id(preset, i) for i in range(n)])
        onehot = (sites[:, None] == np.unique(sites)[None]).astype(float)
        x = np.hstack([np.array([summary(s.data) for s in subjects]), onehot])
        ridge, mean = [], []
        for repeat in range(3):
            split = split_cohort(ids, sites, ages, "age", (0.4, 0.2, 0.4), seed=repeat)
            tr, te = split == "train", split == "test"
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))).fit(x[tr], ages[tr])
            ridge.append(np.abs(model.predict(x[te]) - ages[te]).mean())
            mean.append(np.abs(ages[tr].mean() - ages[te]).mean())
        print(f"{preset} n={n}: 7-number ridge test MAE {np.mean(ridge):.2f}±{np.std(ridge, ddof=1):.2f}, "
              f"mean predictor {np.mean(mean):.2f} (3 repeats of the demo's splits)", flush=True)


if __name__ == "__main__":
    main()
