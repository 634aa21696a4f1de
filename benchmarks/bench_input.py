"""Input pipeline benchmark: volumes/s from NIfTI, from the prepared cache, and through grain with augmentation.

    python benchmarks/bench_input.py [--n-cache 64] [--batch-size 8] [--workers 0 1 2] [--json out.json]

Stages (all on the host CPU, 1mm float16 by default):
  nifti:*      `load_volume` on .nii.gz files (read + gunzip + validate + conform + normalise + crop)
  prepare      `prepare_cache` throughput (scans/s) with --prepare-workers processes
  cache_array  `CacheSource[i]` -> an in-memory copy of the volume (random order)
  grain:tN     `make_dataset` with shift + mirror augmentation, batches of --batch-size, built in the main
               process by N copy threads (background-thread prefetch)
  grain:wN     the same pipeline in N grain worker processes (mp_prefetch; batches handed over in shared memory)
  memcpy       `np.copyto` of the same cached volumes into one reused buffer: the ceiling; the other
               cache stages report their ratio to it
Timings exclude start-up (worker spawn, first batch) and shut-down (joining worker processes). volumes_per_s is
the median over --repeats runs (cache stages) or over every file load (nifti), with the spread beside it
(runs_volumes_per_s, min/max); prepare runs once.
The cache is read from the page cache (just written).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nilearn.datasets import load_mni152_template

from jaxtl.cache import CacheSource, make_dataset, prepare_cache
from jaxtl.cohort import Cohort
from jaxtl.data import MNI_AFFINE, input_shape, load_volume, reference_template


def _record(stage: str, n: int, seconds: float, **extra) -> dict:
    return {"stage": stage, "volumes": n, "seconds": round(seconds, 4), "volumes_per_s": round(n / seconds, 2),
            **extra}


def _write_inputs(directory: Path, n_files: int) -> dict[str, list[Path]]:
    """UK Biobank-like float32 .nii.gz on the MNI grid, nilearn's RAS template layout, and a 2mm image."""
    rng = np.random.default_rng(0)
    template = np.asarray(reference_template())
    files: dict[str, list[Path]] = {"mni_float32": [], "ras_template": [], "mni_2mm": []}
    for i in range(n_files):
        noisy = template * (1 + 0.02 * rng.standard_normal(template.shape, dtype=np.float32)) * (template > 0)
        path = directory / f"mni_{i}.nii.gz"
        nib.save(nib.Nifti1Image(noisy.astype(np.float32), MNI_AFFINE), path)
        files["mni_float32"].append(path)
    ras = load_mni152_template(resolution=1)
    nib.save(ras, directory / "ras.nii.gz")
    files["ras_template"].append(directory / "ras.nii.gz")
    two = load_mni152_template(resolution=2)
    nib.save(two, directory / "mni_2mm.nii.gz")
    files["mni_2mm"].append(directory / "mni_2mm.nii.gz")
    return files


def _bench_nifti(files: dict[str, list[Path]], downsample: int, repeats: int) -> list[dict]:
    records = []
    for name, paths in files.items():
        load_volume(paths[0], downsample=downsample)  # warm caches (template, mask)
        start = time.perf_counter()
        n = 0
        per_load = []
        for _ in range(repeats):
            for path in paths:
                t = time.perf_counter()
                load_volume(path, downsample=downsample)
                per_load.append(time.perf_counter() - t)
                n += 1
        rates = [1 / t for t in per_load]
        records.append(_record(f"nifti:{name}", n, time.perf_counter() - start,
                               mb_per_file=round(paths[0].stat().st_size / 1e6, 1)) | _spread(rates))
    return records


def _bench_memcpy(source: CacheSource, n: int) -> dict:
    """The ceiling: copy the same cached volumes (same order) into one reused, already-touched buffer."""
    order = np.random.default_rng(0).permutation(np.arange(n) % len(source))
    views = [source.image(int(i)) for i in range(len(source))]
    dst = np.ones(source.shape, dtype=views[0].dtype)  # pages touched before timing
    start = time.perf_counter()
    for i in order:
        np.copyto(dst, views[i])
    return _record("memcpy", n, time.perf_counter() - start)


def _bench_cache_array(source: CacheSource, n: int) -> dict:
    order = np.random.default_rng(0).permutation(np.arange(n) % len(source))
    start = time.perf_counter()
    for i in order:
        np.array(source[int(i)]["image"])
    return _record("cache_array", n, time.perf_counter() - start)


def _bench_grain(source: CacheSource, batch_size: int, epochs: int, *, workers: int = 0, threads: int = 1) -> dict:
    ds = make_dataset(source, batch_size=batch_size, seed=0, num_epochs=epochs, workers=workers, threads=threads)
    it = iter(ds)
    next(it)  # start-up: worker processes, first batch
    start = last = time.perf_counter()
    n = 0
    for batch in it:
        n += len(batch["image"])
        last = time.perf_counter()
    seconds = last - start  # to the last batch: the end of the iterator joins the worker processes (~1 s here)
    if hasattr(it, "close"):
        it.close()
    stage = f"grain:w{workers}" if workers else f"grain:t{threads}"
    return _record(stage, n, seconds, batch_size=batch_size, threads=threads, workers=workers,
                   augmentation="shift+mirror")


def _spread(rates: list[float]) -> dict:
    """volumes_per_s = the (upper) median rate, with every rate and their min / max."""
    median = sorted(rates)[len(rates) // 2]  # an element (the upper median), as `_repeated`'s other fields
    return {"volumes_per_s": round(median, 2), "runs_volumes_per_s": [round(r, 2) for r in rates],
            "min_volumes_per_s": round(min(rates), 2), "max_volumes_per_s": round(max(rates), 2)}


def _repeated(repeats: int, bench, *args, **kwargs) -> dict:
    runs = [bench(*args, **kwargs) for _ in range(repeats)]
    median_run = sorted(runs, key=lambda r: r["volumes_per_s"])[len(runs) // 2]
    return {**median_run, **_spread([r["volumes_per_s"] for r in runs])}


def run_input_bench(
    *,
    n_files: int = 4,
    n_cache: int = 64,
    batch_size: int = 8,
    threads: tuple[int, ...] = (1, 2),
    workers: tuple[int, ...] = (1, 2),
    epochs: int = 4,
    dtype: str = "float16",
    downsample: int = 1,
    prepare_workers: int = 2,
    nifti_repeats: int = 2,
    repeats: int = 3,
    work_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """Run every stage and return one record per stage (volumes/s, and ratio to memcpy for the cache)."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        files = _write_inputs(tmp, n_files)
        records = _bench_nifti(files, downsample, nifti_repeats)

        paths = [tmp / f"link_{i:04d}.nii.gz" for i in range(n_cache)]
        for i, link in enumerate(paths):
            link.symlink_to(files["mni_float32"][i % n_files])
        start = time.perf_counter()
        summary = prepare_cache(Cohort.from_paths(paths), tmp / "cache", dtype=dtype, downsample=downsample,
                                workers=prepare_workers)
        assert summary.ok, summary
        records.append(_record("prepare", n_cache, time.perf_counter() - start, workers=prepare_workers))

        source = CacheSource(tmp / "cache")
        _bench_cache_array(source, len(source))  # warm the page cache
        memcpy = _repeated(repeats, _bench_memcpy, source, 4 * n_cache)
        cache_records = [_repeated(repeats, _bench_cache_array, source, 2 * n_cache)]
        cache_records += [_repeated(repeats, _bench_grain, source, batch_size, epochs, threads=t) for t in threads]
        cache_records += [_repeated(repeats, _bench_grain, source, batch_size, epochs, workers=w) for w in workers]
        for r in cache_records:
            r["ratio_to_memcpy"] = round(r["volumes_per_s"] / memcpy["volumes_per_s"], 3)
        records += cache_records + [memcpy]

    mb = np.prod(input_shape(downsample)) * np.dtype(dtype).itemsize / 1e6
    for r in records:
        r.update(dtype=dtype, downsample=downsample, mb_per_volume=round(mb, 2) if "nifti" not in r["stage"] else None,
                 cpus=os.cpu_count(), load_avg_1min=round(os.getloadavg()[0], 2))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-files", type=int, default=4)
    parser.add_argument("--n-cache", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="copy threads, in-process")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="grain worker processes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float16", "uint8", "float32"])
    parser.add_argument("--downsample", type=int, default=1, choices=[1, 2, 4])
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="where to write the temporary files and cache")
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    args = parser.parse_args()
    records = run_input_bench(n_files=args.n_files, n_cache=args.n_cache, batch_size=args.batch_size,
                              threads=tuple(args.threads), workers=tuple(args.workers), epochs=args.epochs,
                              dtype=args.dtype, downsample=args.downsample, prepare_workers=args.prepare_workers,
                              repeats=args.repeats,
                              work_dir=args.work_dir)
    print(f"{'stage':<22}{'volumes':>8}{'seconds':>10}{'vol/s':>10}{'x memcpy':>10}")
    for r in records:
        ratio = r.get("ratio_to_memcpy")
        print(f"{r['stage']:<22}{r['volumes']:>8}{r['seconds']:>10.3f}{r['volumes_per_s']:>10.1f}"
              f"{'' if ratio is None else f'{ratio:.2f}':>10}")
    print(f"{records[0]['cpus']} CPUs, 1-min load average {records[-1]['load_avg_1min']}, "
          f"{records[0]['dtype']}, downsample {records[0]['downsample']}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
