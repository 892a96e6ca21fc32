"""Data parallel on a 4-device mesh: the tiny run trains the params of one
device, with the same privacy report, and the mechanism keeps its guarantee.

The 4 devices are XLA's fake CPU devices, which need their flag before JAX
starts, so ``four_devices_run.py`` runs them in a subprocess; this process
(one device) trains the one-device run at the same time. The two-process
(``jax.distributed``) run is ``experiments/two_process_check.py``, too slow
for the suite (BENCHMARKS.md).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import tiny

FOUR_DEVICES_RUN = os.path.join(os.path.dirname(__file__),
                                'four_devices_run.py')
LAYOUT_FIELDS = ('num_devices', 'num_processes')
pytestmark = pytest.mark.slow


# Both runs also take the levers whose state the mesh must carry: a
# detection-only first step (its own phase, the other heads' optimizer
# starting after it) and per-task clip groups.
LEVERS = {'detection_pretrain_epochs': 0.25, 'clip_groups': 'per_task'}


def _config(data_dir):
  config = tiny.get_config()  # fixed noise and sampler seeds
  config.update(LEVERS, data_dir=data_dir)
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """``(one-device result, 4-device result.json, its params, workdirs)``."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data_loading.load_data(_config(data_dir))  # prepared before both read it
  root = tmp_path_factory.mktemp('devices')
  four_workdir, out = str(root / 'four'), root / 'out'
  out.mkdir()
  with open(out / 'stderr', 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, FOUR_DEVICES_RUN, data_dir, four_workdir, str(out),
         json.dumps(LEVERS)],
        stdout=stderr, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    try:
      one = train.train_and_evaluate(_config(data_dir), str(root / 'one'))
    finally:
      returncode = process.wait(timeout=600)
  assert returncode == 0, (out / 'stderr').read_text()[-3000:]
  with open(out / 'result.json') as f:
    four = json.load(f)
  params = dict(np.load(out / 'params.npz'))
  return one, four, params, (str(root / 'one'), four_workdir)


def test_four_devices_train_the_params_of_one_device(runs):
  """Same images, same noise (one key), the clipped sum added in another
  order: equal to float32 rounding, though training moved them."""
  one, _, four_params, _ = runs
  leaves = jax.tree_util.tree_flatten_with_path(
      jax.device_get(one['state'].params))[0]
  config = _config('')
  initial = jax.tree.leaves(model_setup.init_params(
      config, model_setup.build_model(config)[0]))
  assert set(four_params) == {jax.tree_util.keystr(p) for p, _ in leaves}
  moved = 0.0
  for (path, value), start in zip(leaves, initial):
    np.testing.assert_allclose(four_params[jax.tree_util.keystr(path)],
                               value, rtol=1e-5, atol=1e-6)
    moved = max(moved, float(np.max(np.abs(value - start))))
  assert moved > 1e-3  # 5 Adam steps at 3e-3: far above the tolerance


def test_the_privacy_report_and_config_record_the_layout(runs):
  one, four, _, (one_workdir, four_workdir) = runs
  def without_layout(report):
    return {k: v for k, v in report.items() if k not in LAYOUT_FIELDS}
  assert without_layout(four['privacy']) == without_layout(one['privacy'])
  assert [(p['name'], p['steps']) for p in four['privacy']['phases']] == [
      ('detection_pretrain', 1), ('hyperface', 4)]
  assert {k: four['privacy'][k] for k in LAYOUT_FIELDS} == {
      'num_devices': 4, 'num_processes': 1}
  assert {k: one['privacy'][k] for k in LAYOUT_FIELDS} == {
      'num_devices': 1, 'num_processes': 1}
  for workdir, devices in ((four_workdir, 4), (one_workdir, 1)):
    with open(os.path.join(workdir, 'config.json')) as f:
      record = json.load(f)
    run = record['run']
    assert (run['num_devices'], run['num_processes']) == (devices, 1)
    # Both ran the levers (every tiny image is clipped at C = 1, so the
    # per-task groups change the sum: equal params mean equal grouping).
    assert {k: record['config'][k] for k in LEVERS} == LEVERS


def test_params_are_replicated_identically_and_the_step_compiled_once(runs):
  _, four, _, _ = runs
  assert four['num_param_shards'] == 4
  assert 'spec=P()' in four['params_sharding']
  assert four['replicas_differ'] == 0.0  # bit for bit on every device
  assert four['compiles'] == 1


def test_the_clipped_sum_on_the_mesh_has_sensitivity_c_and_ignores_padding(
    runs):
  """Gradients ``x_i`` of norms 0.1 to 50, 4 slots per device, 6 padding."""
  mechanism = runs[1]['mechanism']
  clip = mechanism['clip']
  # Removing any one image (marking it padding) moves the sum by <= C.
  assert mechanism['max_moved_by_removal'] <= clip * (1 + 1e-5)
  # The psum of the 4 devices' sums is the whole batch's clipped sum.
  assert mechanism['clipped_sum_vs_by_hand'] < 1e-5
  assert mechanism['mesh_vs_one_device_sum'] < 1e-5
  assert mechanism['num_examples'] == mechanism['real_examples'] == 10
  # Padding slots holding NaN and 1e30 add exactly zero and are not counted.
  assert mechanism['garbage_padding_vs_clean'] == 0.0
  assert mechanism['garbage_padding_non_finite'] == 0
  assert mechanism['empty_sum_abs'] == 0.0


def test_the_noise_is_drawn_once_with_std_sigma_c(runs):
  """40,000 coordinates of noise on an empty batch: std sigma * C within 3%
  (its standard error is 0.35%); noise drawn per device and summed would
  have 2 sigma * C. It is the one-device noise of the same key."""
  mechanism = runs[1]['mechanism']
  assert mechanism['noise_size'] == 40_000
  assert mechanism['noise_std_over_sigma_c'] == pytest.approx(1.0, abs=0.03)
  assert mechanism['noise_mesh_vs_one_device'] <= 1e-6
  assert mechanism['mesh_vs_one_device_update'] < 1e-5


def test_a_four_device_workdir_resumes_on_one_device(runs, capfd):
  """The device count binds nothing: a finished 4-device run resumed here
  (one device) restores its checkpoint, says so, and reports the same."""
  _, four, _, (_, four_workdir) = runs
  data_dir = _config_data_dir(four_workdir)
  resumed = train.train_and_evaluate(_config(data_dir), four_workdir)
  assert "written on {'num_devices': 4, 'num_processes': 1}" in (
      capfd.readouterr().err)
  assert {k: v for k, v in resumed['privacy'].items()
          if k not in LAYOUT_FIELDS} == {
              k: v for k, v in four['privacy'].items()
              if k not in LAYOUT_FIELDS}


def _config_data_dir(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)['config']['data_dir']
