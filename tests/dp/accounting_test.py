"""Accounting: reference values of docs/DESIGN.md (Adjacency and accounting), calibration, composition, JSON."""

import dp_accounting
import numpy as np
import pytest

from dplh_jax.dp import accounting
from dplh_jax.dp import privacy_report


@pytest.mark.parametrize('sigma, q, steps, delta, rdp, pld', [
    (1.1, 256 / 60000, 14063, 1e-5, 2.597, 2.382),
    (3.0, 0.1, 512, 1e-6, 4.051, 3.770),
])
def test_reference_values(sigma, q, steps, delta, rdp, pld):
  assert accounting.epsilon(sigma, q, steps, delta, 'rdp') == pytest.approx(
      rdp, abs=0.005)
  assert accounting.epsilon(sigma, q, steps, delta, 'pld') == pytest.approx(
      pld, abs=0.005)


def test_calibration_round_trips():
  sigma = accounting.calibrate_noise_multiplier(1.0, 1e-6, 0.1, 512)
  assert sigma == pytest.approx(9.66, abs=0.01)
  eps = accounting.epsilon(sigma, 0.1, 512, 1e-6)
  assert 0.99 <= eps <= 1.0


def test_calibration_with_rdp_never_exceeds_target():
  sigma = accounting.calibrate_noise_multiplier(5.0, 1e-5, 0.01, 1000, 'rdp')
  eps = accounting.epsilon(sigma, 0.01, 1000, 1e-5, 'rdp')
  assert 0.99 * 5.0 <= eps <= 5.0


def test_calibration_counts_earlier_phases():
  acc = accounting.PrivacyAccountant('rdp')
  acc.compose(2.0, 0.02, 200)  # pre-training on the same data
  sigma = acc.calibrate_noise_multiplier(3.0, 1e-5, 0.01, 500)
  total = acc.epsilon_after(1e-5, sigma, 0.01, 500)
  assert 0.99 * 3.0 <= total <= 3.0
  assert sigma > accounting.calibrate_noise_multiplier(3.0, 1e-5, 0.01, 500,
                                                       'rdp')


def test_calibration_below_sigma_one():
  sigma = accounting.calibrate_noise_multiplier(20.0, 1e-5, 0.01, 100, 'rdp')
  assert sigma < 1.0
  assert 0.99 * 20 <= accounting.epsilon(sigma, 0.01, 100, 1e-5, 'rdp') <= 20


def test_phases_compose_into_one_event_and_merge_when_equal():
  acc = accounting.PrivacyAccountant('pld')
  acc.compose(2.0, 0.02, 100)  # e.g. detection pre-training on the same data
  acc.compose(1.2, 0.01, 300)
  acc.compose(1.2, 0.01, np.int64(200))
  assert [p.steps for p in acc.phases] == [100, 500]
  direct = dp_accounting.pld.PLDAccountant()
  direct.compose(dp_accounting.ComposedDpEvent([
      dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
          0.02, dp_accounting.GaussianDpEvent(2.0)), 100),
      dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
          0.01, dp_accounting.GaussianDpEvent(1.2)), 500)]))
  total = acc.epsilon(1e-5)
  assert total == direct.get_epsilon(1e-5)  # cached PLDs: bit-identical
  assert total > accounting.epsilon(2.0, 0.02, 100, 1e-5)
  assert total > accounting.epsilon(1.2, 0.01, 500, 1e-5)


def test_json_round_trip_gives_the_same_epsilon():
  acc = accounting.PrivacyAccountant('pld')
  acc.compose(1.7, 0.013, 120)
  acc.compose(2.5, 1 / 30, 7)
  restored = accounting.PrivacyAccountant.from_json(acc.to_json())
  assert restored.phases == acc.phases
  assert restored.epsilon(1e-5) == acc.epsilon(1e-5)


def test_epsilon_after_plans_without_composing():
  acc = accounting.PrivacyAccountant('rdp')
  acc.compose(1.0, 0.01, 10)
  planned = acc.epsilon_after(1e-5, 1.0, 0.01, 90)
  assert acc.steps == 10
  assert planned == pytest.approx(accounting.epsilon(1.0, 0.01, 100, 1e-5,
                                                     'rdp'))


def test_edge_cases():
  assert accounting.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
  assert accounting.epsilon(0.0, 0.1, 10, 1e-5) == float('inf')


def test_empty_planned_phases_plan_what_compose_records():
  # Calibration must price the phases compose will record: a zero-step
  # phase between two of one name records nothing, so they merge.
  planned = [('main', 100), ('detection_pretrain', 0), ('main', 100)]
  phases = accounting._planned_phases(1.0, 0.1, planned)  # pylint: disable=protected-access
  recorded = accounting.PrivacyAccountant('pld')
  for name, steps in planned:
    recorded.compose(1.0, 0.1, steps, name)
  merged = recorded.phases
  for phase in phases:
    assert phase.steps > 0
  assert [(p.name, p.steps) for p in merged] == [('main', 200)]
  assert recorded.epsilon(1e-5) == accounting.PrivacyAccountant().epsilon_after(
      1e-5, 1.0, 0.1, planned)


def test_zero_steps_record_nothing_and_reports_still_recompute():
  acc = accounting.PrivacyAccountant()
  acc.compose(1.0, 0.1, 10)
  acc.compose(1.0, 0.1, 0, name='detection_pretrain')
  assert acc.phases == (accounting.Phase(1.0, 0.1, 10),)
  # A record holding an empty phase (written by hand) recomputes too.
  report = {'accountant': 'pld', 'delta': 1e-5, 'phases': [
      {'noise_multiplier': 1.0, 'sampling_prob': 0.1, 'steps': 10},
      {'noise_multiplier': 2.0, 'sampling_prob': 0.1, 'steps': 0}]}
  assert privacy_report.recompute_epsilon(report) == acc.epsilon(1e-5)


@pytest.mark.parametrize('call, message', [
    (lambda: accounting.epsilon(1.0, 1.5, 10, 1e-5), 'sampling_prob'),
    (lambda: accounting.epsilon(-1.0, 0.1, 10, 1e-5), 'noise_multiplier'),
    (lambda: accounting.epsilon(1.0, 0.1, 10, 0.0), 'delta'),
    (lambda: accounting.epsilon(1.0, 0.1, 10, 1e-5, 'moments'), 'accountant'),
    (lambda: accounting.calibrate_noise_multiplier(0.0, 1e-5, 0.1, 10),
     'target_epsilon'),
    (lambda: accounting.calibrate_noise_multiplier(1.0, 1e-5, 0.0, 10),
     'sampling_prob'),
    (lambda: accounting.calibrate_noise_multiplier(1.0, 1e-5, 0.1, 10,
                                                   rtol=0.0), 'rtol'),
    (lambda: accounting.Phase(1.0, 0.1, True), 'steps'),
    (lambda: accounting.PrivacyAccountant().epsilon_after(
        1e-5, 1.0, 0.1, [('main',)]),
     'steps must be an int or'),
    (lambda: accounting.PrivacyAccountant().compose(1.0, 0.1, -1), 'steps'),
    # A bad sigma in a plan is named as such, not as a bad steps argument.
    (lambda: accounting.PrivacyAccountant().epsilon_after(1e-5, -1.0, 0.1, 10),
     'noise_multiplier must be >= 0'),
    (lambda: accounting.calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 10**4,
                                                   'rdp'),
     'noise_multiplier >'),
])
def test_bad_arguments_are_named(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_named_phases_compose_merge_by_name_and_reload():
  """Steps merge only within one name; a record without names (written
  before phases had them) loads as unnamed phases; names do not enter the
  epsilon: two named phases at one (sigma, q) spend what one phase of all
  their steps does (PLD: to its float rounding of the split, ~1e-10)."""
  acc = accounting.PrivacyAccountant('pld')
  # (sigma, q) of the test above: its one-step PLD is cached.
  acc.compose(1.2, 0.01, 20, name='detection_pretrain')
  acc.compose(1.2, 0.01, 10, name='detection_pretrain')
  acc.compose(1.2, 0.01, 470, name='hyperface')
  assert [(p.name, p.steps) for p in acc.phases] == [
      ('detection_pretrain', 30), ('hyperface', 470)]
  record = acc.to_dict()
  assert [p['name'] for p in record['phases']] == ['detection_pretrain',
                                                    'hyperface']
  restored = accounting.PrivacyAccountant.from_json(acc.to_json())
  assert restored.phases == acc.phases
  assert restored.epsilon(1e-5) == acc.epsilon(1e-5)
  one = accounting.PrivacyAccountant('pld')
  one.compose(1.2, 0.01, 500)
  assert 'name' not in one.to_dict()['phases'][0]  # unnamed: today's record
  assert acc.epsilon(1e-5) == pytest.approx(one.epsilon(1e-5), rel=1e-8)
  old = {'accountant': 'pld', 'phases': [
      {'noise_multiplier': 1.2, 'sampling_prob': 0.01, 'steps': 500}]}
  assert accounting.PrivacyAccountant.from_dict(old).phases == one.phases
  # Planning over named phases is the epsilon of what compose records.
  planned = accounting.PrivacyAccountant('pld').epsilon_after(
      1e-5, 1.2, 0.01, [('detection_pretrain', 30), ('hyperface', 470)])
  assert planned == acc.epsilon(1e-5)


def test_calibration_over_named_phases_is_within_target():
  steps = [('detection_pretrain', 100), ('hyperface', 300)]
  sigma = accounting.calibrate_noise_multiplier(2.0, 1e-5, 0.01, steps, 'rdp')
  acc = accounting.PrivacyAccountant('rdp')
  spent = acc.epsilon_after(1e-5, sigma, 0.01, steps)
  assert 0.99 * 2.0 <= spent <= 2.0
  with pytest.raises(ValueError, match='at least 1 step'):
    accounting.calibrate_noise_multiplier(2.0, 1e-5, 0.01, [('a', 0)])
