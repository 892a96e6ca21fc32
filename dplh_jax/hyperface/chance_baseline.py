"""Held-out metrics of constant predictions: what "better than chance" means.

Fits the best constant per task (majority detection and gender class, mean
landmark positions, per-landmark visibility rate, mean pose) and scores it
with the same metrics as training. ``dplh-baseline`` fits on training images
and scores the test split::

  dplh-baseline --config default

``train`` prints the constants fitted on the evaluated test images
themselves beside the run's metrics: the best any constant does on them,
and computed without reading a training image (docs/DESIGN.md, Metric
conventions).
"""

from __future__ import annotations

import numpy as np

from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import metrics


def fit_constants(batches) -> dict[str, np.ndarray]:
  """The best constant per task, from real proposals of training images."""
  landmark_sum = visible = visibility_sum = pose_sum = 0.0
  labelled = faces = known_gender = males = 0
  for batch in batches:
    label = np.where(batch['is_padding_example'][:, None], -1,
                     batch['detection_label'])
    positive = label == 1
    labelled += int(np.sum(label >= 0))
    faces += int(np.sum(positive))
    vis = batch['visibility'][positive]
    landmark_sum += (batch['landmarks'][positive] * vis[..., None]).sum(0)
    visible += vis.sum(0)
    visibility_sum += vis.sum(0)
    pose_sum += batch['pose'][positive].sum(0)
    known = positive & (batch['gender'] >= 0)
    known_gender += int(np.sum(known))
    males += int(np.sum(batch['gender'][known] == 1))
  return {
      'detection': np.array([0.0, 1.0] if 2 * faces >= labelled
                            else [1.0, 0.0]),
      # Mean position of each landmark where it is visible.
      'landmarks': (landmark_sum / np.maximum(visible, 1)[:, None]).reshape(-1),
      'visibility': visibility_sum / max(faces, 1),
      'pose': pose_sum / max(faces, 1),
      'gender': np.array([0.0, 1.0] if 2 * males >= known_gender
                         else [1.0, 0.0]),
  }


def constant_metrics(fit_images, test_images, pipeline_config,
                     config) -> dict[str, float]:
  """Metrics on ``test_images`` of the best constants on ``fit_images``."""
  constants = fit_constants(input_pipeline.eval_batches(
      fit_images, pipeline_config, batch_size=config.eval_batch_size,
      seed=config.seed))
  accumulator = metrics.EvalAccumulator()
  for batch in input_pipeline.eval_batches(
      test_images, pipeline_config, batch_size=config.eval_batch_size,
      seed=config.seed):
    shape = batch['detection_label'].shape
    outputs = {task: np.broadcast_to(value, shape + value.shape)
               for task, value in constants.items()}
    accumulator.update(outputs, batch)
  return accumulator.result()


def baseline_metrics(config, num_fit_images: int = 2000) -> dict[str, float]:
  """Test-split metrics of the best constants fitted on training images."""
  data = data_loading.load_data(config)
  fit = range(min(num_fit_images, len(data.train)))
  return constant_metrics([data.train[i] for i in fit], data.test,
                          data.pipeline_config, config)
