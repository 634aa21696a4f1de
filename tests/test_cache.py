"""The preprocessed cache: contents, failures, crash safety and resume, data sources, augmentation."""

import hashlib
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxtl import cli
from jaxtl.cache import (
    GRAIN_WORKER_ENV,
    Augment,
    CacheSource,
    NiftiSource,
    augment,
    make_dataset,
    prepare_cache,
    read_index,
    shift_and_flip,
)
from jaxtl.cohort import read_cohort
from jaxtl.data import MNI_AFFINE, load_volume, reference_template

DS = 4  # downsample: 40x48x40 volumes keep the tests fast
SHARD = 3
N_GOOD = 7


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    """7 usable scans (distinct content) + a truncated file + a 4D file, with labels."""
    root = tmp_path_factory.mktemp("cohort")
    template = np.asarray(reference_template())
    rows = ["participant_id,path,age,sex,site"]
    for i in range(N_GOOD):
        arr = np.roll(template, i - 3, axis=1) * (1 + 0.1 * i)
        name = f"s{i}.nii.gz" if i % 2 else f"s{i}.nii"
        nib.save(nib.Nifti1Image((arr * 1000).astype(np.int16), MNI_AFFINE), root / name)
        rows.append(f"s{i},{name},{40 + i},{'FM'[i % 2]},A")
    good = (root / "s1.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(good[: len(good) // 3])
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10, 2), np.float32), MNI_AFFINE), root / "bold.nii.gz")
    rows.insert(3, "broken,broken.nii.gz,50,F,B")  # cohort position 2: a failure inside shard 0
    rows.append("bold,bold.nii.gz,51,M,B")
    (root / "cohort.csv").write_text("\n".join(rows) + "\n")
    return root / "cohort.csv"


@pytest.fixture(scope="module")
def reference_cache(cohort_csv, tmp_path_factory) -> Path:
    """An uninterrupted run, with 2 worker processes."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = prepare_cache(cohort_csv, out, downsample=DS, shard_size=SHARD, workers=2)
    assert summary.n_processed == N_GOOD + 2
    return out


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def _same_content(a: Path, b: Path) -> None:
    names_a, names_b = sorted(p.name for p in a.iterdir()), sorted(p.name for p in b.iterdir())
    assert names_a == names_b
    for name in names_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cache_contents(reference_cache, cohort_csv):
    index = read_index(reference_cache)
    assert index["dtype"] == "float16" and index["shape"] == [40, 48, 40] and index["downsample"] == DS
    assert index["shards"] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    scans = index["scans"]
    assert [s["id"] for s in scans] == [f"s{i}" for i in range(N_GOOD)]
    cohort = read_cohort(cohort_csv)
    source = CacheSource(reference_cache)
    assert len(source) == N_GOOD
    for k, entry in enumerate(scans):
        path = Path(entry["path"])
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["age"] == 40 + k and entry["sex"] == k % 2 and entry["site"] == "A"
        item = source[k]
        assert item["id"] == f"s{k}" and item["age"] == 40 + k and item["sex"] == k % 2
        expected = load_volume(path, downsample=DS).astype(np.float16)
        assert item["image"].dtype == np.float16 and np.array_equal(item["image"], expected)
        assert not item["image"].flags.writeable  # a view of the read-only memory map
    assert len(cohort) == N_GOOD + 2


def test_failures_are_recorded_and_do_not_stop_others(reference_cache):
    lines = (reference_cache / "failures.tsv").read_text().splitlines()
    assert lines[0] == "id\tpath\treason"
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[0] for r in rows] == ["broken", "bold"]
    assert rows[0][1].endswith("broken.nii.gz") and "truncated" in rows[0][2]
    assert rows[1][1].endswith("bold.nii.gz") and "4D image" in rows[1][2]
    assert [f["id"] for f in read_index(reference_cache)["failures"]] == ["broken", "bold"]


def test_rerun_on_finished_cache_changes_nothing(reference_cache, cohort_csv):
    before = _snapshot(reference_cache)
    summary = prepare_cache(cohort_csv, reference_cache, downsample=DS, shard_size=SHARD)
    assert summary.n_processed == 0 and summary.n_already_done == N_GOOD + 2
    assert not summary.ok and [f.id for f in summary.failures] == ["broken", "bold"]
    assert _snapshot(reference_cache) == before


def test_rerun_from_another_directory_and_of_an_older_plan(reference_cache, cohort_csv, tmp_path, monkeypatch):
    """The plan stores absolute paths: a cohort given relatively resumes from any working directory; a plan written
    before (paths relative to the working directory, no preprocessing version) still matches. An index of another
    preprocessing version is refused."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    plan = json.loads((cache / "plan.json").read_text())
    monkeypatch.chdir(cohort_csv.parent)
    del plan["preprocessing"]
    for scan in plan["scans"]:
        scan["path"] = os.path.relpath(scan["path"])
    (cache / "plan.json").write_text(json.dumps(plan))
    assert prepare_cache("cohort.csv", cache, downsample=DS, shard_size=SHARD).n_processed == 0
    monkeypatch.chdir(tmp_path)
    assert prepare_cache(cohort_csv, cache, downsample=DS, shard_size=SHARD).n_processed == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the same files through "..": the same plan
    relative = os.path.relpath(cohort_csv)
    assert ".." in relative and prepare_cache(relative, cache, downsample=DS, shard_size=SHARD).n_processed == 0
    assert json.loads((cache / "index.json").read_text())["preprocessing"] == 2
    text = (cache / "index.json").read_text()
    (cache / "index.json").write_text(text.replace('"preprocessing": 2', '"preprocessing": 1'))
    assert read_index(cache)  # version 1 differs only for Analyze files: none here
    (cache / "index.json").write_text(text.replace('"preprocessing": 2', '"preprocessing": 1').replace(
        's1.nii.gz', 's1.img'))
    with pytest.raises(ValueError, match="prepared with preprocessing version 1.*prepare the cache again"):
        read_index(cache)


def test_rerun_with_other_options_is_refused(reference_cache, cohort_csv):
    with pytest.raises(ValueError, match="different cohort or options \\(dtype 'float16' -> 'uint8'\\)"):
        prepare_cache(cohort_csv, reference_cache, downsample=DS, shard_size=SHARD, dtype="uint8")


def test_dtypes_round_trip(cohort_csv, tmp_path, reference_cache):
    f32 = CacheSource(reference_cache, dtype=np.float32)[0]["image"]
    assert f32.dtype == np.float32
    cohort = read_cohort(cohort_csv).select([0, 1])
    for dtype in ("float32", "uint8"):
        prepare_cache(cohort, tmp_path / dtype, dtype=dtype, downsample=DS)
        source = CacheSource(tmp_path / dtype)
        expected = load_volume(cohort[1].path, downsample=DS)
        image = source[1]["image"]
        assert image.dtype == np.float32
        if dtype == "float32":
            assert np.array_equal(image, expected)
        else:
            scale = (expected.max() - expected.min()) / 255
            assert np.abs(image - expected).max() <= scale * 0.51
    assert np.load(tmp_path / "uint8" / "shard_00000.npy", mmap_mode="r").dtype == np.uint8


# ---------------------------------------------------------------------------------------------------
# Crash safety and resume


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import jaxtl.cache as cache

    cohort, out, point, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    write = cache._Shard.write
    def patched_write(self, slot, array, record):
        calls["n"] += 1
        if point == "data_before_log" and calls["n"] == n and array is not None:
            data = self._open()
            data[slot] = array  # the slot's data is on disk, but not yet its log line
            data.flush()
            die()
        write(self, slot, array, record)
        if point == "after_log" and calls["n"] == n:
            die()
    cache._Shard.write = patched_write

    write_atomic = cache._write_atomic
    def patched_write_atomic(path, text):
        if point == "before_shard_meta" and path.name == "shard_00001.json":
            die()  # shard renamed to .npy, its metadata not yet written
        if point == "before_index" and path.name == "index.json":
            die()
        write_atomic(path, text)
    cache._write_atomic = patched_write_atomic

    process = cache._process_scan
    def slow_process(*args):
        if point == "async":
            time.sleep(0.3)
        return process(*args)
    cache._process_scan = slow_process

    cache.prepare_cache(cohort, out, downsample=4, shard_size=3)
    """
)


def _start(cohort_csv: Path, out: Path, point: str, n: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(cohort_csv), str(out), point, str(n)],
                            stderr=subprocess.PIPE)


@pytest.mark.parametrize(
    "point, n",
    [("after_log", 2), ("data_before_log", 4), ("before_shard_meta", 0), ("before_index", 0)],
)
def test_resume_after_kill_gives_identical_cache(cohort_csv, reference_cache, tmp_path, point, n):
    out = tmp_path / "cache"
    proc = _start(cohort_csv, out, point, n)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    with pytest.raises(ValueError, match="not a finished jaxtl cache"):
        CacheSource(out)
    with pytest.raises(FileNotFoundError, match="nope: no such cache directory"):  # a typo: said as such
        CacheSource(tmp_path / "nope")
    for shard in out.glob("shard_*.npy"):  # a shard under its final name is never half-written
        assert shard.read_bytes() == (reference_cache / shard.name).read_bytes()
    summary = prepare_cache(cohort_csv, out, downsample=DS, shard_size=SHARD)
    assert summary.n_already_done + summary.n_processed == N_GOOD + 2
    assert summary.n_already_done >= {"after_log": n, "data_before_log": n - 1}.get(point, 1)
    _same_content(out, reference_cache)
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tmp")) and not list(out.glob("*.jsonl"))


def test_resume_after_asynchronous_kill(cohort_csv, reference_cache, tmp_path):
    out = tmp_path / "cache"
    proc = _start(cohort_csv, out, "async")
    deadline = time.monotonic() + 60
    while not (out / "shard_00000.progress.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "index.json").exists()
    prepare_cache(cohort_csv, out, downsample=DS, shard_size=SHARD)
    _same_content(out, reference_cache)


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_prepare_exit_code_and_summary(cohort_csv, tmp_path, capsys):
    rc = cli.main(["prepare", str(cohort_csv), str(tmp_path / "c"), "--downsample", "4", "--dtype", "float16"])
    out = capsys.readouterr()
    assert rc == 1 and "2 FAILED" in out.out + out.err and "failures.tsv" in out.out + out.err
    good = tmp_path / "good.csv"
    good.write_text(f"path,age\n{cohort_csv.parent / 's0.nii'},50\n")
    capsys.readouterr()
    assert cli.main(["prepare", str(good), str(tmp_path / "g"), "--downsample", "4"]) == 0
    assert "prepare:" in capsys.readouterr().err  # the progress bar ...
    assert cli.main(["prepare", str(good), str(tmp_path / "g2"), "--downsample", "4", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "prepare:" not in out.err and "1/1 scans in cache" in out.out  # ... off for log files; the summary stays
    assert cli.main(["prepare", str(tmp_path / "nothing.csv"), str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Data sources and augmentation


def test_sources_are_picklable_and_agree(reference_cache, cohort_csv):
    source = CacheSource(reference_cache)
    _ = source[0]  # opens a memory map, which must not be pickled
    clone = pickle.loads(pickle.dumps(source))
    assert np.array_equal(clone[3]["image"], source[3]["image"]) and clone[-1]["id"] == "s6"
    with pytest.raises(IndexError):
        source[N_GOOD]
    nifti = pickle.loads(pickle.dumps(NiftiSource(read_cohort(cohort_csv).select(range(2)), downsample=DS)))
    item = nifti[1]
    assert item["id"] == "s1" and item["age"] == 41 and item["sex"] == 1
    np.testing.assert_allclose(item["image"], source[1]["image"], rtol=1e-3, atol=1e-3)


def test_shift_and_flip_matches_roll_and_flip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 8)).astype(np.float16)
    ones = np.ones_like(x)
    for shifts in itertools.product(range(-2, 3), repeat=3):
        for flip in (False, True):
            expected = np.roll(x, shifts, axis=(0, 1, 2))
            expected = expected[::-1] if flip else expected
            assert np.array_equal(shift_and_flip(x, shifts, flip), expected)
            kept = shift_and_flip(ones, shifts, flip, wrap=False) == 1
            zero_filled = shift_and_flip(x, shifts, flip, wrap=False)
            assert np.array_equal(zero_filled[kept], expected[kept]) and not zero_filled[~kept].any()
            assert kept.sum() == np.prod([n - abs(s) for n, s in zip(x.shape, shifts, strict=True)])


def test_augment_draws_shifts_in_range_and_flips_half_the_time():
    x = np.arange(8 * 9 * 10, dtype=np.float32).reshape(8, 9, 10)  # every voxel distinct
    rng = np.random.default_rng(1)
    seen, flips = set(), 0
    for _ in range(1200):
        y = augment(x, rng)
        i, j, k = np.argwhere(y == 0)[0]  # where voxel (0, 0, 0) went
        candidates = [((i, j, k), False), ((7 - i, j, k), True)]
        match = [(tuple(int((c + 2) % n) - 2 for c, n in zip(pos, x.shape, strict=True)), f)
                 for pos, f in candidates]
        match = [(sh, f) for sh, f in match if np.array_equal(shift_and_flip(x, sh, f), y)]
        assert len(match) == 1
        assert all(-2 <= v <= 2 for v in match[0][0])
        seen.add(match[0][0])
        flips += match[0][1]
    assert len(seen) == 125
    assert 500 < flips < 700


def test_make_dataset_batches_augmented_volumes(reference_cache):
    source = CacheSource(reference_cache)
    batches = list(make_dataset(source, batch_size=3, seed=7, num_epochs=2))
    assert len(batches) == 4  # 14 volumes, drop_remainder
    again = list(make_dataset(source, batch_size=3, seed=7, num_epochs=2))
    for b, c in zip(batches, again, strict=True):
        assert np.array_equal(b["image"], c["image"]) and b["id"].tolist() == c["id"].tolist()
    by_id = {source[i]["id"]: source[i]["image"] for i in range(len(source))}
    n_changed = 0
    for batch in batches:
        assert batch["image"].shape == (3, 40, 48, 40) and batch["image"].dtype == np.float16
        assert batch["age"].dtype == np.float32 and batch["sex"].shape == (3,)
        for image, scan_id, age in zip(batch["image"], batch["id"], batch["age"], strict=True):
            assert age == 40 + int(scan_id[1:])
            original = by_id[scan_id]
            assert any(np.array_equal(shift_and_flip(original, s, f), image)
                       for s in itertools.product(range(-2, 3), repeat=3) for f in (False, True))
            n_changed += not np.array_equal(original, image)
    assert n_changed >= 10
    plain = list(make_dataset(source, batch_size=7, shuffle=False, augmentation=False, dtype=np.float32))
    assert plain[0]["id"].tolist() == [f"s{i}" for i in range(7)]
    assert plain[0]["image"].dtype == np.float32 and np.array_equal(plain[0]["image"][2], source[2]["image"])


class _WorkerMarked:
    """A source whose records say which grain worker (GRAIN_WORKER_ENV) read them."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        ignores_term = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        return {**self.source[i], "worker": os.environ.get(GRAIN_WORKER_ENV, "") + ("|term-ignored" if ignores_term
                                                                                    else "")}


def test_make_dataset_in_a_worker_process(reference_cache):
    source = CacheSource(reference_cache)
    ds = make_dataset(_WorkerMarked(source), batch_size=3, shuffle=False, augmentation=False, workers=1)
    it = iter(ds)
    batches = list(it)
    it.close()
    assert [b["id"].tolist() for b in batches] == [["s0", "s1", "s2"], ["s3", "s4", "s5"]]
    assert np.array_equal(batches[1]["image"][2], source[5]["image"])
    # grain workers are marked (jaxtl.cli never joins them to jax.distributed); this process is not
    # and ignore SIGTERM (a signal to the process group reaches only the trainer, which checkpoints first)
    assert {w for b in batches for w in b["worker"].tolist()} == {"0/1|term-ignored"}
    assert GRAIN_WORKER_ENV not in os.environ


def test_batches_stay_within_epochs(reference_cache):
    """Each epoch is one reshuffled pass cut into len // batch batches (remainder dropped per epoch): no batch
    holds a scan twice, no batch spans two epochs, for one process and for contiguous per-process blocks."""
    source = CacheSource(reference_cache)  # 7 scans
    kw = dict(seed=5, augmentation=False, prefetch=0)
    batches = [b["id"].tolist() for b in make_dataset(source, batch_size=3, num_epochs=3, **kw)]
    assert len(batches) == 3 * (N_GOOD // 3)
    epochs = [sum(batches[e * 2:e * 2 + 2], []) for e in range(3)]
    assert all(len(set(ids)) == 6 for ids in epochs)  # 6 distinct scans per epoch, one left out
    assert len({tuple(ids) for ids in epochs}) == 3  # reshuffled every epoch
    endless = iter(make_dataset(source, batch_size=3, num_epochs=None, **kw))
    assert [next(endless)["id"].tolist() for _ in range(6)] == batches
    resumed = iter(make_dataset(source, batch_size=3, num_epochs=None, start_batch=4, **kw))
    assert [next(resumed)["id"].tolist() for _ in range(2)] == batches[4:]
    # 2 processes x 1 scan: each global batch of 2 is split into blocks; 3 global batches per epoch.
    one = [b["id"].tolist() for b in make_dataset(source, batch_size=2, num_epochs=2, **kw)]
    hosts = [[b["id"].tolist() for b in make_dataset(source, batch_size=1, num_epochs=2, process_count=2,
                                                     process_index=h, **kw)] for h in (0, 1)]
    assert len(one) == 2 * (N_GOOD // 2) and [a + b for a, b in zip(*hosts, strict=True)] == one
    assert all(len(set(sum(one[e * 3:e * 3 + 3], []))) == 6 for e in range(2))


def test_augment_transform_for_custom_pipelines(reference_cache):
    import grain

    source = CacheSource(reference_cache)
    ds = grain.MapDataset.source(source).seed(3).random_map(Augment(wrap=False))
    item = ds[0]
    assert item["image"].shape == (40, 48, 40) and item["id"] == "s0"


def test_rerun_redoes_scans_whose_file_changed(cohort_csv, tmp_path):
    """A re-simulated scan (new content) and a failed scan that was fixed are processed again on re-run; the
    others are kept. Without this the cache would pair new labels with old images."""
    import shutil

    root = tmp_path / "cohort"
    shutil.copytree(cohort_csv.parent, root)
    cache = tmp_path / "cache"
    assert prepare_cache(root / "cohort.csv", cache, downsample=DS, shard_size=SHARD).n_processed == N_GOOD + 2
    template = np.asarray(reference_template())
    nib.save(nib.Nifti1Image((np.roll(template, 5, axis=0) * 700).astype(np.int16), MNI_AFFINE), root / "s4.nii")
    shutil.copy(root / "s1.nii.gz", root / "broken.nii.gz")  # the fix of the truncated file
    summary = prepare_cache(root / "cohort.csv", cache, downsample=DS, shard_size=SHARD)
    assert summary.n_processed == 2 and [f.id for f in summary.failures] == ["bold"]
    source = CacheSource(cache)
    by_id = {source[k]["id"]: source[k]["image"] for k in range(len(source))}
    for name, scan in (("s4.nii", "s4"), ("broken.nii.gz", "broken"), ("s5.nii.gz", "s5")):
        expected = load_volume(root / name, downsample=DS).astype(np.float16)
        assert np.array_equal(by_id[scan], expected), scan
    assert prepare_cache(root / "cohort.csv", cache, downsample=DS, shard_size=SHARD).n_processed == 0
    # a copy that only changes the modification time (cp without -p, a checkout): hashed, not processed again,
    # and the index is left alone
    index = (cache / "index.json").read_bytes()
    os.utime(root / "s0.nii", ns=(1, 1))
    assert prepare_cache(root / "cohort.csv", cache, downsample=DS, shard_size=SHARD).n_processed == 0
    assert (cache / "index.json").read_bytes() == index
    shard = json.loads((cache / "shard_00000.json").read_text())["slots"]
    assert [r["source_stat"][1] for r in shard if r["slot"] == 0] == [1]


def test_a_full_disk_is_an_error_naming_the_shard_and_prepare_resumes(cohort_csv, reference_cache, tmp_path,
                                                                      monkeypatch):
    """The memory-mapped shard is reserved when created: a full disk is an OSError that says so (a sparse file had
    killed the process with SIGBUS at the first page written)."""
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"no space left for the shard shard_00000.*free space or use another OUT_DIR"):
        prepare_cache(cohort_csv, tmp_path / "cache", downsample=DS, shard_size=SHARD)
    monkeypatch.undo()
    prepare_cache(cohort_csv, tmp_path / "cache", downsample=DS, shard_size=SHARD)
    for shard in reference_cache.glob("shard_*.npy"):
        assert (tmp_path / "cache" / shard.name).read_bytes() == shard.read_bytes()


def test_prepare_workers_ignore_ctrl_c_and_are_stopped_at_once():
    """A terminal's Ctrl-C reaches every process of the group: prepare's workers ignore it (the parent stops them;
    one that caught it mid-job had kept the pool from shutting down, and a second Ctrl-C then hung prepare)."""
    import concurrent.futures
    import multiprocessing
    import multiprocessing.connection
    import os
    import time

    from jaxtl import cache

    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=cache._worker_init)
    pid = pool.submit(os.getpid).result(timeout=120)  # the worker has started and run its initializer
    job = pool.submit(time.sleep, 60)
    time.sleep(0.5)  # inside the job
    processes = list(pool._processes.values())
    assert [p.pid for p in processes] == [pid]
    os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert not job.done()  # ignored: without the initializer the job ends in KeyboardInterrupt
    start = time.time()
    cache._stop_pool(pool)
    # exited (the sentinel: is_alive() reads True for a process the pool's own thread reaped)
    assert len(multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0)) == len(processes)
    assert time.time() - start < 5


def test_a_cohort_given_as_a_cache_gets_told_to_prepare_it(tmp_path):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "participants.tsv").write_text("participant_id\tage\nsub-1\t50\n")
    with pytest.raises(ValueError, match=r"looks like a cohort, not a cache: prepare one first, `jaxtl prepare "
                                         r".*bids CACHE_DIR`, and pass CACHE_DIR"):
        read_index(tmp_path / "bids")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "plan.json").write_text("{}")
    with pytest.raises(ValueError, match="re-run the `jaxtl prepare` that writes it"):
        read_index(tmp_path / "half")
