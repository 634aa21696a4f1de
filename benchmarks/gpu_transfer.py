"""Host-to-device copies and `jaxtl.embed()` end to end on a GPU (issue #7). On the H200 (2026-11-27) the public
`jaxtl.embed()` on one host batch of 8 volumes ran at 146 vol/s against the device step's 1234: a batch of 8
float32 volumes at 1mm is 157 MB to copy. What bounds a script embedding a cohort held in memory, and what would
lift it, per batch of B volumes (median of `repeats`):

  put_float32    jax.device_put of the (B, 160, 192, 160) float32 batch, until it is on the device
  put_bfloat16   the same batch already bfloat16 on the host (half the bytes)
  cast_bfloat16  converting the float32 batch to bfloat16 on the host (numpy, one thread)
  put_threads    B device_puts of one float32 volume each, from B threads at once
  embed_<dtype>  jaxtl.embed() over N in-memory volumes (batches of B, the next one read while one runs) with
                 Peng's SFCN computing in <dtype>: vol/s of a second call (the first, untimed, compiles); and
                 <dtype>_from_float16: the same volumes held as float16 (a prepared cache's type), copied as such
  embed_calls    a sequence of jaxtl.embed() calls after both dtypes compiled on 2 batches: on the H100
                 (2026-11-28, benchmarks/experiments/gpu-h100-2026-11-28/embed-calls.txt) the first call on 64
                 volumes and the first after a change of dtype ran 2.5-10x slower than the same call repeated.
                 Per call: wall time, vol/s, and where it went (the host-to-device copies of `to_devices`, on the
                 prefetch thread; the main thread's waits for each batch's features in `_fetch`). With a trace
                 directory (5th argument) a JAX profiler trace of the first call on 4 batches is written there.

On a CPU it runs a small shape and channel list (plumbing only). One record -> OUT.jsonl ("kind": "transfer").
Usage: python benchmarks/gpu_transfer.py OUT.jsonl [batch] [n_volumes] [repeats] [trace_dir]
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxtl
from jaxtl import bench
from jaxtl.model import PENG_CHANNELS, SFCN


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which waits for its own result) over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(batch: int, n: int, repeats: int, shape: tuple[int, ...], channels: tuple[int, ...]) -> dict:
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32) * 2  # mean ~1, as `jaxtl bench`
    x16 = x.astype(jnp.bfloat16)
    device = jax.devices()[0]

    def put(a):
        return lambda: jax.device_put(a, device).block_until_ready()

    with concurrent.futures.ThreadPoolExecutor(batch) as pool:
        def put_threads():
            for a in pool.map(lambda v: jax.device_put(v, device), list(x)):
                a.block_until_ready()

        s = {"put_float32": timed(put(x), repeats), "put_bfloat16": timed(put(x16), repeats),
             "cast_bfloat16": timed(lambda: x.astype(jnp.bfloat16), repeats),
             "put_threads": timed(put_threads, repeats)}
    rec = {"ms": {k: round(1e3 * v, 3) for k, v in s.items()},
           "gb_per_s": {k: round((x.nbytes if k != "put_bfloat16" else x16.nbytes) / v / 1e9, 2)
                        for k, v in s.items() if k.startswith("put")}}
    volumes = np.concatenate([x] * -(-n // batch))[:n]
    model = SFCN(channels, num_outputs=40, rngs=nnx.Rngs(0))
    rec["embed_vol_per_s"] = {}
    for host in ("float32", "float16"):  # float16: as a prepared cache holds them (copied as they are since 00cb72c)
        vols = volumes.astype(host)
        for dtype in ("float32", "bfloat16"):
            # untimed: the compile, and the device allocator's growth to N volumes' buffers (on the H200 the
            # first dtype timed, float32 after a call on one batch, had run at 68 vol/s, 118 ms a batch)
            jaxtl.embed(vols, model, batch_size=batch, dtype=dtype, progress=False)
            start = time.perf_counter()
            jaxtl.embed(vols, model, batch_size=batch, dtype=dtype, progress=False)
            key = dtype if host == "float32" else f"{dtype}_from_{host}"
            rec["embed_vol_per_s"][key] = round(n / (time.perf_counter() - start), 2)
    return rec


def embed_calls(model, volumes: np.ndarray, batch: int, trace_dir: str | None = None) -> list[dict]:
    """`jaxtl.embed()` called in a fixed sequence on fresh and repeated (volume count, dtype) pairs (see the
    module docstring); one dict per call. `volumes`: at least 4 batches (the calls use 2, 4 and 8 batches,
    cycling through `volumes`)."""
    E = importlib.import_module("jaxtl.embed")
    spent = {"copy": 0.0, "fetch": 0.0}
    originals = {"copy": E.to_devices, "fetch": E._fetch}

    def timed_part(name):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    def take(n):
        return volumes[np.arange(n) % len(volumes)]

    n2, n4, n8 = 2 * batch, 4 * batch, 8 * batch
    # the same array object for each count (as a script holding its cohort), except "fresh array": a new copy
    arrays = {n: take(n) for n in (n2, n4, n8)}
    sequence = [("warm-up", "bfloat16", n2, True), ("warm-up", "float32", n2, True),
                ("new count", "bfloat16", n4, True), ("repeat", "bfloat16", n4, True),
                ("new dtype", "float32", n4, True), ("repeat", "float32", n4, True),
                ("dtype back", "bfloat16", n4, True), ("fresh array", "bfloat16", n4, True),
                ("new count", "bfloat16", n8, True), ("repeat", "bfloat16", n8, True),
                ("no check", "bfloat16", n4, False), ("repeat", "bfloat16", n4, False)]
    calls = []
    E.to_devices, E._fetch = timed_part("copy"), timed_part("fetch")
    try:
        for i, (label, dtype, n, check) in enumerate(sequence):
            x = arrays[n].copy() if label == "fresh array" else arrays[n]
            spent.update(copy=0.0, fetch=0.0)
            trace = trace_dir is not None and i == 2  # the first call on a new volume count
            if trace:
                jax.profiler.start_trace(trace_dir)
            start = time.perf_counter()
            jaxtl.embed(x, model, batch_size=batch, dtype=dtype, progress=False, check=check)
            s = time.perf_counter() - start
            if trace:
                jax.profiler.stop_trace()
            calls.append({"label": label, "dtype": dtype, "n": n, "check": check, "s": round(s, 4),
                          "vol_per_s": round(n / s, 2), "copy_s": round(spent["copy"], 4),
                          "fetch_s": round(spent["fetch"], 4), "traced": trace})
            print(f"  {label:11s} {dtype:8s} {n:4d} volumes check={check!s:5s}: {n / s:8.1f} vol/s, {1e3 * s:7.1f} ms "
                  f"(copies {1e3 * spent['copy']:.1f} ms on the prefetch thread, waits for features "
                  f"{1e3 * spent['fetch']:.1f} ms)", flush=True)
    finally:
        E.to_devices, E._fetch = originals["copy"], originals["fetch"]
    return calls


def main() -> None:
    out = Path(sys.argv[1])
    gpu = jax.default_backend() == "gpu"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else (8 if gpu else 2)
    n = int(sys.argv[3]) if len(sys.argv) > 3 else (64 if gpu else 4)
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else (10 if gpu else 2)
    shape = bench.input_shape(1) if gpu else (16, 20, 16)
    channels = PENG_CHANNELS if gpu else (4, 8, 8, 8)
    trace_dir = sys.argv[5] if len(sys.argv) > 5 else None
    rec = bench._base_record(bench.hardware_info(), bench.versions(), bench.git_commit(), "gpu_transfer.py") | {
        "kind": "transfer", "batch": batch, "n_volumes": n, "input_shape": list(shape), "channels": list(channels),
        **measure(batch, n, repeats, shape, channels)}
    x = np.random.default_rng(1).random((4 * batch, *shape), dtype=np.float32) * 2
    rec["embed_calls"] = embed_calls(SFCN(channels, num_outputs=40, rngs=nnx.Rngs(0)), x, batch, trace_dir)
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"batch {batch} of {shape} float32 ({batch * np.prod(shape) * 4 / 1e6:.0f} MB): "
          + ", ".join(f"{k} {v} ms" for k, v in rec["ms"].items()) + "; GB/s " + json.dumps(rec["gb_per_s"])
          + f"; jaxtl.embed() over {n} volumes, vol/s: " + json.dumps(rec["embed_vol_per_s"]), flush=True)


if __name__ == "__main__":
    main()
