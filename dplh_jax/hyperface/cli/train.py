"""``dplh-train``: trains and evaluates DP HyperFace; writes metrics,
checkpoints and a privacy report.

  dplh-train --config default --workdir workdirs/default \
      [--config.target_epsilon=1 ...]

``--config`` takes a shipped config's name (``default``, ``tiny``,
``nonprivate``, ``dplh_aflw``, ...) or a path to a file with
``get_config()``. Re-running with the same --workdir resumes from the latest
checkpoint; the workdir is bound to the config it started with (only
log_every, checkpoint_every and data_dir may change) and to one process at a
time.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from dplh_jax.hyperface import interrupts
from dplh_jax.hyperface import metric_registry
from dplh_jax.hyperface import train
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'metrics.jsonl and privacy_report.json.',
                               required=True)
config_flags.DEFINE_config_file('config', None, 'Config name or file '
                                '(get_config()).', lock_config=True)


def main(argv):
  flags_util.start(argv, flags.FLAGS.config)

  def train_and_report():
    workdir = _WORKDIR.value
    try:
      result = train.train_and_evaluate(flags.FLAGS.config, workdir)
    except interrupts.TrainingInterrupted as stopped:
      print(stopped, file=sys.stderr)
      sys.exit(128 + stopped.signal_number)
    print(metric_registry.summary_table(result['eval'], result['privacy'],
                                        result['baseline']))
    for what, name in (('privacy report', 'privacy_report.json'),
                       ('metrics', 'metrics.jsonl'),
                       ('TensorBoard', 'tensorboard'),
                       ('checkpoints', 'checkpoints'),
                       ('config', 'config.json')):
      print(f'{what}: {os.path.join(workdir, name)}')

  flags_util.one_line_errors(train_and_report)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
