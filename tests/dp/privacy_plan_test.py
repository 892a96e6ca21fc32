"""The privacy plan never spends past its target, and says when it cuts."""

import pytest

from dplh_jax.dp import accounting
from dplh_jax.dp import privacy_plan

_PLAN = dict(num_examples=100, expected_batch_size=10, delta=1e-5,
             accountant='rdp')


def test_steps_within_budget_is_the_largest_that_fits():
  spent = accounting.PrivacyAccountant('rdp')
  target = 2.0
  got = privacy_plan.steps_within_budget(spent, 2.0, 0.1, 500, 1e-5, target)
  assert spent.epsilon_after(1e-5, 2.0, 0.1, got) <= target
  assert spent.epsilon_after(1e-5, 2.0, 0.1, got + 1) > target


def test_both_budget_and_sigma_cut_the_planned_steps():
  plan = privacy_plan.plan_privacy(num_epochs=50, dp=True,
                                   noise_multiplier=2.0, target_epsilon=2.0,
                                   **_PLAN)
  assert plan.requested_steps == 500
  assert plan.num_steps < plan.requested_steps
  assert accounting.epsilon(2.0, 0.1, plan.num_steps, 1e-5, "rdp") <= 2.0


def test_calibrated_sigma_spends_at_most_the_target_after_earlier_phases():
  spent = accounting.PrivacyAccountant('rdp')
  spent.compose(2.0, 0.1, 50)  # e.g. pre-training on the same data
  plan = privacy_plan.plan_privacy(num_epochs=5, dp=True,
                                   noise_multiplier=None, target_epsilon=3.0,
                                   spent=spent, **_PLAN)
  assert plan.num_steps == plan.requested_steps == 50
  total = spent.epsilon_after(1e-5, plan.noise_multiplier, 0.1, 50)
  assert total <= 3.0
  assert total > 2.9  # calibrated, not merely safe


def test_non_private_plan_and_bad_sampling_rate():
  plan = privacy_plan.plan_privacy(num_epochs=2, dp=False,
                                   noise_multiplier=None, target_epsilon=None,
                                   **_PLAN)
  assert (plan.noise_multiplier, plan.num_steps) == (0.0, 20)
  with pytest.raises(ValueError, match='q=2 > 1'):
    privacy_plan.plan_privacy(num_examples=5, expected_batch_size=10,
                              num_epochs=1, dp=False, noise_multiplier=None,
                              target_epsilon=None, delta=1e-5)
  with pytest.raises(ValueError, match='cannot pay for one step'):
    privacy_plan.plan_privacy(num_epochs=1, dp=True, noise_multiplier=0.1,
                              target_epsilon=0.01, **_PLAN)


def _phases_epsilon(plan, steps):
  return accounting.PrivacyAccountant('rdp').epsilon_after(
      1e-5, plan.noise_multiplier, plan.sampling_prob,
      plan.phase_steps(0, steps))


def test_pretraining_steps_come_first_under_one_calibrated_sigma():
  plan = privacy_plan.plan_privacy(
      num_epochs=3, pretrain_epochs=2, phase_names=('pre', 'main'), dp=True,
      noise_multiplier=None, target_epsilon=3.0, **_PLAN)
  assert (plan.pretrain_steps, plan.num_steps, plan.requested_steps) == (
      20, 50, 50)
  assert plan.phase_steps(0, 50) == [('pre', 20), ('main', 30)]
  assert plan.phase_steps(25, 50) == [('main', 25)]
  assert [plan.phase_of_step(s) for s in (0, 19, 20)] == ['pre', 'pre',
                                                           'main']
  # One sigma calibrated for all 50 steps: the two phases together spend
  # the target (not merely within it, so not calibrated for 30 steps).
  assert 2.9 < _phases_epsilon(plan, 50) <= 3.0
  without = privacy_plan.plan_privacy(num_epochs=3, dp=False,
                                      noise_multiplier=None,
                                      target_epsilon=None, **_PLAN)
  assert (without.pretrain_steps, without.phase_steps(0, 30)) == (
      0, [('', 30)])  # no pre-training: one unnamed phase, as before
  with pytest.raises(ValueError, match='pretrain_epochs=-1'):
    privacy_plan.plan_privacy(num_epochs=3, pretrain_epochs=-1, dp=False,
                              noise_multiplier=None, target_epsilon=None,
                              **_PLAN)


@pytest.mark.parametrize('target', [2.0, 0.9])  # cut after / in pre-training
def test_a_budget_cut_over_pretraining_never_passes_the_target(target):
  plan = privacy_plan.plan_privacy(
      num_epochs=48, pretrain_epochs=2, dp=True, noise_multiplier=2.0,
      target_epsilon=target, **_PLAN)
  assert plan.num_steps < plan.requested_steps == 500
  assert (plan.num_steps > plan.pretrain_steps == 20) == (target == 2.0)
  assert _phases_epsilon(plan, plan.num_steps) <= target
  assert _phases_epsilon(plan, plan.num_steps + 1) > target
