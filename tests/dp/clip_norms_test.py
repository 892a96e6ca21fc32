"""Norms that bound what is added at every float32 magnitude (docs/DESIGN.md, Privacy rules, rule 9)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.dp import clip_norms
from dplh_jax.dp import dp_transform
from dplh_jax.dp import one_pass_clipping
from dplh_jax.dp import per_example


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64)))
                           for leaf in jax.tree.leaves(tree))))


def test_times_pow2_is_exact_over_the_whole_exponent_range():
  x = jnp.array([1.0, -3.0, 1.5, 1e-30, 3e38], jnp.float32)
  for exponent in (-300, -149, -126, -1, 0, 1, 127, 200):
    want = np.asarray(x, np.float64) * 2.0**exponent
    with np.errstate(over='ignore'):
      want32 = want.astype(np.float32)
    got = np.asarray(clip_norms.times_pow2(x, jnp.int32(exponent)))
    normal = np.abs(want) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got[normal], want32[normal])
    assert np.all(np.abs(got[~normal]) <= np.finfo(np.float32).tiny)


@pytest.mark.parametrize('magnitude', [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e30])
def test_scaled_norms_match_float64_at_every_magnitude(magnitude):
  rng = np.random.default_rng(0)
  rows = [rng.normal(size=(3, 40)) * magnitude, rng.normal(size=(3, 5)) * 1e-3
          * magnitude]
  norms, _, _ = clip_norms.scaled_norms(
      [jnp.asarray(r, jnp.float32) for r in rows])
  want = np.sqrt(sum(np.sum(r**2, axis=1) for r in rows))
  got = np.asarray(norms.mantissa, np.float64) * 2.0 ** np.asarray(
      norms.exponent, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_combined_norms_do_not_overflow_or_underflow():
  parts = [clip_norms.normalized(jnp.array([3e38, 1e-30]),
                                 jnp.array([10, -100])),
           clip_norms.normalized(jnp.array([2e38, 0.0]), jnp.array([10, 0]))]
  total = clip_norms.combine_norms(parts)
  got = np.asarray(total.mantissa, np.float64) * 2.0 ** np.asarray(
      total.exponent, np.float64)
  np.testing.assert_allclose(got, [np.hypot(3e38, 2e38) * 2**10, 1e-30 * 2**-100], rtol=1e-6)


def _removal_moves(clipped_grad_sum, loss, params, batch, l2_norm_clip):
  fn = jax.jit(lambda pad: clipped_grad_sum(loss, l2_norm_clip)(
      params, batch, is_padding_example=pad))
  full = fn(jnp.array([False, False]))
  without = fn(jnp.array([True, False]))
  return _norm(jax.tree.map(jnp.subtract, full.grad_sum, without.grad_sum))


@pytest.mark.parametrize('rows, width', [(4, 16), (31, 64)])
@pytest.mark.parametrize('path', [one_pass_clipping.clipped_grad_sum,
                                  per_example.clipped_grad_sum])
def test_ghost_norm_rows_whose_squares_underflow_are_still_clipped(
    rows, width, path):
  """The review's case: |delta_t|^2 ~ 1e-38 flushed to zero, so the ghost
  norm and its rounding slack were 0 while the contribution was 7.2 C."""
  net = nn.Dense(width)
  x = np.full((2, rows, width), 1.8e19 / 4, np.float32)
  y = np.full((2, rows, width), 1e-19 / 4, np.float32)
  x[1], y[1] = 1.0, 0.01
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
  params = net.init(jax.random.key(0), batch['x'][0])
  moved = _removal_moves(path, lambda p, e: jnp.sum(net.apply(p, e['x'])
                                                   * e['y']),
                         params, batch, 1.0)
  assert 1.0 - 1e-4 <= moved <= 1.0 + 1e-4


def test_tiny_gradients_are_clipped_to_a_tiny_clip_norm():
  """Entries of 1e-25 square to 0 in float32: an unscaled norm says 0, so
  the example was added unclipped, 25x past C = 4e-26 * sqrt(n)."""
  grads = {'w': jnp.full((2, 625), 1e-25, jnp.float32)}
  clip = 1e-24
  full = dp_transform.clip_and_sum(grads, clip)
  without = dp_transform.clip_and_sum(grads, clip, jnp.array([True, False]))
  moved = _norm(jax.tree.map(jnp.subtract, full.grad_sum, without.grad_sum))
  assert moved == pytest.approx(clip, rel=1e-5)
  assert int(full.num_clipped) == 2


def test_huge_finite_gradients_are_clipped_not_dropped():
  """A norm of 1e30 has a square past float32's range; it is still clipped
  to C (the old squared norm overflowed and the example was zeroed)."""
  grads = {'w': jnp.full((1, 100), 1e29, jnp.float32)}
  clipped = dp_transform.clip_and_sum(grads, 1.0)
  assert _norm(clipped.grad_sum) == pytest.approx(1.0, rel=1e-5)
  assert int(clipped.num_non_finite) == 0 and int(clipped.num_clipped) == 1


def test_weighted_sums_are_float32_dots_at_highest_precision():
  """The one-pass path's clipped sums go through ClipFactors.weighted_sum:
  a dot that asks for float32 explicitly, so a GPU's TF32 or a TPU's
  bfloat16 default cannot round a clipped example past C."""
  norms = clip_norms.normalized(jnp.array([3.0, 0.5]), jnp.zeros(2, jnp.int32))
  factors = clip_norms.clip_factors(norms, jnp.ones(2, bool),
                                    jnp.ones(2, bool), 1.0)
  with jax.default_matmul_precision('bfloat16'):
    jaxpr = jax.make_jaxpr(factors.weighted_sum)(jnp.ones((2, 3, 4))).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == 'dot_general']
  assert dots and all(
      e.params['precision'] == (jax.lax.Precision.HIGHEST,) * 2
      and e.params['preferred_element_type'] == jnp.float32 for e in dots)
  np.testing.assert_allclose(factors.weighted_sum(jnp.ones((2, 3, 4))),
                             np.full((3, 4), 1 / 3 + 1), rtol=1e-6)
