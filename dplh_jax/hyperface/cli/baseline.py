"""``dplh-baseline``: held-out metrics of the best constant predictions,
what "better than chance" means for each metric.

  dplh-baseline --config default
"""

from absl import flags
from ml_collections import config_flags

from dplh_jax.hyperface import chance_baseline
from dplh_jax.hyperface.cli import flags_util

config_flags.DEFINE_config_file('config', None, 'Config name or file.',
                                lock_config=True)
_NUM_FIT_IMAGES = flags.DEFINE_integer('num_fit_images', 2000,
                                       'Training images used to fit.')


def main(argv):
  flags_util.start(argv, flags.FLAGS.config)

  def report():
    for name, value in chance_baseline.baseline_metrics(
        flags.FLAGS.config, _NUM_FIT_IMAGES.value).items():
      print(f'{name}: {value:.4f}')

  flags_util.one_line_errors(report)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
