"""DP-SGD gradient aggregation as an optax transform: clip, sum, noise, scale.

This module depends only on jax and optax, so it can be copied or imported
into any training loop.

The guarantee. Let ``g_i`` be the gradient of example ``i`` (in dplh-jax one
example is one image with all its proposals). ``dp_aggregate`` computes::

    clipped_sum = sum_i  g_i * min(1, C / ||g_i||_2)     (padding and non-finite: 0)
    update      = (clipped_sum + N(0, (sigma * C)^2 I)) / expected_batch_size

where the norm is the global L2 norm over every leaf of the gradient pytree.
Adding or removing one example changes ``clipped_sum`` by at most ``C`` in L2
norm, so each call is a Gaussian mechanism with noise multiplier ``sigma``. If
the batch was drawn by Poisson sampling with rate ``q`` (each example included
independently), each call is a Poisson-subsampled Gaussian mechanism, and
``T`` calls compose as ``SelfComposedDpEvent(PoissonSampledDpEvent(q,
GaussianDpEvent(sigma)), T)`` under add-or-remove-one adjacency. That is what
the accountant must be told; anything else (fixed-size shuffled batches,
dividing by the realized batch size, reusing a noise key) breaks the
assumption.
"""

import dataclasses
import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import clip_norms

PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=['grad_sum', 'num_examples', 'num_clipped', 'num_non_finite'],
    meta_fields=['l2_norm_clip'])
@dataclasses.dataclass(frozen=True)
class ClippedSum:
  """The clipped per-example gradient sum of a batch, before noise.

  Every array field is additive, so sums of chunks (microbatches, devices)
  are combined with ``jax.tree.map(jnp.add, a, b)`` or ``jax.lax.psum``; noise
  is then added once to the total. The clip norm is static metadata, so sums
  made with different clip norms cannot be combined, and
  :func:`dp_aggregate` refuses a sum clipped with another norm than its own.

  Attributes:
    grad_sum: Sum of clipped per-example gradients, float32 leaves. Its L2
      sensitivity to adding or removing one example is ``l2_norm_clip``.
    num_examples: Real (non-padding) examples seen, finite or not.
    num_clipped: Real finite examples whose norm exceeded the clip.
    num_non_finite: Real examples with a NaN/Inf gradient; they contribute 0.
    l2_norm_clip: The clip norm ``C`` every example was clipped to.
  """

  grad_sum: PyTree
  num_examples: jax.Array
  num_clipped: jax.Array
  num_non_finite: jax.Array
  l2_norm_clip: float


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


# The clip norm's range: C / (a norm's mantissa) and a batch's sum of
# clipped gradients must stay finite in float32 (3.4e38), and the noise std
# sigma * C must stay far above float32's smallest normal number (1.2e-38),
# below which XLA flushes the noise to zero and releases the exact sum.
MAX_L2_NORM_CLIP = 1e30
MIN_NOISE_STD = 1e-30


def check_l2_norm_clip(l2_norm_clip: float) -> float:
  """Returns the clip norm as a float, or raises unless 1e-30 <= C <= 1e30."""
  l2_norm_clip = _check_positive('l2_norm_clip', l2_norm_clip)
  if not MIN_NOISE_STD <= l2_norm_clip <= MAX_L2_NORM_CLIP:
    raise ValueError(
        f'l2_norm_clip must be in [{MIN_NOISE_STD:g}, {MAX_L2_NORM_CLIP:g}], '
        f'got {l2_norm_clip}: outside it float32 sums overflow or the noise '
        'underflows.')
  return l2_norm_clip


def clip_and_sum(
    per_example_grads: PyTree,
    l2_norm_clip: float,
    is_padding_example: jax.Array | None = None,
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

  Args:
    per_example_grads: Pytree of floating-point leaves that share a leading
      example axis.
    l2_norm_clip: Clipping norm ``C`` > 0 (a Python number).
    is_padding_example: Optional bool vector over the example axis; True
      marks padding. None means every example is real.

  Returns:
    The clipped sum (float32 leaves) and example counts.
  """
  l2_norm_clip = check_l2_norm_clip(l2_norm_clip)
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
  # The norm and the sum both read the example scaled by a power of two, so
  # no square underflows or overflows and the norm bounds what is added.
  norms, scaled, exponent = clip_norms.scaled_norms(grads32)
  factors = clip_norms.clip_factors(norms, is_finite, is_real, l2_norm_clip)

  def weighted_sum(g32, leaf):
    return factors.weighted_sum(g32, exponent).reshape(leaf.shape[1:])

  treedef = jax.tree.structure(per_example_grads)
  return clipped_sum_of(factors, jax.tree.unflatten(
      treedef, [weighted_sum(g, l) for g, l in zip(scaled, leaves)]))


def clipped_sum_of(factors: clip_norms.ClipFactors, grad_sum: PyTree
                   ) -> ClippedSum:
  """Wraps a sum weighted by ``factors`` with the example counts."""
  return ClippedSum(
      grad_sum=grad_sum,
      num_examples=jnp.sum(factors.is_real, dtype=jnp.int32),
      num_clipped=jnp.sum(factors.clipped, dtype=jnp.int32),
      num_non_finite=jnp.sum(factors.is_real & ~factors.keep,
                             dtype=jnp.int32),
      l2_norm_clip=factors.l2_norm_clip)


def _check_matches_params(grads: PyTree, params: PyTree, leading: int) -> None:
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


def add_noise(
    grad_sum: PyTree, noise_std: float, key: jax.Array
) -> PyTree:
  """Adds independent N(0, noise_std^2) float32 noise to every entry.

  One normal vector for the whole tree, split into the leaves: the same
  distribution as a draw per leaf, but a single RNG call, which XLA compiles
  in a fraction of the time (one threefry kernel instead of one per leaf).
  """
  leaves, treedef = jax.tree.flatten(grad_sum)
  sizes = [leaf.size for leaf in leaves]
  noise = noise_std * jax.random.normal(key, (sum(sizes),), dtype=jnp.float32)
  offsets = np.cumsum([0] + sizes)
  noised = [
      leaf.astype(jnp.float32) + noise[start:stop].reshape(leaf.shape)
      for leaf, start, stop in zip(leaves, offsets[:-1], offsets[1:])
  ]
  return jax.tree.unflatten(treedef, noised)


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
  value = float(value)
  if not (value >= 0 if allow_zero else value > 0) or value == float('inf'):
    bound = '>= 0' if allow_zero else '> 0'
    raise ValueError(f'{name} must be finite and {bound}, got {value}.')
  return value


def dp_aggregate(
    l2_norm_clip: float,
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
    l2_norm_clip: Clipping norm ``C`` > 0 of each example's whole gradient.
    noise_multiplier: ``sigma`` >= 0; the noise std on the sum is ``sigma*C``.
    expected_batch_size: Public divisor ``q * num_examples`` > 0.
    key: JAX PRNG key or int seed for the noise. Keep it secret; a resumed run
      must restore the state's ``noise_key`` rather than pass the same key.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DpAggregateState`.
  """
  l2_norm_clip = check_l2_norm_clip(l2_norm_clip)
  noise_multiplier = _check_positive(
      'noise_multiplier', noise_multiplier, allow_zero=True)
  expected_batch_size = _check_positive(
      'expected_batch_size', expected_batch_size)
  noise_std = noise_multiplier * l2_norm_clip
  if 0 < noise_std < MIN_NOISE_STD:
    raise ValueError(
        f'noise_multiplier * l2_norm_clip = {noise_std:g} < {MIN_NOISE_STD:g}: '
        'float32 would flush such noise to zero and release the exact sum; '
        'raise the clip norm.')
  initial_key = canonicalize_key(key)

  def init_fn(params):
    del params
    # Distinct arrays per field, so a jitted step may donate the state.
    def zero():
      return jnp.zeros((), jnp.int32)
    return DpAggregateState(
        noise_key=initial_key, num_updates=zero(), realized_batch_size=zero(),
        clipped_fraction=jnp.zeros((), jnp.float32), num_non_finite=zero(),
        total_non_finite=zero())

  def update_fn(updates, state, params=None, *, is_padding_example=None,
                **extra_args):
    del extra_args
    if isinstance(updates, ClippedSum):
      if is_padding_example is not None:
        raise ValueError('Pass is_padding_example to clip_and_sum, not with a '
                         'ClippedSum.')
      if updates.l2_norm_clip != l2_norm_clip:
        raise ValueError(
            f'The ClippedSum was clipped to {updates.l2_norm_clip} but this '
            f'transform calibrates its noise for l2_norm_clip={l2_norm_clip}.')
      if params is not None:
        _check_matches_params(updates.grad_sum, params, leading=0)
      clipped, like = updates, updates.grad_sum
    else:
      if params is not None:
        _check_matches_params(updates, params, leading=1)
      clipped = clip_and_sum(updates, l2_norm_clip, is_padding_example)
      like = updates
    if params is not None:
      like = params  # updates in the parameters' dtype, on both paths
    noise_key, next_key = jax.random.split(state.noise_key)
    noised_sum = add_noise(clipped.grad_sum, noise_std, noise_key)
    # Divide in float32, then return each leaf in its parameter's dtype (or,
    # without params, its per-example gradient's; a ClippedSum's is float32).
    mean = jax.tree.map(
        lambda g, ref: (g / expected_batch_size).astype(jnp.result_type(ref)),
        noised_sum, like)
    new_state = DpAggregateState(
        noise_key=next_key,
        num_updates=state.num_updates + 1,
        realized_batch_size=clipped.num_examples,
        clipped_fraction=clipped.num_clipped
        / jnp.maximum(clipped.num_examples - clipped.num_non_finite, 1),
        num_non_finite=clipped.num_non_finite,
        total_non_finite=state.total_non_finite + clipped.num_non_finite,
    )
    return mean, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_state(opt_state: PyTree) -> DpAggregateState:
  """The :class:`DpAggregateState` inside an optimizer state (a chain, a
  ``MultiSteps``, any pytree), found by type; raises unless there is one."""
  found = [leaf for leaf in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, DpAggregateState))
           if isinstance(leaf, DpAggregateState)]
  if len(found) != 1:
    raise ValueError(f'Expected one DpAggregateState in the optimizer state, '
                     f'found {len(found)}; is dp_aggregate in the chain?')
  return found[0]


def dpsgd(
    learning_rate: optax.ScalarOrSchedule,
    l2_norm_clip: float,
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
    l2_norm_clip: Per-example clipping norm ``C``.
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
