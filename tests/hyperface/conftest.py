"""Fixtures shared by the application tests."""

import os
from typing import Any, NamedTuple

import ml_collections
import pytest

from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import tiny

# Test images the shared tiny run evaluates at the end (of the 8).
TINY_IMAGE_EVAL_IMAGES = 4


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS folder for the session: the tiny dataset is built once."""
  return str(tmp_path_factory.mktemp('tfds'))


class TrainedRun(NamedTuple):
  workdir: str
  config: ml_collections.ConfigDict
  result: dict[str, Any]  # what train.train_and_evaluate returned


def tiny_run_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The shared run's config: the tiny config (4 DP steps, fixed seeds) with
  one held-out evaluation mid-run (eval_every=2) and the image-level
  evaluation of TINY_IMAGE_EVAL_IMAGES test images at the end."""
  config = tiny.get_config()
  config.data_dir = data_dir
  config.eval_every = 2
  config.image_eval_images = TINY_IMAGE_EVAL_IMAGES
  config.update(overrides)
  return config


@pytest.fixture(scope='session')
def trained_tiny(data_dir, tmp_path_factory) -> TrainedRun:
  """One finished tiny-config training run for the session, shared by the
  tests that read a trained workdir (copy it before changing it)."""
  config = tiny_run_config(data_dir)
  workdir = str(tmp_path_factory.mktemp('trained_tiny'))
  result = train.train_and_evaluate(config, workdir)
  assert os.path.exists(os.path.join(workdir, 'privacy_report.json'))
  return TrainedRun(workdir, config, result)
