"""Adaptive clipping: the clip norm follows a private quantile of the norms.

Andrew, Thakkar, McMahan and Ramaswamy, "Differentially private learning with
adaptive clipping" (NeurIPS 2021), with geometric updates. The clip norm
``C`` lives in the transform's state; it is a function of earlier noisy
releases only, so it is public. One update, for the batch's examples ``i``::

    S       = sum_i g_i * min(1/C, 1/||g_i||)    (clipped sum in units of C)
    update  = C * (S + N(0, z_grad**2 I)) / expected_batch_size
    b_i     = 1 if example i is real, finite and ||g_i|| <= C, else 0
    b_noisy = (sum_i (b_i - 1/2) + N(0, sigma_b**2)) / expected_batch_size + 1/2
    C_next  = clamp(C * exp(-eta * (clamp(b_noisy, 0, 1) - gamma)),
                    min_l2_norm_clip, max_l2_norm_clip)

with ``z_grad = (z**-2 - (2 * sigma_b)**-2)**-0.5`` (Andrew et al., Section
3.1; the same formula as ``tff.aggregators.DifferentiallyPrivateFactory.
gaussian_adaptive``). Padding is not an example (it adds to neither sum);
a non-finite example adds 0 to ``S`` and ``b_i = 0`` (a NaN norm is not
``<= C``), so many of them push ``C`` up; ``num_non_finite`` counts them.

Guarantee. Adding or removing one example moves ``S`` by at most 1 in L2 norm
(it is clipped to ``C`` and divided by ``C``) and the centred count
``sum_i (b_i - 1/2)`` by exactly 1/2, both at once in the worst case. The
released pair ``(S + z_grad N1, count + sigma_b N2)`` is a bijective
rescaling of ``(S / z_grad, count / sigma_b) + N(0, I)``, whose L2
sensitivity is ``sqrt(z_grad**-2 + (2 sigma_b)**-2) = 1 / z``: each update
is ONE Gaussian mechanism with noise multiplier ``z = noise_multiplier``,
and with Poisson sampling at rate ``q`` the event
``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, exactly as for
``dp_transform.dp_aggregate``. The update, ``b_noisy`` and ``C_next`` are
post-processing (``C`` is public). WARNING: the accountant must compose
``noise_multiplier`` (z), never :func:`gradient_noise_multiplier` (z_grad,
which is larger and would understate epsilon).

Why the sum is in units of ``C``: the noise is calibrated to a sensitivity
of 1 whatever ``C`` the examples were clipped to, so a ``ClippedSum`` clipped
to another (data-independent) ``C`` than the state's would still be
private; it would only scale the step. A traced ``C`` is clamped into
[1e-30, 1e30] before clipping (``clip_plan``), so even a wrong one (0, NaN)
cannot make the sum depend on the data beyond that sensitivity. Misuse is
detected as well: a ``ClippedSum`` carries a ``clip_plan.ClipNormTag``
(``C`` and ``1/C`` summed over its slots, and the slot count), checked
against the state's ``C`` to relative 1e-5; both sums match only if every
slot used that ``C``, up to float32 rounding (a slot off by a relative
``d`` can pass when ``d**2`` is below ~2e-5 times the slot count). A
mismatch raises when the values are concrete; under ``jit`` (where nothing
can raise) the update becomes NaN, ``C`` is kept and
``clip_norm_mismatches`` counts it, while the noisy count is still drawn,
``unclipped_fraction`` stored and ``num_updates`` incremented (the step is
still a private, accounted release). The NaN is permanent downstream: an
optimizer such as Adam keeps NaN moments, so restart from a checkpoint. The
check reads only ``C`` values and shapes, never data. Read ``C`` with
:func:`current_clip_norm` from the state being updated and it always
matches::

    tx = optax.chain(adaptive_clipping.dp_aggregate_adaptive(
        1.0, noise_multiplier=1.1, expected_batch_size=256, key=key),
        optax.adam(1e-3))
    clipped = per_example.clipped_grad_sum(loss_fn, adaptive_clipping.ADAPTIVE)
    s = clipped(params, batch, is_padding_example=mask,
                clip_norm=adaptive_clipping.current_clip_norm(opt_state))
    updates, opt_state = tx.update(s, opt_state, params)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import clip_norms
from dplh_jax.dp import clip_plan
from dplh_jax.dp import dp_transform

PyTree = Any
ADAPTIVE = clip_plan.ADAPTIVE


class AdaptiveClipState(NamedTuple):
  """State of :func:`dp_aggregate_adaptive`.

  Attributes:
    aggregate: the noise key and statistics, as for ``dp_aggregate``
      (``dp_transform.dp_state`` finds it); ``aggregate.num_updates`` counts
      the steps to account, each with the noise multiplier ``z``.
    clip_norm: float32 ``C`` of the next update, in
      ``[min_l2_norm_clip, max_l2_norm_clip]``.
    unclipped_fraction: ``clamp(b_noisy, 0, 1)`` of the latest update (noised,
      so covered by the guarantee).
    clip_norm_mismatches: updates turned into NaN because their
      ``ClippedSum`` was clipped to another ``C``.
  """
  aggregate: dp_transform.DpAggregateState
  clip_norm: jax.Array
  unclipped_fraction: jax.Array
  clip_norm_mismatches: jax.Array


def gradient_noise_multiplier(noise_multiplier: float,
                              count_stddev: float) -> float:
  """``z_grad = (z**-2 - (2 * sigma_b)**-2)**-0.5`` (Andrew et al. 2021,
  Section 3.1): the gradient's noise multiplier that, composed with the
  centred count's ``N(0, sigma_b**2)`` (sensitivity 1/2), makes one Gaussian
  mechanism of multiplier ``z``. 0 when ``z`` is 0. Never account with it."""
  z = clip_norms.check_positive('noise_multiplier', noise_multiplier,
                                allow_zero=True)
  sigma_b = clip_norms.check_positive('count_stddev', count_stddev,
                                      allow_zero=True)
  if z == 0:
    return 0.0
  if not z < 2 * sigma_b:
    raise ValueError(
        f'count_stddev={sigma_b:g} is too small for noise_multiplier={z:g}: '
        f'it must exceed noise_multiplier / 2 = {z / 2:g}; raise it (default '
        'expected_batch_size / 20) or lower noise_multiplier.')
  return (z**-2 - (2 * sigma_b)**-2)**-0.5


# Beyond this eta only saturates exp() further; past float32's range it makes
# eta * 0 = inf * 0 = NaN when the noisy fraction equals gamma.
MAX_CLIP_LEARNING_RATE = 1e3


def dp_aggregate_adaptive(
    initial_l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: jax.Array | int,
    *,
    target_unclipped_quantile: float = 0.5,
    clip_learning_rate: float = 0.2,
    count_stddev: float | None = None,
    min_l2_norm_clip: float = clip_norms.MIN_NOISE_STD,
    max_l2_norm_clip: float = clip_norms.MAX_L2_NORM_CLIP,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD aggregation whose clip norm moves toward a quantile of the norms.

  ``update(x, state, params=None, *, is_padding_example=None)`` takes
  per-example gradients (clipped here to the state's ``C``) or a
  ``ClippedSum`` from ``clipped_grad_sum(loss_fn, ADAPTIVE)`` called with
  ``clip_norm=current_clip_norm(opt_state)`` (either path, microbatched or
  not), and returns ``C * (S + N(0, z_grad**2 I)) / expected_batch_size``;
  see the module docstring for the rule and the guarantee: each update is
  the Gaussian mechanism with noise multiplier ``noise_multiplier`` (z), the
  one to account (``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` per
  update); the gradient itself gets the larger ``z_grad``.

  >>> import jax.numpy as jnp
  >>> tx = dp_aggregate_adaptive(1.0, noise_multiplier=0.5,
  ...                            expected_batch_size=4, key=0,
  ...                            count_stddev=0.3)
  >>> state = tx.init(jnp.zeros(3))
  >>> per_example = jnp.full((4, 3), 10.0)  # every norm above C = 1
  >>> updates, state = tx.update(per_example, state)
  >>> bool(current_clip_norm(state) > 1.0)  # C grows toward the median
  True

  Args:
    initial_l2_norm_clip: ``C`` of the first update.
    noise_multiplier: ``z`` >= 0, the accounted noise multiplier of the
      gradient and count together.
    expected_batch_size: Public divisor ``q * num_examples`` > 0, of the
      gradient sum and of the count.
    key: JAX PRNG key or int seed; each update splits it into a gradient
      noise key, a count noise key and the key it stores.
    target_unclipped_quantile: ``gamma`` in [0, 1], the fraction of examples
      meant to be unclipped.
    clip_learning_rate: ``eta`` in [0, 1e3] (``C`` changes by at most
      ``exp(eta)`` per update).
    count_stddev: ``sigma_b``, std of the count's noise; default
      ``expected_batch_size / 20`` (Andrew et al.). Must exceed ``z / 2``.
    min_l2_norm_clip, max_l2_norm_clip: ``C`` is clamped to this range,
      within [1e-30, 1e30], where the clipping's float32 arithmetic is exact
      (docs/DESIGN.md, Privacy rules, rule 9).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`AdaptiveClipState`.
  """
  expected_batch_size = clip_norms.check_positive('expected_batch_size',
                                                  expected_batch_size)
  if count_stddev is None:
    count_stddev = expected_batch_size / 20
  grad_noise = gradient_noise_multiplier(noise_multiplier, count_stddev)
  count_stddev = float(count_stddev)
  if 0 < grad_noise < clip_norms.MIN_NOISE_STD:
    raise ValueError(f'noise_multiplier={noise_multiplier:g} is so small that '
                     'float32 would flush its noise to zero; raise it.')
  low = clip_norms.check_l2_norm_clip(min_l2_norm_clip, 'min_l2_norm_clip')
  high = clip_norms.check_l2_norm_clip(max_l2_norm_clip, 'max_l2_norm_clip')
  initial = clip_norms.check_l2_norm_clip(initial_l2_norm_clip,
                                          'initial_l2_norm_clip')
  if not low <= initial <= high:
    raise ValueError(f'initial_l2_norm_clip={initial:g} must be in '
                     f'[min_l2_norm_clip, max_l2_norm_clip] = [{low:g}, '
                     f'{high:g}].')
  low32, high32 = clip_norms.float32_within(low, high)
  if low32 > high32:
    raise ValueError(f'No float32 lies in [min_l2_norm_clip, '
                     f'max_l2_norm_clip] = [{low:g}, {high:g}]; widen it.')
  gamma = float(target_unclipped_quantile)
  if not 0 <= gamma <= 1:
    raise ValueError(f'target_unclipped_quantile must be in [0, 1], got '
                     f'{target_unclipped_quantile}.')
  eta = clip_norms.check_positive('clip_learning_rate', clip_learning_rate,
                                  allow_zero=True)
  if eta > MAX_CLIP_LEARNING_RATE:
    raise ValueError(f'clip_learning_rate={eta:g} exceeds '
                     f'{MAX_CLIP_LEARNING_RATE:g}, where exp(-eta * ...) '
                     'saturates float32; lower it (default 0.2).')
  initial_key = dp_transform.canonicalize_key(key)
  initial32 = np.clip(np.float32(initial), low32, high32)

  def init_fn(params):
    del params
    return AdaptiveClipState(
        aggregate=dp_transform.initial_state(initial_key),
        clip_norm=jnp.asarray(initial32, jnp.float32),
        unclipped_fraction=jnp.zeros((), jnp.float32),
        clip_norm_mismatches=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, *, is_padding_example=None,
                **extra_args):
    del extra_args
    clip_norm = state.clip_norm
    clipped, like = dp_transform.clipped_sum_for_update(
        updates, params, is_padding_example, ADAPTIVE, clip_norm=clip_norm)
    if clipped.clip_norm_tag is None:
      raise ValueError('The ClippedSum has no clip_norm_tag; make it with '
                       'clipped_grad_sum(loss_fn, ADAPTIVE).')
    matches = clip_plan.tag_matches(clipped.clip_norm_tag, clip_norm)
    if not isinstance(matches, jax.core.Tracer) and not bool(matches):
      raise ValueError(
          f'The ClippedSum was clipped to another clip norm than this '
          f'update\'s C = {float(clip_norm):g}; pass clip_norm='
          'current_clip_norm(opt_state) of the state being updated.')
    grad_key, count_key, next_key = jax.random.split(
        state.aggregate.noise_key, 3)
    noised_sum = dp_transform.add_noise(clipped.grad_sum, grad_noise,
                                        grad_key)
    # Back from units of C (post-processing: C is public); NaN on mismatch.
    mean = jax.tree.map(
        lambda g, ref: jnp.where(
            matches, g * clip_norm / expected_batch_size,
            jnp.nan).astype(jnp.result_type(ref)), noised_sum, like)
    num_unclipped = (clipped.num_examples - clipped.num_clipped
                     - clipped.num_non_finite)
    centred = (num_unclipped.astype(jnp.float32)
               - 0.5 * clipped.num_examples.astype(jnp.float32))
    noisy_count = centred + count_stddev * jax.random.normal(
        count_key, (), jnp.float32)
    fraction = jnp.clip(noisy_count / expected_batch_size + 0.5, 0.0, 1.0)
    next_clip = jnp.clip(clip_norm * jnp.exp(-eta * (fraction - gamma)),
                         low32, high32).astype(jnp.float32)
    new_state = AdaptiveClipState(
        aggregate=dp_transform.state_after(state.aggregate, clipped,
                                           next_key),
        clip_norm=jnp.where(matches, next_clip, clip_norm),
        unclipped_fraction=fraction,
        clip_norm_mismatches=state.clip_norm_mismatches
        + (~matches).astype(jnp.int32))
    return mean, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adaptive_state(opt_state: PyTree) -> AdaptiveClipState:
  """The :class:`AdaptiveClipState` inside an optimizer state, found by
  type; raises unless there is exactly one."""
  return dp_transform.find_state(opt_state, AdaptiveClipState,
                                 'is dp_aggregate_adaptive in the chain?')


def current_clip_norm(opt_state: PyTree) -> jax.Array:
  """The ``C`` the next update of ``opt_state`` expects: pass it as
  ``clip_norm`` to ``clipped_grad_sum(loss_fn, ADAPTIVE)``."""
  return adaptive_state(opt_state).clip_norm

