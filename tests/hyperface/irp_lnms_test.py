"""HyperFace's whole-image inference on hand-built cases, without a network:
windows, the template box fit, IRP and landmark-based NMS."""

import numpy as np
import pytest

from dplh_jax.hyperface import candidates
from dplh_jax.hyperface import face_rect
from dplh_jax.hyperface import irp_lnms
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface.datasets import head_model
from dplh_jax.hyperface.datasets import synthetic_scene


def _posed_face(pose, center, scale, image_size=200):
  """Landmarks, visibility and box of the template head posed in an image."""
  posed = head_model.PosedHead(face_rect.TEMPLATE,
                               head_model.rotation_matrix(np.asarray(pose)),
                               np.asarray(center, float), scale)
  landmarks, visibility = head_model.project_landmarks(
      posed, (image_size, image_size))
  return landmarks, visibility, head_model.silhouette_box(posed)


def _detections(boxes, scores, landmarks, visibility, pose, gender):
  n = len(boxes)
  return irp_lnms.Detections(
      np.asarray(boxes, np.float32).reshape(n, 4), np.asarray(scores, float),
      np.asarray(landmarks, float).reshape(n, 21, 2),
      np.asarray(visibility, float).reshape(n, 21),
      np.asarray(pose, float).reshape(n, 3), np.asarray(gender, float))


def test_batched_rotations_are_head_models():
  poses = np.random.default_rng(0).uniform(-1, 1, (5, 3))
  np.testing.assert_allclose(
      face_rect.rotation_matrices(poses),
      np.stack([head_model.rotation_matrix(p) for p in poses]), atol=1e-12)


def test_the_fit_recovers_the_template_box_and_keeps_ill_posed_boxes():
  poses = [(0.0, 0.0, 0.0), (0.3, -0.4, 1.2), (-0.5, 0.2, -0.7)]
  faces = [_posed_face(p, (90 + 5 * i, 110 - 3 * i), 30 + 4 * i)
           for i, p in enumerate(poses)]
  landmarks = np.stack([f[0] for f in faces])
  visibility = np.stack([f[1] for f in faces])
  truth = np.stack([f[2] for f in faces])
  fallback = truth + np.float32([5, -5, 10, 10])
  fitted = face_rect.boxes_from_landmarks(landmarks, visibility, poses,
                                          fallback)
  np.testing.assert_allclose(fitted, truth, atol=1e-3)  # pixels
  # Two visible points: the fit is ill-posed, the given box stays.
  visibility[1, 2:] = 0
  fitted = face_rect.boxes_from_landmarks(landmarks, visibility, poses,
                                          fallback)
  np.testing.assert_array_equal(fitted[1], fallback[1])
  np.testing.assert_allclose(fitted[0], truth[0], atol=1e-3)


def test_every_face_of_synthetic_scenes_has_a_window_of_iou_above_one_half():
  # Scenes of another seed than the datasets', so no dataset image is used.
  config = synthetic_scene.SceneConfig(image_size=112)
  windows = candidates.sliding_windows((112, 112))
  best = []
  for index in range(40):
    _, faces = synthetic_scene.render_scene(7, 0, index, config)
    if len(faces['bbox']):
      best.extend(proposals.box_iou(faces['bbox'], windows).max(1))
  assert len(best) > 40 and min(best) > 0.6


def test_windows_span_the_configured_sizes_and_aspect():
  config = candidates.WindowConfig(min_size_fraction=0.25)
  windows = candidates.sliding_windows((80, 160), config)
  assert windows[:, 3].min() == pytest.approx(20.0)
  assert windows[:, 3].max() <= 80.0 + 1e-4
  np.testing.assert_allclose(windows[:, 2] / windows[:, 3],
                             face_rect.TEMPLATE_ASPECT, rtol=1e-5)
  with pytest.raises(ValueError, match='scale_step=1'):
    candidates.WindowConfig(scale_step=1)


def test_irp_re_boxes_an_off_centre_candidate_onto_the_face():
  landmarks, visibility, box = _posed_face((0.1, 0.0, 0.4), (100, 100), 35)
  calls = []

  def oracle(boxes):
    """A perfect network: the face's landmarks and pose, score = IoU."""
    calls.append(len(boxes))
    n = len(boxes)
    return _detections(boxes, proposals.box_iou(boxes, box[None])[:, 0],
                       np.repeat(landmarks[None], n, 0),
                       np.repeat(visibility[None], n, 0),
                       np.tile([0.1, 0.0, 0.4], (n, 1)), np.full(n, 0.9))

  start = box + np.float32([0.3 * box[2], 0.25 * box[3], 0, 0])
  far = np.float32([0, 0, 20, 20])  # a background window, score 0
  found = irp_lnms.iterative_region_proposals(
      oracle, np.stack([start, far]), rounds=2, threshold=0.3, max_boxes=8)
  assert calls == [2, 1, 1]  # the windows, then one box per round
  assert found.count == 3 and found.scores[0] < 0.6
  np.testing.assert_allclose(found.boxes[1], box, atol=1e-3)
  assert found.scores[1] == pytest.approx(1.0, abs=1e-5)


def test_two_detections_of_one_face_merge_by_the_median():
  landmarks, visibility, box = _posed_face((0, 0, 0), (100, 100), 35)
  shifts = np.array([0.0, 1.0, 4.0])  # pixels, per detection
  detections = _detections(
      np.stack([box + s for s in shifts]), [0.9, 0.8, 0.7],
      np.stack([landmarks + s for s in shifts]), np.stack([visibility] * 3),
      [[0, 0, 0], [0, 0, 0], [0, 0, 0.6]], [0.2, 0.7, 0.9])
  merged = irp_lnms.landmark_nms(detections, iou_threshold=0.5, top_k=5)
  assert merged.count == 1
  assert merged.scores[0] == pytest.approx(0.9)  # the kept detection's
  np.testing.assert_allclose(merged.landmarks[0], landmarks + 1.0, atol=1e-4)
  np.testing.assert_allclose(merged.pose[0], [0, 0, 0])  # 0.6: an outlier
  assert merged.gender_probability[0] == pytest.approx(0.7)
  np.testing.assert_allclose(merged.boxes[0], box + 1.0, atol=1e-5)
  # top_k=2: the median of the two best only.
  merged = irp_lnms.landmark_nms(detections, iou_threshold=0.5, top_k=2)
  np.testing.assert_allclose(merged.landmarks[0], landmarks + 0.5, atol=1e-4)


def test_two_faces_stay_two_highest_score_first():
  first = _posed_face((0, 0, 0), (60, 100), 25)
  second = _posed_face((0, 0, 0.5), (140, 100), 25)
  detections = _detections(
      [first[2], second[2], second[2] + 1], [0.6, 0.95, 0.9],
      [first[0], second[0], second[0] + 1], [first[1], second[1], second[1]],
      [[0, 0, 0], [0, 0, 0.5], [0, 0, 0.5]], [0.5, 0.5, 0.5])
  merged = irp_lnms.landmark_nms(detections)
  assert merged.count == 2
  np.testing.assert_allclose(merged.scores, [0.95, 0.6])
  np.testing.assert_allclose(merged.boxes[1], first[2], atol=1e-3)
  assert irp_lnms.landmark_nms(detections.take(np.zeros(0, int))).count == 0
