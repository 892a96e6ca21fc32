"""Smoke test of the audit (dplh-audit) end to end on the tiny config."""

import json
import os

import numpy as np
import pytest

from dplh_jax.dp import privacy_report
from dplh_jax.hyperface import audit_run as audit_experiment
from dplh_jax.hyperface import canaries
from dplh_jax.hyperface.configs import tiny

pytestmark = pytest.mark.slow

NUM_CANARIES = 8


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  config = tiny.get_config()
  config.data_dir = str(tmp_path_factory.mktemp('tfds'))
  # Seconds instead of a minute: one vmap instead of the microbatch loop
  # (one compile less), sigma given without a target (no search over step
  # counts) and few progress lines (each asks the PLD accountant).
  config.microbatch_size = None
  config.target_epsilon = None
  config.log_every = 100
  config.checkpoint_every = 100
  workdir = str(tmp_path_factory.mktemp('audit'))
  out = audit_experiment.run_audit(
      config, workdir, num_canaries=NUM_CANARIES, canary_seed=3,
      guess_fraction=0.25, num_decoys=2, num_score_draws=1,
      num_mia_examples=8)
  path = os.path.join(workdir, 'audit.json')
  audit_experiment.write_results(out, path)
  with open(path) as f:
    return json.load(f), workdir


def test_canary_audit_fields_and_invariants(results):
  saved, _ = results
  canary = saved['canary_audit']
  assert canary['num_canaries'] == NUM_CANARIES
  coins = canaries.inclusion_coins(3, NUM_CANARIES)
  assert canary['included'] == coins.tolist()
  assert canary['num_included'] == int(coins.sum())
  assert len(canary['scores']) == len(canary['guesses']) == NUM_CANARIES
  assert set(canary['guesses']) <= {-1, 0, 1}
  # k = 0.25 * 8 = 2 per side: 4 guesses, at most all of them right.
  assert canary['num_positive_guesses'] == canary['num_negative_guesses'] == 2
  assert canary['num_guesses'] == np.count_nonzero(canary['guesses']) == 4
  assert 0 <= canary['num_correct'] <= canary['num_guesses'] <= NUM_CANARIES
  guesses, included = np.array(canary['guesses']), np.array(coins)
  assert canary['num_correct'] == int(np.sum(
      (guesses == 1) & included) + np.sum((guesses == -1) & ~included))
  assert canary['epsilon_lower_bound'] >= 0.0


def test_privacy_report_counts_canaries_and_matches_theory(results):
  saved, workdir = results
  with open(os.path.join(workdir, 'privacy_report.json')) as f:
    written = json.load(f)
  assert saved['privacy_report'] == written
  # tiny: 24 training images, plus the included canaries.
  assert saved['num_real_train_images'] == 24
  assert written['num_examples'] == 24 + saved['canary_audit']['num_included']
  assert saved['canary_audit']['theoretical_epsilon'] == written['epsilon']
  assert saved['canary_audit']['theoretical_delta'] == written['delta']
  assert written['epsilon'] == pytest.approx(privacy_report.recompute_epsilon(written))


def test_membership_inference_fields(results):
  saved, _ = results
  mia = saved['membership_inference']
  assert mia['num_members'] == 8 and mia['num_nonmembers'] == 8
  assert 0.0 <= mia['auc'] <= 1.0
  for key in ('tpr_at_fpr_0.01', 'tpr_at_fpr_0.001'):
    assert 0.0 <= mia[key] <= 1.0
  summary = audit_experiment.format_summary(saved)
  assert 'epsilon lower bound' in summary and 'AUC' in summary


def test_canary_records_feed_the_pipeline():
  records = canaries.make_canary(0, 5, (64, 64), num_decoys=2)
  canary, decoys = records[0], records[1:]
  assert canary['image'].shape == (64, 64, 3)
  assert canary['image'].dtype == np.uint8
  for decoy in decoys:  # Same image and box, labels drawn afresh.
    assert decoy['image'] is canary['image']
    np.testing.assert_array_equal(decoy['faces']['bbox'][0],
                                  canary['faces']['bbox'][0])
  assert any(d['faces']['gender'][0] != canary['faces']['gender'][0]
             or not np.array_equal(d['faces']['pose'][0],
                                   canary['faces']['pose'][0])
             for d in decoys)
  assert canary['faces']['visibility'][0].sum() == 11
  again = canaries.make_canary(0, 5, (64, 64))[0]
  np.testing.assert_array_equal(again['image'], canary['image'])


def test_with_canaries_appends_after_the_source():
  source = [{'id': i} for i in range(3)]
  combined = canaries.WithCanaries(source, [{'id': 'a'}, {'id': 'b'}])
  assert len(combined) == 5
  assert [combined[i]['id'] for i in range(5)] == [0, 1, 2, 'a', 'b']
  assert [r['id'] for r in combined.__getitems__([4, 0, 3, 2])] == [
      'b', 0, 'a', 2]
  with pytest.raises(IndexError):
    combined[5]


def test_bad_arguments_are_named():
  config = tiny.get_config()
  with pytest.raises(ValueError, match='num_canaries=0'):
    audit_experiment.run_audit(config, '/nonexistent', num_canaries=0)
  with pytest.raises(ValueError, match='guess_fraction=0.7'):
    audit_experiment.run_audit(config, '/nonexistent', num_canaries=4,
                               guess_fraction=0.7)


def test_refuses_to_resume_with_other_canaries(results):
  _, workdir = results
  with pytest.raises(ValueError, match='holds an audit run with canaries'):
    audit_experiment.run_audit(tiny.get_config(), workdir, num_canaries=5,
                               canary_seed=3)
