"""Secret keys for DP noise and sampling, and where their seeds came from.

Anyone who knows the noise key can regenerate the noise and subtract it, and
anyone who knows the sampler's seed knows which examples each step used (no
amplification by sampling). So both come from OS entropy by default, and a
seed given for reproducibility is labelled as not secret in the privacy
report.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dplh_jax.dp import dp_transform

OS_ENTROPY = 'os_entropy'
CONFIG_SEED = 'config_seed (not secret)'


def secret_key(seed: int | None) -> tuple[jax.Array, str]:
  """``(key, source)``: 64 bits of OS entropy, unless ``seed`` is given."""
  if seed is None:
    data = np.frombuffer(os.urandom(8), dtype=np.uint32)
    return dp_transform.canonicalize_key(data), OS_ENTROPY
  return dp_transform.canonicalize_key(seed), seed_source(seed)


def seed_source(seed: int | None) -> str:
  """How a seed was chosen, as the privacy report states it."""
  return OS_ENTROPY if seed is None else CONFIG_SEED
