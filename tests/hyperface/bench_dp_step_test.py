"""Smoke test of experiments/bench_dp_step.py at a tiny size (no timing asserts)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

EXPERIMENTS = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments')
SCRIPT = os.path.join(EXPERIMENTS, 'bench_dp_step.py')


def _run(*flags):
  out = subprocess.run([sys.executable, SCRIPT, '--model=tiny', '--json',
                        *flags], check=True, capture_output=True, text=True,
                       env=os.environ | {'JAX_PLATFORMS': 'cpu'})
  return json.loads(out.stdout)


def test_times_our_steps_and_counts_one_compile_per_sampled_run():
  # optax_contrib is left out: vmapped convolutions take ~45 s to compile
  # even at this size, and its step is optax's code, not ours.
  result = _run('--batch_size=4', '--num_proposals=2', '--rounds=1',
                '--sampled_steps=2', '--variants=nonprivate,dp_one_pass')
  variants = result['variants']
  assert list(variants) == ['nonprivate', 'dp_one_pass']
  # Ratios are to the first variant's median, measured in the same run.
  base = variants['nonprivate']['median_ms']
  for row in variants.values():
    assert row['ratio_to_first'] == pytest.approx(row['median_ms'] / base,
                                                  rel=1e-6)
  for row in variants.values():
    assert row['median_ms'] > 0 and row['peak_mib'] > 0
  # Every Poisson-sampled step has the same padded size: one compile for the
  # whole run, not one per step.
  assert len(result['sampled_run']['padded_sizes']) == 1
  assert result['sampled_run']['compiles'] == 1


def test_memory_mode_reports_a_peak_per_logical_batch():
  result = _run('--num_proposals=2', '--memory_sizes=8',
                '--microbatch_size=4')
  (row,) = result['memory']
  assert row['batch_size'] == 8
  assert row['xla_peak_mib'] > 0 and row['max_rss_mib'] > 0


def test_clip_parts_times_each_piece():
  out = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, 'bench_clip_parts.py'),
       '--model=tiny', '--batch_size=2', '--num_proposals=2', '--rounds=1',
       '--clippings=one_pass'], check=True, capture_output=True, text=True,
      env=os.environ | {'JAX_PLATFORMS': 'cpu'}).stdout
  rows = [line for line in out.splitlines() if line.startswith('| ')][1:]
  assert [row.split(' | ')[0] for row in rows] == [
      '| forward (flat batch)', '| gradient (non-private)',
      '| clipped sum (one_pass)']
  # The ratio column is each piece's time over the non-private gradient's
  # (the forward pass comes before it and has none).
  cells = [row.split(' | ') for row in rows]
  assert cells[0][2].rstrip(' |') == '-'
  base = float(cells[1][1])
  for cell in cells[1:]:
    ms = float(cell[1])
    # Times are printed to 0.1 ms and ratios to 0.01, from unrounded times.
    rounding = 0.005 + ms / base * (0.05 / ms + 0.05 / base)
    assert float(cell[2].rstrip(' |')) == pytest.approx(ms / base,
                                                        abs=rounding)


def test_engineer_path_compares_our_aggregate_with_optax_contrib():
  out = subprocess.run(
      [sys.executable, os.path.join(EXPERIMENTS, 'bench_engineer_path.py'),
       '--models=mlp', '--rounds=1'], check=True, capture_output=True,
      text=True, env=os.environ | {'JAX_PLATFORMS': 'cpu'}).stdout
  rows = [line.split(' | ') for line in out.splitlines()
          if line.startswith('| mlp')]
  assert [row[2] for row in rows] == ['aggregate', 'step']
  for row in rows:
    assert row[1] == '88'  # the Poisson batch of 64 expected, padded
    ours, contrib = float(row[3]), float(row[4])
    assert ours > 0 and contrib > 0
    # Printed to 0.01 ms and the ratio to 0.01, from unrounded times.
    ratio = float(row[5].strip(' |*'))
    rounding = 0.005 + 0.005 / contrib + 0.005 * ours / contrib ** 2
    assert ratio == pytest.approx(ours / contrib, abs=rounding + 1e-9)
