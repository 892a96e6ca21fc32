"""per_example_grads and clipped_grad_sum against a Python loop of jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dplh_jax.dp import dp_transform
from dplh_jax.dp import per_example


def _loss(params, example, scale):
  hidden = jnp.tanh(example['x'] @ params['w1'])
  prediction = hidden @ params['w2']
  loss = scale * jnp.sum((prediction - example['y']) ** 2)
  return loss, {'prediction': prediction}


def _problem(num_examples=5):
  keys = jax.random.split(jax.random.key(0), 4)
  params = {'w1': jax.random.normal(keys[0], (3, 4)),
            'w2': jax.random.normal(keys[1], (4, 2))}
  batch = {'x': jax.random.normal(keys[2], (num_examples, 3)),
           'y': jax.random.normal(keys[3], (num_examples, 2))}
  return params, batch


def _loop(params, batch, scale):
  grads = [jax.grad(_loss, has_aux=True)(
      params, jax.tree.map(lambda x: x[i], batch), scale)[0]
           for i in range(batch['x'].shape[0])]
  return jax.tree.map(lambda *g: jnp.stack(g), *grads)


@pytest.mark.parametrize('microbatch_size', [None, 2, 5])
def test_per_example_grads_equal_a_loop(microbatch_size):
  params, batch = _problem()
  fn = jax.jit(per_example.per_example_grads(
      _loss, has_aux=True, microbatch_size=microbatch_size))
  grads, aux = fn(params, batch, 0.5)
  expected = _loop(params, batch, 0.5)
  # The loop runs op by op, the jitted path fused: their float32 tanh' = 1 -
  # tanh^2 differ by a few ulps of 1 near saturation, ~2e-6 in gradients of
  # up to ~5 (atol 1e-5); a wrong example or chunk would be off by O(1).
  for name in params:
    np.testing.assert_allclose(grads[name], expected[name], rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(
      aux['prediction'],
      jnp.tanh(batch['x'] @ params['w1']) @ params['w2'], rtol=1e-5)


@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_fused_clipped_sum_equals_clip_and_sum_of_per_example_grads(
    microbatch_size):
  params, batch = _problem(7)
  # With chunks of 2, examples 0-5 go through the scan and 6 is the leftover
  # chunk: put padding and a NaN example in both parts.
  batch['x'] = batch['x'].at[2, 0].set(jnp.nan).at[6, 0].set(jnp.nan)
  padding = jnp.array([False, True, False, False, False, True, True])
  clip = 1.0
  fused = jax.jit(per_example.clipped_grad_sum(
      _loss, clip, has_aux=True, microbatch_size=microbatch_size))
  clipped, aux = fused(params, batch, 0.5, is_padding_example=padding)
  expected = dp_transform.clip_and_sum(_loop(params, batch, 0.5), clip,
                                       padding)
  for name in params:
    np.testing.assert_allclose(clipped.grad_sum[name],
                               expected.grad_sum[name], rtol=1e-5, atol=1e-6)
  assert int(clipped.num_examples) == 4
  assert int(clipped.num_non_finite) == 1  # example 6 is padding: not counted
  assert int(clipped.num_clipped) == int(expected.num_clipped) > 0
  assert aux['prediction'].shape == (7, 2)


def test_fused_path_skips_chunks_of_padding_exactly():
  params, batch = _problem(6)
  padding = jnp.array([False, False, False, True, True, True])
  fused = jax.jit(per_example.clipped_grad_sum(
      _loss, 1.0, has_aux=True, microbatch_size=2))
  clipped, aux = fused(params, batch, 0.5, is_padding_example=padding)
  expected = dp_transform.clip_and_sum(_loop(params, batch, 0.5), 1.0,
                                       padding)
  for name in params:
    np.testing.assert_allclose(clipped.grad_sum[name],
                               expected.grad_sum[name], rtol=1e-5, atol=1e-6)
  assert int(clipped.num_examples) == 3
  assert bool(jnp.all(aux['prediction'][4:] == 0))  # chunk 2 was skipped


def test_fused_path_checks_the_padding_mask_shape():
  params, batch = _problem(4)
  with pytest.raises(ValueError, match=r'is_padding_example has shape \(7,\)'):
    per_example.clipped_grad_sum(_loss, 1.0, has_aux=True, microbatch_size=2)(
        params, batch, 0.5, is_padding_example=jnp.zeros(7, bool))


def test_bad_microbatch_size_is_named():
  with pytest.raises(ValueError, match='microbatch_size.*0'):
    per_example.per_example_grads(_loss, microbatch_size=0)
