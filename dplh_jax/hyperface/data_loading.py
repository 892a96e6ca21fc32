"""Opens a run's face dataset (TFDS, random access) as train and test sources."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

import dplh_jax.hyperface.datasets  # pylint: disable=unused-import  (registers builders)
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import writable
from dplh_jax.hyperface.datasets import aflw


# The face datasets this package registers, with their builder configs.
DATASETS = ('synthetic_faces', 'aflw')
DATASET_CONFIGS = ('synthetic_faces/demo', 'synthetic_faces/tiny', 'aflw')


@dataclasses.dataclass(frozen=True)
class Data:
  train: Sequence[dict[str, Any]]
  test: Sequence[dict[str, Any]]
  pipeline_config: input_pipeline.PipelineConfig


class _Prefix(Sequence):
  """The first ``size`` records of a random-access source."""

  def __init__(self, source, size: int):
    self._source, self._size = source, size

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index):
    if not 0 <= index < self._size:
      raise IndexError(index)
    return self._source[index]


def _check_preparable(config, builder) -> None:
  """One line instead of TFDS's traceback when a dataset cannot be built:
  AFLW's manual files missing, or a data_dir that cannot be written."""
  root = builder._data_dir_root  # pylint: disable=protected-access
  if config.dataset == 'aflw':
    missing = aflw.missing_manual_files(
        os.path.join(root, 'downloads', 'manual'))
    if missing:
      raise ValueError(missing)
  writable.check_writable_folder(
      root, 'config.data_dir', f'{config.dataset} is not prepared there; '
      'pass a writable data_dir, or one where it is prepared')


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Prepares (builds if needed) the TFDS dataset and opens random access."""
  data_dir = config.data_dir or None
  if data_dir is not None and not os.path.isdir(data_dir):
    raise ValueError(f'config.data_dir={config.data_dir!r} does not exist: '
                     'create it, or leave data_dir empty for TFDS\'s default '
                     '(~/tensorflow_datasets).')
  name = config.dataset.split('/')[0]
  if name not in DATASETS:
    raise ValueError(
        f'config.dataset={config.dataset!r} is not one of ours: use '
        f"{', '.join(repr(d) for d in DATASET_CONFIGS)}.")
  builder = tfds.builder(config.dataset, data_dir=data_dir)
  if not builder.is_prepared():
    _check_preparable(config, builder)
    print(f'Preparing {config.dataset} in {builder.data_dir} ...',
          flush=True)
    builder.download_and_prepare()
  sources = builder.as_data_source()
  train = sources['train']
  if config.num_train_examples > 0:
    if config.num_train_examples > len(train):
      raise ValueError(
          f'config.num_train_examples={config.num_train_examples} exceeds '
          f'the {len(train)} training images of {config.dataset}.')
    train = _Prefix(train, config.num_train_examples)
  # Configs written before augmentation multiplicity (released files, old
  # workdirs) lack the field and trained with one view.
  return Data(train, sources['test'], input_pipeline.PipelineConfig(
      crop_size=config.input_size, num_proposals=config.num_proposals,
      num_positives=config.num_positives,
      views=config.get('augmentation_multiplicity', 1)))
