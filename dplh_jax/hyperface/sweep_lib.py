"""The privacy-utility sweep behind ``dplh-sweep``, importable.

Each run trains with ``dplh_jax.hyperface.train.train_and_evaluate`` in its own workdir,
``<outdir>/<budget>_seed<seed>`` (``eps5_seed0``, ``nonprivate_seed0``): the
base config with ``target_epsilon`` set (sigma is calibrated so the planned
steps spend at most the budget) or ``dp=False``, and the sweep seed as model,
data, sampler and (optionally) noise seed. A run whose ``privacy_report.json``
exists is finished and skipped; an interrupted one resumes from its
checkpoint. So re-running the same sweep continues it.

Kept apart from the absl entry point so a notebook or a test can run a sweep
without defining command-line flags.
"""

import copy
import json
import os
import time

import ml_collections

from dplh_jax.hyperface import config_validation
from dplh_jax.hyperface import data_loading
from dplh_jax.hyperface import train
from dplh_jax.hyperface import sweep_plots

# The file in a workdir that marks a finished run (train.py writes it last).
_FINISHED = 'privacy_report.json'
# The config a workdir's run was started with, to refuse mixing configs.
_RUN_CONFIG = 'sweep_config.json'


def parse_epsilons(texts) -> list[float]:
  """Budgets from flag text; raises ValueError naming a bad one."""
  epsilons = []
  for text in texts:
    try:
      epsilon = float(text)
    except ValueError:
      raise ValueError(f'--epsilons: {text!r} is not a number.') from None
    if not 0 < epsilon < float('inf'):
      raise ValueError(f'--epsilons: {text!r} must be finite and > 0.')
    epsilons.append(epsilon)
  if len(set(epsilons)) != len(epsilons):
    raise ValueError(f'--epsilons: {",".join(texts)} repeats a budget.')
  return epsilons


def parse_seeds(texts) -> list[int]:
  """Seeds from flag text; raises ValueError naming a bad one."""
  try:
    seeds = [int(text) for text in texts]
  except ValueError:
    raise ValueError(f'--seeds: {",".join(texts)} are not all integers.'
                     ) from None
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise ValueError(f'--seeds: {",".join(texts)} must be distinct and >= 0.')
  return seeds


def plan_runs(epsilons, seeds, nonprivate: bool) -> list[tuple[str, int]]:
  """``(budget, seed)`` pairs: the baseline first (it is the reference)."""
  budgets = ([sweep_plots.NONPRIVATE] if nonprivate else []) + [
      f'{e:g}' for e in sorted(epsilons, reverse=True)]
  return [(budget, seed) for budget in budgets for seed in seeds]


def run_config(base: ml_collections.ConfigDict, budget: str, seed: int, *,
               eval_every: int, seeded_noise: bool
               ) -> ml_collections.ConfigDict:
  """The base config with this run's budget, seeds and evaluation cadence."""
  config = copy.deepcopy(base)  # Stays locked: a misspelt field raises.
  config.seed = seed
  config.sampler_seed = seed if seeded_noise else None
  config.noise_seed = seed if seeded_noise else None
  if eval_every:
    config.eval_every = eval_every
  # A given noise_multiplier would make every budget stop early at the same
  # sigma; a sweep calibrates sigma to each budget instead.
  config.noise_multiplier = None
  if budget == sweep_plots.NONPRIVATE:
    config.dp, config.target_epsilon = False, None
  else:
    config.dp, config.target_epsilon = True, float(budget)
  return config


def check_same_config(workdir: str, config: ml_collections.ConfigDict
                       ) -> None:
  """Records the run's config, or refuses a workdir started with another."""
  path = os.path.join(workdir, _RUN_CONFIG)
  now = json.loads(config.to_json(sort_keys=True))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = sorted(k for k in saved.keys() | now.keys()
                     if saved.get(k) != now.get(k))
    if changed:
      raise ValueError(
          f'{workdir} holds a run with another config ('
          + ', '.join(f'{k}: {saved.get(k)!r} then, {now.get(k)!r} now'
                      for k in changed) + '); use a new --outdir.')
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(now, f, indent=2, sort_keys=True)


def read_run(workdir: str) -> tuple[dict, list[dict]]:
  """``(privacy report, eval rows by step)`` of a finished run's workdir.

  A resumed run drops the lines of the steps it replays (metric_writer), so
  each eval step appears once; should an older workdir hold one twice, the
  later line wins.
  """
  with open(os.path.join(workdir, _FINISHED)) as f:
    privacy = json.load(f)
  evals = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if row['split'] == 'eval':
        evals[row['step']] = row
  if not evals:
    raise ValueError(f'{workdir}/metrics.jsonl has no eval line; delete the '
                     'workdir and run it again.')
  return privacy, [evals[step] for step in sorted(evals)]


def run_rows(budget: str, seed: int, workdir: str, sampling_prob: float
             ) -> tuple[dict, list[dict]]:
  """The run's ``runs.csv`` row and its ``curves.csv`` rows."""
  privacy, evals = read_run(workdir)
  name = os.path.basename(workdir)
  final = {k: v for k, v in evals[-1].items() if k not in ('step', 'split')}
  run = {'run': name, 'budget': budget, 'seed': seed,
         'target_epsilon': privacy.get('target_epsilon'),
         'epsilon': privacy['epsilon'], 'delta': privacy['delta'],
         'accountant': privacy.get('accountant'),
         'noise_multiplier': privacy.get('noise_multiplier'),
         'sampling_prob': sampling_prob, 'steps': evals[-1]['step'],
         # 'config_seed (not secret)' unless --noseeded_noise: say so.
         'noise_seed_source': privacy.get('noise_seed_source'),
         **dict(sorted(final.items()))}
  curves = [{'run': name, 'budget': budget, 'seed': seed, 'step': row['step'],
             # Epochs of expected batches: step * q.
             'epoch': round(row['step'] * sampling_prob, 6),
             **{k: v for k, v in sorted(row.items())
                if k not in ('step', 'split')}} for row in evals]
  return run, curves


def _progress(index: int, total: int, name: str, message: str) -> None:
  print(f'[{index}/{total}] {name}: {message}', flush=True)


def run_sweep(base: ml_collections.ConfigDict, epsilons, seeds, outdir: str,
              *, nonprivate: bool = True, evals_per_epoch: float = 4.0,
              seeded_noise: bool = True) -> tuple[list[dict], list[dict]]:
  """Trains (or skips, if finished) every run; returns the CSV rows.

  Args:
    base: the base config; each run overrides its budget and seeds.
    epsilons: target epsilons at ``base.delta``.
    seeds: one run per budget and seed.
    outdir: the runs' workdirs go here.
    nonprivate: also run the non-private baseline per seed.
    evals_per_epoch: held-out evaluations per epoch during training; 0 keeps
      ``base.eval_every``.
    seeded_noise: seed the DP noise and sampler from the sweep seed.

  Returns:
    ``(runs, curves)``: rows of ``runs.csv`` and ``curves.csv``.
  """
  if evals_per_epoch < 0:
    raise ValueError(f'evals_per_epoch={evals_per_epoch} must be >= 0.')
  config_validation.validate_config(base)
  data = data_loading.load_data(base)  # The same data for every run: load once.
  num_examples = len(data.train)
  sampling_prob = base.expected_batch_size / num_examples
  eval_every = 0
  if evals_per_epoch:
    eval_every = max(1, round(1 / sampling_prob / evals_per_epoch))
  plan = plan_runs(epsilons, seeds, nonprivate)
  runs, curves = [], []
  for index, (budget, seed) in enumerate(plan, start=1):
    name = (budget if budget == sweep_plots.NONPRIVATE
            else f'eps{budget}') + f'_seed{seed}'
    workdir = os.path.join(outdir, name)
    config = run_config(base, budget, seed, eval_every=eval_every,
                        seeded_noise=seeded_noise)
    check_same_config(workdir, config)
    if os.path.exists(os.path.join(workdir, _FINISHED)):
      _progress(index, len(plan), name, f'finished earlier, skipped '
                f'({workdir})')
    else:
      _progress(index, len(plan), name, f'training in {workdir}')
      start = time.time()
      try:
        train.train_and_evaluate(config, workdir, data)
      except ValueError as error:
        raise ValueError(f'run {name}: {error}') from error
      _progress(index, len(plan), name, f'done in {time.time() - start:.0f} s')
    run, run_curves = run_rows(budget, seed, workdir, sampling_prob)
    runs.append(run)
    curves.extend(run_curves)
    spent = ('non-private' if run['epsilon'] is None
             else f'epsilon={run["epsilon"]:.3f}')
    _progress(index, len(plan), name, f'{spent}, ' + ', '.join(
        f'{m.key}={run[m.key]:.4g}' for m in sweep_plots.METRICS[::2]))
  return runs, curves


def write_results(runs, curves, results_dir: str, spread: str = 'std'
                  ) -> list[str]:
  """Writes the CSVs, summary.md and the PNGs; returns their paths."""
  os.makedirs(results_dir, exist_ok=True)
  paths = [os.path.join(results_dir, sweep_plots.RUNS_CSV),
           os.path.join(results_dir, sweep_plots.CURVES_CSV),
           os.path.join(results_dir, 'summary.md')]
  sweep_plots.write_csv(paths[0], runs)
  sweep_plots.write_csv(paths[1], curves)
  # Tables and plots from the CSVs as written, as a notebook would read them.
  runs, curves = sweep_plots.load_results(results_dir)
  with open(paths[2], 'w') as f:
    f.write(sweep_plots.summary_table(runs, spread))
  return paths + sweep_plots.save_figures(runs, curves, results_dir, spread)
