"""Pretraining: configs, input pipeline, learning, sharding, resume (failures and several processes:
test_train_recovery.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, run_python
from flax import nnx
from pretrain_runs import TINY, final_state, model_meta, steps_logged, tiny_config

from jaxtl.cache import CacheSource, HostBlock
from jaxtl.config import DataConfig, ModelConfig, TrainConfig, load_config, override
from jaxtl.model import SFCN
from jaxtl.train import Trainer, pretrain, split_participants, train_dataset

# ---- configs --------------------------------------------------------------------------------------------


def test_config_overrides():
    cfg = tiny_config("optim.lr=0.005", "model.dtype=bfloat16", "data.mirror=False")
    assert cfg.optim.lr == 0.005 and cfg.model.dtype == "bfloat16" and cfg.data.mirror is False
    assert cfg.model.channels == (4, 8, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="OptimConfig has no field 'lrate'"):
        override(cfg, "optim.lrate=1")
    with pytest.raises(ValueError, match="expected a float"):
        override(cfg, "optim.lr=fast")
    with pytest.raises(ValueError, match="expected section.field=value"):
        override(cfg, "epochs")


@pytest.mark.parametrize("name", ["sfcn_age_ukb.py", "sfcn_sex_ukb.py", "sfcn_demo.py"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, TrainConfig)
    if name == "sfcn_age_ukb.py":  # Peng's recipe
        assert cfg.model.channels == (32, 64, 128, 256, 256, 64) and cfg.bin_range == (42, 82)
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.01, 0.9, 1e-3)
        assert (cfg.optim.step_epochs, cfg.optim.gamma, cfg.batch_size, cfg.epochs) == (30, 0.3, 8, 130)
        assert (cfg.data.shift, cfg.data.mirror, cfg.data.downsample) == (2, True, 1)


def test_a_1mm_recipe_refuses_a_coarser_cache(ixi_tiny, tmp_path):
    """Peng's UK Biobank recipes are for 1mm: on a 4mm cache they would train silently on 40x48x40 volumes. The
    field changes nothing computed: a run saved before it existed (None) resumes under a config that sets it."""
    cfg = load_config(REPO / "configs" / "sfcn_age_ukb.py")
    with pytest.raises(ValueError, match=r"prepared with --downsample 4, and this recipe is for --downsample 1 .*"
                                         r"--set data.downsample=4"):
        pretrain(cfg, ixi_tiny[1], tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    from jaxtl.train import RESUMABLE_FIELDS

    assert "data.downsample" in RESUMABLE_FIELDS


def test_split_keeps_each_participant_in_one_split():
    pids = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "e", "f", "g", "h", "h", "i", "j", "j"])
    for seed in range(20):
        parts = split_participants(pids, 0.2, 0.2, seed)
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(pids)))
        people = [set(pids[idx]) for idx in parts]
        assert not (people[0] & people[1] or people[0] & people[2] or people[1] & people[2])
        assert [len(p) for p in people] == [6, 2, 2]  # fractions of the 10 participants
    # one scan per participant: the scan-level split of earlier versions, unchanged
    n, seed = 32, 3
    perm = np.random.default_rng(seed).permutation(n)
    old = np.sort(perm[8:]), np.sort(perm[:4]), np.sort(perm[4:8])
    new = split_participants(np.array([f"sub-{i:02d}" for i in range(n)]), 0.125, 0.125, seed)
    for a, b in zip(old, new, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pretrain_splits_repeat_visits_by_participant(ukb_cache, tmp_path):
    """A cohort with two sessions per participant: split.json never puts one participant in two splits;
    data.split_seed moves the split and nothing else."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(ukb_cache, cache)
    index = json.loads((cache / "index.json").read_text())
    for i, scan in enumerate(index["scans"]):
        scan["participant_id"], scan["session"] = f"p{i // 2}", f"ses-{i % 2}"
    (cache / "index.json").write_text(json.dumps(index))
    owner = {scan["id"]: scan["participant_id"] for scan in index["scans"]}
    pretrain(tiny_config("data.split_seed=7"), cache, tmp_path / "run", progress=False, max_steps=1)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["by"] == "participant_id" and split["seed"] == 7
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(owner)
    people = {k: {owner[i] for i in split[k]} for k in ("train", "val", "test")}
    assert people == {k: set(v) for k, v in split["participants"].items()}
    assert not (people["train"] & people["val"] or people["train"] & people["test"] or people["val"] & people["test"])
    # the split seed, not the initialisation seed (0), drew this split
    by_seed = {seed: split_participants([owner[s["id"]] for s in index["scans"]], 0.125, 0.125, seed)[2]
               for seed in (0, 7)}
    ids = np.array([s["id"] for s in index["scans"]])
    assert split["test"] == ids[by_seed[7]].tolist() != ids[by_seed[0]].tolist()


# ---- input pipeline -------------------------------------------------------------------------------------


def test_pipeline_batches_and_host_blocks(ukb_cache):
    source = CacheSource(ukb_cache)
    cfg = tiny_config()
    it = iter(train_dataset(source, np.arange(24), cfg))
    b = next(it)
    # float16 from a float16 cache (half the bytes to the device), cast there exactly: the same step as float32
    assert b["image"].shape == (4, 40, 48, 40) and b["image"].dtype == np.float16 and b["age"].shape == (4,)
    losses = []
    for images in (b["image"], b["image"].astype(np.float32)):
        trainer = Trainer.create(cfg, 6)
        losses.append(float(trainer.step(trainer.global_batch(images), trainer.global_batch(b["age"]), 0)[0]))
    assert losses[0] == losses[1]
    again = next(iter(train_dataset(source, np.arange(24), cfg)))
    np.testing.assert_array_equal(b["image"], again["image"])  # seeded: same batches every run
    # steps_per_epoch = 26 // 4 = 6 batches make one epoch: 24 distinct scans each, reshuffled
    it = iter(train_dataset(source, np.arange(26), cfg))
    epochs = [np.concatenate([next(it)["id"] for _ in range(6)]) for _ in range(2)]
    assert [len(set(e)) for e in epochs] == [24, 24] and epochs[0].tolist() != epochs[1].tolist()
    # Two hosts' contiguous blocks put together are exactly the one-host global batch.
    import grain

    ds = grain.MapDataset.range(100)
    blocks = [list(HostBlock(ds, 8, 2, h)[:8]) for h in (0, 1)]
    assert blocks[0][:4] + blocks[1][:4] == list(range(8)) and blocks[0][4:] + blocks[1][4:] == list(range(8, 16))


def test_sgd_matches_pytorch_coupled_weight_decay():
    """jaxtl's SGD (hyper-parameters as state, lr fed per step) == torch.optim.SGD(lr, momentum,
    weight_decay) + StepLR for a few steps, through the lr step decay."""
    import jax.numpy as jnp
    import torch

    from jaxtl.config import OptimConfig
    from jaxtl.train import make_optimizer, make_schedule_fn

    cfg = OptimConfig(lr=0.1, momentum=0.9, weight_decay=0.01, step_epochs=2, gamma=0.5)
    p = np.array([1.0, -2.0, 3.0], np.float32)
    grads = [np.array([0.5, 0.1, -0.3], np.float32) * (i + 1) for i in range(5)]
    tp = torch.tensor(p.copy(), requires_grad=True)
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    class Weights(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.asarray(p))

    model = Weights()
    optimizer = make_optimizer(model, cfg)
    schedule = make_schedule_fn(cfg, steps_per_epoch=1)
    for i, g in enumerate(grads):
        tp.grad = torch.tensor(g)
        opt.step()
        sched.step()
        optimizer.opt_state.hyperparams["learning_rate"][...] = schedule(i)
        optimizer.update(model, nnx.State({"w": nnx.Param(jnp.asarray(g))}))
    np.testing.assert_allclose(np.asarray(model.w[...]), tp.detach().numpy(), rtol=1e-6)


def test_trainers_of_one_shape_share_compiled_steps():
    """Runs differing only in learning rate, schedule, momentum or decay reuse one compiled train step."""
    from jaxtl.train import _jitted_steps_for

    a = Trainer.create(tiny_config("optim.lr=0.05"), steps_per_epoch=10)
    b = Trainer.create(tiny_config("optim.lr=0.001", "optim.momentum=0.8", "optim.weight_decay=0.0"), 3)
    assert a.train_fn is b.train_fn and a.eval_fn is b.eval_fn
    assert float(b.state[1].opt_state.hyperparams["momentum"][...]) == pytest.approx(0.8)
    assert _jitted_steps_for.cache_info().currsize >= 1


def test_trainer_copies_the_model_it_is_given():
    """Trainer.create(model=m) trains a copy: the caller's model keeps its eval mode and weights."""
    m = SFCN((4, 4, 4), 40, rngs=nnx.Rngs(0))
    m.eval()
    before = jax.tree.map(np.asarray, nnx.state(m))
    trainer = Trainer.create(tiny_config("model.channels=(4,4,4)"), 10, model=m)
    x = np.random.default_rng(0).standard_normal((8, 16, 16, 16)).astype(np.float32)
    trainer.step(trainer.global_batch(x), trainer.global_batch(np.full(8, 60.0, np.float32)), 0)
    assert m.blocks[0].bn.use_running_average and m.dropout.deterministic
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(m)))
    m(x)  # still callable without dropout keys


def test_trainer_steps_follow_what_auto_means(monkeypatch):
    """A trainer created after $JAXTL_CONV_IMPL changed gets steps traced anew, not the ones compiled for the
    other convolution (the steps read it when traced)."""
    monkeypatch.setenv("JAXTL_CONV_IMPL", "fast")
    fast = Trainer.create(tiny_config(), steps_per_epoch=10)
    monkeypatch.setenv("JAXTL_CONV_IMPL", "xla")
    xla = Trainer.create(tiny_config(), steps_per_epoch=10)
    assert xla.train_fn is not fast.train_fn and xla.eval_fn is not fast.eval_fn
    monkeypatch.setenv("JAXTL_CONV_IMPL", "fast")
    assert Trainer.create(tiny_config(), steps_per_epoch=10).train_fn is fast.train_fn


# ---- training -------------------------------------------------------------------------------------------


def test_mesh_is_process_major():
    """Each process's devices form one contiguous block of the data axis (HostBlock's block of the batch),
    whatever order the devices come in (TPU topologies interleave hosts)."""
    from types import SimpleNamespace

    from jaxtl.train import make_mesh, process_major

    devs = [SimpleNamespace(process_index=p, id=i) for i, p in [(5, 1), (0, 0), (4, 1), (2, 0), (7, 1), (1, 0)]]
    assert [(d.process_index, d.id) for d in process_major(devs)] == [(0, 0), (0, 1), (0, 2), (1, 4), (1, 5), (1, 7)]
    mesh = make_mesh(jax.devices()[::-1])
    assert mesh.axis_names == ("data",) and list(mesh.devices) == sorted(jax.devices(), key=lambda d: d.id)


def test_mesh_follows_the_default_device(monkeypatch):
    """`with jax.default_device("cpu")` on a GPU machine: the train mesh holds the host's devices, not the GPUs."""
    from types import SimpleNamespace

    from jaxtl.train import make_mesh

    real = jax.devices
    fake_gpus = [SimpleNamespace(platform="gpu", process_index=0, id=i) for i in range(2)]
    monkeypatch.setattr(jax, "devices", lambda backend=None: real("cpu") if backend == "cpu" else fake_gpus)
    with jax.default_device("cpu"):
        assert [d.platform for d in make_mesh().devices.flat] == ["cpu"] * len(real("cpu"))


def test_few_steps_lower_the_loss(ukb_cache):
    source = CacheSource(ukb_cache)
    cfg = tiny_config("model.dropout=0.0", "optim.lr=0.05")
    trainer = Trainer.create(cfg, steps_per_epoch=10)
    idx = np.arange(8)
    x = np.stack([source[i]["image"] for i in idx]).astype(np.float32)
    y = source.ages[idx]
    losses = [float(trainer.step(trainer.global_batch(x), trainer.global_batch(y), s)[0]) for s in range(10)]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


def test_step_flags_non_finite_batchnorm_statistics():
    """A batch of huge values (e.g. an unnormalised scan) overflows BatchNorm's running variance while the loss and
    the parameters stay finite: the step reports it, so the run stops before checkpointing a broken model."""
    trainer = Trainer.create(tiny_config("model.dropout=0.0"), steps_per_epoch=10)
    x = np.random.default_rng(0).normal(size=(4, 40, 48, 40)).astype(np.float32)
    y = trainer.global_batch(np.full(4, 60.0, np.float32))
    loss, finite = trainer.step(trainer.global_batch(x * 1e18), y, 0)
    assert np.isfinite(float(loss)) and not bool(finite)


@pytest.mark.parametrize("task", ["age", "sex"])
def test_evaluate_equals_numpy_and_ignores_the_padding(ukb_cache, task):
    """Validation through the grain pipeline (10 scans: batches of 4, 4 and 2 + 2 masked padding) equals val
    MAE / accuracy computed in numpy from the model's predictions on all scans at once."""
    source = CacheSource(ukb_cache)
    trainer = Trainer.create(tiny_config(f"task={task}"), steps_per_epoch=10)
    idx = np.array([3, 17, 5, 30, 11, 8, 21, 0, 26, 14])
    x = np.stack([source[i]["image"] for i in idx]).astype(np.float32)
    y = (source.ages if task == "age" else source.sexes)[idx]
    pred = np.asarray(trainer.task.decode(trainer.model()(x)), np.float64)
    got = trainer.evaluate(source, idx, task)
    if task == "age":
        assert got == pytest.approx(np.mean(np.abs(pred - y)), rel=1e-5)
    else:
        assert got == np.mean((pred > 0.5) == (y == 1))
    assert trainer.evaluate(source, idx[:0], task) == 0.0


def test_sharded_step_equals_single_device():
    # 3 blocks on 12^3 volumes: what is checked is the sharding, which depends on neither (XLA's convolutions, the
    # several-device CPU default, compile slowly: 6 blocks on the caches' 40x48x40 volumes took ~25 s more)
    code = f"""
import jax, numpy as np
from flax import nnx
from jaxtl.config import load_config
from jaxtl.train import Trainer, make_mesh
assert jax.device_count() == 4
cfg = load_config("configs/sfcn_demo.py", {TINY!r} + ["batch_size=8", "model.channels=(4,8,8)"])
rng = np.random.default_rng(0)
x = (rng.standard_normal((8, 12, 12, 12)) + 1).astype(np.float32)
y = np.linspace(cfg.bin_range[0] + 5, cfg.bin_range[1] - 5, 8).astype(np.float32)
out = []
for devices in (jax.devices(), jax.devices()[:1]):
    mesh = make_mesh(devices)
    tr = Trainer.create(cfg, 10, mesh=mesh)
    params = lambda: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(tr.model(), nnx.Param)))
    start = params()
    losses = [float(tr.step(tr.global_batch(x), tr.global_batch(y), s)[0]) for s in range(3)]
    out.append((losses, jax.tree.map(np.subtract, params(), start)))
np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
# What 3 steps changed, equal up to float reduction order (on an Intel Xeon VM a conv kernel's update differs by
# 0.26% of its norm; a mistake in the sharding, e.g. gradients or BatchNorm statistics not reduced over the
# devices, changes the updates by a large part of their size)
def close(a, b):
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-6, (np.linalg.norm(a - b), np.linalg.norm(b))
jax.tree.map(close, out[0][1], out[1][1])
# the head alone trained (fine-tuning's first phase, TL ft_step): frozen layers stay as they were on 4 devices too
head = nnx.All(nnx.Param, nnx.PathContains("head"))
frozen = []
for devices in (jax.devices(), jax.devices()[:1]):
    tr = Trainer.create(cfg, 10, mesh=make_mesh(devices), trainable=head)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(tr.model(), nnx.Param)))
    losses = [float(tr.step(tr.global_batch(x), tr.global_batch(y), s)[0]) for s in range(2)]
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(tr.model(), nnx.Param)))
    pairs = zip(jax.tree.leaves(before["blocks"]), jax.tree.leaves(after["blocks"]))
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert not np.array_equal(before["head"]["kernel"], after["head"]["kernel"])
    frozen.append(losses)
np.testing.assert_allclose(frozen[0], frozen[1], rtol=1e-5)
print("OK", out[0][0])
"""
    assert "OK" in run_python(code, devices=4).stdout


def test_pretrain_end_to_end_and_resume_is_noop(ukb_cache, tmp_path, capsys):
    cfg = tiny_config()
    run = tmp_path / "run"
    out = pretrain(cfg, ukb_cache, run, progress=False)
    from jaxtl.weights import load_model

    model = load_model(out)
    assert model.task.name == "age" and model.input_shape == (40, 48, 40) and model.channels == (4, 8, 8, 8, 8, 8)
    assert model.preprocessing["downsample"] == 4
    assert (run / "best" / "model.json").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_mae" in r for r in records)
    # the final record: the last-epoch model and best/ (what experiments use) on the test split
    final = records[-1]["final"]
    assert {"test_mae", "test_mae_best", "test_baseline_mae"} <= set(final) and final["complete"] is True
    assert final["best_epoch"] == max(r["epoch"] for r in records if r.get("best")) == model_meta(run / "best")["epoch"]
    assert model_meta(out)["complete"] is True and model_meta(out)["test_mae_best"] == final["test_mae_best"]
    # throughput of train steps only: step 1 (compilation) is not timed
    logged = [r for r in records if "loss" in r]
    assert "volumes_per_s" not in logged[0] and all(r["volumes_per_s"] > 0 for r in logged[1:])
    # the same command again, with other logging/checkpointing settings: nothing is retrained
    n_lines = len(records)
    pretrain(tiny_config("log_every_steps=5", "checkpoint_every_steps=3"), ukb_cache, run, progress=True)
    err = capsys.readouterr().err
    assert "24 training scans (val 4, test 4)" in err  # the split sizes, in the first line
    # said with nothing changed too (only a changed learning rate schedule had been)
    assert f"jaxtl pretrain: resuming at step 12 (epoch 2) from {run / 'checkpoints'}\n" in err
    last_line = err.split("pretrain")[-1]  # the final progress line: both models' test MAE
    assert "test_mae=" in last_line and "test_mae_best=" in last_line, last_line
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(again) == n_lines and sum("final" in r for r in again) == 1  # the earlier final was replaced
    with pytest.raises(ValueError, match=r"different config \(optim.momentum: 0.9 in the run, 0.5 now\)"):
        pretrain(tiny_config("optim.momentum=0.5"), ukb_cache, run, progress=False)
    # nor the volumes: the same scans prepared otherwise (here: marked as another downsample) are refused
    import shutil

    other = tmp_path / "other_cache"
    shutil.copytree(ukb_cache, other)
    index = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps(index | {"downsample": 2}))
    with pytest.raises(ValueError, match=r"trained on volumes of .*; --cohort .* holds others \(downsample: 4 in the "
                                         r"run, 2 now\): resume with that cache"):
        pretrain(tiny_config(), other, run, progress=False)
    # the run's saved config.json is a config file too (what the refusal above says to use)
    from jaxtl.config import to_dict

    assert to_dict(load_config(run / "config.json")) == json.loads((run / "config.json").read_text())
    assert load_config(run / "config.json", ["optim.momentum=0.5"]).optim.momentum == 0.5
    # a run from before a config field existed (here data.split_seed) resumes: the field takes its default
    saved = json.loads((run / "config.json").read_text())
    del saved["data"]["split_seed"]
    (run / "config.json").write_text(json.dumps(saved))
    # more epochs continue the run (the lr schedule depends on the step alone); fewer than done are refused
    pretrain(tiny_config("epochs=3"), ukb_cache, run, progress=False)
    assert [r["step"] for r in steps_logged(run)] == list(range(1, 19))
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    with pytest.raises(ValueError, match=r"trained 18 steps \(3 epochs\), more than epochs=2.*--set epochs=3"):
        pretrain(cfg, ukb_cache, run, progress=False)
    # the checkpoint records the process count (a resume with another count positions a fresh data iterator:
    # test_train_recovery.py::test_two_processes_match_one_process)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(run / "checkpoints") as mngr:
        meta = mngr.restore(18, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert meta["step"] == 18 and meta["process_count"] == 1


def test_resume_drops_records_after_the_checkpoint_and_may_change_workers(ukb_cache, tmp_path):
    """Steps logged after the last checkpoint (then killed) are retrained and logged once; a resume with
    other data.workers / logging / checkpointing settings gives the parameters of an uninterrupted run."""
    clean = tmp_path / "clean"
    pretrain(tiny_config("epochs=1"), ukb_cache, clean, progress=False)
    work = tmp_path / "work"
    out = pretrain(tiny_config("epochs=1"), ukb_cache, work, progress=False, max_steps=3)  # checkpoint at step 3
    assert model_meta(out)["complete"] is False  # a --max-steps export is not a finished run
    with pytest.warns(UserWarning, match=r"at step 3 already, max_steps=2 counts the run's steps in all .* nothing"):
        pretrain(tiny_config("epochs=1"), ukb_cache, work, progress=False, max_steps=2)
    with (work / "metrics.jsonl").open("a") as f:  # steps 4-5 logged, then a kill before their checkpoint
        f.write('{"step": 4, "epoch": 0.67, "loss": 9.0, "lr": 0.01, "volumes_per_s": 1.0}\n{"step": 5, "ep')
    pretrain(tiny_config("epochs=1", "data.workers=1", "log_every_steps=2", "checkpoint_every_steps=5"), ukb_cache,
             work, progress=False)
    logged = steps_logged(work)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 6] and logged[3]["loss"] != 9.0
    assert [r["loss"] for r in logged[:3]] == [r["loss"] for r in steps_logged(clean)[:3]]
    jax.tree.map(np.testing.assert_array_equal, final_state(clean), final_state(work))


def test_a_workdir_that_is_something_else_is_refused(ukb_cache, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    for workdir, said in ((tmp_path / "afile", "is a file"), (ukb_cache, r"is a prepared cache \(index.json\)")):
        with pytest.raises(ValueError, match=f"--workdir .* {said}; give the run a directory of its own"):
            pretrain(tiny_config(), ukb_cache, workdir, progress=False)
    assert not (ukb_cache / "config.json").exists()  # nothing written into the cache
    readonly = tmp_path / "ro"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != readonly)  # a read-only mount (root or not)
    with pytest.raises(PermissionError, match=r"--workdir .*ro/run: .*ro is not writable"):
        pretrain(tiny_config(), ukb_cache, readonly / "run", progress=False)
    assert not (readonly / "run").exists()


def test_a_run_stopped_before_its_first_checkpoint_starts_anew(ukb_cache, tmp_path):
    """Out of memory at step 1, say: the rerun with a smaller batch is a new run, not a refused config change;
    the split it computes replaces the dead run's, and a fraction that rounds to nobody is warned about."""
    pretrain(tiny_config("epochs=1"), ukb_cache, tmp_path, progress=False, max_steps=1)
    for name in ("checkpoints", "model", "best"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)
    (tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp-0").mkdir(parents=True)  # an unfinished save
    (tmp_path / "volumes.json").write_text(json.dumps({"cache": "gone", "shape": [1, 1, 1]}))
    with pytest.warns(UserWarning, match=r"data.val_fraction=0.01 rounds to no participant .*: no validation"):
        pretrain(tiny_config("epochs=1", "batch_size=4", "data.val_fraction=0.01"), ukb_cache, tmp_path,
                 progress=False, max_steps=1)
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 4
    assert json.loads((tmp_path / "split.json").read_text())["val"] == []
    assert json.loads((tmp_path / "volumes.json").read_text())["shape"] == [40, 48, 40]


def test_a_run_stopped_by_max_steps_logs_its_last_step(ukb_cache, tmp_path):
    pretrain(tiny_config("epochs=1", "log_every_steps=4"), ukb_cache, tmp_path, progress=False, max_steps=3)
    assert [r["step"] for r in steps_logged(tmp_path)] == [3]  # 3 is neither a multiple of 4 nor an epoch's end


def test_throughput_clock_times_train_steps_only():
    import jax.numpy as jnp

    from jaxtl.train import _TrainClock

    clock = _TrainClock(batch_size=100)
    clock.step_done(1, jnp.zeros(()))  # the first step of a process compiles: not timed
    assert clock.rate(1) is None
    with clock.paused():  # validation, export, checkpointing
        time.sleep(1.0)
    for step in (2, 3):
        clock.step_done(step, jnp.zeros(()))
    assert clock.rate(3) > 2 * 100 / 0.5  # the paused second is not counted
    clock = _TrainClock(batch_size=100)
    with clock.paused():  # before the first step (a resume validating an interrupted epoch first)
        time.sleep(0.3)
    clock.step_done(1, jnp.zeros(()))
    time.sleep(0.05)
    clock.step_done(2, jnp.zeros(()))
    assert 0 < clock.rate(2) <= 100 / 0.05


def test_train_steps_queued_on_the_device_are_bounded(ukb_cache, tmp_path, monkeypatch):
    """Async dispatch: before step N + TRAIN_IN_FLIGHT + 1 is dispatched, step N has finished (its batch freed),
    also between log points (here a log only at the epoch's end)."""
    from jaxtl import train

    dispatched, waited = [], set()
    real_step, real_wait = train.Trainer.step, jax.block_until_ready

    def step(self, *args):
        n = len(dispatched)
        if n > train.TRAIN_IN_FLIGHT:
            assert id(dispatched[n - train.TRAIN_IN_FLIGHT - 1]) in waited, f"step {n + 1} dispatched too early"
        out = real_step(self, *args)
        dispatched.append(out[0])
        return out

    def wait(x):
        waited.update(id(leaf) for leaf in jax.tree.leaves(x))
        return real_wait(x)

    monkeypatch.setattr(train.Trainer, "step", step)
    monkeypatch.setattr(jax, "block_until_ready", wait)
    pretrain(tiny_config("log_every_steps=100", "epochs=1"), ukb_cache, tmp_path / "run", progress=False)
    assert len(dispatched) > train.TRAIN_IN_FLIGHT + 2


def test_bad_config_values_are_refused_before_the_workdir_is_written(ukb_cache, tmp_path):
    """A typo (model.dtype=bf16) fails at once, naming the field, and leaves no config.json behind, so the
    corrected command starts the run instead of being refused as a changed config."""
    for bad, match in (("model.dtype=bf16", r"model.dtype='bf16': use float32 or bfloat16"),
                       ("task=sex2", r"task='sex2': use age or sex"),
                       ("data.val_fraction=0.9", "leave a training split"), ("epochs=0", "positive integer"),
                       # these had failed only later, with the workdir written (the corrected rerun then refused)
                       ("bin_range=(42.0,82.5)", r"bin_range=\(42.0, 82.5\): .*whole number"),
                       ("model.channels=(4,)", "at least 2 positive channel counts"),
                       ("model.channels=(4,4,4,4,4,4,4)", r"too small for 7 blocks .* at least 64 voxels"),
                       ("data.shift=-1", r"data.shift=-1: .*>= 0"),
                       ("data.test_fraction=-0.5", r"^data.test_fraction=-0.5: give a fraction >= 0"),
                       ("optim.gamma=0.0", "optim.gamma=0.0: give the learning rate's positive step factor"),
                       # numpy's error named no field; -1 checkpointed at every step (step % -1 == 0)
                       ("seed=-1", r"^seed=-1: give an integer >= 0"),
                       ("checkpoint_every_steps=-1", r"^checkpoint_every_steps=-1: give an integer >= 0"),
                       ("data.workers=-1", r"^data.workers=-1: give an integer >= 0"),
                       # had failed at the first batch, naming a random draw
                       ("data.shift=40", r"^data.shift=40: the random shift must be smaller than the volumes' "
                                         r"smallest side \(40 voxels of \(40, 48, 40\)\)"),
                       # 4mm: the last block is 1x1x1, and one scan's BatchNorm statistics pass no gradient
                       ("batch_size=1", r"a training batch of 1 at input 40x48x40 leaves the last block's BatchNorm "
                                        r"1 value per channel .* at least 2")):
        with pytest.raises(ValueError, match=match):
            pretrain(tiny_config(bad), ukb_cache, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists(), bad


def test_sex_baseline_is_the_test_splits_majority_share():
    """The bar a sex model must clear: the best constant prediction on the test split (0.6 here), not the training
    split's majority class scored on the test split (0.4: below chance when the two splits' majorities differ)."""
    from types import SimpleNamespace

    from jaxtl.train import _baseline

    sexes = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0], np.float32)  # train: 3 of 5 female; test: 3 of 5 male
    source = SimpleNamespace(sexes=sexes, ages=np.arange(10.0))
    assert _baseline(source, np.array([0, 1, 2, 6, 7]), np.array([3, 4, 5, 8, 9]), "sex") == pytest.approx(0.6)
    assert _baseline(source, np.arange(5), np.arange(5, 10), "age") == pytest.approx(5.0)


def test_missing_labels_are_listed_with_what_to_do():
    from types import SimpleNamespace

    from jaxtl.train import _check_labels

    ages = np.array([50, np.nan, 60, *[np.nan] * 6], np.float32)
    source = SimpleNamespace(ids=np.array([f"sub-{i}_ses-1" for i in range(9)]), ages=ages, sexes=ages,
                             participant_ids=np.array([f"sub-{i}" for i in range(9)]))
    expected = (r"caches/x: 7 scan\(s\) have no age: sub-1_ses-1 \(participant sub-1\), sub-3_ses-1 .*"
                r"sub-6_ses-1 \(participant sub-6\) and 2 more\. .*jaxtl prepare")
    with pytest.raises(ValueError, match=expected):
        _check_labels(source, np.arange(9), tiny_config(), "caches/x")


def test_ensure_model_pretrains_until_the_final_export_is_complete(tiny_models, ukb_cache, tmp_path, monkeypatch):
    import shutil

    import jaxtl.train
    from jaxtl import experiment

    work = tmp_path / "run"
    shutil.copytree(tiny_models["age"], work / "model")
    model_json = work / "model" / "model.json"

    def set_meta(**values) -> None:
        config = json.loads(model_json.read_text())
        meta = {k: v for k, v in (config["meta"] | values).items() if v is not None}
        model_json.write_text(json.dumps(config | {"meta": meta}))

    calls = []
    monkeypatch.setattr(jaxtl.train, "pretrain", lambda cfg, cache, workdir, progress: calls.append(workdir))
    monkeypatch.setattr(experiment, "ensure_cohort", lambda *a: str(ukb_cache))
    spec = experiment.PretrainSpec(str(work), "age", str(REPO / "configs" / "sfcn_demo.py"))
    # exports without the mark (older versions) are finished when they trained the config's epochs (20)
    for meta, n_calls in (({"complete": None, "epochs": 3.0}, 1), ({"complete": None, "epochs": 20.0}, 1),
                          ({"complete": False}, 2), ({"complete": True}, 2)):
        set_meta(**meta)
        assert experiment.ensure_model(spec, tmp_path, progress=False).task.name == "age"
        assert len(calls) == n_calls, meta
    # a finished run is not reused for another config or cohort (e.g. `demo --scale ci`, then `demo`, one --out)
    from jaxtl.config import load_config, to_dict

    (work / "config.json").write_text(json.dumps(to_dict(load_config(spec.config))))
    assert experiment.ensure_model(spec, tmp_path, progress=False) and len(calls) == 2
    with pytest.raises(ValueError, match=r"another setup \(model.channels: \[16, 32, 64, 64, 64, 64\] in the run"):
        experiment.ensure_model(dataclasses.replace(spec, overrides=("model.channels=(4,8,8,8,8,8)",)), tmp_path)
    # nor for other epochs or learning rates, which a resumed run may change
    for item, changed in (("epochs=30", "epochs"), ("optim.lr=0.005", "optim.lr")):
        with pytest.raises(ValueError, match=rf"another setup \({changed}: "):
            experiment.ensure_model(dataclasses.replace(spec, overrides=(item,)), tmp_path)
    assert experiment.ensure_model(dataclasses.replace(spec, overrides=("log_every_steps=3",)), tmp_path)
    cohort = json.loads((work / "pretrain_cohort.json").read_text())
    assert cohort["n"] == spec.cohort.n
    with pytest.raises(ValueError, match="another setup .*cohort: .* in the run"):
        experiment.ensure_model(dataclasses.replace(spec, cohort=dataclasses.replace(spec.cohort, n=32)), tmp_path)


def test_distributed_init_skips_only_marked_grain_workers(monkeypatch, capsys):
    import argparse
    import multiprocessing

    from jaxtl import cli
    from jaxtl.cache import GRAIN_WORKER_ENV

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append(a + tuple(kw.values())))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", GRAIN_WORKER_ENV):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(coordinator=None, distributed=True, num_processes=2, process_id=1)
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # a rank started by multiprocessing
    cli._init_distributed(args)
    assert calls == [(None, 2, 1)]
    monkeypatch.setenv(GRAIN_WORKER_ENV, "0/2")  # set by make_dataset's worker_init_fn in grain workers
    cli._init_distributed(args)
    assert len(calls) == 1
    assert "not calling jax.distributed.initialize() in grain data worker" in capsys.readouterr().err
    monkeypatch.delenv(GRAIN_WORKER_ENV)
    # all three given: JAX's SLURM/Open MPI detection (one GPU per process) is off, each process sees its host's
    cli._init_distributed(argparse.Namespace(coordinator="host0:1234", distributed=False, num_processes=2,
                                             process_id=1))
    assert calls[-1] == ("host0:1234", 2, 1, "deactivate")
    # ranks without a coordinator would each train alone: refused
    with pytest.raises(ValueError, match="--num-processes/--process-id need --coordinator"):
        cli._init_distributed(argparse.Namespace(coordinator=None, distributed=False, num_processes=2, process_id=1))


def test_pretrain_profiles_the_steps_asked_for(ukb_cache, tmp_path, capsys):
    """`profile=(2, 9)` on a run that ends at step 4: steps 2..4 traced (with a warning) into workdir/profile as a
    TensorBoard profile and a Perfetto trace, the ops that took the most time in top_ops.json and on stderr. A
    window the run never reaches traces nothing; a profiler that fails to start warns and training goes on."""
    run = tmp_path / "run"
    cfg = tiny_config("epochs=1", "data.test_fraction=0", "data.val_fraction=0")
    with pytest.warns(UserWarning, match=r"profile=\(2, 9\): this run ends at step 4, so steps 2..4 are traced"):
        pretrain(cfg, ukb_cache, run, progress=False, max_steps=4, profile=(2, 9))
    profile = run / "profile"
    assert list(profile.glob("plugins/profile/*/*.xplane.pb")) and list(profile.glob("**/perfetto_trace.json.gz"))
    top = json.loads((profile / "top_ops.json").read_text())
    assert top and all(t["ms_per_step"] >= 0 and t["name"] for t in top)
    err = capsys.readouterr().err
    assert f"profile of steps 2..4 in {profile}" in err and top[0]["name"][:40] in err
    with pytest.warns(UserWarning, match=r"profile=\(5, 6\): this run trains steps 1..2, so nothing is traced"):
        pretrain(cfg, ukb_cache, tmp_path / "short", progress=False, max_steps=2, profile=(5, 6))
    assert not (tmp_path / "short" / "profile").exists()
    with jax.profiler.trace(str(tmp_path / "outer")):  # a trace already running: ours cannot start
        with pytest.warns(UserWarning, match=r"profiling steps 1..1 failed to start"):
            out = pretrain(cfg, ukb_cache, tmp_path / "busy", progress=False, max_steps=2, profile=(1, 1))
    assert model_meta(out)["complete"] is False and len(steps_logged(tmp_path / "busy")) == 2
    with pytest.raises(ValueError, match="profile=\\(3, 2\\): give steps"):
        pretrain(tiny_config(), ukb_cache, tmp_path / "bad", progress=False, profile=(3, 2))


def test_cli_refuses_meaningless_numbers_and_reports_os_errors_in_one_line(tmp_path, capsys):
    from jaxtl import cli

    for argv, said in ((["pretrain", "--config", "c.py", "--cohort", "x", "--workdir", "w", "--max-steps", "-1"],
                        "--max-steps: -1 is below 1"),
                       (["predict", "--model", "m", "--cohort", "c", "--out", "o.csv", "--batch-size", "0"],
                        "--batch-size: 0 is below 1"),
                       (["transfer", "--model", "m", "--cohort", "c", "--out", "o", "--epoch-scale", "-1"],
                        "--epoch-scale: -1 is not above 0"),
                       (["pretrain", "--config", "c.py", "--cohort", "x", "--workdir", "w", "--profile", "5:2"],
                        "--profile: '5:2': give train steps FIRST:LAST with 1 <= FIRST <= LAST"),
                       (["pretrain", "--config", "c.py", "--cohort", "x", "--workdir", "w", "--profile", "a:b"],
                        "--profile: 'a:b': give train steps FIRST:LAST")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert cli.main(["simulate", "ixi", str(tmp_path / "afile" / "sub"), "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtl simulate: error:") and "afile" in err and "Traceback" not in err
    assert cli.main(["simulate", "--preview", str(tmp_path / "p.png"), "--n", "3"]) == 2
    assert "--n not used with --preview" in capsys.readouterr().err


def test_python_dash_m_jaxtl_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "jaxtl", "simulate", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0 and "usage: jaxtl simulate" in proc.stdout, proc.stderr


def test_cli_prints_jaxtls_warnings_in_one_line(monkeypatch):
    import warnings

    from jaxtl import cli, data

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    default = warnings.formatwarning("x", UserWarning, "/elsewhere/mod.py", 3)
    cli._short_warnings("predict")
    said = warnings.formatwarning("scan.nii.gz: not skull-stripped", data.InputWarning, data.__file__, 239, "warn()")
    assert said == "jaxtl predict: warning: scan.nii.gz: not skull-stripped\n"
    assert warnings.formatwarning("x", UserWarning, "/elsewhere/mod.py", 3) == default  # others' keep their form


def test_config_dataclasses_are_frozen():
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        TrainConfig().epochs = 3
    assert DataConfig().wrap is True and ModelConfig().dtype == "float32"


def test_resume_keeps_the_runs_own_split(ukb_cache, tmp_path):
    """A resumed run trains on the scans its split.json names (e.g. one split by scan by an older version)."""
    from jaxtl.cache import CacheSource
    from jaxtl.train import _saved_split

    source = CacheSource(ukb_cache)
    ids = source.ids.tolist()
    computed = (np.arange(2, len(ids)), np.array([0]), np.array([1]))
    assert _saved_split(tmp_path, source, computed) is computed  # a new run: no split.json yet
    (tmp_path / "split.json").write_text(json.dumps({"train": ids[:-2], "val": [ids[-2]], "test": [ids[-1]]}))
    train, val, test = _saved_split(tmp_path, source, computed)
    assert train.tolist() == list(range(len(ids) - 2)) and val.tolist() == [len(ids) - 2]
    (tmp_path / "split.json").write_text(json.dumps({"train": ["nobody"], "val": [], "test": []}))
    with pytest.raises(ValueError, match="not in the cache"):
        _saved_split(tmp_path, source, computed)


def test_the_wheel_ships_the_configs(tmp_path):
    """A pip-installed jaxtl (a wheel, not a checkout) has configs/ as jaxtl.configs: `load_config("configs/...")`
    and the demo find them."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "jaxtl", "configs", "benchmarks"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    # the test extra's setuptools builds it (an isolated build environment installs one first: ~10 s more)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "whl")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "whl").glob("jaxtl-*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    assert (tmp_path / "site" / "jaxtl" / "configs" / "sfcn_demo.py").is_file()
    assert (tmp_path / "site" / "jaxtl" / "benchmarks" / "bench_input.py").is_file()  # `jaxtl bench --suite input`
    code = ("import jaxtl, jaxtl.demo, jaxtl.bench; from jaxtl.config import load_config; "
            "print(jaxtl.__file__, jaxtl.demo.CONFIGS, load_config('configs/experiment_ixi.py', "
            "expected=__import__('jaxtl.experiment').experiment.ExperimentConfig).name, "
            "jaxtl.bench._load_input_bench().__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}).stdout.split()
    site = tmp_path / "site" / "jaxtl"
    assert out == [str(site / "__init__.py"), str(site / "configs"), "ixi", str(site / "benchmarks" / "bench_input.py")]


def test_too_few_training_scans_for_one_batch_says_what_to_change(ukb_cache, tmp_path):
    with pytest.raises(ValueError, match=r"training scans, fewer than one batch of 64; use more scans or a smaller "
                                         r"batch \(--set batch_size=N"):
        pretrain(tiny_config("batch_size=64"), ukb_cache, tmp_path / "run", progress=False)
