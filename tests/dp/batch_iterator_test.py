"""PaddedBatches: exactly the sampled rows, zeros and a mask at padding, the
draw's number, the planned number of steps, the same batches after a resume;
a source is read only at sampled indices."""

import json

import numpy as np
import pytest

from dplh_jax.dp import batch_iterator
from dplh_jax.dp import batch_selection

_N = 20


def _data():
  rng = np.random.default_rng(0)
  # +1 so that no real row is all zeros, like a padding row.
  return {'x': rng.normal(size=(_N, 3)).astype(np.float32) + 1,
          'y': np.arange(_N, dtype=np.int32) + 1}


def _sampler(seed=0, expected=6.0, padded=4):
  # A padded size below the expected batch makes multi-chunk steps common.
  return batch_selection.PoissonSampler(_N, expected, seed=seed,
                                        padded_batch_size=padded)


class _Source:
  """Random-access dataset that records every index it is asked for."""

  def __init__(self, data, dtypes=None):
    self.data, self.read, self.dtypes = data, [], dtypes or {}

  def __len__(self):
    return _N

  def __getitem__(self, i):
    if not 0 <= i < _N:
      raise IndexError(i)
    self.read.append(i)
    return {'x': self.data['x'][i].astype(self.dtypes.get(i, np.float32)),
            'y': self.data['y'][i]}


def _check_batch(batch, sample, data):
  real = ~sample.is_padding_example
  np.testing.assert_array_equal(batch.is_padding_example,
                                sample.is_padding_example)
  assert batch.num_real_examples.dtype == np.int32
  assert int(batch.num_real_examples) == real.sum()
  for name in data:
    np.testing.assert_array_equal(batch.data[name][real],
                                  data[name][sample.indices[real]])
    assert not batch.data[name][~real].any()


@pytest.mark.parametrize('kind', ['arrays', 'source'])
def test_rows_are_the_poisson_sample_and_padding_is_zero(kind):
  data = _data()
  source = _Source(data)
  batches = batch_iterator.PaddedBatches(
      _sampler(), 30, **({'arrays': data} if kind == 'arrays'
                         else {'source': source}))
  mirror = _sampler()  # Same seed: draws the same samples.
  shapes, sampled = set(), []
  for step, batch in enumerate(batches):
    sample = mirror.sample()
    _check_batch(batch, sample, data)
    assert batch.step.dtype == np.int32 and int(batch.step) == step
    shapes.add(len(batch.is_padding_example))
    sampled.extend(sample.indices[~sample.is_padding_example])
  assert mirror.steps_sampled == batches.sampler.steps_sampled == 30
  assert len(batches) == 0
  assert len(shapes) > 1  # multi-chunk steps were exercised
  if kind == 'source':
    # F6: only sampled examples were read (no source[0] for the shapes).
    assert source.read == sampled


def test_source_step_with_no_example_needs_example_spec():
  sampler = batch_selection.PoissonSampler(_N, 1e-9, seed=0,
                                           padded_batch_size=8)
  source = _Source(_data())
  with pytest.raises(ValueError, match='pass example_spec='):
    next(batch_iterator.PaddedBatches(sampler, 2, source=source))
  spec = {'x': np.zeros(3, np.float32), 'y': np.int32(0)}
  batch = next(batch_iterator.PaddedBatches(sampler, 2, source=source,
                                            example_spec=spec))
  assert batch.is_padding_example.all() and not source.read
  assert batch.data['x'].shape == (8, 3) and batch.data['x'].dtype == np.float32
  assert batch.data['y'].shape == (8,) and not batch.data['y'].any()


def test_source_examples_of_another_dtype_are_refused_not_cast():
  # F6: an int8 example first would have cast later float examples.
  batches = batch_iterator.PaddedBatches(
      _sampler(expected=10.0, padded=24), 1,
      source=_Source(_data(), dtypes={i: np.int8 for i in range(3)}))
  with pytest.raises(ValueError, match='shapes and dtypes'):
    next(batches)


def test_resume_from_state_dict_yields_the_remaining_batches():
  data = _data()
  full = [b.data['x'] for b in batch_iterator.PaddedBatches(
      _sampler(seed=5), 6, arrays=data)]
  first = batch_iterator.PaddedBatches(_sampler(seed=5), 6, arrays=data)
  for _ in range(2):
    next(first)
  state = json.loads(json.dumps(first.state_dict()))
  # A fresh process: a sampler seeded differently, restored from the state.
  resumed = batch_iterator.PaddedBatches(_sampler(seed=99), 6, arrays=data)
  resumed.load_state_dict(state)
  assert len(resumed) == 4
  rest = list(resumed)
  assert [int(b.step) for b in rest] == [2, 3, 4, 5]
  for a, b in zip(full[2:], rest):
    np.testing.assert_array_equal(a, b.data['x'])
  other_plan = batch_iterator.PaddedBatches(_sampler(), 7, arrays=data)
  with pytest.raises(ValueError, match='planned 6 steps'):
    other_plan.load_state_dict(state)


def test_refuses_data_of_another_size_and_ambiguous_arguments():
  data = _data()
  with pytest.raises(ValueError, match='num_examples=len'):
    batch_iterator.PaddedBatches(
        batch_selection.PoissonSampler(_N + 1, 2.0, seed=0), 1, arrays=data)
  with pytest.raises(ValueError, match='exactly one'):
    batch_iterator.PaddedBatches(_sampler(), 1, arrays=data,
                                 source=_Source(data))
  with pytest.raises(ValueError, match='exactly one'):
    batch_iterator.PaddedBatches(_sampler(), 1)
  with pytest.raises(ValueError, match='num_steps'):
    batch_iterator.PaddedBatches(_sampler(), 0, arrays=data)
