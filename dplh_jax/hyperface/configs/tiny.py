"""Seconds-long end-to-end run on the tiny synthetic set, for tests."""

import ml_collections

from dplh_jax.hyperface.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'synthetic_faces/tiny'
  config.task_weighting = 'uncertainty'  # tests cover the learned weights
  config.num_proposals = 2
  config.num_positives = 1
  config.input_size = 32
  config.width_multiplier = 1 / 32
  config.conv1_kernel = 3
  config.conv1_stride = 1
  config.expected_batch_size = 6
  config.num_epochs = 1.0  # 24 images, q = 0.25: 4 steps
  config.microbatch_size = 4
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval_batch_size = 8
  # A given sigma: calibrating with PLD at q = 0.25 takes ~30 s (calibration
  # is tested on its own); epsilon is still checked against the target.
  config.noise_multiplier = 1.0
  config.noise_seed = 0
  config.sampler_seed = 0
  return config
