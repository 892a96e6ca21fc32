"""White-box gradient-canary audit: scoring on hand-made releases, and the
audit against the library's mechanism and against injected bugs.

The broken variants live in experiments/whitebox_audit.py (never in the
library), loaded here by path, so the variants tested are the ones behind
experiments/results/audit/whitebox.json.
"""

import functools
import importlib.util
import math
import pathlib

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dplh_jax.dp import accounting
from dplh_jax.dp import audit
from dplh_jax.dp import clip_plan
from dplh_jax.dp import clipped_sum
from dplh_jax.dp import dp_transform
from dplh_jax.dp import gradient_canaries as gc
from dplh_jax.dp import gradient_canary_simulation as simulation
from dplh_jax.dp import per_example

_SPEC = importlib.util.spec_from_file_location(
    'whitebox_audit',
    pathlib.Path(__file__).parents[2] / 'experiments' / 'whitebox_audit.py')
whitebox_audit = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(whitebox_audit)

# Tiny setting: 200 canaries in 200 dimensions, q = 0.1, 50 steps, claimed
# epsilon 1 at delta 1e-5. The default guess rule guesses on 89 canaries,
# so the design can certify at most 3.37 > 1.
CLAIMED_EPSILON = 1.0
DELTA = 1e-5
Q, STEPS, BATCH, M = 0.1, 50, 16.0, 200
CANARY_NORM = 10.0  # in units of C = 1: clipping must cut canaries to C
REAL_ROWS = whitebox_audit.real_gradients(8, M, 3.0, seed=0)


@functools.lru_cache(maxsize=1)
def claimed_sigma():
  return accounting.calibrate_noise_multiplier(CLAIMED_EPSILON, DELTA, Q,
                                               STEPS)


def audit_all_scorers(mechanism, seed, sigma=None):
  sigma = claimed_sigma() if sigma is None else sigma
  projections, members = simulation.simulate_projections(
      sigma, Q, STEPS, expected_batch_size=BATCH, num_canaries=M, seed=seed,
      canary_norm=CANARY_NORM, real_gradients=REAL_ROWS, mechanism=mechanism)
  num_positive = gc.default_num_positive_guesses(M, Q, STEPS)
  return {scorer: gc.audit_from_scores(
      gc.canary_scores(projections, scorer, Q,
                       signals=gc.canary_signals(CANARY_NORM, 1.0)),
      members, num_positive,
      0, DELTA, scorer=scorer) for scorer in gc.SCORERS}


def test_projections_and_scores_of_hand_made_releases():
  # Three canaries along the axes; canary 0 in both steps, canary 1 in the
  # second, canary 2 in none; divisor B = 4, C = 2, plus a known offset.
  batch, clip = 4.0, 2.0
  offset = np.array([0.0, 0.0, 6.0])
  releases = (np.array([[2.0, 0.0, 0.0], [2.0, 2.0, 0.0]]) + offset) / batch
  x = gc.canary_projections(releases, np.eye(3), batch, clip, offset)
  np.testing.assert_allclose(x, [[1, 0, 0], [1, 1, 0]], atol=1e-12)
  np.testing.assert_allclose(gc.canary_scores(x, 'sum', 0.5), [2, 1, 0])
  np.testing.assert_allclose(gc.canary_scores(x, 'difference', 0.5),
                             [0, 1, 0])
  stepwise = gc.canary_scores(x, 'stepwise', 0.5, noise_scale=1.0)
  # One step at x = 1: log(1/2 + e^(1/2) / 2); at x = 0: log(1/2 + e^(-1/2)/2).
  at_one, at_zero = (math.log(0.5 + 0.5 * math.exp(v)) for v in (0.5, -0.5))
  np.testing.assert_allclose(stepwise, [2 * at_one, at_one + at_zero,
                                        2 * at_zero], rtol=1e-12)
  # An unclipped canary of norm 10 C: the ratio for signal 10 is the larger.
  unclipped = np.array([[10.0], [0.0]])
  with_ten = gc.canary_scores(unclipped, 'stepwise', 0.5, 1.0, (1.0, 10.0))
  np.testing.assert_allclose(
      with_ten, math.log(0.5 + 0.5 * math.exp(50)) + math.log(0.5 + 0.5 *
                                                              math.exp(-50)))
  assert with_ten > gc.canary_scores(unclipped, 'stepwise', 0.5, 1.0)


def test_noise_scale_estimate_ignores_the_few_inclusions():
  rng = np.random.default_rng(0)
  x = 0.3 * rng.standard_normal((50, 200)) + (rng.random((50, 200)) < 0.05)
  assert gc.estimated_noise_scale(x) == pytest.approx(0.3, rel=0.1)


def test_scores_refuse_bad_input():
  with pytest.raises(ValueError, match='scorer must be one of'):
    gc.canary_scores(np.zeros((2, 3)), 'max', 0.5)
  with pytest.raises(ValueError, match='stepwise'):
    gc.canary_scores(np.zeros((2, 3)), 'stepwise', 0.5, noise_scale=0.0)
  with pytest.raises(ValueError, match='delta must be > 0'):
    simulation.run_gradient_audit(1.0, Q, STEPS, expected_batch_size=BATCH,
                                  delta=0.0)


def test_guess_rule_and_bound_of_perfect_scores():
  # The demo: 90% of the 1,000 members expected to join at least once.
  assert gc.default_num_positive_guesses(2000, 256 / 20000, 391) == 894
  members = gc.membership_coins(M, seed=3)
  result = gc.audit_from_scores(members.astype(float), members, 89, 0, DELTA)
  assert (result.num_guesses, result.num_correct) == (89, 89)
  assert result.epsilon_lower_bound == result.max_certifiable_bound
  assert result.max_certifiable_bound == pytest.approx(3.369, abs=1e-3)
  assert result.confidence == 0.95 and result.delta == DELTA


def test_excluded_guesses_would_lower_the_demo_bound():
  # The reason for no "excluded" guesses: even a perfect attacker errs on
  # members that never joined ((1 - q)^T of them) among the low scores; at
  # the demo's 2,000 canaries, 900 such guesses with 6 errors lose 0.6.
  positives_only = audit.epsilon_lower_bound(894, 894, delta=DELTA,
                                             num_canaries=2000)
  both_sides = audit.epsilon_lower_bound(1794, 1788, delta=DELTA,
                                         num_canaries=2000)
  assert positives_only > both_sides + 0.5


def test_canaries_go_through_the_real_clipping():
  # Almost no noise: each member's projection is 1 in the steps it joined
  # (its norm-10 row clipped to C = 1), a non-member's is 0; with clipping
  # skipped the member's raw norm 10 comes through.
  kwargs = dict(expected_batch_size=BATCH, num_canaries=M, seed=0,
                canary_norm=CANARY_NORM)
  x, members = simulation.simulate_projections(1e-4, Q, STEPS, **kwargs)
  assert np.abs(x - np.round(x)).max() < 1e-2
  assert set(np.unique(np.round(x[:, members]))) == {0.0, 1.0}
  assert np.abs(x[:, ~members]).max() < 1e-2
  raw, _ = simulation.simulate_projections(
      1e-4, Q, STEPS, mechanism=whitebox_audit.BROKEN_MECHANISMS[
          'clipping_skipped'], **kwargs)
  assert np.round(raw[:, members]).max() == 10.0
  np.testing.assert_allclose(raw, CANARY_NORM * x, atol=1e-2)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_correct_mechanism_stays_within_its_claim(seed):
  for result in audit_all_scorers(simulation.DP_SGD, seed).values():
    assert result.epsilon_lower_bound <= CLAIMED_EPSILON, result


# Which scorer sees which bug (the module docstring says why).
@pytest.mark.parametrize('bug, scorer', [
    ('noise_10x_too_small', 'stepwise'),
    ('clipping_skipped', 'stepwise'),
    ('noise_on_mean', 'stepwise'),
    ('noise_key_reused', 'difference'),
])
def test_audit_refutes_broken_mechanisms(bug, scorer):
  results = audit_all_scorers(whitebox_audit.BROKEN_MECHANISMS[bug], seed=0)
  assert results[scorer].epsilon_lower_bound > 2 * CLAIMED_EPSILON, results
  if bug == 'noise_key_reused':
    # Each release alone has the full noise: only differencing sees reuse.
    assert results['stepwise'].epsilon_lower_bound <= CLAIMED_EPSILON


def test_slot_keyed_loss_is_invisible_to_gradient_canaries():
  # Removing a canary changes the masks of the canaries after it, but each
  # canary's own projection looks the same whether or not others joined.
  results = audit_all_scorers(
      whitebox_audit.BROKEN_MECHANISMS['loss_keyed_by_slot'], seed=0)
  for result in results.values():
    assert result.epsilon_lower_bound <= CLAIMED_EPSILON, result


def _linear_model(seed):
  """A linear model's per-example loss, 8 data rows, zero parameters, and
  the M canary directions (210 parameters >= M: orthonormal), coins and
  canaries (norm CANARY_NORM, as parameter pytrees)."""
  dims = (20, 10)
  def loss(params, example, rng):
    del rng
    return jnp.sum((example['x'] @ params['w'] + params['b'] - example['y'])**2)
  rng = np.random.default_rng(seed)
  data = {'x': rng.standard_normal((8,) + dims[:1]).astype(np.float32),
          'y': rng.standard_normal((8,) + dims[1:]).astype(np.float32)}
  params = {'w': jnp.zeros(dims), 'b': jnp.zeros(dims[1:])}
  flat, unflatten = jax.flatten_util.ravel_pytree(params)
  directions = gc.canary_directions(M, flat.size, seed)
  members = gc.membership_coins(M, seed)
  canaries = jax.vmap(unflatten)(jnp.asarray(directions * CANARY_NORM))
  return loss, data, params, directions, members, canaries


def test_wrapper_clips_the_canaries_samples_them_at_q_and_counts_them():
  # The wrapped clipped sum without noise, over STEPS step rngs: minus the
  # real rows' sum, each canary projects to 1 (norm 10 clipped to C = 1) in
  # the steps it joined, else 0; members join at rate q, independently per
  # step; non-members never; the counts include exactly the joined ones.
  loss, data, params, directions, members, canaries = _linear_model(0)
  wrapped = gc.with_gradient_canaries(
      per_example.clipped_grad_sum(loss, 1.0), canaries, members, Q,
      jax.random.key(1))
  sums = jax.jit(jax.vmap(lambda rng: wrapped(params, data, rng)))(
      jax.random.split(jax.random.key(2), STEPS))
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
  # The real rows' clipped sum, in float64 here (one compile less).
  real_rows = np.asarray(jax.vmap(ravel)(
      per_example.per_example_grads(loss)(params, data, None)), np.float64)
  real_norms = np.linalg.norm(real_rows, axis=1)
  real_sum = (real_rows / np.maximum(real_norms, 1.0)[:, None]).sum(axis=0)
  x = gc.canary_projections(
      np.asarray(jax.vmap(ravel)(sums.grad_sum), np.float64) - real_sum,
      directions, 1.0, 1.0)
  joined = np.round(x)
  assert np.abs(x - joined).max() < 1e-4
  assert set(np.unique(joined[:, members])) == {0.0, 1.0}
  assert not joined[:, ~members].any()
  # 100 members x 50 steps: the rate's standard error is 0.004.
  assert abs(joined[:, members].mean() - Q) < 0.02
  assert len({row.tobytes() for row in joined}) == STEPS  # fresh per step
  np.testing.assert_array_equal(sums.num_examples, 8 + joined.sum(axis=1))
  np.testing.assert_array_equal(
      sums.num_clipped, (real_norms > 1.0).sum() + joined.sum(axis=1))


def test_wrapper_refuses_a_sum_without_one_flat_clip_norm():
  def adaptive_sum(params, batch, rng, is_padding_example=None):
    del params, batch, rng, is_padding_example
    zero = jnp.zeros((), jnp.int32)
    return clipped_sum.ClippedSum(jnp.zeros(3), zero, zero, zero, 1.0,
                                  clipping=clip_plan.ADAPTIVE)
  wrapped = gc.with_gradient_canaries(adaptive_sum, jnp.zeros((2, 3)),
                                      np.ones(2, bool), Q, jax.random.key(0))
  with pytest.raises(ValueError, match='needs one flat clip norm'):
    wrapped(None, None, jax.random.key(1))


def _linear_model_audit(noise_multiplier, seed=0):
  """Gradient canaries in an ordinary DP-SGD training step (a linear model,
  per_example.clipped_grad_sum, dp_aggregate then SGD), scored by a white-box
  auditor from the intermediate parameters alone."""
  loss, data, params, directions, members, canaries = _linear_model(seed)
  key = jax.random.key(seed)
  step_sum = gc.with_gradient_canaries(
      per_example.clipped_grad_sum(loss, 1.0), canaries, members, Q,
      jax.random.fold_in(key, 1))
  tx = optax.chain(dp_transform.dp_aggregate(1.0, noise_multiplier, BATCH,
                                             jax.random.fold_in(key, 2)),
                   optax.sgd(1.0))
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]

  def step(carry, rng):
    params, opt_state = carry
    updates, opt_state = tx.update(step_sum(params, data, rng), opt_state,
                                   params)
    new_params = optax.apply_updates(params, updates)
    # The auditor's view: the release (lr = 1) minus the real examples'
    # clipped sum, which it can compute from the data and the parameters.
    real = clipped_sum.clip_and_sum(
        per_example.per_example_grads(loss)(params, data, None), 1.0)
    unscaled = (ravel(params) - ravel(new_params)) * BATCH - ravel(
        real.grad_sum)
    return (new_params, opt_state), unscaled

  rngs = jax.vmap(lambda t: jax.random.fold_in(key, t))(
      jnp.arange(100, 100 + STEPS))
  _, unscaled = jax.jit(lambda c, r: jax.lax.scan(step, c, r))(
      (params, tx.init(params)), rngs)
  projections = gc.canary_projections(np.asarray(unscaled), directions,
                                      1.0, 1.0)
  return projections, members


@pytest.mark.parametrize('noise_factor', [1.0, 0.1])
def test_canaries_in_an_ordinary_training_step(noise_factor):
  # Through the wrapped step: the claimed noise stays within its claim for
  # every scorer, a tenth of it is refuted (stepwise).
  x, members = _linear_model_audit(claimed_sigma() * noise_factor)
  results = {scorer: gc.audit_from_scores(
      gc.canary_scores(x, scorer, Q,
                       signals=gc.canary_signals(CANARY_NORM, 1.0)),
      members, gc.default_num_positive_guesses(M, Q, STEPS), 0, DELTA,
      scorer=scorer) for scorer in gc.SCORERS}
  if noise_factor == 1.0:
    for result in results.values():
      assert result.epsilon_lower_bound <= CLAIMED_EPSILON, result
  else:
    assert results['stepwise'].epsilon_lower_bound > 2 * CLAIMED_EPSILON, (
        results)
