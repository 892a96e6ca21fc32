"""Tests of the DP aggregation guarantee: clipped sensitivity, zeroed padding and
non-finite examples, noise scale and freshness, agreement with optax.

Every guarantee is checked through both ways of feeding the transform:
per-example gradients, and the fused microbatched ClippedSum from
``clipped_grad_sum`` (for a linear loss whose per-example gradient is the
example itself).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from dplh_jax.dp import dp_transform
from dplh_jax.dp import per_example

CLIP = 0.5
PARAMS = {'a': jnp.zeros((3,)), 'b': jnp.zeros((2, 2))}


def _linear_loss(params, example):
  # d loss / d params == example, so the batch *is* the per-example gradients.
  return sum(jnp.vdot(params[k], example[k]) for k in params)


@functools.partial(jax.jit, static_argnames=('sigma', 'batch', 'fused'))
def _update(grads, padding, state, *, sigma, batch, fused):
  tx = dp_transform.dp_aggregate(CLIP, sigma, batch, key=0)
  if fused:
    grads = per_example.clipped_grad_sum(
        _linear_loss, CLIP, microbatch_size=2)(
            PARAMS, grads, is_padding_example=padding)
    padding = None
  return tx.update(grads, state, is_padding_example=padding)


def _init(key=0):
  return dp_transform.dp_aggregate(CLIP, 1.0, 1, key).init(PARAMS)


def _grads(rows):
  """Per-example gradients whose flattened rows (7 values each) are given."""
  rows = jnp.asarray(rows, jnp.float32)
  return {'a': rows[:, :3], 'b': rows[:, 3:].reshape(-1, 2, 2)}


def _flat(tree):
  return jnp.concatenate([tree['a'].reshape(-1), tree['b'].reshape(-1)])


paths = pytest.mark.parametrize('fused', [False, True], ids=['vmap', 'fused'])


@paths
def test_huge_gradient_contributes_at_most_clip(fused):
  direction = np.arange(1.0, 8.0) / np.linalg.norm(np.arange(1.0, 8.0))
  grads = _grads([1e6 * direction, np.zeros(7), np.zeros(7), np.zeros(7)])
  out, state = _update(grads, jnp.zeros(4, bool), _init(), sigma=0.0, batch=1,
                       fused=fused)
  # Sensitivity of the sum: the huge example moves it by exactly C, not more.
  np.testing.assert_allclose(_flat(out), CLIP * direction, rtol=1e-5)
  assert float(jnp.linalg.norm(_flat(out))) <= CLIP * (1 + 1e-6)
  assert float(state.clipped_fraction) == pytest.approx(0.25)


@paths
def test_padding_and_non_finite_examples_contribute_exactly_zero(fused):
  good = np.full(7, 0.01)
  nan_row = np.full(7, 0.01)
  nan_row[4] = np.nan
  inf_row = np.full(7, 0.01)
  inf_row[0] = np.inf
  grads = _grads([good, nan_row, 1e3 * np.ones(7), inf_row])
  padding = jnp.array([False, False, True, False])
  state = _init()
  out, state = _update(grads, padding, state, sigma=0.0, batch=1, fused=fused)
  assert bool(jnp.all(jnp.isfinite(_flat(out))))
  np.testing.assert_array_equal(_flat(out), _flat(_grads([good]))[:7])
  assert int(state.realized_batch_size) == 3
  assert int(state.num_non_finite) == 2
  out, state = _update(grads, padding, state, sigma=0.0, batch=1, fused=fused)
  assert int(state.total_non_finite) == 4


@paths
def test_noise_std_is_sigma_times_clip_over_expected_batch(fused):
  sigma, batch, draws = 1.5, 8, 40
  grads = _grads(np.zeros((4, 7)))
  padding = jnp.zeros(4, bool)
  state, samples = _init(key=3), []
  for _ in range(draws):
    out, state = _update(grads, padding, state, sigma=sigma, batch=batch,
                         fused=fused)
    samples.append(_flat(out))
  samples = np.stack(samples)  # draws x 7
  expected = sigma * CLIP / batch
  # 280 Gaussian draws: the sample std is within 15% of the truth with
  # probability > 0.99 (its relative s.e. is 1/sqrt(2*280) = 4.2%).
  assert np.std(samples) == pytest.approx(expected, rel=0.15)
  assert abs(np.mean(samples)) < 4 * expected / np.sqrt(samples.size)
  # With 4 examples in 2 chunks, noise added per chunk would show up in the
  # std above as sqrt(2) too large; here we check one draw per update.
  assert int(state.num_updates) == draws


def test_noise_distribution_on_a_large_leaf():
  """With 100k coordinates the empirical std must be within 1% (s.e. 0.22%)."""
  sigma, batch = 2.0, 16
  tx = dp_transform.dp_aggregate(CLIP, sigma, batch, key=jax.random.key(0))
  params = jnp.zeros((100_000,))
  out, _ = jax.jit(tx.update)(jnp.zeros((2, 100_000)), tx.init(params))
  out = np.asarray(out)
  assert out.dtype == np.float32
  assert np.std(out) == pytest.approx(sigma * CLIP / batch, rel=0.01)
  # Shape, not just scale: a Kolmogorov-Smirnov test against N(0, 1) after
  # standardizing (fixed key; a wrong distribution gives p << 0.01 at 1e5).
  assert stats.kstest(out / (sigma * CLIP / batch), 'norm').pvalue > 0.01


def test_keys_differ_from_step_to_step_and_the_stored_key_is_not_reused():
  grads = _grads(np.zeros((4, 7)))
  padding = jnp.zeros(4, bool)
  state0 = _init(key=11)
  out1, state1 = _update(grads, padding, state0, sigma=1.0, batch=1,
                         fused=False)
  out2, state2 = _update(grads, padding, state1, sigma=1.0, batch=1,
                         fused=False)
  keys = [jax.random.key_data(s.noise_key) for s in (state0, state1, state2)]
  assert not np.array_equal(keys[0], keys[1])
  assert not np.array_equal(keys[1], keys[2])
  assert not np.allclose(_flat(out1), _flat(out2))
  # Same state in, same noise out: a resume restores the state, not the seed.
  again, _ = _update(grads, padding, state1, sigma=1.0, batch=1, fused=False)
  np.testing.assert_array_equal(_flat(again), _flat(out2))


def test_the_stored_keys_never_draw_noise_themselves():
  """The key in the state is only split; a key drawing noise is never stored
  (so it cannot be used again by the next step or after a resume)."""
  tx = dp_transform.dp_aggregate(CLIP, 1.0, 1, key=5)
  state = tx.init(PARAMS)
  out, next_state = tx.update(_grads(np.zeros((1, 7))), state)
  noise = _flat(out) / CLIP
  for stored in (state.noise_key, next_state.noise_key):
    assert not np.allclose(noise, jax.random.normal(stored, (7,)))


def test_bfloat16_gradients_get_float32_noise_and_keep_their_dtype():
  tx = dp_transform.dp_aggregate(1.0, 1.0, 4, key=0)
  grads = jnp.zeros((2, 20_000), jnp.bfloat16)
  out, _ = jax.jit(tx.update)(grads, tx.init(jnp.zeros(20_000, jnp.bfloat16)))
  assert out.dtype == jnp.bfloat16
  # s.e. of the std over 20k draws is 0.5%; bfloat16 rounding adds < 0.4%.
  assert float(jnp.std(out.astype(jnp.float32))) == pytest.approx(0.25,
                                                                  rel=0.02)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_a_clipped_sum_gives_updates_in_the_parameters_dtype(dtype):
  """A ClippedSum is float32; its updates must still match low-precision
  params, or adam's state changes dtype and a lax.scan over steps fails."""
  params = {'w': jnp.zeros((3,), dtype)}
  tx = optax.chain(dp_transform.dp_aggregate(1.0, 1.0, 4, key=0),
                   optax.adam(1e-2))
  loss = lambda p, x: jnp.vdot(p['w'].astype(jnp.float32), x)

  def step(carry, x):
    params, state = carry
    clipped = per_example.clipped_grad_sum(loss, 1.0)(params, x)
    updates, state = tx.update(clipped, state, params)
    assert updates['w'].dtype == dtype
    return (optax.apply_updates(params, updates), state), None

  xs = jnp.ones((2, 4, 3))  # 2 steps of 4 examples
  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), xs)
  assert params['w'].dtype == dtype


def test_a_sum_clipped_with_another_norm_is_refused():
  clipped = per_example.clipped_grad_sum(_linear_loss, 10 * CLIP)(
      PARAMS, _grads(np.ones((2, 7))))
  with pytest.raises(ValueError, match='clipped to 5.0'):
    dp_transform.dp_aggregate(CLIP, 1.0, 1, key=0).update(clipped, _init())


def test_an_aggregated_gradient_is_refused():
  tx = dp_transform.dp_aggregate(CLIP, 1.0, 1, key=0)
  mean_gradient = {'a': jnp.ones((3,)), 'b': jnp.ones((2, 2))}
  with pytest.raises(ValueError, match='shaped like params'):
    tx.update(mean_gradient, _init(), PARAMS)


def test_integer_gradients_are_refused():
  with pytest.raises(TypeError, match='int32'):
    dp_transform.clip_and_sum(jnp.ones((2, 3), jnp.int32), 1.0)


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
def test_float64_values_that_overflow_float32_count_as_non_finite():
  grads = np.array([[1e39, 0.0], [0.1, 0.1]])  # NumPy float64: x64 not needed
  clipped = dp_transform.clip_and_sum(grads, 1.0)
  assert int(clipped.num_non_finite) == 1
  np.testing.assert_allclose(clipped.grad_sum, [0.1, 0.1])


@paths
def test_empty_batch_still_adds_noise(fused):
  grads = _grads(np.ones((4, 7)))
  out, state = _update(grads, jnp.ones(4, bool), _init(), sigma=1.0, batch=2,
                       fused=fused)
  assert int(state.realized_batch_size) == 0
  assert float(state.clipped_fraction) == 0.0
  assert bool(jnp.all(_flat(out) != 0.0))


def test_matches_optax_contrib_without_noise():
  rng = np.random.default_rng(0)
  grads = _grads(rng.normal(size=(6, 7)) * np.array([[0.01], [1], [10], [0.1],
                                                     [3], [0.2]]))
  ours, _ = _update(grads, jnp.zeros(6, bool), _init(), sigma=0.0, batch=6,
                    fused=False)
  reference_tx = optax.contrib.differentially_private_aggregate(
      CLIP, 0.0, key=jax.random.key(0))
  reference, _ = reference_tx.update(grads, reference_tx.init(PARAMS))
  np.testing.assert_allclose(_flat(ours), _flat(reference), rtol=1e-6,
                             atol=1e-7)


def test_chains_with_adam_under_jit_and_trains():
  """Linear regression with DP-Adam: the loss falls, every step under jit."""
  rng = np.random.default_rng(1)
  true_w = jnp.array([1.0, -2.0, 0.5])
  x = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
  batch = {'x': x, 'y': x @ true_w}

  def loss(w, example):
    return (example['x'] @ w - example['y']) ** 2

  tx = optax.chain(dp_transform.dp_aggregate(1.0, 0.1, 32, key=0),
                   optax.adam(0.1))
  grads_of = per_example.per_example_grads(loss)

  @jax.jit
  def step(w, opt_state):
    updates, opt_state = tx.update(grads_of(w, batch), opt_state, w,
                                   is_padding_example=jnp.zeros(32, bool))
    return optax.apply_updates(w, updates), opt_state

  w = jnp.zeros(3)
  opt_state = tx.init(w)
  before = float(jnp.mean(jax.vmap(loss, (None, 0))(w, batch)))
  for _ in range(60):
    w, opt_state = step(w, opt_state)
  after = float(jnp.mean(jax.vmap(loss, (None, 0))(w, batch)))
  assert after < 0.1 * before
  assert int(dp_transform.dp_state(opt_state).num_updates) == 60


def test_dpsgd_is_dp_aggregate_then_sgd():
  grads = _grads(np.ones((4, 7)))
  tx = dp_transform.dpsgd(0.5, CLIP, 0.0, 4, key=0, momentum=0.9)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  clipped_mean = CLIP / np.sqrt(7)  # each example clipped to C, 4 of them / 4
  np.testing.assert_allclose(_flat(updates), -0.5 * clipped_mean, rtol=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(l2_norm_clip=0.0), 'l2_norm_clip'),
    (dict(noise_multiplier=-1.0), 'noise_multiplier'),
    (dict(expected_batch_size=0), 'expected_batch_size'),
    (dict(key='seed'), 'key'),
    (dict(l2_norm_clip=float('nan')), 'l2_norm_clip'),
])
def test_bad_arguments_are_named(kwargs, message):
  args = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=4,
              key=0) | kwargs
  with pytest.raises((ValueError, TypeError), match=message):
    dp_transform.dp_aggregate(**args)


def test_mismatched_leading_axes_are_rejected():
  with pytest.raises(ValueError, match='leading example axis'):
    dp_transform.clip_and_sum({'a': jnp.ones((3, 2)), 'b': jnp.ones((4,))}, 1.0)


def test_dp_state_is_found_by_type_not_position():
  tx = optax.chain(optax.scale(1.0), dp_transform.dp_aggregate(1.0, 1.0, 4, 0))
  state = tx.init(PARAMS)
  assert dp_transform.dp_state(state) is state[1]
  with pytest.raises(ValueError, match='found 0'):
    dp_transform.dp_state(optax.adam(1e-3).init(PARAMS))


@pytest.mark.parametrize('seed', [-1, 2**32, 2**40])
def test_int_seeds_that_would_collide_are_refused(seed):
  # jax.random.key keeps 32 bits: key(2**32) draws what key(0) draws.
  with pytest.raises(ValueError, match=r'\[0, 2\*\*32\)'):
    dp_transform.dp_aggregate(1.0, 1.0, 4, key=seed)


def test_a_clip_norm_whose_sums_overflow_float32_is_refused():
  with pytest.raises(ValueError, match='l2_norm_clip must be in'):
    dp_transform.dp_aggregate(1e31, 1.0, 4, key=0)


def test_noise_that_float32_would_flush_to_zero_is_refused():
  """The third reader's case: C = 2e-38, sigma 0.5 released the exact sum."""
  with pytest.raises(ValueError, match='l2_norm_clip must be in'):
    dp_transform.dp_aggregate(2e-38, 0.5, 4, key=0)
  with pytest.raises(ValueError, match='would flush such noise'):
    dp_transform.dp_aggregate(1e-30, 1e-3, 4, key=0)
