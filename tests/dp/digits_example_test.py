"""examples/digits_dp.py, as a user would run it: a short DP run on
scikit-learn's digits trains above chance within its target epsilon, and
says whether its noise seed is public."""

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip('sklearn')

_PATH = pathlib.Path(__file__).parents[2] / 'examples' / 'digits_dp.py'


def _example():
  spec = importlib.util.spec_from_file_location('digits_dp', _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_short_dp_run_beats_chance_within_the_target_epsilon(capsys):
  # 30 steps of expected batch 64 (1.3 epochs) at epsilon 4: 0.82 on the
  # test split with seed 0; chance on 10 balanced classes is 0.1.
  result = _example().main(4.0, steps=30, accountant='rdp', seed=0)
  assert result['steps'] == 30
  assert 0 < result['epsilon'] <= 4.0
  assert result['noise_multiplier'] > 0.5
  assert result['accuracy'] > 0.5
  # F7: a seeded run says its noise key is public.
  assert result['noise_seed_source'] == 'config_seed (not secret)'
  assert 'seed 0 is public' in capsys.readouterr().out


def test_noise_and_sampler_default_to_os_entropy(monkeypatch):
  example = _example()
  monkeypatch.setattr(sys, 'argv', ['digits_dp.py'])
  assert example._parse_args().seed is None
  _, noise_seed, sampler_seed = example._seeds(None)
  assert noise_seed is None and sampler_seed is None
