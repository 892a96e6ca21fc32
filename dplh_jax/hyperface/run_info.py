"""What a run ran on: package versions, git commit, devices, processes.

Written into ``workdir/config.json`` beside the config (under ``"run"``), so
every run records itself. It describes; it binds nothing (a resume on other
hardware is allowed and replays the same computation to float rounding).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any

import jax

PACKAGES = ('dplh-jax', 'jax', 'jaxlib', 'flax', 'optax', 'dp-accounting',
            'numpy', 'scipy', 'orbax-checkpoint', 'tensorflow-datasets')


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def git_commit() -> str | None:
  """The commit of the checkout this package runs from, if it is one."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'],
                         capture_output=True, text=True, timeout=5,
                         check=False)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_info() -> dict[str, Any]:
  """The environment of this process, JSON-serializable."""
  return {
      'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'command': sys.argv,
      'host': socket.gethostname(),
      'python': platform.python_version(),
      'packages': {p: _version(p) for p in PACKAGES},
      'git_commit': git_commit(),
      'devices': [str(d) for d in jax.devices()],
      # Devices and processes visible; train records those it trains on.
      'num_devices': jax.device_count(),
      'num_processes': jax.process_count(),
  }
