"""``make demo``'s DP run: the default recipe, fine-tuned for two epochs from
the public model of configs/public_pretrain.py (trained first, into
``workdirs/public``), at the same target epsilon 5.

Run:  dplh-train --config public_pretrain --workdir workdirs/public
      dplh-train --config demo --workdir workdirs/default

The public model saw no image of the private split and its start costs no
privacy (public_init.py); fewer DP epochs at the same epsilon mean less
noise per step. Together the two runs fit the demo's 10-minute CPU budget,
and this is the best recipe measured within it (README, "Utility levers").
"""

import ml_collections

from dplh_jax.hyperface.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.init_params_from = 'workdirs/public'
  config.num_epochs = 2.0
  return config
