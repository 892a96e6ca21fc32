"""Checks a training config before anything runs: one error naming the field."""

from __future__ import annotations

import math
import numbers

import ml_collections

from dplh_jax.hyperface import models

OPTIMIZERS = ('sgd', 'momentum', 'adam')
TASK_WEIGHTINGS = ('uncertainty', 'fixed')
INITIAL_TASK_WEIGHTS = ('hyperface', 'equal')
CLIPPING_METHODS = ('one_pass', 'vmap')
LEARNING_RATE_SCHEDULES = ('constant', 'cosine')
TASK_FEATURES = ('shared', 'cross_sec')  # models.TASK_FEATURE_KINDS
CLIP_GROUPS = ('none', 'per_task')  # clip_groups.CLIP_GROUPS


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and its value."""
  def need(condition: bool, field: str, requirement: str) -> None:
    if not condition:
      raise ValueError(f'config.{field}={config[field]!r}: {requirement}.')

  need(config.expected_batch_size > 0, 'expected_batch_size', 'must be > 0')
  need(config.num_epochs > 0, 'num_epochs', 'must be > 0')
  need(math.isfinite(config.detection_pretrain_epochs)
       and config.detection_pretrain_epochs >= 0, 'detection_pretrain_epochs',
       'must be finite and >= 0 (0: no detection pre-training)')
  need(config.optimizer in OPTIMIZERS, 'optimizer', f'use one of {OPTIMIZERS}')
  need(config.task_weighting in TASK_WEIGHTINGS, 'task_weighting',
       f'use one of {TASK_WEIGHTINGS}')
  need(config.initial_task_weights in INITIAL_TASK_WEIGHTS,
       'initial_task_weights', f'use one of {INITIAL_TASK_WEIGHTS}')
  bound = config.task_weight_bound
  # Above 1e6 the bounded float32 weights (up to w0 * bound) can overflow.
  need(math.isfinite(bound) and (bound == 0 or 1 < bound <= 1e6),
       'task_weight_bound', 'must be 0 (unbounded) or a factor in (1, 1e6]')
  need(bound == 0 or not config.get('init_params_from'),
       'task_weight_bound', 'is centred on initial_task_weights, not on a '
       "loaded model's learned weights: use init_params_from='' or "
       'task_weight_bound=0')
  need(bound == 0 or config.task_weighting == 'uncertainty',
       'task_weight_bound', "bounds learned weights: set task_weighting="
       "'uncertainty' or task_weight_bound=0")
  need(config.clip_groups in CLIP_GROUPS, 'clip_groups',
       f'use one of {CLIP_GROUPS}')
  need(config.task_features in TASK_FEATURES, 'task_features',
       f'use one of {TASK_FEATURES}')
  need(math.isfinite(config.decorrelation_weight)
       and config.decorrelation_weight >= 0, 'decorrelation_weight',
       'must be finite and >= 0 (0: off)')
  need(config.decorrelation_weight == 0 or config.task_features == 'cross_sec',
       'decorrelation_weight', "needs task_features='cross_sec' (shared "
       'features are one copy for every task: the penalty would be constant)')
  need(config.num_positives <= config.num_proposals, 'num_positives',
       f'must be <= num_proposals={config.num_proposals}')
  multiplicity = config.augmentation_multiplicity
  need(isinstance(multiplicity, numbers.Integral)
       and not isinstance(multiplicity, bool) and multiplicity >= 1,
       'augmentation_multiplicity',
       'must be an int >= 1 (1: one view per image, off)')
  for field in ('log_every', 'checkpoint_every', 'eval_batch_size'):
    need(config[field] >= 1, field, 'must be >= 1')
  need(config.eval_every >= 0, 'eval_every',
       'must be >= 0 (0: evaluate at the end only)')
  need(config.image_eval_images >= 0, 'image_eval_images',
       'must be >= 0 (0: no image-level evaluation at the end)')
  need(config.learning_rate_schedule in LEARNING_RATE_SCHEDULES,
       'learning_rate_schedule', f'use one of {LEARNING_RATE_SCHEDULES}')
  need(config.warmup_steps >= 0, 'warmup_steps', 'must be >= 0 (0: none)')
  need(0 <= config.ema_decay < 1, 'ema_decay',
       'must be in [0, 1) (0: no parameter average)')
  need(config.microbatch_size is None or config.microbatch_size >= 1,
       'microbatch_size', 'must be None or >= 1')
  need(config.clipping in CLIPPING_METHODS, 'clipping',
       f'use one of {CLIPPING_METHODS}')
  groups = config.get('group_norm_groups')
  if groups is not None:
    # HyperFace's convolutions have 96, 256, 384 and 192 filters in the
    # paper (models.HyperFaceTrunk), scaled by width_multiplier.
    widths = sorted({models.HyperFaceConfig(
        width_multiplier=config.width_multiplier).width(filters)
                     for filters in (96, 256, 384, 192)})
    need(groups >= 1 and all(w % groups == 0 for w in widths),
         'group_norm_groups', f'must divide every convolution\'s channel '
         f'count {widths} (None: no GroupNorm)')
  for field in ('seed', 'noise_seed', 'sampler_seed'):
    need(config[field] is None or 0 <= config[field] < 2**32, field,
         'must be in [0, 2**32) (JAX keeps 32 bits of a seed, so larger '
         'ones collide)')
  if not config.dp:
    return
  need(config.privacy_unit == 'image', 'privacy_unit',
       "only 'image' is implemented (one image = one unit of privacy)")
  need(config.l2_norm_clip > 0, 'l2_norm_clip', 'must be > 0')
  need(0 < config.delta < 1, 'delta', 'must be in (0, 1)')
  need(config.accountant in ('pld', 'rdp'), 'accountant', "use 'pld' or 'rdp'")
  need(config.target_epsilon is not None or config.noise_multiplier is not None,
       'target_epsilon', 'give target_epsilon or noise_multiplier for DP')
  if config.target_epsilon is not None:
    need(config.target_epsilon > 0, 'target_epsilon', 'must be > 0')
  if config.noise_multiplier is not None:
    need(config.noise_multiplier >= 0, 'noise_multiplier', 'must be >= 0')
