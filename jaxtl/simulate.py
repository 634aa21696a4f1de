"""Simulated cohorts: synthetic skull-stripped, MNI-registered T1 brain MRI with age, sex and scanner effects.

THESE ARE SIMULATED BRAINS, FOR DEMOS, TESTS AND BENCHMARKS. Numbers measured on them are not results on
UK Biobank, OASIS-3, IXI, ABIDE or any real cohort; they show that a pipeline runs and how methods compare
on tasks of known, controlled difficulty (benchmarks/simulation/calibration.md).

`simulate(preset, out_dir, n, seed, resolution)` writes a BIDS dataset (`participants.tsv` with
participant_id, age, sex F/M, site; `sub-*/anat/sub-*_T1w.nii.gz`, int16) on FSL's MNI152 1mm grid
(`jaxtl.data.MNI_SHAPE`, `MNI_AFFINE`, LAS) or its 2/4 mm block averages (`output_shape`, `output_affine`);
`simulate_subject` returns one volume in memory, optionally with age/sex/site overridden for the same
individual. `PRESETS` mirrors the paper's cohorts (paper-spec section 7). `preview` and `calibrate` /
`calibration_report` produce the README picture and the calibration report (`jaxtl simulate --preview`,
`--calibrate`).

Anatomy comes from nilearn's MNI ICBM152 2009 template (T1, GM and WM probability maps, brain mask; CSF =
mask - GM - WM), mapped exactly (flip + integer shift) onto the reference grid. The template averages 152
adults aged 18.5-43.5 y, so it stands for a 25-year-old; every effect is a change from it.

Generative model. Sizes are the defaults in `EFFECTS` / `REGIONS` / `PRESETS`. "design" marks a choice made
so that the benchmark behaves sensibly (documented, tunable), not a number taken from a source.
----------------------------------------------------------------------------------------------------------
effect              | size                                                  | source / rationale
--------------------|-------------------------------------------------------|--------------------------------
age: cortex         | thinning 0.15 %/y at 25 rising to 0.45 %/y at 80      | Salat 2004; 0.3-0.6 %/y in older
                    | (-16.5 % at 80), realised as a recession of the pial  | adults (Fjell 2009, Storsve 2014)
                    | surface (GM -> CSF) by thickness loss x 2.7 mm        |
age: sulci          | extra pial recession (sulcal widening, gyral atrophy) | sulcal span widens with age
                    | 0.005 mm/y at 25 rising to 0.02 mm/y at 80 (0.7 mm at | (Kochunov 2005); size: design
                    | 80); children: sulci narrower by 0.01 mm/y below 25   |
age: development    | juxtacortical WM still unmyelinated (looks grey):     | GM volume peaks ~6 y, WM ~29 y
                    | 1.6 mm at 5 y, ((25-age)/20)^1.2 -> GM -13 %, WM +22 %| (Bethlehem 2022 "Brain charts");
                    | at 5 y vs 25 y                                        | size: design, same direction
age: ventricles     | lateral-ventricle ln-volume rate 1 %/y before 40,     | ~3-4 %/y after 60 (Fjell 2009);
                    | rising to 4.5 %/y at 80 (x3.5 at 80 vs 25; x0.82 at 5)| ventricles grow all life
                    | by dilating the template ventricles (level set)       | (Bethlehem 2022)
age: GM volume      | (result of the above) -0.2 %/y at 40-50, -0.4 to      | 0.2-0.5 %/y after 40,
                    | -0.6 %/y at 60-80; WM flat 25-50, then declining      | accelerating
age: WM-GM contrast | x(1 - 0.35 ((20-age)/15)^1.5) below 20 y (less        | children: lower contrast (issue);
                    | myelinated WM), x(1 - 0.003 (age-30)) after 30        | adults: Salat 2009; sizes: design
age: MTL            | hippocampus/amygdala volume loss, rate 0 at 40 rising | ~1 %/y in old age (Fraser 2015)
                    | to 0.8 %/y at 80 (-15 % at 80); local warp            |
age: WM lesions     | T1-hypointense periventricular lesions: 8 % of the    | WM lesion load rises steeply with
                    | lesion-prone WM at 80, doubling every 8 y (~15 ml)    | age; shape and size: design
sex: head size      | native ICV +9 % in males, within-sex ln-sd 8 %;       | issue (8-10 %); Ruigrok 2014
                    | children smaller (-12 % at 5 y)                       | (ICV +12 %); ~90 % adult by 6 y
registration        | linear registration to MNI leaves a share 0.35 of     | design: affine registration
                    | ln(head scale): MNI brains ~3 % larger in males, the  | normalises head size (FSL
                    | sexes overlap (brain volume alone: ~0.6 accuracy)     | SIENAX uses it as ICV proxy)
sex: allometry      | template-space cortical thickness x s^-0.7 (s: native | thickness ~ volume^0.1 (Im 2008):
                    | linear head scale) -> women relatively thicker cortex | women thicker (Ritchie 2018)
sex: regional       | local ln-volume male-female: amygdala +8 %, putamen   | directions: Ruigrok 2014, Lotze
                    | +8 %, cerebellum +8 %, posterior cingulate +8 %,      | 2019; sizes: design, larger than
                    | thalamus -8 %, frontal pole -8 % (radius 14-26 mm),   | single-region literature effects
                    | plus a fixed smooth shape difference (0.5 mm RMS per  | so that together they stand in for
                    | sex); ventricles +15 % in males                       | the many distributed differences
sex x age           | atrophy rates x1.1 in males                           | design (Ritchie 2018)
individual          | brain-age gap N(0, min(2.5, 0.125 age)) y drives all  | design: sets the floor of any
                    | age effects                                           | predictor (report: "floor")
individual          | smooth random displacement (DCT, 5 frequencies/axis,  | design: residual anatomy after
                    | RMS 3.5 mm); cortical thickness sd 5 % + smooth field | affine registration; ventricles
                    | RMS 8 %; sulcal widening sd 25 % + 0.15 mm;           | vary several-fold between healthy
                    | myelination sd 15 %; ventricles ln-sd 0.35, L/R 0.10; | adults of one age; all independent
                    | MTL 5 %; regional 4 %; GM/WM/CSF intensity 3 %;       | of age and sex
                    | WM-GM contrast 5 %                                    |
registration        | per subject: rotation sd 1 deg, translation sd 1 mm,  | design
                    | scale sd 1.2 % per axis (x site factor)               |
site / scanner      | per `Site`: gain, GM/WM and CSF/WM ratio, bias field  | vendors / field strengths of the
                    | (DCT, 3 frequencies/axis), Rician noise, blur (per    | real cohorts (preset
                    | axis, e.g. 1.2 mm slices), skull-strip margin (mm),   | descriptions); sizes: design
                    | systematic shift/scale; per session gain sd 5 %,      |
                    | noise sd 10 %                                         |
site / age          | ABIDE sites recruit different age ranges (log-normal  | as ABIDE's sites do; the preset's
                    | profile per site); other presets: ages independent    | overall age distribution is kept
----------------------------------------------------------------------------------------------------------

Resolution: 1 mm volumes warp the template to every voxel (trilinear). 2/4 mm volumes are rendered directly
as block averages (the template-space image box-filtered over k^3 voxels and sampled at block centres,
noise with the block-averaged variance): within ~1 % of block-averaging the 1 mm volume (correlation > 0.98,
tested) at a third of the cost.

Determinism: every subject draws from its own `np.random.SeedSequence((crc32(preset), seed, index))`, so a
subject is the same whatever n, worker count or subset; demographics use a low-discrepancy sequence so any
contiguous range of subjects matches the preset's age and sex distributions. The voxel pipeline uses only
IEEE-exact numpy operations (+, -, *, /, sqrt, floor, comparisons: no BLAS, no SIMD transcendental functions,
no reductions over voxels) in a fixed order, plus scipy's running-sum box filter at 2/4 mm; scalar
parameters are rounded to 2^-32, images to int16, and gzip uses mtime 0 and no file name. So files are
byte-identical across runs, worker counts and machines with the same numpy/scipy/nibabel/zlib versions.
Caveats: another zlib build may compress the same bytes differently (the decompressed NIfTI is identical),
and numpy does not promise identical random streams across major versions.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import sys
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtl.data import MNI_AFFINE, MNI_SHAPE

__all__ = [
    "EFFECTS",
    "PRESETS",
    "REGIONS",
    "Effects",
    "Preset",
    "Simulated",
    "Site",
    "Subject",
    "block_average",
    "calibrate",
    "calibration_report",
    "output_affine",
    "output_shape",
    "participant_id",
    "preview",
    "sample_subject",
    "simulate",
    "simulate_subject",
]

TEMPLATE_AGE = 25.0  # ICBM152 2009: 152 adults aged 18.5-43.5 y
RESOLUTIONS = (1, 2, 4)


# ---------------------------------------------------------------------------------------------------
# Effect sizes


@dataclass(frozen=True)
class Effects:
    """Effect sizes of the generative model (see the module docstring for sources and design choices)."""

    # age: cortex and development (vs the 25-year-old template)
    child_myelination_mm: float = 1.6  # juxtacortical WM that still looks grey at 5 y, shape ((25-age)/20)^1.2
    thinning_rate_25: float = 0.0015  # per year at 25
    thinning_rate_80: float = 0.0045  # per year at 80 (linear in between, extrapolated after 80)
    sulcal_rate_child: float = 0.010  # mm/y of sulcal narrowing towards younger ages (below 25 y)
    sulcal_rate_25: float = 0.005  # mm/y of extra pial recession (sulcal widening) at 25
    sulcal_rate_80: float = 0.020  # ... at 80, linear in between, extrapolated after 80
    cortex_thickness_mm: float = 2.7  # typical cortical thickness: converts relative thickness changes to mm
    # age: lateral ventricles, d ln V / d age
    ventricle_rate_young: float = 0.010  # before 40 y (and in children)
    ventricle_rate_80: float = 0.045  # at and after 80, linear from 40
    # age: WM-GM contrast
    child_contrast_deficit: float = 0.35  # at 5 y, shape ((20-age)/15)^1.5
    contrast_decline: float = 0.003  # per year after 30
    # age: medial temporal lobe, rate rising linearly from 0 at 40 y to this at 80 y (per year)
    mtl_rate_80: float = 0.008
    # age: WM lesions (T1-hypointense), share of lesion-prone WM affected at 80 y, doubling every 8 y
    lesion_load_80: float = 0.08
    lesion_doubling_years: float = 8.0
    lesion_contrast: float = 0.35  # lesion intensity moves this share of the way from WM to CSF
    # sex
    icv_male_ratio: float = 1.09
    icv_sd: float = 0.08  # ln-sd within sex
    child_icv_deficit: float = 0.12  # at 5 y, shape ((16-age)/11)^2
    registration_residual: float = 0.35  # share of ln(native head scale) left after linear registration
    thickness_allometry: float = -0.7  # template-space thickness ~ s^this
    male_ventricles: float = 0.14  # ln
    sex_shape_mm: float = 0.5  # RMS of a fixed smooth displacement, + for males, - for females
    male_atrophy_rate: float = 1.1  # multiplies age-related cortex, sulcal, ventricle and MTL change
    # individual variation
    brain_age_sd_max: float = 2.5  # brain-age gap sd = min(max, per_year * age)
    brain_age_sd_per_year: float = 0.125
    thickness_sd: float = 0.05
    sulcal_sd: float = 0.25  # relative
    sulcal_sd_mm: float = 0.15  # additive
    myelination_sd: float = 0.15  # relative
    thickness_field_rms: float = 0.08
    ventricle_sd: float = 0.35
    ventricle_asymmetry_sd: float = 0.10
    mtl_sd: float = 0.05
    regional_sd: float = 0.04
    tissue_intensity_sd: float = 0.03
    contrast_sd: float = 0.05
    deformation_rms_mm: float = 3.5
    # registration residual (per subject)
    rotation_sd_deg: float = 1.0
    translation_sd_mm: float = 1.0
    scale_sd: float = 0.012
    # session jitter
    gain_sd: float = 0.05
    noise_jitter_sd: float = 0.10


EFFECTS = Effects()

# Regional sex differences: (name, MNI centre (x, y, z) mm, radius mm, male-female ln volume, bilateral).
REGIONS = (
    ("amygdala", (22.0, -4.0, -18.0), 18.0, 0.08, True),
    ("putamen", (25.0, 2.0, 2.0), 16.0, 0.08, True),
    ("cerebellum", (28.0, -62.0, -38.0), 26.0, 0.08, True),
    ("posterior_cingulate", (0.0, -48.0, 30.0), 20.0, 0.08, False),
    ("thalamus", (11.0, -18.0, 7.0), 14.0, -0.08, True),
    ("frontal_pole", (25.0, 58.0, 5.0), 22.0, -0.08, True),
)
MTL = ("hippocampus", (26.0, -22.0, -14.0), 16.0)


# ---------------------------------------------------------------------------------------------------
# Sites and presets


@dataclass(frozen=True)
class Site:
    """Scanner / acquisition / preprocessing of one site. Intensities are relative to white matter."""

    name: str
    share: float = 1.0  # relative share of the preset's subjects
    gain: float = 1.0  # stored intensity of WM / 1000
    gm_wm: float = 0.75  # GM/WM intensity ratio (template 0.75)
    csf_wm: float = 0.32  # CSF/WM intensity ratio (template 0.32)
    bias: float = 0.03  # sd of the multiplicative bias field
    noise: float = 0.025  # Rician noise sd relative to WM
    blur: tuple[float, float, float] = (0.5, 0.5, 0.5)  # Gaussian sigma (voxels) along x, y, z
    strip_mm: float = 0.0  # brain extraction vs the template mask (mm): > 0 keeps extracerebral CSF, < 0 cuts
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # systematic registration offset
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # systematic registration scale
    misregistration: float = 1.0  # multiplies the per-subject residual mis-registration sds
    age_centre: float = 0.0  # > 0: the site recruits mostly around this age (log-normal profile) ...
    age_spread: float = 0.0  # ... with this sd of ln(age); the preset's overall age distribution is kept


@dataclass(frozen=True)
class Preset:
    """A simulated cohort: age distribution (a Beta on [age_min, age_max] with the given mean and sd),
    male share, default size and sites."""

    name: str
    n: int
    age_min: float
    age_max: float
    age_mean: float
    age_sd: float
    male_share: float
    sites: tuple[Site, ...]
    description: str = ""

    def beta_params(self) -> tuple[float, float]:
        """Shape parameters (a, b) of the scaled Beta with the preset's mean and sd."""
        span = self.age_max - self.age_min
        m = (self.age_mean - self.age_min) / span
        v = (self.age_sd / span) ** 2
        k = m * (1 - m) / v - 1
        if not (0 < m < 1 and k > 0):
            raise ValueError(f"preset {self.name}: inconsistent age mean/sd/range")
        return m * k, (1 - m) * k


def _abide_sites() -> tuple[Site, ...]:
    """20 sites with acquisition parameters drawn once from a fixed generator (ABIDE I+II pooled ~20-30
    sites, mostly 3T, various vendors; children move more -> more blur and noise). Fixed, not seed-dependent."""
    rng = np.random.default_rng(20_160_301)
    r3 = lambda x: round(float(x), 3)  # noqa: E731
    sites = []
    for i in range(20):
        u = rng.random(18)  # one independent draw per parameter
        sites.append(
            Site(
                name=f"S{i + 1:02d}",
                share=r3(0.5 + u[0]),
                gain=r3(0.5 + 1.1 * u[1]),
                gm_wm=r3(0.72 + 0.08 * u[2]),
                csf_wm=r3(0.25 + 0.17 * u[3]),
                bias=r3(0.03 + 0.09 * u[4]),
                noise=r3(0.025 + 0.035 * u[5]),
                blur=(r3(0.4 + 0.6 * u[6]), r3(0.4 + 0.6 * u[7]), r3(0.4 + 0.6 * u[8])),
                strip_mm=r3(-0.5 + 1.5 * u[9]),
                shift_mm=(r3(3 * (u[10] - 0.5)), r3(3 * (u[11] - 0.5)), r3(2 * (u[12] - 0.5))),
                scale=(r3(1 + 0.03 * (u[13] - 0.5)), r3(1 + 0.03 * (u[14] - 0.5)), r3(1 + 0.03 * (u[15] - 0.5))),
                misregistration=1.15,
                age_centre=r3(math.exp(math.log(8.0) + u[16] * math.log(25.0 / 8.0))),
                age_spread=r3(0.15 + 0.45 * u[17]),
            )
        )
    return tuple(sites)


PRESETS: dict[str, Preset] = {
    "ukb": Preset(
        name="ukb",
        n=2000,  # the real pretraining set is 12,949 subjects; pass n for more
        age_min=45.0, age_max=80.0, age_mean=62.7, age_sd=7.5, male_share=0.48,
        sites=(Site("ukb", gain=1.0, gm_wm=0.75, csf_wm=0.32, bias=0.02, noise=0.025, blur=(0.45, 0.45, 0.45)),),
        description="UK Biobank-like: 3T Siemens Skyra MPRAGE 1mm, one site, bias-corrected, FSL pipeline",
    ),
    "oasis": Preset(
        name="oasis",
        n=1132,  # 355 + 91 + 686 sessions (paper-spec section 7); simulated as independent subjects
        age_min=42.66, age_max=95.66, age_mean=68.8, age_sd=8.8, male_share=0.397,
        sites=(
            Site("TrioTim", share=0.7, gain=0.7, gm_wm=0.71, csf_wm=0.27, bias=0.04, noise=0.03,
                 blur=(0.6, 0.6, 0.6), strip_mm=1.0, shift_mm=(0.0, 1.5, -1.5), scale=(1.0, 0.99, 1.015),
                 misregistration=1.2),
            Site("mMR", share=0.3, gain=1.2, gm_wm=0.78, csf_wm=0.36, bias=0.06, noise=0.04,
                 blur=(0.7, 0.7, 0.7), strip_mm=1.5, shift_mm=(0.5, 0.5, -2.5), scale=(1.01, 0.985, 1.02),
                 misregistration=1.2),
        ),
        description="OASIS-3-like: healthy controls, 3T Siemens TIM Trio and Biograph mMR (PET/MR) MPRAGE, "
                    "fsl_anat + FLIRT",
    ),
    "ixi": Preset(
        name="ixi",
        n=538,
        age_min=19.98, age_max=86.32, age_mean=47.8, age_sd=16.2, male_share=0.448,
        sites=(
            Site("Guys", share=0.56, gain=1.4, gm_wm=0.80, csf_wm=0.38, bias=0.10, noise=0.045,
                 blur=(0.9, 0.5, 0.5), strip_mm=-0.5, shift_mm=(1.0, -1.0, 2.0), scale=(1.01, 1.0, 0.985)),
            Site("HH", share=0.34, gain=1.1, gm_wm=0.77, csf_wm=0.34, bias=0.08, noise=0.035,
                 blur=(0.9, 0.5, 0.5), strip_mm=0.5, shift_mm=(-1.0, 0.5, 1.0), scale=(0.99, 1.01, 1.0)),
            Site("IOP", share=0.10, gain=0.55, gm_wm=0.82, csf_wm=0.40, bias=0.12, noise=0.05,
                 blur=(0.9, 0.6, 0.6), strip_mm=1.0, shift_mm=(0.5, 2.0, -1.0), scale=(1.0, 0.985, 1.01)),
        ),
        description="IXI-like: Guys (Philips 1.5T), HH (Philips 3T), IOP (GE 1.5T); 1.2 mm sagittal slices",
    ),
    "abide": Preset(
        name="abide",
        n=1341,
        age_min=5.22, age_max=56.2, age_mean=13.46, age_sd=6.27, male_share=0.743,
        sites=_abide_sites(),
        description="ABIDE I+II-like: children to adults, 74 % male, 20 sites with varied scanners",
    ),
}


# ---------------------------------------------------------------------------------------------------
# Subjects


@dataclass(frozen=True)
class Subject:
    """One simulated participant: the labels written to participants.tsv and the latent parameters."""

    preset: str
    seed: int
    index: int
    participant_id: str
    age: float
    sex: int  # 0 = female, 1 = male
    site: str
    latent: dict = dataclasses.field(default_factory=dict, compare=False)


# Raised when the same (preset, n, seed) gives other subjects: 2 = sex drawn with the golden-ratio step.
SIMULATOR_VERSION = 2

_R3 = 1.2207440846057596  # plastic-like constant phi_3 (x^4 = x + 1): R3 low-discrepancy sequence (Roberts 2018)
# Steps of the (age, sex, site) sequences. Sex steps by the golden ratio, the best-distributed 1-D sequence: R3's
# own 1/phi_3^2 (0.671, close to 2/3) repeats a 3-subject pattern for dozens of subjects, which made windows of
# ~30 subjects a third or two thirds male (sd of the male share 0.11 at n=32, more than independent draws' 0.09;
# now 0.02), while age and sex stay as uncorrelated as independent draws.
_ALPHA = (1 / _R3, (math.sqrt(5) - 1) / 2, 1 / _R3**3)


def _q(x: float) -> float:
    """Round a scalar parameter to a multiple of 2^-32 (makes rare libm last-bit differences harmless)."""
    return round(float(x) * 4294967296.0) / 4294967296.0


def _preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None


def _seed_sequence(preset: Preset, seed: int, index: int) -> np.random.SeedSequence:
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be >= 0")
    return np.random.SeedSequence((zlib.crc32(preset.name.encode()), int(seed), int(index)))


def participant_id(preset: str | Preset, index: int) -> str:
    return f"sub-{_preset(preset).name}{index + 1:05d}"


def _brain_age_sd(age: float) -> float:
    return min(EFFECTS.brain_age_sd_max, EFFECTS.brain_age_sd_per_year * age)


def sample_subject(
    preset: str | Preset,
    index: int,
    seed: int = 0,
    *,
    age: float | None = None,
    sex: int | None = None,
    site: str | None = None,
) -> Subject:
    """Labels and latent parameters of subject `index` (0-based). `age`, `sex`, `site` override the
    demographic draw and leave everything else about the individual unchanged (for controlled contrasts)."""
    from scipy.stats import beta as beta_dist

    p = _preset(preset)
    ss = _seed_sequence(p, seed, index)
    # Demographics from a low-discrepancy sequence with a per-(preset, seed) random start: any contiguous
    # range of subjects matches the preset's age distribution, male share and site shares closely.
    start = np.random.default_rng(np.random.SeedSequence((zlib.crc32(p.name.encode()), int(seed)))).random(3)
    u = [(float(start[d]) + (index + 1) * _ALPHA[d]) % 1.0 for d in range(3)]
    a, b = p.beta_params()
    drawn_age = round(p.age_min + (p.age_max - p.age_min) * float(beta_dist.ppf(u[0], a, b)), 2)
    if age is None:
        age = drawn_age
    if sex is None:
        sex = int(u[1] < p.male_share)
    if site is None:  # drawn given the (drawn) age, so sites can recruit different age ranges (as ABIDE's do);
        # an overridden age keeps the individual's site
        w = [s.share * (math.exp(-0.5 * (math.log(drawn_age / s.age_centre) / s.age_spread) ** 2)
                        if s.age_centre > 0 else 1.0) for s in p.sites]
        cum = np.cumsum(np.array(w) / sum(w))
        site = p.sites[min(int(np.searchsorted(cum, u[2], side="right")), len(p.sites) - 1)].name
    if site not in {s.name for s in p.sites}:
        raise ValueError(f"preset {p.name} has no site {site!r}")
    if sex not in (0, 1):
        raise ValueError(f"sex must be 0 (female) or 1 (male), got {sex!r}")
    age = float(age)

    e = EFFECTS
    anat = np.random.default_rng(ss.spawn(1)[0])
    z = anat.standard_normal(16)  # fixed length: adding latents must not shift others
    brain_age = age + _brain_age_sd(age) * float(z[0])
    child = max(0.0, (16.0 - age) / 11.0) ** 2 * e.child_icv_deficit
    ln_icv = (math.log(e.icv_male_ratio) if sex else 0.0) + e.icv_sd * float(z[1]) + math.log(1.0 - child)
    head_scale = math.exp(ln_icv / 3.0)  # native linear head scale vs the template (female adult mean = 1)
    latent = {
        "brain_age": _q(brain_age),
        "head_scale": _q(head_scale),
        "thickness": _q(_thickness(brain_age, sex) * head_scale**e.thickness_allometry
                        * (1.0 + e.thickness_sd * float(z[2]))),
        "sulcal_mm": _q(_sulcal_mm(brain_age, sex) * (1.0 + e.sulcal_sd * float(z[11]))
                        + e.sulcal_sd_mm * float(z[12])),
        "myelination_mm": _q(_myelination_mm(brain_age) * math.exp(e.myelination_sd * float(z[13]))),
        "ventricle_ln": _q(_ventricle_ln(brain_age, sex) + e.ventricle_sd * float(z[3])),
        "ventricle_asym": _q(e.ventricle_asymmetry_sd * float(z[4])),
        "contrast": _q(_contrast(brain_age) * math.exp(e.contrast_sd * float(z[5]))),
        "mtl_ln": _q(_mtl_ln(brain_age, sex) + e.mtl_sd * float(z[6])),
        "lesion_load": _q(_lesion_load(brain_age) * math.exp(0.5 * float(z[7]))),
        "gm": _q(math.exp(e.tissue_intensity_sd * float(z[8]))),
        "wm": _q(math.exp(e.tissue_intensity_sd * float(z[9]))),
        "csf": _q(math.exp(e.tissue_intensity_sd * float(z[10]))),
    }
    return Subject(p.name, int(seed), int(index), participant_id(p, index), age, int(sex), site, latent)


def _thickness(age: float, sex: int) -> float:
    """Relative cortical thickness vs the template (25 y)."""
    e = EFFECTS
    if age < TEMPLATE_AGE:
        return 1.0
    d = age - TEMPLATE_AGE
    slope = (e.thinning_rate_80 - e.thinning_rate_25) / 55.0
    loss = e.thinning_rate_25 * d + 0.5 * slope * d * d
    return 1.0 - loss * (e.male_atrophy_rate if sex else 1.0)


def _myelination_mm(age: float) -> float:
    """Depth (mm) of juxtacortical WM that is not yet myelinated (appears grey: thicker cortex in T1w)."""
    if age >= TEMPLATE_AGE:
        return 0.0
    return EFFECTS.child_myelination_mm * (min(TEMPLATE_AGE - age, 20.0) / 20.0) ** 1.2


def _sulcal_mm(age: float, sex: int) -> float:
    """Pial recession (mm) beyond cortical thinning: sulcal widening / gyral atrophy vs the template."""
    e = EFFECTS
    if age < TEMPLATE_AGE:
        return -e.sulcal_rate_child * (TEMPLATE_AGE - age)
    d = age - TEMPLATE_AGE
    return (e.sulcal_rate_25 * d + 0.5 * (e.sulcal_rate_80 - e.sulcal_rate_25) / 55.0 * d * d) * (
        e.male_atrophy_rate if sex else 1.0)


def _ventricle_ln(age: float, sex: int) -> float:
    """ln(lateral ventricle volume / template's), without individual variation."""
    e = EFFECTS
    r0, r80 = e.ventricle_rate_young, e.ventricle_rate_80
    if age <= 40.0:
        ln = r0 * (age - TEMPLATE_AGE)
    else:
        a = min(age, 80.0)
        ln = r0 * 15.0 + r0 * (a - 40.0) + 0.5 * (r80 - r0) / 40.0 * (a - 40.0) ** 2
        ln += r80 * max(0.0, age - 80.0)
    if ln > 0 and sex:
        ln *= e.male_atrophy_rate
    return ln + (e.male_ventricles if sex else 0.0)


def _contrast(age: float) -> float:
    e = EFFECTS
    c = 1.0
    if age < 20.0:
        c -= e.child_contrast_deficit * (min(20.0 - age, 15.0) / 15.0) ** 1.5
    if age > 30.0:
        c -= e.contrast_decline * (age - 30.0)
    return c


def _mtl_ln(age: float, sex: int) -> float:
    d = max(0.0, age - 40.0)
    return -0.5 * EFFECTS.mtl_rate_80 / 40.0 * d * d * (EFFECTS.male_atrophy_rate if sex else 1.0)


def _lesion_load(age: float) -> float:
    if age <= 40.0:
        return 0.0
    e = EFFECTS
    return e.lesion_load_80 * 2.0 ** ((age - 80.0) / e.lesion_doubling_years)


# ---------------------------------------------------------------------------------------------------
# Atlas: the template and everything derived from it (computed once per process, shared with workers)

_BORDER = 6  # zero border (voxels) of the template box: room for loose skull strips and interpolation
_MARGIN = 12  # output voxels farther than this (voxels) from the template brain are never sampled
_DEFORM_K = 5  # DCT frequencies per axis of the individual deformation
_BIAS_K = 3  # DCT frequencies per axis of the bias field
_THICK_K = 4  # DCT frequencies per axis of the individual cortical-thickness field
_LESION_K = 10  # DCT frequencies per axis of the lesion field (over the ventricle box)
_RECESS_RANGE = (-1.0, 4.5)  # mm: pial recession is clipped to this range (children: negative)
_GROW_MAX = 2.0  # mm: juxtacortical WM -> GM growth is clipped to this
_STRIP_MAX = 3.0  # mm: |Site.strip_mm| at most this


def _smoothstep(t: np.ndarray) -> np.ndarray:
    """Cubic Hermite step 0 -> 1 on [0, 1] (a polynomial, so bit-exact on every machine)."""
    t = np.clip(t, np.float32(0), np.float32(1))
    return t * t * (np.float32(3) - np.float32(2) * t)


def _to_reference(img) -> np.ndarray:
    """A nilearn template image on the reference grid by an exact flip + integer shift (no interpolation)."""
    ref_to_img = np.linalg.inv(img.affine) @ MNI_AFFINE
    rot, trans = ref_to_img[:3, :3], ref_to_img[:3, 3]
    if not (np.allclose(rot, np.diag(np.diag(np.round(rot)))) and np.all(np.abs(np.diag(rot)).round() == 1)
            and np.allclose(trans, np.round(trans))):
        raise RuntimeError("nilearn's MNI152 template is not on a 1mm lattice aligned with the reference grid")
    data = np.asarray(img.dataobj, dtype=np.float32)
    slices = []
    for d in range(3):
        s, t, n = int(round(rot[d, d])), int(round(trans[d])), MNI_SHAPE[d]
        first, last = t, t + s * (n - 1)
        if min(first, last) < 0 or max(first, last) >= data.shape[d]:
            raise RuntimeError("nilearn's MNI152 template does not cover the reference grid")
        slices.append(slice(first, last + s if last + s >= 0 else None, s))
    return np.ascontiguousarray(data[tuple(slices)])


def _voxel(mm: Sequence[float]) -> np.ndarray:
    """MNI mm -> reference-grid voxel coordinates."""
    return (np.linalg.inv(MNI_AFFINE) @ np.array([*mm, 1.0]))[:3]


@dataclass
class _Atlas:
    t_lo: tuple[int, int, int]  # reference-grid voxel of template-box element (0, 0, 0)
    p_gm: np.ndarray  # template box, float32
    p_wm: np.ndarray
    p_csf: np.ndarray
    residual: np.ndarray  # template T1 minus its 3-class model (deep-GM nuance etc.), WM = 1 units
    mask: np.ndarray  # template brain mask (0/1)
    strip: np.ndarray  # signed distance (mm) to the brain-mask surface, positive inside
    pial: np.ndarray  # signed distance (mm) into tissue from CSF / outside (ventricles count as tissue)
    wm_depth: np.ndarray  # signed distance (mm) into white matter
    band: np.ndarray  # flat template-box indices where the cortical level sets can move (see _RECESS_RANGE)
    band_pial: np.ndarray  # pial, wm_depth and their step values at the band
    band_wmd: np.ndarray
    band_occ: np.ndarray  # smoothstep(0.5 - pial)
    band_wocc: np.ndarray  # smoothstep(0.5 - wm_depth)
    s_band: np.ndarray  # flat indices where the skull strip can move (|strip| <= 3.5 mm)
    s_dist: np.ndarray  # strip distance at s_band
    v_slices: tuple[slice, slice, slice]  # ventricle box within the template box
    v_dist: np.ndarray  # signed distance (mm) to the lateral ventricles, negative inside
    v_left: np.ndarray  # ventricle-box voxels in the left hemisphere
    v_prone: np.ndarray  # lesion-prone (periventricular WM) weight in the ventricle box
    v_table: tuple[np.ndarray, np.ndarray]  # (dilation mm, relative ventricle volume)
    o_lo: tuple[int, int, int]  # 1mm output box in the reference grid
    o_shape: tuple[int, int, int]
    o_index: np.ndarray  # flat indices (output box) of the voxels that can receive brain
    centre: np.ndarray  # brain centre, reference voxel coordinates
    template_gm: float  # GM intensity of the template (WM = 1)


_ATLAS: _Atlas | None = None


def _atlas() -> _Atlas:
    """The atlas, built on first use and kept for the life of the process (workers receive the parent's)."""
    global _ATLAS
    if _ATLAS is None:
        _ATLAS = _build_atlas()
    return _ATLAS


def _signed_distance(inside: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """Smoothed signed Euclidean distance (mm) to the surface of `inside`, positive inside."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(inside) - ndimage.distance_transform_edt(~inside)
    return ndimage.gaussian_filter(d.astype(np.float32), sigma)


def _build_atlas() -> _Atlas:
    from nilearn import datasets
    from scipy import ndimage

    ref = {
        "t1": _to_reference(datasets.load_mni152_template(resolution=1)),
        "gm": _to_reference(datasets.load_mni152_gm_template(resolution=1)),
        "wm": _to_reference(datasets.load_mni152_wm_template(resolution=1)),
        "mask": (_to_reference(datasets.load_mni152_brain_mask(resolution=1)) > 0.5).astype(np.float32),
    }
    nz = np.argwhere(ref["mask"] > 0)
    b_lo, b_hi = nz.min(0), nz.max(0) + 1
    t_lo = tuple(int(v) - _BORDER for v in b_lo)
    t_hi = tuple(int(v) + _BORDER for v in b_hi)
    t_shape = tuple(h - lo for lo, h in zip(t_lo, t_hi, strict=True))

    def box(a: np.ndarray) -> np.ndarray:  # crop to the template box, zero outside the reference grid
        out = np.zeros(t_shape, dtype=np.float32)
        src = tuple(slice(max(lo, 0), min(h, n)) for lo, h, n in zip(t_lo, t_hi, MNI_SHAPE, strict=True))
        dst = tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(src, t_lo, strict=True))
        out[dst] = a[src]
        return out

    t1, gm, wm, mask = (box(ref[k]) for k in ("t1", "gm", "wm", "mask"))
    # The template brain is cut by the grid's lower face (z = -72 mm, brainstem and cerebellum). Continue it
    # below by repeating the lowest slice, so that registration shifts reveal brainstem, not a hole or CSF.
    for d in range(3):
        if t_lo[d] < 0:
            index = [slice(None)] * 3
            index[d] = slice(-t_lo[d], -t_lo[d] + 1)
            edge = [a[tuple(index)].copy() for a in (t1, gm, wm, mask)]
            index[d] = slice(0, -t_lo[d])
            for a, e in zip((t1, gm, wm, mask), edge, strict=True):
                a[tuple(index)] = e
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0, 1)
    # tissue intensities of the template (medians over pure voxels); WM = 1
    mu = {name: float(np.median(t1[p > 0.9])) for name, p in (("gm", gm), ("wm", wm), ("csf", csf))}
    t1 /= np.float32(mu["wm"])
    mu = {k: v / mu["wm"] for k, v in mu.items()}
    residual = (t1 - (np.float32(mu["gm"]) * gm + np.float32(mu["wm"]) * wm + np.float32(mu["csf"]) * csf)) * mask

    # lateral ventricles: the CSF component that contains the ventricular bodies
    labels, _ = ndimage.label(csf > 0.5)
    seeds = [tuple(int(v) for v in np.round(_voxel(mm)) - np.array(t_lo))
             for mm in ((-9, -9, 20), (9, -9, 20), (-8, 9, 20), (8, 9, 20))]
    ids = {int(labels[s]) for s in seeds} - {0}
    sizes = np.bincount(labels.ravel())
    if not ids or not all(5_000 < sizes[i] < 60_000 for i in ids):
        raise RuntimeError("could not find the lateral ventricles in the template")
    vent = np.isin(labels, list(ids))
    vz = np.argwhere(vent)
    v_slices = tuple(slice(int(max(a - 16, 0)), int(b + 17)) for a, b in zip(vz.min(0), vz.max(0), strict=True))
    v_dist = -_signed_distance(vent[v_slices])
    v_dist[mask[v_slices] < 0.5] = 1e3  # never grow the ventricles out of the brain
    x_ref = np.arange(v_slices[0].start, v_slices[0].stop) + t_lo[0]
    v_left = np.broadcast_to((x_ref > _voxel((0.0, 0.0, 0.0))[0])[:, None, None], v_dist.shape).copy()
    v_prone = (wm[v_slices] * _smoothstep((np.float32(14) - v_dist) / np.float32(8))).astype(np.float32)
    deltas = np.arange(-3.0, 16.01, 0.25)
    vols = np.array([float(np.sum(_smoothstep(np.float32(d + 0.5) - v_dist), dtype=np.float64)) for d in deltas])
    vols /= float(np.sum(_smoothstep(np.float32(0.5) - v_dist), dtype=np.float64))
    if not np.all(np.diff(vols) > 0):
        raise RuntimeError("ventricle volume table is not monotonic")

    pial = _signed_distance(((gm + wm) > 0.75) | vent)
    wm_depth = _signed_distance(wm > 0.5)
    strip = _signed_distance(mask > 0.5)
    lo, hi = _RECESS_RANGE
    band = np.flatnonzero(((pial > lo - 0.5) & (pial < hi + 0.5)) | ((wm_depth > -0.5) & (wm_depth < _GROW_MAX + 0.5)))
    s_band = np.flatnonzero(np.abs(strip) <= _STRIP_MAX + 0.5)
    band_pial, band_wmd = pial.reshape(-1)[band], wm_depth.reshape(-1)[band]

    o_lo = tuple(int(max(0, v - _MARGIN)) for v in b_lo)
    o_hi = tuple(int(min(n, v + _MARGIN)) for v, n in zip(b_hi, MNI_SHAPE, strict=True))
    o_shape = tuple(h - lo for lo, h in zip(o_lo, o_hi, strict=True))
    o_mask = ref["mask"][tuple(slice(lo, h) for lo, h in zip(o_lo, o_hi, strict=True))] > 0
    # within _MARGIN voxels (Euclidean) of the brain, or slightly more: chessboard <= M and taxicab <= sqrt(3) M
    near = (ndimage.distance_transform_cdt(~o_mask, metric="chessboard") <= _MARGIN) & (
        ndimage.distance_transform_cdt(~o_mask, metric="taxicab") <= int(math.sqrt(3) * _MARGIN))

    return _Atlas(
        t_lo=t_lo, p_gm=gm, p_wm=wm, p_csf=csf, residual=residual.astype(np.float32), mask=mask,
        strip=strip, pial=pial, wm_depth=wm_depth, band=band.astype(np.int32), band_pial=band_pial,
        band_wmd=band_wmd, band_occ=_smoothstep(np.float32(0.5) - band_pial),
        band_wocc=_smoothstep(np.float32(0.5) - band_wmd), s_band=s_band.astype(np.int32),
        s_dist=strip.reshape(-1)[s_band], v_slices=v_slices, v_dist=np.ascontiguousarray(v_dist),
        v_left=v_left, v_prone=v_prone, v_table=(deltas, vols), o_lo=o_lo, o_shape=o_shape,
        o_index=np.flatnonzero(near).astype(np.int32), centre=np.round((b_lo + b_hi - 1) / 2.0),
        template_gm=mu["gm"],
    )


# ---------------------------------------------------------------------------------------------------
# Rendering one subject


def _dct_basis(pos: np.ndarray, k: int, total: int) -> np.ndarray:
    """DCT-II basis cos(pi f (pos + 0.5) / total), f = 0..k-1, at voxel positions `pos`: (len(pos), k)."""
    f = np.arange(k, dtype=np.float64)
    return np.cos(np.pi * (np.asarray(pos, np.float64)[:, None] + 0.5) * f[None, :] / total).astype(np.float32)


def _dct_coefs(rng: np.random.Generator, k: int, ncomp: int = 1) -> np.ndarray:
    """Random DCT coefficients (ncomp, k, k, k) with sd ~ 1/|f|^2 (no constant term), scaled so the field
    has unit expected mean square over a full period."""
    f = np.arange(k, dtype=np.float64)
    f2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    sd = np.where(f2 > 0, 1.0 / np.maximum(f2, 1.0), 0.0)
    m = np.where(f > 0, 0.5, 1.0)  # mean of cos^2 over the grid
    power = float(np.sum(sd**2 * m[:, None, None] * m[None, :, None] * m[None, None, :]))
    c = rng.standard_normal((ncomp, k, k, k)) * (sd / math.sqrt(power))
    return np.round(c * 2.0**32) / 2.0**32


def _dct_field(c: np.ndarray, bx: np.ndarray, by: np.ndarray, bz: np.ndarray) -> np.ndarray:
    """sum_{a,b,c} C[a,b,c] bx[:,a] by[:,b] bz[:,c] by explicit multiply-adds in a fixed order (no BLAS)."""
    k = c.shape[0]
    c = c.astype(np.float32)
    out = np.zeros((bx.shape[0], by.shape[0], bz.shape[0]), dtype=np.float32)
    for a in range(k):
        plane = np.zeros((by.shape[0], bz.shape[0]), dtype=np.float32)
        for b in range(k):
            line = np.zeros(bz.shape[0], dtype=np.float32)
            for j in range(k):
                line += c[a, b, j] * bz[:, j]
            plane += by[:, b, None] * line[None, :]
        out += bx[:, a, None, None] * plane[None, :, :]
    return out


def _mat3(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j] for j in range(3)] for i in range(3)]


def _rotation(rx: float, ry: float, rz: float) -> list[list[float]]:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]]
    my = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]]
    mz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]]
    return _mat3(mz, _mat3(my, mx))


def _site(preset: Preset, name: str) -> Site:
    return next(s for s in preset.sites if s.name == name)


def _tissues(subject: Subject, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Template-space anatomy of the subject: GM, WM, CSF probabilities, residual texture, lesions."""
    at, e, lat = _atlas(), EFFECTS, subject.latent
    f32 = np.float32
    shape = at.p_gm.shape
    # individual cortical-thickness field around the subject's mean relative thickness
    bases = [_dct_basis(np.arange(shape[d]) + at.t_lo[d], _THICK_K, MNI_SHAPE[d]) for d in range(3)]
    field = _dct_field(_dct_coefs(rng, _THICK_K)[0], *bases)
    rms = f32(e.thickness_field_rms)
    band = at.band
    fb = field.reshape(-1).take(band)
    h = f32(lat["thickness"]) * (f32(1) + rms * fb)
    # pial side: the CSF level set moves into tissue by `recess` mm (cortical thinning + sulcal widening),
    # or back into CSF when negative (children: narrower sulci). Only voxels in the band can change.
    recess = f32(e.cortex_thickness_mm) * np.maximum(f32(1) - h, 0)
    recess += f32(lat["sulcal_mm"]) * (f32(1) + rms * fb)
    recess = np.clip(recess, f32(_RECESS_RANGE[0]), f32(_RECESS_RANGE[1]))
    occ1 = _smoothstep(recess + f32(0.5) - at.band_pial)
    p_gm, p_wm, p_csf = (x.reshape(-1).take(band) for x in (at.p_gm, at.p_wm, at.p_csf))
    tissue = p_gm + p_wm
    moved = np.minimum(np.maximum(occ1 - at.band_occ, 0), tissue)
    back = np.minimum(np.maximum(at.band_occ - occ1, 0), p_csf)
    keep = f32(1) - moved / np.maximum(tissue, f32(1e-6))
    gm_b = p_gm * keep + back
    wm_b = p_wm * keep
    csf_b = p_csf + moved - back
    # WM side: a thicker cortex (children) turns juxtacortical WM into GM
    grow = f32(e.cortex_thickness_mm) * np.maximum(h - f32(1), 0)
    grow += f32(lat["myelination_mm"]) * (f32(1) + rms * fb)
    grow = np.minimum(grow, f32(_GROW_MAX))
    conv = p_wm * (_smoothstep(grow + f32(0.5) - at.band_wmd) - at.band_wocc)
    conv = np.minimum(np.maximum(conv, 0), wm_b)
    gm_b += conv
    wm_b -= conv
    gm, wm, csf, residual = at.p_gm.copy(), at.p_wm.copy(), at.p_csf.copy(), at.residual.copy()
    gm.reshape(-1)[band] = gm_b
    wm.reshape(-1)[band] = wm_b
    csf.reshape(-1)[band] = csf_b
    residual.reshape(-1)[band] *= keep

    # lateral ventricles: dilate (or erode) the template ventricles to the subject's volume
    vs = at.v_slices
    deltas, vols = at.v_table
    d_left = _q(np.interp(math.exp(lat["ventricle_ln"] + lat["ventricle_asym"]), vols, deltas))
    d_right = _q(np.interp(math.exp(lat["ventricle_ln"] - lat["ventricle_asym"]), vols, deltas))
    delta = np.where(at.v_left, f32(d_left), f32(d_right))
    old = _smoothstep(f32(0.5) - at.v_dist)
    new = _smoothstep(delta + f32(0.5) - at.v_dist)
    g, wv, c = gm[vs], wm[vs], csf[vs]
    tissue = g + wv
    moved = np.minimum(np.maximum(new - old, 0), tissue)
    keep = f32(1) - moved / np.maximum(tissue, f32(1e-6))
    back = np.minimum(np.maximum(old - new, 0), c)
    g *= keep
    wv *= keep
    wv += back
    c += moved - back
    residual[vs] *= keep

    # periventricular T1-hypointense lesions (share of a voxel's WM that is lesioned)
    vshape = at.v_dist.shape
    coefs = _dct_coefs(rng, _LESION_K)[0]
    load = lat["lesion_load"]
    lesion = np.zeros(vshape, dtype=np.float32)
    if load > 1e-4:
        from scipy.special import ndtri

        lf = _dct_field(coefs, *(_dct_basis(np.arange(vshape[d]), _LESION_K, vshape[d]) for d in range(3)))
        thr = f32(_q(ndtri(1.0 - min(load, 0.9))))
        lesion = at.v_prone * _smoothstep((lf - thr) * f32(2) + f32(0.5))
    return {"gm": gm, "wm": wm, "csf": csf, "residual": residual, "lesion": lesion}


def _compose(subject: Subject, site: Site, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Template-space image (WM = 1 units) and skull-strip indicator (soft, 0..1)."""
    at, e, lat = _atlas(), EFFECTS, subject.latent
    f32 = np.float32
    t = _tissues(subject, rng)
    gm, wm, csf = t["gm"], t["wm"], t["csf"]
    contrast = f32((1.0 - site.gm_wm) * lat["contrast"])
    mu_wm = f32(lat["wm"])
    mu_gm = f32((1.0 - contrast) * lat["gm"])
    mu_csf = f32(site.csf_wm * lat["csf"])
    # the residual texture follows the subject's GM-WM contrast
    image = mu_gm * gm + mu_wm * wm + mu_csf * csf + f32(contrast / (1.0 - at.template_gm)) * t["residual"]
    vs = at.v_slices
    image[vs] -= f32(e.lesion_contrast) * (mu_wm - mu_csf) * t["lesion"] * wm[vs]
    # skull strip: the site's brain extraction keeps `strip_mm` more (or less) than the template mask;
    # what a loose strip adds outside the template brain is extracerebral CSF
    if abs(site.strip_mm) > _STRIP_MAX:
        raise ValueError(f"site {site.name}: |strip_mm| must be <= {_STRIP_MAX}")
    strip = (at.strip > 0).astype(np.float32)
    s_b = _smoothstep(at.s_dist + f32(site.strip_mm + 0.5))
    strip.reshape(-1)[at.s_band] = s_b
    image.reshape(-1)[at.s_band] += mu_csf * np.maximum(s_b - at.mask.reshape(-1).take(at.s_band), 0)
    return image, strip


def _pack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two float32 arrays interleaved, viewed as float64 so one gather fetches both."""
    packed = np.empty(a.shape + (2,), dtype=np.float32)
    packed[..., 0] = a
    packed[..., 1] = b
    return packed.reshape(-1).view(np.float64)


def _bump(phi: list[np.ndarray], coords: Sequence[np.ndarray], centre: np.ndarray, radius: float,
          ln_volume: float) -> None:
    """Add a local volume change exp(ln_volume) (at the centre, smoothly to 0 at `radius`) to phi, in place."""
    amp = _q(math.exp(-ln_volume / 3.0) - 1.0)
    sl, local = [], []
    for d in range(3):
        a = int(np.searchsorted(coords[d], centre[d] - radius, side="right"))
        b = int(np.searchsorted(coords[d], centre[d] + radius, side="left"))
        if b <= a:
            return
        sl.append(slice(a, b))
        local.append(((coords[d][a:b] - centre[d]) / radius).astype(np.float32))
    x, y, z = local[0][:, None, None], local[1][None, :, None], local[2][None, None, :]
    t = np.maximum(np.float32(1) - (x * x + y * y + z * z), 0)
    weight = np.float32(amp * radius) * t * t * t
    for d, u in enumerate((x, y, z)):
        phi[d][tuple(sl)] += weight * u


def _sex_shape() -> np.ndarray:
    """The fixed direction of the male-female shape difference: DCT coefficients of a smooth displacement with
    unit RMS per component, from a constant seed (the same for every preset and dataset seed)."""
    return _dct_coefs(np.random.default_rng(19_770_301), _DEFORM_K, 3)


def _warp(subject: Subject, site: Site, rng: np.random.Generator, coords: Sequence[np.ndarray],
          offset: float = 0.0) -> list[np.ndarray]:
    """Backward map phi: output reference-voxel coordinates (grid of `coords`) -> template-box coordinates
    (minus `offset`), as 3 float32 arrays."""
    at, e, lat = _atlas(), EFFECTS, subject.latent
    # linear part: residual head scale, per-site systematic and per-subject residual mis-registration
    z = rng.standard_normal(9)
    m = site.misregistration
    resid = lat["head_scale"] ** e.registration_residual
    scale = [_q(resid * site.scale[d] * (1.0 + m * e.scale_sd * float(z[d]))) for d in range(3)]
    rot = _rotation(*(math.radians(m * e.rotation_sd_deg * float(z[3 + d])) for d in range(3)))
    shift_mm = [site.shift_mm[d] + m * e.translation_sd_mm * float(z[6 + d]) for d in range(3)]
    shift = [_q(-shift_mm[0]), _q(shift_mm[1]), _q(shift_mm[2])]  # mm -> voxels (LAS: x flipped)
    # phi(x) = c + S^-1 R^T (x - c - t) + u(x)
    a = [[_q(rot[j][i] / scale[i]) for j in range(3)] for i in range(3)]
    c = at.centre
    rel = [np.asarray(coords[d], np.float64) - c[d] - shift[d] for d in range(3)]
    deform = _dct_coefs(rng, _DEFORM_K, 3) * (e.deformation_rms_mm / math.sqrt(3.0))
    deform += _sex_shape() * (e.sex_shape_mm / math.sqrt(3.0) * (2.0 * subject.sex - 1.0))
    bases = [_dct_basis(coords[d], _DEFORM_K, MNI_SHAPE[d]) for d in range(3)]
    phi = []
    for i in range(3):
        comp = _dct_field(deform[i], *bases)
        comp += (a[i][0] * rel[0] + (c[i] - at.t_lo[i] - offset)).astype(np.float32)[:, None, None]
        comp += (a[i][1] * rel[1]).astype(np.float32)[None, :, None]
        comp += (a[i][2] * rel[2]).astype(np.float32)[None, None, :]
        phi.append(comp)
    # local volume changes: sex (regional differences) and age (medial temporal lobe)
    zr = rng.standard_normal((len(REGIONS), 2))
    mid = _voxel((0.0, 0.0, 0.0))[0]
    for r, (_, mm, radius, male, bilateral) in enumerate(REGIONS):
        v = _voxel(mm)
        for side in range(2 if bilateral else 1):
            centre = np.array([2 * mid - v[0], v[1], v[2]]) if side else v
            ln = male * (subject.sex - 0.5) + e.regional_sd * float(zr[r, side])
            _bump(phi, coords, centre, radius, _q(ln))
    v = _voxel(MTL[1])
    zm = rng.standard_normal(2)
    for side in range(2):
        centre = np.array([2 * mid - v[0], v[1], v[2]]) if side else v
        _bump(phi, coords, centre, MTL[2], _q(lat["mtl_ln"] + 0.5 * e.mtl_sd * float(zm[side])))
    return phi


def _sample(packed: np.ndarray, shape: Sequence[int], phi: list[np.ndarray],
            index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear interpolation of the packed pair of template-box arrays at phi (at flat `index` of phi's
    grid, or everywhere). Outside the template box both values are 0."""
    f32 = np.float32
    strides = (shape[1] * shape[2], shape[2], 1)
    base, fr = None, []
    for d in range(3):
        p = phi[d].reshape(-1)
        p = p.take(index) if index is not None else p
        p = np.clip(p, f32(0), f32(shape[d] - 1.001))  # the box has a zero border, so clipping reads zeros
        i = p.astype(np.int32)  # p >= 0: truncation is floor
        fr.append(p - i.astype(np.float32))
        i *= strides[d]
        base = i if base is None else base + i
    fx, fy, fz = fr
    gx, gy, gz = f32(1) - fx, f32(1) - fy, f32(1) - fz
    out = np.zeros((base.size, 2), dtype=np.float32)
    for ox, wx in ((0, gx), (1, fx)):
        for oy, wy in ((0, gy), (1, fy)):
            wxy = wx * wy
            for oz, wz in ((0, gz), (1, fz)):
                vals = packed.take(base + (ox * strides[0] + oy * strides[1] + oz)).view(np.float32)
                out += vals.reshape(-1, 2) * (wxy * wz)[:, None]
    return out[:, 0], out[:, 1]


def _blur(x: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Separable Gaussian-like blur by repeated 3-tap [w, 1-2w, w] passes (variance 2w each), in place."""
    for d, s in enumerate(sigma):
        var = float(s) ** 2
        if var < 1e-6:
            continue
        passes = max(1, math.ceil(var / 0.5))
        w = np.float32(_q(var / passes / 2.0))
        for _ in range(passes):
            xs = np.moveaxis(x, d, 0)
            lap = np.empty_like(xs)
            lap[1:-1] = xs[:-2] + xs[2:]
            lap[0] = xs[1]
            lap[-1] = xs[-2]
            lap -= np.float32(2) * xs
            xs += w * lap
    return x


def _box_filter(x: np.ndarray, k: int) -> np.ndarray:
    """y[i] = mean(x[i:i+k]) along each of the first 3 axes (zero beyond the end); scipy's running sum."""
    from scipy import ndimage

    for d in range(3):
        x = ndimage.uniform_filter1d(x, k, axis=d, origin=-(k // 2), mode="constant")
    return x


def _render(subject: Subject, resolution: int = 1) -> np.ndarray:
    """The subject's image as stored: int16 on the reference grid, block-averaged by `resolution`.

    1 mm: warp the template-space image to every output voxel (trilinear), then bias field, Rician noise,
    blur, skull strip, gain. 2/4 mm: the block average is rendered directly: the template-space image is
    box-filtered over k^3 voxels and sampled at the block centres (equal to block-averaging the 1mm image
    up to the slow variation of the warp within a block), with noise of the block-averaged variance."""
    p = _preset(subject.preset)
    site = _site(p, subject.site)
    at = _atlas()
    f32 = np.float32
    k = int(resolution)
    streams = _seed_sequence(p, subject.seed, subject.index).spawn(4)
    rng_fields, rng_scan, rng_noise = (np.random.default_rng(s) for s in streams[1:])

    image, strip = _compose(subject, site, rng_fields)
    zs = rng_scan.standard_normal(2)
    gain = f32(_q(1000.0 * site.gain * math.exp(EFFECTS.gain_sd * float(zs[0]))))
    sigma = f32(_q(site.noise * math.exp(EFFECTS.noise_jitter_sd * float(zs[1]))))
    bias_c = _dct_coefs(rng_scan, _BIAS_K)[0] * site.bias

    if k == 1:
        lo, shape = at.o_lo, at.o_shape
        coords = [np.arange(lo[d], lo[d] + shape[d], dtype=np.float64) for d in range(3)]
        phi = _warp(subject, site, rng_fields, coords)
        value, inside = _sample(_pack(image, strip), image.shape, phi, at.o_index)
        del phi, image, strip
        bias = _dct_field(bias_c, *(_dct_basis(coords[d], _BIAS_K, MNI_SHAPE[d]) for d in range(3)))
        value *= f32(1) + bias.reshape(-1).take(at.o_index)
        n1 = rng_noise.standard_normal(value.size, dtype=np.float32)
        n2 = rng_noise.standard_normal(value.size, dtype=np.float32)
        value += sigma * n1
        n2 *= sigma
        value = np.sqrt(value * value + n2 * n2)  # magnitude image: Rician noise
        box = np.zeros(int(np.prod(shape)), dtype=np.float32)
        box[at.o_index] = value
        box = _blur(box.reshape(shape), site.blur)
        keep = np.zeros(box.size, dtype=np.float32)
        keep[at.o_index] = (inside > f32(0.5)).astype(np.float32) * gain
        box *= keep.reshape(shape)
        out = np.zeros(MNI_SHAPE, dtype=np.float32)
        out[tuple(slice(a, a + n) for a, n in zip(lo, shape, strict=True))] = box
    else:
        hard = (strip > f32(0.5)).astype(np.float32)
        image *= hard
        packed = _box_filter(_pack(image, hard).view(np.float32).reshape(image.shape + (2,)), k)
        packed = packed.reshape(-1).view(np.float64)
        del image, strip
        n_out = output_shape(k)
        # coarse output blocks that can receive brain: those overlapping the 1mm output box
        b_lo = [at.o_lo[d] // k for d in range(3)]
        b_hi = [min(n_out[d], -(-(at.o_lo[d] + at.o_shape[d]) // k)) for d in range(3)]
        coords = [np.arange(b_lo[d], b_hi[d], dtype=np.float64) * k + (k - 1) / 2.0 for d in range(3)]
        phi = _warp(subject, site, rng_fields, coords, offset=(k - 1) / 2.0)
        value, frac = _sample(packed, hard.shape, phi)
        del phi, packed
        shape = tuple(len(c) for c in coords)
        bias = _dct_field(bias_c, *(_dct_basis(coords[d], _BIAS_K, MNI_SHAPE[d]) for d in range(3)))
        value *= f32(1) + bias.reshape(-1)
        value = _blur(value.reshape(shape), [s / k for s in site.blur]).reshape(-1)
        noise = rng_noise.standard_normal(value.size, dtype=np.float32)
        value += noise * (sigma * f32(k ** -1.5)) * np.sqrt(np.maximum(frac, 0))
        value = np.maximum(value, 0) * (frac > f32(1e-3)).astype(np.float32) * gain
        out = np.zeros(n_out, dtype=np.float32)
        out[tuple(slice(a, b) for a, b in zip(b_lo, b_hi, strict=True))] = value.reshape(shape)
    return np.clip(np.rint(out), 0, 32767).astype(np.int16)


def block_average(volume: np.ndarray, k: int) -> np.ndarray:
    """Mean over k^3 blocks, trailing partial blocks trimmed (the grid of `output_shape(k)`), float32."""
    n = [s // k for s in volume.shape]
    x = np.asarray(volume, dtype=np.float32)[: n[0] * k, : n[1] * k, : n[2] * k]
    out = np.zeros(n, dtype=np.float32)
    for a in range(k):
        for b in range(k):
            for c in range(k):
                out += x[a::k, b::k, c::k]
    out *= np.float32(1.0 / k**3)
    return out


# ---------------------------------------------------------------------------------------------------
# Public API: one subject in memory, a whole BIDS dataset on disk


class Simulated(tuple):
    """(data, affine, subject): the stored int16 image, its affine and the subject's labels/latents."""

    __slots__ = ()

    def __new__(cls, data: np.ndarray, affine: np.ndarray, subject: Subject):
        return super().__new__(cls, (data, affine, subject))

    data = property(lambda self: self[0])
    affine = property(lambda self: self[1])
    subject = property(lambda self: self[2])


def output_shape(resolution: int = 1) -> tuple[int, int, int]:
    """Array shape written at `resolution` mm: 182x218x182, 91x109x91 or 45x54x45 (partial blocks trimmed)."""
    _check_resolution(resolution)
    return tuple(n // resolution for n in MNI_SHAPE)


def output_affine(resolution: int = 1) -> np.ndarray:
    """Voxel -> MNI mm affine of the files written at `resolution` mm. A block-averaged voxel lies at the
    centre of its k^3 block of 1mm voxels, so the origin moves by (k-1)/2 voxel: at 2 mm
    diag(-2, 2, 2) with origin (89.5, -125.5, -71.5); at 4 mm diag(-4, 4, 4) with origin (88.5, -124.5, -70.5)."""
    _check_resolution(resolution)
    k = float(resolution)
    scale = np.array([[k, 0, 0, (k - 1) / 2], [0, k, 0, (k - 1) / 2], [0, 0, k, (k - 1) / 2], [0, 0, 0, 1.0]])
    return MNI_AFFINE @ scale


def _check_resolution(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be 1, 2 or 4 (mm), got {resolution!r}")


def simulate_subject(
    preset: str | Preset = "ukb",
    index: int = 0,
    seed: int = 0,
    resolution: int = 1,
    *,
    age: float | None = None,
    sex: int | None = None,
    site: str | None = None,
) -> Simulated:
    """Generate subject `index` of a preset in memory: `Simulated(data, affine, subject)` with `data` the
    int16 array exactly as `simulate` stores it. `age`/`sex`/`site` override the subject's draw and keep
    the rest of the individual (anatomy, noise) unchanged, e.g. the same person at 30 and at 80."""
    _check_resolution(resolution)
    subject = sample_subject(preset, index, seed, age=age, sex=sex, site=site)
    return Simulated(_render(subject, resolution), output_affine(resolution), subject)


def _nifti_gz(data: np.ndarray, resolution: int) -> bytes:
    """Deterministic .nii.gz bytes: fixed header fields, gzip level 1 with mtime 0 and no file name."""
    import nibabel as nib

    affine = output_affine(resolution)
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(affine, code=4)  # 4 = MNI152
    hdr.set_qform(affine, code=4)
    # exact quaternion of diag(-k, k, k) = R_y(180 deg) diag(1, 1, qfac = -1)
    hdr["quatern_b"], hdr["quatern_c"], hdr["quatern_d"] = 0.0, 1.0, 0.0
    hdr["pixdim"][0] = -1.0
    hdr["qoffset_x"], hdr["qoffset_y"], hdr["qoffset_z"] = affine[:3, 3]
    hdr["descrip"] = b"jaxtl simulated T1w - not real data"
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_subject(args: tuple[str, int, int, int, str]) -> str:
    preset, seed, index, resolution, out_dir = args
    subject = sample_subject(preset, index, seed)
    data = _render(subject, resolution)
    pid = subject.participant_id
    path = Path(out_dir) / pid / "anat" / f"{pid}_T1w.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(_nifti_gz(data, resolution))
    os.replace(tmp, path)
    return pid


def _fork_is_safe() -> bool:
    """fork() is safe here unless JAX has started its (multi-threaded) runtime in this process; the workers
    only run numpy/scipy/zlib code. Anything unexpected: not safe (threads are used instead)."""
    if not sys.platform.startswith("linux"):
        return False
    if "jax" not in sys.modules:
        return True
    try:
        from jax._src import xla_bridge

        return not xla_bridge.backends_are_initialized()
    except Exception:
        return False


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def simulate(
    preset: str | Preset,
    out_dir: str | os.PathLike,
    n: int | None = None,
    seed: int = 0,
    resolution: int = 1,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write a simulated BIDS dataset and return its path.

    `preset`: a name in `PRESETS` (ukb, oasis, ixi, abide). `n`: number of subjects (default: the preset's
    size); subject i is the same for any n, so a larger n extends a smaller one. `resolution`: 1, 2 or 4
    mm (block averages of the 1mm grid, see `output_affine`). `workers`: parallel workers (default: usable
    CPUs, at most 8; 1 = in this process): forked processes, or threads once JAX runs in this process.
    Files: participants.tsv (participant_id, age, sex F/M, site), participants.json,
    dataset_description.json, README, sub-*/anat/sub-*_T1w.nii.gz and the latent ground truth in
    derivatives/jaxtl-simulate/latent.tsv (written last, so an interrupted run leaves no table).
    """
    p = _preset(preset)
    if p.name not in PRESETS or PRESETS[p.name] != p:
        raise ValueError("simulate() takes the name of a preset in PRESETS (subjects are keyed by preset name)")
    n = p.n if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_resolution(resolution)
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    subjects = [sample_subject(p, i, seed) for i in range(n)]
    ids = {s.participant_id for s in subjects}
    stale = sorted(q.name for q in out.glob("sub-*") if q.name not in ids) if out.is_dir() else []
    if stale:
        raise ValueError(f"{out} already holds other subjects ({', '.join(stale[:3])}, ...); use an empty directory")
    _check_same_settings(out, p.name, int(seed), int(resolution))
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    _atlas()  # template preparation, once per process (a few seconds); workers inherit or share it
    tasks = [(p.name, int(seed), i, int(resolution), str(out)) for i in range(n)]
    bar = tqdm(total=n, desc=f"simulate {p.name} {resolution}mm", unit="vol", disable=not progress)
    try:
        if workers == 1 or n == 1:
            for task in tasks:
                _write_subject(task)
                bar.update()
        else:
            import concurrent.futures
            import multiprocessing

            if _fork_is_safe():  # processes that inherit the atlas and the imports: start in well under a second
                pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=min(workers, n), mp_context=multiprocessing.get_context("fork"))
            else:  # JAX's runtime threads run here, so no fork; numpy and zlib release the GIL: use threads
                pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, n))
            with pool, warnings.catch_warnings():  # Python >= 3.12 warns about any fork with threads alive
                warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
                for _ in pool.map(_write_subject, tasks):
                    bar.update()
    finally:
        bar.close()
    _write_metadata(out, p, subjects, seed, resolution)  # last: the table only lists files that exist
    return out


def _simulated_with(bids_dir: str | os.PathLike) -> dict[str, str] | None:
    """The settings recorded in a simulated dataset's dataset_description.json ({"preset": "ukb", "seed": "0",
    "resolution": "4mm", ...}); None if `simulate` did not write it."""
    try:
        desc = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
        generated = desc["GeneratedBy"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    if not isinstance(generated, dict) or generated.get("Name") != "jaxtl.simulate":
        return None
    return dict(re.findall(r"(\w+)=(\S+)", str(generated.get("Description", ""))))


def simulator_version(bids_dir: str | os.PathLike) -> int | None:
    """The `SIMULATOR_VERSION` that wrote a simulated dataset (1 for those written before versions were recorded),
    None if it was not written by `simulate`."""
    settings = _simulated_with(bids_dir)
    if settings is None:
        return None
    return int(settings["simulator"]) if settings.get("simulator", "").isdigit() else 1


def _check_same_settings(out: Path, preset: str, seed: int, resolution: int) -> None:
    """Refuse to write into a simulated dataset made with another preset, seed, resolution or simulator version:
    its subjects would be replaced or mixed (the same settings with a larger n extend it, by design)."""
    old = _simulated_with(out)
    if old is None:
        return
    new = {"preset": preset, "seed": str(seed), "resolution": f"{resolution}mm", "simulator": str(SIMULATOR_VERSION)}
    differ = [f"{k} {old.get(k, '1' if k == 'simulator' else '?')} -> {v}" for k, v in new.items()
              if old.get(k, "1" if k == "simulator" else None) != v]
    if differ:
        raise ValueError(f"{out} holds a cohort simulated with other settings ({', '.join(differ)}); writing here "
                         "would replace or mix its subjects: use another directory or delete this one first")


def _write_metadata(out: Path, p: Preset, subjects: list[Subject], seed: int, resolution: int) -> None:
    from jaxtl import __version__

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")

    rows = ["participant_id\tage\tsex\tsite"]
    rows += [f"{s.participant_id}\t{s.age:.2f}\t{'M' if s.sex else 'F'}\t{s.site}" for s in subjects]
    write(out / "participants.tsv", "\n".join(rows) + "\n")
    write(out / "participants.json", json.dumps({
        "age": {"Description": "age at scan (simulated)", "Units": "year"},
        "sex": {"Description": "sex (simulated)", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "simulated scanner / site, see PRESETS in jaxtl/simulate.py"},
    }, indent=2, sort_keys=True) + "\n")
    write(out / "dataset_description.json", json.dumps({
        "Name": f"jaxtl simulated cohort '{p.name}' (SIMULATED DATA, not real participants)",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "jaxtl.simulate", "Version": __version__,
                         "Description": f"preset={p.name} n={len(subjects)} seed={seed} resolution={resolution}mm "
                                        f"simulator={SIMULATOR_VERSION}"}],
    }, indent=2, sort_keys=True) + "\n")
    write(out / "README", (
        f"Simulated cohort '{p.name}' written by jaxtl.simulate (preset={p.name}, n={len(subjects)}, "
        f"seed={seed}, resolution={resolution} mm).\n\n"
        "These are SIMULATED brains (MNI152 template + modelled age, sex, individual and scanner effects) "
        "for demos, tests and benchmarks. Numbers measured on them are not results on UK Biobank, OASIS-3, "
        "IXI, ABIDE or any real cohort.\n\n"
        "Images: skull-stripped T1w, linearly registered to MNI152 (FSL 1mm grid 182x218x182, LAS), or its "
        "2/4 mm block averages; int16.\n"
    ))
    keys = sorted(subjects[0].latent)
    lat = ["participant_id\t" + "\t".join(keys)]
    lat += [s.participant_id + "\t" + "\t".join(f"{s.latent[k]:.6g}" for k in keys) for s in subjects]
    write(out / "derivatives" / "jaxtl-simulate" / "latent.tsv", "\n".join(lat) + "\n")
    write(out / "derivatives" / "jaxtl-simulate" / "dataset_description.json", json.dumps({
        "Name": "latent (ground-truth) parameters of the simulated subjects",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "jaxtl.simulate", "Version": __version__}],
    }, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# Calibration report: how hard are the simulated tasks for simple baselines?

# Per preset: (n_train, n_test, PCA components kept, l1_ratio age, l1_ratio sex), following the paper's
# elastic-net recipe and training-set sizes where it has them (paper-spec sections 6.1 and 7).
_CALIBRATION = {
    "ukb": (400, 300, 100, 0.7, 0.5),
    "oasis": (355, 300, 60, 0.7, 0.5),
    "ixi": (215, 215, 140, 0.9, 1.0),
    "abide": (300, 300, 120, 0.8, 0.55),
}
# The paper's elastic-net test results (paper-spec section 8): age MAE, sex balanced accuracy.
PAPER_ELASTIC_NET = {"oasis": (6.235, 0.670), "ixi": (9.896, 0.731), "abide": (3.591, 0.689)}


def _features(paths: Sequence[str]) -> np.ndarray:
    """Images as rows: divided by the whole-volume mean (Peng's normalisation), flattened, float32; only the
    voxels that are non-zero in some image (two passes over the files, to keep memory small)."""
    import nibabel as nib

    load = lambda p: np.asarray(nib.load(p).dataobj, dtype=np.float32).reshape(-1)  # noqa: E731
    union = None
    for p in paths:
        nz = load(p) != 0
        union = nz if union is None else union | nz
    rows = np.empty((len(paths), int(union.sum())), dtype=np.float32)
    for i, p in enumerate(paths):
        x = load(p)
        rows[i] = x[union] / np.float32(x.mean(dtype=np.float64))
    return rows


def _baselines(x_train, x_test, y_train, y_test, s_train, s_test, vol_train, vol_test, feat, l1_age, l1_sex):
    """Mean predictor, PCA + elastic net (age MAE), PCA + elastic-net logistic regression (sex balanced
    accuracy), logistic regression on brain volume alone."""
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_selection import SelectKBest, f_classif, f_regression
    from sklearn.linear_model import ElasticNet, LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = x_train.std(0) > 0
    pca = PCA(n_components=min(len(x_train) - 1, int(keep.sum())), svd_solver="full", random_state=0)
    z_train = pca.fit_transform(x_train[:, keep])
    z_test = pca.transform(x_test[:, keep])
    feat = min(feat, z_train.shape[1])
    out = {"mean_mae": float(np.mean(np.abs(y_test - y_train.mean())))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # selection of the `feat` most correlated components happens inside each CV fold (no selection bias)
        age = GridSearchCV(
            make_pipeline(SelectKBest(f_regression, k=feat), StandardScaler(),
                          ElasticNet(l1_ratio=l1_age, max_iter=10000)),
            {"elasticnet__alpha": np.logspace(-2, 1.5, 15)}, cv=5, scoring="neg_mean_absolute_error")
        age.fit(z_train, y_train)
        out["en_mae"] = float(np.mean(np.abs(age.predict(z_test) - y_test)))
        sex = GridSearchCV(
            make_pipeline(SelectKBest(f_classif, k=feat), StandardScaler(),
                          LogisticRegression(l1_ratio=l1_sex, solver="saga", class_weight="balanced",
                                             max_iter=3000)),
            {"logisticregression__C": np.logspace(-3, 1, 9)}, cv=5, scoring="balanced_accuracy")
        sex.fit(z_train, s_train)
        out["en_sex"] = float(balanced_accuracy_score(s_test, sex.predict(z_test)))
    v_mean, v_sd = vol_train.mean(), vol_train.std()
    lv = LogisticRegression(class_weight="balanced").fit(((vol_train - v_mean) / v_sd)[:, None], s_train)
    out["vol_sex"] = float(balanced_accuracy_score(s_test, lv.predict(((vol_test - v_mean) / v_sd)[:, None])))
    return out


def calibrate(
    presets: Sequence[str] = ("ukb", "oasis", "ixi", "abide"),
    resolution: int = 2,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    work_dir: str | os.PathLike | None = None,
) -> dict[str, dict]:
    """Simulate each preset (paper-sized train/test splits), read it back with `jaxtl.read_cohort`, and fit
    the baselines of `_baselines`. Returns per-preset results (see `calibration_report`)."""
    import tempfile

    from jaxtl.cohort import read_cohort

    results = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for name in presets:
            n_train, n_test, feat, l1_age, l1_sex = _CALIBRATION[name]
            root = simulate(name, Path(tmp) / name, n=n_train + n_test, seed=seed, resolution=resolution,
                            workers=workers, progress=progress)
            cohort = read_cohort(root)
            x = _features(list(cohort.paths))
            ages, sexes = cohort.ages, cohort.sexes.astype(int)
            latent = {s.participant_id: s for s in (sample_subject(name, i, seed) for i in range(len(cohort)))}
            brain_age = np.array([latent[p].latent["brain_age"] for p in cohort.participant_ids])
            volume = (x > 0).sum(1).astype(np.float64)  # brain voxels
            order = np.random.default_rng(seed).permutation(len(cohort))
            tr, te = order[:n_train], order[n_train:]
            res = _baselines(x[tr], x[te], ages[tr], ages[te], sexes[tr], sexes[te], volume[tr], volume[te],
                             feat, l1_age, l1_sex)
            res["floor_mae"] = float(np.mean(np.abs(brain_age[te] - ages[te])))
            res.update(n_train=n_train, n_test=n_test, feat=feat)
            results[name] = res
            del x
            if progress:
                print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}, flush=True)
    return results


def _distribution(name: str, n: int | None = None, seed: int = 0) -> dict:
    """Age / sex / site distribution of a preset's first n subjects (labels only, no images)."""
    p = PRESETS[name]
    subs = [sample_subject(p, i, seed) for i in range(p.n if n is None else n)]
    ages = np.array([s.age for s in subs])
    sites = [s.site for s in subs]
    return {
        "n": len(subs), "age_min": float(ages.min()), "age_max": float(ages.max()), "age_mean": float(ages.mean()),
        "age_sd": float(ages.std(ddof=1)), "age_q": [float(q) for q in np.percentile(ages, [10, 25, 50, 75, 90])],
        "male": float(np.mean([s.sex for s in subs])), "sites": {s.name: sites.count(s.name) for s in p.sites},
    }


def calibration_report(results: dict[str, dict], resolution: int, seed: int = 0) -> str:
    """Markdown report of `calibrate` results plus each preset's label distributions."""
    lines = [
        "# Simulated cohorts: calibration report",
        "",
        "**These are simulated brains for demos, tests and benchmarks. Nothing here is a result on UK Biobank, "
        "OASIS-3, IXI, ABIDE or any real cohort.** The table shows how hard the simulated tasks are for simple "
        "baselines, so that numbers obtained on them can be read in context.",
        "",
        f"Produced by `jaxtl simulate --calibrate benchmarks/simulation/calibration.md` (resolution {resolution} mm, "
        f"seed {seed}); generator: `jaxtl/simulate.py` (effect sizes and sources in its docstring).",
        "",
        "## Label distributions (preset default size)",
        "",
        "| preset | n | age min-max | age mean (sd) | age 10/25/50/75/90 % | male share | sites (n) |"
        " paper cohort (paper-spec s7) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    targets = {
        "ukb": "UK Biobank imaging: ~45-80 y, one site; 12,949 training subjects",
        "oasis": "42.7-95.7 y, mean 68.8 (sd 8.8); male 0.40; 1,132 sessions",
        "ixi": "20.0-86.3 y, mean 47.8 (sd 16.2); male 0.448; 538 subjects, 3 sites",
        "abide": "5.2-56.2 y, mean 13.5 (sd 6.3); male 0.743; 1,341 subjects, many sites",
    }
    for name in PRESETS:
        d = _distribution(name, seed=seed)
        sites = ", ".join(f"{k} {v}" for k, v in d["sites"].items())
        if len(d["sites"]) > 4:
            sites = f"{len(d['sites'])} sites, {min(d['sites'].values())}-{max(d['sites'].values())} each"
        q = "/".join(f"{v:.0f}" for v in d["age_q"])
        lines.append(f"| {name} | {d['n']} | {d['age_min']:.1f}-{d['age_max']:.1f} | {d['age_mean']:.1f} "
                     f"({d['age_sd']:.1f}) | {q} | {d['male']:.3f} | {sites} | {targets[name]} |")
    lines += [
        "",
        "## Baselines",
        "",
        "Each preset is simulated with the paper's training-set size where it has one (OASIS 355, IXI 215, ABIDE "
        "300 as in its elastic-net runs) and a held-out test set, written to disk as BIDS and read back with "
        "`jaxtl.read_cohort`. Features: every voxel of the whole image divided by its mean (Peng's normalisation). "
        "*Mean predictor*: the training mean age. *PCA + elastic net*: the paper's recipe (PCA with n_train-1 "
        "components, the `feat` components most correlated with the label, elastic net with the paper's l1 "
        "ratio; the penalty is chosen by 5-fold CV on the training set instead of the paper's validation grid). "
        "Sex is scored as balanced accuracy (the paper oversamples to a balanced test set). *Brain volume only*: "
        "logistic regression on the number of brain voxels. *Floor*: MAE of the simulator's latent biological "
        "age (age + the individual brain-age gap that drives all ageing effects); no method can expect to beat "
        "it on average.",
        "",
        "| preset | n train / test | age: mean predictor MAE | age: PCA + elastic net MAE | paper elastic net "
        "(real data) | age floor MAE | sex: PCA + elastic net | sex: brain volume only | paper elastic net sex |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        paper = PAPER_ELASTIC_NET.get(name)
        pa, ps = (f"{paper[0]:.2f}", f"{paper[1]:.2f}") if paper else ("-", "-")
        lines.append(f"| {name} | {r['n_train']} / {r['n_test']} | {r['mean_mae']:.2f} | {r['en_mae']:.2f} | {pa} | "
                     f"{r['floor_mae']:.2f} | {r['en_sex']:.3f} | {r['vol_sex']:.3f} | {ps} |")
    lines += [
        "",
        "Reading the table: the elastic net should be clearly better than the mean predictor and far from the floor, "
        "in the region of the paper's elastic-net rows; the gap between the elastic net and the floor is the room "
        "a CNN (or transfer learning) has to show its worth. Sex must not be readable from brain volume alone "
        "(after linear registration most of the 9 % male-female difference in intracranial volume is gone).",
        "",
    ]
    return "\n".join(lines)


def preview(path: str | os.PathLike, *, preset: str = "ixi", index: int = 0, seed: int = 0,
            resolution: int = 1) -> Path:
    """PNG montage of one simulated individual: age 20 vs 80, female vs male, and two sites, with axial and
    coronal slices and the difference of each pair (images divided by their mean, as the network sees them)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    p = _preset(preset)
    base = sample_subject(p, index, seed)
    sites = ["HH", "IOP"] if p.name == "ixi" else [s.name for s in p.sites][:2]
    pairs = [
        ("age", [("age 20", {"age": 20.0, "sex": base.sex}), ("age 80", {"age": 80.0, "sex": base.sex})]),
        ("sex", [("female, 50", {"age": 50.0, "sex": 0}), ("male, 50", {"age": 50.0, "sex": 1})]),
    ]
    if len(sites) > 1:  # a single-site preset (ukb) has no site contrast
        pairs.append(("site", [(f"site {sites[0]}", {"site": sites[0]}), (f"site {sites[1]}", {"site": sites[1]})]))
    inv = np.linalg.inv(output_affine(resolution))
    z_ax = int(round((inv @ [0.0, 0.0, 12.0, 1.0])[2]))
    y_co = int(round((inv @ [0.0, -10.0, 0.0, 1.0])[1]))

    def axial(v):  # neurological display: subject's left (MNI -x, high voxel index in LAS) on the left
        return v[::-1, :, z_ax].T[::-1]

    def coronal(v):
        return v[::-1, y_co, :].T[::-1]

    fig, ax = plt.subplots(3, 2 * len(pairs), figsize=(6 * len(pairs), 9.6), facecolor="black")
    for c, (_, pair) in enumerate(pairs):
        vols = []
        for j, (label, kw) in enumerate(pair):
            sim = simulate_subject(p, index, seed, resolution, **kw)
            v = sim.data.astype(np.float32)
            v /= v.mean()
            vols.append(v)
            s = sim.subject
            col = 2 * c + j
            vmax = float(np.percentile(v[v > 0], 99.5))
            ax[0, col].imshow(axial(v), cmap="gray", vmin=0, vmax=vmax)
            ax[1, col].imshow(coronal(v), cmap="gray", vmin=0, vmax=vmax)
            ax[0, col].set_title(f"{label}\n{s.age:.0f} y, {'male' if s.sex else 'female'}, site {s.site}",
                                 color="white", fontsize=10)
        brain = (vols[0] > 0) | (vols[1] > 0)
        diff = np.ma.masked_array(vols[1] - vols[0], mask=~brain)
        lim = float(np.percentile(np.abs(diff.compressed()), 99))
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="black")
        ax[2, 2 * c].imshow(axial(diff), cmap=cmap, vmin=-lim, vmax=lim)
        ax[2, 2 * c + 1].imshow(coronal(diff), cmap=cmap, vmin=-lim, vmax=lim)
        ax[2, 2 * c].set_title(f"{pair[1][0]} minus {pair[0][0]}", color="white", fontsize=9)
        ax[2, 2 * c + 1].set_title("(red: brighter, blue: darker)", color="white", fontsize=9)
    for a in ax.ravel():
        a.set_axis_off()
    fig.suptitle(f"SIMULATED brains (jaxtl.simulate, preset '{p.name}', subject {index}): not real data. "
                 f"Axial z=12 mm, coronal y=-10 mm, MNI152 {resolution} mm, left hemisphere on the left.",
                 color="white", fontsize=11)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black", metadata={"Software": None})
    plt.close(fig)
    return out
