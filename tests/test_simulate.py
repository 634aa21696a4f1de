"""Simulated cohorts (jaxtl.simulate): determinism, BIDS layout, affines, demographics and the direction of
every modelled effect. Images are compared for the same individual with one label changed (the simulator
keeps anatomy and noise fixed under label overrides), mostly at 2 mm to stay fast."""

from __future__ import annotations

import gzip
import hashlib
import math

import numpy as np
import pytest

from jaxtl.simulate import (
    EFFECTS,
    PRESETS,
    block_average,
    output_affine,
    output_shape,
    sample_subject,
    simulate,
    simulate_subject,
)


def _roi(resolution: int, lo_mm, hi_mm) -> tuple[slice, slice, slice]:
    """Voxel slices of an MNI box (mm) on the grid of `resolution`."""
    inv = np.linalg.inv(output_affine(resolution))
    a = (inv @ np.array([*lo_mm, 1.0]))[:3]
    b = (inv @ np.array([*hi_mm, 1.0]))[:3]
    return tuple(slice(int(math.floor(min(x, y))), int(math.ceil(max(x, y))) + 1) for x, y in zip(a, b, strict=True))


def _wm(v: np.ndarray) -> float:
    return float(np.percentile(v[v > 0], 90))


def _csf_voxels(v: np.ndarray, roi=(slice(None),) * 3) -> int:
    """Voxels darker than halfway between CSF and GM (relative to the WM level) inside the brain."""
    r = v[roi]
    return int(np.count_nonzero((r > 0) & (r < 0.5 * _wm(v))))


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    pos, neg = score[label == 1], score[label == 0]
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


# ---------------------------------------------------------------------------------------------------
# Presets and labels


def test_presets_match_paper_cohorts():
    # paper-spec section 7: (age min, age max, age mean, age sd, male share, size)
    targets = {
        "oasis": (42.66, 95.66, 68.8, 8.8, 0.397, 1132),
        "ixi": (19.98, 86.32, 47.8, 16.2, 0.448, 538),
        "abide": (5.22, 56.2, 13.46, 6.27, 0.743, 1341),
        "ukb": (45.0, 80.0, 62.7, 7.5, 0.48, 2000),
    }
    for name, (lo, hi, mean, sd, male, n) in targets.items():
        p = PRESETS[name]
        assert p.n == n
        subjects = [sample_subject(name, i) for i in range(n)]
        ages = np.array([s.age for s in subjects])
        sexes = np.array([s.sex for s in subjects])
        assert lo <= ages.min() and ages.max() <= hi, name
        assert abs(ages.mean() - mean) < 0.3 and abs(ages.std(ddof=1) - sd) < 0.5, name
        assert abs(sexes.mean() - male) < 0.005, name
        # small cohorts are representative too (low-discrepancy draws)
        assert abs(ages[:100].mean() - mean) < 1.5 and abs(sexes[:100].mean() - male) < 0.03, name
        assert {s.site for s in subjects} == {s.name for s in p.sites}, name
    assert len(PRESETS["ixi"].sites) == 3 and len(PRESETS["abide"].sites) >= 10
    assert len({s.participant_id for s in subjects}) == len(subjects)


def test_small_cohorts_have_the_presets_male_share():
    # the CI demo's 32-subject source: R3's sex step (~2/3) gave 0.31-0.62 male over seeds for a share of 0.48
    for seed in range(8):
        for start in (0, 100):
            sexes = [sample_subject("ukb", i, seed).sex for i in range(start, start + 32)]
            assert abs(np.mean(sexes) - 0.48) <= 2 / 32, (seed, start, np.mean(sexes))


def test_every_target_site_differs_from_ukb():
    ukb = PRESETS["ukb"].sites[0]
    fields = ("gm_wm", "csf_wm", "bias", "noise", "blur", "strip_mm", "shift_mm", "scale")
    for name in ("oasis", "ixi", "abide"):
        for site in PRESETS[name].sites:
            differing = [f for f in fields if getattr(site, f) != getattr(ukb, f)]
            assert len(differing) >= 5, (name, site.name, differing)


def test_overrides_keep_the_individual():
    a = sample_subject("ixi", 7, age=30.0, sex=0, site="HH")
    b = sample_subject("ixi", 7, age=70.0, sex=1, site="IOP")
    for key in ("gm", "wm", "csf", "ventricle_asym"):  # individual draws, independent of the labels
        assert a.latent[key] == b.latent[key]
    assert a.participant_id == b.participant_id
    # ABIDE's sites recruit by age: an overridden age keeps the individual's scanner (the drawn one)
    drawn = [sample_subject("abide", i) for i in range(40)]
    assert len({s.site for s in drawn}) > 1
    for i, s in enumerate(drawn):
        assert sample_subject("abide", i, age=20.0).site == sample_subject("abide", i, age=80.0).site == s.site
    with pytest.raises(ValueError):
        sample_subject("ixi", 0, site="nowhere")
    with pytest.raises(ValueError):
        sample_subject("nope", 0)


def test_sex_is_not_readable_from_brain_size_alone():
    # Linear registration removes most of the ~9 % ICV difference; what is left overlaps between sexes.
    subjects = [sample_subject("ukb", i) for i in range(1500)]
    icv = np.array([s.latent["head_scale"] ** 3 for s in subjects])
    sex = np.array([s.sex for s in subjects])
    ratio = np.exp(np.log(icv[sex == 1]).mean() - np.log(icv[sex == 0]).mean())
    assert abs(ratio - EFFECTS.icv_male_ratio) < 0.015  # native ICV: males ~9 % larger
    registered = icv ** EFFECTS.registration_residual
    assert 0.6 < _auc(registered, sex) < 0.85


# ---------------------------------------------------------------------------------------------------
# Files: BIDS layout, determinism, affines


def test_bids_dataset_is_deterministic_and_readable(tmp_path, monkeypatch):
    import importlib

    from jaxtl.cohort import read_cohort

    a = simulate("ixi", tmp_path / "a", n=3, resolution=4, workers=1, progress=False)
    b = simulate("ixi", tmp_path / "b", n=2, resolution=4, workers=2, progress=False)  # subset, in parallel
    monkeypatch.setattr(importlib.import_module("jaxtl.simulate"), "_fork_is_safe", lambda: False)
    c = simulate("ixi", tmp_path / "c", n=2, resolution=4, workers=2, progress=False)  # threads
    files = sorted(p.relative_to(a) for p in a.rglob("sub-*_T1w.nii.gz"))
    assert len(files) == 3 and all(str(f).startswith(f"{f.parts[0]}/anat/{f.parts[0]}_T1w") for f in files)
    for f in files[:2]:
        assert (a / f).read_bytes() == (b / f).read_bytes() == (c / f).read_bytes()
    raw = (a / files[0]).read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip with mtime 0
    lines = (a / "participants.tsv").read_text().splitlines()
    assert lines[0] == "participant_id\tage\tsex\tsite"
    assert (b / "participants.tsv").read_text().splitlines() == lines[:3]
    assert (a / "dataset_description.json").exists()
    assert "SIMULATED" in (a / "README").read_text()
    with pytest.raises(ValueError, match="other subjects"):  # never mixes two datasets
        simulate("ixi", a, n=2, resolution=4, workers=1, progress=False)
    # nor replaces one made with another seed or resolution (same subject ids, other images)
    with pytest.raises(ValueError, match=r"other settings \(seed 0 -> 1\)"):
        simulate("ixi", b, n=2, seed=1, resolution=4, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(resolution 4mm -> 2mm\)"):
        simulate("ixi", b, n=2, resolution=2, workers=1, progress=False)
    assert (b / files[0]).read_bytes() == (a / files[0]).read_bytes()  # untouched
    simulate("ixi", b, n=3, resolution=4, workers=1, progress=False)  # the same settings: a larger n extends it
    assert (b / "participants.tsv").read_text() == (a / "participants.tsv").read_text()

    cohort = read_cohort(a)
    assert len(cohort) == 3
    subjects = [sample_subject("ixi", i) for i in range(3)]
    assert list(cohort.participant_ids) == [s.participant_id for s in subjects]
    np.testing.assert_allclose(cohort.ages, [round(s.age, 2) for s in subjects])
    np.testing.assert_array_equal(cohort.sexes, [s.sex for s in subjects])
    assert list(cohort.sites) == [s.site for s in subjects]

    import nibabel as nib

    img = nib.load(cohort.paths[0])
    assert img.shape == output_shape(4) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.affine, output_affine(4))
    np.testing.assert_array_equal(np.asarray(img.dataobj), simulate_subject("ixi", 0, resolution=4).data)
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == hashlib.sha256(img.to_bytes()).hexdigest()


def test_affines_put_every_resolution_in_the_same_place():
    v1 = simulate_subject("abide", 1, resolution=1)
    assert v1.data.shape == (182, 218, 182)
    np.testing.assert_array_equal(v1.affine, np.array([[-1, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]]))

    def centroid_mm(data, affine):
        w = data.astype(np.float64)
        ijk = [float((w.sum(axis=tuple(a for a in range(3) if a != d)) * np.arange(data.shape[d])).sum() / w.sum())
               for d in range(3)]
        return (affine @ np.array([*ijk, 1.0]))[:3]

    c1 = centroid_mm(v1.data, v1.affine)
    for k in (2, 4):
        vk = simulate_subject("abide", 1, resolution=k)
        assert vk.data.shape == output_shape(k)
        np.testing.assert_allclose(centroid_mm(vk.data, vk.affine), c1, atol=0.3)  # a half-block error is >= 0.5
        ba = block_average(v1.data, k)
        brain = (ba > 0) | (vk.data > 0)
        assert np.corrcoef(ba[brain], vk.data[brain])[0, 1] > 0.98
        assert abs(vk.data.sum() / ba.sum() - 1) < 0.03


def test_loader_reads_the_files(tmp_path):
    from jaxtl.data import INPUT_SHAPE, load_volume

    root = simulate("abide", tmp_path, n=1, resolution=1, workers=1, progress=False)
    path = next(root.rglob("*_T1w.nii.gz"))
    x = load_volume(path)
    assert x.shape == INPUT_SHAPE and 1.2 < float(x.mean()) < 1.8  # whole volume mean 1, then cropped


# ---------------------------------------------------------------------------------------------------
# Effects move the image in the documented direction (same individual, one label changed)

VENTRICLES = ((-28.0, -40.0, 5.0), (28.0, 20.0, 30.0))


def test_age_enlarges_ventricles_and_sulci_and_shrinks_tissue():
    young = simulate_subject("ukb", 3, resolution=2, age=30.0).data
    old = simulate_subject("ukb", 3, resolution=2, age=80.0).data
    roi = _roi(2, *VENTRICLES)
    assert _csf_voxels(old, roi) > 1.8 * _csf_voxels(young, roi)
    cortex = (slice(None), slice(None), _roi(2, (0, 0, 35.0), (0, 0, 80.0))[2])  # above the ventricles
    assert _csf_voxels(old, cortex) > 1.3 * _csf_voxels(young, cortex)
    tissue = lambda v: np.count_nonzero(v >= 0.5 * _wm(v))  # noqa: E731
    assert tissue(old) < 0.95 * tissue(young)


def test_children_have_lower_wm_gm_contrast_and_smaller_ventricles():
    # Same individuals at 6 and at 25. Voxel sets come from the adult image (GM-like: 25-40th percentile,
    # WM: above the 85th); the noise is the same in both images, so the sets are not biased by it.
    roi = _roi(2, *VENTRICLES)
    change, csf_child, csf_adult = [], [], []
    for i in range(6):
        c = simulate_subject("abide", i, resolution=2, age=6.0).data.astype(np.float64)
        a = simulate_subject("abide", i, resolution=2, age=25.0).data.astype(np.float64)
        both = (a > 0) & (c > 0)
        lo, hi, top = np.percentile(a[a > 0], [25, 40, 85])
        g, w = both & (a >= lo) & (a <= hi), both & (a >= top)
        change.append(c[g].mean() / c[w].mean() - a[g].mean() / a[w].mean())
        csf_child.append(_csf_voxels(c.astype(np.int16), roi))
        csf_adult.append(_csf_voxels(a.astype(np.int16), roi))
    assert np.mean(change) > 0.05  # GM closer to WM in children: flatter contrast (about half of it myelination)
    assert np.mean(csf_child) < 0.9 * np.mean(csf_adult)


def test_males_have_larger_brains_and_ventricles():
    female = simulate_subject("ukb", 5, resolution=2, sex=0).data
    male = simulate_subject("ukb", 5, resolution=2, sex=1).data
    assert np.count_nonzero(male) > 1.01 * np.count_nonzero(female)
    roi = _roi(2, *VENTRICLES)
    assert _csf_voxels(male, roi) > 1.12 * _csf_voxels(female, roi)  # +15 % (and faster ageing) in males


def test_individuals_differ_beyond_their_labels():
    labels = {"age": 60.0, "sex": 0, "site": "ukb"}
    a = simulate_subject("ukb", 0, resolution=2, **labels).data.astype(np.float64)
    b = simulate_subject("ukb", 1, resolution=2, **labels).data.astype(np.float64)
    a2 = simulate_subject("ukb", 0, resolution=2, age=61.0, sex=0).data.astype(np.float64)
    core = _roi(2, (-30.0, -40.0, -10.0), (30.0, 30.0, 40.0))
    corr = lambda x, y: np.corrcoef(x[core].ravel(), y[core].ravel())[0, 1]  # noqa: E731
    dice = lambda x, y: 2 * np.count_nonzero((x > 0) & (y > 0)) / (np.count_nonzero(x) + np.count_nonzero(y))  # noqa: E731
    assert corr(a, a2) > 0.99 and dice(a, a2) > 0.99  # a year older: the same brain
    assert corr(a, b) < 0.86 and dice(a, b) < 0.97  # another person, same labels: other anatomy (deformation)


def test_sites_change_intensity_noise_and_contrast():
    sites = {s.name: s for s in PRESETS["ixi"].sites}
    img = {name: simulate_subject("ixi", 4, resolution=1, site=name).data.astype(np.float32)
           for name in ("Guys", "HH", "IOP")}
    gain = np.median(img["IOP"][img["IOP"] > 0]) / np.median(img["HH"][img["HH"] > 0])
    assert abs(gain / (sites["IOP"].gain / sites["HH"].gain) - 1) < 0.25

    def noise(v):  # robust sd of the second difference along y inside the brain, relative to WM
        d = v[:, 2:, :] - 2 * v[:, 1:-1, :] + v[:, :-2, :]
        inside = (v[:, 2:, :] > 0) & (v[:, 1:-1, :] > 0) & (v[:, :-2, :] > 0)
        return 1.4826 * np.median(np.abs(d[inside])) / _wm(v)

    assert sites["Guys"].blur == sites["HH"].blur and sites["Guys"].noise > sites["HH"].noise
    assert noise(img["Guys"]) > 1.1 * noise(img["HH"])  # 1.5T vs 3T Philips, same resolution
    gm_wm = lambda v: np.percentile(v[v > 0], 30) / _wm(v)  # noqa: E731
    assert gm_wm(img["IOP"]) > gm_wm(img["HH"])  # flatter contrast at 1.5T


def test_preview_and_cli(tmp_path):
    from jaxtl.cli import main
    from jaxtl.simulate import preview

    png = preview(tmp_path / "p.png", resolution=4)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    ukb = preview(tmp_path / "u.png", preset="ukb", resolution=4)  # one site: no (empty) site contrast
    assert Image.open(ukb).size[0] < 0.8 * Image.open(png).size[0]
    assert main(["simulate", "oasis", str(tmp_path / "ds"), "--n", "2", "--resolution", "4", "--workers", "1",
                 "--no-progress"]) == 0
    assert len(list((tmp_path / "ds").rglob("*_T1w.nii.gz"))) == 2
    assert main(["simulate", "oasis"]) == 2  # OUT_DIR missing: a one-line error
