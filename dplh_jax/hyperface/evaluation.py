"""Held-out evaluation on pre-cut proposals: the jitted forward pass and the
metrics over the first ``num_eval_examples`` test images.

Evaluation reads only released parameters and test images; it is outside the
privacy guarantee's accounting because it spends nothing on training data.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import metrics as metrics_lib
from dplh_jax.hyperface import models
from dplh_jax.hyperface import prefetching


@functools.lru_cache(maxsize=4)
def compiled_eval_step(model: models.HyperFace):
  return jax.jit(make_eval_step(model))


def make_eval_step(model: models.HyperFace):
  """``(params, crops (B, K, S, S, 3)) -> outputs`` with (B, K) axes."""
  return functools.partial(models.apply_to_images, model)


def eval_images(source, config) -> Any:
  """The held-out images evaluated: the first ``num_eval_examples``."""
  limit = config.num_eval_examples
  if limit > 0:
    return [source[i] for i in range(min(limit, len(source)))]
  return source


def evaluate(eval_step, params, source, pipeline_config, config) -> dict:
  """Held-out metrics over the first ``num_eval_examples`` test images."""
  accumulator = metrics_lib.EvalAccumulator()
  for batch in prefetching.prefetch(input_pipeline.eval_batches(
      eval_images(source, config), pipeline_config,
      batch_size=config.eval_batch_size,
      seed=config.seed)):
    outputs = jax.device_get(eval_step(params, batch['crops']))
    accumulator.update(outputs, batch)
  return accumulator.result()
