"""``dplh-leakage``: how much each task's features reveal the other tasks'
labels and the input, on held-out images (``leakage``).

  dplh-leakage --workdir workdirs/default --out leakage.json

Freezes the run's released params (a dplh-train workdir or a dplh-export
file), extracts the features each head reads on the first --num_images test
images, and fits cross-validated linear probes: for every (features of task
A, label of task B) the probe's accuracy or R^2 against the constant
baseline, and a ridge decoder of the downsampled crop against the mean
image. Needs scikit-learn. The test split is read from --data_dir, else from
the workdir's data_dir, else from TFDS's default folder. Reads only the
released params and the test split.
"""

import json
import os

from absl import flags

from dplh_jax.hyperface import leakage
from dplh_jax.hyperface.cli import flags_util

_WORKDIR = flags.DEFINE_string('workdir', None, 'A dplh-train workdir or a '
                               'dplh-export .npz file.', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS folder of the test '
                                'split (default: the workdir\'s data_dir, '
                                'else TFDS\'s default).')
_OUT = flags.DEFINE_string('out', None, 'Also write the result here (JSON).')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1000, 'Test images probed '
                                   '(-1: all).')
_FOLDS = flags.DEFINE_integer('folds', 5, 'Cross-validation folds (grouped '
                              'by image).')


def main(argv):
  flags_util.start(argv, config=True)

  def measure():
    if _FOLDS.value < 2:
      raise ValueError(f'--folds={_FOLDS.value}: use at least 2.')
    result = leakage.measure(_WORKDIR.value, num_images=_NUM_IMAGES.value,
                             folds=_FOLDS.value, data_dir=_DATA_DIR.value)
    print(f"{result['model']}: {result['task_features']} features, "
          f"{result['num_images']} test images, {result['num_crops']} crops; "
          'probe score (advantage over the constant baseline):')
    print(leakage.table(result))
    if _OUT.value:
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      with open(_OUT.value, 'w') as f:
        json.dump(result, f, indent=1)
        f.write('\n')
      print(f'leakage: {_OUT.value}')

  flags_util.one_line_errors(measure)


def run():
  flags_util.run(main)


if __name__ == '__main__':
  run()
