"""The `jaxtl` command line. Each subcommand is a thin wrapper over a public function."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    from jaxtl.weights import convert_torch_checkpoint

    out = convert_torch_checkpoint(args.checkpoint, args.out_dir, task=args.task, bin_range=tuple(args.bins),
                                   overwrite=args.overwrite)
    print(f"wrote jaxtl model directory {out}")
    return 0


def _cohort_options(args: argparse.Namespace) -> dict:
    """`read_cohort` keywords from the options `_add_cohort_options` adds (only those given)."""
    from jaxtl.cohort import parse_bids_filter, parse_sex_coding

    options = {f"{field}_column": getattr(args, f"{field}_column") for field in COHORT_COLUMNS}
    options |= {"bids_filter": parse_bids_filter(args.bids_filter) if args.bids_filter else None,
                "sex_coding": parse_sex_coding(args.sex_coding) if args.sex_coding else None}
    return {k: v for k, v in options.items() if v}


def _cohort(args: argparse.Namespace, sex_required: bool = False, labels_required: bool = True):
    """`--cohort` as given, or (with cohort options) read here: a `Cohort` for `run_transfer`, `predict_cohort`
    and `embed_cohort`, read as they would with `--on-error`."""
    options = _cohort_options(args)
    if not options:
        return args.cohort
    if (Path(args.cohort) / "index.json").exists():
        raise ValueError(f"{args.cohort} is a prepared cache: it holds the labels read when it was prepared; "
                         "--age-column, --sex-coding and the like apply to `jaxtl prepare` (or give the BIDS "
                         "directory or table itself)")
    from jaxtl.cohort import read_cohort

    return read_cohort(args.cohort, on_error=args.on_error, check_files=args.on_error != "skip",
                       sex_required=sex_required, labels_required=labels_required, **options)


def _prepare(args: argparse.Namespace) -> int:
    from jaxtl.cache import prepare_cache
    from jaxtl.cohort import read_cohort

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cohort = read_cohort(args.cohort, on_error="skip" if args.skip_bad_rows else "raise",
                             **_cohort_options(args))
    for w in caught:
        print(f"jaxtl prepare: warning: {w.message}", file=sys.stderr)
    summary = prepare_cache(cohort, args.out_dir, dtype=args.dtype, downsample=args.downsample,
                            workers=args.workers, shard_size=args.shard_size, progress=not args.no_progress)
    print(summary)
    return 0 if summary.ok else 1


def _init_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize()` for multi-process runs; only ever in the launching process.

    Flags win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on TPU
    pods and SLURM/Open MPI clusters JAX detects everything itself with `--distributed`. jaxtl's grain
    worker processes carry `JAXTL_GRAIN_WORKER` in their environment and never initialise (with a warning);
    ranks started by a multiprocessing launcher do.
    """
    import os

    address = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (address or args.distributed):
        if args.num_processes is not None or args.process_id is not None:
            raise ValueError("--num-processes/--process-id need --coordinator HOST:PORT (or $JAX_COORDINATOR_ADDRESS) "
                             "or --distributed; without them every host would train alone")
        return
    from jaxtl.cache import GRAIN_WORKER_ENV

    if os.environ.get(GRAIN_WORKER_ENV):  # a grain data worker: only its parent process joins the run
        print(f"jaxtl: warning: not calling jax.distributed.initialize() in grain data worker process "
              f"{os.environ[GRAIN_WORKER_ENV]} ({GRAIN_WORKER_ENV} is set); if this process is a rank of the "
              f"run, unset {GRAIN_WORKER_ENV} in its environment", file=sys.stderr)
        return
    import jax

    num = args.num_processes or os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if jax.config.jax_platforms in (None, "", "cpu") and address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    # All three given: nothing to detect. JAX's SLURM / Open MPI detection would still run (under srun or mpirun) and
    # give each process one GPU (its local rank); with explicit values each process uses all its host's devices
    # (JAX_LOCAL_DEVICE_IDS still chooses). --distributed alone: JAX detects everything, one process per GPU there.
    explicit = address is not None and num is not None and pid is not None and not args.distributed
    jax.distributed.initialize(address, None if num is None else int(num), None if pid is None else int(pid),
                               **({"cluster_detection_method": "deactivate"} if explicit else {}))


def _pretrain(args: argparse.Namespace) -> int:
    _init_distributed(args)
    from jaxtl.config import load_config
    from jaxtl.train import final_record, pretrain

    config = load_config(args.config, args.set)
    out = pretrain(config, args.cohort, args.workdir, max_steps=args.max_steps, progress=not args.no_progress,
                   profile=args.profile)
    import jax

    if jax.process_index() == 0:  # once, not once per host
        summary = _pretrain_summary(final_record(args.workdir))
        if summary:
            print(summary)
        print(f"final model: {out}")
    return 0


def _pretrain_summary(final: dict | None) -> str | None:
    """A run's results from its final record (`train.final_record`): steps, test metric of model/ and best/, the
    baseline."""
    if final is None:
        return None
    text = f"{final['steps']} steps ({final['epochs']:g} epochs{'' if final.get('complete') else ', stopped early'})"
    key = "mae" if "test_mae" in final else "accuracy"
    if f"test_{key}" in final:
        name, baseline = ("MAE", "mean predictor") if key == "mae" else ("accuracy", "test majority share")
        text += f"; test {name} {final[f'test_{key}']:.4g} (model/)"
        if final.get(f"test_{key}_best") is not None:
            text += f", {final[f'test_{key}_best']:.4g} (best/, epoch {final.get('best_epoch')})"
        text += f"; {baseline} {final[f'test_baseline_{key}']:.4g}"
    return text


# = jaxtl.transfer.METHODS (not imported here: it pulls in JAX, which would slow every command)
TRANSFER_METHODS = ("direct", "features", "ft_final", "ft_step", "ft_full", "scratch", "reinit", "elastic")


def _transfer(args: argparse.Namespace) -> int:
    from jaxtl.embed import SkippedScansWarning
    from jaxtl.transfer import run_transfer

    extra = {k: v for k, v in {"head": args.head, "seed": args.seed, "share": args.share, "paper_hps": args.paper_hps,
                               "epoch_scale": args.epoch_scale, "bias_split": args.bias_split,
                               "bin_range": tuple(args.bins) if args.bins else None}.items() if v is not None}
    if args.split:
        extra["split"] = tuple(args.split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedScansWarning)  # reported below, and in full in failures.tsv
        result = run_transfer(args.model, _cohort(args, sex_required=args.task == "sex"), args.out, task=args.task,
                              method=args.method, overwrite=args.overwrite, progress=not args.no_progress,
                              on_error=args.on_error, **extra)
    print(f"{transfer_summary(result.metrics)}; wrote {result.out_dir}/predictions.csv, "
          f"metrics.json, head/")
    if "qc_warnings" in result.predictions:  # scans with input warnings trained and tested the head too
        _report_qc(args.command, result.predictions, Path(result.out_dir) / "predictions.csv")
    if result.failures:
        print(f"jaxtl transfer: {len(result.failures)} scans could not be loaded and were left out of the split: "
              f"see {Path(result.out_dir) / 'failures.tsv'}", file=sys.stderr)
    return 0


def transfer_summary(metrics: dict) -> str:
    """One line of a transfer's metrics.json: the test metric (or that there was no test split), the split sizes."""
    name, n = metrics["metric"], metrics["n"]
    score = f"test {name} {metrics['test'].get(name, float('nan')):.4g}" if n["test"] else "no test split"
    return f"{metrics['method']} {metrics['task']}: {score} (train {n['train']}, val {n['val']}, test {n['test']})"


def _check_output_file(out: str) -> None:
    """Before the model runs (hours on a large cohort), not after: --out's folder is created, and a directory or
    an unwritable path is refused."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {path / 'predictions.csv'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise PermissionError(f"--out {out}: cannot write there; give a path this user can write")


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from jaxtl.embed import SkippedScansWarning
    from jaxtl.transfer import predict_cohort, write_cohort_predictions

    _check_output_file(args.out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedScansWarning)  # reported below, and in full in the failures file
        columns = predict_cohort(args.model, _cohort(args, labels_required=False), batch_size=args.batch_size,
                                 on_error=args.on_error, progress=not args.no_progress)
    out, failures, n_failed = write_cohort_predictions(args.out, columns)
    n = len(columns["prediction"])
    print(f"wrote {n - n_failed} predictions to {out}")
    corrected, predicted = columns.get("prediction_corrected"), columns["prediction"]
    if corrected is not None and np.isnan(corrected).all() and not np.isnan(predicted).all():
        is_head = (Path(args.model) / "head.json").exists()
        why = ("its correction is refused where the slope is too small or uncertain: `bias_usable` in the transfer "
               "run's metrics.json" if is_head else
               "a plain model has none: `jaxtl transfer --method direct` on a cohort with known ages fits one, "
               "then predict with its OUT/head")
        print(f"jaxtl predict: {args.model} has no usable age-bias correction, so prediction_corrected and "
              f"gap_corrected are empty ({why})", file=sys.stderr)
    _report_qc(args.command, columns, out)
    if n_failed:
        print(f"jaxtl predict: {n_failed} of {n} scans failed: see {failures}", file=sys.stderr)
    return 1 if n_failed == n else 0


def _report_qc(command: str, columns: dict, out: Path) -> None:
    written = [w for w, e in zip(columns["qc_warnings"], columns.get("error", [""] * len(columns["qc_warnings"])),
                                 strict=True) if not e]  # the scans in the CSV (the failed ones are not)
    n = sum(bool(w) for w in written)
    if n:
        print(f"jaxtl {command}: {n} of {len(written)} scans have input warnings (their qc_warnings column in "
              f"{out}): check them before trusting their results", file=sys.stderr)


def _embed(args: argparse.Namespace) -> int:
    from jaxtl.embed import SkippedScansWarning
    from jaxtl.transfer import embed_cohort, write_cohort_predictions

    _check_output_file(args.out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedScansWarning)  # reported below, and in full in the failures file
        columns = embed_cohort(args.model, _cohort(args, labels_required=False), layer=args.layer,
                               batch_size=args.batch_size, on_error=args.on_error, progress=not args.no_progress)
    out, failures, n_failed = write_cohort_predictions(args.out, columns)
    n, width = len(columns["id"]), sum(k.startswith("sfcn_") for k in columns)
    print(f"wrote {n - n_failed} scans x {width} {args.layer} columns to {out}")
    _report_qc(args.command, columns, out)
    if n_failed:
        print(f"jaxtl embed: {n_failed} of {n} scans failed: see {failures}", file=sys.stderr)
    return 1 if n_failed == n else 0


def _experiment(args: argparse.Namespace) -> int:
    from jaxtl.experiment import failed_runs, load_experiment_config, run_experiment

    config = load_experiment_config(args.config, args.set)
    report = run_experiment(config, progress=not args.no_progress)
    print(f"report: {report}")
    failed = failed_runs(config)
    if failed:
        print(f"jaxtl experiment: {len(failed)} run(s) failed; their errors are in "
              f"{Path(config.out_dir) / 'results.jsonl'} (rerun the same command to try them again)", file=sys.stderr)
    return 1 if failed else 0


def _simulate(args: argparse.Namespace) -> int:
    from jaxtl.simulate import calibrate, calibration_report, preview, simulate

    if args.preview or args.calibrate:
        if args.out_dir is not None:
            raise ValueError("OUT_DIR is not used with --preview/--calibrate")
        unused = [flag for flag, given in (("--n", args.n is not None),
                                           ("--workers", args.preview and args.workers is not None),
                                           ("--no-progress", args.preview and args.no_progress)) if given]
        if unused:
            raise ValueError(f"{', '.join(unused)} not used with {'--preview' if args.preview else '--calibrate'}")
        if args.preview:
            Path(args.preview).parent.mkdir(parents=True, exist_ok=True)  # fails now, not after rendering
            out = preview(args.preview, preset=args.preset or "ixi", seed=args.seed, resolution=args.resolution or 1)
            print(f"wrote {out}")
        if args.calibrate:
            resolution = args.resolution or 2
            presets = [args.preset] if args.preset else ["ukb", "oasis", "ixi", "abide"]
            results = calibrate(presets, resolution=resolution, seed=args.seed, workers=args.workers,
                                progress=not args.no_progress)
            out = Path(args.calibrate)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(calibration_report(results, resolution, args.seed), encoding="utf-8")
            print(f"wrote {out}")
        return 0
    if args.preset is None or args.out_dir is None:
        raise ValueError("give PRESET and OUT_DIR (or --preview PNG / --calibrate MD)")
    out = simulate(args.preset, args.out_dir, n=args.n, seed=args.seed, resolution=args.resolution or 1,
                   workers=args.workers, progress=not args.no_progress)
    print(f"wrote simulated BIDS dataset {out} (SIMULATED brains: for demos, tests and benchmarks only)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxtl.demo import SCALES, print_summary, run_demo

    config = SCALES[args.scale]
    if args.out:
        config = dataclasses.replace(config, out_dir=args.out)
    print_summary(run_demo(config, progress=not args.no_progress))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxtl import bench

    if args.action == "report":
        md, png = bench.write_report(args.results, args.report_out)
        print(f"wrote {md}" + (f" and {png}" if png else " (no embed/train records: no chart)"))
        return 0
    if not args.no_torch:  # JAX and PyTorch share each GPU: JAX must not take 75% of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    try:
        resolutions = bench.parse_list(args.resolution, int)
    except ValueError:
        raise ValueError(f"--resolution {args.resolution!r}: give 1, 2 or 4 (mm), or a comma list of them") from None
    cases = bench.plan_cases(bench.parse_list(args.suite), bench.parse_list(args.configs), resolutions,
                             bench.parse_list(args.dtype), args.batch, devices=jax.device_count())
    out = args.out or bench.default_output()
    if args.profile and Path(args.profile).exists() and not Path(args.profile).is_dir():
        raise ValueError(f"--profile {args.profile}: is a file; give a directory (the traces go to DIR/<case>)")
    try:
        records = bench.run_suite(cases, out, warmup=args.warmup, repeats=args.repeats, conv_impl=args.conv_impl,
                                  use_torch=not args.no_torch, torch_memory_format=args.torch_format, note=args.note,
                                  profile=args.profile, stream=args.stream, torch_compile=args.torch_compile)
    except bench.SuiteFailed as e:
        print(f"wrote {len(e.records)} records to {out}; {len(e.failures)} case(s) FAILED:", file=sys.stderr)
        for f in e.failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    default_dir = Path("benchmarks/results").resolve()
    report = ("jaxtl bench report" if Path(out).resolve().parent == default_dir
              else f"jaxtl bench report --results {out} --report-out {Path(out).with_suffix('.md')}")
    print(f"wrote {len(records)} records to {out} (`{report}` renders them)")
    return 0


def _positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} is not above 0")
    return value


def _step_range(text: str) -> tuple[int, int]:
    """argparse type: FIRST:LAST train steps, 1 <= FIRST <= LAST."""
    first, sep, last = text.partition(":")
    try:
        steps = (int(first), int(last or first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give train steps FIRST:LAST, e.g. 20:25") from None
    if not 1 <= steps[0] <= steps[1] or (sep and not last):
        raise argparse.ArgumentTypeError(f"{text!r}: give train steps FIRST:LAST with 1 <= FIRST <= LAST, e.g. 20:25")
    return steps


def _at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= low (argparse names the option in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


COHORT_COLUMNS = {"age": "'Age (years)'", "sex": "'SEX_ID (1=m, 2=f)'", "site": "SITE_ID", "id": "IXI_ID",
                  "path": "T1_brain_lin"}


def _add_cohort_options(p: argparse.ArgumentParser) -> None:
    """How a BIDS directory or table is read (`read_cohort`'s keywords), for every command that reads one."""
    g = p.add_argument_group("reading a BIDS directory or table (not a prepared cache)")
    for field, example in COHORT_COLUMNS.items():
        g.add_argument(f"--{field}-column", metavar="NAME",
                       help=f"the cohort's {field} column when named otherwise, e.g. {example}")
    g.add_argument("--sex-coding", metavar="VALUE=F|M,...",
                   help="how the sex column codes sex when not F/M or 0/1, e.g. 1=M,2=F (a column named like "
                        "'SEX_ID (1=m, 2=f)' is read by the coding its name spells, a BIDS sidecar's Levels too)")
    g.add_argument("--bids-filter", action="append", default=[], metavar="ENTITY=VALUE",
                   help="BIDS: pick one T1w per subject/session, e.g. space=MNI152Lin (ENTITY= : without the "
                        "entity; ENTITY=* : every value as its own scan; repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert Peng's PyTorch SFCN weights (.p) to a jaxtl model directory")
    p.add_argument("checkpoint", help="PyTorch state_dict file, e.g. run_20190719_00_epoch_best_mae.p")
    p.add_argument("out_dir", help="jaxtl model directory to write")
    p.add_argument("--task", choices=["age", "sex"], default="age",
                   help="what the weights predict: age (Peng's brain-age model, 40 age bins) or sex (2 outputs); "
                        "default age")
    p.add_argument("--bins", type=float, nargs=2, default=[42, 82], metavar=("MIN", "MAX"),
                   help="age bin range [MIN, MAX) of the model's output (default: 42 82, Peng's UKB model)")
    p.add_argument("--overwrite", action="store_true", help="replace a jaxtl model already in OUT_DIR")
    p.set_defaults(func=_convert)

    p = sub.add_parser("prepare", help="conform every scan of a cohort once into a fast, resumable cache")
    p.add_argument("cohort", help="BIDS dataset directory, CSV/TSV with a 'path' column (+ age, sex, ...) or .txt "
                                  "list of image paths")
    p.add_argument("out_dir", help="cache directory (re-run the same command to resume)")
    p.add_argument("--dtype", choices=["float16", "uint8", "float32"], default="float16",
                   help="stored dtype (default float16: 9.8 MB per 1mm volume)")
    p.add_argument("--downsample", type=int, choices=[1, 2, 4], default=1,
                   help="block-average factor (default 1: 1mm; 2 and 4 for 2mm / 4mm models)")
    p.add_argument("--workers", type=int, default=1, help="processes conforming scans in parallel")
    p.add_argument("--shard-size", type=int, default=64, help="volumes per shard file")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop cohort rows with problems (with a warning) instead of stopping")
    _add_cohort_options(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("pretrain", help="pretrain SFCN data-parallel on a prepared cache (resumes from --workdir)")
    p.add_argument("--config", required=True, help="experiment config file, e.g. configs/sfcn_age_ukb.py")
    p.add_argument("--cohort", required=True, help="cache directory written by `jaxtl prepare`")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, best/, model/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.005 (repeatable)")
    p.add_argument("--max-steps", type=_at_least(1), default=None,
                   help="stop once the run has made this many steps in all, earlier runs' steps included when it "
                        "resumes (smoke tests)")
    p.add_argument("--profile", type=_step_range, metavar="FIRST:LAST", default=None,
                   help="trace steps FIRST..LAST with the JAX profiler into WORKDIR/profile (e.g. 20:25, after "
                        "compilation and warm-up)")
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM)")
    g.add_argument("--coordinator", help="coordinator address host:port (or $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, help="number of processes (or $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, help="this process's id (or $JAX_PROCESS_ID)")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("demo", help="the paper end to end on simulated cohorts: writes DIR/REPORT.md")
    p.add_argument("--out", default=None, help="output directory (default: demo_out, or demo_ci for --scale ci)")
    p.add_argument("--scale", choices=["demo", "ci"], default="demo",
                   help="demo: the README's run (8.5-16 min on 2 CPU cores); ci: tiny sizes, every stage in a "
                        "minute or two")
    p.set_defaults(func=_demo)

    p = sub.add_parser("transfer", help="fit a transfer method on a target cohort: predictions.csv, metrics.json, "
                                        "plots and a head for `jaxtl predict`")
    p.add_argument("--model", required=True, help="pretrained jaxtl model directory or published name")
    p.add_argument("--cohort", required=True, help="cache directory (fastest), BIDS directory, CSV/TSV table or "
                                                   ".txt list of image paths")
    p.add_argument("--task", choices=["age", "sex"], default="age",
                   help="the label to predict (default age); it need not be the one the model was pretrained on "
                        "(the paper's cross-task transfer)")
    p.add_argument("--method", choices=TRANSFER_METHODS, default="features",
                   help="direct, features (frozen features + scikit-learn head; the default), ft_final, ft_step, "
                        "ft_full, scratch, reinit, elastic (see jaxtl.transfer)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--head", help="features: ridge (default), elasticnet, svr, kernelridge; sex: logistic")
    p.add_argument("--seed", type=int, help="split and training seed (default 0)")
    p.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="per-site split fractions (default 0.4 0.2 0.4, as the paper)")
    p.add_argument("--share", type=float, help="use this share of the training split (default 1)")
    p.add_argument("--bins", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="age bins of fine-tuned networks (default: the paper's bins with --paper-hps, else the "
                        "pretrained head's if they cover the training ages, else training ages -3/+3 years)")
    p.add_argument("--paper-hps", choices=["oasis", "ixi", "abide"],
                   help="the paper's fine-tuning hyper-parameters and age bins for this dataset (default: OASIS's "
                        "hyper-parameters, bins from the data)")
    p.add_argument("--epoch-scale", type=_positive_float, help="multiply the fine-tuning epochs (e.g. 0.1 on a CPU)")
    p.add_argument("--bias-split", choices=["auto", "train", "val"],
                   help="split the age-bias correction is fitted on (default auto: val for networks, out-of-fold "
                        "train predictions for scikit-learn heads)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="a scan that cannot be loaded or a table row with problems: skip (default: every scan is "
                        "read once first; the failures are left out and listed in OUT/failures.tsv) or raise")
    _add_cohort_options(p)
    p.set_defaults(func=_transfer)

    p = sub.add_parser("predict", help="apply a fitted head (jaxtl transfer --out DIR: DIR/head) or a model "
                                       "to new scans; writes a predictions CSV")
    p.add_argument("--model", required=True, help="head directory (DIR/head) or a jaxtl model directory")
    p.add_argument("--cohort", required=True, help="cache directory, BIDS directory, CSV/TSV table or .txt list "
                                                   "of image paths")
    p.add_argument("--out", required=True, help="CSV file to write; scans that fail to load go to "
                                                "OUT_STEM.failures.tsv beside it (id, path, reason)")
    p.add_argument("--batch-size", type=_at_least(1), default=None,
                   help="volumes per batch on the devices (default: 8, or 2 per device if more)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="a scan that cannot be loaded: skip (default: report it, predict the others; exit code 1 "
                        "only if every scan fails) or raise (stop at the first)")
    _add_cohort_options(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("embed", help="write a cohort's SFCN features (the 64-d vector the paper re-uses, or another "
                                     "--layer) to a CSV, one row per scan, for your own statistics")
    p.add_argument("--model", required=True, help="jaxtl model directory or published name (e.g. peng2021-age)")
    p.add_argument("--cohort", required=True, help="cache directory, BIDS directory, CSV/TSV table or .txt list "
                                                   "of image paths")
    p.add_argument("--out", required=True, help="CSV file to write (id, participant_id, session, site, age, sex, "
                                                "sfcn_features0..63, qc_warnings); scans that fail to load go to "
                                                "OUT_STEM.failures.tsv beside it")
    p.add_argument("--layer", default="features",
                   help="features (default), logits, probs or block0..block5 (each block's output, average-pooled)")
    p.add_argument("--batch-size", type=_at_least(1), default=None,
                   help="volumes per batch on the devices (default: 8, or 2 per device if more)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="skip",
                   help="a scan that cannot be loaded: skip (default: report it, embed the others) or raise")
    _add_cohort_options(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("experiment", help="the paper's experiment: methods x tasks x repeats, scarcity curve, "
                                          "brain manifold (resumes)")
    p.add_argument("--config", required=True, help="experiment config, e.g. configs/experiment_ixi.py")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set repeats=3 --set epoch_scale=0.1 (repeatable)")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("simulate", help="write a simulated BIDS cohort (synthetic T1 brains with age, sex and "
                                        "scanner effects; presets mirror the paper's cohorts)")
    p.add_argument("preset", nargs="?", choices=["ukb", "oasis", "ixi", "abide"],
                   help="cohort preset (defined in jaxtl/simulate.py, PRESETS)")
    p.add_argument("out_dir", nargs="?", help="BIDS dataset directory to write")
    p.add_argument("--n", type=_at_least(1), default=None, help="number of subjects (default: the preset's size)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--resolution", type=int, choices=[1, 2, 4], default=None,
                   help="voxel size in mm: the MNI152 1mm grid or its 2/4 mm block averages (default 1; "
                        "--calibrate: 2)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--preview", metavar="PNG", help="render a montage (age, sex and site contrasts) instead")
    p.add_argument("--calibrate", metavar="MD", help="write the calibration report (baselines per preset; "
                                                     "several minutes) instead")
    p.set_defaults(func=_simulate)

    p = sub.add_parser("bench", help="volumes/s of embed/train/input beside the PyTorch reference (same process); "
                                     "`jaxtl bench report` renders benchmarks/results/*.jsonl")
    p.add_argument("action", nargs="?", choices=["run", "report"], default="run")
    p.add_argument("--suite", default="embed,train,input", help="comma list of embed, train, input")
    p.add_argument("--configs", default="peng,transfer,demo",
                   help="comma list: peng (Peng's SFCN), transfer (32-64-64-64-64-64), demo (configs/sfcn_demo.py, "
                        "always 4mm)")
    p.add_argument("--resolution", default="2", help="input resolution in mm: 1, 2 or 4 (comma list)")
    p.add_argument("--batch", type=_at_least(1), default=None,
                   help="global batch (default: 1, 4, 8 per device at 1, 2, 4mm)")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (comma list)")
    p.add_argument("--repeats", type=_at_least(1), default=5, help="timed steps per side (default 5)")
    p.add_argument("--warmup", type=_at_least(0), default=2,
                   help="untimed steps per side after compilation, timed apart (default 2)")
    p.add_argument("--conv-impl", choices=["auto", "xla", "fast", "pallas"], default="auto",
                   help="jaxtl convolution (default auto: fast on a single CPU device, pallas on Hopper GPUs, XLA "
                        "elsewhere; pallas: XLA with the first block as fused GPU kernels)")
    p.add_argument("--torch-format", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="PyTorch memory format (default auto: the faster of the two)")
    p.add_argument("--torch-compile", action="store_true",
                   help="run the PyTorch reference through torch.compile (inductor; needs a C++ compiler on CPUs, "
                        "its compile is timed apart): a separate row of the report")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--note", default=None, help="free text stored in every record (e.g. machine load)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace 3 jaxtl steps per case with the JAX profiler into DIR/<case> (TensorBoard / "
                        "Perfetto) and print the kernels that took the most time")
    p.add_argument("--stream", type=_at_least(0), default=None, metavar="K",
                   help="embed cases: also time K batches already on the device, dispatched back to back with "
                        "their features fetched after the last, on both sides (3 rounds): the device's throughput "
                        "without the host round trip of each step (host-to-device copies not included: those are "
                        "in jaxtl.embed()'s end-to-end figure); default 8 on GPUs/TPUs, 0 (off) on CPUs")
    p.add_argument("--out", default=None,
                   help="JSONL file to append to (default benchmarks/results/<hardware>.jsonl under the current "
                        "directory)")
    p.add_argument("--results", nargs="+", default=["benchmarks/results"],
                   help="report: .jsonl files or directories (default benchmarks/results)")
    p.add_argument("--report-out", default="benchmarks/results/report.md",
                   help="report: markdown file to write; the chart goes beside it as .png")
    p.set_defaults(func=_bench)

    for name in ("prepare", "pretrain", "demo", "transfer", "predict", "embed", "experiment"):  # simulate has its own
        sub.choices[name].add_argument("--no-progress", action="store_true",
                                       help="no progress bars (for log files; the results are printed as usual)")
    return parser


COMPILING_COMMANDS = ("pretrain", "transfer", "predict", "embed", "experiment")  # `demo` turns the cache on itself


def _short_warnings(command: str) -> None:
    """jaxtl's own warnings as one `jaxtl COMMAND: warning: ...` line (no file, line number or source line)."""
    default = warnings.formatwarning
    package = str(Path(__file__).resolve().parent)

    def formatwarning(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(package):
            return f"jaxtl {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _short_warnings(args.command)
    if args.command in COMPILING_COMMANDS:
        from jaxtl.train import enable_compilation_cache

        enable_compilation_cache()
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # user errors (and files: OSErrors name them): one line, no traceback
        print(f"jaxtl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # no traceback for Ctrl-C (pretrain's first Ctrl-C checkpoints and stops instead)
        print(f"\njaxtl {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from jaxtl.train import NonFiniteLossError

        if not isinstance(e, NonFiniteLossError):
            raise
        print(f"jaxtl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
