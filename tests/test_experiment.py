"""The paper's experiment: configs, the run (table, scarcity, manifold), resuming, the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
from conftest import REPO

from jaxtl import cli
from jaxtl.config import override
from jaxtl.experiment import (
    ExperimentConfig,
    ManifoldConfig,
    MethodSpec,
    ScarcityConfig,
    load_experiment_config,
    paper_reference,
    run_experiment,
)


@pytest.mark.parametrize("name", ["ixi", "oasis", "abide"])
def test_shipped_configs_load(name):
    cfg = load_experiment_config(REPO / "configs" / f"experiment_{name}.py", ["repeats=2", "target.n=50"])
    assert isinstance(cfg, ExperimentConfig) and cfg.paper_dataset == name
    assert cfg.repeats == 2 and cfg.target.n == 50
    # the paper's splits (paper-spec section 7): per site 40/20/40; OASIS-3 by subject, 187/50/343
    assert cfg.split == ((187 / 580, 50 / 580, 343 / 580) if name == "oasis" else (0.4, 0.2, 0.4))
    assert cfg.age_model.task == "age" and cfg.sex_model.task == "sex"
    assert {s.method for s in cfg.methods} >= {"ft_step", "ft_full", "reinit", "features", "scratch", "elastic",
                                              "direct"}
    with pytest.raises(ValueError, match="has no field"):
        load_experiment_config(REPO / "configs" / f"experiment_{name}.py", ["repeat=2"])


def test_method_labels_and_paper_numbers():
    assert MethodSpec("ft_step", tasks=("age",)).name("age") == "TL ft_step (age-pretr.)"
    assert MethodSpec("features", pretrained="other").name("age") == "features (sex-pretr.)"
    assert MethodSpec("features", head="svr").name("age") == "features [svr] (age-pretr.)"
    assert MethodSpec("reinit").name("sex") == "re-init w/ scaling"
    # features rows: the paper's closest method, named (its read-out was ft_final, not a scikit-learn head)
    assert paper_reference("oasis", "age", "features (sex-pretr.)") == "6.907±0.010 (ft_final)"
    assert paper_reference("ixi", "sex", "TL ft_full (sex-pretr.)") == "0.903±0.013"
    assert paper_reference("ixi", "age", "features [svr] (age-pretr.)") == "5.346±0.101 (ft_final)"
    assert paper_reference("ixi", "age", "ft_final (age-pretr.)") == "5.346±0.101"
    assert paper_reference("ixi", "age", "features (sex-pretr.)") == ""  # not in the paper
    assert paper_reference("oasis", "age", MethodSpec("direct").name("age")) == "4.175±0.071"


def test_tiny_experiment_end_to_end_and_resume(tiny_models, ixi_tiny, tmp_path):
    cfg = ExperimentConfig(
        name="tiny", out_dir=str(tmp_path / "exp"), data_dir=str(tmp_path / "data"), target=str(ixi_tiny[1]),
        age_model=str(tiny_models["age"]), sex_model=str(tiny_models["sex"]), paper_dataset="ixi",
        methods=(MethodSpec("features"), MethodSpec("features", pretrained="other"), MethodSpec("direct")),
        repeats=2, cv=3,
        scarcity=ScarcityConfig(shares=(0.5,), methods=("features", "direct"), tasks=("age",)),
        manifold=ManifoldConfig(n=20, tsne_perplexity=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_experiment(cfg, progress=False)
    out = tmp_path / "exp"
    runs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(runs) == 2 * (3 + 3) + 2  # repeats x (age + sex rows) + scarcity (2 methods x 1 share)
    assert {r["seed"] for r in runs} == {0, 1}
    # same split for every method of a repeat: paired comparisons
    age0 = [r for r in runs if r["task"] == "age" and r["repeat"] == 0 and r["share"] == 1]
    assert len({r["n_train"] for r in age0}) == 1
    table = (out / "table.md").read_text()
    for label in ("features (age-pretr.)", "features (sex-pretr.)", "direct transfer (age-pretr.)",
                  "mean-age predictor", "chance (balanced)"):
        assert label in table
    row = next(line for line in table.splitlines() if "| age | features (sex-pretr.)" in line)
    mean_sd = row.split("|")[4].strip()
    values = [r["test"] for r in runs if r["label"] == "features (sex-pretr.)" and r["task"] == "age"]
    assert mean_sd == f"{np.mean(values):.2f}±{np.std(values, ddof=1):.2f}"
    assert "0.876±0.003 (ft_final)" in table  # the paper's IXI sex ft_final for reference
    assert "| tiny | age |" in table and "sim." not in table  # the user's own cohort is not called simulated
    assert re.search(r"Machine: .+ \(\d+ cores\), jaxtl commit \w+", report.read_text())  # timings' provenance
    for name in ("scarcity.png", "scarcity.csv", "manifold.png", "manifold.csv", "report.md"):
        assert (out / name).stat().st_size > 100, name
    assert "0.5" in (out / "scarcity.md").read_text() and "Simulated" not in report.read_text()  # real-path target
    # every point of the scarcity curve over the same splits (scarcity.repeats = 1, not the table's 2 repeats)
    curve = [line.split(",") for line in (out / "scarcity.csv").read_text().splitlines()[1:]]
    assert curve and all(row[-1] == "1" for row in curve if row[1] != "mean predictor"), curve
    # beside the methods, the mean predictor of each share's training scans: the level each point must beat
    base = {row[2]: float(row[4]) for row in curve if row[1] == "mean predictor"}
    assert set(base) == {"0.5", "1"} and all(np.isfinite(list(base.values())))
    assert "| *mean predictor* |" in (out / "scarcity.md").read_text()
    # the paper's findings that these methods can check (same- vs other-task features), nothing else
    rows = re.findall(r"\| tiny \| (age|sex) \| ([^|]*) \| (holds|\*\*does not hold\*\*|within 1 sd [^|]*|tie) \| "
                      r"not reported \|", report.read_text())  # the paper has no IXI numbers of other-task features
    assert [(task, finding) for task, finding, _ in rows] == [
        ("age", "same-task features beat sex-pretrained features"),
        ("sex", "same-task features beat age-pretrained features")]
    # rerun: everything is already there, nothing is recomputed
    before = (out / "results.jsonl").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_experiment(cfg, progress=False)
    assert (out / "results.jsonl").read_text() == before
    # results written before runs carried their setup are still reused under the config.json beside them
    legacy = [{k: v for k, v in json.loads(line).items() if k != "setup"} for line in before.splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_experiment(cfg, progress=False)
    assert len((out / "results.jsonl").read_text().splitlines()) == len(legacy)
    (out / "results.jsonl").write_text(before)
    # a changed setup (here the paper's hyper-parameters) reuses nothing and reports only its own runs
    changed = dataclasses.replace(cfg, paper_dataset="oasis", tasks=("age",), methods=(MethodSpec("direct"),),
                                  repeats=1, scarcity=None, manifold=None)
    with pytest.warns(UserWarning, match=r"14 earlier runs were made with another setup \(paper_dataset differed\)"):
        run_experiment(changed, progress=False)
    runs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(runs) == 15 and runs[-1]["label"] == "direct transfer (age-pretr.)"
    table = (out / "table.md").read_text()
    assert "features (sex-pretr.)" not in table and "4.175±0.071" in table  # OASIS's direct transfer


def test_overrides_take_the_documented_alternatives(tmp_path, monkeypatch):
    """--set can point an experiment at real data and own models (fields typed `X | str`), drop optional parts
    (`X | None`) and give tuples without brackets; errors say how to set a nested config's fields. Shipped
    configs are found from any working directory."""
    monkeypatch.chdir(tmp_path)
    cfg = load_experiment_config("configs/experiment_ixi.py", [
        "target=caches/ixi", "age_model=runs/x/model", "scarcity=None", "tasks=age", "manifold.n=20"])
    assert (cfg.target, cfg.age_model, cfg.scarcity, cfg.tasks, cfg.manifold.n) == (
        "caches/ixi", "runs/x/model", None, ("age",), 20)
    assert load_experiment_config("configs/experiment_ixi.py", ["tasks=age,sex"]).tasks == ("age", "sex")
    with pytest.raises(ValueError, match=r"target is a SimulatedCohort or a path / name; set its fields one by one, "
                                         r"--set target.FIELD=VALUE \(fields: preset, n, seed, resolution\)"):
        load_experiment_config("configs/experiment_ixi.py", ["target=3"])
    with pytest.raises(ValueError, match="target is 'caches/ixi', which has no fields to set"):
        load_experiment_config("configs/experiment_ixi.py", ["target=caches/ixi", "target.n=5"])
    with pytest.raises(FileNotFoundError, match="then from"):
        load_experiment_config("configs/nope.py")
    # methods by name: the config's rows of each (both `features` rows), a row with defaults for another method
    cfg = load_experiment_config("configs/experiment_ixi.py", ["methods=features,direct,ft_final"])
    assert cfg.methods == (MethodSpec("features"), MethodSpec("features", pretrained="other"), MethodSpec("direct"),
                           MethodSpec("ft_final"))
    # ... and the scarcity curve keeps only those methods (none left: no curve), unless it is set itself
    assert load_experiment_config("configs/experiment_ixi.py").scarcity.methods == ("features", "ft_step", "scratch")
    assert cfg.scarcity.methods == ("features",)
    assert load_experiment_config("configs/experiment_ixi.py", ["methods=direct"]).scarcity is None
    assert load_experiment_config("configs/experiment_ixi.py", ["methods=direct", "scarcity.methods=scratch"]
                                  ).scarcity.methods == ("scratch",)
    assert load_experiment_config("configs/experiment_ixi.py", ['methods=["direct"]']).methods == (
        MethodSpec("direct"),)
    with pytest.raises(ValueError, match=r"give method names, e.g. --set methods=NAME,NAME \(rows of the config or "
                                         r"its defaults: ft_step, ft_full"):
        load_experiment_config("configs/experiment_ixi.py", ["methods=[1,2]"])
    # a config without a row of that name takes the default rows (ft_step: age only), once per name
    only_features = dataclasses.replace(load_experiment_config("configs/experiment_ixi.py"),
                                        methods=(MethodSpec("features"),))
    assert override(only_features, "methods=ft_step,ft_step,features").methods == (
        MethodSpec("ft_step", tasks=("age",)), MethodSpec("features"))
    assert override(dataclasses.replace(only_features, methods=()), "methods=direct").methods == (MethodSpec("direct"),)


def test_failed_runs_are_reported_and_tried_again(tiny_models, ixi_tiny, tmp_path, monkeypatch, capsys):
    from jaxtl import experiment

    cfg = ExperimentConfig(name="tiny", out_dir=str(tmp_path / "exp"), data_dir=str(tmp_path / "data"),
                           target=str(ixi_tiny[1]), age_model=str(tiny_models["age"]),
                           sex_model=str(tiny_models["sex"]), tasks=("age",), methods=(MethodSpec("direct"),),
                           repeats=1, scarcity=None, manifold=None)
    real = experiment.transfer

    def broken(*args, **kwargs):
        raise ValueError("only 1 labelled training scans")

    monkeypatch.setattr(experiment, "transfer", broken)
    with pytest.warns(UserWarning, match=r"1 of 1 runs failed .*direct transfer \(age-pretr.\) \(age, repeat 0"):
        run_experiment(cfg, progress=False)
    assert [r["error"] for r in experiment.failed_runs(cfg)] == ["only 1 labelled training scans"]
    # without progress bars (a log file) each run is a line
    assert "experiment tiny: run 1/1 (age direct transfer (age-pretr.), repeat 0): error: only 1 labelled " \
        "training scans" in capsys.readouterr().err
    assert not experiment.failed_runs(dataclasses.replace(cfg, methods=(MethodSpec("features"),)))  # not planned
    assert "| failed |" in (tmp_path / "exp" / "table.md").read_text()
    monkeypatch.setattr(experiment, "transfer", real)  # fixed: the rerun tries the failed run again
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*outside the model's bins")
        run_experiment(cfg, progress=False)
    assert not experiment.failed_runs(cfg) and "| failed |" not in (tmp_path / "exp" / "table.md").read_text()
    assert re.search(r"run 1/1 \(age direct .*, repeat 0\): test mae [\d.]+ \(\d+ s\)", capsys.readouterr().err)


def test_experiment_refuses_unknown_tasks_and_models_of_different_resolutions(tiny_models, tmp_path):
    from jaxtl.experiment import check_experiment, check_models
    from jaxtl.weights import load_model

    with pytest.raises(ValueError, match=r"tasks: unknown task\(s\) 'sexx'; use age and/or sex"):
        check_experiment(ExperimentConfig(tasks=("age", "sexx")))
    with pytest.raises(ValueError, match="tasks is empty"):
        check_experiment(ExperimentConfig(tasks=()))
    with pytest.raises(ValueError, match=r"methods: unknown method\(s\) 'featurs'; use direct, features"):
        check_experiment(ExperimentConfig(methods=(MethodSpec("featurs"),)))
    with pytest.raises(ValueError, match=r"scarcity.methods: unknown method\(s\) 'x'"):
        check_experiment(ExperimentConfig(scarcity=ScarcityConfig(methods=("x",))))
    with pytest.raises(ValueError, match=r"methods: \('features',\): give MethodSpec rows in a config file"):
        check_experiment(ExperimentConfig(methods=("features",)))
    age, sex = load_model(tiny_models["age"]), load_model(tiny_models["sex"])
    check_models({"age": age, "sex": sex})
    one_mm = dataclasses.replace(sex, input_shape=(160, 192, 160), preprocessing={**sex.preprocessing, "downsample": 1})
    with pytest.raises(ValueError, match=r"the sex model .* takes 1mm inputs of shape \(160, 192, 160\)"):
        check_models({"age": age, "sex": one_mm})


def test_cli_experiment_reports_user_errors(tmp_path, capsys):
    assert cli.main(["experiment", "--config", str(tmp_path / "missing.py")]) == 2
    assert "no such config file" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return 3\n")
    assert cli.main(["experiment", "--config", str(bad)]) == 2
    assert "expected ExperimentConfig" in capsys.readouterr().err


def test_missing_target_fails_before_source_models_are_built(tmp_path, monkeypatch):
    from jaxtl import experiment
    from jaxtl.experiment import PretrainSpec

    built = []
    monkeypatch.setattr(experiment, "ensure_model", lambda *a, **k: built.append(a))
    config = ExperimentConfig(target=str(tmp_path / "nope"), out_dir=str(tmp_path / "out"),
                              age_model=PretrainSpec(str(tmp_path / "age")),
                              sex_model=PretrainSpec(str(tmp_path / "sex"), task="sex"))
    with pytest.raises(FileNotFoundError, match="nope: no such cohort"):
        experiment.run_experiment(config, progress=False)
    assert built == []


def test_findings_verdicts(tmp_path):
    """Each finding compares mean test metrics in the right direction (age: lower MAE, sex: higher accuracy)."""
    from jaxtl.experiment import findings

    means = {("age", "TL ft_step (age-pretr.)"): 5.0, ("age", "features (age-pretr.)"): 6.0,
             ("age", "features (sex-pretr.)"): 9.0, ("age", "elastic net"): 5.5, ("age", "scratch"): 8.0,
             ("age", "re-init w/ scaling"): 7.0, ("sex", "features (sex-pretr.)"): 0.6,
             ("sex", "features (age-pretr.)"): 0.7}
    rows = [{"task": task, "label": label, "share": 1.0, "test": v + d}
            for (task, label), v in means.items() for d in (-0.1, 0.1)]
    rows.append({"task": "sex", "label": "elastic net", "share": 1.0, "test": None, "error": "fit failed"})
    lines = findings(ExperimentConfig(name="t", out_dir=str(tmp_path), paper_dataset="abide"), rows)
    verdict = {line.split(" | ")[2]: line.split(" | ")[3] for line in lines}
    paper = {line.split(" | ")[2]: line.split(" | ")[4].rstrip(" |") for line in lines}
    assert verdict == {
        "same-task frozen features (age-pretr.) beat elastic net": "**does not hold**",
        "same-task frozen features (age-pretr.) beat scratch": "holds",
        "same-task fine-tuning (TL ft_step (age-pretr.)) beats elastic net": "holds",
        "same-task fine-tuning (TL ft_step (age-pretr.)) beats scratch": "holds",
        "same-task features beat sex-pretrained features": "holds",
        "re-init loses the gain (TL ft_step (age-pretr.) beats re-init)": "holds",
        "same-task features beat age-pretrained features": "within 1 sd (0.600 vs 0.700)",  # sd 0.14: no finding
        "same-task frozen features (sex-pretr.) beat elastic net": "n/a (elastic net: no result)",
    }
    # the same comparisons in the paper's ABIDE numbers (features = its ft_final), which do not all hold there
    assert paper == {
        "same-task frozen features (age-pretr.) beat elastic net": "does not hold (ABIDE 4.427±0.22 vs 3.591±0.596)",
        "same-task frozen features (age-pretr.) beat scratch": "does not hold (ABIDE 4.427±0.22 vs 1.794±0.037)",
        "same-task fine-tuning (TL ft_step (age-pretr.)) beats elastic net": "holds (ABIDE 1.696±0.067 vs 3.591±0.596)",
        "same-task fine-tuning (TL ft_step (age-pretr.)) beats scratch": "holds (ABIDE 1.696±0.067 vs 1.794±0.037)",
        "same-task features beat sex-pretrained features": "not reported",
        "re-init loses the gain (TL ft_step (age-pretr.) beats re-init)": "holds (ABIDE 1.696±0.067 vs 2.037±0.21)",
        "same-task features beat age-pretrained features": "not reported",
        "same-task frozen features (sex-pretr.) beat elastic net": "within 1 sd (ABIDE 0.702±0.023 vs 0.689±0.035)",
    }
    # equal at the table's precision: a tie, whatever the spread (a 1-repeat run has none: said so)
    tie = [{"task": "age", "label": label, "share": 1.0, "test": v} for label, v in
           (("features (age-pretr.)", 13.40346), ("features (sex-pretr.)", 13.40348), ("elastic net", 12.0))]
    lines = findings(ExperimentConfig(name="t", out_dir=str(tmp_path), tasks=("age",)), tie)
    assert [line.split(" | ")[3] for line in lines] == ["**does not hold** (no sd)", "tie"]


def test_runs_of_a_model_retrained_in_place_are_not_reused(tiny_models, ixi_tiny, tmp_path):
    """The setup names models by path; a model saved anew at that path (e.g. pretrained further) has other
    weights, so the runs made with the old weights are rerun (marked superseded in results.jsonl, so no reader
    reports them), not reported as the new model's. Runs that use no pretrained weights are kept."""
    import os
    import shutil

    from flax import nnx

    from jaxtl.experiment import _recorded_runs
    from jaxtl.model import SFCN
    from jaxtl.weights import load_model, save_model

    for task in ("age", "sex"):
        shutil.copytree(tiny_models[task], tmp_path / task)
    cfg = ExperimentConfig(
        name="tiny", out_dir=str(tmp_path / "exp"), data_dir=str(tmp_path / "data"), target=str(ixi_tiny[1]),
        age_model=str(tmp_path / "age"), sex_model=str(tmp_path / "sex"), paper_dataset="ixi", tasks=("age",),
        methods=(MethodSpec("direct"), MethodSpec("features", pretrained="other"), MethodSpec("elastic")),
        repeats=1, scarcity=None, manifold=None, cv=2)
    results = tmp_path / "exp" / "results.jsonl"

    def lines():
        return [json.loads(line) for line in results.read_text().splitlines()]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_experiment(cfg, progress=False)
        first = {r["method"]: r for r in lines()}
        digests = {t: load_model(tmp_path / t).digest() for t in ("age", "sex")}
        assert first["direct"]["models"] == {"age": digests["age"]} and first["elastic"]["models"] == {}
        assert first["features"]["models"] == {"sex": digests["sex"]}
        run_experiment(cfg, progress=False)  # same weights: reused
    assert len(lines()) == 3
    old = load_model(tmp_path / "age")
    save_model(SFCN(old.channels, old.task.num_outputs, rngs=nnx.Rngs(7)), tmp_path / "age", old.task,
               input_shape=old.input_shape, preprocessing=old.preprocessing, overwrite=True)
    with pytest.warns(UserWarning, match="1 earlier runs were made with other weights"):
        run_experiment(cfg, progress=False)
    runs = lines()
    assert [r["method"] for r in runs] == ["direct", "features", "elastic", "direct"]  # only the age model's run
    assert runs[0]["superseded"] and not any("superseded" in r for r in runs[1:])
    assert runs[3]["models"]["age"] != digests["age"] and runs[3]["test"] != runs[0]["test"]
    # records written before runs carried digests: reused, unless a model was written after the results file
    results.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "models"}) + "\n" for r in runs[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_experiment(cfg, progress=False)
    assert len(lines()) == 3
    later = results.stat().st_mtime + 10
    os.utime(tmp_path / "sex" / "model.json", (later, later))
    with pytest.warns(UserWarning, match="2 earlier runs were made with other weights"):  # elastic is kept
        run_experiment(cfg, progress=False)
    runs = lines()
    assert sum("superseded" in r for r in runs) == 2 and len(runs) == 5
    current = _recorded_runs(cfg)[0]  # what findings() and failed_runs() read: the current runs only
    assert len(current) == 3 and not any("superseded" in r for r in current.values())


def test_cohorts_simulated_by_another_simulator_version_are_named(ixi_tiny, tmp_path):
    import shutil

    from jaxtl.experiment import SimulatedCohort, ensure_cohort
    from jaxtl.simulate import SIMULATOR_VERSION, simulator_version

    bids, cache = ixi_tiny
    assert simulator_version(bids) == SIMULATOR_VERSION and simulator_version(tmp_path) is None
    root = tmp_path / "data" / "ixi_n36_seed1_4mm"
    shutil.copytree(bids, root / "bids")
    shutil.copytree(cache, root / "cache")
    spec = SimulatedCohort("ixi", 36, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_cohort(spec, tmp_path / "data", progress=False) == str(root / "cache")
    desc = root / "bids" / "dataset_description.json"
    desc.write_text(re.sub(r" simulator=\d+", "", desc.read_text()))  # as written before versions were recorded
    with pytest.warns(UserWarning, match=rf"by another version of jaxtl.simulate \(1, now {SIMULATOR_VERSION}"):
        assert ensure_cohort(spec, tmp_path / "data", progress=False) == str(root / "cache")


def test_baseline_rows_count_each_repeat_once(tmp_path):
    """Every method's run of a repeat records that split's mean predictor: the table's sd is over repeats (counted
    once per method it shrank, and read ±0.00 after one repeat)."""
    from jaxtl.experiment import results_table

    cfg = ExperimentConfig(name="t", out_dir=str(tmp_path), tasks=("age",),
                           methods=(MethodSpec("features"), MethodSpec("scratch"), MethodSpec("elastic")))
    labels = [s.name("age") for s in cfg.methods]
    runs = [{"task": "age", "label": label, "share": 1.0, "repeat": rep, "test": 5.0 + rep, "baseline": base}
            for rep, base in enumerate((13.0, 14.0)) for label in labels]
    row = next(line for line in results_table(runs, cfg).splitlines() if "mean-age predictor" in line)
    assert f"| 13.50±{np.std([13.0, 14.0], ddof=1):.2f} |" in row  # 0.71; over the 6 runs it read 0.55
    one = [r for r in runs if r["repeat"] == 0]
    row = next(line for line in results_table(one, cfg).splitlines() if "mean-age predictor" in line)
    assert "| 13.00 |" in row  # one repeat: no spread to show
