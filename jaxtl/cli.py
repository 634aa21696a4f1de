"""The `jaxtl` command line. Each subcommand is a thin wrapper over a public function."""

from __future__ import annotations

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from jaxtl.weights import convert_torch_checkpoint

    out = convert_torch_checkpoint(args.checkpoint, args.out_dir, task=args.task, bin_range=tuple(args.bins))
    print(f"wrote jaxtl model directory {out}")
    return 0


def _init_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize()` for multi-process runs; only ever in the launching process.

    Flags win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU
    pods and SLURM/Open MPI clusters JAX detects everything itself with `--distributed`.
    """
    import multiprocessing
    import os

    if multiprocessing.parent_process() is not None:  # a grain worker: never initialise again
        return
    address = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (address or args.distributed):
        return
    import jax

    num = args.num_processes or os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if jax.config.jax_platforms in (None, "", "cpu") and address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    jax.distributed.initialize(address, None if num is None else int(num), None if pid is None else int(pid))


def _pretrain(args: argparse.Namespace) -> int:
    _init_distributed(args)
    from jaxtl.config import load_config
    from jaxtl.train import pretrain

    config = load_config(args.config, args.set)
    out = pretrain(config, args.cohort, args.workdir, max_steps=args.max_steps)
    print(f"final model: {out}")
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

    p = sub.add_parser("pretrain", help="pretrain SFCN data-parallel on a prepared cache (resumes from --workdir)")
    p.add_argument("--config", required=True, help="experiment config file, e.g. configs/sfcn_age_ukb.py")
    p.add_argument("--cohort", required=True, help="cache directory written by `jaxtl prepare`")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, best/, model/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.005 (repeatable)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
    g.add_argument("--coordinator", help="coordinator address host:port (or $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes (or $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's id (or $JAX_PROCESS_ID)")
    p.set_defaults(func=_pretrain)

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
