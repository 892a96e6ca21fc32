"""HyperFace's inference on a whole image: IRP, then landmark-based NMS.

Ranjan et al. (TPAMI 2017), Algorithms 1 and 2:

* **Iterative Region Proposals** (IRP). The candidates are scored; those
  with a face score of at least ``threshold`` are the detections. For a fixed
  number of rounds, each detection of the last round is re-boxed from its
  predicted landmarks and pose (``face_rect``) and the new boxes are scored
  and added to the detections. A candidate that cuts through a face yields
  a well-placed box in the next round.
* **Landmark-based NMS** (L-NMS). Every detection gets the box of its
  landmarks; NMS on those boxes (overlap above ``iou_threshold`` suppresses)
  picks one detection per face. Each kept one is combined with the ``top_k``
  highest-scoring detections whose landmark box overlaps its own by more
  than ``iou_threshold`` (itself included): the element-wise median of their
  boxes, landmarks, visibility scores, pose and gender probability; the
  score is the kept detection's.

*Differs from the paper*, both chosen with the demo's DP model on public
synthetic scenes (rendered from a seed no dataset uses: no training or test
image): the combined box is the median of the group's boxes, not a box
re-fitted to the median landmarks (image-level AP 0.83 against 0.49 on 40
scenes: with DP-trained landmarks, NME about 0.2, the fitted box is the
less accurate); and the analyzer measures overlap as intersection over the
smaller box (``overlap='min'``, as in MTCNN's last NMS), because windows of
several scales nest around one face with IoU below 0.5 (AP 0.41 with IoU,
0.81 with 'min', on 60 scenes).

Pure NumPy on the host; the model is reached only through ``score_fn``,
which the analyzer runs batched and jitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from dplh_jax.hyperface import face_rect
from dplh_jax.hyperface import proposals


class Detections(NamedTuple):
  """N scored boxes and what the model predicts in them, image pixels."""
  boxes: np.ndarray               # (N, 4) float32 [x, y, w, h]
  scores: np.ndarray              # (N,) P(face)
  landmarks: np.ndarray           # (N, 21, 2) pixel (x, y)
  visibility: np.ndarray          # (N, 21) regressed visibility
  pose: np.ndarray                # (N, 3) roll, pitch, yaw, radians
  gender_probability: np.ndarray  # (N,) P(male)

  def take(self, indices) -> 'Detections':
    return Detections(*(np.asarray(field)[indices] for field in self))

  @property
  def count(self) -> int:  # (len() is the tuple's: its number of fields)
    return int(np.shape(self.scores)[0])


def concatenate(parts: list[Detections]) -> Detections:
  return Detections(*(np.concatenate(fields) for fields in zip(*parts)))


def landmark_boxes(detections: Detections) -> np.ndarray:
  """Each detection's box from its own landmarks (FaceRectCalculator)."""
  return face_rect.boxes_from_landmarks(
      detections.landmarks, detections.visibility, detections.pose,
      detections.boxes)


def iterative_region_proposals(score_fn: Callable[[np.ndarray], Detections],
                               candidates: np.ndarray, *, rounds: int,
                               threshold: float, max_boxes: int
                               ) -> Detections:
  """Algorithm 1: score the candidates, then re-box and re-score.

  Args:
    score_fn: boxes (M, 4) -> their Detections.
    candidates: (N, 4) pixel boxes.
    rounds: re-boxing rounds (0: the candidates' detections alone).
    threshold: the face score a candidate needs to be a detection.
    max_boxes: at most this many detections (the highest scores) go into
      the rounds, so their cost does not grow with the image.

  Returns:
    The detections of every round, concatenated (first the candidates').
  """
  scored = score_fn(candidates)
  keep = np.flatnonzero(scored.scores >= threshold)
  keep = keep[np.argsort(-scored.scores[keep], kind='stable')][:max_boxes]
  current = scored.take(keep)
  found = [current]
  for _ in range(rounds):
    if not current.count:
      break
    current = score_fn(landmark_boxes(current))
    found.append(current)
  return concatenate(found)


def box_overlap(boxes_a: np.ndarray, boxes_b: np.ndarray,
                overlap: str) -> np.ndarray:
  """(N, M) overlap of every pair: ``'iou'``, or ``'min'``, the
  intersection over the smaller box's area (1 for a box inside another).

  >>> box_overlap(np.array([[0, 0, 4, 4.]]), np.array([[1, 1, 2, 2.]]), 'min')
  array([[1.]])
  """
  if overlap == 'iou':
    return proposals.box_iou(boxes_a, boxes_b)
  if overlap != 'min':
    raise ValueError(f"overlap={overlap!r}: use 'iou' or 'min'.")
  intersection, area_a, area_b = proposals.box_intersection(boxes_a, boxes_b)
  smaller = np.minimum(area_a, area_b)
  return np.where(smaller > 0, intersection
                  / np.where(smaller > 0, smaller, 1), 0.0)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray,
                            threshold: float, overlap: str = 'iou'
                            ) -> np.ndarray:
  """Indices of the kept boxes, highest score first (greedy NMS: a box is
  suppressed by a kept one it overlaps by more than ``threshold``).

  >>> non_maximum_suppression(
  ...     np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 0, 10, 10]], float),
  ...     np.array([0.9, 0.8, 0.7]), 0.5)
  array([0, 2])
  """
  order = np.argsort(-np.asarray(scores), kind='stable')
  ious = box_overlap(boxes, boxes, overlap)
  suppressed = np.zeros(len(order), bool)
  kept = []
  for index in order:
    if suppressed[index]:
      continue
    kept.append(index)
    suppressed |= ious[index] > threshold
  return np.array(kept, np.int64)


def landmark_nms(detections: Detections, *, iou_threshold: float = 0.5,
                 top_k: int = 5, overlap: str = 'iou') -> Detections:
  """Algorithm 2: one combined detection per face, highest score first.

  ``overlap='min'`` measures overlap as intersection over the smaller box
  (see ``box_overlap``), so a box nested in another counts as a duplicate
  whatever their sizes.
  """
  if not detections.count:
    return detections
  boxes = landmark_boxes(detections)
  kept = non_maximum_suppression(boxes, detections.scores, iou_threshold,
                                 overlap)
  ious = box_overlap(boxes[kept], boxes, overlap)
  order = np.argsort(-detections.scores, kind='stable')
  faces = []
  for row, index in enumerate(kept):
    group = order[ious[row][order] > iou_threshold][:top_k]
    if index not in group:  # A degenerate box does not overlap itself.
      group = np.append(group[:top_k - 1], index)
    members = detections.take(group)
    faces.append(Detections(
        boxes=np.median(members.boxes, 0)[None],
        scores=detections.scores[index][None],
        landmarks=np.median(members.landmarks, 0)[None],
        visibility=np.median(members.visibility, 0)[None],
        pose=np.median(members.pose, 0)[None],
        gender_probability=np.median(members.gender_probability)[None]))
  return concatenate(faces)
