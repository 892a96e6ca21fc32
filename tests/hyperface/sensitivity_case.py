"""The tiny Cross-SEC case shared by the per-image sensitivity tests.

A 32 px, 1/32-width HyperFace with Cross-SEC task features, de-correlation
and dropout keyed by image identity on, and a clip norm C below every
image's gradient norm (every image is clipped); a batch of six images of
two proposals each; and the jitted clipped sum of the train step's real
per-image loss. The tests that import it (on the ``pythonpath`` of
setup.cfg) share one XLA cache entry per clipping path.
"""

import functools

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import train_step
from dplh_jax.hyperface.configs import tiny

NUM_IMAGES, NUM_PROPOSALS = 6, 2
L2_NORM_CLIP = 0.01  # below every image's gradient norm: all are clipped


def config(**overrides):
  """The tiny Cross-SEC config, with ``overrides`` applied."""
  cfg = tiny.get_config()  # 32 px, 1/32 width, uncertainty weighting
  cfg.task_features = 'cross_sec'
  cfg.decorrelation_weight = 1.0
  cfg.dropout_rate = 0.5  # dropout keyed by image identity, on
  cfg.l2_norm_clip = L2_NORM_CLIP
  cfg.microbatch_size = None  # one chunk: one compile of the chunk body
  cfg.update(overrides)
  return cfg


CONFIG = config()
MODEL, WEIGHTING = model_setup.build_model(CONFIG)


@functools.lru_cache(maxsize=None)
def params():
  """The initial parameters of ``MODEL`` (computed once)."""
  return model_setup.init_params(CONFIG, MODEL)


def batch(seed=0):
  """Six random images (slots in a shuffled identity order), no padding."""
  rng = np.random.default_rng(seed)
  b, k, s = NUM_IMAGES, NUM_PROPOSALS, CONFIG.input_size
  label = np.zeros((b, k), np.int32)
  label[:, 0] = 1
  return {
      'crops': rng.uniform(size=(b, k, s, s, 3)).astype(np.float32),
      'detection_label': label,
      'landmarks': rng.uniform(size=(b, k, 21, 2)).astype(np.float32),
      'visibility': (rng.uniform(size=(b, k, 21)) > 0.3).astype(np.float32),
      'pose': (0.3 * rng.normal(size=(b, k, 3))).astype(np.float32),
      'gender': rng.integers(0, 2, (b, k)).astype(np.int32),
      'has_landmarks': np.ones(b, bool), 'has_pose': np.ones(b, bool),
      'has_gender': np.ones(b, bool),
      'image_index': np.array([7, 3, 11, 0, 5, 2], np.int32),
      'is_padding_example': np.zeros(b, bool),
  }


@functools.lru_cache(maxsize=None)
def clipped_sum(clipping):
  """Jitted ``(params, batch, rng, padding) -> (flat clipped sum,
  de-correlation loss)`` of the train step on the ``clipping`` path."""
  spec = train_step.StepSpec.from_config(
      config(clipping=clipping), MODEL, WEIGHTING, noise_multiplier=1.0)
  fn = train_step.clipped_sum_fn(spec)

  def flat_sum(params_, batch_, rng, padding):
    clipped, aux = fn(params_, batch_, rng, is_padding_example=padding)
    return ravel_pytree(clipped.grad_sum)[0], aux['decorrelation_loss']
  return jax.jit(flat_sum)


def removals(batch_, i):
  """The two ways of removing image ``i`` from ``batch_``: as ``(batch,
  is_padding_example)`` pairs, masking it (its slot becomes padding) and
  deleting it (later images move up a slot, the last slot becomes
  zero-filled padding)."""
  num = len(batch_['is_padding_example'])
  masked = batch_['is_padding_example'] | (np.arange(num) == i)
  order = [j for j in range(num) if j != i] + [i]
  deleted = {k: v[order].copy() for k, v in batch_.items()}
  for value in deleted.values():  # image i's data leaves the batch
    value[-1] = 0
  padding = batch_['is_padding_example'][order] | (np.arange(num) == num - 1)
  deleted['is_padding_example'] = padding
  return (batch_, masked), (deleted, padding)
