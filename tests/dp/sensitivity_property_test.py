"""Property test of the guarantee: removing any one example moves the clipped
sum by at most C, on random models and adversarial batches, on both clipping
paths, removal by masking and by deletion (dplh_jax.dp.sensitivity_audit).

A fixed slice of cases runs here; ``experiments/sensitivity_search.py`` runs
as many as you like.
"""

import numpy as np
import pytest

from dplh_jax.dp import sensitivity_audit

pytestmark = pytest.mark.slow

# Seed 15 is an edge-magnitude Dense case (inputs ~1e19, output gradients
# ~1e-19.5) that moved the sum by 14.5 C before clip_norms.
SEEDS = tuple(range(8)) + (15,)
TOLERANCE = 1e-4  # float32 rounding of the norms and sums


@pytest.fixture(scope='module')
def cases():
  return {seed: sensitivity_audit.random_case(seed) for seed in SEEDS}


def test_the_slice_covers_what_broke_before(cases):
  """Guards the slice itself: it must keep exercising dropout, 1-D and 2-D
  convolutions, norm layers, several rows, extreme magnitudes, NaN/Inf and
  both microbatch settings."""
  specs = [spec for spec, _, _, _ in cases.values()]
  batches = [batch for _, batch, _, _ in cases.values()]
  convs = [conv for spec in specs for conv in spec.convs]
  assert {len(conv.kernel) for conv in convs} == {1, 2}
  assert any(spec.dropout_rate > 0 for spec in specs)
  assert {spec.norm for spec in specs} >= {'layer', 'group'}
  assert any(spec.rows > 1 for spec in specs)
  assert any(spec.extra_param for spec in specs)
  assert {mb for _, _, _, mb in cases.values()} == {None, 2}
  assert any(not np.all(np.isfinite(b['x'])) or
             not np.all(np.isfinite(b['target'])) for b in batches)
  finite = [np.abs(b['x'][np.isfinite(b['x'])]) for b in batches]
  assert max(f.max() for f in finite) > 1e20
  assert min(f[f > 0].min() for f in finite) < 1e-20


@pytest.mark.parametrize('path', sorted(sensitivity_audit.CLIPPING_PATHS))
@pytest.mark.parametrize('seed', SEEDS)
def test_removing_one_example_moves_the_sum_by_at_most_c(cases, seed, path):
  spec, batch, l2_norm_clip, microbatch_size = cases[seed]
  ratio = sensitivity_audit.worst_removal_ratio(
      spec, batch, path, l2_norm_clip, microbatch_size)
  assert ratio <= 1 + TOLERANCE, (spec, l2_norm_clip)


def test_the_check_sees_a_clip_that_is_too_weak(cases):
  """The check itself can fail: clipping to 2C but judging against C."""
  spec, batch, l2_norm_clip, microbatch_size = cases[1]
  ratio = sensitivity_audit.worst_removal_ratio(
      spec, batch, 'vmap', 2 * l2_norm_clip, microbatch_size) * 2
  assert ratio > 1.5
