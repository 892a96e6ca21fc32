"""DP detection pre-training in the main job (DPLH 3.2.1).

During the first P steps the per-image loss is detection only and still has
sensitivity C; the parameters off the detection path get exactly zero
updates and zero Adam moments, then train; a tiny run reports the two named
phases, recomputes its epsilon from the report and resumes inside the
pre-training to the same parameters.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from dplh_jax.dp import group_clipping
from dplh_jax.dp import privacy_report
from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import detection_pretrain
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import models
from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import tiny

import sensitivity_case as case  # tests/hyperface, on setup.cfg's pythonpath


# The shared tiny Cross-SEC case (de-correlation, dropout on) and its jitted
# one-pass clipped sum of the real per-image loss.
OTHER_TASKS = [t for t in models.TASK_NAMES if t != 'detection']


def _frozen_leaves(params):
  return {'/'.join(group_clipping.path_of(path))
          for path, _ in jax.tree_util.tree_leaves_with_path(params)
          if detection_pretrain.off_detection_path(
              group_clipping.path_of(path))}


def test_the_frozen_params_are_the_other_tasks_heads_weights_and_gates():
  params = case.params()
  frozen = _frozen_leaves(params)
  assert 'params/log_sigma_sq' in frozen
  for task in OTHER_TASKS:
    assert f'params/{task}_head/output/kernel' in frozen
    for part in ('squeeze', 'excite', 'cross'):
      assert f'params/trunk/cross_sec/{task}_{part}/kernel' in frozen
  assert not [name for name in frozen if 'detection' in name
              or name.startswith(('params/trunk/conv', 'params/trunk/fc'))]


def test_pretraining_masks_every_task_but_detection_and_keeps_sensitivity_c():
  """The masked batch through the real per-image loss (Cross-SEC,
  de-correlation, dropout): the other tasks add exactly nothing (their
  heads' and log sigma^2's summed gradients are 0), and removing an image,
  by masking it or by deleting it, moves the clipped sum by at most C (with
  every image clipped, by C)."""
  clip = case.L2_NORM_CLIP
  batch = case.batch(seed=5)
  batch['crops'][2] *= 1e4  # an extreme image
  batch = jax.tree.map(np.array, detection_pretrain.mask_tasks(
      batch, jnp.bool_(True)))
  assert not batch['has_landmarks'].any() and not batch['has_gender'].any()
  params = case.params()
  clipped_sum = case.clipped_sum('one_pass')
  rng = jax.random.fold_in(jax.random.key(0), 1)
  full = np.asarray(clipped_sum(params, batch, rng,
                                batch['is_padding_example'])[0], np.float64)
  summed = ravel_pytree(params)[1](full)['params']
  for task in OTHER_TASKS:
    assert all(np.all(leaf == 0)
               for leaf in jax.tree.leaves(summed[f'{task}_head'])), task
  assert np.all(summed['log_sigma_sq'][1:] == 0)
  assert summed['log_sigma_sq'][0] != 0  # detection's own weight is in it
  for removed, padding in case.removals(batch, 2):
    moved = np.linalg.norm(full - np.asarray(
        clipped_sum(params, removed, rng, padding)[0], np.float64))
    assert clip * (1 - 1e-3) <= moved <= clip * (1 + 1e-4), moved


def test_the_frozen_leaves_get_a_fresh_optimizer_at_step_p():
  """On a tree with the model's names (tiny leaves: the names decide): the
  trained leaves follow one Adam from step 0; the frozen ones stay put for P
  steps, then follow an Adam created at step P, the run's learning-rate
  schedule kept in time."""
  leaf = jnp.zeros(2)
  params = {'params': {
      'log_sigma_sq': leaf, 'detection_head': {'output': {'kernel': leaf}},
      'gender_head': {'output': {'kernel': leaf}},
      'trunk': {'conv1': {'kernel': leaf}, 'cross_sec': {
          'detection_cross': {'kernel': leaf},
          'pose_excite': {'kernel': leaf}}}}}
  frozen = _frozen_leaves(params)
  assert frozen == {'params/log_sigma_sq', 'params/gender_head/output/kernel',
                    'params/trunk/cross_sec/pose_excite/kernel'}
  p = 2

  def adam(offset):  # a schedule that changes every step
    return optax.adam(lambda count: 0.1 * (count + offset + 1))
  tx = detection_pretrain.with_frozen_start(adam, p)
  state, update = tx.init(params), jax.jit(tx.update)
  from_start, late = adam(0), adam(p)  # references on the whole tree
  start_state, late_state = from_start.init(params), late.init(params)
  names = ['/'.join(group_clipping.path_of(path)) for path, _ in
           jax.tree_util.tree_leaves_with_path(params)]
  for step in range(p + 2):
    grads = jax.tree.map(lambda x: x + np.arange(2.0) + step + 1.0, params)
    updates, state = update(grads, state, params)
    expected, start_state = from_start.update(grads, start_state, params)
    if step >= p:
      expected_late, late_state = late.update(grads, late_state, params)
    for name, got, want, want_late in zip(
        names, jax.tree.leaves(updates), jax.tree.leaves(expected),
        jax.tree.leaves(expected_late if step >= p else expected)):
      if name not in frozen:
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
      elif step < p:
        assert np.all(np.asarray(got) == 0), (step, name)
      else:
        np.testing.assert_allclose(got, want_late, rtol=1e-6, err_msg=name)
  with pytest.raises(ValueError, match='num_steps=-1'):
    detection_pretrain.start_after(-1, optax.adam(0.1))


def test_a_negative_pretraining_length_is_refused_by_name():
  config = tiny.get_config()
  config.detection_pretrain_epochs = -1.0
  with pytest.raises(ValueError, match=r'config.detection_pretrain_epochs='
                     r'-1.0: must be finite and >= 0'):
    config_validation.validate_config(config)


def _config(data_dir):
  config = tiny.get_config()  # 24 images, q = 0.25, learned task weights
  config.data_dir = data_dir
  config.detection_pretrain_epochs = 0.75  # 3 steps of detection only
  config.num_epochs = 0.5  # then 2 multi-task steps
  return config


@pytest.mark.slow
def test_a_run_reports_both_phases_and_resumes_inside_the_pretraining(
    data_dir, tmp_path, monkeypatch):
  full = train.train_and_evaluate(_config(data_dir), str(tmp_path / 'full'))
  report = full['privacy']
  assert [(p['name'], p['steps']) for p in report['phases']] == [
      ('detection_pretrain', 3), ('hyperface', 2)]
  assert report['steps'] == int(full['state'].step) == 5
  assert report['epsilon'] == privacy_report.recompute_epsilon(report)
  assert report['epsilon'] <= 5.0  # the tiny config's target
  with open(tmp_path / 'full' / 'metrics.jsonl') as f:
    lines = [json.loads(l) for l in f if '"train"' in l]
  # Detection alone for 3 steps: the other losses are 0, and the learned
  # weights (sigma of the params each step starts from) stay frozen until
  # the first multi-task step has moved them.
  assert [l['train_loss_gender'] for l in lines[:3]] == [0.0] * 3
  assert all(l['train_loss_landmarks'] > 0 for l in lines[3:])
  sigmas = [l['task_sigma_landmarks'] for l in lines]
  assert sigmas[0] == sigmas[1] == sigmas[2] == sigmas[3] != sigmas[4]

  # Killed while fetching step 3's batch: the last checkpoint, at step 2, is
  # inside the pre-training; the resume replays step 2 there, then the main
  # steps.
  real_build_batch = input_pipeline.build_batch

  def crash_at_step_3(*args, step, **kwargs):
    if step == 3:
      raise KeyboardInterrupt('simulated kill')
    return real_build_batch(*args, step=step, **kwargs)
  workdir = str(tmp_path / 'resumed')
  monkeypatch.setattr(input_pipeline, 'build_batch', crash_at_step_3)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(data_dir), workdir)
  monkeypatch.setattr(input_pipeline, 'build_batch', real_build_batch)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [
      '0', '2']
  resumed = train.train_and_evaluate(_config(data_dir), workdir)
  assert resumed['privacy']['phases'] == report['phases']
  assert resumed['privacy']['epsilon'] == report['epsilon']
  jax.tree.map(np.testing.assert_array_equal, resumed['state'].params,
               full['state'].params)
  # Re-run once finished: restored at step 5, in the main phase, its
  # accountant's phases checked against the plan's split; nothing retrained.
  again = train.train_and_evaluate(_config(data_dir), workdir)
  assert again['privacy'] == resumed['privacy']
  # Another pre-training length is another run: the workdir refuses it.
  other = _config(data_dir)
  other.detection_pretrain_epochs = 0.25
  with pytest.raises(ValueError, match='detection_pretrain_epochs: 0.75 -> '
                     '0.25'):
    train.train_and_evaluate(other, workdir)
