"""Task and input leakage of a trained HyperFace's per-task features.

MetaMorphosis (Arefeen et al., 2023) asks of a multi-task model whether the
features handed to one task's head also reveal the other tasks' labels (task
privacy) or the input (input privacy). Our measurement (docs/DESIGN.md,
Task privacy; the paper's exact protocol is not available to us):

* features of task A: what A's head reads, on held-out (test) images with
  the evaluation's fixed proposals: fc_full for every task of a shared
  model, task A's Cross-SEC-gated features for a cross_sec one. One sample
  per non-ignored proposal crop.
* task leakage (A, B): a probe fitted to predict B's label from A's
  features, scored out of fold by ``folds``-fold cross-validation grouped by
  image (an image's crops are never split across folds), against the
  constant baseline fitted on the same training folds: accuracy vs the
  majority class for detection and gender (logistic regression), R^2 vs the
  training-fold mean for landmarks and pose (ridge). ``advantage = score -
  baseline``: 0 means the features tell nothing a constant does not.
* input leakage of A: a ridge decoder from A's features to the crop
  downsampled to ``PIXEL_SIDE`` x ``PIXEL_SIDE`` x 3; its out-of-fold mean
  squared error against the mean-image baseline's, and ``r2 = 1 - mse /
  baseline_mse`` (0: no better than the mean image).

Probes are linear, on features centered and divided by one global scale
(per-feature standardization would blow up near-dead units), logistic
regression at a fixed L2 strength (``LOGISTIC_C``; an inner CV over it cost
10x the time for the same accuracies on the demo), ridge with its strength
chosen inside the training folds by leave-one-out (``RIDGE_ALPHAS``), so they bound what a linear
reader recovers, not every attacker. They read only released params and
test images, so they spend no privacy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from dplh_jax.hyperface import export
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import models
from dplh_jax.hyperface import workdir as workdir_lib

# The labels probed: the two classifications, then the two regressions.
CLASSIFICATION_LABELS = ('detection', 'gender')
REGRESSION_LABELS = ('landmarks', 'pose')
LABELS = CLASSIFICATION_LABELS + REGRESSION_LABELS
PIXEL_SIDE = 8  # side of the downsampled crop the input probe reconstructs
LOGISTIC_C = 0.1  # inverse L2 strength of the classification probes
RIDGE_ALPHAS = tuple(10.0**k for k in range(-3, 5))  # L2 strengths tried
SKLEARN_MISSING = ("the leakage probes need scikit-learn: pip install "
                   "scikit-learn (or pip install -e '.[test]').")


def _sklearn():
  """The scikit-learn pieces used, or a one-line ValueError."""
  try:
    # pylint: disable=import-outside-toplevel
    from sklearn import linear_model, model_selection
  except ImportError as error:
    raise ValueError(SKLEARN_MISSING) from error
  return linear_model, model_selection


@dataclasses.dataclass(frozen=True)
class HeldOutFeatures:
  """Per-crop features, labels and pixels of held-out images.

  Attributes:
    features: task name -> ``(N, width)`` features its head reads.
    labels: label name -> ``(N,)`` int (classification) or ``(N, d)``.
    label_mask: label name -> ``(N,)`` bool, the crops that carry it.
    groups: ``(N,)`` image index of each crop (the CV grouping).
    pixels: ``(N, PIXEL_SIDE**2 * 3)`` downsampled crops.
  """
  features: dict[str, np.ndarray]
  labels: dict[str, np.ndarray]
  label_mask: dict[str, np.ndarray]
  groups: np.ndarray
  pixels: np.ndarray


@functools.lru_cache(maxsize=4)
def _feature_fn(model: models.HyperFace):
  """Jitted ``(params, crops (B, K, S, S, 3)) -> {task: (B, K, width)}``."""

  def features(params, crops):
    flat = crops.reshape((-1,) + crops.shape[2:])
    _, state = model.apply(params, flat, deterministic=True,
                           mutable=['intermediates'])
    (per_task,) = state['intermediates'][models.TASK_FEATURES]
    return {task: value.reshape(crops.shape[:2] + value.shape[1:])
            for task, value in per_task.items()}

  return jax.jit(features)


def downsample(crops: np.ndarray, side: int = PIXEL_SIDE) -> np.ndarray:
  """``(..., S, S, 3)`` -> ``(..., side * side * 3)`` by block means (the
  last ``S % side`` rows and columns are dropped)."""
  size = crops.shape[-2]
  block = size // side
  cut = crops[..., :block * side, :block * side, :]
  blocks = cut.reshape(cut.shape[:-3] + (side, block, side, block, 3))
  means = blocks.mean(axis=(-4, -2))
  return means.reshape(means.shape[:-3] + (-1,))


def batch_labels(batch: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``(labels, masks)`` per crop of a batch, flattened over (B, K)."""
  label = batch['detection_label']
  shape = label.shape
  positive = label == 1

  def per_crop(key):
    return np.broadcast_to(np.asarray(batch[key], bool)[:, None], shape)

  masks = {
      'detection': label >= 0,
      'gender': positive & per_crop('has_gender') & (batch['gender'] >= 0),
      'landmarks': positive & per_crop('has_landmarks'),
      'pose': positive & per_crop('has_pose'),
  }
  labels = {
      'detection': np.maximum(label, 0),
      'gender': np.maximum(batch['gender'], 0),
      'landmarks': batch['landmarks'].reshape(shape + (-1,)),
      'pose': batch['pose'],
  }
  flat = {name: value.reshape((-1,) + value.shape[2:])
          for name, value in labels.items()}
  return flat, {name: mask.reshape(-1) for name, mask in masks.items()}


def extract_features(model: models.HyperFace, params, source,
                     pipeline_config: input_pipeline.PipelineConfig, *,
                     num_images: int, batch_size: int = 64,
                     seed: int = 0) -> HeldOutFeatures:
  """Features of the first ``num_images`` records of ``source`` (-1: all),
  with the evaluation's deterministic proposals; ignored crops dropped."""
  count = len(source) if num_images < 0 else min(num_images, len(source))
  records = [source[i] for i in range(count)]
  compute = _feature_fn(model)
  parts = []
  for batch in input_pipeline.eval_batches(records, pipeline_config,
                                           batch_size=batch_size, seed=seed):
    real = ~batch['is_padding_example']
    features = jax.device_get(compute(params, batch['crops']))
    batch = {k: v[real] for k, v in batch.items()}
    labels, masks = batch_labels(batch)
    keep = masks['detection']
    parts.append((
        {t: f[real].reshape(-1, f.shape[-1])[keep] for t, f in
         features.items()},
        {n: v[keep] for n, v in labels.items()},
        {n: m[keep] for n, m in masks.items()},
        np.repeat(batch['image_index'], batch['crops'].shape[1])[keep],
        downsample(batch['crops']).reshape(-1, 3 * PIXEL_SIDE**2)[keep]))

  def join(i, key):
    return np.concatenate([part[i][key] for part in parts])
  return HeldOutFeatures(
      {t: join(0, t) for t in parts[0][0]},
      {n: join(1, n) for n in LABELS}, {n: join(2, n) for n in LABELS},
      np.concatenate([part[3] for part in parts]),
      np.concatenate([part[4] for part in parts]))


def _pooled_r2(y: np.ndarray, predicted: np.ndarray) -> float:
  """``1 - SSE / SST`` pooled over every output (variance weighted)."""
  y = y.reshape(len(y), -1)
  total = np.sum((y - y.mean(axis=0)) ** 2)
  return float(1.0 - np.sum((y - predicted.reshape(y.shape)) ** 2)
               / max(total, 1e-30))


def probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, kind: str, *,
          folds: int = 5) -> dict[str, float]:
  """Out-of-fold score of a linear probe and of the constant baseline.

  Args:
    x: ``(N, F)`` features.
    y: ``(N,)`` int labels (``kind='classification'``) or ``(N, d)``
      targets (``'regression'``).
    groups: ``(N,)`` group of each row; a group stays in one fold.
    kind: ``'classification'`` (accuracy, logistic regression vs the
      majority class) or ``'regression'`` (pooled R^2, ridge vs the mean).
    folds: number of folds (at most the number of groups).

  Returns:
    ``{'score', 'baseline', 'advantage', 'num_samples'}``.
  """
  linear_model, model_selection = _sklearn()
  classify = kind == 'classification'
  splitter = model_selection.GroupKFold(
      n_splits=min(folds, len(np.unique(groups))))
  predicted = np.zeros(y.shape, np.float64)
  constant = np.zeros(y.shape, np.float64)
  for train, test in splitter.split(x, y, groups):
    y_train = y[train]
    center = x[train].mean(axis=0)
    scale = np.sqrt(np.mean((x[train] - center) ** 2)) + 1e-12
    x_train, x_test = (x[train] - center) / scale, (x[test] - center) / scale
    if classify:
      values, counts = np.unique(y_train, return_counts=True)
      constant[test] = values[np.argmax(counts)]
      if len(values) == 1:  # one class in the training folds
        predicted[test] = values[0]
        continue
      estimator = linear_model.LogisticRegression(C=LOGISTIC_C,
                                                  max_iter=1000)
    else:
      constant[test] = y_train.mean(axis=0)
      estimator = linear_model.RidgeCV(alphas=RIDGE_ALPHAS)
    fitted = estimator.fit(x_train, y_train)
    predicted[test] = fitted.predict(x_test).reshape(predicted[test].shape)
  if classify:
    score = float(np.mean(predicted == y))
    baseline = float(np.mean(constant == y))
  else:
    score, baseline = _pooled_r2(y, predicted), _pooled_r2(y, constant)
  return {'score': score, 'baseline': baseline,
          'advantage': score - baseline, 'num_samples': int(len(y))}


def reconstruction(x: np.ndarray, pixels: np.ndarray, groups: np.ndarray, *,
                   folds: int = 5) -> dict[str, float]:
  """Input probe: out-of-fold MSE of a ridge decoder from ``x`` to
  ``pixels`` vs the training folds' mean image; ``r2 = 1 - mse /
  baseline_mse``."""
  result = probe(x, pixels, groups, 'regression', folds=folds)
  total = np.mean((pixels - pixels.mean(axis=0)) ** 2)
  return {'mse': float((1 - result['score']) * total),
          'baseline_mse': float((1 - result['baseline']) * total),
          'r2': result['score'], 'baseline_r2': result['baseline'],
          'num_samples': result['num_samples']}


def leakage(held_out: HeldOutFeatures, *, folds: int = 5) -> dict[str, Any]:
  """The task-leakage matrix and the input probe of every task's features.

  Returns:
    ``{'task_leakage': {feature task: {label: probe result}},
    'input_leakage': {feature task: reconstruction result}}``; tasks with
    identical features (all of a shared model's) share one computation.
  """
  done: list[tuple[np.ndarray, dict, dict]] = []
  task_rows, input_rows = {}, {}
  for task, x in held_out.features.items():
    same = next((d for d in done if np.array_equal(d[0], x)), None)
    if same is None:
      row = {}
      for name in LABELS:
        mask = held_out.label_mask[name]
        row[name] = probe(
            x[mask], held_out.labels[name][mask], held_out.groups[mask],
            'classification' if name in CLASSIFICATION_LABELS
            else 'regression', folds=folds)
      same = (x, row, reconstruction(x, held_out.pixels, held_out.groups,
                                     folds=folds))
      done.append(same)
    task_rows[task], input_rows[task] = same[1], same[2]
  return {'task_leakage': task_rows, 'input_leakage': input_rows}


def measure(model_path: str, *, num_images: int = 1000, folds: int = 5,
            batch_size: int = 64, data_dir: str | None = None
            ) -> dict[str, Any]:
  """:func:`leakage` of a dplh-train workdir or a dplh-export file on the
  first ``num_images`` test images of its dataset, read from ``data_dir`` if
  given, else from the workdir's config.json ``data_dir`` (the released
  config leaves the local path out), else TFDS's default folder (as
  ``image_eval.open_run_test_split``)."""
  _sklearn()  # fail before any work
  if model_path.endswith('.npz'):
    released = export.read_params_file(model_path)
  else:
    released = export.params_from_workdir(model_path)
  config = released.config
  if data_dir is None:
    saved = (workdir_lib.read_config(model_path)
             if os.path.isdir(model_path) else None)
    data_dir = (saved or {}).get('data_dir', '')
  model, _ = model_setup.build_model(ml_collections.ConfigDict(config))
  pipeline_config = input_pipeline.PipelineConfig(
      crop_size=config['input_size'], num_proposals=config['num_proposals'],
      num_positives=config['num_positives'])
  held_out = extract_features(
      model, released.params, image_eval.open_test_split(config, data_dir),
      pipeline_config, num_images=num_images, batch_size=batch_size,
      seed=config.get('seed', 0))
  privacy = released.privacy or {}
  return {
      'model': model_path, 'step': released.step,
      'task_features': config.get('task_features', models.SHARED),
      'decorrelation_weight': config.get('decorrelation_weight', 0.0),
      'dp': config.get('dp'), 'epsilon': privacy.get('epsilon'),
      'num_images': int(len(np.unique(held_out.groups))),
      'num_crops': int(len(held_out.groups)), 'folds': folds,
      **leakage(held_out, folds=folds)}


def table(result: dict[str, Any]) -> str:
  """Markdown: the advantage over the constant baseline per (features of
  task, label), and the input probe's R^2."""
  labels = ' | '.join(f'{n} ({"acc" if n in CLASSIFICATION_LABELS else "R^2"})'
                      for n in LABELS)
  lines = [f'| features of | {labels} | input R^2 |',
           '|---|' + '---|' * (len(LABELS) + 1)]
  for task, row in result['task_leakage'].items():
    cells = [f"{row[n]['score']:.3f} (+{row[n]['advantage']:.3f})"
             .replace('+-', '-') for n in LABELS]
    cells.append(f"{result['input_leakage'][task]['r2']:.3f}")
    lines.append(f'| {task} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
