"""The privacy report: recomputable when private, never a fake epsilon when not."""

import json

import pytest

from dplh_jax.dp import accounting
from dplh_jax.dp import privacy_report

_COMMON = dict(delta=1e-5, l2_norm_clip=1.0, num_examples=1000,
               expected_batch_size=10, privacy_unit='image',
               non_finite_examples_dropped=2, target_epsilon=None,
               noise_seed_source='os_entropy', sampler_seed_source='os_entropy')


def test_private_report_is_recomputable_and_covers_every_phase(tmp_path):
  acc = accounting.PrivacyAccountant('rdp')
  acc.compose(2.0, 0.02, 50)  # pre-training
  acc.compose(1.0, 0.01, 100)
  result = privacy_report.make_report(acc, dp=True, **_COMMON)
  path = tmp_path / 'report.json'
  privacy_report.write_report(result, str(path))
  saved = json.loads(path.read_text())
  assert saved == result
  assert saved['epsilon'] == pytest.approx(
      privacy_report.recompute_epsilon(saved), rel=1e-12)
  # Both phases count: the main phase alone would claim less.
  main_only = accounting.epsilon(1.0, 0.01, 100, 1e-5, 'rdp')
  assert saved['epsilon'] > main_only * 1.01
  assert saved['steps'] == 150 and len(saved['phases']) == 2
  assert saved['noise_multiplier'] == 1.0  # the main (last) phase


def test_report_lists_what_it_publishes_outside_the_guarantee():
  result = privacy_report.make_report(accounting.PrivacyAccountant(),
                                      dp=True, **_COMMON)
  uncovered = ' '.join(result['not_covered_by_the_guarantee'])
  for name in ('realized_batch_size', 'non_finite_examples_dropped',
               'clipped_fraction', 'train_loss'):
    assert name in uncovered


def test_non_private_report_claims_no_epsilon():
  result = privacy_report.make_report(accounting.PrivacyAccountant(),
                                      dp=False, **_COMMON)
  assert result['dp'] is False and result['epsilon'] is None
  assert result['delta'] is None


def test_a_report_before_the_first_step_claims_no_sigma_of_zero():
  result = privacy_report.make_report(accounting.PrivacyAccountant(),
                                      dp=True, **_COMMON)
  assert result['epsilon'] == 0.0 and result['steps'] == 0
  assert result['noise_multiplier'] is None and result['sampling_prob'] is None
  assert privacy_report.recompute_epsilon(result) == 0.0


@pytest.mark.parametrize('edit, message', [
    ({'steps': -3}, 'steps must be an int >= 0'),
    ({'steps': 2.5}, 'steps must be an int >= 0'),
    ({'steps': True}, 'steps must be an int >= 0'),
    ({'noise_multiplier': float('nan')}, 'noise_multiplier must be >= 0'),
    ({'sampling_prob': 1.5}, 'sampling_prob must be in'),
    ({'name': 5}, 'name must be a str'),
])
def test_an_edited_report_is_refused_not_given_another_epsilon(edit, message):
  acc = accounting.PrivacyAccountant('rdp')
  acc.compose(1.0, 0.01, 10)
  report = privacy_report.make_report(acc, dp=True, **_COMMON)
  report['phases'][0].update(edit)
  with pytest.raises(ValueError, match=message):
    privacy_report.recompute_epsilon(report)
