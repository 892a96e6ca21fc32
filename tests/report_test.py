"""The privacy report: recomputable when private, never a fake epsilon when not."""

import pytest

from dplh_jax import accounting
from dplh_jax import report

_COMMON = dict(delta=1e-5, l2_norm_clip=1.0, num_examples=1000,
               expected_batch_size=10, privacy_unit='image',
               non_finite_examples_dropped=2, target_epsilon=None,
               noise_seed_source='os_entropy', sampler_seed_source='os_entropy')
_METRICS = {key: 0.5 for key, _, _ in report._SUMMARY_ROWS}  # pylint: disable=protected-access


def test_private_report_is_recomputable_and_covers_every_phase():
  acc = accounting.PrivacyAccountant('rdp')
  acc.compose(2.0, 0.02, 50)  # pre-training
  acc.compose(1.0, 0.01, 100)
  result = report.make_report(acc, dp=True, **_COMMON)
  assert result['epsilon'] == pytest.approx(report.recompute_epsilon(result),
                                            rel=1e-12)
  assert result['steps'] == 150 and len(result['phases']) == 2
  assert result['noise_multiplier'] == 1.0  # the main (last) phase
  assert 'epsilon=' in report.format_summary(_METRICS, result)


def test_non_private_report_claims_no_epsilon():
  result = report.make_report(accounting.PrivacyAccountant(), dp=False,
                              **_COMMON)
  assert result['dp'] is False and result['epsilon'] is None
  assert 'non-private' in report.format_summary(_METRICS, result)
