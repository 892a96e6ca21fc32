"""DP detection pre-training inside the main job (DPLH 3.2.1).

DPLH first trains a single-task detection model with DP on the same private
data and starts HyperFace's trunk from it. Here that is the first
``P = round(config.detection_pretrain_epochs / q)`` steps of the one run
(``privacy_plan``), with the same q and the same sigma as the main steps,
one accountant and one compiled step:

* the per-image loss is detection only (:func:`mask_tasks`): the other
  tasks' labels are marked unavailable, so their losses and counts are
  exactly 0 and uncertainty weighting adds no regularizer for them. The
  image is still one privacy unit: its gradient is clipped to C and the
  noise sigma*C is added once to the sum, as in every step;
* the parameters off the detection path (:func:`off_detection_path`) do not
  move: after ``dp_aggregate`` they get an optimizer of their own that starts
  at step P (:func:`with_frozen_start`), as fresh as if it had been created
  then (Adam's moments and bias correction start there). That is
  post-processing of the DP release, so it costs nothing;
* the accountant records the steps as two named phases, ``detection_pretrain``
  then ``hyperface``, both in the privacy report.

Which phase a step is in is a public function of the step count, read from
the train state (the mask) and from the late optimizer's own count (the
freeze), both checkpointed, so a resume in either phase replays exactly.
After the P steps the full multi-task loss trains everything, from the
pre-trained trunk and detection head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dplh_jax.dp import group_clipping
from dplh_jax.hyperface import models

# The accountant's phase names (accounting.Phase.name) of the two parts.
PRETRAIN_PHASE = 'detection_pretrain'
MAIN_PHASE = 'hyperface'
PHASE_NAMES = (PRETRAIN_PHASE, MAIN_PHASE)

# Availability masks (losses.py) that gate every task but detection:
# has_landmarks gates landmarks and visibility.
_OTHER_TASK_MASKS = ('has_landmarks', 'has_pose', 'has_gender')
_OTHER_TASKS = tuple(t for t in models.TASK_NAMES if t != 'detection')


def mask_tasks(batch: Mapping[str, jax.Array], pretraining: jax.Array
               ) -> dict[str, jax.Array]:
  """The batch with every task but detection unavailable while
  ``pretraining``.

  Marking labels unavailable is how the losses already treat a missing
  label: the task's loss and count are exactly 0 with zero gradient, and
  uncertainty weighting drops its regularizer (``[n_i > 0]``). Detection
  labels and everything else are untouched.

  Args:
    batch: a padded training batch (``input_pipeline.build_batch``), each
      value with the images on its leading axis.
    pretraining: scalar bool (traced), a public function of the step.

  Returns:
    A new dict; with ``pretraining`` False its masks are the batch's own.
  """
  keep = jnp.logical_not(pretraining)
  num_images = batch['is_padding_example'].shape[0]
  masked = dict(batch)
  for key in _OTHER_TASK_MASKS:
    available = (jnp.asarray(batch[key], bool) if key in batch
                 else jnp.ones((num_images,), bool))
    masked[key] = jnp.logical_and(available, keep)
  return masked


def off_detection_path(names: Sequence[str]) -> bool:
  """Whether the parameter at ``names`` (its path in the variables) is off
  the detection path: the other tasks' heads, the learned log sigma^2 and
  the other tasks' Cross-SEC gates (``detection_cross`` reads the other
  gates' descriptors but is detection's own, so it trains)."""
  names = tuple(names)
  if models.LOG_SIGMA_SQ in names:
    return True
  for task in _OTHER_TASKS:
    if f'{task}_head' in names:
      return True
    if models.CROSS_SEC_GATES in names and any(
        name.startswith(f'{task}_') for name in names):
      return True
  return False


class DelayedState(NamedTuple):
  """State of :func:`start_after`.

  Attributes:
    count: updates seen so far (frozen ones included).
    inner: the inner optimizer's state, untouched while frozen.
  """
  count: jax.Array
  inner: optax.OptState


def start_after(num_steps: int, inner: optax.GradientTransformation
                ) -> optax.GradientTransformation:
  """``inner`` started at update ``num_steps``: zero updates before it.

  While frozen, the updates are 0 and ``inner``'s state is kept as
  initialized, so from update ``num_steps`` on ``inner`` runs as if it had
  just been created: Adam's moments start at 0 with the bias correction of
  its own first step, not of step ``num_steps`` (which would scale its first
  updates up to several times). Which update it is comes from the state's
  own count, checkpointed with the optimizer state.

  Args:
    num_steps: how many first updates are zero (>= 0).
    inner: the optimizer to start late.

  Returns:
    An optax ``GradientTransformation`` with a :class:`DelayedState`.
  """
  if num_steps < 0:
    raise ValueError(f'num_steps={num_steps}: must be >= 0 (0: no freeze).')

  def init(params):
    return DelayedState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    frozen = state.count < num_steps
    # Computed every step and discarded while frozen: branch-free, and the
    # heads are a small part of the model.
    new_updates, new_inner = inner.update(updates, state.inner, params)

    new_updates = jax.tree.map(
        lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates)
    new_inner = jax.tree.map(lambda before, after: jnp.where(
        frozen, before, after), state.inner, new_inner)
    return new_updates, DelayedState(
        optax.safe_int32_increment(state.count), new_inner)

  return optax.GradientTransformation(init, update)


TRAINED, FROZEN = 'trained', 'frozen'


def with_frozen_start(
    make_optimizer: Callable[[int], optax.GradientTransformation],
    num_steps: int,
    is_frozen: Callable[[Sequence[str]], bool] = off_detection_path
) -> optax.GradientTransformation:
  """The optimizer, with the leaves ``is_frozen`` names started at update
  ``num_steps`` by an optimizer of their own (:func:`start_after`).

  Chained after ``dp_aggregate``, it only post-processes the released
  (noised) gradient: no privacy cost. The frozen leaves neither move nor
  collect noise in their optimizer's moments during the first ``num_steps``.

  Args:
    make_optimizer: ``offset -> optimizer`` whose learning-rate schedule is
      read at ``count + offset``, so the late optimizer keeps the run's
      schedule in time (its count starts at ``num_steps`` steps late).
    num_steps: the frozen updates, P.
    is_frozen: from a leaf's path names to whether it is frozen.
  """
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FROZEN if is_frozen(group_clipping.path_of(path)) else TRAINED,
        params)
  return optax.multi_transform(
      {TRAINED: make_optimizer(0),
       FROZEN: start_after(num_steps, make_optimizer(num_steps))}, labels)
