"""Dropout is keyed by the image's identity, never by its slot (docs/DESIGN.md, Privacy rules, rule 8).

With dropout on, the per-image gradient depends on the image's dropout mask.
If that mask followed the image's slot in the padded batch, removing one
image would shift every later image into another slot, hence another mask,
hence another clipped gradient: the clipped sum would then move by up to
2 C per shifted image instead of C in all. These tests remove one image from
a real pipeline batch and check the sum moves by at most C, through both
clipping paths.
"""

import functools

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.dp import one_pass_clipping
from dplh_jax.dp import per_example
from dplh_jax.hyperface import task_weighting

CONFIG = models.HyperFaceConfig(input_size=32, width_multiplier=1 / 32,
                                conv1_kernel=3, conv1_stride=1,
                                dropout_rate=0.5)
MODEL = models.HyperFace(CONFIG)
WEIGHTING = task_weighting.UncertaintyWeighting()
PIPELINE = input_pipeline.PipelineConfig(crop_size=32, num_proposals=2,
                                         num_positives=1)
L2_NORM_CLIP = 0.01  # far below every gradient norm: every image is clipped
INDICES = np.array([3, 7, 1, 0, 5, 2])  # source indices of the 6 images
STEP = 4


def _record(rng):
  x, y = rng.uniform(4, 20, size=2)
  size = rng.uniform(16, 24)
  box = np.array([[x, y, size, size]], np.float32)
  landmarks = box[:, None, :2] + rng.uniform(0, 1, (1, 21, 2)).astype(
      np.float32) * box[:, None, 2:]
  return {
      'image': rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
      'image_id': b'fake',
      'faces': {
          'bbox': list(box),
          'landmarks': list(landmarks),
          'visibility': list(np.ones((1, 21), np.float32)),
          'pose': list(rng.uniform(-0.5, 0.5, (1, 3)).astype(np.float32)),
          'gender': list(rng.integers(0, 2, (1,)).astype(np.int32)),
      },
  }


SOURCE = [_record(np.random.default_rng(i)) for i in range(8)]


def _batch(indices, is_padding_example=None):
  """The training batch the pipeline builds for these images at STEP."""
  if is_padding_example is None:
    is_padding_example = np.zeros(len(indices), bool)
  return input_pipeline.build_batch(SOURCE, np.asarray(indices),
                                    is_padding_example, PIPELINE, seed=0,
                                    step=STEP)


def _loss_fn():
  return functools.partial(losses.per_image_loss, model=MODEL,
                           weighting=WEIGHTING)


@functools.lru_cache(maxsize=None)
def _clipped_sums():
  """Jitted flat clipped sums, (vmap path, one-pass path)."""
  def jitted(clipped_grad_sum):
    fn = clipped_grad_sum(_loss_fn(), L2_NORM_CLIP, has_aux=True)
    return jax.jit(lambda p, b, rng, pad: ravel_pytree(
        fn(p, b, rng, is_padding_example=pad)[0].grad_sum)[0])
  return (jitted(per_example.clipped_grad_sum),
          jitted(one_pass_clipping.clipped_grad_sum))


@pytest.fixture(scope='module')
def params():
  return models.init_variables(MODEL, seed=1)


@pytest.mark.parametrize('path', [0, 1], ids=['vmap', 'one_pass'])
def test_removing_one_image_moves_the_clipped_sum_by_at_most_c(params, path):
  clipped_sum = _clipped_sums()[path]
  rng = jax.random.fold_in(jax.random.key(0), STEP)  # as train.py does
  batch = _batch(INDICES)
  full = np.asarray(clipped_sum(params, batch, rng,
                                batch['is_padding_example']), np.float64)
  # (a) D': image 0 is not in the data set, so the sampler never draws it and
  # its row is absent; every later image moves up one slot.
  deleted = {key: np.delete(value, 0, axis=0) for key, value in batch.items()
             if key != 'index'}  # the old code's slot key, not a per-image array
  rebuilt = _batch(INDICES[1:])
  for key, value in deleted.items():
    np.testing.assert_array_equal(rebuilt[key], value, err_msg=key)
  without = np.asarray(clipped_sum(params, rebuilt, rng,
                                   rebuilt['is_padding_example']), np.float64)
  # (b) D': image 0's slot is padding, every other image keeps its slot.
  padding = batch['is_padding_example'].copy()
  padding[0] = True
  masked = np.asarray(clipped_sum(params, batch, rng, padding), np.float64)
  distances = {'deleted': np.linalg.norm(full - without),
               'masked': np.linalg.norm(full - masked)}
  for removal, distance in distances.items():
    assert distance <= L2_NORM_CLIP * (1 + 1e-4), (
        f'{removal}: ||S(D) - S(D\')|| = {distance / L2_NORM_CLIP:.3f} C',
        {k: f'{v / L2_NORM_CLIP:.3f} C' for k, v in distances.items()})
  # Every image is clipped, so removing one moves the sum by exactly C.
  np.testing.assert_allclose(list(distances.values()), L2_NORM_CLIP,
                             rtol=1e-3)


def test_dropout_gradient_of_an_image_does_not_depend_on_its_slot(params):
  grads_fn = jax.jit(
      per_example.per_example_grads(_loss_fn(), has_aux=True))
  rng = jax.random.fold_in(jax.random.key(0), STEP)
  permutation = np.array([5, 2, 0, 4, 1, 3])
  grads, _ = grads_fn(params, _batch(INDICES), rng)
  permuted, _ = grads_fn(params, _batch(INDICES[permutation]), rng)
  flat = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(grads))
  flat_permuted = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(permuted))
  # Dropout is on: the same images under another key get other gradients.
  other, _ = grads_fn(params, _batch(INDICES), jax.random.key(99))
  flat_other = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(other))
  assert not np.allclose(flat_other, flat, rtol=1e-3)
  np.testing.assert_allclose(flat_permuted, flat[permutation], rtol=1e-5,
                             atol=1e-7)
