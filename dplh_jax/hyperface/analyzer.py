"""Faces in a whole image from a trained run: ``FaceAnalyzer``.

    analyzer = FaceAnalyzer.from_workdir('workdirs/default')   # or
    analyzer = FaceAnalyzer.from_params_file('model.npz')      # dplh-export
    for face in analyzer.analyze(image):        # uint8 (H, W, 3) RGB
      print(face.box, face.score, face.pose, face.gender_probability)

HyperFace's inference (docs/DESIGN.md, Using a trained model): sliding
windows (``candidates``) are cropped and scored by the network, then
Iterative Region Proposals and landmark-based NMS (``irp_lnms``) turn them
into one detection per face. Crops are cut in JAX inside the same jitted
function as the network, from the image zero-padded to a size bucket (a
multiple of ``size_bucket`` pixels per side) in fixed chunks of
``chunk_size`` boxes, so one compile serves every image of a bucket. The
crops are those of training (``proposals.crop_and_resize``: bilinear, black
outside the image), so the network sees what it was trained on.

Privacy: the analyzer reads only the released parameters (``export``: the
params subtree of a checkpoint, or an exported file) and the images it is
given; it never reads the optimizer state, the noise key or training data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dplh_jax.hyperface import candidates as candidates_lib
from dplh_jax.hyperface import export
from dplh_jax.hyperface import irp_lnms
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import models


@dataclasses.dataclass(frozen=True)
class Face:
  """One detected face, in the conventions of the dataset schema.

  Attributes:
    box: pixel [x, y, w, h] (top-left corner and size; the image covers
      [0, W] x [0, H]).
    score: detection score, P(face) of the kept detection.
    landmarks: (21, 2) pixel (x, y) in AFLW order (``LANDMARK_NAMES``).
    visibility: (21,) 1 visible / 0 not (visibility score above 0.5).
    visibility_scores: (21,) the regressed visibility.
    pose: (3,) roll, pitch, yaw in radians (``head_model`` conventions).
    gender_probability: P(male); ``gender`` is 1 (male) above 0.5, else 0.
  """
  box: np.ndarray
  score: float
  landmarks: np.ndarray
  visibility: np.ndarray
  visibility_scores: np.ndarray
  pose: np.ndarray
  gender_probability: float

  @property
  def gender(self) -> int:
    return int(self.gender_probability > 0.5)

  def to_json(self) -> dict[str, Any]:
    def floats(values):
      return np.round(np.asarray(values, np.float64), 4).tolist()
    return {'box': floats(self.box), 'score': round(self.score, 4),
            'landmarks': floats(self.landmarks),
            'visibility': [int(v) for v in self.visibility],
            'visibility_scores': floats(self.visibility_scores),
            'pose': floats(self.pose),
            'pose_degrees': floats(np.degrees(self.pose)),
            'gender': self.gender,
            'gender_probability': round(self.gender_probability, 4)}


@dataclasses.dataclass(frozen=True)
class AnalyzerOptions:
  """How windows become faces. None of these is learned from data.

  Attributes:
    windows: where the candidate windows go.
    detection_threshold: face score a window needs to enter IRP.
    irp_rounds: IRP's re-boxing rounds.
    max_irp_boxes: at most this many detections go through IRP.
    nms_iou: L-NMS overlap threshold (suppression and grouping).
    nms_overlap: how L-NMS measures overlap: 'iou', or 'min' (intersection
      over the smaller box).
    top_k: detections combined per face by L-NMS.
    min_score: ``analyze`` returns faces with at least this score.
    chunk_size: boxes per call of the jitted network.
    size_bucket: images are zero-padded to a multiple of this per side.
  """
  windows: candidates_lib.WindowConfig = candidates_lib.WindowConfig()
  detection_threshold: float = 0.5
  irp_rounds: int = 1
  max_irp_boxes: int = 256
  nms_iou: float = 0.5
  nms_overlap: str = 'min'
  top_k: int = 5
  min_score: float = 0.5
  chunk_size: int = 256
  size_bucket: int = 64


def crop_and_resize(padded: jax.Array, boxes: jax.Array,
                    size: int) -> jax.Array:
  """``proposals.crop_and_resize`` in JAX, on a zero-padded image.

  Args:
    padded: (Hp, Wp, 3) float32 pixel values 0..255, the image at
      ``[1:H+1, 1:W+1]`` and zeros elsewhere (at least one pixel around).
    boxes: (N, 4) pixel [x, y, w, h] of the unpadded image.
    size: side of the square crops.

  Returns:
    (N, size, size, 3) float32 RGB in [0, 1]: the NumPy function's crops.
  """
  steps = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size

  def sample_points(origin, extent, limit):
    coordinate = origin[:, None] + steps[None, :] * extent[:, None] + 0.5
    coordinate = jnp.clip(coordinate, 0.0, limit)
    low = jnp.minimum(jnp.floor(coordinate), limit - 1)
    return low.astype(jnp.int32), coordinate - low

  y0, fy = sample_points(boxes[:, 1], boxes[:, 3], padded.shape[0] - 1)
  x0, fx = sample_points(boxes[:, 0], boxes[:, 2], padded.shape[1] - 1)

  def gather(dy, dx):
    return padded[(y0 + dy)[:, :, None], (x0 + dx)[:, None, :]]

  fx, fy = fx[:, None, :, None], fy[:, :, None, None]
  top = gather(0, 0) * (1 - fx) + gather(0, 1) * fx
  bottom = gather(1, 0) * (1 - fx) + gather(1, 1) * fx
  return (top * (1 - fy) + bottom * fy) * np.float32(1 / 255)


@functools.lru_cache(maxsize=8)
def compiled_scorer(model: models.HyperFace):
  """``(params, padded image, boxes (C, 4)) -> outputs``, jitted; shared by
  every analyzer of this model (one compile per padded image shape)."""

  def score(params, padded, boxes):
    crops = crop_and_resize(padded, boxes, model.config.input_size)
    outputs = model.apply(params, crops, deterministic=True)
    landmarks = outputs['landmarks'].reshape(-1, models.NUM_LANDMARKS, 2)
    return {
        'scores': jax.nn.softmax(outputs['detection'])[:, 1],
        # DPLH Eq. 9 inverted: crop units -> image pixels.
        'landmarks': boxes[:, None, :2] + landmarks * boxes[:, None, 2:],
        'visibility': outputs['visibility'],
        'pose': outputs['pose'],
        'gender_probability': jax.nn.softmax(outputs['gender'])[:, 1],
    }

  return jax.jit(score)


def as_rgb_uint8(image: Any) -> np.ndarray:
  """An (H, W, 3) uint8 array from (H, W), (H, W, 3) or (H, W, 4) uint8."""
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f'image dtype {array.dtype}: pass uint8 RGB pixels '
                     '(e.g. np.asarray(PIL.Image.open(path).convert("RGB"))).')
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4) or min(
      array.shape[:2]) < 1:
    raise ValueError(f'image shape {array.shape}: pass (H, W, 3) RGB.')
  return np.ascontiguousarray(array[..., :3])


class FaceAnalyzer:
  """Finds faces in whole images with a trained HyperFace."""

  def __init__(self, released: export.ReleasedModel,
               options: AnalyzerOptions = AnalyzerOptions()):
    self.released = released
    self.options = options
    self.model, _ = model_setup.build_model(
        ml_collections.ConfigDict(released.config))
    self._params = released.params
    self._scorer = compiled_scorer(self.model)

  @classmethod
  def from_workdir(cls, workdir: str,
                   options: AnalyzerOptions = AnalyzerOptions()
                   ) -> 'FaceAnalyzer':
    """The latest checkpoint's params (only those) of a dplh-train run."""
    return cls(export.params_from_workdir(workdir), options)

  @classmethod
  def from_params_file(cls, path: str,
                       options: AnalyzerOptions = AnalyzerOptions()
                       ) -> 'FaceAnalyzer':
    """A file written by ``dplh-export`` (``export.export_params``)."""
    return cls(export.read_params_file(path), options)

  def num_compiles(self) -> int:
    """Compiles of the jitted network so far (one per image size bucket)."""
    return self._scorer._cache_size()  # pylint: disable=protected-access

  def _padded(self, image: np.ndarray) -> np.ndarray:
    bucket = self.options.size_bucket
    height, width = image.shape[:2]
    padded = np.zeros((math.ceil(height / bucket) * bucket + 2,
                       math.ceil(width / bucket) * bucket + 2, 3), np.float32)
    padded[1:height + 1, 1:width + 1] = image
    return padded

  def _score_fn(self, padded: jax.Array):
    chunk = self.options.chunk_size

    def score(boxes: np.ndarray) -> irp_lnms.Detections:
      boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
      num = len(boxes)
      filled = np.tile(np.array([[0, 0, 1, 1]], np.float32),
                       (max(1, math.ceil(num / chunk)) * chunk, 1))
      filled[:num] = boxes
      parts = [jax.device_get(self._scorer(self._params, padded,
                                           filled[start:start + chunk]))
               for start in range(0, len(filled), chunk)]
      outputs = {key: np.concatenate([p[key] for p in parts])[:num]
                 for key in parts[0]}
      return irp_lnms.Detections(boxes=boxes, **outputs)

    return score

  def detections(self, image: Any) -> irp_lnms.Detections:
    """Every face L-NMS keeps, whatever its score, highest score first."""
    image = as_rgb_uint8(image)
    options = self.options
    padded = jnp.asarray(self._padded(image))
    windows = candidates_lib.sliding_windows(image.shape[:2], options.windows)
    found = irp_lnms.iterative_region_proposals(
        self._score_fn(padded), windows, rounds=options.irp_rounds,
        threshold=options.detection_threshold,
        max_boxes=options.max_irp_boxes)
    return irp_lnms.landmark_nms(found, iou_threshold=options.nms_iou,
                                 top_k=options.top_k,
                                 overlap=options.nms_overlap)

  def analyze(self, image: Any, min_score: float | None = None
              ) -> list[Face]:
    """The faces in ``image`` (uint8 RGB), highest score first.

    Args:
      image: (H, W, 3) uint8 RGB (grey (H, W) and RGBA are accepted).
      min_score: faces below this score are left out; None: the options'.
    """
    threshold = self.options.min_score if min_score is None else min_score
    found = self.detections(image)
    return [
        Face(box=found.boxes[i], score=float(found.scores[i]),
             landmarks=found.landmarks[i],
             visibility=(found.visibility[i] > 0.5).astype(np.float32),
             visibility_scores=found.visibility[i], pose=found.pose[i],
             gender_probability=float(found.gender_probability[i]))
        for i in range(found.count) if found.scores[i] >= threshold
    ]

  def describe(self) -> dict[str, Any]:
    """What the faces come from: the params' source, step and privacy."""
    privacy = self.released.privacy or {}
    return {'source': self.released.source, 'step': self.released.step,
            'finished': self.released.privacy is not None,
            'dp': self.released.config.get('dp'),
            'epsilon': privacy.get('epsilon'), 'delta': privacy.get('delta')}
