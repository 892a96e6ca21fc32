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
from typing import Any, NamedTuple

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
  L2 norm, up to float32 rounding, when one real example is added or
  removed, for every finite float32 input: the norm an example is clipped
  with is an upper bound of the norm of the values added for it, and the
  weight applied to those values is rounded relatively (see below). A kept
  example's contribution has norm at most ``C (1 + (k/2 + 3) 2**-24)``, with
  ``k`` the depth of the reduction that sums its squares. The float32 sum
  of the ``n`` contributions is off by at most ``(n - 1) 2**-24`` times the
  sum of their norms (the standard bound for any summation order, so at most
  ``n (n - 1) 2**-24 C``, 2.4e-4 C at n = 64), and adding or removing one
  example moves the released sum by at most its contribution plus twice
  that. Padding
  examples and examples with any NaN/Inf entry (after the cast to float32)
  contribute exactly zero and are counted.

  Each row (example) is clipped by one of two computations, chosen by the
  row's own values (and ``C``) alone, never by the rest of the batch:

  * plain (plain-valid rows: finite sum of squares in every group and, where
    kept, a clip factor that is a normal float32 and, where clipped, a sum
    of squares of at least ``d * 2**-100``; in practice every row):
    ``norm = sqrt(sum_j x_j**2 + d * 2**-126)`` over the ``d`` values, which
    bounds the true norm even where squares below ``2**-126`` are flushed to
    zero; the raw values are added times ``min(1, C / norm)``
    (``min(1/C, 1/norm)`` with ADAPTIVE), a normal float32;
  * scaled (every other row: NaN/Inf, squares that overflow, a subnormal
    factor, a clipped row with tiny squares): the row is scaled by a power
    of two ``2**-e`` before squaring so that no square underflows or
    overflows, and exactly the scaled values the norm was computed from are
    added (``clip_norms``), times ``factor * 2**e``. The factor itself may be
    subnormal or underflow (a norm of 1e30 under ``C = 1e-30``); the weight
    ``factor * 2**e`` is a normal float32 for a clipped row, and at worst
    rounded by ``2**-150`` absolute (negligible against ``C``) for an
    unclipped one.

  The plain norms, factors and validity of every row are computed once,
  outside a ``lax.cond``; the cond only decides whether the scaled norms
  must be computed at all (some row is not plain-valid). In that branch the
  plain-valid rows use exactly the precomputed plain norm, factor, decision
  and raw values (selected per row), so the counts and factors of
  plain-valid rows are the same on both branches by construction, and one
  example cannot change another's clip decision (docs/DESIGN.md, Privacy
  rules). Rows not kept are selected away with ``where`` before the product
  in that branch, so a NaN cannot reach the sum through ``0 * NaN``; in the
  other every row is finite, so a padding row's factor 0 adds exactly 0.

  Both weighted sums are float32 matrix products at ``Precision.HIGHEST``
  (``clip_norms.float32_dot``): at the default precision GPUs (TF32) and
  TPUs (bfloat16) round the operands by up to ``2**-8`` relative, which could
  push an example clipped to ``C`` past ``C``. Timing side channel: the
  scaled branch is several times slower (about 9x on CPU) and a single
  example triggers it, so anyone who sees step times learns, per step,
  whether a NaN/Inf or extreme-magnitude example (or a clipped one with
  tiny squares) was sampled; the released values do not depend on the
  branch beyond the rounding of the sum.

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
  plan, leaves, rows, is_real = _checked_rows(
      per_example_grads, l2_norm_clip, is_padding_example, clip_norm)
  group_leaves = plan.leaves_by_group()
  # Every row's plain norm, factor and validity are computed here, once,
  # outside the cond: a plain-valid row is clipped with these values on both
  # branches, so no other example can change its decision.
  plain = _plain_clip(plan, rows, group_leaves, is_real)
  plain_sums = [clip_norms.float32_dot(plain.scales[plan.leaf_groups[j]], r)
                for j, r in enumerate(rows)]
  # The scaled norms run only when some row needs them (the plain sums run
  # at top level: XLA:CPU runs ops inside a conditional body slower).
  sums, counts = jax.lax.cond(
      jnp.all(plain.valid), lambda: (plain_sums, plain.factors.counts()),
      lambda: _mixed_norm_sum(plan, rows, group_leaves, is_real, plain))
  sums = [total.reshape(leaf.shape[1:]) for total, leaf in zip(sums, leaves)]
  return ClippedSum(
      grad_sum=jax.tree.unflatten(jax.tree.structure(per_example_grads),
                                  sums),
      l2_norm_clip=plan.l2_norm_clip, clipping=plan.clipping, **counts)


def plain_valid_rows(
    per_example_grads: PyTree,
    l2_norm_clip: clip_plan.ClipSpec,
    is_padding_example: jax.Array | None = None,
    *,
    clip_norm: jax.Array | None = None,
) -> jax.Array:
  """``(n,)`` bool: the rows :func:`clip_and_sum` clips with their plain
  norm (the rest use their scaled norm, and any False makes the step take
  the slower branch). For tests and diagnostics; the arguments are
  :func:`clip_and_sum`'s. Compiled on its own, it may differ from the flag
  inside :func:`clip_and_sum` for a row right at a threshold (another
  reduction order); nothing released reads it."""
  plan, _, rows, is_real = _checked_rows(
      per_example_grads, l2_norm_clip, is_padding_example, clip_norm)
  return _plain_clip(plan, rows, plan.leaves_by_group(), is_real).valid


def _checked_rows(per_example_grads, l2_norm_clip, is_padding_example,
                  clip_norm):
  """``(plan, leaves, float32 (n, d) rows per leaf, is_real)``, or raises."""
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
  rows = [g.astype(jnp.float32).reshape(num_examples, -1) for g in leaves]
  return plan, leaves, rows, is_real


# Each square below float32's smallest normal number may be flushed to zero:
# adding that much per value to the sum of squares keeps the norm an upper
# bound of the norm of what is added.
_FLUSHED_SQUARE = 2.0**-126
# A clip factor at or above this is a normal float32 (rounded relatively,
# by at most 2**-24); a subnormal one is rounded by up to 2**-150 absolute,
# arbitrarily much relative to itself.
_MIN_PLAIN_FACTOR = 2.0**-125
# A clipped example's sum of squares must be at least this per value, so the
# flush allowance above is at most 2**-26 of it, below float32 rounding: a
# smaller one is clipped with its scaled norm (the allowance only ever clips
# more, but a tiny gradient under a tiny C would be cut far below C).
_MIN_CLIPPED_SQUARE = 2.0**-100


class _PlainClip(NamedTuple):
  """Each row's clipping from unscaled squares (:func:`_plain_clip`).

  Attributes:
    factors: the plain norms' ``GroupFactors``.
    scales: per group, ``(n,)`` float32 ``factors.groups[g].scale``.
    valid: ``(n,)`` bool, True where the row may be clipped and added with
      these values (plain-valid); a function of the row alone (and ``C``).
  """
  factors: clip_plan.GroupFactors
  scales: list[jax.Array]
  valid: jax.Array


def _plain_clip(plan: clip_plan.ClipPlan, rows: list[jax.Array],
                group_leaves: list[list[int]], is_real: jax.Array
                ) -> _PlainClip:
  """Per-row norms ``sqrt(sum x**2 + d * 2**-126)`` over each group's ``d``
  values, their factors, and which rows they are valid for.

  A row is plain-valid when its sum of squares is finite in every group (so
  its values are finite and no square or partial sum overflowed) and, in
  every group where it is kept, its clip factor is a normal float32 and, if
  clipped, its sum of squares is at least ``d * 2**-100``. Then the norm
  bounds the norm of the row's values (each square flushed to zero lost
  less than ``2**-126``) and ``min(1, C / norm)`` is rounded relatively.
  Padding rows with finite values are valid (their factor is 0, and
  ``0 * finite`` is exactly 0).
  """
  squares = [jnp.sum(jnp.square(r), axis=1) for r in rows]
  group_norms, group_sums, valid = [], [], jnp.ones_like(is_real)
  for members in group_leaves:
    sum_sq = sum(squares[j] for j in members)
    valid = valid & jnp.isfinite(sum_sq)
    size = sum(rows[j].shape[1] for j in members)
    group_sums.append((sum_sq, size))
    group_norms.append(clip_norms.normalized(
        jnp.sqrt(sum_sq + size * _FLUSHED_SQUARE),
        jnp.zeros(is_real.shape, jnp.int32)))
  factors = plan.factors(group_norms, valid, is_real)
  scales = [group.scale for group in factors.groups]
  for group, scale, (sum_sq, size) in zip(factors.groups, scales,
                                          group_sums):
    resolved = ~group.clipped | (sum_sq >= size * _MIN_CLIPPED_SQUARE)
    valid = valid & (~group.keep | ((scale >= _MIN_PLAIN_FACTOR) & resolved))
  return _PlainClip(factors, scales, valid)


def _mixed_norm_sum(plan: clip_plan.ClipPlan, rows: list[jax.Array],
                    group_leaves: list[list[int]], is_real: jax.Array,
                    plain: _PlainClip) -> tuple[list[jax.Array], dict]:
  """The clipped sum when some row is not plain-valid (NaN/Inf, overflowing
  squares, a subnormal factor or tiny clipped squares).

  Plain-valid rows use exactly ``plain``'s norms, factors, decisions and raw
  values (selected per row with ``where``); only the other rows use their
  scaled norms (``clip_norms.scaled_norms``: each row scaled by a power of
  two, so no square underflows or overflows) and add exactly the scaled
  values their norm was computed from, times ``factor * 2**e``. Rows not
  kept are selected away before the product, so a NaN cannot reach the sum
  through ``0 * NaN``.
  """
  valid = plain.valid
  is_finite = functools.reduce(
      jnp.logical_and, [jnp.all(jnp.isfinite(r), axis=1) for r in rows])
  scaled, exponents, group_norms = [None] * len(rows), [None] * len(rows), []
  for members in group_leaves:
    norms, group_scaled, exponent = clip_norms.scaled_norms(
        [rows[j] for j in members])
    group_norms.append(norms)
    for j, values in zip(members, group_scaled):
      scaled[j], exponents[j] = values, exponent
  exact = plan.factors(group_norms, is_finite, is_real)

  def pick(ours, theirs):
    return jnp.where(valid, ours, theirs)

  merged = tuple(
      dataclasses.replace(
          p, norms=clip_norms.ScaledNorm(*map(pick, p.norms, e.norms)),
          keep=pick(p.keep, e.keep), is_finite=pick(p.is_finite, e.is_finite),
          clipped=pick(p.clipped, e.clipped))
      for p, e in zip(plain.factors.groups, exact.groups))
  keep = merged[0].keep[:, None]
  sums = []
  for j, r in enumerate(rows):
    g = plan.leaf_groups[j]
    weights = pick(plain.scales[g],
                   exact.groups[g].scale_times_pow2(exponents[j]))
    values = jnp.where(keep, jnp.where(valid[:, None], r, scaled[j]), 0.0)
    sums.append(clip_norms.float32_dot(weights, values))
  return sums, clip_plan.GroupFactors(plan, merged).counts()


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
