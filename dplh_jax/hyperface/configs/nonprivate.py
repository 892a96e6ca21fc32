"""The default model and data trained without DP, for comparison."""

import ml_collections

from dplh_jax.hyperface.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dp = False
  config.target_epsilon = None
  return config
