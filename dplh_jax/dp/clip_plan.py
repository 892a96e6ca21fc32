"""How each example's gradient is clipped, resolved for one parameter tree.

The one mechanism behind both clipping paths (``dp_transform.clip_and_sum``,
which the vmap path runs per chunk, and ``one_pass_clipping``): a path
computes, per group, each example's norm over the group's parameters (with
``clip_norms``' scaled norms, so docs/DESIGN.md, Privacy rules, rule 9 holds
per group), and :meth:`ClipPlan.factors` turns those norms into clip scales
and counts. What ``l2_norm_clip`` may be:

* a float ``C``: one group; the sum's L2 sensitivity is ``C``;
* a ``group_clipping.GroupClipNorms``: group ``g`` clipped to ``C_g``;
  sensitivity ``sqrt(sum_g C_g**2)``;
* :data:`ADAPTIVE`: one group clipped to the step's ``C``, an array read
  from the adaptive transform's state (``adaptive_clipping``) and passed at
  call time as ``clip_norm``; the sum is in units of ``C`` (each example adds
  ``g_i * min(1/C, 1/||g_i||)``), so its sensitivity is 1 whatever ``C`` is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp

from dplh_jax.dp import clip_norms
from dplh_jax.dp import group_clipping

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AdaptiveClipNorm:
  """The type of :data:`ADAPTIVE`."""

  def __repr__(self) -> str:
    return 'ADAPTIVE'


# Pass as l2_norm_clip to clip to the adaptive transform's current C.
ADAPTIVE = AdaptiveClipNorm()
ClipSpec = Union[float, group_clipping.GroupClipNorms, AdaptiveClipNorm]


def check_spec(l2_norm_clip: Any) -> ClipSpec:
  """Returns a valid clipping specification (a float C in [1e-30, 1e30], a
  ``GroupClipNorms`` or ``ADAPTIVE``), or raises."""
  if isinstance(l2_norm_clip, (group_clipping.GroupClipNorms,
                               AdaptiveClipNorm)):
    return l2_norm_clip
  return clip_norms.check_l2_norm_clip(l2_norm_clip)


def sensitivity(l2_norm_clip: ClipSpec) -> float:
  """The L2 sensitivity of a sum clipped by ``l2_norm_clip``: ``C``,
  ``sqrt(sum_g C_g**2)``, or 1 (an adaptive sum is in units of its ``C``)."""
  if isinstance(l2_norm_clip, group_clipping.GroupClipNorms):
    return l2_norm_clip.total_l2_norm_clip
  if isinstance(l2_norm_clip, AdaptiveClipNorm):
    return 1.0
  return float(l2_norm_clip)


class ClipNormTag(NamedTuple):
  """What an adaptive ``ClippedSum`` records of the ``C`` it was clipped to,
  in additive form (so it survives ``jnp.add`` and ``psum`` of chunks): per
  batch slot, padding included, ``C`` and ``1/C``.

  Two sums, because one can be fooled: slots at ``1.5 C`` and ``0.5 C`` sum
  to ``C`` per slot. Both match ``n C`` and ``n / C`` only if every slot was
  clipped to ``C`` (up to float32 rounding): the arithmetic and harmonic
  means of the slots' values agree only when they are all equal. ``1/C``
  rather than ``C**2``, which overflows float32 above ``C ~ 1.8e19``.

  Attributes:
    clip_norm_sum: float32 ``sum over slots of C``.
    inverse_clip_norm_sum: float32 ``sum over slots of 1/C``.
    num_slots: int32 number of slots (a static shape: public).
  """
  clip_norm_sum: jax.Array
  inverse_clip_norm_sum: jax.Array
  num_slots: jax.Array


# Relative tolerance of tag_matches: float32 rounding of C * slots summed
# over up to ~100 chunks or devices stays below 1e-5.
TAG_RTOL = 1e-5


def clip_norm_tag(clip_norm: jax.Array, num_slots: int) -> ClipNormTag:
  """The tag of ``num_slots`` slots clipped to ``clip_norm``."""
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  return ClipNormTag(clip_norm * num_slots, num_slots / clip_norm,
                     jnp.asarray(num_slots, jnp.int32))


def tag_matches(tag: ClipNormTag, clip_norm: jax.Array) -> jax.Array:
  """Whether every slot was clipped to ``clip_norm`` (both sums to relative
  1e-5; False if either is NaN). It reads only ``C`` values and shapes, so
  its outcome reveals no data."""
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  slots = tag.num_slots.astype(jnp.float32)

  def close(value, expected):
    return jnp.abs(value - expected) <= TAG_RTOL * expected

  return (close(tag.clip_norm_sum, clip_norm * slots)
          & close(tag.inverse_clip_norm_sum, slots / clip_norm))


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """A clipping specification resolved on one tree of parameters.

  Attributes:
    leaf_groups: group index of each leaf, ``jax.tree.leaves`` order.
    paths: each leaf's path (``group_clipping.path_of``).
    l2_norm_clips: ``C_g`` per group (an array for ADAPTIVE).
    normalize: whether scales are ``min(1/C, 1/norm)`` (ADAPTIVE).
    l2_norm_clip: the clipped sum's L2 sensitivity (``ClippedSum``'s).
    clipping: what a ``ClippedSum`` records: None (one float ``C``), a
      ``GroupAssignment`` or ``ADAPTIVE``.
  """
  leaf_groups: tuple[int, ...]
  paths: tuple[tuple[str, ...], ...]
  l2_norm_clips: tuple[Any, ...]
  normalize: bool
  l2_norm_clip: float
  clipping: Any

  @property
  def num_groups(self) -> int:
    return len(self.l2_norm_clips)

  def group_of_path(self, path: tuple[str, ...]) -> int:
    return self.leaf_groups[self.paths.index(path)]

  def leaves_by_group(self) -> list[list[int]]:
    """Leaf indices (tree order) of each group; no group is empty."""
    return [[j for j, g in enumerate(self.leaf_groups) if g == group]
            for group in range(self.num_groups)]

  def factors(self, group_norms: Sequence[clip_norms.ScaledNorm],
              is_finite: jax.Array, is_real: jax.Array) -> GroupFactors:
    """Clip scales from each group's ``(n,)`` norms (``group_clip_factors``)."""
    if len(group_norms) != self.num_groups:
      raise ValueError(f'Expected {self.num_groups} group norms, got '
                       f'{len(group_norms)}.')
    return GroupFactors(self, clip_norms.group_clip_factors(
        group_norms, is_finite, is_real, self.l2_norm_clips, self.normalize))


@dataclasses.dataclass(frozen=True)
class GroupFactors:
  """Per-group :class:`clip_norms.ClipFactors` of a chunk and its counts."""
  plan: ClipPlan
  groups: tuple[clip_norms.ClipFactors, ...]

  def of_leaf(self, leaf: int) -> clip_norms.ClipFactors:
    return self.groups[self.plan.leaf_groups[leaf]]

  def of_path(self, path: tuple[str, ...]) -> clip_norms.ClipFactors:
    return self.groups[self.plan.group_of_path(path)]

  def counts(self) -> dict[str, jax.Array]:
    """``ClippedSum`` counts: an example is clipped if any of its groups is;
    non-finite examples are zeroed in every group and counted once."""
    first = self.groups[0]
    clipped = first.clipped
    for group in self.groups[1:]:
      clipped = clipped | group.clipped
    counts = dict(
        num_examples=jnp.sum(first.is_real, dtype=jnp.int32),
        num_clipped=jnp.sum(clipped, dtype=jnp.int32),
        num_non_finite=jnp.sum(first.is_real & ~first.keep, dtype=jnp.int32))
    if self.plan.normalize:
      counts['clip_norm_tag'] = clip_norm_tag(first.l2_norm_clip,
                                              first.is_real.shape[0])
    return counts


def plan(l2_norm_clip: ClipSpec, tree: PyTree,
         clip_norm: jax.Array | None = None) -> ClipPlan:
  """Resolves ``l2_norm_clip`` on ``tree`` (per-example gradients or the
  parameters: only its structure and key paths are read).

  Args:
    l2_norm_clip: a float ``C``, a ``GroupClipNorms`` or ``ADAPTIVE``.
    tree: the parameter (or gradient) tree.
    clip_norm: with ADAPTIVE only, the step's ``C``, a scalar from
      ``adaptive_clipping.current_clip_norm(opt_state)``.
  """
  l2_norm_clip = check_spec(l2_norm_clip)
  adaptive = isinstance(l2_norm_clip, AdaptiveClipNorm)
  if adaptive != (clip_norm is not None):
    raise ValueError(
        'Pass clip_norm=adaptive_clipping.current_clip_norm(opt_state) '
        'exactly when l2_norm_clip is adaptive_clipping.ADAPTIVE, got '
        f'l2_norm_clip={l2_norm_clip!r} and clip_norm={clip_norm!r}.')
  paths = tuple(group_clipping.leaf_paths(tree))
  if isinstance(l2_norm_clip, group_clipping.GroupClipNorms):
    groups, assignment = l2_norm_clip.assign(tree)
    return ClipPlan(tuple(groups), paths,
                    tuple(c for _, c in l2_norm_clip.norms), False,
                    l2_norm_clip.total_l2_norm_clip, assignment)
  one_group = (0,) * len(paths)
  if adaptive:
    return ClipPlan(one_group, paths, (_checked_clip_norm(clip_norm),), True,
                    1.0, ADAPTIVE)
  return ClipPlan(one_group, paths, (l2_norm_clip,), False, l2_norm_clip,
                  None)


def _checked_clip_norm(clip_norm: Any) -> jax.Array:
  """The adaptive ``C`` as a float32 scalar in [1e-30, 1e30]: checked when it
  is concrete, clamped when traced. The clamp is what keeps a traced ``C``
  that does not come from the transform's state private: at ``C = 0`` an
  example with a zero gradient would add ``0 * (1/0) = NaN``, a
  data-dependent output the noise does not cover; clamped, every example
  adds at most 1 whatever ``C`` is (a NaN ``C`` becomes 1e30). The tag check
  then catches the misuse, but privacy does not rest on it."""
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  if clip_norm.shape != ():
    raise ValueError(f'clip_norm must be a scalar, got shape '
                     f'{clip_norm.shape}.')
  if not isinstance(clip_norm, jax.core.Tracer):
    clip_norms.check_l2_norm_clip(float(clip_norm), 'clip_norm')
    return clip_norm
  low, high = clip_norms.float32_within(clip_norms.MIN_NOISE_STD,
                                        clip_norms.MAX_L2_NORM_CLIP)
  return jnp.clip(jnp.where(jnp.isnan(clip_norm), high, clip_norm), low, high)
