"""Soft labels, KL loss, decoding and the sex task, against reference implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import norm

from jaxtl.labels import AgeTask, SexTask, make_task, soft_labels


def num2vect_reference(x, bin_range, bin_step=1, sigma=1.0):
    """Peng's `dp_utils.num2vect` (float64, scipy) followed by TL's renormalisation."""
    bin_start, bin_end = bin_range
    bin_number = int((bin_end - bin_start) / bin_step)
    centers = bin_start + float(bin_step) / 2 + bin_step * np.arange(bin_number)
    v = np.zeros((len(x), bin_number))
    for j, xj in enumerate(x):
        for i in range(bin_number):
            x1, x2 = centers[i] - bin_step / 2, centers[i] + bin_step / 2
            cdfs = norm.cdf([x1, x2], loc=xj, scale=sigma)
            v[j, i] = cdfs[1] - cdfs[0]
    return v / v.sum(axis=1, keepdims=True), centers


@pytest.mark.parametrize("bin_range", [(42, 82), (17, 89), (2, 59)])
def test_soft_labels_match_num2vect(bin_range):
    rng = np.random.default_rng(0)
    ages = np.concatenate([[bin_range[0], bin_range[1] - 1e-3, bin_range[0] + 0.5],
                           rng.uniform(*bin_range, size=60)])
    ref, _ = num2vect_reference(ages, bin_range)
    got = np.asarray(soft_labels(ages, bin_range))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)


def test_soft_labels_sigma_zero_is_one_hot():
    got = np.asarray(soft_labels([42.0, 50.7, 81.9], (42, 82), sigma=0))
    assert got.argmax(1).tolist() == [0, 8, 39] and got.sum() == 3


@pytest.mark.parametrize("ages", [[41.9, 50], [60, 82.0], [float("nan")], [100]])
def test_out_of_range_is_an_error(ages):
    with pytest.raises(ValueError, match=r"outside the model's bin range \[42, 82\)"):
        AgeTask((42, 82)).targets(ages)


def test_out_of_range_message_names_the_cohort_and_a_covering_range():
    from jaxtl.config import TrainConfig, override
    from jaxtl.labels import check_in_range

    with pytest.raises(ValueError, match=r"^caches/ixi: 2 age\(s\) outside .*ages span 19.5-86.2, so e.g. "
                                         r"bin_range=\(18, 88\) in Python$"):
        check_in_range([19.5, 50.0, 86.2], (42, 82), "caches/ixi")
    # the hint of `jaxtl pretrain` pastes into a shell as it is (it had said --set bin_range=(18,88))
    with pytest.raises(ValueError, match=r"so e.g. --set bin_range=18,88$"):
        check_in_range([19.5, 50.0, 86.2], (42, 82), "caches/ixi", fix="--set bin_range={low},{high}")
    assert override(TrainConfig(), "bin_range=18,88").bin_range == (18, 88)


def test_kl_loss_equals_pytorch_batchmean():
    task = AgeTask((42, 82))
    ages = np.array([45.3, 60.0, 77.7, 51.2], np.float32)
    logits = np.random.default_rng(1).normal(size=(4, 40)).astype(np.float32)
    logp = jax.nn.log_softmax(logits)
    target = np.asarray(task.targets(ages))
    ref = torch.nn.KLDivLoss(reduction="batchmean")(torch.tensor(np.asarray(logp)), torch.tensor(target)).item()
    assert float(task.loss(logp, ages)) == pytest.approx(ref, rel=1e-5)


def test_loss_gradient_is_softmax_minus_target():
    task = AgeTask((42, 82))
    ages = jnp.array([50.0, 70.5])
    logits = jax.random.normal(jax.random.key(0), (2, 40))
    g = jax.grad(lambda z: task.loss(jax.nn.log_softmax(z), ages))(logits)
    expected = (jax.nn.softmax(logits) - task.targets(ages)) / 2
    np.testing.assert_allclose(g, expected, atol=1e-6)
    # the loss is minimised (zero) at the target distribution
    assert float(task.loss(jnp.log(jnp.maximum(task.targets(ages), 1e-30)), ages)) == pytest.approx(0.0, abs=1e-5)


def test_decode_expected_value_recovers_age():
    task = AgeTask((42, 82))
    ages = np.array([50.0, 61.3, 70.9])
    pred = task.decode(jnp.log(jnp.maximum(task.targets(ages), 1e-30)))
    np.testing.assert_allclose(pred, ages, atol=1e-3)
    assert task.metric(pred + 1.0, ages) == pytest.approx(1.0, abs=1e-3)


def test_sex_task():
    task = SexTask()
    logp = jnp.log(jnp.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]))
    sex = jnp.array([0, 1, 0])
    ce = float(task.loss(logp, sex))
    assert ce == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3, rel=1e-5)
    p = task.decode(logp)
    np.testing.assert_allclose(p, [0.1, 0.8, 0.6], rtol=1e-5)
    assert task.metric(p, sex) == pytest.approx(2 / 3)


def test_make_task():
    assert make_task("age", (37, 96)).num_outputs == 59
    assert make_task("sex").num_outputs == 2
    with pytest.raises(ValueError, match="unknown task"):
        make_task("autism")
    with pytest.raises(ValueError, match="whole number"):
        AgeTask((42, 82.5))
