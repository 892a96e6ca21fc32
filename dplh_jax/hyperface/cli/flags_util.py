"""What every command shares: ``--config`` by name or path, one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from absl import app
from absl import logging

from dplh_jax.hyperface import configs


def resolve_config_names(argv: Sequence[str]) -> list[str]:
  """``argv`` with ``--config NAME`` / ``--config=NAME`` turned into the
  shipped config's path, so configs work by name from any directory."""
  out, expect_value = [], False
  for arg in argv:
    if expect_value:
      arg, expect_value = configs.resolve(arg), False
    elif arg in ('--config', '-config'):
      expect_value = True
    elif arg.startswith(('--config=', '-config=')):
      flag, value = arg.split('=', 1)
      arg = f'{flag}={configs.resolve(value)}'
    out.append(arg)
  return out


def missing_config_message() -> str:
  return ('no config given: pass --config NAME (one of '
          f'{", ".join(configs.names())}) or --config path/to/config.py')


def _config_values(argv: Sequence[str]) -> list[str]:
  values = []
  for flag, value in zip(argv, list(argv[1:]) + ['']):
    if flag in ('--config', '-config'):
      values.append(value)
    elif flag.startswith(('--config=', '-config=')):
      values.append(flag.split('=', 1)[1])
  return values


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run(main)`` with shipped config names resolved; a config
  that is neither a shipped name nor a file ends in one line."""
  argv = resolve_config_names(sys.argv)
  for value in _config_values(argv):
    path = value.partition(':')[0]
    if path and not os.path.isfile(path):
      sys.exit(f'error: --config {value!r} is neither a shipped config '
               f'({", ".join(configs.names())}) nor a file.')
  app.run(main, argv=argv)


def start(argv: Sequence[str], config) -> None:
  """What every main checks first: no stray arguments, a config given. Then
  absl's INFO chatter is turned off (progress lines are printed instead)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {list(argv[1:])}')
  if config is None:
    raise app.UsageError(missing_config_message())
  logging.set_verbosity(logging.WARNING)


def one_line_errors(fn: Callable[[], None]) -> None:
  """Runs ``fn``; a ValueError (bad config, data, flags, refused resume,
  workdir in use) ends the process with ``error: ...`` and no traceback."""
  try:
    fn()
  except ValueError as error:
    sys.exit(f'error: {error}')
