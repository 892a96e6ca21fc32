"""clip_and_sum's float32 dot: no example adds more than C, on either path
(docs/DESIGN.md, Privacy rules, rule 9), at Precision.HIGHEST."""

import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.dp import clip_plan
from dplh_jax.dp import clipped_sum
from dplh_jax.dp import dp_transform
from dplh_jax.dp import group_clipping

TOLERANCE = 1e-6  # float32 rounding of the norm, the factor and the sum


@functools.partial(jax.jit, static_argnums=1)
def _clip_and_sum(rows, l2_norm_clip, padding, clip_norm=None):
  return clipped_sum.clip_and_sum(rows, l2_norm_clip, padding,
                                  clip_norm=clip_norm)


@functools.partial(jax.jit, static_argnums=1)
def _plain_valid(rows, l2_norm_clip, padding, clip_norm=None):
  return clipped_sum.plain_valid_rows(rows, l2_norm_clip, padding,
                                      clip_norm=clip_norm)


def _plain_applies(rows, l2_norm_clip, padding) -> bool:
  """Whether the batch takes the plain branch (every row plain-valid)."""
  return bool(jnp.all(_plain_valid(rows, l2_norm_clip, padding)))


def _flat64(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in jax.tree.leaves(tree)])


def _contributions(rows, l2_norm_clip):
  """Norm (float64) of how far masking each example moves the sum."""
  n = jax.tree.leaves(rows)[0].shape[0]
  full = _flat64(_clip_and_sum(rows, l2_norm_clip,
                               jnp.zeros(n, bool)).grad_sum)
  moves = []
  for i in range(n):
    without = _clip_and_sum(rows, l2_norm_clip, jnp.arange(n) == i)
    moves.append(np.linalg.norm(full - _flat64(without.grad_sum)))
  return np.array(moves)


def _at_norm(rng, shape, norm):
  """Random float32 rows, each scaled in float64 to ``norm``."""
  x = rng.normal(size=shape)
  x *= norm / np.linalg.norm(x.reshape(len(x), -1), axis=1).reshape(
      (-1,) + (1,) * (x.ndim - 1))
  return x.astype(np.float32)


@pytest.mark.parametrize('l2_norm_clip', [1e-30, 1e-3, 1.0, 1e30])
def test_an_example_at_norm_c_adds_at_most_c(l2_norm_clip):
  """Rows at exactly C (in float64), just above and far above it, with a
  second leaf: their float32 norm rounds either way, the clip must not."""
  rng = np.random.default_rng(0)
  norms = l2_norm_clip * np.array([1.0, 1.0, 1 + 2**-23, 1 - 2**-23, 7.0])
  rows = {'w': np.concatenate([_at_norm(rng, (1, 300, 3), c)
                               for c in norms]),
          'b': np.zeros((5, 4), np.float32)}
  rows['b'][:, 0] = rows['w'][:, 0, 0]  # part of the norm in another leaf
  moves = _contributions(jax.tree.map(jnp.asarray, rows), l2_norm_clip)
  assert np.all(moves <= l2_norm_clip * (1 + TOLERANCE)), moves / l2_norm_clip
  assert np.all(moves >= l2_norm_clip * (1 - 1e-5)), moves / l2_norm_clip


@pytest.mark.parametrize('magnitude, l2_norm_clip, plain', [
    (1e-30, 1e-30, False),  # squares flush to zero: the exact path
    (1e-30, 1.0, True),     # tiny rows added unclipped by the plain path
    (1e30, 1e30, False),    # squares overflow: the exact path
    (1e30, 1.0, False),
    (1e-3, 1e-3, True),
])
def test_extreme_magnitudes_add_at_most_c(magnitude, l2_norm_clip, plain):
  rng = np.random.default_rng(1)
  rows = {'w': jnp.asarray((rng.normal(size=(4, 50)) * magnitude).astype(
      np.float32))}
  assert bool(_plain_applies(rows, l2_norm_clip, jnp.zeros(4, bool))) == plain
  moves = _contributions(rows, l2_norm_clip)
  norms = np.linalg.norm(np.asarray(rows['w'], np.float64), axis=1)
  want = np.minimum(norms, l2_norm_clip)
  assert np.all(moves <= l2_norm_clip * (1 + TOLERANCE))
  np.testing.assert_allclose(moves, want, rtol=1e-5)


def test_near_cancelling_rows_each_move_the_sum_by_at_most_c():
  """x, -x and x (1 + 2**-22) clipped: the sum nearly cancels, so its
  rounding is relative to each contribution, not to the total."""
  rng = np.random.default_rng(2)
  x = _at_norm(rng, (1, 200), 3.0)[0]
  rows = {'w': jnp.asarray(np.stack([x, -x, x * (1 + 2**-22), -x * 0.999,
                                     x * 1e-7]))}
  moves = _contributions(rows, 1.0)
  assert np.all(moves <= 1 + TOLERANCE), moves
  assert bool(_plain_applies(rows, 1.0, jnp.zeros(5, bool)))


def test_padding_and_non_finite_rows_add_exactly_zero():
  """NaN and Inf rows (real or padding) take the exact path, where they are
  selected away before the product; the rest is the sum without them."""
  rng = np.random.default_rng(3)
  clean = rng.normal(size=(3, 20)).astype(np.float32)
  dirty = np.concatenate([clean, np.full((3, 20), 1.0, np.float32)])
  dirty[3, 5], dirty[4, 0], dirty[5, 7] = np.nan, np.inf, np.nan
  padding = jnp.array([False] * 3 + [False, False, True])
  result = _clip_and_sum({'w': jnp.asarray(dirty)}, 1.0, padding)
  reference = _clip_and_sum({'w': jnp.asarray(clean)}, 1.0,
                            jnp.zeros(3, bool))
  np.testing.assert_array_equal(  # each row's own values decide
      _plain_valid({'w': jnp.asarray(dirty)}, 1.0, padding),
      [True] * 3 + [False] * 3)
  np.testing.assert_allclose(result.grad_sum['w'], reference.grad_sum['w'],
                             rtol=1e-6, atol=1e-7)
  assert (int(result.num_examples), int(result.num_non_finite),
          int(result.num_clipped)) == (5, 2, int(reference.num_clipped))


def test_a_finite_padding_row_of_any_size_adds_nothing_on_the_plain_path():
  rows = {'w': jnp.array([[3.0, 4.0], [1e18, -1e18], [0.0, 0.0]])}
  padding = jnp.array([False, True, False])
  assert bool(_plain_applies(rows, 1.0, padding))  # zero rows too
  result = _clip_and_sum(rows, 1.0, padding)
  np.testing.assert_allclose(result.grad_sum['w'], [0.6, 0.8], rtol=1e-6)


def _dot_precisions(jaxpr) -> list:
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append((eqn.params['precision'],
                    eqn.params['preferred_element_type']))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else [param]:
        if isinstance(sub, jax_core.ClosedJaxpr):
          found += _dot_precisions(sub.jaxpr)
        elif isinstance(sub, jax_core.Jaxpr):
          found += _dot_precisions(sub)
  return found


def test_every_sum_is_a_float32_dot_at_highest_precision():
  """Both paths' products ask for float32 arithmetic explicitly, so neither
  a GPU's TF32 nor a TPU's bfloat16 default (nor
  jax_default_matmul_precision) can round an operand up past C."""
  rows = {'w': jnp.ones((3, 4, 2)), 'b': jnp.ones((3, 2), jnp.bfloat16)}
  with jax.default_matmul_precision('bfloat16'):
    jaxpr = jax.make_jaxpr(
        lambda r: clipped_sum.clip_and_sum(r, 1.0))(rows).jaxpr
  precisions = _dot_precisions(jaxpr)
  highest = jax.lax.Precision.HIGHEST
  assert len(precisions) >= len(rows)  # at least one per leaf
  assert all(p == ((highest, highest), jnp.float32) for p in precisions), (
      precisions)


# A row of norm ~C = 8.87e-16 (d = 3) whose plain norm (with the flush
# allowance) exceeds C and whose scaled norm does not.
_BOUNDARY_ROW = np.array([0xa660a53a, 0xa253fdec, 0x25f41917],
                         np.uint32).view(np.float32)


def _boundary_rows(l2_norm_clip, count):
  if l2_norm_clip != 1.0:
    return np.tile(_BOUNDARY_ROW, (count, 1))
  rng = np.random.default_rng(4)  # within an ulp of C = 1, above and below
  return (_at_norm(rng, (count, 3), 1.0) * (1 + rng.uniform(
      -2**-23, 2**-23, (count, 1)))).astype(np.float32)


@pytest.mark.parametrize('l2_norm_clip', [8.87e-16, 1.0])
def test_one_example_cannot_change_another_examples_clip_decision(
    l2_norm_clip):
  """16 boundary rows plus a zero padding row, a NaN row or a 1e20 row: the
  boundary rows' decisions, and the adaptive unclipped count up to the
  trigger itself, are the same (rule 7: a decision depends on that example
  alone)."""
  base = _boundary_rows(l2_norm_clip, 16)
  results = {}
  for name, extra, pad in [('none', 0.0, True), ('nan', np.nan, False),
                           ('huge', 1e20, False)]:
    rows = {'w': jnp.asarray(np.concatenate(
        [base, np.full((1, 3), extra, np.float32)]))}
    padding = jnp.arange(17) == 16 if pad else jnp.zeros(17, bool)
    fixed = _clip_and_sum(rows, l2_norm_clip, padding)
    adaptive = _clip_and_sum(rows, clip_plan.ADAPTIVE, padding,
                             jnp.float32(l2_norm_clip))
    unclipped = (adaptive.num_examples - adaptive.num_clipped
                 - adaptive.num_non_finite)
    results[name] = (int(fixed.num_clipped), int(adaptive.num_clipped),
                     int(unclipped), fixed.grad_sum['w'])
  none, nan, huge = results['none'], results['nan'], results['huge']
  assert nan[:2] == none[:2] and huge[:2] == (none[0] + 1, none[1] + 1)
  assert abs(nan[2] - none[2]) <= 1 and abs(huge[2] - none[2]) <= 1
  # The NaN row adds nothing: the sum of the boundary rows is unchanged.
  np.testing.assert_allclose(nan[3], none[3], rtol=1e-6)


_BY_LEAF = group_clipping.GroupClipNorms.from_tree({'a': 0.5, 'b': 2.0})


@pytest.mark.parametrize('spec', [1.0, _BY_LEAF, clip_plan.ADAPTIVE])
def test_counts_and_factors_are_the_same_on_both_branches(spec):
  """Rows on disjoint coordinates (so the sum exposes each row's factor
  bit for bit), norms log-uniform around C: a NaN padding row forces the
  scaled branch, which must reproduce the plain one exactly."""
  rng = np.random.default_rng(5)
  n, width = 12, 4
  rows = {'a': np.zeros((n + 1, n * width), np.float32),
          'b': np.zeros((n + 1, n, 2), np.float32)}
  for i in range(n):
    scale = np.exp(rng.uniform(-2.0, 2.0))
    rows['a'][i, i * width:(i + 1) * width] = rng.normal(size=width) * scale
    rows['b'][i, i] = rng.normal(size=2) * scale
  padding = jnp.arange(n + 1) == n
  clip_norm = jnp.float32(1.0) if spec is clip_plan.ADAPTIVE else None
  plain = _clip_and_sum(jax.tree.map(jnp.asarray, rows), spec, padding,
                        clip_norm)
  rows['a'][n, 0] = np.nan
  dirty = jax.tree.map(jnp.asarray, rows)
  assert not bool(jnp.all(_plain_valid(dirty, spec, padding, clip_norm)))
  scaled = _clip_and_sum(dirty, spec, padding, clip_norm)
  assert 0 < int(plain.num_clipped) < n  # both kinds of row occur
  for leaf in ('a', 'b'):
    np.testing.assert_array_equal(scaled.grad_sum[leaf], plain.grad_sum[leaf])
  assert ((int(scaled.num_examples), int(scaled.num_clipped),
           int(scaled.num_non_finite)) == (int(plain.num_examples),
                                           int(plain.num_clipped), 0))


def test_vmapped_clip_and_sum_equals_the_unbatched_calls():
  """Under vmap the cond becomes a select of both branches: each batch's
  result must still be its own (a NaN in one batch changes no other)."""
  rng = np.random.default_rng(6)
  rows = rng.normal(size=(3, 5, 7)).astype(np.float32)
  rows[1, 2, 3] = np.nan
  padding = jnp.asarray(rng.uniform(size=(3, 5)) < 0.3)
  batched = jax.jit(jax.vmap(lambda r, p: clipped_sum.clip_and_sum(
      {'w': r}, 1.0, p)))(jnp.asarray(rows), padding)
  for k in range(3):
    one = _clip_and_sum({'w': jnp.asarray(rows[k])}, 1.0, padding[k])
    np.testing.assert_allclose(batched.grad_sum['w'][k], one.grad_sum['w'],
                               rtol=1e-6, atol=1e-7)
    assert (int(batched.num_clipped[k]), int(batched.num_non_finite[k])) == (
        int(one.num_clipped), int(one.num_non_finite))


def test_add_noise_is_the_flat_normal_draw_of_its_key():
  """The noise of a tree is jax.random.normal(key, (N,)) split into the
  leaves, whatever shape it is drawn in (rule 5: a resumed run reproduces
  it)."""
  tree = {'a': jnp.zeros((3, 100)), 'b': jnp.zeros((29,))}
  key = jax.random.key(7)
  noised = dp_transform.add_noise(tree, 2.0, key)
  flat = 2.0 * jax.random.normal(key, (329,), jnp.float32)
  leaves = jax.tree.leaves(noised)  # 'a' then 'b'
  np.testing.assert_array_equal(
      np.concatenate([np.ravel(leaf) for leaf in leaves]), flat)
