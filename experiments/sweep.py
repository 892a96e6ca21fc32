"""The ``dplh-sweep`` command, run from a checkout: see dplh_jax/hyperface/cli/sweep.py."""

from dplh_jax.hyperface.cli import sweep

if __name__ == '__main__':
  sweep.run()
