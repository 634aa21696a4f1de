"""Batched, jitted inference: `embed` (features) and `predict` (age or P(male)).

Each batch is padded to a fixed size (one compilation per input shape) and sharded over all
local devices on a 1-D "data" mesh; parameters are replicated.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxtl.model import SFCN, WEIGHTS
from jaxtl.weights import JaxtlModel

LAYERS = ("features", "logits", "probs")


def _layer_output(model: SFCN, x: jax.Array, layer: str) -> jax.Array:
    if layer == "features":
        return model.features(x)
    if layer == "logits":
        return model(x)
    if layer == "probs":
        return jnp.exp(model(x))
    if layer.startswith("block"):
        return model.block_outputs(x)[int(layer[5:])].astype(jnp.float32).mean(axis=(1, 2, 3))
    raise ValueError(f"unknown layer {layer!r}; use one of {LAYERS} or 'block0'..'block5'")


@functools.cache
def _jitted(layer: str):
    @jax.jit
    def apply(graphdef, state, x):
        return _layer_output(nnx.merge(graphdef, state), x, layer)

    return apply


def _data_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.local_device_count(),), ("data",), devices=jax.local_devices())


def _batches(volumes, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(volumes), batch_size):
        yield np.asarray(volumes[start:start + batch_size], dtype=np.float32)


def apply_batched(model: SFCN, volumes, layer: str = "features", *, batch_size: int | None = None,
                  progress: bool = True, dtype=None) -> np.ndarray:
    """Run `model` in eval mode over `(N, D, H, W)` volumes (any array-like with slicing) in padded batches."""
    if layer not in LAYERS and not layer.startswith("block"):
        _layer_output(model, None, layer)  # raises the standard message
    n_dev = jax.local_device_count()
    batch_size = batch_size or 2 * n_dev
    batch_size = -(-batch_size // n_dev) * n_dev  # a multiple of the device count
    mesh = _data_mesh()
    model.eval()
    if dtype is not None and dtype != model.dtype:
        model = _with_dtype(model, dtype)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x_sharding = NamedSharding(mesh, P("data"))
    fn = _jitted(layer)
    n = len(volumes)
    outs = []
    bar = tqdm(total=n, unit="vol", desc=f"embed ({layer})", disable=not progress or n <= batch_size)
    for batch in _batches(volumes, batch_size):
        m = batch.shape[0]
        if m < batch_size:  # pad instead of recompiling for the last batch
            batch = np.concatenate([batch, np.zeros((batch_size - m, *batch.shape[1:]), batch.dtype)])
        out = fn(graphdef, state, jax.device_put(batch, x_sharding))
        outs.append(np.asarray(out)[:m])
        bar.update(m)
    bar.close()
    if not outs:
        raise ValueError("no volumes to process")
    return np.concatenate(outs)


def _with_dtype(model: SFCN, dtype) -> SFCN:
    """A copy of `model` computing in `dtype` (parameters stay float32)."""
    new = SFCN(model.channels, model.num_outputs, model.dropout.rate, dtype=dtype, rngs=nnx.Rngs(0))
    nnx.update(new, nnx.state(model, WEIGHTS))
    new.eval()
    return new


def _unwrap(model) -> SFCN:
    return model.model if isinstance(model, JaxtlModel) else model


def embed(volumes, model: JaxtlModel | SFCN, *, layer: str = "features", batch_size: int | None = None,
          dtype=None, progress: bool = True) -> np.ndarray:
    """Embed preprocessed `(N, D, H, W)` volumes: `(N, 64)` features for `layer="features"`.

    Other layers: "logits" (log-probabilities), "probs", "block0".."block5" (pooled block outputs).
    `dtype=jnp.bfloat16` computes in bfloat16 with float32 parameters.
    """
    return apply_batched(_unwrap(model), volumes, layer, batch_size=batch_size, dtype=dtype, progress=progress)


def predict(volumes, model: JaxtlModel, *, batch_size: int | None = None, progress: bool = True) -> np.ndarray:
    """Predicted age in years (age models) or P(male) (sex models) for preprocessed `(N, D, H, W)` volumes."""
    if not isinstance(model, JaxtlModel):
        raise ValueError("predict needs a JaxtlModel (from jaxtl.load_model), which knows its task and bins")
    log_probs = apply_batched(model.model, volumes, "logits", batch_size=batch_size, progress=progress)
    return np.asarray(model.task.decode(jnp.asarray(log_probs)))
