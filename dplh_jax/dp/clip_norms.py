"""Per-example norms that neither underflow nor overflow, and the clipping rule.

Privacy rule 9 (docs/DESIGN.md, Privacy rules): the norm used to clip an
example must bound the norm of what is actually added, for every finite
float32 input. A norm computed as ``sqrt(sum(g**2))`` breaks this at both
ends: entries below ~1e-19 square to zero (XLA:CPU flushes subnormals), so
a gradient can be counted as norm 0 and added unclipped; entries above ~1e19
square to inf. Here each norm is a :class:`ScaledNorm`, a float32 mantissa
and an int32 power-of-two exponent, ``norm = mantissa * 2**exponent``:

* an example's values are multiplied by ``2**-e`` (exactly: powers of two)
  so that their largest magnitude lies in [0.5, 1) before anything is
  squared; squares then only lose terms below ``2**-126`` of the largest,
  far below float32 rounding of the result;
* norms of several parts combine the same way (:func:`combine_norms`);
* the clip scale is applied in the same scaled domain
  (:meth:`ClipFactors.scale_times_pow2`), so the scale of an example with a
  norm of 1e30 (or 1e-30) neither underflows nor overflows either.

What is added for an example is ``factor * scaled_values`` with exactly the
scaled values its norm was computed from, so the bound holds up to float32
rounding of the norm itself (relative ~1e-7 per reduction level).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Exponent of a zero norm: below any real one, so it never sets the scale of
# a combination, and 2**ZERO_EXPONENT is 0 in float32.
ZERO_EXPONENT = -400
_MAX_PART = 126  # |exponent| of each factor in times_pow2: a normal float32


def _pow2(exponent: jax.Array) -> jax.Array:
  """Exactly ``2.0**exponent`` in float32 for int32 exponents in [-126, 127]."""
  return jax.lax.bitcast_convert_type(
      (exponent.astype(jnp.int32) + 127) << 23, jnp.float32)


def times_pow2(x: jax.Array, exponent: jax.Array) -> jax.Array:
  """``x * 2**exponent`` for any int exponent, exact up to under/overflow.

  Three multiplications by normal powers of two of the same sign, so an
  intermediate never under- or overflows when the result does not. Beyond
  +-378 every float32 result is 0 or inf anyway, so the exponent is clamped.
  """
  exponent = jnp.clip(jnp.asarray(exponent, jnp.int32), -3 * _MAX_PART,
                      3 * _MAX_PART)
  first = exponent // 3
  second = (exponent - first) // 2
  third = exponent - first - second
  return x * _pow2(first) * _pow2(second) * _pow2(third)


def exponent_of(peak: jax.Array) -> jax.Array:
  """``e`` with ``peak * 2**-e`` in [0.5, 1) for finite ``peak`` > 0, else 0.

  Read from the float32 bits: a subnormal peak gives -126, which leaves its
  scaled value below 0.5 but finite.
  """
  bits = jax.lax.bitcast_convert_type(peak.astype(jnp.float32), jnp.int32)
  exponent = ((bits >> 23) & 0xFF) - 126
  return jnp.where(jnp.isfinite(peak) & (peak > 0), exponent, 0)


class ScaledNorm(NamedTuple):
  """Per-example L2 norms ``mantissa * 2**exponent``, shape ``(n,)`` each.

  ``mantissa`` is NaN or inf exactly when the example has a non-finite value;
  a zero norm has mantissa 0 and exponent ``ZERO_EXPONENT``.
  """
  mantissa: jax.Array
  exponent: jax.Array

  def to_float(self) -> jax.Array:
    """The norms as float32: inf where they overflow, 0 where they underflow."""
    return times_pow2(self.mantissa, self.exponent)


def row_peaks(rows: Sequence[jax.Array]) -> jax.Array:
  """``(n,)`` largest magnitude over the trailing axes of ``(n, ...)`` arrays
  (NaN if any value of the row is NaN)."""
  peaks = [jnp.max(jnp.abs(r).reshape(r.shape[0], -1), axis=1,
                   initial=0.0) for r in rows]
  return jnp.stack(peaks).max(axis=0) if len(peaks) > 1 else peaks[0]


def scaled_norms(rows: Sequence[jax.Array]
                 ) -> tuple[ScaledNorm, list[jax.Array], jax.Array]:
  """Norms of examples whose values are split over several ``(n, ...)`` arrays.

  Returns:
    ``(norms, scaled, exponent)``: example ``i``'s L2 norm over all arrays;
    the arrays with each example multiplied by ``2**-exponent[i]`` (largest
    magnitude in [0.5, 1)); and that ``(n,)`` int32 exponent. Add
    ``factors.weighted_sum(scaled, exponent)``, never the unscaled values, so
    what is added is what was measured.
  """
  exponent = exponent_of(row_peaks(rows))
  scaled = [times_pow2(r, -exponent.reshape((-1,) + (1,) * (r.ndim - 1)))
            for r in rows]
  sum_sq = sum(jnp.sum(jnp.square(s).reshape(s.shape[0], -1), axis=1)
               for s in scaled)
  return normalized(jnp.sqrt(sum_sq), exponent), scaled, exponent


def normalized(mantissa: jax.Array, exponent: jax.Array) -> ScaledNorm:
  """The same norms with ``mantissa`` in [0.5, 1) (0 and non-finite kept)."""
  shift = exponent_of(mantissa)
  is_zero = mantissa == 0
  return ScaledNorm(
      jnp.where(is_zero, 0.0, times_pow2(mantissa, -shift)),
      jnp.where(is_zero, ZERO_EXPONENT, exponent + shift))


def combine_norms(parts: Sequence[ScaledNorm]) -> ScaledNorm:
  """The L2 norm of the concatenation of parts, ``sqrt(sum_l norm_l**2)``."""
  if len(parts) == 1:
    return parts[0]
  finite_exponents = [jnp.where(jnp.isfinite(p.mantissa), p.exponent,
                                ZERO_EXPONENT) for p in parts]
  top = functools.reduce(jnp.maximum, finite_exponents)
  sum_sq = sum(jnp.square(times_pow2(p.mantissa, e - top))
               for p, e in zip(parts, finite_exponents))
  return normalized(jnp.sqrt(sum_sq), top)


# The clip norm's range: C / (a norm's mantissa) and a batch's sum of
# clipped gradients must stay finite in float32 (3.4e38), and the noise std
# sigma * C must stay far above float32's smallest normal number (1.2e-38),
# below which XLA flushes the noise to zero and releases the exact sum.
MAX_L2_NORM_CLIP = 1e30
MIN_NOISE_STD = 1e-30


def check_positive(name: str, value: float, allow_zero: bool = False) -> float:
  """Returns ``value`` as a float, or raises unless finite and > 0 (>= 0)."""
  value = float(value)
  if not (value >= 0 if allow_zero else value > 0) or value == float('inf'):
    bound = '>= 0' if allow_zero else '> 0'
    raise ValueError(f'{name} must be finite and {bound}, got {value}.')
  return value


def check_l2_norm_clip(l2_norm_clip: float, name: str = 'l2_norm_clip'
                       ) -> float:
  """Returns the clip norm as a float, or raises unless 1e-30 <= C <= 1e30
  (a bool is refused: ``True`` would silently clip to 1)."""
  if isinstance(l2_norm_clip, (bool, np.bool_)):
    raise ValueError(f'{name} must be a number, not the bool '
                     f'{l2_norm_clip!r}; pass e.g. 1.0.')
  l2_norm_clip = check_positive(name, l2_norm_clip)
  if not MIN_NOISE_STD <= l2_norm_clip <= MAX_L2_NORM_CLIP:
    raise ValueError(
        f'{name} must be in [{MIN_NOISE_STD:g}, {MAX_L2_NORM_CLIP:g}], '
        f'got {l2_norm_clip}: outside it float32 sums overflow or the noise '
        'underflows.')
  return l2_norm_clip


def float32_within(low: float, high: float) -> tuple[np.float32, np.float32]:
  """The smallest float32 >= ``low`` and the largest <= ``high``, compared in
  float64 (under NEP 50 ``np.float32(1e30) > 1e30`` compares in float32 and
  is False, though the float32 is above 1e30)."""
  low32, high32 = np.float32(low), np.float32(high)
  if float(low32) < low:
    low32 = np.nextafter(low32, np.float32(np.inf))
  if float(high32) > high:
    high32 = np.nextafter(high32, np.float32(0))
  return low32, high32


@dataclasses.dataclass(frozen=True)
class ClipFactors:
  """Per-example clip scales of one group of parameters, and its decisions.

  Attributes:
    norms: ``(n,)`` :class:`ScaledNorm` of each example's gradient restricted
      to the group (the whole gradient with one group; an upper bound where a
      path cannot compute it exactly).
    keep: ``(n,)`` bool: real examples whose gradient is finite in every
      group (shared by all groups, so a NaN anywhere zeroes the example
      everywhere).
    is_real: ``(n,)`` bool: not padding.
    is_finite: ``(n,)`` bool.
    clipped: ``(n,)`` bool: kept examples whose group norm exceeded ``C``.
    l2_norm_clip: ``C`` of the group: a Python float, or a float32 scalar
      array (adaptive clipping reads it from the transform's state).
    normalize: if True the scales are ``min(1/C, 1/norm)``, so what is added
      is in units of ``C`` (its norm is at most 1 whatever ``C`` is); used by
      adaptive clipping, whose ``C`` is only known at run time.
  """

  norms: ScaledNorm
  keep: jax.Array
  is_real: jax.Array
  is_finite: jax.Array
  clipped: jax.Array
  l2_norm_clip: float | jax.Array
  normalize: bool = False

  def scale_times_pow2(self, exponent: jax.Array | int) -> jax.Array:
    """``(n,)`` float32 ``min(1, C / norm_i) * 2**exponent_i``; 0 where not kept.

    The factor for values stored as ``value * 2**-exponent``: it stays in
    float32 range when ``min(1, C / norm)`` alone would not. With
    ``normalize``, ``min(1/C, 1/norm_i) * 2**exponent_i``.
    """
    mantissa, top = self.norms
    safe = jnp.where(self.clipped, mantissa, 1.0)
    if self.normalize:
      # 1/norm = (1/mantissa) * 2**-top, 1/mantissa in (1, 2]; 1/C is a
      # normal float32 for C in [1e-30, 1e30].
      inverse_clip = 1.0 / jnp.asarray(self.l2_norm_clip, jnp.float32)
      factor = jnp.where(self.clipped,
                         times_pow2(1.0 / safe, exponent - top),
                         times_pow2(jnp.broadcast_to(inverse_clip,
                                                     mantissa.shape),
                                    exponent))
    else:
      factor = jnp.where(self.clipped,
                         times_pow2(self.l2_norm_clip / safe, exponent - top),
                         times_pow2(jnp.ones_like(mantissa), exponent))
    return jnp.where(self.keep, factor, 0.0)

  def largest_contribution_exponent(self) -> jax.Array:
    """Scalar int32 ``e``: every kept example adds norm below ``2**e`` (0 if
    none is kept).

    What example ``i`` adds has norm ``min(C, norm_i)`` (``min(1, norm_i /
    C)`` with ``normalize``). A sum formed in units of ``2**e`` keeps its
    largest terms near 1, so what flushes to zero is below ``2**-126`` of
    that: never a large share of one example's own terms (a flushed share
    of a cancelling sum could add more than its norm).
    """
    mantissa, exponent = self.norms
    clip_exponent = exponent_of(jnp.asarray(self.l2_norm_clip, jnp.float32))
    own = exponent + exponent_of(mantissa)  # norm < 2**own
    if self.normalize:
      own, capped = own - clip_exponent + 1, 1
    else:
      capped = clip_exponent
    per_example = jnp.where(self.clipped, capped, own)
    largest = jnp.max(jnp.where(self.keep & (mantissa > 0), per_example,
                                ZERO_EXPONENT), initial=ZERO_EXPONENT)
    return jnp.where(largest == ZERO_EXPONENT, 0, largest).astype(jnp.int32)

  @property
  def scale(self) -> jax.Array:
    """``(n,)`` ``min(1, C / norm_i)`` (``min(1/C, 1/norm_i)`` with
    ``normalize``; 0 where not kept, or where it underflows float32)."""
    return self.scale_times_pow2(0)

  def weighted_sum(self, per_example: jax.Array,
                   exponent: jax.Array | int = 0) -> jax.Array:
    """``sum_i scale_i * 2**exponent_i * x_i`` over the leading axis.

    Non-kept examples are selected away with ``where`` first, so a NaN in a
    dropped example cannot reach the sum through ``0 * NaN``. The sum is a
    :func:`float32_dot` (``Precision.HIGHEST``): float32 arithmetic on every
    backend, like an elementwise product and reduction, which XLA:CPU runs
    up to 20x slower for a few dozen examples of a large leaf (BENCHMARKS.md).
    """
    shape = (-1,) + (1,) * (per_example.ndim - 1)
    selected = jnp.where(self.keep.reshape(shape), per_example, 0.0)
    rows = selected.reshape(selected.shape[0], -1)
    return float32_dot(self.scale_times_pow2(exponent), rows).reshape(
        per_example.shape[1:])


def float32_dot(weights: jax.Array, rows: jax.Array) -> jax.Array:
  """``sum_i weights[i] * rows[i]`` for ``(n,)`` weights and ``(n, d)`` rows,
  in float32 arithmetic on every backend.

  ``Precision.HIGHEST``, because the default precision of a matrix product
  is backend-dependent: TF32 (10 mantissa bits) on recent NVIDIA GPUs and one
  bfloat16 pass (8 bits) on TPUs round each operand by up to ``2**-11`` or
  ``2**-8`` relative, so an example clipped to norm ``C`` could add up to
  ``C (1 + 2**-8)``. HIGHEST is IEEE float32 on CPU and GPU and a multi-pass
  bfloat16 emulation with float32-level error on TPU; an explicit precision
  also overrides ``jax_default_matmul_precision``. On CPU and GPU each
  product ``weights[i] * rows[i, j]`` is rounded once (relative ``2**-24``
  when normal) and accumulated in float32, as in an elementwise sum; on TPU
  the error is float32-level, a few ``2**-24`` per product, not one
  rounding.
  """
  return jnp.tensordot(weights.astype(jnp.float32), rows.astype(jnp.float32),
                       axes=1, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)


def group_clip_factors(
    group_norms: Sequence[ScaledNorm], is_finite: jax.Array,
    is_real: jax.Array, l2_norm_clips: Sequence[float | jax.Array],
    normalize: bool = False) -> tuple[ClipFactors, ...]:
  """The clipping rule per group: scale ``min(1, C_g / norm_g)``; 0 for
  padding and for an example with a NaN/Inf anywhere (in every group).

  Every path that clips (``dp_transform.clip_and_sum`` and
  ``one_pass_clipping``, through ``clip_plan``) goes through this function,
  so they agree on padding, non-finite values and extreme magnitudes.
  Example ``i``'s contribution restricted to group ``g`` then has norm at most
  ``C_g`` (up to float32 rounding, relative ~1e-7), so its whole contribution
  has norm at most ``sqrt(sum_g C_g**2)``.

  Args:
    group_norms: per group, ``(n,)`` norms (upper bounds) of the per-example
      gradients restricted to the group.
    is_finite: ``(n,)`` bool, False where the gradient has a NaN/Inf entry.
    is_real: ``(n,)`` bool, False for padding.
    l2_norm_clips: per group, ``C_g`` > 0 (checked by the caller).
    normalize: see :class:`ClipFactors`.
  """
  keep = is_real & is_finite
  for norms in group_norms:
    keep = keep & jnp.isfinite(norms.mantissa)
  return tuple(
      ClipFactors(norms, keep, is_real, is_finite,
                  keep & _exceeds(norms, clip), clip, normalize)
      for norms, clip in zip(group_norms, l2_norm_clips, strict=True))


def _exceeds(norms: ScaledNorm, l2_norm_clip: float | jax.Array) -> jax.Array:
  # norm > C  <=>  mantissa > C * 2**-exponent (exact: a power of two; 0 or
  # inf when the norm is far outside C's range, which decides correctly).
  return norms.mantissa > times_pow2(jnp.asarray(l2_norm_clip, jnp.float32),
                                     -norms.exponent)


def clip_factors(norms: ScaledNorm, is_finite: jax.Array, is_real: jax.Array,
                 l2_norm_clip: float) -> ClipFactors:
  """The clipping rule with one group: scale ``min(1, C / norm)``, 0 for
  padding and NaN/Inf (:func:`group_clip_factors`).

  Args:
    norms: ``(n,)`` norms (upper bounds) of the per-example gradients.
    is_finite: ``(n,)`` bool, False where the gradient has a NaN/Inf entry.
    is_real: ``(n,)`` bool, False for padding.
    l2_norm_clip: ``C`` > 0.
  """
  return group_clip_factors([norms], is_finite, is_real, [l2_norm_clip])[0]
