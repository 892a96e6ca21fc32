"""Eval metrics against hand-computed values, with padding and missing labels."""

import math

import numpy as np
import pytest

from dplh_jax.hyperface import metrics


def _batch():
  """Two images x two proposals; image 1 is padding (garbage must not count)."""
  landmarks = np.zeros((2, 2, 21, 2), np.float32)
  visibility = np.zeros((2, 2, 21), np.float32)
  visibility[0, 0, 0] = 1.0  # one visible landmark on the positive
  return {
      'detection_label': np.array([[1, 0], [1, 1]]),
      'landmarks': landmarks,
      'visibility': visibility,
      'pose': np.zeros((2, 2, 3), np.float32),
      'gender': np.array([[-1, -1], [1, 1]]),  # unknown gender on image 0
      'has_landmarks': np.array([True, True]),
      'has_pose': np.array([True, True]),
      'has_gender': np.array([True, True]),
      'boxes': np.tile(np.array([0, 0, 20, 20], np.float32), (2, 2, 1)),
      'face_boxes': np.tile(np.array([0, 0, 10, 10], np.float32), (2, 2, 1)),
      'is_padding_example': np.array([False, True]),
  }


def _outputs():
  landmarks = np.zeros((2, 2, 42))
  landmarks[0, 0, 0] = 0.1  # x error 0.1 crop widths = 2 px; face size 10
  landmarks[1] = 99.0  # padding: garbage
  visibility = np.zeros((2, 2, 21))
  visibility[0, 0, :] = 0.8  # right on the visible point, wrong on 20 others
  pose = np.zeros((2, 2, 3))
  pose[0, 0] = [0.1, 0.0, -0.2]
  return {
      # Image 0: the positive is scored face, the negative also face (wrong).
      'detection': np.array([[[0.0, 2.0], [0.0, 1.0]], [[5.0, 0.0]] * 2]),
      'landmarks': landmarks,
      'visibility': visibility,
      'pose': pose,
      'gender': np.zeros((2, 2, 2)),
  }


def test_masked_metrics_match_hand_computed_values():
  accumulator = metrics.EvalAccumulator()
  accumulator.update(_outputs(), _batch())
  result = accumulator.result()
  assert result['detection_accuracy'] == 0.5
  assert result['detection_ap'] == 1.0  # the positive outranks the negative
  assert result['landmark_nme'] == pytest.approx(0.2)  # 2 px / sqrt(10*10)
  assert result['landmark_mse'] == pytest.approx(0.1**2 / 2)
  assert result['visibility_accuracy'] == pytest.approx(1 / 21)
  assert result['visibility_mse'] == pytest.approx((0.2**2 + 20 * 0.8**2) / 21)
  assert result['pose_mae_roll_deg'] == pytest.approx(math.degrees(0.1))
  assert result['pose_mae_yaw_deg'] == pytest.approx(math.degrees(0.2))
  assert result['pose_mae_deg'] == pytest.approx(math.degrees(0.1))
  assert result['pose_mse'] == pytest.approx((0.01 + 0.04) / 3)
  # Only unknown genders among real positives: no term, reported as NaN.
  assert math.isnan(result['gender_accuracy'])


def test_a_dataset_without_pose_reports_nan_not_zero():
  batch = _batch()
  batch['has_pose'] = np.array([False, False])
  accumulator = metrics.EvalAccumulator()
  accumulator.update(_outputs(), batch)
  assert math.isnan(accumulator.result()['pose_mae_deg'])


def test_average_precision_of_a_ranking():
  scores = np.array([0.9, 0.8, 0.7, 0.6])
  labels = np.array([1, 0, 1, 0])
  # Precision at the two hits: 1/1 and 2/3.
  assert metrics.average_precision(scores, labels) == pytest.approx(
      (1 + 2 / 3) / 2)
  assert math.isnan(metrics.average_precision(scores, np.zeros(4)))
