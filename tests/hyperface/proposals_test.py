"""Tests of proposals: IoU, labels, Eq. 9, visibility, flips, crops."""

import numpy as np
import pytest

from dplh_jax.hyperface import proposals
from dplh_jax.hyperface.datasets import face_schema

_NAMES = face_schema.LANDMARK_NAMES


def _faces(boxes, pose=None, gender=None, seed=0):
  """Faces with landmarks spread over each box, all visible."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  rng = np.random.default_rng(seed)
  relative = rng.uniform(0.1, 0.9, (len(boxes), 21, 2)).astype(np.float32)
  landmarks = boxes[:, None, :2] + relative * boxes[:, None, 2:]
  n = len(boxes)
  return proposals.Faces(
      boxes, landmarks, np.ones((n, 21), np.float32),
      np.asarray(pose if pose is not None else np.zeros((n, 3)), np.float32),
      np.asarray(gender if gender is not None else np.ones(n), np.int32))


def test_box_iou_known_values():
  a = np.array([[0, 0, 10, 10]], np.float32)
  b = np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5],
                [2, 2, 5, 5], [10, 0, 10, 10]], np.float32)
  np.testing.assert_allclose(proposals.box_iou(a, b)[0],
                             [1.0, 50 / 150, 0.0, 25 / 100, 0.0])
  assert proposals.box_iou(b, a).shape == (5, 1)


@pytest.mark.parametrize('height, label', [
    (6.0, 1),     # IoU 0.6 > 0.5: positive
    (5.0, -1),    # IoU 0.5 is not > 0.5: ignored
    (4.0, -1),    # IoU 0.4: ignored
    (3.5, -1),    # IoU 0.35 is not < 0.35: ignored
    (3.0, 0),     # IoU 0.3 < 0.35: negative
])
def test_labelling_thresholds(height, label):
  faces = _faces([[0, 0, 10, 10]])
  box = np.array([[0, 0, 10, height]], np.float32)
  targets = proposals.label_proposals(box, faces)
  np.testing.assert_allclose(targets.iou, [height / 10], rtol=1e-6)
  assert targets.detection_label.tolist() == [label]


def test_eq9_crop_coordinates():
  landmarks = np.zeros((21, 2), np.float32)
  landmarks[0] = (15.0, 30.0)   # inside crop (10, 20, 20, 40)
  landmarks[1] = (10.0, 20.0)   # top-left corner of the crop
  landmarks[2] = (35.0, 30.0)   # right of the crop
  landmarks[3] = (15.0, 30.0)   # inside but annotated invisible
  visibility = np.ones(21, np.float32)
  visibility[3] = 0
  points, vis = proposals.landmarks_in_crop(landmarks, visibility,
                                            np.array([10, 20, 20, 40.]))
  np.testing.assert_allclose(points[0], [(15 - 10) / 20, (30 - 20) / 40])
  np.testing.assert_allclose(points[1], [0.0, 0.0])
  assert vis[:4].tolist() == [1, 1, 0, 0]
  np.testing.assert_array_equal(points[2:4], 0.0)  # invisible -> 0


def test_targets_of_positives_negatives_and_two_faces():
  faces = _faces([[0, 0, 20, 20], [50, 50, 20, 20]],
                 pose=[[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]], gender=[0, 1])
  boxes = np.array([[1, 1, 20, 20],      # positive, face 0
                    [52, 48, 20, 20],    # positive, face 1
                    [50, 50, 10, 10],    # IoU 0.25 with face 1: negative
                    [25, 25, 15, 15]],   # overlaps nothing: negative
                   np.float32)
  targets = proposals.label_proposals(boxes, faces)
  assert targets.detection_label.tolist() == [1, 1, 0, 0]
  assert targets.matched_face[:2].tolist() == [0, 1]
  np.testing.assert_allclose(targets.pose[:2], faces.pose)
  assert targets.gender.tolist() == [0, 1, -1, -1]
  # Negatives: all landmarks invisible and zero, no pose.
  np.testing.assert_array_equal(targets.visibility[2:], 0)
  np.testing.assert_array_equal(targets.landmarks[2:], 0)
  np.testing.assert_array_equal(targets.pose[2:], 0)
  # Positive 0: Eq. 9 relative to its own box; landmarks left of x=1 drop.
  expected, expected_vis = proposals.landmarks_in_crop(
      faces.landmarks[0], faces.visibility[0], boxes[0])
  np.testing.assert_allclose(targets.landmarks[0], expected)
  np.testing.assert_array_equal(targets.visibility[0], expected_vis)


def test_positive_crop_hides_points_outside_it():
  faces = _faces([[0, 0, 20, 20]])
  box = np.array([[0, 0, 20, 13]], np.float32)   # IoU 0.65, cuts the face
  targets = proposals.label_proposals(box, faces)
  assert targets.detection_label[0] == 1
  below = faces.landmarks[0, :, 1] > 13
  assert below.any() and (~below).any()
  np.testing.assert_array_equal(targets.visibility[0], ~below)


def test_unknown_pose_becomes_zero_not_nan():
  faces = _faces([[0, 0, 20, 20]], pose=[[np.nan] * 3])
  targets = proposals.label_proposals(np.array([[0, 0, 20, 20.]]), faces)
  np.testing.assert_array_equal(targets.pose, 0)


def test_flip_twice_is_identity_and_swaps_left_right():
  faces = _faces([[10, 5, 30, 40], [60, 20, 20, 20]],
                 pose=[[0.1, 0.2, 0.3], [-0.4, 0.5, 0.6]], gender=[0, 1])
  faces = faces._replace(visibility=np.random.default_rng(1).integers(
      0, 2, (2, 21)).astype(np.float32))
  width = 100
  flipped = proposals.flip_faces(faces, width)
  twice = proposals.flip_faces(flipped, width)
  for original, back in zip(faces, twice):
    np.testing.assert_allclose(back, original, rtol=1e-6)
  left_eye, right_eye = _NAMES.index('LeftEyeCenter'), _NAMES.index(
      'RightEyeCenter')
  np.testing.assert_allclose(flipped.landmarks[:, right_eye, 0],
                             width - faces.landmarks[:, left_eye, 0])
  np.testing.assert_array_equal(flipped.visibility[:, right_eye],
                                faces.visibility[:, left_eye])
  nose = _NAMES.index('NoseCenter')   # on the axis: maps to itself
  np.testing.assert_allclose(flipped.landmarks[:, nose, 0],
                             width - faces.landmarks[:, nose, 0])
  np.testing.assert_allclose(flipped.pose, faces.pose * [-1, 1, -1])
  np.testing.assert_allclose(flipped.boxes[:, 0], [60, 20])
  # Every flip pair is a mirror pair of names (every Left and Right
  # swapped), and every point whose name has a side is in one.
  def mirrored(name):
    return name.replace('Left', '#').replace('Right', 'Left').replace(
        '#', 'Right')
  for a, b in face_schema.FLIP_PAIRS:
    assert mirrored(_NAMES[a]) == _NAMES[b], (a, b)
  sided = {i for i, n in enumerate(_NAMES) if mirrored(n) != n}
  assert sided == {i for pair in face_schema.FLIP_PAIRS for i in pair}


def test_crop_of_whole_image_is_the_image_and_outside_is_black():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
  crops = proposals.crop_and_resize(
      image, np.array([[0, 0, 16, 12], [100, 100, 5, 5]], np.float32), (12, 16))
  assert crops.shape == (2, 12, 16, 3) and crops.dtype == np.float32
  np.testing.assert_allclose(crops[0], image / 255.0, atol=1e-6)
  np.testing.assert_array_equal(crops[1], 0.0)


def test_crop_of_flipped_image_is_the_mirrored_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  faces = _faces([[7.3, 4.1, 21.5, 17.2]])
  flipped = proposals.flip_faces(faces, 50)
  crop = proposals.crop_and_resize(image, faces.boxes, (16, 16))
  flipped_crop = proposals.crop_and_resize(proposals.flip_image(image),
                                           flipped.boxes, (16, 16))
  np.testing.assert_allclose(flipped_crop, crop[:, :, ::-1], atol=1e-5)


def test_select_proposals_always_returns_k_with_honest_labels():
  rng = np.random.default_rng(0)
  faces = _faces([[10, 10, 30, 30]])
  candidates = proposals.candidate_boxes(faces, (64, 64), rng,
                                         jitter_per_face=16, num_random=16)
  targets = proposals.label_proposals(candidates, faces)
  chosen = proposals.select_proposals(targets, 8, 4, rng, (64, 64))
  assert len(chosen.boxes) == 8
  assert (chosen.detection_label == 1).sum() == 4
  assert (chosen.detection_label == 0).sum() == 4
  relabelled = proposals.label_proposals(chosen.boxes, faces)
  np.testing.assert_array_equal(relabelled.detection_label,
                                chosen.detection_label)
  # Too few candidates: the rest are whole-image boxes marked ignored.
  short = proposals.select_proposals(proposals.take(targets, [0, 1]), 5, 4,
                                     rng, (64, 64))
  assert len(short.boxes) == 5
  np.testing.assert_array_equal(short.detection_label[2:], -1)
  np.testing.assert_array_equal(short.visibility[2:], 0)
  np.testing.assert_array_equal(short.boxes[2:], [[0, 0, 64, 64]] * 3)


def test_positives_cover_every_face():
  rng = np.random.default_rng(0)
  faces = _faces([[0, 0, 20, 20], [40, 40, 20, 20], [0, 40, 20, 20]])
  candidates = proposals.candidate_boxes(faces, (64, 64), rng,
                                         jitter_per_face=16, num_random=16)
  chosen = proposals.select_proposals(
      proposals.label_proposals(candidates, faces), 8, 3, rng, (64, 64))
  positive = chosen.detection_label == 1
  assert sorted(chosen.matched_face[positive].tolist()) == [0, 1, 2]


def test_image_without_faces_gives_negatives_only():
  rng = np.random.default_rng(0)
  faces = proposals.empty_faces()
  candidates = proposals.candidate_boxes(faces, (64, 64), rng,
                                         jitter_per_face=16, num_random=16)
  chosen = proposals.select_proposals(
      proposals.label_proposals(candidates, faces), 8, 4, rng, (64, 64))
  np.testing.assert_array_equal(chosen.detection_label, 0)
  np.testing.assert_array_equal(chosen.gender, -1)
