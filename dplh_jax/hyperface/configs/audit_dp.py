"""DP audit run (dplh-audit): epsilon 1 at delta 1e-5.

The demo model in the regime where a non-private model memorizes: 100 real
training images (plus the included canaries), 150 epochs, batch 8 and a
learning rate of 3e-4 (at the demo's 3e-3 Adam's step noise erases what one
image taught, and a non-private model shows no membership signal at all).
audit_nonprivate.py is the same run without clipping or noise.

Why epsilon 1: with 200 canaries and 40 guesses the audit can certify at most
about 2.5 (all guesses right). Against epsilon 5 it could never object, so it
would not catch a broken mechanism; against epsilon 1 it does, since the
non-private run certifies more than 1. ``--config.target_epsilon=5`` works.

  dplh-audit --config audit_dp \
      --workdir workdirs/audit_dp --canary_seed=1
"""

import ml_collections

from dplh_jax.hyperface.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task_weighting = 'uncertainty'  # the setting its power was tuned in
  config.num_train_examples = 100
  config.num_epochs = 150.0
  config.expected_batch_size = 8
  config.learning_rate = 3e-4
  config.microbatch_size = 8
  config.target_epsilon = 1.0
  config.num_eval_examples = 1000
  config.log_every = 250
  config.checkpoint_every = 1000
  return config
