"""The ``dplh-train`` command, run from a checkout: see dplh_jax/hyperface/cli/train.py."""

from dplh_jax.hyperface.cli import train

if __name__ == '__main__':
  train.run()
