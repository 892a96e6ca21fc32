"""Empirical privacy auditing: one-run epsilon lower bounds and loss-based MIA.

Pure NumPy/SciPy; the training experiment that produces canary scores and
losses lives elsewhere.

* ``epsilon_lower_bound``: the delta = 0 bound of Steinke, Nasr and Jagielski
  (2023), "Privacy auditing with one (1) training run" (docs/DESIGN.md, Auditing).
  Setup: m canaries, each included in training independently with
  probability 1/2; after the (single) run an auditor guesses "included" or
  "excluded" for r of them (abstaining on the rest) and v guesses are right.
  If the mechanism is eps-DP, the number of correct guesses is stochastically
  dominated by Binomial(r, e^eps / (1 + e^eps)) (their Theorem 3, delta = 0).
* ``guesses_from_scores`` / ``count_correct``: turn per-canary scores (higher
  means "looks included") into the (r, v) the bound needs.
* ``membership_inference``: loss-threshold attack (lower loss = member), with
  ROC AUC and TPR at low FPR on the empirical ROC.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy import special, stats


def _tail(num_guesses: int, num_correct: int, eps: float) -> float:
  """P[Binomial(r, e^eps / (1 + e^eps)) >= v]; increasing in eps."""
  return float(stats.binom.sf(num_correct - 1, num_guesses, special.expit(eps)))


def epsilon_lower_bound(num_guesses: int, num_correct: int, delta: float = 0.0,
                        significance: float = 0.05) -> float:
  """One-run audit lower bound on epsilon (Steinke, Nasr, Jagielski 2023).

  Returns the largest eps such that
  ``P[Binomial(r, e^eps / (1 + e^eps)) >= v] <= significance`` with
  r = ``num_guesses`` and v = ``num_correct``, or 0.0 if even eps = 0 is not
  rejected (v not significantly above r / 2). Found by bisection to ~1e-9;
  the returned value is on the rejected side, so it never overstates.

  Meaning: for an eps'-DP mechanism (delta = 0) with eps' at most the returned
  value, the probability over the mechanism's randomness (and the random
  inclusion of canaries) of producing at least v correct guesses out of r is
  at most ``significance``. So, with confidence ``1 - significance``, the
  true epsilon of the audited mechanism is at least the returned value; it is
  a lower bound on the true epsilon valid for delta = 0 only.

  Args:
    num_guesses: r, number of canaries guessed on (abstentions excluded).
    num_correct: v, number of correct guesses, 0 <= v <= r.
    delta: must be 0. The paper's delta > 0 bound is not implemented.
    significance: false-positive probability of the test, in (0, 1).

  Returns:
    The epsilon lower bound (>= 0).

  Raises:
    NotImplementedError: if ``delta > 0``.
    ValueError: on invalid counts or significance.

  >>> round(epsilon_lower_bound(100, 100), 2)
  3.49
  >>> epsilon_lower_bound(1000, 510)
  0.0
  """
  if delta != 0.0:
    raise NotImplementedError(
        'epsilon_lower_bound implements only the delta = 0 bound of Steinke, '
        'Nasr, Jagielski (2023); their delta > 0 bound is not implemented. '
        'Pass delta=0 (the bound then lower-bounds epsilon of pure DP).')
  r, v = int(num_guesses), int(num_correct)
  if r != num_guesses or v != num_correct or not 0 <= v <= r:
    raise ValueError(f'need integers 0 <= num_correct <= num_guesses, got '
                     f'{num_correct}, {num_guesses}')
  if not 0.0 < significance < 1.0:
    raise ValueError(f'significance must be in (0, 1), got {significance}')
  if r == 0 or _tail(r, v, 0.0) > significance:
    return 0.0
  lo, hi = 0.0, 1.0  # invariant: tail(lo) <= significance < tail(hi)
  while _tail(r, v, hi) <= significance:
    lo, hi = hi, 2.0 * hi
  while hi - lo > 1e-9:
    mid = 0.5 * (lo + hi)
    if _tail(r, v, mid) <= significance:
      lo = mid
    else:
      hi = mid
  return lo


def guesses_from_scores(scores: np.ndarray, num_positive_guesses: int,
                        num_negative_guesses: int) -> np.ndarray:
  """Guesses "included" for the top-k scores and "excluded" for the bottom-k.

  Args:
    scores: (m,) per-canary scores, higher = more likely included.
    num_positive_guesses: k+, how many highest scores to guess included.
    num_negative_guesses: k-, how many lowest scores to guess excluded;
      k+ + k- <= m, the rest abstain.

  Returns:
    (m,) int array of +1 (guess included), -1 (guess excluded), 0 (abstain).
    Ties are broken by index (stable sort: earlier index ranks lower).

  >>> guesses_from_scores(np.array([0.3, 0.9, 0.1, 0.5]), 1, 1)
  array([ 0,  1, -1,  0])
  """
  scores = np.asarray(scores, float)
  if scores.ndim != 1 or np.isnan(scores).any():
    raise ValueError('scores must be a 1-D array without NaN')
  kp, kn = int(num_positive_guesses), int(num_negative_guesses)
  if kp < 0 or kn < 0 or kp + kn > scores.size:
    raise ValueError(f'need k+, k- >= 0 and k+ + k- <= {scores.size}, '
                     f'got {kp}, {kn}')
  order = np.argsort(scores, kind='stable')
  guesses = np.zeros(scores.size, int)
  guesses[order[:kn]] = -1
  guesses[order[scores.size - kp:]] = 1
  return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> Tuple[int, int]:
  """Counts guesses (non-zero entries) and correct ones.

  Args:
    guesses: (m,) array of +1 / -1 / 0 from ``guesses_from_scores``.
    included: (m,) bool, whether each canary was really included.

  Returns:
    (num_guesses, num_correct) for ``epsilon_lower_bound``.

  >>> count_correct(np.array([1, -1, 0, 1]), np.array([True, True, False, True]))
  (3, 2)
  """
  guesses = np.asarray(guesses)
  included = np.asarray(included, bool)
  if guesses.shape != included.shape or not np.isin(guesses, (-1, 0, 1)).all():
    raise ValueError('guesses must be in {-1, 0, 1} with the shape of included')
  correct = ((guesses == 1) & included) | ((guesses == -1) & ~included)
  return int(np.count_nonzero(guesses)), int(correct.sum())


def tpr_at_fpr(member_losses: np.ndarray, nonmember_losses: np.ndarray,
               target_fpr: float) -> float:
  """Largest empirical TPR over thresholds whose empirical FPR <= target.

  The attack predicts "member" when ``loss <= t``. For every threshold t
  (all observed losses, and t = -inf giving TPR = FPR = 0) we compute
  TPR = mean(member_losses <= t) and FPR = mean(nonmember_losses <= t), and
  return the max TPR with FPR <= target_fpr. No interpolation between ROC
  points (conservative); tied losses cannot be split. With fewer than
  1 / target_fpr non-members this is the TPR at FPR = 0.

  >>> tpr_at_fpr(np.array([0.1, 0.5, 3.0]), np.array([0.3, 1.0, 2.0]), 0.34)
  0.666...
  """
  members = np.sort(np.asarray(member_losses, float))
  nonmembers = np.sort(np.asarray(nonmember_losses, float))
  thresholds = np.concatenate([members, nonmembers])
  tpr = np.searchsorted(members, thresholds, side='right') / members.size
  fpr = np.searchsorted(nonmembers, thresholds, side='right') / nonmembers.size
  ok = fpr <= target_fpr
  return float(tpr[ok].max()) if ok.any() else 0.0


def membership_inference(member_losses: np.ndarray,
                         nonmember_losses: np.ndarray) -> Dict[str, float]:
  """Loss-threshold membership inference (lower loss = member).

  Args:
    member_losses: per-example losses of training (member) examples.
    nonmember_losses: per-example losses of held-out examples.

  Returns:
    Dict with ``auc`` (ROC AUC = P[member loss < non-member loss] + 0.5 P[tie],
    the Mann-Whitney statistic; 0.5 = no leakage), ``tpr_at_fpr_0.01`` and
    ``tpr_at_fpr_0.001`` (see ``tpr_at_fpr``), ``num_members`` and
    ``num_nonmembers``.

  >>> out = membership_inference(np.array([0.1, 0.2]), np.array([0.3, 0.4]))
  >>> out['auc'], out['tpr_at_fpr_0.01']
  (1.0, 1.0)
  """
  members = np.asarray(member_losses, float).ravel()
  nonmembers = np.asarray(nonmember_losses, float).ravel()
  if members.size == 0 or nonmembers.size == 0:
    raise ValueError('need at least one member and one non-member loss')
  if not (np.isfinite(members).all() and np.isfinite(nonmembers).all()):
    raise ValueError('losses must be finite')
  # Rank of -loss: members with low loss get high ranks (average ranks on ties).
  ranks = stats.rankdata(-np.concatenate([members, nonmembers]))
  n1, n0 = members.size, nonmembers.size
  auc = (ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
  return {
      'auc': float(auc),
      'tpr_at_fpr_0.01': tpr_at_fpr(members, nonmembers, 0.01),
      'tpr_at_fpr_0.001': tpr_at_fpr(members, nonmembers, 0.001),
      'num_members': n1,
      'num_nonmembers': n0,
  }
