"""Runs on 4 fake CPU devices what ``training_on_devices_test`` checks.

  python tests/hyperface/four_devices_run.py DATA_DIR WORKDIR OUT_DIR OVERRIDES

XLA reads ``--xla_force_host_platform_device_count`` when JAX starts, so
this runs in its own process (the test's has one device). It trains the
tiny config with the test's OVERRIDES (JSON) on a 4-device mesh, checks
the DP mechanism on the same mesh with a linear model whose per-example gradients are known exactly, and
writes ``OUT_DIR/result.json`` and ``OUT_DIR/params.npz`` for the test to
assert on.
"""

import functools
import json
import os
import sys

if __name__ == '__main__':
  # Read when JAX creates its CPU client, so before anything below runs.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_force_host_platform_device_count=4')

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from dplh_jax.dp import dp_transform
from dplh_jax.dp import per_example
from dplh_jax.hyperface import parallel
from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import tiny


def _mechanism_checks(mesh) -> dict:
  """Sensitivity, padding and noise of the sharded step, with gradient
  ``x_i`` per example (loss ``w . x_i``)."""
  clip, sigma, batch_size, dim = 1.0, 2.0, 8.0, 40_000
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  def loss(params, example, rng):
    del rng
    return jnp.dot(params['w'], example['x']), {'one': jnp.ones(())}

  clipped = per_example.clipped_grad_sum(loss, clip, has_aux=True,
                                         microbatch_size=2)
  sharded = parallel.sharded_clipped_sum(clipped, mesh)
  tx = dp_transform.dp_aggregate(clip, sigma, batch_size, key=7)

  def step(params, opt_state, batch, rng, mesh_step):
    clipped_of = sharded if mesh_step else clipped
    total, _ = clipped_of(params, batch, rng,
                          is_padding_example=batch['is_padding_example'])
    updates, _ = tx.update(total, opt_state, params)
    return total, updates

  on_mesh = jax.jit(functools.partial(step, mesh_step=True),
                    in_shardings=(replicated, replicated, data, replicated),
                    out_shardings=replicated)
  on_one = jax.jit(functools.partial(step, mesh_step=False))

  rng = np.random.default_rng(0)
  n = 16  # 4 per device
  x = rng.normal(size=(n, dim)).astype(np.float32)
  x *= rng.uniform(0.1, 50.0, size=(n, 1)).astype(np.float32) / np.sqrt(dim)
  padding = np.zeros(n, bool)
  padding[[3, 6, 7, 13, 14, 15]] = True
  params = {'w': jnp.zeros(dim)}
  opt_state = tx.init(params)
  key = jax.random.key(0)

  def run(fn, x, padding):
    batch = {'x': x, 'is_padding_example': padding}
    args = (params, opt_state, batch, key)
    if fn is on_mesh:
      args = (parallel.put_replicated(params, layout),
              parallel.put_replicated(opt_state, layout),
              parallel.global_batch(batch, layout),
              parallel.put_replicated(key, layout))
    total, updates = fn(*args)
    return (jax.device_get(parallel.local_copy(total)),
            np.asarray(parallel.local_copy(updates['w'])))

  layout = parallel.Layout(mesh, 1, 0, 4)
  total, updates = run(on_mesh, x, padding)
  norms = np.linalg.norm(x.astype(np.float64), axis=1)
  by_hand = np.sum(np.where(padding, 0.0, np.minimum(1.0, clip / norms))[:, None]
                   * x, axis=0)
  # Padding slots hold garbage: they must still add exactly zero.
  garbage = x.copy()
  garbage[padding] = np.float32(np.nan)
  garbage[13] = np.float32(1e30)
  garbage_total, _ = run(on_mesh, garbage, padding)
  # Removing each real example (marking it as padding) moves the sum by <= C.
  moved = []
  for i in np.flatnonzero(~padding):
    removed = padding.copy()
    removed[i] = True
    moved.append(float(np.linalg.norm(
        run(on_mesh, x, removed)[0].grad_sum['w'].astype(np.float64)
        - total.grad_sum['w'])))
  one_total, one_updates = run(on_one, x, padding)
  # Noise alone: every slot padding, so the update is noise / batch_size.
  empty_total, noise = run(on_mesh, x, np.ones(n, bool))
  _, one_noise = run(on_one, x, np.ones(n, bool))
  return {
      'clipped_sum_vs_by_hand': float(np.max(np.abs(
          total.grad_sum['w'] - by_hand))),
      'num_examples': int(total.num_examples),
      'real_examples': int(np.sum(~padding)),
      'garbage_padding_vs_clean': float(np.max(np.abs(
          garbage_total.grad_sum['w'] - total.grad_sum['w']))),
      'garbage_padding_non_finite': int(garbage_total.num_non_finite),
      'max_moved_by_removal': max(moved),
      'clip': clip,
      'mesh_vs_one_device_sum': float(np.max(np.abs(
          total.grad_sum['w'] - one_total.grad_sum['w']))),
      'mesh_vs_one_device_update': float(np.max(np.abs(
          updates - one_updates))),
      'empty_sum_abs': float(np.max(np.abs(empty_total.grad_sum['w']))),
      'noise_std_over_sigma_c': float(np.std(noise * batch_size)
                                      / (sigma * clip)),
      'noise_mesh_vs_one_device': float(np.max(np.abs(noise - one_noise))),
      'noise_size': int(noise.size),
  }


def main(data_dir: str, workdir: str, out_dir: str, overrides: str) -> None:
  assert jax.device_count() == 4, jax.devices()
  config = tiny.get_config()
  config.update(json.loads(overrides), data_dir=data_dir)
  with parallel.CompileCounter('train_step') as counter:
    result = train.train_and_evaluate(config, workdir)
  params = result['state'].params
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  # Every device must hold the same params: the noise was drawn once.
  replicas_differ = max(
      float(np.max(np.abs(np.asarray(shard.data)
                          - np.asarray(leaf.addressable_data(0)))))
      for _, leaf in leaves for shard in leaf.addressable_shards)
  np.savez(os.path.join(out_dir, 'params.npz'), **{
      jax.tree_util.keystr(path): np.asarray(parallel.local_copy(leaf))
      for path, leaf in leaves})
  mesh = parallel.make_layout(0).mesh
  out = {
      'privacy': result['privacy'],
      'replicas_differ': replicas_differ,
      'params_sharding': str(leaves[0][1].sharding),
      'num_param_shards': len(leaves[0][1].addressable_shards),
      'compiles': counter.compiles,
      'mechanism': _mechanism_checks(mesh),
  }
  with open(os.path.join(out_dir, 'result.json'), 'w') as f:
    json.dump(out, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
