"""One-pass clipping computes the vmap path's clipped sum, with its guarantee."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.dp import clip_norms
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.dp import one_pass_clipping
from dplh_jax.dp import per_example
from dplh_jax.hyperface import task_weighting

# HyperFace at 32 px, 1/32 width: conv kernels get materialized per-example
# gradients, the dense heads ghost norms, log sigma^2 its own copy.
CONFIG = models.HyperFaceConfig(input_size=32, width_multiplier=1 / 32,
                                conv1_kernel=3, conv1_stride=1,
                                dropout_rate=0.0)
MODEL = models.HyperFace(CONFIG)
WEIGHTING = task_weighting.UncertaintyWeighting()
NUM_IMAGES, NUM_PROPOSALS = 6, 2


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  b, k, s = NUM_IMAGES, NUM_PROPOSALS, CONFIG.input_size
  label = np.zeros((b, k), np.int32)
  label[:, 0] = 1
  return {
      'crops': rng.normal(size=(b, k, s, s, 3)).astype(np.float32),
      'detection_label': label,
      'landmarks': rng.uniform(size=(b, k, 21, 2)).astype(np.float32),
      'visibility': (rng.uniform(size=(b, k, 21)) > 0.3).astype(np.float32),
      'pose': (0.3 * rng.normal(size=(b, k, 3))).astype(np.float32),
      'gender': rng.integers(0, 2, (b, k)).astype(np.int32),
      'index': np.arange(b, dtype=np.int32),
  }


@functools.lru_cache(maxsize=None)
def _paths(l2_norm_clip, microbatch_size=None):
  """Jitted (vmap, one-pass) clipped sums of HyperFace, shared by tests."""
  loss_fn = functools.partial(losses.per_image_loss, model=MODEL,
                              weighting=WEIGHTING, rng=None)

  def jitted(clipped_grad_sum):
    fn = clipped_grad_sum(loss_fn, l2_norm_clip, has_aux=True,
                          microbatch_size=microbatch_size)
    return jax.jit(lambda p, b, pad: fn(p, b, is_padding_example=pad)[0])
  return (jitted(per_example.clipped_grad_sum),
          jitted(one_pass_clipping.clipped_grad_sum))


def _params():
  params = models.init_variables(MODEL, seed=1)
  return task_weighting.with_initial_weights(
      params, task_weighting.HYPERFACE_LOSS_WEIGHTS)


def test_matches_the_vmap_path_on_hyperface():
  l2_norm_clip = 0.05  # every real example is clipped: tests the norms
  params, batch = _params(), _batch()
  batch['crops'][2, 1, 5, 5, 0] = np.nan  # a real example with a NaN pixel
  padding = jnp.array([False, False, False, False, True, True])
  vmap_path, one_pass = _paths(l2_norm_clip)
  want, got = vmap_path(params, batch, padding), one_pass(params, batch,
                                                          padding)
  assert int(got.num_examples) == int(want.num_examples) == 4
  assert int(got.num_non_finite) == int(want.num_non_finite) == 1
  assert int(got.num_clipped) == int(want.num_clipped)
  assert int(want.num_clipped) == 3
  for path, leaf in jax.tree_util.tree_leaves_with_path(want.grad_sum):
    other = got.grad_sum
    for key in path:
      other = other[key.key]
    np.testing.assert_allclose(other, leaf, rtol=2e-4,
                               atol=2e-6 * l2_norm_clip,
                               err_msg=jax.tree_util.keystr(path))


def test_removing_one_example_moves_the_sum_by_at_most_the_clip_norm():
  """The guarantee itself: sensitivity C, every example clipped."""
  l2_norm_clip = 0.05
  _, one_pass = _paths(l2_norm_clip)
  params, batch = _params(), _batch(seed=3)
  full = one_pass(params, batch, jnp.zeros(NUM_IMAGES, bool))
  assert int(full.num_clipped) == NUM_IMAGES
  for i in range(NUM_IMAGES):
    without = one_pass(params, batch, jnp.arange(NUM_IMAGES) == i)
    diff = jax.tree.map(jnp.subtract, full.grad_sum, without.grad_sum)
    norm = float(jnp.sqrt(sum(jnp.sum(d**2) for d in jax.tree.leaves(diff))))
    assert norm <= l2_norm_clip * (1 + 1e-5)
    assert norm >= l2_norm_clip * (1 - 1e-4)  # clipped to exactly C


class _ConvNet(nn.Module):
  """Conv variants (strided, dilated, SAME, explicit padding, no bias, one
  with a ghost norm), a LayerNorm (ordinary autodiff) and a dense layer."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), strides=2, kernel_dilation=2, padding='SAME')(x)
    x = nn.Conv(2, (2, 1), padding=((1, 0), (0, 1)), use_bias=False)(
        nn.relu(x))
    x = nn.Conv(16, (4, 4), padding='VALID')(nn.LayerNorm()(x))  # 1x1 out
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _square_loss(params, example, net=_ConvNet()):
  return jnp.sum((net.apply(params, example['x']) - example['target']) ** 2)


@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_conv_norm_and_dense_variants_match_vmap(microbatch_size):
  """Padding, a NaN example and (with 2) a scanned chunk of 2 examples,
  another, and a remainder of 1."""
  x = jax.random.normal(jax.random.key(0), (5, 3, 7, 6, 2))  # 5 ex. x 3 rows
  x = x.at[1, 2, 2, 1, 0].set(jnp.nan)  # a pixel the strided conv reads
  batch = {'x': x, 'target': jnp.ones((5, 3, 4))}
  padding = jnp.array([False, False, False, True, False])
  params = _ConvNet().init(jax.random.key(1), x[0])
  want = per_example.clipped_grad_sum(
      _square_loss, 1.0, microbatch_size=microbatch_size)(
          params, batch, is_padding_example=padding)
  got = one_pass_clipping.clipped_grad_sum(
      _square_loss, 1.0, microbatch_size=microbatch_size)(
          params, batch, is_padding_example=padding)
  assert int(got.num_examples) == int(want.num_examples) == 4
  assert int(got.num_non_finite) == int(want.num_non_finite) == 1
  assert int(got.num_clipped) == int(want.num_clipped) > 0
  # float32 rounding: the two paths sum in different orders, and a leaf can
  # cancel to ~1e-4 next to leaves of ~0.3; they differ by up to ~3e-6 (in
  # float64 they agree to 1e-8). atol is 1e-5 of C = 1. Both run the same
  # chunks: the float32 backward through the LayerNorm is ~4e-5 off float64
  # in conv leaves on some CPUs, differently for other chunk shapes, on
  # either path.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4,
                                 atol=1e-5), got.grad_sum, want.grad_sum)
  if microbatch_size:  # the chunk loop itself, against the unchunked sum
    whole = per_example.clipped_grad_sum(_square_loss, 1.0)(
        params, batch, is_padding_example=padding)
    # ~4e-5 apart on that CPU. A lost or doubled example moves some leaf
    # by more than 1 / sqrt(#params) ~ 0.03 (its clipped norm is C = 1).
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3,
                                   atol=1e-4), got.grad_sum, whole.grad_sum)


def test_ghost_norm_bounds_the_contribution_when_rows_cancel():
  """Rows built to cancel make the float32 Gram sum ~0 or negative while the
  gradient's norm is 100: the rounding bound must still clip it to C."""
  rng = np.random.default_rng(0)
  v = rng.normal(size=30)
  v *= 1e3 / np.linalg.norm(v)
  w = rng.normal(size=30)
  w -= v * (w @ v) / (v @ v)
  w *= 0.1 / np.linalg.norm(w)
  u = rng.normal(size=20)
  u *= 1e3 / np.linalg.norm(u)
  x = np.stack([np.stack([v, v + w]), rng.normal(size=(2, 30))])
  t = np.stack([np.stack([u, -u]), 0.01 * rng.normal(size=(2, 20))])
  batch = {'x': jnp.asarray(x, jnp.float32), 't': jnp.asarray(t, jnp.float32)}
  net = nn.Dense(20, use_bias=False)  # 2 rows, 30 -> 20: the ghost branch
  params = net.init(jax.random.key(0), batch['x'][0])
  clipped = jax.jit(lambda pad: one_pass_clipping.clipped_grad_sum(
      lambda p, e: jnp.sum(net.apply(p, e['x']) * e['t']), 1.0)(
          params, batch, is_padding_example=pad))
  full, without = clipped(jnp.array([False, False])), clipped(
      jnp.array([True, False]))
  diff = full.grad_sum['params']['kernel'] - without.grad_sum['params'][
      'kernel']
  assert float(jnp.linalg.norm(diff)) <= 1.0 + 1e-5
  assert int(full.num_clipped) == 1


@pytest.mark.parametrize('rows, fan_in, fan_out', [(2, 30, 20), (40, 3, 2)])
def test_ghost_and_materialized_norms_equal_explicit_gradients(
    rows, fan_in, fan_out):
  # (2, 30, 20) takes the ghost-norm branch, (40, 3, 2) the materialized one.
  keys = jax.random.split(jax.random.key(2), 2)
  a = jax.random.normal(keys[0], (4, rows, fan_in))
  delta = jax.random.normal(keys[1], (4, rows, fan_out))
  layer = one_pass_clipping._matrix_grad(a, delta, lambda m: m, True)
  explicit = jnp.einsum('btn,bto->bno', a, delta)
  bias = delta.sum(1)
  want_sq = jnp.sum(explicit**2, axis=(1, 2)) + jnp.sum(bias**2, axis=1)
  got_sq = layer.norm.to_float() ** 2
  # The ghost branch returns an upper bound (float32 rounding slack).
  assert bool(jnp.all(got_sq >= want_sq * (1 - 1e-6)))
  np.testing.assert_allclose(got_sq, want_sq, rtol=1e-4)
  # Norms 0.5, 4, 1, 8 at C = 2: scales 1, 0.5, (padding) 0, 0.25.
  norms = clip_norms.normalized(jnp.array([0.5, 4.0, 1.0, 8.0]),
                                jnp.zeros(4, jnp.int32))
  is_real = jnp.array([True, True, False, True])
  factors = clip_norms.clip_factors(norms, jnp.ones(4, bool), is_real, 2.0)
  scale = jnp.array([1.0, 0.5, 0.0, 0.25])
  np.testing.assert_allclose(factors.scale, scale)
  sums = layer.clipped_sum(factors)
  np.testing.assert_allclose(
      sums['kernel'], jnp.einsum('b,bno->no', scale, explicit), rtol=1e-5,
      atol=1e-5)
  np.testing.assert_allclose(sums['bias'], scale @ bias, rtol=1e-5)


class _PenaltyNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(2)
    out = layer(x)
    # A weight penalty reads the kernel outside the layer's own call.
    return out + jnp.sum(layer.variables['params']['kernel'] ** 2)


class _SharedNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    layer = nn.Dense(3)
    return layer(layer(x))


class _CustomDotNet(nn.Module):
  """The review's case: the kernel gradient was silently off by 34."""

  @nn.compact
  def __call__(self, x):
    def doubled(a, b, dims, **kwargs):
      return 2.0 * jax.lax.dot_general(a, b, dims, **kwargs)
    return nn.Dense(3, dot_general=doubled)(x)


class _CustomVjpNet(nn.Module):
  """A layer inside a custom derivative, whose rule doubles its gradient."""

  @nn.compact
  def __call__(self, x):
    def forward(module, x):
      out, vjp_fn = nn.vjp(lambda m, x: m(x), module, x)
      return out, vjp_fn

    def backward(vjp_fn, g):
      params_t, x_t = vjp_fn(g)
      return jax.tree.map(lambda p: 2 * p, params_t), x_t

    return nn.custom_vjp(lambda m, x: m(x), forward_fn=forward,
                         backward_fn=backward)(nn.Dense(3), x)


@pytest.mark.parametrize('net, message', [
    (_PenaltyNet(), 'Dense_0/kernel is read 2 times'),
    (_SharedNet(), 'called more than once'),
    (_CustomDotNet(), 'Dense_0 .Dense. has a custom dot_general'),
    (_CustomVjpNet(), 'Dense_0/bias is read through a custom derivative'),
])
def test_unsupported_models_are_refused(net, message):
  x = jnp.ones((2, 3))
  params = net.init(jax.random.key(0), x[0])
  clipped = one_pass_clipping.clipped_grad_sum(
      lambda p, e: jnp.sum(net.apply(p, e)), 1.0)
  with pytest.raises(ValueError, match=message):
    clipped(params, x)


@pytest.mark.parametrize('transform, seen', [
    # The second reader's cases: freezing or scaling the params before apply
    # gave 38.8 for a true gradient of 0 and half the true one.
    (jax.lax.stop_gradient, 'stop_gradient'), (lambda v: 2 * v, 'mul'),
    # The third reader's: a reshape that permutes (64% off) and an integer
    # round trip (true gradient 0).
    (lambda v: jax.lax.reshape(v, v.shape[::-1], dimensions=(1, 0)).reshape(
        v.shape) if v.ndim == 2 else v, 'reshape'),
    (lambda v: v.astype(jnp.int32).astype(jnp.float32),
     'convert_element_type'),
])
def test_params_transformed_before_their_layer_are_refused(transform, seen):
  net = nn.Dense(4)
  x = jnp.ones((3, 2, 8))
  params = net.init(jax.random.key(0), x[0])
  clipped = one_pass_clipping.clipped_grad_sum(
      lambda p, e: jnp.sum(net.apply(jax.tree.map(transform, p), e) ** 2),
      1.0)
  with pytest.raises(ValueError, match=f'reaches its layer through {seen}'):
    clipped(params, x)


def test_low_precision_layers_are_still_handled():
  """A bfloat16 Dense reads its float32 kernel through a cast: allowed."""
  net = nn.Dense(4, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (3, 2, 8))
  params = net.init(jax.random.key(0), x[0])
  loss = lambda p, e: jnp.sum(net.apply(p, e).astype(jnp.float32) ** 2)
  want = per_example.clipped_grad_sum(loss, 1.0)(params, x)
  got = one_pass_clipping.clipped_grad_sum(loss, 1.0)(params, x)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-2),
               got.grad_sum, want.grad_sum)


def test_a_loss_that_ignores_its_params_is_refused():
  net = nn.Dense(3)
  x = jnp.ones((2, 2, 3))
  params = net.init(jax.random.key(0), x[0])
  clipped = one_pass_clipping.clipped_grad_sum(
      lambda p, e: jnp.sum(net.apply(params, e) ** 2), 1.0)
  with pytest.raises(ValueError, match='is not read by the loss'):
    clipped(params, x)


class _TwoMaterializedLayers(nn.Module):
  """A conv and a dense layer that both take the materialized branch
  (rows * (n + o) >= n * o), each reading its own input."""

  @nn.compact
  def __call__(self, image, rows):
    return (nn.Conv(4, (3, 3), padding='VALID')(image),  # 16 rows, 18 -> 4
            nn.Dense(3, use_bias=False)(rows))  # 8 rows, 2 -> 3


def test_one_scale_per_example_clips_extreme_magnitudes_to_c():
  """Rule 9 with one power-of-two scale per example (materialized branch):
  inputs and output gradients from 1e-30 to 1e30 in one example, products
  past float32's range (1e20 * 1e20), and inputs and output gradients each
  near float32's largest (a sum of them overflows unless both are scaled;
  no bias, whose own gradient would): every example is still clipped to
  exactly C, none is taken for non-finite, and removing it moves the sum by
  at most C."""
  rng = np.random.default_rng(5)
  net = _TwoMaterializedLayers()
  image = rng.normal(size=(4, 6, 6, 2))
  rows = rng.normal(size=(4, 8, 2))
  out_image = rng.normal(size=(4, 4, 4, 4))
  out_rows = rng.normal(size=(4, 8, 3))
  image[1] *= 1e-30
  image[1, 2, 3, 1] = 1e30  # one huge pixel in a tiny image
  out_image[1] *= 1e-30
  rows[2] *= 1e-30  # tiny inputs, huge output gradients
  out_rows[2] *= 1e30
  image[3] *= 1e20  # each product overflows float32
  out_image[3] *= 1e20
  rows[3] = 3e38 * rng.uniform(-1, 1, size=rows[3].shape)
  out_rows[3] = 3e38 * rng.uniform(-1, 1, size=out_rows[3].shape)
  batch = {k: jnp.asarray(v, jnp.float32) for k, v in [
      ('image', image), ('rows', rows), ('out_image', out_image),
      ('out_rows', out_rows)]}
  params = net.init(jax.random.key(0), batch['image'][0], batch['rows'][0])

  def loss(p, e):
    conv, dense = net.apply(p, e['image'], e['rows'])
    return jnp.sum(conv * e['out_image']) + jnp.sum(dense * e['out_rows'])

  l2_norm_clip = 1e-3
  clipped = jax.jit(lambda pad: one_pass_clipping.clipped_grad_sum(
      loss, l2_norm_clip)(params, batch, is_padding_example=pad))
  full = clipped(jnp.zeros(4, bool))
  assert int(full.num_non_finite) == 0
  assert int(full.num_clipped) == 4
  for i in range(4):
    without = clipped(jnp.arange(4) == i)
    move = np.sqrt(sum(
        np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64))**2)
        for a, b in zip(jax.tree.leaves(full.grad_sum),
                        jax.tree.leaves(without.grad_sum))))
    assert l2_norm_clip * (1 - 1e-4) <= move <= l2_norm_clip * (1 + 1e-5), (
        i, move)


def _dense_sum(fan_out, x, g, l2_norm_clip, is_padding,
               path=one_pass_clipping):
  """Clipped sum (one-pass by default) of ``Dense(fan_out)`` (no bias) under
  the loss ``sum(layer(x) * g)``: inputs ``x``, output gradients ``g``."""
  net = nn.Dense(fan_out, use_bias=False)
  batch = {'x': jnp.asarray(x, jnp.float32), 'g': jnp.asarray(g, jnp.float32)}
  params = net.init(jax.random.key(0), batch['x'][0])
  loss = lambda p, e: jnp.sum(net.apply(p, e['x']) * e['g'])
  out = path.clipped_grad_sum(loss, l2_norm_clip)(
      params, batch, is_padding_example=jnp.asarray(is_padding))
  return out, np.asarray(out.grad_sum['params']['kernel'], np.float64)


@pytest.mark.parametrize('case', ['input_huge_gradient_zero',
                                  'disjoint_rows', 'every_product_flushed'])
def test_an_example_whose_products_all_flush_adds_zero_not_nan(case):
  """Rules 7 and 9 (materialized branch, 4 rows, 2 -> 3): an example whose
  scaled per-example gradient is all zero, while its scales multiply past
  2**127, adds nothing; it once made the whole sum NaN (inf * 0) and was
  counted as finite."""
  rng = np.random.default_rng(0)
  x, g = rng.normal(size=(2, 4, 2)), rng.normal(size=(2, 4, 3))
  if case == 'input_huge_gradient_zero':
    x[1], g[1] = 2e38, 0.0
  elif case == 'disjoint_rows':  # a in row 0, delta in row 1
    x[1] = g[1] = 0.0
    x[1, 0], g[1, 1] = 1e19, 1e19
  else:  # products of 0.1, spread past float32's range within the example
    x[1, 0], g[1, 0], x[1, 1:], g[1, 1:] = 1e19, 1e-20, 1e-20, 1e19
  full, with_it = _dense_sum(3, x, g, 1.0, [False, False])
  _, without = _dense_sum(3, x, g, 1.0, [False, True])
  assert np.all(np.isfinite(with_it)) and int(full.num_non_finite) == 0
  assert np.linalg.norm(with_it - without) <= 1.0 + 1e-6


def test_ghost_sum_at_the_smallest_clip_norm_is_the_scaled_sum_at_one():
  """Rule 9 at C = 1e-30 (ghost branch, 16 rows, 1000 -> 1000): one example
  whose 15 small rows cancel part of its big row. Clipping is linear in C,
  so what is added at C = 1e-30 must be 1e-30 times what is added at C = 1.
  Formed at C's scale, the small rows' products (~1e-38) were subnormal and
  flushed to zero, adding 1.1e-4 relative more than the clipped direction
  (1.0005 C at 2000 -> 2000, 64 rows)."""
  x = np.full((1, 16, 1000), -2.0**-17)
  x[0, -1] = 1.0
  g = np.ones((1, 16, 1000))
  _, at_one = _dense_sum(1000, x, g, 1.0, [False])
  tiny, at_tiny = _dense_sum(1000, x, g, 1e-30, [False])
  assert int(tiny.num_clipped) == 1
  assert np.linalg.norm(at_tiny / 1e-30 - at_one) <= 1e-6 * np.linalg.norm(
      at_one)


@pytest.mark.parametrize('path', [one_pass_clipping, per_example])
def test_a_padding_mask_that_is_not_bool_is_refused(path):
  """A 0/1 int mask once gave one-pass num_examples = -3 (``~1 == -2``)."""
  x, g = np.ones((2, 4, 2)), np.ones((2, 4, 3))
  with pytest.raises(ValueError, match='is_padding_example has dtype int32, '
                     'expected bool'):
    _dense_sum(3, x, g, 1.0, np.array([0, 1], np.int32), path)
