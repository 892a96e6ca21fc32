"""dplh-plot: curves of hand-written workdirs (no training), and its errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dplh_jax.hyperface import metric_registry
from dplh_jax.hyperface import run_plots
from dplh_jax.hyperface.cli import flags_util

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
TASKS = ('detection', 'pose')


def _write_workdir(path, dp, finished=True, extra_lines=()):
  """A workdir as dplh-train leaves it: train lines at steps 2 and 4
  (epsilon 1 and 2 if DP), evals at steps 3 and 4 (4: the final one)."""
  os.makedirs(path)
  lines = []
  for step, epsilon in ((2, 1.0), (4, 2.0)):
    lines.append({'step': step, 'split': 'train',
                  'epsilon': epsilon if dp else None,
                  'steps_per_second': 3.0, 'train_loss_total': 2.0 / step,
                  **{f'train_loss_{t}': 1.0 / step for t in TASKS}})
  for step in (3, 4):
    lines.append({'step': step, 'split': 'eval', 'detection_accuracy':
                  0.5 + step / 10, 'gender_accuracy': float('nan'),
                  **{m.key: 0.25 for m in metric_registry.METRICS[1:-1]}})
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in lines)
    f.writelines(extra_lines)
  config = {'dp': dp, 'target_epsilon': 2.5 if dp else None}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'config': config, 'run': {}}, f)
  if finished:
    with open(os.path.join(path, 'privacy_report.json'), 'w') as f:
      json.dump({'dp': dp, 'epsilon': 2.0 if dp else None,
                 'target_epsilon': config['target_epsilon']}, f)
  return str(path)


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory):
  base = tmp_path_factory.mktemp('runs')
  return [_write_workdir(base / 'eps2', dp=True),
          _write_workdir(base / 'nonprivate', dp=False, finished=False)]


def test_one_line_per_workdir_in_every_panel(workdirs):
  runs = run_plots.load_runs(workdirs)
  assert [r.label for r in runs] == ['eps2 (epsilon 2)',
                                     'nonprivate (non-private)']
  figures = run_plots.figures(runs)
  losses = [ax for ax in figures['train_loss'].axes if ax.get_visible()]
  assert [ax.get_title() for ax in losses] == ['total', 'detection', 'pose']
  for ax in losses:
    assert [list(line.get_ydata()) for line in ax.get_lines()] == (
        [[1.0, 0.5]] * 2 if ax.get_title() == 'total' else [[0.5, 0.25]] * 2)
  # Epsilon: the DP run's curve and its target; nothing for non-private.
  (epsilon,) = figures['epsilon'].axes[:1]
  curve, target = epsilon.get_lines()
  assert list(curve.get_ydata()) == [1.0, 2.0]
  assert list(target.get_ydata()) == [2.5, 2.5]
  panels = [ax for ax in figures['eval_vs_epsilon'].axes if ax.get_visible()]
  assert len(panels) == len(metric_registry.METRICS)
  dp_line, nonprivate_line = panels[0].get_lines()
  # Eval at step 3, between the logged steps 2 and 4: epsilon interpolated;
  # at step 4 the logged value.
  np.testing.assert_allclose(dp_line.get_xdata(), [1.5, 2.0])
  np.testing.assert_allclose(dp_line.get_ydata(), [0.8, 0.9])
  assert list(nonprivate_line.get_ydata()) == [0.9, 0.9]  # the last eval
  by_step = [ax for ax in figures['eval_vs_step'].axes if ax.get_visible()]
  assert [list(l.get_xdata()) for l in by_step[0].get_lines()] == [[3, 4]] * 2
  assert all(not l.get_xdata().size for l in by_step[-1].get_lines())  # NaN


def test_a_replayed_step_counts_once_and_a_cut_off_line_is_skipped(tmp_path):
  replayed = json.dumps({'step': 4, 'split': 'eval',
                         'detection_accuracy': 0.1}) + '\n'
  workdir = _write_workdir(tmp_path / 'run', dp=True,
                           extra_lines=[replayed, '{"step": 5, "spl'])
  run = run_plots.load_run(workdir)
  assert [row['step'] for row in run.evals] == [3, 4]
  assert run.evals[-1]['detection_accuracy'] == 0.1


def test_runs_with_the_same_basename_are_told_apart(tmp_path):
  first = _write_workdir(tmp_path / 'a' / 'default', dp=True)
  second = _write_workdir(tmp_path / 'b' / 'default', dp=True, finished=False)
  assert [r.label for r in run_plots.load_runs([first, second])] == [
      os.path.join('a', 'default') + ' (epsilon 2)',
      os.path.join('b', 'default') + ' (unfinished)']


def test_a_workdir_without_metrics_is_named_with_the_fix(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=re.escape(
      f'workdir {missing} does not exist; pass the --workdir of a dplh-train '
      'run.')):
    run_plots.load_runs([missing])
  with pytest.raises(ValueError, match='has no metrics.jsonl; pass the '
                     '--workdir of a dplh-train run that has logged a step'):
    run_plots.load_runs([str(tmp_path)])
  _write_workdir(tmp_path / 'sweep' / 'eps1_seed0', dp=True)
  sweep = str(tmp_path / 'sweep')
  with pytest.raises(ValueError, match=re.escape(
      f'(it holds runs: pass {os.path.join(sweep, "*")}).')):
    run_plots.load_runs([sweep])


def test_the_command_writes_one_png_per_figure_and_prints_the_paths(
    workdirs, tmp_path):
  out_dir = tmp_path / 'plots'  # created by the command
  out = subprocess.run(
      [sys.executable, '-m', 'dplh_jax.hyperface.cli.plot', *workdirs,
       '--out', str(out_dir), '--dpi=40'], capture_output=True, text=True,
      env=os.environ | {'JAX_PLATFORMS': 'cpu'}, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  paths = out.stdout.split()
  assert paths == [str(out_dir / f'{name}.png')
                   for name in run_plots.FIGURE_NAMES]
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == PNG_MAGIC, path


def test_the_command_fails_in_one_line(tmp_path):
  # What dplh-plot's main runs, in process (a subprocess costs seconds of
  # imports): the error ends the process with one line.
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(SystemExit) as exit_info:
    flags_util.one_line_errors(
        lambda: run_plots.save_plots([missing], str(tmp_path)))
  assert str(exit_info.value) == (f'error: workdir {missing} does not exist; '
                                  'pass the --workdir of a dplh-train run.')
  with pytest.raises(SystemExit, match='--dpi=0 must be > 0'):
    flags_util.one_line_errors(
        lambda: run_plots.save_plots([missing], str(tmp_path), dpi=0))
