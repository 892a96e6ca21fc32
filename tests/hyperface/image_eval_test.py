"""Image-level detection AP and the metrics of matched faces, on toy cases
computed by hand."""

import math

import numpy as np
import pytest

from dplh_jax.hyperface import analyzer
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface import proposals


def _annotations(boxes, genders, poses=None):
  n = len(boxes)
  boxes = np.asarray(boxes, np.float32)
  landmarks = np.repeat(boxes[:, None, :2] + boxes[:, None, 2:] / 2, 21, 1)
  visibility = np.ones((n, 21), np.float32)
  visibility[:, :5] = 0
  pose = np.zeros((n, 3), np.float32) if poses is None else np.asarray(
      poses, np.float32)
  return proposals.Faces(boxes, landmarks, visibility, pose,
                         np.asarray(genders, np.int32))


def _face(box, score, *, landmark_shift=0.0, visibility=None, pose=(0, 0, 0),
          male=0.9):
  box = np.asarray(box, np.float32)
  landmarks = np.repeat((box[:2] + box[2:] / 2)[None], 21, 0) + landmark_shift
  scores = np.ones(21) if visibility is None else np.asarray(visibility)
  return analyzer.Face(box, score, landmarks, (scores > 0.5).astype(float),
                       scores, np.asarray(pose, float), male)


def test_matching_is_greedy_by_score_and_a_face_is_found_once():
  faces = np.array([[0, 0, 10, 10], [20, 0, 10, 10]], np.float32)
  boxes = np.array([[0, 0, 10, 10], [0.5, 0, 10, 10], [20, 3, 10, 10],
                    [40, 0, 10, 10]], np.float32)
  # IoUs with their face: 1, 0.905, 0.538, 0.
  matched = image_eval.match_detections(boxes, [0.5, 0.9, 0.3, 0.8], faces)
  np.testing.assert_array_equal(matched, [-1, 0, 1, -1])
  assert image_eval.match_detections(boxes, [0.5, 0.9, 0.3, 0.8], faces,
                                     iou_threshold=0.6).tolist() == [
                                         -1, 0, -1, -1]


def test_ap_and_face_metrics_match_the_hand_computed_values():
  # Image A: faces a0, a1. Image B: face b0 (unknown gender, no pose).
  image_a = _annotations([[0, 0, 10, 10], [50, 50, 20, 20]], [1, 0],
                         poses=[[0, 0, 0], [0.1, 0.2, -0.3]])
  image_b = _annotations([[0, 0, 16, 16]], [-1], poses=[[np.nan] * 3])
  detections_a = [
      _face([0, 0, 10, 10], 0.9, landmark_shift=1.0),   # a0, TP
      _face([30, 0, 10, 10], 0.8),                      # FP
      _face([51, 50, 20, 20], 0.6, pose=(0.1, 0.2, 0.0), male=0.2,
            visibility=[0.9] * 10 + [0.1] * 11),        # a1, TP
  ]
  detections_b = [
      _face([0, 0, 16, 16], 0.7, landmark_shift=2.0),   # b0, TP
      _face([1, 0, 16, 16], 0.4),                       # b0 again: FP
  ]
  accumulator = image_eval.ImageEvalAccumulator(score_threshold=0.5)
  accumulator.update(detections_a, image_a)
  accumulator.update(detections_b, image_b)
  result = accumulator.result()
  # Ranked: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 TP, 0.4 FP over 3 faces:
  # (1/1 + 2/3 + 3/4) / 3.
  assert result['image_detection_ap'] == pytest.approx(
      (1 + 2 / 3 + 3 / 4) / 3)
  # Score >= 0.5: 4 detections, 3 true; all 3 faces found.
  assert result['image_precision'] == pytest.approx(3 / 4)
  assert result['image_recall'] == pytest.approx(1.0)
  # NME over the 16 visible points of each matched face: a0 error sqrt(2)
  # / 10, a1 0 (its landmarks sit at the box centre; the box moved 1 px,
  # its centre with it: 1 / 20), b0 2 sqrt(2) / 16.
  assert result['image_landmark_nme'] == pytest.approx(
      (math.sqrt(2) / 10 + 1 / 20 + 2 * math.sqrt(2) / 16) / 3)
  # Visibility (points 0-4 are annotated invisible): a0 and b0 predict all
  # 21 visible (16 right), a1 points 0-9 (5 right: points 5-9).
  assert result['image_visibility_accuracy'] == pytest.approx(
      (16 + 5 + 16) / 63)
  # Pose of a0 and a1 only (b0 has none): yaw errors 0 and 0.3 rad.
  assert result['image_pose_mae_yaw_deg'] == pytest.approx(
      math.degrees(0.3) / 2)
  assert result['image_pose_mae_roll_deg'] == pytest.approx(0.0, abs=1e-5)
  # Gender of a0 (male, P 0.9: right) and a1 (female, P 0.2: right).
  assert result['image_gender_accuracy'] == 1.0
  assert (result['num_images'], result['num_faces']) == (2, 3)


def test_no_faces_and_no_detections_give_nan_not_zero():
  accumulator = image_eval.ImageEvalAccumulator()
  accumulator.update([], _annotations(np.zeros((0, 4)), []))
  result = accumulator.result()
  assert math.isnan(result['image_detection_ap'])
  assert math.isnan(result['image_landmark_nme'])
  missed = image_eval.ImageEvalAccumulator()
  missed.update([], _annotations([[0, 0, 10, 10]], [1]))
  assert missed.result()['image_detection_ap'] == 0.0
  assert missed.result()['image_recall'] == 0.0
