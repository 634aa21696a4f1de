"""Batched, jitted inference: `embed` (features) and `predict` (age or P(male)).

Inputs are preprocessed arrays (see `embed` for the contract), NIfTI paths / nibabel images (loaded
and conformed with `jaxtl.data.load_volume`, streamed batch by batch so memory stays bounded), a `Cohort`,
a cohort file (CSV/TSV table, `.txt` list of paths) or directory, a prepared cache directory, or any
random-access source whose items hold an "image". Each batch is padded to a fixed size (one compilation
per input shape) and sharded over all local devices on a 1-D "data" mesh; parameters are replicated.
With `on_error="skip"`, NIfTI scans that cannot be loaded or conformed get NaN rows (`SkippedScansWarning`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxtl.conv import default_platform, trace_settings
from jaxtl.model import SFCN, WEIGHTS, check_compute_dtype, jit_on_mesh
from jaxtl.weights import JaxtlModel, load_model

LAYERS = ("features", "logits", "probs")  # plus "block0".."block{n-1}": pooled output of each conv block
TABLE_SUFFIXES = (".csv", ".tsv", ".txt")
ON_ERROR = ("raise", "skip")
MAX_LISTED_FAILURES = 5  # failures named in the warning; all of them are in `SkippedScansWarning.failures`


@dataclasses.dataclass(frozen=True)
class SkippedScan:
    """A scan that `on_error="skip"` left out: its position in the input, its file and why (one line)."""

    index: int
    path: str
    reason: str


class SkippedScansWarning(UserWarning):
    """Scans that could not be loaded and got NaN rows; `.failures` holds a `SkippedScan` for each."""

    def __init__(self, message: str, failures: Sequence[SkippedScan] = ()):
        super().__init__(message)
        self.failures = tuple(failures)


def layer_names(model: JaxtlModel | SFCN) -> tuple[str, ...]:
    """Every layer `embed` can return for this model."""
    return LAYERS + tuple(f"block{i}" for i in range(len(_unwrap(model).channels)))


def _layer_output(model: SFCN, x: jax.Array, layer: str) -> jax.Array:
    if layer == "features":
        return model.features(x)
    if layer == "logits":
        return model(x)
    if layer == "probs":
        return jnp.exp(model(x))
    return model.block_outputs(x)[int(layer[5:])].astype(jnp.float32).mean(axis=(1, 2, 3))


def _check_layer(model: SFCN, layer: str) -> None:
    names = layer_names(model)
    if layer not in names:
        raise ValueError(f"unknown layer {layer!r}; use one of {', '.join(names)}")


def _jitted(layer: str, mesh: jax.sharding.Mesh):
    # keyed on what the trace reads: what conv_impl="auto" means now ($JAXTL_CONV_IMPL may change between calls),
    # the kernels' tunings
    return _jitted_for(layer, mesh, trace_settings())


@functools.cache
def _jitted_for(layer: str, mesh: jax.sharding.Mesh, settings: tuple):
    def apply(graphdef, state, x):  # also whether each volume is finite (max-pooling on CPU would hide NaN)
        return _layer_output(nnx.merge(graphdef, state), x, layer), jnp.isfinite(x).reshape(len(x), -1).all(axis=1)

    return jit_on_mesh(apply, mesh)


def _data_mesh() -> jax.sharding.Mesh:
    """All local devices of the default device's platform (`with jax.default_device("cpu")` embeds on the host
    of a GPU machine). Auto axes: the compiler propagates the batch sharding through the network (no
    sharding-in-types rules for every reshape inside the model)."""
    devices = jax.local_devices(backend=default_platform())
    return jax.make_mesh((len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))


# ------------------------------------------------------------------------------------------------
# Inputs


def check_reader_options(on_error: Any, workers: Any) -> None:
    """`on_error`: "raise" or "skip"; `workers`: None (the default, up to 4 threads) or a whole number >= 1."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int | np.integer)
                                or workers < 1):
        raise ValueError(f"workers must be None or a whole number >= 1 (threads loading scans), got {workers!r}")


def check_batch_options(batch_size: Any, dtype: Any) -> None:
    """`batch_size`: None or a whole number >= 1; `dtype`: None or one the network computes in."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}: give a positive number of volumes per batch (or None)")
    if dtype is not None:
        check_compute_dtype(dtype)


class VolumeReader:
    """Uniform random access to volumes given in any of the accepted forms.

    `len(reader)` volumes; `reader.read(start, stop)` -> `(m, D, H, W)`, float32 or the 16-bit float type the
    volumes have (a prepared cache is float16 by default): the network casts to its compute dtype on the device,
    so 16-bit volumes are copied there at half the bytes with the same result; a `jax.Array` given as the volumes
    is read as slices of it, on its device. Paths and images are
    loaded with `load_volume(downsample=...)` on `workers` threads, only when read.
    `on_error="skip"`: a NIfTI scan (path, image, `NiftiSource` item; `InputError` from any source) that
    fails to load is read as zeros and recorded in `reader.failures`; anything else still raises.
    """

    def __init__(self, volumes: Any, *, downsample: int = 1, check: bool = True, workers: int | None = None,
                 on_error: Literal["raise", "skip"] = "raise"):
        check_reader_options(on_error, workers)
        self.downsample, self.check, self.on_error = downsample, check, on_error
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._array = None
        self._items: Any = None
        self._kind = ""
        self._failures: dict[int, SkippedScan] = {}
        self._warned: dict[int, list[str]] = {}
        self._mean_checked = False
        self._setup(volumes, on_error)

    @property
    def in_memory(self) -> bool:
        """True for an array of volumes (nothing to load)."""
        return self._kind == "array"

    @property
    def failures(self) -> tuple[SkippedScan, ...]:
        """Scans skipped so far (`on_error="skip"`), in input order."""
        return tuple(self._failures[i] for i in sorted(self._failures))

    def qc_warnings(self) -> np.ndarray:
        """Per volume, the `InputWarning`s of loading it joined by " | " ("" for none; a prepared cache: those
        `jaxtl prepare` recorded). Loaded volumes only: complete once every volume was read."""
        from jaxtl.data import qc_column

        if self._kind == "source" and hasattr(self._items, "qc_warnings"):
            return self._items.qc_warnings()
        return qc_column(self._warned, range(len(self)))

    def _setup(self, volumes: Any, on_error: str) -> None:
        from jaxtl.cohort import Cohort, Scan

        if hasattr(volumes, "iloc") and hasattr(volumes, "to_numpy"):  # pandas: rows by position, not index label
            volumes = _pandas_column(volumes)
        if isinstance(volumes, np.ndarray) and volumes.dtype.kind in "USO":  # paths (or images) as an array
            volumes = volumes.tolist()
        if isinstance(volumes, np.ndarray | jax.Array):
            arr = volumes
            if arr.ndim == 5 and arr.shape[1] == 1:  # NCDHW, as Peng's PyTorch code feeds SFCN
                arr = arr[:, 0]
            elif arr.ndim == 5 and arr.shape[-1] == 1:  # NDHWC
                arr = arr[..., 0]
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim == 4 and arr.shape[-1] == 1 and min(arr.shape[1:3]) > 1:
                raise ValueError(f"an array of shape {arr.shape} reads as {arr.shape[0]} volumes of shape "
                                 f"{arr.shape[1:]}; one volume with a channel axis is (1, D, H, W, 1): add the "
                                 "batch axis (x[None])")
            if arr.ndim != 4:
                raise ValueError(f"expected preprocessed volumes of shape (N, D, H, W), (N, 1, D, H, W) or "
                                 f"(N, D, H, W, 1), got {arr.shape}")
            self._array, self._kind = arr, "array"
            return
        if isinstance(volumes, str | os.PathLike):
            volumes = _open_path(Path(volumes), self.downsample, on_error)
        if isinstance(volumes, nib.spatialimages.SpatialImage):
            volumes = [volumes]
        if isinstance(volumes, Cohort):
            volumes = list(volumes.paths)
        if isinstance(volumes, Sequence) and not isinstance(volumes, str):
            # a filtered list of a Cohort's scans ([s for s in cohort if ...]) reads as their paths
            self._items = [v.path if isinstance(v, Scan) else v for v in volumes]
            self._kind = "items"
        elif hasattr(volumes, "__getitem__") and hasattr(volumes, "__len__"):
            self._items, self._kind = volumes, "source"  # CacheSource, NiftiSource, grain sources
        else:
            raise ValueError(f"cannot read volumes from {type(volumes).__name__}; pass an (N, D, H, W) array, "
                             "paths or nibabel images, a Cohort, a cohort file/directory or a cache directory")

    def __len__(self) -> int:
        return len(self._array) if self._kind == "array" else len(self._items)

    def _one(self, i: int) -> np.ndarray:
        item = self._items[i]
        if self._kind == "source":
            item = item["image"] if isinstance(item, dict) else item
        if _is_file_item(item):
            from jaxtl.data import load_volume

            return load_volume(item, downsample=self.downsample, check=self.check)
        arr = _input_array(np.asarray(item))
        if arr.ndim == 4 and arr.shape[0] == 1:  # CDHW
            arr = arr[0]
        elif arr.ndim == 4 and arr.shape[-1] == 1:  # DHWC
            arr = arr[..., 0]
        if arr.ndim != 3:
            raise ValueError(f"volume {i}: expected a (D, H, W) array (or (1, D, H, W), (D, H, W, 1)), "
                             f"got shape {arr.shape}")
        return arr

    def _try(self, i: int) -> np.ndarray | SkippedScan:
        """`_one(i)`, or with `on_error="skip"` the `SkippedScan` of a NIfTI scan that failed to load."""
        from jaxtl.data import collect_input_warnings

        try:
            with collect_input_warnings() as warned:  # this thread's: the pool's threads load other scans
                volume = self._one(i)
            if warned:
                self._warned[i] = warned
            return volume
        except Exception as e:  # nibabel, gzip, scipy, ... raise many types; one bad scan must not stop the rest
            if self.on_error == "raise" or not self._skippable(i, e):
                raise
            from jaxtl.data import InputError

            path = self._name(i)
            reason = " ".join(str(e).split())
            if not isinstance(e, InputError):  # InputErrors name the file; other errors get its name here
                reason = f"{path}: {type(e).__name__}: {reason}"
            return SkippedScan(i, path, reason)

    def _skippable(self, i: int, error: Exception) -> bool:
        from jaxtl.cache import NiftiSource
        from jaxtl.data import InputError

        if self._kind == "items":
            return isinstance(self._items[i], str | os.PathLike | nib.spatialimages.SpatialImage)
        return isinstance(self._items, NiftiSource) or isinstance(error, InputError)

    def _name(self, i: int) -> str:
        item = self._items[i] if self._kind == "items" else None
        if isinstance(item, nib.spatialimages.SpatialImage):
            return item.get_filename() or f"<in-memory image {i}>"
        if item is not None:
            return str(item)
        paths = getattr(self._items, "paths", None)
        return str(paths[i]) if paths is not None else f"volume {i}"

    def _fill_shape(self) -> tuple[int, ...]:
        """Shape of the zeros standing in for skipped scans when no scan of the batch loaded."""
        from jaxtl.cache import NiftiSource
        from jaxtl.data import input_shape

        if isinstance(self._items, NiftiSource):
            return input_shape(self._items.downsample)
        if self._kind == "source" and hasattr(self._items, "shape"):
            return tuple(self._items.shape)
        return input_shape(self.downsample)

    def read(self, start: int, stop: int, pool: concurrent.futures.Executor | None = None) -> np.ndarray | jax.Array:
        if self._kind == "array":
            batch = _input_array(self._array[start:stop])  # a jax.Array stays on its device: no host round trip
            if self.check and not self._mean_checked:
                self._mean_checked = True  # the first batch: arrays come preprocessed alike
                _warn_if_unnormalised(batch, start)
            return batch
        idx = range(start, stop)
        vols = list(pool.map(self._try, idx)) if pool is not None and len(idx) > 1 else [self._try(i) for i in idx]
        loaded = [v for v in vols if isinstance(v, np.ndarray)]
        shapes = {v.shape for v in loaded}
        if len(shapes) > 1:
            raise ValueError(f"volumes {start}..{stop - 1} have different shapes {sorted(shapes)}")
        if self.on_error == "skip":
            for i, v in zip(idx, vols, strict=True):
                if isinstance(v, SkippedScan):
                    self._failures[i] = v
                else:
                    self._failures.pop(i, None)  # read again, and loaded this time
        if len(loaded) < len(vols):  # skipped scans: zeros in their rows (callers set their outputs to NaN)
            shape = next(iter(shapes)) if shapes else self._fill_shape()
            dtype = loaded[0].dtype if loaded else np.float32
            vols = [v if isinstance(v, np.ndarray) else np.zeros(shape, dtype) for v in vols]
        batch = np.stack(vols)
        if self.check and not self._mean_checked and self._kind == "items" and not any(
                _is_file_item(self._items[i]) for i in idx):
            self._mean_checked = True  # a list of arrays: checked as an array is (files: by load_volume)
            _warn_if_unnormalised(batch, start)
        return batch

    def shape(self) -> tuple[int, ...]:
        if self._kind == "array":
            return tuple(self._array.shape[1:])
        if self._kind == "source" and hasattr(self._items, "shape"):
            return tuple(self._items.shape)
        return tuple(self._one(0).shape)


def _is_file_item(item: Any) -> bool:
    """A path or nibabel image, loaded (and checked) by `load_volume`, not an array given as it is."""
    return isinstance(item, str | os.PathLike | nib.spatialimages.SpatialImage)


_KEPT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16))
MEAN_RANGE = (0.5, 2.0)  # a volume divided by its mean over the whole grid: about 1.46 over Peng's crop
MEAN_SLICE_STEP = 4  # host arrays' means are taken over every 4th slice (first axis) of volumes 64 slices or more


def _warn_if_unnormalised(batch: np.ndarray | jax.Array, start: int) -> None:
    """An `InputWarning` when a volume of an array batch is far from Peng's intensity normalisation (divided by the
    mean: raw scanner intensities, z-scores and such gave other ages without a word)."""
    from jaxtl.data import InputWarning

    if isinstance(batch, jax.Array):  # on its device: only the means come back
        means = np.asarray(jnp.mean(batch.reshape(len(batch), -1).astype(jnp.float32), axis=1), np.float64)
    else:  # every 4th slice of a 1mm or 2mm volume: a range check needs no more, and the first batch waits for it
        # (all of a batch of 8 at 1mm took ~30-45 ms, more than a GPU's step)
        step = MEAN_SLICE_STEP if batch.shape[1] >= 64 else 1
        means = batch[:, ::step].mean(axis=tuple(range(1, batch.ndim)), dtype=np.float64)
    # not finite: refused with its batch on the device (InputError)
    bad = np.flatnonzero(np.isfinite(means) & ((means < MEAN_RANGE[0]) | (means > MEAN_RANGE[1])))
    if bad.size:
        warnings.warn(InputWarning(
            f"volume {start + bad[0]} has mean intensity {means[bad[0]]:.3g} ({bad.size} of the first "
            f"{len(batch)} outside {MEAN_RANGE[0]}-{MEAN_RANGE[1]}): SFCN expects each volume divided by its mean "
            "(about 1.46 over the 160x192x160 crop of the MNI grid); load scans with jaxtl.load_volume, or divide "
            "each array by its mean before cropping (check=False silences this)"), stacklevel=2)


def _pandas_column(frame: Any) -> np.ndarray:
    """A pandas Series (or a DataFrame's 'path' column, or its only column) as an array, in row order."""
    if hasattr(frame, "columns"):
        columns = list(frame.columns)
        if "path" in columns:
            frame = frame["path"]
        elif len(columns) == 1:
            frame = frame[columns[0]]
        else:
            raise ValueError(f"a DataFrame with columns {columns[:8]}: pass its column of image paths (df['path'])")
    return frame.to_numpy()


def _input_array(a: Any) -> np.ndarray | jax.Array:
    """`a` (a jax.Array, else as a numpy array) unchanged where it is float32, float16 or bfloat16, else as float32."""
    a = a if isinstance(a, jax.Array) else np.asarray(a)
    return a if a.dtype in _KEPT_DTYPES else a.astype(np.float32)


def _open_path(path: Path, downsample: int, on_error: str):
    """A cache directory, a cohort (BIDS directory, folder of images, CSV/TSV table or .txt list) or a single image
    file. A cohort's labels are not read as required (embedding needs none); with `on_error="skip"` its missing
    images, like a missing single image, are scans that fail to load (NaN rows), not an error here."""
    from jaxtl.cache import CacheSource, read_index
    from jaxtl.cohort import NIFTI_SUFFIXES, read_cohort

    skip = on_error == "skip"
    if not path.exists():
        if skip and path.name.lower().endswith(NIFTI_SUFFIXES):
            return [path]
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "index.json").exists():
            index = read_index(path)
            if int(index.get("downsample", 1)) != downsample:
                raise ValueError(f"{path}: cache prepared with downsample {index.get('downsample', 1)}, the model "
                                 f"expects downsample {downsample}; prepare the cache with --downsample {downsample}")
            return CacheSource(path)
        return read_cohort(path, check_files=not skip, labels_required=False)
    if path.suffix.lower() in TABLE_SUFFIXES:
        return read_cohort(path, check_files=not skip, labels_required=False)
    return [path]


# ------------------------------------------------------------------------------------------------
# Running the network


def _batch_size(n: int, batch_size: int | None, n_dev: int) -> int:
    """The batch `apply_batched` runs `n` volumes in on `n_dev` devices, `batch_size` (None: the default) at most."""
    batch_size = batch_size or max(8, 2 * n_dev)
    # a multiple of the device count, never above the one asked for (it may bound memory), one volume per device
    # at least
    batch_size = max(1, batch_size // n_dev) * n_dev
    if n < batch_size:  # few volumes: a power-of-two batch per device, not a mostly padded full one
        batch_size = min(batch_size, n_dev * (1 << max(0, math.ceil(math.log2(-(-n // n_dev))))))
    else:  # about equal batches, so that the last is not mostly padding (10 volumes: 2 x 6, not 2 x 8), in
        # steps of a quarter of the batch size per device (at most 5 batch shapes to compile)
        cap = batch_size // n_dev
        step = max(1, cap // 4)
        per_device = -(-n // -(-n // batch_size) // n_dev)
        batch_size = min(cap, -(-per_device // step) * step) * n_dev
    return batch_size


def _shape_error(shape: tuple, expected: tuple, arrays: bool, downsample: int, model_ds: int | None) -> str:
    """What to do about volumes of `shape` given to a model trained on `expected` (`model_ds`: its downsampling)."""
    ds = downsample if model_ds is None else model_ds
    message = f"volumes of shape {shape}, but the model expects {expected} (its preprocessing: downsample {ds})"
    if arrays:
        return (f"{message}; arrays must be preprocessed as its training volumes were: "
                f"jaxtl.load_volume(path, downsample={ds}), or pass the image paths")
    if downsample != ds:
        return f"{message}; the scans were loaded with downsample={downsample}: leave downsample= out"
    return message


def apply_batched(model: SFCN, volumes: Any, layer: str = "features", *, batch_size: int | None = None,
                  progress: bool = True, dtype=None, downsample: int = 1, check: bool = True,
                  expected_shape: Sequence[int] | None = None, expected_downsample: int | None = None,
                  workers: int | None = None) -> np.ndarray:
    """Run `model` in eval mode over `volumes` in padded, sharded batches; `(N, ...)` float32 outputs.

    The next batch is read (paths: loaded and conformed on `workers` threads) while the current one runs.
    Rows of scans a `VolumeReader(on_error="skip")` skipped are NaN. `expected_shape`: the volume shape the model
    was trained on (`expected_downsample`: its downsampling); volumes of another shape are refused, saying what to do.
    """
    _check_layer(model, layer)
    check_batch_options(batch_size, dtype)
    reader = volumes if isinstance(volumes, VolumeReader) else VolumeReader(
        volumes, downsample=downsample, check=check, workers=workers)
    n = len(reader)
    if n == 0:
        raise ValueError("no volumes to process")
    mesh = _data_mesh()
    n_dev = mesh.size
    batch_size = _batch_size(n, batch_size, n_dev)
    graphdef, state = nnx.split(model)  # the caller's model stays in its mode; the network runs in eval mode
    graphdef = _eval_graphdef(graphdef, state, None if dtype is None else jnp.dtype(dtype))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x_sharding = NamedSharding(mesh, P("data"))
    fn = _jitted(layer, mesh)
    outs, in_flight = [], None  # in_flight: the last batch dispatched and its size, fetched after the next dispatch
    starts = list(range(0, n, batch_size))
    # one batch of arrays is quick; one of files to load (seconds to minutes at 1mm on a CPU) still shows a bar
    quick = n <= batch_size and reader.in_memory
    bar = tqdm(total=n, unit="vol", desc=f"embed ({layer})", disable=not progress or quick)
    put_threads = _put_threads(mesh, batch_size)

    def next_batch(s: int, pool, put_pool) -> tuple[jax.Array, int]:
        """Volumes s.. read, padded to the batch size and on the devices; and how many are real."""
        batch = reader.read(s, min(s + batch_size, n), pool)
        if expected_shape is not None and tuple(batch.shape[1:]) != tuple(expected_shape):
            raise ValueError(_shape_error(tuple(batch.shape[1:]), tuple(expected_shape), reader.in_memory,
                                          downsample, expected_downsample))
        m = batch.shape[0]
        if m < batch_size:  # pad instead of recompiling for the last batch
            xp = jnp if isinstance(batch, jax.Array) else np
            batch = xp.concatenate([batch, xp.zeros((batch_size - m, *batch.shape[1:]), batch.dtype)])
        return to_devices(batch, x_sharding, put_pool), m

    with concurrent.futures.ThreadPoolExecutor(reader.workers) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as prefetch, \
            concurrent.futures.ThreadPoolExecutor(max(put_threads, 1)) as put_pool:
        put_pool = put_pool if put_threads else None
        # the next batch is read and copied to the devices while the current one runs
        future = prefetch.submit(next_batch, starts[0], pool, put_pool)
        for k in range(len(starts)):
            batch, m = future.result()
            if k + 1 < len(starts):
                future = prefetch.submit(next_batch, starts[k + 1], pool, put_pool)
            result = fn(graphdef, state, batch)  # asynchronous
            if in_flight is not None:  # the previous batch's result, while this one runs
                outs.append(_fetch(*in_flight, bar))
            in_flight = (result, starts[k], m)
        outs.append(_fetch(*in_flight, bar))
    bar.close()
    out = np.concatenate(outs)
    skipped = [f.index for f in reader.failures]
    if skipped:
        out[skipped] = np.nan
    return out


PUT_THREADS = 8  # one device_put per volume of a host batch bound for a GPU, this many at once


def _put_threads(mesh: jax.sharding.Mesh, batch_size: int) -> int:
    """Threads copying a host batch to `mesh` (`to_devices`); 0: one plain device_put (on CPU devices that is a
    memory copy at most)."""
    return 0 if mesh.devices.flat[0].platform == "cpu" else min(batch_size, PUT_THREADS)


def to_devices(batch: np.ndarray | jax.Array, sharding: NamedSharding,
               pool: concurrent.futures.Executor | None = None) -> jax.Array:
    """`batch` placed by `sharding`. With `pool`, a host batch is copied one volume per task and joined on each
    device: one `jax.device_put` copies at about 5.5 GB/s, eight volumes from eight threads at 20 GB/s (H200,
    benchmarks/gpu_transfer_h200.jsonl); a batch of eight 1mm float32 volumes is 157 MB."""
    if pool is None or isinstance(batch, jax.Array):
        return jax.device_put(batch, sharding)
    rows = {device: range(*index[0].indices(len(batch)))
            for device, index in sharding.addressable_devices_indices_map(batch.shape).items()}
    # round robin over the devices: several GPUs are fed at once
    tasks = [(device, rs[j]) for j in range(max(map(len, rows.values()))) for device, rs in rows.items()
             if j < len(rs)]
    placed = dict(zip(tasks, pool.map(lambda t: jax.device_put(batch[t[1]:t[1] + 1], t[0]), tasks), strict=True))
    shards = [jnp.concatenate([placed[device, i] for i in rs]) for device, rs in rows.items()]  # each on its device
    return jax.make_array_from_single_device_arrays(batch.shape, sharding, shards)


def _fetch(result: tuple[jax.Array, jax.Array], start: int, m: int, bar: tqdm) -> np.ndarray:
    """The first `m` rows of a batch's output, on the host (counted on `bar`); an `InputError` if one of its
    volumes was not finite."""
    out, finite = jax.device_get(result)
    bar.update(m)
    if not finite[:m].all():
        from jaxtl.data import InputError

        raise InputError(f"volume {start + int(np.argmin(finite[:m]))} has NaN or infinite voxels; fix the input "
                         "(e.g. np.nan_to_num) or leave that volume out")
    return np.asarray(out)[:m]


def warn_skipped(reader: VolumeReader, stacklevel: int = 2) -> None:
    """Warn (`SkippedScansWarning`) about the scans `reader` skipped, naming the first few and why."""
    failures = reader.failures
    if not failures:
        return
    listed = "; ".join(f.reason for f in failures[:MAX_LISTED_FAILURES])
    more = f"; and {len(failures) - MAX_LISTED_FAILURES} more" if len(failures) > MAX_LISTED_FAILURES else ""
    warnings.warn(SkippedScansWarning(
        f"{len(failures)} of {len(reader)} scans could not be loaded and were skipped (their rows are NaN): "
        f"{listed}{more}. Fix or remove these files; on_error='raise' stops at the first", failures),
        stacklevel=stacklevel + 1)


_EVAL_GRAPHDEFS: dict[tuple[Any, Any], Any] = {}
_EVAL_GRAPHDEFS_LOCK = threading.Lock()


def _eval_graphdef(graphdef: Any, state: Any, dtype: jnp.dtype | None) -> Any:
    """The graph of the model `graphdef` describes, in eval mode and computing in `dtype` (None: its own); the
    same parameter state fits it. Cached: building it (a new SFCN for another dtype) took longer per call than
    a GPU's whole batch."""
    key = (graphdef, dtype)
    with _EVAL_GRAPHDEFS_LOCK:  # embed may run on several threads at once (a service holding many models)
        found = _EVAL_GRAPHDEFS.get(key)
    if found is not None:
        return found
    model = nnx.merge(graphdef, state)
    model.eval()
    if dtype is not None and dtype != jnp.dtype(model.dtype):
        model = _with_dtype(model, dtype)
    found = nnx.graphdef(model)
    with _EVAL_GRAPHDEFS_LOCK:
        while len(_EVAL_GRAPHDEFS) >= 64:
            _EVAL_GRAPHDEFS.pop(next(iter(_EVAL_GRAPHDEFS)))
        _EVAL_GRAPHDEFS[key] = found
    return found


def _with_dtype(model: SFCN, dtype) -> SFCN:
    """A copy of `model` computing in `dtype` (parameters stay float32)."""
    new = nnx.eval_shape(lambda: SFCN(model.channels, model.num_outputs, model.dropout.rate, dtype=dtype,
                                      rngs=nnx.Rngs(0), conv_impl=model.conv_impl))
    nnx.update(new, nnx.state(model, WEIGHTS))  # every variable: no shape-only one is left
    new.eval()
    return new


def _unwrap(model) -> SFCN:
    return model.model if isinstance(model, JaxtlModel) else model


def resolve_model(model: JaxtlModel | SFCN | str | os.PathLike) -> JaxtlModel | SFCN:
    """A loaded model: model directories and published names are loaded with `load_model`."""
    if isinstance(model, str | os.PathLike):
        return load_model(model)
    if not isinstance(model, JaxtlModel | SFCN):
        raise ValueError(f"expected a JaxtlModel, an SFCN or a model directory, got {type(model).__name__}")
    return model


def model_downsample(model: JaxtlModel | SFCN) -> int:
    """The block-average factor the model's inputs were prepared with (1 for a bare SFCN)."""
    if isinstance(model, JaxtlModel):
        return int(model.preprocessing.get("downsample", 1))
    return 1


def embed(volumes: Any, model: JaxtlModel | SFCN | str | os.PathLike, *, layer: str = "features",
          batch_size: int | None = None, dtype=None, progress: bool = True, downsample: int | None = None,
          check: bool = True, workers: int | None = None,
          on_error: Literal["raise", "skip"] = "raise") -> np.ndarray:
    """Embed volumes with a (pretrained) SFCN: `(N, 64)` features for `layer="features"`.

    `volumes`: preprocessed `(N, D, H, W)` array (a singleton channel axis, `(N, 1, D, H, W)` as in Peng's
    PyTorch code or `(N, D, H, W, 1)`, is squeezed); paths or nibabel images (conformed with `load_volume`
    using the model's downsampling, streamed in batches); a `Cohort`; a BIDS directory, CSV/TSV cohort,
    `.txt` list of image paths (one per line, no header) or prepared cache directory; or any random-access
    source of {"image": ...} items.
    Arrays must be what `jaxtl.load_volume` returns: voxels in the axis order of FSL's MNI152 1mm grid
    (182x218x182, LAS) as nibabel's `get_fdata()` returns them for a file on that grid, divided by the mean
    of the whole 182x218x182 volume (background included), then cropped to `[11:171, 13:205, 11:171]`
    (160x192x160), then block-averaged by the model's `downsample` (e.g. 40x48x40 for 4).
    Layers: "features" (the 64-d average-pooled vector the paper re-uses), "logits" (log-probabilities),
    "probs", and "block0".."block5" (each conv block's output, average-pooled).
    `dtype=jnp.bfloat16` computes in bfloat16 with float32 parameters. `batch_size`: at most this many volumes per
    step (default `max(8, 2 x devices)`; rounded down to a multiple of the device count, at least one volume per
    device); the volumes are cut into about equal
    batches in steps of a quarter of it per device (10 volumes, one device: two batches of 6, not 8 + 8 with 6 rows
    of padding), and fewer than one batch run in a power-of-two batch per device.

    `on_error` (NIfTI inputs: paths, images, cohorts): "raise" (default) stops at the first scan that cannot
    be loaded or conformed with a `jaxtl.InputError` naming the file, as a script would expect: NaN rows
    can silently poison downstream statistics or fail far away in a scikit-learn fit. "skip" gives that
    scan's row NaN (rows stay aligned with the inputs; `np.isnan(out).all(axis=1)` marks them) and emits
    one `SkippedScansWarning` naming the first few files and why, whose `.failures` lists every
    `SkippedScan(index, path, reason)`. Arrays and prepared caches have no load errors: they never skip.
    A `VolumeReader` given as `volumes` keeps its own `on_error`.
    """
    model = resolve_model(model)
    ds = model_downsample(model) if downsample is None else downsample
    expected = model.input_shape if isinstance(model, JaxtlModel) else None
    reader = volumes if isinstance(volumes, VolumeReader) else VolumeReader(
        volumes, downsample=ds, check=check, workers=workers, on_error=on_error)
    out = apply_batched(_unwrap(model), reader, layer, batch_size=batch_size, dtype=dtype, progress=progress,
                        downsample=ds, check=check, expected_shape=expected,
                        expected_downsample=model_downsample(model), workers=workers)
    warn_skipped(reader, stacklevel=2)
    return out


def predict(volumes: Any, model: JaxtlModel | str | os.PathLike, *, batch_size: int | None = None,
            dtype=None, progress: bool = True, check: bool = True,
            on_error: Literal["raise", "skip"] = "raise") -> np.ndarray:
    """Predicted age in years (age models, expected value over the bins) or P(male) (sex models).

    Accepts the same `volumes` and `on_error` as `embed` ("skip": NaN for scans that cannot be loaded).
    `model` may also be a fitted transfer head directory (`jaxtl transfer --out DIR`: DIR/head); its raw
    predictions are returned (bias-corrected ages: `jaxtl.load_head(path)`, `.corrected(...)`). float64 either way.
    """
    if isinstance(model, str | os.PathLike) and (Path(model) / "head.json").exists():
        from jaxtl.transfer import load_head

        if dtype is not None:
            raise ValueError(f"{model} is a transfer head: dtype= applies to models only; leave it out")
        return load_head(model).predict(volumes, progress=progress, batch_size=batch_size, on_error=on_error,
                                        check=check)
    model = resolve_model(model)
    if not isinstance(model, JaxtlModel):
        raise ValueError("predict needs a JaxtlModel (from jaxtl.load_model), which knows its task and bins")
    log_probs = embed(volumes, model, layer="logits", batch_size=batch_size, dtype=dtype, progress=progress,
                      check=check, on_error=on_error)
    return np.asarray(model.task.decode(jnp.asarray(log_probs)), np.float64)
