"""One-run epsilon lower bound and loss-threshold MIA against known answers."""

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from dplh_jax.dp import accounting
from dplh_jax.dp import audit


def test_reference_value_design_section_7():
  assert round(audit.epsilon_lower_bound(100, 100), 2) == 3.49


@pytest.mark.parametrize('r', [10, 100, 1000])
def test_all_correct_matches_closed_form(r):
  # v = r: P[Bin(r, p) >= r] = p^r <= alpha  <=>  p <= alpha^(1/r).
  expected = special.logit(0.05 ** (1.0 / r))
  assert audit.epsilon_lower_bound(r, r) == pytest.approx(expected, abs=1e-6)


def test_bound_is_the_boundary_of_the_test():
  eps = audit.epsilon_lower_bound(500, 400, significance=0.05)
  tail = lambda e: stats.binom.sf(399, 500, special.expit(e))
  assert tail(eps) <= 0.05 < tail(eps + 1e-6)


def test_monotone_in_num_correct():
  bounds = [audit.epsilon_lower_bound(200, v) for v in range(0, 201)]
  assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
  assert bounds[-1] > bounds[150] > 0.0


def test_smaller_significance_gives_smaller_bound():
  assert (audit.epsilon_lower_bound(1000, 700, significance=0.01)
          < audit.epsilon_lower_bound(1000, 700, significance=0.05))


def test_zero_near_half_correct():
  # P[Bin(1000, 1/2) >= 520] ~ 0.11 > 0.05: eps = 0 is not rejected.
  assert audit.epsilon_lower_bound(1000, 500) == 0.0
  assert audit.epsilon_lower_bound(1000, 520) == 0.0
  assert audit.epsilon_lower_bound(1000, 100) == 0.0
  assert audit.epsilon_lower_bound(0, 0) == 0.0
  assert audit.epsilon_lower_bound(1000, 560) > 0.0


def test_bad_inputs():
  with pytest.raises(ValueError):
    audit.epsilon_lower_bound(10, 11)
  with pytest.raises(ValueError):
    audit.epsilon_lower_bound(10, 5, significance=0.0)


# ---- delta > 0 (Steinke, Nasr, Jagielski 2023, the delta > 0 form) ----

# (m, r, v, delta, significance) -> bound from Google's jax_privacy, file
# jax_privacy/auditing.py at commit 8967688c26d46f3b74bfdfe61ef1f984b887abab
# (github.com/google-deepmind/jax_privacy), computed once with
#   python -c "import auditing as A; print(A._epsilon_one_run(0.0, m, r, v,
#              significance, delta))"
# from a copy of that file. Its root finder stops at xtol 1e-6, hence the
# tolerance below.
_JAX_PRIVACY_BOUNDS = [
    ((1000, 100, 75, 1e-4, 0.05), 0.672984729773335),
    ((100000, 1510, 1439, 1e-5, 0.05), 2.6758509126062022),
    ((200, 40, 35, 1e-5, 0.05), 1.1235633970442522),
    ((1000, 200, 180, 1e-3, 0.05), 1.1341463963537886),
    ((1000, 1000, 1000, 1e-5, 0.05), 5.782283131572193),
    ((50, 20, 20, 0.01, 0.1), 0.6662872104289133),
    ((10000, 500, 400, 1e-6, 0.01), 1.1236269896100004),
    ((1000, 100, 70, 1e-2, 0.05), 0.0),
]


@pytest.mark.parametrize('case,expected', _JAX_PRIVACY_BOUNDS)
def test_delta_bound_matches_jax_privacy(case, expected):
  m, r, v, delta, significance = case
  bound = audit.epsilon_lower_bound(r, v, delta=delta, num_canaries=m,
                                    significance=significance)
  assert bound == pytest.approx(expected, abs=2e-6)


def _oracle_p_value(m, r, v, eps, delta):
  """The delta > 0 p-value, computed another way than ``audit``.

  The law of the number of correct guesses of eps-randomized response on r
  canaries is built by dynamic programming, one guess at a time (no SciPy
  binomial), and each window P[v - i <= B < v] is summed afresh.
  """
  p = math.exp(eps) / (1.0 + math.exp(eps))
  law = np.zeros(r + 1)
  law[0] = 1.0
  for n in range(1, r + 1):
    law[1:n + 1] = law[1:n + 1] * (1 - p) + law[:n] * p
    law[0] *= 1 - p
  alpha = max([law[v - i:v].sum() / i for i in range(1, v + 1)], default=0.0)
  return min(1.0, law[v:].sum() + 2 * m * delta * alpha)


def _oracle_bound(m, r, v, delta, significance):
  """Largest eps on a 0.05 grid with p <= significance, refined by brentq."""
  objective = lambda e: significance - _oracle_p_value(m, r, v, e, delta)
  rejected = [e for e in np.arange(0.0, 8.0, 0.05) if objective(e) >= 0]
  if not rejected:
    return 0.0
  return optimize.brentq(objective, rejected[-1], rejected[-1] + 0.05,
                         xtol=1e-10)


_SHARED_CASES = [(200, 40, 35, 1e-5, 0.05), (50, 20, 20, 0.01, 0.1),
                 (1000, 100, 75, 1e-4, 0.05), (150, 150, 120, 1e-3, 0.05),
                 (100, 60, 50, 1e-2, 0.05), (1000, 100, 70, 1e-2, 0.05)]


@pytest.mark.parametrize('case', _SHARED_CASES)
def test_delta_bound_matches_independent_oracle(case):
  m, r, v, delta, significance = case
  bound = audit.epsilon_lower_bound(r, v, delta=delta, num_canaries=m,
                                    significance=significance)
  assert bound == pytest.approx(_oracle_bound(*case), abs=1e-7)
  # On the rejected side of the oracle's test, within 1e-6 of its boundary.
  if bound > 0:
    assert _oracle_p_value(m, r, v, bound, delta) <= significance * (1 + 1e-9)
    assert _oracle_p_value(m, r, v, bound + 1e-6, delta) > significance


@pytest.mark.parametrize('r,v', [(100, 100), (500, 400), (40, 35)])
def test_delta_to_zero_recovers_pure_bound(r, v):
  pure = audit.epsilon_lower_bound(r, v)
  for delta in (1e-12, 1e-15, 1e-300):
    approx = audit.epsilon_lower_bound(r, v, delta=delta, num_canaries=10 * r)
    assert approx <= pure + 1e-9
    assert approx == pytest.approx(pure, abs=1e-6)
  assert audit.epsilon_lower_bound(r, v, delta=1e-5, num_canaries=r) < pure


def test_delta_bound_monotone():
  # More correct guesses -> larger bound.
  bounds = [audit.epsilon_lower_bound(100, v, delta=1e-4, num_canaries=1000)
            for v in range(0, 101)]
  assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
  assert bounds[-1] > bounds[85] > 0.0
  # Larger delta, or more canaries at the same (r, v) -> smaller bound.
  by_delta = [audit.epsilon_lower_bound(200, 180, delta=d, num_canaries=1000)
              for d in (0.0, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2)]
  assert all(b2 < b1 for b1, b2 in zip(by_delta, by_delta[1:]))
  by_m = [audit.epsilon_lower_bound(200, 180, delta=1e-4, num_canaries=m)
          for m in (200, 1000, 10000, 100000)]
  assert all(b2 < b1 for b1, b2 in zip(by_m, by_m[1:]))


def test_delta_term_is_what_keeps_the_bound_valid():
  """An (eps, delta)-DP mechanism the delta = 0 bound would wrongly flag.

  Each canary's bit is released exactly with probability delta (flagged as
  such) and through eps-randomized response otherwise: (eps, delta)-DP per
  canary. The auditor guesses only on the released bits, all correct. The
  delta = 0 bound then exceeds eps; the delta > 0 bound, which counts the m
  chances of a release, does not.
  """
  eps, delta, m = 1.0, 0.01, 2000
  rng = np.random.default_rng(5)
  included = rng.random(m) < 0.5
  released = rng.random(m) < delta
  guesses = np.where(released, np.where(included, 1, -1), 0)
  r, v = audit.count_correct(guesses, included)
  assert r == v > 10
  assert audit.epsilon_lower_bound(r, v) > eps
  assert audit.epsilon_lower_bound(r, v, delta=delta, num_canaries=m) <= eps


def test_delta_bad_arguments():
  with pytest.raises(ValueError, match='num_canaries'):
    audit.epsilon_lower_bound(100, 100, delta=1e-5)
  with pytest.raises(ValueError, match='num_canaries'):
    audit.epsilon_lower_bound(100, 100, delta=1e-5, num_canaries=99)
  with pytest.raises(ValueError, match='num_canaries'):
    audit.epsilon_lower_bound(100, 100, delta=1e-5, num_canaries=150.5)
  with pytest.raises(ValueError, match='delta'):
    audit.epsilon_lower_bound(100, 100, delta=-1e-5, num_canaries=1000)
  with pytest.raises(ValueError, match='delta'):
    audit.epsilon_lower_bound(100, 100, delta=1.0, num_canaries=1000)
  # delta = 0 ignores m (the pure bound does not depend on it).
  assert (audit.epsilon_lower_bound(100, 100, num_canaries=10 ** 6)
          == audit.epsilon_lower_bound(100, 100))


def _randomized_response_bounds(eps, trials, m, rng):
  """Bounds from auditing eps-DP randomized response on m canaries per trial."""
  p_truth = math.exp(eps) / (1 + math.exp(eps)) if eps < math.inf else 1.0
  bounds = []
  for _ in range(trials):
    included = rng.random(m) < 0.5
    flip = rng.random(m) >= p_truth
    released = included ^ flip
    # Score = released bit; guess on all m canaries (ties broken by index).
    guesses = audit.guesses_from_scores(released.astype(float),
                                        int(released.sum()),
                                        int(m - released.sum()))
    r, v = audit.count_correct(guesses, included)
    assert r == m
    bounds.append(audit.epsilon_lower_bound(r, v, significance=0.05))
  return np.array(bounds)


@pytest.mark.parametrize('eps', [1.0, 2.0])
def test_randomized_response_bound_is_valid_and_reasonably_tight(eps):
  """Exactly eps-DP (delta = 0): bound <= eps in >= 1 - 0.05 of trials.

  200 trials of 1000 canaries. Violations are ~Binomial(200, <= 0.05), mean
  <= 10; we allow up to 20 (>= 90% valid), P[more] < 1e-3 for a valid bound.
  Tightness: v ~ 1000 p +- 1.645 sd gives a median bound ~ eps - 0.15.
  """
  bounds = _randomized_response_bounds(eps, 200, 1000,
                                       np.random.default_rng(int(eps * 10)))
  assert np.mean(bounds <= eps) >= 0.90
  assert eps - 0.35 < np.median(bounds) < eps


def test_non_private_release_gives_large_bound():
  bounds = _randomized_response_bounds(math.inf, 3, 1000,
                                       np.random.default_rng(0))
  # 1000 of 1000 correct: logit(0.05 ** (1 / 1000)) = 5.81.
  np.testing.assert_allclose(bounds, 5.807, atol=0.005)


def _gaussian_mechanism_bounds(sigma, trials, m, k, rng):
  """Bounds from auditing y_i = included_i + N(0, sigma^2) on m canaries.

  Changing one canary's inclusion moves one coordinate by 1: each canary
  sees the Gaussian mechanism of sensitivity 1 and noise sigma, whose
  (eps, delta) dp-accounting computes. The auditor guesses "included" for
  the k largest outputs and "excluded" for the k smallest.
  """
  bounds = []
  for _ in range(trials):
    included = rng.random(m) < 0.5
    released = included + sigma * rng.standard_normal(m)
    guesses = audit.guesses_from_scores(released, k, k)
    r, v = audit.count_correct(guesses, included)
    bounds.append(audit.epsilon_lower_bound(r, v, significance=0.05))
  return np.array(bounds)


@pytest.mark.parametrize('sigma', [1.0, 2.0])
def test_gaussian_mechanism_bound_is_valid_and_has_power(sigma):
  """Gaussian mechanism with known (eps, 1e-5): bound <= eps in >= 90%.

  The delta = 0 bound is applied to an (eps, delta)-DP mechanism: its
  false-positive rate is the significance (0.05) plus a delta term, small
  here (m * delta = 0.01). Violations are then about Binomial(200, 0.06),
  mean 12, and we allow 20 (in fact the bound stays far below eps). The bound is also clearly positive (median above
  a quarter of eps: sigma 1 gives ~1.5 of 4.38, sigma 2 ~0.64 of 1.99).
  """
  eps = accounting.epsilon(sigma, 1.0, 1, 1e-5)
  bounds = _gaussian_mechanism_bounds(sigma, 200, 1000, 100,
                                      np.random.default_rng(int(sigma * 10)))
  assert np.mean(bounds <= eps) >= 0.90
  assert np.median(bounds) > 0.25 * eps


def test_audit_flags_a_simulated_mechanism_with_too_little_noise():
  # Claimed: sigma = 2 (eps 1.99 at 1e-5); run: sigma = 0.2, as if the noise
  # were divided by a batch size it should not be. And no noise at all.
  claimed_eps = accounting.epsilon(2.0, 1.0, 1, 1e-5)
  rng = np.random.default_rng(3)
  wrong_scale = _gaussian_mechanism_bounds(0.2, 5, 1000, 100, rng)
  no_noise = _gaussian_mechanism_bounds(0.0, 5, 1000, 100, rng)
  assert (wrong_scale > claimed_eps + 1.0).all()
  # 200 of 200 correct: logit(0.05 ** (1 / 200)) = 4.19.
  np.testing.assert_allclose(no_noise, 4.19, atol=0.01)


def test_guesses_from_scores_and_count_correct():
  scores = np.array([5.0, -1.0, 2.0, 0.0, 3.0, 1.0])
  guesses = audit.guesses_from_scores(scores, 2, 1)
  np.testing.assert_array_equal(guesses, [1, -1, 0, 0, 1, 0])
  included = np.array([True, False, True, True, False, False])
  assert audit.count_correct(guesses, included) == (3, 2)
  np.testing.assert_array_equal(audit.guesses_from_scores(scores, 0, 0), 0)
  with pytest.raises(ValueError):
    audit.guesses_from_scores(scores, 4, 3)
  with pytest.raises(ValueError):
    audit.count_correct(np.array([2, 0]), np.array([True, False]))


def test_mia_perfectly_separated():
  out = audit.membership_inference(np.linspace(0.0, 1.0, 50),
                                   np.linspace(2.0, 3.0, 500))
  assert out['auc'] == 1.0
  assert out['tpr_at_fpr_0.01'] == 1.0
  assert out['tpr_at_fpr_0.001'] == 1.0
  # Reversed: members have the higher losses.
  out = audit.membership_inference(np.linspace(2.0, 3.0, 50),
                                   np.linspace(0.0, 1.0, 500))
  assert out['auc'] == 0.0 and out['tpr_at_fpr_0.01'] == 0.0


def test_mia_identical_distributions():
  rng = np.random.default_rng(1)
  out = audit.membership_inference(rng.normal(size=5000), rng.normal(size=5000))
  assert abs(out['auc'] - 0.5) < 0.03
  assert out['tpr_at_fpr_0.01'] < 0.03  # ~0.01 expected


def test_mia_hand_checked():
  # 100 non-members: one at loss 0.15, 99 in [1, 2]. 5 members.
  nonmembers = np.concatenate([[0.15], np.linspace(1.0, 2.0, 99)])
  members = np.array([0.1, 0.2, 0.3, 0.5, 3.0])
  out = audit.membership_inference(members, nonmembers)
  # Pairs member < non-member: 0.1 beats 100; 0.2, 0.3, 0.5 beat 99 each.
  assert out['auc'] == pytest.approx((100 + 3 * 99) / 500)
  # FPR <= 1%: one non-member allowed, threshold t = 0.5 -> 4 / 5 members.
  assert out['tpr_at_fpr_0.01'] == pytest.approx(0.8)
  # FPR <= 0.1% (< 1 / 100): no non-member allowed, t = 0.1 -> 1 / 5.
  assert out['tpr_at_fpr_0.001'] == pytest.approx(0.2)
  assert (out['num_members'], out['num_nonmembers']) == (5, 100)


def test_mia_ties_count_half_and_cannot_be_split():
  out = audit.membership_inference(np.array([0.5, 1.0]), np.array([1.0, 2.0]))
  assert out['auc'] == pytest.approx(3.5 / 4)
  assert audit.tpr_at_fpr(np.array([0.5, 1.0]), np.array([1.0, 2.0]),
                          0.0) == 0.5
  assert audit.tpr_at_fpr(np.array([0.5, 1.0]), np.array([1.0, 2.0]),
                          0.5) == 1.0
