"""Times building a synthetic_faces config and one epoch of the input pipeline.

  python experiments/bench_data.py --config dplh_jax/hyperface/configs/default.py \
      --config.data_dir=/tmp/tfds_bench

Building is skipped (and not timed) if the dataset is already prepared.
"""

import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow_datasets as tfds


from dplh_jax.dp import batch_selection
from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import input_pipeline

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
  data = data_loading.load_data(config)
  sampler = batch_selection.PoissonSampler(
      len(data.train), config.expected_batch_size, seed=0)
  steps = round(1 / sampler.sampling_prob)  # one epoch in expectation
  start, images = time.time(), 0
  for _, batch, _ in input_pipeline.train_batches(
      data.train, sampler, data.pipeline_config, seed=config.seed,
      start_step=0, num_steps=steps):
    images += int((~batch['is_padding_example']).sum())
  elapsed = time.time() - start
  print(f'one epoch of the pipeline ({steps} Poisson batches, {images} '
        f'images, K={config.num_proposals} crops of {config.input_size} px): '
        f'{elapsed:.1f} s, {images / elapsed:.0f} images/s in one thread')


if __name__ == '__main__':
  app.run(main)
