"""Pretraining commands for the tests: a tiny demo-config run of `jaxtl pretrain` on a cache, and what it left."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from conftest import REPO, xla_flags
from flax import nnx

from jaxtl.config import TrainConfig, load_config

TINY = ["model.channels=(4,8,8,8,8,8)", "batch_size=4", "log_every_steps=1", "epochs=2",
        "data.val_fraction=0.125", "data.test_fraction=0.125"]


def tiny_config(*extra: str) -> TrainConfig:
    return load_config(REPO / "configs" / "sfcn_demo.py", TINY + list(extra))


def pretrain_command(cache, workdir, *extra, devices=1, env=None, **popen):
    sets = [a for s in TINY + list(extra) for a in ("--set", s)]
    cmd = [sys.executable, "-m", "jaxtl.cli", "pretrain", "--config", str(REPO / "configs" / "sfcn_demo.py"),
           "--cohort", str(cache), "--workdir", str(workdir), *sets]
    full_env = {**os.environ, "XLA_FLAGS": xla_flags(devices), **(env or {})}
    return cmd, full_env


def final_state(path) -> dict:
    from jaxtl.weights import load_model

    model = load_model(path if (path / "model.json").exists() else path / "model").model
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat))))


def model_meta(model_dir) -> dict:
    return json.loads((model_dir / "model.json").read_text())["meta"]


def steps_logged(workdir) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being appended while a test polls the file
            continue
    return [r for r in records if "loss" in r]
