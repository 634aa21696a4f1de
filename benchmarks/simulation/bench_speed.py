"""Throughput of `jaxtl simulate` end to end (render + int16 + gzip + write), per resolution.

Usage: python benchmarks/simulation/bench_speed.py [--workers 2] [--n1 40] [--n2 100] [--n4 200] [--preset ixi]

Reports wall-clock volumes/s and CPU seconds per volume (parent + workers; on an idle machine with W cores
the throughput is about W / cpu_s_per_vol) and the load average, since other jobs may share the CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    from jaxtl.simulate import _atlas, simulate

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preset", default="ixi")
    ap.add_argument("--n1", type=int, default=40)
    ap.add_argument("--n2", type=int, default=100)
    ap.add_argument("--n4", type=int, default=200)
    args = ap.parse_args()
    t = time.perf_counter()
    _atlas()
    print(f"atlas (once per process): {time.perf_counter() - t:.1f} s")
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
    print("| resolution | n | workers | wall s | vol/s | CPU s/vol | load avg (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for res, n in ((1, args.n1), (2, args.n2), (4, args.n4)):
        with tempfile.TemporaryDirectory() as tmp:
            c0, t0 = _cpu(), time.perf_counter()
            simulate(args.preset, tmp, n=n, resolution=res, workers=args.workers, progress=False)
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
        print(f"| {res} mm | {n} | {args.workers} | {wall:.1f} | {n / wall:.2f} | {cpu / n:.3f} | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
