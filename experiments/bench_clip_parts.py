"""Where the DP step's extra time goes: the clipped sum against plain autodiff.

  python experiments/bench_clip_parts.py --model=small --batch_size=64 --rounds=15

Times, on one random batch of the benchmark's model (bench_dp_step), the
jitted pieces that differ between the non-private and the DP step: the
forward pass of the flat batch, the gradient of the summed per-image loss (what
the non-private step differentiates) and the clipped per-image sum of each
clipping path. The optimizer, the same in both steps, is left out. Medians in
ms; ratios measured in one run are what to compare.
"""

import dataclasses
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np


# pylint: disable=g-import-not-at-top
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import models
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import train_step
import bench_dp_step  # the script beside this one

# --model, --batch_size, --num_proposals and --rounds are bench_dp_step's.
FLAGS = flags.FLAGS
_CLIPPINGS = flags.DEFINE_list('clippings', ['one_pass', 'vmap'],
                               'Clipping paths to time.')


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(FLAGS.rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def main(argv):
  del argv
  config = bench_dp_step.model_config(FLAGS.model)
  model, weighting = model_setup.build_model(config)
  params = model_setup.init_params(config, model)
  batch = bench_dp_step.fake_batch(np.random.default_rng(0), FLAGS.batch_size,
                                   FLAGS.num_proposals, config.input_size)
  padding = jnp.asarray(batch['is_padding_example'])

  def summed_loss(p, b):
    outputs = models.apply_to_images(model, p, b['crops'], None)
    per_image = jax.vmap(
        lambda o, e: losses.loss_from_outputs(p, o, e, weighting=weighting)[0],
        (0, 0))(outputs, b)
    return jnp.sum(per_image)

  pieces = {
      'forward (flat batch)': jax.jit(summed_loss),
      'gradient (non-private)': jax.jit(jax.grad(summed_loss)),
  }
  for clipping in _CLIPPINGS.value:
    spec = dataclasses.replace(
        train_step.StepSpec.from_config(config, model, weighting, 1.0),
        clipping=clipping)
    clipped = train_step.clipped_sum_fn(spec)
    pieces[f'clipped sum ({clipping})'] = jax.jit(
        lambda p, b, c=clipped: c(p, b, None, is_padding_example=padding)[0])
  base = None
  print(f'{FLAGS.batch_size} images x {FLAGS.num_proposals} proposals, '
        f'{jax.devices()[0]}')
  print('| piece | median ms | x gradient |\n|---|---:|---:|')
  for name, fn in pieces.items():
    ms = _median_ms(fn, params, batch)
    base = ms if name.startswith('gradient') else base
    ratio = f'{ms / base:.2f}' if base else '-'
    print(f'| {name} | {ms:.1f} | {ratio} |', flush=True)


if __name__ == '__main__':
  app.run(main)
