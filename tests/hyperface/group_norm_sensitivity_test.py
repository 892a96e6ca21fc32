"""GroupNorm (``config.group_norm_groups``) keeps sensitivity C through the
real per-image loss on the default one-pass path.

GroupNorm's scale and bias are not Dense / Conv parameters, so one-pass
clipping takes their per-image gradients by plain autodiff in each image's
own vmap lane; GroupNorm normalizes each crop by its own statistics, so no
image's gradient depends on another image. If either failed, an image alone
would add more than C, or removing it would move the sum by more.
"""

import functools

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import train_step

import sensitivity_case as case  # tests/hyperface, on setup.cfg's pythonpath

# One group: the tiny model's 3-channel conv1 admits no other count.
# The shared tiny Cross-SEC case (C below every image's gradient norm).
CONFIG = case.config(group_norm_groups=1)
C = CONFIG.l2_norm_clip
TOLERANCE = 1e-4  # float32 sums of a few thousand parameters


@functools.lru_cache(maxsize=None)
def _clipped_sum():
  model, weighting = model_setup.build_model(CONFIG)
  params = model_setup.init_params(CONFIG, model)
  assert 'conv1_norm' in params['params']['trunk']
  spec = train_step.StepSpec.from_config(CONFIG, model, weighting,
                                         noise_multiplier=1.0)
  fn = train_step.clipped_sum_fn(spec)

  def flat_sum(batch, padding):
    clipped, _ = fn(params, batch, jax.random.key(2),
                    is_padding_example=padding)
    return ravel_pytree(clipped.grad_sum)[0]
  jitted = jax.jit(flat_sum)
  return lambda batch, padding: np.asarray(jitted(batch, padding), np.float64)


def test_group_norm_images_add_at_most_c_and_removal_moves_at_most_c():
  clipped_sum = _clipped_sum()
  batch = case.batch(seed=3)
  num_images = len(batch['image_index'])
  batch['crops'][4] *= 1e4  # an extreme image
  full = clipped_sum(batch, batch['is_padding_example'])
  # One ordinary image alone is clipped to exactly C: its norm counts every
  # parameter it moves, GroupNorm's included.
  alone = clipped_sum(batch, np.arange(num_images) != 1)
  assert C * (1 - 1e-3) <= np.linalg.norm(alone) <= C * (1 + TOLERANCE)
  for i in (4, 1):  # the extreme image, an ordinary one
    for removed in (clipped_sum(*removal)
                    for removal in case.removals(batch, i)):
      distance = np.linalg.norm(full - removed)
      assert distance <= C * (1 + TOLERANCE), (i, distance)
