"""Starting a DP run from a model trained on public data (public_init)."""

import numpy as np
import pytest

import jax

from dplh_jax.hyperface import export
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import public_init
from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import tiny


def _consumer_config(data_dir, source, **overrides):
  """A tiny DP run on 'tiny_public' (its private data here) that starts
  from the shared run, trained on 'tiny' (public from its point of view)."""
  config = tiny.get_config()
  config.dataset = 'synthetic_faces/tiny_public'
  config.data_dir = data_dir
  config.init_params_from = source
  config.update(overrides)
  return config


def test_a_run_starts_from_the_public_params_and_reports_them(
    trained_tiny, data_dir, tmp_path):
  config = _consumer_config(data_dir, trained_tiny.workdir, num_epochs=0.25)
  source = export.params_from_workdir(trained_tiny.workdir).params
  model, _ = model_setup.build_model(config)
  start = public_init.initial_params(config, model)
  jax.tree.map(np.testing.assert_array_equal, start, source)
  # Differs from the random init it replaces, so the check can fail.
  assert not np.array_equal(
      jax.tree.leaves(model_setup.init_params(config, model))[0],
      jax.tree.leaves(start)[0])

  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['privacy']['initialization'] == (
      f'public model {trained_tiny.workdir} (declared public: not trained on '
      "this run's data; charged no privacy)")
  assert result['privacy']['steps'] == 1  # the epsilon counts this run only
  assert train.train_and_evaluate(config, str(tmp_path / 'run'))[
      'privacy'] == result['privacy']  # a resume restores, no source needed


def test_a_source_trained_on_this_runs_own_data_is_refused(trained_tiny,
                                                           data_dir):
  config = _consumer_config(data_dir, trained_tiny.workdir,
                            dataset='synthetic_faces/tiny')
  model, _ = model_setup.build_model(config)
  with pytest.raises(ValueError, match='was trained on synthetic_faces/tiny, '
                     "this run's own dataset: that is not public data"):
    public_init.initial_params(config, model)


def test_a_source_of_another_model_or_nowhere_is_refused_in_one_line(
    trained_tiny, data_dir, tmp_path):
  config = _consumer_config(data_dir, trained_tiny.workdir,
                            width_multiplier=1 / 16)
  model, _ = model_setup.build_model(config)
  with pytest.raises(ValueError, match=r"does not fit this model: \['params'\]"
                     r".* is \(.*\), the model has \(.*\); pre-train"):
    public_init.initial_params(config, model)
  config = _consumer_config(data_dir, str(tmp_path / 'absent'))
  with pytest.raises(ValueError, match='does not exist: pass a dplh-train '
                     'workdir or a dplh-export file.*--config public_pretrain '
                     '--workdir .*absent'):
    public_init.initial_params(config, model)


def test_the_random_init_is_reported_with_its_seed():
  assert public_init.describe(tiny.get_config()) == 'random (config.seed=0)'
