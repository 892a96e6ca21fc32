"""``dplh-train``: trains and evaluates DP HyperFace; writes metrics,
checkpoints and a privacy report.

  dplh-train --config default --workdir workdirs/default \
      [--config.target_epsilon=1 ...]

``--config`` takes a shipped config's name (``default``, ``tiny``,
``nonprivate``, ``dplh_aflw``, ...) or a path to a file with
``get_config()``. Re-running with the same --workdir resumes from the latest
checkpoint; the workdir is bound to the config it started with (only
log_every, checkpoint_every, data_dir and num_devices may change) and to one
run at a time.

Training is data parallel over every local device. For several processes
(hosts), start the same command on each with ``jax.distributed`` flags:

  dplh-train ... --coordinator_address=HOST0:1234 --num_processes=2 \
      --process_id=0          # and --process_id=1 on the second host

or ``--distributed`` alone where JAX reads them from the cluster (Slurm,
Open MPI, Kubernetes, Cloud TPU).
"""

import os
import sys

from absl import flags
import jax
from ml_collections import config_flags

from dplh_jax.hyperface import interrupts
from dplh_jax.hyperface import metric_registry
from dplh_jax.hyperface import parallel
from dplh_jax.hyperface import train
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, '
                               'metrics.jsonl and privacy_report.json.',
                               required=True)
config_flags.DEFINE_config_file('config', None, 'Config name or file '
                                '(get_config()).', lock_config=True)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Several processes: HOST:PORT of process '
    "0's coordinator, the same on every process (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Several processes: how many train together.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Several processes: this one, 0 to num_processes-1.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run, reading what the three '
    'flags above do not give from the cluster environment (Slurm, Open MPI, '
    'Kubernetes, Cloud TPU, JAX_COORDINATOR_ADDRESS).')


def main(argv):
  flags_util.start(argv, flags.FLAGS.config)

  def train_and_report():
    workdir = _WORKDIR.value
    # Before anything uses JAX: the devices of every process form the mesh.
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value, auto=_DISTRIBUTED.value)
    try:
      result = train.train_and_evaluate(flags.FLAGS.config, workdir)
    except interrupts.TrainingInterrupted as stopped:
      print(stopped, file=sys.stderr)
      sys.exit(128 + stopped.signal_number)
    if jax.process_index() != 0:
      return  # Process 0 prints the summary and writes the files.
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
