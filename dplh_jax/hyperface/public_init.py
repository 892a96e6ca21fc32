"""Initial parameters from a model trained on public data.

DPLH and HyperFace start from pre-trained weights; under DP that is free
only when those weights never saw the private data. ``config.init_params_from``
names a ``dplh-train`` workdir or a ``dplh-export`` file whose training set
is public (for the synthetic demo: ``synthetic_faces/demo_public``, rendered
from another seed, so it shares no image with ``synthetic_faces/demo``). The
run starts from its released parameters and the accountant charges nothing
for them; the privacy report says where they came from.

.. warning::
   The guarantee then assumes what the user declares: that the source model
   was trained on data outside this run's private set. A source trained on
   this run's own dataset (same TFDS name) is refused; copies under another
   name cannot be detected. Pre-training on the private data itself must be
   DP and composed in the run's accountant instead.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dplh_jax.hyperface import export
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import models


def describe(config: ml_collections.ConfigDict) -> str:
  """What the privacy report says about the initialization."""
  if not config.init_params_from:
    return f'random (config.seed={config.seed})'
  return (f'public model {config.init_params_from} (declared public: not '
          'trained on this run\'s data; charged no privacy)')


def load_source(path: str) -> export.ReleasedModel:
  """The released params of a workdir or a dplh-export file.

  Raises:
    ValueError: a path that is neither (one line, with the fix).
  """
  if os.path.isdir(path):
    return export.params_from_workdir(path)
  if os.path.isfile(path):
    return export.read_params_file(path)
  raise ValueError(f'config.init_params_from={path!r} does not exist: pass a '
                   'dplh-train workdir or a dplh-export file of a model '
                   'trained on public data (e.g. dplh-train --config '
                   f'public_pretrain --workdir {path}), or \'\' for random '
                   'weights.')


def initial_params(config: ml_collections.ConfigDict,
                   model: models.HyperFace) -> Any:
  """The parameters the run starts from: ``model_setup.init_params``, or
  those of ``config.init_params_from``.

  Raises:
    ValueError: a source trained on this run's dataset, or one whose
      parameters do not fit this config's model (one line naming the first
      leaf that differs).
  """
  params = model_setup.init_params(config, model)
  if not config.init_params_from:
    return params
  source = load_source(config.init_params_from)
  if source.config.get('dataset') == config.dataset:
    raise ValueError(
        f'config.init_params_from={config.init_params_from!r} was trained on '
        f'{config.dataset}, this run\'s own dataset: that is not public data; '
        'train the source on another dataset (e.g. synthetic_faces/'
        'demo_public).')
  expected = jax.tree_util.tree_flatten_with_path(params)[0]
  loaded = dict(jax.tree_util.tree_flatten_with_path(source.params)[0])
  paths = {path for path, _ in expected}
  for path, leaf in expected:
    found = loaded.get(path)
    if found is None or np.shape(found) != np.shape(leaf):
      raise ValueError(
          f'config.init_params_from={config.init_params_from!r} does not fit '
          f'this model: {jax.tree_util.keystr(path)} is '
          f'{"missing" if found is None else np.shape(found)}, the model has '
          f'{np.shape(leaf)}; pre-train with the same model fields '
          '(input_size, width_multiplier, conv1_*, task_weighting, ...).')
  extra = [jax.tree_util.keystr(p) for p in loaded if p not in paths]
  if extra:
    raise ValueError(
        f'config.init_params_from={config.init_params_from!r} does not fit '
        f'this model: it has {extra[0]}, which the model has not; pre-train '
        'with the same model fields.')
  return jax.tree.map(lambda leaf, value: np.asarray(value, leaf.dtype),
                      params, source.params)
