"""Tests of dplh_jax.pretrain: trunk transfer and privacy composition."""

import dataclasses

import jax
import numpy as np
import pytest

from dplh_jax import accounting
from dplh_jax import models
from dplh_jax import pretrain

SMALL = models.HyperFaceConfig.small()


@pytest.fixture(scope='module')
def two_models():
  hyperface, detection = models.HyperFace(SMALL), models.DetectionNet(SMALL)
  return (hyperface, models.init_variables(hyperface, seed=0),
          detection, models.init_variables(detection, seed=1))


def _equal_trees(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.parametrize('copy_detection_head', [False, True])
def test_transfer_copies_the_trunk_and_nothing_else(two_models,
                                                    copy_detection_head):
  _, hyperface_params, _, detection_params = two_models
  new = pretrain.init_hyperface_from_detection(
      hyperface_params, detection_params,
      copy_detection_head=copy_detection_head)
  assert _equal_trees(new['params'][models.TRUNK],
                      detection_params['params'][models.TRUNK])
  assert not _equal_trees(new['params'][models.TRUNK],
                          hyperface_params['params'][models.TRUNK])
  head_source = detection_params if copy_detection_head else hyperface_params
  assert _equal_trees(new['params']['detection_head'],
                      head_source['params']['detection_head'])
  for name in hyperface_params['params']:
    if name not in (models.TRUNK, 'detection_head'):
      assert _equal_trees(new['params'][name], hyperface_params['params'][name])
  # The fresh HyperFace variables are not modified in place.
  assert not _equal_trees(hyperface_params['params'][models.TRUNK],
                          detection_params['params'][models.TRUNK])


def test_transfer_rejects_a_different_config(two_models):
  _, hyperface_params, _, _ = two_models
  wider = models.DetectionNet(dataclasses.replace(SMALL, width_multiplier=0.25))
  with pytest.raises(ValueError, match='same HyperFaceConfig'):
    pretrain.init_hyperface_from_detection(
        hyperface_params, models.init_variables(wider))


def test_transferred_hyperface_detects_like_the_pretrained_net(two_models):
  hyperface, hyperface_params, detection, detection_params = two_models
  new = pretrain.init_hyperface_from_detection(
      hyperface_params, detection_params, copy_detection_head=True)
  rng = np.random.default_rng(0)
  example = {'crops': rng.uniform(size=(4, 64, 64, 3)).astype(np.float32),
             'detection_label': np.array([1, 0, -1, 0], np.int32),
             'image_index': np.int32(3)}

  @jax.jit
  def run(new, detection_params):
    hyperface_logits = hyperface.apply(new, example['crops'])['detection']
    detection_logits = detection.apply(detection_params, example['crops'])
    pretrain_loss, aux = pretrain.detection_pretrain_loss(
        detection_params, example, None, model=detection)
    dropout_loss, _ = pretrain.detection_pretrain_loss(
        detection_params, example, jax.random.key(0), model=detection)
    return hyperface_logits, detection_logits, pretrain_loss, aux, dropout_loss

  hyperface_logits, detection_logits, loss, aux, dropout_loss = run(
      new, detection_params)
  np.testing.assert_allclose(hyperface_logits, detection_logits, rtol=1e-5,
                             atol=1e-6)
  # The pre-training loss is the detection cross-entropy of the 3 labelled
  # proposals, computed by hand from the logits.
  logits = np.asarray(detection_logits, np.float64)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -(log_softmax[0, 1] + log_softmax[1, 0] + log_softmax[3, 0]) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert int(aux['task_counts']['detection']) == 3
  assert float(dropout_loss) != float(loss)  # rng given: dropout is on


def test_pretraining_privacy_cost_composes_into_the_same_accountant():
  delta = 1e-5
  pretraining = dict(noise_multiplier=1.5, sampling_prob=0.01, steps=400)
  main = dict(noise_multiplier=1.0, sampling_prob=0.02, steps=300)
  accountant = accounting.PrivacyAccountant('pld')
  accountant.compose(**pretraining)
  accountant.compose(**main)
  total = accountant.epsilon(delta)
  pretraining_only = accounting.epsilon(**pretraining, delta=delta)
  main_only = accounting.epsilon(**main, delta=delta)
  # Pre-training is never free: the run's epsilon exceeds either phase's.
  assert total > max(pretraining_only, main_only)
  assert len(accountant.phases) == 2 and accountant.steps == 700
