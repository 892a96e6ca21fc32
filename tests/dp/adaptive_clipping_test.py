"""Adaptive clipping (Andrew et al. 2021): the sum in units of C has
sensitivity 1 on both paths, the update follows the stated formula with
distinct key splits, C moves to the target quantile, and mismatches are
refused (dplh_jax.dp.adaptive_clipping; docs/DESIGN.md, Adjacency and
accounting)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dplh_jax.dp import adaptive_clipping
from dplh_jax.dp import clip_norms
from dplh_jax.dp import dp_transform
from dplh_jax.dp import per_example
from dplh_jax.dp import sensitivity_audit as audit

ADAPTIVE = adaptive_clipping.ADAPTIVE
TOLERANCE = 1e-4  # float32 rounding of the norms and sums
SPEC = audit.ModelSpec(
    input_shape=(5, 2), rows=2,
    convs=(audit.ConvSpec(2, (2,), (2,), (1,), 'VALID', True),),
    norm='none', dropout_rate=0.5, dense_features=2, dense_bias=True,
    extra_param=True)


@pytest.mark.parametrize('path, microbatch_size',
                         [('vmap', None), ('one_pass', 2)])
def test_removing_one_example_moves_the_sum_by_at_most_one_c(
    path, microbatch_size):
  """The sum is in units of C: it moves by at most 1 (C in real units) and
  the count the clip norm learns from by at most 1, for C from 1e-3 to 1e2
  (traced: one compile) and adversarial batches."""
  for seed, clip_norm in zip(range(6), (1e-3, 1.0, 1e2, 1e-2, 10.0, 1.0)):
    batch = audit.random_batch(SPEC, np.random.default_rng(seed))
    ratios = audit.removal_ratios(SPEC, batch, path, ADAPTIVE,
                                  microbatch_size, clip_norm=clip_norm,
                                  same_shape=True)
    assert ratios['total'] <= 1 + TOLERANCE, (seed, ratios)
    assert ratios['unclipped_count'] <= 1


def test_vmap_and_one_pass_agree():
  rng = np.random.default_rng(7)
  batch = {'x': rng.normal(size=(4, 2) + SPEC.input_shape).astype(np.float32),
           'target': rng.normal(size=(4, 2, 2)).astype(np.float32),
           'id': np.arange(4, dtype=np.int32)}
  params = audit.RandomNet(SPEC).init(jax.random.key(0), batch['x'][0])
  padding = np.array([False, True, False, False])
  vmap_sum, one_pass_sum = (
      audit._clipped_sum_fn(SPEC, path, ADAPTIVE, mb)(  # pylint: disable=protected-access
          params, batch, jax.random.key(1), padding, np.float32(0.05))
      for path, mb in (('vmap', None), ('one_pass', 2)))
  assert int(vmap_sum.num_clipped) == int(one_pass_sum.num_clipped) > 0
  np.testing.assert_allclose(vmap_sum.clip_norm_tag.clip_norm_sum,
                             one_pass_sum.clip_norm_tag.clip_norm_sum)
  for a, b in zip(jax.tree.leaves(vmap_sum.grad_sum),
                  jax.tree.leaves(one_pass_sum.grad_sum)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _loss(w, example):
  return jnp.vdot(w, example)  # the per-example gradient is the example


def test_one_update_is_the_stated_formula_with_three_distinct_keys():
  z, m, sigma_b, clip, eta, gamma = 1.0, 4.0, 1.0, 2.0, 0.2, 0.5
  tx = adaptive_clipping.dp_aggregate_adaptive(
      clip, z, m, key=9, count_stddev=sigma_b, clip_learning_rate=eta,
      target_unclipped_quantile=gamma)
  grads = jnp.array([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 1.0, 1.0],
                     [np.nan, 0.0, 0.0], [9.0, 9.0, 9.0]])
  padding = jnp.array([False, False, False, False, True])
  state = tx.init(jnp.zeros(3))
  out, new = jax.jit(tx.update)(grads, state, is_padding_example=padding)

  grad_key, count_key, next_key = jax.random.split(
      state.aggregate.noise_key, 3)
  keys = [jax.random.key_data(k) for k in
          (state.aggregate.noise_key, grad_key, count_key, next_key)]
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == 4
  np.testing.assert_array_equal(jax.random.key_data(new.aggregate.noise_key),
                                jax.random.key_data(next_key))
  z_grad = (z**-2 - (2 * sigma_b)**-2)**-0.5
  assert adaptive_clipping.gradient_noise_multiplier(z, sigma_b) == z_grad
  # In units of C = 2: [3, 4, 0] / 5 (clipped), [0.1, 0, 0] / 2,
  # [0, 1, 1] / 2 (norm 1.41 <= 2); NaN and padding add nothing.
  normalized = np.array([0.6 + 0.05, 0.8 + 0.5, 0.5])
  noise = z_grad * np.asarray(jax.random.normal(grad_key, (3,)))
  np.testing.assert_allclose(out, clip * (normalized + noise) / m, rtol=1e-5)
  # 3 real finite, 2 of them <= C; the NaN example counts as not <= C.
  centred = 2 - 0.5 * 4
  fraction = np.clip((centred + sigma_b * float(jax.random.normal(
      count_key, ()))) / m + 0.5, 0, 1)
  assert float(new.unclipped_fraction) == pytest.approx(fraction, rel=1e-6)
  assert float(new.clip_norm) == pytest.approx(
      clip * np.exp(-eta * (fraction - gamma)), rel=1e-6)
  assert int(new.aggregate.num_updates) == 1
  assert int(new.aggregate.num_non_finite) == 1
  assert dp_transform.dp_state(optax.chain(tx).init(jnp.zeros(3))) is not None


def test_gradient_noise_std_is_z_grad_times_c_over_batch():
  """20k draws: the std is within 3% (s.e. 0.5%) of z_grad * C / m."""
  z, m, clip = 1.2, 8.0, 0.5
  tx = adaptive_clipping.dp_aggregate_adaptive(clip, z, m, key=4,
                                               count_stddev=2.0)
  out, _ = jax.jit(tx.update)(jnp.zeros((2, 20_000)),
                              tx.init(jnp.zeros(20_000)))
  z_grad = adaptive_clipping.gradient_noise_multiplier(z, 2.0)
  assert z_grad > z
  assert float(jnp.std(out)) == pytest.approx(z_grad * clip / m, rel=0.03)


@pytest.mark.parametrize('gamma, initial', [(0.5, 1e2), (0.9, 1e-2)])
def test_clip_norm_moves_to_the_target_quantile(gamma, initial):
  """256 examples with log-uniform norms in [0.1, 10], the same batch each
  step: from 100x off, C ends where a fraction gamma (+-0.08) of the norms
  is below it, moving by at most exp(eta) a step."""
  n, eta = 256, 0.2
  rng = np.random.default_rng(0)
  norms = 10.0 ** rng.uniform(-1, 1, n)
  direction = rng.normal(size=(n, 3))
  grads = jnp.asarray(direction / np.linalg.norm(direction, axis=1,
                                                 keepdims=True)
                      * norms[:, None], jnp.float32)
  tx = adaptive_clipping.dp_aggregate_adaptive(
      initial, 1.0, n, key=1, target_unclipped_quantile=gamma,
      clip_learning_rate=eta)
  clipped_sum = per_example.clipped_grad_sum(_loss, ADAPTIVE)

  def step(state, _):
    s = clipped_sum(jnp.zeros(3), grads,
                    clip_norm=adaptive_clipping.current_clip_norm(state))
    _, state = tx.update(s, state)
    return state, state.clip_norm

  _, path = jax.jit(lambda s: jax.lax.scan(step, s, None, length=250))(
      tx.init(jnp.zeros(3)))
  path = np.concatenate([[initial], np.asarray(path, np.float64)])
  assert np.all(np.abs(np.diff(np.log(path))) <= eta * (1 + 1e-5))
  final = np.median(path[-50:])
  assert np.mean(norms <= final) == pytest.approx(gamma, abs=0.08)


def test_a_clip_norm_not_from_the_state_raises_or_poisons_the_update():
  tx = adaptive_clipping.dp_aggregate_adaptive(1.0, 1.0, 4, key=0,
                                               count_stddev=1.0)
  state = tx.init(jnp.zeros(3))
  clipped_sum = jax.jit(per_example.clipped_grad_sum(_loss, ADAPTIVE,
                                                     microbatch_size=2))
  update = jax.jit(tx.update)
  grads = jnp.ones((5, 3))
  wrong = clipped_sum(jnp.zeros(3), grads, clip_norm=jnp.float32(2.0))
  with pytest.raises(ValueError, match='another clip norm'):
    tx.update(wrong, state)
  out, new = update(wrong, state)
  assert bool(jnp.all(jnp.isnan(out)))
  assert float(new.clip_norm) == 1.0 and int(new.clip_norm_mismatches) == 1
  # Chunks of padding are skipped, yet their slots count as clipped to C.
  right = clipped_sum(jnp.zeros(3), grads,
                      is_padding_example=jnp.arange(5) >= 2,
                      clip_norm=adaptive_clipping.current_clip_norm(state))
  out, new = update(right, state)
  assert bool(jnp.all(jnp.isfinite(out))) and int(new.clip_norm_mismatches) == 0


_CLIP_AND_SUM = jax.jit(lambda g, c: dp_transform.clip_and_sum(
    g, ADAPTIVE, clip_norm=c))


def _added(a, b):
  return jax.tree.map(jnp.add, a, b)


def test_slots_clipped_to_norms_that_average_to_c_are_refused():
  """The tag's sum of C alone passes halves at 1.5C / 0.5C or 2C / 0; its
  sum of 1/C does not."""
  tx = adaptive_clipping.dp_aggregate_adaptive(1.0, 1.0, 4, key=0,
                                               count_stddev=2.0)
  state = tx.init(jnp.zeros(3))
  grads = jnp.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  for high, low in ((1.5, 0.5), (2.0, 0.0)):
    halves = _added(_CLIP_AND_SUM(grads, high), _CLIP_AND_SUM(grads, low))
    with pytest.raises(ValueError, match='another clip norm'):
      tx.update(halves, state)


def test_a_traced_zero_or_nan_clip_norm_is_clamped_not_nan():
  """C = 0 would add 0 * (1/0) = NaN for a zero gradient (a data-dependent
  output); clamped into [1e-30, 1e30], each example adds at most 1."""
  grads = jnp.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
  for clip_norm in (0.0, np.nan, np.inf):
    clipped = _CLIP_AND_SUM(grads, clip_norm)
    assert bool(jnp.all(jnp.isfinite(clipped.grad_sum))), clip_norm
    assert float(jnp.linalg.norm(clipped.grad_sum)) <= 1 + 1e-6


def test_microbatched_keeps_the_tag_of_a_chunk_clipper_that_ignores_c():
  tx = adaptive_clipping.dp_aggregate_adaptive(1.0, 1.0, 4, key=0,
                                               count_stddev=2.0)
  state = tx.init(jnp.zeros(3))

  def clip_chunk(params, chunk, padding, clip_norm=None):
    del params, clip_norm  # clips to 7 whatever C it is given
    return dp_transform.clip_and_sum(chunk, ADAPTIVE, padding,
                                     clip_norm=jnp.float32(7.0)), None

  fused = per_example.microbatched(clip_chunk, microbatch_size=2)
  clipped = fused(None, jnp.full((4, 3), 100.0),
                  clip_norm=adaptive_clipping.current_clip_norm(state))
  with pytest.raises(ValueError, match='another clip norm'):
    tx.update(clipped, state)


def test_the_clip_norm_range_is_within_its_bounds_in_float64():
  """np.float32(1e30) is above 1e30; NEP 50 compares it in float32."""
  tx = adaptive_clipping.dp_aggregate_adaptive(1e30, 1.0, 4, key=0,
                                               count_stddev=2.0)
  assert float(tx.init(jnp.zeros(1)).clip_norm) <= 1e30
  low32, high32 = clip_norms.float32_within(1e-30, 1e30)
  assert float(low32) >= 1e-30 and float(high32) <= 1e30


def test_fixed_and_adaptive_sums_are_not_interchangeable():
  grads = jnp.ones((2, 3))

  def clipped(clipping, clip_norm=None):  # structure only: no compile
    return jax.eval_shape(lambda g: dp_transform.clip_and_sum(
        g, clipping, clip_norm=clip_norm), grads)

  tx = adaptive_clipping.dp_aggregate_adaptive(1.0, 1.0, 4, key=0,
                                               count_stddev=1.0)
  with pytest.raises(ValueError, match='adaptive clip norm'):
    tx.update(clipped(1.0), tx.init(jnp.zeros(3)))
  fixed = dp_transform.dp_aggregate(1.0, 1.0, 4, key=0)
  with pytest.raises(ValueError, match='clipped to the adaptive'):
    fixed.update(clipped(ADAPTIVE, 1.0), fixed.init(jnp.zeros(3)))
  with pytest.raises(ValueError, match='exactly when l2_norm_clip is'):
    dp_transform.clip_and_sum(grads, ADAPTIVE)
  with pytest.raises(ValueError, match='dp_aggregate_adaptive'):
    dp_transform.dp_aggregate(ADAPTIVE, 1.0, 4, key=0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(count_stddev=0.5), r'count_stddev=0.5 is too small.*exceed 0.5|'
     'must exceed noise_multiplier / 2'),
    (dict(initial_l2_norm_clip=1e31), 'initial_l2_norm_clip must be in'),
    (dict(min_l2_norm_clip=2.0), r'must be in \[min_l2_norm_clip'),
    (dict(target_unclipped_quantile=1.5), 'target_unclipped_quantile'),
    (dict(clip_learning_rate=1e300), r'clip_learning_rate=1e\+300 exceeds'),
    (dict(initial_l2_norm_clip=True), 'not the bool True'),
])
def test_bad_arguments_are_named(kwargs, message):
  args = dict(initial_l2_norm_clip=1.0, noise_multiplier=1.0,
              expected_batch_size=100, key=0) | kwargs
  with pytest.raises(ValueError, match=message):
    adaptive_clipping.dp_aggregate_adaptive(**args)
