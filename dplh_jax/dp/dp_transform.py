"""DP-SGD gradient aggregation as an optax transform: clip, sum, noise, scale.

This module depends only on jax and optax, so it can be copied or imported
into any training loop.

The guarantee. Let ``g_i`` be the gradient of example ``i`` (in dplh-jax one
example is one image with all its proposals). ``dp_aggregate`` computes::

    clipped_sum = sum_i  g_i * min(1, C / ||g_i||_2)     (padding and non-finite: 0)
    update      = (clipped_sum + N(0, (sigma * C)^2 I)) / expected_batch_size

where the norm is the global L2 norm over every leaf of the gradient pytree.
Adding or removing one example changes ``clipped_sum`` by at most ``C`` in L2
norm, so each call is a Gaussian mechanism with noise multiplier ``sigma``.
With per-group clip norms (``group_clipping.GroupClipNorms``) each group is
clipped to its ``C_g`` and ``C`` above is ``sqrt(sum_g C_g**2)``; adaptive
clipping is ``adaptive_clipping.dp_aggregate_adaptive``. If
the batch was drawn by Poisson sampling with rate ``q`` (each example included
independently), each call is a Poisson-subsampled Gaussian mechanism, and
``T`` calls compose as ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(sigma)), T)`` under add-or-remove-one adjacency. That is what
the accountant must be told; anything else (fixed-size shuffled batches,
dividing by the realized batch size, reusing a noise key) breaks the
assumption.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import clip_norms
from dplh_jax.dp import clip_plan
from dplh_jax.dp import clipped_sum
from dplh_jax.dp import group_clipping

PyTree = Any


# The clipped sum lives in clipped_sum; these names stay importable here.
ClippedSum = clipped_sum.ClippedSum
clip_and_sum = clipped_sum.clip_and_sum
clipped_sum_of = clipped_sum.clipped_sum_of
check_clipping_matches = clipped_sum.check_clipping_matches
_check_matches_params = clipped_sum.check_matches_params


class DpAggregateState(NamedTuple):
  """State of :func:`dp_aggregate`.

  The statistics describe the latest update. They are computed from private
  data without noise: log them for debugging, but do not publish them as if
  they were covered by the privacy guarantee.

  Attributes:
    noise_key: Key that the next update splits; never used to draw noise.
    num_updates: Number of noise draws so far (one per update).
    realized_batch_size: Non-padding examples in the latest update.
    clipped_fraction: Fraction of those whose gradient norm exceeded the clip.
    num_non_finite: Examples with non-finite gradients dropped in the latest
      update.
    total_non_finite: Examples with non-finite gradients dropped in all
      updates so far.
  """

  noise_key: jax.Array
  num_updates: jax.Array
  realized_batch_size: jax.Array
  clipped_fraction: jax.Array
  num_non_finite: jax.Array
  total_non_finite: jax.Array


def canonicalize_key(key: jax.Array | int) -> jax.Array:
  """Returns a typed PRNG key from an int seed, a raw uint32 key or a typed key.

  An int seed must lie in [0, 2**32): ``jax.random.key`` keeps only 32 bits
  of it, so seeds 0 and 2**32 would draw the same noise.
  """
  if isinstance(key, numbers.Integral):
    if not 0 <= int(key) < 2**32:
      raise ValueError(f'An int key seed must be in [0, 2**32), got {key}: '
                       'larger seeds collide with smaller ones.')
    return jax.random.key(int(key))
  if not isinstance(key, (jax.Array, np.ndarray)):
    raise TypeError(f'key must be an int seed or a JAX PRNG key, got {key!r}.')
  key = jnp.asarray(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.dtype == jnp.uint32:
    return jax.random.wrap_key_data(key)
  raise TypeError(
      f'key must be an int seed or a JAX PRNG key, got dtype {key.dtype}.')


# The clip norm's range (the reasons are in clip_norms).
MAX_L2_NORM_CLIP = clip_norms.MAX_L2_NORM_CLIP
MIN_NOISE_STD = clip_norms.MIN_NOISE_STD
check_l2_norm_clip = clip_norms.check_l2_norm_clip
_check_positive = clip_norms.check_positive


_NOISE_ROW = 128  # values per row of the noise draw (add_noise)


def add_noise(
    grad_sum: PyTree, noise_std: float, key: jax.Array
) -> PyTree:
  """Adds independent N(0, noise_std^2) float32 noise to every entry.

  One normal vector for the whole tree, split into the leaves: the same
  distribution as a draw per leaf, but a single RNG call, which XLA compiles
  in a fraction of the time (one threefry kernel instead of one per leaf).
  Drawn as rows of 128 and flattened: XLA:CPU runs a 1-D normal draw about
  4x slower than a 2-D one, and with JAX's default partitionable threefry the
  flattened values are bit-identical to the 1-D draw of the same key, so a
  run resumed across this change reproduces its noise (checked by
  tests/dp/exact_dot_sum_test.py; with ``jax_threefry_partitionable`` off
  they differ).
  """
  leaves, treedef = jax.tree.flatten(grad_sum)
  sizes = [leaf.size for leaf in leaves]
  total = sum(sizes)
  noise = noise_std * jax.random.normal(
      key, (-(-total // _NOISE_ROW), _NOISE_ROW),
      dtype=jnp.float32).reshape(-1)[:total]
  offsets = np.cumsum([0] + sizes)
  noised = [
      leaf.astype(jnp.float32) + noise[start:stop].reshape(leaf.shape)
      for leaf, start, stop in zip(leaves, offsets[:-1], offsets[1:])
  ]
  return jax.tree.unflatten(treedef, noised)


def clipped_sum_for_update(
    updates: PyTree, params: PyTree | None,
    is_padding_example: jax.Array | None, clipping: clip_plan.ClipSpec,
    clip_norm: jax.Array | None = None) -> tuple[ClippedSum, PyTree]:
  """The :class:`ClippedSum` of a transform's input (per-example gradients,
  clipped here, or a ``ClippedSum``, checked) and the tree whose dtypes the
  update takes."""
  if isinstance(updates, ClippedSum):
    if is_padding_example is not None:
      raise ValueError('Pass is_padding_example to clip_and_sum, not with a '
                       'ClippedSum.')
    check_clipping_matches(updates, clipping)
    if params is not None:
      _check_matches_params(updates.grad_sum, params, leading=0)
    clipped, like = updates, updates.grad_sum
  else:
    if params is not None:
      _check_matches_params(updates, params, leading=1)
    clipped = clip_and_sum(updates, clipping, is_padding_example,
                           clip_norm=clip_norm)
    like = updates
  if params is not None:
    like = params  # updates in the parameters' dtype, on both paths
  return clipped, like


def state_after(state: DpAggregateState, clipped: ClippedSum,
                next_key: jax.Array) -> DpAggregateState:
  """The state after one noise draw on ``clipped``, storing ``next_key``."""
  return DpAggregateState(
      noise_key=next_key,
      num_updates=state.num_updates + 1,
      realized_batch_size=clipped.num_examples,
      clipped_fraction=clipped.num_clipped
      / jnp.maximum(clipped.num_examples - clipped.num_non_finite, 1),
      num_non_finite=clipped.num_non_finite,
      total_non_finite=state.total_non_finite + clipped.num_non_finite,
  )


def initial_state(key: jax.Array) -> DpAggregateState:
  """The state before the first update, holding ``key``."""
  # Distinct arrays per field, so a jitted step may donate the state.
  def zero():
    return jnp.zeros((), jnp.int32)
  return DpAggregateState(
      noise_key=key, num_updates=zero(), realized_batch_size=zero(),
      clipped_fraction=jnp.zeros((), jnp.float32), num_non_finite=zero(),
      total_non_finite=zero())


def dp_aggregate(
    l2_norm_clip: float | group_clipping.GroupClipNorms,
    noise_multiplier: float,
    expected_batch_size: int,
    key: jax.Array | int,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD aggregation: clip per example, sum, add Gaussian noise once, scale.

  ``update(per_example_grads, state, params=None, *, is_padding_example=None)``
  takes gradients with a leading example axis on every leaf (for instance from
  ``jax.vmap(jax.grad(loss))``), or a :class:`ClippedSum` already computed in
  microbatches or across devices, and returns::

      (sum_i clip_C(g_i) + N(0, (noise_multiplier * C)^2 I)) / expected_batch_size

  Guarantee: the clipped sum has L2 sensitivity ``C = l2_norm_clip`` to adding
  or removing one example; the noise is drawn in float32 with a fresh key on
  every call; dividing by the public constant ``expected_batch_size`` (never
  the realized count, which depends on the data) is post-processing. With
  Poisson sampling at rate ``q``, each call is the dp-accounting event
  ``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))``; the caller
  must compose exactly one such event per call.

  Per-group clipping: with ``l2_norm_clip`` a
  ``group_clipping.GroupClipNorms``, example ``i``'s gradient restricted to
  group ``g`` is clipped to ``C_g``, so the sum's L2 sensitivity is
  ``C = sqrt(sum_g C_g**2)`` (float64) and the noise is
  ``N(0, (noise_multiplier * C)^2 I)`` on the whole sum: the same guarantee
  and the same accountant event. A :class:`ClippedSum` must have been clipped
  with the same groups and norms (``clipped_grad_sum(loss_fn, same_spec)``);
  any other is refused.

  When ``params`` is passed, every gradient leaf must be shaped like its
  parameter after the example axis: an already aggregated gradient is refused
  (it has no per-example bound). Each call adds fresh noise and is one step
  for the accountant, so do not accumulate its outputs over several calls
  (e.g. with ``optax.MultiSteps``) to emulate a larger batch: accumulate a
  :class:`ClippedSum` over microbatches instead and call ``update`` once.

  It must be the first transform of a chain, since later ones expect a single
  (aggregated) gradient:

  >>> import jax, jax.numpy as jnp, optax
  >>> tx = optax.chain(dp_aggregate(1.0, 1.1, expected_batch_size=4, key=0),
  ...                  optax.adam(1e-3))
  >>> params = {'w': jnp.zeros(3)}
  >>> state = tx.init(params)
  >>> per_example = {'w': jnp.ones((4, 3))}  # 4 examples
  >>> padding = jnp.array([False, False, False, True])
  >>> updates, state = jax.jit(tx.update)(
  ...     per_example, state, params, is_padding_example=padding)
  >>> updates['w'].shape
  (3,)
  >>> dp = dp_state(state)
  >>> int(dp.realized_batch_size), float(dp.clipped_fraction)
  (3, 1.0)

  Args:
    l2_norm_clip: Clipping norm ``C`` > 0 of each example's whole gradient,
      or a ``GroupClipNorms``.
    noise_multiplier: ``sigma`` >= 0; the noise std on the sum is ``sigma*C``.
    expected_batch_size: Public divisor ``q * num_examples`` > 0.
    key: JAX PRNG key or int seed for the noise. Keep it secret; a resumed run
      must restore the state's ``noise_key`` rather than pass the same key.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DpAggregateState`.
  """
  clipping = clip_plan.check_spec(l2_norm_clip)
  if isinstance(clipping, clip_plan.AdaptiveClipNorm):
    raise ValueError('dp_aggregate takes a fixed clip norm; for adaptive '
                     'clipping use adaptive_clipping.dp_aggregate_adaptive.')
  sensitivity = clip_plan.sensitivity(clipping)
  noise_multiplier = _check_positive(
      'noise_multiplier', noise_multiplier, allow_zero=True)
  expected_batch_size = _check_positive(
      'expected_batch_size', expected_batch_size)
  noise_std = noise_multiplier * sensitivity
  if 0 < noise_std < MIN_NOISE_STD:
    raise ValueError(
        f'noise_multiplier * l2_norm_clip = {noise_std:g} < {MIN_NOISE_STD:g}: '
        'float32 would flush such noise to zero and release the exact sum; '
        'raise the clip norm.')
  initial_key = canonicalize_key(key)

  def init_fn(params):
    del params
    return initial_state(initial_key)

  def update_fn(updates, state, params=None, *, is_padding_example=None,
                **extra_args):
    del extra_args
    clipped, like = clipped_sum_for_update(updates, params, is_padding_example,
                                           clipping)
    noise_key, next_key = jax.random.split(state.noise_key)
    noised_sum = add_noise(clipped.grad_sum, noise_std, noise_key)
    # Divide in float32, then return each leaf in its parameter's dtype (or,
    # without params, its per-example gradient's; a ClippedSum's is float32).
    mean = jax.tree.map(
        lambda g, ref: (g / expected_batch_size).astype(jnp.result_type(ref)),
        noised_sum, like)
    return mean, state_after(state, clipped, next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state: PyTree, state_type: type, hint: str) -> Any:
  """The one ``state_type`` inside an optimizer state (a chain, a
  ``MultiSteps``, any pytree), found by type, never by position.

  Raises:
    ValueError: there is none, or more than one; ``hint`` says what to check.
  """
  found = [leaf for leaf in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, state_type))
           if isinstance(leaf, state_type)]
  if len(found) != 1:
    raise ValueError(f'Expected one {state_type.__name__} in the optimizer '
                     f'state, found {len(found)}; {hint}')
  return found[0]


def dp_state(opt_state: PyTree) -> DpAggregateState:
  """The :class:`DpAggregateState` inside an optimizer state; raises unless
  there is exactly one."""
  return find_state(opt_state, DpAggregateState,
                    'is dp_aggregate in the chain?')


def dpsgd(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: float | group_clipping.GroupClipNorms,
    noise_multiplier: float,
    expected_batch_size: int,
    key: jax.Array | int,
    momentum: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """DP-SGD: :func:`dp_aggregate` followed by SGD (with optional momentum).

  The same guarantee and accountant assumptions as :func:`dp_aggregate`;
  momentum is post-processing of the noised gradients.

  Args:
    learning_rate: Step size or schedule.
    l2_norm_clip: Per-example clipping norm ``C`` (or ``GroupClipNorms``).
    noise_multiplier: Noise std on the clipped sum divided by ``C``.
    expected_batch_size: Public divisor ``q * num_examples``.
    key: JAX PRNG key or int seed for the noise.
    momentum: Optional momentum decay.
    nesterov: Whether to use Nesterov momentum.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return optax.chain(
      dp_aggregate(l2_norm_clip, noise_multiplier, expected_batch_size, key),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )

