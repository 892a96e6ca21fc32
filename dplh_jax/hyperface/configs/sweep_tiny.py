"""The tiny config for sweeps in tests and the notebook: seconds per run.

Like ``tiny.py``, but sigma is left to the sweep's calibration, with the RDP
accountant: at the tiny set's q = 0.25, PLD calibration takes 5 to 20 s per
budget, RDP about 2 s (its epsilon is an upper bound, so the budget holds).
"""

import ml_collections

from dplh_jax.hyperface.configs import tiny


def get_config() -> ml_collections.ConfigDict:
  config = tiny.get_config()
  config.noise_multiplier = None
  config.accountant = 'rdp'
  return config
