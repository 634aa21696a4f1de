"""`make demo` / `jaxtl demo`: the whole paper, end to end, on simulated cohorts.

Stages: simulate a UK Biobank-like source cohort and two small target cohorts (IXI- and OASIS-like) at 4mm
-> prepare caches -> pretrain an age SFCN and a sex SFCN on the source -> on each target and task, the
paper's comparison (same-task fine-tuning, frozen features + scikit-learn head, features from the model
pretrained on the other label, scratch, elastic net on voxels, direct transfer) -> REPORT.md.

Everything is cached under the output directory: a second run reuses the simulated data, the caches, the
pretrained models and every finished experiment run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from jaxtl.bench import provenance
from jaxtl.config import shipped_configs
from jaxtl.experiment import (
    DEFAULT_METHODS,
    ExperimentConfig,
    ManifoldConfig,
    MethodSpec,
    PretrainSpec,
    ScarcityConfig,
    SimulatedCohort,
    ensure_cohort,
    ensure_model,
    findings,
    run_experiment,
)
from jaxtl.train import final_record

CONFIGS = shipped_configs()


# The comparison: every default method but `reinit` (the paper's control, kept in `jaxtl experiment`),
# which costs two more fine-tuning runs per task and repeat.
DEMO_METHODS: tuple[MethodSpec, ...] = tuple(m for m in DEFAULT_METHODS if m.method != "reinit")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out_dir: str = "demo_out"
    resolution: int = 4  # mm: 40x48x40 network input
    # Simulated UK Biobank-like subjects for pretraining. The source models' quality limits every finding; 600
    # instead of 400 costs ~100 s (measured 2026-11-26, 2-core VM: frozen same-task features on the four target /
    # task pairs IXI age 11.23 -> 9.51 MAE, IXI sex 0.521 -> 0.593, OASIS age 6.10 -> 6.01, OASIS sex 0.650 -> 0.674).
    source_n: int = 600
    targets: tuple[str, ...] = ("ixi", "oasis")
    target_n: int = 120
    pretrain: tuple[str, ...] = ("epochs=10", "optim.step_epochs=4")  # overrides of configs/sfcn_demo.py
    # Sex at lr 0.01 never left chance here (400 subjects, 4mm: training loss stayed at ln 2 for 20 epochs);
    # at 0.001 it reached 0.70 test accuracy in 10 epochs. Age: 4.76 vs 4.83 MAE, kept at 0.01.
    pretrain_sex: tuple[str, ...] = ("optim.lr=0.001",)
    repeats: int = 3
    epoch_scale: float = 0.02  # the paper's fine-tuning / scratch epochs, scaled for a CPU
    methods: tuple[MethodSpec, ...] = DEMO_METHODS
    shares: tuple[float, ...] = (0.25, 0.5, 1.0)  # data-scarcity curve
    scarcity_methods: tuple[str, ...] = ("features", "ft_step", "scratch")
    manifold_n: int = 120
    montage_mm: int = 1  # resolution of the slice montage of simulated brains


DEMO = DemoConfig()
# CI-sized: the same pipeline, every stage exercised, in about a minute on 2 cores (numbers meaningless;
# compiling the fine-tuning steps is most of it).
CI = DemoConfig(out_dir="demo_ci", source_n=32, targets=("ixi",), target_n=36,
                pretrain=("epochs=1", "model.channels=(4,8,8,8,8,8)", "batch_size=4"),
                repeats=1, epoch_scale=0.01, shares=(0.5, 1.0), scarcity_methods=("features", "ft_step"),
                manifold_n=24, montage_mm=4)
SCALES = {"demo": DEMO, "ci": CI}


class Stages:
    """Wall time of each stage in this run (`seconds`) and in the run that computed it (`first`, written to `path` as
    each stage ends, so a run stopped half-way keeps the times of the stages it finished). A stage cut off and
    finished by a later run counts that run's part only: it is listed in `resumed`."""

    def __init__(self, path: Path):
        self.path, self.seconds = path, {}
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.resumed: list[str] = saved.pop("_resumed", [])
        self._cut_off = set(saved.pop("_running", []))  # stages an earlier run began and did not finish
        self.first: dict[str, float] = saved

    @contextlib.contextmanager
    def __call__(self, name: str):
        print(f"== {name}", flush=True)
        self._save(running=name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0
        if name not in self.first:
            self.first[name] = self.seconds[name]
            if name in self._cut_off:
                self.resumed.append(name)
        self._save()

    def finish(self, total: float) -> None:
        """Record the whole run; the first-run total of work spread over several runs is the sum of its stages."""
        self.seconds["total"] = total
        if "total" not in self.first:
            spread = any(k not in self.seconds for k in self.first) or self.resumed
            self.first["total"] = sum(self.first.values()) if spread else total
        self._save()

    def _save(self, running: str | None = None) -> None:
        cut_off = sorted((self._cut_off | ({running} if running else set())) - set(self.first))
        extra = ({"_resumed": self.resumed} if self.resumed else {}) | ({"_running": cut_off} if cut_off else {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.first, **extra}, indent=1) + "\n")


def demo_cohorts(config: DemoConfig) -> tuple[SimulatedCohort, dict[str, SimulatedCohort]]:
    """The simulated source cohort and the targets by name (specs: `run_demo` makes them in `out_dir`/data)."""
    source = SimulatedCohort("ukb", config.source_n, 0, config.resolution)
    return source, {name: SimulatedCohort(name, config.target_n, 1, config.resolution) for name in config.targets}


def run_demo(config: DemoConfig = DEMO, *, progress: bool = True) -> Path:
    """Run (or resume) the demo; returns the path of REPORT.md."""
    from jaxtl.train import enable_compilation_cache

    enable_compilation_cache()
    t0 = time.perf_counter()
    out = Path(config.out_dir)
    data_dir = out / "data"
    stage = Stages(out / "timings.json")  # the stage times of the run that computed them (a rerun reuses its work)
    source, targets = demo_cohorts(config)
    with stage("simulate + prepare cohorts"):
        for cohort in (source, *targets.values()):
            ensure_cohort(cohort, data_dir, progress)
    model_dirs = {}
    for task in ("age", "sex"):
        overrides = (f"task='{task}'", *config.pretrain, *(config.pretrain_sex if task == "sex" else ()))
        spec = PretrainSpec(str(out / f"pretrain_{task}"), task, str(CONFIGS / "sfcn_demo.py"), overrides, source)
        with stage(f"pretrain {task} SFCN"):
            ensure_model(spec, data_dir, progress, skip_hint="")
        model_dirs[task] = str(out / f"pretrain_{task}" / "model")
    experiments = {}
    for name, cohort in targets.items():
        exp = ExperimentConfig(
            name=name, out_dir=str(out / f"experiment_{name}"), data_dir=str(data_dir), target=cohort,
            age_model=model_dirs["age"], sex_model=model_dirs["sex"], paper_dataset=name, tasks=("age", "sex"),
            methods=config.methods, repeats=config.repeats, epoch_scale=config.epoch_scale,
            scarcity=ScarcityConfig(shares=config.shares, methods=config.scarcity_methods,
                                    tasks=("age",), repeats=1),
            manifold=ManifoldConfig(n=config.manifold_n))
        with stage(f"experiment {name}"):
            run_experiment(exp, progress=progress)
        experiments[name] = exp
    first = next(iter(targets))
    with stage("brain-age outputs and montage"):
        brain_age = _brain_age(model_dirs["age"], ensure_cohort(targets[first], data_dir, False), out, progress)
        montage = _montage(out, config.montage_mm)
    stage.finish(time.perf_counter() - t0)
    report = _report(config, experiments, model_dirs, brain_age, montage, stage)
    path = out / "REPORT.md"
    path.write_text(report)
    return path


def _brain_age(model_dir: str, cache: str, out: Path, progress: bool) -> dict:
    """Embed + RidgeCV on one target (predictions.csv, plots) and the embedding throughput."""
    from jaxtl.embed import embed
    from jaxtl.transfer import run_transfer
    from jaxtl.weights import load_model

    model = load_model(model_dir)
    result_dir = out / "brain_age"
    made_with, digest = result_dir / "model_digest.txt", model.digest()  # rerun after the age model changed
    if not (result_dir / "metrics.json").exists() or not made_with.exists() \
            or made_with.read_text().strip() != digest:
        run_transfer(model, cache, result_dir, task="age", method="features", progress=progress, overwrite=True)
        made_with.write_text(digest + "\n")
    from jaxtl.cache import CacheSource

    src = CacheSource(cache)
    volumes = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32)
    embed(volumes[:8], model, progress=False)  # compile
    t = time.perf_counter()
    embed(volumes, model, progress=False)
    vps = len(volumes) / (time.perf_counter() - t)
    metrics = json.loads((result_dir / "metrics.json").read_text())
    return {"dir": result_dir, "metrics": metrics, "embed_volumes_per_s": vps,
            "plots": sorted(p.name for p in result_dir.glob("*.png"))}


def _montage(out: Path, resolution: int) -> Path:
    from jaxtl.simulate import preview

    path = out / "montage.png"
    if not path.exists():
        preview(path, preset="ixi", resolution=resolution)
    return path


def _pretrain_rate(model_dir: str) -> float:
    lines = (Path(model_dir).parent / "metrics.jsonl").read_text().splitlines()
    rates = [r["volumes_per_s"] for r in map(json.loads, lines) if "volumes_per_s" in r]
    return float(np.median(rates[len(rates) // 2:])) if rates else float("nan")


def _source_row(task: str, model_dir: str) -> str:
    final = final_record(Path(model_dir).parent) or {}
    key = "mae" if task == "age" else "accuracy"
    unit = " years MAE" if task == "age" else " accuracy"
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}{unit}"  # noqa: E731
    epochs = final.get("epochs", "n/a")
    test = final.get(f"test_{key}")
    if Path(model_dir).name == "best" and f"test_{key}_best" in final:  # the checkpoint the experiments use
        test, epochs = final[f"test_{key}_best"], f"{epochs} (best validation epoch: {final.get('best_epoch')})"
    return f"| {task} | {fmt(test)} | {fmt(final.get(f'test_baseline_{key}'))} | {epochs} |"


def _report(config: DemoConfig, experiments: dict[str, ExperimentConfig], model_dirs: dict[str, str],
            brain_age: dict, montage: Path, stages: Stages) -> str:
    import jax

    out = Path(config.out_dir)
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    lines = [
        "# jaxtl demo: transfer learning for neuroimaging on simulated cohorts", "",
        "> **Simulated brains.** Every cohort here comes from `jaxtl.simulate`; the numbers are not results on "
        "UK Biobank, IXI or OASIS. The paper's column holds its real-data results (Holderrieth, Smith & Peng "
        "2022, test sets at 1mm) for orientation only: absolute values are not comparable, the ordering of "
        "methods is what to look at.", "",
        f"Source: {config.source_n} simulated UK Biobank-like subjects; targets: "
        f"{', '.join(f'{t} ({config.target_n})' for t in config.targets)}; {config.resolution}mm "
        f"(input {'x'.join(str(n // config.resolution) for n in (160, 192, 160))}); {config.repeats} repeats of "
        f"a per-site 40/20/40 split; fine-tuning epochs = paper's x{config.epoch_scale:g}. "
        f"JAX devices: {jax.device_count()} x {jax.devices()[0].platform}.", "",
        "## Source models (pretrained on the simulated UK Biobank-like cohort)", "",
        "| model | held-out test | baseline: mean predictor (age) / test majority share (sex) | epochs |",
        "|---|---|---|---|",
        *[_source_row(task, d) for task, d in model_dirs.items()], "",
        "The paper's finding needs a source model that learned its label: where the test metric is near the "
        "baseline, its features carry little of that label and transfer from it cannot help.", "",
        "## Findings of the paper, checked here", "",
        "| target | task | finding | on this run | in the paper's numbers |", "|---|---|---|---|---|",
    ]
    for exp in experiments.values():
        lines += findings(exp)
    lines += [""]
    for name, exp in experiments.items():
        table = (Path(exp.out_dir) / "table.md").read_text()
        lines += [f"## Target: simulated {name.upper()}", "", table, "",
                  "Data scarcity (test MAE vs share of the training split):", "",
                  f"![scarcity {name}]({rel(Path(exp.out_dir) / 'scarcity.png')})", "",
                  "Brain manifold (PCA / t-SNE of the 64-d features of the age- and sex-pretrained SFCNs):", "",
                  f"![manifold {name}]({rel(Path(exp.out_dir) / 'manifold.png')})", "",
                  f"Full experiment report: [{rel(Path(exp.out_dir) / 'report.md')}]"
                  f"({rel(Path(exp.out_dir) / 'report.md')})", ""]
    m = brain_age["metrics"]
    test = m.get("test", {})
    lines += ["## Brain age (frozen age features + RidgeCV) on the first target", "",
              f"Test MAE {test.get('mae', float('nan')):.2f} years, r {test.get('r', float('nan')):.2f}; "
              f"predictions in [{rel(brain_age['dir'] / 'predictions.csv')}]"
              f"({rel(brain_age['dir'] / 'predictions.csv')}) (gap and bias-corrected gap, the correction fitted "
              "on the training split only" + (
                  f"; refused here, its corrected columns empty: slope {m['bias_correction']['slope']:.3f}, too small "
                  "or not significantly above 0" if m.get("bias_usable") is False else "") + ").", ""]
    lines += [f"![{p}]({rel(brain_age['dir'] / p)})" for p in brain_age["plots"]] + [""]
    lines += ["## The simulated brains", "", f"![montage]({rel(montage)})", ""]
    lines += ["## Timings", "", "| stage | seconds, first run | seconds, this run |", "|---|---|---|"]
    lines += [f"| {k}{' (resumed)' if k in stages.resumed else ''} | {stages.first[k]:.1f} | {v:.1f} |"
              for k, v in stages.seconds.items()]
    resumed = (" A stage marked resumed was cut off (e.g. Ctrl-C) and finished by a later run: its first-run time "
               "is that run's part only, and the total is the sum of the stages." if stages.resumed else "")
    lines += ["", "First run: the run that computed each stage (`timings.json`); the package install of `make demo` "
              f"is not included.{resumed} This run: {provenance()}.", "",
              f"Pretraining throughput (train step incl. input pipeline): age "
              f"{_pretrain_rate(model_dirs['age']):.1f}, sex {_pretrain_rate(model_dirs['sex']):.1f} volumes/s; "
              f"`jaxtl.embed` {brain_age['embed_volumes_per_s']:.1f} volumes/s. A rerun reuses data, caches, models "
              "and finished runs, so its stage times are much shorter.", ""]
    return "\n".join(lines) + "\n"


def print_summary(report: Path) -> None:
    text = report.read_text()
    start = text.index("## Findings")
    end = text.index("## Brain age")
    print(text[start:end])
    print(f"report: {report.resolve()}")
