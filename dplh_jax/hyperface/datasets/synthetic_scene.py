"""Samples and renders one synthetic image: cluttered background + faces.

Everything about image ``index`` of a split comes from
``np.random.default_rng([seed, split_id, index])``, so an image does not
depend on which other images were rendered, in which order or process.

Faces never overlap each other and are painted after the clutter, so the
only occluders of a landmark are the head itself and the image border, which
is what the visibility labels encode. The gender label is a noisy attribute:
appearance follows the true gender through several overlapping cues (hair
length, lipstick, beard, brow thickness, lip height, head width), none
decisive on its own, and the stored label is flipped with probability
``gender_label_noise`` (so accuracy above 1 - noise is not attainable).

The cues are drawn so that they stay visible in the demo's 48 px crops
(version 1.1.0): lipstick on 90% of women, a beard on 60% of men, long hair
on 90% of women and 5% of men. In version 1.0.0 (60%, 40%, 78% / 12%, paler
lipstick, closer brow and lip sizes) even a non-private model trained on
gender alone stayed near 0.57 accuracy after three demo epochs; with these
cues (and the model's input scaling, models.PIXEL_MEAN) it reached 0.80.
"""

from __future__ import annotations

import dataclasses
import functools
import io

import numpy as np
from PIL import Image

from dplh_jax.hyperface.datasets import face_painter
from dplh_jax.hyperface.datasets import face_schema
from dplh_jax.hyperface.datasets import head_model

_SKIN_LIGHT = np.array([0.96, 0.80, 0.69])
_SKIN_DARK = np.array([0.32, 0.20, 0.13])
_HAIR_COLORS = np.array([[0.08, 0.06, 0.05], [0.25, 0.15, 0.08],
                         [0.55, 0.38, 0.20], [0.85, 0.72, 0.45],
                         [0.55, 0.55, 0.55]])


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """What a synthetic image looks like."""
  image_size: int = 112
  max_faces: int = 3
  # P(number of faces = 0, 1, 2, ...); truncated to max_faces and renormalised.
  num_faces_probs: tuple[float, ...] = (0.05, 0.6, 0.27, 0.08)
  # Face box height as a fraction of the image side, for a single face.
  face_height_range: tuple[float, float] = (0.3, 0.8)
  max_abs_roll: float = float(np.deg2rad(30.0))
  max_abs_pitch: float = float(np.deg2rad(30.0))
  max_abs_yaw: float = float(np.deg2rad(80.0))
  gender_label_noise: float = 0.07
  num_clutter_shapes: tuple[int, int] = (2, 7)
  num_skin_distractors: tuple[int, int] = (0, 2)
  jpeg_quality: int = 92


def _sample_appearance(rng: np.random.Generator, male: bool
                       ) -> face_painter.Appearance:
  skin = _SKIN_LIGHT + rng.uniform() * (_SKIN_DARK - _SKIN_LIGHT)
  skin = np.clip(skin * rng.uniform(0.92, 1.08, 3), 0, 1)
  hair = _HAIR_COLORS[rng.integers(len(_HAIR_COLORS))] * rng.uniform(0.8, 1.2)
  lips = skin * np.array([0.85, 0.55, 0.55])
  if not male and rng.uniform() < 0.9:  # lipstick
    lips = np.array([0.85, 0.1, 0.2]) * rng.uniform(0.8, 1.1)
  light = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.3, 0.9), 1.0])
  return face_painter.Appearance(
      skin=skin.astype(np.float32),
      hair=np.clip(hair, 0, 1).astype(np.float32),
      lips=np.clip(lips, 0, 1).astype(np.float32),
      iris=rng.uniform(0.05, 0.45, 3).astype(np.float32),
      brow_thickness=float(np.clip(
          rng.normal(0.07 if male else 0.035, 0.01), 0.02, 0.1)),
      lip_height=float(rng.uniform(0.04, 0.06) if male
                       else rng.uniform(0.07, 0.1)),
      hairline=float(rng.uniform(0.62, 0.95) if male
                     else rng.uniform(0.6, 0.75)),
      long_hair=bool(rng.uniform() < (0.05 if male else 0.9)),
      beard=float(rng.uniform(0.5, 0.9) if male and rng.uniform() < 0.6
                  else 0.0),
      light=(light / np.linalg.norm(light)).astype(np.float32),
      ambient=float(rng.uniform(0.3, 0.6)))


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(size: int, grid: int) -> np.ndarray:
  """(size, grid) weights of linear interpolation from grid to size points."""
  position = (np.arange(size) + 0.5) / size * (grid - 1)
  weights = np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(grid)))
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
  """Fixed unit Gaussian pixel noise; images use random windows of it.

  Drawing fresh noise per image was a fifth of the rendering time.
  """
  rng = np.random.default_rng(20240601)
  return rng.standard_normal((2 * size, 2 * size, 3), dtype=np.float32)


def _background(rng: np.random.Generator, size: int,
                config: SceneConfig) -> np.ndarray:
  """A smooth random field plus random shapes and face-coloured blobs."""
  coarse = rng.uniform(0, 1, (4, 4, 3)).astype(np.float32)
  upsample = _upsampling_matrix(size, 4)
  canvas = (upsample @ coarse.transpose(2, 0, 1) @ upsample.T).transpose(
      1, 2, 0)
  canvas = canvas * rng.uniform(0.4, 1.0) + rng.uniform(0.0, 0.4)
  num_shapes = rng.integers(*config.num_clutter_shapes, endpoint=True)
  num_blobs = rng.integers(*config.num_skin_distractors, endpoint=True)
  for shape_index in range(num_shapes + num_blobs):
    is_blob = shape_index >= num_shapes
    cx, cy = rng.uniform(0, size, 2)
    rx, ry = rng.uniform(0.04, 0.3, 2) * size
    if is_blob:  # Face-like hard negative: a shaded skin ellipse, no features.
      color = _SKIN_LIGHT + rng.uniform() * (_SKIN_DARK - _SKIN_LIGHT)
      ry = rx * rng.uniform(1.0, 1.5)
    else:
      color = rng.uniform(0, 1, 3)
    angle = rng.uniform(0, np.pi)
    kind = 0 if is_blob else rng.integers(3)
    # Only the pixels of the shape's bounding square are touched (speed).
    reach = (max(rx, ry), np.hypot(rx, ry), 2.0 * rx)[kind] + 2.0
    rows = slice(int(max(cy - reach, 0)), int(min(cy + reach, size)))
    cols = slice(int(max(cx - reach, 0)), int(min(cx + reach, size)))
    if rows.stop <= rows.start or cols.stop <= cols.start:
      continue
    dv = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5 - cy
    du = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5 - cx
    pu = du * np.cos(angle) + dv * np.sin(angle)
    pv = -du * np.sin(angle) + dv * np.cos(angle)
    if kind == 0:
      r2 = (pu / rx) ** 2 + (pv / ry) ** 2
      mask = r2 < 1.0
    elif kind == 1:
      mask = (np.abs(pu) < rx) & (np.abs(pv) < ry)
    else:  # a line
      mask = (np.abs(pu) < rx * 2) & (np.abs(pv) < 1.5)
    region = canvas[rows, cols]
    if is_blob:
      region[mask] = color * (1.0 - 0.35 * r2[mask])[:, None]
    else:
      region[mask] = color
  return canvas


def _sample_faces(rng: np.random.Generator, config: SceneConfig):
  """Poses, positions and scales of non-overlapping faces."""
  size = config.image_size
  probs = np.asarray(config.num_faces_probs[:config.max_faces + 1], float)
  num_faces = rng.choice(len(probs), p=probs / probs.sum())
  posed_heads, boxes = [], []
  low, high = config.face_height_range
  for _ in range(num_faces):
    for _ in range(20):  # rejection sampling of a free spot
      male = bool(rng.uniform() < 0.5)
      head = head_model.make_head(
          width=rng.uniform(0.88, 1.0) if male else rng.uniform(0.82, 0.94),
          height=rng.uniform(1.12, 1.28), depth=rng.uniform(0.88, 1.0))
      yaw = rng.uniform(-1, 1) * config.max_abs_yaw
      pose = np.array([rng.normal(0, 0.4) * config.max_abs_roll,
                       rng.uniform(-1, 1) * config.max_abs_pitch, yaw])
      pose[0] = np.clip(pose[0], -config.max_abs_roll, config.max_abs_roll)
      height = rng.uniform(low, high) * size / np.sqrt(num_faces)
      scale = height / (2 * head.semi_axes[1])
      center = rng.uniform(0.1 * size, 0.9 * size, 2)
      posed = head_model.PosedHead(head, head_model.rotation_matrix(pose),
                                   center, float(scale))
      box = head_model.silhouette_box(posed)
      if all(_disjoint(box, other) for other in boxes):
        posed_heads.append((posed, pose, male))
        boxes.append(box)
        break
  return posed_heads, boxes


def _disjoint(box: np.ndarray, other: np.ndarray, margin: float = 2.0) -> bool:
  return (box[0] + box[2] + margin <= other[0]
          or other[0] + other[2] + margin <= box[0]
          or box[1] + box[3] + margin <= other[1]
          or other[1] + other[3] + margin <= box[1])


def render_scene(seed: int, split_id: int, index: int,
                 config: SceneConfig) -> tuple[np.ndarray, dict]:
  """Renders image ``index``; returns uint8 (S, S, 3) and the faces labels."""
  rng = np.random.default_rng([seed, split_id, index])
  size = config.image_size
  canvas = _background(rng, size, config)
  posed_heads, boxes = _sample_faces(rng, config)
  faces = face_schema.empty_faces()
  rows = {key: [] for key in faces}
  for (posed, pose, male), box in zip(posed_heads, boxes):
    face_painter.paint_face(canvas, posed, _sample_appearance(rng, male))
    landmarks, visibility = head_model.project_landmarks(posed, (size, size))
    noisy = rng.uniform() < config.gender_label_noise
    rows['bbox'].append(box)
    rows['landmarks'].append(landmarks)
    rows['visibility'].append(visibility)
    rows['pose'].append(pose.astype(np.float32))
    rows['gender'].append(np.int32(int(male) ^ int(noisy)))
  for key, values in rows.items():
    if values:
      faces[key] = np.stack(values).astype(faces[key].dtype)
  row, col = rng.integers(0, size, 2)
  noise = _noise_bank(size)[row:row + size, col:col + size]
  canvas += noise * np.float32(rng.uniform(0.005, 0.04))
  image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
  return image, faces


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  """JPEG bytes of a uint8 RGB image (deterministic for a given libjpeg)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()
