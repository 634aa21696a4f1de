"""The `jaxtl` command line. Each subcommand is a thin wrapper over a public function."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from jaxtl.weights import convert_torch_checkpoint

    out = convert_torch_checkpoint(args.checkpoint, args.out_dir, task=args.task, bin_range=tuple(args.bins))
    print(f"wrote jaxtl model directory {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert Peng's PyTorch SFCN weights (.p) to a jaxtl model directory")
    p.add_argument("checkpoint", help="PyTorch state_dict file, e.g. run_20190719_00_epoch_best_mae.p")
    p.add_argument("out_dir", help="jaxtl model directory to write")
    p.add_argument("--task", choices=["age", "sex"], default="age")
    p.add_argument("--bins", type=float, nargs=2, default=[42, 82], metavar=("MIN", "MAX"),
                   help="age bin range [MIN, MAX) of the model's output (default: 42 82, Peng's UKB model)")
    p.set_defaults(func=_convert)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one line, no traceback
        print(f"jaxtl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
