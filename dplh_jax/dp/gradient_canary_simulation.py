"""The white-box gradient-canary audit run against a simulated training run.

``gradient_canaries`` holds the audit itself (directions, coins, the
training-step wrapper, scorers, guess rule, bound); this module runs it end
to end on the aggregation alone: canary rows, optional fixed "real" rows,
``T`` steps of ``clip_and_sum`` then ``dp_aggregate`` (or a broken variant
swapped in through :class:`Mechanism`), and the auditor's scoring of the
releases. The guarantee is the one stated in ``gradient_canaries``
(docs/DESIGN.md, Auditing).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import clipped_sum
from dplh_jax.dp import dp_transform
from dplh_jax.dp import gradient_canaries


class Mechanism(NamedTuple):
  """The audited aggregation (hashable parts: jit keys on them; tests swap
  in broken variants): ``clip_and_sum(rows, C, is_padding_example=None) ->
  ClippedSum`` of ``(n, d)`` rows, and ``aggregate(C, noise_multiplier,
  expected_batch_size, key)``, a transform from a ``ClippedSum`` to the
  released update."""

  clip_and_sum: Callable[..., clipped_sum.ClippedSum] = (
      clipped_sum.clip_and_sum)
  aggregate: Callable[..., optax.GradientTransformation] = (
      dp_transform.dp_aggregate)


# The mechanism of this library: clip_and_sum, then dp_aggregate.
DP_SGD = Mechanism()


@functools.partial(jax.jit, static_argnames=(
    'mechanism', 'l2_norm_clip', 'noise_multiplier', 'expected_batch_size',
    'sampling_prob', 'steps'))
def released_updates(canary_rows: jax.Array, members: jax.Array,
                     real_rows: jax.Array | None, inclusion_key: jax.Array,
                     noise_key: jax.Array, *, mechanism: Mechanism,
                     l2_norm_clip: float, noise_multiplier: float,
                     expected_batch_size: float, sampling_prob: float,
                     steps: int) -> jax.Array:
  """The ``(T, d)`` updates the mechanism releases over ``steps`` steps.

  Step ``t``: each member canary is included with probability
  ``sampling_prob`` (key ``fold_in(inclusion_key, t)``; the others are
  padding), the canaries' ``ClippedSum`` is added to the real rows' and the
  transform releases its update. The per-step inclusions are not returned:
  they are the mechanism's randomness, not the auditor's to see.
  """
  tx = mechanism.aggregate(l2_norm_clip, noise_multiplier,
                           expected_batch_size, noise_key)
  real_sum = (None if real_rows is None
              else mechanism.clip_and_sum(real_rows, l2_norm_clip))

  def step(state, t):
    included = members & jax.random.bernoulli(
        jax.random.fold_in(inclusion_key, t), sampling_prob, members.shape)
    total = mechanism.clip_and_sum(canary_rows, l2_norm_clip,
                                   jnp.logical_not(included))
    if real_sum is not None:
      total = jax.tree.map(jnp.add, total, real_sum)
    update, state = tx.update(total, state)
    return state, update

  _, releases = jax.lax.scan(step, tx.init(None), jnp.arange(steps))
  return releases


def simulate_projections(
    noise_multiplier: float, sampling_prob: float, steps: int, *,
    expected_batch_size: float, l2_norm_clip: float = 1.0,
    num_canaries: int = 1000, dimension: int | None = None, seed: int = 0,
    canary_norm: float | None = None, real_gradients: Any = None,
    mechanism: Mechanism = DP_SGD) -> tuple[np.ndarray, np.ndarray]:
  """Runs ``mechanism`` with canaries; returns the auditor's ``(T, m)``
  projections (from the releases only) and the ``(m,)`` coins (arguments as
  in :func:`run_gradient_audit`)."""
  dimension = num_canaries if dimension is None else dimension
  canary_norm = l2_norm_clip if canary_norm is None else canary_norm
  directions = gradient_canaries.canary_directions(num_canaries, dimension,
                                                   seed)
  members = gradient_canaries.membership_coins(num_canaries, seed)
  real_rows = known_sum = None
  if real_gradients is not None:
    real_rows = jnp.asarray(real_gradients, jnp.float32)
    if real_rows.ndim != 2 or real_rows.shape[1] != dimension:
      raise ValueError(f'real_gradients must be (n, {dimension}), got shape '
                       f'{real_rows.shape}')
    # The auditor knows the fixed data; it subtracts it as clipped correctly.
    known_sum = np.asarray(
        clipped_sum.clip_and_sum(real_rows, l2_norm_clip).grad_sum)
  inclusion_key, noise_key = jax.random.split(
      jax.random.fold_in(jax.random.key(seed), 2))
  releases = released_updates(
      jnp.asarray(directions * np.float32(canary_norm)), jnp.asarray(members),
      real_rows, inclusion_key, noise_key, mechanism=mechanism,
      l2_norm_clip=float(l2_norm_clip),
      noise_multiplier=float(noise_multiplier),
      expected_batch_size=float(expected_batch_size),
      sampling_prob=float(sampling_prob), steps=int(steps))
  projections = gradient_canaries.canary_projections(
      np.asarray(releases), directions, expected_batch_size, l2_norm_clip,
      known_sum)
  return projections, members


def run_gradient_audit(
    noise_multiplier: float, sampling_prob: float, steps: int, *,
    expected_batch_size: float, delta: float, l2_norm_clip: float = 1.0,
    num_canaries: int = 1000, dimension: int | None = None, seed: int = 0,
    canary_norm: float | None = None, real_gradients: Any = None,
    scorer: str = 'stepwise', num_positive_guesses: int | None = None,
    num_negative_guesses: int = 0, significance: float = 0.05,
    mechanism: Mechanism = DP_SGD) -> gradient_canaries.GradientAuditResult:
  """One white-box audit run of ``mechanism`` (see ``gradient_canaries``).

  Args:
    noise_multiplier: The claimed sigma, which the mechanism is built with.
    sampling_prob: Poisson rate q of every step.
    steps: Number of releases T.
    expected_batch_size: The public divisor B.
    delta: The delta of the claim audited, > 0 (the run's delta).
    l2_norm_clip: C.
    num_canaries: m.
    dimension: d of the gradients; default m (orthonormal canaries).
    seed: Seeds the directions, the coins, the inclusions and the noise
      (each from its own stream).
    canary_norm: Norm of each canary row; default C. Above C, a mechanism
      that clips passes only C of it.
    real_gradients: Optional ``(n, d)`` rows in every step's batch (the rest
      of the data, fixed).
    scorer: One of ``gradient_canaries.SCORERS``, fixed before the run.
    num_positive_guesses: Default
      ``gradient_canaries.default_num_positive_guesses``.
    num_negative_guesses: "Excluded" guesses on the lowest scores.
    significance: Of the bound (confidence ``1 - significance``).
    mechanism: The aggregation audited; ``DP_SGD`` is this library's.

  Returns:
    A ``gradient_canaries.GradientAuditResult``.
  """
  if not delta > 0:
    raise ValueError(f'delta must be > 0 (the delta of the audited claim), '
                     f'got {delta}')
  if scorer not in gradient_canaries.SCORERS:
    raise ValueError(f'scorer must be one of {gradient_canaries.SCORERS}, '
                     f'got {scorer!r}')
  projections, members = simulate_projections(
      noise_multiplier, sampling_prob, steps,
      expected_batch_size=expected_batch_size, l2_norm_clip=l2_norm_clip,
      num_canaries=num_canaries, dimension=dimension, seed=seed,
      canary_norm=canary_norm, real_gradients=real_gradients,
      mechanism=mechanism)
  scores = gradient_canaries.canary_scores(
      projections, scorer, sampling_prob,
      signals=gradient_canaries.canary_signals(canary_norm, l2_norm_clip))
  if num_positive_guesses is None:
    num_positive_guesses = gradient_canaries.default_num_positive_guesses(
        num_canaries, sampling_prob, steps)
  return gradient_canaries.audit_from_scores(
      scores, members, num_positive_guesses, num_negative_guesses, delta,
      significance, scorer)
