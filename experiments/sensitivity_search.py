"""Searches random models and adversarial batches for a clipping violation.

  python experiments/sensitivity_search.py --num_cases 200 [--first_seed 0]

For each case (dplh_jax.dp.sensitivity_audit.random_case) and each clipping
path, removes every example by masking and by deletion and checks that the
clipped sum moves by at most C (1 + 1e-4). Exits 1 on the first violation,
printing the case's seed so it can be replayed.
"""

import sys
import time

from absl import app
from absl import flags

from dplh_jax.dp import sensitivity_audit

_NUM_CASES = flags.DEFINE_integer('num_cases', 100, 'Random cases to try.')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'Seed of the first case.')
_TOLERANCE = 1e-4


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start, worst = time.time(), 0.0
  for done, seed in enumerate(range(_FIRST_SEED.value,
                                    _FIRST_SEED.value + _NUM_CASES.value), 1):
    spec, batch, l2_norm_clip, microbatch_size = (
        sensitivity_audit.random_case(seed))
    for path in sorted(sensitivity_audit.CLIPPING_PATHS):
      ratio = sensitivity_audit.worst_removal_ratio(
          spec, batch, path, l2_norm_clip, microbatch_size)
      worst = max(worst, ratio)
      if ratio > 1 + _TOLERANCE:
        sys.exit(f'VIOLATION: seed {seed}, path {path}: removing one example '
                 f'moved the clipped sum by {ratio:.6f} C ({spec}).')
    elapsed = time.time() - start
    eta = elapsed / done * (_NUM_CASES.value - done)
    print(f'case {done}/{_NUM_CASES.value} (seed {seed}): worst so far '
          f'{worst:.6f} C, {elapsed:.0f} s elapsed, ETA {eta:.0f} s',
          flush=True)
  print(f'No violation in {_NUM_CASES.value} cases x '
        f'{len(sensitivity_audit.CLIPPING_PATHS)} paths; worst {worst:.6f} C.')


if __name__ == '__main__':
  app.run(main)
