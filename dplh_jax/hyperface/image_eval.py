"""HyperFace's image-level metrics: detection AP over whole test images, and
landmarks, visibility, pose and gender of the faces found.

Conventions (docs/DESIGN.md, Using a trained model):

* matching: in each image, detections in descending score order each take
  the unmatched annotated face of highest IoU, if that IoU is at least
  ``iou_threshold`` (0.5, PASCAL VOC); otherwise they are false positives;
* ``image_detection_ap``: step-wise area under precision-recall over all
  detections of all images, every annotated face counted, found or not (so
  missed faces cost recall): sum of the precision at each true positive /
  number of faces, without interpolation (as ``metrics.average_precision``);
* at the operating point (detections scoring at least ``score_threshold``):
  ``image_precision``, ``image_recall``, and for the faces matched there
  ``image_landmark_nme`` (visible annotated points; pixel error / sqrt(w h)
  of the annotated box), ``image_visibility_accuracy`` (21 points;
  prediction > 0.5 against the annotation), ``image_pose_mae_*_deg``
  (faces with a pose) and ``image_gender_accuracy`` (known gender;
  P(male) > 0.5 against the label). Pooled over terms; no term: NaN.

``dplh-evaluate`` computes them on any workdir or exported file; with
``config.image_eval_images`` > 0, dplh-train computes them at the end of the
run on that many test images (``evaluate_final_params``: image_eval.json).
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dplh_jax.hyperface import analyzer as analyzer_lib
from dplh_jax.hyperface import export
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface import workdir as workdir_lib

POSE_NAMES = ('roll', 'pitch', 'yaw')


def match_detections(boxes: np.ndarray, scores: np.ndarray,
                     face_boxes: np.ndarray,
                     iou_threshold: float = 0.5) -> np.ndarray:
  """Index of the face each detection matches, -1 for a false positive.

  >>> match_detections(np.array([[0, 0, 10, 10], [1, 0, 10, 10.]]),
  ...                  np.array([0.6, 0.9]), np.array([[0, 0, 10, 10.]]))
  array([-1,  0])
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  matched = np.full(len(boxes), -1, np.int64)
  if not len(boxes) or not len(face_boxes):
    return matched
  ious = proposals.box_iou(boxes, face_boxes)
  taken = np.zeros(len(face_boxes), bool)
  for index in np.argsort(-np.asarray(scores), kind='stable'):
    candidates = np.where(taken, -1.0, ious[index])
    best = int(np.argmax(candidates))
    if candidates[best] >= iou_threshold:
      matched[index], taken[best] = best, True
  return matched


def detection_average_precision(scores: np.ndarray, true_positive: np.ndarray,
                                num_faces: int) -> float:
  """Step-wise AP: sum of precision at each true positive / num_faces.

  >>> detection_average_precision(np.array([0.9, 0.8, 0.7]),
  ...                             np.array([True, False, True]), 3)
  0.5555...
  """
  if num_faces == 0:
    return float('nan')
  order = np.argsort(-np.asarray(scores), kind='stable')
  hits = np.asarray(true_positive, bool)[order]
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(np.sum(precision[hits]) / num_faces)


class ImageEvalAccumulator:
  """Accumulates images' detections and annotations; ``result`` finalizes."""

  def __init__(self, iou_threshold: float = 0.5,
               score_threshold: float = 0.5):
    self.iou_threshold = iou_threshold
    self.score_threshold = score_threshold
    self._scores: list[np.ndarray] = []
    self._hits: list[np.ndarray] = []
    self._sums = collections.defaultdict(float)
    self._counts = collections.defaultdict(float)
    self.num_images = 0
    self.num_faces = 0

  def _add(self, name: str, values, mask) -> None:
    values = np.asarray(values, np.float64)
    mask = np.broadcast_to(np.asarray(mask, bool), values.shape)
    self._sums[name] += float(np.sum(values[mask]))
    self._counts[name] += float(np.sum(mask))

  def update(self, faces: Sequence[analyzer_lib.Face],
             annotated: proposals.Faces) -> None:
    """Adds one image: its detections (any score) and its annotations."""
    self.num_images += 1
    self.num_faces += len(annotated.boxes)
    boxes = np.array([f.box for f in faces], np.float64).reshape(-1, 4)
    scores = np.array([f.score for f in faces], np.float64)
    matched = match_detections(boxes, scores, annotated.boxes,
                               self.iou_threshold)
    self._scores.append(scores)
    self._hits.append(matched >= 0)
    operating = scores >= self.score_threshold
    self._add('image_precision', matched[operating] >= 0, True)
    self._counts['image_recall'] += len(annotated.boxes)
    for index in np.flatnonzero(operating & (matched >= 0)):
      self._add_face(faces[index], annotated, int(matched[index]))

  def _add_face(self, face: analyzer_lib.Face, annotated: proposals.Faces,
                which: int) -> None:
    self._sums['image_recall'] += 1
    visible = annotated.visibility[which] > 0.5
    box = annotated.boxes[which]
    error = np.linalg.norm(face.landmarks - annotated.landmarks[which], axis=1)
    self._add('image_landmark_nme',
              error / np.sqrt(max(box[2] * box[3], 1e-12)), visible)
    self._add('image_visibility_accuracy',
              (face.visibility_scores > 0.5) == visible, True)
    pose = annotated.pose[which]
    for i, name in enumerate(POSE_NAMES):
      self._add(f'image_pose_mae_{name}_deg',
                np.degrees(np.abs(face.pose[i] - np.nan_to_num(pose[i]))),
                np.isfinite(pose[i]))
    gender = annotated.gender[which]
    self._add('image_gender_accuracy', face.gender == gender, gender >= 0)

  def result(self) -> dict[str, float]:
    names = ['image_precision', 'image_recall', 'image_landmark_nme',
             'image_visibility_accuracy', 'image_gender_accuracy'] + [
                 f'image_pose_mae_{name}_deg' for name in POSE_NAMES]
    result = {name: (self._sums[name] / self._counts[name]
                     if self._counts[name] else float('nan'))
              for name in names}
    scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
    hits = np.concatenate(self._hits) if self._hits else np.zeros(0, bool)
    result['image_detection_ap'] = detection_average_precision(
        scores, hits, self.num_faces)
    result['image_pose_mae_deg'] = float(np.mean(
        [result[f'image_pose_mae_{name}_deg'] for name in POSE_NAMES]))
    result['num_images'] = self.num_images
    result['num_faces'] = self.num_faces
    return dict(sorted(result.items()))


def open_test_split(config: dict[str, Any], data_dir: str | None = None):
  """The random-access test split of the run's dataset (training images are
  not read; a dataset not yet prepared is built first, as dplh-train does).

  Args:
    config: the run's config.
    data_dir: the TFDS folder; None: the config's ``data_dir`` (a released
      config has none: TFDS's default, ~/tensorflow_datasets).
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from dplh_jax.hyperface import data_loading  # pylint: disable=import-outside-toplevel
  if data_dir is None:
    data_dir = config.get('data_dir', '')
  return data_loading.load_data(ml_collections.ConfigDict(
      dict(config, data_dir=data_dir))).test


def open_run_test_split(analyzer: analyzer_lib.FaceAnalyzer,
                        data_dir: str | None = None):
  """The test split of the analyzer's run: in ``data_dir`` if given, else
  where its workdir's config.json keeps the dataset (the released config
  leaves the local path out), else TFDS's default folder."""
  if data_dir is None:
    source = analyzer.released.source
    saved = workdir_lib.read_config(source) if os.path.isdir(source) else None
    data_dir = (saved or {}).get('data_dir', '')
  return open_test_split(analyzer.released.config, data_dir)


def annotated_faces(record: dict[str, Any], index: int) -> proposals.Faces:
  from dplh_jax.hyperface import input_pipeline  # pylint: disable=import-outside-toplevel
  return input_pipeline.faces_from_record(record, index)


def evaluate(analyzer: analyzer_lib.FaceAnalyzer, source: Sequence[Any],
             num_images: int = -1, *, iou_threshold: float = 0.5,
             score_threshold: float = 0.5) -> dict[str, float]:
  """Image-level metrics of ``analyzer`` on the first ``num_images``
  records of ``source`` (-1: all), in order."""
  count = len(source) if num_images < 0 else min(num_images, len(source))
  accumulator = ImageEvalAccumulator(iou_threshold, score_threshold)
  for index in range(count):
    record = source[index]
    faces = analyzer.analyze(np.asarray(record['image']), min_score=0.0)
    accumulator.update(faces, annotated_faces(record, index))
  return accumulator.result()


RESULT_FILE = 'image_eval.json'


def evaluate_final_params(params: Any, config: dict[str, Any], step: int,
                          privacy: dict[str, Any] | None,
                          test_source: Sequence[Any], num_images: int,
                          workdir: str) -> dict[str, float]:
  """``config.image_eval_images`` at the end of dplh-train: the metrics of
  the final params on the first ``num_images`` test images, as
  ``dplh-evaluate`` computes them (default ``AnalyzerOptions``), written to
  ``workdir/image_eval.json`` (``{"model": FaceAnalyzer.describe(),
  "score_threshold", "iou_threshold", "metrics"}``; NaN as null).

  Reads only the params (the release) and the test split.
  """
  analyzer = analyzer_lib.FaceAnalyzer(export.ReleasedModel(
      params, export.public_config(config), step,
      export.public_report(privacy), workdir))
  result = evaluate(analyzer, test_source, num_images)
  path = os.path.join(workdir, RESULT_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump({'model': analyzer.describe(), 'score_threshold': 0.5,
               'iou_threshold': 0.5,
               'metrics': {k: None if isinstance(v, float) and math.isnan(v)
                           else v for k, v in result.items()}},
              f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)
  return result


def summary(result: dict[str, float]) -> str:
  """One line of the headline image-level metrics."""
  def show(key, fmt='.3f'):
    value = result[key]
    return '-' if math.isnan(value) else format(value, fmt)
  return (f'{result["num_images"]} test images, {result["num_faces"]} faces: '
          f'detection AP {show("image_detection_ap")}, precision '
          f'{show("image_precision")} / recall {show("image_recall")} at '
          f'score 0.5, landmark NME {show("image_landmark_nme")}, pose MAE '
          f'{show("image_pose_mae_deg", ".1f")} deg, gender accuracy '
          f'{show("image_gender_accuracy")}')
