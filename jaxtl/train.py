"""Data-parallel SFCN pretraining: grain input, one jitted step, orbax checkpoints, multi-host.

One code path from a laptop CPU to a TPU pod slice: a 1-D "data" mesh over all devices of all
processes; the global batch is sharded over it and parameters are replicated, so BatchNorm
statistics are computed over the global batch (synchronised BN; Peng's DataParallel computed them
per GPU). Each process reads only its slice of every global batch.

Checkpoints (`WORKDIR/checkpoints`, orbax CheckpointManager) hold parameters, BatchNorm statistics,
optimizer state, the step and the grain iterator state, so a restarted run continues with exactly
the batches it would have seen. `WORKDIR/best` and `WORKDIR/model` are jaxtl model directories
(best validation epoch and final model) that `jaxtl.load_model` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
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

from jaxtl.cache import CacheSource, make_dataset, read_index
from jaxtl.config import OptimConfig, TrainConfig, to_dict
from jaxtl.labels import AgeTask, SexTask, check_in_range, make_task
from jaxtl.model import SFCN, WEIGHTS
from jaxtl.weights import DEFAULT_PREPROCESSING, save_model


class NonFiniteLossError(RuntimeError):
    pass


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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """1-D "data" mesh over all devices of all processes (or `devices`). Auto axes: the compiler propagates
    the batch sharding through the network, so reshapes inside the model need no sharding annotations."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def _loss_fn(model: SFCN, task, images, labels, key):
    log_probs = model(images, rngs=nnx.Rngs(dropout=key))
    return task.loss(log_probs, labels), log_probs


def train_step(graphdef, state, images, labels, key, lr, *, task, trainable):
    """One SGD step with learning rate `lr` on a (sharded) global batch.

    Returns the new state, the batch loss and whether the loss and all new parameters are finite.
    """
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.opt_state.hyperparams["learning_rate"][...] = lr
    grad_fn = nnx.value_and_grad(_loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
    (loss, _), grads = grad_fn(model, task, images, labels, key)
    optimizer.update(model, grads)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
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


@functools.cache
def _jitted_steps(graphdef, task, trainable, mesh):
    """The jitted train and eval steps, one pair per network structure, task, trainable filter and mesh:
    trainers of the same shape reuse the compiled steps."""
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    train_fn = jax.jit(functools.partial(train_step, graphdef, task=task, trainable=trainable),
                       donate_argnums=(0,),
                       in_shardings=(replicated, batch, batch, replicated, replicated),
                       out_shardings=(replicated, replicated, replicated))
    eval_fn = jax.jit(functools.partial(eval_step, graphdef, task=task),
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
        as in the paper's code.
        """
        task = make_task(config.task, config.bin_range, config.sigma)
        mesh = mesh or make_mesh()
        if model is None:
            model = SFCN(config.model.channels, task.num_outputs, config.model.dropout,
                         dtype=jnp.dtype(config.model.dtype), rngs=nnx.Rngs(config.seed))
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

    def evaluate(self, source, indices: np.ndarray, label_key: str) -> float:
        """Mean absolute error (age) or accuracy (sex) over `indices` of `source`, no augmentation."""
        b = self.config.batch_size
        nproc, pid = jax.process_count(), jax.process_index()
        total, count = 0.0, 0.0
        local_b = b // nproc
        for start in range(0, len(indices), b):
            mine = indices[start + pid * local_b:min(start + (pid + 1) * local_b, start + b)]
            images = np.zeros((local_b, *source.shape), np.float32)
            labels = np.zeros((local_b,), np.float32)
            mask = np.zeros((local_b,), np.float32)
            for j, i in enumerate(mine):
                item = source[int(i)]
                images[j], labels[j], mask[j] = item["image"], item[label_key], 1.0
            s, c = self.eval_fn(self.state, self.global_batch(images), self.global_batch(labels),
                                self.global_batch(mask))
            total, count = total + float(s), count + float(c)
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


def train_dataset(source, indices: np.ndarray, config: TrainConfig) -> grain.IterDataset:
    """The training stream (`jaxtl.cache.make_dataset`): seeded shuffle, new order each epoch, endless
    repeat, shift/mirror augmentation, this process's block of every global batch, float32 batches."""
    d = config.data
    return make_dataset(Subset(source, indices), batch_size=config.batch_size // jax.process_count(),
                        seed=config.seed, num_epochs=None, workers=d.workers, wrap=d.wrap, max_shift=d.shift,
                        flip_p=0.5 if d.mirror else 0.0, dtype=np.float32,
                        process_index=jax.process_index(), process_count=jax.process_count())


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int):
    """Seeded random split of range(n) into train/val/test index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return np.sort(perm[n_val + n_test:]), np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test])


# ------------------------------------------------------------------------------------------------
# The run


def _checkpoint_manager(workdir: Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options,
                                 item_names=("state", "data_iter", "meta"))


def _state_target(state, mesh):
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)


def _check_config(workdir: Path, config: TrainConfig) -> None:
    path = workdir / "config.json"
    current = to_dict(config)
    if path.exists():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            raise ValueError(f"{workdir} holds a run with a different config (differs in: {', '.join(diff)}); "
                             "use the same config to resume, or a new --workdir")
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(current, indent=2) + "\n")


def _check_labels(source, indices, config: TrainConfig, cohort: str) -> None:
    key = "age" if config.task == "age" else "sex"
    values = (source.ages if key == "age" else source.sexes)[indices]
    if np.isnan(values).any():
        raise ValueError(f"{cohort}: {int(np.isnan(values).sum())} scan(s) have no {key}; "
                         f"pretraining for {key} needs a label for every scan")
    if key == "age":
        check_in_range(values, config.bin_range)


def pretrain(config: TrainConfig, cohort: str | os.PathLike, workdir: str | os.PathLike, *,
             progress: bool = True, max_steps: int | None = None) -> Path:
    """Pretrain SFCN on a prepared cache; resumes automatically from `workdir`.

    Returns the exported final model directory (`workdir/model`). `max_steps` stops early (tests).
    """
    workdir = Path(workdir)
    source = CacheSource(cohort)
    n_proc = jax.process_count()
    if config.batch_size % jax.device_count() or config.batch_size % n_proc:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the device count "
                         f"({jax.device_count()}); set --set batch_size=N")
    train_idx, val_idx, test_idx = split_indices(len(source), config.data.val_fraction,
                                                 config.data.test_fraction, config.seed)
    if len(train_idx) < config.batch_size:
        raise ValueError(f"{cohort}: {len(train_idx)} training scans, fewer than one batch of {config.batch_size}")
    _check_labels(source, np.arange(len(source)), config, str(cohort))
    _check_config(workdir, config)
    if jax.process_index() == 0:
        split = {"train": source.ids[train_idx].tolist(), "val": source.ids[val_idx].tolist(),
                 "test": source.ids[test_idx].tolist()}
        (workdir / "split.json").write_text(json.dumps(split) + "\n")

    steps_per_epoch = len(train_idx) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    trainer = Trainer.create(config, steps_per_epoch)
    label_key = "age" if config.task == "age" else "sex"
    data_iter = iter(train_dataset(source, train_idx, config))
    mngr = _checkpoint_manager(workdir)
    step, best, pending = 0, None, []  # pending: losses not yet checked for finiteness
    if mngr.latest_step() is not None:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_state_target(trainer.state, trainer.mesh)),
            data_iter=grain.checkpoint.CheckpointRestore(data_iter),
            meta=ocp.args.JsonRestore()))
        trainer.state = restored["state"]
        step, best = restored["meta"]["step"], restored["meta"]["best"]
    metrics_file = workdir / "metrics.jsonl"
    is_main = jax.process_index() == 0

    def log(record: dict) -> None:
        if is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def save(step: int) -> None:
        _raise_if_non_finite(pending, mngr)
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(trainer.state),
            data_iter=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({"step": step, "best": best})))

    end = total_steps if max_steps is None else min(total_steps, max_steps)
    bar = tqdm(total=end, initial=step, unit="step", desc="pretrain", disable=not (progress and is_main))
    t0, n0 = time.perf_counter(), step
    try:
        while step < end:
            batch = next(data_iter)
            loss, finite = trainer.step(trainer.global_batch(batch["image"]),
                                        trainer.global_batch(batch[label_key]), step)
            step += 1
            pending.append((step, loss, finite))
            bar.update(1)
            if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
                _raise_if_non_finite(pending, mngr)
                rate = (step - n0) * config.batch_size / (time.perf_counter() - t0)
                loss_v = float(np.mean([float(v) for _, v, _ in pending]))
                pending = []
                log({"step": step, "epoch": step / steps_per_epoch, "loss": loss_v, "lr": trainer.schedule(step - 1),
                     "volumes_per_s": rate})
                bar.set_postfix(loss=f"{loss_v:.3f}", vol_s=f"{rate:.1f}")
            if step % steps_per_epoch == 0:
                epoch = step // steps_per_epoch
                if len(val_idx):
                    val = trainer.evaluate(source, val_idx, label_key)
                    better = best is None or (val < best if config.task == "age" else val > best)
                    name = "val_mae" if config.task == "age" else "val_accuracy"
                    log({"step": step, "epoch": epoch, name: val, "best": better})
                    bar.set_postfix(loss=f"{loss_v:.3f}", **{name: f"{val:.3f}"})
                    if better:
                        best = val
                        _export(trainer, workdir / "best", source, config, {"epoch": epoch, name: val})
                save(step)
            elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                save(step)
    finally:
        mngr.wait_until_finished()
        bar.close()
    if mngr.latest_step() != step:
        save(step)
    mngr.wait_until_finished()
    mngr.close()
    result = {"steps": step, "epochs": step / steps_per_epoch}
    if len(test_idx):
        name = "test_mae" if config.task == "age" else "test_accuracy"
        result[name] = trainer.evaluate(source, test_idx, label_key)
        baseline = _baseline(source, train_idx, test_idx, label_key)
        result[name.replace("test_", "test_baseline_")] = baseline
    log({"final": result})
    return _export(trainer, workdir / "model", source, config, result)


def _baseline(source, train_idx, test_idx, label_key: str) -> float:
    """Mean predictor MAE (age) / majority-class accuracy (sex) on the test split."""
    y_train = (source.ages if label_key == "age" else source.sexes)[train_idx]
    y_test = (source.ages if label_key == "age" else source.sexes)[test_idx]
    if label_key == "age":
        return float(np.mean(np.abs(y_test - y_train.mean())))
    return float(np.mean(y_test == (y_train.mean() > 0.5)))


def _raise_if_non_finite(losses: list, mngr: ocp.CheckpointManager) -> None:
    for s, v, finite in losses:
        if not (bool(finite) and math.isfinite(float(v))):
            last = mngr.latest_step()
            kept = f"the last good checkpoint (step {last}) is intact" if last is not None else "no checkpoint yet"
            raise NonFiniteLossError(
                f"loss or parameters became non-finite at step {s}; stopping ({kept}). Lower optim.lr, or check "
                "the inputs for NaN/Inf, then rerun the same command to resume")


def _export(trainer: Trainer, path: Path, source: CacheSource, config: TrainConfig, meta: dict) -> Path:
    model = trainer.model()
    index_meta = {"trained_on": str(source.cache_dir), "config": to_dict(config), **meta}
    task = make_task(config.task, config.bin_range, config.sigma)
    preprocessing = _preprocessing(source)
    return save_model(model, path, task, input_shape=source.shape, preprocessing=preprocessing,
                      meta=index_meta, overwrite=True)


def _preprocessing(source: CacheSource) -> dict:
    index = read_index(source.cache_dir)
    return {**DEFAULT_PREPROCESSING, "downsample": int(index.get("downsample", 1))}


def model_state(trainer: Trainer) -> dict:
    """Parameters and BatchNorm statistics as a pure dict of numpy arrays (for comparisons)."""
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(trainer.model(), WEIGHTS)))
