"""`jaxtl demo` at CI scale: every stage writes its files, REPORT.md has every section, a rerun reuses all."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest

from jaxtl.demo import CI, demo_cohorts, print_summary, run_demo

SECTIONS = ["# jaxtl demo", "> **Simulated brains.**", "## Source models", "## Findings of the paper, checked here",
            "## Target: simulated IXI", "Data scarcity", "Brain manifold", "## Brain age", "## The simulated brains",
            "## Timings"]


@pytest.fixture(scope="module")
def ci_data(ukb_cache, ixi_tiny, tmp_path_factory):
    """The demo's first stage at CI scale (simulated cohorts and their caches), made once for both demo runs. Its
    cohorts are the suite's shared `ukb` and `ixi` cohorts (same preset, size, seed and resolution): copied, not
    simulated again."""
    from jaxtl.experiment import SimulatedCohort, cohort_root, ensure_cohort

    data = tmp_path_factory.mktemp("demo_data")
    source, targets = demo_cohorts(CI)
    shared = {SimulatedCohort("ukb", 32, 0, 4): ukb_cache.parent, SimulatedCohort("ixi", 36, 1, 4): ixi_tiny[1].parent}
    for cohort in (source, *targets.values()):
        if cohort in shared:
            shutil.copytree(shared[cohort], cohort_root(cohort, data), ignore=shutil.ignore_patterns(".built"))
        ensure_cohort(cohort, data, progress=False)
    return data


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def ci_run(ci_data, tmp_path_factory):
    """The CI-scale demo in a fresh folder and $JAXTL_HOME (compiled programs come from the test run's cache,
    $JAX_COMPILATION_CACHE_DIR), stopped at its experiment stage by a Ctrl-C and run again: (output folder,
    timings.json of the stopped run)."""
    import jaxtl.demo as demo

    out = tmp_path_factory.mktemp("ci_run") / "demo"
    shutil.copytree(ci_data, out / "data")
    config = dataclasses.replace(CI, out_dir=str(out))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXTL_HOME", str(out.parent / "home"))
        with pytest.MonkeyPatch.context() as stop:
            # a first run stopped at its experiment stage: the stages it finished keep their times in timings.json
            stop.setattr(demo, "run_experiment", _ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                run_demo(config, progress=False)
        timed = json.loads((out / "timings.json").read_text())
        report = run_demo(config, progress=False)
    assert report == out / "REPORT.md"
    return out, timed


def test_ci_demo_end_to_end_and_rerun(ci_run, capsys, monkeypatch):
    out, timed = ci_run
    report = out / "REPORT.md"
    config = dataclasses.replace(CI, out_dir=str(out))
    assert set(timed) == {"simulate + prepare cohorts", "pretrain age SFCN", "pretrain sex SFCN", "_running"}
    assert timed["_running"] == ["experiment ixi"]
    assert json.loads((out / "timings.json").read_text())["pretrain age SFCN"] == timed["pretrain age SFCN"]
    assert "| experiment ixi (resumed) |" in report.read_text()

    # 1-2: simulated BIDS cohorts and their caches
    for name, n in (("ukb", CI.source_n), ("ixi", CI.target_n)):
        root = next((out / "data").glob(f"{name}_n{n}_*"))
        assert len((root / "bids" / "participants.tsv").read_text().splitlines()) == n + 1
        assert len(json.loads((root / "cache" / "index.json").read_text())["scans"]) == n
    # 3: pretrained age and sex models
    for task in ("age", "sex"):
        meta = json.loads((out / f"pretrain_{task}" / "model" / "model.json").read_text())
        assert meta["task"] == task
    # 4: the comparison, every method on both tasks, scarcity and manifold
    exp = out / "experiment_ixi"
    runs = [json.loads(line) for line in (exp / "results.jsonl").read_text().splitlines()]
    labels = {(r["task"], r["label"]) for r in runs if r["share"] == 1.0}
    for task, other in (("age", "sex"), ("sex", "age")):
        tl = "TL ft_step (age-pretr.)" if task == "age" else "TL ft_full (sex-pretr.)"
        for label in (tl, f"features ({task}-pretr.)", f"features ({other}-pretr.)",
                      "scratch", "elastic net", f"direct transfer ({task}-pretr.)"):
            assert (task, label) in labels, (task, label)
    assert {r["share"] for r in runs} == {0.5, 1.0}
    for f in ("table.md", "scarcity.png", "manifold.png", "report.md"):
        assert (exp / f).stat().st_size > 100, f
    # 5: brain-age outputs and the report
    for f in ("predictions.csv", "metrics.json", "predicted_vs_age.png", "gap_vs_age.png"):
        assert (out / "brain_age" / f).exists(), f
    text = report.read_text()
    for section in SECTIONS:
        assert section in text, section
    # a refused age-bias correction is said, not left as unexplained empty columns
    usable = json.loads((out / "brain_age" / "metrics.json").read_text())["bias_usable"]
    assert ("refused here, its corrected columns empty" in text) == (usable is False)
    for link in re.findall(r"\]\(([^)]+)\)", text):  # every image and file the report links exists
        assert (out / link).exists(), link
    assert re.search(r"\| age \| [\d.]+ years MAE \| [\d.]+ years MAE \| 1", text), text
    assert "paper, real IXI" in text and re.search(r"\| total \| [\d.]+ \| [\d.]+ \|", text)
    verdict = r"(?:holds|\*\*does not hold\*\*) \(no sd\)|tie|n/a \([^|]*\)"  # one repeat at CI scale: no sd
    assert len(re.findall(rf"\| ixi \| (?:age|sex) \| [^|]* \| (?:{verdict}) \| [^|]* \|", text)) == 10, text
    assert re.search(r"This run: .+ \(\d+ cores\), jaxtl commit \w+", text)  # where the timings come from
    assert "re-init" not in text  # not part of the demo's comparison
    # 6: the summary printed by `jaxtl demo`
    print_summary(report)
    printed = capsys.readouterr().out
    assert "## Findings" in printed and str(report.resolve()) in printed

    # a second run reuses data, models and finished runs (failed runs would be tried again)
    assert not [r for r in runs if r.get("error")]  # every method ran, the elastic net on few scans of a sex too
    n_runs = len(runs)
    from sklearn.manifold import TSNE

    import jaxtl.train

    monkeypatch.setenv("JAXTL_HOME", str(out.parent / "home"))
    monkeypatch.setattr(jaxtl.train, "pretrain", _ctrl_c)  # nothing is trained again
    monkeypatch.setattr(TSNE, "fit_transform", _ctrl_c)  # nor the manifold's t-SNE refitted
    manifold = (exp / "manifold.csv").read_text()
    report = run_demo(config, progress=False)
    assert len((exp / "results.jsonl").read_text().splitlines()) == n_runs
    assert (exp / "manifold.csv").read_text() == manifold
    rows = re.findall(r"\| (pretrain \w+ SFCN|experiment ixi)(?: \(resumed\))? \| ([\d.]+) \| ([\d.]+) \|",
                      report.read_text())
    assert len(rows) == 3, rows  # each stage's time in the first run and in this one


def test_source_row_scores_the_checkpoint_the_experiments_use(tmp_path):
    from jaxtl.demo import _source_row

    final = {"test_mae": 5.0, "test_mae_best": 4.0, "best_epoch": 3, "test_baseline_mae": 6.0, "epochs": 10}
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"final": final}) + "\n")
    assert _source_row("age", str(tmp_path / "best")) == \
        "| age | 4 years MAE | 6 years MAE | 10 (best validation epoch: 3) |"
    assert _source_row("age", str(tmp_path / "model")) == "| age | 5 years MAE | 6 years MAE | 10 |"
