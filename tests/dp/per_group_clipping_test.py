"""Per-group clipping: each group of parameters clipped to its own C_g, the
sum's sensitivity sqrt(sum_g C_g^2), noise sigma * C_total once on the sum
(dplh_jax.dp.group_clipping, clip_plan; docs/DESIGN.md, Adjacency and
accounting)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.dp import dp_transform
from dplh_jax.dp import group_clipping
from dplh_jax.dp import per_example
from dplh_jax.dp import sensitivity_audit as audit

TOLERANCE = 1e-4  # float32 rounding of the norms and sums
# A small model with what broke before: a 2-D conv, LayerNorm, dropout keyed
# by identity, two rows per example, a parameter outside any layer.
SPEC = audit.ModelSpec(
    input_shape=(4, 4, 2), rows=2,
    convs=(audit.ConvSpec(2, (2, 2), (1, 1), (1, 1), 'SAME', True),),
    norm='layer', dropout_rate=0.5, dense_features=3, dense_bias=True,
    extra_param=True)
# Kernels and biases of one layer in different groups, norms 1e-3..1e2.
BY_NAME = group_clipping.GroupClipNorms.from_function(
    lambda path: path[-1],
    {'kernel': 1.0, 'bias': 1e-2, 'scale': 1e2, 'gain': 1e-3})
BATCH_SEEDS = (0, 1, 2, 3, 4, 5)


def _batches():
  return [audit.random_batch(SPEC, np.random.default_rng(seed))
          for seed in BATCH_SEEDS]


def test_the_batches_are_adversarial():
  batches = _batches()
  values = np.concatenate([b['x'].ravel() for b in batches]
                          + [b['target'].ravel() for b in batches])
  finite = np.abs(values[np.isfinite(values)])
  assert not np.all(np.isfinite(values))
  assert finite.max() > 1e15 and finite[finite > 0].min() < 1e-15


@pytest.mark.parametrize('path, microbatch_size',
                         [('vmap', None), ('one_pass', None)])
def test_removing_one_example_moves_each_group_by_at_most_its_norm(
    path, microbatch_size):
  for batch in _batches():
    ratios = audit.removal_ratios(SPEC, batch, path, BY_NAME, microbatch_size,
                                  same_shape=True)
    # Every group within C_g, so the whole move within sqrt(sum C_g^2).
    assert max(ratios.values()) <= 1 + TOLERANCE, ratios
    assert set(ratios) >= {'total', 'group kernel', 'group bias',
                           'group scale', 'group gain'}


def test_vmap_and_one_pass_agree_per_group():
  batch = audit.random_batch(SPEC, np.random.default_rng(100))
  batch['x'] = np.random.default_rng(1).normal(size=batch['x'].shape).astype(
      np.float32)
  batch['target'] = np.ones_like(batch['target'])
  model = audit.RandomNet(SPEC)
  params = model.init(jax.random.key(0), batch['x'][0])
  rng, padding = jax.random.key(1), np.array([False, False, True, False])
  vmap_sum, one_pass_sum = (
      audit._clipped_sum_fn(SPEC, path, BY_NAME, mb)(  # pylint: disable=protected-access
          params, batch, rng, padding, None)
      for path, mb in (('vmap', None), ('one_pass', None)))
  assert vmap_sum.clipping == one_pass_sum.clipping
  assert vmap_sum.l2_norm_clip == one_pass_sum.l2_norm_clip
  assert int(vmap_sum.num_clipped) == int(one_pass_sum.num_clipped) > 0
  for a, b in zip(jax.tree.leaves(vmap_sum.grad_sum),
                  jax.tree.leaves(one_pass_sum.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(
        np.max(np.abs(a)) + 1e-30))


def _linear_loss(params, example):
  return sum(jnp.vdot(params[k], example[k]) for k in params)


PARAMS = {'a': jnp.zeros(2), 'b': jnp.zeros(3)}
A_AND_B = group_clipping.GroupClipNorms.from_tree({'a': 3.0, 'b': 4.0})


def test_each_group_is_clipped_by_its_own_norm_and_counted_once():
  grads = {'a': jnp.array([[30.0, 40.0], [0.3, 0.4], [1.0, 0.0], [0.0, 0.0]]),
           'b': jnp.array([[0.0, 0.0, 1.0], [0.0, 8.0, 0.0],
                           [0.0, 0.0, np.nan], [1.0, 0.0, 0.0]])}
  padding = jnp.array([False, False, False, True])
  clipped = jax.jit(dp_transform.clip_and_sum, static_argnums=1)(
      grads, A_AND_B, padding)
  # a: example 0 clipped 50 -> 3, example 1 kept; b: example 1 clipped 8 -> 4.
  # Example 2 has a NaN in b only: zero in a too. Example 3 is padding.
  np.testing.assert_allclose(clipped.grad_sum['a'], [1.8 + 0.3, 2.4 + 0.4],
                             rtol=1e-6)
  np.testing.assert_allclose(clipped.grad_sum['b'], [0.0, 4.0, 1.0],
                             rtol=1e-6)
  assert int(clipped.num_examples) == 3
  assert int(clipped.num_clipped) == 2  # examples 0 and 1, once each
  assert int(clipped.num_non_finite) == 1
  assert clipped.l2_norm_clip == 5.0 == A_AND_B.total_l2_norm_clip


def test_total_sensitivity_is_computed_in_float64():
  norms = {f'g{i}': 0.1 * (i + 1) for i in range(7)}
  clip = group_clipping.GroupClipNorms.from_function(lambda p: 'g0', norms)
  assert clip.total_l2_norm_clip == math.sqrt(math.fsum(
      c * c for c in norms.values()))


def test_noise_std_is_sigma_times_the_total_norm():
  """Isotropic noise sigma * sqrt(3^2 + 4^2) = 5 sigma on every coordinate,
  whichever group; 2 x 10k draws: the std is within 3% (s.e. 0.7%)."""
  sigma, batch = 0.8, 4
  params = {'a': jnp.zeros(10_000), 'b': jnp.zeros(10_000)}
  tx = dp_transform.dp_aggregate(A_AND_B, sigma, batch, key=3)

  @jax.jit
  def update(state):
    clipped = per_example.clipped_grad_sum(_linear_loss, A_AND_B)(
        params, jax.tree.map(lambda p: jnp.zeros((2,) + p.shape), params))
    return tx.update(clipped, state, params)[0]

  out = update(tx.init(params))
  for leaf in jax.tree.leaves(out):
    assert float(jnp.std(leaf)) == pytest.approx(sigma * 5.0 / batch,
                                                 rel=0.03)


def test_a_sum_clipped_otherwise_is_refused():
  grads = {'a': jnp.ones((2, 2)), 'b': jnp.ones((2, 3))}
  other = group_clipping.GroupClipNorms.from_tree({'a': 4.0, 'b': 3.0})
  tx = dp_transform.dp_aggregate(A_AND_B, 1.0, 4, key=0)
  state = tx.init(PARAMS)

  def clipped(clipping):  # the ClippedSum's structure: no compile needed
    return jax.eval_shape(
        lambda g: dp_transform.clip_and_sum(g, clipping), grads)

  jax.eval_shape(lambda s: tx.update(s, state, PARAMS), clipped(A_AND_B))
  for clipping in (other, 5.0):  # same total 5, other groups / flat
    with pytest.raises(ValueError, match='clip with the same l2_norm_clip'):
      tx.update(clipped(clipping), state, PARAMS)
  flat = dp_transform.dp_aggregate(5.0, 1.0, 4, key=0)
  with pytest.raises(ValueError, match='clipped to groups'):
    flat.update(clipped(A_AND_B), flat.init(PARAMS))


@pytest.mark.parametrize('make, message', [
    (lambda: group_clipping.GroupClipNorms.from_tree({'a': 1.0}),
     'params|Parameter b is under no leaf'),
    (lambda: group_clipping.GroupClipNorms.from_tree(
        {'a': 1.0, 'b': 1.0, 'c': 1.0}), r"\['c'\] hold no parameter"),
    (lambda: group_clipping.GroupClipNorms.from_function(
        lambda p: 'x', {'y': 1.0}), "group 'x', which has no clip norm"),
    (lambda: group_clipping.GroupClipNorms.from_tree({'a': 0.0, 'b': 1.0}),
     "clip norm of group 'a' must be finite and > 0"),
    (lambda: group_clipping.GroupClipNorms.from_tree({'a': 1e31, 'b': 1.0}),
     r'must be in \[1e-30, 1e\+30\]'),
    (lambda: group_clipping.GroupClipNorms.from_tree({'a': True, 'b': 1.0}),
     'not the bool True'),
])
def test_bad_groupings_are_refused(make, message):
  with pytest.raises(ValueError, match=message):
    dp_transform.clip_and_sum({'a': jnp.ones((2, 2)), 'b': jnp.ones((2, 3))},
                              make())


def test_group_names_must_be_strings():
  with pytest.raises(TypeError, match='names must be strings, got 1'):
    group_clipping.GroupClipNorms.from_function(lambda p: 1, {1: 1.0})
  returns_int = group_clipping.GroupClipNorms.from_function(
      lambda p: 1, {'1': 1.0})
  with pytest.raises(TypeError, match='to 1, not a string'):
    returns_int.assign(PARAMS)


def test_paths_that_join_alike_are_different_groupings():
  """{'a/b': {'c'}} and {'a': {'b/c'}} both join to 'a/b/c'."""
  grads = {'a/b': {'c': jnp.ones((2, 1))}, 'a': {'b/c': jnp.ones((2, 1))}}
  norms = {'big': 10.0, 'small': 0.1}
  first = group_clipping.GroupClipNorms.from_function(
      lambda p: 'big' if p[0] == 'a/b' else 'small', norms)
  second = group_clipping.GroupClipNorms.from_function(
      lambda p: 'small' if p[0] == 'a/b' else 'big', norms)
  assert first.assign(grads)[1] != second.assign(grads)[1]
  clipped = jax.eval_shape(
      lambda g: dp_transform.clip_and_sum(g, first), grads)
  tx = dp_transform.dp_aggregate(second, 1.0, 2, key=0)
  with pytest.raises(ValueError, match='clip with the same l2_norm_clip'):
    tx.update(clipped, tx.init(None))
