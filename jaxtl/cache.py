"""The preprocessed cache: conform every scan once, store fixed-shape arrays in memory-mappable shards.

Layout of a cache directory:
  plan.json                 what is being built (options + scan ids/paths); a re-run must match it
  shard_00000.npy           (n, D, H, W) arrays in the cache dtype, written as `.npy.partial`, renamed when full
  shard_00000.json          per-slot record (sha256 of the source, uint8 scale/offset, warnings, or the error)
  shard_00000.progress.jsonl  per-slot records of an unfinished shard (resume point; removed when done)
  index.json                the finished cache: options, shards, one entry per usable scan, failures
  failures.tsv, warnings.tsv  id, path, reason

Slots of failed scans are not in the index (never read; a scan that fails on a re-run keeps its slot's old
bytes). float16/float32 caches store the
normalised volumes; uint8 stores round((x - offset) / scale) with a per-volume scale and offset.
Also here: grain data sources over the cache and over NIfTI files, and the shift + mirror augmentation.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from tqdm.auto import tqdm

from jaxtl.cohort import Cohort, read_cohort
from jaxtl.data import PREPROCESSING_VERSION, InputError, collect_input_warnings, input_shape, load_volume, qc_column

FORMAT = "jaxtl-cache"
VERSION = 1
DTYPES = ("float16", "uint8", "float32")
_TSV_COLUMNS = ("id", "path", "reason")


@dataclasses.dataclass(frozen=True)
class Failure:
    id: str
    path: str
    reason: str


@dataclasses.dataclass(frozen=True)
class PrepareSummary:
    """Outcome of `prepare_cache`; `ok` is False when any scan failed (now or in an earlier run)."""

    out_dir: Path
    n_scans: int
    n_already_done: int
    n_processed: int
    failures: tuple[Failure, ...]
    n_warned: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        n_ok = self.n_scans - len(self.failures)
        text = (
            f"{n_ok}/{self.n_scans} scans in cache {self.out_dir} "
            f"({self.n_processed} processed now in {self.seconds:.1f} s, {self.n_already_done} done before)"
        )
        if self.n_warned:
            text += f"; {self.n_warned} with warnings (warnings.tsv)"
        if self.failures:
            text += f"; {len(self.failures)} FAILED (failures.tsv), e.g. {self.failures[0].reason}"
        return text


def prepare_cache(
    cohort: Cohort | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float16",
    downsample: int = 1,
    workers: int = 1,
    shard_size: int = 64,
    progress: bool = False,
) -> PrepareSummary:
    """Conform every scan of `cohort` once and store it in `out_dir` (crash-safe, resumable).

    Re-running resumes after a crash or kill and skips finished scans; on a finished cache it changes
    nothing, except that a scan whose file changed since it was processed (size or modification time: a
    re-simulated cohort, a failed scan that was fixed) is processed again. A failing scan is recorded in
    `failures.tsv` and never stops the others.
    """
    start = time.perf_counter()
    if not isinstance(cohort, Cohort):
        cohort = read_cohort(cohort)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    shape = input_shape(downsample)
    ids = cohort.ids
    if len(set(ids.tolist())) != len(ids):
        unique, counts = np.unique(ids, return_counts=True)
        raise ValueError(f"duplicate scan ids in the cohort: {', '.join(unique[counts > 1][:5])}")
    if workers < 1 or shard_size < 1:
        raise ValueError(f"workers and shard_size must be >= 1, got {workers} and {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "preprocessing": PREPROCESSING_VERSION,
        "dtype": dtype,
        "downsample": downsample,
        "shape": list(shape),
        "shard_size": shard_size,
        "scans": [{"id": s.id, "path": os.path.abspath(s.path)} for s in cohort],  # resumable from anywhere
    }
    _check_or_write_plan(out, plan)
    shards = [_Shard(out, k, min(shard_size, len(cohort) - k * shard_size), shape, dtype)
              for k in range(math.ceil(len(cohort) / shard_size))]
    todo = [(shard, slot) for shard in shards for slot in shard.resume()]
    redo = [(shard, _changed_slots(shard, cohort, shard_size)) for shard in shards]
    if any(slots for _, slots in redo):
        (out / "index.json").unlink(missing_ok=True)  # the cache reads as unfinished until the redo is done
    for shard, slots in redo:
        shard.redo(slots)
        todo += [(shard, slot) for slot in slots]
    n_before = len(cohort) - len(todo)
    with tqdm(total=len(cohort), initial=n_before, unit="scan", disable=not progress, desc="prepare") as bar:
        n_failed = 0
        for shard, slot, array, record in _run(todo, cohort, shard_size, downsample, dtype, workers):
            shard.write(slot, array, record)
            n_failed += not record["ok"]
            bar.set_postfix(failed=n_failed, refresh=False)
            bar.update()
    records = [r for shard in shards for r in shard.records()]
    failures, n_warned = _write_index(out, plan, cohort, records)
    return PrepareSummary(out, len(cohort), n_before, len(todo), failures, n_warned,
                          time.perf_counter() - start)


def _changed_slots(shard: _Shard, cohort: Cohort, shard_size: int) -> list[int]:
    """Processed slots whose source file changed since (size or mtime differ, and the content too where it was
    hashed: a copy that only touched the mtime is recorded as it is now, not processed again). Records of caches
    prepared before `source_stat` existed are not checked."""
    changed = []
    for slot, record in shard.done().items():
        if "source_stat" not in record:
            continue
        path = str(cohort[shard.index * shard_size + slot].path)
        stat = _source_stat(path)
        if stat == record["source_stat"]:
            continue
        if stat is not None and record.get("sha256") and record["source_stat"] and stat[0] == record["source_stat"][0] \
                and _sha256(path) == record["sha256"]:
            shard.restat(slot, stat)
            continue
        changed.append(slot)
    return changed


ANALYZE_SUFFIXES = (".img", ".hdr", ".img.gz", ".hdr.gz")


def same_preprocessing(version: int, paths: Iterable[str]) -> bool:
    """Whether a cache of preprocessing `version` holds what this jaxtl's `load_volume` gives for `paths`: version
    1 differs from 2 only for Analyze files."""
    if version == PREPROCESSING_VERSION:
        return True
    return version == 1 and PREPROCESSING_VERSION == 2 and not any(
        str(p).lower().endswith(ANALYZE_SUFFIXES) for p in paths)


def _check_or_write_plan(out: Path, plan: dict) -> None:
    path = out / "plan.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e}); delete {out} and prepare again") from e
        written = json.dumps(old, sort_keys=True)
        old.setdefault("preprocessing", 1)  # plans written before the field existed
        if same_preprocessing(old["preprocessing"], (scan["path"] for scan in old.get("scans", []))):
            old["preprocessing"] = plan["preprocessing"]
        for scan in old.get("scans", []):  # ... and with paths relative to the working directory then
            scan["path"] = os.path.abspath(scan["path"])
        if old != plan:
            differ = [k if k == "scans" else f"{k} {old.get(k)!r} -> {plan[k]!r}"
                      for k in plan if old.get(k) != plan[k]]
            raise ValueError(
                f"{out} holds a cache for a different cohort or options ({', '.join(differ)}); "
                "use another OUT_DIR or delete this one"
            )
        if json.dumps(plan, sort_keys=True) != written:  # an older plan: written anew, with absolute paths
            _write_atomic(path, _dumps(plan))
        return
    if any(out.glob("shard_*")) or (out / "index.json").exists():
        raise ValueError(f"{out} holds cache files but no plan.json; use another OUT_DIR or delete this one")
    _write_atomic(path, _dumps(plan))


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped shard's blocks now: the sparse file a memmap creates fails on a full disk only when a
    page is written, as SIGBUS (the process dies without a word); reserved, a full disk is an OSError naming it."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left for the shard {path.name} ({os.fstat(fd).st_size / 1e6:.0f} MB) "
                                   f"in {path.parent}; free space or use another OUT_DIR (prepare resumes)") from e
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate: as before
            raise
    finally:
        os.close(fd)


def _run(
    todo: list[tuple[_Shard, int]], cohort: Cohort, shard_size: int, downsample: int, dtype: str, workers: int
) -> Iterator[tuple[_Shard, int, np.ndarray | None, dict]]:
    """Yield (shard, slot, stored array or None, record) as scans finish, in-process or in a process pool."""
    jobs = [(shard, slot, str(cohort[shard.index * shard_size + slot].path)) for shard, slot in todo]
    if workers == 1:
        for shard, slot, path in jobs:
            yield shard, slot, *_process_scan(path, downsample, dtype)
        return
    # spawn, not fork: the parent may have imported JAX, which is not fork-safe.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)
    try:
        pending: dict[concurrent.futures.Future, tuple[_Shard, int]] = {}
        queue = iter(jobs)
        while True:
            for shard, slot, path in queue:  # keep at most 2 jobs per worker in flight (memory)
                pending[pool.submit(_process_scan, path, downsample, dtype)] = (shard, slot)
                if len(pending) >= 2 * workers:
                    break
            if not pending:
                break
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                shard, slot = pending.pop(future)
                yield shard, slot, *future.result()
    except BaseException:  # Ctrl-C, an error, the consumer stopping: drop the queue and stop the workers now
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _worker_init() -> None:
    """A prepare worker ignores SIGINT (a terminal's Ctrl-C reaches the whole process group; the parent stops the
    workers itself, and a worker that caught it mid-job kept the pool from shutting down on a second Ctrl-C) and,
    on Linux, is sent SIGTERM when the parent dies (a killed `jaxtl prepare` left its workers running)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died while this worker started
        os._exit(1)


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    processes = list((getattr(pool, "_processes", None) or {}).values())  # before shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    # wait on each process's sentinel, not join(): the pool's own thread may reap a process first, and one reaped
    # elsewhere reads as alive to is_alive() and join() (which then waited its whole timeout)
    pending, deadline = {p.sentinel for p in processes}, time.monotonic() + 5
    while pending and (left := deadline - time.monotonic()) > 0:
        pending -= set(multiprocessing.connection.wait(list(pending), timeout=left))


def _process_scan(path: str, downsample: int, dtype: str) -> tuple[np.ndarray | None, dict]:
    """Load, conform and encode one scan; never raises for a bad input (returns ok=False and the reason).
    Every record has the file's `source_stat` (size, mtime; None when missing) to notice a changed file."""
    stat = {"source_stat": _source_stat(path)}
    array, record = _process(path, downsample, dtype)
    return array, record | stat


def _source_stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _process(path: str, downsample: int, dtype: str) -> tuple[np.ndarray | None, dict]:
    try:
        sha256 = _sha256(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = load_volume(path, downsample=downsample)
        array, scale, offset = _encode(volume, dtype)
    except InputError as e:
        return None, {"ok": False, "error": _one_line(str(e))}
    except Exception as e:  # one bad scan must never stop the others
        return None, {"ok": False, "error": _one_line(f"{path}: {type(e).__name__}: {e}")}
    messages = [_one_line(str(w.message)) for w in caught]
    return array, {"ok": True, "sha256": sha256, "scale": scale, "offset": offset, "warnings": messages}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _encode(volume: np.ndarray, dtype: str) -> tuple[np.ndarray, float, float]:
    if dtype == "uint8":
        lo, hi = float(volume.min()), float(volume.max())
        scale = (hi - lo) / 255.0 or 1.0
        codes = np.rint((volume - np.float32(lo)) / np.float32(scale))
        return np.clip(codes, 0, 255).astype(np.uint8), scale, lo
    array = volume.astype(dtype)
    if not np.isfinite(array).all():
        raise InputError("intensities overflow float16 after normalisation; prepare with --dtype float32")
    return array, 1.0, 0.0


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Shard:
    """One shard file and its per-slot records; writes go to `.partial` and a progress log."""

    def __init__(self, out: Path, index: int, n: int, shape: tuple[int, ...], dtype: str):
        self.index, self.n, self.shape, self.dtype = index, n, shape, dtype
        stem = out / f"shard_{index:05d}"
        self.path = stem.with_suffix(".npy")
        self.partial = stem.with_suffix(".npy.partial")
        self.meta = stem.with_suffix(".json")
        self.log = stem.with_suffix(".progress.jsonl")
        self._records: dict[int, dict] = {}
        self._array: np.memmap | None = None

    def resume(self) -> list[int]:
        """Load finished slots from disk; return the slots still to do (finalising a full shard)."""
        if self.meta.exists() and self.path.exists():
            self._records = {r["slot"]: r for r in json.loads(self.meta.read_text())["slots"]}
            return []
        if self.partial.exists() or self.path.exists():
            self._records = self._read_log()
            if not self._records:  # a kill may have cut the file's creation short: start afresh
                self.partial.unlink(missing_ok=True)
        else:
            self.log.unlink(missing_ok=True)  # a log without data is stale
        self._rewrite_log()  # drops a line torn by a kill
        todo = [slot for slot in range(self.n) if slot not in self._records]
        if not todo:
            self._finish()
        return todo

    def done(self) -> dict[int, dict]:
        """The records of the slots processed so far, by slot."""
        return dict(self._records)

    def restat(self, slot: int, stat: list[int]) -> None:
        """Record a new `source_stat` for an unchanged file (persisted where the slot's record lives)."""
        self._records[slot] = {**self._records[slot], "source_stat": stat}
        if self.meta.exists() and self.path.exists():
            self._write_meta()
        else:
            self._rewrite_log()

    def redo(self, slots: list[int]) -> None:
        """Forget `slots` so that they are processed again (the progress log first holds the slots kept, so a
        kill during the redo resumes from them)."""
        if not slots:
            return
        for slot in slots:
            self._records.pop(slot)
        self._rewrite_log()

    def _read_log(self) -> dict[int, dict]:
        records = {}
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and 0 <= record.get("slot", -1) < self.n:
                    records[record["slot"]] = record
        return records

    def _rewrite_log(self) -> None:
        if self._records:
            _write_atomic(self.log, "".join(_dumps(r, indent=None) for r in self._records.values()))

    def write(self, slot: int, array: np.ndarray | None, record: dict) -> None:
        if array is not None:
            data = self._open()
            data[slot] = array
            data.flush()  # the data reaches the file before the log says the slot is done
        self._records[slot] = {"slot": slot, **record}
        with open(self.log, "a") as f:
            f.write(_dumps(self._records[slot], indent=None))
            f.flush()
            os.fsync(f.fileno())
        if len(self._records) == self.n:
            self._finish()

    def _open(self) -> np.memmap:
        if self._array is None:
            if self.path.exists():  # renamed but not finalised before a kill: finish writing in place
                os.replace(self.path, self.partial)
            mode = "r+" if self.partial.exists() else "w+"
            self._array = np.lib.format.open_memmap(
                self.partial, mode=mode, dtype=self.dtype, shape=(self.n, *self.shape)
            )
            _reserve(self.partial)
        return self._array

    def _finish(self) -> None:
        if not self.path.exists():
            self._open().flush()
            self._array = None
            os.replace(self.partial, self.path)
        self._write_meta()
        self.log.unlink(missing_ok=True)

    def _write_meta(self) -> None:
        _write_atomic(self.meta, _dumps({"slots": self.records()}))

    def records(self) -> list[dict]:
        return [self._records[s] for s in range(self.n)]


def _write_index(out: Path, plan: dict, cohort: Cohort, records: list[dict]) -> tuple[tuple[Failure, ...], int]:
    shard_size = plan["shard_size"]
    scans, failures, warned = [], [], []
    for i, (scan, record) in enumerate(zip(cohort, records, strict=True)):
        if not record["ok"]:
            failures.append(Failure(scan.id, str(scan.path), record["error"]))
            continue
        warned += [Failure(scan.id, str(scan.path), w) for w in record["warnings"]]
        scans.append({
            "id": scan.id,
            "participant_id": scan.participant_id,
            "session": scan.session,
            "age": None if math.isnan(scan.age) else scan.age,
            "sex": None if math.isnan(scan.sex) else scan.sex,
            "site": scan.site,
            "path": str(scan.path),
            "sha256": record["sha256"],
            "shard": i // shard_size,
            "slot": i % shard_size,
            "scale": record["scale"],
            "offset": record["offset"],
        })
    n_shards = math.ceil(len(cohort) / shard_size)
    index = {k: plan[k] for k in ("format", "version", "preprocessing", "dtype", "downsample", "shape", "shard_size")}
    index |= {
        "shards": [f"shard_{k:05d}.npy" for k in range(n_shards)],
        "scans": scans,
        "failures": [dataclasses.asdict(f) for f in failures],
    }
    _write_if_changed(out / "failures.tsv", _tsv(failures))
    _write_if_changed(out / "warnings.tsv", _tsv(warned))
    _write_if_changed(out / "index.json", _dumps_index(index))  # last: its presence marks a finished cache
    return tuple(failures), len({w.id for w in warned})


def _tsv(rows: Iterable[Failure]) -> str:
    lines = ["\t".join(_TSV_COLUMNS)] + ["\t".join(_one_line(str(v)) for v in (r.id, r.path, r.reason)) for r in rows]
    return "\n".join(lines) + "\n"


def _dumps(obj: Any, indent: int | None = 1) -> str:
    return json.dumps(obj, indent=indent, allow_nan=False) + "\n"


def _dumps_index(index: dict) -> str:
    """JSON with one line per scan or failure (readable and diffable for 40k scans)."""
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in index.items() if k not in ("scans", "failures")]
    for key in ("scans", "failures"):
        items = ",\n  ".join(_dumps(item, indent=None).rstrip() for item in index[key])
        lines.append(f"{json.dumps(key)}: [\n  {items}\n ]" if items else f"{json.dumps(key)}: []")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# Reading: grain data sources


def read_index(cache_dir: str | os.PathLike) -> dict:
    """The index of a finished cache (raises ValueError for an unfinished or foreign directory)."""
    path = Path(cache_dir) / "index.json"
    if not path.exists():
        d = Path(cache_dir)
        if not d.exists():
            raise FileNotFoundError(f"{cache_dir}: no such cache directory; prepare one with "
                                    f"`jaxtl prepare COHORT {cache_dir}`, or check the path")
        if (d / "plan.json").exists():  # prepare started here and did not finish
            hint = f"re-run the `jaxtl prepare` that writes it (it resumes): jaxtl prepare COHORT {cache_dir}"
        elif d.is_file() or (d / "participants.tsv").exists() or (d / "dataset_description.json").exists():
            hint = (f"it looks like a cohort, not a cache: prepare one first, "
                    f"`jaxtl prepare {cache_dir} CACHE_DIR`, and pass CACHE_DIR")
        else:
            hint = f"prepare one with `jaxtl prepare COHORT {cache_dir}`"
        raise ValueError(f"{cache_dir}: not a finished jaxtl cache (no index.json); {hint}")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path}: not a jaxtl cache index of version {VERSION}")
    if not same_preprocessing(index.get("preprocessing", 1), (scan["path"] for scan in index.get("scans", []))):
        raise ValueError(f"{cache_dir}: prepared with preprocessing version {index.get('preprocessing', 1)}; this "
                         f"jaxtl conforms scans differently (version {PREPROCESSING_VERSION}): prepare the cache "
                         "again into a new directory")
    return index


class CacheSource:
    """grain `RandomAccessDataSource` over a prepared cache: `src[i]` -> {"image", "age", "sex", "id"}.

    `image` is (D, H, W): by default a read-only, zero-copy view in the cache dtype (float16/float32;
    uint8 caches are decoded to float32); pass `dtype` to get a converted copy. Age and sex are
    float32, NaN when unknown (sex 0 = female, 1 = male). Picklable: shards are memory-mapped lazily
    in each process.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, dtype: str | np.dtype | None = None):
        self.cache_dir = Path(cache_dir)
        index = read_index(cache_dir)
        self.shape = tuple(index["shape"])
        self.stored_dtype = np.dtype(index["dtype"])
        self.downsample = int(index.get("downsample", 1))
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self._shard_files = index["shards"]
        scans = index["scans"]
        self.ids = np.array([s["id"] for s in scans], dtype=str)
        self.participant_ids = np.array([s.get("participant_id") or s["id"] for s in scans], dtype=str)
        self.paths = np.array([s["path"] for s in scans], dtype=str)
        self.ages = np.array([np.nan if s["age"] is None else s["age"] for s in scans], dtype=np.float32)
        self.sexes = np.array([np.nan if s["sex"] is None else s["sex"] for s in scans], dtype=np.float32)
        self._where = np.array([(s["shard"], s["slot"]) for s in scans], dtype=np.int64).reshape(-1, 2)
        self._scale = np.array([(s["scale"], s["offset"]) for s in scans], dtype=np.float32).reshape(-1, 2)
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def qc_warnings(self) -> np.ndarray:
        """Per scan, the warnings `jaxtl prepare` recorded while loading it (warnings.tsv: the `InputWarning`s, and
        any other, e.g. nibabel's) joined by " | ", "" for none."""
        found: dict[str, list[str]] = {}
        path = self.cache_dir / "warnings.tsv"
        lines = path.read_text().splitlines()[1:] if path.exists() else []
        for line in lines:
            scan_id, _, reason = line.split("\t", 2)
            found.setdefault(scan_id, []).append(reason)
        return qc_column(found, (_one_line(i) for i in self.ids))  # ids as warnings.tsv writes them

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {index} out of range for a cache of {len(self)} scans")
        return {"image": self.image(i), "age": self.ages[i], "sex": self.sexes[i], "id": self.ids[i]}

    def image(self, index: int) -> np.ndarray:
        shard, slot = self._where[index]
        raw = self._shard(int(shard))[slot]
        if self.stored_dtype == np.uint8:
            scale, offset = self._scale[index]
            return (raw * scale + offset).astype(self.dtype or np.float32, copy=False)
        return raw if self.dtype is None else raw.astype(self.dtype)

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            path = self.cache_dir / self._shard_files[k]
            array = np.load(path, mmap_mode="r")
            if array.shape[1:] != self.shape or array.dtype != self.stored_dtype:
                raise ValueError(f"{path}: shape {array.shape} / {array.dtype} does not match index.json")
            self._shards[k] = np.asarray(array)  # plain ndarray view of the read-only map
        return self._shards[k]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": {}}  # memory maps are reopened in each worker process

    def __repr__(self) -> str:
        return f"CacheSource({str(self.cache_dir)!r}, {len(self)} scans, {self.stored_dtype}, {self.shape})"


class NiftiSource:
    """grain `RandomAccessDataSource` that loads NIfTI files on access (small cohorts; no cache needed)."""

    def __init__(self, cohort: Cohort | Sequence[str | os.PathLike] | str | os.PathLike, *,
                 downsample: int = 1, check: bool = True):
        if isinstance(cohort, str | os.PathLike):
            cohort = read_cohort(cohort)
        elif not isinstance(cohort, Cohort):
            cohort = Cohort.from_paths(list(cohort))
        self.cohort, self.downsample, self.check = cohort, downsample, check
        self.ids, self.paths = cohort.ids, cohort.paths
        self.ages, self.sexes = cohort.ages.astype(np.float32), cohort.sexes.astype(np.float32)
        self._warned: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.cohort)

    def qc_warnings(self) -> np.ndarray:
        """Per scan, the `InputWarning`s of loading it in this process joined by " | ", "" for none (or not loaded
        yet)."""
        return qc_column(self._warned, range(len(self)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The conformed volume shape every item has (as `CacheSource.shape`)."""
        return input_shape(self.downsample)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        with collect_input_warnings() as warned:  # per thread: grain's and the readers' threads load other scans
            image = load_volume(self.paths[i], downsample=self.downsample, check=self.check)
        if warned:
            self._warned[i % len(self)] = warned
        return {"image": image, "age": self.ages[i], "sex": self.sexes[i], "id": self.ids[i]}

    def __repr__(self) -> str:
        return f"NiftiSource({len(self)} scans from {self.cohort.source!r})"


# ---------------------------------------------------------------------------------------------------
# Augmentation (TL `pixel_shift` + `mirror`) and the grain pipeline


def draw_augmentation(
    rng: np.random.Generator, *, max_shift: int = 2, flip_p: float = 0.5
) -> tuple[tuple[int, int, int], bool]:
    """Integer shifts ~ U{-max_shift..max_shift} per axis and a left-right flip with probability flip_p."""
    shifts = tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, size=3))
    return shifts, bool(rng.random() < flip_p)


def augment(
    image: np.ndarray, rng: np.random.Generator, *, max_shift: int = 2, flip_p: float = 0.5, wrap: bool = True
) -> np.ndarray:
    """Random shift + left-right mirror of a (D, H, W) volume, as in the paper's training code.

    `wrap=True` shifts circularly like TL's `np.roll` (voxels leaving one face re-enter at the other);
    `wrap=False` fills the vacated voxels with 0 (background), which avoids that artefact.
    """
    shifts, flip = draw_augmentation(rng, max_shift=max_shift, flip_p=flip_p)
    return shift_and_flip(image, shifts, flip, wrap=wrap)


def shift_and_flip(
    image: np.ndarray,
    shifts: Sequence[int],
    flip: bool,
    *,
    wrap: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """`np.flip(np.roll(image, shifts, (0, 1, 2)), 0)` (flip only if `flip`) in a single copy into `out`."""
    if out is None:
        out = np.empty_like(image)
    shifts = list(shifts)
    if flip:  # flip(roll(x, s)) == roll(flip(x), -s) along the flipped axis
        image, shifts[0] = image[::-1], -shifts[0]
    pieces = [_roll_pieces(n, s) for n, s in zip(image.shape, shifts, strict=True)]
    for (d0, s0, w0), (d1, s1, w1), (d2, s2, w2) in itertools.product(*pieces):
        if not wrap and (w0 or w1 or w2):
            out[d0, d1, d2] = 0
        else:
            out[d0, d1, d2] = image[s0, s1, s2]
    return out


def _roll_pieces(n: int, s: int) -> list[tuple[slice, slice, bool]]:
    """(destination, source, wrapped-around) slices of `np.roll` by `s` along an axis of length `n`."""
    if s == 0:
        return [(slice(0, n), slice(0, n), False)]
    if abs(s) >= n:
        raise ValueError(f"shift {s} too large for an axis of length {n}")
    if s > 0:
        return [(slice(s, n), slice(0, n - s), False), (slice(0, s), slice(n - s, n), True)]
    t = -s
    return [(slice(0, n - t), slice(t, n), False), (slice(n - t, n), slice(0, t), True)]


class Augment(grain.transforms.RandomMap):
    """grain transform: `augment` the "image" of each record (one copy per volume)."""

    def __init__(self, *, max_shift: int = 2, flip_p: float = 0.5, wrap: bool = True):
        self.max_shift, self.flip_p, self.wrap = max_shift, flip_p, wrap

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = augment(element["image"], rng, max_shift=self.max_shift, flip_p=self.flip_p, wrap=self.wrap)
        return {**element, "image": image}


class HostBlock(grain.MapDataset):
    """One process's contiguous block of every global batch (rows [h*b, (h+1)*b) of each batch of B).

    Contiguous blocks keep the global batch in the same order for any number of processes, so a run
    on 2 hosts x 2 devices sees exactly the batches (and dropout masks) of 1 host x 4 devices.
    Augmentation is drawn before the split, from each record's global position. An epoch (the parent's
    length) holds `len(parent) // B` whole global batches; the incomplete last one is dropped. Indices past
    one epoch address the parent's later epochs (`parent[e * len(parent) + i]`), as grain's `batch` does.
    """

    def __init__(self, parent: grain.MapDataset, global_batch: int, num_processes: int, process_index: int):
        super().__init__(parent)
        if global_batch % num_processes or not 0 <= process_index < num_processes:
            raise ValueError(f"HostBlock: global batch {global_batch} must split evenly over {num_processes} "
                             f"processes and process_index {process_index} must be below that")
        self._global, self._local, self._host = global_batch, global_batch // num_processes, process_index
        self._num_processes = num_processes

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, index = divmod(index, len(self))
        batch, row = divmod(index, self._local)
        return self._parent[epoch * len(self._parent) + batch * self._global + self._host * self._local + row]


class _DrawAugmentation(grain.transforms.RandomMap):
    """Draw each record's shift and flip; `AugmentedBatch` applies them while batching."""

    def __init__(self, max_shift: int, flip_p: float):
        self.max_shift, self.flip_p = max_shift, flip_p

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        shifts, flip = draw_augmentation(rng, max_shift=self.max_shift, flip_p=self.flip_p)
        return {**element, "_shifts": shifts, "_flip": flip}


class AugmentedBatch:
    """grain `batch_fn`: stack records into {"image": (B, D, H, W), "age": (B,), "sex": (B,), "id": (B,)},
    applying each record's drawn shift/flip while copying, so every volume is copied exactly once
    (by `threads` threads; numpy releases the GIL), straight into shared memory when grain runs it
    in a worker process."""

    def __init__(self, *, wrap: bool = True, dtype: str | np.dtype | None = None, threads: int = 1):
        self.wrap, self.dtype, self.threads = wrap, dtype, threads
        self._shared_memory = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def enable_shared_memory_output(self) -> None:  # grain's SupportsSharedMemoryOutput protocol
        self._shared_memory = True

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # thread pools are per process

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)

    def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
        first = records[0]["image"]
        shape, dtype = (len(records), *first.shape), np.dtype(self.dtype or first.dtype)
        if self._shared_memory:
            images = grain.multiprocessing.SharedMemoryArray(shape, dtype=dtype)
        else:
            images = np.empty(shape, dtype=dtype)

        def fill(i: int) -> None:
            r = records[i]
            shift_and_flip(r["image"], r.get("_shifts", (0, 0, 0)), r.get("_flip", False), wrap=self.wrap,
                           out=images[i])

        if self.threads > 1 and len(records) > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.threads)
            list(self._pool.map(fill, range(len(records))))
        else:
            for i in range(len(records)):
                fill(i)
        batch = {"image": images}
        for key in records[0]:
            if key != "image" and not key.startswith("_"):
                batch[key] = np.asarray([r[key] for r in records])
        return batch


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag in mp_prefetch once JAX is imported, which fails in programs that
    do not use absl.app (google/grain#1355, fixed after 0.2.18); use the flags' defaults then."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


GRAIN_WORKER_ENV = "JAXTL_GRAIN_WORKER"  # set to "i/n" in jaxtl's grain worker processes (see `jaxtl.cli`)


def _mark_grain_worker(index: int, count: int) -> None:
    """grain `worker_init_fn`: mark the process as a data worker, which must never join `jax.distributed`, and
    let a SIGTERM or Ctrl-C sent to the whole process group reach only the trainer (which checkpoints, then stops
    them)."""
    os.environ[GRAIN_WORKER_ENV] = f"{index}/{count}"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_dataset(
    source: Any,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    augmentation: bool = True,
    num_epochs: int | None = 1,
    workers: int = 0,
    threads: int | None = None,
    prefetch: int = 2,
    drop_remainder: bool = True,
    wrap: bool = True,
    max_shift: int = 2,
    flip_p: float = 0.5,
    dtype: str | np.dtype | None = None,
    process_index: int = 0,
    process_count: int = 1,
    start_batch: int = 0,
) -> grain.IterDataset:
    """grain pipeline: source -> shuffle -> (draw shift/flip) -> this process's block -> batch (applying the
    augmentation while copying, with `threads` threads) -> repeat -> prefetch. `batch_size` is per process:
    with `process_count` processes, each global batch of `batch_size * process_count` records is split into
    contiguous per-process blocks.

    Batches never span epochs: every epoch is one reshuffled, re-augmented pass over the source cut into
    `len(source) // (batch_size * process_count)` batches, so no batch holds a scan twice. `drop_remainder=True`
    (TL's `drop_last=True`) drops each epoch's incomplete last batch; with several processes it is always dropped.
    `num_epochs=None` repeats forever. `start_batch` skips that many batches (resume at a step without the
    iterator's saved state: the stream is a pure function of the batch index).

    Batches hold "image" (B, D, H, W) in `dtype` (default: the source's), "age", "sex" and "id". With
    `workers=0` (best for a `CacheSource`, where a batch is one memory copy per volume) batches are built in
    background threads, `prefetch` batches ahead. `workers > 0` runs the pipeline in that many processes
    (worth it for `NiftiSource`, where decoding dominates; for a cache, handing each batch over through fresh
    shared memory costs more than building it); they carry `GRAIN_WORKER_ENV` in their environment.
    """
    ds = grain.MapDataset.source(source).seed(seed)
    if shuffle:
        ds = ds.shuffle()  # grain reshuffles every epoch (its seed is offset by the epoch)
    if augmentation:
        ds = ds.random_map(_DrawAugmentation(max_shift, flip_p))  # drawn per record and epoch
    if process_count > 1:
        ds = HostBlock(ds, batch_size * process_count, process_count, process_index)
    threads = min(4, os.cpu_count() or 1) if threads is None else threads
    collate = AugmentedBatch(wrap=wrap, dtype=dtype, threads=threads)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)  # within one epoch
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # batch e * len(ds) + i is batch i of epoch e
    if start_batch:
        ds = ds[start_batch:]
    # Two threads build whole batches, `prefetch` ahead: each batch holds batch_size volumes.
    read = grain.ReadOptions(num_threads=2 if prefetch > 0 else 0, prefetch_buffer_size=max(prefetch, 0))
    if workers > 0:
        _mark_absl_flags_parsed()
        collate.enable_shared_memory_output()  # batches are built in the workers: straight into shared memory
        return ds.to_iter_dataset(read).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)),
            worker_init_fn=_mark_grain_worker)
    return ds.to_iter_dataset(read)
