"""Tests of dplh_jax.hyperface.task_weighting: fixed weights and learned log sigma^2."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dplh_jax.hyperface import models
from dplh_jax.hyperface import task_weighting

TASKS = models.TASK_NAMES


def _params(log_sigma_sq):
  return {'params': {models.LOG_SIGMA_SQ: jnp.asarray(log_sigma_sq,
                                                      jnp.float32)}}


def _scalars(values):
  return {task: jnp.float32(v) for task, v in zip(TASKS, values)}


def test_fixed_weighting_is_hyperface_weighted_sum():
  weighting = task_weighting.FixedWeighting()
  task_losses = _scalars([1.0, 2.0, 3.0, 4.0, 5.0])
  loss, metrics = weighting.combine(None, task_losses, task_losses)
  # 1*1 + 5*2 + 0.5*3 + 5*4 + 2*5
  assert float(loss) == pytest.approx(42.5)
  assert {t: float(w) for t, w in metrics['task_weights'].items()} == (
      task_weighting.HYPERFACE_LOSS_WEIGHTS)


@pytest.mark.parametrize('regularizer_scale', [1.0, 0.5])
def test_log_sigma_gradient_matches_analytic_formula(regularizer_scale):
  weighting = task_weighting.UncertaintyWeighting(regularizer_scale)
  log_var = np.array([-1.0, 0.0, 0.3, 1.2, -0.4], np.float32)
  task_losses = _scalars([0.7, 2.5, 0.0, 1.3, 0.9])
  counts = _scalars([4, 10, 0, 2, 1])  # visibility absent from this image

  def loss_of(log_var):
    return weighting.combine(_params(log_var), task_losses, counts)[0]

  loss, grad = jax.value_and_grad(loss_of)(jnp.asarray(log_var))
  losses_ = np.array([float(task_losses[t]) for t in TASKS])
  present = np.array([float(counts[t]) > 0 for t in TASKS])
  # L = sum 0.5 exp(-s) L_i + c s [n_i > 0];  dL/ds = -0.5 exp(-s) L_i + c.
  expected_loss = np.sum(0.5 * np.exp(-log_var) * losses_
                         + regularizer_scale * log_var * present)
  expected_grad = np.where(present,
                           -0.5 * np.exp(-log_var) * losses_
                           + regularizer_scale, 0.0)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)
  assert grad[2] == 0.0  # absent task: exactly no pull on its sigma


def test_uncertainty_metrics_report_sigma_and_effective_weight():
  weighting = task_weighting.UncertaintyWeighting()
  log_var = np.log(np.array([1.0, 4.0, 0.25, 1.0, 9.0], np.float32))
  _, metrics = weighting.combine(_params(log_var), _scalars([1.0] * 5),
                                 _scalars([1] * 5))
  np.testing.assert_allclose([metrics['sigma'][t] for t in TASKS],
                             [1.0, 2.0, 0.5, 1.0, 3.0], rtol=1e-6)
  np.testing.assert_allclose([metrics['task_weights'][t] for t in TASKS],
                             [0.5, 0.125, 2.0, 0.5, 1 / 18], rtol=1e-6)


def test_uncertainty_weighting_needs_learned_log_sigma():
  with pytest.raises(ValueError, match='learn_task_weights'):
    task_weighting.UncertaintyWeighting().combine(
        {'params': {}}, _scalars([1.0] * 5), _scalars([1] * 5))


@pytest.mark.parametrize('regularizer_scale', [1.0, 0.5])
def test_learned_weights_down_weight_the_noisier_task(regularizer_scale):
  """Two regressions of the same signal; the 'pose' labels are 10x noisier.

  Detection and pose stand in for any two tasks; the other three are absent
  (count 0), which also checks that absent tasks' sigmas stay put.
  """
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(256, 4)).astype(np.float32)
  true_w = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  clean = inputs @ true_w + 0.1 * rng.normal(size=256).astype(np.float32)
  noisy = inputs @ true_w + 1.0 * rng.normal(size=256).astype(np.float32)
  weighting = task_weighting.UncertaintyWeighting(regularizer_scale)
  params = {'params': {models.LOG_SIGMA_SQ: jnp.zeros(5),
                       'w_clean': jnp.zeros(4), 'w_noisy': jnp.zeros(4)}}
  optimizer = optax.adam(0.05)

  def loss_fn(params):
    p = params['params']
    task_losses = {t: jnp.float32(0.0) for t in TASKS}
    task_losses['detection'] = jnp.mean((inputs @ p['w_clean'] - clean) ** 2)
    task_losses['pose'] = jnp.mean((inputs @ p['w_noisy'] - noisy) ** 2)
    counts = {t: jnp.float32(0.0) for t in TASKS}
    counts['detection'] = counts['pose'] = jnp.float32(256.0)
    loss, metrics = weighting.combine(params, task_losses, counts)
    return loss, (task_losses, metrics)

  @jax.jit
  def train(params):
    def step(carry, _):
      params, opt_state = carry
      grads, _ = jax.grad(loss_fn, has_aux=True)(params)
      updates, opt_state = optimizer.update(grads, opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                  None, length=400)
    return params, loss_fn(params)[1]

  params, (task_losses, metrics) = train(params)
  weights = metrics['task_weights']
  # Noisier task -> larger sigma -> smaller weight, by about the ratio of the
  # residual variances (0.01 vs 1.0), since sigma^2 -> L / (2c).
  assert float(weights['pose']) < 0.05 * float(weights['detection'])
  log_var = params['params'][models.LOG_SIGMA_SQ]
  for i, task in enumerate(TASKS):
    if task in ('detection', 'pose'):
      np.testing.assert_allclose(
          jnp.exp(log_var[i]),
          task_losses[task] / (2 * regularizer_scale), rtol=0.1)
    else:
      assert float(log_var[i]) == 0.0


def test_fixed_weighting_hashes_by_value():
  # Equal weightings must share one compiled train step (StepSpec is a cache
  # key), and a dict field would make the dataclass unhashable.
  a = task_weighting.FixedWeighting()
  b = task_weighting.FixedWeighting(dict(task_weighting.HYPERFACE_LOSS_WEIGHTS))
  assert a == b and hash(a) == hash(b)
  assert hash(a) != hash(task_weighting.FixedWeighting(
      dict(task_weighting.HYPERFACE_LOSS_WEIGHTS, gender=3.0)))
