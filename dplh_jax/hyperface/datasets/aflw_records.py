"""Reads AFLW's aflw.sqlite into per-image annotations of the shared schema.

Tables (docs/DESIGN.md, Data formats): faces(face_id, file_id), faceimages(file_id,
filepath, width, height), facerect(face_id, x, y, w, h), facepose(face_id,
roll, pitch, yaw) in radians, facemetadata(face_id, sex 'm'/'f'),
featurecoords(face_id, feature_id 1..21, x, y). A landmark is visible iff
its featurecoords row exists.

What happens to imperfect annotations (counted in ``Problems``, never
silently relabelled):

* a face without a usable facerect (missing, or w or h <= 0): the whole
  image is skipped, since its proposals could not be labelled correctly;
* a face without pose: pose NaN (the pipeline sets has_pose False);
* sex missing or not 'm'/'f': gender -1 (unknown);
* a landmark row with a NULL coordinate: invisible;
* a feature_id outside 1..21: ValueError naming the face.

Landmarks outside the image and unreadable image files are handled by the
builder (aflw.py), which knows the image size.
"""

from __future__ import annotations

import collections
import dataclasses
import sqlite3

import numpy as np

from dplh_jax.hyperface.datasets import face_schema

Problems = collections.Counter  # problem name -> count


@dataclasses.dataclass
class ImageAnnotation:
  """All faces of one AFLW image, pixel coordinates (face_schema)."""
  file_id: str
  filepath: str
  face_ids: list[int]
  faces: dict[str, np.ndarray]  # face_schema keys, one row per face


def _rows(connection: sqlite3.Connection, query: str) -> list[tuple]:
  try:
    return connection.execute(query).fetchall()
  except sqlite3.Error as error:
    raise ValueError(f'aflw.sqlite: query {query!r} failed: {error}. Is this '
                     'the AFLW database (docs/DESIGN.md, Data formats)?') from error


def _gender(sex) -> int:
  sex = sex.strip().lower() if isinstance(sex, str) else sex
  return {'m': face_schema.GENDER_MALE, 'f': face_schema.GENDER_FEMALE}.get(
      sex, face_schema.GENDER_UNKNOWN)


def read_annotations(sqlite_path: str) -> tuple[list[ImageAnnotation],
                                                 Problems]:
  """Returns the annotations of every usable image and the problem counts."""
  connection = sqlite3.connect(f'file:{sqlite_path}?mode=ro', uri=True)
  try:
    images = {}
    for file_id, filepath in _rows(
        connection, 'SELECT file_id, filepath FROM faceimages'):
      images.setdefault(file_id, filepath)
    faces_of = collections.defaultdict(list)
    for face_id, file_id in _rows(
        connection, 'SELECT face_id, file_id FROM faces ORDER BY face_id'):
      faces_of[file_id].append(face_id)
    rects, poses, sexes = {}, {}, {}
    for face_id, x, y, w, h in _rows(
        connection, 'SELECT face_id, x, y, w, h FROM facerect '
        'ORDER BY annot_type_id'):
      rects.setdefault(face_id, (x, y, w, h))
    for face_id, roll, pitch, yaw in _rows(
        connection, 'SELECT face_id, roll, pitch, yaw FROM facepose '
        'ORDER BY annot_type_id'):
      poses.setdefault(face_id, (roll, pitch, yaw))
    for face_id, sex in _rows(
        connection, 'SELECT face_id, sex FROM facemetadata '
        'ORDER BY annot_type_id'):
      sexes.setdefault(face_id, sex)
    coords = collections.defaultdict(list)
    for face_id, feature_id, x, y in _rows(
        connection, 'SELECT face_id, feature_id, x, y FROM featurecoords'):
      coords[face_id].append((feature_id, x, y))
  finally:
    connection.close()

  problems = Problems()
  annotations = []
  for file_id, face_ids in sorted(faces_of.items()):
    if file_id not in images:
      problems['faces_without_image_row'] += len(face_ids)
      continue
    faces = _image_faces(face_ids, rects, poses, sexes, coords, problems)
    if faces is not None:
      annotations.append(ImageAnnotation(str(file_id), images[file_id],
                                         face_ids, faces))
  return annotations, problems


def _image_faces(face_ids, rects, poses, sexes, coords,
                 problems: Problems) -> dict[str, np.ndarray] | None:
  """The faces of one image, or None when the image must be skipped."""
  rows = {key: [] for key in face_schema.empty_faces()}
  for face_id in face_ids:
    rect = rects.get(face_id)
    if rect is None or any(v is None for v in rect):
      problems['images_skipped_face_without_rect'] += 1
      return None
    if not (rect[2] > 0 and rect[3] > 0):
      problems['images_skipped_empty_rect'] += 1
      return None
    landmarks = np.zeros((face_schema.NUM_LANDMARKS, 2), np.float32)
    visibility = np.zeros((face_schema.NUM_LANDMARKS,), np.float32)
    for feature_id, x, y in coords.get(face_id, ()):
      if not (isinstance(feature_id, (int, float))
              and float(feature_id).is_integer()
              and 1 <= feature_id <= face_schema.NUM_LANDMARKS):
        raise ValueError(f'aflw.sqlite: face_id {face_id} has featurecoords '
                         f'feature_id {feature_id!r}, expected 1..21.')
      if x is None or y is None:
        problems['landmarks_null_coordinate'] += 1
        continue
      landmarks[int(feature_id) - 1] = (x, y)
      visibility[int(feature_id) - 1] = 1.0
    pose = poses.get(face_id)
    if pose is None or any(v is None for v in pose):
      problems['faces_without_pose'] += 1
      pose = (np.nan, np.nan, np.nan)
    gender = _gender(sexes.get(face_id))
    if gender == face_schema.GENDER_UNKNOWN:
      problems['faces_unknown_gender'] += 1
    rows['bbox'].append(np.asarray(rect, np.float32))
    rows['landmarks'].append(landmarks)
    rows['visibility'].append(visibility)
    rows['pose'].append(np.asarray(pose, np.float32))
    rows['gender'].append(gender)
  return {key: np.asarray(values, face_schema.empty_faces()[key].dtype)
          for key, values in rows.items()}
