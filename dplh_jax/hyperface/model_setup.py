"""The HyperFace module, its task weighting and initial params, from a config."""

from __future__ import annotations

import ml_collections

from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.hyperface import task_weighting


def build_model(config: ml_collections.ConfigDict):
  """The HyperFace module and the task weighting it is trained with.

  Configs written before Cross-SEC (released files, old workdirs) lack its
  fields and get the shared model, which is what they trained.
  """
  model = models.HyperFace(
      models.HyperFaceConfig(
          input_size=config.input_size,
          width_multiplier=config.width_multiplier,
          conv1_kernel=config.conv1_kernel, conv1_stride=config.conv1_stride,
          dropout_rate=config.dropout_rate,
          task_features=config.get('task_features', models.SHARED),
          cross_task_gates=config.get('cross_task_gates', True),
          group_norm_groups=config.get('group_norm_groups')),
      learn_task_weights=config.task_weighting == 'uncertainty')
  weight_bound = config.get('task_weight_bound', 0.0)
  if config.task_weighting == 'uncertainty' and weight_bound:
    weighting = task_weighting.BoundedUncertaintyWeighting.around(
        initial_task_weights(config), weight_bound)
  elif config.task_weighting == 'uncertainty':
    weighting = task_weighting.UncertaintyWeighting()
  else:
    weighting = task_weighting.FixedWeighting()
  decorrelation_weight = config.get('decorrelation_weight', 0.0)
  if decorrelation_weight:
    weighting = losses.Decorrelated(weighting, float(decorrelation_weight))
  return model, weighting


def initial_task_weights(config: ml_collections.ConfigDict
                         ) -> dict[str, float]:
  """Where learned task weights start: HyperFace's, or all equal at 0.5
  (log sigma^2 = 0, the parameter's zero initialization)."""
  if config.initial_task_weights == 'hyperface':
    return dict(task_weighting.HYPERFACE_LOSS_WEIGHTS)
  return {task: 0.5 for task in models.TASK_NAMES}


def init_params(config: ml_collections.ConfigDict, model: models.HyperFace):
  """Initial variables (public: no private data is read)."""
  params = models.init_variables(model, config.seed)
  if (config.task_weighting == 'uncertainty'
      and config.initial_task_weights == 'hyperface'):
    params = task_weighting.with_initial_weights(
        params, task_weighting.HYPERFACE_LOSS_WEIGHTS)
  return params
