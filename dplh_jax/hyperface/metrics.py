"""Held-out metrics per task (docs/DESIGN.md, Metric conventions), with masks for missing labels.

Eval batches (see ``input_pipeline``) are scored by the model; this module
turns each batch's outputs and targets into masked sums on the host and
finalizes them into the reported numbers. A task whose labels are absent
(no positives, unknown gender, a dataset without pose) simply has count 0 and
is reported as NaN rather than as a misleading 0.

Conventions:

* detection: accuracy of argmax over non-ignored proposals, and average
  precision of the face score over the same proposals (proposal-level AP;
  HyperFace's image-level AP after NMS needs a full detector pipeline);
* landmarks (positives, visible points): NME, the point-to-point error in
  pixels divided by sqrt(w*h) of the matched face box (AFLW), and MSE per
  coordinate in crop-normalized units (DPLH);
* visibility (positives): accuracy of ``prediction > 0.5`` and MSE;
* pose (positives with a pose label): mean absolute error in degrees for
  roll, pitch and yaw, and MSE in radians^2 (DPLH);
* gender (positives with a known gender): accuracy.
"""

from __future__ import annotations

import collections
from typing import Mapping

import numpy as np

POSE_NAMES = ('roll', 'pitch', 'yaw')


def _per_proposal(flag: np.ndarray, num_proposals: int) -> np.ndarray:
  """Broadcasts a per-image (B,) flag to (B, K)."""
  return np.broadcast_to(np.asarray(flag, bool)[:, None],
                         (flag.shape[0], num_proposals))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the precision-recall curve (step-wise, as in VOC / sklearn).

  >>> average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1]))
  0.8333...
  """
  scores, labels = np.asarray(scores), np.asarray(labels, bool)
  if not labels.any():
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  hits = labels[order]
  true_positives = np.cumsum(hits)
  precision = true_positives / np.arange(1, len(hits) + 1)
  return float(np.sum(precision[hits]) / hits.sum())


class EvalAccumulator:
  """Accumulates masked sums over eval batches; :meth:`result` finalizes."""

  def __init__(self):
    self._sums = collections.defaultdict(float)
    self._counts = collections.defaultdict(float)
    self._scores: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []

  def _add(self, name: str, values: np.ndarray, mask: np.ndarray) -> None:
    mask = np.broadcast_to(mask, values.shape)
    self._sums[name] += float(np.sum(values[mask]))
    self._counts[name] += float(np.sum(mask))

  def update(self, outputs: Mapping[str, np.ndarray],
             batch: Mapping[str, np.ndarray]) -> None:
    """Adds one batch.

    Args:
      outputs: model outputs for the batch, each with leading (B, K) axes:
        ``detection`` and ``gender`` logits, ``landmarks`` (B, K, 42),
        ``visibility`` (B, K, 21), ``pose`` (B, K, 3).
      batch: the eval batch (``input_pipeline`` keys).
    """
    outputs = {k: np.asarray(v, np.float64) for k, v in outputs.items()}
    label = batch['detection_label']
    num_proposals = label.shape[1]
    real = _per_proposal(~batch['is_padding_example'], num_proposals)
    scored = real & (label >= 0)
    positive = real & (label == 1)

    detection = outputs['detection']
    self._add('detection_accuracy',
              (np.argmax(detection, -1) == label).astype(float), scored)
    face_score = detection[..., 1] - detection[..., 0]  # monotone in P(face)
    self._scores.append(face_score[scored])
    self._labels.append(label[scored] == 1)

    has_landmarks = positive & _per_proposal(batch['has_landmarks'],
                                             num_proposals)
    visible = has_landmarks[..., None] & (batch['visibility'] > 0.5)
    predicted = outputs['landmarks'].reshape(batch['landmarks'].shape)
    error = predicted - batch['landmarks']  # crop-normalized
    crop_wh = batch['boxes'][..., None, 2:4]
    face_wh = batch['face_boxes'][..., 2:4]
    face_size = np.sqrt(np.prod(np.maximum(face_wh, 1e-6), -1))[..., None]
    pixel_error = np.linalg.norm(error * crop_wh, axis=-1)
    self._add('landmark_nme', pixel_error / face_size, visible)
    self._add('landmark_mse', np.mean(error**2, -1), visible)

    visibility_error = outputs['visibility'] - batch['visibility']
    self._add('visibility_accuracy',
              ((outputs['visibility'] > 0.5) == (batch['visibility'] > 0.5)
              ).astype(float), has_landmarks[..., None])
    self._add('visibility_mse', visibility_error**2, has_landmarks[..., None])

    has_pose = positive & _per_proposal(batch['has_pose'], num_proposals)
    pose_error = outputs['pose'] - batch['pose']
    for i, name in enumerate(POSE_NAMES):
      self._add(f'pose_mae_{name}_deg', np.degrees(np.abs(pose_error[..., i])),
                has_pose)
    self._add('pose_mse', np.mean(pose_error**2, -1), has_pose)

    has_gender = positive & _per_proposal(batch['has_gender'], num_proposals) & (
        batch['gender'] >= 0)
    self._add('gender_accuracy',
              (np.argmax(outputs['gender'], -1) == batch['gender']
              ).astype(float), has_gender)

  def result(self) -> dict[str, float]:
    """The metrics; NaN for a metric with no labelled term."""
    result = {name: (self._sums[name] / self._counts[name]
                     if self._counts[name] else float('nan'))
              for name in self._counts}
    scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
    labels = np.concatenate(self._labels) if self._labels else np.zeros(0)
    result['detection_ap'] = average_precision(scores, labels)
    maes = [result.get(f'pose_mae_{n}_deg', float('nan')) for n in POSE_NAMES]
    result['pose_mae_deg'] = float(np.mean(maes))
    return dict(sorted(result.items()))
