"""Shipped configs, each a file with ``get_config()``, reachable by name.

``--config tiny`` and ``--config dplh_jax/hyperface/configs/tiny.py`` name
the same file; any other path works too. Variants override ``default``.
"""

from __future__ import annotations

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The shipped config names."""
  return sorted(f[:-3] for f in os.listdir(DIRECTORY)
                if f.endswith('.py') and not f.startswith('_'))


def resolve(value: str) -> str:
  """A ``--config`` value with a shipped config's name replaced by its path.

  ``value`` may carry ml_collections' ``:argument`` suffix; a path that
  exists is kept as it is.
  """
  name, sep, rest = value.partition(':')
  if os.path.exists(name) or name not in names():
    return value
  return os.path.join(DIRECTORY, name + '.py') + sep + rest
