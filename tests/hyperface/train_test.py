"""End to end on the tiny config: train, evaluate, report, interrupt, resume."""

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from dplh_jax.dp import dp_transform
from dplh_jax.dp import privacy_report
from dplh_jax.dp import run_binding
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import configs
from dplh_jax.hyperface import train
from dplh_jax.hyperface import workdir as workdir_lib
from dplh_jax.hyperface.configs import tiny

TINY_CONFIG_FILE = configs.resolve('tiny')
MAIN = ('-m', 'dplh_jax.hyperface.cli.train')  # what dplh-train runs
pytestmark = pytest.mark.slow


def _config(tfds_dir, **overrides):
  config = tiny.get_config()
  config.data_dir = tfds_dir
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def uninterrupted(trained_tiny):
  """The session's tiny run (conftest): ``_config(data_dir, eval_every=2)``
  and the image-level evaluation at the end (a resumable field)."""
  return trained_tiny.workdir, trained_tiny.result


def test_run_writes_a_report_that_dp_accounting_reproduces(uninterrupted):
  workdir, result = uninterrupted
  with open(os.path.join(workdir, 'privacy_report.json')) as f:
    saved = json.load(f)
  for field in ('epsilon', 'delta', 'accountant', 'noise_multiplier',
                'sampling_prob', 'steps', 'l2_norm_clip', 'privacy_unit',
                'num_examples', 'sampling_method',
                'non_finite_examples_dropped'):
    assert field in saved, field
  assert saved['epsilon'] == pytest.approx(privacy_report.recompute_epsilon(saved),
                                           rel=1e-12)
  assert saved['epsilon'] <= 5.0  # the tiny config's target
  assert saved['steps'] == 4 and saved['sampling_prob'] == 0.25
  assert saved['noise_multiplier'] == 1.0 and saved['accountant'] == 'pld'
  assert saved['noise_seed_source'] == 'config_seed (not secret)'
  assert np.isfinite(result['eval']['detection_accuracy'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [l['step'] for l in lines if l['split'] == 'train'] == [1, 2, 3, 4]
  assert all(l['epsilon'] <= 5.0 for l in lines if l['split'] == 'train')
  # eval_every=2 of 4 steps: one evaluation mid-run, one at the end.
  assert [l['step'] for l in lines if l['split'] == 'eval'] == [2, 4]
  assert lines[-1]['split'] == 'eval'


def test_tensorboard_events_hold_the_jsonl_scalars(uninterrupted):
  workdir, _ = uninterrupted
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  for split in ('train', 'eval'):
    events = event_accumulator.EventAccumulator(
        os.path.join(workdir, 'tensorboard', split))
    events.Reload()
    want = [l for l in lines if l['split'] == split]
    tag = 'epsilon' if split == 'train' else 'gender_accuracy'
    got = events.Scalars(tag)
    assert [e.step for e in got] == [l['step'] for l in want]
    np.testing.assert_allclose([e.value for e in got],
                               [l[tag] for l in want], rtol=1e-6)


def test_fixed_task_weights_train_and_refuse_a_learned_weights_resume(
    data_dir, tmp_path):
  """The demo's default weighting: no log sigma^2 parameter; a workdir of it
  cannot be resumed with learned weights (a clear error, not Orbax's)."""
  workdir = str(tmp_path)
  result = train.train_and_evaluate(_config(data_dir, task_weighting='fixed'),
                                    workdir)
  assert 'log_sigma_sq' not in result['state'].params['params']
  assert result['privacy']['steps'] == 4
  assert np.isfinite(result['eval']['gender_accuracy'])
  with pytest.raises(ValueError,
                     match='task_weighting: "fixed" -> "uncertainty"'):
    train.train_and_evaluate(_config(data_dir), workdir)


def test_interrupted_run_resumes_to_the_same_model_and_privacy(
    uninterrupted, data_dir, tmp_path, monkeypatch):
  """Killed after step 3 (checkpoint at 2): the resumed run replays step 3
  with the saved sampler state and noise key, so it ends exactly where the
  uninterrupted run did, with 4 steps counted, not 5 or 7."""
  _, expected = uninterrupted
  workdir = str(tmp_path)
  real_build_batch = input_pipeline.build_batch

  def crash_at_step_3(*args, step, **kwargs):
    if step == 3:
      raise KeyboardInterrupt('simulated kill')
    return real_build_batch(*args, step=step, **kwargs)

  monkeypatch.setattr(input_pipeline, 'build_batch', crash_at_step_3)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(data_dir), workdir)
  assert not os.path.exists(os.path.join(workdir, 'privacy_report.json'))
  monkeypatch.setattr(input_pipeline, 'build_batch',
                      real_build_batch)
  resumed = train.train_and_evaluate(_config(data_dir), workdir)

  # Step 3 ran twice, its metrics are reported once (jsonl and TensorBoard).
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [(l['step'], l['split']) for l in lines] == [
      (1, 'train'), (2, 'train'), (3, 'train'), (4, 'train'), (4, 'eval')]
  for split, steps in (('train', [1, 2, 3, 4]), ('eval', [4])):
    assert _tensorboard_steps(workdir, split) == steps, split
  assert resumed['privacy']['steps'] == 4
  assert resumed['privacy']['epsilon'] == expected['privacy']['epsilon']
  assert resumed['privacy']['sampler_seed_source'] == 'config_seed (not secret)'
  # Same params bit for bit: every step used the noise key the uninterrupted
  # run used at that step (a key re-derived from the seed would differ).
  jax.tree.map(np.testing.assert_array_equal, resumed['state'].params,
               expected['state'].params)
  def noise_key(result):
    return jax.random.key_data(
        dp_transform.dp_state(result['state'].opt_state).noise_key)
  np.testing.assert_array_equal(noise_key(resumed), noise_key(expected))


def _tensorboard_steps(workdir, split, tag=None):
  events = event_accumulator.EventAccumulator(
      os.path.join(workdir, 'tensorboard', split))
  events.Reload()
  tag = tag or ('epsilon' if split == 'train' else 'gender_accuracy')
  return [e.step for e in events.Scalars(tag)]


def _crash_at(monkeypatch, crash_step):
  real_build_batch = input_pipeline.build_batch

  def crash(*args, step, **kwargs):
    if step == crash_step:
      raise KeyboardInterrupt('simulated kill')
    return real_build_batch(*args, step=step, **kwargs)
  monkeypatch.setattr(input_pipeline, 'build_batch', crash)
  return lambda: monkeypatch.setattr(input_pipeline, 'build_batch',
                                     real_build_batch)


def test_a_run_killed_before_its_first_checkpoint_replays_from_step_0(
    uninterrupted, data_dir, tmp_path, monkeypatch):
  """The step-0 checkpoint and config.json exist before the first step, so
  a run killed at step 1 resumes with the saved key, not a fresh one."""
  _, expected = uninterrupted
  workdir = str(tmp_path)
  undo = _crash_at(monkeypatch, 1)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_config(data_dir, eval_every=2), workdir)
  undo()
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['0']
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['config'] == json.loads(json.dumps(
      _config(data_dir, eval_every=2).to_dict()))
  # The run records what it ran on.
  assert saved['run']['packages']['jax'] == jax.__version__
  assert saved['run']['num_devices'] == jax.device_count() >= 1
  assert saved['run']['num_processes'] == 1
  assert saved['run']['devices'] == [str(d) for d in jax.devices()]
  resumed = train.train_and_evaluate(_config(data_dir, eval_every=2), workdir)
  jax.tree.map(np.testing.assert_array_equal, resumed['state'].params,
               expected['state'].params)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [(l['step'], l['split']) for l in map(json.loads, f)]
  assert sorted(steps) == sorted(set(steps)) and len(steps) == 6


def _changed(config, field):
  """``field`` set to another value of its type."""
  value = config[field]
  if value is None:
    value = {int: 3, float: 3.0, str: 'x'}[config.get_type(field)]
  elif isinstance(value, bool):
    value = not value
  elif isinstance(value, int):
    value += 1
  elif isinstance(value, float):
    value = value * 2 if value else 1.0
  else:
    value = value + '_x'
  changed = copy.deepcopy(config)
  changed[field] = value
  return changed


def test_a_workdir_refuses_a_resume_with_any_other_config_field(
    uninterrupted, data_dir, tmp_path):
  """Every field of the tiny config binds the workdir but the resumable
  ones; a refused resume reads only JSON and leaves the workdir as it was."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(uninterrupted[0], workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics_before = f.read()
  config = _config(data_dir, eval_every=2)
  assert workdir_lib.RESUMABLE_FIELDS <= set(config.keys())
  for field in sorted(set(config.keys()) - workdir_lib.RESUMABLE_FIELDS):
    start = time.time()
    with pytest.raises(ValueError,
                       match=rf'{field}: .* -> .*bound to the config'):
      train.train_and_evaluate(_changed(config, field), workdir)
    assert time.time() - start < 5, field  # no data loaded, nothing compiled
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert f.read() == metrics_before
  # A resumable field: accepted; the finished run's final evaluation is
  # redone, and reported once.
  resumed = train.train_and_evaluate(_changed(config, 'checkpoint_every'),
                                     workdir)
  assert resumed['privacy'] == uninterrupted[1]['privacy']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [(l['step'], l['split']) for l in lines
          if l['split'] == 'eval'] == [(2, 'eval'), (4, 'eval')]
  assert _tensorboard_steps(workdir, 'eval') == [2, 4]


def _record_path(workdir, step=4):
  return os.path.join(workdir, 'checkpoints', str(step), 'record', 'metadata')


def test_an_edited_checkpoint_record_is_refused(uninterrupted, data_dir,
                                                tmp_path):
  """Accountant steps edited on disk (a report of 3 steps for 4 trained)."""
  config = _config(data_dir, eval_every=2)
  workdir = str(tmp_path / 'edited')
  shutil.copytree(uninterrupted[0], workdir)
  with open(_record_path(workdir)) as f:
    record = json.load(f)
  record['accountant']['phases'][0]['steps'] = 3
  with open(_record_path(workdir), 'w') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match='at train step 4 it records '
                     'accountant_steps=3'):
    train.train_and_evaluate(config, workdir)
  # An empty phase added (steps and (sigma, q) unchanged): the train loop
  # never records one (compose of zero steps records nothing).
  phases = record['accountant']['phases']
  phases[0]['steps'] = 4
  record['accountant']['phases'] = phases + [dict(phases[0], steps=0)]
  with open(_record_path(workdir), 'w') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match='its accountant records the phases'):
    train.train_and_evaluate(config, workdir)
  record['accountant']['phases'] = phases
  # A record edited to match another config, config.json left alone (the
  # second reader's case: clip 1.0 -> 0.25 in the record, resumed with 0.25).
  record['config']['l2_norm_clip'] = 0.25
  with open(_record_path(workdir), 'w') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match=r'l2_norm_clip: 1.0 -> 0.25'):
    train.train_and_evaluate(_config(data_dir, eval_every=2,
                                     l2_norm_clip=0.25), workdir)
  # A record without a config (an older version's) is refused too.
  del record['config']
  with open(_record_path(workdir), 'w') as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match='without its config'):
    train.train_and_evaluate(config, workdir)


def test_a_second_process_is_refused_a_workdir_in_use(data_dir, tmp_path):
  workdir = str(tmp_path / 'busy')
  with run_binding.WorkdirLock(workdir):
    result = subprocess.run(
        [sys.executable, *MAIN, '--config', TINY_CONFIG_FILE,
         f'--config.data_dir={data_dir}', '--workdir', workdir],
        capture_output=True, text=True, timeout=120, check=False,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: workdir {workdir} is in use by another training process (pid '
      f'{os.getpid()} on {socket.gethostname()}); wait for it to finish or '
      'use another --workdir')
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


# The resume is checked once: it does not depend on which signal stopped.
@pytest.mark.parametrize('signal_number, resume', [(signal.SIGTERM, True),
                                                   (signal.SIGINT, False)])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_one_line(
    data_dir, tmp_path, signal_number, resume):
  """Preemption (SIGTERM) or Ctrl-C: the step in flight finishes, a
  checkpoint is written there, one line says how to resume, and re-running
  the same command finishes the run with every step accounted once."""
  workdir = str(tmp_path / 'signalled')
  command = [sys.executable, *MAIN, '--config', TINY_CONFIG_FILE,
             f'--config.data_dir={data_dir}', '--config.num_epochs=8',
             '--config.target_epsilon=1000',
             '--config.checkpoint_every=1000', '--workdir', workdir]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                             env=env)
  for line in process.stderr:
    if line.startswith('step 3/32'):
      process.send_signal(signal_number)
      break
  rest = process.stderr.read()
  assert process.wait(timeout=120) == 128 + signal_number
  assert 'Traceback' not in rest, rest
  last = rest.strip().splitlines()[-1]
  step = int(last.split('interrupted at step ')[1].split(',')[0])
  assert 3 <= step < 32
  assert last.endswith('checkpoint saved; re-run the same command to '
                       'resume.')
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))
  if not resume:
    return
  resumed = subprocess.run(command, capture_output=True, text=True,
                           timeout=300, env=env, check=False)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'Resumed from step {step}.' in resumed.stderr
  with open(os.path.join(workdir, 'privacy_report.json')) as f:
    assert json.load(f)['steps'] == 32
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(l)['step'] for l in f if '"train"' in l]
  assert steps == list(range(1, 33))


def test_the_total_loss_is_logged_and_a_constant_baseline_returned(
    uninterrupted):
  workdir, result = uninterrupted
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  assert np.isfinite(first['train_loss_total'])  # negative with learned weights
  # The constant predictor is scored on the same images as the model.
  baseline = result['baseline']
  assert set(baseline) == set(result['eval'])
  assert 0.0 <= baseline['detection_accuracy'] <= 1.0
  assert baseline['detection_accuracy'] != result['eval']['detection_accuracy']


@pytest.mark.parametrize('overrides, message', [
    (dict(noise_multiplier=-1.0, target_epsilon=None), 'noise_multiplier'),
    (dict(noise_multiplier=None, target_epsilon=1e-4, accountant='rdp'),
     'needs noise_multiplier >'),
    (dict(target_epsilon=0.0), 'target_epsilon'),
    (dict(expected_batch_size=30), 'q=1.25 > 1'),
    (dict(noise_multiplier=0.5, target_epsilon=0.01), 'cannot pay for one'),
    (dict(data_dir='/nonexistent/tfds'), 'data_dir'),
    (dict(dataset='synthetic_face/tiny'),
     "'synthetic_face/tiny' is not one of ours: use 'synthetic_faces/demo'"),
    (dict(seed=2**32), r'config.seed=4294967296: must be in \[0, 2\*\*32\)'),
    (dict(noise_seed=-1), 'config.noise_seed=-1'),
    (dict(l2_norm_clip=1e31), 'l2_norm_clip must be in'),
])
def test_bad_configs_fail_with_clear_messages(data_dir, tmp_path, overrides,
                                              message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_config(data_dir, **overrides), str(tmp_path))


def test_unknown_config_key_is_rejected_by_the_flag_parser():
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', TINY_CONFIG_FILE,
                                  flag_values=flag_values)
  with pytest.raises(Exception, match='no_such_field'):
    flag_values(['main.py', '--config.no_such_field=1'])
