"""Unit tests of dplh_jax.dp.run_binding: config binding, counters, the lock."""

import os
import socket

import pytest

from dplh_jax.dp import run_binding

BOUND = 'a workdir is bound to the config it started with'


def test_every_differing_field_is_listed_in_one_line():
  saved = {'seed': 0, 'l2_norm_clip': 1.0, 'optimizer': 'adam', 'gone': 1,
           'log_every': 1}
  now = {'seed': 7, 'l2_norm_clip': 3.0, 'optimizer': 'adam', 'new': None,
         'log_every': 5}
  with pytest.raises(ValueError) as error:
    run_binding.check_config_unchanged(saved, now, frozenset({'log_every'}))
  message = str(error.value)
  assert '\n' not in message
  assert ('gone: 1 -> <absent>; l2_norm_clip: 1.0 -> 3.0; new: <absent> -> '
          'null; seed: 0 -> 7; ') in message
  assert 'log_every' not in message and 'optimizer' not in message
  assert message.endswith(BOUND + '; use a new --workdir (or restore those '
                          'values).')


def test_json_forms_of_one_value_are_equal():
  saved = {'learning_rate': 1, 'shape': [1, 2], 'nested': {'a': 2.0},
           'seed': None}
  now = {'learning_rate': 1.0, 'shape': (1, 2), 'nested': {'a': 2},
         'seed': None}
  run_binding.check_config_unchanged(saved, now)


@pytest.mark.parametrize('saved, now', [
    (True, 1), (False, 0), (0, None), ('1', 1), ([1], [1, 1]), (1, 1.5),
    # Ints beyond float64's 2**53 are compared exactly (the second reader
    # resumed seed 2**53 with seed 2**53 + 1, and it was accepted).
    (2**53, 2**53 + 1), (2**53 + 1, float(2**53))])
def test_distinct_values_differ(saved, now):
  with pytest.raises(ValueError, match=BOUND):
    run_binding.check_config_unchanged({'x': saved}, {'x': now})


def test_counters_must_all_equal_the_step():
  run_binding.check_counters_agree(4, accountant_steps=4, noise_draws=4,
                                   sampler_draws=4)
  with pytest.raises(ValueError) as error:
    run_binding.check_counters_agree(12, accountant_steps=10,
                                     noise_draws=12, sampler_draws=11)
  message = str(error.value)
  assert 'at train step 12 it records accountant_steps=10, sampler_draws=11' \
      in message
  assert 'noise_draws' not in message


def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
  workdir = str(tmp_path / 'w')
  with run_binding.WorkdirLock(workdir):
    with open(os.path.join(workdir, '.lock')) as f:
      assert f.read().split() == [str(os.getpid()), socket.gethostname()]
    # flock excludes another open file description, in this process too.
    with pytest.raises(run_binding.WorkdirInUseError) as error:
      with run_binding.WorkdirLock(workdir):
        pass
    assert str(error.value) == (
        f'workdir {workdir} is in use by another training process (pid '
        f'{os.getpid()} on {socket.gethostname()}); wait for it to finish '
        'or use another --workdir')
    assert isinstance(error.value, ValueError)  # main.py prints one line
  with run_binding.WorkdirLock(workdir):  # released on exit
    pass
