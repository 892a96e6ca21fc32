"""The engineer's path: our dp_aggregate against optax.contrib's on the same
``jax.vmap(jax.grad(loss))`` per-example gradients.

  python experiments/bench_engineer_path.py --rounds=30

Two models: the scikit-learn digits MLP of ``examples/digits_dp.py``
(64-128-10, 9,610 parameters) at 88 padded rows (a Poisson batch of expected
size 64 padded as ``batch_selection`` does), and the demo HyperFace (48 px,
widths /8, 261,779 parameters) at 64 images x 4 proposals. The inputs are
random (timing does not depend on the pixels). Per model, two comparisons,
each timed in interleaved rounds in one process, so the ratios are the result:

* ``aggregate``: only the transform's ``update`` on gradients computed once
  (clip, sum, noise, divide): ``dp_aggregate(C, sigma, B, key)`` with the
  padding mask against ``optax.contrib.differentially_private_aggregate``.
* ``step``: what a user's jitted step runs: ``vmap(grad)``, the aggregate and
  adam; the gradient computation is the same code in both.

optax.contrib's transform has no padding mask and divides by the realized
batch size; it is the speed reference, not a private alternative (it
multiplies a NaN row by 0 and its norm squares underflow).
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import dp_transform
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import model_setup
import bench_dp_step  # the script beside this one

# --rounds is bench_dp_step's (default 10; the table used 30).
FLAGS = flags.FLAGS
_MODELS = flags.DEFINE_list('models', ['mlp', 'hyperface'], 'Models to time.')

_CLIP, _SIGMA, _LR = 1.0, 1.0, 1e-3
_MLP_SIZES = (64, 128, 10)
_MLP_ROWS, _MLP_EXPECTED = 88, 64
_HYPERFACE_IMAGES, _HYPERFACE_PROPOSALS = 64, 4


def _mlp():
  """``(params, per-example loss, batch with its padding mask)``."""
  keys = jax.random.split(jax.random.key(0), len(_MLP_SIZES) - 1)
  params = [{'w': jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i),
             'b': jnp.zeros((o,))}
            for k, i, o in zip(keys, _MLP_SIZES[:-1], _MLP_SIZES[1:])]

  def loss(p, example):
    x = example['x']
    for layer in p[:-1]:
      x = jax.nn.relu(x @ layer['w'] + layer['b'])
    logits = x @ p[-1]['w'] + p[-1]['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                           example['y'])

  rng = np.random.default_rng(0)
  batch = {'x': rng.uniform(size=(_MLP_ROWS, 64)).astype(np.float32),
           'y': rng.integers(0, 10, _MLP_ROWS).astype(np.int32)}
  padding = np.arange(_MLP_ROWS) >= _MLP_EXPECTED
  return params, loss, batch, padding, _MLP_EXPECTED


def _hyperface():
  config = bench_dp_step.model_config('small')
  model, weighting = model_setup.build_model(config)
  params = model_setup.init_params(config, model)
  batch = bench_dp_step.fake_batch(np.random.default_rng(0),
                                   _HYPERFACE_IMAGES, _HYPERFACE_PROPOSALS,
                                   config.input_size)
  padding = batch.pop('is_padding_example')

  def loss(p, example):
    return losses.per_image_loss(p, example, None, model=model,
                                 weighting=weighting)[0]

  return params, loss, batch, padding, _HYPERFACE_IMAGES


def _transforms(expected):
  ours = optax.chain(dp_transform.dp_aggregate(_CLIP, _SIGMA, expected, 0),
                     optax.adam(_LR))
  contrib = optax.chain(
      optax.contrib.differentially_private_aggregate(_CLIP, _SIGMA,
                                                     key=jax.random.key(0)),
      optax.adam(_LR))
  return {'ours': ours, 'optax_contrib': contrib}


def _interleaved_ms(fns: dict, rounds: int) -> dict:
  """Median ms of each thunk, called in turn for ``rounds`` rounds."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def time_model(name: str, rounds: int) -> dict:
  params, loss, batch, padding, expected = (_mlp() if name == 'mlp'
                                            else _hyperface())
  batch, padding = jax.device_put(batch), jnp.asarray(padding)
  grads_of = jax.vmap(jax.grad(loss), (None, 0))
  grads = jax.block_until_ready(jax.jit(grads_of)(params, batch))
  txs = _transforms(expected)
  states = {k: tx.init(params) for k, tx in txs.items()}

  def extra(k):
    return {'is_padding_example': padding} if k == 'ours' else {}

  aggregate = {k: jax.jit(functools.partial(tx.update, **extra(k)))
               for k, tx in txs.items()}

  def make_step(k, tx):
    @jax.jit
    def step(p, state, b):
      updates, state = tx.update(grads_of(p, b), state, p, **extra(k))
      return optax.apply_updates(p, updates), state
    return step

  steps = {k: make_step(k, tx) for k, tx in txs.items()}
  agg_ms = _interleaved_ms(
      {k: functools.partial(aggregate[k], grads, states[k], params)
       for k in txs}, rounds)
  step_ms = _interleaved_ms(
      {k: functools.partial(steps[k], params, states[k], batch) for k in txs},
      rounds)
  return {'aggregate': agg_ms, 'step': step_ms,
          'rows': int(padding.shape[0]),
          'num_params': sum(x.size for x in jax.tree.leaves(params))}


def main(argv):
  del argv
  print(f'{jax.devices()[0]}, {FLAGS.rounds} interleaved rounds, medians')
  print('| model | rows | what | ours ms | optax.contrib ms | ours / contrib |'
        '\n|---|---:|---|---:|---:|---:|')
  for name in _MODELS.value:
    r = time_model(name, FLAGS.rounds)
    for what in ('aggregate', 'step'):
      ours, contrib = r[what]['ours'], r[what]['optax_contrib']
      print(f'| {name} ({r["num_params"]:,} params) | {r["rows"]} | {what} | '
            f'{ours:.2f} | {contrib:.2f} | **{ours / contrib:.2f}** |',
            flush=True)


if __name__ == '__main__':
  app.run(main)
