"""Commands take shipped configs by name from any directory, and say what is
missing in one line."""

import os
import subprocess
import sys

from dplh_jax.hyperface import configs
from dplh_jax.hyperface.cli import flags_util


def test_config_names_resolve_to_the_shipped_files_and_paths_stay():
  tiny = configs.resolve('tiny')
  assert os.path.isfile(tiny) and tiny.endswith(os.path.join('configs',
                                                             'tiny.py'))
  assert {'default', 'tiny', 'nonprivate', 'dplh_aflw'} <= set(configs.names())
  assert configs.resolve('tiny:some_arg') == tiny + ':some_arg'
  assert configs.resolve('no_such_config') == 'no_such_config'
  assert flags_util.resolve_config_names(
      ['prog', '--config', 'tiny', '--config.seed=3', '--workdir', 'w']) == [
          'prog', '--config', tiny, '--config.seed=3', '--workdir', 'w']
  assert flags_util.resolve_config_names(['prog', '--config=default']) == [
      'prog', f'--config={configs.resolve("default")}']


def test_train_without_a_config_names_the_shipped_ones(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'dplh_jax.hyperface.cli.train',
       f'--workdir={tmp_path}'], capture_output=True, text=True,
      cwd=tmp_path, env=os.environ | {'JAX_PLATFORMS': 'cpu'}, check=False)
  assert out.returncode != 0
  assert 'no config given: pass --config NAME (one of ' in out.stderr
  assert 'tiny' in out.stderr and 'Traceback' not in out.stderr


def test_a_config_that_is_neither_a_name_nor_a_file_is_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'dplh_jax.hyperface.cli.train',
       '--config', 'defualt', f'--workdir={tmp_path}'], capture_output=True,
      text=True, cwd=tmp_path, env=os.environ | {'JAX_PLATFORMS': 'cpu'},
      check=False)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "error: --config 'defualt' is neither a shipped config ("
      f"{', '.join(configs.names())}) nor a file."]
