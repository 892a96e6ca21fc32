"""Cross-SEC task features, the de-correlation loss and the leakage probes.

The gates are per example (no image's features depend on another image's
crops), the de-correlation loss is 0 for orthogonal descriptors and 1 for
copies, the probes find a planted dependence and none in independent data,
and a tiny cross_sec DP step with de-correlation keeps sensitivity C
(docs/DESIGN.md, Task privacy).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import leakage
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import models

import sensitivity_case as case  # tests/hyperface, on setup.cfg's pythonpath

# The shared tiny Cross-SEC case: de-correlation and dropout keyed by image
# on, C below every image's gradient norm.
NUM_IMAGES, NUM_PROPOSALS = case.NUM_IMAGES, case.NUM_PROPOSALS
L2_NORM_CLIP, CONFIG = case.L2_NORM_CLIP, case.CONFIG
MODEL, WEIGHTING = case.MODEL, case.WEIGHTING


def test_the_cross_sec_params_are_the_shared_ones_plus_the_gates():
  shared, _ = model_setup.build_model(case.config(task_features='shared',
                                              decorrelation_weight=0.0))
  crops = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  paths = [
      {jax.tree_util.keystr(p) for p, _ in
       jax.tree_util.tree_leaves_with_path(
           jax.eval_shape(model.init, jax.random.key(0), crops))}
      for model in (shared, MODEL)]
  extra = paths[1] - paths[0]
  assert paths[0] < paths[1]
  assert all(p.startswith(f"['params']['{models.TRUNK}']"
                          f"['{models.CROSS_SEC_GATES}']") for p in extra)
  # squeeze, excite and cross Dense (kernel + bias) for each of 5 tasks.
  assert len(extra) == 5 * 3 * 2
  with pytest.raises(ValueError, match='decorrelation_weight.*cross_sec'):
    config_validation.validate_config(case.config(task_features='shared'))


def test_gates_are_per_example():
  """Changing image 1's crops changes its own features and outputs only."""
  features = leakage._feature_fn(MODEL)  # pylint: disable=protected-access
  outputs = jax.jit(functools.partial(models.apply_to_images, MODEL))
  crops = case.batch()['crops']
  changed = crops.copy()
  changed[1] = np.random.default_rng(9).uniform(size=changed[1].shape)
  before = jax.device_get((features(case.params(), crops),
                           outputs(case.params(), crops)))
  after = jax.device_get((features(case.params(), changed),
                          outputs(case.params(), changed)))
  others = np.arange(NUM_IMAGES) != 1
  for path, old in jax.tree_util.tree_leaves_with_path(before):
    new = after
    for key in path:
      new = new[key.key if hasattr(key, 'key') else key.idx]
    np.testing.assert_array_equal(old[others], new[others],
                                  err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(old[1], new[1]), jax.tree_util.keystr(path)
  # Each task reads its own gated features.
  task_features = before[0]
  assert not np.allclose(task_features['detection'], task_features['gender'])
  assert before[1][models.TASK_DESCRIPTORS].shape == (
      NUM_IMAGES, NUM_PROPOSALS, len(models.TASK_NAMES),
      round(192 * CONFIG.width_multiplier))


def _decorrelation(descriptors, valid=None):
  descriptors = jnp.asarray(descriptors, jnp.float32)
  if valid is None:
    valid = jnp.ones(descriptors.shape[0], bool)
  return float(losses.decorrelation_loss(descriptors, valid)[0])


def test_decorrelation_loss_orthogonal_independent_and_copies():
  # Rows 1..5 of the 8x8 Hadamard matrix: zero mean, mutually orthogonal.
  hadamard = np.array([[1.0]])
  for _ in range(3):
    hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
  orthogonal = np.stack([hadamard[1:6] * scale for scale in (1.0, 3.0)])
  # Any scale, a channel offset: 0 up to float32 rounding of r (< 1e-6).
  assert _decorrelation(orthogonal + 2.0) < 1e-12
  copies = np.repeat(np.random.default_rng(0).normal(size=(3, 1, 16)), 5, 1)
  assert _decorrelation(copies) == pytest.approx(1.0, abs=1e-6)
  # Independent descriptors of C channels: E[r^2] = 1 / (C - 1).
  channels = 4096
  independent = np.random.default_rng(1).normal(size=(16, 5, channels))
  assert _decorrelation(independent) * (channels - 1) == pytest.approx(
      1.0, abs=0.3)  # 160 pairs: standard error ~0.11
  # Crops that do not count (ignored proposals) add nothing.
  mixed = np.concatenate([orthogonal, copies[:1, :, :8]])
  assert _decorrelation(mixed, jnp.array([True, True, False])) < 1e-12
  # Constant descriptors (dead channels): 0, with a finite gradient.
  grad = jax.grad(lambda d: losses.decorrelation_loss(
      d, jnp.ones(2, bool))[0])(jnp.zeros((2, 5, 8)))
  assert _decorrelation(np.zeros((2, 5, 8))) == 0.0
  assert np.all(np.isfinite(grad))


def test_probe_recovers_a_planted_dependence_and_none_in_independent_data():
  rng = np.random.default_rng(0)
  n = 400
  groups = np.arange(n) // 4  # 4 crops per image, kept in one fold
  x = rng.normal(size=(n, 8)).astype(np.float32)
  planted_class = (x[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
  planted_value = x[:, :3] @ rng.normal(size=(3, 2)) + 0.1 * rng.normal(
      size=(n, 2))
  found = leakage.probe(x, planted_class, groups, 'classification')
  assert found['advantage'] > 0.3 and found['score'] > 0.85
  found = leakage.probe(x, planted_value, groups, 'regression')
  assert found['score'] > 0.95 and abs(found['baseline']) < 0.05
  independent_class = rng.integers(0, 2, n)
  independent_value = rng.normal(size=(n, 2))
  # Tolerances: ~3 standard errors of a 400-sample accuracy / R^2.
  assert abs(leakage.probe(x, independent_class, groups, 'classification')[
      'advantage']) < 0.08
  assert leakage.probe(x, independent_value, groups, 'regression')[
      'score'] < 0.03
  pixels = np.concatenate([x @ rng.normal(size=(8, 6)),
                           rng.normal(size=(n, 6))], 1)
  decoded = leakage.reconstruction(x, pixels, groups)
  assert decoded['mse'] < 0.6 * decoded['baseline_mse']
  assert leakage.reconstruction(
      x, rng.normal(size=(n, 12)), groups)['r2'] < 0.03


def test_a_cross_sec_dp_step_moves_the_clipped_sum_by_at_most_c():
  """The real per-image loss (Cross-SEC, de-correlation on, dropout keyed by
  image) through the train step's clipped sum: removing an image, by
  masking it or by deleting it (later images change slots, its slot becomes
  zero-filled padding), moves the sum by at most C; with every image
  clipped, by exactly C.

  The removals run on the default one-pass path, the one that rebuilds each
  gate layer's gradient from its input and output, for the extreme image and
  one ordinary one (each removal is a full clipped sum: the suite's time
  budget); the vmap path (plain autodiff of the same loss) is checked to
  give the same sum on the full batch."""
  assert isinstance(WEIGHTING, losses.Decorrelated)
  clipped_sum = case.clipped_sum('one_pass')
  batch = case.batch(seed=3)
  batch['crops'][4] *= 1e4  # an extreme image
  rng = jax.random.fold_in(jax.random.key(0), 2)
  full, decorrelation = clipped_sum(case.params(), batch, rng,
                                    batch['is_padding_example'])
  assert np.all(np.asarray(decorrelation) > 0)  # the term is in the loss
  full = np.asarray(full, np.float64)
  # Same loss, same clipping: only float32 summation order differs (~3e-6).
  by_vmap = np.asarray(case.clipped_sum('vmap')(
      case.params(), batch, rng, batch['is_padding_example'])[0], np.float64)
  assert np.linalg.norm(by_vmap - full) < 1e-4 * np.linalg.norm(full)
  for i in (4, 1):  # the extreme image, an ordinary one
    moves = [clipped_sum(case.params(), removed, rng, padding)[0]
             for removed, padding in case.removals(batch, i)]
    for removed in moves:
      distance = np.linalg.norm(full - np.asarray(removed, np.float64))
      assert distance <= L2_NORM_CLIP * (1 + 1e-4), (i, distance)
      assert distance >= L2_NORM_CLIP * (1 - 1e-3), (i, distance)
