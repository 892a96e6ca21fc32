"""The held-out metrics every table and figure shows: one registry.

Each :class:`Metric` names a key of ``metrics.EvalAccumulator.result()`` with
its label, kind and format (docs/DESIGN.md, Metric conventions). The run
summary (:func:`summary_table`), the sweep tables and the sweep plots all read
this tuple, so their labels cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Metric:
  key: str  # a key of EvalAccumulator.result(), a column of the sweep CSVs
  label: str
  kind: str  # 'accuracy' (higher is better) or 'error' (lower is better)
  fmt: str


METRICS = (
    Metric('detection_accuracy', 'detection accuracy', 'accuracy', '{:.3f}'),
    Metric('detection_ap', 'detection AP (proposals)', 'accuracy', '{:.3f}'),
    Metric('landmark_nme', 'landmark NME (box-normalized)', 'error', '{:.4f}'),
    Metric('landmark_mse', 'landmark MSE (crop units)', 'error', '{:.4f}'),
    Metric('visibility_accuracy', 'visibility accuracy', 'accuracy', '{:.3f}'),
    Metric('visibility_mse', 'visibility MSE', 'error', '{:.4f}'),
    Metric('pose_mae_deg', 'pose MAE (degrees)', 'error', '{:.2f}'),
    Metric('pose_mse', 'pose MSE (rad^2)', 'error', '{:.4f}'),
    Metric('gender_accuracy', 'gender accuracy', 'accuracy', '{:.3f}'),
)


def privacy_cell(report: dict[str, Any]) -> str:
  """The privacy a run spent, in one table cell."""
  if not report['dp']:
    return 'none (non-private)'
  spent = (f'epsilon={report["epsilon"]:.3f}, delta={report["delta"]:g} '
           f'({report["accountant"]})')
  if report['noise_multiplier'] is None:
    return f'{spent}, no steps yet'
  return (f'{spent}, sigma={report["noise_multiplier"]:.3f}, '
          f'q={report["sampling_prob"]:.4g}, steps={report["steps"]}')


def summary_table(eval_metrics: dict[str, float], report: dict[str, Any],
                  baseline: dict[str, float] | None = None) -> str:
  """A Markdown table of the held-out metrics and the privacy spent, with
  the constant predictor's metrics beside them if ``baseline`` is given.

  >>> print(summary_table({m.key: 0.5 for m in METRICS}, {'dp': False},
  ...                     {m.key: 0.25 for m in METRICS}))
  | metric | value | constant predictor |
  |---|---|---|
  | detection accuracy | 0.500 | 0.250 |
  ...
  | privacy | none (non-private) |  |
  """
  header = ['metric', 'value'] + (['constant predictor'] if baseline else [])
  rows = [[m.label, m.fmt.format(eval_metrics[m.key])]
          + ([m.fmt.format(baseline[m.key])] if baseline else [])
          for m in METRICS]
  rows.append(['privacy', privacy_cell(report)] + ([''] if baseline else []))
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)
