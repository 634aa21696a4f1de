"""Roofline bound of SFCN's eval forward (embed) on an accelerator, block by block, from the layer shapes.

Each kernel takes at least max(FLOPs / peak FLOP/s, bytes moved / memory bandwidth); the bound of the forward is the
sum over its kernels. Two schedules of a conv block (conv -> BN -> 2x2x2 max-pool -> ReLU):
  unfused  the convolution writes its output to memory (BN's eval affine map and ReLU ride in its epilogue), a
           second kernel reads it back and writes the pooled tensor: what XLA/cuDNN do today
  fused    one kernel reads the block's input and writes only the pooled output (a hand-written kernel)
Only activations are counted (weights are < 3 MB), each moved exactly once: real kernels move more, so these are
upper bounds on speed. The FLOP counts are `jaxtl.bench.layer_flops` (convolutions only).

Usage: python benchmarks/roofline.py [--config peng|transfer|demo] [--resolution 1|2|4] [--dtype bfloat16|float32]
                                     [--device H200|H100]
"""

from __future__ import annotations

import argparse
import dataclasses

from jaxtl import bench

# Dense bf16 / TF32 peak and memory bandwidth (datasheets); the longest name that a device kind contains wins.
DEVICES = {"H200": (989e12, 494.7e12, 4.8e12), "H100": (989e12, 494.7e12, 3.35e12),
           "H100 PCIe": (756e12, 378e12, 2.0e12), "H100 NVL": (835e12, 417.5e12, 3.9e12),
           "H200 NVL": (835e12, 417.5e12, 4.8e12)}  # [UNVERIFIED] NVL figures: half the datasheet's sparse ones


def device_for(kind: str) -> str | None:
    """The DEVICES entry of a JAX `device_kind` ("NVIDIA H100 PCIe" -> "H100 PCIe"), None when unknown."""
    return bench.device_entry(kind, DEVICES)


@dataclasses.dataclass(frozen=True)
class Block:
    """One conv block, per volume: forward FLOPs and the bytes of its input, conv output and pooled output
    (`pooled` 0: no pool, the last 1x1x1 layer)."""

    flops: float
    input: float
    conv: float
    pooled: float

    def seconds(self, peak: float, bandwidth: float, fused: bool) -> float:
        if not self.pooled:
            return max(self.flops / peak, (self.input + self.conv) / bandwidth)
        if fused:
            return max(self.flops / peak, (self.input + self.pooled) / bandwidth)
        conv = max(self.flops / peak, (self.input + self.conv) / bandwidth)
        return conv + (self.conv + self.pooled) / bandwidth  # the pool kernel reads the conv output back


def blocks(channels, shape, itemsize: int) -> list[Block]:
    flops = bench.layer_flops(channels, shape)
    vox, cin, out = shape[0] * shape[1] * shape[2], 1, []
    for b, cout in enumerate(channels):
        pool = b < len(channels) - 1
        out.append(Block(flops[b], cin * vox * itemsize, cout * vox * itemsize,
                         cout * (vox // 8) * itemsize if pool else 0))
        vox, cin = (vox // 8 if pool else vox), cout
    return out


def table(config: str, resolution: int, dtype: str, peak: float, bandwidth: float) -> str:
    channels = bench.CONFIGS[config]
    shape = bench.input_shape(resolution)
    bl = blocks(channels, shape, 2 if dtype == "bfloat16" else 4)
    total = sum(b.flops for b in bl)
    rows = [f"SFCN {config} {'x'.join(map(str, shape))} {dtype}: {total / 1e9:.1f} GFLOP/volume; "
            f"peak {peak / 1e12:.0f} TFLOP/s, {bandwidth / 1e12:.2f} TB/s",
            "| block | GFLOP | MB in / conv out / pooled | bound unfused (us) | bound fused (us) |",
            "|---|---|---|---|---|"]
    for i, b in enumerate(bl):
        rows.append(f"| {i} | {b.flops / 1e9:.1f} | {b.input / 1e6:.0f} / {b.conv / 1e6:.0f} / {b.pooled / 1e6:.0f} | "
                    f"{b.seconds(peak, bandwidth, False) * 1e6:.1f} | {b.seconds(peak, bandwidth, True) * 1e6:.1f} |")
    for fused in (False, True):
        t = sum(b.seconds(peak, bandwidth, fused) for b in bl)
        rows.append(f"{'fused' if fused else 'unfused'}: at most {1 / t:.0f} volumes/s = "
                    f"{total / t / peak:.0%} of peak")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="peng", choices=sorted(bench.CONFIGS))
    p.add_argument("--resolution", type=int, default=1, choices=(1, 2, 4))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--device", default="H200", choices=sorted(DEVICES))
    args = p.parse_args()
    bf16, tf32, bandwidth = DEVICES[args.device]
    print(f"{args.device}: " + table(args.config, args.resolution, args.dtype,
                                      bf16 if args.dtype == "bfloat16" else tf32, bandwidth))


if __name__ == "__main__":
    main()
