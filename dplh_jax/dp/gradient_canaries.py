"""White-box one-run audit of DP-SGD aggregation with gradient canaries.

The one-run audit of Steinke, Nasr and Jagielski (2023, Section 7) in
gradient space, run against the mechanism as implemented: canary gradients
go through ``clipped_sum.clip_and_sum`` (the real clipping, padding and
counts) and their ``ClippedSum`` is added to the other examples' before
``dp_transform.dp_aggregate`` adds the noise, once, with its own key chain
(docs/DESIGN.md, Auditing). This module is the audit and the wrapper that
puts canaries into a real training step (``with_gradient_canaries``);
``gradient_canary_simulation`` runs it on the aggregation alone
(``simulate_projections``, ``run_gradient_audit``; broken variants of the
mechanism swap in there as a ``Mechanism``).

Setup. ``m`` canaries are directions ``u_i`` (unit vectors, orthonormal when
the dimension is at least ``m``) scaled to a norm ``canary_norm`` (default
``C``; larger ones test that clipping cuts them). A seeded fair coin makes
each canary a member. At every step each member joins the batch
independently with probability ``q`` (Poisson, its own key, independent of
everything else), as a training example would; non-members never do. Fixed
"real" example rows, if given, are in every step's batch. The auditor sees
the ``T`` released updates ``r_t`` (white box: every intermediate update, as
an attacker holding every intermediate model has them) and nothing else: not
the per-step inclusions, which are the mechanism's randomness. It scores
canary ``i`` from ``x_ti = <u_i, B r_t - a> / C`` (``B`` the public divisor,
``a`` the clipped sum of the fixed real rows, which the auditor knows as it
chose them), guesses, and turns the correct guesses into
``audit.epsilon_lower_bound`` with the run's ``delta`` and ``num_canaries``.

Guarantee. Whatever the scorer and guess counts (fixed before the run), if
the audited mechanism is (eps, delta)-DP with respect to adding or removing
any one example (a canary is one example), then the returned bound exceeds
eps with probability at most ``significance`` over the coins and the
mechanism's randomness. So a bound above the claimed epsilon refutes the
claim at confidence ``1 - significance``; a bound below it proves nothing.

Scorers (``SCORERS``):

* ``'stepwise'`` (default): the log-likelihood ratio of the releases for a
  member against a non-member, summed over steps:
  ``sum_t log(1 - q + q exp((a x_ti - a^2/2) / s^2))``, with the noise
  scale ``s`` estimated from the releases (``estimated_noise_scale``), so
  that it is the right ratio also for a mechanism with less noise than
  claimed, and the larger of the ratios for a canary's signal ``a = 1``
  (clipped to C) and ``a = canary_norm / C`` (not clipped). Sees a noise
  scale that is too small, skipped clipping, a wrong divisor of the
  noise.
* ``'sum'``: ``sum_t x_ti``, the inner product of ``u_i`` with the summed
  updates: weaker at small noise (it adds up the noise of all ``T`` steps).
* ``'difference'``: ``sum_t |x_ti - x_{t-1,i}|``. With a noise key reused
  every step the noise cancels between consecutive releases and exposes
  the inclusions; to the other scorers each release looks correctly noised.

What it cannot see: anything before the gradient, since canaries are
gradient rows and never pass through a model or a loss. In particular a
per-example loss whose randomness is keyed by batch slot (docs/DESIGN.md,
Privacy rules, rule 8): removing one image then changes the other images'
gradients, but a canary's own row is fixed, so its projection carries no
trace of the coupling.

Guess rule (``default_num_positive_guesses``): guess "included" for the
``floor(0.9 * m/2 * (1 - (1 - q)^T))`` highest scores and abstain on the
rest: 90% of the expected number of members that joined at least one step.
It depends only on public quantities, so it is fixed before the run. No
"excluded" guesses by default: a member that never joined a step (a
fraction ``(1 - q)^T`` of the members) looks exactly like a non-member
even to a perfect attacker, so low scores are wrong at that rate, and at
the epsilons audited here one error costs more than many correct guesses
add (``tests/dp/gradient_canaries_test.py`` checks this trade-off).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dplh_jax.dp import audit
from dplh_jax.dp import clipped_sum

SCORERS = ('stepwise', 'sum', 'difference')


@dataclasses.dataclass(frozen=True)
class GradientAuditResult:
  """Outcome of one white-box audit run.

  Attributes:
    epsilon_lower_bound: eps such that the mechanism is not (eps, delta)-DP,
      at ``confidence``; 0 if nothing is refuted.
    num_guesses: Non-abstaining guesses r.
    num_correct: Correct guesses v.
    max_certifiable_bound: The bound had all r guesses been right: the most
      this design can certify.
    delta: The delta of the audited claim (used in the bound).
    confidence: ``1 - significance``.
    num_canaries: m, all randomized canaries.
    num_members: Canaries whose coin said member (a diagnostic; the bound
      does not use it beyond ``num_correct``).
    scorer: Which of ``SCORERS`` made the scores.
  """

  epsilon_lower_bound: float
  num_guesses: int
  num_correct: int
  max_certifiable_bound: float
  delta: float
  confidence: float
  num_canaries: int
  num_members: int
  scorer: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@functools.lru_cache(maxsize=4)
def canary_directions(num_canaries: int, dimension: int, seed: int
                      ) -> np.ndarray:
  """``(m, d)`` float32 unit rows from ``seed``: orthonormal (the Q of a
  Gaussian matrix) when ``d >= m``, so canaries do not see each other;
  independent Gaussian directions otherwise.

  Cost: the QR works on a ``d x m`` float64 matrix (8 d m bytes, as much
  again for its Q, of order ``d m^2`` flops): seconds at d = m = 3000, and
  2 x 70 MB for 500 canaries in a 17k-parameter model. For large ``d`` independent Gaussian directions
  are nearly orthogonal anyway (inner products of order ``1/sqrt(d)``), so
  a caller short of memory may normalize Gaussian rows instead. Cached,
  hence read-only.
  """
  if num_canaries < 1 or dimension < 1:
    raise ValueError(f'need num_canaries >= 1 and dimension >= 1, got '
                     f'{num_canaries} and {dimension}')
  gaussian = np.random.default_rng([seed, 0]).standard_normal(
      (dimension, num_canaries))
  if dimension >= num_canaries:
    rows = np.linalg.qr(gaussian)[0].T
  else:
    rows = gaussian.T / np.linalg.norm(gaussian, axis=0)[:, None]
  rows = rows.astype(np.float32)
  rows.flags.writeable = False
  return rows


def membership_coins(num_canaries: int, seed: int) -> np.ndarray:
  """``(m,)`` bool: the seeded fair coin of each canary (True = member)."""
  return np.random.default_rng([seed, 1]).random(num_canaries) < 0.5


def with_gradient_canaries(clipped_sum_fn: Callable[..., Any], canaries: Any,
                           members: jax.Array, sampling_prob: float,
                           key: jax.Array) -> Callable[..., Any]:
  """Adds gradient canaries to a training step's clipped sum (for audits).

  ``clipped_sum_fn(params, batch, rng, *args, is_padding_example=...)`` is a
  clipped-sum function such as ``per_example.clipped_grad_sum(loss, C)`` or
  HyperFace's ``train_step.clipped_sum_fn(spec)``, returning a
  ``ClippedSum`` (or ``(ClippedSum, aux)``) with one flat clip norm. The
  wrapped function returns the same, with the ``ClippedSum`` of the member
  canaries that join this step (each with probability ``sampling_prob``)
  added, clipped by ``clipped_sum.clip_and_sum`` to the same norm, before
  ``dp_aggregate`` adds the noise. The canaries are then examples like any
  other, so the step stays DP with respect to each of them at the run's
  epsilon. The inclusions are drawn from ``key`` folded with 32 bits of the
  step's ``rng``, never from the noise key.

  .. warning::
    The wrapper sees no step counter: the inclusions are a function of
    ``key`` and ``rng`` alone. Pass a different ``rng`` at every step (e.g.
    ``fold_in(step_root, t)``, as ``hyperface/train.py`` and
    ``experiments/whitebox_audit.py`` do). With the same ``rng`` every
    step, the same canaries join every step: that is not Poisson sampling
    per step, a canary then costs T steps without amplification, and an
    audit of a correct mechanism can report a bound above its claim.

  Never used by default training; an auditor wraps the step explicitly.

  Args:
    clipped_sum_fn: The step's clipped-sum function.
    canaries: Pytree shaped like the gradient with a leading canary axis m.
    members: ``(m,)`` bool coins; non-members never join.
    sampling_prob: q of the run.
    key: The canaries' own PRNG key.

  Returns:
    A function with ``clipped_sum_fn``'s signature and results.
  """
  members = jnp.asarray(members, bool)

  def wrapped(params, batch, rng, *args, is_padding_example=None, **kwargs):
    out = clipped_sum_fn(params, batch, rng, *args,
                         is_padding_example=is_padding_example, **kwargs)
    total, aux = out if isinstance(out, tuple) else (out, None)
    if total.clipping is not None:
      raise ValueError(f'with_gradient_canaries needs one flat clip norm, '
                       f'got clipping {total.clipping!r}; use a float C')
    step_key = jax.random.fold_in(key, jax.random.bits(rng, dtype=jnp.uint32))
    joined = members & jax.random.bernoulli(step_key, sampling_prob,
                                            members.shape)
    canary_sum = clipped_sum.clip_and_sum(canaries, total.l2_norm_clip,
                                          jnp.logical_not(joined))
    total = jax.tree.map(jnp.add, total, canary_sum)
    return total if aux is None else (total, aux)

  return wrapped


def canary_projections(releases: np.ndarray, directions: np.ndarray,
                       expected_batch_size: float, l2_norm_clip: float,
                       known_sum: np.ndarray | None = None) -> np.ndarray:
  """``x_ti = <u_i, B r_t - a> / C``, ``(T, m)`` in float64: about 1 where
  canary ``i`` was in step ``t``'s batch, plus noise of std ``sigma``."""
  unscaled = np.asarray(releases, np.float64) * expected_batch_size
  if known_sum is not None:
    unscaled = unscaled - np.asarray(known_sum, np.float64)
  return unscaled @ np.asarray(directions, np.float64).T / l2_norm_clip


def estimated_noise_scale(projections: np.ndarray) -> float:
  """The noise std of the projections, from the releases alone: 1.4826 x
  the median absolute deviation over all steps and canaries (robust to the
  few entries where a canary joined; at least 1e-12)."""
  x = np.asarray(projections, np.float64)
  mad = np.median(np.abs(x - np.median(x)))
  return max(1.4826 * float(mad), 1e-12)


def canary_scores(projections: np.ndarray, scorer: str,
                  sampling_prob: float, noise_scale: float | None = None,
                  signals: tuple[float, ...] = (1.0,)) -> np.ndarray:
  """``(m,)`` scores (higher = looks like a member) from ``(T, m)``
  projections; see the module docstring for the ``SCORERS``.

  ``'stepwise'`` uses the public ``sampling_prob``, ``noise_scale``
  (default ``estimated_noise_scale(projections)``: estimated rather than
  the claimed sigma, so a mechanism with less noise than claimed is scored
  by the likelihood ratio of its actual noise) and ``signals``: the
  projection a joining canary may add (1 if clipped to C; its norm over C
  if clipping is skipped). The score is the largest of the likelihood
  ratios for these signals.
  """
  x = np.asarray(projections, np.float64)
  if x.ndim != 2:
    raise ValueError(f'projections must be (steps, canaries), got shape '
                     f'{x.shape}')
  if scorer == 'sum':
    return x.sum(axis=0)
  if scorer == 'difference':
    return np.abs(np.diff(x, axis=0)).sum(axis=0)
  if scorer == 'stepwise':
    if noise_scale is None:
      noise_scale = estimated_noise_scale(x)
    if not noise_scale > 0 or not 0 < sampling_prob < 1:
      raise ValueError(f"scorer 'stepwise' needs noise_scale > 0 and 0 < "
                       f'sampling_prob < 1, got {noise_scale} and '
                       f'{sampling_prob}; use scorer="sum"')
    ratios = [np.logaddexp(
        math.log1p(-sampling_prob), math.log(sampling_prob)
        + (a * x - a * a / 2) / noise_scale**2).sum(axis=0) for a in signals]
    return np.max(ratios, axis=0)
  raise ValueError(f'scorer must be one of {SCORERS}, got {scorer!r}')


def canary_signals(canary_norm: float | None, l2_norm_clip: float
                   ) -> tuple[float, ...]:
  """The stepwise scorer's signals: 1 (clipped), and ``canary_norm / C``
  when canaries are longer than C (clipping skipped)."""
  if canary_norm is None or canary_norm <= l2_norm_clip:
    return (1.0,)
  return (1.0, canary_norm / l2_norm_clip)


def default_num_positive_guesses(num_canaries: int, sampling_prob: float,
                                 steps: int) -> int:
  """``floor(0.9 * m/2 * (1 - (1 - q)^T))``: 90% of the members expected
  to join at least one step (public, fixed before the run)."""
  joined = 1.0 - (1.0 - sampling_prob)**steps
  return int(math.floor(0.9 * num_canaries / 2 * joined))


def audit_from_scores(scores: np.ndarray, members: np.ndarray,
                      num_positive_guesses: int, num_negative_guesses: int,
                      delta: float, significance: float = 0.05,
                      scorer: str = 'stepwise') -> GradientAuditResult:
  """Guesses from ``scores`` and the (eps, delta) bound they certify."""
  members = np.asarray(members, bool)
  guesses = audit.guesses_from_scores(scores, num_positive_guesses,
                                      num_negative_guesses)
  num_guesses, num_correct = audit.count_correct(guesses, members)
  bound = functools.partial(audit.epsilon_lower_bound, delta=delta,
                            significance=significance,
                            num_canaries=members.size)
  return GradientAuditResult(
      epsilon_lower_bound=bound(num_guesses, num_correct),
      num_guesses=num_guesses, num_correct=num_correct,
      max_certifiable_bound=bound(num_guesses, num_guesses), delta=delta,
      confidence=1.0 - significance, num_canaries=members.size,
      num_members=int(members.sum()), scorer=scorer)
