"""Tests of the input pipeline: shapes, masks, padding, determinism, errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import dplh_jax.hyperface.datasets  # pylint: disable=unused-import  (registers)
from dplh_jax.dp import batch_selection
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import prefetching

_CONFIG = input_pipeline.PipelineConfig(crop_size=16, num_proposals=6,
                                        num_positives=3)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  builder = tfds.builder('synthetic_faces/tiny',
                         data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare()
  return builder.as_data_source()['train']


class _RecordingSource:
  """A list-backed source that remembers which indices were read."""

  def __init__(self, records):
    self.records = records
    self.read = []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    self.read.append(index)
    return self.records[index]


def _record(boxes=((8, 8, 24, 24),), pose=(0.1, 0.2, 0.3), gender=1,
            image_id=b'fake/0'):
  boxes = np.asarray(boxes, np.float32)
  n = len(boxes)
  landmarks = boxes[:, None, :2] + 0.5 * boxes[:, None, 2:] * np.ones(
      (n, 21, 2), np.float32)
  return {
      'image': np.full((48, 48, 3), 100, np.uint8),
      'image_id': image_id,
      'faces': {
          'bbox': list(boxes),
          'landmarks': list(landmarks),
          'visibility': list(np.ones((n, 21), np.float32)),
          'pose': list(np.tile(np.asarray(pose, np.float32), (n, 1))),
          'gender': list(np.full((n,), gender, np.int32)),
      },
  }


def test_batch_keys_shapes_and_dtypes(source):
  indices = np.array([0, 5, -1, -1])
  batch = input_pipeline.build_batch(source, indices, indices < 0, _CONFIG,
                                     seed=0, step=0)
  k, s = _CONFIG.num_proposals, _CONFIG.crop_size
  expected = {
      'crops': ((4, k, s, s, 3), np.float32),
      'detection_label': ((4, k), np.int32),
      'landmarks': ((4, k, 21, 2), np.float32),
      'visibility': ((4, k, 21), np.float32),
      'pose': ((4, k, 3), np.float32),
      'gender': ((4, k), np.int32),
      'has_landmarks': ((4,), np.bool_),
      'has_pose': ((4,), np.bool_),
      'has_gender': ((4,), np.bool_),
      'boxes': ((4, k, 4), np.float32),
      'face_boxes': ((4, k, 4), np.float32),
      'image_index': ((4,), np.int32),
      'is_padding_example': ((4,), np.bool_),
  }
  assert {key: (v.shape, v.dtype) for key, v in batch.items()} == expected
  assert 0.0 <= batch['crops'].min() and batch['crops'].max() <= 1.0
  assert batch['image_index'].tolist() == [0, 5, -1, -1]
  assert batch['has_pose'].tolist() == [True, True, False, False]


def test_padding_slots_are_never_read_and_carry_no_label():
  records = _RecordingSource([_record(), _record()])
  # Slot 1 holds a valid-looking index but is padding: it must not be read.
  batch = input_pipeline.build_batch(records, np.array([1, 0, -1]),
                                     np.array([False, True, True]), _CONFIG,
                                     seed=0, step=3)
  assert records.read == [1]
  for key in ('crops', 'landmarks', 'visibility', 'pose', 'boxes'):
    assert not batch[key][1:].any(), key
  np.testing.assert_array_equal(batch['detection_label'][1:], -1)
  np.testing.assert_array_equal(batch['gender'][1:], -1)
  assert not batch['has_pose'][1:].any() and not batch['has_gender'][1:].any()
  assert batch['crops'][0].any()


def test_positives_carry_targets_and_negatives_none():
  batch = input_pipeline.build_batch(_RecordingSource([_record()]),
                                     np.array([0]), np.array([False]), _CONFIG,
                                     seed=0)
  label = batch['detection_label'][0]
  assert (label == 1).sum() == 3 and (label == 0).sum() == 3
  positive = label == 1
  np.testing.assert_allclose(batch['pose'][0][positive], [[0.1, 0.2, 0.3]] * 3,
                             rtol=1e-6)
  assert (batch['gender'][0][positive] == 1).all()
  assert (batch['gender'][0][~positive] == -1).all()
  assert not batch['visibility'][0][~positive].any()
  assert batch['visibility'][0][positive].any()
  # Landmarks (all at the face centre) are in crop coordinates, Eq. 9.
  boxes = batch['boxes'][0][positive]
  centre = np.array([20.0, 20.0])
  expected = (centre - boxes[:, :2]) / boxes[:, 2:]
  visible = batch['visibility'][0][positive][:, 0] == 1
  np.testing.assert_allclose(batch['landmarks'][0][positive][visible, 0],
                             expected[visible], rtol=1e-5)


def test_training_randomness_depends_on_seed_and_step_only(source):
  indices, padding = np.array([1, 2, 3]), np.zeros(3, bool)
  def build(seed, step):
    return input_pipeline.build_batch(source, indices, padding, _CONFIG,
                                      seed=seed, step=step)
  a, again, other_step = build(0, 7), build(0, 7), build(0, 8)
  for key in a:
    np.testing.assert_array_equal(a[key], again[key])
  assert not np.array_equal(a['boxes'], other_step['boxes'])
  assert not np.array_equal(a['boxes'], build(1, 7)['boxes'])


def test_eval_batches_are_deterministic_sequential_and_padded(source):
  first = list(input_pipeline.eval_batches(source, _CONFIG, batch_size=10))
  second = list(input_pipeline.eval_batches(source, _CONFIG, batch_size=10))
  assert len(first) == 3   # 24 images
  index = np.concatenate([b['image_index'] for b in first])
  padding = np.concatenate([b['is_padding_example'] for b in first])
  assert index[~padding].tolist() == list(range(24))
  assert padding.sum() == 6 and (index[padding] == -1).all()
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['crops'], b['crops'])


def test_train_batches_carry_the_sampler_state_of_their_own_step(source):
  sampler = batch_selection.PoissonSampler(len(source), 4, seed=0,
                                           padded_batch_size=8)
  items = list(prefetching.prefetch(input_pipeline.train_batches(
      source, sampler, _CONFIG, seed=0, start_step=2, num_steps=5)))
  assert [step for step, _, _ in items] == [2, 3, 4]
  replay = batch_selection.PoissonSampler(len(source), 4, seed=0,
                                          padded_batch_size=8)
  for step, batch, state in items:
    assert len(batch['is_padding_example']) % 8 == 0
    real = ~batch['is_padding_example']
    assert (batch['image_index'][~real] == -1).all()
    # The saved state is the one right after this step's draw, although
    # the producer thread ran ahead: restoring it replays the next step.
    drawn = replay.sample()
    np.testing.assert_array_equal(batch['image_index'][real],
                                  drawn.indices[~drawn.is_padding_example])
    assert state == replay.state_dict()


def test_several_chunks_are_one_batch(source):
  indices = np.concatenate([np.arange(8), np.arange(8, 12), [-1] * 4])
  batch = input_pipeline.build_batch(source, indices, indices < 0, _CONFIG,
                                     seed=0, step=0)
  assert batch['crops'].shape[0] == 16
  assert batch['image_index'].tolist() == list(range(12)) + [-1] * 4
  assert 'index' not in batch  # no slot position to key randomness on


def test_missing_labels_clear_availability_flags():
  records = [_record(pose=(np.nan,) * 3), _record(gender=-1), _record()]
  batch = input_pipeline.build_batch(records, np.arange(3), np.zeros(3, bool),
                                     _CONFIG, seed=0)
  assert batch['has_pose'].tolist() == [False, True, True]
  assert batch['has_gender'].tolist() == [True, False, True]
  assert np.isfinite(batch['pose']).all()


@pytest.mark.parametrize('change, message', [
    (lambda r: r['faces']['bbox'].__setitem__(0, np.array([8, 8, 0, 24.])),
     'bbox'),
    (lambda r: r['faces']['landmarks'][0].__setitem__(
        3, np.array([200.0, 5.0])), 'outside'),
    (lambda r: r['faces']['gender'].__setitem__(0, np.int32(7)), 'gender'),
])
def test_bad_records_raise_errors_naming_the_record(change, message):
  bad = _record(image_id=b'fake/bad')
  change(bad)
  with pytest.raises(ValueError, match=f'record 1 \\(fake/bad\\).*{message}'):
    input_pipeline.build_batch([_record(), bad], np.arange(2),
                               np.zeros(2, bool), _CONFIG, seed=0)


def test_out_of_range_index_is_an_error():
  with pytest.raises(ValueError, match=r'indices \[5\]'):
    input_pipeline.build_batch([_record()], np.array([5]), np.array([False]),
                               _CONFIG, seed=0)


def test_prefetch_keeps_order_and_reraises():
  assert list(prefetching.prefetch(iter(range(5)))) == list(range(5))

  def failing():
    yield 1
    raise RuntimeError('producer failed')

  with pytest.raises(RuntimeError, match='producer failed'):
    list(prefetching.prefetch(failing()))


def test_flip_happens_in_training_only():
  record = _record(boxes=((4, 8, 20, 24),))
  config = input_pipeline.PipelineConfig(crop_size=16, num_proposals=6,
                                         num_positives=3, flip_probability=1.0)
  train = input_pipeline.build_batch([record], np.array([0]),
                                     np.array([False]), config, seed=0, step=0)
  evaluation = input_pipeline.build_batch([record], np.array([0]),
                                          np.array([False]), config, seed=0)
  positive = lambda b: b['face_boxes'][0][b['detection_label'][0] == 1]
  np.testing.assert_allclose(positive(train)[0], [48 - 4 - 20, 8, 20, 24])
  np.testing.assert_allclose(positive(evaluation)[0], [4, 8, 20, 24])
