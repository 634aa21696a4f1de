"""Labels, losses and decoding for the two tasks of the paper (TL `sfcn_utils.py`, `sfcn_loss.py`).

Age: 1-year bins over [bin_min, bin_max), Gaussian soft labels (sigma 1) integrated over each bin
and renormalised to sum 1, KL-divergence loss, prediction = expected value over bin centres.
Sex: 2 classes (0 = female, 1 = male), cross-entropy, prediction = P(male).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import ndtr


def check_in_range(ages, bin_range: tuple[float, float], where: str = "",
                   fix: str = "bin_range=({low}, {high}) in Python") -> None:
    """Raise ValueError if any age lies outside [bin_min, bin_max) (or is not finite); `where` (e.g. the cohort)
    leads the message, `fix` (formatted with the covering `low` and `high`) says how to set the range."""
    a = np.asarray(ages, dtype=np.float64).reshape(-1)
    lo, hi = bin_range
    bad = ~((a >= lo) & (a < hi))
    if bad.any():
        examples = ", ".join(f"{v:g}" for v in a[bad][:5])
        finite = a[np.isfinite(a)]
        low, high = (math.floor(finite.min()) - 1, math.ceil(finite.max()) + 1) if finite.size else (0, 0)
        cover = f"; ages span {finite.min():g}-{finite.max():g}, so e.g. {fix.format(low=low, high=high)}" \
            if finite.size else ""
        raise ValueError(
            f"{where + ': ' if where else ''}{int(bad.sum())} age(s) outside the model's bin range [{lo:g}, {hi:g}) "
            f"(e.g. {examples}); choose a bin range that covers the cohort{cover}"
        )


def bin_centers(bin_range: tuple[float, float]) -> jax.Array:
    lo, hi = bin_range
    return lo + 0.5 + jnp.arange(int(round(hi - lo)), dtype=jnp.float32)


def soft_labels(ages, bin_range: tuple[float, float] = (42, 82), sigma: float = 1.0) -> jax.Array:
    """`(N,)` ages -> `(N, K)` soft labels (Peng's `num2vect`, renormalised as in TL).

    sigma == 0 gives one-hot labels of the bin containing the age.
    """
    if not isinstance(ages, jax.core.Tracer):
        check_in_range(ages, bin_range)
    y = jnp.asarray(ages, jnp.float32).reshape(-1, 1)
    c = bin_centers(bin_range)[None, :]
    if sigma == 0:
        return jax.nn.one_hot(jnp.floor(y[:, 0] - bin_range[0]).astype(jnp.int32), c.shape[1])
    a, b = (c - 0.5 - y) / sigma, (c + 0.5 - y) / sigma
    # Phi(b) - Phi(a), taken in whichever tail keeps float32 precision.
    v = jnp.where(a > 0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))
    return v / v.sum(axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class AgeTask:
    """Age regression as classification over 1-year bins."""

    bin_range: tuple[float, float] = (42.0, 82.0)
    sigma: float = 1.0
    name: str = "age"

    def __post_init__(self):
        lo, hi = self.bin_range
        if not (hi > lo and float(hi - lo).is_integer()):
            raise ValueError(f"bin_range {self.bin_range} must be (min, max) with max - min a positive whole number")

    @property
    def num_outputs(self) -> int:
        return int(round(self.bin_range[1] - self.bin_range[0]))

    def targets(self, ages) -> jax.Array:
        return soft_labels(ages, self.bin_range, self.sigma)

    def loss(self, log_probs: jax.Array, ages: jax.Array) -> jax.Array:
        """Batch-mean KL(target || p), PyTorch's `KLDivLoss(reduction='batchmean')`."""
        return optax.losses.kl_divergence(log_probs, self.targets(ages)).mean()

    def decode(self, log_probs: jax.Array) -> jax.Array:
        """Expected age over the bin centres."""
        return jnp.exp(log_probs) @ bin_centers(self.bin_range)

    def metric(self, pred, ages) -> float:
        """Mean absolute error in years."""
        return float(np.mean(np.abs(np.asarray(pred) - np.asarray(ages))))


@dataclasses.dataclass(frozen=True)
class SexTask:
    """Sex classification: 0 = female, 1 = male (as in the paper and Peng's public model)."""

    name: str = "sex"
    num_outputs: int = 2

    def targets(self, sex) -> jax.Array:
        return jax.nn.one_hot(jnp.asarray(sex, jnp.int32), 2)

    def loss(self, log_probs: jax.Array, sex: jax.Array) -> jax.Array:
        return optax.losses.softmax_cross_entropy_with_integer_labels(log_probs, jnp.asarray(sex, jnp.int32)).mean()

    def decode(self, log_probs: jax.Array) -> jax.Array:
        """P(male)."""
        return jnp.exp(log_probs[:, 1])

    def metric(self, pred, sex) -> float:
        """Accuracy of P(male) > 0.5."""
        return float(np.mean((np.asarray(pred) > 0.5) == (np.asarray(sex) == 1)))


def make_task(name: str, bin_range: tuple[float, float] | None = None, sigma: float = 1.0) -> AgeTask | SexTask:
    """`make_task("age", (42, 82))` or `make_task("sex")`."""
    if name == "age":
        return AgeTask(tuple(float(b) for b in (bin_range or (42, 82))), sigma)
    if name == "sex":
        return SexTask()
    raise ValueError(f"unknown task {name!r}: use 'age' or 'sex'")
