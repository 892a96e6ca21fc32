"""Tables and figures of a privacy-utility sweep (see ``dplh-sweep``).

Reads the sweep's ``runs.csv`` (one row per run: budget, seed, privacy spent,
held-out metrics) and ``curves.csv`` (held-out metrics during training), and
draws them. Figures are built with ``matplotlib.figure.Figure`` directly, not
pyplot, so no GUI backend is ever selected (PNG output goes through Agg) and
a notebook can display the same objects inline.
"""

from __future__ import annotations

import collections
import csv
import math
import os
from typing import Any, Iterable, Sequence

import matplotlib
from matplotlib import figure as mpl_figure
import numpy as np

from dplh_jax.hyperface import metric_registry

NONPRIVATE = 'nonprivate'  # The budget column's value for the baseline.
RUNS_CSV = 'runs.csv'
CURVES_CSV = 'curves.csv'


Metric = metric_registry.Metric
METRICS = metric_registry.METRICS


def budget_label(budget: str) -> str:
  return 'non-private' if budget == NONPRIVATE else f'epsilon {budget}'


def budget_order(budgets: Iterable[str]) -> list[str]:
  """Non-private first, then budgets from the largest epsilon down."""
  budgets = set(budgets)
  dp = sorted((b for b in budgets if b != NONPRIVATE), key=float, reverse=True)
  return ([NONPRIVATE] if NONPRIVATE in budgets else []) + dp


def _parse(value: str) -> Any:
  """CSV cell -> float where it is a number (nan included), else the text."""
  if value == '':
    return None
  try:
    return float(value)
  except ValueError:
    return value


def read_csv(path: str) -> list[dict[str, Any]]:
  """Rows of a sweep CSV with numbers parsed; ``budget`` stays text."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No sweep results at {path}; run '
                            'dplh-sweep first.')
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  return [{k: v if k in ('run', 'budget') else _parse(v)
           for k, v in row.items()} for row in rows]


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
  """Rows to CSV; the header is the union of the rows' keys, in order seen."""
  header = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, header)
    writer.writeheader()
    writer.writerows(rows)


def load_results(results_dir: str) -> tuple[list[dict], list[dict]]:
  """``(runs, curves)`` rows from a sweep's results directory."""
  return (read_csv(os.path.join(results_dir, RUNS_CSV)),
          read_csv(os.path.join(results_dir, CURVES_CSV)))


def by_budget(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict]]:
  groups = collections.defaultdict(list)
  for row in rows:
    groups[row['budget']].append(row)
  return {b: groups[b] for b in budget_order(groups)}


def values(rows: Sequence[dict[str, Any]], key: str) -> np.ndarray:
  """The finite values of ``key`` over rows (a task without labels is NaN)."""
  out = np.array([row.get(key) for row in rows if row.get(key) is not None],
                 dtype=float)
  return out[np.isfinite(out)]


def spread(x: np.ndarray, kind: str) -> tuple[float, float]:
  """``(low, high)`` error bar around the mean: one sample std or min-max.

  One seed has no spread: both ends are the value itself.
  """
  if x.size < 2:
    return float(np.mean(x)), float(np.mean(x))
  if kind == 'minmax':
    return float(np.min(x)), float(np.max(x))
  if kind != 'std':
    raise ValueError(f"spread={kind!r}: use 'std' or 'minmax'.")
  std = float(np.std(x, ddof=1))
  return float(np.mean(x)) - std, float(np.mean(x)) + std


def _cell(x: np.ndarray, fmt: str, kind: str) -> str:
  if x.size == 0:
    return 'n/a'
  mean = fmt.format(np.mean(x))
  if x.size < 2:
    return mean
  low, high = spread(x, kind)
  if kind == 'minmax':
    return f'{mean} [{fmt.format(low)}, {fmt.format(high)}]'
  return f'{mean} ± {fmt.format(high - np.mean(x))}'


def summary_table(runs: Sequence[dict[str, Any]], spread_kind: str = 'std'
                  ) -> str:
  """Markdown table: metrics (rows) by budget (columns), mean and spread."""
  groups = by_budget(runs)
  seeds = sorted({int(r['seed']) for r in runs})
  what = ('± one sample standard deviation' if spread_kind == 'std'
          else '[min, max]')
  head = (f'Mean over seeds {", ".join(map(str, seeds))} {what}'
          if len(seeds) > 1 else f'One seed ({seeds[0]}), no spread')
  lines = [f'{head}; held-out test split.', '',
           '| metric | ' + ' | '.join(budget_label(b) for b in groups) + ' |',
           '|---' * (len(groups) + 1) + '|']
  rows = [(m.label, m.key, m.fmt) for m in METRICS] + [
      ('epsilon spent', 'epsilon', '{:.3f}'),
      ('noise multiplier', 'noise_multiplier', '{:.3f}'),
      ('steps', 'steps', '{:.0f}')]
  for label, key, fmt in rows:
    # A non-private run spends no budget it could report: '-', never 0.
    cells = ['-' if b == NONPRIVATE and key in ('epsilon', 'noise_multiplier')
             else _cell(values(g, key), fmt, spread_kind)
             for b, g in groups.items()]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def panel_grid(num_panels: int, columns: int = 3):
  """A figure of ``num_panels`` axes, ``columns`` wide; spare axes hidden."""
  columns = min(columns, num_panels)
  rows = math.ceil(num_panels / columns)
  fig = mpl_figure.Figure(figsize=(4.2 * columns, 3.3 * rows),
                          layout='constrained')
  axes = fig.subplots(rows, columns, squeeze=False).ravel()
  for ax in axes[num_panels:]:
    ax.set_visible(False)
  return fig, axes


def _colors(budgets: Sequence[str]) -> dict[str, Any]:
  """Black for non-private; a sequential map from large to small epsilon."""
  dp = [b for b in budgets if b != NONPRIVATE]
  cmap = matplotlib.colormaps['viridis']
  colors = {b: cmap(i / max(len(dp) - 1, 1) * 0.85) for i, b in enumerate(dp)}
  return colors | {NONPRIVATE: 'black'}


def plot_metrics_vs_epsilon(runs: Sequence[dict[str, Any]],
                            spread_kind: str = 'std',
                            metrics: Sequence[Metric] = METRICS
                            ) -> mpl_figure.Figure:
  """Each metric against the epsilon spent (log x), non-private as a line.

  Points are the mean over seeds at the mean epsilon spent, with the spread
  as error bars; faint dots are the single seeds.
  """
  groups = by_budget(runs)
  dp = {b: g for b, g in groups.items() if b != NONPRIVATE}
  fig, axes = panel_grid(len(metrics))
  for ax, metric in zip(axes, metrics):
    xs, means, lows, highs = [], [], [], []
    for group in dp.values():
      pairs = np.array([(r['epsilon'], r[metric.key]) for r in group
                        if is_finite(r.get('epsilon'))
                        and is_finite(r.get(metric.key))]).reshape(-1, 2)
      if not pairs.size:
        continue
      eps, y = pairs[:, 0], pairs[:, 1]
      xs.append(float(np.mean(eps)))
      means.append(float(np.mean(y)))
      low, high = spread(y, spread_kind)
      lows.append(means[-1] - low)
      highs.append(high - means[-1])
      ax.scatter(eps, y, s=10, color='tab:blue', alpha=0.35)
    if xs:
      ax.errorbar(xs, means, yerr=[lows, highs], marker='o', capsize=3,
                  color='tab:blue', label='DP')
    if NONPRIVATE in groups:
      y = values(groups[NONPRIVATE], metric.key)
      if y.size:
        ax.axhline(np.mean(y), color='black', linestyle='--',
                   label='non-private')
        if y.size > 1:
          ax.axhspan(*spread(y, spread_kind), color='black', alpha=0.08)
    ax.set_xscale('log')
    if xs:  # Ticks at the budgets, not at powers of ten.
      ax.set_xticks(xs, [f'{x:.2g}' for x in xs])
      ax.minorticks_off()
    ax.set_xlabel('epsilon spent (delta 1e-5)' if _delta(runs) == 1e-5
                  else 'epsilon spent')
    better = 'higher' if metric.kind == 'accuracy' else 'lower'
    ax.set_title(f'{metric.label} ({better} is better)', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle('Held-out utility against privacy budget')
  return fig


def is_finite(value) -> bool:
  """True for a finite float (a metric's NaN, a missing None: False)."""
  return isinstance(value, float) and math.isfinite(value)


def _delta(runs) -> float | None:
  deltas = {r.get('delta') for r in runs if r.get('delta') is not None}
  return deltas.pop() if len(deltas) == 1 else None


def plot_curves(curves: Sequence[dict[str, Any]], kind: str
                ) -> mpl_figure.Figure:
  """DPLH-style curves: ``kind`` ('accuracy' or 'error') metrics per epoch.

  One panel per task metric, one line per budget (mean over seeds of the
  held-out evaluations during training).
  """
  if kind not in ('accuracy', 'error'):
    raise ValueError(f"kind={kind!r}: use 'accuracy' or 'error'.")
  metrics = [m for m in METRICS if m.kind == kind]
  groups = by_budget(curves)
  colors = _colors(list(groups))
  fig, axes = panel_grid(len(metrics))
  for ax, metric in zip(axes, metrics):
    for budget, group in groups.items():
      by_epoch = collections.defaultdict(list)
      for row in group:
        value = row.get(metric.key)
        if is_finite(value):
          by_epoch[row['epoch']].append(value)
      if not by_epoch:
        continue
      epochs = sorted(by_epoch)
      ax.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], marker='.',
              color=colors[budget], label=budget_label(budget),
              linestyle='--' if budget == NONPRIVATE else '-')
    ax.set_xlabel('epoch')
    ax.set_title(metric.label, fontsize=9)
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f'Held-out {kind} during training, per privacy budget')
  return fig


def save_figures(runs, curves, results_dir: str, spread_kind: str = 'std'
                 ) -> list[str]:
  """Writes the sweep's PNGs; returns their paths."""
  figures = {
      'metrics_vs_epsilon.png': plot_metrics_vs_epsilon(runs, spread_kind),
      'curves_accuracy.png': plot_curves(curves, 'accuracy'),
      'curves_error.png': plot_curves(curves, 'error'),
  }
  paths = []
  for name, fig in figures.items():
    paths.append(os.path.join(results_dir, name))
    fig.savefig(paths[-1], dpi=110)
  return paths
