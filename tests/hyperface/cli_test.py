"""Commands take shipped configs by name from any directory, and say what is
missing in one line."""

import importlib.util
import os
import subprocess
import sys

import pytest

from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import configs
from dplh_jax.hyperface.configs import tiny as configs_tiny
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


@pytest.mark.parametrize('name', configs.names())
def test_every_shipped_config_passes_validation(name):
  config_validation.validate_config(_load(name).get_config())


def _load(name):
  spec = importlib.util.spec_from_file_location(name, configs.resolve(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_demo_is_the_default_recipe_from_the_public_model_for_two_epochs():
  demo, default = (_load(n).get_config().to_dict() for n in ('demo',
                                                             'default'))
  changed = {k: (default[k], demo[k]) for k in demo if demo[k] != default[k]}
  assert changed == {'init_params_from': ('', 'workdirs/public'),
                     'num_epochs': (default['num_epochs'], 2.0)}


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


def _train(tmp_path, *args):
  return subprocess.run(
      [sys.executable, '-m', 'dplh_jax.hyperface.cli.train', '--config',
       'tiny', f'--workdir={tmp_path}', *args], capture_output=True,
      text=True, cwd=tmp_path, env=os.environ | {'JAX_PLATFORMS': 'cpu'},
      check=False)


def test_an_unknown_config_field_is_one_line_with_the_suggestion(tmp_path):
  out = _train(tmp_path, '--config.nois_multiplier=1')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      "error: --config.nois_multiplier: the config has no field "
      "'nois_multiplier'. Did you mean \"noise_multiplier\" instead of "
      "\"nois_multiplier\"?"]


def test_none_overrides_reach_the_config(tmp_path):
  # Both set to None: the config check then names them, so both arrived.
  out = _train(tmp_path, '--config.target_epsilon=None',
               '--config.noise_multiplier=none')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      'error: config.target_epsilon=None: give target_epsilon or '
      'noise_multiplier for DP.']


def test_only_optional_fields_take_none():
  argv, fields = flags_util.split_none_overrides(
      ['prog', '--config.target_epsilon=None', '--config.seed=3',
       '--workdir=None'])
  assert argv == ['prog', '--config.seed=3', '--workdir=None']
  assert fields == ['target_epsilon']
  config = configs_tiny.get_config()
  config.lock()
  flags_util.set_to_none(config, fields)
  assert config.target_epsilon is None
  with pytest.raises(ValueError, match=(
      '--config.learning_rate=None: learning_rate is not optional; None is '
      'taken by group_norm_groups, microbatch_size, noise_multiplier, '
      'noise_seed, sampler_seed, target_epsilon')):
    flags_util.set_to_none(config, ['learning_rate'])
  with pytest.raises(ValueError, match='lr is not a config field'):
    flags_util.set_to_none(config, ['lr'])
