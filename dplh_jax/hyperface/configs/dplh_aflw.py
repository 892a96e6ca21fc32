"""The DPLH setting on AFLW (needs a manual download; see the README).

DPLH (Zhang et al. 2020): 227x227 HyperFace, clip S = 0.5, batch L = 32,
learning rate 1.5e-4, budgets (10, 1e-5), (5, 1e-5) and (0.7, 1e-5). Pick the
budget with --config.target_epsilon=10 (default), 5 or 0.7. DPLH trains 500
epochs on ~40k regions; on CPU reduce num_epochs.
"""

import ml_collections

from dplh_jax.hyperface.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = 'aflw'
  config.task_weighting = 'uncertainty'  # DPLH Eq. 7
  config.num_proposals = 4
  config.num_positives = 2
  config.input_size = 227
  config.width_multiplier = 1.0
  config.conv1_kernel = 11
  config.conv1_stride = 4
  config.dropout_rate = 0.5
  config.l2_norm_clip = 0.5
  config.expected_batch_size = 32
  config.learning_rate = 1.5e-4
  config.target_epsilon = 10.0  # DPLH budgets: 10, 5, 0.7
  config.num_epochs = 500.0
  config.microbatch_size = 8
  return config
