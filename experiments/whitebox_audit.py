"""White-box gradient-canary audit of dp_aggregate, correct and with bugs.

  .venv/bin/python experiments/whitebox_audit.py \
      --json_out experiments/results/audit/whitebox.json

Runs ``dplh_jax.dp.gradient_canaries`` (via ``gradient_canary_simulation``)
at the demo's sampling rate, steps and
delta (q = 256 / 20000, 391 steps, delta 1e-5, C = 1, divisor 256) with the
noise multiplier calibrated for each claimed epsilon
(``accounting.calibrate_noise_multiplier``), against the library's mechanism
over several seeds and against deliberately broken variants (defined here,
never in the library). Every run is scored by every scorer from the same
releases; each scorer's bound is a valid audit on its own (picking the best
of the three after the fact would need a Bonferroni correction). Prints the
bound, its confidence, the delta used and the largest bound the design could
certify, and writes them to ``--json_out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dplh_jax.dp import accounting
from dplh_jax.dp import clipped_sum
from dplh_jax.dp import dp_transform
from dplh_jax.dp import gradient_canaries as gc
from dplh_jax.dp import gradient_canary_simulation as simulation

# The demo (configs/default.py on synthetic_faces/demo): 20,000 images,
# batch 256, five epochs.
DEMO_SAMPLING_PROB = 256 / 20000
DEMO_STEPS = 391
DEMO_EXPECTED_BATCH_SIZE = 256
DEMO_DELTA = 1e-5


# Broken variants. Module-level functions, so that jit caches on them.

def aggregate_noise_too_small(l2_norm_clip, noise_multiplier,
                              expected_batch_size, key):
  """Noise multiplier 10x smaller than claimed."""
  return dp_transform.dp_aggregate(l2_norm_clip, noise_multiplier / 10,
                                   expected_batch_size, key)


def aggregate_noise_on_mean(l2_norm_clip, noise_multiplier,
                            expected_batch_size, key):
  """Noise scaled for the mean (sigma C / B) but added to the sum, which is
  then divided by B: the noise on the sum is B times too small."""
  return dp_transform.dp_aggregate(
      l2_norm_clip, noise_multiplier / expected_batch_size,
      expected_batch_size, key)


def aggregate_key_reused(l2_norm_clip, noise_multiplier, expected_batch_size,
                         key):
  """dp_aggregate whose state keeps its first key: the same noise every
  step."""
  inner = dp_transform.dp_aggregate(l2_norm_clip, noise_multiplier,
                                    expected_batch_size, key)

  def update(updates, state, params=None, **extra_args):
    released, new_state = inner.update(updates, state, params, **extra_args)
    return released, new_state._replace(noise_key=state.noise_key)

  return optax.GradientTransformationExtraArgs(inner.init, update)


def _is_real(rows, is_padding_example):
  if is_padding_example is None:
    return jnp.ones(rows.shape[:1], bool)
  return jnp.logical_not(is_padding_example)


def clip_skipped(rows, l2_norm_clip, is_padding_example=None):
  """The counts and metadata of clip_and_sum, but the raw (unclipped) sum."""
  clipped = clipped_sum.clip_and_sum(rows, l2_norm_clip, is_padding_example)
  raw = jnp.where(_is_real(rows, is_padding_example)[:, None],
                  rows.astype(jnp.float32), 0.0).sum(axis=0)
  return dataclasses.replace(clipped, grad_sum=raw)


def clip_slot_keyed_dropout(rows, l2_norm_clip, is_padding_example=None):
  """Each example's gradient under a dropout mask keyed by its slot among
  the batch's real examples (docs/DESIGN.md, Privacy rules, rule 8, broken):
  removing one example gives every later one a new mask. Then clipped."""
  is_real = _is_real(rows, is_padding_example)
  slots = jnp.cumsum(is_real) - 1
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(slots)
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, rows.shape[1:]))(
      keys)
  return clipped_sum.clip_and_sum(jnp.where(keep, 2.0 * rows, 0.0),
                                  l2_norm_clip, is_padding_example)


BROKEN_MECHANISMS = {
    'noise_10x_too_small': simulation.Mechanism(
        aggregate=aggregate_noise_too_small),
    'clipping_skipped': simulation.Mechanism(clip_and_sum=clip_skipped),
    'noise_on_mean': simulation.Mechanism(aggregate=aggregate_noise_on_mean),
    'noise_key_reused': simulation.Mechanism(aggregate=aggregate_key_reused),
    'loss_keyed_by_slot': simulation.Mechanism(
        clip_and_sum=clip_slot_keyed_dropout),
}
MECHANISMS = {'correct': simulation.DP_SGD, **BROKEN_MECHANISMS}


def real_gradients(num_rows: int, dimension: int, norm: float, seed: int
                   ) -> np.ndarray:
  """Fixed "real" rows of the given norm (above C, so clipping matters)."""
  rows = np.random.default_rng([seed, 7]).standard_normal(
      (num_rows, dimension))
  return (norm * rows / np.linalg.norm(rows, axis=1, keepdims=True)
          ).astype(np.float32)


def audit_all_scorers(mechanism_name: str, epsilon: float, seed: int,
                      args) -> list[dict]:
  sigma = accounting.calibrate_noise_multiplier(
      epsilon, args.delta, args.sampling_prob, args.steps)
  start = time.time()
  projections, members = simulation.simulate_projections(
      sigma, args.sampling_prob, args.steps,
      expected_batch_size=args.expected_batch_size,
      l2_norm_clip=args.l2_norm_clip, num_canaries=args.num_canaries,
      seed=seed, canary_norm=args.canary_norm * args.l2_norm_clip,
      real_gradients=real_gradients(args.num_real, args.num_canaries,
                                    args.real_norm * args.l2_norm_clip, seed),
      mechanism=MECHANISMS[mechanism_name])
  wall = time.time() - start
  num_positive = gc.default_num_positive_guesses(
      args.num_canaries, args.sampling_prob, args.steps)
  rows = []
  for scorer in gc.SCORERS:
    scores = gc.canary_scores(
        projections, scorer, args.sampling_prob,
        signals=gc.canary_signals(args.canary_norm * args.l2_norm_clip,
                                  args.l2_norm_clip))
    result = gc.audit_from_scores(scores, members, num_positive, 0,
                                  args.delta, args.significance, scorer)
    rows.append({'mechanism': mechanism_name, 'claimed_epsilon': epsilon,
                 'noise_multiplier': sigma, 'seed': seed,
                 'simulation_seconds': round(wall, 1), **result.to_dict()})
  return rows


# The HyperFace audit's fixed settings (recorded in its JSON's settings).
HYPERFACE_TINY_SETTINGS = {'config': 'tiny', 'num_epochs': 10.0,
                           'num_canaries': 500, 'learning_rate': 0.01,
                           'optimizer': 'sgd', 'scorer': 'stepwise',
                           'noise_factors': [1.0, 0.1]}


def hyperface_tiny_audit(data_dir: str, *, target_epsilon: float,
                         noise_factor: float = 1.0, num_epochs: float = 10.0,
                         num_canaries: int = 500, seed: int = 0,
                         learning_rate: float = 0.01) -> dict:
  """Gradient canaries in HyperFace's own train step on the tiny config.

  ``train_step.make_train_step(spec, clipped_sum_wrapper=...)`` with
  ``gradient_canaries.with_gradient_canaries``: the canaries join the
  per-image clipped sum (one-pass clipping) before dp_aggregate's noise. The
  noise multiplier is calibrated to ``target_epsilon``; ``noise_factor`` < 1
  injects the bug "noise too small" into the step's spec while the claim
  stays. SGD at a constant rate, so the auditor reads each release from the
  intermediate parameters, ``(p_t - p_{t+1}) / lr``; the real images'
  clipped sum (at most B C in norm, spread over all parameters) is left in
  as noise of the auditor's.
  """
  import jax.flatten_util  # pylint: disable=g-import-not-at-top
  from dplh_jax.dp import batch_selection
  from dplh_jax.dp import privacy_plan
  from dplh_jax.hyperface import data_loading
  from dplh_jax.hyperface import input_pipeline
  from dplh_jax.hyperface import model_setup
  from dplh_jax.hyperface import train_step as step_lib
  from dplh_jax.hyperface.configs import tiny

  config = tiny.get_config()
  config.data_dir, config.num_epochs = data_dir, num_epochs
  config.optimizer, config.learning_rate = 'sgd', learning_rate
  data = data_loading.load_data(config)
  num_examples = len(data.train)
  plan = privacy_plan.plan_privacy(
      num_examples=num_examples,
      expected_batch_size=config.expected_batch_size,
      num_epochs=num_epochs, dp=True, noise_multiplier=None,
      target_epsilon=target_epsilon, delta=config.delta,
      accountant=config.accountant)
  model, weighting = model_setup.build_model(config)
  spec = step_lib.StepSpec.from_config(
      config, model, weighting, plan.noise_multiplier * noise_factor,
      plan.num_steps)
  # Three independent streams: no step rng may equal the noise key or the
  # canaries' key (fold_in(key(0), 1) would be both a step rng and a key).
  noise_key, canary_key, step_root = jax.random.split(jax.random.key(seed), 3)
  tx = step_lib.make_optimizer(spec, noise_key)
  params = model_setup.init_params(config, model)
  ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
  flat, unflatten = jax.flatten_util.ravel_pytree(params)
  directions = gc.canary_directions(num_canaries, flat.size, seed)
  members = gc.membership_coins(num_canaries, seed)
  canaries = jax.vmap(unflatten)(
      jnp.asarray(directions * np.float32(config.l2_norm_clip)))
  wrapper = lambda fn: gc.with_gradient_canaries(
      fn, canaries, members, plan.sampling_prob, canary_key)
  step = jax.jit(step_lib.make_train_step(spec, clipped_sum_wrapper=wrapper))
  state = step_lib.initial_state(params, tx.init(params), config.ema_decay)
  sampler = batch_selection.PoissonSampler(
      num_examples, config.expected_batch_size, seed=seed)
  start, releases = time.time(), []
  for t, batch, _ in input_pipeline.train_batches(
      data.train, sampler, data.pipeline_config, seed=config.seed,
      start_step=0, num_steps=plan.num_steps):
    before = np.asarray(ravel(state.params), np.float64)
    state, _ = step(state, batch, jax.random.fold_in(step_root, t))
    releases.append((before - np.asarray(ravel(state.params), np.float64))
                    / learning_rate)
  projections = gc.canary_projections(
      np.stack(releases), directions, config.expected_batch_size,
      config.l2_norm_clip)
  result = gc.audit_from_scores(
      gc.canary_scores(projections, 'stepwise', plan.sampling_prob), members,
      gc.default_num_positive_guesses(num_canaries, plan.sampling_prob,
                                      plan.num_steps), 0, config.delta)
  return {'mechanism': ('correct' if noise_factor == 1 else
                        f'noise_{noise_factor:g}x'),
          'claimed_epsilon': target_epsilon,
          'noise_multiplier': plan.noise_multiplier,
          'noise_factor': noise_factor, 'steps': plan.num_steps,
          'sampling_prob': plan.sampling_prob,
          'num_parameters': int(flat.size), 'seed': seed,
          'train_seconds': round(time.time() - start, 1), **result.to_dict()}


def markdown_table(runs: list[dict]) -> str:
  """One row per mechanism and claimed epsilon; per scorer the bound and
  correct/guesses (over several seeds: the largest bound and the range of
  correct guesses)."""
  groups = {}
  for run in runs:
    groups.setdefault((run['mechanism'], run['claimed_epsilon']), []).append(
        run)
  lines = ['| mechanism | claimed epsilon (sigma) | seeds | '
           + ' | '.join(f'{s} bound (correct/guesses)' for s in gc.SCORERS)
           + ' | max certifiable |', '|---' * (4 + len(gc.SCORERS)) + '|']
  for (mechanism, epsilon), group in groups.items():
    cells = []
    for scorer in gc.SCORERS:
      mine = [r for r in group if r['scorer'] == scorer]
      bound = max(r['epsilon_lower_bound'] for r in mine)
      correct = sorted(r['num_correct'] for r in mine)
      counts = (f'{correct[0]}' if correct[0] == correct[-1]
                else f'{correct[0]}-{correct[-1]}')
      cells.append(f'{"**" if bound > epsilon else ""}{bound:.2f}'
                   f'{"**" if bound > epsilon else ""} '
                   f'({counts}/{mine[0]["num_guesses"]})')
    seeds = sorted({r['seed'] for r in group})
    lines.append(f'| {mechanism} | {epsilon:g} ({group[0]["noise_multiplier"]:.3f})'
                 f' | {",".join(map(str, seeds))} | ' + ' | '.join(cells)
                 + f' | {group[0]["max_certifiable_bound"]:.2f} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epsilons', type=float, nargs='+', default=[1.0, 5.0])
  parser.add_argument('--correct_seeds', type=int, nargs='+',
                      default=[0, 1, 2, 3, 4])
  parser.add_argument('--bug_seeds', type=int, nargs='+', default=[0])
  parser.add_argument('--mechanisms', nargs='+', default=list(MECHANISMS),
                      choices=list(MECHANISMS))
  parser.add_argument('--num_canaries', type=int, default=3000,
                      help='m; also the dimension (orthonormal canaries)')
  parser.add_argument('--sampling_prob', type=float,
                      default=DEMO_SAMPLING_PROB)
  parser.add_argument('--steps', type=int, default=DEMO_STEPS)
  parser.add_argument('--expected_batch_size', type=float,
                      default=DEMO_EXPECTED_BATCH_SIZE)
  parser.add_argument('--delta', type=float, default=DEMO_DELTA)
  parser.add_argument('--l2_norm_clip', type=float, default=1.0)
  parser.add_argument('--canary_norm', type=float, default=10.0,
                      help='canary norm in units of C (clipping cuts it)')
  parser.add_argument('--num_real', type=int, default=64,
                      help='fixed real rows in every batch')
  parser.add_argument('--real_norm', type=float, default=3.0,
                      help='their norm in units of C')
  parser.add_argument('--significance', type=float, default=0.05)
  parser.add_argument('--json_out', default=None)
  parser.add_argument('--hyperface_tiny', metavar='DATA_DIR', default=None,
                      help='instead: canaries in HyperFace\'s own train step '
                      '(tiny config, TFDS data in DATA_DIR), correct and '
                      'with a tenth of the noise')
  parser.add_argument('--table_only', action='store_true',
                      help='print the markdown table of --json_out, no runs')
  args = parser.parse_args()
  if args.hyperface_tiny:
    fixed = HYPERFACE_TINY_SETTINGS
    runs = [hyperface_tiny_audit(
        args.hyperface_tiny, target_epsilon=epsilon, noise_factor=factor,
        num_epochs=fixed['num_epochs'], num_canaries=fixed['num_canaries'],
        seed=seed, learning_rate=fixed['learning_rate'])
            for epsilon in args.epsilons for factor in fixed['noise_factors']
            for seed in args.bug_seeds]
    for run in runs:
      print(json.dumps(run))
    if args.json_out:
      # Only what the HyperFace runs used (the synthetic audit's arguments
      # do not apply; each run records its own q, steps and sigma).
      settings = {'data_dir': args.hyperface_tiny, 'epsilons': args.epsilons,
                  'seeds': args.bug_seeds, **fixed}
      with open(args.json_out, 'w') as f:
        json.dump({'settings': settings, 'runs': runs}, f, indent=1)
    return
  if args.table_only:
    with open(args.json_out) as f:
      print(markdown_table(json.load(f)['runs']))
    return

  rows = []
  header = (f'{"mechanism":<20} {"eps":>4} {"seed":>4} {"scorer":<10} '
            f'{"correct/guesses":>15} {"bound":>6} {"max":>6} '
            f'{"confidence":>10} {"delta":>7}')
  print(header)
  for mechanism_name in args.mechanisms:
    seeds = (args.correct_seeds if mechanism_name == 'correct'
             else args.bug_seeds)
    for epsilon in args.epsilons:
      for seed in seeds:
        for row in audit_all_scorers(mechanism_name, epsilon, seed, args):
          rows.append(row)
          print(f'{mechanism_name:<20} {epsilon:>4g} {seed:>4} '
                f'{row["scorer"]:<10} '
                f'{row["num_correct"]:>7}/{row["num_guesses"]:<7} '
                f'{row["epsilon_lower_bound"]:>6.2f} '
                f'{row["max_certifiable_bound"]:>6.2f} '
                f'{row["confidence"]:>10.2f} {row["delta"]:>7g}', flush=True)
  if args.json_out:
    os.makedirs(os.path.dirname(args.json_out) or '.', exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != 'json_out'}
    with open(args.json_out, 'w') as f:
      json.dump({'settings': settings, 'runs': rows}, f, indent=1)
    print(f'Results: {args.json_out}')
  print(markdown_table(rows))


if __name__ == '__main__':
  main()
