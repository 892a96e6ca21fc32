"""Builds the pieces of a training run from its config, and checks the config.

Kept apart from ``train.py`` so the training loop reads as the data flow; this
file holds the validation, the builders and the small I/O helpers.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

import dplh_jax.datasets  # pylint: disable=unused-import  (registers builders)
from dplh_jax import batch_selection
from dplh_jax import dp_transform
from dplh_jax import input_pipeline
from dplh_jax import models
from dplh_jax import run_binding
from dplh_jax import task_weighting

OPTIMIZERS = ('sgd', 'momentum', 'adam')
TASK_WEIGHTINGS = ('uncertainty', 'fixed')
INITIAL_TASK_WEIGHTS = ('hyperface', 'equal')
CLIPPING_METHODS = ('one_pass', 'vmap')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and its value."""
  def need(condition: bool, field: str, requirement: str) -> None:
    if not condition:
      raise ValueError(f'config.{field}={config[field]!r}: {requirement}.')

  need(config.expected_batch_size > 0, 'expected_batch_size', 'must be > 0')
  need(config.num_epochs > 0, 'num_epochs', 'must be > 0')
  need(config.optimizer in OPTIMIZERS, 'optimizer', f'use one of {OPTIMIZERS}')
  need(config.task_weighting in TASK_WEIGHTINGS, 'task_weighting',
       f'use one of {TASK_WEIGHTINGS}')
  need(config.initial_task_weights in INITIAL_TASK_WEIGHTS,
       'initial_task_weights', f'use one of {INITIAL_TASK_WEIGHTS}')
  need(config.num_positives <= config.num_proposals, 'num_positives',
       f'must be <= num_proposals={config.num_proposals}')
  for field in ('log_every', 'checkpoint_every', 'eval_batch_size'):
    need(config[field] >= 1, field, 'must be >= 1')
  need(config.eval_every >= 0, 'eval_every',
       'must be >= 0 (0: evaluate at the end only)')
  need(config.microbatch_size is None or config.microbatch_size >= 1,
       'microbatch_size', 'must be None or >= 1')
  need(config.clipping in CLIPPING_METHODS, 'clipping',
       f'use one of {CLIPPING_METHODS}')
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


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Prepares (builds if needed) the TFDS dataset and opens random access."""
  data_dir = config.data_dir or None
  if data_dir is not None and not os.path.isdir(data_dir):
    raise ValueError(f'config.data_dir={config.data_dir!r} does not exist.')
  builder = tfds.builder(config.dataset, data_dir=data_dir)
  if not builder.is_prepared():
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
  return Data(train, sources['test'], input_pipeline.PipelineConfig(
      crop_size=config.input_size, num_proposals=config.num_proposals,
      num_positives=config.num_positives))


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


def secret_key(seed: int | None) -> tuple[jax.Array, str]:
  """The DP noise key: 64 bits of OS entropy unless a seed is configured.

  Anyone who knows the key can regenerate and subtract the noise, so a
  configured seed is labelled as not secret in the privacy report.
  """
  if seed is None:
    data = np.frombuffer(os.urandom(8), dtype=np.uint32)
    return dp_transform.canonicalize_key(data), 'os_entropy'
  return dp_transform.canonicalize_key(seed), seed_source(seed)


def seed_source(seed: int | None) -> str:
  return 'os_entropy' if seed is None else 'config_seed (not secret)'


def build_sampler(config: ml_collections.ConfigDict, num_examples: int
                  ) -> batch_selection.PoissonSampler:
  return batch_selection.PoissonSampler(
      num_examples, config.expected_batch_size, seed=config.sampler_seed)


def check_resume(record: dict[str, Any], config: ml_collections.ConfigDict,
                 plan, state, accountant) -> None:
  """Refuses a checkpoint whose plan or counters disagree with this run.

  The config is already known unchanged (``run_binding``); this catches what
  the config does not show (data of another size given to ``train``) and a
  record edited or corrupted on disk: every count of the steps run (train
  step, steps accounted, noise draws, sampler draws) must agree, and every
  accounted step must be one of this plan's (sigma, q).
  """
  saved = record['privacy_plan']
  now = dataclasses.asdict(plan)
  differing = [f'{field}: {saved.get(field)} -> {now[field]}'
               for field in now if saved.get(field) != now[field]]
  if differing:
    raise ValueError(
        f'The checkpoint in this workdir ran another privacy plan '
        f'({"; ".join(differing)}); was other data given? Use a new workdir.')
  counters = {'sampler_draws': record['sampler']['steps_sampled']}
  if config.dp:
    counters['accountant_steps'] = accountant.steps
    counters['noise_draws'] = int(state.opt_state[0].num_updates)
  elif accountant.steps:
    raise ValueError(f'The checkpoint is inconsistent: a non-private run '
                     f'records accountant_steps={accountant.steps}; use a new '
                     'workdir.')
  run_binding.check_counters_agree(int(state.step), **counters)
  other = [phase for phase in accountant.phases
           if (phase.noise_multiplier, phase.sampling_prob)
           != (plan.noise_multiplier, plan.sampling_prob)]
  if other:
    raise ValueError(
        f'The checkpoint is inconsistent: its accountant holds phases '
        f'{[dataclasses.asdict(p) for p in other]} that are not this run\'s '
        f'(noise_multiplier={plan.noise_multiplier}, '
        f'sampling_prob={plan.sampling_prob}); use a new workdir.')


def sampled_batches(source, sampler: batch_selection.PoissonSampler,
                    pipeline_config: input_pipeline.PipelineConfig,
                    seed: int, start_step: int, num_steps: int
                    ) -> Iterator[tuple[int, dict[str, np.ndarray], dict]]:
  """``(step, batch, sampler_state)`` for steps ``start_step..num_steps-1``.

  Each item carries the sampler state right after its own draw, so a
  checkpoint saved after training that step restores the sampler exactly
  there, even when batches are prefetched ahead in another thread.
  """
  for step in range(start_step, num_steps):
    indices, is_padding_example = sampler.sample()
    state = sampler.state_dict()
    batch = input_pipeline.build_batch(source, indices, is_padding_example,
                                       pipeline_config, seed=seed, step=step)
    yield step, batch, state


def print_progress(step: int, num_steps: int, steps_per_second: float,
                   epsilon: float | None, values: dict[str, float]) -> None:
  """One progress line: step, speed, epsilon spent and the task losses."""
  losses = ' '.join(f'{k.removeprefix("train_loss_")}={v:.3f}'
                    for k, v in values.items() if k.startswith('train_loss_'))
  spent = f' eps={epsilon:.3f}' if epsilon is not None else ''
  print(f'step {step}/{num_steps} {steps_per_second:.2f} steps/s{spent} '
        f'{losses}', file=sys.stderr, flush=True)
