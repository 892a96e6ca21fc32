"""Times building a synthetic_faces config and one epoch of the input pipeline.

  python experiments/bench_data.py --config experiments/configs/default.py \
      --config.data_dir=/tmp/tfds_bench

Building is skipped (and not timed) if the dataset is already prepared.
"""

import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dplh_jax import batch_selection  # pylint: disable=g-import-not-at-top
from dplh_jax import run_setup  # pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file('config', None, 'Config file.',
                                lock_config=True)


def main(argv):
  del argv
  config = flags.FLAGS.config
  builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)
  if not builder.is_prepared():
    start = time.time()
    builder.download_and_prepare()
    print(f'build {config.dataset}: {time.time() - start:.1f} s')
  data = run_setup.load_data(config)
  sampler = batch_selection.PoissonSampler(
      len(data.train), config.expected_batch_size, seed=0)
  steps = round(1 / sampler.sampling_prob)  # one epoch in expectation
  start, images = time.time(), 0
  for _, batch, _ in run_setup.sampled_batches(
      data.train, sampler, data.pipeline_config, config.seed, 0, steps):
    images += int((~batch['is_padding_example']).sum())
  elapsed = time.time() - start
  print(f'one epoch of the pipeline ({steps} Poisson batches, {images} '
        f'images, K={config.num_proposals} crops of {config.input_size} px): '
        f'{elapsed:.1f} s, {images / elapsed:.0f} images/s in one thread')


if __name__ == '__main__':
  app.run(main)
