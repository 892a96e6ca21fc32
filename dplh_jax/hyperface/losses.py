"""Per-image HyperFace / DPLH task losses (DPLH Eq. 1-5) and the total loss.

One image is one unit of privacy (docs/DESIGN.md, Privacy rules, rule 1): every
function here takes the outputs for ONE image's K proposals and that image's
targets and returns losses for that image, so that ``per_example_grads`` gives
one gradient per image that covers all its proposals.

Targets of one image (a dict of arrays, K proposals):

* ``detection_label`` (K,) int: 1 face, 0 background, -1 ignored. Use -1 for
  padded proposals too: a -1 proposal contributes to no task at all.
* ``landmarks`` (K, 21, 2) float, crop-normalized (DPLH Eq. 9).
* ``visibility`` (K, 21) float in {0, 1}.
* ``pose`` (K, 3) float, roll / pitch / yaw in radians.
* ``gender`` (K,) int: 0 female, 1 male, -1 unknown.
* Optional availability masks for labels a dataset lacks, each bool of shape
  () (whole image) or (K,) (per proposal); a missing key means available:
  ``has_landmarks`` (gates landmarks and visibility), ``has_pose``,
  ``has_gender``.

Unavailable labels may hold anything, NaN included: they are replaced before
any arithmetic, so they add exactly zero loss and zero gradient.

Which proposals feed which task (DPLH): detection uses every non-ignored
proposal; landmarks (masked by visibility), visibility, pose and gender use
the positives (label 1) whose label is available. Each task loss is the mean
over its own contributing terms; with no term it is exactly 0 (gradient 0).

With a Cross-SEC model and a :class:`Decorrelated` weighting, the image's
loss also holds the de-correlation term (:func:`decorrelation_loss`), so it
is inside the image's clipped gradient like the task losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dplh_jax.hyperface import models
from dplh_jax.hyperface import task_weighting

Targets = Mapping[str, jax.Array]


def masked_mean(values: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Mean of ``values`` where ``mask``; 0 (and zero gradient) if none.

  Args:
    values: terms, finite wherever ``mask`` is True.
    mask: bool, broadcastable to ``values``.

  Returns:
    ``(mean, count)``: the mean of the selected terms and how many there were.
  """
  mask = jnp.broadcast_to(mask, values.shape)
  count = jnp.sum(mask, dtype=jnp.float32)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(count, 1.0), count


def _availability(targets: Targets, key: str, num_proposals: int
                  ) -> jax.Array:
  if key not in targets:
    return jnp.ones((num_proposals,), bool)
  return jnp.broadcast_to(jnp.asarray(targets[key], bool), (num_proposals,))


def detection_loss(logits: jax.Array, detection_label: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Face/background cross-entropy over non-ignored proposals (DPLH Eq. 1)."""
  valid = detection_label >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(valid, detection_label, 0))
  return masked_mean(ce, valid)


def landmark_loss(predicted: jax.Array, landmarks: jax.Array,
                  visibility: jax.Array, supervised: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Visibility-masked squared error of the 21 points (DPLH Eq. 2).

  Per visible point of a supervised proposal the term is
  ``((x - a)^2 + (y - b)^2) / 2``, HyperFace's 1/(2N) normalization with N
  counting only the contributing (visible) points.

  Args:
    predicted: ``(K, 42)`` as (x0, y0, x1, y1, ...).
    landmarks: ``(K, 21, 2)`` targets.
    visibility: ``(K, 21)``; invisible points add nothing.
    supervised: ``(K,)`` bool, positives with landmark labels.

  Returns:
    ``(loss, number of contributing points)``.
  """
  mask = supervised[:, None] & (visibility > 0.5)
  targets = jnp.where(mask[..., None], landmarks, 0.0)
  predicted = predicted.reshape(landmarks.shape)
  per_point = 0.5 * jnp.sum((predicted - targets) ** 2, axis=-1)
  return masked_mean(per_point, mask)


def visibility_loss(predicted: jax.Array, visibility: jax.Array,
                    supervised: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Squared error of the 21 visibilities, mean per point (DPLH Eq. 3)."""
  mask = jnp.broadcast_to(supervised[:, None], visibility.shape)
  targets = jnp.where(mask, visibility, 0.0)
  return masked_mean((predicted - targets) ** 2, mask)


def pose_loss(predicted: jax.Array, pose: jax.Array, supervised: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """Squared error of (roll, pitch, yaw), mean per proposal (DPLH Eq. 4)."""
  targets = jnp.where(supervised[:, None], pose, 0.0)
  per_proposal = jnp.mean((predicted - targets) ** 2, axis=-1)
  return masked_mean(per_proposal, supervised)


def gender_loss(logits: jax.Array, gender: jax.Array, supervised: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Gender cross-entropy on supervised proposals of known gender (Eq. 5)."""
  mask = supervised & (gender >= 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(mask, gender, 0))
  return masked_mean(ce, mask)


def task_losses(outputs: Mapping[str, jax.Array], targets: Targets
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """All five losses of one image.

  Args:
    outputs: ``HyperFace`` outputs for the image's K proposals.
    targets: the image's targets (see the module docstring).

  Returns:
    ``(losses, counts)``, both keyed by task name: the scalar task losses and
    how many terms contributed to each (0 means the loss is exactly 0).
  """
  label = targets['detection_label']
  num_proposals = label.shape[0]
  positive = label == 1
  has_landmarks = positive & _availability(targets, 'has_landmarks',
                                           num_proposals)
  results = {
      'detection': detection_loss(outputs['detection'], label),
      'landmarks': landmark_loss(outputs['landmarks'], targets['landmarks'],
                                 targets['visibility'], has_landmarks),
      'visibility': visibility_loss(outputs['visibility'],
                                    targets['visibility'], has_landmarks),
      'pose': pose_loss(outputs['pose'], targets['pose'],
                        positive & _availability(targets, 'has_pose',
                                                 num_proposals)),
      'gender': gender_loss(outputs['gender'], targets['gender'],
                            positive & _availability(targets, 'has_gender',
                                                     num_proposals)),
  }
  losses = {task: results[task][0] for task in models.TASK_NAMES}
  counts = {task: results[task][1] for task in models.TASK_NAMES}
  return losses, counts


# Added to the squared norms of the centered descriptors before the division,
# so that a constant (or all-zero) descriptor gives correlation 0, not NaN.
_DESCRIPTOR_EPSILON = 1e-12


def decorrelation_loss(descriptors: jax.Array, valid: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
  """Mean squared correlation between different tasks' channel descriptors.

  For each crop and each pair of tasks ``s < t``, ``r_st`` is the Pearson
  correlation over channels of their descriptors (centered over channels,
  then the cosine; cross_sec.py defines ``d_t``); the loss is the mean of
  ``r_st^2`` over the pairs and the valid crops. It is 0 exactly when every
  pair of centered descriptors is orthogonal, about 1 for copies (whose
  centered squared norm is far above the 1e-12 added to it); for independent random descriptors of ``C`` channels its
  expectation is ``1 / (C - 1)``, the chance correlation of ``C`` samples.
  Computed from one image's crops alone.

  Args:
    descriptors: ``(K, T, C)`` of one image.
    valid: ``(K,)`` bool, the crops that count (non-ignored proposals).

  Returns:
    ``(loss, number of valid crops)``.
  """
  centered = descriptors - jnp.mean(descriptors, axis=-1, keepdims=True)
  unit = centered * jax.lax.rsqrt(
      jnp.sum(centered**2, axis=-1, keepdims=True) + _DESCRIPTOR_EPSILON)
  correlation = jnp.einsum('ksc,ktc->kst', unit, unit)
  num_tasks = descriptors.shape[-2]
  pairs = jnp.triu(jnp.ones((num_tasks, num_tasks), bool), k=1)
  per_crop = jnp.sum(jnp.where(pairs, correlation**2, 0.0), axis=(-2, -1)) / (
      max(1, num_tasks * (num_tasks - 1) // 2))
  return masked_mean(per_crop, valid)


@dataclasses.dataclass(frozen=True)
class Decorrelated:
  """A task weighting plus the de-correlation loss at a FIXED weight.

  ``loss = base loss + weight * decorrelation_loss``. The weight is a
  hyper-parameter (``config.decorrelation_weight``), not learned: a learned
  weight would only learn to switch the penalty off. Needs a Cross-SEC model
  (its ``TASK_DESCRIPTORS`` output).

  Attributes:
    base: the task weighting (fixed or uncertainty).
    weight: the de-correlation weight, > 0.
  """

  base: task_weighting.Weighting
  weight: float

  def combine(self, params, losses: Mapping[str, jax.Array],
              counts: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    return self.base.combine(params, losses, counts)


def per_image_loss(params, example: Mapping[str, jax.Array],
                   rng: jax.Array | None, *, model: nn.Module,
                   weighting: task_weighting.Weighting
                   ) -> tuple[jax.Array, dict]:
  """Weighted multi-task loss of ONE image; the function to differentiate.

  Feed it to ``per_example_grads`` (after binding ``model`` and ``weighting``
  with ``functools.partial``): the gradient of this scalar w.r.t. ``params`` is
  the image's per-example gradient, which the DP aggregator then clips and
  noises. It contains the gradient of the learned log sigma^2 weights too, so
  those are clipped and noised with everything else (docs/DESIGN.md, Privacy
  rules, rule 4).

  Args:
    params: HyperFace variables, ``{'params': ...}``.
    example: one image: ``crops`` (K, H, W, 3), the targets (module docstring)
      and, when ``rng`` is given, ``image_index``, the image's index in the
      data set (its identity; ``input_pipeline.build_batch`` sets it).
    rng: None for deterministic evaluation (no dropout); otherwise the step's
      key (``fold_in(seed key, step)``), shared by the whole batch.
      ``per_example_grads`` broadcasts it, and the image's dropout key is
      ``fold_in(rng, example['image_index'])``: every image gets its own mask,
      which depends only on the image, the step and the seed (privacy rule
      8), never on its slot in the batch or on which other images were
      sampled. A mask keyed by the slot would change for every image after
      a removed one, and the clipped sum would move by more than ``C``.
    model: a ``HyperFace`` module.
    weighting: how task losses combine (``task_weighting``); a
      :class:`Decorrelated` one adds the de-correlation term.

  Returns:
    ``(loss, aux)``: the scalar loss and metrics ``{'total_loss': loss,
    'task_losses': {task:
    loss}, 'task_counts': {task: count}, **weighting metrics}``.
  """
  if rng is None:
    outputs = model.apply(params, example['crops'], deterministic=True)
  else:
    dropout_rng = jax.random.fold_in(rng, example['image_index'])
    outputs = model.apply(params, example['crops'], deterministic=False,
                          rngs={'dropout': dropout_rng})
  return loss_from_outputs(params, outputs, example, weighting=weighting)


def loss_from_outputs(params, outputs: Mapping[str, jax.Array],
                      example: Mapping[str, jax.Array], *,
                      weighting: task_weighting.Weighting
                      ) -> tuple[jax.Array, dict]:
  """:func:`per_image_loss` given the model's outputs for the image.

  For steps that run the model on many images at once (the non-private step);
  ``params`` is read only by the weighting (the learned log sigma^2).
  """
  losses, counts = task_losses(outputs, example)
  loss, weighting_metrics = weighting.combine(params, losses, counts)
  if isinstance(weighting, Decorrelated):
    if models.TASK_DESCRIPTORS not in outputs:
      raise ValueError('a Decorrelated weighting needs a model with '
                       "task_features='cross_sec' (no task descriptors).")
    penalty, _ = decorrelation_loss(outputs[models.TASK_DESCRIPTORS],
                                    example['detection_label'] >= 0)
    loss = loss + weighting.weight * penalty
    weighting_metrics = {**weighting_metrics, 'decorrelation_loss': penalty}
  return loss, {'total_loss': loss, 'task_losses': losses,
                'task_counts': counts, **weighting_metrics}
