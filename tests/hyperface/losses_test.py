"""Tests of dplh_jax.hyperface.losses: hand-computed task losses, masks, DP end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dplh_jax.dp import dp_transform
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.dp import per_example
from dplh_jax.hyperface import task_weighting

K = 3  # proposals: 0 positive, 1 negative, 2 ignored / padding.
INVISIBLE = (3, 12, 20)  # invisible landmarks of the positive proposal


def _targets(with_masks=True):
  rng = np.random.default_rng(0)
  visibility = np.zeros((K, 21), np.float32)
  visibility[0] = 1.0
  visibility[0, list(INVISIBLE)] = 0.0
  targets = {
      'detection_label': np.array([1, 0, -1], np.int32),
      'landmarks': rng.uniform(-0.5, 0.5, (K, 21, 2)).astype(np.float32),
      'visibility': visibility,
      'pose': rng.uniform(-1, 1, (K, 3)).astype(np.float32),
      'gender': np.array([1, 0, -1], np.int32),
  }
  if with_masks:  # Per-proposal masks, all available. One compile for all.
    for key in ('has_landmarks', 'has_pose', 'has_gender'):
      targets[key] = np.ones((K,), bool)
  return targets


def _outputs():
  rng = np.random.default_rng(1)
  return {task: rng.normal(size=(K, size)).astype(np.float32)
          for task, size in models.TASK_OUTPUT_SIZES.items()}


def _cross_entropy(logits, label):
  return float(np.log(np.sum(np.exp(logits))) - logits[label])


@jax.jit
def _losses_and_jacobian(outputs, targets):
  """Task losses, counts, and d(task loss)/d(outputs) for every task."""
  task_losses, counts = losses.task_losses(outputs, targets)
  jacobian = jax.jacrev(lambda o: losses.task_losses(o, targets)[0])(outputs)
  return task_losses, counts, jacobian


def test_each_task_loss_matches_hand_computation():
  outputs, targets = _outputs(), _targets()
  task_losses, counts, _ = _losses_and_jacobian(outputs, targets)
  # Detection: cross-entropy over the 2 non-ignored proposals.
  expected_detection = (_cross_entropy(outputs['detection'][0], 1)
                        + _cross_entropy(outputs['detection'][1], 0)) / 2
  # Landmarks: positive proposal only, 18 visible points, (dx^2 + dy^2) / 2.
  visible = [j for j in range(21) if j not in INVISIBLE]
  predicted = outputs['landmarks'][0].reshape(21, 2)
  expected_landmarks = sum(
      0.5 * np.sum((predicted[j] - targets['landmarks'][0, j]) ** 2)
      for j in visible) / len(visible)
  # Visibility: positive proposal, all 21 points.
  expected_visibility = np.mean(
      (outputs['visibility'][0] - targets['visibility'][0]) ** 2)
  expected_pose = np.mean((outputs['pose'][0] - targets['pose'][0]) ** 2)
  expected_gender = _cross_entropy(outputs['gender'][0], 1)
  expected = {'detection': expected_detection,
              'landmarks': expected_landmarks,
              'visibility': expected_visibility, 'pose': expected_pose,
              'gender': expected_gender}
  for task in models.TASK_NAMES:
    np.testing.assert_allclose(task_losses[task], expected[task], rtol=1e-5,
                               err_msg=task)
  assert {t: int(c) for t, c in counts.items()} == {
      'detection': 2, 'landmarks': 18, 'visibility': 21, 'pose': 1,
      'gender': 1}


def test_negative_gets_only_detection_and_ignored_gets_nothing():
  _, _, jacobian = _losses_and_jacobian(_outputs(), _targets())
  for task in models.TASK_NAMES:
    for output_name, grad in jacobian[task].items():
      grad = np.asarray(grad)
      # Ignored / padded proposal 2: no task looks at it.
      np.testing.assert_array_equal(grad[2], 0.0)
      # Negative proposal 1: only the detection loss sees its detection logits.
      if task == 'detection' and output_name == 'detection':
        assert np.all(grad[1] != 0.0)
      else:
        np.testing.assert_array_equal(grad[1], 0.0, err_msg=(task, output_name))


def test_invisible_landmark_adds_no_landmark_loss():
  outputs, targets = _outputs(), _targets()
  base, _, jacobian = _losses_and_jacobian(outputs, targets)
  moved = dict(outputs)
  moved['landmarks'] = outputs['landmarks'].copy()
  for j in INVISIBLE:  # move the invisible points' predictions far away
    moved['landmarks'][0, 2 * j:2 * j + 2] += 100.0
  moved_losses, _, _ = _losses_and_jacobian(moved, targets)
  assert float(moved_losses['landmarks']) == float(base['landmarks'])
  grad = np.asarray(jacobian['landmarks']['landmarks'][0]).reshape(21, 2)
  np.testing.assert_array_equal(grad[list(INVISIBLE)], 0.0)
  assert np.all(np.delete(grad, INVISIBLE, axis=0) != 0.0)


@pytest.mark.parametrize('mask_gender', ['minus_one', 'has_gender_false'])
def test_missing_gender_adds_no_gender_loss(mask_gender):
  outputs, targets = _outputs(), _targets()
  if mask_gender == 'minus_one':
    targets['gender'][0] = -1
  else:
    targets['has_gender'][0] = False
  task_losses, counts, jacobian = _losses_and_jacobian(outputs, targets)
  assert float(task_losses['gender']) == 0.0 and int(counts['gender']) == 0
  np.testing.assert_array_equal(jacobian['gender']['gender'], 0.0)
  # The other tasks of the positive proposal are untouched.
  assert float(task_losses['pose']) > 0.0 and int(counts['landmarks']) == 18


def test_availability_masks_gate_their_tasks_only():
  outputs, targets = _outputs(), _targets()
  targets['has_pose'][:] = False
  targets['has_landmarks'][0] = False
  # Unavailable labels may be NaN: they must not leak into loss or gradient.
  targets['pose'][:] = np.nan
  targets['landmarks'][0] = np.nan
  task_losses, counts, jacobian = _losses_and_jacobian(outputs, targets)
  for task in ('landmarks', 'visibility', 'pose'):
    assert float(task_losses[task]) == 0.0 and int(counts[task]) == 0
  assert int(counts['detection']) == 2 and int(counts['gender']) == 1
  for grads in jacobian.values():
    for grad in grads.values():
      assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(jacobian['pose']['pose'], 0.0)


def test_masks_may_be_absent_or_per_image():
  outputs = _outputs()
  all_available, _, _ = _losses_and_jacobian(outputs, _targets())
  targets = _targets(with_masks=False)
  # has_pose absent means "available"; scalar (whole-image) masks broadcast
  # over the proposals.
  targets['has_landmarks'] = np.array(True)
  targets['has_gender'] = np.array(False)
  task_losses, counts, _ = _losses_and_jacobian(outputs, targets)
  for task in ('detection', 'landmarks', 'visibility', 'pose'):
    assert float(task_losses[task]) == float(all_available[task]) > 0.0
  assert float(task_losses['gender']) == 0.0 and int(counts['gender']) == 0


def test_image_without_valid_terms_gives_zero_loss_and_zero_gradient():
  outputs, targets = _outputs(), _targets()
  targets['detection_label'][:] = -1  # an all-padding image
  task_losses, counts, jacobian = _losses_and_jacobian(outputs, targets)
  for task in models.TASK_NAMES:
    assert float(task_losses[task]) == 0.0 and int(counts[task]) == 0
    for grad in jacobian[task].values():
      np.testing.assert_array_equal(grad, 0.0)


# --- End to end: per-image loss -> per_example_grads -> dp_aggregate. ------

B = 2  # images per batch
NUM_PROPOSALS = 4
SMALL = models.HyperFaceConfig.small()


def _random_batch(seed, ignore_everything=False):
  rng = np.random.default_rng(seed)
  labels = np.array([[1, 0, 1, -1], [1, 1, 0, 0]], np.int32)
  if ignore_everything:
    labels[:] = -1
  return {
      'crops': rng.uniform(size=(B, NUM_PROPOSALS, 64, 64, 3)).astype(
          np.float32),
      'detection_label': labels,
      'landmarks': rng.uniform(-0.5, 0.5, (B, NUM_PROPOSALS, 21, 2)).astype(
          np.float32),
      'visibility': (rng.uniform(size=(B, NUM_PROPOSALS, 21)) > 0.3).astype(
          np.float32),
      'pose': rng.uniform(-1, 1, (B, NUM_PROPOSALS, 3)).astype(np.float32),
      'gender': rng.integers(-1, 2, (B, NUM_PROPOSALS)).astype(np.int32),
      'image_index': np.arange(B, dtype=np.int32),
  }


@pytest.fixture(scope='module')
def dp_setup():
  """One compiled per-example gradient function, shared by the tests below."""
  model = models.HyperFace(SMALL)
  params = models.init_variables(model, seed=0)
  loss_fn = functools.partial(losses.per_image_loss, model=model,
                              weighting=task_weighting.UncertaintyWeighting())
  grads_fn = jax.jit(per_example.per_example_grads(loss_fn, has_aux=True))
  _, unravel = ravel_pytree(params)
  # Where log sigma^2 sits in the flat parameter vector.
  marker = jax.tree.map(jnp.zeros_like, params)
  marker['params'][models.LOG_SIGMA_SQ] = jnp.ones(5)
  log_sigma_slice = np.flatnonzero(np.asarray(ravel_pytree(marker)[0]))
  return model, params, grads_fn, unravel, log_sigma_slice


def _flat_per_example(grads):
  # dp_aggregate treats the gradient as one vector (global L2 norm, iid noise
  # per entry), so a single raveled leaf is the same mechanism; it compiles
  # one noise draw instead of one per leaf (each costs ~1 s of XLA on CPU).
  return jax.vmap(lambda g: ravel_pytree(g)[0])(grads)


def test_deterministic_per_image_loss_combines_its_task_losses(dp_setup):
  model, params, _, _, _ = dp_setup
  example = jax.tree.map(lambda x: x[0], _random_batch(0))
  loss, aux = jax.jit(functools.partial(
      losses.per_image_loss, model=model,
      weighting=task_weighting.UncertaintyWeighting()))(params, example, None)
  # log sigma^2 = 0 at init: every task has weight 1/2 and regularizer 0.
  np.testing.assert_allclose(
      loss, 0.5 * sum(aux['task_losses'][t] for t in models.TASK_NAMES),
      rtol=1e-6)
  assert all(float(aux['sigma'][t]) == 1.0 for t in models.TASK_NAMES)
  assert int(aux['task_counts']['detection']) == 3  # one proposal ignored
  assert all(float(aux['task_losses'][t]) > 0 for t in models.TASK_NAMES)


def test_dropout_key_is_per_image_and_reproducible(dp_setup):
  _, params, grads_fn, _, _ = dp_setup
  batch = _random_batch(0)
  same = jax.tree.map(lambda x: np.stack([x[0], x[0]]), batch)
  same['image_index'] = np.array([3, 8], np.int32)
  _, aux = grads_fn(params, same, jax.random.key(5))
  _, aux_again = grads_fn(params, same, jax.random.key(5))
  losses_ = np.asarray(aux['task_losses']['landmarks'])
  # One image's crops as two data-set images: different dropout masks.
  assert losses_[0] != losses_[1]
  np.testing.assert_array_equal(losses_,
                                aux_again['task_losses']['landmarks'])
  # The mask follows the image's identity, not its slot (docs/DESIGN.md, Privacy rules, rule 8).
  same['image_index'] = np.array([8, 8], np.int32)
  _, aux_same = grads_fn(params, same, jax.random.key(5))
  np.testing.assert_array_equal(aux_same['task_losses']['landmarks'],
                                losses_[[1, 1]])


def test_log_sigma_grads_are_inside_the_clipped_norm(dp_setup):
  _, params, grads_fn, unravel, log_sigma_slice = dp_setup
  grads, aux = grads_fn(params, _random_batch(0), jax.random.key(1))
  flat = np.asarray(_flat_per_example(grads), np.float64)
  log_sigma_grads = flat[:, log_sigma_slice]
  # d/ds = -0.5 exp(-s) L + 1 at s = 0 for present tasks: clearly non-zero.
  for i, task in enumerate(models.TASK_NAMES):
    expected = np.where(np.asarray(aux['task_counts'][task]) > 0,
                        1.0 - 0.5 * np.asarray(aux['task_losses'][task]), 0.0)
    np.testing.assert_allclose(log_sigma_grads[:, i], expected, rtol=1e-4,
                               atol=1e-6)
  full_norms = np.linalg.norm(flat, axis=1)
  network_norms = np.linalg.norm(np.delete(flat, log_sigma_slice, axis=1),
                                 axis=1)
  clip = 0.5 * float(min(network_norms.min(), full_norms.min()))
  tx = dp_transform.dp_aggregate(clip, 0.0, B, key=0)
  update, _ = jax.jit(tx.update)(_flat_per_example(grads), tx.init(None))
  update = np.asarray(update)
  expected_with_log_sigma = (log_sigma_grads * (clip / full_norms)[:, None]
                             ).sum(0) / B
  expected_without = (log_sigma_grads * (clip / network_norms)[:, None]
                      ).sum(0) / B
  np.testing.assert_allclose(update[log_sigma_slice], expected_with_log_sigma,
                             rtol=1e-4)
  # The distinction is real: excluding log sigma from the norm differs.
  assert not np.allclose(expected_with_log_sigma, expected_without,
                         rtol=1e-3)
  # And the unravelled update has HyperFace's tree.
  assert jax.tree.structure(unravel(update)) == jax.tree.structure(params)


def test_log_sigma_update_gets_noise_of_std_sigma_c_over_b(dp_setup):
  _, params, grads_fn, _, log_sigma_slice = dp_setup
  # Every proposal ignored: every task absent, so every per-example gradient,
  # log sigma^2 included (gated regularizer), is exactly zero.
  grads, _ = grads_fn(params, _random_batch(1, ignore_everything=True),
                      jax.random.key(1))
  flat = _flat_per_example(grads)
  assert float(jnp.max(jnp.abs(flat))) == 0.0
  noise_multiplier, clip = 2.0, 0.5
  tx = dp_transform.dp_aggregate(clip, noise_multiplier, B, key=7)
  update = jax.jit(tx.update)
  state = tx.init(None)
  expected_std = noise_multiplier * clip / B
  draws = []
  for _ in range(100):
    noised, state = update(flat, state)
    draws.append(np.asarray(noised)[log_sigma_slice])
  # The whole vector of one draw (~260k entries, standard error of the std
  # ~0.14%): the same noise everywhere; allow 1%.
  np.testing.assert_allclose(np.std(np.asarray(noised)), expected_std,
                             rtol=0.01)
  draws = np.concatenate(draws)  # 500 samples of the log sigma^2 entries
  # Std of 500 normals: standard error ~3.2%; 4 standard errors allowed.
  np.testing.assert_allclose(np.std(draws), expected_std, rtol=0.13)
  assert abs(np.mean(draws)) < 4 * expected_std / np.sqrt(draws.size)
  assert len(np.unique(draws)) == draws.size  # fresh noise on every call


def test_small_config_dp_steps_decrease_loss_without_noise(dp_setup):
  _, params, grads_fn, unravel, _ = dp_setup
  batch = _random_batch(2)
  tx = optax.chain(dp_transform.dp_aggregate(1.0, 0.0, B, key=0),
                   optax.adam(1e-3))
  aggregate_and_step = jax.jit(tx.update)
  flat_params, _ = ravel_pytree(params)
  state = tx.init(flat_params)
  history = []
  for step in range(12):
    grads, aux = grads_fn(params, batch, jax.random.key(step))
    task_sum = sum(np.asarray(aux['task_losses'][t]) for t in
                   models.TASK_NAMES)
    history.append(float(np.mean(task_sum)))
    assert all(np.all(np.isfinite(np.asarray(v)))
               for v in jax.tree.leaves(aux))
    updates, state = aggregate_and_step(_flat_per_example(grads), state,
                                        flat_params)
    flat_params = optax.apply_updates(flat_params, updates)
    params = unravel(flat_params)
  # Dropout makes single steps noisy; compare the ends of the run.
  assert np.mean(history[-3:]) < 0.7 * np.mean(history[:3]), history
