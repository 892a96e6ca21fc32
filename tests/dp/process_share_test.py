"""Per-process shares of a Poisson sample: disjoint, covering, still Poisson."""

import numpy as np
import pytest

from dplh_jax.dp import batch_selection


def test_the_shares_partition_every_sample():
  sampler = batch_selection.PoissonSampler(103, 20, seed=1)
  for _ in range(50):
    sample = sampler.sample()
    real = sample.indices[~sample.is_padding_example]
    shares = [batch_selection.process_share(sample, p, 3) for p in range(3)]
    assert all(np.all(share % 3 == p) for p, share in enumerate(shares))
    assert np.array_equal(np.sort(np.concatenate(shares)), real)


def test_each_share_is_a_poisson_sample_of_its_indices():
  """Inclusion frequency q for every owned index, and a share's size
  Binomial(owned, q): its mean and variance over 2000 steps."""
  n, expected, steps, processes = 60, 12, 2000, 4
  q = expected / n
  sampler = batch_selection.PoissonSampler(n, expected, seed=0)
  counts, sizes = np.zeros(n), []
  for _ in range(steps):
    share = batch_selection.process_share(sampler.sample(), 1, processes)
    counts[share] += 1
    sizes.append(len(share))
  owned = np.arange(n) % processes == 1
  assert np.all(counts[~owned] == 0)
  # Binomial(2000, 0.2) per index: s.d. 17.9; 15 indices within 4.5 s.d.
  assert np.all(np.abs(counts[owned] - steps * q)
                < 4.5 * np.sqrt(steps * q * (1 - q)))
  assert np.mean(sizes) == pytest.approx(owned.sum() * q, rel=0.05)
  assert np.var(sizes) == pytest.approx(owned.sum() * q * (1 - q), rel=0.15)


def test_a_process_outside_the_run_is_refused():
  sample = batch_selection.PoissonSampler(10, 2, seed=0).sample()
  with pytest.raises(ValueError, match='process_index=2 must be in'):
    batch_selection.process_share(sample, 2, 2)
