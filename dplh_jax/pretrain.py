"""Detection pre-training (DPLH 3.2.1): a single-task model seeds HyperFace.

A :class:`~dplh_jax.models.DetectionNet` (HyperFace's trunk + a detection
head) is trained first; its trunk then initializes HyperFace's trunk.

Privacy: if the pre-training data is the same private data (as in DPLH), the
pre-training phase must itself be DP-SGD (same per-image loss -> clip ->
noise) and its (noise multiplier, sampling rate, steps) must be composed into
the SAME accountant as the main phase before any epsilon is reported
(privacy rule 6); the copied weights carry its privacy cost with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax

from dplh_jax import losses
from dplh_jax import models


def detection_pretrain_loss(params, example: Mapping[str, jax.Array],
                            rng: jax.Array | None, *, model: nn.Module
                            ) -> tuple[jax.Array, dict]:
  """Detection cross-entropy of ONE image's proposals, for DP pre-training.

  Same contract as :func:`dplh_jax.losses.per_image_loss` (one image = one
  unit of privacy; the dropout key is ``fold_in(rng, example['image_index'])``,
  the image's identity, never its slot: privacy rule 8), but only ``crops``,
  ``detection_label`` and, with ``rng``, ``image_index`` are read.

  Returns:
    ``(loss, {'task_losses': {'detection': loss}, 'task_counts': {...}})``.
  """
  if rng is None:
    logits = model.apply(params, example['crops'], deterministic=True)
  else:
    logits = model.apply(
        params, example['crops'], deterministic=False,
        rngs={'dropout': jax.random.fold_in(rng,
                                                 example['image_index'])})
  loss, count = losses.detection_loss(logits, example['detection_label'])
  return loss, {'task_losses': {'detection': loss},
                'task_counts': {'detection': count}}


def _check_same_structure(name: str, target, source) -> None:
  target_shapes = jax.tree.map(lambda leaf: leaf.shape, target)
  source_shapes = jax.tree.map(lambda leaf: leaf.shape, source)
  if target_shapes != source_shapes:
    raise ValueError(f'{name} parameters differ between HyperFace and '
                     'DetectionNet; build both from the same HyperFaceConfig.')


def init_hyperface_from_detection(hyperface_params, detection_params, *,
                                  copy_detection_head: bool = False):
  """Returns HyperFace variables whose trunk is DetectionNet's trunk.

  Args:
    hyperface_params: freshly initialized HyperFace variables
      (``{'params': ...}``); left unchanged.
    detection_params: pre-trained DetectionNet variables of the same config.
    copy_detection_head: also copy the detection head (same task, same
      shapes). DPLH only initializes the trunk, hence the default.

  Returns:
    New HyperFace variables; all other heads and ``log_sigma_sq`` keep their
    initial values.

  Raises:
    ValueError: if the two models were built with different configs.
  """
  copied = [models.TRUNK] + (['detection_head'] if copy_detection_head else [])
  new_params = dict(hyperface_params['params'])
  for name in copied:
    _check_same_structure(name, new_params[name],
                          detection_params['params'][name])
    new_params[name] = detection_params['params'][name]
  return {**hyperface_params, 'params': new_params}
