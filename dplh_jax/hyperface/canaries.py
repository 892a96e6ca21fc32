"""Audit canaries: images only memorization can fit, and their inclusion.

A canary is out of distribution, so its gradient does not fight the real
images', and its secret labels are drawn at random per canary, so an
excluded canary cannot be predicted from the included ones: a model fits a
canary's own labels only by memorizing that very image. The image is a plain
grey background with one "face" box filled by a 4x4 grid of random colours
(distinct, and still recognizable under the pipeline's crop jitter and
flips). Its secret: gender, the signs of a fixed-size pose, and which 11 of
the 21 landmarks are visible. Every label draw has the same size, so an
excluded canary's loss does not depend on which labels it drew.

Records follow the face datasets' decoded format (``face_schema``), so the
input pipeline treats canaries like any image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dplh_jax.hyperface.datasets import face_schema

# Pose labels are (+-25, +-25, +-60) degrees, signs at random: inside
# synthetic_faces' ranges, and all of one size.
_POSE_MAGNITUDE = np.deg2rad([25.0, 25.0, 60.0]).astype(np.float32)
_NUM_VISIBLE = 11  # of 21 landmarks, a random subset per label draw
_GRID = 4  # colour blocks per side of a canary's face box
_GREY = 128
# A frontal face's 21 landmarks (AFLW order) as fractions of the face box,
# mirror-symmetric under face_schema.FLIP_PAIRS. The same for every canary:
# the landmark task carries no secret (random points would add noise, and
# positions relative to a jittered crop are slow to memorize).
_LAYOUT = np.array([
    [.22, .33], [.30, .30], [.40, .32], [.60, .32], [.70, .30], [.78, .33],
    [.26, .42], [.32, .42], [.39, .42], [.61, .42], [.68, .42], [.74, .42],
    [.08, .50], [.42, .60], [.50, .62], [.58, .60], [.92, .50],
    [.38, .75], [.50, .76], [.62, .75], [.50, .92]], np.float32)


def _random_labels(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A canary's secret: visible landmarks, pose signs and gender."""
  visibility = np.zeros(face_schema.NUM_LANDMARKS, np.float32)
  visibility[rng.choice(face_schema.NUM_LANDMARKS, _NUM_VISIBLE,
                        replace=False)] = 1.0
  return {
      'visibility': visibility,
      'pose': (rng.choice([-1.0, 1.0], 3) * _POSE_MAGNITUDE).astype(
          np.float32),
      'gender': np.int32(rng.integers(0, 2)),
  }


def _record(image: np.ndarray, index: int, box: np.ndarray,
            labels: dict[str, np.ndarray]) -> dict[str, Any]:
  landmarks = box[:2] + _LAYOUT * box[2:]
  return {
      'image': image,
      'image_id': f'canary/{index:05d}'.encode(),
      'faces': {'bbox': [box], 'landmarks': [landmarks.astype(np.float32)],
                **{key: [value] for key, value in labels.items()}},
  }


def make_canary(seed: int, index: int, image_size: tuple[int, int],
                num_decoys: int = 0) -> list[dict[str, Any]]:
  """Canary ``index`` and its decoys: records in the datasets' format.

  A decoy is the same image and face box with labels drawn afresh from the
  canary label distribution; it is never trained on. An excluded canary's
  true labels and its decoys are exchangeable given the model, which is
  what makes ``calibrated_scores`` centred for excluded canaries.

  Args:
    seed: the canary seed; canary ``index`` draws from
      ``default_rng([seed, 0, index])``, decoy r from ``[seed, 2, index, r]``
      (the inclusion coins use ``[seed, 1]``).
    index: which canary.
    image_size: (height, width) of the dataset's images.
    num_decoys: how many decoys to return after the canary.

  Returns:
    ``[canary, decoy_0, ...]``, each ``{'image': uint8 (H, W, 3),
    'image_id': bytes, 'faces': {...}}`` with one face, as
    ``as_data_source()`` returns a record.
  """
  rng = np.random.default_rng([seed, 0, index])
  height, width = image_size
  side = rng.uniform(0.45, 0.7) * min(height, width)
  box_w, box_h = side * rng.uniform(0.8, 1.0), side
  x0 = rng.uniform(0, width - box_w)
  y0 = rng.uniform(0, height - box_h)
  image = np.full((height, width, 3), _GREY, np.uint8)
  colours = rng.integers(0, 256, (_GRID, _GRID, 3), dtype=np.uint8)
  # Nearest-neighbour upsampling of the colour grid onto the box's pixels.
  rows = np.arange(int(y0), min(int(np.ceil(y0 + box_h)), height))
  cols = np.arange(int(x0), min(int(np.ceil(x0 + box_w)), width))
  grid_r = np.clip(((rows + 0.5 - y0) / box_h * _GRID).astype(int), 0,
                   _GRID - 1)
  grid_c = np.clip(((cols + 0.5 - x0) / box_w * _GRID).astype(int), 0,
                   _GRID - 1)
  image[rows[:, None], cols[None, :]] = colours[grid_r[:, None],
                                                grid_c[None, :]]
  box = np.array([x0, y0, box_w, box_h], np.float32)
  records = [_record(image, index, box, _random_labels(rng))]
  for decoy in range(num_decoys):
    records.append(_record(image, index, box, _random_labels(
        np.random.default_rng([seed, 2, index, decoy]))))
  return records


def inclusion_coins(seed: int, num_canaries: int) -> np.ndarray:
  """(m,) bool: canary i is trained on iff coin i is True (P = 1/2 each)."""
  return np.random.default_rng([seed, 1]).integers(
      0, 2, num_canaries).astype(bool)


class WithCanaries(Sequence):
  """The real training source followed by the included canaries."""

  def __init__(self, source: Sequence[dict[str, Any]],
               canaries: Sequence[dict[str, Any]]):
    self._source, self._canaries = source, list(canaries)

  def __len__(self) -> int:
    return len(self._source) + len(self._canaries)

  def __getitem__(self, index):
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} outside {len(self)} records')
    if index < len(self._source):
      return self._source[index]
    return self._canaries[index - len(self._source)]

  def __getitems__(self, indices):
    # One batched read of the real records (TFDS), like the plain source.
    real = [i for i in indices if i < len(self._source)]
    read = (list(self._source.__getitems__(real))
            if real and hasattr(self._source, '__getitems__')
            else [self._source[i] for i in real])
    records = iter(read)
    return [next(records) if i < len(self._source) else self[i]
            for i in indices]
