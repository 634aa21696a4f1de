"""`jaxtl bench`: SFCN volumes per second on any hardware, beside the PyTorch reference in the same process.

Cases:
  embed  eval-mode forward to the 64-d features (what `jaxtl.embed` runs per batch), batch on the device;
         also the public `jaxtl.embed` end to end on the same host batch (api_vol_per_s)
  train  one full train step (`jaxtl.train.Trainer`: forward with dropout, backward, SGD with momentum and
         weight decay, BatchNorm statistics), Peng's KL loss on soft age labels
  input  the input pipeline (`benchmarks/bench_input.py`: NIfTI, cache, grain), no PyTorch counterpart
Configurations: "peng" (Peng's SFCN, channels 32-64-128-256-256-64), "transfer" (the paper's transfer runs,
32-64-64-64-64-64) at the requested resolutions, and "demo" (configs/sfcn_demo.py, 16-32-64-64-64-64, 4mm).

Timing: jaxtl is compiled ahead of time (compile_s), both sides run `warmup` untimed steps, then
`repeats` rounds alternate one jaxtl step and one PyTorch step, so both see the same machine load.
Each record has median/min/max/IQR of the step times, volumes/s (total and per device), achieved
FLOP/s from analytic convolution FLOPs and the fraction of the hardware peak where a peak is known.
The PyTorch reference (`jaxtl.torch_sfcn.PengSFCN`) gets the same weights, batch, precision (bfloat16 =
autocast) and thread count, in the faster of its two memory formats (channels-last 3D or contiguous).
`ratio` = jaxtl / PyTorch volumes/s per device (median steps); `ratio_paired` = median over rounds.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxtl.model import PENG_CHANNELS, TRANSFER_CHANNELS, check_train_batch

REPO = Path(__file__).resolve().parents[1]
DEMO_CHANNELS = (16, 32, 64, 64, 64, 64)  # = configs/sfcn_demo.py (checked by tests/test_bench.py)
CONFIGS = {"peng": PENG_CHANNELS, "transfer": TRANSFER_CHANNELS, "demo": DEMO_CHANNELS}
FIXED_RESOLUTION = {"demo": 4}  # mm; the demo config is defined on the 4mm cache
SUITES = ("embed", "train", "input")
DTYPES = ("float32", "bfloat16")
DEFAULT_BATCH = {1: 1, 2: 4, 4: 8}  # per resolution (mm), on one device
FULL_SHAPE = (160, 192, 160)  # 1mm network input
BIN_RANGE = (42.0, 82.0)  # Peng's UKB age bins (40 outputs)
SCHEMA = 1

# Dense peak FLOP/s per device (vendor datasheets, SXM parts), by a substring of `device_kind`. NVIDIA
# float32 = TF32 tensor cores: XLA (JAX's default precision) and cuDNN (PyTorch's allow_tf32 default for
# convolutions) both run float32 convolutions in TF32 there.
# The longest matching key wins ("H100 PCIe" before "H100"); JAX names a v5p "TPU v5" and a v5e "TPU v5 lite".
ACCELERATOR_PEAKS = {
    "H200": {"float32": 494.7e12, "bfloat16": 989e12},
    "H200 NVL": {"float32": 417.5e12, "bfloat16": 835e12},  # [UNVERIFIED] half the datasheet's sparse figures
    "H100": {"float32": 494.7e12, "bfloat16": 989e12},
    "H100 PCIe": {"float32": 378e12, "bfloat16": 756e12},
    "H100 NVL": {"float32": 417.5e12, "bfloat16": 835e12},
    "A100": {"float32": 156e12, "bfloat16": 312e12},
    "TPU v4": {"float32": None, "bfloat16": 275e12},
    "TPU v5": {"float32": None, "bfloat16": 459e12},
    "TPU v5 lite": {"float32": None, "bfloat16": 197e12},
    "TPU v6 lite": {"float32": None, "bfloat16": 918e12},
}


@dataclasses.dataclass(frozen=True)
class Case:
    suite: str
    config: str
    resolution: int  # mm: input is 160x192x160 / resolution
    batch: int  # global batch
    dtype: str

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(CONFIGS[self.config])

    @property
    def shape(self) -> tuple[int, int, int]:
        return input_shape(self.resolution)

    def slug(self) -> str:
        """A file-name-safe label: 'train-peng-1mm-bfloat16-b8'."""
        return f"{self.suite}-{self.config}-{self.resolution}mm-{self.dtype}-b{self.batch}"

    def label(self) -> str:
        return f"{self.suite} {self.config} {self.resolution}mm {self.dtype} batch {self.batch}"


def input_shape(resolution: int) -> tuple[int, int, int]:
    """Network input shape at `resolution` mm (block-averaged 1mm grid)."""
    if resolution not in DEFAULT_BATCH:
        raise ValueError(f"resolution must be 1, 2 or 4 (mm), got {resolution}")
    return tuple(n // resolution for n in FULL_SHAPE)


def plan_cases(suites: Sequence[str], configs: Sequence[str], resolutions: Sequence[int], dtypes: Sequence[str],
               batch: int | None = None, devices: int = 1) -> list[Case]:
    """Every (suite, config, resolution, dtype) to run; the demo config always runs at its own 4mm.

    Default batch: 1 (1mm), 4 (2mm), 8 (4mm) per device; a given batch must be a multiple of `devices`.
    """
    if batch is not None and (batch < 1 or (batch % devices and set(suites) - {"input"})):
        raise ValueError(f"batch {batch}: give a positive multiple of the {devices} device(s)")
    for name, given, allowed in (("suite", suites, SUITES), ("config", configs, CONFIGS), ("dtype", dtypes, DTYPES)):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {', '.join(bad)}; use {', '.join(allowed)}")
    for r in resolutions:
        input_shape(r)
    cases: list[Case] = []
    for suite in suites:
        if suite == "input":
            # the cache's dtype (--dtype applies to the network)
            cases += [Case("input", "pipeline", r, 8 if batch is None else batch, "float16") for r in resolutions]
            continue
        for config in configs:
            for res in ([FIXED_RESOLUTION[config]] if config in FIXED_RESOLUTION else resolutions):
                for dtype in dtypes:
                    case = Case(suite, config, res, DEFAULT_BATCH[res] * devices if batch is None else batch, dtype)
                    if suite == "train":  # per device: PyTorch's reference runs one device's batch
                        check_train_batch(case.batch // devices, len(CONFIGS[config]), input_shape(res))
                    if case not in cases:
                        cases.append(case)
    return cases


# ------------------------------------------------------------------------------------------------
# FLOPs, hardware, versions


def layer_flops(channels: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Forward FLOPs (2 x MACs) of each SFCN convolution for one volume (k=3 blocks pool by 2, last k=1)."""
    d, h, w = shape
    out, cin, n = [], 1, len(channels)
    for b, cout in enumerate(channels):
        k = 3 if b < n - 1 else 1
        out.append(2 * d * h * w * cin * cout * k**3)
        if b < n - 1:
            d, h, w = d // 2, h // 2, w // 2
        cin = cout
    return out


def case_flops(suite: str, channels: Sequence[int], shape: Sequence[int]) -> int:
    """Analytic convolution FLOPs per volume: forward (embed), or forward + input and kernel gradients
    (train; no input gradient for the first layer). BatchNorm, pooling, ReLU and the update are not counted."""
    per_layer = layer_flops(channels, shape)
    if suite == "embed":
        return sum(per_layer)
    return 3 * sum(per_layer) - per_layer[0]


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (s.strip() for s in line.split(":", 1))
                if key and key not in info:
                    info[key] = value
            elif info:
                break
    except OSError:
        pass
    return info


def _cpu_max_mhz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        return None


def hardware_info() -> dict[str, Any]:
    """CPU model, cores and vector features; accelerator name and count; a short id for file names."""
    import jax

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = len(cpus)
    dev = jax.devices()[0]
    accelerator = None if dev.platform == "cpu" else dev.device_kind
    cpu_model = info.get("model name") or platform.processor() or platform.machine()
    hw = {
        "platform": dev.platform,
        "accelerator": accelerator,
        "accelerator_count": jax.device_count() if accelerator else 0,
        "devices": jax.device_count(),
        "cpu_model": cpu_model,
        "cpu_cores": cores,
        "cpu_physical_cores": _physical_cores(cpus),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family": int(info["cpu family"]) if info.get("cpu family", "").isdigit() else None,
        "cpu_model_number": int(info["model"]) if info.get("model", "").isdigit() else None,
        "cpu_stepping": int(info["stepping"]) if info.get("stepping", "").isdigit() else None,
        "cpu_mhz": _cpu_max_mhz() or (float(info["cpu MHz"]) if "cpu MHz" in info else None),
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "hostname": platform.node(),
    }
    hw["id"] = hardware_id(hw)
    return hw


def _physical_cores(cpus: Sequence[int]) -> int | None:
    """Physical cores among the logical CPUs `cpus` (SMT siblings share a core's vector units); None where Linux's
    topology files are missing."""
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(cores) or None


def hardware_id(hw: dict[str, Any]) -> str:
    """'cpu-amd-epyc-fam25-m17-2core', 'gpu-nvidia-h100-80gb-hbm3-x8': a file-name-safe label of the hardware. A
    CPU model name without a model number (VMs report "AMD EPYC" or "Intel(R) Xeon(R) Processor" for several
    generations) gets the CPU family and model number (Zen 3 and Zen 4 share family 25, Intel's cores family 6)."""
    def slug(s: str) -> str:
        return "-".join("".join(c if c.isalnum() else " " for c in s.lower()).split())

    if hw.get("accelerator"):
        return f"{hw['platform']}-{slug(hw['accelerator'])}-x{hw['accelerator_count']}"
    generation = "".join(f"-{tag}{n}" for tag, n in zip(("fam", "m"), _generation(hw), strict=True) if n is not None)
    return f"cpu-{slug(hw.get('cpu_model') or 'unknown')}{generation}-{hw['cpu_cores']}core"


def _generation(hw: dict[str, Any]) -> tuple[int | None, int | None]:
    """(family, model number) where the CPU's model name has no model number to tell generations apart, else
    (None, None); records made before the model number was recorded have None there."""
    if any(c.isdigit() for c in hw.get("cpu_model") or ""):
        return None, None
    return hw.get("cpu_family"), hw.get("cpu_model_number")


def hardware_name(hw: dict[str, Any]) -> str:
    """'NVIDIA H200 x1', 'AMD EPYC family 25 model 17 (2 cores)': the report's hardware column (as `hardware_id`)."""
    if hw.get("accelerator"):
        return f"{hw['accelerator']} x{hw['accelerator_count']}"
    generation = "".join(f" {tag} {n}" for tag, n in zip(("family", "model"), _generation(hw), strict=True)
                         if n is not None)
    return f"{hw.get('cpu_model') or 'unknown'}{generation} ({hw['cpu_cores']} cores)"


def device_entry(kind: str, table: Mapping[str, Any]) -> str | None:
    """The key of `table` that a device kind contains, the longest one ("NVIDIA H100 PCIe" -> "H100 PCIe", not
    "H100"); None when none does."""
    return next((k for k in sorted(table, key=len, reverse=True) if k.lower() in kind.lower()), None)


def peak_flops(hw: dict[str, Any], dtype: str) -> tuple[float | None, str]:
    """Peak FLOP/s of all devices in use and how it was derived (None when unknown).

    CPU: physical cores (of the CPUs the process may run on; SMT siblings share them) x 2 (FMA) x vector lanes x 2
    FMA pipes x clock, with 16 float32 lanes for AVX-512 (8 on
    AMD family 25 = Zen 4, which executes 512-bit operations in two halves), 8 for AVX2 (4 on AMD before Zen 2),
    and twice that for
    bfloat16 with AVX512_BF16 (VDPBF16PS); no bfloat16 peak with AMX. Intel parts with one AVX-512 FMA unit
    per core have half this peak (not visible in /proc/cpuinfo). The clock is cpufreq's maximum, else
    /proc/cpuinfo's MHz (on virtual machines the nominal TSC clock: boost clocks make the true peak higher).
    """
    if hw.get("accelerator"):
        key = device_entry(hw["accelerator"], ACCELERATOR_PEAKS)
        if key is None or not ACCELERATOR_PEAKS[key].get(dtype):
            return None, f"no datasheet peak for {hw['accelerator']} {dtype}"
        peak, n = ACCELERATOR_PEAKS[key][dtype], hw["accelerator_count"]
        kind = "TF32 (float32)" if dtype == "float32" and hw["platform"] == "gpu" else dtype
        return peak * n, f"{n} x {key} dense {kind} datasheet peak {peak / 1e12:g} TFLOP/s"
    flags, mhz = set(hw.get("cpu_flags", [])), hw.get("cpu_mhz")
    if not mhz:
        return None, "CPU clock unknown"
    amd = hw.get("cpu_vendor") == "AuthenticAMD"
    if "avx512f" in flags:
        lanes = 8 if (amd and hw.get("cpu_family") == 25) else 16
    elif "avx2" in flags:
        lanes = 4 if (amd and hw.get("cpu_family") in (21, 22, 23) and (hw.get("cpu_model_number") or 0) < 0x30) \
            else 8  # Bulldozer..Zen+ split 256-bit AVX2 into 128-bit halves (Zen 2 = family 23, model >= 0x30)
    else:
        return None, "no AVX2/AVX-512: peak not estimated"
    if dtype == "bfloat16":
        if "amx_bf16" in flags:  # AMX tiles: a peak this formula does not model
            return None, "AMX bfloat16 peak not modelled"
        lanes *= 2 if "avx512_bf16" in flags else 1
    cores = hw.get("cpu_physical_cores") or hw["cpu_cores"]  # records before the field: no SMT seen there
    peak = cores * 2 * lanes * 2 * mhz * 1e6
    return peak, (f"{cores} physical cores x 2 FMA pipes x {lanes} {dtype} lanes x 2 FLOP x {mhz:.0f} MHz "
                  f"= {peak / 1e9:.0f} GFLOP/s (nominal clock)")


# Environment variables that change what a run measures (allocator, threads, devices), recorded where set.
RECORDED_ENV = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR",
                "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND",
                "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "JAXTL_CONV_IMPL", "JAXTL_TILE_MB", "TF_GPU_ALLOCATOR")


def versions() -> dict[str, Any]:
    import flax
    import jax
    import jaxlib

    out = {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
           "jaxlib": jaxlib.__version__, "flax": flax.__version__, "torch": None,
           "xla_flags": os.environ.get("XLA_FLAGS") or None,
           "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}}
    if importlib.util.find_spec("torch") is not None:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["torch_cuda"], out["torch_cudnn"] = torch.version.cuda, str(torch.backends.cudnn.version())
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        out["jax_backend"] = getattr(dev.client, "platform_version", None)  # e.g. "cuda 13000"
        try:
            out["gpu_driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                               capture_output=True, text=True, timeout=10,
                                               check=True).stdout.split("\n")[0].strip() or None
        except (OSError, subprocess.SubprocessError):
            out["gpu_driver"] = None
    return out


def provenance() -> str:
    """'AMD EPYC family 25 (2 cores), jaxtl commit 1234abc, JAX 0.10.2, 2026-11-27': where and with what a report's
    timings were measured."""
    import jax

    commit = git_commit()
    ref = (commit["commit"] or "unknown")[:7] + ("+dirty" if commit.get("dirty") else "")
    return (f"{hardware_name(hardware_info())}, jaxtl commit {ref}, JAX {jax.__version__}, "
            f"{datetime.date.today().isoformat()}")


def git_commit() -> dict[str, Any]:
    """HEAD of the checkout jaxtl runs from, and whether tracked files differ from it (the bench's own records
    under benchmarks/results/ aside: a run appending to them made the next run of the same invocation "dirty").
    $JAXTL_GIT_COMMIT, the commit a copy of the tree was made from, wins where it names another commit (what git
    found is kept as `checkout`) or there is no .git."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    # only jaxtl's own checkout: an installed jaxtl (site-packages) inside some other repository is not its commit
    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == REPO.resolve() else None
    sent = os.environ.get("JAXTL_GIT_COMMIT")
    if commit is None and sent:  # a copy of the tree without .git
        return {"commit": sent, "dirty": None, "source": "JAXTL_GIT_COMMIT"}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results") \
        if commit else None
    found = {"commit": commit, "dirty": bool(status) if status is not None else None}
    if sent and not commit.startswith(sent):  # a copy of a newer tree over an older .git (a GPU machine, 2026-11-28)
        return {"commit": sent, "dirty": None, "source": "JAXTL_GIT_COMMIT", "checkout": found}
    return found


# ------------------------------------------------------------------------------------------------
# Timing


# Other processes using more than this many cores' worth of CPU (before, during or after the timed steps) make a
# record "busy": PyTorch's OpenMP threads slow down far more than jaxtl's under contention (demo train on this
# project's 2-core VM: PyTorch 22x, jaxtl 3.6x), so a busy record's ratio says little.
BUSY_CORES = 0.25
# On a GPU or TPU the host only feeds the device, and the end-to-end `jaxtl.embed()` steps' host-to-device copies
# show up as other CPU time (the driver's kernel work is not this process's): the H200 records of 2026-11-27 show
# 0.3-0.74 cores during each embed case and 0.0 during the train cases (no `jaxtl.embed()` there), nothing else
# running. There a record is busy from a whole core of other work.
BUSY_CORES_ACCELERATOR = 1.0


def busy_cores(hardware: dict | None) -> float:
    """The other processes' CPU (cores) above which a record on this hardware is busy."""
    return BUSY_CORES if (hardware or {}).get("platform", "cpu") == "cpu" else BUSY_CORES_ACCELERATOR


class OtherCPU:
    """Cores' worth of CPU that other processes used between `start()` and `cores()`: the host's busy time
    (Linux /proc/stat, steal included) minus this process's own CPU time, over the wall time. None where
    /proc/stat is not there. In a container the host's other tenants count too (an over-estimate)."""

    def start(self) -> OtherCPU:
        self.t0, self.b0, self.o0 = time.perf_counter(), self._busy(), self._own()
        return self

    def cores(self) -> float | None:
        b1, o1, dt = self._busy(), self._own(), time.perf_counter() - self.t0
        if self.b0 is None or b1 is None or dt <= 0:
            return None
        return round(max(0.0, (b1 - self.b0) - (o1 - self.o0)) / dt, 2)

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system


def other_cpu(interval: float = 0.5) -> float | None:
    """Cores' worth of CPU that other processes used over the next `interval` seconds (see `OtherCPU`)."""
    probe = OtherCPU().start()
    time.sleep(interval)
    return probe.cores()


def is_busy(record: dict) -> bool:
    """Whether other processes shared the machine during the record (see BUSY_CORES); old records without the
    measurement: when the 1-minute load average exceeded the cores plus one (the bench's own load)."""
    measured = [v for v in (record.get("other_cpu_cores") or {}).values() if v is not None]
    if measured:
        return max(measured) > busy_cores(record.get("hardware"))
    load = (record.get("load_avg") or {}).get("end")
    cores = (record.get("hardware") or {}).get("cpu_cores")
    return bool(load and cores and load[0] > cores + 1)


def step_stats(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and inter-quartile range of step times (seconds)."""
    t = np.asarray(times, np.float64)
    q25, q75 = np.percentile(t, [25, 75])
    return {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max()), "iqr": float(q75 - q25),
            "n": int(t.size), "all": [float(f"{x:.6g}") for x in t]}


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     warmup_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Run each (blocking) function `warmup` times (their times go to `warmup_times`), then `repeats` rounds of
    one call each, alternating."""
    for name, fn in fns.items():
        for _ in range(warmup):
            start = time.perf_counter()
            fn()
            if warmup_times is not None:
                warmup_times.setdefault(name, []).append(time.perf_counter() - start)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------
# jaxtl side


@dataclasses.dataclass
class Runner:
    """One side of a case: a blocking step function plus what was measured while building it."""

    step: Callable[[], Any]
    compile_s: float | None = None
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    output: Callable[[], np.ndarray] | None = None  # embed: features, for the numerical cross-check
    api: Callable[[], Any] | None = None  # embed: the public `jaxtl.embed` on the same host batch
    stream: Callable[[int], Any] | None = None  # embed: k batches dispatched back to back, then their features fetched


def _compiled_memory(compiled) -> dict[str, Any]:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"compiled_bytes": int(total), "compiled_temp_bytes": int(m.temp_size_in_bytes)}


def _device_peak_memory() -> int | None:
    """The devices' high-water mark of allocated bytes since the process started (None where not reported)."""
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    if not stats or stats[0] is None or "peak_bytes_in_use" not in stats[0]:
        return None
    return int(max(s["peak_bytes_in_use"] for s in stats))


def _process_peak_rss() -> int | None:
    """The process's resident-memory high-water mark in bytes (host memory: jaxtl's and PyTorch's together, since
    the process started); None where `resource` is missing."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def case_peak_memory(before: int | None, after: int | None) -> int | None:
    """A case's own peak device memory: the process high-water mark (JAX cannot reset it) when the case raised
    it, else unknown (None: no more than an earlier case of the same process)."""
    if after is None or (before is not None and after <= before):
        return None
    return after


def _make_model(case: Case, conv_impl: str, torch_state: dict | None, seed: int = 0):
    import jax.numpy as jnp
    from flax import nnx

    from jaxtl.model import SFCN

    model = SFCN(case.channels, int(BIN_RANGE[1] - BIN_RANGE[0]), dtype=jnp.dtype(case.dtype),
                 conv_impl=conv_impl, rngs=nnx.Rngs(seed))
    if torch_state is not None:
        from jaxtl.weights import state_from_torch

        nnx.update(model, state_from_torch(torch_state, case.channels))
    return model


def jaxtl_embed(case: Case, x: np.ndarray, conv_impl: str = "auto", torch_state: dict | None = None) -> Runner:
    """Eval forward to the pooled 64-d features, batch sharded over all local devices (as `jaxtl.embed`)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxtl.conv import compiler_options, resolve_impl
    from jaxtl.model import jit_on_mesh
    from jaxtl.train import make_mesh

    model = _make_model(case, conv_impl, torch_state)
    model.eval()
    mesh = make_mesh(jax.local_devices())
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    fn = jit_on_mesh(lambda state, x: nnx.merge(graphdef, state).features(x), mesh)
    start = time.perf_counter()
    compiled = fn.lower(state, xs).compile()
    compile_s = time.perf_counter() - start
    from jaxtl.embed import embed

    def step() -> np.ndarray:  # ends when the features are on the host (64 floats per volume), never before
        return np.asarray(compiled(state, xs))

    def stream(k: int) -> list[np.ndarray]:  # the device never waits for the host between batches
        outs = [compiled(state, xs) for _ in range(k)]
        return [np.asarray(o) for o in outs]

    return Runner(step=step, compile_s=compile_s, memory=_compiled_memory(compiled),
                  info={"conv_impl": resolve_impl(conv_impl), "conv_tile_bytes": _tile_bytes(conv_impl),
                        "compiler_options": compiler_options(list(mesh.devices.flat))}, output=step,
                  api=lambda: embed(x, model, batch_size=case.batch, progress=False), stream=stream)


def _tile_bytes(conv_impl: str) -> int | None:
    """jaxtl.conv's tile size where its CPU convolution runs, else None."""
    from jaxtl import conv

    return conv.TILE_BYTES if conv.resolve_impl(conv_impl) == "fast" else None


def jaxtl_train(case: Case, x: np.ndarray, ages: np.ndarray, conv_impl: str = "auto",
                torch_state: dict | None = None) -> Runner:
    """One `Trainer` step: forward (dropout 0.5), KL loss, backward, SGD (lr 0.01, momentum 0.9, wd 1e-3), BN."""
    import jax

    from jaxtl.config import ModelConfig, OptimConfig, TrainConfig
    from jaxtl.conv import compiler_options, resolve_impl
    from jaxtl.train import Trainer

    config = TrainConfig(task="age", bin_range=BIN_RANGE, batch_size=case.batch,
                         model=ModelConfig(channels=case.channels, dropout=0.5, dtype=case.dtype),
                         optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=1e-3))
    trainer = Trainer.create(config, steps_per_epoch=1000, model=_make_model(case, conv_impl, torch_state))
    images, labels = trainer.global_batch(x), trainer.global_batch(ages.astype(np.float32))
    base_key = jax.random.key(config.seed)
    start = time.perf_counter()
    lr = np.float32(config.optim.lr)
    compiled = trainer.train_fn.lower(trainer.state, images, labels, base_key, lr).compile()
    compile_s = time.perf_counter() - start
    counter = [0]

    def step():
        counter[0] += 1
        trainer.state, loss, _ = compiled(trainer.state, images, labels, jax.random.fold_in(base_key, counter[0]), lr)
        jax.block_until_ready(trainer.state)
        return float(loss)

    return Runner(step=step, compile_s=compile_s, memory=_compiled_memory(compiled),
                  info={"conv_impl": resolve_impl(conv_impl), "conv_tile_bytes": _tile_bytes(conv_impl),
                        "compiler_options": compiler_options(list(trainer.mesh.devices.flat)),
                        "weights": "PyTorch's" if torch_state else "own init"})


# ------------------------------------------------------------------------------------------------
# PyTorch side


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _torch_device() -> str | None:
    """The PyTorch device matching JAX's backend, or None when there is no fair counterpart."""
    import jax
    import torch

    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    return None


def torch_reference_state(channels: Sequence[int], seed: int = 0) -> dict:
    """A PyTorch-initialised SFCN state_dict: the weights both sides use."""
    import torch

    from jaxtl.torch_sfcn import PengSFCN

    torch.manual_seed(seed)
    return PengSFCN(tuple(channels), int(BIN_RANGE[1] - BIN_RANGE[0])).state_dict()


def torch_runner(case: Case, x: np.ndarray, ages: np.ndarray, state: dict, *, threads: int, memory_format: str,
                 per_device_batch: int, compile: bool = False) -> Runner | None:
    """Peng's SFCN in PyTorch on one device, batch = jaxtl's per-device batch; `memory_format` "auto" probes
    channels-last 3D and contiguous (2 warm-up + 2 timed steps each) and keeps the faster. `compile`: the model
    through `torch.compile` (inductor; the first call compiles, timed apart as `first_call_s`)."""
    import torch

    from jaxtl.torch_sfcn import PengSFCN

    device = _torch_device()
    if device is None:
        return None
    torch.set_num_threads(threads)
    if device == "cuda":  # fixed shapes: let cuDNN pick its fastest algorithms, as PyTorch users do
        torch.backends.cudnn.benchmark = True
    xb = torch.from_numpy(np.ascontiguousarray(x[:per_device_batch, None])).to(device)
    targets = None
    if case.suite == "train":
        from jaxtl.labels import soft_labels

        targets = torch.from_numpy(np.array(soft_labels(ages[:per_device_batch], BIN_RANGE))).to(device) + 1e-10

    def build(fmt: str):
        model = PengSFCN(case.channels, int(BIN_RANGE[1] - BIN_RANGE[0])).to(device)
        model.load_state_dict(state)
        mf = torch.channels_last_3d if fmt == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=mf)
        inp = xb.contiguous(memory_format=mf)
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=case.dtype == "bfloat16")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        if case.suite == "embed":
            model.eval()
            features = torch.compile(model.features) if compile else model.features

            def step():
                with torch.inference_mode(), autocast:
                    out = features(inp)
                sync()
                return out
            return step, features, inp
        model.train()
        forward = torch.compile(model) if compile else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
        kl = torch.nn.KLDivLoss(reduction="batchmean")

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                log_probs = forward(inp)
            loss = kl(log_probs.float(), targets)
            loss.backward()
            opt.step()
            return loss.item()
        return step, None, inp

    formats = ["channels_last", "contiguous"] if memory_format == "auto" else [memory_format]
    probe, first_call, built = {}, {}, {}
    for fmt in formats:  # the faster of 2 timed steps after 2 warm-up steps (cuDNN autotuning, allocator)
        built[fmt] = step, _, _ = build(fmt)
        start = time.perf_counter()
        step()  # torch.compile compiles here
        first_call[fmt] = round(time.perf_counter() - start, 3)
        if len(formats) > 1:
            step()
            times = []
            for _ in range(2):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            probe[fmt] = round(min(times), 4)
    chosen = min(probe, key=probe.get) if probe else formats[0]
    step, features, inp = built[chosen]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    info = {"device": device, "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "memory_format": chosen, "compiled": "torch.compile (inductor)" if compile else None,
            "first_call_s": first_call, "autocast": "bfloat16" if case.dtype == "bfloat16" else None,
            "batch": per_device_batch, "format_probe_s": probe or None}

    def output():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=case.dtype == "bfloat16"):
            return features(inp).float().cpu().numpy()

    def stream(k: int) -> list[np.ndarray]:  # as jaxtl's: k forward passes queued, then their features copied
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=case.dtype == "bfloat16"):
            outs = [features(inp) for _ in range(k)]
        return [o.float().cpu().numpy() for o in outs]

    embed_case = case.suite == "embed"
    return Runner(step=step, info=info, output=output if embed_case else None, stream=stream if embed_case else None)


# ------------------------------------------------------------------------------------------------
# Cases


def _base_record(hw: dict, vers: dict, commit: dict, note: str | None) -> dict[str, Any]:
    return {"schema": SCHEMA, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "hardware": hw, "versions": vers, "git": commit, "note": note}


def _inputs(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((case.batch, *case.shape), dtype=np.float32) * 2  # mean ~1: normalised intensities
    ages = rng.uniform(BIN_RANGE[0] + 2, BIN_RANGE[1] - 2, case.batch)
    return x, ages


def run_case(case: Case, *, warmup: int = 2, repeats: int = 5, conv_impl: str = "auto", use_torch: bool = True,
             torch_memory_format: str = "auto", threads: int | None = None,
             profile: str | os.PathLike | None = None, stream: int | None = None,
             torch_compile: bool = False) -> dict[str, Any]:
    """Measure one embed/train case (jaxtl and, if available, PyTorch interleaved); the case part of a record.

    `profile`: after the timed steps, trace `PROFILE_STEPS` more jaxtl steps with the JAX profiler into
    `profile/<case>` (TensorBoard / Perfetto) and record the kernels that took the most time (`profile_top`).
    `stream`: embed cases also time this many batches (the same batch, already on the device) dispatched back to
    back, their features fetched after the last (`STREAM_REPEATS` rounds per side, interleaved; record `stream`):
    a step waits for its batch's features before the next is dispatched, so on an accelerator it includes a host
    round trip, which `jaxtl.embed` also avoids by dispatching a batch before fetching the previous one's features
    (it does copy each batch from the host: `api_vol_per_s`). None: `STREAM_BATCHES` on accelerators, 0 (not
    timed) on CPUs, where the host is the device."""
    import jax

    n_dev = jax.device_count()
    if case.batch % n_dev:
        raise ValueError(f"batch {case.batch} is not a multiple of the {n_dev} devices")
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    x, ages = _inputs(case)
    load_start, other_start = os.getloadavg(), other_cpu()
    want_torch = use_torch and torch_available()
    state = torch_reference_state(case.channels) if want_torch else None
    peak_before = _device_peak_memory()
    if case.suite == "embed":
        jx = jaxtl_embed(case, x, conv_impl, state)
    elif case.suite == "train":
        jx = jaxtl_train(case, x, ages, conv_impl, state)
    else:
        raise ValueError(f"run_case handles embed and train, not {case.suite!r}")
    tr = torch_runner(case, x, ages, state, threads=threads, memory_format=torch_memory_format,
                      per_device_batch=case.batch // n_dev, compile=torch_compile) if want_torch else None
    fns = {"jaxtl": jx.step} | ({"torch": tr.step} if tr else {}) | ({"api": jx.api} if jx.api else {})
    if not warmup:  # first calls never timed: jaxtl.embed compiles its own step, PyTorch autotunes cuDNN
        for fn in (jx.api, tr and tr.step):
            if fn:
                fn()
    warmup_times: dict[str, list[float]] = {}
    during = OtherCPU().start()
    times = time_interleaved(fns, warmup, repeats, warmup_times)
    k = (STREAM_BATCHES if jax.default_backend() != "cpu" else 0) if stream is None else stream
    stream_fns = {name: functools.partial(r.stream, k) for name, r in (("jaxtl", jx), ("torch", tr))
                  if k and r is not None and r.stream is not None}
    stream_times = time_interleaved(stream_fns, 1, STREAM_REPEATS) if stream_fns else {}
    other_during = during.cores()

    flops = case_flops(case.suite, case.channels, case.shape)
    rec: dict[str, Any] = {
        "case": case.suite, "config": case.config, "channels": list(case.channels), "resolution_mm": case.resolution,
        "input_shape": list(case.shape), "dtype": case.dtype, "batch": case.batch, "devices": n_dev,
        "per_device_batch": case.batch // n_dev, "warmup": warmup, "repeats": repeats, "threads": threads,
        "gflop_per_volume": round(flops / 1e9, 3), "compile_s": round(jx.compile_s, 3), **jx.info,
        "warmup_s": [round(t, 4) for t in warmup_times.get("jaxtl", [])], "step_s": step_stats(times["jaxtl"]),
    }
    med = rec["step_s"]["median"]
    rec["vol_per_s"] = case.batch / med
    rec["vol_per_s_per_device"] = rec["vol_per_s"] / n_dev
    rec["gflop_per_s"] = flops * case.batch / med / 1e9
    rec["memory"] = {**jx.memory, "device_peak_bytes": case_peak_memory(peak_before, _device_peak_memory()),
                     "process_peak_rss_bytes": _process_peak_rss()}
    if jx.api:  # end to end: host batch in, features out (includes transfers; compiles once, in the warm-up)
        rec["api_step_s"] = step_stats(times["api"])
        rec["api_vol_per_s"] = case.batch / rec["api_step_s"]["median"]
    hw_peak, how = peak_flops(hardware_info(), case.dtype)
    if "jaxtl" in stream_times:
        st = step_stats(stream_times["jaxtl"])
        vol = k * case.batch / st["median"]
        rec["stream"] = {"batches": k, "s": st, "vol_per_s": vol, "gflop_per_s": flops * vol / 1e9,
                         "peak_fraction": None if hw_peak is None else flops * vol / hw_peak,
                         "torch_vol_per_s": None, "ratio": None}
        if "torch" in stream_times:
            tvol = k * (case.batch // n_dev) / step_stats(stream_times["torch"])["median"]
            rec["stream"] |= {"torch_s": step_stats(stream_times["torch"]), "torch_vol_per_s": tvol,
                              "ratio": vol / n_dev / tvol}
    rec["peak_gflop_per_s"] = None if hw_peak is None else hw_peak / 1e9
    rec["peak_fraction"] = None if hw_peak is None else flops * case.batch / med / hw_peak
    rec["peak_assumption"] = how
    rec["torch"] = None
    rec["ratio"] = rec["ratio_paired"] = None
    if tr:
        import torch

        tst = step_stats(times["torch"])
        pb = case.batch // n_dev
        tvol = pb / tst["median"]
        rec["torch"] = {**tr.info, "warmup_s": [round(t, 4) for t in warmup_times.get("torch", [])],
                        "step_s": tst, "vol_per_s": tvol, "gflop_per_s": flops * pb / tst["median"] / 1e9,
                        "peak_memory_bytes": torch.cuda.max_memory_allocated() if tr.info["device"] == "cuda" else None}
        rec["ratio"] = rec["vol_per_s_per_device"] / tvol
        # the same per-device batch on both sides: per-round speed ratio = PyTorch time / jaxtl time
        rec["ratio_paired"] = float(np.median(np.asarray(times["torch"]) / np.asarray(times["jaxtl"])))
        if jx.api:
            rec["api_ratio"] = rec["api_vol_per_s"] / n_dev / tvol
        if jx.output is not None and tr.output is not None:
            a, b = jx.output()[:pb], tr.output()
            rec["features_max_rel_diff"] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    elif use_torch:
        rec["torch_skipped"] = "PyTorch not installed (pip install 'jaxtl[bench]')" if not torch_available() \
            else f"no PyTorch device matching JAX's {jax.default_backend()} backend"
    rec["load_avg"] = {"start": [round(v, 2) for v in load_start], "end": [round(v, 2) for v in os.getloadavg()]}
    rec["other_cpu_cores"] = {"start": other_start, "during": other_during, "end": other_cpu()}
    if profile is not None:
        try:
            rec["profile_dir"], rec["profile_top"] = profile_steps(jx.step, Path(profile) / case.slug())
        except Exception as e:  # noqa: BLE001 - e.g. no CUPTI on a GPU machine: keep the timings
            rec["profile_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    for key in ("vol_per_s", "vol_per_s_per_device", "gflop_per_s", "peak_gflop_per_s", "peak_fraction", "ratio",
                "ratio_paired", "api_vol_per_s", "api_ratio"):
        if isinstance(rec.get(key), float):
            rec[key] = float(f"{rec[key]:.5g}")
    return rec


PROFILE_STEPS = 3
STREAM_BATCHES = 8  # embed batches per back-to-back round (run_case's `stream`)
STREAM_REPEATS = 3


def profile_steps(step: Callable[[], Any], out_dir: Path, steps: int = PROFILE_STEPS,
                  top: int = 15) -> tuple[str, list[dict]]:
    """Trace `steps` calls of `step` into `out_dir` (JAX profiler, with a Perfetto trace) and summarise it."""
    import jax

    out_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(steps):
            step()
    traces = sorted(out_dir.glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    return str(out_dir), (summarize_trace(traces[-1], steps, top) if traces else [])


# Host-side frames of the trace that are not the computation itself (Python frames start with "$").
_RUNTIME_EVENTS = ("ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "block_until_ready", "TfrtCpu",
                   "ExecuteHelper", "PjRt")


def summarize_trace(path: str | os.PathLike, steps: int = 1, top: int = 15) -> list[dict]:
    """The kernels / XLA ops that took the most time in a Perfetto trace written by `jax.profiler.trace`:
    [{"where": process / thread, "name", "ms_per_step", "calls_per_step"}], most time first. Device events
    ("/device:..." processes: GPU streams, TPU ops) when there are any, else the host's XLA ops (not the runtime's
    or Python's annotations, such as a host wait in `np.asarray(jax.Array)`). Times are self times: an op that
    contains others on its thread (a while loop's body) is charged only for the time outside them; an event that
    starts inside another but ends after it is not contained."""
    import gzip

    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names: dict[tuple, str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            key = (e.get("pid"),) if e["name"] == "process_name" else (e.get("pid"), e.get("tid"))
            names[key] = str((e.get("args") or {}).get("name", ""))
    device_pids = {k[0] for k, v in names.items() if len(k) == 1 and v.startswith("/device:")}
    kept = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        pid, name = e.get("pid"), str(e.get("name", ""))
        if device_pids and pid not in device_pids:
            continue
        if not device_pids and (name.startswith("$") or name.startswith(_RUNTIME_EVENTS) or "::" in name
                                or "(" in name):  # "(": Python-side annotations, e.g. np.asarray(jax.Array)
            continue
        kept.append(e)
    totals: dict[tuple[str, str], list[float]] = {}
    open_events: dict[tuple, list[tuple[float, tuple[str, str]]]] = {}  # per thread: (end, key) of enclosing events
    for e in sorted(kept, key=lambda e: (float(e.get("ts", 0)), -float(e["dur"]))):
        pid, tid, name = e.get("pid"), e.get("tid"), str(e.get("name", ""))
        where = str(names.get((pid,), pid))  # host: summed over its threads (thread time, can exceed the wall)
        if device_pids:  # device: per line (streams, "XLA Ops", "XLA Modules", ...)
            where += f" / {names.get((pid, tid), tid)}"
        start, dur = float(e.get("ts", 0)), float(e["dur"])
        stack = open_events.setdefault((pid, tid), []) if "ts" in e else []  # no time stamp: nothing nests
        # nested only when it ends inside (GPU kernels of one stream overlap by rounding: 663.5 us starting
        # 663.3 us after the previous one had taken 166 us off that one's time)
        while stack and (start >= stack[-1][0] or start + dur > stack[-1][0]):
            stack.pop()
        if stack:  # nested in the enclosing event: that one's self time excludes it
            totals[stack[-1][1]][0] -= dur
        t = totals.setdefault((where, name), [0.0, 0])
        t[0] += dur
        t[1] += 1
        stack.append((start + dur, (where, name)))
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"where": where, "name": name, "ms_per_step": round(us / 1e3 / steps, 3),
             "calls_per_step": round(n / steps, 2)} for (where, name), (us, n) in ranked]


def _load_input_bench():
    """benchmarks/bench_input.py of a checkout, else the installed package's copy (jaxtl.benchmarks)."""
    from jaxtl.config import shipped_dir

    path = shipped_dir("benchmarks") / "bench_input.py"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the input suite needs benchmarks/bench_input.py (a jaxtl checkout or "
                                "an installed jaxtl)")
    spec = importlib.util.spec_from_file_location("jaxtl_bench_input", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_input_case(case: Case, *, repeats: int = 3, n_cache: int = 16, work_dir: str | None = None) -> list[dict]:
    """The input pipeline stages of `benchmarks/bench_input.py` at the case's resolution (no PyTorch side)."""
    module = _load_input_bench()
    other_start = other_cpu()
    params = {"n_files": 2, "n_cache": n_cache, "batch_size": case.batch, "threads": (1, 2), "workers": (1, 2),
              "epochs": 8, "downsample": case.resolution, "prepare_workers": 2, "nifti_repeats": 1,
              "repeats": repeats}
    stages = module.run_input_bench(**params, work_dir=work_dir)
    # others' CPU before and after, not during: the stages' worker processes would count as others
    others = {"start": other_start, "end": other_cpu()}
    out = []
    for s in stages:
        out.append({"case": "input", "config": s["stage"], "resolution_mm": case.resolution,
                    "input_shape": list(case.shape), "dtype": s.get("dtype"), "batch": s.get("batch_size"),
                    "vol_per_s": s["volumes_per_s"], "stage": s, "params": params, "torch": None, "ratio": None,
                    "load_avg": {"end": [round(v, 2) for v in os.getloadavg()]}, "other_cpu_cores": others})
    return out


def run_suite(cases: Sequence[Case], out: str | os.PathLike | None = None, *, warmup: int = 2, repeats: int = 5,
              conv_impl: str = "auto", use_torch: bool = True, torch_memory_format: str = "auto",
              note: str | None = None, log: Callable[[str], None] | None = None,
              profile: str | os.PathLike | None = None, stream: int | None = None,
              torch_compile: bool = False) -> list[dict]:
    """Run `cases`, append one JSON record per case (per stage for `input`) to `out`; returns the records.
    `profile`: a directory for a JAX profiler trace of each embed/train case; `stream`: embed batches timed back
    to back (see `run_case`)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    hw, vers, commit = hardware_info(), versions(), git_commit()
    if use_torch and not torch_available():
        log("jaxtl bench: PyTorch not installed, measuring jaxtl only (pip install 'jaxtl[bench]')")
    other = other_cpu()
    if other is not None and other > busy_cores(hw):
        why = ("PyTorch's OpenMP threads slow down far more than jaxtl's under contention, so the jaxtl/PyTorch "
               "ratios will not be reliable" if use_torch and torch_available() else "timings will vary")
        log(f"jaxtl bench: WARNING other processes are using {other:g} cores: {why}; measure on a quiet machine")
    records, failures = [], []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.label()} ...")
        try:
            if case.suite == "input":
                recs = run_input_case(case, repeats=repeats)
            else:
                recs = [run_case(case, warmup=warmup, repeats=repeats, conv_impl=conv_impl, use_torch=use_torch,
                                 torch_memory_format=torch_memory_format, profile=profile, stream=stream,
                                 torch_compile=torch_compile)]
        except Exception as e:  # noqa: BLE001 - e.g. out of device memory at a large batch: go on, fail at the end
            first = (str(e).splitlines() or [""])[0][:300]
            failures.append(f"{case.label()}: {type(e).__name__}: {first}")
            log(f"    FAILED {failures[-1]}")
            continue
        for r in recs:
            record = _base_record(hw, vers, commit, note) | r
            records.append(record)
            log("    " + summary_line(record))
            if record.get("profile_error"):
                log(f"    profile FAILED: {record['profile_error']}")
            for k in record.get("profile_top", [])[:8]:
                log(f"      {k['ms_per_step']:9.3f} ms/step  x{k['calls_per_step']:<6g} {k['name'][:70]}  "
                    f"[{k['where']}]")
            if out is not None:
                append_records([record], out)
    if failures:
        raise SuiteFailed(failures, records)
    return records


class SuiteFailed(RuntimeError):
    """Some cases of `run_suite` failed (the others ran and were written): `failures`, `records`."""

    def __init__(self, failures: list[str], records: list[dict]):
        super().__init__(f"{len(failures)} case(s) failed: " + "; ".join(failures))
        self.failures, self.records = failures, records


def summary_line(r: dict) -> str:
    """One human-readable line per record."""
    s = f"{r['case']} {r['config']}: jaxtl {r['vol_per_s']:.3g} vol/s"
    per_device = (r.get("devices") or 1) > 1 and r.get("vol_per_s_per_device") is not None
    if per_device:  # the ratio below is per device: PyTorch runs on one
        s += f" ({r['vol_per_s_per_device']:.3g} per device of {r['devices']})"
    if r.get("compile_s") is not None:
        s += f" (compile {r['compile_s']:.1f} s, {r['gflop_per_s']:.0f} GFLOP/s"
        s += f", {_percent(r['peak_fraction'])}% of peak)" if r.get("peak_fraction") else ")"
    if r.get("torch"):
        s += f"; PyTorch {r['torch']['vol_per_s']:.3g} vol/s ({r['torch']['memory_format']}"
        s += ", one device); jaxtl/PyTorch per device " if per_device else "); jaxtl/PyTorch "
        s += f"{r['ratio']:.2f} (paired {r['ratio_paired']:.2f})"
    if r.get("api_vol_per_s"):
        s += f"; jaxtl.embed() end to end {r['api_vol_per_s']:.3g} vol/s"
    st = r.get("stream")
    if st:
        s += f"; {st['batches']} batches back to back: jaxtl {st['vol_per_s']:.3g} vol/s"
        s += f" ({_percent(st['peak_fraction'])}% of peak)" if st.get("peak_fraction") else ""
        s += f", PyTorch {st['torch_vol_per_s']:.3g} (jaxtl/PyTorch {st['ratio']:.2f})" if st.get("ratio") else ""
    if r.get("other_cpu_cores") and is_busy(r):
        s += (f" [BUSY: other processes used up to {max(v for v in r['other_cpu_cores'].values() if v is not None)}"
              f" cores; the timings{' and the ratio' if r.get('ratio') else ''} are not reliable]")
    return s


def append_records(records: Sequence[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def load_records(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Records from .jsonl files (or directories of them)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or directory (the default is a checkout's benchmarks/results; "
                                    "pass --results DIR_OR_FILE)")
        files += sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .jsonl benchmark results in {', '.join(map(str, paths))}")
    records = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not a JSON record ({e})") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{f}:{n}: not a `jaxtl bench` record (a JSON {type(record).__name__})")
                missing = [k for k in ("hardware", "case", "config") if k not in record]
                if not missing and "id" not in (record["hardware"] or {}):
                    missing = ["hardware.id"]
                if missing:
                    raise ValueError(f"{f}:{n}: not a `jaxtl bench` record (no {', '.join(missing)})")
                records.append(record)
    return records


# ------------------------------------------------------------------------------------------------
# Report


# boolean XLA flags whose setting to this value is XLA's default: such a setting is no variant of a record
_XLA_DEFAULTS = {"xla_gpu_force_conv_nhwc": "false"}
_BOOLS = {"1": "true", "0": "false", "true": "true", "false": "false"}


def xla_options(r: dict) -> str:
    """The XLA options a record's jaxtl steps compiled with besides XLA's defaults, from $XLA_FLAGS and jaxtl's own
    (`conv.compiler_options`), as "xla_gpu_force_conv_nhwc" ("name=value" where not true); "" for none."""
    flags = ((r.get("versions") or {}).get("xla_flags") or "").split()
    flags += [f"--{k}={v}" for k, v in (r.get("compiler_options") or {}).items()]
    kept = set()
    for flag in flags:
        name, _, value = flag.removeprefix("--").partition("=")
        if not value or value.lower() in ("true", "false") or name in _XLA_DEFAULTS:  # 1/0 only for known booleans
            value = _BOOLS.get(value.lower(), value) if value else "true"
        if _XLA_DEFAULTS.get(name) != value:
            kept.add(name if value == "true" else f"{name}={value}")
    return " ".join(sorted(kept))


def _torch_compiled(r: dict) -> bool:
    return bool((r.get("torch") or {}).get("compiled"))


def _tile_override(r: dict) -> str | None:
    """'JAXTL_TILE_MB=4' where the run set jaxtl.conv's tile size by hand."""
    mb = ((r.get("versions") or {}).get("env") or {}).get("JAXTL_TILE_MB")
    return f"JAXTL_TILE_MB={mb}" if mb else None


def _key(r: dict) -> tuple:
    return (hardware_id(r["hardware"]), r["case"], r["config"], r.get("resolution_mm"), r.get("dtype"), r.get("batch"),
            r.get("conv_impl"), xla_options(r), _torch_compiled(r), _tile_override(r))


def _variant(r: dict) -> str:
    """What sets a record apart beyond config, dtype and batch: " (pallas; xla_gpu_force_conv_nhwc)", " (vs
    torch.compile)"."""
    parts = [p for p in (r.get("conv_impl") if r.get("conv_impl") != "fast" else None, xla_options(r),
                         _tile_override(r), "vs torch.compile" if _torch_compiled(r) else None) if p]
    return f" ({'; '.join(parts)})" if parts else ""


def latest(records: Sequence[dict]) -> list[dict]:
    """The most recent record of each (hardware, case, config, resolution, dtype, batch, conv_impl, XLA options), from
    a quiet machine where there is one (`is_busy`), with its PyTorch counterpart where one was measured (a later
    jaxtl-only run, e.g. a sweep script's, does not hide the comparison)."""
    def rank(r: dict) -> tuple:
        return not is_busy(r), r.get("torch") is not None, r.get("time", "")

    best: dict[tuple, dict] = {}
    for r in records:
        k = _key(r)
        if k not in best or rank(r) >= rank(best[k]):
            best[k] = r
    order = {s: i for i, s in enumerate(SUITES)}
    return sorted(best.values(), key=lambda r: (hardware_id(r["hardware"]), order.get(r["case"], 9), r["config"],
                                                 r.get("resolution_mm") or 0, str(r.get("dtype")), r.get("batch") or 0))


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "—" if v is None else format(v, spec)


def _percent(fraction: float | None) -> str:
    """A fraction as a percentage with two significant digits: 39, 8.3, 0.46 (a 1 on a GPU was 0.46%)."""
    return "—" if fraction is None else f"{100 * fraction:.2g}"


def _commit(r: dict) -> str:
    git = r.get("git") or {}
    return (git.get("commit") or "unknown")[:7] + ("+dirty" if git.get("dirty") else "")


def _stream(r: dict) -> str:
    """The report's back-to-back cell: "K=8: 2.93e+03 (39) / 340"; "—" where not timed."""
    st = r.get("stream")
    if not st:
        return "—"
    pct = "" if st.get("peak_fraction") is None else f" ({_percent(st['peak_fraction'])})"
    return f"K={st['batches']}: {_fmt(st['vol_per_s'])}{pct}" + (
        f" / {_fmt(st['torch_vol_per_s'])}" if st.get("torch_vol_per_s") else "")


def _timed(r: dict) -> str:
    """The report's sample cell: timed steps and their inter-quartile range as % of the median, jaxtl / PyTorch:
    "20 (1.6%) / 20 (0.4%)"."""
    def cell(st: dict | None) -> str:
        if not st or not st.get("n"):
            return "—"
        return f"{st['n']} ({100 * st['iqr'] / st['median']:.1f}%)" if st.get("median") else str(st["n"])

    return cell(r.get("step_s")) + (f" / {cell(r['torch'].get('step_s'))}" if r.get("torch") else "")


def _peaks(records: Sequence[dict]) -> str:
    """The peaks the report's "% peak" columns use, one line per hardware and dtype."""
    seen = {(hardware_name(r["hardware"]), r.get("dtype")): r["peak_assumption"] for r in latest(records)
            if r.get("peak_assumption") and r["case"] in ("embed", "train")}
    return "".join(f"- {hw}, {dtype}: {how}\n" for (hw, dtype), how in sorted(seen.items(), key=str))


def _caveats(records: Sequence[dict]) -> str:
    """What a row's figure is not (e.g. an allocator that ran out of memory for its workspaces), one line each."""
    return "".join(f"- {hardware_name(r['hardware'])}, {r['case']}{_variant(r)} {r['config']} {r.get('dtype')} batch "
                   f"{r.get('batch')}: {r['caveat']}\n" for r in latest(records) if r.get("caveat"))


_SOFTWARE = (("JAX", "jax"), ("PyTorch", "torch"), ("CUDA driver", "gpu_driver"))


def _software(records: Sequence[dict]) -> str:
    """The library versions behind the report's rows, one line per hardware (a GPU row's PyTorch is a CUDA build,
    a CPU row's the CPU build: ratios compare these)."""
    seen: dict[str, set[str]] = {}
    for r in latest(records):
        v = r.get("versions") or {}
        parts = [f"{name} {v[key]}" for name, key in _SOFTWARE if v.get(key)]
        if parts:
            seen.setdefault(hardware_name(r["hardware"]), set()).add(", ".join(parts))
    return "".join(f"- {hw}: {'; '.join(sorted(combos))}\n" for hw, combos in sorted(seen.items()))


def report_markdown(records: Sequence[dict]) -> str:
    """A markdown table of the latest record per case and hardware."""
    rows = latest(records)
    lines = ["| hardware | case | config | input | dtype | batch | jaxtl vol/s (all devices) | PyTorch vol/s (one "
             "device) | jaxtl/PyTorch per device | GFLOP/s | % peak | K batches on the device back to back: jaxtl "
             "vol/s (% peak) / PyTorch vol/s (one device) | timed steps (IQR % of median) jaxtl / PyTorch | "
             "compile s | load (1 min) | others' CPU (cores) | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hw = r["hardware"]
        hw_name = hardware_name(hw)
        t = r.get("torch") or {}
        shape = "x".join(map(str, r["input_shape"])) if r.get("input_shape") else "—"
        busy = " (busy)" if is_busy(r) else ""  # on the ratio, which load distorts most; else on jaxtl's figure
        ratio, busy_vol = ("—", busy) if r.get("ratio") is None else (f"{r['ratio']:.2f}{busy}", "")
        busy_vol += " (see caveats)" if r.get("caveat") else ""
        other = [v for v in (r.get("other_cpu_cores") or {}).values() if v is not None]
        load = (r.get("load_avg") or {}).get("end")
        lines.append(
            f"| {hw_name} | {r['case']}{_variant(r)} | {r['config']} | {r.get('resolution_mm')}mm {shape} | "
            f"{_fmt(r.get('dtype'), 's')} | {_fmt(r.get('batch'), 'd')} | {_fmt(r.get('vol_per_s'))}{busy_vol} | "
            f"{_fmt(t.get('vol_per_s'))} | {ratio} | {_fmt(r.get('gflop_per_s'), ',.0f')} | "
            f"{_percent(r.get('peak_fraction'))} | {_stream(r)} | "
            f"{_timed(r)} | "
            f"{_fmt(r.get('compile_s'), '.1f')} | {_fmt(load[0] if load else None, '.1f')} | "
            f"{_fmt(max(other) if other else None, '.2f')} | {_commit(r)} |")
    return "\n".join(lines) + "\n"


def chart_rows(records: Sequence[dict]) -> tuple[list[str], list[float], list[float]]:
    """The chart's bars: a label per embed/train case, jaxtl's and PyTorch's volumes/s per device (PyTorch runs on
    one device; 0 where it did not run)."""
    rows = [r for r in latest(records) if r["case"] in ("embed", "train")]
    labels = [f"{hardware_id(r['hardware'])} | {r['case']} {r['config']} {r['resolution_mm']}mm {r['dtype']} "
              f"b{r['batch']}{_variant(r)} @{_commit(r)}"
              + (" (busy)" if is_busy(r) else "") for r in rows]
    jx = [r.get("vol_per_s_per_device") or r["vol_per_s"] for r in rows]
    pt = [(r.get("torch") or {}).get("vol_per_s") or 0 for r in rows]
    return labels, jx, pt


def report_chart(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Horizontal bars, jaxtl vs PyTorch volumes/s (log scale), per embed/train case and hardware."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, jx, pt = chart_rows(records)
    if not labels:
        raise ValueError("no embed/train records to chart")
    rows = labels
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 2))
    ax.barh(y - 0.2, jx, 0.4, label="jaxtl", color="#1f77b4")
    ax.barh(y + 0.2, pt, 0.4, label="PyTorch (same run)", color="#ff7f0e")
    for yi, (a, b) in enumerate(zip(jx, pt, strict=True)):
        if b:
            ax.text(max(a, b) * 1.1, yi, f"x{a / b:.2f}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no empty margin above or below the bars
    ax.set_xscale("log")
    # a decade below the smallest bar: log-scale bars start from an arbitrary point, and matplotlib's own limit
    # could make a 1.8x ratio look like 20x where there are few bars; room on the right for the ratio labels
    ax.set_xlim(min((v for v in (*jx, *pt) if v > 0), default=1.0) / 10, max((*jx, *pt, 1.0)) * 8)
    ax.set_xlabel("volumes / s per device (log scale)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)  # above the bars, not on them
    fig.suptitle("SFCN throughput: jaxtl vs PyTorch reference, measured in the same process", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[str | os.PathLike], out_md: str | os.PathLike) -> tuple[Path, Path | None]:
    """`jaxtl bench report`: results/*.jsonl -> a markdown table (out_md) and a bar chart PNG beside it (None
    when no embed/train record is there to chart)."""
    records = load_records(results)
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    hws = sorted({hardware_id(r["hardware"]) for r in records})
    commits = sorted({(r.get("git") or {}).get("commit") or "unknown" for r in records})
    text = ("# jaxtl benchmark results\n\n"
            f"Generated by `jaxtl bench report` from {len(records)} records ({', '.join(hws)}); latest record per "
            f"case. Commits: {', '.join(c[:10] for c in commits)}. jaxtl/PyTorch is the ratio of volumes/s per "
            "device, both measured in the same process with alternating steps. GFLOP/s and % peak use analytic "
            "convolution FLOPs (see jaxtl/bench.py). \"(busy)\": other processes used more than "
            f"{BUSY_CORES:g} cores ({BUSY_CORES_ACCELERATOR:g} on a GPU or TPU machine, whose host only feeds the "
            "device) during the record (or, in records that predate that measurement, the load average "
            "exceeded the cores + 1); PyTorch's OpenMP threads slow down far more than jaxtl's then, so such ratios "
            "say little. A quiet record is shown wherever one exists. \"K batches on the device back to back\" "
            "(embed, `--stream`): the same batch, already on the device, dispatched K times before the features are "
            "fetched, without the host round trip of each step (host-to-device copies not included).\n\n"
            + report_markdown(records))
    peaks = _peaks(records)
    if peaks:
        text += "\n\"% peak\" is of these peaks:\n\n" + peaks
    caveats = _caveats(records)
    if caveats:
        text += "\nCaveats (added to a record after its run, `caveat`):\n\n" + caveats
    software = _software(records)
    if software:
        text += "\nSoftware of the rows above:\n\n" + software
    png = out_md.with_suffix(".png")
    if any(r["case"] in ("embed", "train") for r in records):
        report_chart(records, png)
        text += f"\n![jaxtl vs PyTorch]({png.name})\n"
    else:
        png = None
    out_md.write_text(text)
    return out_md, png


def default_output(hw_id: str | None = None) -> Path:
    """benchmarks/results/<hardware id>.jsonl (relative to the working directory)."""
    return Path("benchmarks") / "results" / f"{hw_id or hardware_info()['id']}.jsonl"


def parse_list(value: str, cast: Callable[[str], Any] = str) -> list:
    return [cast(v.strip()) for v in value.split(",") if v.strip()]


__all__ = ["Case", "plan_cases", "run_case", "run_suite", "run_input_case", "write_report", "load_records",
           "report_markdown", "layer_flops", "case_flops", "peak_flops", "hardware_info", "step_stats",
           "time_interleaved", "SuiteFailed"]
