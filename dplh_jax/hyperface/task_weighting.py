"""How HyperFace's five task losses combine into one per-image loss.

The weightings share one interface, ``combine(params, losses, counts) ->
(loss, metrics)``:

* :class:`FixedWeighting`: HyperFace's hand-set weights.
* :class:`UncertaintyWeighting`: DPLH Eq. 7 (after Kendall, Gal and Cipolla,
  CVPR 2018), with one learned ``s_i = log sigma_i^2`` per task.
* :class:`BoundedUncertaintyWeighting`: the same, each weight kept within a
  factor of its start (``config.task_weight_bound``).

Privacy: the learned ``s_i`` are read from the model's own ``params`` tree
(``HyperFace(learn_task_weights=True)`` owns them), so their gradient is part of
each image's per-example gradient and goes through the same clipping and the
same Gaussian noise as the network weights (docs/DESIGN.md, Privacy rules, rule
4). Never keep them in a separate, non-private optimizer state: they are fitted
to the private task losses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Protocol

import jax
import jax.numpy as jnp

from dplh_jax.hyperface import models

# HyperFace's fixed loss weights (lambda_D, lambda_L, lambda_V, lambda_P,
# lambda_G) from Ranjan et al.
HYPERFACE_LOSS_WEIGHTS = {
    'detection': 1.0,
    'landmarks': 5.0,
    'visibility': 0.5,
    'pose': 5.0,
    'gender': 2.0,
}

TaskScalars = Mapping[str, jax.Array]


class Weighting(Protocol):
  """Combines per-task losses of one image into its scalar loss."""

  def combine(self, params, losses: TaskScalars, counts: TaskScalars
              ) -> tuple[jax.Array, dict]:
    """Returns ``(loss, metrics)`` for one image.

    Args:
      params: the model variables (``{'params': ...}``).
      losses: scalar loss per task name.
      counts: number of terms behind each loss (0: the task is absent from
        this image).
    """


@dataclasses.dataclass(frozen=True)
class FixedWeighting:
  """``L = sum_i lambda_i L_i`` with constant ``lambda_i``.

  Pair it with ``HyperFace(learn_task_weights=False)``: an unused log sigma^2
  parameter would only collect DP noise.

  >>> w = FixedWeighting({'detection': 1.0, 'landmarks': 5.0,
  ...                     'visibility': 0.5, 'pose': 5.0, 'gender': 2.0})
  >>> losses = {t: jnp.float32(1.0) for t in models.TASK_NAMES}
  >>> float(w.combine(None, losses, losses)[0])
  13.5
  """

  weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: dict(HYPERFACE_LOSS_WEIGHTS))

  def __hash__(self) -> int:
    # Hashable by value, so equal weightings share a compiled train step.
    return hash(tuple(sorted(self.weights.items())))

  def combine(self, params, losses: TaskScalars, counts: TaskScalars
              ) -> tuple[jax.Array, dict]:
    del params, counts  # Absent tasks already have loss exactly 0.
    loss = sum(self.weights[task] * losses[task] for task in models.TASK_NAMES)
    return loss, {'task_weights': {task: jnp.float32(self.weights[task])
                                   for task in models.TASK_NAMES}}


def with_initial_weights(params, weights: Mapping[str, float]):
  """Sets log sigma^2 so the uncertainty weights start at ``weights``.

  The weight of task i is ``0.5 exp(-s_i)``, so ``s_i = log(0.5 / w_i)``.
  Starting from HyperFace's fixed weights instead of all-equal ones matters
  under DP: with few, noisy steps the learned weights move slowly, and equal
  weights leave the small-loss tasks (landmarks, pose) without signal. The
  initial value is public, so it costs no privacy.

  >>> import numpy as np
  >>> params = {'params': {'log_sigma_sq': jnp.zeros(5)}}
  >>> params = with_initial_weights(params, HYPERFACE_LOSS_WEIGHTS)
  >>> np.round(0.5 * np.exp(-log_sigma_sq(params)), 3).tolist()
  [1.0, 5.0, 0.5, 5.0, 2.0]
  """
  values = initial_log_sigma_sq(weights)
  current = log_sigma_sq(params)
  return {**params, 'params': {**params['params'], models.LOG_SIGMA_SQ:
                               values.astype(current.dtype)}}


def initial_log_sigma_sq(weights: Mapping[str, float]) -> jax.Array:
  """``s_i = log(0.5 / w_i)`` in float32, TASK_NAMES order: the log sigma^2
  at which the uncertainty weights are ``weights``."""
  return jnp.log(0.5 / jnp.array([weights[task] for task in models.TASK_NAMES],
                                 jnp.float32))


def log_sigma_sq(params) -> jax.Array:
  """The learned ``(num_tasks,)`` log sigma^2 vector, in TASK_NAMES order.

  Raises:
    ValueError: if the model was built with ``learn_task_weights=False``.
  """
  if models.LOG_SIGMA_SQ not in params['params']:
    raise ValueError('UncertaintyWeighting needs HyperFace(learn_task_weights='
                     'True): the params have no log sigma^2 task weights.')
  return params['params'][models.LOG_SIGMA_SQ]


@dataclasses.dataclass(frozen=True)
class UncertaintyWeighting:
  """Learned homoscedastic-uncertainty weights (DPLH Eq. 7).

  With ``s_i = log sigma_i^2`` the per-image loss is::

      L = sum_i [ 0.5 * exp(-s_i) * L_i + regularizer_scale * s_i * [n_i > 0] ]

  and its gradient w.r.t. ``s_i`` is ``-0.5 exp(-s_i) L_i + regularizer_scale``
  when task i has terms in the image (``n_i > 0``), else exactly 0.

  Which form: ``regularizer_scale=1`` (default) is DPLH Eq. 7 as written,
  ``L_i / (2 sigma_i^2) + log sigma_i^2``; ``regularizer_scale=0.5`` is
  Kendall et al.'s Gaussian negative log-likelihood (``... + log sigma_i``).
  The two only differ in where the weights settle: the stationary point is
  ``sigma_i^2 = L_i / (2 * regularizer_scale)``, i.e. effective weight
  ``regularizer_scale / L_i``. So the RELATIVE task weights are identical and
  DPLH's form doubles them all (a global scale that interacts with the
  learning rate and the clip norm). We default to the paper we reproduce.

  Why the ``[n_i > 0]`` gate: an image without, e.g., a known gender has
  ``L_gender = 0`` by construction; without the gate its regularizer would
  still pull ``s_gender`` down, so tasks with sparse labels would be
  up-weighted for lack of data rather than for low noise. Gated, the batch
  gradient fits ``sigma_i^2`` to the images that do supervise task i.
  """

  regularizer_scale: float = 1.0

  def effective_log_sigma_sq(self, params) -> jax.Array:
    """The ``s_i`` the loss uses: here the parameter itself."""
    return log_sigma_sq(params)

  def combine(self, params, losses: TaskScalars, counts: TaskScalars
              ) -> tuple[jax.Array, dict]:
    log_var = self.effective_log_sigma_sq(params)
    loss = jnp.float32(0.0)
    for i, task in enumerate(models.TASK_NAMES):
      present = (counts[task] > 0).astype(log_var.dtype)
      loss = loss + (0.5 * jnp.exp(-log_var[i]) * losses[task]
                     + self.regularizer_scale * log_var[i] * present)
    metrics = {
        'sigma': {task: jnp.exp(0.5 * log_var[i])
                  for i, task in enumerate(models.TASK_NAMES)},
        'task_weights': {task: 0.5 * jnp.exp(-log_var[i])
                         for i, task in enumerate(models.TASK_NAMES)},
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class BoundedUncertaintyWeighting(UncertaintyWeighting):
  """DPLH's learned weights, kept within a factor ``bound`` of their start
  (``config.task_weight_bound``).

  Unbounded, a task's stationary weight is ``regularizer_scale / L_i``, so a
  task whose loss is small (landmarks, pose) is weighted up without limit
  and its gradient takes over the image's clip budget (docs/DESIGN.md,
  Model). Here the loss reads, instead of the parameter ``raw_i``, the
  smooth reparameterization::

      s_i = s0_i + log(bound) * tanh((raw_i - s0_i) / log(bound))

  with ``s0`` the initial log sigma^2 (``config.initial_task_weights``). So
  ``s_i`` stays within ``log(bound)`` of ``s0_i`` for every ``raw_i``
  (``+-1e30`` included) and each weight ``0.5 exp(-s_i)`` within
  ``[w0_i / bound, w0_i * bound]``, up to float32 rounding (relative ~1e-7).
  Near the start (``raw = s0``) ``s = raw`` to first order, so the weights
  learn as DPLH's; near the bound their gradient fades (``1 - tanh^2``).
  The loss is Eq. 7 with ``s_i`` in place of ``log sigma_i^2``, so inside the
  bound the weights settle where DPLH's do, and where DPLH's would pass it
  they stop at it.

  Privacy: ``raw`` is the model parameter ``log_sigma_sq``, inside each
  image's clipped gradient as before (docs/DESIGN.md, Privacy rules, rule
  4); ``bound`` and ``s0`` are public constants.

  >>> import numpy as np
  >>> w = BoundedUncertaintyWeighting.around(HYPERFACE_LOSS_WEIGHTS, 2.0)
  >>> params = {'params': {'log_sigma_sq': jnp.full(5, -1e30)}}
  >>> np.round(0.5 * np.exp(-w.effective_log_sigma_sq(params)), 3).tolist()
  [2.0, 10.0, 1.0, 10.0, 4.0]

  Attributes:
    bound: the factor > 1 each weight may move from its start.
    initial_log_sigma_sq: ``s0``, one float per task in TASK_NAMES order.
  """

  bound: float = 2.0
  initial_log_sigma_sq: tuple[float, ...] = (0.0,) * len(models.TASK_NAMES)

  def __post_init__(self):
    if not (math.isfinite(self.bound) and self.bound > 1):
      raise ValueError(f'task weight bound={self.bound!r}: must be a finite '
                       'factor > 1 (0 in the config: unbounded).')
    if len(self.initial_log_sigma_sq) != len(models.TASK_NAMES) or not all(
        math.isfinite(s) for s in self.initial_log_sigma_sq):
      raise ValueError(
          f'initial_log_sigma_sq={self.initial_log_sigma_sq!r}: give one '
          f'finite value per task of {models.TASK_NAMES}.')

  @classmethod
  def around(cls, weights: Mapping[str, float], bound: float,
             regularizer_scale: float = 1.0) -> BoundedUncertaintyWeighting:
    """Bounded around the start ``weights`` (what ``with_initial_weights``
    sets, computed the same way)."""
    start = tuple(float(s) for s in initial_log_sigma_sq(weights))
    return cls(regularizer_scale, float(bound), start)

  def effective_log_sigma_sq(self, params) -> jax.Array:
    """``s0 + log(bound) tanh((raw - s0) / log(bound))``."""
    raw = log_sigma_sq(params)
    start = jnp.asarray(self.initial_log_sigma_sq, raw.dtype)
    radius = jnp.asarray(math.log(self.bound), raw.dtype)
    return start + radius * jnp.tanh((raw - start) / radius)
