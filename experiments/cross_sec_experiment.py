"""Shared vs Cross-SEC (with and without de-correlation) features: per-task
utility and leakage, DP at epsilon 5 and non-private (issue 21).

  JAX_PLATFORMS=cpu .venv/bin/python experiments/cross_sec_experiment.py \
      --seeds 0,1 --workdir_root /tmp/cross_sec_runs

Every variant trains the demo model and data (``configs/default.py``) in the
sweep's shorter setting (README, "Privacy-utility sweep": one epoch,
expected batch 64; sigma 0.488 gives epsilon 5 there, and the run stops at
the last step within the target), then ``leakage.measure`` probes its
released params on the first --num_images test images. One JSON per run in
--out_dir (a run whose JSON exists is not redone) and ``summary.md``, the
tables of both, mean ± standard deviation over the seeds. ``--summary_only
--figure docs/figures/cross_sec_leakage.png`` redraws the leakage heatmaps
from the JSONs alone.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from dplh_jax.hyperface import export
from dplh_jax.hyperface import image_eval
from dplh_jax.hyperface import input_pipeline
from dplh_jax.hyperface import leakage
from dplh_jax.hyperface import losses
from dplh_jax.hyperface import model_setup
from dplh_jax.hyperface import models
from dplh_jax.hyperface import train
from dplh_jax.hyperface.configs import default

_OUT_DIR = flags.DEFINE_string('out_dir', 'experiments/results/cross_sec',
                               'Where the JSONs and summary.md go.')
_WORKDIR_ROOT = flags.DEFINE_string('workdir_root', '/tmp/cross_sec_runs',
                                    'One workdir per run under this folder.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (init, proposals, sampler '
                           'and noise; a set noise seed is not secret).')
_VARIANTS = flags.DEFINE_list('variants', None, 'Subset of the variants '
                              '(default: all).')
_NUM_EPOCHS = flags.DEFINE_float('num_epochs', 1.0, 'Epochs per run.')
_BATCH = flags.DEFINE_integer('expected_batch_size', 64, 'Expected batch.')
_NOISE = flags.DEFINE_float('noise_multiplier', 0.488, 'DP sigma (0.488: '
                            'epsilon 5 for 1 epoch at batch 64, 20,000 '
                            'images); the target epsilon 5 is enforced.')
_DECORRELATION = flags.DEFINE_float('decorrelation_weight', 1.0,
                                    'The de-correlation variant\'s weight.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1000, 'Test images probed.')
_SUMMARY_ONLY = flags.DEFINE_bool('summary_only', False, 'Only rewrite '
                                  'summary.md from the JSONs.')
_FIGURE = flags.DEFINE_string('figure', None, 'Also draw the leakage '
                               'heatmaps to this PNG (e.g. docs/figures/'
                               'cross_sec_leakage.png).')

FEATURES = {  # variant -> config overrides
    'shared': {'task_features': 'shared'},
    'cross_sec': {'task_features': 'cross_sec'},
    'cross_sec_decorrelated': {'task_features': 'cross_sec'},
}
PRIVACY = ('dp_eps5', 'nonprivate')
UTILITY = (('detection_accuracy', 'detection accuracy', '.3f'),
           ('landmark_mse', 'landmark MSE', '.4f'),
           ('visibility_accuracy', 'visibility accuracy', '.3f'),
           ('pose_mse', 'pose MSE (rad^2)', '.3f'),
           ('gender_accuracy', 'gender accuracy', '.3f'))


def run_config(variant: str, privacy: str, seed: int):
  config = default.get_config()
  config.update(FEATURES[variant])
  if variant == 'cross_sec_decorrelated':
    config.decorrelation_weight = _DECORRELATION.value
  config.num_epochs = _NUM_EPOCHS.value
  config.expected_batch_size = _BATCH.value
  config.seed = config.noise_seed = config.sampler_seed = seed
  config.log_every = 50
  config.checkpoint_every = 1000
  if privacy == 'nonprivate':
    config.dp = False
    config.target_epsilon = None
  else:
    config.target_epsilon = 5.0
    config.noise_multiplier = _NOISE.value
  return config


def held_out_decorrelation(workdir: str, num_images: int = 500):
  """Mean per-image de-correlation loss of the released params on the first
  ``num_images`` test images; None for a shared model (no descriptors)."""
  released = export.params_from_workdir(workdir)
  config = ml_collections.ConfigDict(released.config)
  if config.get('task_features', models.SHARED) != models.CROSS_SEC:
    return None
  model, _ = model_setup.build_model(config)
  source = image_eval.open_test_split(released.config)
  pipeline_config = input_pipeline.PipelineConfig(
      crop_size=config.input_size, num_proposals=config.num_proposals,
      num_positives=config.num_positives)
  outputs = jax.jit(functools.partial(models.apply_to_images, model))
  per_image = jax.jit(jax.vmap(lambda d, label: losses.decorrelation_loss(
      d, label >= 0)[0]))
  values = []
  for batch in input_pipeline.eval_batches(
      [source[i] for i in range(num_images)], pipeline_config,
      batch_size=100, seed=config.seed):
    descriptors = outputs(released.params, batch['crops'])[
        models.TASK_DESCRIPTORS]
    loss = np.asarray(per_image(descriptors, batch['detection_label']))
    values.extend(loss[~batch['is_padding_example']])
  return float(np.mean(values))


def _with_decorrelation(record: dict, path: str) -> dict:
  if 'held_out_decorrelation' not in record:
    record['held_out_decorrelation'] = held_out_decorrelation(
        os.path.join(_WORKDIR_ROOT.value, os.path.basename(path)[:-5]))
    with open(path, 'w') as f:
      json.dump(record, f, indent=1, default=float)
      f.write('\n')
  return record


def run_one(variant: str, privacy: str, seed: int) -> dict:
  name = f'{variant}_{privacy}_seed{seed}'
  path = os.path.join(_OUT_DIR.value, name + '.json')
  if os.path.exists(path):
    with open(path) as f:
      return _with_decorrelation(json.load(f), path)
  config = run_config(variant, privacy, seed)
  workdir = os.path.join(_WORKDIR_ROOT.value, name)
  start = time.time()
  result = train.train_and_evaluate(config, workdir)
  train_seconds = time.time() - start
  measured = leakage.measure(workdir, num_images=_NUM_IMAGES.value)
  record = {
      'variant': variant, 'privacy': privacy, 'seed': seed,
      'config': config.to_dict(), 'train_seconds': train_seconds,
      'leakage_seconds': time.time() - start - train_seconds,
      'eval': {k: float(v) for k, v in result['eval'].items()},
      'privacy_report': result['privacy'], 'leakage': measured,
      'held_out_decorrelation': held_out_decorrelation(workdir)}
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=1, default=float)
    f.write('\n')
  print(f'{name}: {train_seconds:.0f} s training\n{leakage.table(measured)}',
        flush=True)
  return record


def _mean_sd(values, fmt: str) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return '-'
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{np.mean(values):{fmt}} ± {np.std(values, ddof=1):{fmt}}'


def _off_diagonal(record: dict, label: str) -> float:
  """Mean advantage on ``label`` of the OTHER tasks' features (the label's
  own task is what its features are meant for)."""
  rows = record['leakage']['task_leakage']
  return float(np.mean([row[label]['advantage'] for task, row in
                        rows.items() if task != label]))


def summary(records: list[dict]) -> str:
  groups = {}
  for record in records:
    groups.setdefault((record['privacy'], record['variant']), []).append(
        record)
  keys = [(p, v) for p in PRIVACY for v in FEATURES if (p, v) in groups]
  names = [f'{v} ({"DP eps 5" if p == "dp_eps5" else "non-private"})'
           for p, v in keys]
  seeds = sorted({r['seed'] for r in records})
  lines = [f'Seeds {seeds}; mean ± sd over seeds where more than one.', '',
           '### Utility (held-out proposals)', '',
           '| metric | ' + ' | '.join(names) + ' |',
           '|---|' + '---|' * len(keys)]
  for key, title, fmt in UTILITY:
    lines.append(f'| {title} | ' + ' | '.join(
        _mean_sd([r['eval'].get(key) for r in groups[k]], fmt)
        for k in keys) + ' |')
  lines.append('| de-correlation loss (held-out) | ' + ' | '.join(
      _mean_sd([r.get('held_out_decorrelation') for r in groups[k]], '.3f')
      for k in keys) + ' |')
  lines.append('| epsilon | ' + ' | '.join(
      _mean_sd([(r['privacy_report'] or {}).get('epsilon')
                for r in groups[k]], '.2f') for k in keys) + ' |')
  lines += ['', '### Task leakage: probe advantage over the constant '
            'baseline, mean over the other tasks\' features', '',
            '(accuracy points for detection and gender, R^2 for landmarks '
            'and pose; 0 = no more than a constant)', '',
            '| label | ' + ' | '.join(names) + ' |',
            '|---|' + '---|' * len(keys)]
  for label in leakage.LABELS:
    lines.append(f'| {label} | ' + ' | '.join(
        _mean_sd([_off_diagonal(r, label) for r in groups[k]], '.3f')
        for k in keys) + ' |')
  lines += ['', '### Input leakage: R^2 of the ridge decoder of the 8x8 '
            'crop, mean over the tasks\' features (0 = the mean image)', '',
            '| | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(keys)]
  lines.append('| input R^2 | ' + ' | '.join(
      _mean_sd([float(np.mean([v['r2'] for v in
                               r['leakage']['input_leakage'].values()]))
                for r in groups[k]], '.3f') for k in keys) + ' |')
  lines += ['', '### Full leakage matrices (first seed)', '']
  for k, name in zip(keys, names):
    lines += [f'**{name}**', '', leakage.table(groups[k][0]['leakage']), '']
  return '\n'.join(lines) + '\n'


_VARIANT_TITLES = {'shared': 'shared', 'cross_sec': 'cross_sec',
                   'cross_sec_decorrelated': 'cross_sec + decorrelation'}


def _setting_name(privacy: str) -> str:
  return 'DP eps 5' if privacy == 'dp_eps5' else 'non-private'


def draw_figure(records: list[dict], path: str) -> None:
  """One PNG: per (setting, variant) the task-leakage advantage matrix, mean
  over the seeds (rows: whose features, columns: which label; the boxed
  diagonal is the task's own utility), one colour scale for all, and per
  setting a bar of the input-reconstruction R^2 of each variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  groups = {}
  for record in records:
    groups.setdefault((record['privacy'], record['variant']), []).append(
        record)
  privacies = [p for p in PRIVACY if any(k[0] == p for k in groups)]
  variants = [v for v in FEATURES if any(k[1] == v for k in groups)]
  rows = list(next(iter(groups.values()))[0]['leakage']['task_leakage'])
  labels = list(leakage.LABELS)
  means = {k: np.mean([[[r['leakage']['task_leakage'][a][b]['advantage']
                         for b in labels] for a in rows] for r in g], axis=0)
           for k, g in groups.items()}
  top = max(float(np.max(m)) for m in means.values())
  fig = plt.figure(figsize=(12, 3.3 * len(privacies) + 0.9), dpi=100)
  grid = fig.add_gridspec(len(privacies), len(variants) + 1,
                          width_ratios=[1] * len(variants) + [0.8],
                          wspace=0.3, hspace=0.45, left=0.09, right=0.98,
                          top=0.88, bottom=0.17)
  for i, privacy in enumerate(privacies):
    for j, variant in enumerate(variants):
      ax = fig.add_subplot(grid[i, j])
      if (privacy, variant) not in groups:
        ax.axis('off')
        continue
      matrix = means[(privacy, variant)]
      image = ax.imshow(matrix, cmap='viridis', vmin=0.0, vmax=top,
                        aspect='auto')
      for a in range(len(rows)):
        for b in range(len(labels)):
          ax.text(b, a, f'{matrix[a, b]:.2f}', ha='center', va='center',
                  fontsize=9, color='black' if matrix[a, b] > 0.6 * top
                  else 'white')
          if rows[a] == labels[b]:
            ax.add_patch(patches.Rectangle((b - 0.5, a - 0.5), 1, 1,
                                           fill=False, edgecolor='red',
                                           linewidth=2))
      ax.set_xticks(range(len(labels)), labels, fontsize=8)
      ax.set_yticks(range(len(rows)),
                    rows if j == 0 else [''] * len(rows), fontsize=8)
      if j == 0:
        ax.set_ylabel('features of', fontsize=9)
      if i == len(privacies) - 1:
        ax.set_xlabel('probed label', fontsize=9)
      n = len(groups[(privacy, variant)])
      ax.set_title(f'{_VARIANT_TITLES[variant]}\n{_setting_name(privacy)}'
                   f', n={n} seed{"s" if n > 1 else ""}', fontsize=9)
    ax = fig.add_subplot(grid[i, len(variants)])
    present = [v for v in variants if (privacy, v) in groups]
    r2 = [[float(np.mean([x['r2'] for x in
                          r['leakage']['input_leakage'].values()]))
           for r in groups[(privacy, v)]] for v in present]
    ax.bar(range(len(present)), [np.mean(x) for x in r2], color='gray')
    for b, x in enumerate(r2):
      if len(x) > 1:  # sd over the seeds; a single seed has none to show
        ax.errorbar(b, np.mean(x), yerr=np.std(x, ddof=1), color='black',
                    capsize=3)
    for b, x in enumerate(r2):
      ax.text(b, np.mean(x) / 2, f'{np.mean(x):.2f}', ha='center',
              va='center', fontsize=8, color='white')
    ax.set_xticks(range(len(present)),
                  [_VARIANT_TITLES[v].replace(' + decorrelation',
                                              '\n+ decorr.')
                   for v in present], fontsize=7)
    ax.set_ylim(0, 0.3)
    ax.tick_params(axis='y', labelsize=8)
    ax.set_title(f'input $R^2$ (8x8 crop)\n{_setting_name(privacy)}',
                 fontsize=9)
  colorbar_axis = fig.add_axes([0.09, 0.06, 0.62, 0.022])
  fig.colorbar(image, cax=colorbar_axis, orientation='horizontal')
  colorbar_axis.tick_params(labelsize=8)
  colorbar_axis.set_xlabel('probe advantage over the constant baseline '
                           '(accuracy gain: detection, gender; $R^2$: '
                           'landmarks, pose)', fontsize=9)
  fig.suptitle('Task leakage of the released features (red box: the '
               'task\'s own label = utility)', fontsize=11)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  variants = _VARIANTS.value or list(FEATURES)
  records = []
  if not _SUMMARY_ONLY.value:
    for seed in (int(s) for s in _SEEDS.value):
      for privacy in PRIVACY:
        for variant in variants:
          records.append(run_one(variant, privacy, seed))
  else:
    for name in sorted(os.listdir(_OUT_DIR.value)):
      if name.endswith('.json'):
        path = os.path.join(_OUT_DIR.value, name)
        with open(path) as f:
          records.append(_with_decorrelation(json.load(f), path))
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUT_DIR.value, 'summary.md'), 'w') as f:
    f.write(summary(records))
  print(summary(records))
  if _FIGURE.value:
    draw_figure(records, _FIGURE.value)


if __name__ == '__main__':
  app.run(main)
