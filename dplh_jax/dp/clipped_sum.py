"""The clipped per-example gradient sum of a batch, before noise.

:class:`ClippedSum` is what every clipping path returns and what
``dp_transform.dp_aggregate`` adds noise to; :func:`clip_and_sum` clips
per-example gradients that are already materialized (the vmap path runs it on
each chunk). The clipping itself (norms, groups, scales, counts) is
``clip_plan`` over ``clip_norms``.
"""

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from dplh_jax.dp import clip_norms
from dplh_jax.dp import clip_plan
from dplh_jax.dp import group_clipping

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=['grad_sum', 'num_examples', 'num_clipped', 'num_non_finite',
                 'clip_norm_tag'],
    meta_fields=['l2_norm_clip', 'clipping'])
@dataclasses.dataclass(frozen=True)
class ClippedSum:
  """The clipped per-example gradient sum of a batch, before noise.

  Every array field is additive, so sums of chunks (microbatches, devices)
  are combined with ``jax.tree.map(jnp.add, a, b)`` or ``jax.lax.psum``; noise
  is then added once to the total. The clipping is static metadata, so sums
  made with different clip norms cannot be combined, and
  :func:`dp_transform.dp_aggregate` refuses a sum clipped otherwise than it
  was built for.

  Attributes:
    grad_sum: Sum of clipped per-example gradients, float32 leaves. Its L2
      sensitivity to adding or removing one example is ``l2_norm_clip``.
    num_examples: Real (non-padding) examples seen, finite or not.
    num_clipped: Real finite examples whose norm exceeded the clip (in any
      group, with per-group clipping).
    num_non_finite: Real examples with a NaN/Inf gradient; they contribute 0
      (in every group).
    l2_norm_clip: The L2 sensitivity of ``grad_sum``, which the noise is
      calibrated to: the clip norm ``C``, ``sqrt(sum_g C_g**2)`` with
      per-group clipping, or 1 with adaptive clipping (``grad_sum`` is then
      in units of the step's ``C``).
    clipping: None (one clip norm), the ``group_clipping.GroupAssignment``
      or ``clip_plan.ADAPTIVE``.
    clip_norm_tag: adaptive clipping only (else None): the
      ``clip_plan.ClipNormTag`` of the ``C`` the slots were clipped to.
  """

  grad_sum: PyTree
  num_examples: jax.Array
  num_clipped: jax.Array
  num_non_finite: jax.Array
  l2_norm_clip: float
  clipping: Any = None
  clip_norm_tag: clip_plan.ClipNormTag | None = None



def clip_and_sum(
    per_example_grads: PyTree,
    l2_norm_clip: clip_plan.ClipSpec,
    is_padding_example: jax.Array | None = None,
    *,
    clip_norm: jax.Array | None = None,
) -> ClippedSum:
  """Clips each example's gradient to global L2 norm ``l2_norm_clip`` and sums.

  Guarantee: the returned ``grad_sum`` changes by at most ``l2_norm_clip`` in
  L2 norm (up to float32 rounding, relative ~1e-7) when one real example is
  added or removed, for every finite float32 input: the norm is computed
  after scaling each example by a power of two so that no square underflows
  or overflows, and the sum adds exactly the scaled values the norm was
  computed from (``clip_norms``). Padding examples and examples with any
  NaN/Inf entry (after the cast to float32) contribute exactly zero and are
  counted: they are selected away with ``where``, so a NaN cannot leak into
  the sum through ``0 * NaN``. The weighted sum is an elementwise multiply
  and reduction, not a matrix product, so it is exact to float32 rounding on
  every backend (a dot would run in TF32 or bfloat16 on GPUs and TPUs by
  default, and its rounding could push one example past ``C``).

  With a ``group_clipping.GroupClipNorms``, each group's norm and scale are
  computed the same way over the group's leaves alone, so the contribution
  restricted to group ``g`` has norm at most ``C_g`` and the sum's
  sensitivity is ``sqrt(sum_g C_g**2)``; a non-finite example is zeroed in
  every group. With ``clip_plan.ADAPTIVE``, the example is clipped to
  ``clip_norm`` and added in units of it (sensitivity 1).

  Args:
    per_example_grads: Pytree of floating-point leaves that share a leading
      example axis.
    l2_norm_clip: Clipping norm ``C`` > 0 (a Python number), a
      ``GroupClipNorms`` or ``clip_plan.ADAPTIVE``.
    is_padding_example: Optional bool vector over the example axis; True
      marks padding. None means every example is real.
    clip_norm: with ADAPTIVE only, the step's ``C`` (from
      ``adaptive_clipping.current_clip_norm``).

  Returns:
    The clipped sum (float32 leaves) and example counts.
  """
  plan = clip_plan.plan(l2_norm_clip, per_example_grads, clip_norm)
  leaves = jax.tree.leaves(per_example_grads)
  if not leaves:
    raise ValueError('per_example_grads has no leaves.')
  num_examples = leaves[0].shape[0] if leaves[0].ndim else None
  for leaf in leaves:
    if leaf.ndim == 0 or leaf.shape[0] != num_examples:
      raise ValueError(
          'Every leaf of per_example_grads needs the same leading example '
          f'axis (of size {num_examples}); got a leaf of shape {leaf.shape}.')
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f'Gradient leaves must be real floating point, got '
                      f'{leaf.dtype} (shape {leaf.shape}).')
  if is_padding_example is None:
    is_real = jnp.ones((num_examples,), dtype=bool)
  else:
    if is_padding_example.shape != (num_examples,):
      raise ValueError(
          f'is_padding_example has shape {is_padding_example.shape}, '
          f'expected ({num_examples},).')
    is_real = jnp.logical_not(is_padding_example)

  # Cast once, so the finiteness check, the norm and the sum see the same
  # values (a float64 1e39 is finite but becomes inf in float32).
  grads32 = [g.astype(jnp.float32).reshape(num_examples, -1) for g in leaves]
  is_finite = functools.reduce(
      jnp.logical_and, [jnp.all(jnp.isfinite(g), axis=1) for g in grads32])
  # The norm and the sum both read the example scaled by a power of two (one
  # per example and group), so no square underflows or overflows and each
  # group norm bounds what is added for that group.
  group_leaves = plan.leaves_by_group()
  scaled, exponents, group_norms = [None] * len(leaves), [None] * len(
      leaves), []
  for members in group_leaves:
    norms, group_scaled, exponent = clip_norms.scaled_norms(
        [grads32[j] for j in members])
    group_norms.append(norms)
    for j, values in zip(members, group_scaled):
      scaled[j], exponents[j] = values, exponent
  factors = plan.factors(group_norms, is_finite, is_real)
  sums = [factors.of_leaf(j).weighted_sum(scaled[j], exponents[j]).reshape(
      leaf.shape[1:]) for j, leaf in enumerate(leaves)]
  return clipped_sum_of(factors, jax.tree.unflatten(
      jax.tree.structure(per_example_grads), sums))


def clipped_sum_of(
    factors: clip_plan.GroupFactors | clip_norms.ClipFactors,
    grad_sum: PyTree) -> ClippedSum:
  """Wraps a sum weighted by ``factors`` with the example counts and the
  clipping (a bare ``ClipFactors``: one static clip norm)."""
  if isinstance(factors, clip_norms.ClipFactors):
    if factors.normalize:
      raise ValueError('Normalized (adaptive) factors need their ClipPlan.')
    plan = clip_plan.plan(factors.l2_norm_clip, grad_sum)
    factors = clip_plan.GroupFactors(plan, (factors,))
  return ClippedSum(grad_sum=grad_sum, l2_norm_clip=factors.plan.l2_norm_clip,
                    clipping=factors.plan.clipping, **factors.counts())


def check_matches_params(grads: PyTree, params: PyTree, leading: int
                         ) -> None:
  """Raises unless each gradient leaf has its parameter's shape after
  ``leading`` axes: this catches an aggregated gradient passed as per-example
  gradients (it would be clipped coordinate by coordinate, with no bound)."""
  grad_leaves, grad_def = jax.tree.flatten(grads)
  param_leaves, param_def = jax.tree.flatten(params)
  if grad_def != param_def:
    raise ValueError(f'Gradient tree {grad_def} differs from params tree '
                     f'{param_def}.')
  for grad, param in zip(grad_leaves, param_leaves):
    if grad.shape[leading:] != jnp.shape(param):
      what = ('per-example gradients (example axis first)' if leading
              else 'the clipped sum')
      raise ValueError(
          f'Expected {what} shaped like params: got a leaf of shape '
          f'{grad.shape} for a parameter of shape {jnp.shape(param)}. '
          'Already aggregated gradients have no per-example bound and '
          'cannot be made private here.')



def _describe(clipping: Any, l2_norm_clip: float) -> str:
  if clipping is None or isinstance(clipping, numbers.Real):
    return f'{l2_norm_clip}'
  if isinstance(clipping, clip_plan.AdaptiveClipNorm):
    return 'the adaptive clip norm (a sum in units of C)'
  return f'groups {dict(clipping.norms)} (sensitivity {l2_norm_clip})'


def check_clipping_matches(clipped: ClippedSum,
                           clipping: clip_plan.ClipSpec) -> None:
  """Raises unless ``clipped`` was clipped as ``clipping`` says: the same
  float ``C``, the same groups and norms on the same parameters, or
  adaptive; a sum clipped otherwise would get noise for another
  sensitivity."""
  if isinstance(clipping, group_clipping.GroupClipNorms):
    expected = clipping.assign(clipped.grad_sum)[1]
  elif isinstance(clipping, clip_plan.AdaptiveClipNorm):
    expected = clipping
  else:
    expected = None
  sensitivity = clip_plan.sensitivity(clipping)
  if clipped.clipping != expected or clipped.l2_norm_clip != sensitivity:
    raise ValueError(
        f'The ClippedSum was clipped to '
        f'{_describe(clipped.clipping, clipped.l2_norm_clip)} but this '
        'transform calibrates its noise for l2_norm_clip='
        f'{_describe(expected, sensitivity)}; clip with the same l2_norm_clip.')
