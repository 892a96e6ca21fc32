"""Trains and evaluates DP HyperFace; writes metrics, checkpoints, a privacy report.

  python experiments/main.py --config experiments/configs/default.py \
      --workdir workdirs/default [--config.target_epsilon=1 ...]

Re-running with the same --workdir resumes from the latest checkpoint; the
workdir is bound to the config it started with (only log_every,
checkpoint_every and data_dir may change) and to one process at a time.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dplh_jax import train  # pylint: disable=g-import-not-at-top
from dplh_jax import report  # pylint: disable=g-import-not-at-top

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'metrics.jsonl and privacy_report.json.',
                               required=True)
config_flags.DEFINE_config_file('config', None, 'Config file (get_config()).',
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Progress lines are printed.
  try:
    result = train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  # Bad config or data, a refused resume or a workdir in use
  # (run_binding.WorkdirInUseError): say so in one line, without a trace.
  except ValueError as error:
    sys.exit(f'error: {error}')
  print(report.format_summary(result['eval'], result['privacy']))
  print(f'Privacy report: {os.path.join(_WORKDIR.value, "privacy_report.json")}')


if __name__ == '__main__':
  app.run(main)
