"""Brain MRI input: the reference grid, loading, validating and conforming NIfTI volumes.

`load_volume(path)` = read (nibabel) -> validate -> conform to FSL's MNI152 1mm grid by the image's affine
-> normalise by the mean of the whole conformed volume -> crop to 160x192x160 (Peng / TL `give_mri_data`)
-> optional block-average downsampling. Unusable inputs raise `InputError` (one line: file and problem);
suspicious ones raise an `InputWarning` that says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage

# FSL's MNI152 1mm grid (Peng's SFCN weights; FSL flirt to MNI152_T1_1mm_brain): LAS, 182x218x182. The images must
# be registered LINEARLY (paper-spec 2). UK Biobank's `T1_brain_to_MNI.nii.gz` is the non-linear (FNIRT) output:
# do not use it; apply UK Biobank's linear transform instead, e.g. `flirt -in T1_brain -ref
# $FSLDIR/data/standard/MNI152_T1_1mm_brain -applyxfm -init transforms/T1_to_MNI_linear.mat
# -out T1_brain_to_MNI_linear`.
MNI_SHAPE = (182, 218, 182)
MNI_AFFINE = np.array(
    [[-1.0, 0.0, 0.0, 90.0], [0.0, 1.0, 0.0, -126.0], [0.0, 0.0, 1.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)
# Peng's centre crop of the 182x218x182 grid to the network's 160x192x160 input.
CROP = (slice(11, 171), slice(13, 205), slice(11, 171))
# Bump when load_volume's output for the same file changes: caches prepared before are then refused (prepare again).
# 2 (2026-11-26): Analyze files without an origin go on the MNI grid (version 1 placed them ~18 mm off); caches of
# version 1 without Analyze sources are conformed as version 2 does (jaxtl.cache accepts them).
PREPROCESSING_VERSION = 2
INPUT_SHAPE = (160, 192, 160)

# World-space (mm) bounding box of the MNI152 brain mask that nilearn ships: x, y, z (lo, hi).
MNI_BRAIN_BOX = np.array([[-72.0, 72.0], [-107.0, 73.0], [-72.0, 82.0]])
MIN_FOV_COVERAGE = 0.5  # refuse images whose field of view holds less than this share of the brain box
MIN_SIGNAL_IN_BRAIN = 0.1  # refuse when less than this share of the intensity lies inside the brain mask
MAX_SIGNAL_OUTSIDE_BRAIN = 0.25  # warn (not skull-stripped?) above this share outside the dilated mask
MIN_TEMPLATE_CORRELATION = 0.5  # warn below this correlation with the MNI152 template
# refuse a mean intensity below this share of the mean absolute intensity: a z-scored or difference image, whose
# mean is 0 up to float rounding (a T1's ratio is 1, or just below it where interpolation rang below 0)
MIN_MEAN_TO_ABS_MEAN = 0.1
MAX_MASK_VALUES = 4  # refuse images with this many distinct intensities or fewer: a mask or label image
# Below this correlation, also try the image with each voxel axis reversed (a header that does not match the voxels:
# flipped scans correlate 0.39-0.53, registered ones 0.77-0.88 in the tests' simulated and template images).
CHECK_MIRRORED_BELOW = 0.7
MIRRORED_GAIN = 0.15  # a reversed axis must correlate at least this much better to be called mirrored
# Voxels beyond this multiple of the brain's median intensity (either sign) are artefacts (hot voxels from
# reconstruction or conversion), not anatomy: T1 tissue intensities differ by a few times at most (nilearn's MNI152
# template: its brightest voxel is 1.43x the median of its brain).
HOT_VOXEL_FACTOR = 20.0

_FIX_REGISTRATION = (
    "skull-strip it and register it linearly to MNI152 1mm first "
    "(e.g. FSL bet + flirt -ref MNI152_T1_1mm_brain -dof 12, or ANTs antsRegistrationSyN.sh -t a)"
)

Source = str | os.PathLike | nib.spatialimages.SpatialImage


class InputError(ValueError):
    """An input volume that jaxtl refuses to use; the message names the file and the problem."""


class InputWarning(UserWarning):
    """An input volume that is usable but probably wrongly preprocessed."""


_collecting = threading.local()


@contextlib.contextmanager
def collect_input_warnings():
    """Also collect, into the yielded list, the `InputWarning` messages of the volumes loaded in this thread
    (still warned as usual; filters that silence them do not stop the collecting). Lets a reader attribute
    warnings to scans while other threads load other scans."""
    outer = getattr(_collecting, "messages", None)
    _collecting.messages = messages = []
    try:
        yield messages
    finally:
        _collecting.messages = outer
        if outer is not None:
            outer.extend(messages)


def qc_column(warned: dict, keys) -> np.ndarray:
    """The `qc_warnings` column: for each key, its messages in `warned` joined by " | ", "" for none."""
    return np.array([" | ".join(warned.get(k, [])) for k in keys], dtype=object)


def _warn_input(message: str, stacklevel: int) -> None:
    messages = getattr(_collecting, "messages", None)
    if messages is not None:
        messages.append(message)
    warnings.warn(message, InputWarning, stacklevel=stacklevel + 1)


def input_shape(downsample: int = 1) -> tuple[int, int, int]:
    """Network input shape for a given block-average `downsample` factor (1, 2 or 4)."""
    _check_factor(downsample)
    return tuple(n // downsample for n in INPUT_SHAPE)


def load_volume(source: Source, *, downsample: int = 1, check: bool = True) -> np.ndarray:
    """Load a T1 brain image (path or nibabel image) as the network's float32 input.

    Conforms to the MNI152 1mm grid (`conform`), divides by the mean of the whole conformed volume,
    crops to 160x192x160 and block-averages by `downsample`. `check=False` skips the heuristic
    warnings (skull-stripping, template similarity), never the refusals.
    """
    return preprocess(conform(source, check=check, downsample=downsample), downsample=downsample)


def conform(source: Source, *, check: bool = True, downsample: int | None = None) -> np.ndarray:
    """Return the image on FSL's MNI152 1mm grid (182x218x182, float32), placed by its affine.

    An image already on the grid passes through bit-exact; one on the same 1mm lattice in another
    orientation or field of view is reoriented by exact flips, transposes and integer shifts; any
    other grid (e.g. 2mm, half-voxel offsets, oblique) is resampled with linear interpolation.
    `downsample`: the network input's voxel size (mm) the image is for; voxels much coarser warn.
    """
    img, name = _open(source)
    data = _read_data(img, name)
    affine = _affine(img, name, data.shape)
    if check and downsample is not None:
        _check_voxel_size(affine, downsample, name)
    if data.shape[:3] == INPUT_SHAPE and np.allclose(affine, MNI_AFFINE, atol=1e-3):
        # What a user of Peng's PyTorch code may have saved: the network's input crop, with the full grid's header
        raise InputError(f"{name}: a 160x192x160 image with the header of the whole 182x218x182 MNI152 grid: it "
                         "looks like an array cropped as Peng's input ([11:171, 13:205, 11:171]) and saved without "
                         "updating the header, which would place the brain 11-13 mm off. Give the uncropped image, "
                         "or save the crop with its own affine (the origin moved by the crop: "
                         "nibabel's img.slicer[11:171, 13:205, 11:171] does that)")
    _check_field_of_view(affine, data.shape, name)
    volume = _to_reference_grid(data, affine)
    _check_conformed(volume, name, check, data, affine)
    return volume


def preprocess(volume: np.ndarray, *, downsample: int = 1) -> np.ndarray:
    """Conformed 182x218x182 volume -> normalised, cropped (and downsampled) network input."""
    if volume.shape != MNI_SHAPE:
        raise ValueError(f"expected a conformed {MNI_SHAPE} volume, got shape {volume.shape}; use conform()")
    return block_average(crop(normalise(volume)), downsample)


def normalise(volume: np.ndarray) -> np.ndarray:
    """Divide by the mean over the whole volume, background included (Peng; TL `average`). A mean near 0 or below
    (at most `MIN_MEAN_TO_ABS_MEAN` of the mean |intensity|: z-scored or difference images) is a ValueError."""
    mean, scale = _mean_and_scale(volume)
    if not mean > MIN_MEAN_TO_ABS_MEAN * scale:
        raise ValueError(f"cannot normalise a volume with mean intensity {mean:g} (mean |intensity| {scale:g}): "
                         "expected non-negative T1 intensities, not a z-scored or difference image")
    return (volume / np.float32(mean)).astype(np.float32, copy=False)


def _mean_and_scale(volume: np.ndarray, lowest: float | None = None) -> tuple[float, float]:
    """(mean, mean |intensity|): a T1's mean is its scale; a z-scored or difference image's is near 0 or below
    (`MIN_MEAN_TO_ABS_MEAN`). `lowest`: the volume's minimum, if known."""
    mean = float(np.mean(volume, dtype=np.float64))
    if (float(volume.min()) if lowest is None else lowest) >= 0:  # |x| = x: the same mean, without a pass over |x|
        return mean, mean
    return mean, float(np.mean(np.abs(volume), dtype=np.float64))


def crop(volume: np.ndarray) -> np.ndarray:
    """Peng's centre crop of the 182x218x182 grid to 160x192x160."""
    return volume[CROP]


def block_average(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor^3 blocks (factor 1 returns the input unchanged)."""
    _check_factor(factor)
    if factor == 1:
        return volume
    d, h, w = (n // factor for n in volume.shape)
    blocks = volume[: d * factor, : h * factor, : w * factor].reshape(d, factor, h, factor, w, factor)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32)


def _check_factor(factor: int) -> None:
    if factor not in (1, 2, 4):
        raise ValueError(f"downsample must be 1, 2 or 4, got {factor!r}")


# ---------------------------------------------------------------------------------------------------
# Reading and validation


def _open(source: Source) -> tuple[nib.spatialimages.SpatialImage, str]:
    if isinstance(source, nib.spatialimages.SpatialImage):
        name = source.get_filename() or "<in-memory image>"
        return source, name
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"expected a path or a nibabel image, got {type(source).__name__}")
    path = Path(source)
    name = str(path)
    if path.is_symlink() and not path.exists():
        raise InputError(f"{name}: broken symbolic link (to {os.readlink(path)}): its content is not here, as in a "
                         "DataLad or git-annex dataset not fetched yet; get it (`datalad get PATH`, "
                         "`git annex get PATH`) or copy the file itself")
    if not path.is_file():
        raise InputError(f"{name}: file not found" if not path.exists() else f"{name}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{name}: empty file")
    try:
        with _quiet_nibabel():
            img = _load_path(path)
    except Exception as e:  # nibabel, gzip and zlib raise many types for corrupt files
        raise InputError(
            f"{name}: unreadable or truncated file ({_one_line(e)}); expected NIfTI (.nii, .nii.gz) or .mgz"
        ) from e
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputError(f"{name}: not a volume image ({type(img).__name__})")
    return img, name


@contextlib.contextmanager
def _quiet_nibabel():
    """Silence nibabel's header-fix log lines; our own error says what is wrong."""
    logger = nib.imageglobals.logger
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_path(path: Path) -> nib.spatialimages.SpatialImage:
    lower = path.name.lower()
    if not lower.endswith((".nii", ".nii.gz", ".mgz", ".mgh")):
        return nib.load(path, mmap=False)  # any other format nibabel reads (Analyze, MINC, ...)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        # Decompress in full: unlike nibabel's streaming read this checks the gzip CRC, so a corrupt
        # .nii.gz is refused instead of silently giving garbage voxels.
        raw = gzip.decompress(raw)
    if lower.endswith((".mgz", ".mgh")):
        return nib.MGHImage.from_bytes(raw)
    nifti2 = 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big"))
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)


def _read_data(img: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise InputError(
            f"{name}: {len(shape)}D image of shape {shape}, expected one 3D volume; "
            "extract one, e.g. `fslroi in out 0 1` or nilearn.image.index_img(img, 0)"
        )
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise InputError(f"{name}: 2D data of shape {shape}, expected a 3D brain volume")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InputError(f"{name}: unsupported voxel data type {dtype}, expected real-valued intensities")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # truncated files fail here: EOFError, zlib.error, OSError, ValueError...
        raise InputError(f"{name}: unreadable or truncated image data ({_one_line(e)})") from e
    if isinstance(img.dataobj, np.ndarray) and np.shares_memory(data, img.dataobj):
        data = data.copy()  # never hand out (or later modify) the caller's in-memory array
    data = data.reshape(shape[:3])
    lo, hi = float(data.min()), float(data.max())  # NaN and inf propagate into min/max
    if not (np.isfinite(lo) and np.isfinite(hi)) and _nan_background(data):
        n_nan = int(np.count_nonzero(np.isnan(data)))
        data[np.isnan(data)] = 0.0
        _warn_input(f"{name}: {n_nan} NaN voxels around the brain (a masked image's background, as SPM writes "
                    "it) read as 0", stacklevel=4)
        lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(_non_finite_message(data, name))
    if lo == hi:
        what = "all-zero" if lo == 0 else f"constant (every voxel = {lo:g})"
        raise InputError(f"{name}: {what} volume, no image content")
    values = _few_values(data)
    if values is not None:
        raise InputError(f"{name}: only {values.size} distinct intensities ({', '.join(f'{v:g}' for v in values)}): "
                         "a mask or label image (a brain mask, a tissue segmentation), not a T1-weighted scan; give "
                         "the T1w image itself")
    return data


def _few_values(data: np.ndarray) -> np.ndarray | None:
    """The distinct values of `data` when there are at most `MAX_MASK_VALUES` (a sample first: a T1 has thousands
    in any 1% of its voxels), else None."""
    if np.unique(data.ravel()[::97]).size > MAX_MASK_VALUES:
        return None
    values = np.unique(data)
    return values if values.size <= MAX_MASK_VALUES else None


def _nan_background(data: np.ndarray) -> bool:
    """Whether every non-finite voxel is a NaN connected to the image's border (outside the brain: a masked
    image's background), not a hole in the brain or an infinity."""
    nan = np.isnan(data)
    if not nan.any() or np.isinf(data).any():
        return False
    labels, _ = scipy.ndimage.label(nan)
    border = np.zeros_like(nan)
    border[[0, -1]], border[:, [0, -1]], border[:, :, [0, -1]] = True, True, True
    outside = np.unique(labels[border & nan])
    return bool(np.isin(labels[nan], outside).all())


def _non_finite_message(data: np.ndarray, name: str) -> str:
    """How many NaN/inf voxels, whether they lie within the bounding box of the non-zero (brain) voxels,
    and how to replace them."""
    bad = ~np.isfinite(data)
    n_bad = int(np.count_nonzero(bad))
    brain = np.isfinite(data) & (data != 0)
    if not brain.any():
        where = "and no other voxel is non-zero"
    else:
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in
                    (np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)))
        inside = int(np.count_nonzero(bad[box]))
        where = ("all outside the box around the non-zero (brain) voxels, so setting them to 0 is safe" if not inside
                 else f"{inside} inside the box around the non-zero (brain) voxels: check the image, as zeros "
                      "there leave holes in the brain")
    return (f"{name}: {n_bad} of {data.size} voxels are non-finite, NaN or inf ({where}); replace them, e.g. "
            "`fslmaths in -nan out` (NaN -> 0) or in Python "
            "nib.Nifti1Image(np.nan_to_num(img.get_fdata(), nan=0, posinf=0, neginf=0), img.affine, img.header)")


def _unoriented(name: str, shape: tuple[int, ...], why: str) -> np.ndarray:
    """The header has no orientation (nibabel would make one up, centred on the volume): the MNI grid's affine
    when the shape is the MNI grid's, with a warning, else an `InputError`."""
    if shape == MNI_SHAPE:
        _warn_input(f"{name}: no orientation in the header ({why}); assuming the voxels are already on the "
                    "MNI152 1mm grid", stacklevel=5)
        return MNI_AFFINE.copy()
    raise InputError(f"{name}: no orientation in the header ({why}); save the registration output as NIfTI with "
                     "the sform set to the MNI152 affine")


def _affine(img: nib.spatialimages.SpatialImage, name: str, shape: tuple[int, ...]) -> np.ndarray:
    header = img.header
    if isinstance(header, nib.Nifti1Header):  # also Nifti2Header
        sform, s_code = header.get_sform(coded=True)
        qform, q_code = header.get_qform(coded=True)
        if s_code == 0 and q_code == 0:  # nibabel would fall back to a made-up affine
            return _unoriented(name, shape, "qform_code = sform_code = 0")
    elif isinstance(header, nib.analyze.AnalyzeHeader):  # Analyze 7.5: an origin only in SPM's variant
        made_up = np.allclose(img.affine, header.get_best_affine())  # not an affine given to an in-memory image
        if made_up and ("origin" not in header or not np.any(header["origin"][:3])):
            return _unoriented(name, shape, "an Analyze header without an origin")
    affine = np.asarray(img.affine, dtype=np.float64)
    if isinstance(header, nib.Nifti1Header) and s_code > 0 and q_code > 0 and not _degenerate(qform):
        if _degenerate(sform):  # e.g. a tool that set sform_code but wrote no sform
            _warn_input(f"{name}: the sform (code {int(s_code)}) is empty or degenerate; using the qform (code "
                        f"{int(q_code)}). Check the header, e.g. with `fslhd`", stacklevel=4)
            affine = np.asarray(qform, dtype=np.float64)
        elif not np.allclose(sform, qform, atol=1e-3):
            _warn_input(
                f"{name}: qform and sform disagree; using the sform (as FSL and nibabel do). "
                "Check the registration output, e.g. with `fslhd`", stacklevel=4)
    if affine.shape != (4, 4) or not _finite(affine):
        raise InputError(f"{name}: degenerate affine (non-finite entries); the header is corrupt")
    voxel_sizes = np.linalg.norm(affine[:3, :3], axis=0)
    det = abs(np.linalg.det(affine[:3, :3]))
    if det < 1e-6 or not np.all((voxel_sizes > 0.05) & (voxel_sizes < 20)):
        raise InputError(
            f"{name}: degenerate affine (voxel sizes {np.round(voxel_sizes, 3).tolist()} mm, "
            f"determinant {det:.3g}); the header is corrupt"
        )
    return affine


def _degenerate(a: Any) -> bool:
    """Whether an sform/qform cannot place voxels: missing, non-finite or (near-)singular."""
    return not _finite(a) or abs(np.linalg.det(np.asarray(a, np.float64)[:3, :3])) < 1e-6


def _check_voxel_size(affine: np.ndarray, downsample: int, name: str) -> None:
    """Warn when the image's voxels are much coarser (> 1.5x) than the network input's `downsample` mm: upsampled by
    interpolation, the image lacks the detail the model was trained on (e.g. fMRIPrep's res-2 outputs)."""
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if sizes.max() > 1.5 * downsample:
        _warn_input(f"{name}: voxels of {' x '.join(f'{v:.3g}' for v in sizes)} mm, much coarser than the "
                    f"{downsample}mm network input: interpolated up, the image lacks the detail the model was trained "
                    "on; give the scan registered with 1mm output voxels (e.g. flirt -ref MNI152_T1_1mm_brain)",
                    stacklevel=4)


def _finite(a: Any) -> bool:
    return a is not None and bool(np.all(np.isfinite(a)))


def _check_field_of_view(affine: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    """Refuse images whose field of view misses most of the MNI152 brain (not registered)."""
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in shape[:3]], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    lo, hi = world.min(axis=1), world.max(axis=1)
    box = MNI_BRAIN_BOX
    overlap = np.clip(np.minimum(hi, box[:, 1]) - np.maximum(lo, box[:, 0]), 0, None)
    coverage = float(np.prod(overlap) / np.prod(box[:, 1] - box[:, 0]))
    if coverage < MIN_FOV_COVERAGE:
        span = ", ".join(f"{a} {round(lo[i]):d}..{round(hi[i]):d}" for i, a in enumerate("xyz"))
        raise InputError(
            f"{name}: field of view ({span} mm) covers {coverage:.0%} of the MNI152 brain: "
            f"not registered to MNI space; {_identity_hint(affine, shape)}{_FIX_REGISTRATION}"
        )


def _identity_hint(affine: np.ndarray, shape: tuple[int, ...]) -> str:
    """What to say when the affine is the identity: an array saved as nib.Nifti1Image(arr, np.eye(4)), whose voxels
    may well be on the MNI grid, rather than a scan that was not registered."""
    if not np.allclose(affine, np.eye(4)):
        return ""
    grid = (" (its shape is the MNI152 1mm grid's: save it with jaxtl.data.MNI_AFFINE)" if tuple(shape[:3]) == MNI_SHAPE
            else "")
    return (f"the affine is the identity, as nib.Nifti1Image(array, np.eye(4)) writes: give the image's own affine"
            f"{grid}; if it is not registered, ")


def _hot_voxels(volume: np.ndarray, in_brain: np.ndarray, lowest: float, highest: float
                ) -> tuple[np.ndarray, float] | None:
    """(mask, the brain's median) of the voxels beyond `HOT_VOXEL_FACTOR` times that median in absolute value (the
    median: a few thousand hot voxels do not move it); None when there are none. `in_brain`: the voxels in the
    reference brain mask; `lowest`, `highest`: the volume's minimum and maximum."""
    brain = in_brain[in_brain > 0]
    if brain.size == 0:
        return None
    typical = float(np.median(brain))
    if max(-lowest, highest) <= HOT_VOXEL_FACTOR * typical:
        return None
    return np.abs(volume) > HOT_VOXEL_FACTOR * typical, typical


def _check_conformed(volume: np.ndarray, name: str, check: bool, data: np.ndarray, affine: np.ndarray) -> None:
    # Every pass over the 7.2M voxels counts (each image of a cohort is checked): the minimum spares the hot-voxel
    # mask, the pass over |x| and the clipped copy of an image without negative values, most T1s.
    lowest, highest = float(volume.min()), float(volume.max())
    in_brain = volume[reference_mask()]
    hot = _hot_voxels(volume, in_brain, lowest, highest)
    if hot is not None:
        far, typical = hot
        cap = np.float32(HOT_VOXEL_FACTOR * typical)
        if check:
            extreme = float(volume[far][np.argmax(np.abs(volume[far]))])
            _warn_input(
                f"{name}: {int(far.sum())} voxel(s) far outside the image's intensity range (up to {extreme:.4g}, "
                f"{abs(extreme) / typical:.3g}x the brain's median {typical:.4g}): an artefact of reconstruction or "
                "conversion, not anatomy; it skews the mean the image is divided by and the features. Clip the image "
                f"(e.g. fslmaths IN -max 0 -min {cap:.4g} OUT) and check it in a viewer", stacklevel=3)
        # the checks below judge the rest of the image: those voxels read as the brain's median
        volume = np.where(far, np.float32(typical), volume)
        lowest, in_brain = float(volume.min()), volume[reference_mask()]
    mean, scale = _mean_and_scale(volume, lowest)
    if not mean > MIN_MEAN_TO_ABS_MEAN * scale:
        raise InputError(
            f"{name}: mean intensity {mean:g} on the MNI grid, near 0 or below for a mean |intensity| of {scale:g}; "
            "expected a T1 with non-negative intensities (not a z-scored or difference image)"
        )
    signal = volume if lowest >= 0 else np.clip(volume, 0, None)
    total = float(signal.sum(dtype=np.float64))
    inside = float(np.maximum(in_brain, 0).sum(dtype=np.float64)) / total  # signal[reference_mask()]
    if inside < MIN_SIGNAL_IN_BRAIN:
        raise InputError(
            f"{name}: only {inside:.0%} of the intensity lies inside the MNI152 brain: not registered "
            f"to MNI space; {_identity_hint(affine, data.shape)}{_FIX_REGISTRATION}"
        )
    if not check:
        return
    outside = float(signal[_outside_mask()].sum(dtype=np.float64)) / total
    if outside > MAX_SIGNAL_OUTSIDE_BRAIN:
        _warn_input(
            f"{name}: {outside:.0%} of the intensity lies outside the MNI152 brain: the image looks "
            f"not skull-stripped (or badly registered); {_FIX_REGISTRATION}", stacklevel=3)
        return
    r = template_correlation(volume)
    if r < CHECK_MIRRORED_BELOW and hot is not None:  # the raw voxels too, without the hot ones
        data = np.where(np.abs(data) > cap, np.float32(typical), data)
    mirrored = mirrored_axis(data, affine, r) if r < CHECK_MIRRORED_BELOW else None
    if mirrored is not None:
        axis, r_flipped = mirrored
        world = ("left-right", "anterior-posterior", "superior-inferior")[int(np.argmax(np.abs(affine[:3, axis])))]
        _warn_input(
            f"{name}: the brain looks mirrored {world} relative to the header (correlation with the MNI152 T1 "
            f"template {r:.2f}, {r_flipped:.2f} with voxel axis {axis} reversed): the header's orientation does not "
            "match the voxels, as when a tool reorders them without updating the affine. Convert the scan again "
            "(e.g. dcm2niix) or correct its affine, check it over the MNI152 template in a viewer "
            "(e.g. fsleyes), and register it again", stacklevel=3)
    elif r < MIN_TEMPLATE_CORRELATION:
        _warn_input(
            f"{name}: intensity profile far from the MNI152 T1 template (correlation {r:.2f}); expected a "
            f"skull-stripped T1-weighted image linearly registered to MNI152; {_FIX_REGISTRATION}", stacklevel=3)


def mirrored_axis(data: np.ndarray, affine: np.ndarray, r: float | None = None) -> tuple[int, float] | None:
    """(voxel axis, correlation) when reversing one voxel axis of `data` (the header kept) brings the image much
    closer to the MNI152 template: its correlation at least `MIRRORED_GAIN` above `r` (the image's own) and at
    least `MIN_TEMPLATE_CORRELATION`. A left-right mirror cannot show this way (brains are nearly symmetric)."""
    if r is None:
        r = template_correlation(_to_reference_grid(data, affine))
    best = None
    for axis in range(3):
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1.0, data.shape[axis] - 1  # voxel i -> n - 1 - i
        r_flipped = template_correlation(_to_reference_grid(data, affine @ flip))
        if r_flipped >= max(MIN_TEMPLATE_CORRELATION, r + MIRRORED_GAIN) and (best is None or r_flipped > best[1]):
            best = (axis, r_flipped)
    return best


def template_correlation(volume: np.ndarray) -> float:
    """Pearson correlation with the MNI152 T1 template inside the dilated brain mask."""
    b, bb = _centred_template()
    a = volume[reference_mask(dilated=True)].astype(np.float64)
    a -= a.mean()
    denom = np.sqrt(np.dot(a, a) * bb)
    return float(np.dot(a, b) / denom) if denom > 0 else 0.0


@functools.cache
def _centred_template() -> tuple[np.ndarray, float]:
    """The template inside the dilated mask minus its mean, and its sum of squares (`template_correlation`)."""
    b = reference_template()[reference_mask(dilated=True)].astype(np.float64)
    b -= b.mean()
    b.flags.writeable = False
    return b, float(np.dot(b, b))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no details"
    return f"{type(e).__name__}: {text[:200]}"


# ---------------------------------------------------------------------------------------------------
# Conforming to the reference grid


def _to_reference_grid(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    # Maps a reference voxel index to the image voxel index that lies at the same world position.
    ref_to_img = np.linalg.inv(affine) @ MNI_AFFINE
    axis_map = _axis_map(ref_to_img)
    if axis_map is not None:
        return _reorient_and_shift(data, *axis_map)
    scaled = _axis_aligned(ref_to_img)
    if scaled is not None:
        return _separable_linear(data, *scaled)
    return scipy.ndimage.affine_transform(
        data,
        ref_to_img[:3, :3],
        offset=ref_to_img[:3, 3],
        output_shape=MNI_SHAPE,
        output=np.float32,
        order=1,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )


def _axis_map(ref_to_img: np.ndarray) -> tuple[list[int], list[int], list[int]] | None:
    """(perm, signs, shifts) if the map is a signed axis permutation plus integer shift, else None.

    Tolerances keep the accumulated error below ~0.01 voxel over the grid, far below interpolation error.
    """
    rot, trans = ref_to_img[:3, :3], ref_to_img[:3, 3]
    signed = np.round(rot)
    if not np.allclose(rot, signed, atol=5e-5) or not np.allclose(trans, np.round(trans), atol=1e-3):
        return None
    if not (np.all(np.abs(signed).sum(axis=0) == 1) and np.all(np.abs(signed).sum(axis=1) == 1)):
        return None
    perm = [int(np.argmax(np.abs(signed[:, c]))) for c in range(3)]  # image axis for each reference axis
    signs = [int(signed[perm[c], c]) for c in range(3)]
    shifts = [int(round(trans[perm[c]])) for c in range(3)]
    return perm, signs, shifts


def _axis_aligned(ref_to_img: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """(perm, scales, offsets) if each reference axis maps to one image axis (scaling, flip, shift), else None."""
    rot, trans = ref_to_img[:3, :3], ref_to_img[:3, 3]
    nonzero = np.abs(rot) > 1e-6 * np.abs(rot).max()
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    perm = [int(np.argmax(nonzero[:, c])) for c in range(3)]
    return perm, np.array([rot[perm[c], c] for c in range(3)]), np.array([trans[perm[c]] for c in range(3)])


def _lerp_axis(data: np.ndarray, axis: int, n_out: int, scale: float, offset: float) -> np.ndarray:
    """Linear interpolation along one axis at input coordinates scale * i + offset, i < n_out; zero where
    the coordinate falls outside [0, n_in - 1] (scipy.ndimage's mode="constant")."""
    n_in = data.shape[axis]
    x = scale * np.arange(n_out, dtype=np.float64) + offset
    inside = (x >= -1e-6) & (x <= n_in - 1 + 1e-6)
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1, 1, 1]
    shape[axis] = n_out
    f = (x - i0).astype(np.float32).reshape(shape)
    a = np.take(data, i0, axis=axis)
    out = a + (np.take(data, i1, axis=axis) - a) * f
    out *= inside.astype(np.float32).reshape(shape)
    return out


def _separable_linear(data: np.ndarray, perm: list[int], scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Trilinear resampling for an axis-aligned grid (e.g. 2mm or 4mm MNI data), one axis at a time: the
    values of `scipy.ndimage.affine_transform(order=1, mode="constant")`, several times faster."""
    data = data.transpose(perm).astype(np.float32, copy=False)
    for axis in range(3):
        data = _lerp_axis(data, axis, MNI_SHAPE[axis], scales[axis], offsets[axis])
    return np.ascontiguousarray(data, dtype=np.float32)


def _reorient_and_shift(data: np.ndarray, perm: list[int], signs: list[int], shifts: list[int]) -> np.ndarray:
    """Exact resampling for a signed axis permutation + integer shift; zero outside the field of view."""
    data = data.transpose(perm)
    if data.shape == MNI_SHAPE and signs == [1, 1, 1] and shifts == [0, 0, 0]:
        return np.ascontiguousarray(data)  # already on the grid: bit-exact pass-through
    out = np.zeros(MNI_SHAPE, dtype=np.float32)
    dst, src = [], []
    for n_ref, n_img, s, t in zip(MNI_SHAPE, data.shape, signs, shifts, strict=True):
        # reference index i reads image index s * i + t
        if s == 1:
            lo, hi = max(0, -t), min(n_ref, n_img - t)
            src_slice = slice(lo + t, hi + t)
        else:
            lo, hi = max(0, t - n_img + 1), min(n_ref, t + 1)
            stop = t - hi
            src_slice = slice(t - lo, stop if stop >= 0 else None, -1)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(src_slice)
    out[tuple(dst)] = data[tuple(src)]
    return out


# ---------------------------------------------------------------------------------------------------
# Reference template and brain mask (nilearn's MNI152 2009 template, conformed to the FSL grid)


@functools.cache
def reference_template() -> np.ndarray:
    """nilearn's MNI152 T1 template (skull-stripped) on the reference grid, float32, read-only."""
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    vol = _to_reference_grid(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    vol.flags.writeable = False
    return vol


@functools.cache
def reference_mask(dilated: bool = False) -> np.ndarray:
    """nilearn's MNI152 brain mask on the reference grid (dilated by 5 voxels if `dilated`)."""
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=1)
    mask = _to_reference_grid(np.asarray(img.dataobj, dtype=np.float32), img.affine) > 0.5
    if dilated:
        mask = scipy.ndimage.binary_dilation(mask, iterations=5)
    mask.flags.writeable = False
    return mask


@functools.cache
def _outside_mask() -> np.ndarray:
    """The reference grid outside the dilated brain mask."""
    mask = ~reference_mask(dilated=True)
    mask.flags.writeable = False
    return mask
