"""Candidate regions of an image, their HyperFace/DPLH targets, and crops.

Pure NumPy. Boxes are pixel [x, y, w, h] (top-left corner and size) in
continuous image coordinates: the image covers [0, W] x [0, H] and pixel
(row i, column j) has its centre at (j + 0.5, i + 0.5) -- the convention of
dplh_jax.hyperface.datasets.face_schema.

Proposal method (instead of DPLH's Selective Search, which needs OpenCV and
is slow): boxes jittered around every annotated face (shift, scale and aspect
noise; half tight, which are nearly all positives, half wide, which give hard
negatives cutting through a face) plus boxes of random size and position.
Labels (DPLH; docs/DESIGN.md, Data formats): IoU with the best-matching face
> 0.5 positive (1), < 0.35 negative (0), in between ignored (-1). Positives
carry the matched face's landmarks in crop coordinates (DPLH Eq. 9), its
visibility (points outside the crop made invisible), pose and gender; other
proposals carry no landmark/visibility/pose (zeros) and gender -1.
Coordinates of invisible landmarks are set to 0, so no loss can ever see a
stale value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dplh_jax.hyperface.datasets import face_schema

POSITIVE_IOU = 0.5
NEGATIVE_IOU = 0.35
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


class Faces(NamedTuple):
  """The annotated faces of one image (F faces), pixel coordinates."""
  boxes: np.ndarray        # (F, 4) float32 [x, y, w, h]
  landmarks: np.ndarray    # (F, 21, 2) float32 (x, y)
  visibility: np.ndarray   # (F, 21) float32 {0, 1}
  pose: np.ndarray         # (F, 3) float32 roll, pitch, yaw; NaN = unknown
  gender: np.ndarray       # (F,) int32 0 female, 1 male, -1 unknown


class ProposalTargets(NamedTuple):
  """Proposals of one image and their targets (P proposals)."""
  boxes: np.ndarray            # (P, 4) float32 pixel [x, y, w, h]
  detection_label: np.ndarray  # (P,) int32 1 / 0 / -1 ignored
  matched_face: np.ndarray     # (P,) int32 best-IoU face, -1 if none
  iou: np.ndarray              # (P,) float32 IoU with that face
  landmarks: np.ndarray        # (P, 21, 2) float32 crop-normalised (Eq. 9)
  visibility: np.ndarray       # (P, 21) float32
  pose: np.ndarray             # (P, 3) float32
  gender: np.ndarray           # (P,) int32


def box_intersection(boxes_a: np.ndarray, boxes_b: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(intersection (N, M), area of a (N, 1), area of b (1, M))`` of every
  pair of (x, y, w, h) boxes, in float64."""
  a = np.asarray(boxes_a, np.float64)[:, None, :]
  b = np.asarray(boxes_b, np.float64)[None, :, :]
  overlap_w = np.clip(np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
                      - np.maximum(a[..., 0], b[..., 0]), 0, None)
  overlap_h = np.clip(np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
                      - np.maximum(a[..., 1], b[..., 1]), 0, None)
  return overlap_w * overlap_h, a[..., 2] * a[..., 3], b[..., 2] * b[..., 3]


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """Intersection over union of every pair; (N, 4), (M, 4) -> (N, M).

  >>> box_iou(np.array([[0., 0., 2., 2.]]), np.array([[1., 0., 2., 2.]]))
  array([[0.33333333]])
  """
  intersection, area_a, area_b = box_intersection(boxes_a, boxes_b)
  union = area_a + area_b - intersection
  return np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)


def jitter_boxes(face_boxes: np.ndarray, num_per_face: int,
                 rng: np.random.Generator, *, max_shift: float = 0.2,
                 max_log_scale: float = 0.25, max_log_aspect: float = 0.15
                 ) -> np.ndarray:
  """Boxes around each face: centre shifted by up to max_shift * size,
  size scaled by exp(+-max_log_scale), aspect by exp(+-max_log_aspect)."""
  boxes = np.repeat(np.asarray(face_boxes, np.float64).reshape(-1, 4),
                    num_per_face, axis=0)
  n = len(boxes)
  center = boxes[:, :2] + boxes[:, 2:] / 2
  center += rng.uniform(-max_shift, max_shift, (n, 2)) * boxes[:, 2:]
  log_aspect = rng.uniform(-max_log_aspect, max_log_aspect, (n, 1))
  size = boxes[:, 2:] * np.exp(rng.uniform(-max_log_scale, max_log_scale,
                                           (n, 1)))
  size *= np.exp(np.concatenate([log_aspect, -log_aspect], axis=1))
  return np.concatenate([center - size / 2, size], axis=1).astype(np.float32)


def random_boxes(image_hw: tuple[int, int], num: int,
                 rng: np.random.Generator, *, min_fraction: float = 0.15,
                 max_fraction: float = 0.9) -> np.ndarray:
  """Boxes of side min_fraction..max_fraction of the shorter image side,
  aspect within exp(+-0.2), placed mostly inside the image."""
  height, width = image_hw
  side = rng.uniform(min_fraction, max_fraction, (num, 1)) * min(height,
                                                                 width)
  log_aspect = rng.uniform(-0.2, 0.2, (num, 1))
  size = side * np.exp(np.concatenate([log_aspect, -log_aspect], axis=1))
  low = -0.1 * size
  high = np.array([width, height]) - 0.9 * size
  top_left = low + rng.uniform(0, 1, (num, 2)) * np.maximum(high - low, 0)
  return np.concatenate([top_left, size], axis=1).astype(np.float32)


def candidate_boxes(faces: Faces, image_hw: tuple[int, int],
                    rng: np.random.Generator, *, jitter_per_face: int,
                    num_random: int) -> np.ndarray:
  """The default proposal method, ``jitter_per_face`` boxes per face (half
  tight: ~97% positives; half wide: mostly hard negatives and ignored) plus
  ``num_random`` random boxes."""
  parts = [random_boxes(image_hw, num_random, rng)]
  if len(faces.boxes):
    tight = jitter_per_face // 2
    parts.insert(0, jitter_boxes(faces.boxes, tight, rng, max_shift=0.2,
                                 max_log_scale=0.25))
    parts.insert(1, jitter_boxes(faces.boxes, jitter_per_face - tight, rng,
                                 max_shift=0.6, max_log_scale=0.6))
  return np.concatenate(parts, axis=0)


def landmarks_in_crop(landmarks: np.ndarray, visibility: np.ndarray,
                      boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """DPLH Eq. 9: a = (x - c) / w, b = (y - d) / h for crop (c, d, w, h).

  Args:
    landmarks: (..., 21, 2) pixel (x, y).
    visibility: (..., 21).
    boxes: (..., 4) pixel [c, d, w, h].

  Returns:
    Crop-normalised landmarks (in [0, 1] inside the crop) and visibility
    with points outside the crop made invisible; invisible points are 0.

  >>> points, vis = landmarks_in_crop(np.full((21, 2), 15.), np.ones(21),
  ...                                 np.array([10., 10., 20., 10.]))
  >>> points[0], vis[0]
  (array([0.25, 0.5 ], dtype=float32), np.float32(1.0))
  """
  boxes = np.asarray(boxes, np.float32)
  origin = boxes[..., None, :2]
  size = boxes[..., None, 2:]
  crop_points = (np.asarray(landmarks, np.float32) - origin) / size
  inside = np.all((crop_points >= 0.0) & (crop_points <= 1.0), axis=-1)
  crop_visibility = (np.asarray(visibility) > 0.5) & inside
  crop_points = np.where(crop_visibility[..., None], crop_points, 0.0)
  return crop_points.astype(np.float32), crop_visibility.astype(np.float32)


def label_proposals(boxes: np.ndarray, faces: Faces, *,
                    positive_iou: float = POSITIVE_IOU,
                    negative_iou: float = NEGATIVE_IOU) -> ProposalTargets:
  """Labels proposals by IoU with the faces and fills the task targets."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  num = len(boxes)
  landmarks = np.zeros((num, face_schema.NUM_LANDMARKS, 2), np.float32)
  visibility = np.zeros((num, face_schema.NUM_LANDMARKS), np.float32)
  pose = np.zeros((num, 3), np.float32)
  gender = np.full((num,), face_schema.GENDER_UNKNOWN, np.int32)
  if len(faces.boxes) == 0:
    no_face = np.full(num, -1, np.int32)
    return ProposalTargets(boxes, np.zeros(num, np.int32), no_face,
                           np.zeros(num, np.float32), landmarks, visibility,
                           pose, gender)
  ious = box_iou(boxes, faces.boxes)
  matched = np.argmax(ious, axis=1).astype(np.int32)
  best = ious[np.arange(num), matched]
  label = np.full((num,), IGNORED, np.int32)
  label[best > positive_iou] = POSITIVE
  label[best < negative_iou] = NEGATIVE
  positive = label == POSITIVE
  face = matched[positive]
  landmarks[positive], visibility[positive] = landmarks_in_crop(
      faces.landmarks[face], faces.visibility[face], boxes[positive])
  # A face without pose (NaN) gets 0 here; the image's has_pose flag is False.
  pose[positive] = np.nan_to_num(faces.pose[face], nan=0.0)
  gender[positive] = faces.gender[face]
  return ProposalTargets(boxes, label, matched, best.astype(np.float32),
                         landmarks, visibility, pose, gender)


def take(targets: ProposalTargets, indices: np.ndarray) -> ProposalTargets:
  """Selects proposals (rows) of every field."""
  return ProposalTargets(*(field[indices] for field in targets))


def select_proposals(targets: ProposalTargets, num_proposals: int,
                     num_positives: int, rng: np.random.Generator,
                     image_hw: tuple[int, int]) -> ProposalTargets:
  """Picks exactly ``num_proposals``: positives, then negatives, then fill.

  Up to ``num_positives`` positives are taken round-robin over the faces (so
  every face is represented), the rest are negatives. If there are too few
  negatives, more positives are taken; if the candidates run out, the
  remaining slots are whole-image boxes labelled ignored (-1) with no task
  targets, so a short image still yields K correctly labelled proposals.
  """
  label = targets.detection_label
  positives = rng.permutation(np.flatnonzero(label == POSITIVE))
  # Round-robin over faces: order positives by their rank within their face.
  faces = targets.matched_face[positives]
  rank = np.zeros(len(positives), np.int64)
  for face in np.unique(faces):
    rank[faces == face] = np.arange(np.sum(faces == face))
  positives = positives[np.argsort(rank, kind='stable')]
  negatives = rng.permutation(np.flatnonzero(label == NEGATIVE))
  ignored = rng.permutation(np.flatnonzero(label == IGNORED))
  num_pos = min(num_positives, len(positives))
  chosen = np.concatenate([
      positives[:num_pos], negatives, positives[num_pos:], ignored,
  ])[:num_proposals].astype(np.int64)
  selected = take(targets, chosen)
  missing = num_proposals - len(chosen)
  if missing == 0:
    return selected
  height, width = image_hw
  whole_image = np.array([[0, 0, width, height]], np.float32)
  filler = label_proposals(np.tile(whole_image, (missing, 1)), empty_faces())
  filler = filler._replace(
      detection_label=np.full(missing, IGNORED, np.int32))
  return ProposalTargets(*(np.concatenate([a, b]) for a, b in
                           zip(selected, filler)))


def empty_faces() -> Faces:
  """The faces of an image without faces."""
  empty = face_schema.empty_faces()
  return Faces(empty['bbox'], empty['landmarks'], empty['visibility'],
               empty['pose'], empty['gender'])


def crop_and_resize(image: np.ndarray, boxes: np.ndarray,
                    size: tuple[int, int]) -> np.ndarray:
  """Bilinear crops of ``boxes`` resized to ``size`` = (height, width).

  Output pixel (i, j) samples the point (c + (j + 0.5) w / width,
  d + (i + 0.5) h / height) of the continuous image; parts of a box outside
  the image are black (0).

  Args:
    image: (H, W, 3) uint8.
    boxes: (P, 4) pixel [c, d, w, h].
    size: output (height, width).

  Returns:
    (P, height, width, 3) float32 in [0, 1].
  """
  out_h, out_w = size
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  height, width, channels = np.shape(image)
  # Channels first, with one pixel of zero padding so that out-of-image
  # samples read black; bilinear weights then broadcast over the leading
  # axis, which is several times faster than over a trailing size-3 axis.
  padded = np.zeros((channels, height + 2, width + 2), np.float32)
  padded[:, 1:-1, 1:-1] = np.moveaxis(np.asarray(image), -1, 0)
  pixels = padded.reshape(channels, -1)
  row_stride = width + 2

  def sample_points(origin, extent, count, limit):
    # Continuous coordinate -> index into the padded image (+1 - 0.5).
    steps = (np.arange(count, dtype=np.float32) + 0.5) / count
    coordinate = origin[:, None] + steps[None, :] * extent[:, None] + 0.5
    coordinate = np.clip(coordinate, 0.0, limit).astype(np.float32)
    low = np.minimum(np.floor(coordinate), limit - 1)
    return low.astype(np.int64), coordinate - low

  y0, fy = sample_points(boxes[:, 1], boxes[:, 3], out_h, height + 1)
  x0, fx = sample_points(boxes[:, 0], boxes[:, 2], out_w, width + 1)
  top_left = y0[:, :, None] * row_stride + x0[:, None, :]
  fy, fx = fy[:, :, None], fx[:, None, :]

  def gather(offset):
    return np.take(pixels, top_left + offset, axis=1)   # (C, P, h, w)

  top = gather(0) * (1 - fx) + gather(1) * fx
  bottom = gather(row_stride) * (1 - fx) + gather(row_stride + 1) * fx
  crops = (top * (1 - fy) + bottom * fy) * np.float32(1 / 255)
  return np.ascontiguousarray(np.moveaxis(crops, 0, -1))


def flip_image(image: np.ndarray) -> np.ndarray:
  """Mirrors an (H, W, C) image left-right."""
  return np.ascontiguousarray(image[:, ::-1])


def flip_faces(faces: Faces, image_width: float) -> Faces:
  """The labels of the mirrored image: x -> W - x, left/right landmarks
  swapped (face_schema.FLIP_PERMUTATION), roll and yaw negated.

  >>> faces = Faces(np.array([[10., 5., 20., 30.]]), np.zeros((1, 21, 2)),
  ...               np.zeros((1, 21)), np.array([[0.1, 0.2, 0.3]]),
  ...               np.array([1]))
  >>> flipped = flip_faces(faces, 100)
  >>> flipped.boxes[0], flipped.pose[0]
  (array([70.,  5., 20., 30.]), array([-0.1,  0.2, -0.3]))
  """
  boxes = np.array(faces.boxes, copy=True)
  boxes[:, 0] = image_width - boxes[:, 0] - boxes[:, 2]
  landmarks = np.array(faces.landmarks, copy=True)
  landmarks[..., 0] = image_width - landmarks[..., 0]
  landmarks = landmarks[:, face_schema.FLIP_PERMUTATION]
  visibility = np.asarray(faces.visibility)[:, face_schema.FLIP_PERMUTATION]
  pose = np.asarray(faces.pose) * np.array([-1.0, 1.0, -1.0],
                                           faces.pose.dtype)
  return Faces(boxes, landmarks, visibility, pose, np.asarray(faces.gender))
