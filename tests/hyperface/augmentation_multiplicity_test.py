"""Augmentation multiplicity (augmentation_views.py): M views in one example.

M = 1 is the single-view pipeline bit for bit; M > 1 gives each training
image M*K crops whose views differ, follow the image's identity alone (never
its slot or the other sampled images) and leave evaluation at one view; the
real per-image loss over M*K crops keeps the clipped sum's sensitivity at C
(docs/DESIGN.md, Privacy rules, rules 1 and 8); a tiny run trains with M = 2.
"""

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from dplh_jax.dp import privacy_report
from dplh_jax.hyperface import augmentation_views
from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import models
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import tiny
from dplh_jax.hyperface.datasets import face_schema
# The fake source, tiny model (dropout keyed by image) and jitted clipped
# sums of the slot-independence test, reused here with M*K crops per image.
from tests.hyperface import dropout_identity_test as slot_test

SOURCE, INDICES, STEP = slot_test.SOURCE, slot_test.INDICES, slot_test.STEP
K = slot_test.PIPELINE.num_proposals
SEED = 0
PER_IMAGE_KEYS = ('has_landmarks', 'has_pose', 'has_gender', 'image_index',
                  'is_padding_example')


def _pipeline(views):
  return dataclasses.replace(slot_test.PIPELINE, views=views)


def _batch(indices, views, is_padding_example=None, step=STEP):
  if is_padding_example is None:
    is_padding_example = np.zeros(len(indices), bool)
  return input_pipeline.build_batch(SOURCE, np.asarray(indices),
                                    is_padding_example, _pipeline(views),
                                    seed=SEED, step=step)


def _assert_batches_equal(expected, actual):
  assert expected.keys() == actual.keys()
  for key, value in expected.items():
    assert value.dtype == actual[key].dtype, key
    np.testing.assert_array_equal(value, actual[key], err_msg=key)


def test_one_view_is_the_single_view_pipeline_bit_for_bit():
  """M = 1 is today's example: one image_example from the image's own
  entropy [seed, TRAIN_STREAM=1, step, index]; view 0 of M = 3 is it too."""
  batch = _batch(INDICES, views=1)
  default = input_pipeline.build_batch(
      SOURCE, INDICES, np.zeros(len(INDICES), bool), slot_test.PIPELINE,
      seed=SEED, step=STEP)
  _assert_batches_equal(default, batch)
  for slot, index in enumerate(INDICES):
    reference = input_pipeline.image_example(
        SOURCE[index], int(index),
        np.random.default_rng([SEED, 1, STEP, int(index)]),
        slot_test.PIPELINE, train=True)
    for key, value in reference.items():
      np.testing.assert_array_equal(batch[key][slot], value, err_msg=key)
  three = _batch(INDICES, views=3)
  for key in ('crops', 'detection_label', 'boxes', 'landmarks'):
    np.testing.assert_array_equal(three[key][:, :K], batch[key], err_msg=key)


def test_views_differ_are_deterministic_and_follow_the_image_not_its_slot():
  views = 3
  padding = np.zeros(len(INDICES) + 1, bool)
  padding[2] = True  # a padding slot among the images
  indices = np.insert(INDICES, 2, 0)
  batch = _batch(indices, views, padding)
  b = len(indices)
  s = slot_test.PIPELINE.crop_size
  assert batch['crops'].shape == (b, views * K, s, s, 3)
  assert batch['landmarks'].shape == (b, views * K, 21, 2)
  for key in PER_IMAGE_KEYS:
    assert batch[key].shape == (b,), key
  # The padding slot: M*K crops of zeros, no label, no flag.
  assert not batch['crops'][2].any()
  assert np.all(batch['detection_label'][2] == proposals.IGNORED)
  assert np.all(batch['gender'][2] == face_schema.GENDER_UNKNOWN)
  assert not (batch['has_landmarks'][2] or batch['has_pose'][2]
              or batch['has_gender'][2])
  assert batch['image_index'][2] == -1
  # Each image's views are different draws (boxes and crops).
  for slot in np.flatnonzero(~padding):
    boxes = batch['boxes'][slot].reshape(views, K, 4)
    crops = batch['crops'][slot].reshape(views, K, -1)
    for v in range(1, views):
      assert not np.array_equal(boxes[0], boxes[v]), (slot, v)
      assert not np.array_equal(crops[0], crops[v]), (slot, v)
  # Deterministic; alone or among others, in any slot: the same example.
  _assert_batches_equal(batch, _batch(indices, views, padding))
  permutation = np.array([3, 0, 5, 1, 4, 2])
  permuted = _batch(INDICES[permutation], views)
  real = np.flatnonzero(~padding)
  for new_slot, old in enumerate(permutation):
    alone = _batch(INDICES[old:old + 1], views)
    for key in alone:
      np.testing.assert_array_equal(permuted[key][new_slot],
                                    batch[key][real[old]], err_msg=key)
      np.testing.assert_array_equal(alone[key][0], batch[key][real[old]],
                                    err_msg=key)
  # Evaluation builds one view, whatever views says.
  _assert_batches_equal(_batch(INDICES, 1, step=None),
                        _batch(INDICES, views, step=None))


def test_views_of_another_image_are_refused():
  one, other = (_batch([i], views=1) for i in (1, 2))
  single = {key: value[0] for key, value in one.items()}
  assert augmentation_views.concatenate_views([single]) is single
  with pytest.raises(ValueError, match='image_index differs'):
    augmentation_views.concatenate_views(
        [single, {key: value[0] for key, value in other.items()}])
  with pytest.raises(ValueError, match='views=0'):
    augmentation_views.view_entropies([0, 1, 2, 3], 0)


@pytest.mark.parametrize('value', [0, -1, 1.5, True])
def test_config_refuses_a_multiplicity_that_is_not_a_positive_int(value):
  config = tiny.get_config()
  with config.unlocked(), config.ignore_type():
    config.augmentation_multiplicity = value
  with pytest.raises(ValueError,
                     match=rf'augmentation_multiplicity={value!r}: must be'):
    config_validation.validate_config(config)


# Two views of one proposal: each image's example has the 2 crops of the
# slot test's examples, so its jitted clipped sums (and the tiny run's train
# step) are reused at the shapes they were compiled for.
TWO_VIEWS = dataclasses.replace(slot_test.PIPELINE, num_proposals=1, views=2)


def _two_view_batch(indices):
  return input_pipeline.build_batch(SOURCE, indices, np.zeros(len(indices),
                                                              bool),
                                    TWO_VIEWS, seed=SEED, step=STEP)


@pytest.mark.parametrize('path', [0, 1], ids=['vmap', 'one_pass'])
def test_two_views_through_the_real_loss_move_the_clipped_sum_by_at_most_c(
    path):
  """The tiny HyperFace with dropout keyed by image, every image clipped
  (C = 0.01): removing one image of M = 2 views (by deleting it, so later
  images change slots, and by marking it padding) moves the clipped sum by
  exactly C, never more."""
  # pylint: disable-next=protected-access
  clipped_sum = slot_test._clipped_sums()[path]
  params = models.init_variables(slot_test.MODEL, seed=1)
  rng = jax.random.fold_in(jax.random.key(0), STEP)  # as train.py does
  batch = _two_view_batch(INDICES)
  full = np.asarray(clipped_sum(params, batch, rng,
                                batch['is_padding_example']), np.float64)
  for removed in (0, 3):
    rebuilt = _two_view_batch(np.delete(INDICES, removed))
    for key, value in rebuilt.items():  # the other images are unchanged
      np.testing.assert_array_equal(np.delete(batch[key], removed, axis=0),
                                    value, err_msg=key)
    padding = batch['is_padding_example'].copy()
    padding[removed] = True
    moves = {
        'deleted': clipped_sum(params, rebuilt, rng,
                               rebuilt['is_padding_example']),
        'masked': clipped_sum(params, batch, rng, padding)}
    for removal, moved in moves.items():
      distance = np.linalg.norm(full - np.asarray(moved, np.float64))
      assert distance <= slot_test.L2_NORM_CLIP * (1 + 1e-4), (
          removal, removed, distance)
      assert distance >= slot_test.L2_NORM_CLIP * (1 - 1e-3), (
          removal, removed, distance)


@pytest.mark.slow
def test_a_tiny_run_trains_on_two_views_at_the_same_privacy_cost(
    trained_tiny, data_dir, tmp_path, monkeypatch):
  """Two views of K = 1 proposal (the 2 crops per image of the session's
  tiny run, so its compiled train step is reused): training batches carry
  2 crops per image, evaluation batches 1, and the privacy report is the
  one-view run's."""
  config = tiny.get_config()
  config.data_dir = data_dir
  config.num_proposals = 1
  config.augmentation_multiplicity = 2
  crops_per_image = {'train': set(), 'eval': set()}
  real_build_batch = input_pipeline.build_batch

  def recording_build_batch(*args, step=None, **kwargs):
    batch = real_build_batch(*args, step=step, **kwargs)
    split = 'eval' if step is None else 'train'
    crops_per_image[split].add(batch['crops'].shape[1])
    return batch

  monkeypatch.setattr(input_pipeline, 'build_batch', recording_build_batch)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert crops_per_image == {'train': {2}, 'eval': {1}}
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  losses = [l['train_loss_total'] for l in lines if l['split'] == 'train']
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert np.isfinite(result['eval']['detection_accuracy'])
  reports = []
  for workdir in (str(tmp_path), trained_tiny.workdir):
    with open(os.path.join(workdir, 'privacy_report.json')) as f:
      reports.append(json.load(f))
  privacy = ('epsilon', 'delta', 'steps', 'sampling_prob', 'noise_multiplier',
             'l2_norm_clip', 'num_examples', 'privacy_unit')
  assert ({k: reports[0][k] for k in privacy}
          == {k: reports[1][k] for k in privacy})
  assert reports[0]['epsilon'] == pytest.approx(
      privacy_report.recompute_epsilon(reports[0]), rel=1e-12)
  # A config written before the field (an old workdir's) trained one view.
  old = {k: v for k, v in config.items() if k != 'augmentation_multiplicity'}
  assert data_loading.load_data(
      ml_collections.ConfigDict(old)).pipeline_config.views == 1
