"""The ``dplh-audit`` command, run from a checkout: see dplh_jax/hyperface/cli/audit.py."""

from dplh_jax.hyperface.cli import audit

if __name__ == '__main__':
  audit.run()
