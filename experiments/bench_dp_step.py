"""Times one training step: non-private vs our DP steps vs a naive DP step.

All variants run in one process on the same random batch (B images x K
proposals, all real) and are timed in interleaved rounds, so the ratios to
the non-private step are the result; absolute times only compare on the same
machine. Variants:

  nonprivate     dplh_jax.hyperface.train's step with config.dp=False.
  dp_one_pass    our DP step, one-pass (book-keeping) clipping [the default].
  dp_vmap        our DP step, jax.vmap(jax.grad) clipping, microbatched.
  optax_contrib  naive: vmap(grad) over the batch, then
                 optax.contrib.differentially_private_aggregate and adam.
  opacus         Opacus (GradSampleModule + DPOptimizer over Adam) on the
                 same architecture, batch and loss in torch
                 (experiments/bench_opacus.py). Not run by default; needs
                 the ``bench`` extra (torch, opacus). Its peak memory is
                 not measured (XLA's figure has no torch counterpart).
  torch_nonprivate  the same torch model and loss, plain Adam: Opacus's
                 same-framework baseline (torch's CPU convolutions are
                 faster than XLA's, so compare opacus with this row).

  python experiments/bench_dp_step.py --model=small --batch_size=64
  python experiments/bench_dp_step.py --variants=nonprivate,dp_one_pass,opacus
  python experiments/bench_dp_step.py --model=full --batch_size=32 --json

``--memory_sizes=256,1024,4096`` instead measures the DP step's peak memory
at those logical batch sizes (each in a fresh subprocess, microbatched by
``--microbatch_size``), to show it stays flat.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax


from dplh_jax.dp import batch_selection
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import train_step
from dplh_jax.hyperface.configs import default

JAX_VARIANTS = ('nonprivate', 'dp_one_pass', 'dp_vmap', 'optax_contrib')
TORCH_VARIANTS = ('opacus', 'torch_nonprivate')
VARIANTS = JAX_VARIANTS + TORCH_VARIANTS
_MODEL = flags.DEFINE_enum('model', 'small', ['small', 'full', 'tiny'],
                           'small: the demo config; full: HyperFace at 227 '
                           'px, full width; tiny: for the smoke test.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per step.')
_PROPOSALS = flags.DEFINE_integer('num_proposals', 4, 'Proposals per image.')
_VARIANTS = flags.DEFINE_list('variants', list(JAX_VARIANTS), 'What to '
                              f'time, of {VARIANTS}.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds (one call of '
                               'every variant per round).')
_MICROBATCH = flags.DEFINE_integer('microbatch_size', None, 'Images per chunk '
                                   'for our DP steps; None: one chunk '
                                   '(dp_vmap uses 16 if unset).')
_SAMPLED_STEPS = flags.DEFINE_integer(
    'sampled_steps', 20, 'Poisson-sampled steps run through our DP step to '
    'count compiles (0 to skip).')
_MEMORY_SIZES = flags.DEFINE_list('memory_sizes', [], 'Logical batch sizes '
                                  'for the memory sweep (e.g. 256,1024,4096).')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
_OPACUS_MODE = flags.DEFINE_enum(
    'opacus_grad_sample_mode', 'hooks', ['hooks', 'functorch'],
    'How Opacus forms per-image gradients (experiments/bench_opacus.py).')

_VMAP_MICROBATCH = 16  # the fastest of 1/8/16/None for dp_vmap at batch 64


def model_config(name: str):
  """The benchmark's config: the demo one, or HyperFace at full size.

  With DPLH's learned task weights (the demo's default is fixed ones): the
  torch twin in bench_opacus.py implements those, and the 5 log sigma^2
  parameters cost nothing measurable.
  """
  config = default.get_config()
  config.task_weighting = 'uncertainty'
  if name == 'full':
    config.update(input_size=227, width_multiplier=1.0, conv1_kernel=11,
                  conv1_stride=4)
  elif name == 'tiny':
    config.update(input_size=32, width_multiplier=1 / 32, conv1_kernel=3,
                  conv1_stride=1)
  return config


def fake_batch(rng: np.random.Generator, num_images: int, num_proposals: int,
               size: int, num_real: int | None = None) -> dict:
  """Random crops and valid labels: half the proposals faces, all tasks."""
  k = num_proposals
  label = np.zeros((num_images, k), np.int32)
  label[:, :max(1, k // 2)] = 1
  real = num_images if num_real is None else num_real
  return {
      'crops': rng.normal(size=(num_images, k, size, size, 3)).astype(
          np.float32),
      'detection_label': label,
      'landmarks': rng.uniform(size=(num_images, k, 21, 2)).astype(np.float32),
      'visibility': (rng.uniform(size=(num_images, k, 21)) > 0.3).astype(
          np.float32),
      'pose': (0.3 * rng.normal(size=(num_images, k, 3))).astype(np.float32),
      'gender': rng.integers(0, 2, (num_images, k)).astype(np.int32),
      'image_index': np.arange(num_images, dtype=np.int32),
      'is_padding_example': np.arange(num_images) >= real,
  }


def _optax_contrib_step(config, model, weighting, noise_multiplier):
  """The naive DP step: every per-example gradient materialized by vmap."""
  tx = optax.chain(
      optax.contrib.differentially_private_aggregate(
          config.l2_norm_clip, noise_multiplier, seed=0),
      optax.adam(config.learning_rate))
  loss_fn = jax.grad(
      lambda p, e: losses.per_image_loss(p, e, None, model=model,
                                         weighting=weighting)[0])

  def step(state, batch, rng):
    del rng
    grads = jax.vmap(loss_fn, (None, 0))(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return train_step.TrainState(state.step + 1,
                            optax.apply_updates(state.params, updates),
                            opt_state), {}

  return tx, step


def build_variant(name: str, config, model, weighting, params,
                  vmap_microbatch_size: int = _VMAP_MICROBATCH):
  """``(jitted step, initial state)`` for one variant."""
  noise_multiplier = 1.0
  if name == 'optax_contrib':
    tx, step = _optax_contrib_step(config, model, weighting, noise_multiplier)
  else:
    spec = train_step.StepSpec.from_config(config, model, weighting,
                                      noise_multiplier)
    spec = dataclasses.replace(spec, dp=name != 'nonprivate')
    if name == 'dp_vmap':
      spec = dataclasses.replace(spec, clipping='vmap',
                                 microbatch_size=vmap_microbatch_size)
    tx, step = train_step.make_optimizer(spec, 0), train_step.make_train_step(spec)
  # Own copies: the step donates its state, and variants share ``params``.
  state = jax.tree.map(lambda x: jnp.array(x, copy=True),
                       train_step.TrainState(jnp.int32(0), params, tx.init(params)))
  return jax.jit(step, donate_argnums=0), state


def compile_step(step, state, batch):
  """Compiles ahead of time; returns the executable and XLA's peak bytes
  (arguments + outputs + temporaries, less donated buffers)."""
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return compiled, -1
  return compiled, (analysis.argument_size_in_bytes
                    + analysis.output_size_in_bytes
                    + analysis.temp_size_in_bytes
                    - analysis.alias_size_in_bytes)


def import_bench_opacus():
  """experiments/bench_opacus.py, or a UsageError if torch is missing."""
  try:
    import bench_opacus
  except ModuleNotFoundError as e:
    if e.name not in ('torch', 'opacus'):
      raise
    raise app.UsageError(
        f'--variants {TORCH_VARIANTS} need torch and opacus ({e.name} is not '
        "installed): install the bench extra, pip install -e '.[bench]'."
    ) from e
  return bench_opacus


def build_torch(name, config, model, weighting, params, host_batch):
  """A torch step (a blocking callable) and its description."""
  bench_opacus = import_bench_opacus()
  loss_and_grad = jax.value_and_grad(
      lambda p, e: losses.per_image_loss(p, e, None, model=model,
                                         weighting=weighting)[0])
  jax_losses, grads = jax.jit(jax.vmap(loss_and_grad, (None, 0)))(
      params, host_batch)
  grad_norms = jnp.sqrt(sum(jnp.sum(g.reshape(len(g), -1) ** 2, axis=1)
                            for g in jax.tree.leaves(grads)))
  return bench_opacus.build_step(
      model.config, params, host_batch, l2_norm_clip=config.l2_norm_clip,
      noise_multiplier=1.0, expected_batch_size=config.expected_batch_size,
      learning_rate=config.learning_rate, jax_losses=np.asarray(jax_losses),
      jax_grad_norms=np.asarray(grad_norms),
      grad_sample_mode=_OPACUS_MODE.value, num_threads=os.cpu_count(),
      dp=name == 'opacus')


def time_variants(config, names, batch_size, num_proposals, rounds):
  """Times every variant in ``names`` in interleaved rounds."""
  model, weighting = model_setup.build_model(config)
  params = model_setup.init_params(config, model)
  rng = np.random.default_rng(0)
  host_batch = fake_batch(rng, batch_size, num_proposals, config.input_size)
  batch = jax.device_put(host_batch)
  jitted, compiled, states, results = {}, {}, {}, {}
  for name in names:
    print(f'compiling {name} ...', file=sys.stderr, flush=True)
    start = time.perf_counter()
    if name in TORCH_VARIANTS:
      compiled[name], info = build_torch(name, config, model, weighting,
                                         params, host_batch)
      compiled[name]()
      results[name] = {'compile_and_first_s': time.perf_counter() - start,
                       'peak_mib': None, 'times_s': []} | info
      continue
    jitted[name], states[name] = build_variant(
        name, config, model, weighting, params,
        config.microbatch_size or _VMAP_MICROBATCH)
    compiled[name], peak = compile_step(jitted[name], states[name], batch)
    states[name] = jax.block_until_ready(
        compiled[name](states[name], batch, jax.random.key(0))[0])
    results[name] = {'compile_and_first_s': time.perf_counter() - start,
                     'peak_mib': peak / 2**20, 'times_s': []}
  for r in range(rounds):
    for name in names:
      start = time.perf_counter()
      if name in TORCH_VARIANTS:
        compiled[name]()  # torch on CPU returns when the step is done
      else:
        states[name] = jax.block_until_ready(
            compiled[name](states[name], batch, jax.random.key(r))[0])
      results[name]['times_s'].append(time.perf_counter() - start)
    print(f'round {r + 1}/{rounds}', file=sys.stderr, flush=True)
  base = np.median(results[names[0]]['times_s'])
  for name in names:
    times = results[name].pop('times_s')
    results[name].update(
        median_ms=1e3 * float(np.median(times)),
        min_ms=1e3 * float(np.min(times)),
        images_per_s=batch_size / float(np.median(times)),
        ratio_to_first=float(np.median(times) / base))
  return results, jitted, states


def count_sampled_compiles(config, step, state, num_steps, batch_size,
                           num_proposals) -> dict:
  """Runs Poisson-sampled padded batches through the jitted step, as
  train.py does, and counts its compiles: one per distinct padded shape."""
  num_examples = 4000
  sampler = batch_selection.PoissonSampler(
      num_examples, batch_size, seed=0)
  rng = np.random.default_rng(1)
  shapes = set()
  for i in range(num_steps):
    sample = sampler.sample()
    real = int(np.sum(~sample.is_padding_example))
    batch = fake_batch(rng, len(sample.indices), num_proposals,
                       config.input_size, num_real=real)
    shapes.add(len(sample.indices))
    state = step(state, batch, jax.random.key(i))[0]
  jax.block_until_ready(state)
  return {'sampled_steps': num_steps, 'padded_sizes': sorted(shapes),
          'compiles': step._cache_size()}  # pylint: disable=protected-access


def one_memory_step(config, batch_size, num_proposals) -> dict:
  """One DP step at a logical batch size; the caller reads our peak RSS."""
  model, weighting = model_setup.build_model(config)
  params = model_setup.init_params(config, model)
  step, state = build_variant('dp_one_pass', config, model, weighting, params)
  batch = fake_batch(np.random.default_rng(0), batch_size, num_proposals,
                     config.input_size)
  compiled, peak = compile_step(step, state, batch)
  start = time.perf_counter()
  jax.block_until_ready(compiled(state, batch, jax.random.key(0))[0])
  return {'batch_size': batch_size, 'xla_peak_mib': peak / 2**20,
          'input_mib': sum(x.nbytes for x in jax.tree.leaves(batch)) / 2**20,
          'step_s': time.perf_counter() - start,
          'max_rss_mib': resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024}


def memory_sweep(sizes) -> list[dict]:
  """Each size in a fresh process, so max RSS is that size's own peak."""
  rows = []
  for size in sizes:
    command = [sys.executable, os.path.abspath(__file__),
               f'--model={_MODEL.value}', f'--batch_size={size}',
               f'--num_proposals={_PROPOSALS.value}',
               f'--microbatch_size={_MICROBATCH.value or 64}',
               '--memory_sizes=one_step']
    print(' '.join(command[1:]), file=sys.stderr, flush=True)
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  return rows


def main(argv):
  del argv
  config = model_config(_MODEL.value)
  config.microbatch_size = _MICROBATCH.value
  header = {'model': _MODEL.value, 'backend': jax.default_backend(),
            'device': str(jax.devices()[0]), 'cpu_count': os.cpu_count(),
            'num_proposals': _PROPOSALS.value}
  if _MEMORY_SIZES.value == ['one_step']:
    print(json.dumps(one_memory_step(config, _BATCH.value, _PROPOSALS.value)))
    return
  if _MEMORY_SIZES.value:
    rows = memory_sweep([int(s) for s in _MEMORY_SIZES.value])
    if _JSON.value:
      print(json.dumps(header | {'memory': rows}, indent=1))
      return
    print('| logical batch | microbatch | XLA peak (MiB) | of which the '
          'input batch | max RSS (MiB) | step (s) |\n'
          '|---:|---:|---:|---:|---:|---:|')
    for row in rows:
      print(f'| {row["batch_size"]} | {_MICROBATCH.value or 64} | '
            f'{row["xla_peak_mib"]:.0f} | {row["input_mib"]:.0f} | '
            f'{row["max_rss_mib"]:.0f} | {row["step_s"]:.1f} |')
    return
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f'Unknown --variants {sorted(unknown)}; use some of '
                         f'{VARIANTS}.')
  if set(TORCH_VARIANTS) & set(_VARIANTS.value):
    import_bench_opacus()  # fail before compiling anything
  results, steps, states = time_variants(
      config, _VARIANTS.value, _BATCH.value, _PROPOSALS.value, _ROUNDS.value)
  sampled = None
  if _SAMPLED_STEPS.value and 'dp_one_pass' in steps:
    sampled = count_sampled_compiles(
        config, steps['dp_one_pass'], states['dp_one_pass'],
        _SAMPLED_STEPS.value, _BATCH.value, _PROPOSALS.value)
  if _JSON.value:
    print(json.dumps(header | {'batch_size': _BATCH.value,
                               'variants': results,
                               'sampled_run': sampled}, indent=1))
    return
  first = _VARIANTS.value[0]
  print(f'{_MODEL.value} HyperFace, {_BATCH.value} images x '
        f'{_PROPOSALS.value} proposals, {header["device"]}, '
        f'{header["cpu_count"]} CPUs')
  print(f'| variant | median ms | min ms | images/s | x {first} '
        '| XLA peak MiB |\n|---|---:|---:|---:|---:|---:|')
  for name, r in results.items():
    peak = '-' if r['peak_mib'] is None else f'{r["peak_mib"]:.0f}'
    print(f'| {name} | {r["median_ms"]:.1f} | {r["min_ms"]:.1f} | '
          f'{r["images_per_s"]:.0f} | {r["ratio_to_first"]:.2f} | {peak} |')
  if 'opacus' in results:
    r = results['opacus']
    print(f'opacus: torch {r["torch"]}, opacus {r["opacus"]}, '
          f'grad_sample_mode={r["grad_sample_mode"]}, {r["num_threads"]} '
          f'threads, {r["num_params"]} parameters; at init its per-image '
          f'losses are within {r["max_loss_diff_vs_jax"]:.1g} of JAX\'s and '
          'its per-image gradient norms within a relative '
          f'{r["max_grad_norm_rel_diff_vs_jax"]:.1g}; peak memory not '
          'measured (-).')
  if 'opacus' in results and 'torch_nonprivate' in results:
    ratio = (results['opacus']['median_ms']
             / results['torch_nonprivate']['median_ms'])
    print(f'opacus / torch_nonprivate (medians): {ratio:.2f}')
  if sampled:
    print(f'Poisson-sampled run of the jitted dp_one_pass step: '
          f'{sampled["sampled_steps"]} steps, padded sizes '
          f'{sampled["padded_sizes"]}, {sampled["compiles"]} compile(s).')


if __name__ == '__main__':
  app.run(main)
