"""Shared fixtures: tiny simulated cohorts and their caches (4mm, 40x48x40 inputs)."""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never read or write the user's $JAXTL_HOME (published weights, the compilation cache that the CLI
# commands turn on): each test process gets its own, empty one.
os.environ["JAXTL_HOME"] = tempfile.mkdtemp(prefix="jaxtl-home-")
atexit.register(shutil.rmtree, os.environ["JAXTL_HOME"], ignore_errors=True)

# Persistent compilation caches for the run, every compile in them: each pytest-xdist worker has its own, which the
# `jaxtl` commands its tests start (each a fresh interpreter, compiling the same model init and train steps again)
# share. Not one for both workers: JAX writes an entry without a lock unless the cache has a size limit, so a worker
# could read an entry the other is writing (a warning, which fails the tests that make warnings errors), and the
# limit's lock (and the scan of the folder at each write) made the suite slower (pytest 456 -> 509 s). Made under a
# folder the first process to load this file creates (xdist's controller, before it starts the workers, which
# inherit it), removed when that process exits. Measured on a 2-core Intel VM: summed test time 951 -> 863 s with
# one shared cache; a tiny `jaxtl pretrain` on a warm cache 6.5 -> 5.7 s (compiles under 0.2 s cached too).
if "JAXTL_TEST_XLA_CACHE" not in os.environ:  # not a user's $JAX_COMPILATION_CACHE_DIR either
    os.environ["JAXTL_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxtl-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXTL_TEST_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["JAXTL_TEST_XLA_CACHE"],
                                                       os.environ.get("PYTEST_XDIST_WORKER", "main"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The suite compiles hundreds of small programs and runs each a few times: without LLVM's optimisation passes
# XLA's CPU backend compiles them 2-3x faster (test_conv's whole-SFCN test: 9.5 -> 3.9 s) and computes the same
# values within the tests' tolerances. Speed is measured by `jaxtl bench`, never here. Every test process and
# subprocess (`xla_flags`) uses the same flags, so bitwise comparisons between them hold.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


# The order in which pytest-xdist's two workers take the test files (`make test`: `--dist loadfile
# --no-loadscope-reorder`): the longest first, every file ranked (seconds summed per file on the 2-core AMD EPYC VM,
# 2026-11-29: 246, 228, 150, 130, 94, 89, 84, 60, 56, 54, 53, 52, 46, 38, 28, then the short ones), so that the last
# files to start are the shortest. xdist's own order (most tests first) had left test_train_recovery.py (~160 s
# under load) to start last: one worker ran it alone for 40 s at the end.
SLOWEST_FIRST = ("test_transfer.py", "test_train_recovery.py", "test_train.py", "test_demo.py", "test_first_block.py",
                 "test_heads.py", "test_cache.py", "test_conv.py", "test_bench.py", "test_weights.py", "test_embed.py",
                 "test_simulate.py", "test_model.py", "test_experiment.py", "test_data.py", "test_cohort.py",
                 "test_labels.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a test subprocess: the suite's flags and `devices` virtual CPU devices."""
    return f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"


def run_python(code: str, devices: int = 1, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with `devices` virtual CPU devices (set before JAX is imported)."""
    full_env = {**os.environ, "XLA_FLAGS": xla_flags(devices), **env}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def shared_dir(tmp_path_factory, name: str, build) -> Path:
    """Folder `name` of this test run, made by `build(folder)` once: the pytest-xdist workers share it (whichever
    asks first builds it, the others wait). Tests only read it."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    root = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            build(root)
            (root / ".built").touch()
    return root


def _simulated_cache(root: Path, preset: str, n: int, seed: int) -> None:
    from jaxtl.cache import prepare_cache
    from jaxtl.simulate import simulate

    bids = simulate(preset, root / "bids", n=n, seed=seed, resolution=4, progress=False)
    summary = prepare_cache(bids, root / "cache", downsample=4, workers=1)
    assert summary.ok, summary


@pytest.fixture(scope="session")
def ukb_cache(tmp_path_factory) -> Path:
    """32 simulated `ukb` subjects at 4mm, prepared into a float16 cache."""
    return shared_dir(tmp_path_factory, "ukb", lambda root: _simulated_cache(root, "ukb", 32, 0)) / "cache"


TINY_CHANNELS = (4, 8, 8, 8, 8, 8)


@pytest.fixture(scope="session")
def ixi_tiny(tmp_path_factory) -> tuple[Path, Path]:
    """36 simulated `ixi` subjects (3 sites, ages 20-86) at 4mm: (BIDS directory, float16 cache). The CI demo's
    target cohort (seed 1, `jaxtl.demo.demo_cohorts`), which test_demo copies instead of simulating it again."""
    root = shared_dir(tmp_path_factory, "ixi", lambda root: _simulated_cache(root, "ixi", 36, 1))
    return root / "bids", root / "cache"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised tiny SFCNs saved as jaxtl model directories for 4mm inputs:
    {"age": bins 15-90, "sex": 2 classes}. Stand-ins for pretrained models in plumbing tests."""
    from flax import nnx

    from jaxtl.labels import make_task
    from jaxtl.model import SFCN
    from jaxtl.weights import DEFAULT_PREPROCESSING, save_model

    root = tmp_path_factory.mktemp("models")
    out = {}
    for seed, name in enumerate(("age", "sex")):
        task = make_task(name, (15, 90))
        model = SFCN(TINY_CHANNELS, task.num_outputs, rngs=nnx.Rngs(seed))
        out[name] = save_model(model, root / name, task, input_shape=(40, 48, 40),
                               preprocessing={**DEFAULT_PREPROCESSING, "downsample": 4})
    return out


def cuda_mlir(fn, *args) -> str:
    """The StableHLO text of `fn` exported for CUDA on this CPU-only machine: Pallas' Triton lowering runs at export
    (the Triton custom call is allowed), so a kernel Triton's lowering rejects fails here."""
    from jax import export

    exported = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    return exported.mlir_module()
