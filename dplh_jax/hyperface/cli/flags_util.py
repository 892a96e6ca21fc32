"""What every command shares: ``--config`` by name or path, one-line errors."""

from __future__ import annotations

import ast
import logging as python_logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

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


def split_none_overrides(argv: Sequence[str]
                         ) -> tuple[list[str], list[str]]:
  """``(argv without them, fields)`` for the ``--config.FIELD=None``
  overrides, which ml_collections cannot parse for a float or int field."""
  rest, fields = [], []
  for arg in argv:
    flag, equals, value = arg.partition('=')
    if (equals and value.lower() == 'none'
        and flag.startswith(('--config.', '-config.'))):
      fields.append(flag.split('.', 1)[1])
    else:
      rest.append(arg)
  return rest, fields


def set_to_none(config: ml_collections.ConfigDict,
                fields: Sequence[str]) -> None:
  """``config.FIELD = None`` for each of ``fields``; only the optional
  fields (``config_dict.placeholder``) take None.

  Raises:
    ValueError: a field that does not exist or is not optional.
  """
  # A placeholder's FieldReference is only visible in the private fields.
  optional = sorted(
      key for key, value in config._fields.items()  # pylint: disable=protected-access
      if isinstance(value, ml_collections.FieldReference))
  for field in fields:
    if field not in optional:
      what = ('is not optional' if field in config
              else 'is not a config field')
      raise ValueError(f'--config.{field}=None: {field} {what}; None is '
                       f'taken by {", ".join(optional)}.')
    config[field] = None


def unknown_field_message(error: Exception, argv: Sequence[str]) -> str:
  """One line for ml_collections' error on ``--config.NAME`` that names no
  field, keeping its "Did you mean" suggestion."""
  # ml_collections raises AttributeError(KeyError(...)) from a KeyError that
  # holds the suggestion, from a bare KeyError(name).
  while not isinstance(error, KeyError) and error.__context__ is not None:
    error = error.__context__
  text = str(error.args[0]) if error.args else str(error)
  while text[:1] in '\'"':  # The message comes quoted, sometimes twice.
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  name, _, suggestion = text.partition('\n')
  name = name.strip('\'"')
  flag = next((arg.split('=', 1)[0] for arg in argv
               if arg.startswith(('--config.', '-config.'))
               and name in arg.split('=', 1)[0].split('.')), f'--config.{name}')
  return (f'{flag}: the config has no field {name!r}. '
          + (suggestion or 'Its fields are the names set in its get_config().'))


def run(main: Callable[[list[str]], None]) -> None:
  """``absl.app.run(main)`` with shipped config names resolved; a config
  that is neither a shipped name nor a file, or an override of a field it
  does not have, ends in one line; ``--config.FIELD=None`` sets an optional
  field (e.g. ``target_epsilon`` for a noise_multiplier-only run) to None."""
  argv, none_fields = split_none_overrides(resolve_config_names(sys.argv))
  for value in _config_values(argv):
    path = value.partition(':')[0]
    if path and not os.path.isfile(path):
      sys.exit(f'error: --config {value!r} is neither a shipped config '
               f'({", ".join(configs.names())}) nor a file.')

  def parse(args):
    try:
      rest = app.parse_flags_with_usage(args)
    except (KeyError, AttributeError) as error:  # ml_collections' unknown field
      sys.exit(f'error: {unknown_field_message(error, args)}')
    if none_fields:
      if flags.FLAGS.config is None:
        sys.exit(f'error: {missing_config_message()}')
      try:
        set_to_none(flags.FLAGS.config, none_fields)
      except ValueError as error:
        sys.exit(f'error: {error}')
    return rest

  sys.argv = argv  # ml_collections reads its overrides from sys.argv.
  app.run(main, argv=argv, flags_parser=parse)


def start(argv: Sequence[str], config) -> None:
  """What every main checks first: no stray arguments, a config given. Then
  absl's INFO chatter is turned off (progress lines are printed instead)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {list(argv[1:])}')
  if config is None:
    raise app.UsageError(missing_config_message())
  logging.set_verbosity(logging.WARNING)
  python_logging.getLogger('absl').addFilter(_DropNoise())


# Library warnings that say nothing a user can act on.
_NOISE = ('OpenCV is not installed', 'has no dataset_info.json')


class _DropNoise(python_logging.Filter):

  def filter(self, record: python_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(noise in message for noise in _NOISE)


def one_line_errors(fn: Callable[[], None]) -> None:
  """Runs ``fn``; a ValueError (bad config, data, flags, refused resume,
  workdir in use) or an OSError (a file that cannot be written) ends the
  process with ``error: ...`` and no traceback."""
  try:
    fn()
  except ValueError as error:
    sys.exit(f'error: {error}')
  except OSError as error:
    if error.filename and error.strerror:
      sys.exit(f'error: {error.filename}: {error.strerror}')
    sys.exit(f'error: {error}')
