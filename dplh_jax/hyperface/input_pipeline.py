"""Random-access face source -> per-image examples of K proposals -> batches.

One example is one image (the unit of privacy) with K proposals (M*K in
training with ``views`` M > 1: augmentation_views.py). A batch is a dict of
NumPy arrays with a leading example axis B:

==================== =============== ======= ================================
key                  shape           dtype   meaning
==================== =============== ======= ================================
crops                (B, K, S, S, 3) float32 RGB in [0, 1] (not normalised)
detection_label      (B, K)          int32   1 face, 0 background, -1 ignored
landmarks            (B, K, 21, 2)   float32 crop-normalised, DPLH Eq. 9
visibility           (B, K, 21)      float32 {0, 1}
pose                 (B, K, 3)       float32 roll, pitch, yaw (radians)
gender               (B, K)          int32   0 female, 1 male, -1 unknown
has_landmarks        (B,)            bool    image has landmark labels
has_pose             (B,)            bool    every face has a pose label
has_gender           (B,)            bool    every face has a known gender
boxes                (B, K, 4)       float32 proposal, pixel [x, y, w, h]
face_boxes           (B, K, 4)       float32 matched face box, 0 if none
image_index          (B,)            int32   source index, -1 for padding
is_padding_example   (B,)            bool    slot holds no image
==================== =============== ======= ================================

Only positives (label 1) carry landmarks, visibility, pose and gender;
invisible landmarks are 0. Padding examples are never read from the source:
their arrays are 0, with detection_label and gender -1 (no label), has_* False,
so they add zero loss even before the is_padding_example mask is applied.

Randomness never comes from global state: a training image draws its proposals
and flip from ``default_rng([seed, 1, step, index])`` (view v > 0 appends v);
evaluation uses
``default_rng([seed, 2, index])`` and never flips, so it is the same in every
epoch and every process. Here ``index`` is the image's source index
(``image_index``), its identity: the randomness of an image depends only on
that, the step and the seed, never on its slot in the batch or on which other
images were sampled (docs/DESIGN.md, Privacy rules, rule 8). For the same reason
a batch carries no slot position: the model's dropout is keyed by
``image_index`` too (``losses.per_image_loss``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dplh_jax.dp import batch_selection
from dplh_jax.hyperface import augmentation_views
from dplh_jax.hyperface import proposals
from dplh_jax.hyperface.datasets import face_schema

_TRAIN_STREAM, _EVAL_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """How images become examples.

  Attributes:
    crop_size: side S of the square model input.
    num_proposals: K proposals per image.
    num_positives: positives per image when the faces allow; the rest are
      negatives.
    jitter_per_face: candidate boxes jittered around each face.
    num_random: candidate boxes of random size and place.
    flip_probability: chance of mirroring a training image (never in eval).
    views: augmented views M of each TRAINING image in its one example
      (augmentation_views.py); evaluation always builds one.
  """
  crop_size: int = 64
  num_proposals: int = 8
  num_positives: int = 4
  jitter_per_face: int = 16
  num_random: int = 16
  flip_probability: float = 0.5
  views: int = 1


def faces_from_record(record: dict[str, Any], index: int) -> proposals.Faces:
  """Checks a source record and returns its faces as arrays.

  Raises:
    ValueError: naming the record, for a box that is not finite and positive,
      a visible landmark that is not finite or lies outside the image, a
      visibility not in {0, 1}, an infinite pose or a gender not in {-1, 0, 1}.
  """
  raw = record['faces']
  num_faces = len(raw['bbox'])
  if num_faces == 0:
    return proposals.empty_faces()
  faces = proposals.Faces(
      np.asarray(raw['bbox'], np.float32).reshape(num_faces, 4),
      np.asarray(raw['landmarks'], np.float32).reshape(
          num_faces, face_schema.NUM_LANDMARKS, 2),
      np.asarray(raw['visibility'], np.float32).reshape(
          num_faces, face_schema.NUM_LANDMARKS),
      np.asarray(raw['pose'], np.float32).reshape(num_faces, 3),
      np.asarray(raw['gender'], np.int32).reshape(num_faces))
  height, width = np.shape(record['image'])[:2]
  name = f'record {index} ({_image_id(record)})'
  for face in range(num_faces):
    box = faces.boxes[face]
    if not (np.all(np.isfinite(box)) and box[2] > 0 and box[3] > 0):
      raise ValueError(f'{name}, face {face}: bbox {box.tolist()} is not a '
                       'finite pixel [x, y, w, h] with w, h > 0.')
    visibility = faces.visibility[face]
    if not np.all((visibility == 0) | (visibility == 1)):
      raise ValueError(f'{name}, face {face}: visibility must be 0 or 1, got '
                       f'{visibility.tolist()}.')
    visible = faces.landmarks[face][visibility == 1]
    outside = ~np.all(np.isfinite(visible), axis=1) | np.any(
        (visible < -1.0) | (visible > np.array([width, height]) + 1.0), axis=1)
    if np.any(outside):
      raise ValueError(
          f'{name}, face {face}: visible landmark(s) '
          f'{visible[outside].tolist()} are not finite or lie outside the '
          f'{width}x{height} image.')
    if np.any(np.isinf(faces.pose[face])):
      raise ValueError(f'{name}, face {face}: pose {faces.pose[face]} is '
                       'infinite (NaN marks a missing pose).')
    if faces.gender[face] not in (-1, 0, 1):
      raise ValueError(f'{name}, face {face}: gender {faces.gender[face]} is '
                       'not -1, 0 or 1.')
  return faces


def _read(source: Sequence[dict[str, Any]], indices: list[int]) -> list:
  """Reads records, in one call where the source supports it (TFDS)."""
  if not indices:
    return []
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _image_id(record: dict[str, Any]) -> str:
  image_id = record.get('image_id', b'?')
  return image_id.decode() if isinstance(image_id, bytes) else str(image_id)


def image_example(record: dict[str, Any], index: int,
                  rng: np.random.Generator, config: PipelineConfig, *,
                  train: bool) -> dict[str, np.ndarray]:
  """One image's example: K proposals, their crops and targets."""
  image = np.asarray(record['image'])
  faces = faces_from_record(record, index)
  image_hw = image.shape[:2]
  if train and rng.uniform() < config.flip_probability:
    image = proposals.flip_image(image)
    faces = proposals.flip_faces(faces, image_hw[1])
  candidates = proposals.candidate_boxes(
      faces, image_hw, rng, jitter_per_face=config.jitter_per_face,
      num_random=config.num_random)
  targets = proposals.select_proposals(
      proposals.label_proposals(candidates, faces), config.num_proposals,
      config.num_positives, rng, image_hw)
  has_face = targets.matched_face >= 0
  face_boxes = np.zeros((config.num_proposals, 4), np.float32)
  if len(faces.boxes):
    face_boxes[has_face] = faces.boxes[targets.matched_face[has_face]]
  size = (config.crop_size, config.crop_size)
  return {
      'crops': proposals.crop_and_resize(image, targets.boxes, size),
      'detection_label': targets.detection_label,
      'landmarks': targets.landmarks,
      'visibility': targets.visibility,
      'pose': targets.pose,
      'gender': targets.gender,
      'has_landmarks': np.bool_(True),
      'has_pose': np.bool_(np.all(np.isfinite(faces.pose))),
      'has_gender': np.bool_(np.all(faces.gender >= 0)),
      'boxes': targets.boxes,
      'face_boxes': face_boxes,
      'image_index': np.int32(index),
  }


def padding_example(config: PipelineConfig) -> dict[str, np.ndarray]:
  """An example that holds no image and carries no label."""
  k, s, n = config.num_proposals, config.crop_size, face_schema.NUM_LANDMARKS
  return {
      'crops': np.zeros((k, s, s, 3), np.float32),
      'detection_label': np.full((k,), proposals.IGNORED, np.int32),
      'landmarks': np.zeros((k, n, 2), np.float32),
      'visibility': np.zeros((k, n), np.float32),
      'pose': np.zeros((k, 3), np.float32),
      'gender': np.full((k,), face_schema.GENDER_UNKNOWN, np.int32),
      'has_landmarks': np.bool_(False),
      'has_pose': np.bool_(False),
      'has_gender': np.bool_(False),
      'boxes': np.zeros((k, 4), np.float32),
      'face_boxes': np.zeros((k, 4), np.float32),
      'image_index': np.int32(-1),
  }


def build_batch(source: Sequence[dict[str, Any]], indices: np.ndarray,
                is_padding_example: np.ndarray, config: PipelineConfig, *,
                seed: int, step: int | None = None) -> dict[str, np.ndarray]:
  """The batch for exactly these slots (any length, e.g. m sampler chunks).

  Args:
    source: random-access records (``builder.as_data_source()[split]``).
    indices: (B,) int source indices; ignored at padding slots.
    is_padding_example: (B,) bool; True slots are never read.
    config: the pipeline configuration.
    seed: seed of the proposal/flip randomness.
    step: training step (training randomness, with flips and
      ``config.views`` views per image); None for deterministic evaluation
      (one view).

  Returns:
    The batch dict described in the module docstring.
  """
  indices = np.asarray(indices).reshape(-1)
  is_padding_example = np.asarray(is_padding_example, bool).reshape(-1)
  if indices.shape != is_padding_example.shape:
    raise ValueError(f'indices {indices.shape} and is_padding_example '
                     f'{is_padding_example.shape} differ in shape.')
  real = np.flatnonzero(~is_padding_example)
  bad = indices[real][(indices[real] < 0) | (indices[real] >= len(source))]
  if bad.size:
    raise ValueError(f'indices {bad.tolist()} are outside the source of '
                     f'{len(source)} records.')
  records = _read(source, [int(i) for i in indices[real]])
  train = step is not None
  views = config.views if train else 1
  # Padding has M*K proposals too, so every slot has one shape.
  padding = augmentation_views.concatenate_views(
      [padding_example(config)] * views)
  examples = [padding] * len(indices)
  for slot, record in zip(real, records):
    index = int(indices[slot])
    entropy = ([seed, _TRAIN_STREAM, step, index] if train
               else [seed, _EVAL_STREAM, index])
    examples[slot] = augmentation_views.multi_view_example(
        functools.partial(image_example, record, index, config=config,
                          train=train), entropy, views)
  batch = {key: np.stack([example[key] for example in examples])
           for key in padding}
  batch['is_padding_example'] = is_padding_example
  return batch


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How one step's Poisson sample is split over processes and devices.

  Attributes:
    num_processes: processes training together (``jax.process_count()``).
    process_index: this process.
    local_shards: data-parallel devices of this process: its part of the
      batch is split into that many equal blocks, one per device.
  """
  num_processes: int = 1
  process_index: int = 0
  local_shards: int = 1


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def chunk_size(sampler: batch_selection.PoissonSampler,
               layout: BatchLayout) -> int:
  """Slots per chunk of one process's part of the batch.

  One process: the sampler's ``padded_batch_size``. Several: the 99.9%
  quantile (at ``1e-3 / num_processes``, so that no share overflows with
  probability at least 0.999) of a share's size, ``Binomial(ceil(n / P),
  q)``; halving the sampler's size would overflow far more often, since a
  share's size varies relatively more. Either rounded up to a multiple of
  ``local_shards``.
  """
  num_processes = layout.num_processes
  if num_processes == 1:
    size = sampler.padded_batch_size
  else:
    size = batch_selection.default_padded_batch_size(
        -(-sampler.num_examples // num_processes), sampler.sampling_prob,
        overflow_probability=1e-3 / num_processes)
  return _round_up(size, layout.local_shards)


def local_slots(sample: batch_selection.SampledIndices, slots_per_chunk: int,
                layout: BatchLayout) -> tuple[np.ndarray, np.ndarray]:
  """``(indices, is_padding_example)``: this process's part of the batch.

  The process keeps its share of the sample
  (``batch_selection.process_share``: indices ``i % num_processes ==
  process_index``), so across processes every sampled image is in exactly
  one slot, and it reads only those images. Every process pads to the same
  length, ``chunks * slots_per_chunk`` (:func:`chunk_size`), with
  ``chunks`` the fewest that hold the largest share: every process holds
  the whole sample (shared sampler entropy), so all compute that shape
  without communicating. The real images are dealt round-robin to the
  ``local_shards`` equal blocks, padding last in each, so each device gets
  as many images as the others give or take one; a device's chunks of
  padding only are skipped. The order of slots changes only the order of
  the sum: each image's randomness follows its index, not its slot
  (docs/DESIGN.md, Privacy rules, rule 8). With one process and one shard
  these are the sampler's own slots.
  """
  num_processes, shards = layout.num_processes, layout.local_shards
  if slots_per_chunk % shards:
    raise ValueError(f'slots_per_chunk={slots_per_chunk} is not a multiple '
                     f'of local_shards={shards}; use chunk_size().')
  mine = batch_selection.process_share(sample, layout.process_index,
                                       num_processes)
  real = np.asarray(sample.indices)[~np.asarray(sample.is_padding_example)]
  largest = int(np.bincount(real % num_processes,
                            minlength=num_processes).max())
  chunks = max(1, -(-largest // slots_per_chunk))
  block = chunks * slots_per_chunk // shards
  indices = np.full((shards, block), batch_selection.PADDING_INDEX, np.int64)
  for shard in range(shards):
    dealt = mine[shard::shards]
    indices[shard, :len(dealt)] = dealt
  indices = indices.reshape(-1)
  return indices, indices == batch_selection.PADDING_INDEX


def train_batches(source: Sequence[dict[str, Any]], sampler: Any,
                  config: PipelineConfig, *, seed: int, start_step: int,
                  num_steps: int, layout: BatchLayout | None = None
                  ) -> Iterator[tuple[int, dict[str, np.ndarray], dict]]:
  """``(step, batch, sampler_state)`` for steps ``start_step..num_steps-1``.

  The training stream: one Poisson sample per step, drawn in order.

  Args:
    source: random-access records.
    sampler: a ``batch_selection.PoissonSampler``; called once per step.
    config: the pipeline configuration.
    seed: seed of the proposal/flip randomness (not of the sampler).
    start_step: step number of the first batch (for resuming).
    num_steps: the step after the last one.
    layout: several devices or processes: each batch is this process's
      part (:func:`local_slots`), and only its images are read. None: the
      sampler's slots, as one device.

  Each item carries the sampler state right after its own draw, so a
  checkpoint saved after training that step restores the sampler exactly
  there, even when batches are prefetched ahead in another thread.
  """
  slots_per_chunk = chunk_size(sampler, layout) if layout else None
  for step in range(start_step, num_steps):
    sample = sampler.sample()
    state = sampler.state_dict()
    indices, is_padding_example = sample
    if layout is not None:
      indices, is_padding_example = local_slots(sample, slots_per_chunk,
                                                layout)
    yield step, build_batch(source, indices, is_padding_example, config,
                            seed=seed, step=step), state


def eval_batches(source: Sequence[dict[str, Any]], config: PipelineConfig, *,
                 batch_size: int, seed: int = 0
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every record once, in order, in batches padded to ``batch_size``.

  Deterministic: fixed proposals per image (from ``seed`` and the index), no
  flips; the last batch is completed with padding examples.
  """
  for start in range(0, len(source), batch_size):
    indices = np.full((batch_size,), -1, np.int64)
    stop = min(start + batch_size, len(source))
    indices[:stop - start] = np.arange(start, stop)
    yield build_batch(source, indices, indices < 0, config, seed=seed)

