"""The sweep script and the privacy-utility notebook, on one tiny sweep.

One sweep (non-private and one budget, one seed, 24 images) is trained once
through the command line; the notebook then runs top to bottom over the same
directory, which also checks that finished runs are skipped. Compiling the
train step is the slow part (about 25 s of CPU per noise multiplier), hence
one sweep for all tests and a single DP budget.
"""

import json
import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

from dplh_jax.hyperface import sweep_lib
from dplh_jax.hyperface import sweep_plots
from dplh_jax.hyperface.configs import sweep_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
pytestmark = pytest.mark.slow
EPSILONS = ('1',)  # The notebook's tiny sweep: TINY_EPSILONS, TINY_SEEDS.
PNGS = ('metrics_vs_epsilon.png', 'curves_accuracy.png', 'curves_error.png')
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'privacy_utility.ipynb')


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  """``(data_dir, outdir, stdout)`` of a finished tiny sweep."""
  base = tmp_path_factory.mktemp('sweep')
  data_dir, outdir = str(base / 'tfds'), str(base / 'out')
  os.makedirs(data_dir)
  result = subprocess.run(
      [sys.executable, '-m', 'dplh_jax.hyperface.cli.sweep',
       '--config', 'sweep_tiny',  # by name: a shipped config
       f'--config.data_dir={data_dir}', f'--epsilons={",".join(EPSILONS)}',
       '--seeds=0', f'--outdir={outdir}'],
      cwd=ROOT, env=os.environ | {'JAX_PLATFORMS': 'cpu'},
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return data_dir, outdir, result.stdout


def test_csv_has_one_row_per_run_within_budget(sweep):
  _, outdir, stdout = sweep
  runs, curves = sweep_plots.load_results(outdir)
  assert [r['run'] for r in runs] == ['nonprivate_seed0', 'eps1_seed0']
  assert stdout.count('training in') == 2
  nonprivate, dp = runs
  assert nonprivate['epsilon'] is None and nonprivate['target_epsilon'] is None
  assert 0.9 < dp['epsilon'] <= dp['target_epsilon'] == 1.0
  assert dp['accountant'] == 'rdp' and dp['steps'] == 4
  assert dp['noise_multiplier'] > 1  # Calibrated, not tiny.py's 1.0.
  assert dp['noise_seed_source'] == 'config_seed (not secret)'
  for run in runs:
    assert 0 <= run['detection_accuracy'] <= 1
    assert all(m.key in run for m in sweep_plots.METRICS)
  # evals_per_epoch=4 at 4 steps per epoch: an evaluation after every step.
  for name in ('nonprivate_seed0', 'eps1_seed0'):
    rows = [c for c in curves if c['run'] == name]
    assert [c['epoch'] for c in rows] == [0.25, 0.5, 0.75, 1.0]
    final = next(r for r in runs if r['run'] == name)
    assert rows[-1]['landmark_nme'] == final['landmark_nme']


def test_summary_table_and_plots_are_written(sweep):
  _, outdir, stdout = sweep
  with open(os.path.join(outdir, 'summary.md')) as f:
    table = f.read()
  assert table in stdout
  assert '| metric | non-private | epsilon 1 |' in table
  assert '| epsilon spent | - | 1.000 |' in table
  for name in PNGS:
    with open(os.path.join(outdir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n', name


def test_notebook_runs_and_skips_finished_runs(sweep):
  data_dir, outdir, _ = sweep
  mtimes = {name: os.path.getmtime(os.path.join(outdir, name, 'metrics.jsonl'))
            for name in os.listdir(outdir) if name.endswith('_seed0')}
  with open(NOTEBOOK, 'rb') as f:
    committed = f.read()
  notebook = nbformat.reads(committed.decode(), as_version=4)
  # No DPLH_WORKDIRS: the notebook plots the tiny sweep's workdirs.
  env = {'DPLH_TINY_SWEEP': '1', 'DPLH_SWEEP_OUTDIR': outdir,
         'DPLH_DATA_DIR': data_dir, 'DPLH_WORKDIRS': '',
         'JAX_PLATFORMS': 'cpu'}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # The kernel inherits this process's environment.
  try:
    nbclient.NotebookClient(
        notebook, timeout=300, kernel_name='python3',
        resources={'metadata': {'path': os.path.dirname(NOTEBOOK)}}
    ).execute()
  finally:
    for key, value in old.items():
      if value is None:
        os.environ.pop(key)
      else:
        os.environ[key] = value
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  text = ''.join(o.get('text', '') for o in outputs)
  assert text.count('finished earlier, skipped') == 2
  assert 'training in' not in text
  assert ('Workdirs: nonprivate_seed0 (non-private), eps1_seed0 (epsilon '
          in text)
  assert ('Figures: metrics_vs_epsilon, curves_accuracy, curves_error, '
          'run_train_loss, run_epsilon, run_eval_vs_step, '
          'run_eval_vs_epsilon, accountant') in text
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 8
  with open(NOTEBOOK, 'rb') as f:  # Executed in memory, never saved.
    assert f.read() == committed
  assert mtimes == {
      name: os.path.getmtime(os.path.join(outdir, name, 'metrics.jsonl'))
      for name in mtimes}


def test_the_committed_notebook_reads_without_running_it():
  # Rendered from the committed sweep results (default settings), so that it
  # reads on a code host; each figure of the sweep and the accountant shown.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  outputs = [o for cell in notebook.cells for o in cell.get('outputs', [])]
  assert all(c.get('execution_count') for c in notebook.cells
             if c.cell_type == 'code')
  assert sum('image/png' in o.get('data', {}) for o in outputs) >= 4
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'Results from experiments/results/sweep\n' in text
  assert not any(o.get('output_type') == 'error' for o in outputs)


@pytest.mark.parametrize('texts, message', [
    (['abc'], "'abc' is not a number"),
    (['0'], 'finite and > 0'),
    (['inf'], 'finite and > 0'),
    (['5', '5.0'], 'repeats'),
])
def test_bad_epsilons_are_named(texts, message):
  with pytest.raises(ValueError, match=message):
    sweep_lib.parse_epsilons(texts)


@pytest.mark.parametrize('texts', [['x'], [], ['1', '1'], ['-1']])
def test_bad_seeds_are_named(texts):
  with pytest.raises(ValueError, match='--seeds'):
    sweep_lib.parse_seeds(texts)


def test_run_configs_and_order():
  assert sweep_lib.plan_runs([0.7, 10], [0, 1], nonprivate=True) == [
      ('nonprivate', 0), ('nonprivate', 1), ('10', 0), ('10', 1),
      ('0.7', 0), ('0.7', 1)]
  base = sweep_tiny.get_config()
  base.noise_multiplier = 3.0
  config = sweep_lib.run_config(base, '0.7', 5, eval_every=2,
                                seeded_noise=False)
  assert (config.dp, config.target_epsilon, config.noise_multiplier) == (
      True, 0.7, None)
  assert (config.seed, config.noise_seed, config.sampler_seed,
          config.eval_every) == (5, None, None, 2)
  assert base.noise_multiplier == 3.0  # The base is not modified.
  config = sweep_lib.run_config(base, 'nonprivate', 1, eval_every=0,
                                seeded_noise=True)
  assert (config.dp, config.target_epsilon, config.noise_seed,
          config.eval_every) == (False, None, 1, base.eval_every)


def test_a_workdir_started_with_another_config_is_refused(tmp_path):
  config = sweep_tiny.get_config()
  sweep_lib.check_same_config(str(tmp_path), config)
  with open(tmp_path / 'sweep_config.json') as f:
    assert json.load(f)['learning_rate'] == config.learning_rate
  sweep_lib.check_same_config(str(tmp_path), config)  # Same: fine.
  config.learning_rate = 0.5
  with pytest.raises(ValueError, match='learning_rate: 0.003 then, 0.5 now'):
    sweep_lib.check_same_config(str(tmp_path), config)


def test_summary_table_spreads_over_seeds():
  runs = [{'run': f'eps1_seed{s}', 'budget': '1', 'seed': float(s),
           'epsilon': 0.99, 'noise_multiplier': 2.0, 'steps': 10.0,
           'detection_accuracy': acc}
          for s, acc in ((0, 0.5), (1, 0.7), (2, 0.9))]
  table = sweep_plots.summary_table(runs, 'std')
  assert 'Mean over seeds 0, 1, 2 ± one sample standard deviation' in table
  assert '| detection accuracy | 0.700 ± 0.200 |' in table
  assert '| landmark MSE (crop units) | n/a |' in table
  table = sweep_plots.summary_table(runs, 'minmax')
  assert '| detection accuracy | 0.700 [0.500, 0.900] |' in table
  with pytest.raises(ValueError, match="spread='range'"):
    sweep_plots.summary_table(runs, 'range')


def test_an_interrupted_run_resumes_without_counting_twice(sweep):
  # Runs last: it rewrites one run's report. A run killed after its last
  # checkpoint but before its report resumes from the checkpoint.
  data_dir, outdir, _ = sweep
  report_path = os.path.join(outdir, 'eps1_seed0', 'privacy_report.json')
  with open(report_path) as f:
    before = json.load(f)
  os.remove(report_path)
  config = sweep_tiny.get_config()
  config.data_dir = data_dir
  runs, curves = sweep_lib.run_sweep(config, [1.0], [0], outdir,
                                     nonprivate=False)
  with open(report_path) as f:
    after = json.load(f)
  assert after['epsilon'] == before['epsilon']
  assert after['steps'] == before['steps'] == 4
  assert [r['run'] for r in runs] == ['eps1_seed0']
  assert [c['step'] for c in curves] == [1, 2, 3, 4]  # No duplicate step.
