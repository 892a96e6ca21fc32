"""``dplh-audit``: empirical privacy audit of one training run (one-run
canary audit and loss-threshold membership inference; see
``dplh_jax.hyperface.audit_run``).

  dplh-audit --config audit_dp --workdir workdirs/audit_dp \
      [--num_canaries=200 --json_out=...]
"""

import os

from absl import flags
from ml_collections import config_flags

from dplh_jax.hyperface import audit_run
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the training '
                               'run (checkpoints, privacy report).',
                               required=True)
config_flags.DEFINE_config_file('config', None,
                                'Config name or file (get_config()).',
                                lock_config=True)
_NUM_CANARIES = flags.DEFINE_integer('num_canaries', 200, 'Canaries m; each '
                                     'is included with probability 1/2.')
_CANARY_SEED = flags.DEFINE_integer('canary_seed', 0, 'Seed of the canary '
                                    'images, labels and inclusion coins.')
_GUESS_FRACTION = flags.DEFINE_float(
    'guess_fraction', 0.1, 'Guess "included" on this fraction of canaries '
    '(highest scores) and "excluded" on as many (lowest); abstain on the '
    'rest. Fix it before the run: choosing it after seeing which guesses are '
    'right would invalidate the bound.')
_SIGNIFICANCE = flags.DEFINE_float('significance', 0.05, 'Significance of '
                                   'the epsilon lower bound.')
_NUM_DECOYS = flags.DEFINE_integer(
    'num_decoys', 8, 'Decoy label sets per canary (score calibration).')
_NUM_SCORE_DRAWS = flags.DEFINE_integer(
    'num_score_draws', 4, 'Proposal draws (seeds) averaged per image loss.')
_NUM_MIA_EXAMPLES = flags.DEFINE_integer(
    'num_mia_examples', 1000, 'At most this many real training images '
    '(members) and as many test images (non-members) for the membership '
    'inference.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Where the results go; '
                                'default workdir/audit.json.')

def main(argv):
  flags_util.start(argv, flags.FLAGS.config)
  json_out = _JSON_OUT.value or os.path.join(_WORKDIR.value, 'audit.json')

  def audit_and_report():
    results = audit_run.run_audit(
        flags.FLAGS.config, _WORKDIR.value, num_canaries=_NUM_CANARIES.value,
        canary_seed=_CANARY_SEED.value, guess_fraction=_GUESS_FRACTION.value,
        significance=_SIGNIFICANCE.value, num_decoys=_NUM_DECOYS.value,
        num_score_draws=_NUM_SCORE_DRAWS.value,
        num_mia_examples=_NUM_MIA_EXAMPLES.value)
    audit_run.write_results(results, json_out)
    print(audit_run.format_summary(results))
    print(f'Results: {json_out}')

  flags_util.one_line_errors(audit_and_report)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
