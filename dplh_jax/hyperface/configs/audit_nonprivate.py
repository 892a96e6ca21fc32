"""Non-private audit run: audit_dp.py without clipping or noise.

  dplh-audit --config audit_nonprivate \
      --workdir workdirs/audit_nonprivate --canary_seed=1
"""

import ml_collections

from dplh_jax.hyperface.configs import audit_dp


def get_config() -> ml_collections.ConfigDict:
  config = audit_dp.get_config()
  config.dp = False
  config.target_epsilon = None
  return config
