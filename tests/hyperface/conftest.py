"""Fixtures shared by the application tests."""

import pytest


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS folder for the session: the tiny dataset is built once."""
  return str(tmp_path_factory.mktemp('tfds'))

