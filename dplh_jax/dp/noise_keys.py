"""Secret keys for DP noise and sampling, and where their seeds came from.

Anyone who knows the noise key can regenerate the noise and subtract it, and
anyone who knows the sampler's seed knows which examples each step used (no
amplification by sampling). So both come from OS entropy by default, and a
seed given for reproducibility is labelled as not secret in the privacy
report.

In a multi-process run (``jax.distributed``) every process must add the
same noise to the same global sum, and sample with the same coins: the
entropy is drawn once, on process 0, and broadcast to the others
(:func:`agreed_entropy`). It is never derived per process: keys derived as
``fold_in(key, process_index)`` would add a different noise on each process,
and the released update would no longer be the one mechanism accounted for.
"""

from __future__ import annotations

import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from dplh_jax.dp import dp_transform

OS_ENTROPY = 'os_entropy'
CONFIG_SEED = 'config_seed (not secret)'


def agreed_entropy(num_words: int) -> np.ndarray:
  """``num_words`` uint32 words of OS entropy, the same on every process.

  Drawn once, by process 0, and broadcast with
  ``multihost_utils.broadcast_one_to_all`` (every process must call this at
  the same point, as for any collective); with one process, just drawn.
  """
  if jax.process_count() == 1:
    return np.frombuffer(os.urandom(4 * num_words), dtype=np.uint32)
  words = (np.frombuffer(os.urandom(4 * num_words), dtype=np.uint32)
           if jax.process_index() == 0 else np.zeros(num_words, np.uint32))
  return np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)


def secret_key(seed: int | None) -> tuple[jax.Array, str]:
  """``(key, source)``: 64 bits of OS entropy (drawn once and shared by all
  processes), unless ``seed`` is given."""
  if seed is None:
    return dp_transform.canonicalize_key(agreed_entropy(2)), OS_ENTROPY
  return dp_transform.canonicalize_key(seed), seed_source(seed)


def secret_seed(seed: int | None) -> tuple[int, str]:
  """``(seed, source)`` for a NumPy generator (the Poisson sampler): 128 bits
  of OS entropy shared by all processes, unless ``seed`` is given."""
  if seed is None:
    words = agreed_entropy(4).astype(np.uint64)
    return int(sum(int(w) << (32 * i) for i, w in enumerate(words))), OS_ENTROPY
  return seed, seed_source(seed)


def seed_source(seed: int | None) -> str:
  """How a seed was chosen, as the privacy report states it."""
  return OS_ENTROPY if seed is None else CONFIG_SEED
