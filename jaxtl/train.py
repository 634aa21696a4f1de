"""Data-parallel SFCN pretraining: grain input, one jitted step, orbax checkpoints, multi-host.

One code path from a laptop CPU to a TPU pod slice: a 1-D "data" mesh over all devices of all
processes; the global batch is sharded over it and parameters are replicated, so BatchNorm
statistics are computed over the global batch (synchronised BN; Peng's DataParallel computed them
per GPU). Each process reads only its slice of every global batch.

Checkpoints (`WORKDIR/checkpoints`, orbax CheckpointManager) hold parameters, BatchNorm statistics,
optimizer state, the step and the grain iterator state, so a restarted run continues with exactly
the batches it would have seen. On SIGTERM (or JAX's multi-host preemption notice) the run
checkpoints the current step and exits with status 143 (`Preempted`). `WORKDIR/best` and
`WORKDIR/model` are jaxtl model directories (best validation epoch and final model) that
`jaxtl.load_model` reads; `model/`'s meta says whether pretraining ran to its last step
(`complete`). The split is by participant: all scans of one participant (sessions, repeat visits)
are in the same one of train/val/test.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxtl.cache import CacheSource, make_dataset
from jaxtl.config import OptimConfig, TrainConfig, check_train_config, to_dict
from jaxtl.conv import default_devices, trace_settings
from jaxtl.labels import AgeTask, SexTask, check_in_range, make_task
from jaxtl.model import SFCN, WEIGHTS, check_train_batch, jit_on_mesh, min_input_side
from jaxtl.weights import DEFAULT_PREPROCESSING, load_model, save_model


class NonFiniteLossError(RuntimeError):
    pass


# Exit status of a preempted `jaxtl pretrain` after its checkpoint is written: 128 + SIGTERM, what a process ended by
# SIGTERM reports, so schedulers that retry terminated/preempted jobs (Kubernetes podFailurePolicy onExitCodes,
# AWS Batch evaluateOnExit, Cloud Batch lifecycle policies, SLURM --requeue, torchrun restarts) treat it as such.
PREEMPTED_EXIT_CODE = 143


class Preempted(SystemExit):
    """`pretrain` stopped after a preemption notice (or Ctrl-C), with a checkpoint at `step`: rerun to resume.

    A `SystemExit` (status `PREEMPTED_EXIT_CODE`; 130 after Ctrl-C), so the `jaxtl` command exits with that status and
    `except Exception` does not swallow it; catch `Preempted` to handle it in Python.
    """

    def __init__(self, step: int, code: int = PREEMPTED_EXIT_CODE):
        super().__init__(code)
        self.step = step


# ------------------------------------------------------------------------------------------------
# Model, optimizer, step


def _sgd(learning_rate, momentum, weight_decay) -> optax.GradientTransformation:
    """PyTorch `SGD(lr, momentum, weight_decay)`: weight decay is coupled L2 (added to the gradient before
    momentum), on every parameter including BatchNorm and biases, as in PyTorch."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


# One transformation object for every run: the hyper-parameters are optimizer *state* and the learning rate of
# each step is an argument of the jitted step. Runs that differ only in lr, schedule, momentum or decay (every
# fine-tuning run of one network shape, the data-scarcity runs) then share one compiled step instead of each
# compiling its own (on 2 CPU cores compiling was most of a short fine-tuning run).
SGD = optax.inject_hyperparams(_sgd)(learning_rate=0.0, momentum=0.0, weight_decay=0.0)


def make_optimizer(model: SFCN, cfg: OptimConfig, trainable: Any = nnx.Param) -> nnx.Optimizer:
    """`SGD` on the `trainable` parameters of `model` with `cfg`'s momentum and weight decay; the learning
    rate is set every step from `make_schedule_fn`."""
    optimizer = nnx.Optimizer(model, SGD, wrt=trainable)
    hp = optimizer.opt_state.hyperparams
    for name, value in (("learning_rate", cfg.lr), ("momentum", cfg.momentum), ("weight_decay", cfg.weight_decay)):
        hp[name][...] = jnp.asarray(value, jnp.float32)
    return optimizer


def make_schedule_fn(cfg: OptimConfig, steps_per_epoch: int):
    """PyTorch `StepLR(step_epochs, gamma)` stepped per epoch, as a function of the step."""
    return lambda step: cfg.lr * cfg.gamma ** (step // max(cfg.step_epochs * steps_per_epoch, 1))


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache (default $JAX_COMPILATION_CACHE_DIR, else
    $JAXTL_HOME/xla-cache): repeated fine-tuning runs and a second `jaxtl` invocation load compiled steps
    instead of recompiling them (on 2 CPU cores compiling is most of a short fine-tuning run).
    JAXTL_COMPILATION_CACHE=0 leaves it off. Returns the directory in use."""
    if os.environ.get("JAXTL_COMPILATION_CACHE", "1") == "0":
        return None
    from jaxtl.weights import jaxtl_home

    path = str(path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or jaxtl_home() / "xla-cache")
    jax.config.update("jax_compilation_cache_dir", path)
    # compiles under 0.2 s stay out unless the environment says otherwise (the test suite caches every compile)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0.2)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def process_major(devices) -> list:
    """`devices` ordered by (process, id): each process's devices hold one contiguous block of the batch axis,
    the block `HostBlock` gives that process. (`jax.make_mesh` orders TPU devices by physical topology, where a
    host's chips need not be neighbours on a 1-D axis.)"""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """1-D "data" mesh over all devices of all processes (or `devices`), process-major; the devices of the default
    device's platform (`with jax.default_device("cpu")` trains on the host of a GPU machine, as conv_impl "auto"
    then means the CPU's path). Auto axes: the compiler propagates the batch sharding through the network, so
    reshapes inside the model need no sharding annotations. The only collectives are all-reduces over every
    device, which the order does not change."""
    devices = process_major(default_devices() if devices is None else devices)
    return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _loss_fn(model: SFCN, task, images, labels, key):
    log_probs = model(images, rngs=nnx.Rngs(dropout=key))
    return task.loss(log_probs, labels), log_probs


def train_step(graphdef, state, images, labels, key, lr, *, task, trainable):
    """One SGD step with learning rate `lr` on a (sharded) global batch.

    Returns the new state, the batch loss and whether the loss, all new parameters and BatchNorm statistics
    are finite.
    """
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.opt_state.hyperparams["learning_rate"][...] = lr
    grad_fn = nnx.value_and_grad(_loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    (loss, _), grads = grad_fn(model, task, images, labels, key)
    optimizer.update(model, grads)
    params = jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(p).all() for p in params]))
    return nnx.state((model, optimizer)), loss, finite


def eval_step(graphdef, state, images, labels, mask, *, task):
    """Sum of absolute errors (age) or of correct predictions (sex) over the unmasked examples."""
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    pred = task.decode(model(images))
    if isinstance(task, AgeTask):
        score = jnp.abs(pred - labels)
    else:
        score = ((pred > 0.5) == (labels == 1)).astype(jnp.float32)
    return jnp.sum(score * mask), jnp.sum(mask)


def _jitted_steps(graphdef, task, trainable, mesh):
    """The jitted train and eval steps, one pair per network structure, task, trainable filter, mesh and
    `conv.trace_settings()`: trainers of the same shape reuse the compiled steps."""
    return _jitted_steps_for(graphdef, task, trainable, mesh, trace_settings())


@functools.cache
def _jitted_steps_for(graphdef, task, trainable, mesh, settings):
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    train_fn = jit_on_mesh(functools.partial(train_step, graphdef, task=task, trainable=trainable), mesh,
                           donate_argnums=(0,),
                           in_shardings=(replicated, batch, batch, replicated, replicated),
                           out_shardings=(replicated, replicated, replicated))
    eval_fn = jit_on_mesh(functools.partial(eval_step, graphdef, task=task), mesh,
                          in_shardings=(replicated, batch, batch, batch), out_shardings=(replicated, replicated))
    return train_fn, eval_fn


@dataclasses.dataclass
class Trainer:
    """Model + optimizer state on a mesh, with the jitted train and eval steps."""

    graphdef: Any
    state: Any
    mesh: jax.sharding.Mesh
    task: AgeTask | SexTask
    config: TrainConfig
    train_fn: Any
    eval_fn: Any
    schedule: Any  # step -> learning rate

    @classmethod
    def create(cls, config: TrainConfig, steps_per_epoch: int, model: SFCN | None = None,
               mesh: jax.sharding.Mesh | None = None, trainable: Any = nnx.Param) -> Trainer:
        """Fresh SFCN from `config` (or the given `model`) with SGD on the `trainable` parameters.

        `trainable` is an NNX filter, e.g. `nnx.All(nnx.Param, nnx.PathContains("head"))` to train only
        the head. BatchNorm runs in train mode either way (batch statistics, running averages updated),
        as in the paper's code. A given `model` is copied: the caller's stays as it was (mode and weights).
        """
        task = make_task(config.task, config.bin_range, config.sigma)
        mesh = mesh or make_mesh()
        if model is None:
            model = SFCN(config.model.channels, task.num_outputs, config.model.dropout,
                         dtype=jnp.dtype(config.model.dtype), rngs=nnx.Rngs(config.seed))
        else:
            model = nnx.clone(model)
        model.train()
        graphdef, state = nnx.split((model, make_optimizer(model, config.optim, trainable)))
        state = jax.device_put(state, NamedSharding(mesh, P()))
        train_fn, eval_fn = _jitted_steps(graphdef, task, trainable, mesh)
        return cls(graphdef, state, mesh, task, config, train_fn, eval_fn,
                   make_schedule_fn(config.optim, steps_per_epoch))

    def step(self, images: jax.Array, labels: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
        """One train step; returns (loss, finite) as device scalars (not synchronised)."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), step)
        lr = np.float32(self.schedule(step))
        self.state, loss, finite = self.train_fn(self.state, images, labels, key, lr)
        return loss, finite

    def model(self) -> SFCN:
        """The current model (eval mode), sharing arrays with the trainer's state."""
        model, _ = nnx.merge(self.graphdef, self.state)
        model.eval()
        return model

    def global_batch(self, local: np.ndarray) -> jax.Array:
        """Assemble the global batch from this process's slice (multi-host safe)."""
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P("data")), local)

    def evaluate(self, source, indices: np.ndarray, label_key: str, *, progress: bool = False,
                 stop: Callable[[], bool] | None = None) -> float | None:
        """Mean absolute error (age) or accuracy (sex) over `indices` of `source`, no augmentation.

        Batches come from `eval_dataset` (grain, read ahead in threads); the per-batch sums stay on the
        device and are fetched once at the end (the host waits only to keep `EVAL_IN_FLIGHT` batches queued).
        Every process evaluates its block of each global batch; the result is the same on all processes.
        `stop`, asked before each batch: when it says True the pass is abandoned and None returned.
        """
        indices = np.asarray(indices)
        if not len(indices):
            return 0.0
        sums, b = [], self.config.batch_size
        batches = eval_dataset(source, indices, label_key, b)
        for batch in tqdm(batches, total=-(-len(indices) // b), unit="batch", desc="evaluate", leave=False,
                          disable=not (progress and jax.process_index() == 0)):
            if stop is not None and stop():
                return None
            sums.append(self.eval_fn(self.state, *(self.global_batch(batch[k]) for k in ("image", "label", "mask"))))
            if len(sums) > EVAL_IN_FLIGHT:  # bound the batches queued on the device (async dispatch)
                jax.block_until_ready(sums[-EVAL_IN_FLIGHT - 1])
        sums = jax.device_get(sums)  # the one transfer of the pass
        # Summed in float64 in batch order, as the per-batch float(...) of earlier versions did.
        total, count = sum(float(s) for s, _ in sums), sum(float(c) for _, c in sums)
        return total / max(count, 1.0)


# ------------------------------------------------------------------------------------------------
# Input pipeline


@dataclasses.dataclass(frozen=True)
class Subset:
    """A picklable view of `indices` of a random-access source."""

    source: Any
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]


def train_dataset(source, indices: np.ndarray, config: TrainConfig, start_batch: int = 0) -> grain.IterDataset:
    """The training stream (`jaxtl.cache.make_dataset`): per epoch a seeded reshuffle of `indices` cut into
    `len(indices) // batch_size` global batches (the rest dropped), endless repeat, shift/mirror augmentation,
    this process's block of every global batch; `start_batch` skips that many batches. Batches are float16 from a
    float16 cache (the model casts on the device, exactly: half the bytes to copy there), else float32."""
    d = config.data
    dtype = np.float16 if np.dtype(getattr(source, "stored_dtype", np.float32)) == np.float16 else np.float32
    return make_dataset(Subset(source, indices), batch_size=config.batch_size // jax.process_count(),
                        seed=config.seed, num_epochs=None, workers=d.workers, wrap=d.wrap, max_shift=d.shift,
                        flip_p=0.5 if d.mirror else 0.0, dtype=dtype,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        start_batch=start_batch)


EVAL_IN_FLIGHT = 2  # evaluation batches queued on the device while the host prepares the next one
TRAIN_IN_FLIGHT = 2  # train steps queued on the device (async dispatch) while the host prepares the next batch


@dataclasses.dataclass(frozen=True)
class _Padded:
    """`indices` of `source` as {"image", "label", "mask"} records, followed by masked zero records up to
    `length` (a whole number of global batches)."""

    source: Any
    indices: np.ndarray
    label_key: str
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < len(self.indices):
            item = self.source[int(self.indices[i])]
            return {"image": item["image"], "label": np.float32(item[self.label_key]), "mask": np.float32(1.0)}
        return {"image": np.zeros(self.source.shape, np.float32), "label": np.float32(0.0), "mask": np.float32(0.0)}


def eval_dataset(source, indices: np.ndarray, label_key: str, batch_size: int) -> grain.IterDataset:
    """This process's evaluation batches over `indices` of `source`: one pass in order, no augmentation, global
    batches of `batch_size` (the last padded with masked zero records), each process's contiguous block of every
    global batch (as in training), float32 {"image", "label", "mask"}, built ahead in background threads."""
    n_proc = jax.process_count()
    n_batches = -(-len(indices) // batch_size)
    padded = _Padded(source, np.asarray(indices), label_key, n_batches * batch_size)
    return make_dataset(padded, batch_size=batch_size // n_proc, shuffle=False, augmentation=False, num_epochs=1,
                        workers=0, dtype=np.float32, process_index=jax.process_index(), process_count=n_proc)


def split_participants(participant_ids: np.ndarray, val_fraction: float, test_fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random split of scans into train/val/test scan-index arrays, by participant.

    All scans of a participant (sessions, repeat visits) land in the same split. Participants, in order of
    first appearance, are permuted and cut by the fractions (rounded, of participants); with one scan per
    participant this is exactly a permutation of the scans.
    """
    pids = np.asarray(participant_ids, dtype=str)
    people, first, inverse = np.unique(pids, return_index=True, return_inverse=True)
    rank = np.empty(len(people), np.int64)
    rank[np.argsort(first)] = np.arange(len(people))  # participant -> order of first appearance
    perm = np.random.default_rng(seed).permutation(len(people))
    n_val, n_test = round(len(people) * val_fraction), round(len(people) * test_fraction)
    part = np.zeros(len(people), np.int64)  # by order of appearance: 0 train, 1 val, 2 test
    part[perm[:n_val]], part[perm[n_val:n_val + n_test]] = 1, 2
    scan_part = part[rank[inverse.reshape(-1)]]
    return tuple(np.flatnonzero(scan_part == k) for k in range(3))


def _split_seed(config: TrainConfig) -> int:
    seed = config.data.split_seed
    if seed is None:
        return config.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"data.split_seed must be a non-negative integer or None (use `seed`), got {seed!r}")
    return seed


# ------------------------------------------------------------------------------------------------
# The run


def _checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options,
                                 item_names=("state", "data_iter", "meta"))


def _state_target(state, mesh):
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


# Config fields a resumed run may change. These do not change what is computed:
# data.downsample only checks which cache a recipe is given (runs saved before it existed read None)
NEUTRAL_FIELDS = ("log_every_steps", "checkpoint_every_steps", "data.workers", "data.downsample")
# `epochs` may change too, as long as the run has not already gone past it: the learning rate schedule is a function
# of the step alone. So may that schedule (`SCHEDULE_FIELDS`): the rate is an input of each step, and resuming with a
# lower one is the way on after a non-finite loss. Momentum and weight decay are part of the restored optimizer
# state: they may not.
SCHEDULE_FIELDS = ("optim.lr", "optim.step_epochs", "optim.gamma")
RESUMABLE_FIELDS = (*NEUTRAL_FIELDS, "epochs", *SCHEDULE_FIELDS)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_shared_workdir(workdir: Path) -> None:
    """Several processes write one checkpoint into one run directory: refuse (on every process, so none waits in a
    collective) unless all of them see the directory process 0 wrote to."""
    if jax.process_count() == 1:
        return
    import secrets

    from jax.experimental import multihost_utils

    token = workdir / ".processes"
    if jax.process_index() == 0:
        token.write_text(secrets.token_hex(8))
    mine = np.frombuffer(bytes.fromhex(token.read_text()) if jax.process_index() == 0 else bytes(8), np.uint8)
    expected = bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine))).hex()  # also a barrier
    try:
        seen = token.read_text() == expected
    except OSError:
        seen = False
    everyone = np.asarray(multihost_utils.process_allgather(np.array([seen])))
    if not everyone.all():
        blind = np.flatnonzero(~everyone.reshape(-1)).tolist()
        raise ValueError(f"{workdir}: process(es) {blind} do not see the run directory process 0 writes to; every "
                         "process must be given the same directory on a filesystem they all share (NFS, a "
                         "shared disk, ...), as the checkpoint is written by all of them together")


def _has_checkpoint(workdir: Path) -> bool:
    """Whether the run in `workdir` has a finished checkpoint to resume (else it starts anew: a run that stopped
    before its first checkpoint, e.g. out of memory at step 1, may be rerun with another config)."""
    checkpoints = workdir / "checkpoints"
    return checkpoints.is_dir() and bool(ocp.utils.checkpoint_steps(checkpoints))


def _check_config(workdir: Path, config: TrainConfig, resuming: bool) -> dict | None:
    """Write `config.json` for a new run; for one `resuming`, refuse a config that differs in anything but
    `RESUMABLE_FIELDS`. Returns the saved config (flat `section.field` keys) or None for a new run."""
    path = workdir / "config.json"
    if not resuming or not path.exists():
        if jax.process_index() == 0:
            workdir.mkdir(parents=True, exist_ok=True)
            _write_json(path, to_dict(config))
        return None
    saved, refused = config_changes(workdir, config)
    if refused:
        raise ValueError(f"{workdir} holds a run with a different config ({'; '.join(refused)}); only "
                         f"{', '.join(RESUMABLE_FIELDS)} may change on resume: use the run's config "
                         f"({path}), or a new --workdir")
    return saved


def config_changes(workdir: Path, config: TrainConfig, allowed: tuple[str, ...] = RESUMABLE_FIELDS
                   ) -> tuple[dict, list[str]]:
    """The config saved in `workdir/config.json` (flat `section.field` keys) and how `config` differs from it in
    fields other than `allowed` ("field: saved in the run, now"); `NEUTRAL_FIELDS` to ask whether a finished run
    computed what `config` would."""
    current = _flatten(to_dict(config))
    # Fields added to the config since the run started take their defaults, which keep the old behaviour.
    saved = _flatten(to_dict(TrainConfig())) | _flatten(json.loads((Path(workdir) / "config.json").read_text()))
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    return saved, [f"{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now" for k in diff
                   if k not in allowed]


def _check_resume(meta: dict, workdir: Path, config: TrainConfig, steps_per_epoch: int, n_proc: int) -> None:
    """Refuse to resume a checkpoint (its `meta`) past `config.epochs`. (Another process count `n_proc` than the
    checkpoint's is fine: the data stream does not depend on it, and a fresh iterator is positioned at the step.)"""
    step = meta["step"]
    if step > config.epochs * steps_per_epoch:
        done = math.ceil(step / steps_per_epoch)
        raise ValueError(f"{workdir} has trained {step} steps ({step / steps_per_epoch:g} epochs), more than "
                         f"epochs={config.epochs} ({config.epochs * steps_per_epoch} steps); resume with "
                         f"--set epochs={done} or more, or use a new --workdir")


def _check_workdir(workdir: Path) -> None:
    """Refuse a run directory that is something else (a file, a prepared cache, a BIDS dataset) or cannot be
    written, before anything is written into it."""
    what = ("a file" if workdir.exists() and not workdir.is_dir() else
            "a prepared cache (index.json)" if (workdir / "index.json").exists() else
            "a BIDS dataset" if (workdir / "dataset_description.json").exists() else None)
    if what:
        raise ValueError(f"--workdir {workdir} is {what}; give the run a directory of its own (it holds "
                         "checkpoints/, metrics.jsonl, best/, model/)")
    probe = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if probe is not None and not os.access(probe, os.W_OK):
        raise PermissionError(f"--workdir {workdir}: {probe} is not writable; give a directory this user can write")


def _check_volumes(workdir: Path, source: CacheSource, cohort: Any, resuming: bool) -> dict:
    """What the run's volumes are (`workdir/volumes.json`): a run resumes only on volumes of the shape, downsample
    and dtype it started with (the scans themselves: `_saved_split`). Returns the record for this cache."""
    now = {"cache": str(Path(source.cache_dir).resolve()), "shape": list(source.shape),
           "downsample": source.downsample, "dtype": str(source.stored_dtype)}
    path = workdir / "volumes.json"
    if resuming and path.exists():
        saved = json.loads(path.read_text())
        diff = [f"{k}: {saved[k]} in the run, {now[k]} now" for k in ("shape", "downsample", "dtype")
                if k in saved and saved[k] != now[k]]
        if diff:
            raise ValueError(f"{workdir} trained on volumes of {saved.get('cache')}; --cohort {cohort} holds others "
                             f"({'; '.join(diff)}): resume with that cache (or one prepared the same way), or use a "
                             "new --workdir")
    return now


def _write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def _saved_split(workdir: Path, source: CacheSource, computed: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The run's own split when `workdir/split.json` exists (a resumed run keeps the scans it trained on, also
    when an older version split by scan), else `computed`."""
    path = workdir / "split.json"
    if not path.exists():
        return computed
    saved = json.loads(path.read_text())
    where = {scan_id: i for i, scan_id in enumerate(source.ids.tolist())}
    missing = [s for k in ("train", "val", "test") for s in saved.get(k, []) if s not in where]
    if missing:
        raise ValueError(f"{path}: {len(missing)} scan(s) of the run's split are not in the cache (e.g. "
                         f"{missing[0]!r}); resume with the cache the run started with, or use a new --workdir")
    out = tuple(np.array([where[s] for s in saved.get(k, [])], dtype=np.int64) for k in ("train", "val", "test"))
    if any(len(a) != len(b) or (a != b).any() for a, b in zip(out, computed, strict=True)):
        print(f"jaxtl pretrain: {path} differs from today's split of the cache; resuming with the run's own split",
              file=sys.stderr)
    return out


def final_record(workdir: str | os.PathLike) -> dict | None:
    """The results `pretrain` logged last in `workdir/metrics.jsonl` (steps, epochs, test metrics), None before any."""
    path = Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return next((r["final"] for r in map(json.loads, reversed(lines)) if "final" in r), None)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (logged before a kill, retrained on resume), earlier "final"
    records (the resumed run writes its own) and torn lines."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record and record["step"] <= step:  # a run's "final" is rewritten
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _logged_validation(path: Path, epoch: int, val_name: str) -> float | None:
    """The validation result of `epoch` in metrics.jsonl, None when not logged (one process: the file is this
    run's)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("epoch") == epoch and val_name in record:
            return float(record[val_name])
    return None


def _check_labels(source, indices, config: TrainConfig, cohort: str) -> None:
    key = "age" if config.task == "age" else "sex"
    values = (source.ages if key == "age" else source.sexes)[indices]
    missing = np.asarray(indices)[np.isnan(values)]
    if len(missing):
        pids = getattr(source, "participant_ids", source.ids)
        examples = ", ".join(f"{source.ids[i]}" + (f" (participant {pids[i]})" if pids[i] != source.ids[i] else "")
                             for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{cohort}: {len(missing)} scan(s) have no {key}: {examples}{more}. Pretraining for {key} "
                         f"needs a label for every scan: add the {key} to the cohort table (participants.tsv or "
                         "CSV) and run the same `jaxtl prepare` command again (labels are re-read, no scan is "
                         f"reprocessed), or prepare a cache from a cohort without these scans")
    if key == "age":
        check_in_range(values, config.bin_range, str(cohort), fix="--set bin_range={low},{high}")


class _TrainClock:
    """Volumes/s of train steps alone: the clock starts once the first (compiling) step of this process has
    finished and stops inside `paused()` (validation, export, checkpointing)."""

    def __init__(self, batch_size: int):
        self.batch_size, self.start, self.first_step, self.paused_s = batch_size, None, 0, 0.0

    def step_done(self, step: int, loss: jax.Array) -> None:
        if self.start is None:
            jax.block_until_ready(loss)
            self.start, self.first_step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.start is not None:  # a pause before the clock started (a resume's validation) is outside it
                self.paused_s += time.perf_counter() - t

    def rate(self, step: int) -> float | None:
        """Volumes/s over the timed steps so far; None before any step was timed."""
        if self.start is None or step <= self.first_step:
            return None
        return (step - self.first_step) * self.batch_size / (time.perf_counter() - self.start - self.paused_s)


class _PreemptionWatch:
    """Context manager that notices a preemption notice during training; `reached(step)` (call it once per step
    on every process) says when to checkpoint and stop, at the same step on every process.

    With `jax.distributed` initialised and JAX's preemption service on (the default), JAX catches SIGTERM (or the
    TPU maintenance notice) and agrees on a step across processes; it is queried through orbax
    (`CheckpointManager.reached_preemption`). In a single process, SIGTERM and SIGINT (Ctrl-C) handlers are
    installed (main thread only; SIGINT alone where JAX's service has SIGTERM, e.g. `--distributed` with one
    process) that record the notice; a second signal gets the previous handler (by default: terminate now /
    KeyboardInterrupt). The previous handlers are restored on exit. Several processes: the signals JAX's service
    does not take are left alone (one process cannot checkpoint without the others).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, mngr: ocp.CheckpointManager):
        self.mngr, self.signum = mngr, None
        self.jax_service = (jax.distributed.is_initialized()
                            and getattr(jax.config, "jax_enable_preemption_service", False))
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _PreemptionWatch:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT,) if self.jax_service else self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def signalled(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The status to exit with after the checkpoint: 130 after Ctrl-C, else `PREEMPTED_EXIT_CODE` (143)."""
        return 128 + signal.SIGINT if self.signum == signal.SIGINT else PREEMPTED_EXIT_CODE

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not set from Python, which cannot be reinstated; the default is the closest
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signalled:  # asked twice: do what the signal did before
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        if signum == signal.SIGINT:
            print("\njaxtl pretrain: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at "
                  "once, without one)", file=sys.stderr, flush=True)

    def reached(self, step: int) -> bool:
        if self.jax_service and self.mngr.reached_preemption(step):
            return True
        return self.signalled

    def interrupted(self) -> bool:
        """A notice arrived and this process may stop on its own (between the per-step agreements: one process)."""
        return self.signalled


def _open_run(config: TrainConfig, cohort: str | os.PathLike, workdir: Path, profile: tuple[int, int] | None
              ) -> tuple[CacheSource, int, tuple[np.ndarray, ...], dict, dict | None]:
    """The checks before a run starts or resumes (config, cache, run directory): the cache, the split seed, the
    (train, val, test) indices, the volumes record and the saved config (None for a new run)."""
    check_train_config(config)  # before anything is written to workdir
    if profile is not None and not 1 <= profile[0] <= profile[1]:
        raise ValueError(f"profile={profile!r}: give steps (FIRST, LAST) with 1 <= FIRST <= LAST (--profile 10:20)")
    _check_workdir(workdir)
    source = CacheSource(cohort)
    if config.data.downsample not in (None, source.downsample):
        raise ValueError(f"{cohort}: a cache prepared with --downsample {source.downsample}, and this recipe is for "
                         f"--downsample {config.data.downsample} (data.downsample; Peng's UK Biobank recipes are "
                         f"1mm): prepare the cohort with --downsample {config.data.downsample}, or train the recipe "
                         f"at this resolution anyway with --set data.downsample={source.downsample}")
    smallest = min_input_side(len(config.model.channels))
    if min(source.shape) < smallest:
        raise ValueError(f"{cohort}: volumes of shape {source.shape} are too small for "
                         f"{len(config.model.channels)} blocks (model.channels={config.model.channels}): each side "
                         f"must be at least {smallest} voxels; use fewer blocks or a cache of a finer --downsample")
    if config.data.shift >= min(source.shape):  # else it fails at the first batch, naming a random draw
        raise ValueError(f"data.shift={config.data.shift}: the random shift must be smaller than the volumes' "
                         f"smallest side ({min(source.shape)} voxels of {source.shape}) (--set data.shift=...)")
    check_train_batch(config.batch_size, len(config.model.channels), source.shape)
    n_proc, n_dev = jax.process_count(), len(default_devices())
    if config.batch_size % n_dev or config.batch_size % n_proc:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the device count "
                         f"({n_dev}); set --set batch_size=N")
    split_seed = _split_seed(config)
    train_idx, val_idx, test_idx = split_participants(source.participant_ids, config.data.val_fraction,
                                                      config.data.test_fraction, split_seed)
    resuming = _has_checkpoint(workdir)
    if resuming:
        train_idx, val_idx, test_idx = _saved_split(workdir, source, (train_idx, val_idx, test_idx))
    _warn_empty_splits(config, val_idx, test_idx)
    if len(train_idx) < config.batch_size:
        raise ValueError(f"{cohort}: {len(train_idx)} training scans, fewer than one batch of {config.batch_size}; "
                         "use more scans or a smaller batch (--set batch_size=N, a multiple of the device count)")
    _check_labels(source, np.arange(len(source)), config, str(cohort))
    volumes = _check_volumes(workdir, source, cohort, resuming)
    saved_config = _check_config(workdir, config, resuming)
    return source, split_seed, (train_idx, val_idx, test_idx), volumes, saved_config


def _warn_empty_splits(config: TrainConfig, val_idx: np.ndarray, test_idx: np.ndarray) -> None:
    """A validation or test fraction asked for but rounded to no participant: say what goes missing."""
    for name, fraction, idx, missing in (("val", config.data.val_fraction, val_idx, "no validation and no best/"),
                                         ("test", config.data.test_fraction, test_idx, "no test metrics")):
        if fraction > 0 and len(idx) == 0:
            warnings.warn(f"data.{name}_fraction={fraction} rounds to no participant of this cohort: {missing} "
                          f"(--set data.{name}_fraction=... for at least one participant, or 0 to mean it)",
                          stacklevel=3)


@contextlib.contextmanager
def _on_every_process(when: str):
    """Checks that may fail on some processes only (a cache or directory one host cannot see): all processes
    stop, the others naming the failed ones, instead of waiting in the next collective until it times out."""
    if jax.process_count() == 1:
        yield
        return
    from jax.experimental import multihost_utils

    try:
        yield
    except Exception:
        multihost_utils.process_allgather(np.array([True]))
        raise
    failed = np.asarray(multihost_utils.process_allgather(np.array([False]))).reshape(-1)
    if failed.any():
        raise ValueError(f"process(es) {np.flatnonzero(failed).tolist()} of {len(failed)} stopped {when}: "
                         "see their output for why")


def pretrain(config: TrainConfig, cohort: str | os.PathLike, workdir: str | os.PathLike, *,
             progress: bool = True, max_steps: int | None = None, profile: tuple[int, int] | None = None) -> Path:
    """Pretrain SFCN on a prepared cache; resumes automatically from `workdir`.

    Returns the exported final model directory (`workdir/model`); its meta has `complete` False when
    `max_steps` (smoke runs, tests) stopped the run before its last step. `profile=(first, last)`: trace
    steps first..last (input pipeline included) with the JAX profiler into `workdir/profile` (`Profile`).
    """
    workdir = Path(workdir)
    with _on_every_process("before pretraining started"):
        source, split_seed, (train_idx, val_idx, test_idx), volumes, saved_config = _open_run(
            config, cohort, workdir, profile)
    n_proc = jax.process_count()
    _check_shared_workdir(workdir)
    is_main = jax.process_index() == 0
    if is_main:  # also in logs (--no-progress): a launch that sees fewer devices than meant shows here
        mesh_devices = default_devices()
        print(f"jaxtl pretrain: {n_proc} process(es), {len(mesh_devices)} {mesh_devices[0].platform} device(s) "
              f"({jax.local_device_count()} on this process), global batch {config.batch_size} "
              f"({config.batch_size // len(mesh_devices)} per device), {len(train_idx)} training scans "
              f"(val {len(val_idx)}, test {len(test_idx)})",
              file=sys.stderr, flush=True)
    if is_main:
        _write_json(workdir / "volumes.json", volumes)
        parts = {k: idx for k, idx in zip(("train", "val", "test"), (train_idx, val_idx, test_idx), strict=True)}
        split = {k: source.ids[idx].tolist() for k, idx in parts.items()}  # scan ids
        split |= {"by": "participant_id", "seed": split_seed,
                  "participants": {k: list(dict.fromkeys(source.participant_ids[idx].tolist()))
                                   for k, idx in parts.items()}}
        _write_json(workdir / "split.json", split, indent=None)

    steps_per_epoch = len(train_idx) // config.batch_size  # = batches per epoch of `train_dataset`
    total_steps = config.epochs * steps_per_epoch
    trainer = Trainer.create(config, steps_per_epoch)
    label_key = "age" if config.task == "age" else "sex"
    mngr = _checkpoint_manager(workdir)
    step, best, data_start = 0, None, 0  # data_start: batches the data iterator skipped when it was created
    unvalidated = None  # an epoch whose end-of-epoch validation a preemption interrupted: run it on resume
    latest = mngr.latest_step()
    if latest is None:
        data_iter = iter(train_dataset(source, train_idx, config))
    else:
        meta = mngr.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        _check_resume(meta, workdir, config, steps_per_epoch, n_proc)
        step, best = meta["step"], meta["best"]
        unvalidated = meta.get("unvalidated_epoch")
        saved_workers = meta.get("workers", (saved_config or {}).get("data.workers"))
        items = {"state": ocp.args.StandardRestore(_state_target(trainer.state, trainer.mesh))}
        # checkpoints without data_start predate batching per epoch: their iterator state counts records
        same_procs = meta.get("process_count", n_proc) == n_proc  # the iterator state is saved per process
        if saved_workers == config.data.workers and "data_start" in meta and same_procs:  # the saved state fits
            data_start = meta.get("data_start", 0)
            data_iter = iter(train_dataset(source, train_idx, config, data_start))
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        else:  # other worker or host processes, or an older pipeline: a fresh one positioned at the step
            data_start = step
            data_iter = iter(train_dataset(source, train_idx, config, data_start))
        trainer.state = mngr.restore(latest, args=ocp.args.Composite(**items))["state"]
    metrics_file = workdir / "metrics.jsonl"
    if is_main:
        changed = []
        if saved_config is not None:
            current = _flatten(to_dict(config))
            changed = [f"{k} {current[k]!r} (was {saved_config.get(k)!r})" for k in SCHEDULE_FIELDS
                       if current[k] != saved_config.get(k)]
            _write_json(workdir / "config.json", to_dict(config))  # the run's config now (resumable changes)
        if latest is not None:  # also in logs without progress bars
            print(f"jaxtl pretrain: resuming at step {step} (epoch {step / steps_per_epoch:g}) from "
                  f"{workdir / 'checkpoints'}{' with ' + ', '.join(changed) if changed else ''}", file=sys.stderr,
                  flush=True)
        _truncate_metrics(metrics_file, step)
    pending = []  # losses not yet checked for finiteness
    in_flight = collections.deque()  # losses of the last steps dispatched, possibly still running
    clock = _TrainClock(config.batch_size)
    saved = latest  # step of the newest checkpoint (restored or written)

    def log(record: dict) -> None:
        if is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step: int) -> None:
        nonlocal saved
        _raise_if_non_finite(pending, mngr)  # waits for the pending steps: the clock then pauses on an idle device
        with clock.paused():
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(trainer.state),
                data_iter=grain.checkpoint.CheckpointSave(data_iter),
                meta=ocp.args.JsonSave({"step": step, "best": best, "process_count": n_proc,
                                        "workers": config.data.workers, "data_start": data_start,
                                        "unvalidated_epoch": unvalidated})))
        saved = step

    def validate(epoch: int, watch: _PreemptionWatch) -> bool:
        """Validate the model at the end of `epoch`; False when a preemption notice interrupted the pass."""
        nonlocal best, unvalidated
        with clock.paused():
            val = trainer.evaluate(source, val_idx, label_key, progress=progress, stop=watch.interrupted)
            if val is None:
                unvalidated = epoch
                return False
            unvalidated = None
            better = best is None or (val < best if config.task == "age" else val > best)
            if better:  # exported before the record is logged: a logged validation has its export
                _export(trainer, workdir / "best", source, config, {"epoch": epoch, val_name: val})
            log({"step": step, "epoch": epoch, val_name: val, "best": better})
            bar.set_postfix({val_name: f"{val:.3f}"})
            if better:
                best = val
        return True

    def stop_preempted() -> None:
        if saved != step:
            save(step)
        mngr.wait_until_finished()
        log({"step": step, "epoch": step / steps_per_epoch, "preempted": True})
        bar.close()
        who = f"process {jax.process_index()}/{n_proc}: " if n_proc > 1 else ""
        why = "stopped by Ctrl-C" if watch.signum == signal.SIGINT else "preempted"
        print(f"pretraining in {workdir}: {who}{why} at step {step}: checkpoint saved, rerun the same command "
              f"to resume (exit status {watch.exit_code})", file=sys.stderr, flush=True)
        raise Preempted(step, watch.exit_code)

    end = total_steps if max_steps is None else min(total_steps, max_steps)
    if max_steps is not None and step >= max_steps and step < total_steps:
        warnings.warn(f"{workdir} is at step {step} already, max_steps={max_steps} counts the run's steps in all "
                      "(resumed runs included): nothing to train", stacklevel=2)
    tracer = Profile(workdir, profile, n_proc) if profile is not None else None
    if tracer is not None:
        tracer.plan(step, end)
    bar = tqdm(total=end, initial=step, unit="step", desc="pretrain", disable=not (progress and is_main))
    val_name = "val_mae" if config.task == "age" else "val_accuracy"
    result = {}
    try:
        with _PreemptionWatch(mngr) as watch:
            logged = None if unvalidated is None else _logged_validation(metrics_file, unvalidated, val_name)
            if logged is not None:  # validated by an earlier resume that wrote no later checkpoint
                unvalidated = None
                if best is None or (logged < best if config.task == "age" else logged > best):
                    best = logged
            if unvalidated is not None and not validate(unvalidated, watch):  # preempted again
                stop_preempted()
            while step < end:
                if tracer is not None:
                    with clock.paused():
                        tracer.before(step + 1, in_flight)
                batch = next(data_iter)
                loss, finite = trainer.step(trainer.global_batch(batch["image"]),
                                            trainer.global_batch(batch[label_key]), step)
                step += 1
                if tracer is not None:
                    with clock.paused():
                        tracer.after(step, loss)
                clock.step_done(step, loss)
                pending.append((step, loss, finite))
                in_flight.append(loss)
                if len(in_flight) > TRAIN_IN_FLIGHT:  # bound the steps (and their batches) queued on the device
                    jax.block_until_ready(in_flight.popleft())
                bar.update(1)
                preempted = watch.reached(step)  # every step, on every process: the same answer everywhere
                if step % config.log_every_steps == 0 or step % steps_per_epoch == 0 or step == end or preempted:
                    _raise_if_non_finite(pending, mngr)
                    rate = clock.rate(step)
                    loss_v = float(np.mean([float(v) for _, v, _ in pending]))
                    pending = []
                    record = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_v,
                              "lr": trainer.schedule(step - 1)}
                    log(record | ({} if rate is None else {"volumes_per_s": rate}))
                    bar.set_postfix(loss=f"{loss_v:.3f}", **({} if rate is None else {"vol_s": f"{rate:.1f}"}))
                if step % steps_per_epoch == 0:
                    if len(val_idx) and not validate(step // steps_per_epoch, watch):
                        preempted = True  # checkpoint now (marked unvalidated), validate on resume
                    save(step)
                elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                    save(step)
                if preempted:
                    stop_preempted()
        mngr.wait_until_finished()
        if mngr.latest_step() != step:
            save(step)
        result = {"steps": step, "epochs": step / steps_per_epoch, "complete": step >= total_steps}
        if len(test_idx):
            result |= _test_metrics(trainer, workdir / "best", source, train_idx, test_idx, label_key, progress)
            bar.set_postfix({k: f"{v:.3f}" for k, v in result.items() if k.startswith("test_")
                             and "baseline" not in k})
    finally:
        mngr.wait_until_finished()
        bar.close()
        if tracer is not None:  # stopped inside the window (preempted, an error)
            tracer.stop()
    mngr.close()
    log({"final": result})
    return _export(trainer, workdir / "model", source, config, result)


class Profile:
    """Traces train steps `first`..`last` with the JAX profiler into `workdir/profile` (per process when there are
    several): a TensorBoard profile and a Perfetto trace (ui.perfetto.dev), and top_ops.json, the XLA ops (on a
    GPU/TPU: device kernels) that took the most time per traced step, whose first lines are printed. A profiler
    failure warns and never stops training."""

    def __init__(self, workdir: Path, steps: tuple[int, int], n_proc: int):
        self.first, self.last = steps
        self.dir = workdir / "profile" / (f"process{jax.process_index()}" if n_proc > 1 else "")
        self.tracing, self.traced = False, 0

    def plan(self, done: int, end: int) -> None:
        """This run trains steps done+1..end: warn when the window is missed or cut."""
        asked = (self.first, self.last)
        if not done < self.first <= end:
            warnings.warn(f"profile={asked!r}: this run trains steps {done + 1}..{end}, so nothing is traced",
                          stacklevel=3)
        elif self.last > end:
            self.last = end
            warnings.warn(f"profile={asked!r}: this run ends at step {end}, so steps {self.first}..{end} are traced",
                          stacklevel=3)

    def before(self, step: int, in_flight) -> None:
        if step != self.first:
            return
        jax.block_until_ready(list(in_flight))  # earlier steps still queued on the device stay out of the trace
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
            self.tracing = True
        except Exception as e:  # e.g. a trace already running
            warnings.warn(f"profiling steps {self.first}..{self.last} failed to start: {type(e).__name__}: {e}",
                          stacklevel=3)

    def after(self, step: int, loss: jax.Array) -> None:
        if self.tracing:
            self.traced += 1
            if step >= self.last:
                jax.block_until_ready(loss)  # the last traced step's device work inside the trace
                self.stop()

    def stop(self) -> None:
        """End the trace (also when training stopped inside the window) and summarise it."""
        if not self.tracing:
            return
        self.tracing = False
        first, last = self.first, self.first + self.traced - 1
        try:
            from jaxtl.bench import summarize_trace

            jax.profiler.stop_trace()
            traces = sorted(self.dir.glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
            top = summarize_trace(traces[-1], max(self.traced, 1)) if traces else []
            _write_json(self.dir / "top_ops.json", top, indent=1)
        except Exception as e:  # a full disk, the trace conversion: the run itself goes on
            warnings.warn(f"profiling steps {first}..{last} failed: {type(e).__name__}: {e}", stacklevel=2)
            return
        lines = [f"  {t['ms_per_step']:9.3f} ms/step  {t['name'][:90]}" for t in top[:5]]
        print(f"jaxtl pretrain: profile of steps {first}..{last} in {self.dir} (tensorboard --logdir, or "
              "perfetto_trace.json.gz in ui.perfetto.dev); " + ("most time:" if lines else "no ops recorded"),
              *lines, sep="\n", file=sys.stderr, flush=True)


def _test_metrics(trainer: Trainer, best_dir: Path, source: CacheSource, train_idx: np.ndarray,
                  test_idx: np.ndarray, label_key: str, progress: bool = False) -> dict:
    """Test MAE / accuracy of the current (final) model as `test_mae` / `test_accuracy` and of the exported
    best-validation model `best_dir` as `test_mae_best` / `test_accuracy_best` (with `best_epoch`), beside
    the baselines `test_baseline_mae` (predicting the training mean age) / `test_baseline_accuracy` (the best
    constant prediction: the test split's majority share)."""
    key = "mae" if label_key == "age" else "accuracy"
    out = {f"test_{key}": trainer.evaluate(source, test_idx, label_key, progress=progress)}
    has_best = (best_dir / "model.json").exists()
    if jax.process_count() > 1:  # every process must run the evaluation below, or none (it is collective)
        from jax.experimental import multihost_utils

        has_best = bool(multihost_utils.broadcast_one_to_all(np.array(has_best)))
    if has_best:
        exported = load_model(best_dir, dtype=jnp.dtype(trainer.config.model.dtype))
        # As host arrays: placing arrays committed to one local device on a multi-process mesh would be a
        # cross-host transfer; host arrays are put on every process's devices (multi-host safe).
        nnx.update(exported.model, jax.tree.map(np.asarray, nnx.state(exported.model, WEIGHTS)))
        best = Trainer.create(trainer.config, 1, model=exported.model, mesh=trainer.mesh)
        out[f"test_{key}_best"] = best.evaluate(source, test_idx, label_key, progress=progress)
        out["best_epoch"] = exported.meta.get("epoch")
    out[f"test_baseline_{key}"] = _baseline(source, train_idx, test_idx, label_key)
    return out


def _baseline(source, train_idx, test_idx, label_key: str) -> float:
    """Test MAE of predicting the training mean (age) / accuracy of the best constant prediction, the test split's
    majority share (sex: what a model must beat; the training split's majority class can be the test's minority)."""
    y_train = (source.ages if label_key == "age" else source.sexes)[train_idx]
    y_test = (source.ages if label_key == "age" else source.sexes)[test_idx]
    if label_key == "age":
        return float(np.mean(np.abs(y_test - y_train.mean())))
    male = float(np.mean(y_test == 1))
    return max(male, 1 - male)


def _raise_if_non_finite(losses: list, mngr: ocp.CheckpointManager) -> None:
    for s, v, finite in losses:
        if not (bool(finite) and math.isfinite(float(v))):
            last = mngr.latest_step()
            kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint yet"
            raise NonFiniteLossError(
                f"loss, parameters or BatchNorm statistics became non-finite at step {s}; stopping ({kept}). The "
                "same command would repeat the same steps: resume with a lower learning rate (--set optim.lr=..., "
                "or optim.gamma / optim.step_epochs; the schedule may change on resume), check the inputs for "
                "NaN/Inf, or start again in a new --workdir")


def _export(trainer: Trainer, path: Path, source: CacheSource, config: TrainConfig, meta: dict) -> Path:
    model = trainer.model()
    index_meta = {"trained_on": str(source.cache_dir), "config": to_dict(config), **meta}
    task = make_task(config.task, config.bin_range, config.sigma)
    preprocessing = _preprocessing(source)
    return save_model(model, path, task, input_shape=source.shape, preprocessing=preprocessing,
                      meta=index_meta, overwrite=True)


def _preprocessing(source: CacheSource) -> dict:
    return {**DEFAULT_PREPROCESSING, "downsample": source.downsample}


def model_state(trainer: Trainer) -> dict:
    """Parameters and BatchNorm statistics as a pure dict of numpy arrays (for comparisons)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trainer.model(), WEIGHTS)))
