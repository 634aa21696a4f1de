"""Loading and conforming brain MRI: refusals, warnings, orientation invariance, exactness."""

import gzip
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
from nilearn.datasets import load_mni152_template

from jaxtl import data
from jaxtl.data import CROP, MNI_AFFINE, MNI_SHAPE, InputError, InputWarning, conform, load_volume


@pytest.fixture(scope="module")
def template_ras() -> nib.Nifti1Image:
    """nilearn's MNI152 template as shipped: RAS, 197x233x189, origin (-98, -134, -72)."""
    img = load_mni152_template(resolution=1)
    return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


@pytest.fixture(scope="module")
def mni() -> np.ndarray:
    """The template on the reference grid (a clean, skull-stripped, registered T1)."""
    return np.array(data.reference_template())


@pytest.fixture
def no_interpolation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("interpolation used where an exact path was expected")

    monkeypatch.setattr(scipy.ndimage, "affine_transform", fail)


def _reoriented(img: nib.Nifti1Image, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]):
    """The same image stored with axes permuted and flipped (affine updated to match)."""
    arr, aff = np.asarray(img.dataobj), img.affine.copy()
    for axis, flip in enumerate(flips):
        if flip:
            arr = np.flip(arr, axis)
            aff[:, 3] = aff @ np.r_[np.eye(4)[axis][:3] * (arr.shape[axis] - 1), 1]
            aff[:, axis] *= -1
    arr = np.transpose(arr, perm)
    aff[:, :3] = aff[:, list(perm)]
    return nib.Nifti1Image(np.ascontiguousarray(arr), aff)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Conforming


def test_pass_through_is_bit_exact_and_not_resampled(tmp_path, no_interpolation):
    rng = np.random.default_rng(0)
    arr = np.array(data.reference_template()) + rng.random(MNI_SHAPE, dtype=np.float32) * 1e-3
    path = tmp_path / "T1_brain_to_MNI.nii.gz"
    nib.save(nib.Nifti1Image(arr, MNI_AFFINE), path)
    out = _quiet(conform, path)
    assert out.dtype == np.float32 and out.shape == MNI_SHAPE
    assert np.array_equal(out, arr)
    x = load_volume(path)
    assert x.shape == (160, 192, 160) and x.dtype == np.float32
    np.testing.assert_array_equal(x, (arr / np.float32(arr.mean(dtype=np.float64)))[CROP])


def test_in_memory_image_is_not_modified_or_shared(mni):
    img = nib.Nifti1Image(mni.copy(), MNI_AFFINE)
    out = conform(img)
    out[:] = 0
    assert np.array_equal(np.asarray(img.dataobj), mni)


def test_nilearn_template_conforms_by_exact_shift_and_flip(template_ras, no_interpolation):
    out = _quiet(conform, template_ras)
    # reference voxel (i, j, k) is at x = 90 - i, y = j - 126, z = k - 72; template index = x + 98, y + 134, z + 72
    expected = np.asarray(template_ras.dataobj)[188:6:-1, 8:226, 0:182]
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(
    "perm, flips",
    [((0, 1, 2), (True, False, False)), ((2, 0, 1), (False, True, False)), ((1, 2, 0), (True, True, True))],
    ids=["LAS", "permuted-PSR-like", "permuted-all-flipped"],
)
def test_orientation_invariance(template_ras, perm, flips, no_interpolation):
    reference = conform(template_ras)
    other = _reoriented(template_ras, perm, flips)
    assert nib.aff2axcodes(other.affine) != nib.aff2axcodes(template_ras.affine)
    assert np.abs(conform(other) - reference).max() < 1e-5


def test_orientation_invariance_on_the_interpolation_path():
    img2 = load_mni152_template(resolution=2)  # 2mm RAS: needs linear interpolation
    ras = nib.Nifti1Image(np.asarray(img2.dataobj, dtype=np.float32), img2.affine)
    a = conform(ras)
    b = conform(_reoriented(ras, (2, 1, 0), (True, False, True)))
    assert np.abs(a - b).max() < 1e-5
    r = np.corrcoef(a.ravel(), data.reference_template().ravel())[0, 1]
    assert r > 0.98


def test_half_voxel_offset_is_linearly_interpolated(mni):
    affine = MNI_AFFINE.copy()
    affine[1, 3] += 0.5  # image voxel j sits at y = j - 125.5: reference voxel j reads image j - 0.5
    out = conform(nib.Nifti1Image(mni, affine), check=False)
    np.testing.assert_allclose(out[:, 1:], 0.5 * (mni[:, :-1] + mni[:, 1:]), atol=1e-5)


def test_ras_181_grid_and_files_round_trip(template_ras, tmp_path, mni):
    # an MNI-space image on a 181x217x181 RAS grid (origin -90, -126, -72), as from other pipelines
    arr = mni[::-1][1:182, :217, :181]  # reference index i is at x = 90 - i: RAS index 181 - i, minus 1
    affine = np.array([[1.0, 0, 0, -90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    out = conform(nib.Nifti1Image(np.ascontiguousarray(arr), affine))
    assert np.array_equal(out[:181, :217, :181], mni[:181, :217, :181])
    assert not out[181].any() and not out[:, 217].any() and not out[:, :, 181].any()  # outside that grid
    for name in ("t.nii", "t.nii.gz", "t.mgz"):
        path = tmp_path / name
        nib.save(template_ras if name != "t.mgz" else nib.MGHImage(template_ras.get_fdata(dtype=np.float32),
                                                                    template_ras.affine), path)
        assert np.array_equal(conform(path), mni), name


def test_singleton_fourth_axis_is_squeezed(mni):
    out = conform(nib.Nifti1Image(mni[..., None], MNI_AFFINE))
    assert np.array_equal(out, mni)


def test_downsample_block_averages(mni):
    img = nib.Nifti1Image(mni, MNI_AFFINE)
    full = load_volume(img)
    for f in (2, 4):
        small = load_volume(img, downsample=f)
        assert small.shape == tuple(n // f for n in (160, 192, 160))
        np.testing.assert_allclose(small[3, 5, 7], full[3 * f:3 * f + f, 5 * f:5 * f + f, 7 * f:7 * f + f].mean(),
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="downsample"):
        load_volume(img, downsample=3)


def test_mean_normalisation_uses_the_whole_uncropped_volume(mni):
    x = load_volume(nib.Nifti1Image(mni * 123.0, MNI_AFFINE))
    assert x.mean() > 1.2  # cropping removes background, so the cropped mean exceeds 1
    np.testing.assert_allclose(x, (mni / mni.mean())[CROP], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Refusals: a corpus of malformed inputs, each must name the file and the problem


def _save(img, path):
    nib.save(img, path)
    return path


def _corpus(tmp_path, mni):
    """(name, builder returning a path, expected message fragment)."""
    small = np.random.default_rng(0).random((20, 24, 20), dtype=np.float32)
    small_affine = np.diag([8.0, 8.0, 8.0, 1.0])
    small_affine[:3, 3] = [-80, -110, -75]  # covers the MNI brain, so only the defect is refused

    def nifti(arr, affine=small_affine, name="img.nii.gz", header=None):
        return lambda: _save(nib.Nifti1Image(arr, affine, header), tmp_path / name)

    def write(name, content):
        def build():
            (tmp_path / name).write_bytes(content() if callable(content) else content)
            return tmp_path / name
        return build

    def good_gz():
        path = _save(nib.Nifti1Image(small, small_affine), tmp_path / "good.nii.gz")
        return path.read_bytes()

    def corrupt_gz():
        raw = bytearray(gzip.compress(nib.Nifti1Image(small, small_affine).to_bytes()))
        raw[len(raw) // 2: len(raw) // 2 + 50] = bytes(50)
        return bytes(raw)

    def nan_sform():
        header = nib.Nifti1Image(small, small_affine).header.copy()
        header["srow_x"] = [np.nan, 0, 0, -80]
        return _save(nib.Nifti1Image(small, None, header), tmp_path / "nan_sform.nii")

    def singular():
        affine = small_affine.copy()
        affine[:, 2] = 0
        affine[3, 3] = 1
        header = nib.Nifti1Header()
        header.set_sform(affine, code=2)
        return _save(nib.Nifti1Image(small, None, header), tmp_path / "singular.nii")

    def no_orientation():
        header = nib.Nifti1Header()
        header.set_sform(None, code=0)
        header.set_qform(None, code=0)
        return _save(nib.Nifti1Image(small, None, header), tmp_path / "no_orientation.nii")

    far = MNI_AFFINE.copy()
    far[:3, 3] += 500
    scanner = np.diag([1.0, 1.0, 1.0, 1.0])  # native scanner space with the origin in a corner
    blob = np.zeros(MNI_SHAPE, np.float32)
    blob[:20, :20, -20:] = np.linspace(0.5, 1.0, 20**3).reshape(20, 20, 20)  # in a corner, outside the brain
    zscored = (mni - mni.mean()) / mni.std()
    zscored -= zscored.mean()
    return [
        ("missing", lambda: tmp_path / "does_not_exist.nii.gz", "file not found"),
        ("empty", write("empty.nii.gz", b""), "empty file"),
        ("text", write("notes.nii.gz", b"subject 12 was moved to site B\n" * 3), "unreadable or truncated file"),
        ("text-nii", write("notes.nii", b"x" * 400), "unreadable or truncated file"),
        ("header-only", write("header.nii", lambda: nib.Nifti1Image(small, small_affine).to_bytes()[:300]),
         "unreadable or truncated file"),
        ("truncated-gz", write("trunc.nii.gz", lambda: good_gz()[: len(good_gz()) // 2]), "truncated"),
        ("truncated-nii", write("trunc.nii", lambda: nib.Nifti1Image(small, small_affine).to_bytes()[:-500]),
         "truncated"),
        ("corrupt-gz", write("corrupt.nii.gz", corrupt_gz), "unreadable or truncated file"),
        ("4d", nifti(np.stack([small] * 3, -1), name="bold.nii.gz"), "4D image"),
        ("5d", nifti(small[..., None, None].repeat(2, 4), name="five.nii.gz"), "5D image"),
        ("2d", nifti(small[:, :, 0], name="slice2d.nii.gz"), "2D data"),
        ("single-slice", nifti(small[:, :, :1], name="slice.nii.gz"), "2D data"),
        ("nan", nifti(np.where(small > 0.9, np.nan, small).astype(np.float32), name="nan.nii.gz"), "non-finite"),
        ("inf", nifti(np.where(small > 0.9, np.inf, small).astype(np.float32), name="inf.nii.gz"), "non-finite"),
        ("zeros", nifti(np.zeros_like(small), name="zeros.nii.gz"), "all-zero volume"),
        ("constant", nifti(np.full_like(small, 7.0), name="constant.nii.gz"), "constant (every voxel = 7)"),
        ("complex", nifti(small.astype(np.complex64), name="complex.nii.gz"), "unsupported voxel data type"),
        ("nan-affine", nan_sform, "degenerate affine"),
        ("singular-affine", singular, "degenerate affine"),
        ("no-orientation", no_orientation, "no orientation"),
        ("far-away", nifti(mni, far, name="far.nii.gz"), "field of view"),
        ("scanner-space", nifti(mni, scanner, name="native.nii.gz"), "not registered to MNI space; the affine is the "
         "identity, as nib.Nifti1Image(array, np.eye(4)) writes: give the image's own affine (its shape is the MNI152 "
         "1mm grid's: save it with jaxtl.data.MNI_AFFINE)"),
        ("signal-outside-brain", nifti(blob, MNI_AFFINE, name="blob.nii.gz"), "inside the MNI152 brain"),
        ("z-scored", nifti(zscored.astype(np.float32), MNI_AFFINE, name="zscored.nii.gz"), "mean intensity"),
        # z-scored, its mean just above 0 by rounding: the mean is judged against the mean |intensity|
        ("z-scored-rounding", nifti((zscored + 1e-3).astype(np.float32), MNI_AFFINE, name="zscored2.nii.gz"),
         "near 0 or below for a mean |intensity|"),
        ("brain-mask", nifti(data.reference_mask().astype(np.float32), MNI_AFFINE, name="mask.nii.gz"),
         "only 2 distinct intensities (0, 1): a mask or label image"),
        ("tissue-labels", nifti((data.reference_mask() * (1 + (mni > 0.4) + (mni > 0.7))).astype(np.uint8),
                                MNI_AFFINE, name="dseg.nii.gz"), "only 4 distinct intensities"),
    ]


def test_malformed_corpus_is_refused_with_file_and_problem(tmp_path, mni):
    corpus = _corpus(tmp_path, mni)
    assert len(corpus) >= 15
    for name, build, fragment in corpus:
        path = build()
        with pytest.raises(InputError) as info:
            load_volume(path)
        message = str(info.value)
        assert str(path) in message, (name, message)
        assert fragment in message, (name, message)
        assert "\n" not in message, (name, message)


def test_non_finite_refusal_counts_them_and_says_how_to_fix(tmp_path):
    arr = np.zeros((20, 24, 20), np.float32)
    arr[5:15, 6:18, 5:15] = np.linspace(0.5, 1.5, 1200).reshape(10, 12, 10)  # the "brain"
    centre = arr[10, 10, 10]
    arr[0, 0, :3] = np.nan  # background NaNs, as some registration tools write
    arr[19, 23, 19] = np.inf
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-80, -110, -75]
    path = _save(nib.Nifti1Image(arr, affine), tmp_path / "nan_background.nii.gz")
    with pytest.raises(InputError) as info:
        load_volume(path)
    message = str(info.value)
    for fragment in [f"{path}: 4 of 9600 voxels are non-finite", "all outside the box around the non-zero (brain) "
                     "voxels, so setting them to 0 is safe", "`fslmaths in -nan out`", "np.nan_to_num("]:
        assert fragment in message, fragment
    arr[10, 10, 10] = np.nan  # inside the brain
    with pytest.raises(InputError, match=r"5 of 9600 .*\(1 inside the box around the non-zero \(brain\) voxels"):
        load_volume(_save(nib.Nifti1Image(arr, affine), tmp_path / "nan_brain.nii.gz"))
    # a masked image's NaN background (SPM), no infinity, no hole in the brain: read as 0, with a warning
    arr[19, 23, 19], arr[10, 10, 10], arr[0, 0, :3] = 0.0, centre, 0.0
    zeros = load_volume(_save(nib.Nifti1Image(arr, affine), tmp_path / "zero_background.nii.gz"), check=False)
    arr[arr == 0] = np.nan
    with pytest.warns(data.InputWarning, match=r"NaN voxels around the brain \(a masked image's background"):
        masked = load_volume(_save(nib.Nifti1Image(arr, affine), tmp_path / "nan_masked.nii.gz"), check=False)
    np.testing.assert_array_equal(masked, zeros)


def test_a_cropped_array_with_the_uncropped_header_is_refused(mni):
    """Peng's input crop saved with the full grid's affine would sit 11-13 mm off: refused with the fix; the same
    crop saved with its own affine (nibabel's slicer) conforms back to the template exactly."""
    img = nib.Nifti1Image(mni, MNI_AFFINE)
    with pytest.raises(InputError, match=r"160x192x160 image with the header of the whole 182x218x182 .*slicer"):
        load_volume(nib.Nifti1Image(mni[data.CROP], MNI_AFFINE))
    cropped = img.slicer[11:171, 13:205, 11:171]
    np.testing.assert_array_equal(conform(cropped)[data.CROP], mni[data.CROP])


def test_refusal_names_in_memory_images_too():
    with pytest.raises(InputError, match=r"<in-memory image>: all-zero volume"):
        load_volume(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), MNI_AFFINE))


# ---------------------------------------------------------------------------------------------------
# Warnings: usable but suspicious inputs


def test_clean_image_gives_no_warning(mni):
    _quiet(load_volume, nib.Nifti1Image(mni, MNI_AFFINE))


def test_unstripped_head_warns(mni):
    brain = data.reference_mask()
    head = scipy.ndimage.binary_dilation(brain, iterations=16) & ~scipy.ndimage.binary_dilation(brain, iterations=6)
    arr = mni + 0.8 * head  # scalp and skull around the brain
    with pytest.warns(InputWarning, match="not skull-stripped.*flirt"):
        load_volume(nib.Nifti1Image(arr.astype(np.float32), MNI_AFFINE))


def test_wrong_contrast_warns(mni):
    inverted = np.where(data.reference_mask(), 1.2 - mni, 0).astype(np.float32)  # T2-like contrast
    with pytest.warns(InputWarning, match="far from the MNI152 T1 template"):
        load_volume(nib.Nifti1Image(inverted, MNI_AFFINE))
    _quiet(load_volume, nib.Nifti1Image(inverted, MNI_AFFINE), check=False)


def test_a_hot_voxel_is_named_as_such_not_as_misregistration(mni):
    """Voxels far outside a brain's intensities (reconstruction or conversion artefacts) had read as "far from the
    template" (they dominate the correlation), outside the brain as not registered (they held most of the
    intensity), negative ones as a z-scored image: the warning names them and how to clip them, nothing else is
    said, and the other checks still see the rest (a mirrored image with a hot voxel is named as mirrored)."""
    rng = np.random.default_rng(0)
    salt = np.zeros(MNI_SHAPE, bool)
    salt[data.reference_mask()] = rng.random(int(data.reference_mask().sum())) < 0.002  # 0.2% of the brain
    cases = {"in the brain": ((91, 109, 91), 1e3), "outside, most of the intensity": ((3, 3, 3), 1e8),
             "negative": ((91, 109, 91), -1e5), "negative, most of the intensity": ((91, 109, 91), -1e8),
             "salt noise": (salt, 1e4)}
    for case, (where, times) in cases.items():
        arr = mni.copy()
        arr[where] = times * mni.max()
        with pytest.warns(InputWarning, match=r"voxel\(s\) far outside the image's intensity range .*"
                                              r"fslmaths IN -max 0 -min") as caught:
            conform(nib.Nifti1Image(arr, MNI_AFFINE))
        assert len(caught) == 1, (case, [str(w.message) for w in caught])
        _quiet(conform, nib.Nifti1Image(arr, MNI_AFFINE), check=False)  # the refusals are not fooled either
    mirrored = np.flip(mni, 1).copy()
    mirrored[91, 109, 91] = 1e3 * mni.max()
    with pytest.warns(InputWarning) as caught:
        conform(nib.Nifti1Image(mirrored, MNI_AFFINE))
    assert [bool(re.search(r"far outside|mirrored anterior-posterior", str(w.message))) for w in caught] == [True] * 2


def test_voxels_mirrored_against_the_header_warn_with_the_axis(mni):
    """A header that does not match the voxels (data reversed along an axis, affine kept) is named as such with its
    world axis, whatever the storage order; a left-right mirror cannot be told from the template and passes."""
    img = _reoriented(nib.Nifti1Image(mni, MNI_AFFINE), perm=(1, 2, 0), flips=(False, True, False))  # y, z, x stored
    _quiet(conform, img)
    arr = np.asarray(img.dataobj)
    for axis, world in ((0, "anterior-posterior"), (1, "superior-inferior")):
        mirrored = nib.Nifti1Image(np.flip(arr, axis).copy(), img.affine)
        with pytest.warns(InputWarning, match=rf"mirrored {world} relative to the header .* with voxel axis {axis} "
                                              r"reversed\).*dcm2niix") as caught:
            conform(mirrored)
        assert len(caught) == 1  # not also "far from the template"
    _quiet(conform, nib.Nifti1Image(np.flip(arr, 2).copy(), img.affine))  # left-right
    assert data.mirrored_axis(arr, img.affine) is None
    assert data.mirrored_axis(np.flip(arr, 0), img.affine)[0] == 0


def test_qform_sform_disagreement_warns_and_uses_sform(mni, tmp_path):
    img = nib.Nifti1Image(mni, MNI_AFFINE)
    qform = MNI_AFFINE.copy()
    qform[0, 3] += 20
    img.header.set_qform(qform, code=1)
    path = _save(img, tmp_path / "qs.nii.gz")
    with pytest.warns(InputWarning, match="qform and sform disagree; using the sform"):
        out = conform(path)
    assert np.array_equal(out, mni)


def test_an_empty_sform_with_a_code_falls_back_to_the_qform(mni, tmp_path):
    """A tool that set sform_code but wrote no sform (all zeros): nibabel's affine would be singular; the valid
    qform places the image, with a warning naming both codes."""
    img = nib.Nifti1Image(mni, None)
    img.header.set_qform(MNI_AFFINE, code=1)
    img.header.set_sform(np.zeros((4, 4)), code=1)
    path = _save(img, tmp_path / "empty_sform.nii.gz")
    with pytest.warns(InputWarning, match=r"the sform \(code 1\) is empty or degenerate; using the qform \(code 1\)"):
        out = conform(path)
    np.testing.assert_allclose(out, mni, atol=1e-5)


def test_missing_orientation_on_mni_shape_warns_and_passes_through(mni, tmp_path):
    header = nib.Nifti1Header()
    header.set_sform(None, code=0)
    header.set_qform(None, code=0)
    path = _save(nib.Nifti1Image(mni, None, header), tmp_path / "raw.nii")
    with pytest.warns(InputWarning, match="no orientation"):
        out = conform(path)
    assert np.array_equal(out, mni)


def test_type_error_for_other_inputs():
    with pytest.raises(TypeError):
        load_volume(np.zeros(MNI_SHAPE))


@pytest.mark.parametrize("scales,perm", [((4.0, 4.0, 4.0), (0, 1, 2)), ((-2.0, 2.0, 2.0), (0, 1, 2)),
                                         ((3.0, -2.5, 3.1), (1, 0, 2))])
def test_axis_aligned_grids_resample_like_scipy(scales, perm):
    """Coarser or permuted axis-aligned grids take the separable path; values equal scipy's trilinear."""
    import scipy.ndimage

    from jaxtl.data import MNI_AFFINE, MNI_SHAPE, _axis_aligned, _to_reference_grid

    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(scales)[:, list(perm)] if perm != (0, 1, 2) else np.diag(scales)
    affine[:3, 3] = [-80.3, -110.7, -60.2] if scales[0] > 0 else [91.4, -125.5, -72.9]
    data = rng.random((50, 60, 55)).astype(np.float32)
    ref_to_img = np.linalg.inv(affine) @ MNI_AFFINE
    assert _axis_aligned(ref_to_img) is not None
    expected = scipy.ndimage.affine_transform(data, ref_to_img[:3, :3], offset=ref_to_img[:3, 3],
                                              output_shape=MNI_SHAPE, output=np.float32, order=1,
                                              mode="constant", cval=0.0, prefilter=False)
    got = _to_reference_grid(data, affine)
    assert (expected != 0).sum() > 1e5
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_analyze_without_an_origin_is_not_placed_where_nibabel_guesses(tmp_path):
    """A plain Analyze 7.5 header has no orientation; nibabel centres a made-up affine on the volume (half a voxel
    and ~18 mm off the MNI grid). On the MNI grid's shape it is taken as that grid, with a warning; else refused."""
    vol = np.random.default_rng(0).random(MNI_SHAPE).astype(np.float32) + 1
    nib.save(nib.AnalyzeImage(vol, MNI_AFFINE), tmp_path / "a.img")
    with pytest.warns(InputWarning, match="an Analyze header without an origin"):
        got = load_volume(tmp_path / "a.img", check=False)
    np.testing.assert_array_equal(got, load_volume(nib.Nifti1Image(vol, MNI_AFFINE), check=False))
    two_mm = np.diag([-2.0, 2, 2, 1]) @ np.eye(4)
    two_mm[:3, 3] = [90, -126, -72]
    small = vol[::2, ::2, ::2][:91, :109, :91]  # an in-memory Analyze image with a real affine is taken as given
    assert load_volume(nib.AnalyzeImage(small, two_mm), check=False).shape == (160, 192, 160)
    nib.save(nib.AnalyzeImage(vol[:120], MNI_AFFINE), tmp_path / "b.img")
    with pytest.raises(InputError, match="b.img: no orientation in the header"):
        load_volume(tmp_path / "b.img", check=False)


def test_normalise_refuses_a_mean_near_zero(mni):
    """An array handed to `normalise` (or `preprocess`) z-scored: its mean is 0 up to rounding, here just above."""
    z = (mni - mni.mean()) / mni.std() + np.float32(1e-4)
    assert z.mean() > 0
    with pytest.raises(ValueError, match=r"mean intensity .* not a z-scored"):
        data.normalise(z.astype(np.float32))
    assert data.normalise(mni).mean() == pytest.approx(1.0, rel=1e-5)


def test_voxels_much_coarser_than_the_network_input_warn(mni):
    """A 2mm image (fMRIPrep's res-2) for a 1mm model is interpolated up: a warning; for a 2mm input, none."""
    img = nib.Nifti1Image(np.ascontiguousarray(mni[::2, ::2, ::2]), MNI_AFFINE @ np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.warns(InputWarning, match=r"voxels of 2 x 2 x 2 mm, much coarser than the 1mm network input"):
        load_volume(img)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_volume(img, downsample=2)
    assert not [w for w in caught if "coarser" in str(w.message)]
