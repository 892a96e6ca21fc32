"""PoissonSampler: the sample is exactly Poisson, nothing is lost, state restores."""

import json

import numpy as np
import pytest
from scipy import stats

from dplh_jax.dp import batch_selection


def _real(batch):
  return batch.indices[~batch.is_padding_example]


def test_inclusion_frequency_and_batch_size_variance_match_poisson():
  n, expected, steps = 50, 5, 2000
  sampler = batch_selection.PoissonSampler(n, expected, seed=0)
  counts = np.zeros(n)
  sizes = []
  for _ in range(steps):
    real = _real(sampler.sample())
    counts[real] += 1
    sizes.append(len(real))
  q = expected / n
  # Each index is included Binomial(steps, q) times: mean 200, s.d. 13.4.
  # With 50 indices, all within 4.5 s.d. fails with probability < 1e-3.
  sd = np.sqrt(steps * q * (1 - q))
  assert np.all(np.abs(counts - steps * q) < 4.5 * sd)
  # Batch size is Binomial(n, q): variance n q (1 - q) = 4.5, not 0 as with
  # fixed-size batches; the sample variance of 2000 draws is within 15%.
  assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.15)
  assert np.mean(sizes) == pytest.approx(expected, rel=0.03)


def test_overflowing_sample_spans_extra_chunks_and_loses_nothing():
  n, expected, seed = 20, 10, 3
  sampler = batch_selection.PoissonSampler(n, expected, seed=seed,
                                           padded_batch_size=4)
  mirror = np.random.default_rng(seed)  # Replays the sampler's coin flips.
  for _ in range(50):
    batch = sampler.sample()
    wanted = np.flatnonzero(mirror.random(n) < expected / n)
    np.testing.assert_array_equal(_real(batch), wanted)
    assert len(batch.indices) == 4 * max(1, -(-len(wanted) // 4))
    assert np.all(batch.indices[batch.is_padding_example] == -1)


def test_empty_batch_is_all_padding():
  sampler = batch_selection.PoissonSampler(10**6, 1e-3, seed=0)
  batch = sampler.sample()
  assert batch.indices.shape == (sampler.padded_batch_size,)
  assert batch.is_padding_example.all()


def test_state_round_trips_through_json_and_reproduces_future_batches():
  sampler = batch_selection.PoissonSampler(100, 10, seed=1)
  for _ in range(3):
    sampler.sample()
  state = json.loads(json.dumps(sampler.state_dict()))
  future = [sampler.sample().indices for _ in range(5)]
  restored = batch_selection.PoissonSampler(100, 10, seed=999)
  restored.load_state_dict(state)
  assert restored.steps_sampled == 3
  for expected in future:
    np.testing.assert_array_equal(restored.sample().indices, expected)


def test_restoring_into_a_differently_configured_sampler_fails():
  state = batch_selection.PoissonSampler(100, 10, seed=1).state_dict()
  with pytest.raises(ValueError, match='expected_batch_size'):
    batch_selection.PoissonSampler(100, 20).load_state_dict(state)


def test_unseeded_samplers_draw_from_os_entropy():
  a = batch_selection.PoissonSampler(1000, 100)
  b = batch_selection.PoissonSampler(1000, 100)
  assert not np.array_equal(a.sample().indices, b.sample().indices)


def test_default_padded_size_rarely_overflows():
  n, q = 60000, 256 / 60000
  padded = batch_selection.default_padded_batch_size(n, q)
  assert padded % 8 == 0
  assert stats.binom.sf(padded, n, q) <= 1e-3
  assert stats.binom.sf(padded - 8, n, q) > 1e-3  # The smallest such size.


@pytest.mark.parametrize('args, message', [
    ((0, 1), 'num_examples'),
    ((10, 11), 'expected_batch_size'),
    ((10, 0), 'expected_batch_size'),
])
def test_bad_arguments_are_named(args, message):
  with pytest.raises(ValueError, match=message):
    batch_selection.PoissonSampler(*args)


def test_gather_padded_zeroes_padding_and_never_reads_index_minus_one():
  arrays = {'x': np.arange(10.0).reshape(5, 2) + 1, 'y': np.arange(5) + 1}
  sampler = batch_selection.PoissonSampler(5, 2, seed=0, padded_batch_size=4)
  sample = sampler.pad(np.array([0, 4]))
  batch = batch_selection.gather_padded(arrays, sample)
  np.testing.assert_array_equal(batch.is_padding_example,
                                [False, False, True, True])
  np.testing.assert_array_equal(batch.data['x'],
                                [[1, 2], [9, 10], [0, 0], [0, 0]])
  np.testing.assert_array_equal(batch.data['y'], [1, 5, 0, 0])
  # Indexing with the raw indices would have read the last example twice.
  assert (arrays['y'][sample.indices] == 5).sum() == 3


def test_gather_padded_refuses_indices_outside_the_data():
  sampler = batch_selection.PoissonSampler(5, 2, seed=0, padded_batch_size=4)
  with pytest.raises(ValueError, match='outside the 3 examples'):
    batch_selection.gather_padded({'x': np.ones(3)}, sampler.pad(
        np.array([1, 4])))
  with pytest.raises(ValueError, match='same number of examples'):
    batch_selection.gather_padded({'x': np.ones(5), 'y': np.ones(4)},
                                  sampler.pad(np.array([1])))
