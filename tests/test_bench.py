"""`jaxtl bench` plumbing on tiny shapes: cases, FLOPs, records, ratios, report. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from jaxtl import bench
from jaxtl.cli import main
from jaxtl.config import load_config
from jaxtl.model import PENG_CHANNELS, conv_flops

TINY = (2, 4, 4)  # 8^3 input: 8 -> 4 -> 2, then the k=1 block


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(bench.CONFIGS, "tiny", TINY)
    monkeypatch.setattr(bench, "FULL_SHAPE", (32, 32, 32))  # 4mm -> 8x8x8
    _quick_cpu_probes(monkeypatch)


def _quick_cpu_probes(monkeypatch):
    """A record's probes of other processes' CPU: 20 ms each, not 0.5 s (no record is timed here)."""
    other_cpu = bench.other_cpu
    monkeypatch.setattr(bench, "other_cpu", lambda interval=0.02: other_cpu(interval))


def test_plan_cases():
    cases = bench.plan_cases(["embed", "train"], ["peng", "demo"], [1, 2], ["float32"])
    assert [c.label() for c in cases] == ["embed peng 1mm float32 batch 1", "embed peng 2mm float32 batch 4",
                                          "embed demo 4mm float32 batch 8", "train peng 1mm float32 batch 1",
                                          "train peng 2mm float32 batch 4", "train demo 4mm float32 batch 8"]
    assert cases[0].shape == (160, 192, 160) and cases[2].channels == bench.DEMO_CHANNELS
    assert {c.batch for c in bench.plan_cases(["embed"], ["transfer"], [2], ["bfloat16"], batch=6)} == {6}
    assert bench.plan_cases(["input"], ["peng"], [4], ["float32"])[0].suite == "input"
    # a train step at batch 1 with a 1x1x1 last block: PyTorch refuses it, jaxtl's would pass no gradient
    assert bench.plan_cases(["embed"], ["demo"], [4], ["float32"], batch=1)[0].batch == 1
    with pytest.raises(ValueError, match="a training batch of 1 at input 40x48x40"):
        bench.plan_cases(["embed", "train"], ["demo"], [4], ["float32"], batch=1)
    assert bench.plan_cases(["train"], ["peng"], [2], ["float32"], batch=1)[0].batch == 1  # 80x96x80: 2x3x2
    for bad in (dict(suites=["nope"]), dict(configs=["big"]), dict(dtypes=["float16"]), dict(resolutions=[3])):
        args = dict(suites=["embed"], configs=["peng"], resolutions=[2], dtypes=["float32"]) | bad
        with pytest.raises(ValueError):
            bench.plan_cases(**args)


def test_demo_channels_match_the_shipped_config():
    assert tuple(load_config("configs/sfcn_demo.py").model.channels) == bench.DEMO_CHANNELS


def test_flops():
    per_layer = bench.layer_flops(PENG_CHANNELS, (160, 192, 160))
    assert sum(per_layer) == conv_flops(PENG_CHANNELS, (160, 192, 160))
    assert abs(sum(per_layer) / 1e9 - 131.7) < 0.5  # the "about 132 GFLOP per volume"
    assert bench.case_flops("embed", PENG_CHANNELS, (80, 96, 80)) == sum(bench.layer_flops(PENG_CHANNELS, (80, 96, 80)))
    assert bench.case_flops("train", TINY, (8, 8, 8)) == 3 * sum(bench.layer_flops(TINY, (8, 8, 8))) - \
        bench.layer_flops(TINY, (8, 8, 8))[0]


def test_peak_flops():
    cpu = {"cpu_flags": ["avx512f", "avx512_bf16"], "cpu_mhz": 2500.0, "cpu_cores": 2, "cpu_vendor": "AuthenticAMD",
           "cpu_family": 26}
    assert bench.peak_flops(cpu, "float32")[0] == 2 * 2 * 16 * 2 * 2.5e9
    assert bench.peak_flops(cpu, "bfloat16")[0] == 2 * bench.peak_flops(cpu, "float32")[0]
    assert bench.peak_flops(cpu | {"cpu_family": 25}, "float32")[0] == 2 * 2 * 8 * 2 * 2.5e9  # Zen 4: 2 x 256 bit
    assert bench.peak_flops(cpu | {"cpu_flags": ["avx2"]}, "bfloat16")[0] == 2 * 2 * 8 * 2 * 2.5e9
    zen1 = cpu | {"cpu_flags": ["avx2"], "cpu_family": 23, "cpu_model_number": 1}  # 128-bit FMA units
    assert bench.peak_flops(zen1, "float32")[0] == 2 * 2 * 4 * 2 * 2.5e9
    assert bench.peak_flops(zen1 | {"cpu_model_number": 0x31}, "float32")[0] == 2 * 2 * 8 * 2 * 2.5e9  # Zen 2
    assert bench.peak_flops(cpu | {"cpu_mhz": None}, "float32")[0] is None
    # 2 logical CPUs that are one core's SMT siblings: one core's vector units
    assert bench.peak_flops(cpu | {"cpu_physical_cores": 1}, "float32")[0] == 1 * 2 * 16 * 2 * 2.5e9
    hw = bench.hardware_info()
    assert 1 <= hw["cpu_physical_cores"] <= hw["cpu_cores"]
    gpu = {"accelerator": "NVIDIA H100 80GB HBM3", "accelerator_count": 8}
    assert bench.peak_flops(gpu, "bfloat16")[0] == 8 * 989e12
    assert bench.peak_flops(gpu | {"accelerator": "Mystery 9000"}, "float32")[0] is None
    assert bench.peak_flops(gpu | {"accelerator": "NVIDIA H100 PCIe"}, "bfloat16")[0] == 8 * 756e12  # not the SXM's
    assert bench.peak_flops(gpu | {"accelerator": "NVIDIA H100 NVL"}, "bfloat16")[0] == 8 * 835e12
    tpu = {"accelerator": "TPU v5 lite", "accelerator_count": 4, "platform": "tpu"}
    assert bench.peak_flops(tpu, "bfloat16")[0] == 4 * 197e12
    assert bench.peak_flops(tpu | {"accelerator": "TPU v5"}, "bfloat16")[0] == 4 * 459e12  # JAX's name of a v5p
    assert bench.peak_flops(tpu, "float32")[0] is None
    assert bench.peak_flops(cpu | {"cpu_flags": ["avx512f", "avx512_bf16", "amx_bf16"]}, "bfloat16")[0] is None
    assert bench.hardware_id({"accelerator": "NVIDIA H100 80GB HBM3", "accelerator_count": 8,
                              "platform": "gpu"}) == "gpu-nvidia-h100-80gb-hbm3-x8"
    assert bench.hardware_id({"accelerator": None, "cpu_model": "AMD EPYC", "cpu_cores": 2}) == "cpu-amd-epyc-2core"
    # a VM's generic model name: CPU generations apart by family (Zen 4 = 25, Zen 5 = 26)
    assert bench.hardware_id({"accelerator": None, "cpu_model": "AMD EPYC", "cpu_family": 26,
                              "cpu_cores": 2}) == "cpu-amd-epyc-fam26-2core"
    assert bench.hardware_id({"accelerator": None, "cpu_model": "AMD EPYC 9B14 96-Core Processor", "cpu_family": 25,
                              "cpu_cores": 4}) == "cpu-amd-epyc-9b14-96-core-processor-4core"
    # one family holds several generations (Zen 3 and Zen 4: 25; Intel: 6): the model number tells them apart
    generic = {"accelerator": None, "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_family": 6, "cpu_cores": 16}
    ids = {bench.hardware_id(generic | {"cpu_model_number": m}) for m in (106, 143)}  # Ice Lake, Sapphire Rapids
    assert ids == {"cpu-intel-r-xeon-r-processor-fam6-m106-16core", "cpu-intel-r-xeon-r-processor-fam6-m143-16core"}
    # the report's hardware column tells the generations apart too
    assert bench.hardware_name({"accelerator": None, "cpu_model": "AMD EPYC", "cpu_family": 25, "cpu_model_number": 17,
                                "cpu_cores": 2}) == "AMD EPYC family 25 model 17 (2 cores)"
    assert bench.hardware_name({"accelerator": None, "cpu_model": "AMD EPYC", "cpu_family": 26,
                                "cpu_cores": 2}) == "AMD EPYC family 26 (2 cores)"  # a record from before the field
    assert "cpu_model_number" in hw and "cpu_stepping" in hw and hw["id"] == bench.hardware_id(hw)
    assert bench.hardware_name({"accelerator": "NVIDIA H200", "accelerator_count": 1}) == "NVIDIA H200 x1"
    assert bench.peak_flops(gpu | {"accelerator": "NVIDIA H200 NVL"}, "bfloat16")[0] == 8 * 835e12


@pytest.mark.parametrize("suite", ["embed", "train"])
def test_torch_compile_reference_is_its_own_row(tiny, monkeypatch, suite):
    """--torch-compile runs PyTorch's model through torch.compile (here a spy: inductor's compile takes ~20 s),
    records it, and the report keeps it apart from the eager reference."""
    torch = pytest.importorskip("torch")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    rec = bench.run_case(bench.Case(suite, "tiny", 4, 2, "float32"), warmup=0, repeats=1, torch_compile=True,
                         torch_memory_format="contiguous")
    assert len(compiled) == 1 and rec["torch"]["compiled"] == "torch.compile (inductor)"
    assert set(rec["torch"]["first_call_s"]) == {"contiguous"}
    eager = rec | {"torch": rec["torch"] | {"compiled": None}, "time": "2030-01-01T00:00:00+00:00"}
    hw = _fake_record("cpu-test-2core")["hardware"]
    assert len(bench.latest([rec | {"hardware": hw}, eager | {"hardware": hw}])) == 2
    assert f"| {suite} (vs torch.compile) |" in bench.report_markdown([rec | {"hardware": hw}])


def test_step_stats_and_interleaving():
    s = bench.step_stats([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["iqr"], s["n"]) == (2.5, 1.0, 4.0, 1.5, 4)
    calls, warm = [], {}
    times = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 2, warm)
    assert calls == ["a", "b", "a", "b", "a", "b"] and [len(t) for t in times.values()] == [2, 2]
    assert [len(t) for t in warm.values()] == [1, 1]
    assert bench.case_peak_memory(None, 100) == 100 and bench.case_peak_memory(100, 150) == 150
    assert bench.case_peak_memory(200, 200) is None and bench.case_peak_memory(None, None) is None


@pytest.mark.parametrize("suite", ["embed", "train"])
def test_run_case_record_and_ratio(tiny, suite):
    pytest.importorskip("torch")
    rec = bench.run_case(bench.Case(suite, "tiny", 4, 2, "float32"), warmup=1, repeats=2)
    assert rec["input_shape"] == [8, 8, 8] and rec["channels"] == list(TINY) and rec["batch"] == 2
    assert rec["conv_impl"] in ("fast", "xla") and rec["compile_s"] > 0 and len(rec["step_s"]["all"]) == 2
    assert rec["compiler_options"] == {}  # CPU: XLA's defaults (channels-last convolutions on Hopper GPUs only)
    assert rec["vol_per_s"] == pytest.approx(2 / rec["step_s"]["median"], rel=1e-3)
    assert rec["gflop_per_s"] == pytest.approx(bench.case_flops(suite, TINY, (8, 8, 8)) * 2 / rec["step_s"]["median"]
                                               / 1e9, rel=1e-3)
    t = rec["torch"]
    assert t["memory_format"] in ("channels_last", "contiguous") and t["threads"] >= 1 and len(t["step_s"]["all"]) == 2
    assert t["interop_threads"] >= 1 and rec["memory"]["process_peak_rss_bytes"] > 10**7  # host memory on a CPU
    assert rec["ratio"] == pytest.approx(rec["vol_per_s_per_device"] / t["vol_per_s"], rel=1e-3)
    paired = np.median(np.array(t["step_s"]["all"]) / np.array(rec["step_s"]["all"]))
    assert rec["ratio_paired"] == pytest.approx(paired, rel=1e-2)
    if suite == "embed":  # same weights on both sides; the public embed() timed as well
        assert rec["features_max_rel_diff"] < 1e-4
        assert rec["api_ratio"] == pytest.approx(rec["api_vol_per_s"] / t["vol_per_s"], rel=1e-3)
    assert "stream" not in rec  # on a CPU batches are not timed back to back unless asked for
    json.dumps(rec)


def test_embed_batches_back_to_back(tiny, monkeypatch):
    """`stream=k`: k batches dispatched back to back on both sides, timed in rounds; volumes/s, % of peak and the
    ratio from those rounds; in the summary line and the report."""
    pytest.importorskip("torch")
    calls = {"jaxtl": [], "torch": []}
    real_embed, real_torch = bench.jaxtl_embed, bench.torch_runner

    def spy(side, runner):
        inner = runner.stream
        runner.stream = lambda k: calls[side].append(k) or inner(k)
        return runner

    monkeypatch.setattr(bench, "jaxtl_embed", lambda *a, **kw: spy("jaxtl", real_embed(*a, **kw)))
    monkeypatch.setattr(bench, "torch_runner", lambda *a, **kw: spy("torch", real_torch(*a, **kw)))
    monkeypatch.setattr(bench, "peak_flops", lambda hw, dtype: (1e12, "test peak"))
    rec = bench.run_case(bench.Case("embed", "tiny", 4, 2, "float32"), warmup=0, repeats=1, stream=3)
    st = rec["stream"]
    assert calls == {"jaxtl": [3] * (1 + bench.STREAM_REPEATS), "torch": [3] * (1 + bench.STREAM_REPEATS)}
    assert st["batches"] == 3 and st["s"]["n"] == bench.STREAM_REPEATS
    assert st["vol_per_s"] == pytest.approx(3 * 2 / st["s"]["median"])
    assert st["torch_vol_per_s"] == pytest.approx(3 * 2 / st["torch_s"]["median"])
    assert st["ratio"] == pytest.approx(st["vol_per_s"] / st["torch_vol_per_s"])
    flops = bench.case_flops("embed", TINY, (8, 8, 8))
    assert st["peak_fraction"] == pytest.approx(flops * st["vol_per_s"] / 1e12)
    assert "3 batches back to back: jaxtl" in bench.summary_line(rec | {"torch": None})
    row = bench.report_markdown([_fake_record("cpu-test-2core") | {"stream": st}])
    assert f"| K=3: {st['vol_per_s']:.3g} ({100 * st['peak_fraction']:.2g}) / {st['torch_vol_per_s']:.3g} |" in row
    # the report names the peak behind each hardware and dtype's "% peak"
    hw = _fake_record("cpu-test-2core")["hardware"]
    assert bench._peaks([rec | {"hardware": hw}]) == f"- {bench.hardware_name(hw)}, float32: test peak\n"
    train = bench.run_case(bench.Case("train", "tiny", 4, 2, "float32"), warmup=0, repeats=1, use_torch=False,
                           stream=3)
    assert "stream" not in train  # embed only


def test_bench_and_trainer_steps_compile_with_the_compiler_options(tiny, monkeypatch):
    """The bench's embed step and the Trainer's steps (the bench's train case) are jitted with
    `conv.compiler_options` of their mesh, as embed's are (tests/test_embed.py): a bad option reaches XLA."""
    import jaxtl.train
    from jaxtl import model

    monkeypatch.setattr(model, "compiler_options", lambda devices: {"xla_no_such_option": True})
    monkeypatch.setattr(jaxtl.train, "trace_settings", lambda: ("bad option",))  # not a cached step
    x, ages = bench._inputs(bench.Case("embed", "tiny", 4, 2, "float32"))
    with pytest.raises(Exception, match="xla_no_such_option"):
        bench.jaxtl_embed(bench.Case("embed", "tiny", 4, 2, "float32"), x)
    with pytest.raises(Exception, match="xla_no_such_option"):
        bench.jaxtl_train(bench.Case("train", "tiny", 4, 2, "float32"), x, ages)


def test_run_case_without_torch(tiny, monkeypatch):
    monkeypatch.setattr(bench, "torch_available", lambda: False)
    calls, real = [], bench.jaxtl_embed

    def spy(*args, **kwargs):
        runner = real(*args, **kwargs)
        api = runner.api
        runner.api = lambda: calls.append(1) or api()
        return runner

    monkeypatch.setattr(bench, "jaxtl_embed", spy)
    rec = bench.run_case(bench.Case("embed", "tiny", 4, 1, "bfloat16"), warmup=0, repeats=1)
    assert rec["torch"] is None and rec["ratio"] is None and "not installed" in rec["torch_skipped"]
    assert len(calls) == 2 and rec["api_step_s"]["n"] == 1  # without warm-up: jaxtl.embed's compile untimed


def _fake_record(hw_id, case="embed", vol=10.0, torch_vol=5.0, when="2026-01-01T00:00:00+00:00"):
    hw = {"id": hw_id, "platform": "cpu", "accelerator": None, "cpu_model": "Test", "cpu_cores": 2}  # cpu-test-2core
    if hw_id.startswith("gpu-"):  # e.g. gpu-fake-x1
        _, name, count = hw_id.split("-")
        hw |= {"platform": "gpu", "accelerator": name.title(), "accelerator_count": int(count[1:])}
    assert bench.hardware_id(hw) == hw_id
    return {"schema": 1, "time": when, "hardware": hw,
            "git": {"commit": "abc123"}, "case": case, "config": "peng", "resolution_mm": 2,
            "input_shape": [80, 96, 80], "dtype": "float32", "batch": 4, "conv_impl": "fast", "vol_per_s": vol,
            "gflop_per_s": 100.0, "peak_fraction": 0.3, "compile_s": 1.0,
            "torch": {"vol_per_s": torch_vol} if torch_vol else None, "ratio": vol / torch_vol if torch_vol else None,
            "load_avg": {"end": [1.0, 1.0, 1.0]}}


def test_run_suite_input_records_and_report(tmp_path, monkeypatch, capsys):
    stages = [{"stage": "memcpy", "volumes": 8, "seconds": 0.1, "volumes_per_s": 80.0, "dtype": "float16"},
              {"stage": "grain:w1", "volumes": 8, "seconds": 0.2, "volumes_per_s": 40.0, "dtype": "float16",
               "batch_size": 8}]
    fake = types.SimpleNamespace(run_input_bench=lambda **kw: [dict(s) for s in stages])
    monkeypatch.setattr(bench, "_load_input_bench", lambda: fake)
    _quick_cpu_probes(monkeypatch)
    out = tmp_path / "results" / "cpu-test.jsonl"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # settings that change a measurement are recorded
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    cases = bench.plan_cases(["input"], ["peng"], [4], ["float32"])
    assert [c.dtype for c in cases] == ["float16"]  # what the cache holds (its progress line had said float32)
    records = bench.run_suite(cases, out, note="test")
    assert [r["config"] for r in records] == ["memcpy", "grain:w1"] and records[0]["note"] == "test"
    assert records[0]["versions"]["env"]["OMP_NUM_THREADS"] == "2"
    assert "XLA_PYTHON_CLIENT_PREALLOCATE" not in records[0]["versions"]["env"]
    assert all(r["hardware"]["id"] and r["versions"]["jax"] and "commit" in r["git"] for r in records)
    assert all(set(r["other_cpu_cores"]) == {"start", "end"} for r in records)  # input records can be marked busy
    # a second machine, and an older duplicate that the report must drop
    bench.append_records([_fake_record("gpu-fake-x1", vol=200.0, torch_vol=100.0),
                          _fake_record("gpu-fake-x1", vol=1.0, torch_vol=1.0, when="2020-01-01T00:00:00+00:00"),
                          _fake_record("gpu-fake-x1", case="train", vol=50.0, torch_vol=25.0)], out)
    loaded = bench.load_records([out.parent])
    assert len(loaded) == 5
    md, png = bench.write_report([out.parent], tmp_path / "report" / "report.md")
    text = md.read_text()
    assert "| 2.00 |" in text and "memcpy" in text and "Fake x1" in text
    assert text.count("| embed |") == 1 and "| train |" in text  # the older duplicate is dropped
    assert "| 200 |" in text and "| 1 |" not in text
    assert png.exists() and png.stat().st_size > 1000
    # the versions the rows compare (the records had them, the report did not)
    assert f"- {bench.hardware_name(records[0]['hardware'])}: JAX {records[0]['versions']['jax']}, PyTorch " in text
    # 8 devices: jaxtl's bars per device beside PyTorch's one device (the ratio of the record, not 8x it)
    multi = _fake_record("gpu-fake-x8", vol=800.0, torch_vol=100.0) | {"vol_per_s_per_device": 100.0, "ratio": 1.0}
    labels, jx, pt = bench.chart_rows([multi])
    assert labels[0].startswith("gpu-fake-x8 | embed") and jx == [100.0] and pt == [100.0]
    assert "| 800 | 100 | 1.00 |" in bench.report_markdown([multi])
    # the console line says the ratio is per device (it read as jaxtl's total over PyTorch's)
    line = bench.summary_line(multi | {"devices": 8, "ratio_paired": 1.0,
                                       "torch": {"vol_per_s": 100.0, "memory_format": "channels_last"}})
    assert "jaxtl 800 vol/s (100 per device of 8)" in line
    assert "PyTorch 100 vol/s (channels_last, one device); jaxtl/PyTorch per device 1.00" in line
    # a GPU's small peak fractions and large FLOP rates stay legible (0.46% had read 0, 266520 GFLOP/s unparted)
    gpu_row = bench.report_markdown([multi | {"peak_fraction": 0.0046, "gflop_per_s": 266520.4}])
    assert "| 266,520 | 0.46 |" in gpu_row
    assert "0.46% of peak" in bench.summary_line(multi | {"peak_fraction": 0.0046, "torch": None})
    # a figure known to be something else (added to the record after its run) is marked, and the reason listed
    noted = multi | {"caveat": "the autotuner ran out of memory"}
    assert "| 800 (see caveats) |" in bench.report_markdown([noted])
    assert bench._caveats([noted]) == "- Fake x8, embed peng float32 batch 4: the autotuner ran out of memory\n"
    # how many steps were timed and how tight they were, on each side
    torch_steps = {"n": 3, "median": 2.0, "iqr": 0.1}
    timed = multi | {"step_s": {"n": 20, "median": 0.5, "iqr": 0.01},
                     "torch": {"vol_per_s": 100.0, "step_s": torch_steps}}
    assert "| 20 (2.0%) / 3 (5.0%) |" in bench.report_markdown([timed])
    assert "| — |" in bench.report_markdown([multi | {"torch": None, "ratio": None}])
    assert main(["bench", "report", "--results", str(out.parent), "--report-out", str(tmp_path / "r2.md")]) == 0
    assert (tmp_path / "r2.png").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text("{not json\n")
    assert main(["bench", "report", "--results", str(tmp_path / "bad")]) == 2
    assert "not a JSON record" in capsys.readouterr().err


def test_cli_rejects_unknown_suite(capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown suite nope" in capsys.readouterr().err


def test_gpu_transfer_script_records(tmp_path, monkeypatch):
    """benchmarks/gpu_transfer.py on a CPU (small shapes): one well-formed record of copy times, copy bandwidths and
    jaxtl.embed() throughput in both dtypes."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("gpu_transfer", REPO / "benchmarks" / "gpu_transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "transfer.jsonl"
    monkeypatch.setattr(sys, "argv", ["gpu_transfer.py", str(out), "2", "5", "1"])
    mod.main()
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["kind"] == "transfer" and rec["batch"] == 2 and rec["n_volumes"] == 5 and rec["hardware"]["id"]
    assert set(rec["ms"]) == {"put_float32", "put_bfloat16", "cast_bfloat16", "put_threads"}
    assert set(rec["gb_per_s"]) == {"put_float32", "put_bfloat16", "put_threads"}
    assert all(v > 0 for v in [*rec["ms"].values(), *rec["gb_per_s"].values()])
    assert set(rec["embed_vol_per_s"]) == {"float32", "bfloat16", "float32_from_float16", "bfloat16_from_float16"}
    assert min(rec["embed_vol_per_s"].values()) > 0
    # the sequence of calls (first on a new count / dtype, repeats), each timed with its copies and waits
    calls = rec["embed_calls"]
    assert [(c["label"], c["dtype"], c["n"], c["check"]) for c in calls][2:5] == [
        ("new count", "bfloat16", 8, True), ("repeat", "bfloat16", 8, True), ("new dtype", "float32", 8, True)]
    assert len(calls) == 12 and all(c["s"] > 0 and c["vol_per_s"] > 0 for c in calls)
    assert all(0 < c["copy_s"] and 0 < c["fetch_s"] < c["s"] for c in calls)  # the instrumented parts ran
    assert not any(c["traced"] for c in calls)  # no trace directory given
    E = importlib.import_module("jaxtl.embed")
    assert E.to_devices.__name__ == "to_devices" and E._fetch.__name__ == "_fetch"  # restored


def test_gpu_variant_first_layers_are_exact():
    """benchmarks/gpu_variants.py "pool+s2d" (the first block on 2x2x2 space-to-depth blocks) and "pool+direct"
    (27 shifted multiply-adds) give the plain block's output, BatchNorm statistics and kernel gradient (train
    mode, float32)."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    from conftest import REPO
    from flax import nnx

    from jaxtl.model import ConvBlock

    spec = importlib.util.spec_from_file_location("gpu_variants", REPO / "benchmarks" / "gpu_variants.py")
    gv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gv)
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 10, 1))
    outs = []
    for call in (gv.ORIGINAL, gv.s2d_call, gv.direct_call):
        block = ConvBlock(1, 4, 3, pool=True, dtype=jnp.float32, rngs=nnx.Rngs(1), conv_impl="xla")
        grad = nnx.grad(lambda b, call=call: jnp.sum(jnp.sin(call(b, x))))(block)
        y = call(block, x)
        outs.append((y, block.bn.mean[...], block.bn.var[...], grad.conv.kernel[...]))
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_gpu_first_block_sweep_plumbing(tiny, tmp_path, monkeypatch):
    """benchmarks/gpu_first_block.py on CPU (tiny shape, Pallas' interpreter): a record per mode with the XLA block,
    the kernel tunings (checked against the XLA block: eval output, train kernel gradient), PyTorch's block with
    the same weights, and the best tuning."""
    import importlib.util

    from conftest import REPO

    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("gpu_first_block", REPO / "benchmarks" / "gpu_first_block.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "fb.jsonl"
    monkeypatch.setattr(sys, "argv", ["gpu_first_block.py", str(out), "blocks", "eval,train", "float32", "2", "1"])
    mod.main()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in records] == ["train", "eval"]  # most wanted first (mod.ORDER)
    records = records[::-1]
    # the GPU grid without the builds that spill registers on sm_90 (benchmarks/triton_ptx.py)
    assert len(mod.variants(True, "eval")) == 20 and len(mod.variants(True, "train")) == 10
    assert dict(window=False, voxel_major=False, tile=128, num_warps=8) in mod.variants(True, "train")
    for rec in records:
        assert rec["kind"] == "first_block" and rec["batch"] == 2 and not rec["errors"]
        assert set(rec["ms"]) == {"xla", "torch", "window=False,tile=16", "window=True,voxel_major=False,tile=16"}
        assert all(d < 1e-4 for d in rec["max_rel_diff"].values()) and rec["best"]["tile"] == 16
    # the network stage (on a GPU: Peng's SFCN at 1mm) with a tiny SFCN: the block records' best tunings used
    from jaxtl import first_block as fb

    monkeypatch.setattr(fb, "TUNING", dict(fb.TUNING))
    monkeypatch.setattr(fb, "TRAIN_TUNING", dict(fb.TRAIN_TUNING))
    mod.network(out, ["eval", "train"], ["float32"], 2, 1, {}, {}, {}, config="tiny", resolution=4, warmup=1)
    assert len(out.read_text().splitlines()) == 2  # the block records' file is left as it was
    step, embed, xla = [json.loads(line) for line in mod.network_output(out).read_text().splitlines()]
    assert mod.network_output(out).name == "fb_network.jsonl"
    assert (embed["case"], embed["conv_impl"], xla["conv_impl"], step["case"]) == ("embed", "pallas", "xla", "train")
    assert embed["first_block_tuning"] | records[0]["best"] == embed["first_block_tuning"]
    assert step["first_block_tuning"]["tile"] == 16 and embed["torch"] and not xla.get("torch")
    # PyTorch's block got the same weights: its output equals the XLA block's
    import jax.numpy as jnp
    import torch

    block = mod.block0(4, jnp.float32)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 4, 1)).astype(np.float32)
    want = np.asarray(block(jnp.asarray(x)))
    layers = mod.torch_block(block, x, jnp.float32).layers
    with torch.no_grad():
        got = layers(torch.tensor(np.moveaxis(x, -1, 1))).numpy()
    np.testing.assert_allclose(np.moveaxis(got, 1, -1), want, rtol=1e-5, atol=1e-5)


def test_roofline_counts_each_activation_once(monkeypatch):
    """benchmarks/roofline.py: per-block FLOPs are bench.layer_flops; bytes are the block's input, conv output and
    pooled output; fusing the pool never loses; the 1mm Peng forward is ~132 GFLOP."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("roofline", REPO / "benchmarks" / "roofline.py")
    rl = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "roofline", rl)  # dataclasses look their module up there
    spec.loader.exec_module(rl)
    blocks = rl.blocks([2, 3], (4, 6, 8), itemsize=2)
    assert [b.flops for b in blocks] == bench.layer_flops([2, 3], (4, 6, 8))
    assert (blocks[0].input, blocks[0].conv, blocks[0].pooled) == (192 * 2, 192 * 2 * 2, 24 * 2 * 2)
    assert (blocks[1].input, blocks[1].conv, blocks[1].pooled) == (24 * 2 * 2, 24 * 3 * 2, 0)
    # memory-bound block 0 at 1 FLOP/s peak vs 1 B/s: conv (384 + 768 B) + pool (768 + 96 B) unfused; fused 384 + 96
    b0 = rl.Block(flops=10, input=384, conv=768, pooled=96)
    assert b0.seconds(1, 1, fused=False) == 384 + 768 + 768 + 96 and b0.seconds(1, 1, fused=True) == 384 + 96
    assert rl.device_for("NVIDIA H100 PCIe") == "H100 PCIe" and rl.device_for("NVIDIA H100 80GB HBM3") == "H100"
    assert rl.device_for("Mystery") is None
    text = rl.table("peng", 1, "bfloat16", 989e12, 4.8e12)
    assert "131.7 GFLOP/volume" in text and text.count("| ") >= 6


def test_cli_runs_embed_and_train_and_fails_loudly(tiny, tmp_path, monkeypatch, capsys):
    """`jaxtl bench` end to end on a tiny config: one record per case through `run_suite`, PyTorch's weights on
    both sides, host-synchronised steps, warm-up timed apart, % of peak per volume; a failing case is reported and
    makes the command exit 1 while the other cases' records are still written."""
    pytest.importorskip("torch")
    out = tmp_path / "r.jsonl"
    argv = ["bench", "--suite", "embed,train", "--configs", "tiny", "--resolution", "4", "--batch", "2",
            "--warmup", "1", "--repeats", "2", "--out", str(out)]
    (tmp_path / "a_file").write_text("")
    assert main([*argv, "--profile", str(tmp_path / "a_file")]) == 2  # refused before any case runs
    assert "a_file: is a file" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--profile", str(tmp_path / "prof")]) == 0
    embed, train = bench.load_records([out])
    for rec in (embed, train):  # a trace per case, and the XLA ops that took the most time
        assert rec["profile_dir"].startswith(str(tmp_path / "prof")) and rec["profile_top"]
        assert all(k["ms_per_step"] >= 0 and not k["name"].startswith("$") for k in rec["profile_top"])
    assert (tmp_path / "prof" / "train-tiny-4mm-float32-b2").is_dir()
    for rec in (embed, train):
        assert rec["warmup_s"] and len(rec["torch"]["warmup_s"]) == 1 and rec["torch"]["vol_per_s"] > 0
        if rec["peak_fraction"] is not None:
            assert rec["peak_fraction"] == pytest.approx(rec["gflop_per_s"] * 1e9 / (rec["peak_gflop_per_s"] * 1e9),
                                                         rel=1e-3)
    assert embed["features_max_rel_diff"] < 1e-4 and train["weights"] == "PyTorch's"
    assert set(embed["other_cpu_cores"]) == {"start", "during", "end"}
    case = bench.Case("train", "tiny", 4, 2, "float32")
    x, ages = bench._inputs(case)
    assert isinstance(bench.jaxtl_train(case, x, ages).step(), float)  # the step waited for its result
    assert isinstance(bench.jaxtl_embed(case.__class__("embed", "tiny", 4, 2, "float32"), x).step(), np.ndarray)

    original = bench.run_case

    def train_fails(case, **kw):
        if case.suite == "train":
            raise RuntimeError("out of memory")
        return original(case, **kw)

    monkeypatch.setattr(bench, "run_case", train_fails)
    assert main(argv + ["--no-torch"]) == 1
    err = capsys.readouterr().err
    assert "1 case(s) FAILED" in err and "train tiny 4mm float32 batch 2: RuntimeError: out of memory" in err
    assert [r["case"] for r in bench.load_records([out])] == ["embed", "train", "embed"]


def test_a_failing_profile_keeps_the_timings(tiny, tmp_path, monkeypatch):
    def no_profiler(*args, **kwargs):
        raise RuntimeError("CUPTI not found")

    monkeypatch.setattr(bench, "profile_steps", no_profiler)
    rec = bench.run_case(bench.Case("embed", "tiny", 4, 1, "float32"), warmup=0, repeats=1, use_torch=False,
                         profile=tmp_path)
    assert rec["vol_per_s"] > 0 and rec["profile_error"] == "RuntimeError: CUPTI not found"


def test_trace_summary_prefers_device_kernels(tmp_path):
    import gzip

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}},
              {"ph": "X", "pid": 1, "tid": 1, "name": "$bench.py:1 step", "dur": 9000},
              {"ph": "X", "pid": 2, "tid": 7, "name": "loop_fusion", "dur": 300},
              {"ph": "X", "pid": 2, "tid": 7, "name": "loop_fusion", "dur": 300},
              {"ph": "X", "pid": 2, "tid": 7, "name": "cudnn_conv", "dur": 1000}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    top = bench.summarize_trace(path, steps=2)
    assert top == [{"where": "/device:GPU:0 / Stream #13", "name": "cudnn_conv", "ms_per_step": 0.5,
                    "calls_per_step": 0.5},
                   {"where": "/device:GPU:0 / Stream #13", "name": "loop_fusion", "ms_per_step": 0.3,
                    "calls_per_step": 1.0}]


def test_trace_summary_of_host_ops_counts_self_time_and_skips_annotations(tmp_path):
    """A CPU trace: a while loop's body ops are not counted twice (the loop keeps its own time only), and a host
    wait annotated from Python (np.asarray of a jax.Array) is not an op."""
    import gzip

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "name": "while.227", "dur": 1000},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 100, "name": "fusion.3", "dur": 600},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 700, "name": "convolution.1", "dur": 200},
              {"ph": "X", "pid": 1, "tid": 1, "ts": 2000, "name": "np.asarray(jax.Array)", "dur": 5000},
              {"ph": "X", "pid": 1, "tid": 2, "ts": 100, "name": "fusion.3", "dur": 50}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    top = {r["name"]: r["ms_per_step"] for r in bench.summarize_trace(path)}
    assert top == {"fusion.3": 0.65, "convolution.1": 0.2, "while.227": 0.2}
    # kernels of one GPU stream that overlap by a rounding error are not nested (the H200 trace of 2026-11-27 had
    # charged the fused first block 497 of its 664 us, the next kernel's 166 us taken off)
    events = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 2, "tid": 7, "ts": 0.0, "name": "sfcn_first_block", "dur": 663.5},
              {"ph": "X", "pid": 2, "tid": 7, "ts": 663.3, "name": "input_transpose_fusion", "dur": 166.2}]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    top = {r["name"]: r["ms_per_step"] for r in bench.summarize_trace(path)}
    assert top == {"sfcn_first_block": 0.663, "input_transpose_fusion": 0.166}  # not 0.497


@pytest.mark.parametrize("args, message", [(["--batch", "0"], "--batch: 0 is below 1"),
                                           (["--repeats", "0"], "--repeats: 0 is below 1"),
                                           (["--batch", "x"], "--batch: 'x' is not an integer")])
def test_cli_rejects_bad_numbers(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_names_a_bad_resolution_and_batch(capsys):
    assert main(["bench", "--resolution", "abc"]) == 2
    assert "--resolution 'abc': give 1, 2 or 4" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch 3: give a positive multiple of the 2 device"):
        bench.plan_cases(["embed"], ["peng"], [2], ["float32"], batch=3, devices=2)


def test_cli_says_how_to_render_what_it_wrote(tmp_path, monkeypatch, capsys):
    """Records written elsewhere than benchmarks/results/ are not in the default report: the hint names them."""
    monkeypatch.setattr(bench, "run_suite", lambda cases, out, **kw: [{}])
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--configs", "demo", "--no-torch", "--out", "runs/a.jsonl"]) == 0
    hint = "(`jaxtl bench report --results runs/a.jsonl --report-out runs/a.md` renders them)"
    assert hint in capsys.readouterr().out
    assert main(["bench", "--configs", "demo", "--no-torch", "--out", "benchmarks/results/a.jsonl"]) == 0
    assert "(`jaxtl bench report` renders them)" in capsys.readouterr().out


def test_report_of_input_records_only_and_of_foreign_records(tmp_path, capsys):
    rec = _fake_record("cpu-test-2core") | {"case": "input", "config": "memcpy", "torch": None, "ratio": None}
    bench.append_records([rec], tmp_path / "in" / "a.jsonl")
    md, png = bench.write_report([tmp_path / "in"], tmp_path / "report.md")
    assert png is None and "memcpy" in md.read_text() and "abc123" in md.read_text()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    assert main(["bench", "report", "--results", str(tmp_path / "foreign")]) == 2
    assert "x.jsonl:1: not a `jaxtl bench` record (no hardware, case, config)" in capsys.readouterr().err
    assert main(["bench", "report", "--results", str(tmp_path / "nope")]) == 2  # e.g. outside a checkout
    assert "nope: no such file or directory" in capsys.readouterr().err


def test_other_processes_cpu_marks_records_busy_and_the_report_prefers_quiet_ones(tmp_path):
    import subprocess

    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 3\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        assert bench.other_cpu(0.5) > 0.5  # about one core: the spinning child
    finally:
        spin.kill()
        spin.wait()
    quiet = _fake_record("cpu-test-2core", vol=10.0, when="2026-01-01T00:00:00+00:00") | {
        "other_cpu_cores": {"start": 0.0, "end": 0.1}}
    busy = _fake_record("cpu-test-2core", vol=99.0, when="2026-02-01T00:00:00+00:00") | {
        "other_cpu_cores": {"start": 1.2, "end": 0.0}}
    old_loaded = _fake_record("cpu-test-2core", case="train") | {"load_avg": {"end": [9.0, 9.0, 9.0]}}
    assert not bench.is_busy(quiet) and bench.is_busy(busy) and bench.is_busy(old_loaded)
    # a GPU machine's host only feeds the device: half a core of other CPU (e.g. the driver's copies) is quiet there
    gpu = _fake_record("gpu-fake-x1") | {"other_cpu_cores": {"start": 0.0, "during": 0.5, "end": 0.0}}
    assert not bench.is_busy(gpu) and bench.is_busy(gpu | {"other_cpu_cores": {"during": 1.2}})
    assert bench.is_busy(quiet | {"other_cpu_cores": {"during": 0.5}})
    assert [r["vol_per_s"] for r in bench.latest([quiet, busy])] == [10.0]  # the newer one was busy
    assert [r["vol_per_s"] for r in bench.latest([busy])] == [99.0]  # nothing quiet: the busy one, marked
    assert "(busy)" in bench.report_markdown([busy, old_loaded]) and "(busy)" not in bench.report_markdown([quiet])
    assert "| 99 | 5 | 19.80 (busy) |" in bench.report_markdown([busy])  # on the ratio, which load distorts most
    # rows without a PyTorch ratio (jaxtl only, the input suite) are marked too, on jaxtl's figure
    lone = busy | {"torch": None, "ratio": None}
    assert "| 99 (busy) | — | — |" in bench.report_markdown([lone])
    # a later jaxtl-only record (a sweep script's) does not hide the comparison of the same case
    assert bench.latest([quiet, quiet | {"time": "2026-03-01T00:00:00+00:00", "torch": None, "ratio": None,
                                         "vol_per_s": 11.0}]) == [quiet]
    no_torch = {"torch": None}
    assert "BUSY" in bench.summary_line(busy | no_torch) and "BUSY" not in bench.summary_line(quiet | no_torch)
    assert "cores; the timings and the ratio are not reliable]" in bench.summary_line(busy | no_torch)
    assert "cores; the timings are not reliable]" in bench.summary_line(lone)  # no ratio to speak of


def test_the_report_keeps_records_of_other_xla_options_apart():
    """A record compiled with other XLA options ($XLA_FLAGS or jaxtl's `compiler_options`) is another row, named;
    the flag set by hand and jaxtl's default setting of it are the same configuration."""
    plain = _fake_record("gpu-fake-x1", vol=10.0) | {"conv_impl": "pallas", "versions": {"xla_flags": None}}
    by_hand = _fake_record("gpu-fake-x1", vol=20.0, when="2026-01-02T00:00:00+00:00") | {
        "conv_impl": "pallas", "versions": {"xla_flags": "--xla_gpu_force_conv_nhwc=true"}}
    default = _fake_record("gpu-fake-x1", vol=21.0, when="2026-01-03T00:00:00+00:00") | {
        "conv_impl": "pallas", "versions": {}, "compiler_options": {"xla_gpu_force_conv_nhwc": True}}
    assert bench.xla_options(plain) == "" and bench.xla_options(by_hand) == bench.xla_options(default) \
        == "xla_gpu_force_conv_nhwc"
    assert bench.xla_options({"versions": {"xla_flags": "--xla_a=false --xla_b=true"}}) == "xla_a=false xla_b"
    assert bench.xla_options({"versions": {"xla_flags": "--xla_b=True --xla_d"}}) == "xla_b xla_d"
    assert bench.xla_options({"versions": {"xla_flags": "--xla_gpu_autotune_level=0"}}) == "xla_gpu_autotune_level=0"
    assert bench.xla_options({"versions": {"xla_flags": "--xla_gpu_force_conv_nhwc=1"}}) == "xla_gpu_force_conv_nhwc"
    # set to XLA's default (the baseline of a Hopper run, where jaxtl sets it): the same row as no setting
    assert bench.xla_options({"versions": {"xla_flags": "--xla_gpu_force_conv_nhwc=False"}}) == ""
    assert [r["vol_per_s"] for r in bench.latest([plain, by_hand, default])] == [10.0, 21.0]
    table = bench.report_markdown([plain, by_hand, default])
    assert "| embed (pallas) | peng |" in table and "| embed (pallas; xla_gpu_force_conv_nhwc) | peng |" in table
    labels, _, _ = bench.chart_rows([plain, default])
    assert labels[1].endswith("b4 (pallas; xla_gpu_force_conv_nhwc) @abc123"), labels  # and the commit


def test_git_commit_is_dirty_for_code_changes_not_for_the_records(tmp_path, monkeypatch):
    """A record's `dirty` says whether the code differs from the commit; appending records to a tracked results
    file (the previous run of the same invocation) does not count."""
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "cpu.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(bench, "REPO", tmp_path)
    monkeypatch.delenv("JAXTL_GIT_COMMIT", raising=False)
    assert bench.git_commit()["dirty"] is False
    (tmp_path / "benchmarks" / "results" / "cpu.jsonl").write_text("{}\n{}\n")
    assert bench.git_commit()["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert bench.git_commit()["dirty"] is True
    # a copy of a newer tree over an older .git: the commit sent wins, what git found is kept beside it
    head = bench.git_commit()["commit"]
    for sent in (head, head[:7]):  # HEAD itself, or its short form
        monkeypatch.setenv("JAXTL_GIT_COMMIT", sent)
        assert bench.git_commit() == {"commit": head, "dirty": True}
    monkeypatch.setenv("JAXTL_GIT_COMMIT", "f" * 40)
    assert bench.git_commit() == {"commit": "f" * 40, "dirty": None, "source": "JAXTL_GIT_COMMIT",
                                  "checkout": {"commit": head, "dirty": True}}
    # jaxtl installed into a folder inside another repository (a venv's site-packages): not jaxtl's commit
    monkeypatch.setattr(bench, "REPO", tmp_path / "benchmarks")
    monkeypatch.delenv("JAXTL_GIT_COMMIT")
    assert bench.git_commit() == {"commit": None, "dirty": None}


def test_the_report_keeps_a_hand_set_tile_size_apart():
    """A run with $JAXTL_TILE_MB (a tile-size sweep) is its own row, named; it does not replace the default's."""
    default = _fake_record("cpu-test-2core", vol=10.0) | {"versions": {"env": {}}}
    swept = _fake_record("cpu-test-2core", vol=9.0, when="2026-01-02T00:00:00+00:00") | {
        "versions": {"env": {"JAXTL_TILE_MB": "4"}}}
    assert sorted(r["vol_per_s"] for r in bench.latest([default, swept])) == [9.0, 10.0]
    assert "| embed (JAXTL_TILE_MB=4) | peng |" in bench.report_markdown([default, swept])
