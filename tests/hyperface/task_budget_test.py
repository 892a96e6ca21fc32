"""Budget allocation across tasks: per-task clip groups
(``config.clip_groups``, clip_groups.py) and bounded learned task weights
(``config.task_weight_bound``, task_weighting.BoundedUncertaintyWeighting).

The groups cover every parameter once with total clip norm C; through the
real per-image loss of a tiny Cross-SEC HyperFace with both levers on,
removing one image moves the clipped sum by at most C and each group of one
image's contribution is at most C_g; the bounded weights stay within their
factor for any raw value; the DP train step runs with the groups.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dplh_jax.dp import dp_transform
from dplh_jax.dp import group_clipping
from dplh_jax.hyperface import clip_groups
from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import models
from dplh_jax.hyperface import task_weighting
from dplh_jax.hyperface import train_step
from dplh_jax.hyperface.configs import tiny

import sensitivity_case as case  # tests/hyperface, on setup.cfg's pythonpath

# The shared tiny Cross-SEC case (uncertainty weighting, de-correlation and
# dropout on, C = 0.01) with both levers on.
BOUND = 2.0
CONFIG = case.config(clip_groups='per_task', task_weight_bound=BOUND)
MODEL, WEIGHTING = model_setup.build_model(CONFIG)
C = CONFIG.l2_norm_clip
TOLERANCE = 1e-4  # float32 rounding of the norms and sums, relative


def _abstract_params(model):
  crops = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), crops)


@pytest.mark.parametrize('task_weighting_kind', ['uncertainty', 'fixed'])
@pytest.mark.parametrize('task_features', ['shared', 'cross_sec'])
def test_groups_cover_every_parameter_once_with_total_c(
    task_features, task_weighting_kind):
  config = tiny.get_config()
  config.update(task_features=task_features, clip_groups='per_task',
                task_weighting=task_weighting_kind)
  model, _ = model_setup.build_model(config)
  params = _abstract_params(model)
  norms = clip_groups.clip_norms(config, model)
  _, assignment = norms.assign(params)  # raises on an empty group
  paths = group_clipping.leaf_paths(params)
  assert sorted(path for path, _ in assignment.leaves) == sorted(paths)
  assert len(set(paths)) == len(paths)  # each parameter once
  expected = {'trunk'} | {f'{t}_head' for t in models.TASK_NAMES}
  if task_weighting_kind == 'uncertainty':
    expected.add(models.LOG_SIGMA_SQ)
  assert {group for _, group in assignment.leaves} == expected
  for path, group in assignment.leaves:
    if path[1:3] == (models.TRUNK, models.CROSS_SEC_GATES):
      # A task's gate goes with its head: e.g. gender_squeeze -> gender_head.
      assert group == path[3].rsplit('_', 1)[0] + '_head', path
    elif path[1] == models.TRUNK:
      assert group == 'trunk', path
    else:
      assert group == path[1], path
  # C_g = C / sqrt(G) to an ulp, and sqrt(sum_g C_g**2) (float64) is C
  # exactly where some C_g gives it (C = 1, 0.01), else the float64 below
  # (C = 0.1, G = 7; C = 3, G = 6): never above the configured C.
  for l2_norm_clip in (1.0, 0.1, 3.0, C):
    config.l2_norm_clip = l2_norm_clip
    norms = clip_groups.clip_norms(config, model)
    assert norms.total_l2_norm_clip <= l2_norm_clip
    assert norms.total_l2_norm_clip == pytest.approx(l2_norm_clip, rel=4e-16)
    if l2_norm_clip in (1.0, C):
      assert norms.total_l2_norm_clip == l2_norm_clip
    for _, share in norms.norms:
      assert share == pytest.approx(l2_norm_clip / math.sqrt(len(expected)),
                                    rel=1e-15)
  # A C whose shares would fall below the smallest clip norm is refused by
  # name, with the smallest C that works.
  config.l2_norm_clip = 2e-30
  with pytest.raises(ValueError, match=r'l2_norm_clip=2e-30 is too small for '
                     r"clip_groups='per_task'.*use l2_norm_clip >= "):
    clip_groups.clip_norms(config, model)
  config.clip_groups = 'none'
  assert clip_groups.clip_norms(config, model) == config.l2_norm_clip


def test_a_parameter_outside_the_groups_is_refused():
  with pytest.raises(ValueError, match='params/trunk/cross_sec/new_gate/'
                     'kernel is in no HyperFace clip group'):
    clip_groups.task_group_of(('params', 'trunk', 'cross_sec', 'new_gate',
                               'kernel'))


@functools.lru_cache(maxsize=None)
def _spec(**overrides):
  # No noise: the step's update is then a function of the clipped sum alone.
  return train_step.StepSpec.from_config(
      case.config(**{'clip_groups': 'per_task', 'task_weight_bound': BOUND,
                     **overrides}), MODEL, WEIGHTING, noise_multiplier=0.0)


@functools.lru_cache(maxsize=None)
def _step():
  """The jitted DP train step with per-task groups, returning the clipped
  sum it noised (read back from Adam's first moment: after one update
  ``mu = (1 - b1) g`` with ``g = sum / B`` when the noise is 0) and its
  metrics. One compile serves every test here."""
  spec = _spec()
  assert spec.optimizer == 'adam'
  step = train_step.make_train_step(spec)
  tx = train_step.make_optimizer(spec, noise_key=0)

  def clipped_sum_and_metrics(params, batch, padding):
    state = train_step.initial_state(params, tx.init(params), 0.0)
    state, metrics = step(state, {**batch, 'is_padding_example': padding},
                          jax.random.fold_in(jax.random.key(0), 2))
    adam = dp_transform.find_state(state.opt_state, optax.ScaleByAdamState,
                                   'is the optimizer adam?')
    return adam.mu, state.params, metrics
  jitted = jax.jit(clipped_sum_and_metrics)

  def run(batch, padding):
    mu, params, metrics = jitted(case.params(), batch, padding)
    scale = spec.expected_batch_size / 0.1  # B / (1 - b1), b1 = 0.9
    return jax.tree.map(lambda m: np.asarray(m, np.float64) * scale,
                        mu), params, metrics
  return run


def _group_norms(tree) -> dict[str, float]:
  """Each group's L2 norm of ``tree`` (a gradient sum), in float64."""
  clip = _spec().clip_norms
  groups, _ = clip.assign(tree)
  squares = {}
  for g, leaf in zip(groups, jax.tree.leaves(tree)):
    name = clip.norms[g][0]
    squares[name] = squares.get(name, 0.0) + float(np.sum(leaf ** 2))
  return {name: math.sqrt(value) for name, value in squares.items()}


def _flat(tree) -> np.ndarray:
  return np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])


def test_removing_an_image_moves_the_per_task_clipped_sum_by_at_most_c():
  """The real per-image loss (Cross-SEC, bounded learned weights inside the
  clip, de-correlation, dropout keyed by image) through the DP train step
  with per-task groups (one-pass clipping): one image alone contributes at
  most C_g in every group, so at most C, and removing it, by masking it or
  by deleting it (later images change slots), moves the sum by exactly its
  contribution. An ordinary image has every group clipped (C = 0.01), so
  its contribution is C = sqrt(sum_g C_g**2)."""
  assert isinstance(WEIGHTING.base, task_weighting.BoundedUncertaintyWeighting)
  shares = dict(_spec().clip_norms.norms)
  assert len(shares) == 7 and _spec().clip_norms.total_l2_norm_clip == C
  run = _step()
  batch = case.batch(seed=3)
  num_images = len(batch['image_index'])
  batch['crops'][4] *= 1e4  # an extreme image
  full = _flat(run(batch, batch['is_padding_example'])[0])
  for i in (4, 1):  # the extreme image, an ordinary one
    alone = run(batch, np.arange(num_images) != i)[0]
    # Every group, log_sigma_sq too: the raw weights are inside the clip.
    for group, norm in _group_norms(alone).items():
      assert norm <= shares[group] * (1 + TOLERANCE), (i, group, norm)
      if i == 1:
        assert norm >= shares[group] * (1 - TOLERANCE), (i, group, norm)
    contribution = np.linalg.norm(_flat(alone))
    assert contribution <= C * (1 + TOLERANCE), (i, contribution)
    for removed in (run(*removal)[0] for removal in case.removals(batch, i)):
      distance = np.linalg.norm(full - _flat(removed))
      assert distance <= C * (1 + TOLERANCE), (i, distance)
      assert distance == pytest.approx(contribution, rel=1e-3), i
  assert contribution == pytest.approx(C, rel=TOLERANCE)  # image 1


def test_the_dp_step_runs_with_the_groups():
  """The step's dp_aggregate is built with the same groups as its clipping
  and takes the sum (it refuses a sum clipped otherwise:
  per_group_clipping_test): the step runs and updates every group."""
  batch = case.batch()
  params = case.params()
  _, new_params, metrics = _step()(batch, batch['is_padding_example'])
  assert float(metrics['clipped_fraction']) == 1.0  # C = 0.01: all clipped
  assert int(metrics['realized_batch_size']) == len(batch['image_index'])
  for name, moved in _group_norms(jax.tree.map(
      lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
      new_params, params)).items():
    assert moved > 0, name  # Adam moves every group, the weights included
  assert train_step.clip_spec(_spec()) is _spec().clip_norms
  assert train_step.clip_spec(_spec(clip_groups='none')) == C


START = task_weighting.initial_log_sigma_sq(
    task_weighting.HYPERFACE_LOSS_WEIGHTS)
START_WEIGHTS = 0.5 * np.exp(-np.asarray(START, np.float64))


def _weights(weighting, raw):
  params = {'params': {models.LOG_SIGMA_SQ: jnp.asarray(raw, jnp.float32)}}
  losses = {t: jnp.float32(1.0) for t in models.TASK_NAMES}
  _, metrics = weighting.combine(params, losses, losses)
  return np.array([metrics['task_weights'][t] for t in models.TASK_NAMES],
                  np.float64)


def test_bounded_weights_stay_within_their_factor_for_any_raw_value():
  weighting = task_weighting.BoundedUncertaintyWeighting.around(
      task_weighting.HYPERFACE_LOSS_WEIGHTS, BOUND)
  rtol = 1e-6  # float32 rounding of s0 + log(bound) and of exp
  for raw in (1e30, -1e30, 50.0, -50.0):
    weights = _weights(weighting, np.full(5, raw, np.float32))
    expected = START_WEIGHTS * (BOUND if raw < 0 else 1 / BOUND)
    np.testing.assert_allclose(weights, expected, rtol=rtol)
  random_raw = np.random.default_rng(0).normal(0, 30, (64, 5))
  for raw in random_raw:
    weights = _weights(weighting, raw.astype(np.float32))
    assert np.all(weights <= START_WEIGHTS * BOUND * (1 + rtol))
    assert np.all(weights >= START_WEIGHTS / BOUND * (1 - rtol))
  # At the start the bounded weights are exactly the start, and they learn
  # as DPLH's there: the same gradient w.r.t. the parameter.
  unbounded = task_weighting.UncertaintyWeighting()
  np.testing.assert_array_equal(_weights(weighting, START),
                                _weights(unbounded, START))

  def gradient_at_start(weighting):
    losses = {t: jnp.float32(0.3 + i) for i, t in enumerate(models.TASK_NAMES)}
    return jax.grad(lambda raw: weighting.combine(
        {'params': {models.LOG_SIGMA_SQ: raw}}, losses, losses)[0])(START)
  np.testing.assert_allclose(gradient_at_start(weighting),
                             gradient_at_start(unbounded), rtol=1e-6)
  # Hashable by value: equal configs share one compiled step.
  assert hash(weighting) == hash(task_weighting.BoundedUncertaintyWeighting
                                 .around(task_weighting.HYPERFACE_LOSS_WEIGHTS,
                                         BOUND))


def test_bound_zero_is_todays_weighting_and_bad_values_are_refused():
  config = tiny.get_config()
  assert config.task_weight_bound == 0 and config.clip_groups == 'none'
  _, weighting = model_setup.build_model(config)
  assert weighting == task_weighting.UncertaintyWeighting()
  config.initial_task_weights = 'equal'
  config.task_weight_bound = 3.0
  _, bounded = model_setup.build_model(config)
  assert bounded.initial_log_sigma_sq == (0.0,) * 5  # zero init: weight 0.5
  np.testing.assert_allclose(_weights(bounded, np.full(5, -1e30)), 1.5,
                             rtol=1e-6)
  for overrides, message in (
      ({'task_weight_bound': 1.0}, r'task_weight_bound=1.0: must be 0'),
      ({'task_weight_bound': math.inf}, r'task_weight_bound=inf: must be 0'),
      ({'task_weighting': 'fixed'}, r"task_weight_bound=3.0: bounds learned "
       r"weights: set task_weighting='uncertainty'"),
      ({'clip_groups': 'per_layer'}, r"clip_groups='per_layer': use one of")):
    bad = tiny.get_config()
    bad.update({'task_weight_bound': 3.0, **overrides})
    with pytest.raises(ValueError, match=message):
      config_validation.validate_config(bad)
