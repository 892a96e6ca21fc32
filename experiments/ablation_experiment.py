"""Issue 22's ablation: each utility lever alone and a combination, DP at
epsilon 5 (delta 1e-5) and non-private, per task against the non-private run
of the same recipe.

  JAX_PLATFORMS=cpu .venv/bin/python experiments/ablation_experiment.py \
      --setting=demo --seeds=0,1,2 --workdir_root=/tmp/ablation_runs

``--setting=demo`` is ``make demo``'s recipe (configs/default.py: five
epochs at expected batch 256, 391 steps, about 6 minutes a run on 2 CPU
cores); ``--setting=short`` is the sweep's (one epoch at expected batch 64,
312 steps of a quarter of the work), for screening. In both, sigma is
calibrated so every step the run takes (detection pre-training included)
spends at most epsilon 5. Each lever is one config field (``LEVERS``);
``--combined=a,b`` adds a variant with the overrides of levers a and b.
The 'public_init' lever starts from the same architecture trained without DP
on ``synthetic_faces/demo_public`` (configs/public_pretrain.py, the same
setting), trained once into the workdir root.

One JSON per run in ``--out_dir/<setting>/`` (a run whose JSON exists is not
redone) and ``summary.md`` there: per task the median over seeds of the DP
runs, and in brackets its ratio to the median of the non-private runs of the
same variant; the goals of the issue are marked.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import default
from dplh_jax.hyperface.configs import public_pretrain

_OUT_DIR = flags.DEFINE_string('out_dir', 'experiments/results/ablation',
                               'Where the JSONs and summary.md go (one '
                               'folder per setting).')
_WORKDIR_ROOT = flags.DEFINE_string('workdir_root', '/tmp/ablation_runs',
                                    'One workdir per run under this folder.')
_SETTING = flags.DEFINE_enum('setting', 'short', ['short', 'demo'],
                             'The recipe every variant is run in.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (init, proposals, sampler '
                           'and noise; a set noise seed is not secret).')
_VARIANTS = flags.DEFINE_list('variants', None, "Levers to run, 'combined' "
                              'among them (default: all, and the '
                              'combination if given).')
_PRIVACY = flags.DEFINE_list('privacy', ['dp', 'nonprivate'],
                             "'dp' (epsilon 5) and/or 'nonprivate'.")
_COMBINED = flags.DEFINE_list('combined', [], 'Levers whose overrides '
                              "together make the 'combined' variant.")
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False,
                                  'Only rewrite summary.md from the JSONs.')

# The key of a lever's multipliers of the setting's values (not a field).
SCALES = 'scale_fields_by'
# The key of a lever's overrides of the public model's recipe (not a field).
PUBLIC_RECIPE = 'public_recipe'
# Each lever alone: config overrides of the default recipe.
LEVERS = {
    'baseline': {},
    'augmentation_multiplicity_2': {'augmentation_multiplicity': 2},
    'ema_0.99': {'ema_decay': 0.99},
    'per_task_clip': {'clip_groups': 'per_task'},
    'learned_weights': {'task_weighting': 'uncertainty'},
    'bounded_learned_weights': {'task_weighting': 'uncertainty',
                                'task_weight_bound': 2.0},
    'warmup_cosine': {'learning_rate_schedule': 'cosine', 'warmup_steps': 20},
    'group_norm_4': {'group_norm_groups': 4},
    'detection_pretrain_1': {'detection_pretrain_epochs': 1.0},
    'public_init': {'init_params_from': 'PUBLIC'},
    # The same with a fifth of the public training (one epoch, not five):
    # what fits the demo's budget with the DP run after it.
    'public_init_1_epoch': {'init_params_from': 'PUBLIC',
                            PUBLIC_RECIPE: {'num_epochs': 1.0}},
    # The full public model, then fewer DP epochs at the same epsilon (less
    # noise per step): public and DP runs together fit the demo's budget.
    'public_init_dp_2_epochs': {'init_params_from': 'PUBLIC',
                                SCALES: {'num_epochs': 0.4}},
    'public_init_dp_3_epochs': {'init_params_from': 'PUBLIC',
                                SCALES: {'num_epochs': 0.6}},
    # DPLH's learned weights on that recipe; the public model learns its own
    # (task_weighting shapes the params; a bound is refused with a loaded
    # model, whose weights it is not centred on).
    'public_init_dp_2_epochs_learned_weights': {
        'init_params_from': 'PUBLIC', SCALES: {'num_epochs': 0.4},
        'task_weighting': 'uncertainty'},
    # Scale at fixed epsilon and epochs: 4x the setting's expected batch
    # (a quarter of the steps, sigma calibrated anew), at its learning rate
    # and at twice it.
    'batch_x4': {SCALES: {'expected_batch_size': 4.0}},
    'batch_x4_lr_x2': {SCALES: {'expected_batch_size': 4.0,
                                'learning_rate': 2.0}},
}

SETTINGS = {'demo': {}, 'short': {'num_epochs': 1.0,
                                  'expected_batch_size': 64}}
# Fields that change the params' shapes: a public source must share them.
_ARCHITECTURE = ('task_weighting', 'group_norm_groups', 'task_features',
                 'cross_task_gates')
# (eval key, title, format, goal as (kind, ratio to non-private) or None).
METRICS = (('detection_accuracy', 'detection accuracy', '.3f', ('>=', 0.97)),
           ('landmark_nme', 'landmark NME', '.3f', ('<=', 1.3)),
           ('visibility_accuracy', 'visibility accuracy', '.3f', None),
           ('pose_mae_deg', 'pose MAE (deg)', '.1f', ('<=', 1.3)),
           ('gender_accuracy', 'gender accuracy', '.3f', ('>=', 0.90)))


def variants() -> dict[str, dict]:
  names = _VARIANTS.value or [*LEVERS, 'combined']
  chosen = {name: LEVERS[name] for name in names if name != 'combined'}
  if _COMBINED.value and 'combined' in names:
    combined = {}
    for name in _COMBINED.value:
      combined.update(LEVERS[name])
    chosen['combined'] = combined
  return chosen


def _with_setting(config, overrides: dict, seed: int):
  config.update(SETTINGS[_SETTING.value])
  overrides = dict(overrides)
  for field, factor in overrides.pop(SCALES, {}).items():
    config[field] = type(config[field])(config[field] * factor)
  config.update(overrides)
  config.seed = config.noise_seed = config.sampler_seed = seed
  config.log_every, config.checkpoint_every = 50, 1000
  return config


def public_source(overrides: dict, seed: int) -> str:
  """The workdir of the public model with the variant's architecture."""
  shape = {k: overrides[k] for k in _ARCHITECTURE if k in overrides}
  shape.update(overrides.get(PUBLIC_RECIPE, {}))
  name = 'public_' + ('_'.join(f'{k}-{v}' for k, v in sorted(shape.items()))
                      or 'default') + f'_seed{seed}'
  workdir = os.path.join(_WORKDIR_ROOT.value, _SETTING.value, name)
  if not os.path.exists(os.path.join(workdir, 'privacy_report.json')):
    start = time.time()
    train.train_and_evaluate(
        _with_setting(public_pretrain.get_config(), shape, seed), workdir)
    print(f'{name}: {time.time() - start:.0f} s', flush=True)
  return workdir


def run_config(overrides: dict, privacy: str, seed: int):
  overrides = dict(overrides)
  if overrides.get('init_params_from') == 'PUBLIC':
    overrides['init_params_from'] = public_source(overrides, seed)
  overrides.pop(PUBLIC_RECIPE, None)
  config = _with_setting(default.get_config(), overrides, seed)
  if privacy == 'nonprivate':
    config.dp, config.target_epsilon = False, None
  return config


def run_one(variant: str, overrides: dict, privacy: str, seed: int) -> dict:
  name = f'{variant}_{privacy}_seed{seed}'
  path = os.path.join(_OUT_DIR.value, _SETTING.value, name + '.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = run_config(overrides, privacy, seed)
  start = time.time()
  result = train.train_and_evaluate(
      config, os.path.join(_WORKDIR_ROOT.value, _SETTING.value, name))
  record = {'variant': variant, 'privacy': privacy, 'seed': seed,
            'setting': _SETTING.value, 'overrides': overrides,
            'config': config.to_dict(), 'seconds': time.time() - start,
            'eval': {k: float(v) for k, v in result['eval'].items()},
            'privacy_report': result['privacy']}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=1, default=float)
    f.write('\n')
  print(f'{name}: {record["seconds"]:.0f} s, ' + ', '.join(
      f'{key} {record["eval"][key]:{fmt}}' for key, _, fmt, _ in METRICS),
        flush=True)
  return record


def _median(records, key):
  values = [r['eval'][key] for r in records]
  return float(np.median(values)) if values else None


def summary(records: list[dict]) -> str:
  groups = {}
  for r in records:
    groups.setdefault((r['variant'], r['privacy']), []).append(r)
  order = list(LEVERS) + ['combined']
  names = sorted({r['variant'] for r in records}, key=order.index)
  seeds = sorted({r['seed'] for r in records})
  header = ('| variant | ' + ' | '.join(t for _, t, _, _ in METRICS)
            + ' | seeds | s per run |\n|---|' + '---|' * (len(METRICS) + 2))
  dp_rows, nonprivate_rows = [], []
  for name in names:
    dp, nonprivate = groups.get((name, 'dp'), []), groups.get(
        (name, 'nonprivate'), [])
    cells = []
    for key, _, fmt, goal in METRICS:
      private, reference = _median(dp, key), _median(nonprivate, key)
      cell = '-' if private is None else format(private, fmt)
      if private is not None and reference:
        ratio = private / reference
        met = goal and (ratio >= goal[1] if goal[0] == '>=' else
                        ratio <= goal[1])
        cell += f' ({"**" if met else ""}{ratio:.2f}{"**" if met else ""})'
      cells.append(cell)
    for rows, runs, row_cells in (
        (dp_rows, dp, cells),
        (nonprivate_rows, nonprivate,
         [format(_median(nonprivate, key), fmt) if nonprivate else '-'
          for key, _, fmt, _ in METRICS])):
      if runs:
        seconds = np.median([r['seconds'] for r in runs])
        rows.append(f'| {name} | ' + ' | '.join(row_cells)
                    + f' | {len(runs)} | {seconds:.0f} |')
  combined = next((r['overrides'] for r in records
                   if r['variant'] == 'combined'), None)
  lines = [f'Setting {_SETTING.value!r}, seeds {seeds}: medians over seeds.',
           '', 'DP at epsilon 5, delta 1e-5; in brackets the ratio to the '
           'non-private median of the same variant (bold: the issue\'s goal '
           'met).', '', header, *dp_rows, '',
           'Non-private (no clipping, no noise), the same recipes:', '',
           header, *nonprivate_rows, '',
           'Goals (ratio to non-private): detection >= 0.97, gender >= 0.90, '
           'landmark NME and pose MAE <= 1.3.']
  if combined is not None:
    lines += ['', f'combined: {json.dumps(combined, sort_keys=True)}']
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  folder = os.path.join(_OUT_DIR.value, _SETTING.value)
  if not _SUMMARY_ONLY.value:
    todo = [(v, o, p, s) for s in (int(x) for x in _SEEDS.value)
            for v, o in variants().items() for p in _PRIVACY.value]
    for i, (variant, overrides, privacy, seed) in enumerate(todo):
      print(f'[{i + 1}/{len(todo)}] {variant} {privacy} seed {seed}',
            flush=True)
      run_one(variant, overrides, privacy, seed)
  records = []
  for name in sorted(os.listdir(folder)):
    if name.endswith('.json'):
      with open(os.path.join(folder, name)) as f:
        records.append(json.load(f))
  with open(os.path.join(folder, 'summary.md'), 'w') as f:
    f.write(summary(records))
  print(summary(records))


if __name__ == '__main__':
  app.run(main)
