"""Training curves of one or more workdirs, as PNG (see ``dplh-plot``).

Reads each workdir's ``metrics.jsonl`` (train lines: ``train_loss_<task>``,
``epsilon``; eval lines: the held-out metrics of ``metric_registry.METRICS``)
and, for its legend label, ``privacy_report.json`` (a finished run) or
``config.json`` (an unfinished run). Draws four figures, one line per workdir:

* ``train_loss.png``: each task's train loss against the step (one panel per
  task, the weighted total included);
* ``epsilon.png``: epsilon spent against the step, the target as a dotted
  line;
* ``eval_vs_step.png``: each held-out metric against the step;
* ``eval_vs_epsilon.png``: each held-out metric against the epsilon spent
  when it was evaluated (non-private runs: a dashed line at their last
  value).

The train lines are monitoring metrics computed from private data without
noise (not covered by the guarantee; docs/DESIGN.md): so are these curves.
Figures are ``matplotlib.figure.Figure`` objects (no pyplot, no GUI backend),
so a notebook displays the same objects inline.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib import figure as mpl_figure
import numpy as np

from dplh_jax.hyperface import metric_registry
from dplh_jax.hyperface import sweep_plots

LOSS_PREFIX = 'train_loss_'
FIGURE_NAMES = ('train_loss', 'epsilon', 'eval_vs_step', 'eval_vs_epsilon')


@dataclasses.dataclass(frozen=True)
class Run:
  """What one workdir logged: lines by step (a replayed step: the last)."""
  name: str  # the workdir's basename, or parent/basename where they clash
  workdir: str
  train: list[dict[str, Any]]
  evals: list[dict[str, Any]]
  privacy: dict[str, Any] | None  # privacy_report.json; None: unfinished
  config: dict[str, Any]  # config.json's "config"; {} if there is none

  @property
  def dp(self) -> bool:
    if self.privacy is not None:
      return bool(self.privacy['dp'])
    return bool(self.config.get('dp', any(
        row.get('epsilon') is not None for row in self.train)))

  @property
  def target_epsilon(self) -> float | None:
    source = self.privacy if self.privacy is not None else self.config
    return source.get('target_epsilon') if self.dp else None

  @property
  def label(self) -> str:
    if not self.dp:
      return f'{self.name} (non-private)'
    if self.privacy is None:
      return f'{self.name} (unfinished)'
    return f'{self.name} (epsilon {self.privacy["epsilon"]:.3g})'


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_run(workdir: str, name: str | None = None) -> Run:
  """The run logged in ``workdir``; ValueError if it logged nothing."""
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isdir(workdir):
    what = 'is not a folder' if os.path.exists(workdir) else 'does not exist'
    raise ValueError(f'workdir {workdir} {what}; pass the --workdir of a '
                     'dplh-train run.')
  if not os.path.isfile(metrics_path):
    runs = sorted(d for d in os.listdir(workdir) if os.path.isfile(
        os.path.join(workdir, d, 'metrics.jsonl')))
    hint = (f' (it holds runs: pass {os.path.join(workdir, "*")})' if runs
            else '; pass the --workdir of a dplh-train run that has logged '
            'a step')
    raise ValueError(f'workdir {workdir} has no metrics.jsonl{hint}.')
  lines = {'train': {}, 'eval': {}}
  with open(metrics_path) as f:
    text = f.read().splitlines()
  for number, line in enumerate(text):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if number == len(text) - 1:  # The last line of a killed run.
        continue
      raise ValueError(f'{metrics_path} line {number + 1} is not JSON; '
                       'remove that line (or the file).') from None
    if row.get('split') in lines:
      lines[row['split']][row['step']] = row
  config = _read_json(os.path.join(workdir, 'config.json')) or {}
  return Run(name=name or os.path.basename(os.path.abspath(workdir)),
             workdir=workdir,
             train=[lines['train'][s] for s in sorted(lines['train'])],
             evals=[lines['eval'][s] for s in sorted(lines['eval'])],
             privacy=_read_json(os.path.join(workdir, 'privacy_report.json')),
             config=config.get('config', {}))


def load_runs(workdirs: Sequence[str]) -> list[Run]:
  """Every workdir's run, named by basename (parent/basename on a clash)."""
  if not workdirs:
    raise ValueError('no workdir given: pass one or more dplh-train '
                     '--workdir folders.')
  paths = [os.path.abspath(w) for w in workdirs]
  bases = [os.path.basename(p) for p in paths]
  names = [os.path.join(os.path.basename(os.path.dirname(p)), b)
           if bases.count(b) > 1 else b for p, b in zip(paths, bases)]
  return [load_run(w, n) for w, n in zip(workdirs, names)]


def _number(value: Any) -> float:
  """A logged value as a float; NaN for None or text (a gap in the line)."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  return float('nan')


def _series(rows: Sequence[dict[str, Any]], key: str
            ) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of ``key``, the steps where it is finite."""
  pairs = [(row['step'], _number(row.get(key))) for row in rows]
  pairs = np.array([p for p in pairs if np.isfinite(p[1])],
                   dtype=float).reshape(-1, 2)
  return pairs[:, 0], pairs[:, 1]


def _colors(runs: Sequence[Run]) -> dict[str, Any]:
  cmap = matplotlib.colormaps['tab10']
  return {run.name: cmap(i % 10) for i, run in enumerate(runs)}


def _legend(fig: mpl_figure.Figure, axes) -> None:
  """One legend for the figure, under the panels (not on top of a curve)."""
  handles, labels = {}, []
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      if label not in handles:
        handles[label] = handle
        labels.append(label)
  if labels:
    fig.legend([handles[l] for l in labels], labels, loc='outside lower center',
               ncols=min(len(labels), 3), fontsize=8)


def plot_train_losses(runs: Sequence[Run]) -> mpl_figure.Figure:
  """One panel per task's train loss (the total first), one line per run."""
  keys = {k for run in runs for row in run.train for k in row
          if k.startswith(LOSS_PREFIX)}
  total = LOSS_PREFIX + 'total'
  keys = ([total] if total in keys else []) + sorted(keys - {total})
  colors = _colors(runs)
  fig, axes = sweep_plots.panel_grid(max(len(keys), 1))
  for ax, key in zip(axes, keys):
    for run in runs:
      steps, values = _series(run.train, key)
      ax.plot(steps, values, color=colors[run.name], linewidth=1,
              label=run.label)
    ax.set(xlabel='step', title=key.removeprefix(LOSS_PREFIX))
    ax.grid(True, alpha=0.3)
  _legend(fig, axes)
  fig.suptitle('Train loss per task (sampled batches; not covered by the DP '
               'guarantee)', fontsize=10)
  return fig


def plot_epsilon(runs: Sequence[Run]) -> mpl_figure.Figure:
  """Epsilon spent against the step; each run's target as a dotted line."""
  colors = _colors(runs)
  fig, (ax,) = sweep_plots.panel_grid(1, columns=1)
  for run in runs:
    if not run.dp:
      continue
    steps, epsilons = _series(run.train, 'epsilon')
    ax.plot(steps, epsilons, color=colors[run.name], marker='.',
            label=run.label)
    if run.target_epsilon is not None:
      ax.axhline(run.target_epsilon, color=colors[run.name], linestyle=':')
  if not any(run.dp for run in runs):
    ax.text(0.5, 0.5, 'non-private runs spend no budget', ha='center',
            transform=ax.transAxes)
  ax.set(xlabel='step', ylabel='epsilon spent',
         title='Privacy spent (dotted: target)')
  ax.grid(True, alpha=0.3)
  _legend(fig, [ax])
  return fig


def _epsilon_at(run: Run, steps: np.ndarray) -> np.ndarray:
  """Epsilon spent at ``steps``: exact at logged steps (the last step always
  is), linear between two logged ones (epsilon only grows, so in between)."""
  logged, epsilons = _series(run.train, 'epsilon')
  if not logged.size:
    return np.full(steps.shape, np.nan)
  out = np.interp(steps, logged, epsilons)
  out[(steps < logged[0]) | (steps > logged[-1])] = np.nan
  return out


def plot_eval(runs: Sequence[Run], against: str,
              metrics: Sequence[metric_registry.Metric] = (
                  metric_registry.METRICS)) -> mpl_figure.Figure:
  """Each held-out metric against ``against`` ('step' or 'epsilon')."""
  if against not in ('step', 'epsilon'):
    raise ValueError(f"against={against!r}: use 'step' or 'epsilon'.")
  colors = _colors(runs)
  fig, axes = sweep_plots.panel_grid(len(metrics))
  for ax, metric in zip(axes, metrics):
    for run in runs:
      steps, values = _series(run.evals, metric.key)
      if against == 'epsilon' and not run.dp:
        if values.size:
          ax.axhline(values[-1], color=colors[run.name], linestyle='--',
                     label=run.label)
        continue
      x = steps if against == 'step' else _epsilon_at(run, steps)
      ax.plot(x, values, color=colors[run.name], marker='.', label=run.label)
    better = 'higher' if metric.kind == 'accuracy' else 'lower'
    ax.set(xlabel='step' if against == 'step' else 'epsilon spent',
           title=f'{metric.label} ({better} is better)')
    ax.title.set_fontsize(9)
    ax.grid(True, alpha=0.3)
  _legend(fig, axes)
  fig.suptitle('Held-out metrics against the step' if against == 'step' else
               'Held-out metrics against epsilon spent (dashed: a non-private '
               "run's last evaluation)", fontsize=10)
  return fig


def figures(runs: Sequence[Run]) -> dict[str, mpl_figure.Figure]:
  """The four figures of ``runs``, by ``FIGURE_NAMES``."""
  return {'train_loss': plot_train_losses(runs),
          'epsilon': plot_epsilon(runs),
          'eval_vs_step': plot_eval(runs, 'step'),
          'eval_vs_epsilon': plot_eval(runs, 'epsilon')}


def save_plots(workdirs: Sequence[str], out_dir: str, dpi: int = 100
               ) -> list[str]:
  """Draws the workdirs' curves into ``out_dir``; returns the PNG paths."""
  if dpi <= 0:
    raise ValueError(f'--dpi={dpi} must be > 0.')
  runs = load_runs(workdirs)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'--out {out_dir} is a file; pass a folder for the '
                     'PNGs.')
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, fig in figures(runs).items():
    paths.append(os.path.join(out_dir, f'{name}.png'))
    fig.savefig(paths[-1], dpi=dpi)
  return paths
