"""Batch layout over processes and devices; the one-device layout; locks."""

import numpy as np
import pytest

from dplh_jax.dp import batch_selection
from dplh_jax.dp import run_binding
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import parallel


def _layouts(processes, shards):
  return [input_pipeline.BatchLayout(processes, p, shards)
          for p in range(processes)]


@pytest.mark.parametrize('processes, shards', [(1, 4), (2, 2), (3, 1)])
def test_the_processes_slots_hold_each_sampled_image_once(processes, shards):
  """Across processes every sampled index is in one slot, none other; every
  process pads to one length, a multiple of its devices; each device block
  holds its share of the images give or take one, padding last."""
  sampler = batch_selection.PoissonSampler(200, 40, seed=3)
  layouts = _layouts(processes, shards)
  per_chunk = input_pipeline.chunk_size(sampler, layouts[0])
  for _ in range(30):
    sample = sampler.sample()
    parts = [input_pipeline.local_slots(sample, per_chunk, layout)
             for layout in layouts]
    assert len({len(indices) for indices, _ in parts}) == 1
    real = [indices[~padding] for indices, padding in parts]
    assert np.array_equal(np.sort(np.concatenate(real)),
                          sample.indices[~sample.is_padding_example])
    for (indices, padding), layout in zip(parts, layouts):
      assert np.array_equal(padding, indices == -1)
      blocks = indices.reshape(shards, -1)
      counts = (blocks >= 0).sum(axis=1)
      assert counts.max() - counts.min() <= 1
      assert all(np.all(b[:c] >= 0) and np.all(b[c:] == -1)
                 for b, c in zip(blocks, counts))
      assert np.all(indices[~padding] % processes == layout.process_index)


def test_one_process_on_one_device_keeps_the_samplers_slots():
  sampler = batch_selection.PoissonSampler(50, 10, seed=0)
  layout = input_pipeline.BatchLayout()
  sample = sampler.sample()
  indices, padding = input_pipeline.local_slots(
      sample, input_pipeline.chunk_size(sampler, layout), layout)
  np.testing.assert_array_equal(indices, sample.indices)
  np.testing.assert_array_equal(padding, sample.is_padding_example)


def test_an_overflowing_share_adds_a_chunk_on_every_process():
  sample = batch_selection.PoissonSampler(20, 10, seed=0,
                                          padded_batch_size=4).pad(
                                              np.arange(0, 20, 2))
  # Every sampled index is even: process 0 holds all 10, process 1 none.
  lengths = [len(input_pipeline.local_slots(sample, 4, layout)[0])
             for layout in _layouts(2, 2)]
  assert lengths == [12, 12]


def test_a_share_is_padded_to_its_own_quantile_not_half_the_batch():
  """Halving the sampler's 99.9% size would overflow a share more often:
  a share's size varies relatively more."""
  sampler = batch_selection.PoissonSampler(20_000, 256, seed=0)
  share = input_pipeline.chunk_size(sampler,
                                    input_pipeline.BatchLayout(2, 0, 4))
  assert share > sampler.padded_batch_size / 2 and share % 4 == 0
  assert share == 168


def test_this_process_layout_is_one_device():
  layout = parallel.make_layout(0)
  assert layout.mesh is None and layout.is_main
  assert layout.describe() == {'num_devices': 1, 'num_processes': 1}
  with pytest.raises(ValueError, match='config.num_devices=2: this run has '
                     '1 devices'):
    parallel.make_layout(2)


def test_no_flags_start_no_distributed_run_and_bad_ones_say_why():
  assert not parallel.initialize_distributed()
  with pytest.raises(ValueError, match='--process_id=2: must be in'):
    parallel.initialize_distributed('localhost:1', 2, 2)


def test_the_processes_of_a_run_share_a_workdir_a_second_run_is_refused(
    tmp_path):
  with parallel.WorkdirLock(str(tmp_path), 0), parallel.WorkdirLock(
      str(tmp_path), 1):
    with pytest.raises(run_binding.WorkdirInUseError):
      with parallel.WorkdirLock(str(tmp_path), 1):
        pass
    with pytest.raises(run_binding.WorkdirInUseError):
      with run_binding.WorkdirLock(str(tmp_path)):
        pass


class _FakeDevice:

  def __init__(self, process_index, device_id):
    self.process_index, self.id = process_index, device_id


def test_processes_with_unequal_device_counts_are_refused(monkeypatch):
  devices = [_FakeDevice(0, 0), _FakeDevice(0, 1), _FakeDevice(1, 2)]
  monkeypatch.setattr(parallel.jax, 'devices', lambda: devices)
  monkeypatch.setattr(parallel.jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'unequal device counts \{0: 2, 1: 1\}'):
    parallel.make_layout(0)


def test_fingerprints_see_one_changed_bit_and_name_what_differs():
  params = {'w': np.zeros((2, 3), np.float32), 'b': np.ones(3, np.float32)}
  flipped = {'w': params['w'].copy(), 'b': params['b']}
  flipped['w'].view(np.uint32)[1, 2] ^= 1  # 0.0 -> the smallest subnormal
  config = {'learning_rate': 1e-3, 'task_weighting': 'uncertainty'}
  assert parallel.fingerprint(params) == parallel.fingerprint(
      {'b': params['b'].copy(), 'w': params['w'].copy()})
  assert parallel.fingerprint(params) != parallel.fingerprint(flipped)
  assert parallel.fingerprint(config) != parallel.fingerprint(
      dict(config, learning_rate=2e-3))
  # The params as float64 are other values for the step: refused too.
  assert parallel.fingerprint(params) != parallel.fingerprint(
      {k: v.astype(np.float64) for k, v in params.items()})

  names = ['config', 'params']
  same = np.stack([np.frombuffer(parallel.fingerprint(config), np.uint8),
                   np.frombuffer(parallel.fingerprint(params), np.uint8)])
  other = same.copy()
  other[1, 0] ^= 1
  assert parallel.first_disagreement(np.stack([same, same, same]),
                                     names) is None
  assert parallel.first_disagreement(np.stack([same, same, other]), names) == (
      'params differs between process 0 and process 2')
