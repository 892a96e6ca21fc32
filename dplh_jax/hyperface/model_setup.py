"""The HyperFace module, its task weighting and initial params, from a config."""

from __future__ import annotations

import ml_collections

from dplh_jax.hyperface import models
from dplh_jax.hyperface import task_weighting


def build_model(config: ml_collections.ConfigDict):
  """The HyperFace module and the task weighting it is trained with."""
  model = models.HyperFace(
      models.HyperFaceConfig(
          input_size=config.input_size,
          width_multiplier=config.width_multiplier,
          conv1_kernel=config.conv1_kernel, conv1_stride=config.conv1_stride,
          dropout_rate=config.dropout_rate),
      learn_task_weights=config.task_weighting == 'uncertainty')
  if config.task_weighting == 'uncertainty':
    return model, task_weighting.UncertaintyWeighting()
  return model, task_weighting.FixedWeighting()


def init_params(config: ml_collections.ConfigDict, model: models.HyperFace):
  """Initial variables (public: no private data is read)."""
  params = models.init_variables(model, config.seed)
  if (config.task_weighting == 'uncertainty'
      and config.initial_task_weights == 'hyperface'):
    params = task_weighting.with_initial_weights(
        params, task_weighting.HYPERFACE_LOSS_WEIGHTS)
  return params
