"""HyperFace's clip groups: one clip norm per task, so no task weighting can
hand the whole clip to one task (``config.clip_groups``).

With ``clip_groups='per_task'`` each image's gradient is clipped per group
(``dplh_jax.dp.group_clipping``), the groups being

* ``trunk``: the shared trunk (``models.TRUNK``), but for Cross-SEC's gates;
* ``{task}_head``: that task's head and, in a Cross-SEC model
  (``task_features='cross_sec'``), the task's own gate layers
  ``trunk/cross_sec/{task}_squeeze|excite|cross``, which only that task's
  features pass through;
* ``log_sigma_sq``: the learned task weights (``models.LOG_SIGMA_SQ``), when
  the model has them.

Each of the G groups gets ``C_g = C / sqrt(G)`` with ``C =
config.l2_norm_clip`` (to the float64 ulp that keeps the total at most C),
so one image's clipped gradient has norm at most ``sqrt(sum_g C_g**2) = C``
(or the float64 just below): the sensitivity, the noise ``sigma * C`` and
the accountant are those of the single clip norm (docs/DESIGN.md, Per-group and
adaptive clipping). What changes is only how an image's budget ``C`` is
shared: a task whose gradient is large (or weighted up by the learned
weights) is clipped within its own group and cannot crowd out the others.
The trunk, read by every task, is one group: splitting it per task would
need each task's share of the trunk gradient, which a single backward pass
does not give.

``clip_groups='none'`` (default) returns the float ``C`` itself: the one
clip norm over the whole gradient, exactly as before.
"""

from __future__ import annotations

import math

import ml_collections

from dplh_jax.dp import clip_norms as clip_norms_lib
from dplh_jax.dp import group_clipping
from dplh_jax.hyperface import models

NONE, PER_TASK = 'none', 'per_task'
CLIP_GROUPS = (NONE, PER_TASK)
# Name of the trunk's group; the heads' groups are named after their modules.
TRUNK_GROUP = models.TRUNK
# How many float64 steps (ulps) above C / sqrt(G) the search for C_g starts
# (_equal_share).
_ULP_SEARCH = 4


def head_group(task: str) -> str:
  """The group of ``task``'s head (and of its Cross-SEC gates)."""
  return f'{task}_head'


def task_group_of(path: group_clipping.Path) -> str:
  """The group of the parameter at ``path`` (``('params', 'trunk', ...)``).

  A plain module-level function, so equal groupings compare (and hash)
  equal and equal configs share one compiled train step.

  Raises:
    ValueError: for a parameter that is in none of the groups (a new
      submodule must be given a group here, not fall into one by default).
  """
  top = path[1] if len(path) > 1 and path[0] == 'params' else None
  if top == models.LOG_SIGMA_SQ:
    return models.LOG_SIGMA_SQ
  if top == models.TRUNK:
    if len(path) > 3 and path[2] == models.CROSS_SEC_GATES:
      for task in models.TASK_NAMES:
        if path[3].startswith(f'{task}_'):
          return head_group(task)
    else:
      return TRUNK_GROUP
  for task in models.TASK_NAMES:
    if top == head_group(task):
      return head_group(task)
  raise ValueError(f'Parameter {"/".join(path)} is in no HyperFace clip '
                   "group; give it one in clip_groups.task_group_of or use "
                   "config.clip_groups='none'.")


def group_names(model: models.HyperFace) -> tuple[str, ...]:
  """The groups of ``model``'s parameters, in a fixed order."""
  names = (TRUNK_GROUP,) + tuple(head_group(t) for t in models.TASK_NAMES)
  if model.learn_task_weights:
    names += (models.LOG_SIGMA_SQ,)
  return names


def _equal_share(l2_norm_clip: float, num_groups: int) -> float:
  """The largest ``C_g`` near ``C / sqrt(G)`` whose total ``sqrt(G *
  C_g**2)`` (float64, as ``dp_aggregate`` computes it) is at most ``C``.

  The quotient's total can miss ``C`` by an ulp either way (C = 1, G = 7:
  one below; C = 3, G = 6: one above). Stepping down from a few ulps above
  finds the total equal to ``C`` when some ``C_g`` gives it, else the
  nearest one below (one ulp of ``C_g`` moves the total by about two of
  ``C``): the sensitivity never exceeds the configured ``C``, and the noise
  is calibrated to the total actually used either way.
  """
  share = l2_norm_clip / math.sqrt(num_groups)
  for _ in range(_ULP_SEARCH):
    share = math.nextafter(share, math.inf)
  while group_clipping.total_l2_norm_clip([share] * num_groups) > l2_norm_clip:
    share = math.nextafter(share, 0.0)
  return share


def clip_norms(config: ml_collections.ConfigDict, model: models.HyperFace
               ) -> float | group_clipping.GroupClipNorms:
  """What the train step clips each image's gradient to: the float
  ``config.l2_norm_clip`` (``clip_groups='none'``) or per-task
  ``GroupClipNorms`` of total ``sqrt(sum_g C_g**2) = config.l2_norm_clip``.

  Guarantee: either way, adding or removing one image moves the clipped sum
  by at most ``config.l2_norm_clip`` in L2 norm. Pass the same object to the
  clipping and to ``dp_aggregate`` (which refuses a sum clipped otherwise).

  Raises:
    ValueError: an unknown ``config.clip_groups``, or a ``C`` whose per-group
      share ``C / sqrt(G)`` is below the smallest clip norm allowed.
  """
  kind = config.get('clip_groups', NONE)
  l2_norm_clip = float(config.l2_norm_clip)
  if kind == NONE:
    return l2_norm_clip
  if kind != PER_TASK:
    raise ValueError(f'config.clip_groups={kind!r}: use one of '
                     f'{CLIP_GROUPS}.')
  names = group_names(model)
  smallest = clip_norms_lib.MIN_NOISE_STD * math.sqrt(len(names))
  if l2_norm_clip < smallest:
    raise ValueError(
        f'config.l2_norm_clip={l2_norm_clip:g} is too small for '
        f"clip_groups='per_task': its {len(names)} groups get C/sqrt(G) each, "
        f'which must be >= {clip_norms_lib.MIN_NOISE_STD:g}; use '
        f'l2_norm_clip >= {smallest:.3g}.')
  share = _equal_share(l2_norm_clip, len(names))
  return group_clipping.GroupClipNorms.from_function(
      task_group_of, {name: share for name in names})
