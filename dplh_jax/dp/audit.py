"""Empirical privacy auditing: one-run epsilon lower bounds and loss-based MIA.

Pure NumPy/SciPy; the training experiment that produces canary scores and
losses lives elsewhere.

* ``epsilon_lower_bound``: the bound of Steinke, Nasr and Jagielski (2023),
  "Privacy auditing with one (1) training run" (docs/DESIGN.md, Auditing).
  Setup: m canaries, each included in training independently with
  probability 1/2; after the (single) run an auditor guesses "included" or
  "excluded" for r of them (abstaining on the rest) and v guesses are right.
  Let B ~ Binomial(r, e^eps / (1 + e^eps)). If the mechanism is eps-DP in
  each canary, the number of correct guesses is stochastically dominated by
  B (their main theorem, delta = 0). If it is (eps, delta)-DP, P[>= v correct]
  <= P[B >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= B < v] / i (the
  theorem's delta > 0 form, evaluated as in their Appendix D); it needs m.
* ``guesses_from_scores`` / ``count_correct``: turn per-canary scores (higher
  means "looks included") into the (r, v) the bound needs.
* ``membership_inference``: loss-threshold attack (lower loss = member), with
  ROC AUC and TPR at low FPR on the empirical ROC.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
from scipy import special, stats


def _tail(num_guesses: int, num_correct: int, eps: float) -> float:
  """P[Binomial(r, e^eps / (1 + e^eps)) >= v]; increasing in eps."""
  return float(stats.binom.sf(num_correct - 1, num_guesses, special.expit(eps)))


def _p_value(num_guesses: int, num_correct: int, num_canaries: int,
             eps: float, delta: float) -> float:
  """Upper bound on P[>= v correct] under (eps, delta)-DP (the delta > 0 form).

  ``P[B >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= B <= v - 1] / i``,
  capped at 1, with B ~ Binomial(r, e^eps / (1 + e^eps)); exactly ``_tail``
  when delta = 0.
  """
  tail = _tail(num_guesses, num_correct, eps)
  if delta == 0.0 or num_correct == 0:
    return tail
  # P[v - i <= B <= v - 1] for i = 1..v as a running sum of the pmf from
  # v - 1 downwards: accurate also where the cdf is within rounding of 1,
  # which a difference of cdfs is not.
  pmf = stats.binom.pmf(np.arange(num_correct - 1, -1, -1), num_guesses,
                        special.expit(eps))
  window = np.cumsum(pmf) / np.arange(1, num_correct + 1)
  return min(1.0, tail + 2.0 * num_canaries * delta * float(window.max()))


def epsilon_lower_bound(num_guesses: int, num_correct: int, delta: float = 0.0,
                        significance: float = 0.05,
                        num_canaries: Optional[int] = None) -> float:
  """One-run audit lower bound on epsilon (Steinke, Nasr, Jagielski 2023).

  With r = ``num_guesses``, v = ``num_correct``, m = ``num_canaries`` and
  B ~ Binomial(r, e^eps / (1 + e^eps)), let

    p(eps) = P[B >= v]                                         (delta = 0),
    p(eps) = min(1, P[B >= v]
                 + 2 m delta max_{1 <= i <= v} P[v - i <= B < v] / i)
                                                               (delta > 0).

  Returns an eps with ``p(eps) <= significance`` found by bisection to
  ~1e-9 and kept on that side, so it never overstates; 0.0 if even
  eps = 0 is not rejected (v not significantly above r / 2).

  Meaning: let the audited mechanism be a function of the m canaries'
  inclusion bits (the m fair coins; the rest of the data fixed), and let it
  be (eps', delta)-DP with respect to including or excluding any one canary.
  Then the probability, over the coins and the mechanism's randomness, of at
  least v correct guesses among r is at most p(eps') (their main theorem for
  delta = 0; its delta > 0 form), for any guessing rule with
  at most r non-abstentions. So, with confidence ``1 - significance``, the
  mechanism is not (eps, delta)-DP for any eps below the returned value: it
  lower-bounds the epsilon that goes with this ``delta``. (A mechanism that
  is (eps', delta)-DP is so for every larger eps' too, so any eps with
  p(eps) <= significance is a valid bound, even if p is not monotone.)

  The delta term grows with m, not r: canaries the auditor abstains on still
  count. For a fixed (r, v) the delta > 0 bound is at most the delta = 0
  bound, and tends to it as m delta -> 0.

  Args:
    num_guesses: r, number of canaries guessed on (abstentions excluded).
    num_correct: v, number of correct guesses, 0 <= v <= r.
    delta: the delta of the (eps, delta)-DP claim being audited, in [0, 1).
    significance: false-positive probability of the test, in (0, 1).
    num_canaries: m, all canaries whose inclusion was randomized (guessed or
      not), m >= r; required when ``delta > 0``, unused when delta = 0.

  Returns:
    The epsilon lower bound (>= 0).

  Raises:
    ValueError: on invalid counts, delta or significance, or ``delta > 0``
      without ``num_canaries``.

  >>> round(epsilon_lower_bound(100, 100), 2)
  3.49
  >>> epsilon_lower_bound(1000, 510)
  0.0
  >>> round(epsilon_lower_bound(100, 100, delta=1e-5, num_canaries=1000), 2)
  3.47
  """
  r, v = int(num_guesses), int(num_correct)
  if r != num_guesses or v != num_correct or not 0 <= v <= r:
    raise ValueError(f'need integers 0 <= num_correct <= num_guesses, got '
                     f'{num_correct}, {num_guesses}')
  if not 0.0 < significance < 1.0:
    raise ValueError(f'significance must be in (0, 1), got {significance}')
  if not 0.0 <= delta < 1.0:
    raise ValueError(f'delta must be in [0, 1), got {delta}')
  if delta > 0.0 and num_canaries is None:
    raise ValueError(f'delta={delta} > 0 needs the number of canaries: pass '
                     f'num_canaries=m (all randomized canaries, m >= '
                     f'num_guesses={r})')
  m = r if num_canaries is None else int(num_canaries)
  if (num_canaries is not None and m != num_canaries) or m < r:
    raise ValueError(f'num_canaries must be an integer >= num_guesses={r}, '
                     f'got {num_canaries}')
  p_value = lambda eps: _p_value(r, v, m, eps, delta)
  if r == 0 or p_value(0.0) > significance:
    return 0.0
  lo, hi = 0.0, 1.0  # invariant: p(lo) <= significance < p(hi)
  while p_value(hi) <= significance:
    lo, hi = hi, 2.0 * hi
  while hi - lo > 1e-9:
    mid = 0.5 * (lo + hi)
    if p_value(mid) <= significance:
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
